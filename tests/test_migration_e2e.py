"""Live migration between two real processes sharing raw images (specs/migration.md §13).

Each test starts a destination and a source process (``tests/migration_peer.py``), optionally a
frame-aware proxy between them, and checks the invariants of §12.6: the destination's nodes show
zero reads and writes before activation (INV-1/2), at most one process holds an image's write
lock at any sampled instant, probed from this third process through /proc/locks (INV-3), the
source runs again exactly when the spec says (INV-4), every acknowledged write is on the image
(INV-5, from the guest's ack log), and stale or replayed frames are rejected (INV-7).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from blockemu import _core
from blockemu.migration import read_record
from blockemu.migration.frames import HEADER, TRAILER, Msg
from migration_harness import (
    FAST,
    LockSampler,
    Proxy,
    check_acked_on_images,
    make_disk,
    read_ack_log,
    start_peer,
    uri_pair,
    wait_file,
    write_lock_held,
)

REAL_STATE = hasattr(_core, "save_state")
needs_state = pytest.mark.skipif(
    not REAL_STATE, reason="device-state encoding (_core.save_state) not in this build"
)


@dataclass
class Run:
    src: dict[str, Any]
    dst: dict[str, Any]
    images: dict[str, Path]
    acked: dict[str, dict[int, int]]
    max_holders: dict[str, int]
    proxy_log: list[tuple[str, str]] = field(default_factory=list)


def run_pair(
    tmp: Path,
    *,
    transport: str = "tcp",
    workload: bool = True,
    inflight: bool = False,
    src: dict[str, Any] | None = None,
    dst: dict[str, Any] | None = None,
    env_src: dict[str, str] | None = None,
    env_dst: dict[str, str] | None = None,
    rule: Any = None,
    fresh: bool = True,
    during: Any = None,
    dst_uri: str | None = None,
    wrap_src: list[str] | None = None,
    wrap_dst: list[str] | None = None,
    cut: int | None = None,
) -> Run:
    images = {"ide": tmp / "ide.img", "virtio": tmp / "vio.img"}
    for p in images.values():
        if fresh or not p.exists():
            make_disk(p)
    dst_uri = dst_uri or uri_pair(tmp, transport)
    ack_log = tmp / "acks.log"
    wl = None
    if workload and REAL_STATE:
        wl = {"inflight": inflight, "run_for": 0.3, "ack_log": str(ack_log)}
    base = {
        "ide": str(images["ide"]),
        "virtio": str(images["virtio"]),
        "timeouts": FAST,
        "timeout": 10.0,
        "workload": wl,
    }
    ready = tmp / "ready"
    dcfg = {**base, "role": "destination", "uri": dst_uri, "ready_file": str(ready), **(dst or {})}
    d = start_peer(dcfg, tmp, env_dst, wrap_dst)
    wait_file(ready)
    proxy = None
    src_uri = dst_uri
    if rule is not None or cut is not None:
        src_uri = uri_pair(tmp, transport)
        proxy = Proxy(src_uri, dst_uri, rule or pass_all, cut_s2d_after=cut)
    s = start_peer(
        {**base, "role": "source", "uri": src_uri, **(src or {})}, tmp, env_src, wrap_src
    )
    if during is not None:
        during(images)
    with LockSampler(list(images.values())) as sampler:
        rs = s.result()
        rd = d.result()
    if proxy is not None:
        proxy.close()
    for r in (rs, rd):
        assert "crash" not in r, r["crash"]
    run = Run(rs, rd, images, read_ack_log(ack_log), sampler.max_holders)
    if proxy is not None:
        run.proxy_log = proxy.log
    # INV-3: never two holders of an image's write byte at a sampled instant.
    assert all(n <= 1 for n in run.max_holders.values()), run.max_holders
    # INV-5: every acknowledged write is on the image, whatever happened.
    check_acked_on_images(run.acked, images)
    return run


def dst_untouched(run: Run) -> None:
    """The destination read and wrote nothing and holds no write lock (a failed incoming)."""
    d = run.dst
    if d.get("killed"):
        return
    for name, info in d.get("nodes", {}).items():
        assert not info["active"], name
        assert info["stats"]["reads"] == 0, (name, info["stats"])
        assert info["stats"]["writes"] == 0, (name, info["stats"])
        assert "write" not in info["locks"]["held"]


def dst_released(run: Run) -> None:
    """A destination that activated, then gave up before its commit: inactive again, no write
    lock, nothing written (its verification reads came after activation)."""
    for name, info in run.dst.get("nodes", {}).items():
        assert not info["active"], name
        assert info["stats"]["writes"] == 0, (name, info["stats"])
        assert "write" not in info["locks"]["held"]


def src_resumed(run: Run) -> None:
    s = run.src
    assert not s["ok"], s
    assert s["error"]["source_resumed"] is True, s["error"]
    assert s["running_after"] is True
    for name, info in s["nodes"].items():
        assert info["active"], name
        assert "write" in info["locks"]["held"], name
    if REAL_STATE:
        assert s["check"]["ide"] > 0 and s["check"]["virtio"] > 0


def completed(run: Run) -> None:
    s, d = run.src, run.dst
    assert d["ok"], d
    rep = d["report"]
    assert set(rep["reads_before_activation"].values()) == {0}
    assert set(rep["writes_before_activation"].values()) == {0}
    for name, info in d["nodes"].items():
        assert info["active"] and "write" in info["locks"]["held"], name
    if not s.get("killed"):
        assert s["ok"], s
        assert s["running_after"] is False and s["state_after"] == "postmigrate"
        for name, info in s["nodes"].items():
            assert not info["active"] and "write" not in info["locks"]["held"], name
    for img in run.images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "destination" and rec.epoch == rep["epoch"]
    if REAL_STATE:
        assert d["check"]["ide"] > 0 and d["check"]["virtio"] > 0
        assert "guest_error" not in d, d["guest_error"]


def pass_all(direction: str, mtype: int, index: int, raw: bytes) -> str:
    return "pass"


# ---------------------------------------------------------------------- happy path


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_happy_path(tmp_path: Path, transport: str) -> None:
    run = run_pair(tmp_path, transport=transport)
    completed(run)
    rep = run.src["report"]
    assert rep["downtime_ms"] > 0 and rep["bytes_sent"] > 0
    names = [p["name"] for p in rep["phases"]]
    assert names[:5] == ["connecting", "preparing", "stopping", "sending_state", "inactivating"]
    if REAL_STATE:
        # the geometry travelled: what the destination has equals what the source had
        assert rep["geometry"] == run.dst["report"]["geometry"]
        assert all(g is not None for g in rep["geometry"].values())
    # after the peers exit, nobody holds the write lock
    assert not any(write_lock_held(p) for p in run.images.values())


def test_happy_path_through_proxy(tmp_path: Path) -> None:
    run = run_pair(tmp_path, rule=pass_all)
    completed(run)
    # the source learned what the destination saw before activation
    assert set(run.src["report"]["reads_before_activation"].values()) == {0}


@pytest.mark.parametrize("cut", [0, 30, 700, 5000, 15000])
def test_connection_dropped_after_n_bytes(tmp_path: Path, cut: int) -> None:
    """The source-to-destination stream ends after ``cut`` bytes (inside HELLO, inside the
    device state, ...): the source resumes, the destination writes nothing and never activates,
    whatever the cut point (before SOURCE_INACTIVE)."""
    run = run_pair(tmp_path, cut=cut)
    src_resumed(run)
    dst_untouched(run)


@needs_state
def test_21_in_flight_io_at_stop(tmp_path: Path) -> None:
    """A virtio write is in flight when the machine stops: drained at stop, its completion is
    collected by the guest on the destination, exactly once."""
    run = run_pair(tmp_path, inflight=True)
    completed(run)


# ---------------------------------------------------------------------- before the stop


def test_01_destination_cannot_open_image(tmp_path: Path) -> None:
    run = run_pair(tmp_path, dst={"open_error": str(tmp_path / "missing.img")})
    assert run.dst["error"]["phase"] == "preparing"
    src_resumed(run)
    assert "stopping" not in run.src["phases_seen"]  # zero downtime: never stopped


def test_02_third_process_holds_the_image(tmp_path: Path) -> None:
    """Once the source runs, a third process refuses to share consistent read (QEMU lock byte
    200) on the virtio image: the destination's inactive open fails at prepare; the source is
    unaffected."""
    fds: list[int] = []

    def third_party(images: dict[str, Path]) -> None:
        deadline = time.monotonic() + 20
        while not write_lock_held(images["virtio"]):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        fd = os.open(images["virtio"], os.O_RDWR)
        fds.append(fd)
        lk = struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, 200, 1, 0)
        fcntl.fcntl(fd, 38, lk)  # F_OFD_SETLK

    try:
        run = run_pair(tmp_path, src={"delay_at": {"connecting": 0.5}}, during=third_party)
    finally:
        for fd in fds:
            os.close(fd)
    assert run.dst["error"]["phase"] == "preparing"
    assert "lock" in run.dst["error"]["message"].lower()
    src_resumed(run)
    assert "stopping" not in run.src["phases_seen"]


def _reframe(
    raw: bytes,
    *,
    version: int | None = None,
    session: bytes | None = None,
    epoch: int | None = None,
    payload: bytes | None = None,
) -> bytes:
    magic, ver, mtype, sess, ep, seq, length = HEADER.unpack(raw[: HEADER.size])
    body = raw[HEADER.size : HEADER.size + length] if payload is None else payload
    head = HEADER.pack(
        magic,
        ver if version is None else version,
        mtype,
        sess if session is None else session,
        ep if epoch is None else epoch,
        seq,
        len(body),
    )
    return head + body + TRAILER.pack(zlib.crc32(body, zlib.crc32(head)))


def test_03_protocol_version_mismatch(tmp_path: Path) -> None:
    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        if mtype == Msg.HELLO:
            return ("replace", _reframe(raw, version=7))
        return "pass"

    run = run_pair(tmp_path, rule=rule)
    src_resumed(run)
    assert "stopping" not in run.src["phases_seen"]
    assert "version" in run.dst["error"]["message"]
    dst_untouched(run)


class _TamperState:
    """Flips a byte inside the device state and fixes every digest (frame CRC, DONE's sha256),
    so only the state decoder can catch it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, direction: str, mtype: int, index: int, raw: bytes) -> Any:
        if direction == "s2d" and mtype == Msg.DEVICE_STATE:
            body = bytearray(raw[HEADER.size : -TRAILER.size])
            if not self.chunks and len(body) > 40:
                body[20] ^= 0xFF
            self.chunks.append(bytes(body))
            return ("replace", _reframe(raw, payload=bytes(body)))
        if direction == "s2d" and mtype == Msg.DEVICE_STATE_DONE:
            done = json.loads(raw[HEADER.size : -TRAILER.size])
            done["sha256"] = hashlib.sha256(b"".join(self.chunks)).hexdigest()
            return ("replace", _reframe(raw, payload=json.dumps(done).encode()))
        return "pass"


