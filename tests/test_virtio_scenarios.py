"""virtio-blk acceptance scenarios (specs/virtio.md §10) against blockemu's VirtioBlk.

Common setup (§10): virtio-mmio v2, guest memory 16 MiB, a 64 MiB image of seeded pseudo-random
bytes (131072 sectors), serial "EMU-VIRTIO-0001", queue max 256, Q = 256, descriptor table at
0x1000, avail ring at 0x2000, used ring at 0x3000, buffers from 0x100000.

Elsewhere: scenario 36 (snapshot/restore) is tests/state_virtio.rs and tests/test_state.py;
scenario 37 here runs the same random programs test_virtio_hypothesis.py generates (a seeded
2 000-step loop; VIRTIO_FUZZ_STEPS=10000 for the spec's full run); scenario 38 (throughput) is
a figure, not a test: benches/bench_virtio_read.py measures it.

``VIRTIO_SCENARIO_TARGET=qemu`` runs the same tests against QEMU's virtio-blk-device (to check
the harness; scenarios where our policy differs from QEMU then fail, see
test_virtio_qemu_diff.KNOWN_DIVERGENCES).
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockemu.drivers import Request, RingLayout, VirtioBlkDriver, VirtioError
from blockemu.drivers import virtio as v
from virtio_fuzz import run_random_program
from virtio_targets import BlockemuVirtio, QemuVirtio, blockemu_has_virtio, make_image

TARGET = os.environ.get("VIRTIO_SCENARIO_TARGET", "blockemu")
if TARGET == "blockemu" and not blockemu_has_virtio():
    pytest.skip("blockemu.VirtioBlk does not exist yet", allow_module_level=True)

MEM = 16 << 20
SECTORS = 131072
Q = 256
LAYOUT = RingLayout(0x1000, 0x2000, 0x3000, 0x100000)
SERIAL = b"EMU-VIRTIO-0001"

Target = Any


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("virtio") / "base.img", SECTORS * 512, seed=10)


@pytest.fixture(scope="module")
def base_data(base_image: Path) -> bytes:
    return base_image.read_bytes()


@pytest.fixture
def image(base_image: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "disk.img"
    dst.write_bytes(base_image.read_bytes())
    return dst


@pytest.fixture
def open_target(image: Path) -> Iterator[Callable[..., Target]]:
    opened: list[Target] = []

    def make(*, readonly: bool = False, queue_size: int = Q, **kw: Any) -> Target:
        t: Target
        if TARGET == "qemu":
            t = QemuVirtio(image, readonly=readonly)
        else:
            t = BlockemuVirtio(
                image, readonly=readonly, queue_size=queue_size, memory_size=MEM, **kw
            )
        opened.append(t)
        return t

    yield make
    for t in opened:
        t.close()


@pytest.fixture
def dev(open_target: Callable[..., Target]) -> Target:
    return open_target()


def driver(t: Target, **kw: Any) -> VirtioBlkDriver:
    kw.setdefault("queue_size", Q)
    kw.setdefault("layout", LAYOUT)
    return VirtioBlkDriver(t, t.memory, **kw)


@pytest.fixture
def drv(dev: Target) -> VirtioBlkDriver:
    d = driver(dev)
    d.probe()
    return d


def snapshot(d: VirtioBlkDriver) -> bytes:
    return d.mem.read(0, MEM)


def assert_fatal(d: VirtioBlkDriver, used_before: int) -> None:
    """§10 "Fatal": NEEDS_RESET, config interrupt, no new used entries, later notifies ignored,
    and a reset + normal init works again."""
    deadline = time.monotonic() + 2
    while not d.device_status & v.S_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.001)
    assert d.device_status & v.S_NEEDS_RESET
    assert d.interrupt_status() & v.INT_CONFIG
    assert d.used_idx() == used_before
    d.notify()
    time.sleep(0.01)
    assert d.used_idx() == used_before
    recover(d)


def recover(d: VirtioBlkDriver) -> None:
    d.reset()
    assert d.device_status == 0
    assert d.interrupt_status() == 0
    d.probe()
    assert d.read(0, 1)  # normal I/O again


def settle(d: VirtioBlkDriver, seconds: float = 0.05) -> None:
    """Gives an asynchronous device time to (wrongly) act."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        d.device.wait_irq(0.005)


