"""Crash consistency: a guest write workload with periodic flushes runs in a child process
(tests/crash_child.py) through the IDE disk or virtio-blk, on a raw or qcow2 image, and is
SIGKILLed at a random moment. Then:

- every write acknowledged before the last completed flush was issued is on the image, unless a
  write to the same sector issued after that acknowledgement (acknowledged or still in flight at
  the kill) may have replaced it: each sector must hold the last such write or one issued after
  it (a sector no covered write reached must read as zeroes or as one of the writes issued to
  it). Nothing else may appear anywhere on the disk. The check is per 512-byte sector because a
  multi-sector write in flight may be torn at the kill (IDE PIO commits each DRQ block).
- for qcow2, ``qemu-img check`` finds no corruption. Leaked clusters are accepted, and only as
  qemu-img reports them (exit code 3, ``leaks`` > 0, ``corruptions`` and ``check-errors`` 0):
  blockemu sets a new cluster's refcount before the L2 entry that points to it, so a kill in
  between leaves a cluster with refcount 1 and no reference — wasted space, never lost data.
  The image must then still open and take writes.
- for qcow2, blockemu reads back what qemu-img reads (``qemu-img convert``).

A SIGKILL keeps the host page cache, so this tests the emulator's own ordering (a completion
reported before the data reached the host, a flush that returned before the writes it covers,
metadata written in an order that corrupts the image), not the storage's durability.

Cache modes: ``writeback`` (flush is the only barrier) on every combination, and ``none``
(O_DIRECT) where the temporary directory's file system supports it (not tmpfs).
``CRASH_TRIALS=N`` runs N trials per combination instead of the default (10 with writeback, 4
with cache=none: 56 in all), ``CRASH_SEED=K`` picks another set of workloads (for soak runs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import blockemu

from peers import require_tool

CHILD = Path(__file__).with_name("crash_child.py")
SECTOR = 512
IMAGE_SIZE = 1 << 30  # sparse; 1 GiB spans two qcow2 L2 tables (64 KiB clusters)
KILL_AFTER = (0.020, 0.300)  # seconds after the child is ready
READY_TIMEOUT = 30.0
QEMU_IMG_LEAKS = 3  # qemu-img check's exit code for "leaked clusters, no corruption"

DEVICES = ["ide", "virtio"]
FORMATS = ["raw", "qcow2"]
# (cache mode, trials per device/format combination)
CACHES = [("writeback", 10), ("none", 4)]


@dataclass
class Write:
    id: int
    sector: int
    count: int
    issued: int  # log position of the "I" line
    acked: int | None = None  # log position of the "A" line


@dataclass
class Log:
    ready: bool = False
    writes: dict[int, Write] = field(default_factory=dict)
    flush_started: dict[int, int] = field(default_factory=dict)
    flush_done: dict[int, int] = field(default_factory=dict)

    @property
    def barrier(self) -> int:
        """Log position of the issue of the last completed flush (-1: none completed): every
        write acknowledged before it must be durable."""
        if not self.flush_done:
            return -1
        return self.flush_started[max(self.flush_done)]


def parse_log(text: str) -> Log:
    log = Log()
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines.pop()  # a record cut by the kill (each is one os.write, so this is defensive)
    for pos, line in enumerate(lines):
        if not line:
            continue
        kind, *args = line.split()
        nums = [int(a) for a in args]
        if kind == "R":
            log.ready = True
        elif kind == "I":
            wid, sector, count = nums
            log.writes[wid] = Write(wid, sector, count, pos)
        elif kind == "A":
            log.writes[nums[0]].acked = pos
        elif kind == "S":
            log.flush_started[nums[0]] = pos
        elif kind == "F":
            log.flush_done[nums[0]] = pos
        else:
            raise AssertionError(f"bad log line {line!r}")
    return log


def sector_pattern(write_id: int, sector: int) -> bytes:
    return struct.pack("<QQ", write_id, sector) * 32


def decode(sector: int, data: bytes) -> int | None:
    """Which write put ``data`` at ``sector``: its id, 0 for zeroes, None for anything else."""
    if data == bytes(SECTOR):
        return 0
    wid, sec = struct.unpack_from("<QQ", data)
    return wid if sec == sector and data == sector_pattern(wid, sector) else None


def allowed_per_sector(log: Log) -> dict[int, set[int]]:
    """For every sector a write was issued to: the write ids it may hold (0 = zeroes)."""
    barrier = log.barrier
    by_sector: dict[int, list[Write]] = {}
    for w in log.writes.values():
        for s in range(w.sector, w.sector + w.count):
            by_sector.setdefault(s, []).append(w)
    allowed: dict[int, set[int]] = {}
    for s, writes in by_sector.items():
        durable = [w for w in writes if w.acked is not None and w.acked < barrier]
        if durable:
            # Writes to one sector are never in flight together: the last acknowledged one is
            # the last issued one among them.
            last = max(durable, key=lambda w: w.acked or 0)
            assert last.acked is not None
            allowed[s] = {last.id} | {w.id for w in writes if w.issued > last.acked}
        else:
            allowed[s] = {0} | {w.id for w in writes}
    return allowed


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the file's data extents (SEEK_DATA / SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop - start))
            pos = stop
    return out


def verify_content(raw: Path, log: Log) -> list[str]:
    """Every violation of the durability model on the raw image ``raw``."""
    allowed = allowed_per_sector(log)
    problems: list[str] = []
    seen: set[int] = set()
    with open(raw, "rb") as f:
        fd = f.fileno()
        for off, length in data_extents(raw):
            data = os.pread(fd, length, off)
            first = off // SECTOR
            for i in range(len(data) // SECTOR):
                s = first + i
                got = decode(s, data[i * SECTOR : (i + 1) * SECTOR])
                seen.add(s)
                ok = allowed.get(s, {0})
                if got is None:
                    problems.append(f"sector {s}: bytes of no write")
                elif got not in ok:
                    problems.append(f"sector {s}: holds write {got}, expected one of {sorted(ok)}")
    for s, ok in allowed.items():
        if s not in seen and 0 not in ok:  # a hole reads as zeroes
            problems.append(f"sector {s}: zeroes (a hole), expected one of {sorted(ok)}")
    return problems


def o_direct_works(directory: Path) -> bool:
    probe = directory / "odirect.probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        return True
    finally:
        os.close(fd)
        probe.unlink()


def run_child(device: str, image: Path, cache: str, seed: int, delay: float) -> tuple[str, str]:
    """Runs the workload, kills it ``delay`` s after it is ready; returns (log, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), device, str(image), cache, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    chunks: list[bytes] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        while True:
            b = os.read(proc.stdout.fileno(), 1 << 16)
            if not b:
                break
            chunks.append(b)
            if not ready.is_set() and b"R\n" in b"".join(chunks[:4]):
                ready.set()
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not ready.wait(READY_TIMEOUT):
            raise AssertionError("the child did not get ready")
        if proc.poll() is None:
            time.sleep(delay)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t.join(10)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.stdout.close()
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"the child ended by itself ({proc.returncode}): {err}")
    return b"".join(chunks).decode(), err


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("qemu-img"), *args], capture_output=True, text=True, timeout=60
    )


