"""Device state through the bindings: save on one device set, load on another, tampering.
The full behaviour is tested in Rust (tests/state_*.rs)."""

from __future__ import annotations

import struct

import pytest

import blockemu
from blockemu.drivers import AtaDriver

DESC, AVAIL, USED, HDR, STATUS, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x10000
VERSION_1 = 1 << 32
SIZE = 8 << 20


def _pattern() -> bytes:
    return bytes((i * 7 + 1) & 0xFF for i in range(SIZE))


class _Set:
    """An IDE disk and a virtio-blk disk sharing one guest RAM."""

    def __init__(self, data: bytes, *, started: bool) -> None:
        self.ide_node = blockemu.memory_node(SIZE)
        self.ide_node.write(512, data[512:])
        self.vio_node = blockemu.memory_node(SIZE)
        self.vio_node.write(512, data[512:])
        self.mem = blockemu.GuestMemory(1 << 20)
        self.ide = blockemu.IdeChannel(blockemu.IdeDisk(self.ide_node), memory=self.mem)
        self.vio = blockemu.VirtioBlk(self.vio_node, self.mem)
        if started:
            self.ide.start()
            self.vio.start()

    def devices(
        self,
    ) -> list[tuple[str, blockemu.IdeChannel | blockemu.VirtioBlk | blockemu.GuestMemory]]:
        return [("ide0", self.ide), ("ram", self.mem), ("vblk", self.vio)]

    def stop(self) -> None:
        self.ide.stop()
        self.vio.stop()

    def reads(self) -> int:
        return int(self.ide_node.stats()["reads"]) + int(self.vio_node.stats()["reads"])


def _init(dev: blockemu.VirtioBlk) -> None:
    for v in (0, 1, 3):
        dev.mmio_write(0x70, v)
    dev.mmio_write(0x24, 0)
    dev.mmio_write(0x20, 0)
    dev.mmio_write(0x24, 1)
    dev.mmio_write(0x20, VERSION_1 >> 32)
    dev.mmio_write(0x70, 0xB)
    dev.mmio_write(0x30, 0)
    dev.mmio_write(0x38, 256)
    for off, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
        dev.mmio_write(off, addr)
        dev.mmio_write(off + 4, 0)
    dev.mmio_write(0x44, 1)
    dev.mmio_write(0x70, 0xF)


