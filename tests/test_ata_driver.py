"""blockemu.drivers.AtaDriver against QEMU's IDE model (qtest) and, when it is built, against
blockemu's IdeChannel: probe values (geometry.md "Scenarios a driver would run" 1-5), reads and
writes in every addressing mode, PIO (single and multiple) and bus-master DMA, checked against
the image file. Plus a hypothesis state machine that throws random port traffic at blockemu.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import blockemu
from blockemu.drivers import AtaDriver, AtaError
from ide_scenarios import SIZES
from ide_targets import BlockemuIde, QemuIde, blockemu_has_ide, make_image

TARGETS = ["qemu", "blockemu"]


def open_target(kind: str, image: Path) -> Any:
    if kind == "blockemu":
        if not blockemu_has_ide():
            pytest.skip("blockemu.IdeChannel not built yet")
        return BlockemuIde(image)
    return QemuIde(image)


@pytest.fixture
def target_on(tmp_path: Path) -> Iterator[Any]:
    opened: list[Any] = []

    def make(kind: str, sectors: int, name: str = "disk.img") -> tuple[Any, Path]:
        image = make_image(tmp_path / name, sectors * 512)
        t = open_target(kind, image)
        opened.append(t)
        return t, image

    yield make
    for t in opened:
        t.close()


def file_sectors(image: Path, lba: int, count: int) -> bytes:
    with open(image, "rb") as f:
        return os.pread(f.fileno(), count * 512, lba * 512)


# ---------------------------------------------------------------------- probe


def expected_probe(n: int) -> dict[str, Any]:
    cyls = max(2, min(16383, n // 1008))
    return {
        "model": "QEMU HARDDISK",
        "serial": "QM00001",
        "cyls": cyls,
        "heads": 16,
        "secs": 63,
        "sectors": n,
        "lba48": True,
        "lba28_sectors": min(n, 0x0FFFFFFF),
        "chs_sectors": cyls * 16 * 63,
    }


@pytest.mark.parametrize("disk", ["A", "B", "D"])
@pytest.mark.parametrize("kind", TARGETS)
def test_probe(kind: str, disk: str, target_on: Any) -> None:
    n = SIZES[disk]
    t, _ = target_on(kind, n)
    info = AtaDriver(t).probe()
    assert {k: info[k] for k in expected_probe(n)} == expected_probe(n)
    ident = AtaDriver(t).identify()
    words = [ident[i] | ident[i + 1] << 8 for i in range(0, 512, 2)]
    assert words[83] == 0x7400 and words[86] == 0x3400 and words[49] == 0x0B00
    # The probe set PIO mode 4 (SET FEATURES 0x03, 0x0C): no DMA mode selected.
    assert (words[62], words[63], words[88]) == (0x0007, 0x0007, 0x003F)


@pytest.mark.parametrize("kind", TARGETS)
def test_probe_absent_slave(kind: str, target_on: Any) -> None:
    t, _ = target_on(kind, SIZES["A"])
    with pytest.raises(AtaError) as e:
        AtaDriver(t, unit=1, timeout=2).probe()
    assert e.value.status == 0
    # The master is still fine afterwards.
    assert AtaDriver(t).probe()["sectors"] == SIZES["A"]


# ---------------------------------------------------------------------- reads and writes

MODES = ["chs", "lba28", "lba48", "auto"]


@pytest.mark.parametrize("path", ["pio", "multiple", "dma"])
@pytest.mark.parametrize("kind", TARGETS)
def test_read_write_every_mode(kind: str, path: str, target_on: Any) -> None:
    n = SIZES["A"]
    t, image = target_on(kind, n)
    drv = AtaDriver(t, dma=path == "dma")
    drv.probe()
    if path == "multiple":
        drv.set_multiple(4)
    rng = random.Random(f"{kind}-{path}")
    for mode in MODES:
        for lba, count in [(0, 1), (62, 3), (1007, 2), (4000, 17), (n - 40, 40)]:
            if mode == "chs" and lba + count > drv.cyls * drv.heads * drv.secs:
                continue
            data = rng.randbytes(count * 512)
            drv.write(lba, data, mode)
            assert drv.read(lba, count, mode) == data, (mode, lba, count)
            drv.flush()
            assert file_sectors(image, lba, count) == data, (mode, lba, count)
    # Large requests are split into commands (LBA28: 256 sectors each; auto picks LBA28).
    data = rng.randbytes(300 * 512)
    drv.write(10000, data)
    assert drv.read(10000, 300, "lba48") == data
    drv.flush()
    assert file_sectors(image, 10000, 300) == data


@pytest.mark.parametrize("dma", [False, True], ids=["pio", "dma"])
@pytest.mark.parametrize("kind", TARGETS)
def test_big_disk_addressing(kind: str, dma: bool, target_on: Any) -> None:
    n = SIZES["D"]
    t, image = target_on(kind, n)
    drv = AtaDriver(t, dma=dma)
    drv.probe()
    rng = random.Random(7)
    for lba, count in [((1 << 28) - 2, 4), (0x12345678, 8), (n - 3, 3), (0x0ABCDEF1, 2)]:
        data = rng.randbytes(count * 512)
        drv.write(lba, data)  # auto: LBA48 across 2^28
        assert drv.read(lba, count, "lba48") == data
        drv.flush()
        assert file_sectors(image, lba, count) == data
    assert drv.read_native_max(ext=True) == n - 1
    assert drv.read_native_max() == 0x0FFFFFFF
    with pytest.raises(ValueError):
        drv.read((1 << 28) - 1, 2, "lba28")
    with pytest.raises(ValueError):
        drv.read(n - 1, 2)


@pytest.mark.parametrize("kind", TARGETS)
def test_chs_after_initialize_device_parameters(kind: str, target_on: Any) -> None:
    n = SIZES["B"]
    t, _ = target_on(kind, n)
    drv = AtaDriver(t)
    drv.probe()
    data = random.Random(3).randbytes(4 * 512)
    drv.write(1120, data, "lba28")
    drv.initialize_device_parameters(8, 32)
    assert drv.read(1120, 4, "chs") == data  # C4/H3/S1 in an 8x32 geometry
    assert drv.info()["cur_heads"] == 16  # IDENTIFY was cached before 0x91


@pytest.mark.parametrize("kind", TARGETS)
def test_device_errors_raise_ata_error(kind: str, target_on: Any) -> None:
    t, _ = target_on(kind, SIZES["A"])
    drv = AtaDriver(t)
    drv.probe()
    with pytest.raises(AtaError) as e:
        drv.set_multiple(3)
    assert (e.value.status, e.value.error) == (0x41, 0x04)
    assert isinstance(e.value, blockemu.BlockemuError)
    with pytest.raises(AtaError) as e:
        drv.set_features(0x77)
    assert e.value.command == 0xEF
    drv.set_multiple(0)
    assert drv.read(0, 1) == bytes(512)


# ---------------------------------------------------------------------- random traffic (blockemu)


class IdeTraffic(RuleBasedStateMachine):
    """Random register/data-port/control/bus-master traffic against blockemu's IdeChannel.

    Invariants: no Python exception from any port access; the image only changes in sectors a
    write command addressed (a model tracks them); SRST always brings status back to 0x50.
    """

    SECTORS = 2048

    def __init__(self) -> None:
        super().__init__()
        self.node = blockemu.memory_node(self.SECTORS * 512)
        self.node.write(0, random.Random(5).randbytes(self.SECTORS * 512))
        self.original = self.node.read(0, self.SECTORS * 512)
        self.memory = blockemu.GuestMemory(1 << 20)
        be: Any = blockemu
        self.ch = be.IdeChannel(be.IdeDisk(self.node), memory=self.memory)
        self.ch.start()
        self.writable: set[int] = set()  # sectors some write command could legally touch
        self.ctrl = 0

    def teardown(self) -> None:
        self.ch.stop()

    def _note_command(self, op: int) -> None:
        """Adds the sectors a write command may touch, from the device's own task file (read
        back, low and HOB copies), under every decoding (LBA28, LBA48; CHS: anything)."""
        if op not in (0x30, 0x31, 0x34, 0x39, 0x3C, 0xC5, 0xCA, 0xCB, 0x35):
            return
        ch = self.ch
        low = [ch.ioport_read(r) for r in range(7)]
        ch.ctrl_write(0x80 | (self.ctrl & 0x7B))
        hob = [ch.ioport_read(r) for r in range(6)]
        ch.ctrl_write(self.ctrl & 0x7B)
        lo = low[3] | low[4] << 8 | low[5] << 16
        lba28 = lo | (low[6] & 0x0F) << 24
        lba48 = lo | hob[3] << 24 | hob[4] << 32 | hob[5] << 40
        for start in (lba28, lba48):
            self.writable.update(range(start, min(start + 65536, self.SECTORS)))
        if not low[6] & 0x40:
            self.writable.update(range(self.SECTORS))

    @initialize()
    def boot(self) -> None:
        assert self.ch.ioport_read(7) in (0x50, 0x00)

    @rule(reg=st.integers(1, 6), value=st.integers(0, 255))
    def write_register(self, reg: int, value: int) -> None:
        self.ch.ioport_write(reg, value)

    @rule(reg=st.integers(0, 7), size=st.sampled_from([1, 2, 4]))
    def read_register(self, reg: int, size: int) -> None:
        self.ch.ioport_read(reg, size if reg == 0 else 1)

    @rule(
        op=st.one_of(
            st.sampled_from(
                [
                    0x20,
                    0x24,
                    0x29,
                    0x30,
                    0x34,
                    0x39,
                    0xC4,
                    0xC5,
                    0xC6,
                    0xC8,
                    0xCA,
                    0x25,
                    0x35,
                    0xE7,
                    0xEA,
                    0xEC,
                    0xEF,
                    0xF8,
                    0x27,
                    0x91,
                    0x90,
                    0x40,
                    0x70,
                    0xB0,
                    0x06,
                ]
            ),
            st.integers(0, 255),
        )
    )
    def command(self, op: int) -> None:
        self._note_command(op)
        self.ch.ioport_write(7, op)

    @rule(n=st.integers(0, 1100))
    def read_data(self, n: int) -> None:
        assert len(self.ch.read_data(n)) <= n

    @rule(data=st.binary(max_size=1100))
    def write_data(self, data: bytes) -> None:
        self.ch.write_data(data)

    @rule(size=st.sampled_from([1, 2, 4]), value=st.integers(0, 0xFFFFFFFF))
    def data_port_write(self, size: int, value: int) -> None:
        self.ch.ioport_write(0, value & ((1 << (8 * size)) - 1), size)

    @rule(value=st.integers(0, 255))
    def control(self, value: int) -> None:
        self.ch.ctrl_write(value)
        self.ctrl = value
        self.ch.ctrl_read()

    @rule(
        off=st.integers(0, 7),
        value=st.integers(0, 0xFFFFFFFF),
        size=st.sampled_from([1, 2, 4]),
        read=st.booleans(),
    )
    def bus_master(self, off: int, value: int, size: int, read: bool) -> None:
        if read:
            self.ch.bmdma_read(off, size)
        else:
            self.ch.bmdma_write(off, value & ((1 << (8 * size)) - 1), size)

    @rule(
        addr=st.integers(0, (1 << 20) - 64), entries=st.lists(st.integers(0, 2**32 - 1), max_size=4)
    )
    def prd_table(self, addr: int, entries: list[int]) -> None:
        addr &= ~7
        table = b"".join(
            (e & 0xFFFF0).to_bytes(4, "little") + ((e >> 4) | (1 << 31)).to_bytes(4, "little")
            for e in entries
        )
        self.memory.write(addr, table)
        self.ch.bmdma_write(4, addr, 4)

    @rule(timeout=st.sampled_from([0.0, 0.001]))
    def wait(self, timeout: float) -> None:
        self.ch.wait_irq(timeout)

    @rule()
    def srst(self) -> None:
        self.ch.bmdma_write(0, 0)
        self.ch.ioport_write(6, 0xA0)
        self.ch.ctrl_write(0x0C)
        self.ch.ctrl_write(0x08)
        self.ctrl = 0x08
        deadline = time.monotonic() + 5
        while self.ch.ctrl_read() & 0x80:
            assert time.monotonic() < deadline, "SRST never completed"
        self.ch.ioport_write(6, 0xA0)
        assert self.ch.ioport_read(7) == 0x50

    @invariant()
    def only_addressed_sectors_change(self) -> None:
        now = self.node.read(0, self.SECTORS * 512)
        if now == self.original:
            return
        for s in range(self.SECTORS):
            a = now[s * 512 : (s + 1) * 512]
            if a != self.original[s * 512 : (s + 1) * 512]:
                assert s in self.writable, f"sector {s} changed without a write addressing it"


@pytest.mark.skipif(not blockemu_has_ide(), reason="blockemu.IdeChannel not built yet")
def test_random_port_traffic() -> None:
    run = settings(
        max_examples=40,
        stateful_step_count=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )(IdeTraffic).TestCase
    run().runTest()


# ---------------------------------------------------------------------- no device needed


class StuckChannel:
    """A channel whose device never leaves BSY (or, with ``status``, shows a fixed status)."""

    def __init__(self, status: int = 0xD0) -> None:
        self.status = status
        self.irq = False

    def ioport_read(self, offset: int, size: int = 1) -> int:
        return self.status if offset == 7 else 0

    def ioport_write(self, offset: int, value: int, size: int = 1) -> None:
        pass

    def ctrl_read(self) -> int:
        return self.status

    def ctrl_write(self, value: int) -> None:
        pass

    def read_data(self, nbytes: int) -> bytes:
        return b""

    def write_data(self, data: bytes) -> int:
        return 0

    def wait_irq(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False


def test_driver_times_out_instead_of_hanging() -> None:
    drv = AtaDriver(StuckChannel(), timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        drv.probe()
    assert time.monotonic() - t0 < 2


def test_driver_reports_an_absent_device() -> None:
    with pytest.raises(AtaError) as e:
        AtaDriver(StuckChannel(status=0x00), timeout=0.2).probe()
    assert e.value.status == 0 and "no device" in str(e.value)


def test_driver_dma_needs_a_bus_master() -> None:
    with pytest.raises(ValueError):
        AtaDriver(StuckChannel(), dma=True)


# ---------------------------------------------------------------------- blockemu only


def test_flush_reaches_the_backend(tmp_path: Path) -> None:
    """ide.md scenario 25: FLUSH CACHE (EXT) is one backend flush."""
    if not blockemu_has_ide():
        pytest.skip("blockemu.IdeChannel not built yet")
    image = make_image(tmp_path / "disk.img", SIZES["A"] * 512)
    with BlockemuIde(image) as t:
        drv = AtaDriver(t)
        drv.probe()
        drv.write(8, bytes(range(256)) * 16)
        before = t.node.stats()["flushes"]
        drv.flush()
        assert t.node.stats()["flushes"] == before + 1


def test_write_to_a_readonly_medium(tmp_path: Path) -> None:
    """ide.md §11 (library-defined): the data phase completes, then ABRT; the medium is unchanged.
    WRITE DMA aborts with the bus master's INTERRUPT bit set."""
    if not blockemu_has_ide():
        pytest.skip("blockemu.IdeChannel not built yet")
    image = make_image(tmp_path / "disk.img", SIZES["A"] * 512)
    with BlockemuIde(image, readonly=True) as t:
        drv = AtaDriver(t)
        drv.probe()
        with pytest.raises(AtaError) as e:
            drv.write(3, b"\xaa" * 512)
        assert (e.value.status, e.value.error) == (0x41, 0x04)
        with pytest.raises(AtaError) as e:
            drv.write(3, b"\xaa" * 512, dma=True)
        assert (e.value.status, e.value.error) == (0x41, 0x04)
        assert e.value.bm_status is not None and e.value.bm_status & 0x04
    assert file_sectors(image, 3, 1) == bytes(512)
