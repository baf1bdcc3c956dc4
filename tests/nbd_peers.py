"""NBD servers for the tests and the benchmark: a real qemu-nbd, and a tiny scripted server in
Python that can misbehave (hostile replies, stalls) and records every command it receives."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNKNOWN = (1 << 31) | 6
# HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES
FLAGS = 1 | 4 | 32 | 64


def short_dir() -> Path:
    """A directory whose paths fit in a sockaddr_un."""
    return Path(tempfile.mkdtemp(prefix="bnbd-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QemuNbd:
    """A qemu-nbd serving one raw image (forked; stopped by its pid, never by name)."""

    def __init__(
        self,
        qemu_nbd: str,
        image: Path,
        *,
        export: str = "exp",
        tcp: bool = False,
        readonly: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.dir = short_dir()
        self.export = export
        pidfile = self.dir / "pid"
        args = [qemu_nbd, "--fork", "--persistent", "--shared=8", "-f", "raw", "-x", export]
        args += ["--pid-file", str(pidfile), *extra]
        if readonly:
            args.append("-r")
        if tcp:
            self.port = free_port()
            args += ["-b", "127.0.0.1", "-p", str(self.port)]
            self.uri = f"nbd://127.0.0.1:{self.port}/{export}"
        else:
            self.socket = self.dir / "s.sock"
            args += ["-k", str(self.socket)]
            self.uri = f"nbd+unix:///{export}?socket={self.socket}"
        args.append(str(image))
        subprocess.run(args, check=True, timeout=30)
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd wrote no pid file")
            time.sleep(0.01)
        self.pid = int(pidfile.read_text())
        self.alive = True

    def uri_for(self, export: str) -> str:
        return self.uri.replace(f"/{self.export}", f"/{export}", 1)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state == "Z":  # dead; reaped by whoever adopted the forked server
                return
            time.sleep(0.01)


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client went away")
        buf += chunk
    return buf


class FakeNbd:
    """A scripted NBD server on a Unix socket serving `size` bytes from memory.

    It runs on Python threads: close the nodes connected to it explicitly (`close()` releases
    the GIL; a node dropped by the garbage collector flushes with the GIL held, and this server
    could then only answer after the client's timeout).

    `mode` picks a misbehaviour: "good", "bad_magic" (greeting), "huge_option" (an option
    reply claiming 4 GiB), "unknown_export", "bad_reply_magic", "wrong_cookie", "truncated"
    (half a read payload, then close), "close_mid" (reads the request, then closes),
    "silent" (never answers a command).
    """

    def __init__(self, mode: str = "good", size: int = 1 << 20, flags: int = FLAGS) -> None:
        self.mode = mode
        self.size = size
        self.flags = flags
        self.data = bytearray(size)
        self.commands: list[tuple[int, int, int]] = []
        self.handshakes = 0
        self.dir = short_dir()
        self.path = self.dir / "fake.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(8)
        self.uri = f"nbd+unix:///exp?socket={self.path}"
        self.stopping = False
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        for c in self.conns:
            c.close()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _opt_reply(self, conn: socket.socket, rtype: int, payload: bytes) -> None:
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, rtype, len(payload)) + payload)

    def _client(self, conn: socket.socket) -> None:
        try:
            self._handshake_and_serve(conn)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()

    def _handshake_and_serve(self, conn: socket.socket) -> None:
        magic = NBDMAGIC ^ 1 if self.mode == "bad_magic" else NBDMAGIC
        conn.sendall(struct.pack(">QQH", magic, IHAVEOPT, 3))
        _recv(conn, 4)
        _, _opt, length = struct.unpack(">QII", _recv(conn, 16))
        _recv(conn, length)
        if self.mode == "huge_option":
            conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, OPT_GO, REP_INFO, 0xFFFFFFF0))
            conn.sendall(b"\0" * 64)
            time.sleep(1)
            return
        if self.mode == "unknown_export":
            self._opt_reply(conn, REP_ERR_UNKNOWN, b"no such export")
            _recv(conn, 16)  # NBD_OPT_ABORT
            return
        self._opt_reply(conn, REP_INFO, struct.pack(">HQH", 0, self.size, self.flags))
        self.handshakes += 1
        self._opt_reply(conn, REP_ACK, b"")
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", _recv(conn, 28))
            assert magic == REQUEST_MAGIC
            self.commands.append((cmd, offset, length))
            payload = _recv(conn, length) if cmd == 1 else b""
            if cmd == 2:
                return
            if self.mode == "silent":
                time.sleep(3600)
            if self.mode == "close_mid":
                time.sleep(0.2)
                return
            rmagic = 0x12345678 if self.mode == "bad_reply_magic" else SIMPLE_REPLY_MAGIC
            rcookie = cookie + 1 if self.mode == "wrong_cookie" else cookie
            head = struct.pack(">IIQ", rmagic, 0, rcookie)
            if cmd == 0:
                body = bytes(self.data[offset : offset + length])
                if self.mode == "truncated":
                    conn.sendall(head + body[: length // 2])
                    return
                conn.sendall(head + body)
                continue
            if cmd == 1:
                self.data[offset : offset + length] = payload
            elif cmd in (4, 6):
                self.data[offset : offset + length] = bytes(length)
            conn.sendall(head)
