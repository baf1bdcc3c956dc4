"""Drive a virtio-blk disk from Python: probe it, then send a mix of requests.

A 16 MiB image becomes a VirtioBlk device (virtio-mmio version 2) whose split virtqueue lives in
a GuestMemory; VirtioBlkDriver plays the guest driver: it negotiates features, sets the queue up,
then reads, writes, flushes, asks for the serial (GET_ID) and discards. The second half builds
requests by hand — several in one batch, one notify — and prints each chain's status and used
length.

Run: python examples/virtio_requests.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import blockemu
from blockemu.drivers import Request, VirtioBlkDriver
from blockemu.drivers import virtio as v


def main(path: Path) -> None:
    blockemu.create_image(path, 16 << 20)
    node = blockemu.open_image(path)
    memory = blockemu.GuestMemory(16 << 20)  # guest RAM: rings and buffers live here
    device = blockemu.VirtioBlk(node, memory, serial="EXAMPLE-VIRTIO")
    device.start()

    driver = VirtioBlkDriver(device, memory)
    features = driver.probe()
    print(f"negotiated features {features:#x}, queue size {driver.queue_size}")
    # The geometry is None until the background prefetch has read sector 0 (then the device
    # raises a configuration-change interrupt).
    print(f"capacity {driver.capacity} sectors, geometry {driver.geometry}")
    print("serial (GET_ID):", driver.get_id().decode())

    payload = bytes(range(256)) * 16  # 8 sectors
    driver.write(2048, payload)
    assert driver.read(2048, 8) == payload
    driver.flush()
    print("wrote, read back and flushed 8 sectors at sector 2048")
    if driver.has(v.F_DISCARD):
        driver.discard(4096, 64)
        print("discarded sectors 4096..4159")

    # One batch of hand-built requests: exposed with one avail.idx update and one notify.
    batch = [
        Request(v.T_IN, 2048, in_len=4096),  # read
        Request(v.T_OUT, 10, data=b"\x5a" * 512, split=[10, 6, 512, 1]),  # header in 2 pieces
        Request(v.T_IN, 2048, in_len=512, split=[16, 513]),  # data and status share a descriptor
        Request(v.T_FLUSH),
        Request(v.T_GET_ID, in_len=20),
        Request(v.T_IN, driver.capacity, in_len=512),  # past the end: IOERR
        Request(0xFF),  # unknown type: UNSUPP
    ]
    for sub, used in driver.run(batch):
        name = v.STATUS_NAMES.get(driver.status(sub), "?")
        print(f"type {sub.request.type:#04x}: status {name}, used len {used.len}")

    device.stop()
    print("node stats:", node.stats())
    node.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp) / "virtio.img")
