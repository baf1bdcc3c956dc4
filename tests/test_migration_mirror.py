"""Migration without shared storage (storage="mirror"), between two real processes.

The source copies each disk to the destination's NBD export while its guest writes pseudo-random
blocks at a steady rate through virtio-blk, stops the guest once the dirty remainder is small,
copies the rest and hands over. After the handover every block of the destination image equals a
model: the source's initial content overlaid with every acknowledged write (the guest's own record,
carried in the vCPU state). Fault scenarios — destination killed mid-copy, a stalled network, an
I/O error on the source's storage, the operator's cancel — each leave the source running with every
acknowledged write readable, and the destination's partial image discarded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import blockemu
from blockemu.guest import block_pattern
from blockemu.machine import Machine
from blockemu.migration import Timeouts, incoming, migrate
from blockemu.migration.mirror import MirrorOptions, format_progress
from migration_harness import FAST, LockSampler, start_peer, uri_pair, wait_file

from peers import require_tool

MiB = 1 << 20
REGION = 8 * MiB
STRIDE = 8  # sectors per guest write: 4 KiB blocks


def initial_region(index: int) -> bytes | None:
    """The source's initial content of region ``index``: data in even regions, holes in odd."""
    if index % 2:
        return None
    return random.Random(index).randbytes(REGION)