def one(d: VirtioBlkDriver, req: Request) -> tuple[v.Submitted, v.UsedElem]:
    ((sub, used),) = d.run([req])
    return sub, used


# ------------------------------------------------------------------------------ 1-6 transport


def test_01_probe(dev: Target) -> None:
    assert dev.mmio_read(0x000) == 0x74726976
    assert dev.mmio_read(0x004) == 2
    assert dev.mmio_read(0x008) == 2
    dev.mmio_write(0x030, 0)
    assert dev.mmio_read(0x034) == 256
    dev.mmio_write(0x030, 1)
    assert dev.mmio_read(0x034) == 0


def test_02_feature_negotiation(dev: Target) -> None:
    d = driver(dev)
    feats = d.read_features()
    assert feats & v.F_VERSION_1
    for bit in (v.F_INDIRECT_DESC, v.F_EVENT_IDX, v.F_FLUSH, v.F_GEOMETRY, v.F_BLK_SIZE):
        assert feats & bit, hex(bit)
    # Above VERSION_1 only what the device implements: RING_RESET (QueueReset at 0x0c0).
    assert feats >> 33 & ~(1 << 7) == 0, hex(feats)


def test_03_refusal(dev: Target) -> None:
    d = driver(dev)
    d.reset()
    d.set_status(v.S_ACKNOWLEDGE | v.S_DRIVER)
    offered = d.read_features()
    d.write_features(offered | 1 << 34)
    d.set_status(v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK)
    st = d.device_status
    assert not st & v.S_FEATURES_OK
    d.set_status(st | v.S_FEATURES_OK | v.S_DRIVER_OK)
    assert not d.device_status & v.S_DRIVER_OK


def test_04_no_version_1(dev: Target) -> None:
    d = driver(dev)
    with pytest.raises(VirtioError, match="refused"):
        d.negotiate(accept=d.read_features() & ~v.F_VERSION_1 & v.KNOWN_FEATURES)
    assert not d.device_status & v.S_FEATURES_OK


def test_05_config(drv: VirtioBlkDriver) -> None:
    gen = drv.config_generation()
    assert drv.config_read(0x00, 4) == 131072
    assert drv.config_read(0x04, 4) == 0
    assert drv.config_read(0x10, 2) == 130
    assert drv.config_read(0x12, 1) == 16
    assert drv.config_read(0x13, 1) == 63
    assert drv.config_read(0x14, 4) == 512
    assert drv.config_generation() == gen
    assert drv.config_read(0x21, 1) == 0
    assert drv.capacity == SECTORS
    geo = drv.geometry
    assert geo is not None and (geo.cyls, geo.heads, geo.secs) == (130, 16, 63)


def test_05_config_unused1_reads_zero(drv: VirtioBlkDriver) -> None:
    """§10 #5: with WRITE_ZEROES offered, bytes 0x139-0x13B (unused1) read 0 (QEMU ends its
    config space at 57 bytes and reads all ones there: the differential test names it)."""
    assert drv.device_features & v.F_WRITE_ZEROES
    assert [drv.config_read(o, 1) for o in (0x39, 0x3A, 0x3B)] == [0, 0, 0]


def test_06_writeback_toggle(drv: VirtioBlkDriver) -> None:
    if not drv.has(v.F_CONFIG_WCE):
        pytest.skip("CONFIG_WCE not offered")
    drv.config_write(0x20, 0, 1)
    assert drv.config_read(0x20, 1) == 0
    drv.config_write(0x20, 1, 1)
    assert drv.config_read(0x20, 1) == 1
    drv.config_write(0x00, 0x1234, 4)
    assert drv.config_read(0x00, 4) == SECTORS


