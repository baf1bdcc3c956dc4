"""Image locks across processes, and against QEMU's own tools (qemu-img, qemu-io)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import blockemu
from blockemu import LockError

from peers import require_tool

HOLDER = textwrap.dedent(
    """
    import sys, blockemu
    node = blockemu.open_image(sys.argv[1], readonly=sys.argv[2] == "ro",
                               active=sys.argv[3] == "active", format="raw")
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


class Holder:
    """Another process holding an image open, until stopped."""

    def __init__(self, path: Path, mode: str = "rw", state: str = "active") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), mode, state],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        self.proc.communicate("\n", timeout=10)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


def test_second_process_cannot_write_while_first_holds(make_image) -> None:
    path = make_image()
    holder = Holder(path)
    try:
        with pytest.raises(LockError, match=r'Failed to get "write" lock.*disk\.img'):
            blockemu.open_image(path)
        with pytest.raises(LockError, match='shared "write"'):
            blockemu.open_image(path, readonly=True)
        assert blockemu.image_info(path)["lock"] == "locked for writing by another process"
        # An incoming (inactive) open coexists, but cannot activate yet.
        dst = blockemu.open_image(path, format="raw", active=False)
        with pytest.raises(LockError):
            dst.activate()
        assert not dst.active
    finally:
        holder.stop()
    dst.activate()  # the holder's locks died with it
    dst.close()


def test_process_death_releases_locks(make_image) -> None:
    path = make_image()
    holder = Holder(path)
    holder.kill()
    with blockemu.open_image(path) as node:
        node.write(0, b"mine now")


def test_inactive_holder_lets_us_write(make_image) -> None:
    path = make_image()
    holder = Holder(path, state="inactive")
    try:
        with blockemu.open_image(path) as node:
            node.write(0, b"ok")
    finally:
        holder.stop()


def test_qemu_sees_our_write_lock(make_image) -> None:
    qemu_io = require_tool("qemu-io")
    path = make_image()
    node = blockemu.open_image(path)
    write = [qemu_io, "-f", "raw", "-c", "write -P 0x11 0 512", str(path)]
    r = subprocess.run(write, capture_output=True, text=True)
    assert r.returncode != 0
    assert 'Failed to get "write" lock' in r.stderr
    assert "Is another process using the image" in r.stderr
    # After inactivation we hold only the shared byte: QEMU may take the image over.
    node.inactivate()
    r = subprocess.run(write, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # ... and our activation (which drops caches) sees what it wrote.
    node.activate()
    assert node.read(0, 512) == b"\x11" * 512
    node.close()


def test_we_see_qemus_write_lock(make_image) -> None:
    qemu_io = require_tool("qemu-io")
    path = make_image()
    # qemu-io keeps the image open read-write while it runs its commands.
    with subprocess.Popen(
        [qemu_io, "-f", "raw", "-c", "write -P 0x5a 0 4096", "-c", "sleep 3000", str(path)],
        stdout=subprocess.DEVNULL,
    ) as proc:
        # qemu-io buffers its output when piped: watch the lock bytes instead.
        deadline = time.monotonic() + 10
        while "write" not in blockemu.image_info(path)["locks_held"]:
            assert time.monotonic() < deadline, "qemu-io never took the write lock"
            time.sleep(0.02)
        with pytest.raises(LockError, match='"write" lock'):
            blockemu.open_image(path)
        assert blockemu.image_info(path)["lock"].startswith("locked for writing")
        proc.wait(timeout=30)
    with blockemu.open_image(path) as node:
        assert node.read(0, 4096) == b"\x5a" * 4096


def test_qemu_img_readers_refused_while_we_hold_the_write_lock(make_image, tmp_path) -> None:
    """An active blockemu node is a writer QEMU's tools respect: a qemu-img that reads the
    data (convert) fails on the shared "write" lock; ``-U`` (force share) is the only way
    around it. ``qemu-img info`` of a raw image reads no data and, in QEMU 7.2, opens without
    that lock: it is not refused. (The other direction, a qemu-io writer refusing our active
    open with LockError, is test_we_see_qemus_write_lock.)"""
    qemu_img = require_tool("qemu-img")
    path = make_image()
    out = tmp_path / "copy.img"
    node = blockemu.open_image(path)
    convert = [qemu_img, "convert", "-f", "raw", "-O", "raw", str(path), str(out)]
    r = subprocess.run(convert, capture_output=True, text=True)
    assert r.returncode != 0
    assert 'Failed to get shared "write" lock' in r.stderr
    assert "Is another process using the image" in r.stderr
    r = subprocess.run([*convert[:2], "-U", *convert[2:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([qemu_img, "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Inactive (handed over), we hold only shared bytes: qemu-img may read.
    node.inactivate()
    r = subprocess.run(convert, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    node.close()


def test_qemu_img_info_refused_on_a_qcow2_image_we_hold(tmp_path: Path) -> None:
    """Issue 7 scenario 5 on a qcow2 image: ``qemu-img info`` (without ``-U``) reads the qcow2
    header, so it needs the image consistent and is refused while our active node holds the
    write lock; ``-U`` reads anyway; after our node hands over (inactive), info works."""
    qemu_img = require_tool("qemu-img")
    path = tmp_path / "held.qcow2"
    blockemu.create_image(path, 1 << 20, format="qcow2")
    node = blockemu.open_image(path)
    r = subprocess.run([qemu_img, "info", str(path)], capture_output=True, text=True)
    assert r.returncode != 0
    assert 'Failed to get shared "write" lock' in r.stderr
    r = subprocess.run([qemu_img, "info", "-U", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    node.inactivate()
    r = subprocess.run([qemu_img, "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    node.close()
