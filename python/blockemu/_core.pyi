# Hand-written stubs of the native module blockemu._core; checked by mypy's stubtest.

from typing import Literal, final

from typing_extensions import Buffer

from blockemu.geometry import GeometryReport

__all__ = [
    "Geometry",
    "__version__",
    "chs_to_lba",
    "explain_geometry",
    "guess_geometry",
    "lba_to_chs",
]

__version__: str

_Translation = Literal["none", "lba", "large", "rechs"]
_TranslationRequest = Literal["auto", "none", "lba", "large", "rechs"]
_Device = Literal["ide", "ide-hd", "virtio", "virtio-blk", "scsi-hd"]

@final
class Geometry:
    """An immutable disk geometry: cylinders, heads, sectors per track and BIOS translation."""

    def __new__(
        cls, cyls: int, heads: int, secs: int, trans: _Translation = "none"
    ) -> Geometry: ...
    @property
    def cyls(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def secs(self) -> int: ...
    @property
    def trans(self) -> _Translation: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __lt__(self, other: Geometry, /) -> bool: ...
    def __le__(self, other: Geometry, /) -> bool: ...
    def __gt__(self, other: Geometry, /) -> bool: ...
    def __ge__(self, other: Geometry, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int, int, _Translation]: ...

def guess_geometry(
    boot_sector: Buffer | None,
    total_sectors: int,
    *,
    cyls: int = 0,
    heads: int = 0,
    secs: int = 0,
    trans: _TranslationRequest = "auto",
    device: _Device = "ide",
) -> Geometry: ...
def explain_geometry(
    boot_sector: Buffer | None,
    total_sectors: int,
    *,
    cyls: int = 0,
    heads: int = 0,
    secs: int = 0,
    trans: _TranslationRequest = "auto",
    device: _Device = "ide",
) -> GeometryReport: ...
def chs_to_lba(geometry: Geometry, c: int, h: int, s: int) -> int: ...
def lba_to_chs(geometry: Geometry, lba: int) -> tuple[int, int, int]: ...
