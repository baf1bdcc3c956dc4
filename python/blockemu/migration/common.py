"""What both sides of the coordinator share: URIs, timeouts, the phase log, test kill points and
the witness blocks that let the destination check it sees what the source flushed."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from blockemu._core import BlockNode, IdeChannel, VirtioBlk
from blockemu.errors import MigrationError

if TYPE_CHECKING:
    from blockemu.machine import Machine

__all__ = [
    "INSTANCE_ID",
    "KILL_ENV",
    "Phases",
    "Timeouts",
    "connect",
    "kill_point",
    "listen",
    "parse_uri",
    "witnesses",
]

#: This process's identity in ownership records.
INSTANCE_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

#: Test-only hook: ``BLOCKEMU_MIGRATION_KILL_AT=<side>:<point>`` makes the coordinator SIGKILL its
#: own process at that point (points are listed in the package docs).
KILL_ENV = "BLOCKEMU_MIGRATION_KILL_AT"

WITNESS_BLOCK = 4096
HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Timeouts:
    """The protocol's timers in seconds (specs/migration.md §12.5). Each wait is also cut to
    what is left of the whole migration's ``timeout``. Expiry only ever moves a side to a safer
    state: a source never resumes because of a timeout after SOURCE_INACTIVE."""

    connect: float = 10.0  # connect + HELLO round trip (including the destination's prepare)
    prepare: float = 60.0
    stop: float = 30.0
    state_loaded: float = 30.0  # source waiting for STATE_LOADED
    peer_silence: float = 3.0  # a gap in the state stream that means the peer is gone
    wait_inactive: float = 30.0  # destination waiting for SOURCE_INACTIVE
    activate: float = 30.0  # source waiting for DEST_ACTIVATED
    commit: float = 10.0  # source waiting for DEST_COMMITTED
    lock: float = 10.0  # lock acquisition retries (activation, reclaim)
    commit_ack: float = 2.0  # destination waiting (informationally) for COMMIT_ACK
    in_doubt: float = 30.0  # how long an in-doubt source keeps trying to settle
    # Switchover heartbeat: from STATE_LOADED to the end each side sends PING every
    # heartbeat_interval (and answers PING with PONG); no frame for peer_dead = peer loss.
    heartbeat_interval: float = 0.5
    peer_dead: float = 3.0
    # storage="mirror": how long the copy may take to converge (the guest runs meanwhile);
    # the heartbeat runs from HELLO_ACK on, so a lost peer is noticed in peer_dead
    mirror: float = 3600.0

    def scaled(self, factor: float) -> Timeouts:
        return replace(self, **{k: v * factor for k, v in self.__dict__.items()})


def parse_uri(uri: str) -> tuple[str, Any]:
    """``tcp:HOST:PORT`` → ``("tcp", (host, port))``; ``unix:PATH`` → ``("unix", path)``."""
    kind, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ValueError(f"migration URI {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        return "unix", rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"migration URI {uri!r}: expected tcp:HOST:PORT")
        return "tcp", (host.strip("[]") or "0.0.0.0", int(port))
    raise ValueError(f"migration URI {uri!r}: unknown transport {kind!r} (tcp or unix)")


def connect(uri: str, timeout: float) -> socket.socket:
    """Connects, retrying refused connections until ``timeout`` (the destination may still be
    getting ready)."""
    kind, addr = parse_uri(uri)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            info = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            addr = info[4]
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            sock.connect(addr)
            return sock
        except (ConnectionRefusedError, FileNotFoundError) as e:
            sock.close()
            if time.monotonic() + delay >= deadline:
                raise TimeoutError(f"could not connect to {uri}: {e}") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        except OSError:
            sock.close()
            raise


def listen(uri: str) -> socket.socket:
    kind, addr = parse_uri(uri)
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(addr):
                import stat

                if stat.S_ISSOCK(os.stat(addr).st_mode):
                    os.unlink(addr)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    else:
        info = socket.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(info[4])
        except OSError:
            sock.close()
            raise
    sock.listen(1)
    return sock


def kill_point(name: str) -> None:
    """SIGKILLs this process when :data:`KILL_ENV` names ``name`` (tests only)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Phases:
    """The phase log of a report: name, wall-clock start/end, duration."""

    def __init__(self, on_phase: Callable[[str], None] | None = None) -> None:
        self.items: list[dict[str, Any]] = []
        self.current = "init"
        self._on_phase = on_phase

    def enter(self, name: str) -> None:
        now = time.time()
        if self.items and "end" not in self.items[-1]:
            self._close(now)
        self.items.append({"name": name, "start": now})
        self.current = name
        if self._on_phase is not None:
            self._on_phase(name)

    def _close(self, now: float) -> None:
        item = self.items[-1]
        item["end"] = now
        item["duration_ms"] = round((now - item["start"]) * 1000, 3)

    def finish(self) -> list[dict[str, Any]]:
        if self.items and "end" not in self.items[-1]:
            self._close(time.time())
        return self.items