def _post_read(mem: blockemu.GuestMemory, sector: int, n: int) -> int:
    """Puts a read chain in the avail ring (no notify); returns the new avail.idx."""
    mem.write(HDR, struct.pack("<IIQ", 0, 0, sector))
    mem.write(STATUS, b"\xff")
    mem.write(DESC, struct.pack("<QIHH", HDR, 16, 1, 1))
    mem.write(DESC + 16, struct.pack("<QIHH", DATA, n, 3, 2))
    mem.write(DESC + 32, struct.pack("<QIHH", STATUS, 1, 2, 0))
    idx = int(struct.unpack("<H", mem.read(AVAIL + 2, 2))[0])
    mem.write(AVAIL + 4 + 2 * (idx % 256), struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
    return idx + 1


def _used_idx(mem: blockemu.GuestMemory) -> int:
    return int(struct.unpack("<H", mem.read(USED + 2, 2))[0])


def _source() -> tuple[_Set, bytes, bytes]:
    data = _pattern()
    src = _Set(data, started=True)
    ata = AtaDriver(src.ide)
    ata.probe()
    assert ata.read(3, 1) == data[3 * 512 : 4 * 512]
    _init(src.vio)
    _post_read(src.mem, 4, 512)
    src.vio.mmio_write(0x50, 0)
    assert src.vio.wait_irq(10.0)
    src.stop()
    # One more request, made available while stopped: it runs on the destination.
    _post_read(src.mem, 9, 512)
    src.vio.mmio_write(0x50, 0)
    assert _used_idx(src.mem) == 1
    return src, blockemu.save_state(src.devices()), data


def test_round_trip_across_two_device_sets() -> None:
    src, state, data = _source()
    sections = blockemu.describe_state(state)
    assert [(s["name"], s["kind"], s["version"]) for s in sections] == [
        ("ide0", "ide", 1),
        ("ram", "memory", 1),
        ("vblk", "virtio-blk", 1),
    ]
    assert all(s["instance"] == 0 and s["size"] > 0 for s in sections)
    assert sections[0]["subsections"][0]["name"] == "bmdma"

    dst = _Set(data, started=False)
    blockemu.load_state(dst.devices(), bytearray(state))
    assert dst.reads() == 0, "loading reads nothing"
    assert dst.ide.master is not None and dst.ide.master.geometry == src.ide.master.geometry  # type: ignore[union-attr]
    assert dst.vio.geometry == src.vio.geometry
    dst.ide.start()
    dst.vio.start()
    deadline = 10.0
    assert dst.vio.wait_irq(deadline)
    dst.vio.drain(10.0)
    assert _used_idx(dst.mem) == 2
    assert dst.mem.read(STATUS, 1) == b"\x00"
    assert dst.mem.read(DATA, 512) == data[9 * 512 : 10 * 512]
    assert AtaDriver(dst.ide).read(5, 1) == data[5 * 512 : 6 * 512]
    # The MBR was never read on the destination: only the two data reads.
    assert dst.reads() == 2


def test_tampered_or_foreign_state_is_refused_and_changes_nothing() -> None:
    _, state, data = _source()
    dst = _Set(data, started=False)
    dst.stop()
    before = blockemu.save_state(dst.devices())
    bad = bytearray(state)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(blockemu.StateError, match="CRC mismatch"):
        blockemu.load_state(dst.devices(), bad)
    with pytest.raises(blockemu.StateError, match="truncated"):
        blockemu.load_state(dst.devices(), state[:-7])
    with pytest.raises(ValueError):  # StateError is a ValueError
        blockemu.load_state(dst.devices(), b"BEMUSTAT\x02\x00\x00\x00")
    with pytest.raises(blockemu.StateError, match="no section for device"):
        blockemu.load_state([*dst.devices(), ("extra", blockemu.GuestMemory(4096))], state)
    with pytest.raises(blockemu.StateError, match="no such device"):
        blockemu.load_state(dst.devices()[:2], state)
    assert blockemu.save_state(dst.devices()) == before
    assert dst.reads() == 0


def test_running_devices_and_bad_arguments() -> None:
    data = _pattern()
    s = _Set(data, started=True)
    with pytest.raises(blockemu.StateError, match="device is running; stop it first"):
        blockemu.save_state(s.devices())
    with pytest.raises(TypeError):
        blockemu.save_state([("x", object())])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="given twice"):
        blockemu.save_state([("m", s.mem), ("m", s.mem)])


def test_one_device_conveniences() -> None:
    data = _pattern()
    s = _Set(data, started=True)
    AtaDriver(s.ide).probe()
    s.stop()
    ide_state = s.ide.save_state()
    vio_state = s.vio.save_state()
    d = _Set(data, started=False)
    d.ide.load_state(ide_state)
    d.vio.load_state(memoryview(vio_state))
    assert d.ide.master is not None and d.ide.master.geometry is not None
    with pytest.raises(blockemu.StateError, match="is a ide state"):
        d.vio.load_state(ide_state)


def test_geometry_travels_or_is_refused() -> None:
    """Scenario 24: a configured geometry must match the state's; without one, the state's is
    installed and the destination never reads its MBR."""
    data = _pattern()
    s = _Set(data, started=True)
    AtaDriver(s.ide).probe()
    s.stop()
    state = s.ide.save_state()
    assert s.ide.master is not None
    geometry = s.ide.master.geometry
    assert geometry is not None

    node = blockemu.memory_node(SIZE)
    mem = blockemu.GuestMemory(1 << 20)
    pinned = blockemu.IdeChannel(
        blockemu.IdeDisk(node, cyls=geometry.cyls + 1, heads=geometry.heads, secs=geometry.secs),
        memory=mem,
    )
    with pytest.raises(blockemu.StateError, match="geometry mismatch"):
        pinned.load_state(state)
    same = blockemu.IdeChannel(
        blockemu.IdeDisk(node, cyls=geometry.cyls, heads=geometry.heads, secs=geometry.secs),
        memory=mem,
    )
    same.load_state(state)

    free = blockemu.IdeChannel(blockemu.IdeDisk(node), memory=mem)
    free.load_state(state)
    free.start()
    free.stop()
    assert free.master is not None and free.master.geometry == geometry
    assert node.stats()["reads"] == 0