def test_03_tampered_device_state_is_a_state_error(tmp_path: Path) -> None:
    run = run_pair(tmp_path, rule=_TamperState())
    assert run.dst["error"]["phase"] == "loading"
    assert run.dst["error"]["cause_type"] == "StateError"
    src_resumed(run)
    dst_untouched(run)


def test_04_malformed_stream_bad_crc(tmp_path: Path) -> None:
    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "corrupt" if direction == "s2d" and mtype == Msg.DEVICE_STATE else "pass"

    run = run_pair(tmp_path, rule=rule)
    assert run.dst["error"]["phase"] == "loading"
    assert run.dst["error"]["cause_type"] == "StateError"
    assert "CRC" in run.dst["error"]["message"]
    src_resumed(run)
    dst_untouched(run)


def test_05_stream_truncated_in_device_state(tmp_path: Path) -> None:
    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "truncate" if direction == "s2d" and mtype == Msg.DEVICE_STATE else "pass"

    run = run_pair(tmp_path, rule=rule)
    src_resumed(run)
    dst_untouched(run)


def test_06_source_inactive_lost(tmp_path: Path) -> None:
    """SOURCE_INACTIVE never reaches the destination (connection silent afterwards): the
    destination times out in loaded without activating; the source goes in doubt, finds the
    record unchanged under the write lock, reclaims and resumes."""

    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "drop_rest" if mtype == Msg.SOURCE_INACTIVE else "pass"

    run = run_pair(tmp_path, rule=rule)
    assert run.dst["error"]["phase"] == "loaded"
    dst_untouched(run)
    src_resumed(run)
    for img in run.images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "source" and rec.epoch == 3  # N=1, reclaimed N+2