def make_source(path: Path, size: int) -> None:
    blockemu.create_image(path, size)
    with open(path, "r+b") as f:
        for i in range(size // REGION):
            data = initial_region(i)
            if data is not None:
                f.seek(i * REGION)
                f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_model(path: Path, size: int, acked: list[tuple[int, int]]) -> int:
    """Every block of the image equals the model; returns the number of guest blocks checked."""
    by_region: dict[int, list[tuple[int, int]]] = {}
    for lba, seq in acked:
        by_region.setdefault(lba * 512 // REGION, []).append((lba, seq))
    with open(path, "rb") as f:
        for i in range(size // REGION):
            want = bytearray(initial_region(i) or bytes(REGION))
            for lba, seq in by_region.get(i, []):
                off = lba * 512 - i * REGION
                want[off : off + STRIDE * 512] = block_pattern("virtio", seq, lba, STRIDE)
            f.seek(i * REGION)
            got = f.read(REGION)
            if got != want:
                bad = next(
                    k for k in range(0, REGION, 4096) if got[k : k + 4096] != want[k : k + 4096]
                )
                raise AssertionError(f"block at {i * REGION + bad} differs from the model")
    return len(acked)


def timeouts(**over: float) -> dict[str, float]:
    return {**FAST, "mirror": 120.0, **over}


def pair_cfg(
    tmp: Path, size: int, *, rate: float, mirror: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any], Path, Path]:
    src_img, dst_img = tmp / "src.img", tmp / "dst.img"
    make_source(src_img, size)
    blockemu.create_image(dst_img, size)
    uri = uri_pair(tmp, "tcp")
    workload = {
        "base": 2048,
        "span": size // 512 - 2048,
        "stride": STRIDE,
        "scatter": True,
        "rate": rate,
        "run_for": 0.3,
    }
    common = {"uri": uri, "storage": "mirror", "workload": workload, "timeouts": timeouts()}
    src = {
        **common,
        "role": "source",
        "virtio": str(src_img),
        "mirror": mirror or {},
        "progress_file": str(tmp / "progress.jsonl"),
        "timeout": 15.0,
    }
    dst = {
        **common,
        "role": "destination",
        "virtio": str(dst_img),
        "ready_file": str(tmp / "ready"),
        "report_acked": True,
        "after": 0.3,
        "timeout": 15.0,
    }
    return src, dst, src_img, dst_img


def wait_progress(tmp: Path, fraction: float, timeout: float = 30.0) -> None:
    path = tmp / "progress.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            lines = path.read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
                if last["bytes_done"] >= fraction * last["bytes_total"]:
                    return
        time.sleep(0.02)
    raise AssertionError("the mirror made no progress")


def assert_discarded(dst_img: Path, size: int) -> None:
    """A failed migration leaves no partial copy: the destination image reads as zeroes."""
    assert os.path.getsize(dst_img) == size
    with open(dst_img, "rb") as f:
        for i in range(0, size, REGION):
            f.seek(i)
            assert f.read(4096) == bytes(4096), f"partial copy left at {i}"


def assert_source_intact(res: dict[str, Any], phase: str) -> None:
    assert res["ok"] is False, res
    assert "crash" not in res, res["crash"]
    assert res["error"]["phase"] == phase, res["error"]
    assert res["error"]["source_resumed"] is True, res["error"]
    assert res["running_after"] is True
    assert "guest_error" not in res, res.get("guest_error")
    # every acknowledged write reads back through the source's driver
    assert res["check"]["virtio"] > 0


# ---------------------------------------------------------------------- the happy path


def test_mirror_256mib_while_the_guest_writes(tmp_path: Path) -> None:
    size = 256 * MiB
    src, dst, src_img, dst_img = pair_cfg(tmp_path, size, rate=2 * MiB)
    with LockSampler([src_img, dst_img]) as sampler:
        d = start_peer(dst, tmp_path)
        wait_file(tmp_path / "ready")
        s = start_peer(src, tmp_path)
        rs, rd = s.result(180), d.result(180)
    assert rs.get("ok"), rs
    assert rd.get("ok"), rd
    rep, drep = rs["report"], rd["report"]
    assert rep["storage"] == "mirror" and drep["storage"] == "mirror"
    mirror = rep["mirror"]
    assert mirror["bytes_total"] >= size  # grows with what the dirty passes re-copy
    # the holes (odd regions) were not sent as data
    assert mirror["bytes_zero"] >= size // 2 - 16 * MiB, mirror
    assert mirror["bytes_copied"] <= size // 2 + 32 * MiB, mirror
    assert "final" in mirror and mirror["final"]["ms"] >= 0
    # the guest's own disk node on the destination: nothing read or written before activation
    assert set(drep["reads_before_activation"].values()) == {0}
    assert set(drep["writes_before_activation"].values()) == {0}
    assert drep["mirror"]["bytes_written"] > 0
    assert max(sampler.max_holders.values()) <= 1
    # the model: initial content + every acknowledged write (source's and destination's)
    acked = [(int(lba), int(seq)) for lba, seq in rd["acked"]["virtio"]]
    assert len(acked) > 100
    assert rd["check"]["virtio"] == len(acked)
    check_model(dst_img, size, acked)


# ---------------------------------------------------------------------- faults


FAULT_SIZE = 64 * MiB
SLOW = {"speed": 8 * MiB}  # about 4 s of copying: faults land mid-copy


def _start(tmp: Path, src: dict[str, Any], dst: dict[str, Any]) -> tuple[Any, Any]:
    d = start_peer(dst, tmp)
    wait_file(tmp / "ready")
    s = start_peer(src, tmp)
    return s, d


def test_destination_killed_mid_copy(tmp_path: Path) -> None:
    src, dst, _, _ = pair_cfg(tmp_path, FAULT_SIZE, rate=1 * MiB, mirror=SLOW)
    s, d = _start(tmp_path, src, dst)
    wait_progress(tmp_path, 0.2)
    d.proc.send_signal(signal.SIGKILL)
    rs = s.result(60)
    d.result(10)
    assert_source_intact(rs, "mirroring")


def test_network_stall_mid_copy(tmp_path: Path) -> None:
    src, dst, _, dst_img = pair_cfg(tmp_path, FAULT_SIZE, rate=1 * MiB, mirror=SLOW)
    src["mirror"] = {**SLOW, "nbd_timeout": 2.0}
    s, d = _start(tmp_path, src, dst)
    wait_progress(tmp_path, 0.2)
    d.proc.send_signal(signal.SIGSTOP)  # the destination host (and its NBD server) stalls
    try:
        rs = s.result(60)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    rd = d.result(60)
    assert_source_intact(rs, "mirroring")
    # the destination wakes up to a closed connection: it gives up and discards its copy
    assert rd["ok"] is False and rd["error"]["source_resumed"] is False
    assert rd["report"]["discarded"] if "report" in rd else True
    assert_discarded(dst_img, FAULT_SIZE)


def test_source_io_error_during_copy(tmp_path: Path) -> None:
    src, dst, _, dst_img = pair_cfg(tmp_path, FAULT_SIZE, rate=1 * MiB, mirror=SLOW)
    # the guest only writes: the reads of the source's storage are the mirror's
    src["fault"] = {"device": "virtio", "arm_at": "mirroring", "op": "read", "n": 5}
    s, d = _start(tmp_path, src, dst)
    rs, rd = s.result(60), d.result(60)
    assert_source_intact(rs, "mirroring")
    assert "I/O" in rs["error"]["message"] or "EIO" in rs["error"]["message"], rs["error"]
    assert rd["ok"] is False
    assert_discarded(dst_img, FAULT_SIZE)


def test_guest_write_error_during_copy(tmp_path: Path) -> None:
    """A write error the guest sees (IOERR) while the disk is being copied: that write is not
    acknowledged, the copy goes on, and the destination still matches the model."""
    size = 32 * MiB
    src, dst, _, dst_img = pair_cfg(tmp_path, size, rate=1 * MiB, mirror={"speed": 16 * MiB})
    src["fault"] = {"device": "virtio", "arm_at": "mirroring", "op": "write", "n": 3}
    s, d = _start(tmp_path, src, dst)
    rs, rd = s.result(60), d.result(60)
    assert rs.get("ok"), rs
    assert "IOERR" in rs.get("guest_error", "") or "status 1" in rs.get("guest_error", ""), rs
    assert rd.get("ok"), rd
    acked = [(int(lba), int(seq)) for lba, seq in rd["acked"]["virtio"]]
    check_model(dst_img, size, acked)


def test_cancel_mid_copy(tmp_path: Path) -> None:
    src, dst, _, dst_img = pair_cfg(tmp_path, FAULT_SIZE, rate=1 * MiB, mirror=SLOW)
    src["cancel_file"] = str(tmp_path / "cancel")
    s, d = _start(tmp_path, src, dst)
    wait_progress(tmp_path, 0.2)
    (tmp_path / "cancel").touch()
    rs, rd = s.result(60), d.result(60)
    assert_source_intact(rs, "mirroring")
    assert "cancel" in rs["error"]["message"]
    assert rd["ok"] is False
    assert_discarded(dst_img, FAULT_SIZE)


# ---------------------------------------------------------------------- in one process


def _machine(path: Path, *, active: bool, fmt: str = "raw") -> Machine:
    m = Machine()
    ram = blockemu.GuestMemory(1 << 20)
    m.add("ram", ram)
    node = blockemu.open_image(path, format=fmt, active=active)
    m.add("vblk0", blockemu.VirtioBlk(node, ram, queue_size=16))
    return m


def _threads(
    src_m: Machine, dst_m: Machine, uri: str, *, src_kw: Any = None, dst_kw: Any = None
) -> tuple[Any, Any]:
    out: dict[str, Any] = {}

    def dest() -> None:
        try:
            out["dst"] = incoming(
                dst_m, uri, timeout=20, timeouts=Timeouts(**timeouts()), **(dst_kw or {})
            )
        except Exception as e:
            out["dst"] = e

    t = threading.Thread(target=dest)
    t.start()
    try:
        out["src"] = migrate(
            src_m, uri, timeout=20, timeouts=Timeouts(**timeouts()), **(src_kw or {})
        )
    except Exception as e:
        out["src"] = e
    t.join(30)
    return out["src"], out["dst"]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_mirror_into_qcow2_or_raw_destination(tmp_path: Path, fmt: str) -> None:
    """The destination's image format is its own: a raw source mirrors into qcow2 too."""
    size = 32 * MiB
    make_source(tmp_path / "src.img", size)
    blockemu.create_image(tmp_path / "dst.img", size, format=fmt)
    src_m = _machine(tmp_path / "src.img", active=True)
    dst_m = _machine(tmp_path / "dst.img", active=False, fmt=fmt)
    src_m.start()
    seen: list[str] = []
    rs, rd = _threads(
        src_m,
        dst_m,
        uri_pair(tmp_path, "unix"),
        src_kw={
            "storage": "mirror",
            "verify": "full",
            "on_progress": lambda p: seen.append(format_progress(p)),
        },
        dst_kw={"storage": "mirror"},
    )
    assert isinstance(rs, dict), rs
    assert isinstance(rd, dict), rd
    assert seen and "MiB" in seen[-1]
    node = dst_m.nodes["vblk0"]
    assert node.active
    for i in range(size // REGION):
        want = initial_region(i) or bytes(REGION)
        assert node.read(i * REGION, REGION) == want
    dst_m.stop()
    node.close()
    if fmt == "qcow2":
        # a real peer agrees: same guest-visible content, and the qcow2 image is consistent
        qemu_img = require_tool("qemu-img")
        a, b = str(tmp_path / "src.img"), str(tmp_path / "dst.img")
        r = subprocess.run(
            [qemu_img, "compare", "-f", "raw", "-F", "qcow2", a, b], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run([qemu_img, "check", b], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_storage_modes_must_agree(tmp_path: Path) -> None:
    size = 8 * MiB
    make_source(tmp_path / "src.img", size)
    blockemu.create_image(tmp_path / "dst.img", size)
    src_m = _machine(tmp_path / "src.img", active=True)
    dst_m = _machine(tmp_path / "dst.img", active=False)
    src_m.start()
    rs, rd = _threads(
        src_m, dst_m, uri_pair(tmp_path, "unix"), src_kw={"storage": "mirror"}, dst_kw={}
    )
    assert isinstance(rs, blockemu.MigrationError) and rs.source_resumed
    assert "storage" in str(rs)
    assert src_m.running
    assert isinstance(rd, blockemu.MigrationError)


def test_mirror_arguments_are_checked(tmp_path: Path) -> None:
    m = Machine()
    with pytest.raises(ValueError):
        migrate(m, "tcp:127.0.0.1:1", storage="nfs")
    with pytest.raises(ValueError):
        migrate(m, "tcp:127.0.0.1:1", storage="mirror", records={"x": str(tmp_path / "r")})
    with pytest.raises(ValueError):
        incoming(m, "tcp:127.0.0.1:1", storage="copy")


def test_mirror_options_defaults() -> None:
    o = MirrorOptions()
    assert o.granularity == 64 << 10 and o.speed == 0 and o.converge_bytes == 1 << 20
