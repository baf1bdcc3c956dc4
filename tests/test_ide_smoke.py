"""Smoke test of the IDE bindings: construct, start, IDENTIFY through the registers."""

from __future__ import annotations

import pytest

import blockemu


def _disk(sectors: int = 131072, **kw: object) -> blockemu.IdeDisk:
    node = blockemu.memory_node(sectors * 512)
    return blockemu.IdeDisk(node, **kw)  # type: ignore[arg-type]


def _identify(ch: blockemu.IdeChannel) -> list[int]:
    ch.ioport_write(6, 0xA0)
    ch.ioport_write(7, 0xEC)
    assert ch.wait_irq(10.0)
    assert ch.ioport_read(7) == 0x58
    assert not ch.irq
    data = ch.read_data(512)
    assert len(data) == 512
    assert ch.ioport_read(7) == 0x50
    return [int.from_bytes(data[i : i + 2], "little") for i in range(0, 512, 2)]


def test_identify_through_registers() -> None:
    disk = _disk(serial="QM00001")
    assert disk.geometry is None  # nothing read before the guest starts
    ch = blockemu.IdeChannel(disk)
    ch.start()
    words = _identify(ch)
    assert (words[1], words[3], words[6]) == (130, 16, 63)
    assert words[10:14] == [0x514D, 0x3030, 0x3030, 0x3120]
    assert (words[60], words[61], words[83]) == (0, 2, 0x7400)
    assert disk.geometry == blockemu.Geometry(130, 16, 63)
    ch.stop()


def test_identify_before_start_completes_later() -> None:
    ch = blockemu.IdeChannel(_disk(cyls=100, heads=16, secs=63))
    words = _identify(ch)
    assert words[1] == 100
    # Default serial: the master of a primary channel, as QEMU numbers it.
    assert words[10:14] == [0x514D, 0x3030, 0x3030, 0x3120]


def test_pio_read_and_bad_calls() -> None:
    disk = _disk()
    node = disk.node
    node.write(512 * 7, bytes(range(256)) * 2)
    ch = blockemu.IdeChannel(disk, memory=blockemu.GuestMemory(1 << 16))
    ch.start()
    for reg, val in ((2, 1), (3, 7), (4, 0), (5, 0), (6, 0xE0), (7, 0x20)):
        ch.ioport_write(reg, val)
    assert ch.wait_irq(10.0)
    assert ch.ioport_read(7) == 0x58
    assert ch.read_data(4096) == bytes(range(256)) * 2
    assert ch.ctrl_read() == 0x50
    assert ch.bmdma_read(2) == 0x04  # INTERRUPT follows every IRQ raise, as on PIIX
    with pytest.raises(ValueError):
        ch.ioport_read(8)
    with pytest.raises(ValueError):
        ch.ioport_write(1, 0, size=2)
    with pytest.raises(ValueError):
        ch.ioport_write(1, 256)
    with pytest.raises(blockemu.GeometryError):
        _disk(cyls=1, heads=17, secs=63)