@pytest.mark.parametrize("point", ["src:mid_state", "src:inactivating"])
def test_07_09_source_killed_before_source_inactive(tmp_path: Path, point: str) -> None:
    """7: killed during the state transfer; 9: killed after the final flush, before the images
    were released. The destination must not activate because the lock became free."""
    run = run_pair(tmp_path, env_src={"BLOCKEMU_MIGRATION_KILL_AT": point})
    assert run.src.get("killed"), run.src
    assert not run.dst["ok"]
    assert run.dst["error"]["phase"] in ("loading", "loaded")
    dst_untouched(run)
    for img in run.images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "source"


def test_08_source_killed_after_source_inactive(tmp_path: Path) -> None:
    run = run_pair(tmp_path, env_src={"BLOCKEMU_MIGRATION_KILL_AT": "src:after_source_inactive"})
    assert run.src.get("killed")
    completed(run)


def test_10_destination_killed_before_commit(tmp_path: Path) -> None:
    run = run_pair(tmp_path, env_dst={"BLOCKEMU_MIGRATION_KILL_AT": "dst:after_activated"})
    assert run.dst.get("killed")
    src_resumed(run)
    assert run.src["error"]["phase"] in ("handed_off", "await_commit")
    for img in run.images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "source" and rec.epoch == 3


