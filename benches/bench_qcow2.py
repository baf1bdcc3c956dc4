"""4 KiB random reads and writes through qcow2 (fully allocated and sparse) vs raw, same run.

Images of 64 MiB in /dev/shm (page cache: this measures the format's overhead, not a disk).
"allocated": every cluster written beforehand; "sparse": a fresh image, so the writes
allocate clusters (reads of unallocated clusters return zeroes without touching data).
Prints IOPS per case and the ratio qcow2 ÷ raw. Target: qcow2 allocated >= 0.8x raw.

Run: python benches/bench_qcow2.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile

import blockemu
from _results import Results
from _timing import best_of_ns

SIZE = 64 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    args = ap.parse_args()
    out = Results("qcow2", args.json)
    n = 5_000 if args.quick else 50_000
    repeats = 2 if args.quick else 4
    rng = random.Random(42)
    offsets = [rng.randrange(SIZE // 4096) * 4096 for _ in range(n)]
    block = random.Random(1).randbytes(4096)
    fill = random.Random(2).randbytes(1 << 20)

    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        paths = {}
        for name, fmt in (("raw", "raw"), ("qcow2 allocated", "qcow2"), ("qcow2 sparse", "qcow2")):
            path = os.path.join(tmp, name.replace(" ", "_"))
            blockemu.create_image(path, SIZE, format=fmt)  # type: ignore[arg-type]
            if name != "qcow2 sparse":
                with blockemu.open_image(path) as node:
                    for off in range(0, SIZE, 1 << 20):
                        node.write(off, fill)
            paths[name] = path

        for name, path in paths.items():
            node = blockemu.open_image(path)
            try:

                def reads(node: blockemu.BlockNode = node) -> None:
                    read = node.read
                    for o in offsets:
                        read(o, 4096)

                def writes(node: blockemu.BlockNode = node) -> None:
                    write = node.write
                    for o in offsets:
                        write(o, block)

                # Reads first (on the sparse image: of unallocated clusters); the first write
                # pass on a sparse image is the allocating one, so it is timed alone.
                t_r = best_of_ns(repeats, reads)
                t_w = (
                    best_of_ns(1, writes) if name == "qcow2 sparse" else best_of_ns(repeats, writes)
                )
                results[name] = (n / (t_r / 1e9), n / (t_w / 1e9))
            finally:
                node.close()

    raw_r, raw_w = results["raw"]
    print(f"cpus={os.cpu_count()} file=/dev/shm 64 MiB, 64 KiB clusters, {n} ops per pass")
    for name, (r, w) in results.items():
        print(
            f"{name:16s} 4 KiB random read {r:10,.0f} IOPS ({r / raw_r:.2f}x raw)   "
            f"write {w:10,.0f} IOPS ({w / raw_w:.2f}x raw)"
        )
    print("target: qcow2 allocated >= 0.80x raw (sparse writes allocate: first pass only)")
    cases = (
        ("qcow2 allocated", "allocated", ">= 0.80"),
        ("qcow2 sparse", "sparse: holes, allocating writes", None),
    )
    for name, what, target in cases:
        r, w = results[name]
        for op, ours, base in (("read", r, raw_r), ("write", w, raw_w)):
            out.add(
                f"qcow2 ({what}, 64 KiB clusters), 4 KiB random {op}, 64 MiB in /dev/shm",
                ours,
                "IOPS",
                baseline="raw file, same node API",
                baseline_value=base,
                target=target,
            )
    out.emit()


if __name__ == "__main__":
    main()
