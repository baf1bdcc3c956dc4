"""Concurrency hammer: Python threads drive the IDE registers, several virtio queues and block
nodes at once while blockemu's workers complete the requests, and other threads read
registers, stop / start / drain the devices and reset them. Checks: no deadlock (every thread
ends in time; a C-level watchdog dumps every stack and exits if even that hangs), no
"Already borrowed" (or any other) exception, no lost or doubled completion (every request
submitted in an epoch without a reset completes exactly once, and its data reads back), and the
interpreter survives (pytest's faulthandler reports a crash).

A reset racing with requests may drop them (that is its meaning): the threads then re-probe
and count those requests as dropped, never as completed, and verify only what ran without a
reset in between.
"""

from __future__ import annotations

import faulthandler
import random
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import blockemu
from blockemu.drivers import (
    AtaDriver,
    AtaError,
    Request,
    RingLayout,
    VirtioBlkDriver,
    VirtioTimeoutError,
)
from blockemu.drivers import virtio as v

SECTOR = 512
RUN_SECONDS = 5.0  # per test
JOIN_GRACE = 20.0  # after RUN_SECONDS: threads still running then are deadlocked
WATCHDOG = RUN_SECONDS + JOIN_GRACE + 30.0  # the last resort (holds even if the GIL is stuck)


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """faulthandler's watchdog thread is C: it dumps every thread's stack and exits the
    process even when a deadlock holds the GIL (where pytest-timeout could not run)."""
    faulthandler.dump_traceback_later(WATCHDOG, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Hammer:
    """Runs worker functions in threads until a deadline; collects their exceptions."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[tuple[str, BaseException]] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def spawn(self, name: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                with self.lock:
                    self.errors.append((name, e))
                self.stop.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(t)

    def run(self, seconds: float = RUN_SECONDS) -> None:
        for t in self.threads:
            t.start()
        self.stop.wait(seconds)
        self.stop.set()
        deadline = time.monotonic() + JOIN_GRACE
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            faulthandler.dump_traceback(file=sys.stderr)
            pytest.fail(f"deadlock: threads {stuck} did not end within {JOIN_GRACE} s")
        if self.errors:
            name, e = self.errors[0]
            others = "; ".join(f"{n}: {x!r}" for n, x in self.errors[1:4])
            raise AssertionError(f"thread {name} failed: {e!r} (also: {others})") from e


def pattern(tag: int, seq: int, sector: int, count: int) -> bytes:
    return b"".join(struct.pack("<IIQ", tag, seq, sector + i) * 32 for i in range(count))


# ------------------------------------------------------------------ IDE


def test_ide_registers_io_and_resets(tmp_path: Path) -> None:
    image = tmp_path / "ide.img"
    blockemu.create_image(image, 8 << 20)
    node = blockemu.open_image(image)
    memory = blockemu.GuestMemory(1 << 20)
    channel = blockemu.IdeChannel(blockemu.IdeDisk(node), memory=memory)
    channel.start()
    h = Hammer()
    resets = [0]  # bumped by the reset thread before and after each SRST
    reset_lock = threading.Lock()
    counts = {"commands": 0, "verified": 0, "interrupted": 0, "register_reads": 0, "control": 0}

    def reset_since(epoch: int) -> bool:
        with reset_lock:  # an SRST in progress has bumped the count before and after it
            return resets[0] != epoch

    def guest() -> None:
        rng = random.Random(1)
        drv = AtaDriver(channel, memory=memory, timeout=10.0)

        def reprobe() -> None:
            for _ in range(50):
                epoch = resets[0]
                try:
                    drv.probe()
                    return
                except (AtaError, TimeoutError):
                    if not reset_since(epoch):
                        raise
            raise AssertionError("no probe got through between the resets")

        reprobe()
        seq = 0
        while not h.stop.is_set():
            epoch = resets[0]
            seq += 1
            lba, count = rng.randrange(0, 16000), rng.randint(1, 16)
            data = pattern(1, seq, lba, count)
            try:
                drv.write(lba, data, dma=rng.random() < 0.5)
                if rng.random() < 0.2:
                    drv.flush()
                got = drv.read(lba, count, dma=rng.random() < 0.5)
                counts["commands"] += 2
            except (AtaError, TimeoutError):
                if not reset_since(epoch):
                    raise  # a command failed without a reset: a real error
                counts["interrupted"] += 1
                reprobe()
                continue
            if reset_since(epoch):
                counts["interrupted"] += 1
                reprobe()
                continue
            assert got == data, f"LBA {lba}+{count}: read back differs"
            counts["verified"] += 1

    def registers() -> None:
        while not h.stop.is_set():
            for off in (1, 2, 3, 4, 5, 6, 7):
                channel.ioport_read(off)
            channel.ctrl_read()
            channel.bmdma_read(2)
            channel.bmdma_read(4, 4)
            _ = channel.irq
            channel.wait_irq(0)
            counts["register_reads"] += 11

    def control() -> None:
        rng = random.Random(2)
        while not h.stop.is_set():
            r = rng.random()
            if r < 0.4:
                channel.drain(timeout=5.0)
            elif r < 0.8:
                channel.stop()
                channel.start()
            else:
                node.stats()
            counts["control"] += 1
            time.sleep(rng.uniform(0, 0.003))

    def resetter() -> None:
        rng = random.Random(3)
        while not h.stop.wait(rng.uniform(0.05, 0.2)):
            with reset_lock:
                resets[0] += 1
                # SRST pulse straight on the control register, racing the guest's commands.
                channel.ctrl_write(0x08 | 0x04)
                channel.ctrl_write(0x08)
                resets[0] += 1

    h.spawn("ide-guest", guest)
    h.spawn("ide-registers", registers)
    h.spawn("ide-control", control)
    h.spawn("ide-reset", resetter)
    h.run()
    channel.drain(timeout=10.0)
    channel.stop()
    node.close()
    print(f"\nIDE: {counts}")
    assert counts["verified"] > 10, counts
    assert counts["register_reads"] > 1000, counts


# ------------------------------------------------------------------ virtio


class Gate:
    """Lets the reset thread stop every submitter at a batch boundary: close() bumps the epoch
    (a submitter whose epoch changed gives up its batch), wait_parked() waits until every
    submitter is parked, open() lets them go on."""

    def __init__(self, n: int, stop: threading.Event) -> None:
        self.cond = threading.Condition()
        self.n = n
        self.epoch = 0
        self.closed = False
        self.parked = 0
        self.stop = stop

    def checkpoint(self) -> None:
        with self.cond:
            if not self.closed:
                return
            self.parked += 1
            self.cond.notify_all()
            while self.closed and not self.stop.is_set():
                self.cond.wait(0.05)
            self.parked -= 1

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.epoch += 1

    def wait_parked(self) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: self.parked == self.n or self.stop.is_set(), timeout=JOIN_GRACE
            )

    def open(self) -> None:
        with self.cond:
            self.closed = False
            self.cond.notify_all()


def test_virtio_queues_config_control_and_resets(tmp_path: Path) -> None:
    nq = 4
    image = tmp_path / "vblk.img"
    blockemu.create_image(image, 16 << 20)
    node = blockemu.open_image(image)
    memory = blockemu.GuestMemory(16 << 20)
    dev = blockemu.VirtioBlk(node, memory, queue_size=64, num_queues=nq)
    dev.start()
    drivers = []
    for q in range(nq):
        base = 0x10_0000 + q * 0x30_0000
        lay = RingLayout.packed(64, base=base, data=base + 0x1_0000)
        lay = RingLayout(lay.desc, lay.avail, lay.used, lay.data, base + 0x30_0000)
        drivers.append(VirtioBlkDriver(dev, memory, queue=q, queue_size=64, layout=lay))
    drivers[0].probe(extra=drivers[1:])
    h = Hammer()
    gate = Gate(nq, h.stop)
    counts = {
        "completed": 0,
        "verified_batches": 0,
        "dropped_by_reset": 0,
        "register_reads": 0,
        "control": 0,
        "resets": 0,
    }
    region = (16 << 20) // SECTOR // nq  # sectors per queue's thread

    def wait_batch(drv: VirtioBlkDriver, subs: list[v.Submitted], epoch: int) -> bool:
        """Collects the batch's completions, each exactly once; False when a reset came."""
        pending = {s.head for s in subs}
        deadline = time.monotonic() + 10.0
        while pending:
            try:
                (elem,) = drv.wait_used(1, timeout=0.02)
            except VirtioTimeoutError:
                if gate.epoch != epoch:
                    return False
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"queue {drv.queue}: {len(pending)} completions lost"
                    ) from None
                continue
            assert elem.id in pending, f"queue {drv.queue}: completion of {elem.id} not pending"
            pending.discard(elem.id)
            with h.lock:
                counts["completed"] += 1
        return gate.epoch == epoch

    def submitter(q: int) -> Callable[[], None]:
        def run() -> None:
            drv = drivers[q]
            rng = random.Random(100 + q)
            first = q * region
            seq = 0
            while not h.stop.is_set():
                gate.checkpoint()
                epoch = gate.epoch
                if gate.closed:
                    continue
                seq += 1
                k = rng.randint(1, 6)
                starts = sorted(rng.sample(range(0, region - 16, 16), k))
                lens = [rng.randint(1, 16) for _ in starts]
                writes = [
                    Request(v.T_OUT, first + s, data=pattern(q, seq, first + s, n))
                    for s, n in zip(starts, lens, strict=True)
                ]
                if rng.random() < 0.3:
                    writes.append(Request(v.T_FLUSH, 0))
                subs = drv.submit(writes)
                if not wait_batch(drv, subs, epoch):
                    counts["dropped_by_reset"] += len(subs)
                    continue
                for sub in subs:
                    assert drv.status(sub) == v.S_OK, f"queue {q}: status {drv.status(sub)}"
                reads = [
                    Request(v.T_IN, first + s, in_len=n * SECTOR)
                    for s, n in zip(starts, lens, strict=True)
                ]
                rsubs = drv.submit(reads)
                if not wait_batch(drv, rsubs, epoch):
                    counts["dropped_by_reset"] += len(rsubs)
                    continue
                for sub, s, n in zip(rsubs, starts, lens, strict=True):
                    assert drv.status(sub) == v.S_OK
                    assert drv.data_in(sub) == pattern(q, seq, first + s, n), (
                        f"queue {q}: sector {first + s}+{n} reads back wrong"
                    )
                with h.lock:
                    counts["verified_batches"] += 1

        return run

    def config_reader() -> None:
        drv = VirtioBlkDriver(dev, memory)  # registers only; never touches a queue
        while not h.stop.is_set():
            for off in (0x000, 0x004, 0x008, 0x00C, 0x010, 0x034, 0x044, 0x060, 0x070, 0x0FC):
                dev.mmio_read(off)
            for off in range(0x100, 0x13C, 4):
                dev.mmio_read(off)
            dev.mmio_read(0x100, 2)
            dev.mmio_read(0x114, 1)
            _ = drv.capacity, dev.irq, dev.geometry, dev.needs_reset_reason
            dev.stats()
            node.stats()
            counts["register_reads"] += 30

    def control() -> None:
        rng = random.Random(7)
        while not h.stop.is_set():
            r = rng.random()
            if r < 0.3:
                dev.drain(timeout=10.0)
            elif r < 0.7:
                dev.stop()  # notifies while stopped are remembered and run by start()
                time.sleep(rng.uniform(0, 0.002))
                dev.start()
            else:
                dev.wait_irq(0.001)
            counts["control"] += 1
            time.sleep(rng.uniform(0, 0.003))

    def resetter() -> None:
        rng = random.Random(8)
        d0 = drivers[0]
        while not h.stop.wait(rng.uniform(0.2, 0.6)):
            gate.close()
            d0.set_status(0)  # races the requests in flight: their completions are dropped
            if not gate.wait_parked():
                raise AssertionError("submitters did not park for the reset")
            if h.stop.is_set():
                gate.open()
                return
            d0.reset()
            d0.probe(extra=drivers[1:])
            counts["resets"] += 1
            gate.open()

    for q in range(nq):
        h.spawn(f"virtio-q{q}", submitter(q))
    h.spawn("virtio-config", config_reader)
    h.spawn("virtio-control", control)
    h.spawn("virtio-reset", resetter)
    h.run()
    gate.open()
    dev.drain(timeout=10.0)
    dev.stop()
    node.close()
    print(f"\nvirtio: {counts}")
    assert counts["verified_batches"] > 20, counts
    assert counts["resets"] > 0, counts


