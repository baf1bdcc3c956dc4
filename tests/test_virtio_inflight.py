"""blockemu's VirtioBlk with requests in flight (FaultInjector stalls and errors): what the
device writes to guest memory around a reset, NEEDS_RESET and backend errors (spec §6.2, §10
scenario 35, §3.3 rerror=report).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

import blockemu
from blockemu.drivers import Request, RingLayout, VirtioBlkDriver
from blockemu.drivers import virtio as v
from virtio_targets import blockemu_has_virtio

if not blockemu_has_virtio():
    pytest.skip("blockemu.VirtioBlk does not exist yet", allow_module_level=True)

LAYOUT = RingLayout(0x1000, 0x2000, 0x3000, 0x100000)
Q = 256


@pytest.fixture
def rig() -> Iterator[tuple[Any, Any, VirtioBlkDriver]]:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(8 << 20, faults=faults)
    node.write(0, bytes(range(256)) * (8 << 12))
    mem = blockemu.GuestMemory(16 << 20)
    dev = blockemu.VirtioBlk(node, mem, serial="EMU-VIRTIO-0001")
    dev.start()
    # The geometry prefetch reads sector 0 after start(): let it finish before faults are armed.
    deadline = time.monotonic() + 30
    while dev.geometry is None:
        assert time.monotonic() < deadline, "the geometry prefetch did not finish"
        time.sleep(0.001)
    d = VirtioBlkDriver(dev, mem, layout=LAYOUT, queue_size=Q)
    d.probe()
    yield faults, dev, d
    faults.clear()
    faults.release()
    dev.stop()
    node.close()


def wait_waiting(faults: Any, n: int) -> None:
    deadline = time.monotonic() + 5
    while faults.waiting < n:
        assert time.monotonic() < deadline, "the backend never saw the request"
        time.sleep(0.001)


def test_reset_with_a_read_in_flight(rig: Any) -> None:
    """Status reads back non-zero while a request still runs in the backend; once it reads 0
    the old request never touches guest memory again (no status byte, no used element)."""
    faults, _dev, d = rig
    faults.stall()
    (sub,) = d.submit([Request(v.T_IN, 8, in_len=4096)])
    wait_waiting(faults, 1)
    used_before = d.mem.read(LAYOUT.used, 6 + 8 * Q)
    d.set_status(0)
    assert d.device_status != 0
    with pytest.raises(v.VirtioTimeoutError):
        d.reset(timeout=0.05)
    faults.release()
    d.reset()
    snap = d.mem.read(0, 2 << 20)
    time.sleep(0.05)
    assert d.mem.read(0, 2 << 20) == snap
    assert d.status(sub) == v.STATUS_FILL
    assert d.mem.read(LAYOUT.used, 6 + 8 * Q) == used_before
    assert d.interrupt_status() == 0
    d.probe()
    assert d.read(8, 1) == bytes(range(256)) * 2


def test_needs_reset_drops_completions_in_flight(rig: Any) -> None:
    faults, dev, d = rig
    faults.stall()
    (sub,) = d.submit([Request(v.T_IN, 8, in_len=4096)])
    wait_waiting(faults, 1)
    d.expose([Q + 3])  # bad head: fatal
    d.notify()
    deadline = time.monotonic() + 2
    while not d.device_status & v.S_NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    faults.release()
    dev.drain(5)
    assert d.used_idx() == 0
    assert d.status(sub) == v.STATUS_FILL
    d.reset()
    d.probe()
    assert d.read(8, 1) == bytes(range(256)) * 2


def test_backend_error_is_ioerr_with_used_len_1(rig: Any) -> None:
    faults, _dev, d = rig
    faults.fail_nth(1, op="read")
    ((sub, used),) = d.run([Request(v.T_IN, 8, in_len=4096)])
    assert d.status(sub) == v.S_IOERR
    assert used.len == 1
    faults.fail_nth(1, op="write")
    ((sub, used),) = d.run([Request(v.T_OUT, 8, data=b"\x11" * 512)])
    assert d.status(sub) == v.S_IOERR
    assert not d.device_status & v.S_NEEDS_RESET
    assert d.read(8, 1) == bytes(range(256)) * 2


def test_stop_drains_and_start_resumes(rig: Any) -> None:
    faults, dev, d = rig
    faults.set_latency(0.02, op="read")
    subs = d.submit([Request(v.T_IN, 8 * i, in_len=4096) for i in range(16)])
    dev.stop()
    assert d.used_idx() == 16
    assert all(d.status(s) == 0 for s in subs)
    d.wait_used(16)
    faults.clear()
    dev.start()
    assert d.read(0, 1) == bytes(range(256)) * 2


def test_queue_full_of_stalled_requests(rig: Any) -> None:
    faults, _dev, d = rig
    faults.stall()
    subs = d.submit([Request(v.T_IN, i, in_len=512, mode="indirect") for i in range(Q)])
    time.sleep(0.05)
    assert d.used_idx() == 0
    faults.release()
    d.wait_used(Q)
    assert all(d.status(s) == 0 for s in subs)
    assert not d.device_status & v.S_NEEDS_RESET


def test_reset_releases_interrupt_line(rig: Any) -> None:
    _faults, dev, d = rig
    d.submit([Request(v.T_IN, 0, in_len=512)])
    d.wait_used(1, ack=False)
    assert dev.irq
    d.reset()
    assert not dev.irq
    assert not dev.wait_irq(0.01)
