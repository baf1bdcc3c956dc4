"""Real peers (qemu-img, qemu-io, qemu-nbd, qemu-system-x86_64, fio) the tests compare against.

CI installs them: under CI a missing peer is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """The path of a peer tool; skips locally when it is missing, fails in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path
