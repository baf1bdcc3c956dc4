"""virtio-blk 4 KiB random reads, end to end (scripted driver + VirtioBlk), against fio and a
Python os.pread loop on the same file, in the same run.

(a) page cache: a file in /dev/shm, ``open_image(cache="writeback")``; VirtioBlkDriver's fast
    path (chains laid out once by prepare_reads; submit_prepared rewrites only the sectors and
    the avail ring) submits 128 reads per notify, two such batches in turn so that the driver
    prepares one while the device runs the other; baselines: fio
    ``--ioengine=psync`` (one thread) and an os.pread loop.
(b) O_DIRECT: a file under the repository's directory (on the real disk), page cache dropped
    for it (POSIX_FADV_DONTNEED), ``open_image(cache="none")``, 32 reads kept in flight
    (each completion re-submitted at once, as fio's iodepth does);
    baselines: fio ``--ioengine=libaio --iodepth=32 --direct=1`` and an O_DIRECT os.pread loop
    (queue depth 1, for reference).

Each method runs ``--rounds`` times, alternating with the others, and keeps its best (a shared
machine's load then hits all alike). Prints IOPS and the ratio blockemu ÷ baseline per case;
never asserts timing. ``--quick`` uses a
64 MiB file and about a second per measurement (CI smoke run). Without blockemu.VirtioBlk (or
fio) the corresponding rows say so.

Run: python benches/bench_virtio_read.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blockemu
from _results import Results
from blockemu.drivers import VirtioBlkDriver

BS = 4096


def make_file(path: Path, size: int) -> None:
    rng = random.Random(1)
    with open(path, "wb") as f:
        left = size
        while left:
            k = min(left, 8 << 20)
            f.write(rng.randbytes(k))
            left -= k
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_blockemu(
    path: Path, size: int, batch: int, seconds: float, cache: str, mode: str
) -> float | None:
    """``mode`` "batches": two groups of ``batch`` prepared chains, each submitted with one
    notify; while the device works on one group the driver re-submits the other (at most
    2 x ``batch`` in flight). "depth": exactly ``batch`` reads in flight, each completion
    re-submitted at once with a new sector (fio's iodepth)."""
    if not hasattr(blockemu, "VirtioBlk"):
        return None
    node = blockemu.open_image(str(path), readonly=True, cache=cache)
    mem = blockemu.GuestMemory(64 << 20)
    dev = blockemu.VirtioBlk(node, mem, queue_size=1024)
    dev.start()
    try:
        d = VirtioBlkDriver(dev, mem)
        d.probe()
        groups = 2 if mode == "batches" else 1
        d.prepare_reads(groups * batch, BS)
        rng = random.Random(7)
        blocks = size // BS
        ok = bytes(batch)
        # Correctness check on a first batch.
        sectors = [rng.randrange(blocks) * 8 for _ in range(batch)]
        assert d.resubmit(sectors) == ok
        with open(path, "rb") as f:
            f.seek(sectors[0] * 512)
            assert d.fast_data(0) == f.read(BS)
        pool = [rng.randrange(blocks) * 8 for _ in range(1 << 16)]
        if mode == "batches":
            n = _run_batches(d, pool, batch, seconds)
        else:
            n = _run_depth(d, pool, batch, seconds)
        return n
    finally:
        dev.stop()
        node.close()


def _run_batches(d: VirtioBlkDriver, pool: list[int], batch: int, seconds: float) -> float:
    submit, reap, statuses = d.submit_prepared, d.reap_prepared, d.prepared_statuses
    ok = bytes(batch)
    done = [0, 0]
    pos = 0
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    submit(0, pool[0:batch])
    cur = 1
    while True:
        pos = (pos + batch) % (len(pool) - batch)
        submit(cur * batch, pool[pos : pos + batch])
        # Wait for the other group: every one of its chains reaped.
        other = 1 - cur
        while done[other] < batch:
            for i in reap(1):
                done[i // batch] += 1
        if statuses(other * batch, batch) != ok:
            raise RuntimeError("read failed")
        done[other] = 0
        n += batch
        cur = other
        if n % (batch * 32) == 0 and time.perf_counter() > end:
            break
    while done[1 - cur] < batch:
        for i in reap(1):
            done[i // batch] += 1
    return (n + batch) / (time.perf_counter() - t0)


def _run_depth(d: VirtioBlkDriver, pool: list[int], depth: int, seconds: float) -> float:
    submit_ids, reap = d.submit_prepared_ids, d.reap_prepared
    n = 0
    pos = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    d.submit_prepared(0, pool[0:depth])
    while True:
        ids = reap(1)
        n += len(ids)
        pos = (pos + len(ids)) % (len(pool) - depth)
        submit_ids(ids, pool[pos : pos + len(ids)])
        if time.perf_counter() > end:
            break
    reap(depth)
    return n / (time.perf_counter() - t0)


def bench_pread(path: Path, size: int, seconds: float, direct: bool) -> float:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, BS)
    try:
        rng = random.Random(9)
        blocks = size // BS
        offs = [rng.randrange(blocks) * BS for _ in range(1 << 16)]
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds
        preadv = os.preadv
        while True:
            for o in offs[:4096]:
                preadv(fd, [buf], o)
            n += 4096
            if time.perf_counter() > end:
                break
            offs = offs[4096:] + offs[:4096]
        return n / (time.perf_counter() - t0)
    finally:
        buf.close()
        os.close(fd)


def bench_fio(path: Path, seconds: float, engine: str, iodepth: int, direct: bool) -> float | None:
    fio = shutil.which("fio")
    if fio is None:
        return None
    r = subprocess.run(
        [
            fio,
            "--name=bench",
            f"--filename={path}",
            "--rw=randread",
            f"--bs={BS}",
            f"--ioengine={engine}",
            f"--iodepth={iodepth}",
            f"--direct={1 if direct else 0}",
            "--readonly",
            "--invalidate=0",
            "--time_based",
            f"--runtime={max(1, round(seconds))}",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(r.stdout[r.stdout.index("{") :])
    return float(data["jobs"][0]["read"]["iops"])


def interleaved(rounds: int, *runs: Callable[[], float | None]) -> list[float | None]:
    """Runs each measurement ``rounds`` times, alternating, and keeps each one's best: a busy
    machine's load then hits all of them alike."""
    best: list[float | None] = [None] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            r = run()
            if r is not None:
                prev = best[i]
                best[i] = r if prev is None else max(prev, r)
    return best


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 MiB file, ~1 s per measurement")
    ap.add_argument("--json", action="store_true", help="one JSON line per result on stdout")
    ap.add_argument("--rounds", type=int, default=None, help="alternating runs per method")
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent),
                    help="directory on a real disk for the O_DIRECT case")  # fmt: skip
    args = ap.parse_args()
    out = Results("virtio_read", args.json)
    size = (64 << 20) if args.quick else (1 << 30)
    seconds = 1.0 if args.quick else 3.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    has_dev = hasattr(blockemu, "VirtioBlk")
    print(f"cpus={os.cpu_count()} file={size >> 20} MiB bs=4 KiB random reads")
    if not has_dev:
        print("blockemu.VirtioBlk is not available: blockemu rows are n/a")

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        path = Path(tmp) / "bench.img"
        make_file(path, size)
        ours, fio, pread = interleaved(
            args.rounds,
            lambda: bench_blockemu(path, size, 128, seconds, "writeback", "batches"),
            lambda: bench_fio(path, seconds, "psync", 1, False),
            lambda: bench_pread(path, size, seconds, False),
        )
        print(
            f"(a) page cache, 128 per notify: blockemu {fmt(ours)} IOPS, fio psync {fmt(fio)} "
            f"IOPS (ratio {ratio(ours, fio)}), os.pread {fmt(pread)} IOPS "
            f"(ratio {ratio(ours, pread)})"
        )
        what = f"virtio-blk end to end, 4 KiB random reads, {size >> 20} MiB in /dev/shm, "
        what += "128 per notify"
        out.add(what, ours, "IOPS", baseline="fio psync", baseline_value=fio, target=">= 0.9")
        out.add(what, ours, "IOPS", baseline="os.pread loop", baseline_value=pread)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".bench-virtio-") as tmp:
        path = Path(tmp) / "bench.img"
        make_file(path, size)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError as e:
            print(f"(b) O_DIRECT unsupported in {args.dir}: {e}")
            out.emit()
            return
        drop_cache(path)
        ours, fio, pread = interleaved(
            args.rounds,
            lambda: bench_blockemu(path, size, 32, seconds, "none", "depth"),
            lambda: bench_fio(path, seconds, "libaio", 32, True),
            lambda: bench_pread(path, size, seconds, True),
        )
        print(
            f"(b) O_DIRECT, queue depth 32: blockemu {fmt(ours)} IOPS, fio libaio QD32 "
            f"{fmt(fio)} IOPS (ratio {ratio(ours, fio)}); os.pread O_DIRECT QD1 {fmt(pread)} IOPS"
        )
    out.add(
        f"virtio-blk end to end, O_DIRECT {size >> 20} MiB file on disk (cache=none), "
        "4 KiB random reads, 32 in flight",
        ours,
        "IOPS",
        baseline="fio libaio iodepth=32 direct=1",
        baseline_value=fio,
        target=">= 0.8",
    )
    out.emit()


if __name__ == "__main__":
    main()
