"""VirtioBlkDriver on its own: typed errors from the probe, request layout checks, ring layout
arithmetic, and the memory path without the buffer protocol (what the QEMU adapter uses)."""

from __future__ import annotations

import struct

import pytest

import blockemu
from blockemu.drivers import (
    Request,
    RingLayout,
    VirtioBlkDriver,
    VirtioError,
    VirtioMmio,
    VirtioNeedsReset,
    VirtioRequestError,
    VirtioTimeoutError,
)
from blockemu.drivers import virtio as v
from virtio_targets import blockemu_has_virtio


class FakeMmio:
    """Registers of a device that is not (quite) a virtio block device."""

    def __init__(self, magic: int = v.MAGIC, version: int = 2, device_id: int = 2) -> None:
        self.regs = {0x000: magic, 0x004: version, 0x008: device_id}

    def mmio_read(self, offset: int, size: int = 4) -> int:
        return self.regs.get(offset, 0)

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        pass

    @property
    def irq(self) -> bool:
        return False

    def wait_irq(self, timeout: float) -> bool:
        return False


class BytesMemory:
    """Guest memory without the buffer protocol."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.buf)

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.buf[addr : addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self.buf[addr : addr + len(data)] = data


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"magic": 0x12345678}, "magic"),
        ({"version": 1}, "version 1"),
        ({"device_id": 1}, "not a block device"),
    ],
)
def test_probe_refuses_other_devices(kw: dict[str, int], match: str) -> None:
    dev = FakeMmio(**kw)
    assert isinstance(dev, VirtioMmio)
    with pytest.raises(VirtioError, match=match):
        VirtioBlkDriver(dev, BytesMemory(1 << 20)).probe()


def test_error_tree() -> None:
    assert issubclass(VirtioError, blockemu.BlockemuError)
    assert issubclass(VirtioTimeoutError, TimeoutError)
    e = VirtioRequestError("read", status=1, request_type=0)
    assert e.status == 1 and "IOERR" in str(e)
    assert VirtioNeedsReset("x", device_status=0x4F).device_status == 0x4F


def test_spec_layout_for_q256() -> None:
    lay = RingLayout.packed(256)
    assert (lay.desc, lay.avail, lay.used) == (0x1000, 0x2000, 0x3000)
    big = RingLayout.packed(1024)
    assert big.avail >= big.desc + 16 * 1024 and big.used >= big.avail + 6 + 2 * 1024
    assert big.data >= big.used + 6 + 8 * 1024


def test_request_layouts_in_memory() -> None:
    mem = BytesMemory(2 << 20)
    d = VirtioBlkDriver(FakeMmio(), mem)
    d.queue_size = 16
    d.layout = RingLayout.packed(16)
    d._free = list(range(15, -1, -1))
    d.reset_alloc()
    sub = d.build(Request(v.T_IN, 7, in_len=1024, split=[10, 6, 1025]))
    descs = [struct.unpack_from("<QIHH", mem.buf, d.layout.desc + 16 * i) for i in sub.descs]
    assert [n for _, n, _, _ in descs] == [10, 6, 1025]
    assert [f for _, _, f, _ in descs] == [v.DESC_F_NEXT, v.DESC_F_NEXT, v.DESC_F_WRITE]
    assert mem.read(sub.addr, 16) == struct.pack("<IIQ", v.T_IN, 0, 7)
    assert mem.read(sub.status_addr, 1) == b"\xff"
    assert mem.read(sub.in_addr, 4) == b"\xaa" * 4
    sub = d.build(Request(v.T_OUT, 1, data=bytes(512), mode="indirect"))
    addr, n, flags, _ = struct.unpack_from("<QIHH", mem.buf, d.layout.desc + 16 * sub.head)
    assert flags == v.DESC_F_INDIRECT and n == 48 and addr == sub.table
    with pytest.raises(ValueError, match="straddle"):
        d.build(Request(v.T_IN, 0, in_len=512, split=[20, 509]))
    with pytest.raises(ValueError, match="does not cover"):
        d.build(Request(v.T_IN, 0, in_len=512, split=[16, 512]))


@pytest.mark.skipif(not blockemu_has_virtio(), reason="needs blockemu.VirtioBlk")
def test_memory_without_buffer_protocol_drives_the_device() -> None:
    """The read/write memory path (QEMU adapter style) against blockemu's device."""
    node = blockemu.memory_node(1 << 20)
    node.write(4096, b"\x5a" * 4096)
    mem = blockemu.GuestMemory(4 << 20)

    class Plain:
        size = mem.size
        read = staticmethod(mem.read)
        write = staticmethod(mem.write)

    dev = blockemu.VirtioBlk(node, mem, serial="PLAIN")
    dev.start()
    try:
        d = VirtioBlkDriver(dev, Plain(), queue_size=64)
        assert d.mem.view is None
        d.probe()
        assert d.read(8, 8) == b"\x5a" * 4096
        assert d.get_id() == b"PLAIN"
        d.prepare_reads(4, 512)
        assert d.resubmit([8, 9, 10, 11]) == bytes(4)
        assert d.fast_data(3) == b"\x5a" * 512
        d.release_reads()
        with pytest.raises(VirtioRequestError) as ei:
            d.read(1 << 20, 1)
        assert ei.value.status == v.S_IOERR
    finally:
        dev.stop()
        node.close()
