"""The exception tree of blockemu (API.md, "Errors").

Every error blockemu raises on purpose derives from :class:`BlockemuError`. Operating-system
failures keep their :class:`OSError` subclasses.
"""

from __future__ import annotations

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
]


class BlockemuError(Exception):
    """Root of all errors blockemu raises on purpose."""


class InactiveError(BlockemuError):
    """I/O or a metadata write on an inactive node."""


class LockError(BlockemuError):
    """The image is locked by another process in a conflicting way."""


class OutOfRangeError(BlockemuError, ValueError):
    """An access beyond the end of an image or guest memory."""


class ImageFormatError(BlockemuError, ValueError):
    """Unknown, malformed or corrupt image."""


class GeometryError(BlockemuError, ValueError):
    """Invalid user-supplied geometry."""


class StateError(BlockemuError, ValueError):
    """Malformed, truncated, tampered or incompatible device state."""


class ReadOnlyError(BlockemuError, PermissionError):
    """A write to a read-only node."""


class MigrationError(BlockemuError):
    """A migration that did not complete.

    ``phase`` names where it stopped; ``source_resumed`` says whether the source machine runs
    again.
    """

    def __init__(self, message: str, *, phase: str = "unknown", source_resumed: bool = False):
        super().__init__(message)
        self.phase = phase
        self.source_resumed = source_resumed
