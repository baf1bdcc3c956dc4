"""Helpers of the migration tests: two peer processes, a frame-aware socket proxy, an OFD lock
sampler that watches from a third process (this one), and checks of acknowledged writes."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blockemu
from blockemu.guest import pattern
from blockemu.migration.frames import HEADER, TRAILER, Msg

HERE = Path(__file__).resolve().parent
PEER = HERE / "migration_peer.py"

#: Short protocol timers so fault scenarios end quickly.
FAST = {
    "connect": 3.0,
    "prepare": 3.0,
    "stop": 3.0,
    "state_loaded": 3.0,
    "peer_silence": 1.0,
    "wait_inactive": 1.5,
    "activate": 1.5,
    "commit": 1.5,
    "lock": 1.0,
    "commit_ack": 0.5,
    "in_doubt": 1.5,
    "heartbeat_interval": 0.1,
    "peer_dead": 1.5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_disk(path: Path, size: int = 2 << 20) -> Path:
    blockemu.create_image(path, size)
    return path


# ---------------------------------------------------------------------- OFD lock sampling

F_OFD_GETLK = 36


def write_lock_held(path: Path) -> bool:
    """Whether any process holds QEMU's write-permission byte (101) of ``path``: F_OFD_GETLK
    for an exclusive lock on it, from this (third) process."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        lk = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 101, 1, 0)
        res = fcntl.fcntl(fd, F_OFD_GETLK, lk)
        return bool(struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def lock_holders(path: Path, byte: int = 101) -> set[int]:
    """The pids (as /proc/locks reports them) holding an OFD lock over ``byte`` of ``path``."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:
                continue
            if len(parts) >= 8 and parts[1] == "OFDLCK" and parts[5] == dev:
                start, end = int(parts[6]), parts[7]
                stop = 1 << 62 if end == "EOF" else int(end)
                if start <= byte <= stop:
                    out.add(int(parts[4]))
    return out


@dataclass
class LockSampler:
    """Samples the write-lock holders of images until stopped (INV-3)."""

    paths: list[Path]
    interval: float = 0.002
    max_holders: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> LockSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.paths:
                try:
                    n = len(lock_holders(p))
                except OSError:
                    continue
                self.max_holders[p.name] = max(self.max_holders.get(p.name, 0), n)
            self.samples += 1
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


# ---------------------------------------------------------------------- peers


@dataclass
class Peer:
    proc: subprocess.Popen[str]
    cfg_path: Path

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            return {"killed": True, "returncode": self.proc.returncode, "stderr": err[-3000:]}
        try:
            res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(f"peer printed no JSON: {out!r} {err[-3000:]}") from None
        res["stderr"] = err[-3000:]
        return res


def start_peer(
    cfg: dict[str, Any],
    tmp: Path,
    env: dict[str, str] | None = None,
    wrap: list[str] | None = None,
) -> Peer:
    path = tmp / f"{cfg['role']}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    e = dict(os.environ)
    e.pop("BLOCKEMU_MIGRATION_KILL_AT", None)
    e.update(env or {})
    proc = subprocess.Popen(
        [*(wrap or []), sys.executable, str(PEER), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )
    return Peer(proc, path)


def wait_file(path: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def uri_pair(tmp: Path, transport: str) -> str:
    if transport == "tcp":
        return f"tcp:127.0.0.1:{free_port()}"
    return f"unix:{tmp / f'mig-{time.monotonic_ns()}.sock'}"


# ---------------------------------------------------------------------- the frame-aware proxy


class Proxy:
    """Forwards one connection from ``listen_uri`` to ``target_uri``, frame by frame, and applies
    ``rule(direction, frame_type, index, raw) -> action`` to each frame. ``direction`` is "s2d" or
    "d2s". Actions: "pass", "drop_rest" (swallow this and everything after in both directions:
    a partition), "close" (reset both connections before this frame), "truncate" (send half of
    this frame, then close), "corrupt" (flip a payload byte), "duplicate" (send it twice),
    ("replace", bytes) (send these bytes instead)."""

    def __init__(
        self,
        listen_uri: str,
        target_uri: str,
        rule: Callable[[str, int, int, bytes], Any],
        *,
        cut_s2d_after: int | None = None,
    ) -> None:
        from blockemu.migration.common import connect, listen

        self.target_uri = target_uri
        self.rule = rule
        self.cut = cut_s2d_after
        self.s2d_bytes = 0
        self.server = listen(listen_uri)
        self._connect = connect
        self.log: list[tuple[str, str]] = []
        self.partitioned = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.server.settimeout(30)
        try:
            a, _ = self.server.accept()
        except OSError:
            return
        b = self._connect(self.target_uri, 10)
        t1 = threading.Thread(target=self._pump, args=(a, b, "s2d"), daemon=True)
        t2 = threading.Thread(target=self._pump, args=(b, a, "d2s"), daemon=True)
        t1.start()
        t2.start()
        t1.join()
        t2.join()
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def _read_exact(self, s: socket.socket, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = s.recv(n - len(buf))
            except OSError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        index = 0
        while True:
            head = self._read_exact(src, HEADER.size)
            if head is None:
                break
            length = struct.unpack(">I", head[-4:])[0]
            if length > 2 << 20:
                break
            rest = self._read_exact(src, length + TRAILER.size)
            if rest is None:
                break
            raw = head + rest
            mtype = struct.unpack(">H", head[6:8])[0]
            index += 1
            if self.partitioned.is_set():
                continue
            action = self.rule(direction, mtype, index, raw)
            name = Msg(mtype).name if mtype in Msg._value2member_map_ else str(mtype)
            self.log.append((direction, f"{name}:{action if isinstance(action, str) else 'x'}"))
            if direction == "s2d" and self.cut is not None:
                if self.s2d_bytes + len(raw) > self.cut:
                    try:
                        dst.sendall(raw[: self.cut - self.s2d_bytes])
                    except OSError:
                        pass
                    self.log.append((direction, f"cut after {self.cut} bytes"))
                    break
                self.s2d_bytes += len(raw)
            try:
                if action == "pass":
                    dst.sendall(raw)
                elif action == "drop_rest":
                    self.partitioned.set()
                    continue
                elif action == "close":
                    break
                elif action == "truncate":
                    dst.sendall(raw[: len(raw) // 2])
                    break
                elif action == "corrupt":
                    bad = bytearray(raw)
                    bad[HEADER.size + min(length, 3) - 1 if length else 5] ^= 0x40
                    dst.sendall(bytes(bad))
                elif action == "duplicate":
                    dst.sendall(raw + raw)
                elif isinstance(action, tuple) and action[0] == "replace":
                    dst.sendall(action[1])
            except OSError:
                break
        if not self.partitioned.is_set():
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.closed.set()

    def close(self) -> None:
        try:
            self.server.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- checks


def read_ack_log(path: Path) -> dict[str, dict[int, int]]:
    acked: dict[str, dict[int, int]] = {"ide": {}, "virtio": {}}
    if not path.exists():
        return acked
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a line cut by SIGKILL
        dev, lba, seq = parts[0], int(parts[1]), int(parts[2])
        acked[dev][lba] = max(seq, acked[dev].get(lba, -1))
    return acked


def check_acked_on_images(acked: dict[str, dict[int, int]], images: dict[str, Path]) -> int:
    """Every acknowledged write (or a later write to the same sector) is on the image (INV-5).
    Reads the image files directly."""
    n = 0
    for dev, m in acked.items():
        if not m:
            continue
        with open(images[dev], "rb") as f:
            for lba, seq in m.items():
                f.seek(lba * 512)
                got = f.read(512)
                assert got[:8] == b"BLKEMU-W", f"{dev} sector {lba}: no workload data"
                found = struct.unpack("<Q", got[8:16])[0]
                assert found >= seq, f"{dev} sector {lba}: acked write {seq} lost (has {found})"
                if found == seq:
                    assert got == pattern(dev, seq, lba)
                n += 1
    return n