# ------------------------------------------------------------------------------ 7-18 requests


def test_07_single_read(drv: VirtioBlkDriver, base_data: bytes) -> None:
    drv.ack_interrupts()
    (sub,) = drv.submit([Request(v.T_IN, 8, in_len=4096)])
    (used,) = drv.wait_used(1, ack=False)
    assert drv.data_in(sub) == base_data[4096:8192]
    assert drv.status(sub) == 0
    assert (used.id, used.len) == (sub.head, 4097)
    assert drv.used_idx() == 1
    assert drv.interrupt_status() & 1
    drv.ack_interrupts(1)
    assert not drv.interrupt_status() & 1


def test_08_chained_write(drv: VirtioBlkDriver, dev: Target, image: Path) -> None:
    data = bytes(random.Random(8).randbytes(4096))
    req = Request(v.T_OUT, 100, data=data, split=[10, 6, *([512] * 8), 1])
    sub, used = one(drv, req)
    assert drv.status(sub) == 0 and used.len == 1
    assert drv.read(100, 8) == data
    drv.flush()
    with open(image, "rb") as f:
        f.seek(100 * 512)
        assert f.read(4096) == data


def test_09_any_layout(drv: VirtioBlkDriver, base_data: bytes) -> None:
    sub, used = one(drv, Request(v.T_IN, 8, in_len=4096, split=[16, 4097]))
    assert drv.data_in(sub) == base_data[4096:8192]
    assert drv.status(sub) == 0
    assert used.len == 4097


def test_10_flush(drv: VirtioBlkDriver, dev: Target) -> None:
    if not drv.has(v.F_FLUSH):
        pytest.skip("FLUSH not offered")
    node = getattr(dev, "node", None)
    before = node.stats()["flushes"] if node is not None else 0
    drv.write(0, bytes(512))
    sub, used = one(drv, Request(v.T_FLUSH, 0))
    assert drv.status(sub) == 0 and used.len == 1
    if node is not None:
        assert node.stats()["flushes"] > before


def test_11_get_id(drv: VirtioBlkDriver) -> None:
    sub, used = one(drv, Request(v.T_GET_ID, 0, in_len=20))
    assert drv.data_in(sub) == SERIAL + bytes(20 - len(SERIAL))
    assert drv.status(sub) == 0 and used.len == 21
    sub, used = one(drv, Request(v.T_GET_ID, 0, in_len=8))
    assert drv.status(sub) == v.S_IOERR
    assert drv.data_in(sub) == b"\xaa" * 8
    assert drv.get_id() == SERIAL


@pytest.mark.parametrize("rtype", [0xFF, 0x8000_0000])
def test_12_unknown_type(drv: VirtioBlkDriver, rtype: int) -> None:
    sub, _ = one(drv, Request(rtype, 0, in_len=512))
    assert drv.status(sub) == v.S_UNSUPP
    assert drv.data_in(sub) == b"\xaa" * 512
    assert drv.read(0, 1)


@pytest.mark.parametrize(("sector", "length"), [(131071, 1024), ((1 << 64) - 1, 512)])
def test_13_out_of_range(drv: VirtioBlkDriver, sector: int, length: int) -> None:
    sub, used = one(drv, Request(v.T_IN, sector, in_len=length))
    assert drv.status(sub) == v.S_IOERR
    assert drv.data_in(sub) == b"\xaa" * length
    assert used.len == 1
    assert drv.read(0, 1)


def test_14_unaligned_length(drv: VirtioBlkDriver) -> None:
    sub, _ = one(drv, Request(v.T_IN, 0, in_len=1000))
    assert drv.status(sub) == v.S_IOERR


def test_15_read_only(open_target: Callable[..., Target], base_data: bytes, image: Path) -> None:
    t = open_target(readonly=True)
    d = driver(t)
    feats = d.probe()
    assert feats & v.F_RO
    sub, _ = one(d, Request(v.T_OUT, 0, data=b"\x55" * 512))
    assert d.status(sub) == v.S_IOERR
    assert d.read(0, 2) == base_data[:1024]
    assert image.read_bytes()[:512] == base_data[:512]


