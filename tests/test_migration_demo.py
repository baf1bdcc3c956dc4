"""``blockemu demo``: a live migration between two processes, run from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockemu.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_demo() -> None:
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout
    r = run("demo", "--help")
    assert r.returncode == 0 and "--transport" in r.stdout


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_demo_json(tmp_path: Path, transport: str) -> None:
    r = run("demo", "--dir", str(tmp_path), "--transport", transport, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    rep = json.loads(r.stdout)
    assert rep["ok"] and all(rep["checks"].values()), rep["checks"]
    assert set(rep["reads_before_activation"].values()) == {0}
    assert rep["geometry"]["source"] == rep["geometry"]["destination"]
    assert rep["geometry"]["destination"]["ide0.master"] == [32, 16, 63, "none"]
    assert rep["downtime_ms"] > 0 and rep["bytes_sent"] > rep["state_bytes"] > 0
    assert [p["name"] for p in rep["phases"]][:3] == ["connecting", "preparing", "stopping"]
    assert rep["read_back"]["ide"] > 0 and rep["read_back"]["virtio"] > 0
    assert max(rep["max_write_lock_holders"].values()) == 1
    assert (tmp_path / "disk-ide.img").exists() and (tmp_path / "disk-ide.img.owner").exists()


def test_demo_text(tmp_path: Path) -> None:
    r = run("demo", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout
    for needle in ("phases:", "downtime:", "reads before activation:  0", "geometry carried:"):
        assert needle in out
    assert "[FAIL]" not in out and out.rstrip().endswith("PASS")


def test_demo_mirror_json(tmp_path: Path) -> None:
    """``--storage mirror``: own images on each side, copied while the guest runs."""
    r = run("demo", "--dir", str(tmp_path), "--storage", "mirror", "--disk-size", "32M", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    rep = json.loads(r.stdout)
    assert rep["ok"] and all(rep["checks"].values()), rep["checks"]
    assert rep["storage"] == "mirror"
    names = [p["name"] for p in rep["phases"]]
    assert names[:4] == ["connecting", "preparing", "mirroring", "stopping"]
    assert rep["mirror"]["bytes_total"] >= 2 * (32 << 20)
    assert set(rep["reads_before_activation"].values()) == {0}
    assert (tmp_path / "dest-disk-ide.img").exists()


def test_demo_mirror_shows_progress(tmp_path: Path) -> None:
    """Without tqdm (or without a terminal) the progress is plain text on stderr."""
    r = run("demo", "--dir", str(tmp_path), "--storage", "mirror", "--disk-size", "32M")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "mirror" in r.stderr
    assert "mirrored:" in r.stdout and r.stdout.rstrip().endswith("PASS")