def check_qcow2(image: Path) -> dict[str, Any]:
    """qemu-img check: no corruption; leaks accepted when qemu-img calls them leaks."""
    r = qemu_img("check", "--output=json", str(image))
    assert r.returncode in (0, QEMU_IMG_LEAKS), (r.returncode, r.stdout, r.stderr)
    report = json.loads(r.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    leaks = int(report.get("leaks", 0))
    assert (leaks > 0) == (r.returncode == QEMU_IMG_LEAKS), report
    return report


def trial(tmp: Path, device: str, fmt: str, cache: str, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    image = tmp / f"t{seed}.{fmt}"
    blockemu.create_image(image, IMAGE_SIZE, format=fmt)
    delay = rng.uniform(*KILL_AFTER)
    text, err = run_child(device, image, cache, seed, delay)
    log = parse_log(text)
    assert log.ready, err
    stats: dict[str, int] = {
        "writes": len(log.writes),
        "acked": sum(w.acked is not None for w in log.writes.values()),
        "flushes": len(log.flush_done),
        "in_flight": sum(w.acked is None for w in log.writes.values()),
    }
    if fmt == "raw":
        raw = image
    else:
        report = check_qcow2(image)
        stats["leaks"] = int(report.get("leaks", 0))
        raw = tmp / f"t{seed}.raw"
        r = qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
        assert r.returncode == 0, r.stderr
    problems = verify_content(raw, log)
    assert not problems, (
        f"{device}/{fmt}/{cache} seed {seed}, killed {delay * 1000:.0f} ms after ready, "
        f"{stats}: " + "; ".join(problems[:10])
    )
    if fmt == "qcow2":
        # blockemu reads what qemu-img reads, and the image takes writes again.
        with open(raw, "rb") as f, blockemu.open_image(image) as node:
            for w in list(log.writes.values())[-20:]:
                off, n = w.sector * SECTOR, w.count * SECTOR
                assert node.read(off, n) == os.pread(f.fileno(), n, off)
            node.write(IMAGE_SIZE - SECTOR, sector_pattern(1 << 40, IMAGE_SIZE // SECTOR - 1))
            node.flush()
        check_qcow2(image)
        raw.unlink()
    image.unlink()
    return stats


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("cache", "trials"), CACHES, ids=[c for c, _ in CACHES])
def test_sigkill_keeps_flushed_writes(
    tmp_path: Path, device: str, fmt: str, cache: str, trials: int
) -> None:
    if fmt == "qcow2":
        require_tool("qemu-img")
    if cache == "none" and not o_direct_works(tmp_path):
        pytest.skip(f"O_DIRECT is not supported on {tmp_path} (tmpfs?)")
    trials = int(os.environ.get("CRASH_TRIALS", trials))
    base = {"ide": 1000, "virtio": 2000}[device] + {"raw": 0, "qcow2": 500}[fmt]
    base += 0 if cache == "writeback" else 100_000
    base += int(os.environ.get("CRASH_SEED", 0)) * 1_000_000
    start = time.monotonic()
    results = [trial(tmp_path, device, fmt, cache, base + i) for i in range(trials)]
    elapsed = time.monotonic() - start
    assert sum(r["flushes"] for r in results) > 0
    print(
        f"\n{device}/{fmt}/{cache}: {trials} trials in {elapsed:.1f} s; "
        f"writes {sum(r['writes'] for r in results)}, "
        f"flushes {sum(r['flushes'] for r in results)}, "
        f"in flight at the kill {sum(r['in_flight'] for r in results)}, "
        f"trials with leaks {sum(1 for r in results if r.get('leaks'))}"
    )


# ------------------------------------------------------------------ the model itself


def test_model_accepts_later_writes_and_rejects_lost_ones() -> None:
    text = "\n".join(
        [
            "R",
            "I 1 10 2",
            "A 1",
            "I 2 11 1",
            "A 2",
            "S 1",
            "F 1",
            "I 3 10 1",  # in flight at the kill: may or may not have landed
            "",
        ]
    )
    log = parse_log(text)
    allowed = allowed_per_sector(log)
    assert allowed == {10: {1, 3}, 11: {2}}
    # Nothing flushed: zeroes or any issued write.
    log2 = parse_log("R\nI 1 5 1\nA 1\nS 1\n")
    assert allowed_per_sector(log2) == {5: {0, 1}}


def test_verify_finds_a_lost_write(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    blockemu.create_image(raw, 1 << 20)
    log = parse_log("R\nI 1 3 2\nA 1\nS 1\nF 1\n")
    assert verify_content(raw, log) == [
        "sector 3: zeroes (a hole), expected one of [1]",
        "sector 4: zeroes (a hole), expected one of [1]",
    ]
    with open(raw, "r+b") as f:
        f.seek(3 * SECTOR)
        f.write(sector_pattern(1, 3) + sector_pattern(1, 5))
        f.seek(9 * SECTOR)
        f.write(b"x")
    assert verify_content(raw, log) == [
        "sector 4: bytes of no write",
        "sector 9: bytes of no write",
    ]