def test_16_write_zeroes_discard(drv: VirtioBlkDriver) -> None:
    if not drv.has(v.F_WRITE_ZEROES):
        pytest.skip("WRITE_ZEROES not offered")
    seg = VirtioBlkDriver.segment
    sub, _ = one(drv, Request(v.T_WRITE_ZEROES, data=seg(16, 8, 0)))
    assert drv.status(sub) == 0
    assert drv.read(16, 8) == bytes(4096)
    sub, _ = one(drv, Request(v.T_WRITE_ZEROES, data=seg(24, 8, 2)))
    assert drv.status(sub) == v.S_UNSUPP
    if drv.has(v.F_DISCARD):
        sub, _ = one(drv, Request(v.T_DISCARD, data=seg(16, 8, 1)))
        assert drv.status(sub) == v.S_UNSUPP
    if drv.config_read(0x34, 4) == 1:
        sub, _ = one(drv, Request(v.T_WRITE_ZEROES, data=seg(16, 8) + seg(40, 8)))
        assert drv.status(sub) == v.S_UNSUPP


def test_17_indirect(drv: VirtioBlkDriver, base_data: bytes) -> None:
    sub, used = one(drv, Request(v.T_IN, 8, in_len=4096, mode="indirect"))
    assert drv.data_in(sub) == base_data[4096:8192]
    assert drv.status(sub) == 0 and used.len == 4097


def test_18_direct_then_indirect(drv: VirtioBlkDriver, base_data: bytes) -> None:
    sub, used = one(drv, Request(v.T_IN, 8, in_len=4096, mode="mixed", direct_count=1))
    assert drv.data_in(sub) == base_data[4096:8192]
    assert drv.status(sub) == 0 and used.len == 4097


# ------------------------------------------------------------------------------ 19-24 rings


def test_19_batching(drv: VirtioBlkDriver, base_data: bytes) -> None:
    reqs = [Request(v.T_IN, 3 * i, in_len=4096, mode="indirect") for i in range(200)]
    res = drv.run(reqs)
    assert drv.used_idx() == 200
    for i, (sub, used) in enumerate(res):
        assert drv.status(sub) == 0 and used.len == 4097
        assert drv.data_in(sub) == base_data[3 * i * 512 : 3 * i * 512 + 4096]


def test_20_no_interrupt(dev: Target) -> None:
    d = driver(dev, event_idx=False)
    d.probe()
    d.set_avail_flags(v.AVAIL_F_NO_INTERRUPT)
    d.submit([Request(v.T_IN, i, in_len=512) for i in range(5)])
    d.wait_used(5, ack=False)
    settle(d)
    assert not d.interrupt_status() & 1
    d.set_avail_flags(0)
    d.submit([Request(v.T_IN, 0, in_len=512)])
    d.wait_used(1, ack=False)
    assert d.interrupt_status() & 1


def test_21_event_idx(drv: VirtioBlkDriver) -> None:
    assert drv.has(v.F_EVENT_IDX)
    drv.submit([Request(v.T_IN, i, in_len=512) for i in range(16)], used_event=9)
    drv.wait_used(16, ack=False)
    assert drv.interrupt_status() & 1
    drv.ack_interrupts()
    drv.submit([Request(v.T_IN, i, in_len=512) for i in range(4)], used_event=20)
    drv.wait_used(4, ack=False)
    settle(drv)
    assert drv.used_idx() == 20
    assert not drv.interrupt_status() & 1
    assert drv.avail_event() == drv.avail_idx == 20


def drive_used_to(d: VirtioBlkDriver, target: int) -> None:
    """Completes cheap 512-byte reads until used.idx == target (fast path, batches of 85)."""
    n = d.queue_size // 3
    d.prepare_reads(n, 512)
    done = 0
    while done < target:
        k = min(n, target - done)
        assert d.resubmit([0] * k) == bytes(k)
        done += k
    d.release_reads()


