"""Live-migrate a running machine from this process to another one.

The machine has guest RAM and a virtio-blk disk on a raw image; its "vCPU" is a GuestWorkload,
a scripted guest that keeps writing numbered sectors through VirtioBlkDriver. A destination
process (started with multiprocessing) builds the same machine on the same image with its node
inactive and waits in blockemu.migration.incoming(); this process runs the guest for a moment,
then blockemu.migration.migrate() stops it, sends the device and guest state, hands the image
over and lets the guest continue on the destination. The destination then reads back every
write the guest saw acknowledged, on either side.

Run: python examples/migrate_two_processes.py
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import blockemu
from blockemu.drivers import VirtioBlkDriver
from blockemu.guest import GuestWorkload
from blockemu.migration import incoming, migrate


def build(image: Path, *, active: bool) -> tuple[blockemu.Machine, GuestWorkload]:
    """The same machine on both sides: RAM, one virtio-blk disk, one scripted guest."""
    machine = blockemu.Machine()
    ram = blockemu.GuestMemory(2 << 20)
    node = blockemu.open_image(image, format="raw", active=active)
    disk = blockemu.VirtioBlk(node, ram, queue_size=64)
    machine.add("ram", ram)
    machine.add("vblk0", disk)
    guest = GuestWorkload(virtio=VirtioBlkDriver(disk, ram, queue_size=64))
    machine.add_vcpu("cpu0", guest)
    return machine, guest


def destination(image: Path, uri: str, conn: Connection) -> None:
    machine, guest = build(image, active=False)  # validated and locked shared: zero reads
    report = incoming(machine, uri, timeout=30.0, ready=lambda _: conn.send("listening"))
    time.sleep(0.2)  # the guest keeps writing here
    guest.pause()
    checked = guest.check()  # reads back every acknowledged write through the driver
    machine.stop()
    conn.send({"report": report, "checked": checked["virtio"], "steps": guest.seq})


def main(directory: Path) -> None:
    image = directory / "disk.img"
    blockemu.create_image(image, 16 << 20)
    uri = f"unix:{directory / 'migration.sock'}"

    ctx = mp.get_context("spawn")  # a fresh interpreter, as on another host
    ours, theirs = ctx.Pipe()
    dst = ctx.Process(target=destination, args=(image, uri, theirs))
    dst.start()
    if not ours.poll(30) or ours.recv() != "listening":
        raise RuntimeError("the destination did not start")

    machine, guest = build(image, active=True)
    machine.start()
    assert guest.virtio is not None
    guest.virtio.probe()  # the guest's driver sets the device up, then the guest runs
    guest.resume()
    time.sleep(0.3)  # the guest writes through the disk
    report = migrate(machine, uri, timeout=30.0)
    print(f"source: guest did {guest.seq} steps, machine now {machine.state!r}")
    print(f"downtime {report['downtime_ms']:.1f} ms, {report['bytes_sent']} bytes sent")
    for phase in report["phases"]:
        if phase.get("duration_ms") is not None:
            print(f"  {phase['name']:<16} {phase['duration_ms']:8.1f} ms")

    if not ours.poll(30):
        raise RuntimeError("no answer from the destination")
    result = ours.recv()
    dst.join(10)
    reads = sum(result["report"]["reads_before_activation"].values())
    print(f"destination: {reads} reads before activation, guest at step {result['steps']}")
    n = result["checked"]
    print(f"destination read back the last acknowledged write of each of {n} sectors: OK")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        main(Path(tmp))
