"""The blockemu command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import blockemu
from blockemu.cli import main

from peers import require_tool


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockemu.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "create"):
        assert cmd in r.stdout


def test_create_and_info(tmp_path: Path, capsys) -> None:
    img = tmp_path / "cli.img"
    assert main(["create", str(img), "64M"]) == 0
    assert img.stat().st_size == 64 << 20
    assert main(["info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "file format: raw" in out and "64 MiB (67108864 bytes)" in out
    assert "lock: unlocked" in out
    assert main(["info", "--json", str(img)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["virtual_size"] == 64 << 20 and info["format"] == "raw"


def test_info_shows_lock_holder(tmp_path: Path, capsys) -> None:
    img = tmp_path / "locked.img"
    blockemu.create_image(img, 1 << 20)
    with blockemu.open_image(img):
        assert main(["info", str(img)]) == 0
    assert "locked for writing by another process" in capsys.readouterr().out


def test_info_reads_qemu_img_images(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    for fmt in ("raw", "qcow2"):
        img = tmp_path / f"q.{fmt}"
        subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(img), "3G"], check=True)
        r = run("info", "--json", str(img))
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["format"] == fmt and info["virtual_size"] == 3 << 30


def test_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    r = run("info", str(tmp_path / "missing.img"))
    assert r.returncode == 1
    assert r.stderr.startswith("blockemu info:") and "No such file" in r.stderr
    r = run("create", str(tmp_path / "x.img"), "12Q")
    assert r.returncode == 2 and "invalid size" in r.stderr
