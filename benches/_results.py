"""Machine-readable results for the benchmark scripts (their ``--json`` option).

With ``--json`` a script prints its usual human-readable text on stderr and, at the end, one
JSON object per result on stdout; ``benches/run_all.py`` collects them into one table. Each
result: ``bench`` (the script), ``name``, ``ours`` and ``unit``, optionally ``baseline`` (what it
is compared with) and ``baseline_value``, ``ratio`` (ours ÷ baseline in the direction where
higher is better: for times it is baseline ÷ ours) and ``target`` (text, e.g. ">= 0.95").
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, TextIO


class Results:
    def __init__(self, bench: str, enabled: bool) -> None:
        self.bench = bench
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._stdout: TextIO = sys.stdout
        self._redirect: contextlib.redirect_stdout[TextIO] | None = None
        if enabled:  # human-readable text goes to stderr, JSON lines to stdout
            self._redirect = contextlib.redirect_stdout(sys.stderr)
            self._redirect.__enter__()

    def add(
        self,
        name: str,
        ours: float | None,
        unit: str,
        *,
        baseline: str | None = None,
        baseline_value: float | None = None,
        ratio: float | None = None,
        target: str | None = None,
    ) -> None:
        if ratio is None and ours is not None and baseline_value:
            ratio = ours / baseline_value
        self.rows.append(
            {
                "bench": self.bench,
                "name": name,
                "ours": ours,
                "unit": unit,
                "baseline": baseline,
                "baseline_value": baseline_value,
                "ratio": ratio,
                "target": target,
            }
        )

    def emit(self) -> None:
        """Prints the JSON lines (only with ``--json``)."""
        if not self.enabled:
            return
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        for row in self.rows:
            print(json.dumps(row), file=self._stdout, flush=True)
