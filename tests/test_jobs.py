"""Asynchronous node operations: blockemu.Job futures (concurrent.futures and asyncio)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

import blockemu


def test_read_write_flush_async_round_trip() -> None:
    node = blockemu.memory_node(1 << 20)
    w = node.write_async(4096, b"async data")
    assert isinstance(w, concurrent.futures.Future) and isinstance(w, blockemu.Job)
    assert w.result(timeout=5) is None
    assert node.read_async(4096, 10).result(timeout=5) == b"async data"
    assert node.flush_async().result(timeout=5) is None
    assert w.done() and not w.cancelled() and w.state == "done"


def test_errors_arrive_through_the_future() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.fail_range(0, 4096, op="read")
    job = node.read_async(0, 512)
    error = job.exception(timeout=5)
    assert isinstance(error, OSError) and "injected EIO" in str(error)
    with pytest.raises(OSError):
        job.result()
    readonly_job = blockemu.memory_node(4096, readonly=True).write_async(0, b"x")
    with pytest.raises(blockemu.ReadOnlyError):
        readonly_job.result(timeout=5)


def test_bad_requests_fail_at_submission() -> None:
    node = blockemu.memory_node(4096)
    with pytest.raises(blockemu.OutOfRangeError):
        node.read_async(4000, 200)
    with pytest.raises(ValueError):
        node.write_async(-1, b"x")
    node.close()
    with pytest.raises(ValueError):
        node.flush_async()


def test_result_timeout_while_storage_stalls() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.stall()
    job = node.read_async(0, 16)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.1)
    with pytest.raises(TimeoutError):
        job.exception(timeout=0.05)
    assert not job.done()
    faults.release()
    assert job.result(timeout=5) == bytes(16)


def test_cancel_only_while_queued() -> None:
    faults = blockemu.FaultInjector()
    node = blockemu.memory_node(4096, faults=faults)
    faults.stall()
    # Fill every worker of the pool with stalled reads, then queue one more.
    running = [node.read_async(0, 1) for _ in range(16)]
    deadline = time.monotonic() + 5
    while faults.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = node.read_async(0, 1)
    assert queued.state == "queued"
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result()
    # A running job cannot be cancelled.
    busy = next(j for j in running if j.state == "running")
    assert busy.cancel() is False
    faults.release()
    for j in running:
        assert j.result(timeout=5) == b"\x00"


def test_done_callbacks_run_once_with_the_future() -> None:
    node = blockemu.memory_node(4096)
    seen: list[concurrent.futures.Future[bytes]] = []
    done = threading.Event()

    def cb(f: concurrent.futures.Future[bytes]) -> None:
        seen.append(f)
        done.set()

    job = node.read_async(0, 4)
    job.add_done_callback(cb)
    assert done.wait(5)
    job.add_done_callback(cb)  # already done: runs at once, in this thread
    assert seen == [job, job]


def test_asyncio_wrap_future() -> None:
    node = blockemu.memory_node(1 << 16)

    async def main() -> bytes:
        await asyncio.wrap_future(node.write_async(0, b"from asyncio"))
        reads = [asyncio.wrap_future(node.read_async(0, 12)) for _ in range(8)]
        results = await asyncio.gather(*reads)
        assert len(set(results)) == 1
        return results[0]

    assert asyncio.run(main()) == b"from asyncio"


def test_many_jobs_from_many_threads() -> None:
    node = blockemu.memory_node(1 << 20)

    def worker(i: int) -> None:
        jobs = [node.write_async(i * 4096 + k, bytes([i])) for k in range(50)]
        for j in jobs:
            j.result(timeout=10)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for i in range(8):
        assert node.read(i * 4096, 50) == bytes([i]) * 50
    assert node.stats()["writes"] == 400
