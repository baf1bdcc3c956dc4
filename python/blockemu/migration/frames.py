"""The migration protocol's framing (specs/migration.md §12.1).

One frame::

    magic "BLKM" (4) | version u16 | type u16 | session id (16) | epoch u64 | seq u64
    | payload length u32 | payload | crc32 u32

big-endian. The CRC is ``zlib.crc32`` (CRC-32/ISO-HDLC, not CRC-32C) over everything before it.
Control payloads are JSON objects; ``DEVICE_STATE`` payloads are raw bytes of the device state.
Every payload is bounded (:data:`MAX_CONTROL`, :data:`MAX_CHUNK`): the stream is hostile, and a
length field never makes a receiver allocate more than the bound.

Parsing and checking a frame (magic, version, known type, bound, CRC) is the Rust core's
(``blockemu_core::migration::frame``, fuzzed by ``fuzz/fuzz_targets/migration_frame.rs``),
reached through ``blockemu._core.decode_frame_header``, ``check_frame`` and ``frame_crc``.

A :class:`Channel` sends frames with increasing sequence numbers and checks incoming frames: magic,
version, CRC, known type, session id, epoch (never older than the one it knows), and the sequence
(exactly one more than the last). Any violation raises :class:`ProtocolError`; a rejected frame
aborts the session and is never repaired.

Heartbeats (§12.5): :meth:`Channel.start_heartbeat` sends a ``PING`` (payload: the last sequence
number seen) every interval from a background thread. They are ordinary frames: sending is
serialized with the coordinator's own frames, so sequence numbers stay gapless.
:meth:`Channel.silence` is how long ago the last whole frame arrived; the coordinators answer
``PING`` with ``PONG`` and treat a silence of ``Timeouts.peer_dead`` as the peer's loss.
"""

from __future__ import annotations

import enum
import json
import select
import socket
import struct
import threading
import time
from typing import Any

from blockemu import _core

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_CHUNK",
    "MAX_CONTROL",
    "PROTO_VERSION",
    "Channel",
    "Frame",
    "Msg",
    "PeerLost",
    "PeerTimeout",
    "ProtocolError",
    "decode_header",
    "encode_frame",
]

MAGIC = b"BLKM"
PROTO_VERSION = 1
HEADER = struct.Struct(">4sHH16sQQI")
TRAILER = struct.Struct(">I")
MAX_CONTROL = 64 * 1024
MAX_CHUNK = 1024 * 1024


class Msg(enum.IntEnum):
    HELLO = 1
    HELLO_ACK = 2  # the destination accepted and prepared (HELLO_ACK = HELLO_ACK + PREPARED)
    REFUSE = 3
    PREPARE_FAILED = 4
    DEVICE_STATE = 5
    DEVICE_STATE_DONE = 6
    STATE_LOADED = 7
    LOAD_FAILED = 8
    SOURCE_INACTIVE = 9
    DEST_ACTIVATED = 10
    DEST_ACTIVATION_FAILED = 11
    DEST_COMMITTED = 12
    COMMIT_ACK = 13
    ABORT = 14
    ABORT_ACK = 15
    PING = 16
    PONG = 17


class ProtocolError(Exception):
    """A frame that must abort the session (bad magic, CRC, bounds, session, epoch, sequence)."""


class PeerLost(Exception):
    """The connection closed, reset, or stayed silent past a deadline."""


class PeerTimeout(PeerLost):
    """Nothing (or not a whole frame) arrived before the deadline; the connection is intact and
    a partial frame stays buffered."""


class Frame:
    __slots__ = ("epoch", "payload", "seq", "session", "type", "version")

    def __init__(
        self, type: Msg, session: bytes, epoch: int, seq: int, payload: bytes, version: int
    ) -> None:
        self.type = type
        self.session = session
        self.epoch = epoch
        self.seq = seq
        self.payload = payload
        self.version = version

    def json(self) -> dict[str, Any]:
        try:
            obj = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"{self.type.name}: payload is not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.type.name}: payload is not a JSON object")
        return obj

    def __repr__(self) -> str:
        return f"<Frame {self.type.name} epoch={self.epoch} seq={self.seq} {len(self.payload)}B>"


def _limit(msg: int) -> int:
    return MAX_CHUNK if msg == Msg.DEVICE_STATE else MAX_CONTROL


def encode_frame(
    msg: Msg,
    session: bytes,
    epoch: int,
    seq: int,
    payload: bytes,
    *,
    version: int = PROTO_VERSION,
) -> bytes:
    if len(session) != 16:
        raise ValueError("session id is 16 bytes")
    if len(payload) > _limit(msg):
        raise ValueError(f"{msg.name} payload of {len(payload)} bytes is over the bound")
    head = HEADER.pack(MAGIC, version, int(msg), session, epoch, seq, len(payload))
    return head + payload + TRAILER.pack(_core.frame_crc(head, payload))


def decode_header(head: bytes) -> tuple[int, int, bytes, int, int, int]:
    """Checks a header's magic, version, type and length bound; returns
    ``(version, type, session, epoch, seq, length)``; :class:`ProtocolError` names the first
    check that fails."""
    return _core.decode_frame_header(head)


