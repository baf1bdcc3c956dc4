"""blockemu: emulate a virtual machine's block layer from Python."""

from __future__ import annotations

from blockemu import _core
from blockemu._core import Geometry, chs_to_lba, explain_geometry, guess_geometry, lba_to_chs
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
    "Geometry",
    "GeometryError",
    "ImageFormatError",
    "InactiveError",
    "LockError",
    "MigrationError",
    "OutOfRangeError",
    "ReadOnlyError",
    "StateError",
    "__version__",
    "chs_to_lba",
    "explain_geometry",
    "guess_geometry",
    "lba_to_chs",
]
