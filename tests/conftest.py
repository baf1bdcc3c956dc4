"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import blockemu


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Creates a raw image (optionally filled with a pattern) and returns its path."""

    def make(name: str = "disk.img", size: int = 1 << 20, fill: bytes | None = None) -> Path:
        path = tmp_path / name
        blockemu.create_image(path, size)
        if fill is not None:
            with open(path, "r+b") as f:
                f.write((fill * (size // len(fill) + 1))[:size])
        return path

    return make