def test_11_destination_killed_after_commit(tmp_path: Path) -> None:
    """The destination commits and dies; DEST_COMMITTED never reaches the source. The source
    must stay paused and retire: the record says owner=destination, epoch N+1."""

    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "drop_rest" if mtype == Msg.DEST_COMMITTED else "pass"

    run = run_pair(tmp_path, rule=rule, env_dst={"BLOCKEMU_MIGRATION_KILL_AT": "dst:after_commit"})
    assert run.dst.get("killed")
    s = run.src
    assert s["ok"] and s["report"]["resolved_by"] == "ownership record"
    assert s["running_after"] is False and s["state_after"] == "postmigrate"
    for name, info in s["nodes"].items():
        assert not info["active"], name
    for img in run.images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "destination" and rec.epoch == 2


def test_12_partition_after_source_inactive(tmp_path: Path) -> None:
    """Both alive, the network fails after SOURCE_INACTIVE: the destination activates, commits
    and runs; the source hears nothing, cannot take the lock, learns the outcome from the
    record and retires. One writer, one runner."""

    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "drop_rest" if direction == "d2s" and mtype == Msg.DEST_ACTIVATED else "pass"

    run = run_pair(tmp_path, rule=rule)
    completed(run)
    assert run.dst["report"]["commit_ack"] is False


def test_13_partition_before_source_inactive(tmp_path: Path) -> None:
    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        return "drop_rest" if mtype == Msg.STATE_LOADED else "pass"

    run = run_pair(tmp_path, rule=rule)
    src_resumed(run)
    assert run.src["error"]["phase"] == "sending_state"
    dst_untouched(run)


class _StallAfter:
    """A proxy rule: once a frame of type ``after`` went through (or, with ``including``, at
    that frame), every frame in both directions is swallowed while both connections stay open:
    the peers see silence, not a closed socket."""

    def __init__(self, after: Msg, *, including: bool = False) -> None:
        self.after = after
        self.including = including
        self.seen = False

    def __call__(self, direction: str, mtype: int, index: int, raw: bytes) -> str:
        if self.seen:
            return "drop_rest"
        if mtype == self.after:
            self.seen = True
            return "drop_rest" if self.including else "pass"
        return "pass"


