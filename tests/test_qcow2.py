"""qcow2 v3: interop with qemu-img (check, compare, images it made), lifecycle, a model test."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockemu
from blockemu import ImageFormatError, InactiveError

from peers import require_tool

MIB = 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-img"), *args], capture_output=True, text=True)


def check_clean(path: Path, *extra: str) -> None:
    r = qemu_img("check", *extra, str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def compare(qcow: Path, raw: Path) -> None:
    r = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(qcow), str(raw))
    assert r.returncode == 0, r.stdout + r.stderr


def random_workload(node: blockemu.BlockNode, raw: bytearray, seed: int, ops: int = 150) -> None:
    rng = random.Random(seed)
    size = len(raw)
    for _ in range(ops):
        n = rng.choice([512, 4096, 65536, rng.randrange(1, 300_000)])
        off = rng.randrange(0, size - n)
        if rng.random() < 0.3:
            assert node.read(off, n) == bytes(raw[off : off + n])
        else:
            data = rng.randbytes(n)
            node.write(off, data)
            raw[off : off + n] = data
        if rng.random() < 0.05:
            node.flush()


def byte79(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(79)
        return f.read(1)[0]


@pytest.mark.parametrize("lazy", [False, True])
def test_our_images_pass_qemu_img_check_and_compare(tmp_path: Path, lazy: bool) -> None:
    img, raw_path = tmp_path / "a.qcow2", tmp_path / "a.raw"
    blockemu.create_image(img, 48 * MIB, format="qcow2", lazy_refcounts=lazy)
    check_clean(img)
    info = blockemu.image_info(img)
    assert info["format"] == "qcow2" and info["virtual_size"] == 48 * MIB
    assert not info["dirty"]
    raw = bytearray(48 * MIB)
    with blockemu.open_image(img) as node:
        assert node.format == "qcow2" and node.size == 48 * MIB
        random_workload(node, raw, seed=1)
        assert blockemu.image_info(img)["dirty"] == lazy
    raw_path.write_bytes(raw)
    check_clean(img)
    compare(img, raw_path)
    assert byte79(img) == 0


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=4096",
        "cluster_size=65536",
        "cluster_size=2097152",
        "lazy_refcounts=on",
        "compat=0.10",
    ],
)
def test_qemu_img_images_read_and_written(tmp_path: Path, opts: str) -> None:
    img, raw_path = tmp_path / "q.qcow2", tmp_path / "q.raw"
    size = 40 * MIB
    r = qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img), str(size))
    assert r.returncode == 0, r.stderr
    raw = bytearray(size)
    with blockemu.open_image(img) as node:
        assert node.size == size
        assert node.read(0, 8192) == bytes(8192)
        random_workload(node, raw, seed=hash(opts) & 0xFFFF)
    raw_path.write_bytes(raw)
    check_clean(img)
    compare(img, raw_path)
    with blockemu.open_image(img, readonly=True) as node:
        assert node.read(0, size) == bytes(raw)


def test_converted_image_read_byte_exactly(tmp_path: Path) -> None:
    src, img = tmp_path / "src.raw", tmp_path / "c.qcow2"
    rng = random.Random(7)
    data = bytearray(24 * MIB)
    for _ in range(60):  # random extents, the rest stays sparse (zero clusters / unallocated)
        n = rng.randrange(1, 400_000)
        off = rng.randrange(0, len(data) - n)
        data[off : off + n] = rng.randbytes(n)
    src.write_bytes(data)
    r = qemu_img("convert", "-O", "qcow2", str(src), str(img))
    assert r.returncode == 0, r.stderr
    with blockemu.open_image(img) as node:
        assert node.read(0, len(data)) == bytes(data)
        random_workload(node, data, seed=8, ops=60)
    src.write_bytes(data)
    check_clean(img)
    compare(img, src)


def test_zero_clusters_read_as_zero(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io = require_tool("qemu-io")
    # Data, then zero clusters over part of it (v3 L2 bit 0, the host cluster kept).
    cmds = ["-c", "write -P 0x55 0 1M", "-c", "write -z 256k 256k", "-c", "write -z 4M 64k"]
    r = subprocess.run([qemu_io, *cmds, str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with blockemu.open_image(img) as node:
        assert node.read(0, 256 * 1024) == b"\x55" * (256 * 1024)
        assert node.read(256 * 1024, 256 * 1024) == bytes(256 * 1024)
        assert node.read(512 * 1024, 1024) == b"\x55" * 1024
        node.write(300 * 1024, b"\x11" * 512)  # into a zero cluster
        node.write(4 * MIB + 10, b"\x22" * 512)
        assert node.read(300 * 1024, 1024) == b"\x11" * 512 + bytes(512)
        assert node.read(256 * 1024, 64 * 1024).count(0) == 64 * 1024 - 512
        assert node.read(4 * MIB, 1024) == bytes(10) + b"\x22" * 512 + bytes(502)
    check_clean(img)


def test_compressed_clusters_are_a_clear_error(tmp_path: Path) -> None:
    src, img = tmp_path / "s.raw", tmp_path / "c.qcow2"
    src.write_bytes(b"compressible" * (MIB // 12))
    r = qemu_img("convert", "-c", "-O", "qcow2", str(src), str(img))
    assert r.returncode == 0, r.stderr
    with blockemu.open_image(img, readonly=True) as node:
        with pytest.raises(ImageFormatError, match="compressed"):
            node.read(0, 4096)


def test_backing_file_is_refused(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    r = qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    assert r.returncode == 0, r.stderr
    with pytest.raises(ImageFormatError, match="backing"):
        blockemu.open_image(top)


def test_probe_and_inactive_open(tmp_path: Path) -> None:
    img = tmp_path / "p.qcow2"
    blockemu.create_image(img, 4 * MIB, format="qcow2", lazy_refcounts=True)
    before, mtime = img.read_bytes(), os.stat(img).st_mtime_ns
    node = blockemu.open_image(img, format="qcow2", active=False)
    assert node.size is None
    s = node.stats()
    assert s["reads"] == s["writes"] == 0
    with pytest.raises(InactiveError):
        node.read(0, 512)
    node.close()  # a closed node has no stats: the file shows that nothing was written
    assert img.read_bytes() == before and os.stat(img).st_mtime_ns == mtime
    with blockemu.open_image(img) as probed:  # probes the magic
        assert probed.format == "qcow2" and probed.size == 4 * MIB
    node = blockemu.open_image(img, format="qcow2", active=False)
    node.activate()
    assert node.size == 4 * MIB and node.stats()["reads"] >= 1
    node.close()


def test_dirty_bit_ping_pong(tmp_path: Path) -> None:
    """migration.md §13 scenario 16."""
    img = tmp_path / "pp.qcow2"
    blockemu.create_image(img, 8 * MIB, format="qcow2", lazy_refcounts=True)
    a = blockemu.open_image(img)
    a.write(0, b"A" * 4096)
    assert byte79(img) == 1
    a.inactivate()
    assert byte79(img) == 0
    a_stats = a.stats()
    b = blockemu.open_image(img, format="qcow2", active=False)
    b.activate()
    assert b.read(0, 4096) == b"A" * 4096
    b.write(MIB, b"B" * 4096)
    assert byte79(img) == 1
    snapshot, mtime = img.read_bytes(), os.stat(img).st_mtime_ns
    assert a.stats() == a_stats  # inactive A issued nothing since inactivation
    a.close()
    assert img.read_bytes() == snapshot and byte79(img) == 1
    assert os.stat(img).st_mtime_ns == mtime
    b.close()
    check_clean(img, "-r", "all")
    assert byte79(img) == 0


@pytest.mark.parametrize(
    "patch",
    [
        (36, b"\xff\xff\xff\xff"),  # l1_size
        (40, (1 << 40).to_bytes(8, "big")),  # L1 beyond EOF
        (40, (0x30008).to_bytes(8, "big")),  # L1 unaligned
        (48, (1 << 40).to_bytes(8, "big")),  # refcount table beyond EOF
        (20, (30).to_bytes(4, "big")),  # cluster_bits
        (72, b"\x80"),  # unknown incompatible bit
    ],
)
def test_hostile_headers(tmp_path: Path, patch: tuple[int, bytes]) -> None:
    img = tmp_path / "h.qcow2"
    blockemu.create_image(img, 4 * MIB, format="qcow2")
    data = bytearray(img.read_bytes())
    at, b = patch
    data[at : at + len(b)] = b
    img.write_bytes(data)
    with pytest.raises(ImageFormatError):
        blockemu.open_image(img)
    img.write_bytes(b"QFI\xfb" + bytes(60))  # truncated header
    with pytest.raises(ImageFormatError):
        blockemu.open_image(img)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["read", "write", "flush"]),
            st.integers(0, 4 * MIB - 1),
            st.integers(1, 200_000),
            st.integers(0, 255),
        ),
        max_size=30,
    )
)
def test_model(tmp_path: Path, ops: list[tuple[str, int, int, int]]) -> None:
    img = tmp_path / "m.qcow2"
    blockemu.create_image(img, 4 * MIB, format="qcow2", lazy_refcounts=True)
    model = bytearray(4 * MIB)
    with blockemu.open_image(img) as node:
        for op, off, n, fill in ops:
            n = min(n, len(model) - off)
            if op == "read":
                assert node.read(off, n) == bytes(model[off : off + n])
            elif op == "write":
                data = bytes([fill]) * n
                node.write(off, data)
                model[off : off + n] = data
            else:
                node.flush()
    with blockemu.open_image(img, readonly=True) as node:
        assert node.read(0, len(model)) == bytes(model)


def test_cli_create_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockemu.cli import main

    img = tmp_path / "cli.qcow2"
    assert main(["create", "-f", "qcow2", str(img), "100M"]) == 0
    check_clean(img)
    r = qemu_img("info", "--output=json", str(img))
    assert '"format": "qcow2"' in r.stdout and '"virtual-size": 104857600' in r.stdout
    capsys.readouterr()
    assert main(["info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "file format: qcow2" in out and "dirty: no" in out
