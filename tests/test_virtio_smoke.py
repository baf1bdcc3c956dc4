"""Smoke test of the VirtioBlk bindings: probe, negotiate, one read through a virtqueue,
caller errors, lifecycle, resize. The full behaviour is tested in Rust (tests/virtio_*.rs)."""

from __future__ import annotations

import struct

import pytest

import blockemu

DESC, AVAIL, USED, HDR, STATUS, DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x10000
VERSION_1 = 1 << 32


def _device(**kw: object) -> tuple[blockemu.VirtioBlk, blockemu.GuestMemory, blockemu.BlockNode]:
    node = blockemu.memory_node(64 << 20)
    node.write(8 * 512, bytes(range(256)) * 16)
    mem = blockemu.GuestMemory(1 << 20)
    return blockemu.VirtioBlk(node, mem, **kw), mem, node  # type: ignore[arg-type]


def _init(dev: blockemu.VirtioBlk, features: int = VERSION_1) -> None:
    dev.mmio_write(0x70, 0)
    dev.mmio_write(0x70, 1)
    dev.mmio_write(0x70, 3)
    dev.mmio_write(0x24, 0)
    dev.mmio_write(0x20, features & 0xFFFFFFFF)
    dev.mmio_write(0x24, 1)
    dev.mmio_write(0x20, features >> 32)
    dev.mmio_write(0x70, 0xB)
    assert dev.mmio_read(0x70) == 0xB
    dev.mmio_write(0x30, 0)
    dev.mmio_write(0x38, 256)
    for off, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
        dev.mmio_write(off, addr)
        dev.mmio_write(off + 4, 0)
    dev.mmio_write(0x44, 1)
    dev.mmio_write(0x70, 0xF)
    assert dev.mmio_read(0x70) == 0xF


def _read(
    dev: blockemu.VirtioBlk, mem: blockemu.GuestMemory, sector: int, n: int
) -> tuple[int, bytes]:
    mem.write(HDR, struct.pack("<IIQ", 0, 0, sector))
    mem.write(STATUS, b"\xff")
    mem.write(DESC, struct.pack("<QIHH", HDR, 16, 1, 1))
    mem.write(DESC + 16, struct.pack("<QIHH", DATA, n, 3, 2))
    mem.write(DESC + 32, struct.pack("<QIHH", STATUS, 1, 2, 0))
    idx = struct.unpack("<H", mem.read(AVAIL + 2, 2))[0]
    mem.write(AVAIL + 4 + 2 * (idx % 256), struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", (idx + 1) & 0xFFFF))
    dev.mmio_write(0x50, 0)
    assert dev.wait_irq(10.0)
    dev.mmio_write(0x64, dev.mmio_read(0x60))
    assert struct.unpack("<H", mem.read(USED + 2, 2))[0] == (idx + 1) & 0xFFFF
    return mem.read(STATUS, 1)[0], mem.read(DATA, n)


def test_probe_and_config() -> None:
    dev, mem, node = _device(serial="EMU-VIRTIO-0001")
    assert dev.mmio_read(0x000) == 0x74726976
    assert (dev.mmio_read(0x004), dev.mmio_read(0x008), dev.mmio_read(0x00C)) == (2, 2, 0x554D4551)
    assert dev.mmio_read(0x034) == 256
    assert dev.offered_features == 0x0000_0101_3000_6E54
    assert dev.mmio_read(0x100) == 131072
    assert dev.geometry is None
    dev.start()
    for _ in range(1000):
        if dev.geometry is not None:
            break
        dev.wait_irq(0.01)
    assert dev.geometry == blockemu.Geometry(130, 16, 63, "none")
    assert dev.mmio_read(0x110, 2) == 130
    assert dev.mmio_read(0x113, 1) == 63
    assert dev.node is node and dev.memory is mem
    assert "VirtioBlk(" in repr(dev)


def test_one_read_through_the_queue() -> None:
    dev, mem, _ = _device()
    _init(dev)
    status, data = _read(dev, mem, 8, 4096)
    assert status == 0
    assert data == bytes(range(256)) * 16
    stats = dev.stats()
    assert stats["requests_completed"] == 1
    assert stats["needs_reset_reason"] is None


def test_caller_errors_are_value_errors_guest_errors_are_not() -> None:
    dev, mem, _ = _device()
    for args in ((0x70, 2), (0x200, 4), (0x72, 4), (-1, 4)):
        with pytest.raises(ValueError):
            dev.mmio_read(*args)
    with pytest.raises(ValueError):
        dev.mmio_write(0x120, 256, 1)
    _init(dev)
    # A head beyond the queue: the device goes NEEDS_RESET, no exception.
    mem.write(AVAIL + 4, struct.pack("<H", 300))
    mem.write(AVAIL + 2, struct.pack("<H", 1))
    dev.mmio_write(0x50, 0)
    assert dev.mmio_read(0x70) & 0x40
    assert dev.mmio_read(0x60) & 2
    assert dev.needs_reset_reason is not None
    _init(dev)
    assert dev.needs_reset_reason is None


def test_stop_start_and_resize() -> None:
    dev, mem, node = _device()
    _init(dev)
    dev.stop()
    dev.start()
    gen = dev.mmio_read(0xFC)
    dev.resize((64 << 20) + (1 << 20))
    assert node.size == (64 << 20) + (1 << 20)
    assert dev.mmio_read(0x100) == 133120
    assert dev.mmio_read(0xFC) != gen
    assert dev.irq
    dev.mmio_write(0x64, 2)
    assert not dev.irq
    status, _ = _read(dev, mem, 133119, 512)
    assert status == 0