# ------------------------------------------------------------------ nodes


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_node_io_from_many_threads(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / f"n.{fmt}"
    size = 64 << 20
    blockemu.create_image(image, size, format=fmt)
    node = blockemu.open_image(image)
    memory = blockemu.GuestMemory(1 << 20)
    nthreads = 6
    region = size // nthreads
    h = Hammer()
    counts = {"ops": 0, "verified": 0, "inactive_refusals": 0, "toggles": 0}
    active = threading.Lock()  # held by the toggler while the node is inactive

    def worker(i: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(200 + i)
            base = i * region
            seq = 0
            view = memoryview(memory)[i * 0x2_0000 : (i + 1) * 0x2_0000]
            while not h.stop.is_set():
                seq += 1
                off = base + rng.randrange(0, region - 0x1_0000, SECTOR)
                n = rng.randint(1, 64) * SECTOR
                data = pattern(i, seq, off // SECTOR, n // SECTOR)
                try:
                    how = rng.random()
                    if how < 0.4:
                        node.write(off, data)
                        got = node.read(off, n)
                    elif how < 0.7:
                        node.write_async(off, data).result(10)
                        got = node.read_async(off, n).result(10)
                    else:
                        node.write(off, data)
                        assert node.readinto(off, view[:n]) == n
                        got = bytes(view[:n])
                    if rng.random() < 0.1:
                        if rng.random() < 0.5:
                            node.flush()
                        else:
                            node.flush_async().result(10)
                except blockemu.InactiveError:
                    counts["inactive_refusals"] += 1
                    with active:  # wait for the reactivation
                        pass
                    continue
                assert got == data, f"thread {i}: {off:#x}+{n:#x} reads back wrong"
                with h.lock:
                    counts["ops"] += 2
                    counts["verified"] += 1

        return run

    def observer() -> None:
        while not h.stop.is_set():
            node.stats()
            node.enable_trace(64)
            node.trace()
            node.clear_trace()
            _ = node.active, node.size, node.format
            node.locks()

    def toggler() -> None:
        rng = random.Random(9)
        while not h.stop.wait(rng.uniform(0.1, 0.3)):
            with active:
                node.inactivate()  # waits for the I/O in flight, flushes
                time.sleep(0.002)
                node.activate()
            counts["toggles"] += 1

    for i in range(nthreads):
        h.spawn(f"node-{i}", worker(i))
    h.spawn("node-observer", observer)
    h.spawn("node-toggle", toggler)
    h.run()
    node.close()
    print(f"\nnode/{fmt}: {counts}")
    assert counts["verified"] > 50, counts
    assert counts["toggles"] > 0, counts
