"""Random virtqueue programs for the fuzz-style tests (spec §10 scenario 37, hypothesis).

One program: reset + re-init the device (Q small), fill a play area of guest memory with random
bytes, write a random descriptor table (addresses mostly inside the play area, sometimes beyond
guest memory or overflowing), random indirect tables, random request headers, random avail
entries and a random avail.idx, notify, and wait until every exposed chain is used or the device
says NEEDS_RESET. Invariants checked:

* every register access returns promptly (< 1 s) and raises nothing;
* the device ends healthy (all chains used) or with NEEDS_RESET — never silently stuck;
* guest memory outside device-writable descriptor ranges (main table and any indirect table the
  descriptors point to) and the used ring is byte-for-byte unchanged;
* after NEEDS_RESET, a reset and a normal init work again (a valid read succeeds).
"""

from __future__ import annotations

import random
import struct
import time

from blockemu.drivers import VirtioBlkDriver
from blockemu.drivers import virtio as v

PLAY = 0x100000
PLAY_LEN = 0x10000
WINDOW = 0x200000  # memory below this is compared; descriptors stay below it (or go wild)
TYPES = [0, 1, 4, 8, 11, 13, 0xFF, 5, 0x8000_0000]


def _addr(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.85:
        return PLAY + rng.randrange(PLAY_LEN)
    if r < 0.9:
        return size - rng.randrange(1, 64)
    if r < 0.95:
        return (1 << 64) - rng.randrange(1, 4096)
    return rng.randrange(1 << 64)


def _len(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.7:
        return rng.choice([0, 1, 8, 16, 17, 512, 513, 1024, 4096, rng.randrange(64)])
    if r < 0.95:
        return rng.randrange(8192)
    return rng.randrange(1 << 32)


def _desc(rng: random.Random, q: int, size: int) -> tuple[int, int, int, int]:
    flags = rng.choice([0, 1, 2, 3, 3, 1, 2, 4, rng.randrange(8), rng.randrange(1 << 16)])
    nxt = rng.randrange(q) if rng.random() < 0.9 else rng.randrange(1 << 16)
    length = _len(rng)
    if flags & v.DESC_F_INDIRECT and rng.random() < 0.8:
        length = 16 * rng.randrange(1, 8)
    return _addr(rng, size), length, flags, nxt


def writable_ranges(d: VirtioBlkDriver, descs: list[tuple[int, int, int, int]]) -> list[range]:
    """Ranges the device may write: WRITE descriptors of the table and of indirect tables."""
    size = d.mem.size
    out: list[range] = []
    q = d.queue_size
    out.append(range(d.layout.used, d.layout.used + 6 + 8 * q + 2))
    for addr, length, flags, _ in descs:
        if flags & v.DESC_F_WRITE:
            out.append(range(addr, addr + length))
        if flags & v.DESC_F_INDIRECT and addr + length <= size:
            raw = d.mem.read(addr, length - length % 16)
            for i in range(0, len(raw), 16):
                a, n, f, _nx = struct.unpack_from("<QIHH", raw, i)
                if f & v.DESC_F_WRITE:
                    out.append(range(a, a + n))
    return out


def run_random_program(d: VirtioBlkDriver, blob: bytes) -> str:
    """Runs one random program (see module doc); returns "ok" or "needs-reset"."""
    rng = random.Random(blob)
    size = d.mem.size
    t0 = time.monotonic()
    d.reset()
    d.probe()
    q = d.queue_size
    d.mem.write(PLAY, rng.randbytes(PLAY_LEN))
    # Some well-formed headers in the play area so requests get past framing.
    for _ in range(rng.randrange(4)):
        at = PLAY + rng.randrange(0, PLAY_LEN - 16)
        sector = rng.choice([0, 1, 8, rng.randrange(1 << 64)])
        d.mem.pack("<IIQ", at, rng.choice(TYPES), 0, sector)
    descs = [_desc(rng, q, size) for _ in range(q)]
    for i, (a, n, f, nx) in enumerate(descs):
        d.write_desc(i, a, n, f & 0xFFFF, nx & 0xFFFF)
    k = rng.randrange(1, q + 1)
    heads = [rng.randrange(q) if rng.random() < 0.95 else rng.randrange(1 << 16) for _ in range(k)]
    d.expose(heads, bump=False)
    if d.has(v.F_EVENT_IDX):
        d.set_used_event(rng.randrange(1 << 16))
    if rng.random() < 0.1:
        d.set_avail_flags(1)
    new_idx = k if rng.random() < 0.95 else rng.randrange(1 << 16)
    allowed = writable_ranges(d, descs)
    d.set_avail_idx(new_idx)
    before = d.mem.read(0, WINDOW)
    t1 = time.monotonic()
    d.notify()
    assert time.monotonic() - t1 < 1, "QueueNotify took more than 1 s"
    outcome = "ok"
    deadline = time.monotonic() + 5
    while True:
        used = d.used_idx()
        if used == new_idx:
            break
        if d.device_status & v.S_NEEDS_RESET:
            outcome = "needs-reset"
            break
        if time.monotonic() > deadline:
            raise AssertionError(
                f"device neither completed {new_idx} chains nor asked for a reset "
                f"(used.idx {used}, status {d.device_status:#x}) for blob {blob.hex()}"
            )
        d.device.wait_irq(0.001)
    time.sleep(0.001)
    after = d.mem.read(0, WINDOW)
    if after != before:
        mask = bytearray(WINDOW)
        for r in allowed:
            lo, hi = max(r.start, 0), min(r.stop, WINDOW)
            if lo < hi:
                mask[lo:hi] = b"\1" * (hi - lo)
        for blk in range(0, WINDOW, 4096):
            if before[blk : blk + 4096] == after[blk : blk + 4096]:
                continue
            for i in range(blk, blk + 4096):
                if before[i] == after[i] or mask[i]:
                    continue
                raise AssertionError(
                    f"guest memory at {i:#x} changed outside writable ranges "
                    f"({before[i]:#x} -> {after[i]:#x}) for blob {blob.hex()}"
                )
    if outcome == "needs-reset" or rng.random() < 0.05:
        d.reset()
        d.probe()
        d.read(0, 1)
    assert time.monotonic() - t0 < 30
    return outcome
