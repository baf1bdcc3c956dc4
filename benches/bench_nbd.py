"""The NBD client backend at one request in flight, against `qemu-img bench` on the same
qemu-nbd export and against the raw file, in the same run (issue 7's target: our node >= 0.8x
qemu-img bench, reads and writes); and 4 KiB random reads with 32 requests in flight (32
threads calling `node.read`, pipelined on the one connection) against
`qemu-img bench -d 32` (read-only), target >= 0.8x.

A 64 MiB image in /dev/shm served by qemu-nbd over a Unix socket. 4 KiB reads and writes,
one request in flight: `qemu-img bench -f raw -d 1 -s 4096 -S 4096 -c N [-w --pattern=0xa5]`
(qemu-img bench walks offsets sequentially), our node at the same sequential offsets and at
random ones, and our node over a copy of the raw file (what the network costs).

Run: python benches/bench_nbd.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

import blockemu
from _peers import qemu_img_bench, start_qemu_nbd
from _results import Results
from _timing import best_of_ns

SIZE = 64 << 20
BS = 4096
QD = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    args = ap.parse_args()
    out = Results("nbd", args.json)
    n = 5_000 if args.quick else 50_000
    repeats = 2 if args.quick else 5
    if shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None:
        print("qemu-nbd / qemu-img not installed: skipped")
        out.emit()
        return

    d = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=d, prefix="bnbd-") as tmp:
        img = os.path.join(tmp, "nbd.img")
        raw = os.path.join(tmp, "raw.img")
        with open(img, "wb") as f:
            f.write(random.Random(1).randbytes(SIZE))
        shutil.copyfile(img, raw)
        sock = os.path.join(tmp, "s.sock")
        pid = start_qemu_nbd(img, sock, os.path.join(tmp, "pid"))
        uri = f"nbd+unix:///exp?socket={sock}"
        try:
            rng = random.Random(42)
            rand = [rng.randrange(SIZE // BS) * BS for _ in range(n)]
            seq = [(i * BS) % SIZE for i in range(n)]
            node = blockemu.open_image(uri, format="raw")
            fnode = blockemu.open_image(raw, format="raw")
            block = bytes([0xA5]) * BS
            assert node.read(rand[0], BS) == fnode.read(rand[0], BS)

            def reads(nd: blockemu.BlockNode, offs: list[int]) -> Callable[[], None]:
                def run() -> None:
                    read = nd.read
                    for o in offs:
                        read(o, BS)

                return run

            def writes(nd: blockemu.BlockNode, offs: list[int]) -> Callable[[], None]:
                def run() -> None:
                    write = nd.write
                    for o in offs:
                        write(o, block)

                return run

            rows = []
            for kind, write in (("read", False), ("write", True)):
                q = qemu_img_bench(uri, n, BS, write=write, repeats=repeats)
                mk = writes if write else reads
                ours_seq = best_of_ns(repeats, mk(node, seq)) / 1e9
                ours_rand = best_of_ns(repeats, mk(node, rand)) / 1e9
                file_rand = best_of_ns(repeats, mk(fnode, rand)) / 1e9
                rows.append((kind, q, ours_seq, ours_rand, file_rand))

            # 32 requests in flight on the one connection: 32 threads each looping node.read
            # over its share of the random offsets (the node is called concurrently, the
            # requests are pipelined), against qemu-img bench -d 32 (read-only).
            def reads_qd(offs: list[int], depth: int) -> Callable[[], None]:
                shares = [offs[k::depth] for k in range(depth)]

                def run() -> None:
                    threads = [threading.Thread(target=reads(node, sh)) for sh in shares]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

                return run

            q32 = qemu_img_bench(uri, n, BS, depth=QD, repeats=repeats)
            ours32 = best_of_ns(repeats, reads_qd(rand, QD)) / 1e9
            node.close()
            fnode.close()
        finally:
            os.kill(pid, signal.SIGTERM)

    print(f"4 KiB, 1 request in flight, {n} ops, best of {repeats} (IOPS)")
    print(
        f"{'':6} {'qemu-img bench':>15} {'node seq':>10} {'node rand':>10} {'raw file':>10}"
        f" {'seq/qemu':>9} {'rand/qemu':>10}"
    )
    for kind, q, s, r, f in rows:
        print(
            f"{kind:6} {n / q:15.0f} {n / s:10.0f} {n / r:10.0f} {n / f:10.0f}"
            f" {q / s:9.2f} {q / r:10.2f}"
        )
    print("target: node / qemu-img bench >= 0.8 (reads and writes)")
    print()
    print(f"4 KiB reads, {QD} requests in flight, {n} ops, best of {repeats} (IOPS)")
    print(f"{'qemu-img bench -d 32':>21} {'node rand x32 threads':>22} {'node/qemu':>10}")
    print(f"{n / q32:21.0f} {n / ours32:22.0f} {q32 / ours32:10.2f}")
    print("target: node / qemu-img bench -d 32 >= 0.8")
    for kind, q, s, r, _f in rows:
        out.add(
            f"NBD node over qemu-nbd (Unix socket), 4 KiB {kind}, 1 in flight, sequential",
            n / s,
            "IOPS",
            baseline="qemu-img bench -d 1, same export",
            baseline_value=n / q,
            target=">= 0.8",
        )
        out.add(
            f"NBD node, 4 KiB {kind}, 1 in flight, random offsets",
            n / r,
            "IOPS",
            baseline="qemu-img bench -d 1 (sequential)",
            baseline_value=n / q,
        )
    out.add(
        f"NBD node, 4 KiB random reads, {QD} in flight ({QD} threads)",
        n / ours32,
        "IOPS",
        baseline=f"qemu-img bench -d {QD}",
        baseline_value=n / q32,
        target=">= 0.8",
    )
    out.emit()


if __name__ == "__main__":
    main()
