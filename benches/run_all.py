"""Runs every benchmark and prints one table: benchmark, our figure, baseline, ratio, target.

Each Python benchmark in benches/ runs its own baseline in the same run (``--json``: one JSON
line per result, collected here). ``--criterion`` also runs the criterion benches of the Rust
core (``cargo bench``, 3 s per benchmark; criterion's ``--quick`` with ``--quick``) and adds
their key figures. The machine (CPU model, cores, kernel, Python, load average before and
after) is printed with the table: figures measured on a loaded machine spread, the ratios less
than the absolute numbers since both sides of a ratio share the load.

Run: python benches/run_all.py [--quick] [--criterion] [--json] [--only NAME ...] [-v]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The Python benchmark scripts, in the order of the table.
SCRIPTS = ["node_read", "qcow2", "nbd", "nbd_server", "mirror", "virtio_read", "ide_pio"]

#: criterion benches → the results shown: (criterion id, row name, target). A row whose id has
#: a partner (``vs``) shows it as the baseline.
CRITERION: dict[str, list[tuple[str, str, str | None, str | None]]] = {
    "block": [
        (
            "read_4k_random/node",
            "criterion: 4 KiB read through BlockNode",
            "read_4k_random/backend_pread",
            None,
        ),
    ],
    "geometry": [
        ("guess/mbr_16_heads", "criterion: guess on a valid MBR", None, "< 200 ns"),
        ("chs/chs_to_lba", "criterion: CHS→LBA", None, "< 5 ns"),
        ("chs/lba_to_chs", "criterion: LBA→CHS", None, "< 5 ns"),
    ],
    "jobs": [
        ("jobs/submit_wait_idle_pool", "criterion: job submit + wait, idle pool", None, "< 20 µs"),
    ],
    "virtio": [
        (
            "virtio/parse_3desc_chain",
            "criterion: virtio, walk + parse one 3-descriptor read request",
            None,
            "< 100 ns",
        ),
        (
            "virtio/batch_128x4k_reads_memory_node",
            "criterion: virtio, 128 4 KiB reads per notify through the device (memory node)",
            None,
            None,
        ),
    ],
}

_UNITS_NS = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import blockemu

        version = blockemu.__version__
    except ImportError:
        version = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "blockemu": version,
        "load_before": os.getloadavg()[0],
    }


def run_script(name: str, quick: bool, verbose: bool) -> tuple[list[dict[str, Any]], str | None]:
    cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--json"]
    if quick:
        cmd.append("--quick")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if verbose and r.stderr:
        print(r.stderr, file=sys.stderr)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0:
        return rows, f"bench_{name}.py failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}"
    if not rows:  # e.g. a peer tool is missing: the script says so and exits 0
        print(f"  bench_{name}.py measured nothing: {r.stderr.strip()[-300:]}", file=sys.stderr)
    return rows, None


def parse_criterion(text: str) -> dict[str, float]:
    """criterion's text output → {benchmark id: estimate in ns} (the middle of ``time: [...]``)."""
    out: dict[str, float] = {}
    last = ""
    for line in text.splitlines():
        m = re.search(r"time:\s+\[\S+ \S+ ([0-9.]+) (\S+) \S+ \S+\]", line)
        if m:
            head = line[: m.start()].strip()
            name = head or last
            out[name] = float(m.group(1)) * _UNITS_NS[m.group(2)]
        elif line.strip() and not line.startswith(" "):
            last = line.strip()
    return out


def run_criterion(quick: bool, verbose: bool) -> tuple[list[dict[str, Any]], str | None]:
    if shutil.which("cargo") is None:
        return [], "cargo not found: criterion benches skipped"
    rows: list[dict[str, Any]] = []
    errors = []
    for bench, wanted in CRITERION.items():
        cmd = ["cargo", "bench", "-j2", "--bench", bench, "--"]
        if quick:
            cmd += ["--quick", "--warm-up-time", "0.2", "--measurement-time", "0.5"]
        else:
            cmd += ["--warm-up-time", "1", "--measurement-time", "3"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if verbose:
            print(r.stdout, file=sys.stderr)
        if r.returncode != 0:
            errors.append(f"cargo bench --bench {bench} failed: {r.stderr.strip()[-800:]}")
            continue
        times = parse_criterion(r.stdout)
        for ident, name, partner, target in wanted:
            if ident not in times:
                errors.append(f"criterion {ident}: no figure in the output")
                continue
            ours = times[ident]
            base = times.get(partner) if partner else None
            rows.append(
                {
                    "bench": f"criterion {bench}",
                    "name": name,
                    "ours": ours,
                    "unit": "ns",
                    "baseline": None if partner is None else partner.split("/")[-1],
                    "baseline_value": base,
                    "ratio": None if base is None else base / ours,
                    "target": target,
                }
            )
    return rows, "; ".join(errors) or None


def figure(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ns":  # criterion times: pick a readable unit
        for u, scale in (("ms", 1e6), ("µs", 1e3), ("ns", 1.0)):
            if value >= scale or u == "ns":
                return f"{value / scale:.3g} {u}"
    if unit == "IOPS":
        return f"{value / 1e3:,.1f}k IOPS" if value < 1e6 else f"{value / 1e6:.2f} M IOPS"
    if unit in ("GB/s", "MB/s"):
        return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["benchmark", "blockemu", "baseline", "baseline figure", "ratio", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"],
            figure(r["ours"], r["unit"]),
            r["baseline"] or "",
            "" if r["baseline"] is None else figure(r["baseline_value"], r["unit"]),
            "" if r["ratio"] is None else f"{r['ratio']:.2f}",
            r["target"] or "",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: every bench's --quick")
    ap.add_argument("--criterion", action="store_true", help="also run the criterion benches")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    ap.add_argument("-v", "--verbose", action="store_true", help="show each bench's own output")
    args = ap.parse_args()

    info = machine()
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    t0 = time.monotonic()
    for name in args.only or SCRIPTS:
        t = time.monotonic()
        print(f"running bench_{name}.py ...", file=sys.stderr, flush=True)
        got, err = run_script(name, args.quick, args.verbose)
        rows += got
        if err:
            problems.append(err)
        print(f"  {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    if args.criterion:
        print("running the criterion benches ...", file=sys.stderr, flush=True)
        got, err = run_criterion(args.quick, args.verbose)
        rows += got
        if err:
            problems.append(err)
    info["load_after"] = os.getloadavg()[0]
    info["seconds"] = round(time.monotonic() - t0, 1)
    info["quick"] = args.quick

    if args.json:
        print(json.dumps({"machine": info, "results": rows, "problems": problems}, indent=2))
    else:
        print(
            f"machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
            f"Python {info['python']}, blockemu {info['blockemu']}; load average "
            f"{info['load_before']:.2f} before, {info['load_after']:.2f} after; "
            f"{info['seconds']} s{' (--quick)' if args.quick else ''}"
        )
        print()
        print(table(rows))
        for p in problems:
            print(f"\nproblem: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
