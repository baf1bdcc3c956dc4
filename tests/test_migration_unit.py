"""Unit tests of the migration coordinator's pieces: framing, ownership record, URIs, Machine,
and one migration between two threads of this process over a socket pair of nodes."""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockemu
import migration_fakestate
from blockemu import GuestMemory, IdeChannel, IdeDisk, Machine, MigrationError, VirtioBlk, _core
from blockemu.guest import GuestWorkload
from blockemu.migration import Timeouts, incoming, migrate, read_record
from blockemu.migration.common import parse_uri
from blockemu.migration.frames import (
    HEADER,
    MAX_CHUNK,
    MAX_CONTROL,
    TRAILER,
    Channel,
    Msg,
    PeerLost,
    PeerTimeout,
    ProtocolError,
    decode_header,
    encode_frame,
)
from blockemu.migration.ownership import OwnerRecord, record_path, write_record

SESSION = b"S" * 16
_OPEN: list[Channel] = []


@pytest.fixture(autouse=True)
def _close_channels() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def pair(epoch: int = 0) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    ca, cb = Channel(a, session=SESSION, epoch=epoch), Channel(b, session=None, epoch=epoch)
    _OPEN.extend((ca, cb))
    return ca, cb


# ---------------------------------------------------------------------- frames


def test_frame_roundtrip_and_counters() -> None:
    a, b = pair(epoch=4)
    a.send(Msg.HELLO, {"x": 1})
    a.send(Msg.DEVICE_STATE, b"\0" * 1000)
    f = b.recv(1.0)
    assert f.type == Msg.HELLO and f.json() == {"x": 1} and f.epoch == 4 and f.seq == 1
    f = b.recv(1.0)
    assert f.type == Msg.DEVICE_STATE and f.payload == b"\0" * 1000 and f.seq == 2
    assert b.session == SESSION
    assert a.bytes_sent == b.bytes_received


def raw_channel(data: bytes, **kw: object) -> Channel:
    a, b = socket.socketpair()
    a.sendall(data)
    a.close()
    ch = Channel(b, session=kw.get("session", None), epoch=int(kw.get("epoch", 0)))  # type: ignore[arg-type, call-overload]
    _OPEN.append(ch)
    return ch


def good(msg: Msg = Msg.PING, *, seq: int = 1, epoch: int = 0, payload: bytes = b"{}") -> bytes:
    return encode_frame(msg, SESSION, epoch, seq, payload)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: b"XXXX" + d[4:], "magic"),
        (lambda d: d[:4] + b"\0\x09" + d[6:], "version"),
        (lambda d: d[:6] + b"\0\x63" + d[8:], "unknown message type"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "CRC"),
        (lambda d: d[: HEADER.size] + b"[" + d[HEADER.size + 1 :], "CRC"),
    ],
)
def test_bad_frames_are_rejected(mutate: object, match: str) -> None:
    ch = raw_channel(mutate(good()))  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=match):
        ch.recv(1.0)


def test_length_bound_is_checked_before_reading() -> None:
    head = HEADER.pack(b"BLKM", 1, int(Msg.HELLO), SESSION, 0, 1, MAX_CONTROL + 1)
    with pytest.raises(ProtocolError, match="over the bound"):
        raw_channel(head).recv(1.0)
    head = HEADER.pack(b"BLKM", 1, int(Msg.DEVICE_STATE), SESSION, 0, 1, MAX_CHUNK + 1)
    with pytest.raises(ProtocolError, match="over the bound"):
        raw_channel(head).recv(1.0)
    with pytest.raises(ValueError):
        encode_frame(Msg.HELLO, SESSION, 0, 1, b"x" * (MAX_CONTROL + 1))