class Deadline:
    def __init__(self, total: float) -> None:
        self.end = time.monotonic() + total

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def cap(self, timer: float) -> float:
        return min(timer, self.left())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def witnesses(node: BlockNode, *, full: bool = False, extra: Sequence[int] = ()) -> dict[str, Any]:
    """What the source reports about an image after its final flush: size, the digest of the
    header area (first 64 KiB) and of witness blocks (4 KiB each: sector 0's block, the last
    written blocks in ``extra``, and blocks spread over the image); with ``full`` the digest of
    the whole image. Reads an active node only."""
    size = node.size or 0
    info: dict[str, Any] = {"size": size, "format": node.format}
    if not node.active:
        return info  # an inactive source (a paused, migrated VM) reads nothing
    info["header"] = _sha(node.read(0, min(HEADER_BYTES, size)))
    blocks = {0}
    for off in extra:
        blocks.add(off - off % WITNESS_BLOCK)
    nblocks = size // WITNESS_BLOCK
    if nblocks:
        for i in range(8):
            blocks.add((nblocks - 1) * i // 7 * WITNESS_BLOCK)
    wit = []
    for off in sorted(b for b in blocks if b < size)[:64]:
        n = min(WITNESS_BLOCK, size - off)
        wit.append([off, n, _sha(node.read(off, n))])
    info["witnesses"] = wit
    if full:
        h = hashlib.sha256()
        step = 1 << 20
        for off in range(0, size, step):
            h.update(node.read(off, min(step, size - off)))
        info["full"] = h.hexdigest()
    return info


def verify(node: BlockNode, expected: dict[str, Any]) -> str | None:
    """Compares what an activated destination reads with the source's report; returns the
    first mismatch, or None."""
    size = node.size
    if size is not None and expected.get("size") is not None and size != expected["size"]:
        return f"size {size} != {expected['size']}"
    size = size or 0
    if "header" in expected:
        if _sha(node.read(0, min(HEADER_BYTES, size))) != expected["header"]:
            return "header digest differs"
    for off, n, digest in expected.get("witnesses", []):
        if not (0 <= off < size and 0 < n <= WITNESS_BLOCK and off + n <= size):
            return f"witness block {off}+{n} outside the image"
        if _sha(node.read(off, n)) != digest:
            return f"witness block at {off} differs (stale or changed storage)"
    if "full" in expected:
        h = hashlib.sha256()
        step = 1 << 20
        for off in range(0, size, step):
            h.update(node.read(off, min(step, size - off)))
        if h.hexdigest() != expected["full"]:
            return "image digest differs"
    return None


def fail(message: str, phase: str, resumed: bool) -> MigrationError:
    return MigrationError(message, phase=phase, source_resumed=resumed)


def geometry_of(machine: Machine) -> dict[str, Any]:
    """The geometry each disk of ``machine`` has now, ``[c, h, s, trans]`` or None."""
    out: dict[str, Any] = {}
    for name, dev in machine.devices.items():
        geos = []
        if isinstance(dev, IdeChannel):
            for slot in ("master", "slave"):
                disk = getattr(dev, slot)
                if disk is not None:
                    geos.append((f"{name}.{slot}", disk.geometry))
        elif isinstance(dev, VirtioBlk):
            geos.append((name, dev.geometry))
        for key, g in geos:
            out[key] = None if g is None else [g.cyls, g.heads, g.secs, g.trans]
    return out
