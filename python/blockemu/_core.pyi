# Hand-written stubs of the native module blockemu._core; checked by mypy's stubtest.

__version__: str