def test_22_event_idx_across_wrap(drv: VirtioBlkDriver) -> None:
    drive_used_to(drv, 65530)
    assert drv.used_idx() == 65530
    drv.ack_interrupts()
    drv.submit([Request(v.T_IN, i, in_len=512) for i in range(10)], used_event=65534)
    drv.wait_used(10, ack=False)
    assert drv.used_idx() == 4
    assert drv.interrupt_status() & 1


def test_23_ring_wraparound(drv: VirtioBlkDriver, base_data: bytes) -> None:
    rng = random.Random(23)
    total = 70000
    done = 0
    while done < total:
        k = min(256, total - done)
        sectors = [rng.randrange(SECTORS) for _ in range(k)]
        reqs = [Request(v.T_IN, s, in_len=512, mode="indirect") for s in sectors]
        res = drv.run(reqs)
        for s, (sub, _used) in zip(sectors, res, strict=True):
            assert drv.status(sub) == 0
            assert drv.data_in(sub) == base_data[s * 512 : s * 512 + 512]
        done += k
    assert drv.used_idx() == 70000 % 65536 == 4464


def test_24_small_queue(dev: Target, base_data: bytes) -> None:
    d = driver(dev, queue_size=4)
    d.probe()
    res = d.run([Request(v.T_IN, 8 * i, in_len=4096, mode="indirect") for i in range(4)])
    for i, (sub, _) in enumerate(res):
        assert d.status(sub) == 0
        assert d.data_in(sub) == base_data[4096 * i : 4096 * i + 4096]


# ------------------------------------------------------------------------------ 25-31 fatal


def simple_chain(d: VirtioBlkDriver, first: int = 0) -> int:
    """A valid 512-byte read at descriptors first..first+2 (buffers at 0x200000)."""
    d.mem.write(0x200000, struct.pack("<IIQ", v.T_IN, 0, 0))
    d.write_desc(first, 0x200000, 16, v.DESC_F_NEXT, first + 1)
    d.write_desc(first + 1, 0x201000, 512, v.DESC_F_NEXT | v.DESC_F_WRITE, first + 2)
    d.write_desc(first + 2, 0x202000, 1, v.DESC_F_WRITE, 0)
    return first


@pytest.mark.parametrize("delta", [Q + 1, -1])
def test_25_bad_avail_idx(drv: VirtioBlkDriver, delta: int) -> None:
    simple_chain(drv)
    drv.set_avail_idx(drv.avail_idx + delta)
    drv.notify()
    assert_fatal(drv, 0)


def test_26_bad_head(drv: VirtioBlkDriver) -> None:
    drv.expose([300])
    drv.notify()
    assert_fatal(drv, 0)


def test_27_bad_next(drv: VirtioBlkDriver) -> None:
    simple_chain(drv)
    drv.write_desc(1, 0x201000, 512, v.DESC_F_NEXT | v.DESC_F_WRITE, 256)
    drv.expose([0])
    drv.notify()
    assert_fatal(drv, 0)


def _loop_0_1(d: VirtioBlkDriver) -> int:
    d.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1)
    d.write_desc(1, 0x201000, 16, v.DESC_F_NEXT, 0)
    return 0


def _self_loop(d: VirtioBlkDriver) -> int:
    d.write_desc(5, 0x200000, 16, v.DESC_F_NEXT, 5)
    return 5


def _indirect_loop(d: VirtioBlkDriver) -> int:
    table = 0x300000
    d.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1, table=table)
    d.write_desc(1, 0x201000, 16, v.DESC_F_NEXT, 0, table=table)
    d.write_desc(0, table, 32, v.DESC_F_INDIRECT)
    return 0