class Channel:
    """Framed messages over a connected stream socket, for one session.

    ``session`` is fixed by the first frame received when None (the destination learns it from
    HELLO). ``epoch`` is the ownership epoch this side knows; frames with an older one are
    rejected. ``bytes_sent``/``bytes_received`` count every byte on the wire.
    """

    def __init__(self, sock: socket.socket, *, session: bytes | None, epoch: int = 0) -> None:
        self.sock = sock
        self.session = session
        self.epoch = epoch
        self.send_seq = 0
        self.recv_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.closed = False
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.last_recv = time.monotonic()
        self.pings_sent = 0
        self._hb_stop = threading.Event()
        self._hb_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ heartbeats

    @property
    def heartbeat(self) -> bool:
        """Whether the heartbeat runs."""
        return self._hb_thread is not None

    def silence(self) -> float:
        """Seconds since the last whole frame arrived (or since the heartbeat started)."""
        return time.monotonic() - self.last_recv

    def start_heartbeat(self, interval: float) -> None:
        """Sends PING every ``interval`` seconds until :meth:`stop_heartbeat` or :meth:`close`.
        The silence is counted from now on."""
        if self._hb_thread is not None or self.closed:
            return
        self.last_recv = max(self.last_recv, time.monotonic())
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(
            target=self._beat, args=(max(0.01, interval),), name="migration-heartbeat", daemon=True
        )
        self._hb_thread.start()

    def stop_heartbeat(self) -> None:
        thread = self._hb_thread
        if thread is None:
            return
        self._hb_stop.set()
        if thread is not threading.current_thread():
            thread.join(5.0)
        self._hb_thread = None

    def _beat(self, interval: float) -> None:
        while not self._hb_stop.wait(interval):
            if self.closed:
                return
            try:
                # never block behind a full socket buffer: a peer that does not read misses
                # this beat, and the next one is tried an interval later
                _, writable, _ = select.select([], [self.sock], [], 0)
                if not writable:
                    continue
                self.send(Msg.PING, {"seq": self.recv_seq})
                self.pings_sent += 1
            except (PeerLost, OSError, ValueError):
                return

    def pong(self, ping: Frame) -> None:
        """Answers a PING (best effort)."""
        if ping.type == Msg.PING:
            try:
                self.send(Msg.PONG, {"seq": self.recv_seq})
            except (PeerLost, OSError):
                pass

    # ------------------------------------------------------------------ sending

    def send(self, msg: Msg, payload: dict[str, Any] | bytes | None = None) -> None:
        if self.session is None:
            raise RuntimeError("no session yet")
        if payload is None:
            payload = {}
        raw = (
            payload
            if isinstance(payload, bytes)
            else json.dumps(payload, separators=(",", ":")).encode()
        )
        with self._send_lock:
            data = encode_frame(msg, self.session, self.epoch, self.send_seq + 1, raw)
            try:
                self.sock.sendall(data)
            except OSError as e:
                raise PeerLost(f"sending {msg.name}: {e}") from e
            finally:
                # a frame that may have been partly sent used its number: never reuse it
                self.send_seq += 1
            self.bytes_sent += len(data)

    def try_send(self, msg: Msg, payload: dict[str, Any] | None = None) -> bool:
        """Sends if it can (best effort, for ABORT and final acks)."""
        try:
            self.sock.settimeout(1.0)
            self.send(msg, payload)
            return True
        except (PeerLost, OSError):
            return False

    # ------------------------------------------------------------------ receiving

    def _fill(self, n: int, deadline: float) -> None:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout("timed out waiting for the peer")
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(max(65536, n - len(self._buf)))
            except TimeoutError:
                continue
            except OSError as e:
                raise PeerLost(f"connection lost: {e}") from e
            if not chunk:
                raise PeerLost("the peer closed the connection")
            self._buf += chunk
            self.bytes_received += len(chunk)

    def recv(self, timeout: float) -> Frame:
        """The next frame, checked; :class:`PeerLost` when nothing arrives in ``timeout``."""
        deadline = time.monotonic() + max(0.0, timeout)
        self._fill(HEADER.size, deadline)
        head = bytes(self._buf[: HEADER.size])
        version, mtype, session, epoch, seq, length = decode_header(head)
        total = HEADER.size + length + TRAILER.size
        self._fill(total, deadline)
        payload = bytes(self._buf[HEADER.size : HEADER.size + length])
        (crc,) = TRAILER.unpack(self._buf[HEADER.size + length : total])
        del self._buf[:total]
        _core.check_frame(head, payload, crc)
        if self.session is None:
            self.session = session
        elif session != self.session:
            raise ProtocolError(f"{Msg(mtype).name} from another session ({session.hex()})")
        if epoch < self.epoch:
            raise ProtocolError(f"{Msg(mtype).name} with stale epoch {epoch} < {self.epoch}")
        if seq != self.recv_seq + 1:
            raise ProtocolError(
                f"{Msg(mtype).name} with sequence {seq}, expected {self.recv_seq + 1}"
            )
        self.recv_seq = seq
        self.last_recv = time.monotonic()
        return Frame(Msg(mtype), session, epoch, seq, payload, version)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop_heartbeat()
            try:
                self.sock.close()
            except OSError:
                pass
