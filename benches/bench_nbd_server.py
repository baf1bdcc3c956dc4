"""Our NBD server (blockemu.NbdServer exporting a raw file node) against qemu-nbd serving a copy
of the same file, both over a Unix socket, measured by the same client in the same run:
`qemu-img bench` 4 KiB reads at 1 and 32 requests in flight, 4 KiB writes at 1 in flight, and
1 MiB writes at 8 in flight (what a mirror job sends). Prints IOPS / MiB/s and ours/qemu-nbd.

A 64 MiB image in /dev/shm. Run: python benches/bench_nbd_server.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile

import blockemu
from _peers import qemu_img_bench, start_qemu_nbd
from _results import Results

SIZE = 64 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    args = ap.parse_args()
    out = Results("nbd_server", args.json)
    n = 4_000 if args.quick else 40_000
    repeats = 2 if args.quick else 5
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        print("qemu-nbd / qemu-img not installed: skipped")
        out.emit()
        return
    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=d, prefix="bnbds-") as tmp:
        ours_img = os.path.join(tmp, "ours.img")
        theirs_img = os.path.join(tmp, "theirs.img")
        with open(ours_img, "wb") as f:
            f.write(random.Random(1).randbytes(SIZE))
        shutil.copyfile(ours_img, theirs_img)
        qsock = os.path.join(tmp, "q.sock")
        pid = start_qemu_nbd(theirs_img, qsock, os.path.join(tmp, "pid"), cache="writeback")
        node = blockemu.open_image(ours_img, format="raw")
        srv = blockemu.NbdServer(f"unix:{os.path.join(tmp, 'o.sock')}")
        try:
            ours = srv.add_export("exp", node)
            theirs = f"nbd+unix:///exp?socket={qsock}"
            cases = [
                ("4 KiB read, 1 in flight", n, 4096, 1, False),
                ("4 KiB read, 32 in flight", n, 4096, 32, False),
                ("4 KiB write, 1 in flight", n, 4096, 1, True),
                ("1 MiB write, 8 in flight", max(64, n // 40), 1 << 20, 8, True),
            ]
            rows = []
            for name, count, size, depth, write in cases:
                q = qemu_img_bench(theirs, count, size, depth=depth, write=write, repeats=repeats)
                o = qemu_img_bench(ours, count, size, depth=depth, write=write, repeats=repeats)
                rows.append((name, count, size, q, o))
        finally:
            srv.close()
            node.close()
            os.kill(pid, signal.SIGTERM)

    print(f"qemu-img bench against qemu-nbd and NbdServer (raw file), best of {repeats}")
    print(f"{'':26} {'qemu-nbd':>12} {'NbdServer':>12} {'ours/qemu':>10}")
    for name, count, size, q, o in rows:
        unit, scale = ("MiB/s", size / (1 << 20)) if size >= (1 << 20) else ("IOPS", 1.0)
        print(
            f"{name:26} {count * scale / q:12.0f} {count * scale / o:12.0f} {q / o:10.2f}  {unit}"
        )
        out.add(
            f"NbdServer (raw file, Unix socket) driven by qemu-img bench: {name}",
            count * scale / o,
            unit,
            baseline="qemu-nbd --cache=writeback, same bench",
            baseline_value=count * scale / q,
            target=">= 0.8",
        )
    out.emit()


if __name__ == "__main__":
    main()
