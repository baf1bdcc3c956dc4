"""blockemu: emulate a virtual machine's block layer from Python."""

from __future__ import annotations

from blockemu import _core
from blockemu.errors import (
    BlockemuError,
    GeometryError,
    ImageFormatError,
    InactiveError,
    LockError,
    MigrationError,
    OutOfRangeError,
    ReadOnlyError,
    StateError,
)

__version__: str = _core.__version__

__all__ = [
    "BlockemuError",
    "GeometryError",
    "ImageFormatError",
    "InactiveError",
    "LockError",
    "MigrationError",
    "OutOfRangeError",
    "ReadOnlyError",
    "StateError",
    "__version__",
]
