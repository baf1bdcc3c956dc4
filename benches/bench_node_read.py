"""node.read against a plain os.pread loop, in the same run (issue 2's targets).

4 KiB reads at random offsets of a 64 MiB file in /dev/shm (page cache, so this measures our
overhead, not a disk), then 1 MiB sequential reads. Prints IOPS / throughput and the ratio
node ÷ os.pread. Targets: 4 KiB ratio >= 0.95, 1 MiB ratio >= 0.9.

Run: python benches/bench_node_read.py [--quick]
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
    results = Results("node_read", args.json)
    n_small = 20_000 if args.quick else 200_000
    n_big = 64 if args.quick else 640
    repeats = 3 if args.quick else 5

    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        path = os.path.join(tmp, "bench.img")
        blockemu.create_image(path, SIZE)
        with open(path, "r+b") as f:
            f.write(random.Random(1).randbytes(SIZE))
        rng = random.Random(42)
        offsets = [rng.randrange(SIZE // 4096) * 4096 for _ in range(n_small)]
        node = blockemu.open_image(path, readonly=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            # Correctness flag: both paths return the same bytes.
            assert all(node.read(o, 4096) == os.pread(fd, 4096, o) for o in offsets[:100])

            def node_small() -> None:
                read = node.read
                for o in offsets:
                    read(o, 4096)

            def pread_small() -> None:
                pread = os.pread
                for o in offsets:
                    pread(fd, 4096, o)

            big_offsets = [(i % (SIZE >> 20)) << 20 for i in range(n_big)]

            def node_big() -> None:
                read = node.read
                for o in big_offsets:
                    read(o, 1 << 20)

            def pread_big() -> None:
                pread = os.pread
                for o in big_offsets:
                    pread(fd, 1 << 20, o)

            # Interleave baseline and ours so drift affects both.
            t_node_s = min(best_of_ns(repeats, node_small), best_of_ns(repeats, node_small))
            t_pread_s = min(best_of_ns(repeats, pread_small), best_of_ns(repeats, pread_small))
            t_node_b = best_of_ns(repeats, node_big)
            t_pread_b = best_of_ns(repeats, pread_big)
        finally:
            os.close(fd)
            node.close()

    iops_node = n_small / (t_node_s / 1e9)
    iops_pread = n_small / (t_pread_s / 1e9)
    gbs_node = n_big * (1 << 20) / (t_node_b / 1e9) / 1e9
    gbs_pread = n_big * (1 << 20) / (t_pread_b / 1e9) / 1e9
    print(f"cpus={os.cpu_count()} python={os.sys.version.split()[0]} file=/dev/shm 64 MiB")
    print(
        f"4 KiB random read: node.read {iops_node:,.0f} IOPS "
        f"({t_node_s / n_small:.0f} ns/op), os.pread {iops_pread:,.0f} IOPS "
        f"({t_pread_s / n_small:.0f} ns/op), ratio {iops_node / iops_pread:.3f} (target >= 0.95)"
    )
    print(
        f"1 MiB sequential read: node.read {gbs_node:.2f} GB/s, os.pread {gbs_pread:.2f} GB/s, "
        f"ratio {gbs_node / gbs_pread:.3f} (target >= 0.90)"
    )
    results.add(
        "4 KiB random read, 64 MiB file in /dev/shm: node.read",
        iops_node,
        "IOPS",
        baseline="os.pread loop",
        baseline_value=iops_pread,
        target=">= 0.95",
    )
    results.add(
        "1 MiB sequential read: node.read",
        gbs_node,
        "GB/s",
        baseline="os.pread loop",
        baseline_value=gbs_pread,
        target=">= 0.90",
    )
    results.emit()


if __name__ == "__main__":
    main()
