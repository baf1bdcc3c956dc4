"""Dirty bitmaps and mirror jobs through the Python API: raw and qcow2 sources copied while a
writer thread keeps writing, a mirror to a qemu-nbd export checked with `qemu-img compare`,
errors, cancel, throttle, and the bitmap API's edge cases."""

from __future__ import annotations

import _thread
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

import blockemu
from nbd_peers import QemuNbd, short_dir

from peers import require_tool

MIB = 1 << 20
LONG = 60.0


def same(a: blockemu.BlockNode, b: blockemu.BlockNode) -> bool:
    size = a.size
    assert size is not None and size == b.size
    off = 0
    while off < size:
        n = min(MIB, size - off)
        if a.read(off, n) != b.read(off, n):
            return False
        off += n
    return True


def fill(node: blockemu.BlockNode, seed: int, step: int = 3) -> None:
    """Writes random data into every `step`-th MiB (the rest stays sparse)."""
    size = node.size
    assert size is not None
    rng = random.Random(seed)
    for off in range(0, size, step * MIB):
        n = min(MIB, size - off)
        node.write(off, rng.randbytes(n))


class Writer(threading.Thread):
    """Random writes (and some zeroes and discards) on a node until stopped."""

    def __init__(self, node: blockemu.BlockNode, seed: int) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        size = self.node.size
        assert size is not None
        try:
            while not self.halt.is_set():
                n = self.rng.randrange(1, 200_000)
                off = self.rng.randrange(0, size - n)
                r = self.rng.random()
                if r < 0.1:
                    self.node.write_zeroes(off, n)
                elif r < 0.15:
                    self.node.discard(off, n)
                else:
                    self.node.write(off, self.rng.randbytes(n))
                self.count += 1
                if self.count % 16 == 0:
                    time.sleep(0.001)
        except BaseException as e:  # pragma: no cover - reported by stop()
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        assert self.count > 10


