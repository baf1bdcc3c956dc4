"""Fault injection from Python: errors, ranges, torn writes, latency, stalls, Ctrl-C."""

from __future__ import annotations

import _thread
import errno
import threading
import time

import pytest

import blockemu


def test_fail_nth_operation(make_image) -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.open_image(make_image(), faults=faults)
    faults.fail_nth(2, op="write")
    node.write(0, b"first")
    with pytest.raises(OSError) as ei:
        node.write(512, b"second")
    assert ei.value.errno == errno.EIO
    assert "injected EIO on write at offset 512" in str(ei.value)
    node.write(1024, b"third")
    assert faults.injected == 1
    s = node.stats()
    assert s["writes"] == 3 and s["errors"] == 1
    node.close()


def test_fail_range_with_custom_errno() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(1 << 16, faults=faults)
    faults.fail_range(8192, 4096, op="read", errno=errno.ENOSPC)
    node.read(0, 8192)
    with pytest.raises(OSError) as ei:
        node.read(8000, 512)
    assert ei.value.errno == errno.ENOSPC
    node.write(8192, b"writes pass")
    faults.clear()
    assert node.read(8192, 11) == b"writes pass"
    with pytest.raises(ValueError):
        faults.fail_range(0, 1, op="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        faults.fail_nth(1, errno=0)


def test_torn_write_keeps_a_prefix() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.torn_write(1, 3)
    with pytest.raises(OSError):
        node.write(0, b"abcdef")
    assert node.read(0, 6) == b"abc\x00\x00\x00"


def test_latency_delays_operations() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.set_latency(0.05, op="flush")
    t0 = time.monotonic()
    node.read(0, 1)
    fast = time.monotonic() - t0
    t0 = time.monotonic()
    node.flush()
    assert time.monotonic() - t0 >= 0.05 > fast
    with pytest.raises(ValueError):
        faults.set_latency(-1)


def test_stall_blocks_until_release_without_holding_the_gil() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.stall()
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(node.read(0, 4)))
    t.start()
    deadline = time.monotonic() + 5
    while faults.waiting == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)  # this thread runs: the stalled reader released the GIL
    assert faults.stalled and not result
    faults.release()
    t.join(5)
    assert result == [bytes(4)]


def test_ctrl_c_interrupts_a_stalled_read() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.stall()
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            node.read(0, 4)
    finally:
        timer.join()
        faults.release()
    assert node.read(0, 4) == bytes(4)


def test_inactivate_waits_for_stalled_io_then_completes() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.stall()
    job = node.write_async(0, b"in flight")
    while faults.waiting == 0:
        time.sleep(0.01)
    threading.Timer(0.1, faults.release).start()
    node.inactivate()  # drains: the write completes before the node lets go
    assert job.result(timeout=5) is None
    node.activate()
    assert node.read(0, 9) == b"in flight"