PEER_DEAD = 1.0
SLACK = 1.0
#: Every other timer is far longer than ``peer_dead``: only the heartbeat can explain a reaction
#: within ``peer_dead + SLACK``.
HEARTBEAT_TIMERS = {
    **FAST,
    "heartbeat_interval": 0.1,
    "peer_dead": PEER_DEAD,
    "wait_inactive": 8.0,
    "activate": 8.0,
    "commit": 8.0,
}


def _phase_start(res: dict[str, Any], name: str) -> float:
    return float(dict(res["phase_times"])[name])


def test_heartbeat_stall_after_source_inactive_destination_commits(tmp_path: Path) -> None:
    """Scenario 12 with a stalled (not closed) connection: everything after SOURCE_INACTIVE is
    swallowed, heartbeats included. The destination activates and commits on its own and keeps
    running; the source hears no frame for peer_dead, goes in doubt (never resumes), and retires
    on the ownership record."""
    run = run_pair(
        tmp_path,
        rule=_StallAfter(Msg.SOURCE_INACTIVE),
        src={"timeouts": HEARTBEAT_TIMERS, "timeout": 20.0},
        dst={"timeouts": HEARTBEAT_TIMERS, "timeout": 20.0},
    )
    completed(run)
    d, s = run.dst, run.src
    assert d["report"]["commit_ack"] is False
    assert d["migrate_end"] - _phase_start(d, "activating") < PEER_DEAD + SLACK
    rep = s["report"]
    assert rep["resolved_by"] == "ownership record"
    assert "heartbeat" in rep["settle_cause"], rep
    waited = _phase_start(s, "in_doubt") - _phase_start(s, "handed_off")
    assert PEER_DEAD * 0.9 <= waited < PEER_DEAD + SLACK, waited
    # the destination went on beating into the silence until its end
    assert d["report"]["pings_sent"] > 0


@pytest.mark.parametrize("stall_at", [Msg.STATE_LOADED, Msg.SOURCE_INACTIVE])
def test_heartbeat_stall_before_source_inactive_destination_gives_up(
    tmp_path: Path, stall_at: Msg
) -> None:
    """Scenario 13 with a stalled connection: the stall starts at STATE_LOADED or swallows
    SOURCE_INACTIVE itself. The destination, waiting for SOURCE_INACTIVE, hears no frame for
    peer_dead and gives up (no activation, zero reads and writes) long before its
    wait_inactive timer; the source resumes with its images: at once when it never let go,
    or, after SOURCE_INACTIVE, in doubt first, then by reclaiming under the write lock with the
    ownership record unchanged (epoch N+2)."""
    run = run_pair(
        tmp_path,
        rule=_StallAfter(stall_at, including=True),
        src={"timeouts": HEARTBEAT_TIMERS, "timeout": 20.0},
        dst={"timeouts": HEARTBEAT_TIMERS, "timeout": 20.0},
    )
    d, s = run.dst, run.src
    assert d["error"]["phase"] == "loaded", d["error"]
    assert "heartbeat" in d["error"]["message"]
    gave_up = d["migrate_end"] - _phase_start(d, "loaded")
    assert gave_up < PEER_DEAD + SLACK + (0.0 if stall_at == Msg.STATE_LOADED else 0.5), gave_up
    dst_untouched(run)
    src_resumed(run)
    if stall_at == Msg.SOURCE_INACTIVE:
        assert s["error"]["phase"] == "handed_off"
        assert "heartbeat" in s["error"]["message"]
        waited = _phase_start(s, "in_doubt") - _phase_start(s, "handed_off")
        assert PEER_DEAD * 0.9 <= waited < PEER_DEAD + SLACK, waited
        for img in run.images.values():
            rec = read_record(img)
            assert rec is not None and rec.role == "source" and rec.epoch == 3
    else:
        assert s["error"]["phase"] == "sending_state"
        assert "inactivating" not in s["phases_seen"]


