"""The real peers the benchmark scripts measure against (qemu-img, qemu-nbd)."""

from __future__ import annotations

import os
import re
import subprocess
import time


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


def start_qemu_nbd(image: str, socket_path: str, pidfile: str, *, cache: str | None = None) -> int:
    """Serves ``image`` (raw) as export ``exp`` on a Unix socket with a forked, persistent
    ``qemu-nbd`` (4 clients at once); returns its pid once it is ready to accept."""
    args = ["qemu-nbd", "--fork", "--persistent", "--shared=4"]
    if cache is not None:
        args.append(f"--cache={cache}")
    args += ["-f", "raw", "-x", "exp", "--pid-file", pidfile, "-k", socket_path, image]
    subprocess.run(args, check=True)
    while not os.path.exists(pidfile) or not open(pidfile).read().strip():
        time.sleep(0.01)
    return int(open(pidfile).read())
