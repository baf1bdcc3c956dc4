"""Probe an IDE disk the way Linux's libata does, then read and write it in every mode.

A 64 MiB image gets a partition table, an IdeChannel holds it as the primary master, the
guest starts (the geometry is prefetched in the background) and AtaDriver resets the channel,
checks the signature, IDENTIFYs the disk and sets the transfer mode.

Run: python examples/probe_ide.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import blockemu
from blockemu.drivers import AtaDriver


def main(path: Path) -> None:
    blockemu.create_image(path, 64 << 20)
    # One partition ending at head 15, sector 63: QEMU keeps 16 heads, no translation.
    sector0 = bytearray(512)
    sector0[0x1BE + 5], sector0[0x1BE + 6], sector0[0x1BE + 7] = 15, 63, 0x81
    sector0[0x1BE + 4] = 0x83
    sector0[0x1BE + 8 : 0x1BE + 16] = (63).to_bytes(4, "little") + (130_000).to_bytes(4, "little")
    sector0[510:512] = b"\x55\xaa"
    with open(path, "r+b") as f:
        f.write(sector0)

    node = blockemu.open_image(path)
    disk = blockemu.IdeDisk(node, serial="EXAMPLE01")
    print("geometry before the guest starts:", disk.geometry)  # None: nothing read yet
    memory = blockemu.GuestMemory(1 << 20)  # guest RAM, for the bus master's PRD tables
    channel = blockemu.IdeChannel(disk, memory=memory)
    channel.start()

    driver = AtaDriver(channel)
    info = driver.probe()
    print(f"model {info['model']!r} serial {info['serial']!r}")
    chs = f"{info['cyls']}/{info['heads']}/{info['secs']}"
    print(f"CHS {chs}, {info['sectors']} sectors, LBA48 {info['lba48']}")
    print("geometry now:", disk.geometry)

    payload = bytes(range(256)) * 8  # 4 sectors
    for mode in ("chs", "lba28", "lba48"):
        driver.write(2048, payload, mode=mode)
        assert driver.read(2048, 4, mode=mode) == payload
        print(f"{mode:>5}: wrote and read back 4 sectors at LBA 2048")
    dma = AtaDriver(channel, dma=True)  # the bus master reaches channel.memory
    assert dma.read(2048, 4) == payload
    print("  dma: read back the same sectors through the bus master")
    driver.flush()
    print("node stats:", node.stats())
    channel.stop()
    node.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp) / "probe.img")