def _long_indirect(d: VirtioBlkDriver) -> int:
    table = 0x300000
    d.mem.write(0x200000, struct.pack("<IIQ", v.T_IN, 0, 0))
    d.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1, table=table)
    for i in range(1, 511):
        d.write_desc(i, 0x201000, 1, v.DESC_F_NEXT | v.DESC_F_WRITE, i + 1, table=table)
    d.write_desc(511, 0x202000, 1, v.DESC_F_WRITE, 0, table=table)
    d.write_desc(0, table, 512 * 16, v.DESC_F_INDIRECT)
    return 0


@pytest.mark.parametrize("build", [_loop_0_1, _self_loop, _indirect_loop, _long_indirect])
def test_28_loops(drv: VirtioBlkDriver, build: Callable[[VirtioBlkDriver], int]) -> None:
    head = build(drv)
    drv.expose([head])
    t0 = time.monotonic()
    drv.notify()
    assert time.monotonic() - t0 < 1
    assert_fatal(drv, 0)


@pytest.mark.parametrize(("addr", "length"), [(MEM - 100, 4096), ((1 << 64) - 16, 64)])
def test_29_out_of_memory_descriptor(dev: Target, addr: int, length: int) -> None:
    d = driver(dev, event_idx=False)
    d.probe()
    simple_chain(d)
    d.write_desc(1, addr, length, v.DESC_F_NEXT | v.DESC_F_WRITE, 2)
    d.expose([0])
    before = snapshot(d)
    d.notify()
    settle(d)
    assert snapshot(d) == before
    assert_fatal(d, 0)


def _nested(d: VirtioBlkDriver) -> None:
    d.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1, table=0x300000)
    d.write_desc(1, 0x310000, 32, v.DESC_F_INDIRECT, 0, table=0x300000)
    d.write_desc(0, 0x300000, 32, v.DESC_F_INDIRECT)


def _len24(d: VirtioBlkDriver) -> None:
    d.write_desc(0, 0x300000, 24, v.DESC_F_INDIRECT)


def _len0(d: VirtioBlkDriver) -> None:
    d.write_desc(0, 0x300000, 0, v.DESC_F_INDIRECT)


@pytest.mark.parametrize("build", [_nested, _len24, _len0])
def test_30_bad_indirect(drv: VirtioBlkDriver, build: Callable[[VirtioBlkDriver], None]) -> None:
    build(drv)
    drv.expose([0])
    drv.notify()
    assert_fatal(drv, 0)


def test_30_indirect_without_feature(dev: Target) -> None:
    d = driver(dev, indirect=False)
    d.probe()
    assert not d.has(v.F_INDIRECT_DESC)
    d.mem.write(0x200000, struct.pack("<IIQ", v.T_IN, 0, 0))
    t = 0x300000
    d.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1, table=t)
    d.write_desc(1, 0x201000, 512, v.DESC_F_NEXT | v.DESC_F_WRITE, 2, table=t)
    d.write_desc(2, 0x202000, 1, v.DESC_F_WRITE, 0, table=t)
    d.write_desc(0, t, 48, v.DESC_F_INDIRECT)
    d.expose([0])
    d.notify()
    assert_fatal(d, 0)


def test_31_order_violation(drv: VirtioBlkDriver) -> None:
    drv.mem.write(0x200000, struct.pack("<IIQ", v.T_OUT, 0, 0))
    drv.write_desc(0, 0x200000, 16, v.DESC_F_NEXT, 1)
    drv.write_desc(1, 0x202000, 1, v.DESC_F_NEXT | v.DESC_F_WRITE, 2)
    drv.write_desc(2, 0x201000, 512, 0, 0)
    drv.expose([0])
    drv.notify()
    assert_fatal(drv, 0)


# ------------------------------------------------------------------------------ 32-35


def test_32_zero_length_descriptor(drv: VirtioBlkDriver, base_data: bytes) -> None:
    req = Request(v.T_IN, 8, in_len=4096, split=[16, 2048, 2048, 1], zero_len_at=[2])
    sub, used = one(drv, req)
    assert drv.status(sub) == 0 and used.len == 4097
    assert drv.data_in(sub) == base_data[4096:8192]


