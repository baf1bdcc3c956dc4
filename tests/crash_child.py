"""The child of tests/test_crash_consistency.py: a guest write workload with periodic flushes
through one device (IDE or virtio-blk) on one image, until the parent SIGKILLs it.

    python crash_child.py DEVICE IMAGE CACHE SEED

DEVICE is ``ide`` or ``virtio``; the image's format is probed. Every sector a write puts down
is ``pack("<QQ", write_id, sector) * 32``, so each sector of the image says which write (if
any) it came from. The log goes to stdout, a pipe the parent reads (a record written to a pipe
survives the writer's SIGKILL), one line per event, each written with one ``os.write``:

    R                       ready (device probed); the parent starts its kill timer
    I id sector count       write ``id`` is about to be issued
    A id                    write ``id`` was acknowledged (completed with success)
    S n                     flush ``n`` is about to be issued
    F n                     flush ``n`` completed with success

An ``I`` line is written before the write reaches the device and an ``A`` / ``F`` line only
after the device reported completion, so the log never claims more than happened. The IDE
workload is one command at a time (PIO and DMA writes); the virtio workload keeps up to four
non-overlapping writes in flight and logs each acknowledgement as the device completes it.
"""

from __future__ import annotations

import os
import random
import struct
import sys

import blockemu
from blockemu.drivers import AtaDriver, Request, VirtioBlkDriver
from blockemu.drivers import virtio as v

SECTOR = 512
# Writes fall in the hot region (overwrites) most of the time, else anywhere (for qcow2:
# allocating writes that change L1/L2 tables and refcounts).
HOT_SECTORS = 256
MAX_WRITE = 16  # sectors per write
MAX_BETWEEN_FLUSHES = 8  # writes (IDE) or batches (virtio)
VIRTIO_BATCH = 4


def pattern(write_id: int, sector: int, count: int) -> bytes:
    return b"".join(struct.pack("<QQ", write_id, sector + i) * 32 for i in range(count))


def log(line: str) -> None:
    os.write(1, line.encode() + b"\n")


def pick(rng: random.Random, total: int, busy: list[tuple[int, int]]) -> tuple[int, int]:
    """A write (sector, count) that overlaps none of the ``busy`` ranges."""
    while True:
        count = rng.randint(1, MAX_WRITE)
        span = HOT_SECTORS if rng.random() < 0.7 else total
        sector = rng.randrange(0, min(span, total) - count + 1)
        if all(sector + count <= s or s + n <= sector for s, n in busy):
            return sector, count


def run_ide(image: str, cache: str, rng: random.Random) -> None:
    node = blockemu.open_image(image, cache=cache)
    memory = blockemu.GuestMemory(1 << 20)
    channel = blockemu.IdeChannel(blockemu.IdeDisk(node), memory=memory)
    channel.start()
    drv = AtaDriver(channel, memory=memory)
    total = drv.probe()["sectors"]
    log("R")
    write_id = flush_id = 0
    while True:
        for _ in range(rng.randint(1, MAX_BETWEEN_FLUSHES)):
            write_id += 1
            sector, count = pick(rng, total, [])
            data = pattern(write_id, sector, count)
            log(f"I {write_id} {sector} {count}")
            drv.write(sector, data, dma=rng.random() < 0.5)
            log(f"A {write_id}")
        flush_id += 1
        log(f"S {flush_id}")
        drv.flush()
        log(f"F {flush_id}")


def run_virtio(image: str, cache: str, rng: random.Random) -> None:
    node = blockemu.open_image(image, cache=cache)
    memory = blockemu.GuestMemory(4 << 20)
    dev = blockemu.VirtioBlk(node, memory, queue_size=64)
    dev.start()
    drv = VirtioBlkDriver(dev, memory)
    drv.probe()
    total = drv.capacity
    log("R")
    write_id = flush_id = 0
    while True:
        for _ in range(rng.randint(1, MAX_BETWEEN_FLUSHES)):
            busy: list[tuple[int, int]] = []
            requests: list[Request] = []
            ids: list[int] = []
            for _ in range(rng.randint(1, VIRTIO_BATCH)):
                write_id += 1
                sector, count = pick(rng, total, busy)
                busy.append((sector, count))
                requests.append(Request(v.T_OUT, sector, data=pattern(write_id, sector, count)))
                ids.append(write_id)
                log(f"I {write_id} {sector} {count}")
            subs = drv.submit(requests)
            id_of = {s.head: (s, i) for s, i in zip(subs, ids, strict=True)}
            for _ in subs:
                (elem,) = drv.wait_used(1)
                sub, wid = id_of[elem.id]
                status = drv.status(sub)
                if status != v.S_OK:
                    raise SystemExit(f"write {wid} failed with status {status}")
                log(f"A {wid}")
        flush_id += 1
        log(f"S {flush_id}")
        drv.flush()
        log(f"F {flush_id}")


def main() -> None:
    device, image, cache, seed = sys.argv[1:5]
    rng = random.Random(int(seed))
    if device == "ide":
        run_ide(image, cache, rng)
    elif device == "virtio":
        run_virtio(image, cache, rng)
    else:
        raise SystemExit(f"unknown device {device!r}")


if __name__ == "__main__":
    main()
