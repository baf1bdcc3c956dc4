"""Inject storage faults under a disk and watch the guest see them, then retry successfully.

A FaultInjector sits between a block node and its image. Under an IDE disk, a failed read or
write ends the ATA command with ERR in the status register and ABRT in the error register (and
an interrupt), which AtaDriver raises as AtaError; under a virtio-blk disk, the request
completes with the status byte VIRTIO_BLK_S_IOERR, which VirtioBlkDriver raises as
VirtioRequestError. Clearing the fault makes the same request succeed: the device keeps working.

Run: python examples/fault_injection.py
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import blockemu
from blockemu.drivers import AtaDriver, AtaError, VirtioBlkDriver, VirtioRequestError
from blockemu.drivers import virtio as v

SECTOR = 512
STATUS_BITS = {0x80: "BSY", 0x40: "DRDY", 0x20: "DF", 0x08: "DRQ", 0x01: "ERR"}
ERROR_BITS = {0x80: "ICRC", 0x40: "UNC", 0x10: "IDNF", 0x04: "ABRT", 0x01: "AMNF"}


def bits(value: int, names: dict[int, str]) -> str:
    return "|".join(name for bit, name in names.items() if value & bit) or "0"


def ide(path: Path) -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.open_image(path, faults=faults)
    channel = blockemu.IdeChannel(blockemu.IdeDisk(node))
    channel.start()
    driver = AtaDriver(channel)
    driver.probe()
    payload = b"IDE!" * (4 * SECTOR // 4)
    driver.write(100, payload)  # 4 sectors at LBA 100

    # Every read touching LBA 101 fails with EIO (reads elsewhere still work).
    faults.fail_range(101 * SECTOR, SECTOR, op="read")
    node.enable_trace()
    try:
        driver.read(100, 4)
    except AtaError as e:
        print(f"IDE read failed: status {e.status:#04x} ({bits(e.status, STATUS_BITS)}), "
              f"error {e.error:#04x} ({bits(e.error, ERROR_BITS)})")  # fmt: skip
    # What reached the storage: the 4-sector read failed, then the device went sector by
    # sector to deliver the good sectors before the bad one, and ended the command there.
    for t in node.trace():
        print(f"  storage {t['op']} LBA {t['offset'] // SECTOR} x{t['length'] // SECTOR}: "
              f"{t['outcome']}")  # fmt: skip
    node.disable_trace()
    assert driver.read(96, 4) == bytes(4 * SECTOR)  # the sectors before are fine
    faults.clear()
    assert driver.read(100, 4) == payload
    print("IDE read retried after clear(): OK")

    # The next write fails with ENOSPC; the guest sees the same ATA error bits.
    faults.fail_nth(1, op="write", errno=errno.ENOSPC)
    try:
        driver.write(200, payload)
        raise AssertionError("the write should have failed")
    except AtaError as e:
        print(f"IDE write failed: status {bits(e.status, STATUS_BITS)}, "
              f"error {bits(e.error, ERROR_BITS)}")  # fmt: skip
    driver.write(200, payload)  # fail_nth fired once: the retry goes through
    assert driver.read(200, 4) == payload
    print("IDE write retried: OK")
    print(f"faults injected {faults.injected}, node errors {node.stats()['errors']}")
    channel.stop()
    node.close()


def virtio(path: Path) -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.open_image(path, faults=faults)
    memory = blockemu.GuestMemory(4 << 20)
    device = blockemu.VirtioBlk(node, memory)
    device.start()
    driver = VirtioBlkDriver(device, memory)
    driver.probe()
    payload = b"VIO!" * (8 * SECTOR // 4)
    driver.write(300, payload)

    faults.fail_range(304 * SECTOR, SECTOR, op="read")
    try:
        driver.read(300, 8)
    except VirtioRequestError as e:
        assert e.status == v.S_IOERR
        print(f"virtio read failed: status {v.STATUS_NAMES[e.status]} ({e.status})")
    faults.fail_nth(1, op="flush")
    try:
        driver.flush()
    except VirtioRequestError as e:
        print(f"virtio flush failed: status {v.STATUS_NAMES[e.status]}")
    faults.clear()
    assert driver.read(300, 8) == payload
    driver.flush()
    print("virtio read and flush retried after clear(): OK")
    print(f"faults injected {faults.injected}, node errors {node.stats()['errors']}")
    device.stop()
    node.close()


def main(directory: Path) -> None:
    for name, run in (("ide.img", ide), ("virtio.img", virtio)):
        path = directory / name
        blockemu.create_image(path, 8 << 20)
        run(path)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
