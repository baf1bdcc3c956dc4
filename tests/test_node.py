"""BlockNode behaviour promised by API.md (images and block nodes, errors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import blockemu
from blockemu import (
    BlockemuError,
    ImageFormatError,
    InactiveError,
    LockError,
    OutOfRangeError,
    ReadOnlyError,
)


def test_create_rounds_up_to_sectors_and_info_reports_it(tmp_path: Path) -> None:
    p = tmp_path / "odd.img"
    blockemu.create_image(p, 1000)
    assert p.stat().st_size == 1024
    info = blockemu.image_info(p)
    assert info["format"] == "raw"
    assert info["virtual_size"] == 1024
    assert info["lock"] == "unlocked"


def test_read_write_flush_and_stats(make_image) -> None:
    with blockemu.open_image(make_image()) as node:
        assert (node.size, node.format, node.readonly, node.active) == (1 << 20, "raw", False, True)
        node.write(4096, b"abc")
        assert node.read(4096, 3) == b"abc"
        buf = bytearray(3)
        assert node.readinto(4096, buf) == 3
        assert buf == b"abc"
        node.flush()
        s = node.stats()
        assert s["writes"] == 1 and s["bytes_written"] == 3
        assert s["reads"] == 2 and s["bytes_read"] == 6
        assert s["flushes"] == 1


def test_write_accepts_any_bytes_like(make_image) -> None:
    with blockemu.open_image(make_image()) as node:
        node.write(0, bytearray(b"xy"))
        node.write(2, memoryview(b"zw"))
        import array

        node.write(4, array.array("B", [1, 2]))
        assert node.read(0, 6) == b"xyzw\x01\x02"
        with pytest.raises(TypeError):
            node.readinto(0, b"immutable")


def test_negative_and_out_of_range(make_image) -> None:
    with blockemu.open_image(make_image(size=4096)) as node:
        for call in (
            lambda: node.read(-1, 1),
            lambda: node.read(0, -1),
            lambda: node.write(-5, b"x"),
        ):
            with pytest.raises(ValueError):
                call()
        with pytest.raises(OutOfRangeError):
            node.read(4000, 100)
        with pytest.raises(OutOfRangeError):
            node.write(4096, b"x")
        with pytest.raises(ValueError):
            node.read(2**70, 1)
        # A huge length is out of range, never an attempt to allocate it.
        with pytest.raises(OutOfRangeError):
            node.read(0, 2**60)
        with pytest.raises(OutOfRangeError):
            node.read_async(0, 2**60)
        assert node.stats()["reads"] == 0


def test_inactive_open_reads_nothing_and_refuses_io(make_image) -> None:
    path = make_image(fill=b"\xaa")
    node = blockemu.open_image(path, format="raw", active=False)
    node.enable_trace()
    assert node.active is False
    assert node.size == 1 << 20  # raw: the file's size, from metadata
    for call in (
        lambda: node.read(0, 512),
        lambda: node.readinto(0, bytearray(512)),
        lambda: node.write(0, b"x"),
        node.flush,
    ):
        with pytest.raises(InactiveError):
            call()
    assert node.stats() == {k: 0 for k in node.stats()}
    assert all(e["outcome"] == "refused: inactive node" for e in node.trace())
    node.activate()
    assert node.read(0, 2) == b"\xaa\xaa"
    node.close()


def test_inactive_open_needs_a_format(make_image) -> None:
    with pytest.raises(ValueError, match="explicit format"):
        blockemu.open_image(make_image(), active=False)


def test_inactive_open_validates_early(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        blockemu.open_image(tmp_path / "nope.img", format="raw", active=False)
    ro = tmp_path / "ro.img"
    blockemu.create_image(ro, 4096)
    os.chmod(ro, 0o444)
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(PermissionError):
            blockemu.open_image(ro, format="raw", active=False)
    with pytest.raises(IsADirectoryError):
        blockemu.open_image(tmp_path, format="raw", active=False)


def test_closed_node_raises_value_error_everywhere_but_close(make_image) -> None:
    node = blockemu.open_image(make_image())
    node.close()
    node.close()
    assert node.closed
    for call in (
        lambda: node.read(0, 1),
        lambda: node.write(0, b"x"),
        node.flush,
        node.activate,
        node.inactivate,
        node.stats,
        lambda: node.size,
        node.__enter__,
    ):
        with pytest.raises(ValueError):
            call()


def test_readonly_node(make_image) -> None:
    with blockemu.open_image(make_image(), readonly=True) as node:
        assert node.readonly
        with pytest.raises(ReadOnlyError):
            node.write(0, b"x")
        with pytest.raises(PermissionError):
            node.write(0, b"x")
        node.flush()  # nothing to flush, allowed
        assert node.stats()["writes"] == 0


def test_format_handling(make_image, tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError):
        blockemu.open_image(make_image(), format="vmdk")  # type: ignore[arg-type]
    q = tmp_path / "fake.qcow2"
    q.write_bytes(b"QFI\xfb" + bytes(100))  # qcow2 magic, invalid header
    with pytest.raises(ImageFormatError, match="qcow2"):
        blockemu.open_image(q)
    with pytest.raises(ValueError, match="NBD"):
        blockemu.open_image("nbd+unix:///x")  # malformed: no socket (test_nbd.py has the rest)
    with pytest.raises(ValueError, match="cache mode"):
        blockemu.open_image(make_image(), cache="bogus")  # type: ignore[arg-type]


def test_errors_are_all_blockemu_errors() -> None:
    for cls in (
        InactiveError,
        LockError,
        OutOfRangeError,
        ImageFormatError,
        blockemu.GeometryError,
        blockemu.StateError,
        ReadOnlyError,
        blockemu.MigrationError,
    ):
        assert issubclass(cls, BlockemuError)
    assert issubclass(OutOfRangeError, ValueError)
    assert issubclass(ReadOnlyError, PermissionError)
    e = blockemu.MigrationError("x", phase="transfer", source_resumed=True)
    assert e.phase == "transfer" and e.source_resumed


def test_lifecycle_trace_orders_lock_cache_and_io(make_image) -> None:
    path = make_image()
    src = blockemu.open_image(path)
    dst = blockemu.open_image(path, format="raw", active=False)
    dst.enable_trace()
    with pytest.raises(LockError):
        dst.activate()
    assert dst.active is False
    src.write(0, b"from source")
    src.inactivate()
    assert src.locks() == {"held": ["consistent read"], "unshared": []}
    dst.activate()
    assert dst.locks()["held"] == ["consistent read", "write", "resize"]
    assert dst.read(0, 11) == b"from source"
    ops = [(e["op"], e["outcome"]) for e in dst.trace()]
    assert ops[0] == ("activate", "failed: image locked")
    assert ops[1:] == [("drop_caches", "ok"), ("activate", "ok"), ("read", "ok")]
    src.close()
    dst.close()


def test_cache_modes(make_image) -> None:
    path = make_image()
    for mode, flushes in (("writeback", 1), ("writethrough", 3), ("unsafe", 0)):
        with blockemu.open_image(path, cache=mode) as node:
            assert node.cache == mode
            node.write(0, b"a")
            node.write(1, b"b")
            node.flush()
            assert node.stats()["flushes"] == flushes, mode


def test_cache_none_uses_o_direct(tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    blockemu.create_image(path, 1 << 16)
    try:
        node = blockemu.open_image(path, cache="none")
    except ValueError as e:  # file systems without O_DIRECT (tmpfs)
        assert "O_DIRECT" in str(e)
        return
    with node:
        node.write(7, b"unaligned")
        assert node.read(7, 9) == b"unaligned"
        node.write(4096, bytes(range(256)) * 16)
        assert node.read(4096, 4096) == bytes(range(256)) * 16


def test_impossible_sizes_are_errors_not_crashes() -> None:
    with pytest.raises(OSError):
        blockemu.memory_node(2**62)
    with pytest.raises(ValueError):
        blockemu.GuestMemory(2**62)


def test_memory_node_and_discard(make_image) -> None:
    node = blockemu.memory_node(1 << 16)
    node.write(0, b"\xff" * 8192)
    node.write_zeroes(0, 4096)
    assert node.read(0, 4096) == bytes(4096)
    assert node.discard(4096, 4096) is True
    assert node.read(4096, 4096) == bytes(4096)
    assert node.stats()["discards"] == 1


def test_guest_memory_buffer_protocol() -> None:
    mem = blockemu.GuestMemory(8192)
    assert mem.size == len(mem) == 8192
    view = memoryview(mem)
    assert not view.readonly and view.nbytes == 8192
    view[100:104] = b"ring"
    assert mem.read(100, 4) == b"ring"
    mem.write(8188, b"tail")
    assert bytes(view[8188:]) == b"tail"
    with pytest.raises(OutOfRangeError):
        mem.read(8190, 4)
    with pytest.raises(OutOfRangeError):
        mem.write(8192, b"x")
    with pytest.raises(ValueError):
        mem.read(-1, 1)
    with pytest.raises(ValueError):
        blockemu.GuestMemory(0)
    view.release()