def mirror_live(
    src: blockemu.BlockNode, dst: blockemu.BlockNode, **kw: object
) -> dict[str, object]:
    w = Writer(src, 11)
    w.start()
    job = blockemu.MirrorJob(src, dst, **kw)  # type: ignore[arg-type]
    assert job.bitmap in src.dirty_bitmaps()
    try:
        assert job.wait_ready(LONG)
        time.sleep(0.2)  # ready, and the guest keeps writing
    finally:
        w.stop()
    p = job.complete(LONG)
    assert p["state"] == "completed"
    assert p["bytes_done"] == p["bytes_total"]
    assert p["dirty_bytes"] == 0
    assert p["error"] is None
    assert src.dirty_bitmaps() == []
    assert same(src, dst)
    return dict(p)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_live_mirror_of_an_image(tmp_path: Path, fmt: str) -> None:
    size = 24 * MIB
    blockemu.create_image(tmp_path / "src", size, format=fmt)
    blockemu.create_image(tmp_path / "dst.img", size)
    with (
        blockemu.open_image(tmp_path / "src", format=fmt) as src,
        blockemu.open_image(tmp_path / "dst.img") as dst,
    ):
        fill(src, 5)
        p = mirror_live(src, dst, chunk_size=256 << 10, max_in_flight=4, converge_bytes=2 * MIB)
        assert p["passes"] >= 1
        assert p["bytes_copied"] > 0
        assert isinstance(p["elapsed"], float)
    if fmt == "qcow2":
        qemu_img = require_tool("qemu-img")
        subprocess.run([qemu_img, "check", str(tmp_path / "src")], check=True)
        r = subprocess.run(
            [
                qemu_img,
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                str(tmp_path / "src"),
                str(tmp_path / "dst.img"),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr


def test_sparse_qcow2_source_sends_little_data(tmp_path: Path) -> None:
    size = 64 * MIB
    blockemu.create_image(tmp_path / "s.qcow2", size, format="qcow2")
    blockemu.create_image(tmp_path / "d.img", size)
    with (
        blockemu.open_image(tmp_path / "s.qcow2") as src,
        blockemu.open_image(tmp_path / "d.img") as dst,
    ):
        src.write(10 * MIB, b"\x01" * 70_000)
        job = blockemu.MirrorJob(src, dst, target_zeroed=True)
        p = job.complete(LONG)
        assert p["bytes_copied"] <= 2 * MIB
        assert p["bytes_zero"] >= size - 2 * MIB
        assert same(src, dst)


def test_mirror_to_a_qemu_nbd_export(tmp_path: Path) -> None:
    qemu_nbd = require_tool("qemu-nbd")
    qemu_img = require_tool("qemu-img")
    size = 16 * MIB
    d = short_dir()
    target_file = d / "target.img"
    blockemu.create_image(target_file, size)
    # Stale data on the target: zero regions of the source must be written as zeroes.
    target_file.write_bytes(b"\xee" * size)
    server = QemuNbd(qemu_nbd, target_file)
    try:
        blockemu.create_image(tmp_path / "src.img", size)
        with blockemu.open_image(tmp_path / "src.img") as src:
            fill(src, 9, step=2)
            with blockemu.open_image(server.uri) as dst:
                mirror_live(src, dst, max_in_flight=8)
                assert dst.stats()["write_zeroes"] > 0
        r = subprocess.run(
            [
                qemu_img,
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                str(tmp_path / "src.img"),
                str(target_file),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        server.kill()
        target_file.unlink(missing_ok=True)


def test_target_error_fails_the_job() -> None:
    faults = blockemu.FaultInjector()
    src = blockemu.memory_node(8 * MIB)
    src.write(0, b"\x05" * (8 * MIB))
    dst = blockemu.memory_node(8 * MIB, faults=faults)
    faults.fail_range(5 * MIB, 512, op="write", errno=28)
    job = blockemu.MirrorJob(src, dst)
    with pytest.raises(OSError) as e:
        job.wait_ready(LONG)
    assert e.value.errno == 28
    assert job.wait(LONG)
    p = job.progress()
    assert p["state"] == "failed"
    assert p["error"] is not None and "mirror copy" in p["error"]
    with pytest.raises(OSError):
        job.complete(LONG)
    assert src.dirty_bitmaps() == []


def test_cancel_and_throttle() -> None:
    src, dst = blockemu.memory_node(32 * MIB), blockemu.memory_node(32 * MIB)
    job = blockemu.MirrorJob(src, dst, speed=256 << 10, chunk_size=64 << 10, sparse=False)
    time.sleep(0.3)
    p = job.progress()
    assert p["state"] == "bulk"
    assert p["bytes_done"] < p["bytes_total"]
    assert not job.wait_ready(0.05)
    assert not job.wait(0)
    job.cancel()
    assert job.wait(10)
    assert job.progress()["state"] == "cancelled"
    assert src.dirty_bitmaps() == []
    from concurrent.futures import CancelledError

    with pytest.raises(CancelledError):
        job.wait_ready(1)
    with pytest.raises(CancelledError):
        job.complete(1)
    job.cancel()  # idempotent


def test_ctrl_c_interrupts_a_wait_and_other_threads_run() -> None:
    src, dst = blockemu.memory_node(32 * MIB), blockemu.memory_node(32 * MIB)
    job = blockemu.MirrorJob(src, dst, speed=64 << 10, chunk_size=64 << 10, sparse=False)
    ticks: list[int] = []

    def tick() -> None:
        for i in range(10):
            time.sleep(0.01)
            ticks.append(i)

    ticker = threading.Thread(target=tick)
    ticker.start()
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            job.wait_ready()
    finally:
        timer.join()
        ticker.join()
    assert len(ticks) == 10  # the GIL was released while waiting
    job.cancel()
    assert job.wait(10)


def test_set_speed_lifts_the_limit() -> None:
    src, dst = blockemu.memory_node(8 * MIB), blockemu.memory_node(8 * MIB)
    src.write(0, b"\x07" * (8 * MIB))
    job = blockemu.MirrorJob(src, dst, speed=64 << 10, chunk_size=64 << 10)
    time.sleep(0.1)
    job.set_speed(0)
    assert job.wait_ready(LONG)
    job.complete(LONG)
    assert same(src, dst)


def test_bad_mirror_arguments() -> None:
    a, b = blockemu.memory_node(MIB), blockemu.memory_node(MIB)
    for kw in (
        {"chunk_size": 4096},
        {"chunk_size": (32 << 20) + 512},
        {"max_in_flight": 0},
        {"max_in_flight": 65},
        {"granularity": 1000},
        {"max_downtime": -1.0},
        {"max_downtime": float("nan")},
        {"speed": -1},
    ):
        with pytest.raises(ValueError):
            blockemu.MirrorJob(a, b, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same size"):
        blockemu.MirrorJob(a, blockemu.memory_node(2 * MIB))
    with pytest.raises(ValueError):
        blockemu.MirrorJob(a, a)
    with pytest.raises(blockemu.ReadOnlyError):
        blockemu.MirrorJob(a, blockemu.memory_node(MIB, readonly=True))
    a.close()
    with pytest.raises(ValueError):
        blockemu.MirrorJob(a, b)
    job = blockemu.MirrorJob(b, blockemu.memory_node(MIB))
    with pytest.raises(ValueError):
        job.wait(-1)
    job.complete(LONG)


def test_dirty_bitmap_api() -> None:
    node = blockemu.memory_node(MIB + 100)
    bm = node.add_dirty_bitmap("b", granularity=4096)
    assert (bm.name, bm.granularity, bm.size, bm.enabled) == ("b", 4096, MIB + 100, True)
    assert node.dirty_bitmaps() == ["b"]
    node.write(10, b"abc")
    node.write_zeroes(8192, 1)
    node.discard(MIB, 100)
    assert bm.ranges() == [(0, 4096), (8192, 4096), (MIB, 100)]
    assert bm.ranges(100, 8192) == [(100, 3996), (8192, 100)]
    assert bm.count() == 8192 + 100
    assert bm.is_dirty(4095) and not bm.is_dirty(4096)
    bm.disable()
    node.write(65536, b"x")
    assert not bm.is_dirty(65536)
    bm.mark(65536, 1)
    assert bm.is_dirty(65536)
    bm.enable()
    with pytest.raises(ValueError):
        bm.clear(1, 10)
    bm.clear(0, 4096)
    assert not bm.is_dirty(0)
    other = node.dirty_bitmap("b")
    assert other.count() == bm.count()
    c = node.add_dirty_bitmap("c", granularity=4096)
    c.mark(0, 1)
    bm.merge(c)
    assert bm.is_dirty(0)
    with pytest.raises(ValueError):
        bm.merge(node.add_dirty_bitmap("g", granularity=8192))
    bm.clear()
    assert bm.count() == 0
    with pytest.raises(blockemu.OutOfRangeError):
        bm.mark(MIB + 100, 1)
    with pytest.raises(blockemu.OutOfRangeError):
        bm.is_dirty(MIB + 100)
    with pytest.raises(ValueError):
        bm.mark(-1, 1)
    # Bad granularities and names, duplicates.
    for g in (0, 256, 511, 1000, 3 << 9, 1 << 31):
        with pytest.raises(ValueError):
            node.add_dirty_bitmap(f"x{g}", granularity=g)
    with pytest.raises(ValueError, match="already"):
        node.add_dirty_bitmap("b")
    with pytest.raises(ValueError):
        node.add_dirty_bitmap("")
    with pytest.raises(KeyError):
        node.dirty_bitmap("nope")
    with pytest.raises(KeyError):
        node.remove_dirty_bitmap("nope")
    # A host-side resize (here through a virtio-blk disk) is refused while any bitmap exists.
    dev = blockemu.VirtioBlk(node, blockemu.GuestMemory(1 << 16))
    with pytest.raises(ValueError, match="dirty bitmaps"):
        dev.resize(2 * MIB)
    for name in node.dirty_bitmaps():
        node.remove_dirty_bitmap(name)
    dev.resize(2 * MIB)
    assert node.size == 2 * MIB


def test_bitmap_limit_and_resize(tmp_path: Path) -> None:
    blockemu.create_image(tmp_path / "a.img", MIB)
    node = blockemu.open_image(tmp_path / "a.img")
    for i in range(64):
        node.add_dirty_bitmap(f"b{i}")
    with pytest.raises(ValueError, match="64"):
        node.add_dirty_bitmap("b64")
    # The mirror's own bitmap counts too.
    with pytest.raises(ValueError, match="64"):
        blockemu.MirrorJob(node, blockemu.memory_node(MIB))
    for name in node.dirty_bitmaps():
        node.remove_dirty_bitmap(name)
    job = blockemu.MirrorJob(node, blockemu.memory_node(MIB))
    with pytest.raises(ValueError, match="mirror"):
        node.remove_dirty_bitmap(job.bitmap)
    with pytest.raises(ValueError, match="mirror"):
        node.dirty_bitmap(job.bitmap).clear()
    job.complete(LONG)
    assert node.dirty_bitmaps() == []
    node.close()
    with pytest.raises(ValueError):
        node.add_dirty_bitmap("late")