def test_session_epoch_and_sequence_checks() -> None:
    with pytest.raises(ProtocolError, match="another session"):
        raw_channel(good(), session=b"T" * 16).recv(1.0)
    with pytest.raises(ProtocolError, match="stale epoch"):
        raw_channel(good(epoch=2), epoch=3).recv(1.0)
    with pytest.raises(ProtocolError, match="sequence"):
        raw_channel(good(seq=2)).recv(1.0)
    ch = raw_channel(good(seq=1) + good(seq=1))  # a replayed frame
    ch.recv(1.0)
    with pytest.raises(ProtocolError, match="sequence"):
        ch.recv(1.0)


def test_not_json_payload() -> None:
    ch = raw_channel(good(payload=b"\xff\xfe"))
    with pytest.raises(ProtocolError, match="not JSON"):
        ch.recv(1.0).json()
    ch = raw_channel(good(payload=b"[1]"))
    with pytest.raises(ProtocolError, match="not a JSON object"):
        ch.recv(1.0).json()


def test_truncation_timeout_and_close() -> None:
    data = good(payload=b'{"a": 1}')
    with pytest.raises(PeerLost, match="closed"):
        raw_channel(data[:-3]).recv(1.0)
    a, b = socket.socketpair()
    ch = Channel(b, session=None)
    _OPEN.append(ch)
    a.sendall(data[:10])
    with pytest.raises(PeerTimeout):
        ch.recv(0.05)
    a.sendall(data[10:])  # the partial frame stayed buffered
    assert ch.recv(1.0).json() == {"a": 1}
    a.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_never_crash(data: bytes) -> None:
    ch = raw_channel(data)
    try:
        f = ch.recv(0.5)
        f.json()
    except (ProtocolError, PeerLost):
        pass
    finally:
        ch.close()


def test_heartbeat_frames_keep_the_sequence() -> None:
    """PINGs from the heartbeat thread interleave with the coordinator's own frames: sending is
    serialized, so the receiver's sequence check never fails; PING is answered with PONG."""
    a, b = pair(epoch=2)
    b_silence = b.silence()
    a.start_heartbeat(0.002)
    assert a.heartbeat
    for i in range(100):
        a.send(Msg.DEVICE_STATE, bytes(100))
        if i % 10 == 0:
            time.sleep(0.005)
    time.sleep(0.02)
    a.stop_heartbeat()
    assert not a.heartbeat and a.pings_sent > 0
    got = {Msg.DEVICE_STATE: 0, Msg.PING: 0}
    while True:
        try:
            f = b.recv(0.05)
        except PeerTimeout:
            break
        got[f.type] += 1
        if f.type == Msg.PING:
            assert f.json()["seq"] == 0
            b.pong(f)
    assert got == {Msg.DEVICE_STATE: 100, Msg.PING: a.pings_sent}
    assert b.recv_seq == a.send_seq == 100 + a.pings_sent
    assert b.silence() < 1.0 and b_silence >= 0
    f = a.recv(1.0)
    assert f.type == Msg.PONG and f.seq == 1
    time.sleep(0.05)
    assert a.silence() >= 0.05
    a.close()  # also stops a heartbeat; idempotent
    a.close()


def test_crc_is_zlib_crc32_over_header_and_payload() -> None:
    d = good(payload=b'{"k":2}')
    (crc,) = TRAILER.unpack(d[-4:])
    assert crc == zlib.crc32(d[:-4])


def _reference_decode(head: bytes) -> tuple[int, int, bytes, int, int, int]:
    """The header checks as frames.py made them in Python before the Rust core took them over:
    the core must agree with it, message for message."""
    magic, version, mtype, session, epoch, seq, length = HEADER.unpack(head)
    if magic != b"BLKM":
        raise ProtocolError(f"bad magic {magic!r}")
    if version != 1:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks 1)")
    if mtype not in Msg._value2member_map_:
        raise ProtocolError(f"unknown message type {mtype}")
    bound = MAX_CHUNK if mtype == Msg.DEVICE_STATE else MAX_CONTROL
    if length > bound:
        raise ProtocolError(f"{Msg(mtype).name} payload length {length} is over the bound")
    return version, mtype, session, epoch, seq, length


