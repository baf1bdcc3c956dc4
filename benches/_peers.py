"""The real peers the benchmark scripts measure against (qemu-img, qemu-nbd)."""

from __future__ import annotations

import re
import subprocess


def qemu_img_bench(
    uri: str, count: int, size: int, *, depth: int = 1, write: bool = False, repeats: int = 1
) -> float:
    """The best time in seconds of `qemu-img bench` (``count`` requests of ``size`` bytes,
    ``depth`` in flight, sequential offsets) on a raw image or NBD export, over ``repeats``
    runs."""
    args = ["qemu-img", "bench", "-f", "raw", "-d", str(depth), "-s", str(size)]
    args += ["-S", str(size), "-c", str(count)]
    if write:
        args += ["-w", "--pattern=0xa5"]
    best = float("inf")
    for _ in range(repeats):
        out = subprocess.run([*args, uri], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Run completed in ([0-9.]+) seconds", out)
        assert m, out
        best = min(best, float(m.group(1)))
    return best
