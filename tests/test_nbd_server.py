"""blockemu.NbdServer against real clients (qemu-img info/convert/compare/bench, qemu-io) and
our own NBD client, over TCP and Unix sockets: raw and qcow2 nodes, read-only and inactive
exports, remove_export, close()."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockemu
from nbd_peers import short_dir

from peers import require_tool

SIZE = 4 << 20


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool(tool), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def sdir() -> Iterator[Path]:
    d = short_dir()
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture(params=["tcp", "unix"])
def server(request: pytest.FixtureRequest, sdir: Path) -> Iterator[blockemu.NbdServer]:
    addr = "tcp:127.0.0.1:0" if request.param == "tcp" else f"unix:{sdir / 'nbd.sock'}"
    srv = blockemu.NbdServer(addr)
    yield srv
    srv.close()


@pytest.fixture(params=["raw", "qcow2"])
def target(request: pytest.FixtureRequest, sdir: Path) -> Iterator[tuple[str, Path]]:
    fmt = str(request.param)
    path = sdir / f"target.{fmt}"
    blockemu.create_image(path, SIZE, format=fmt)  # type: ignore[arg-type]
    yield fmt, path


def source_file(d: Path) -> Path:
    src = d / "src.raw"
    data = bytearray(os.urandom(SIZE))
    data[SIZE // 2 : SIZE // 2 + (1 << 20)] = bytes(1 << 20)  # a zero run: convert skips it
    src.write_bytes(bytes(data))
    return src


def test_address_uri_and_info(server: blockemu.NbdServer, target: tuple[str, Path]) -> None:
    _, path = target
    node = blockemu.open_image(path)
    uri = server.add_export("disk 0", node)
    if server.address.startswith("tcp:"):
        port = int(server.address.rsplit(":", 1)[1])
        assert port > 0
        assert uri == f"nbd://127.0.0.1:{port}/disk%200"
    else:
        assert uri == f"nbd+unix:///disk%200?socket={server.address[5:]}"
    assert server.exports() == ["disk 0"]
    r = run("qemu-img", "info", "--output=json", "-f", "raw", uri)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virtual-size"] == SIZE
    assert "NbdServer" in repr(server)
    node.close()


def test_qemu_img_convert_into_the_export(
    server: blockemu.NbdServer, target: tuple[str, Path], sdir: Path
) -> None:
    fmt, path = target
    src = source_file(sdir)
    node = blockemu.open_image(path)
    uri = server.add_export("t", node)
    r = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    assert r.returncode == 0, r.stderr
    # Through the export, then the image file itself once the node let go.
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    assert r.returncode == 0, r.stdout + r.stderr
    st = server.stats()
    assert st["writes"] > 0 and st["bytes_written"] > 0 and st["connections"] >= 2
    server.remove_export("t")
    node.close()
    r = run("qemu-img", "compare", "-f", "raw", "-F", fmt, str(src), str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_qemu_io_pattern_and_bench(server: blockemu.NbdServer, target: tuple[str, Path]) -> None:
    _, path = target
    node = blockemu.open_image(path)
    uri = server.add_export("io", node)
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k", uri)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    assert node.read(0, 65536) == b"\xab" * 65536
    r = run("qemu-io", "-f", "raw", "-c", "write -z 0 32k", "-c", "discard 32k 32k", uri)
    assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
    assert node.read(0, 32768) == bytes(32768)  # after a TRIM the content is unspecified
    assert server.stats()["trims"] == 1
    r = run("qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "8", "-s", "4k", uri)
    assert r.returncode == 0, r.stderr
    assert server.stats()["reads"] >= 2000
    node.close()


def test_our_client_reads_and_writes(server: blockemu.NbdServer) -> None:
    node = blockemu.memory_node(SIZE)
    uri = server.add_export("m", node)
    with blockemu.open_image(uri) as client:
        assert client.size == SIZE
        data = os.urandom(300_000)
        client.write(12345, data)
        client.flush()
        assert client.read(12345, len(data)) == data
        assert node.read(12345, len(data)) == data
        client.write_zeroes(0, 8192)
        assert node.read(0, 8192) == bytes(8192)
        with pytest.raises(blockemu.OutOfRangeError):
            client.read(SIZE - 10, 20)  # refused by the client, which knows the size
    st = server.stats()
    assert st["flushes"] >= 1 and st["zero_writes"] == 1
    assert node.stats()["bytes_written"] >= len(data)


def test_read_only_export_refuses_writes(server: blockemu.NbdServer) -> None:
    node = blockemu.memory_node(SIZE)
    node.write(0, b"base")
    uri = server.add_export("ro", node, writable=False)
    with blockemu.open_image(uri) as client:
        assert client.readonly
        assert client.read(0, 4) == b"base"
        with pytest.raises(PermissionError):
            client.write(0, b"nope")
    r = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", uri)
    assert r.returncode == 0, r.stderr
    assert node.read(0, 4) == b"base"
    with pytest.raises(ValueError):
        server.add_export("rw", blockemu.memory_node(512, readonly=True))


def test_inactive_node_answers_eperm(server: blockemu.NbdServer, sdir: Path) -> None:
    path = sdir / "d.raw"
    blockemu.create_image(path, SIZE)
    node = blockemu.open_image(path, format="raw", active=False)
    uri = server.add_export("off", node)
    with pytest.raises(PermissionError):
        blockemu.open_image(uri)  # probing the format reads: EPERM
    client = blockemu.open_image(uri, format="raw")
    with pytest.raises(PermissionError):
        client.read(0, 512)
    with pytest.raises(PermissionError):
        client.write(0, b"x" * 512)
    assert node.stats()["reads"] == 0 and node.stats()["writes"] == 0
    node.activate()
    client.write(0, b"y" * 512)
    assert client.read(0, 512) == b"y" * 512
    client.close()
    node.close()
    # An inactive qcow2 node does not know its size yet: the export is refused (EACCES).
    qpath = sdir / "d.qcow2"
    blockemu.create_image(qpath, SIZE, format="qcow2")
    qnode = blockemu.open_image(qpath, format="qcow2", active=False)
    assert qnode.size is None
    quri = server.add_export("q", qnode)
    with pytest.raises(PermissionError):
        blockemu.open_image(quri, format="raw", timeout=5)
    qnode.activate()
    with blockemu.open_image(quri, format="raw", timeout=5) as qclient:
        assert qclient.size == SIZE
    qnode.close()


def test_remove_export_disconnects_clients(server: blockemu.NbdServer) -> None:
    node = blockemu.memory_node(SIZE)
    uri = server.add_export("gone", node)
    client = blockemu.open_image(uri, timeout=5)
    client.write(0, b"a")
    server.remove_export("gone")
    assert server.exports() == []
    with pytest.raises(OSError):
        client.read(0, 1)
    with pytest.raises(OSError):
        blockemu.open_image(uri, timeout=5)
    with pytest.raises(ValueError):
        server.remove_export("gone")
    with contextlib.suppress(OSError):
        client.close()  # its final flush finds no export


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_close_is_idempotent_and_frees_the_port() -> None:
    before = threads()
    srv = blockemu.NbdServer("tcp:127.0.0.1:0")
    node = blockemu.memory_node(SIZE)
    uri = srv.add_export("x", node)
    client = blockemu.open_image(uri, timeout=5)
    port = int(srv.address.rsplit(":", 1)[1])
    srv.close()
    srv.close(timeout=0.5)
    assert srv.closed
    with pytest.raises(OSError):
        client.read(0, 1)
    with pytest.raises(ValueError):
        srv.add_export("y", node)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    with contextlib.suppress(OSError):
        client.close()  # its final flush finds no server
    assert threads() <= before  # accept, connection and worker threads all joined


def test_context_manager_and_unix_socket_removed(sdir: Path) -> None:
    sock = sdir / "cm.sock"
    with blockemu.NbdServer(f"unix:{sock}") as srv:
        srv.add_export("", blockemu.memory_node(4096))
        assert sock.exists()
    assert srv.closed
    assert not sock.exists()


def test_bad_arguments() -> None:
    for bad in ["", "tcp:127.0.0.1", "tcp:127.0.0.1:70000", "udp:x:1", "unix:"]:
        with pytest.raises(ValueError):
            blockemu.NbdServer(bad)
    with blockemu.NbdServer("tcp:127.0.0.1:0") as srv:
        srv.add_export("a", blockemu.memory_node(512))
        with pytest.raises(ValueError):
            srv.add_export("a", blockemu.memory_node(512))
        with pytest.raises(ValueError):
            srv.add_export("n\0", blockemu.memory_node(512))
        with pytest.raises(ValueError):
            srv.close(timeout=-1)
        assert set(srv.stats()) >= {
            "connections",
            "requests",
            "reads",
            "writes",
            "bytes_read",
            "bytes_written",
            "zero_writes",
            "trims",
            "flushes",
            "errors",
        }