def _outcome(f: object, *args: object) -> object:
    try:
        return f(*args)  # type: ignore[operator]
    except ProtocolError as e:
        return ("ProtocolError", str(e))


_HEADERS = st.one_of(
    st.binary(min_size=HEADER.size, max_size=HEADER.size),
    st.builds(
        HEADER.pack,
        st.sampled_from([b"BLKM", b"BLKN", b"\0'\\\n"]),
        st.sampled_from([0, 1, 2, 0xFFFF]),
        st.integers(0, 20) | st.integers(0, 0xFFFF),
        st.binary(min_size=16, max_size=16),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.sampled_from([0, MAX_CONTROL, MAX_CONTROL + 1, MAX_CHUNK, MAX_CHUNK + 1, 2**32 - 1])
        | st.integers(0, 2**32 - 1),
    ),
)


@settings(max_examples=500, deadline=None)
@given(_HEADERS)
def test_rust_header_checks_match_the_python_reference(head: bytes) -> None:
    assert _outcome(decode_header, head) == _outcome(_reference_decode, head)


def test_every_message_type_is_known_to_the_core() -> None:
    for msg in Msg:
        head = HEADER.pack(b"BLKM", 1, int(msg), SESSION, 1, 2, 3)
        assert _core.decode_frame_header(head) == (1, int(msg), SESSION, 1, 2, 3)
    for mtype in (0, max(Msg) + 1):
        with pytest.raises(ProtocolError, match=f"unknown message type {mtype}$"):
            _core.decode_frame_header(HEADER.pack(b"BLKM", 1, mtype, SESSION, 1, 2, 3))
    with pytest.raises(ProtocolError, match="44 bytes, not 43"):
        _core.decode_frame_header(b"BLKM" + bytes(39))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.binary(max_size=2000))
def test_core_frame_crc_is_zlib_crc32(head: bytes, payload: bytes) -> None:
    assert _core.frame_crc(head, payload) == zlib.crc32(payload, zlib.crc32(head))


def test_check_frame() -> None:
    d = good(Msg.DEVICE_STATE, payload=bytes(range(200)))
    head, payload, (crc,) = d[: HEADER.size], d[HEADER.size : -4], TRAILER.unpack(d[-4:])
    _core.check_frame(head, payload, crc)
    _core.check_frame(memoryview(head), bytearray(payload), crc)  # any bytes-like object
    with pytest.raises(ProtocolError, match=r"^bad CRC in a DEVICE_STATE frame$"):
        _core.check_frame(head, payload, crc ^ 1)
    with pytest.raises(ProtocolError, match="payload of 199 bytes, the header says 200"):
        _core.check_frame(head, payload[:-1], crc)
    with pytest.raises(ProtocolError, match="magic"):
        _core.check_frame(b"X" + head[1:], payload, crc)


# ---------------------------------------------------------------------- ownership