def test_22_slow_activation_does_not_make_the_source_resume(tmp_path: Path) -> None:
    """The destination takes longer than T_activate to activate: the source goes in doubt but
    keeps listening instead of resuming; the destination commits; the source learns it and
    retires."""
    run = run_pair(tmp_path, dst={"delay_at": {"activating": 2.0}})
    completed(run)
    assert run.src["report"]["in_doubt"] == "committed"


def test_17_third_party_takes_the_lock_in_the_gap(tmp_path: Path) -> None:
    """A third process grabs the write lock between the source's inactivation and the
    destination's activation: the destination's activation fails, the source's reclaim fails on
    the same lock, and the source stays paused with a clear error. Nobody writes."""
    fds: list[int] = []

    def third_party(images: dict[str, Path]) -> None:
        deadline = time.monotonic() + 20
        while not write_lock_held(images["virtio"]):  # the source runs...
            assert time.monotonic() < deadline
            time.sleep(0.002)
        while write_lock_held(images["virtio"]):  # ...and lets go at inactivation
            assert time.monotonic() < deadline
            time.sleep(0.001)
        fd = os.open(images["virtio"], os.O_RDWR)
        fds.append(fd)
        for byte in (101, 201):  # hold write, refuse to share write: an active writer
            fcntl.fcntl(fd, 38, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, byte, 1, 0))

    try:
        run = run_pair(
            tmp_path, dst={"delay_at": {"activating": 0.3}}, during=third_party, workload=False
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert run.dst["error"]["phase"] == "activating"
    assert "lock" in run.dst["error"]["message"]
    dst_released(run)
    s = run.src
    assert not s["ok"] and s["error"]["source_resumed"] is False
    assert s["running_after"] is False
    assert s["error"]["phase"] == "in_doubt"
    for name, info in s["nodes"].items():
        assert not info["active"], name
        assert info["stats"]["writes"] == 0, name


@needs_state
def test_19_second_migration_of_a_never_started_vm(tmp_path: Path) -> None:
    """Scenario 19 (QEMU #2395) across three processes: A → B with B never started (incoming
    with autostart=False: B commits, then its images are inactive again), then B → C. B's
    inactivation of already-inactive images is a no-op: B issues no write, discard or flush in
    the second hop and nothing crashes; C reads nothing before its activation, then activates,
    starts its guest and finds every write A's guest had acknowledged. Epochs 1 → 2 → 3."""
    images = {"ide": make_disk(tmp_path / "ide.img"), "virtio": make_disk(tmp_path / "vio.img")}
    ack_log = tmp_path / "acks.log"
    base = {
        "ide": str(images["ide"]),
        "virtio": str(images["virtio"]),
        "timeouts": FAST,
        "timeout": 15.0,
        "workload": {"run_for": 0.3, "ack_log": str(ack_log)},
    }
    uri_b, uri_c = uri_pair(tmp_path, "unix"), uri_pair(tmp_path, "unix")
    ready_b, ready_c = tmp_path / "ready-b", tmp_path / "ready-c"
    c = start_peer(
        {**base, "role": "destination", "uri": uri_c, "ready_file": str(ready_c)}, tmp_path
    )
    wait_file(ready_c)
    b = start_peer(
        {
            **base,
            "role": "destination",
            "uri": uri_b,
            "ready_file": str(ready_b),
            "autostart": False,
            "then_migrate": {"uri": uri_c, "timeout": 15.0},
        },
        tmp_path,
    )
    wait_file(ready_b)
    a = start_peer({**base, "role": "source", "uri": uri_b}, tmp_path)
    with LockSampler(list(images.values())) as sampler:
        ra, rb, rc = a.result(), b.result(), c.result()
    for r in (ra, rb, rc):
        assert "crash" not in r, r["crash"]
    assert all(n <= 1 for n in sampler.max_holders.values()), sampler.max_holders  # INV-3

    # A → B: A retired; B committed epoch 2 and stayed paused with inactive images
    assert ra["ok"] and ra["state_after"] == "postmigrate", ra
    assert rb["ok"] and rb["report"]["epoch"] == 2, rb
    assert rb["state_between"] == "paused"
    assert "running" not in rb["phases_seen"]  # B's guest never started
    for name, info in rb["nodes_between"].items():
        assert not info["active"] and "write" not in info["locks"]["held"], name

    # B → C: B's second hop completed; its images stayed inactive and B wrote nothing at all
    assert rb["ok2"], rb.get("error2")
    assert rb["report2"]["outcome"] == "completed"
    assert rb["state_after"] == "postmigrate" and rb["running_after"] is False
    assert "inactivating" in rb["phases_seen"]
    for name, info in rb["nodes"].items():
        before = rb["nodes_between"][name]["stats"]
        st = info["stats"]
        assert not info["active"], name
        assert st["writes"] == st["discards"] == st["write_zeroes"] == 0, (name, st)
        assert st["flushes"] == before["flushes"] and st["reads"] == before["reads"], name

    # C: nothing read before activation, then active, running, every acked write visible
    assert rc["ok"], rc
    rep = rc["report"]
    assert set(rep["reads_before_activation"].values()) == {0}
    assert set(rep["writes_before_activation"].values()) == {0}
    assert rep["epoch"] == 3 and rc["running_after"] is True
    assert rc["phases_seen"].index("activating") < rc["phases_seen"].index("running")
    for name, info in rc["nodes"].items():
        assert info["active"] and "write" in info["locks"]["held"], name
    assert "guest_error" not in rc, rc["guest_error"]
    assert rc["check"]["ide"] > 0 and rc["check"]["virtio"] > 0
    for img in images.values():
        rec = read_record(img)
        assert rec is not None and rec.role == "destination" and rec.epoch == 3
    # INV-5: every write A's guest acknowledged (and C's since) is on the image
    acked = read_ack_log(ack_log)
    assert acked["ide"] and acked["virtio"]
    check_acked_on_images(acked, images)
    assert not any(write_lock_held(p) for p in images.values())


# ---------------------------------------------------------------------- cancel, flush error


@pytest.mark.parametrize("phase", ["preparing", "sending_state"])
def test_18ab_cancel_before_source_inactive(tmp_path: Path, phase: str) -> None:
    run = run_pair(tmp_path, src={"cancel_at": phase})
    src_resumed(run)
    assert "cancel" in run.src["error"]["message"]
    dst_untouched(run)


def test_18c_cancel_after_source_inactive(tmp_path: Path) -> None:
    """ABORT reaches the destination before its commit (it is slow to activate): ABORT_ACK,
    then the source reclaims and resumes."""
    run = run_pair(tmp_path, src={"cancel_at": "handed_off"}, dst={"delay_at": {"activating": 0.4}})
    src_resumed(run)
    dst_released(run)
    assert run.dst["error"]["phase"] == "activated"


def test_18d_cancel_racing_with_commit_is_refused(tmp_path: Path) -> None:
    run = run_pair(
        tmp_path,
        src={"cancel_at": "await_commit", "delay_at": {"await_commit": 0.1}},
        dst={"delay_at": {"committing": 0.4}},
    )
    completed(run)
    assert run.src["report"]["cancel"].startswith("refused")


def test_20_flush_fails_at_stop(tmp_path: Path) -> None:
    fault = {"device": "virtio", "op": "flush", "n": 1, "count": 1000, "arm_at": "stopping"}
    run = run_pair(tmp_path, src={"fault": fault, "after": 0.0})
    s = run.src
    assert not s["ok"] and s["error"]["phase"] == "stopping"
    assert s["error"]["source_resumed"] is True
    assert "sending_state" not in s["phases_seen"]
    dst_untouched(run)


@needs_state
def test_stop_timeout_resumes(tmp_path: Path) -> None:
    """T_stop: the virtio disk's storage stalls at stop; draining and flushing do not finish
    within T_stop, so the source cancels before sending any state and resumes with its images
    still active. Once the storage recovers, the guest's writes complete."""
    fault = {"device": "virtio", "op": "stall", "arm_at": "stopping"}
    run = run_pair(
        tmp_path,
        inflight=True,
        src={"fault": fault, "release_after": True, "timeouts": {**FAST, "stop": 0.3}},
    )
    s = run.src
    assert not s["ok"] and s["error"]["phase"] == "stopping", s
    assert "drain/flush at stop failed" in s["error"]["message"]
    assert "sending_state" not in s["phases_seen"]
    src_resumed(run)
    dst_untouched(run)


@needs_state
def test_stop_timeout_on_a_stalled_ide_command_resumes(tmp_path: Path) -> None:
    """T_stop bounds the IDE drain too: a READ SECTORS is in flight on an IDE channel whose
    storage stalls when the source stops; the drain does not finish within T_stop, so the source
    cancels before sending any state and resumes with its images still active."""
    ide2 = make_disk(tmp_path / "ide2.img")
    fault = {"device": "ide2", "op": "stall_read", "arm_at": "stopping"}
    t_stop = 0.3
    run = run_pair(
        tmp_path,
        src={
            "ide2": str(ide2),
            "fault": fault,
            "release_after": True,
            "timeouts": {**FAST, "stop": t_stop},
        },
        dst={"ide2": str(ide2)},
    )
    s = run.src
    assert not s["ok"] and s["error"]["phase"] == "stopping", s
    assert "drain/flush at stop failed" in s["error"]["message"]
    assert "TimeoutError" in s["error"]["cause"]
    assert "sending_state" not in s["phases_seen"]
    stopping = dict(s["phase_times"])["stopping"]
    assert s["migrate_end"] - stopping < t_stop + 1.5, s["phase_times"]
    src_resumed(run)
    assert s["nodes"]["ide1.master"]["active"]
    dst_untouched(run)


# ---------------------------------------------------------------------- stale frames


@pytest.mark.parametrize("how", ["other_session", "stale_epoch", "duplicate"])
def test_23_stale_or_replayed_frames(tmp_path: Path, how: str) -> None:
    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        if direction == "s2d" and mtype == Msg.SOURCE_INACTIVE:
            if how == "other_session":
                return ("replace", _reframe(raw, session=os.urandom(16)))
            if how == "stale_epoch":
                return ("replace", _reframe(raw, epoch=0))
            return "duplicate"
        return "pass"

    run = run_pair(tmp_path, rule=rule)
    if how == "duplicate":
        # the first copy is genuine: the duplicate is caught before the commit
        assert run.dst["error"]["phase"] == "activated"
        dst_released(run)
    else:
        assert run.dst["error"]["phase"] == "loaded"
        dst_untouched(run)
    src_resumed(run)


def test_verification_mismatch_fails_activation(tmp_path: Path) -> None:
    """INV-8 / scenario 14's negative control: SOURCE_INACTIVE reports witness digests that the
    storage does not match (a stale view). The destination activates, verifies, finds the
    difference, drops back to inactive and answers DEST_ACTIVATION_FAILED; the source takes its
    images back and resumes. Stale data never reaches a guest."""

    def rule(direction: str, mtype: int, index: int, raw: bytes) -> Any:
        if direction == "s2d" and mtype == Msg.SOURCE_INACTIVE:
            body = json.loads(raw[HEADER.size : -TRAILER.size])
            for info in body["images"].values():
                info["witnesses"][0][2] = "0" * 64
            return ("replace", _reframe(raw, payload=json.dumps(body).encode()))
        return "pass"

    run = run_pair(tmp_path, rule=rule)
    assert run.dst["error"]["phase"] == "activating"
    assert "differs" in run.dst["error"]["message"]
    dst_released(run)
    src_resumed(run)
    assert "DEST_ACTIVATION_FAILED" in run.src["error"]["message"]


# ---------------------------------------------------------------------- geometry


@needs_state
def test_24_geometry_mismatch(tmp_path: Path) -> None:
    run = run_pair(tmp_path, dst={"ide_geometry": [1000, 2, 2]}, workload=True)
    assert run.dst["error"]["phase"] == "loading"
    assert run.dst["error"]["cause_type"] == "StateError"
    src_resumed(run)
    dst_untouched(run)