def test_33_short_header_and_no_status(drv: VirtioBlkDriver, base_data: bytes) -> None:
    used_ring = range(LAYOUT.used, LAYOUT.used + 6 + 8 * Q + 2)
    for req in (Request(v.T_IN, header=bytes(8)), Request(v.T_OUT, 0, status_len=0)):
        drv.submit([req], notify=False)
        before = snapshot(drv)
        drv.notify()
        (used,) = drv.wait_used(1)
        assert used.len == 0
        after = snapshot(drv)
        # Only the used ring (with avail_event) changed: no status byte, no data.
        assert after[: used_ring.start] == before[: used_ring.start]
        assert after[used_ring.stop :] == before[used_ring.stop :]
    assert drv.read(8, 8) == base_data[4096:8192]


def test_34_notify_misuse(dev: Target) -> None:
    d = driver(dev)
    d.negotiate()
    d.setup_queue()
    simple_chain(d)
    d.expose([0])
    d.notify()  # before DRIVER_OK
    settle(d)
    assert d.used_idx() == 0
    d.set_status(v.S_ACKNOWLEDGE | v.S_DRIVER | v.S_FEATURES_OK | v.S_DRIVER_OK)
    d.notify(7)  # no such queue
    settle(d)
    assert d.used_idx() == 0
    d.set_reg(v.REG_QUEUE_READY, 0)
    d.notify()  # queue not ready
    settle(d)
    assert d.used_idx() == 0
    assert d.mem.read(0x202000, 1) == b"\0"
    assert not d.device_status & v.S_NEEDS_RESET


def test_35_reset_mid_stream(dev: Target, base_data: bytes) -> None:
    d = driver(dev)
    d.probe()
    d.submit([Request(v.T_IN, 8, in_len=4096)], notify=False)
    old_used = d.mem.read(LAYOUT.used, 6 + 8 * Q)
    d.reset()
    assert d.interrupt_status() == 0
    d.set_reg(v.REG_QUEUE_SEL, 0)
    assert d.reg(v.REG_QUEUE_READY) == 0
    d2 = driver(dev, layout=RingLayout(0x10000, 0x11000, 0x12000, 0x400000))
    d2.probe()
    d2.notify()
    assert d2.read(8, 8) == base_data[4096:8192]
    assert d.mem.read(LAYOUT.used, 6 + 8 * Q) == old_used


# ------------------------------------------------------------------------------ 37-39


def test_37_fuzz_smoke(dev: Target) -> None:
    d = driver(dev, queue_size=16)
    d.probe()
    # 2000 steps in the gate (~10 s); VIRTIO_FUZZ_STEPS=10000 is the spec's full run (~45 s).
    rng = random.Random(int(os.environ.get("VIRTIO_FUZZ_SEED", "37")))
    for _ in range(int(os.environ.get("VIRTIO_FUZZ_STEPS", "2000"))):
        run_random_program(d, rng.randbytes(rng.randrange(64, 512)))


def test_39_capacity_change(drv: VirtioBlkDriver, dev: Target, image: Path) -> None:
    gen = drv.config_generation()
    drv.ack_interrupts()
    if hasattr(dev, "dev"):
        dev.dev.resize((SECTORS + 2048) * 512)  # the host grows the node
    else:
        with open(image, "r+b") as f:
            f.truncate((SECTORS + 2048) * 512)
    deadline = time.monotonic() + 5
    while not drv.interrupt_status() & v.INT_CONFIG and time.monotonic() < deadline:
        drv.device.wait_irq(0.01)
    assert drv.interrupt_status() & v.INT_CONFIG
    assert drv.config_generation() != gen
    assert drv.capacity == 133120
    drv.ack_interrupts(v.INT_CONFIG)
    assert not drv.interrupt_status() & v.INT_CONFIG
    drv.write(133119, b"\x77" * 512)
    assert drv.read(133119, 1) == b"\x77" * 512
