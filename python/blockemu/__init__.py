"""blockemu: emulate a virtual machine's block layer from Python.

Start with :func:`open_image` (or :func:`create_image`) to get a :class:`BlockNode`; see the
README for a tour.
"""

from __future__ import annotations

from blockemu._core import (
    BlockNode,
    DirtyBitmap,
    FaultInjector,
    Geometry,
    GuestMemory,
    IdeChannel,
    IdeDisk,
    MirrorJob,
    NbdServer,
    VirtioBlk,
    __version__,
    chs_to_lba,
    create_image,
    describe_state,
    explain_geometry,
    guess_geometry,
    image_info,
    lba_to_chs,
    load_state,
    memory_node,
    open_image,
    save_state,
)
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
from blockemu.jobs import Job
from blockemu.machine import Machine

__all__ = [
    "BlockNode",
    "BlockemuError",
    "DirtyBitmap",
    "FaultInjector",
    "Geometry",
    "GeometryError",
    "GuestMemory",
    "IdeChannel",
    "IdeDisk",
    "ImageFormatError",
    "InactiveError",
    "Job",
    "LockError",
    "Machine",
    "MigrationError",
    "MirrorJob",
    "NbdServer",
    "OutOfRangeError",
    "ReadOnlyError",
    "StateError",
    "VirtioBlk",
    "__version__",
    "chs_to_lba",
    "create_image",
    "describe_state",
    "explain_geometry",
    "guess_geometry",
    "image_info",
    "lba_to_chs",
    "load_state",
    "memory_node",
    "open_image",
    "save_state",
]
