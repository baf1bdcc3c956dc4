"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def best_of_ns(repeats: int, fn: Callable[[], object]) -> int:
    """The shortest of ``repeats`` runs of ``fn`` in nanoseconds (the garbage collector off
    while each runs)."""
    best: int | None = None
    for _ in range(repeats):
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            fn()
            elapsed = time.perf_counter_ns() - t0
        finally:
            gc.enable()
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None, "repeats must be at least 1"
    return best