def test_ownership_record(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    assert read_record(img) is None
    rec = OwnerRecord(vm="v", owner="me", role="source", epoch=3, session="ab")
    write_record(img, rec)
    got = read_record(img)
    assert got is not None and got.epoch == 3 and got.owner == "me" and got.time > 0
    assert record_path(img) == str(img) + ".owner"
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    write_record(img, OwnerRecord(vm="v", owner="you", role="destination", epoch=4))
    got = read_record(img)
    assert got is not None and got.epoch == 4 and got.role == "destination"
    Path(record_path(img)).write_text('{"vm": 1}')
    with pytest.raises(ValueError):
        read_record(img)
    Path(record_path(img)).write_text("x" * 5000)
    with pytest.raises(ValueError):
        read_record(img)


# ---------------------------------------------------------------------- URIs and timeouts


def test_parse_uri() -> None:
    assert parse_uri("tcp:127.0.0.1:4444") == ("tcp", ("127.0.0.1", 4444))
    assert parse_uri("tcp:[::1]:5") == ("tcp", ("::1", 5))
    assert parse_uri("unix:/tmp/x.sock") == ("unix", "/tmp/x.sock")
    for bad in ("tcp:host", "udp:1:2", "nothing", "unix:"):
        with pytest.raises(ValueError):
            parse_uri(bad)


def test_timeouts_scaled() -> None:
    t = Timeouts().scaled(0.1)
    assert t.connect == pytest.approx(1.0) and t.activate == pytest.approx(3.0)


# ---------------------------------------------------------------------- Machine


def test_machine_devices_nodes_and_lifecycle(tmp_path: Path) -> None:
    blockemu.create_image(tmp_path / "a.img", 1 << 20)
    blockemu.create_image(tmp_path / "b.img", 1 << 20)
    m = Machine()
    assert m.state == "created" and not m.running
    ram = GuestMemory(1 << 20)
    na = blockemu.open_image(tmp_path / "a.img")
    nb = blockemu.open_image(tmp_path / "b.img")
    ch = IdeChannel(master=IdeDisk(na))
    vb = VirtioBlk(nb, ram)
    m.add("ram", ram)
    m.add("ide0", ch)
    m.add("vblk0", vb)
    with pytest.raises(ValueError):
        m.add("ide0", ram)
    with pytest.raises(TypeError):
        m.add("x", na)  # type: ignore[arg-type]
    assert set(m.devices) == {"ram", "ide0", "vblk0"}
    assert set(m.nodes) == {"ide0.master", "vblk0"}
    m.start()
    assert m.running and m.state == "running"
    m.stop()
    assert m.state == "paused" and not m.running
    m.inactivate()
    assert not na.active and not nb.active
    m.inactivate()  # a no-op on inactive nodes
    m.activate()
    assert na.active and nb.active
    with pytest.raises(ValueError):
        m.set_state("bogus")  # type: ignore[arg-type]


def test_machine_activate_undoes_on_lock_error(tmp_path: Path) -> None:
    blockemu.create_image(tmp_path / "a.img", 1 << 20)
    blockemu.create_image(tmp_path / "b.img", 1 << 20)
    ram = GuestMemory(1 << 20)
    m = Machine()
    na = blockemu.open_image(tmp_path / "a.img", format="raw", active=False)
    nb = blockemu.open_image(tmp_path / "b.img", format="raw", active=False)
    m.add("ram", ram)
    m.add("v1", VirtioBlk(na, ram))
    m.add("v2", VirtioBlk(nb, ram))
    other = blockemu.open_image(tmp_path / "b.img")  # another writer holds b
    with pytest.raises(blockemu.LockError):
        m.activate()
    assert not na.active and not nb.active
    other.close()


class _RecordingVcpu:
    """A vCPU that only records whether it runs."""

    def __init__(self) -> None:
        self.running = False

    def resume(self) -> None:
        self.running = True

    def pause(self) -> None:
        self.running = False

    def save(self) -> dict[str, object]:
        return {}

    def load(self, state: dict[str, object]) -> None:
        pass


def _stalled_ide_read(tmp_path: Path) -> tuple[Machine, IdeChannel, blockemu.FaultInjector]:
    """A running machine whose IDE disk's storage stalls under a READ SECTORS in flight."""
    blockemu.create_image(tmp_path / "a.img", 1 << 20)
    faults = blockemu.FaultInjector()
    node = blockemu.open_image(tmp_path / "a.img", format="raw", faults=faults)
    node.write(512 * 7, b"\x5a" * 512)
    ch = IdeChannel(master=IdeDisk(node, cyls=20, heads=16, secs=63))
    m = Machine()
    m.add("ide0", ch)
    m.add_vcpu("cpu0", _RecordingVcpu())
    m.start()
    faults.stall()
    for reg, val in ((2, 1), (3, 7), (4, 0), (5, 0), (6, 0xE0), (7, 0x20)):
        ch.ioport_write(reg, val)
    deadline = time.monotonic() + 5
    while faults.waiting == 0:
        assert time.monotonic() < deadline, "the READ never reached the storage"
        time.sleep(0.005)
    return m, ch, faults


def test_ide_drain_timeout(tmp_path: Path) -> None:
    _, ch, faults = _stalled_ide_read(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.drain(0.1)
    assert 0.09 <= time.monotonic() - t0 < 1.0
    with pytest.raises(ValueError):
        ch.drain(-1.0)
    faults.release()
    ch.drain(5.0)
    ch.drain()
    assert ch.wait_irq(5.0)
    assert ch.read_data(512) == b"\x5a" * 512


def test_machine_stop_timeout_bounds_the_ide_drain(tmp_path: Path) -> None:
    """T_stop covers IDE too: a stalled IDE command makes ``stop(timeout)`` raise within the
    bound with the vCPUs paused and the devices still started; ``start`` resumes as before."""
    m, ch, faults = _stalled_ide_read(tmp_path)
    cpu = m.vcpus["cpu0"]
    assert isinstance(cpu, _RecordingVcpu)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        m.stop(timeout=0.2)
    took = time.monotonic() - t0
    assert 0.19 <= took < 2.0, took
    assert not cpu.running
    assert m.state == "running"  # not paused: the caller cancels and resumes
    m.start()
    assert cpu.running and m.running
    faults.release()
    assert ch.wait_irq(5.0)
    assert ch.read_data(512) == b"\x5a" * 512
    m.stop(timeout=5.0)
    assert m.state == "paused" and not cpu.running


# ---------------------------------------------------------------------- in-process migration


@pytest.fixture
def state_codec() -> Iterator[None]:
    """The real device-state encoding, or the stand-in while the build has none."""
    installed = migration_fakestate.install_if_missing()
    yield
    if installed:
        del blockemu._core.save_state  # type: ignore[attr-defined]
        del blockemu._core.load_state  # type: ignore[attr-defined]


def build(tmp: Path, *, active: bool) -> Machine:
    m = Machine()
    ram = GuestMemory(1 << 20)
    m.add("ram", ram)
    node = blockemu.open_image(tmp / "d.img", format="raw", active=active)
    m.add("vblk0", VirtioBlk(node, ram))
    return m


@pytest.mark.usefixtures("state_codec")
def test_in_process_migration_and_second_hop(tmp_path: Path) -> None:
    """Two machines in one process (two OFDs conflict like two processes): A → B with B left
    paused (scenario 19: its images inactive again), then B → C. Epochs 1 → 2 → 3."""
    blockemu.create_image(tmp_path / "d.img", 1 << 20)
    a = build(tmp_path, active=True)
    a.start()
    a.nodes["vblk0"].write(4096, b"A" * 512)
    t = Timeouts().scaled(0.1)
    results: dict[str, object] = {}

    def dest(name: str, m: Machine, uri: str, autostart: bool) -> None:
        try:
            results[name] = incoming(m, uri, timeout=10, timeouts=t, autostart=autostart)
        except MigrationError as e:
            results[name] = e

    b = build(tmp_path, active=False)
    uri = f"unix:{tmp_path / 'b.sock'}"
    th = threading.Thread(target=dest, args=("b", b, uri, False))
    th.start()
    rep = migrate(a, uri, timeout=10, timeouts=t)
    th.join()
    assert rep["outcome"] == "completed" and a.state == "postmigrate"
    assert isinstance(results["b"], dict)
    assert b.state == "paused" and not b.nodes["vblk0"].active
    rec = read_record(tmp_path / "d.img")
    assert rec is not None and rec.epoch == 2

    c = build(tmp_path, active=False)
    uri = f"unix:{tmp_path / 'c.sock'}"
    th = threading.Thread(target=dest, args=("c", c, uri, True))
    th.start()
    rep = migrate(b, uri, timeout=10, timeouts=t)
    th.join()
    assert rep["outcome"] == "completed", rep
    assert c.running and c.nodes["vblk0"].active
    assert c.nodes["vblk0"].read(4096, 512) == b"A" * 512
    rec = read_record(tmp_path / "d.img")
    assert rec is not None and rec.epoch == 3
    with pytest.raises(MigrationError):
        migrate(a, uri, timeout=1)  # a postmigrate machine cannot migrate again


@pytest.mark.usefixtures("state_codec")
def test_destination_refuses_active_nodes(tmp_path: Path) -> None:
    blockemu.create_image(tmp_path / "d.img", 1 << 20)
    blockemu.create_image(tmp_path / "e.img", 1 << 20)
    a = build(tmp_path, active=True)
    a.start()
    b = Machine()
    ram = GuestMemory(1 << 20)
    b.add("ram", ram)
    b.add("vblk0", VirtioBlk(blockemu.open_image(tmp_path / "e.img"), ram))
    uri = f"unix:{tmp_path / 'x.sock'}"
    errs: list[BaseException] = []

    def dest() -> None:
        try:
            incoming(b, uri, timeout=5, timeouts=Timeouts().scaled(0.1))
        except MigrationError as e:
            errs.append(e)

    th = threading.Thread(target=dest)
    th.start()
    with pytest.raises(MigrationError) as ei:
        migrate(a, uri, timeout=5, timeouts=Timeouts().scaled(0.1))
    th.join()
    assert ei.value.source_resumed and a.running
    assert errs and "active=False" in str(errs[0])


def test_machine_load_state_error_changes_nothing(tmp_path: Path) -> None:
    """A tampered or mismatched state raises StateError and leaves the machine as it was."""
    blockemu.create_image(tmp_path / "d.img", 1 << 20)
    a = build(tmp_path, active=True)
    ram = a.devices["ram"]
    assert isinstance(ram, GuestMemory)
    ram.write(0x5000, b"guest")
    a.stop()
    data = a.save_state()
    a.inactivate()
    b = build(tmp_path, active=False)
    bram = b.devices["ram"]
    assert isinstance(bram, GuestMemory)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x55
    with pytest.raises(blockemu.StateError):
        b.load_state(bytes(bad))
    with pytest.raises(blockemu.StateError):
        b.load_state(data[:-5])
    assert bram.read(0x5000, 5) == bytes(5)
    assert b.nodes["vblk0"].stats()["reads"] == 0
    b.load_state(data)
    assert bram.read(0x5000, 5) == b"guest"
    assert b.nodes["vblk0"].stats()["reads"] == 0  # the geometry came from the state
    b.load_cpu_state({})
    b.add_vcpu("cpu0", GuestWorkload())
    with pytest.raises(blockemu.StateError):
        b.load_cpu_state({"cpu0": {"seq": "x"}})
    with pytest.raises(blockemu.StateError):
        b.load_cpu_state({})


def test_fuzz_seed_streams_pass_the_channel() -> None:
    """The migration_frame fuzz seeds (written by the Rust encoder, one mode byte first) are
    whole sessions a Channel accepts frame by frame."""
    corpus = Path(__file__).resolve().parent.parent / "fuzz" / "corpus" / "migration_frame"
    seen: set[Msg] = set()
    for name in ("handshake", "device_state", "handoff", "failures", "ping_empty"):
        data = (corpus / name).read_bytes()[1:]
        ch = raw_channel(data)
        while True:
            try:
                f = ch.recv(0.5)
            except PeerLost:
                break
            seen.add(f.type)
            assert f.seq == ch.recv_seq
        assert ch.bytes_received == len(data)
    assert seen == set(Msg)
