"""The NBD client backend against a real qemu-nbd (Unix socket and TCP) and against a scripted
server that misbehaves: data round trips, read-only exports, wrong export names, a server that
dies or stalls (an error within the timeout, never a hang), the inactive-node rule (zero NBD
commands before activate()), and the IDE and virtio-blk devices over NBD."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu.drivers import AtaDriver, VirtioBlkDriver
from nbd_peers import FakeNbd, QemuNbd, short_dir

from peers import require_tool

SIZE = 4 << 20


def pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed + (i >> 9)) & 0xFF for i in range(n))


@pytest.fixture
def image() -> Iterator[Path]:
    d = short_dir()
    path = d / "disk.img"
    path.write_bytes(pattern(SIZE))
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def serve(image: Path) -> Iterator[Any]:
    """Starts qemu-nbd servers on `image`; kills them (by pid) at teardown."""
    qemu_nbd = require_tool("qemu-nbd")
    servers: list[QemuNbd] = []

    def start(**kwargs: Any) -> QemuNbd:
        s = QemuNbd(qemu_nbd, image, **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.kill()


@pytest.fixture
def fake() -> Iterator[Any]:
    servers: list[FakeNbd] = []

    def start(mode: str = "good", **kwargs: Any) -> FakeNbd:
        s = FakeNbd(mode, **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def file_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_read_write_flush_trim_zeroes(serve: Any, image: Path, tcp: bool) -> None:
    srv = serve(tcp=tcp, extra=("--discard=unmap",))
    with blockemu.open_image(srv.uri) as node:
        assert node.size == SIZE
        assert node.format == "raw"
        assert not node.readonly
        assert node.read(0, 8192) == file_bytes(image, 0, 8192)
        assert node.read(SIZE - 1000, 1000) == file_bytes(image, SIZE - 1000, 1000)
        data = os.urandom(3 * 4096 + 100)
        node.write(12345, data)
        node.flush()
        assert file_bytes(image, 12345, len(data)) == data
        assert node.read(12345, len(data)) == data
        node.write_zeroes(65536, 8192)
        assert file_bytes(image, 65536, 8192) == bytes(8192)
        assert node.discard(1 << 20, 1 << 20) is True
        assert node.read(1 << 20, 1 << 20) == bytes(1 << 20)
        assert file_bytes(image, 1 << 20, 1 << 20) == bytes(1 << 20)
        # A read larger than one request's payload is split (and still exact).
        big = node.read(0, SIZE)
        assert big == file_bytes(image, 0, SIZE)
        st = node.stats()
        assert st["writes"] >= 1 and st["flushes"] == 1 and st["bytes_written"] == len(data)


def test_concurrent_workers(serve: Any, image: Path) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(50):
                off = (k * 50 + i) * 4096
                block = bytes([k, i]) * 2048
                node.write(off, block)
                assert node.read(off, 4096) == block
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    node.flush()
    assert file_bytes(image, (1 * 50 + 3) * 4096, 4) == bytes([1, 3]) * 2
    node.close()


def test_32_requests_in_flight_match_the_file(serve: Any, image: Path) -> None:
    """32 threads share one connection (pipelined requests, replies matched by cookie):
    each writes its own blocks and reads random ones; everything matches the file."""
    srv = serve()
    node = blockemu.open_image(srv.uri, timeout=30)
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)
    expected = file_bytes(image, 0, SIZE // 2)

    def worker(k: int) -> None:
        try:
            rng = random.Random(k)
            barrier.wait(30)
            for i in range(40):
                # Writes go to the second half (k's own blocks), reads to the first half.
                if i % 4 == 0:
                    block = bytes([k, i]) * 2048
                    node.write(SIZE // 2 + (k * 10 + i // 4) * 4096, block)
                    got = node.read(SIZE // 2 + (k * 10 + i // 4) * 4096, 4096)
                    assert got == block, (k, i)
                n = rng.choice((512, 4096, 65536))
                o = rng.randrange(0, SIZE // 2 - n)
                assert node.read(o, n) == expected[o : o + n], (k, i, o, n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    node.flush()
    for k in range(32):
        for j in range(10):
            off = SIZE // 2 + (k * 10 + j) * 4096
            assert file_bytes(image, off, 4096) == bytes([k, j * 4]) * 2048
    assert node.read(0, SIZE) == file_bytes(image, 0, SIZE)
    node.close()


def test_stalled_server_fails_all_16_in_flight_then_recovers(serve: Any, image: Path) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri, timeout=0.5)
    assert node.read(0, 512) == pattern(512)
    results: list[BaseException | bytes] = []
    barrier = threading.Barrier(17)

    def reader(k: int) -> None:
        barrier.wait(10)
        try:
            results.append(node.read(k * 8192, 4096))
        except BaseException as e:
            results.append(e)

    srv.signal(signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        barrier.wait(10)
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads)
        assert len(results) == 16
        bad = [r for r in results if not isinstance(r, TimeoutError)]
        assert not bad, bad
        assert elapsed < 5, elapsed
    finally:
        srv.signal(signal.SIGCONT)
    # The broken connection was dropped: the next operation reconnects.
    assert node.read(4096, 512) == file_bytes(image, 4096, 512)
    node.close()


def test_readonly_export(serve: Any) -> None:
    srv = serve(readonly=True)
    node = blockemu.open_image(srv.uri)
    assert node.readonly
    assert node.read(0, 512) == pattern(512)
    with pytest.raises(blockemu.ReadOnlyError):
        node.write(0, b"x" * 512)
    node.close()
    info = blockemu.image_info(srv.uri)
    assert info["read_only"] is True and info["virtual_size"] == SIZE


def test_wrong_export_name(serve: Any) -> None:
    srv = serve()
    with pytest.raises(FileNotFoundError, match='no export "nope"'):
        blockemu.open_image(srv.uri_for("nope"), timeout=5)


def test_bad_uris() -> None:
    for spec in ("nbd://", "nbd://h:0/x", "nbd+unix:///x", "nbd://h/x?socket=/s"):
        with pytest.raises(ValueError, match="invalid NBD URI"):
            blockemu.open_image(spec)
    with pytest.raises(ValueError, match="timeout"):
        blockemu.open_image("nbd://127.0.0.1/x", timeout=0)


def test_no_server() -> None:
    d = short_dir()
    with pytest.raises(OSError):
        blockemu.open_image(f"nbd+unix:///x?socket={d}/none.sock", timeout=2)


def test_server_killed_mid_operation(serve: Any, fake: Any) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri, timeout=3)
    node.read(0, 4096)
    srv.kill()
    t = time.monotonic()
    with pytest.raises(OSError):
        node.read(0, 4096)
    # Reconnecting to a dead server fails too.
    with pytest.raises(OSError):
        node.read(0, 4096)
    assert time.monotonic() - t < 3
    # Dies after taking the request, before answering.
    f = fake("close_mid")
    node = blockemu.open_image(f.uri, timeout=3, format="raw")
    t = time.monotonic()
    with pytest.raises(OSError, match="closed the connection"):
        node.read(0, 4096)
    assert time.monotonic() - t < 3
    with contextlib.suppress(OSError):
        node.close()


def test_stalled_server_times_out_then_recovers(serve: Any, image: Path) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri, timeout=0.5)
    assert node.read(0, 512) == pattern(512)
    srv.signal(signal.SIGSTOP)
    try:
        t = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer in time"):
            node.read(4096, 512)
        assert 0.4 < time.monotonic() - t < 5
    finally:
        srv.signal(signal.SIGCONT)
    # The broken connection was dropped: the next operation reconnects.
    assert node.read(4096, 512) == file_bytes(image, 4096, 512)
    node.close()


def test_ctrl_c_interrupts_a_stalled_operation(serve: Any) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri, timeout=30)
    node.read(0, 512)
    srv.signal(signal.SIGSTOP)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            node.read(4096, 512)
    finally:
        timer.cancel()
        srv.signal(signal.SIGCONT)
    assert time.monotonic() - t < 5
    assert node.read(0, 512) == pattern(512)  # reconnected
    node.close()


def test_silent_fake_server_times_out(fake: Any) -> None:
    f = fake("silent")
    node = blockemu.open_image(f.uri, timeout=0.3, format="raw")
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        node.read(0, 512)
    assert time.monotonic() - t < 3
    with contextlib.suppress(OSError):
        node.close()


@pytest.mark.parametrize(
    ("mode", "match"),
    [
        ("bad_reply_magic", "bad reply magic"),
        ("wrong_cookie", "reply cookie"),
        ("truncated", "closed the connection"),
    ],
)
def test_hostile_replies(fake: Any, mode: str, match: str) -> None:
    f = fake(mode)
    node = blockemu.open_image(f.uri, timeout=2, format="raw")
    with pytest.raises(OSError, match=match):
        node.read(0, 4096)
    # close() flushes over a fresh connection to the same hostile server: may fail too.
    with contextlib.suppress(OSError):
        node.close()


@pytest.mark.parametrize(
    ("mode", "exc", "match"),
    [
        ("bad_magic", OSError, "not an NBD server"),
        ("huge_option", OSError, "option reply of 4294967280 bytes"),
        ("unknown_export", FileNotFoundError, "no such export"),
    ],
)
def test_hostile_handshakes(fake: Any, mode: str, exc: type[BaseException], match: str) -> None:
    f = fake(mode)
    with pytest.raises(exc, match=match):
        blockemu.open_image(f.uri, timeout=2, format="raw")


def test_inactive_node_sends_no_command_until_activate(fake: Any, serve: Any) -> None:
    f = fake("good")
    f.data[:4] = b"abcd"
    node = blockemu.open_image(f.uri, active=False, format="raw")
    assert f.handshakes == 1  # negotiation happened at open (size known, name validated)
    assert not node.active and node.size == f.size
    with pytest.raises(blockemu.InactiveError):
        node.read(0, 512)
    with pytest.raises(blockemu.InactiveError):
        node.write(0, b"x" * 512)
    time.sleep(0.1)
    assert f.commands == []
    node.activate()
    assert f.commands == []  # activation itself reads nothing
    assert node.read(0, 4) == b"abcd"
    assert f.commands == [(0, 0, 4)]
    node.close()
    with pytest.raises(ValueError, match="explicit format"):
        blockemu.open_image(f.uri, active=False)
    # The same against qemu-nbd: zero backend reads while inactive.
    srv = serve()
    n2 = blockemu.open_image(srv.uri, active=False, format="raw")
    assert n2.stats()["reads"] == 0
    n2.activate()
    assert n2.read(0, 512) == pattern(512)
    n2.close()


def test_ide_over_nbd(serve: Any, image: Path) -> None:
    srv = serve()
    node = blockemu.open_image(srv.uri, format="raw")
    memory = blockemu.GuestMemory(1 << 20)
    channel = blockemu.IdeChannel(blockemu.IdeDisk(node), memory=memory)
    channel.start()
    drv = AtaDriver(channel)
    assert drv.probe()["sectors"] == SIZE // 512
    assert drv.read(10, 4) == file_bytes(image, 10 * 512, 4 * 512)
    data = os.urandom(8 * 512)
    drv.write(100, data)
    drv.flush()
    assert file_bytes(image, 100 * 512, len(data)) == data
    assert drv.read(100, 8) == data
    channel.stop()
    node.close()


def test_virtio_over_nbd(serve: Any, image: Path) -> None:
    srv = serve(tcp=True)
    node = blockemu.open_image(srv.uri, format="raw")
    memory = blockemu.GuestMemory(8 << 20)
    dev = blockemu.VirtioBlk(node, memory)
    dev.start()
    drv = VirtioBlkDriver(dev, memory)
    drv.probe()
    assert drv.capacity == SIZE // 512
    assert drv.read(3, 5) == file_bytes(image, 3 * 512, 5 * 512)
    data = os.urandom(16 * 512)
    drv.write(200, data)
    drv.flush()
    assert file_bytes(image, 200 * 512, len(data)) == data
    assert drv.read(200, 16) == data
    dev.stop()
    node.close()


def test_cli_info(serve: Any) -> None:
    srv = serve(readonly=True)
    out = subprocess.run(
        [sys.executable, "-m", "blockemu", "info", "--json", srv.uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    info = json.loads(out)
    assert info["virtual_size"] == SIZE and info["read_only"] is True
    text = subprocess.run(
        [sys.executable, "-m", "blockemu", "info", srv.uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "read-only: yes" in text and "virtual size" in text
