"""The source side of a migration (specs/migration.md §12.3).

States, in order: connecting (HELLO, the destination prepares) → stopping (pause vCPUs, drain,
flush) → sending_state (DEVICE_STATE…, DEVICE_STATE_DONE, wait STATE_LOADED) → inactivating
(witnesses, inactivate, SOURCE_INACTIVE) → handed_off (wait DEST_ACTIVATED) → await_commit (wait
DEST_COMMITTED, send COMMIT_ACK) → retired. Before SOURCE_INACTIVE any failure resumes the guest
(its images were never released). After it, only a definite "the destination did not commit"
(DEST_ACTIVATION_FAILED, ABORT_ACK) or the ownership record, read under the write lock, lets the
source reclaim and resume; anything else leaves it paused and in doubt.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from blockemu._core import describe_state
from blockemu.errors import BlockemuError, LockError, MigrationError
from blockemu.machine import Machine
from blockemu.migration.common import (
    INSTANCE_ID,
    Deadline,
    Phases,
    Timeouts,
    connect,
    geometry_of,
    kill_point,
    verify,
    witnesses,
)
from blockemu.migration.frames import (
    MAX_CHUNK,
    Channel,
    Frame,
    Msg,
    PeerLost,
    PeerTimeout,
    ProtocolError,
)
from blockemu.migration.mirror import MirrorOptions, MirrorSource
from blockemu.migration.ownership import (
    OwnerRecord,
    Records,
    is_lockless,
    read_record_at,
    resolve_records,
    write_record_at,
)

__all__ = ["migrate"]


class _Reclaimed(Exception):
    pass


def _describe_devices(machine: Machine) -> dict[str, str]:
    return {name: type(dev).__name__ for name, dev in machine.devices.items()}


class _Source:
    def __init__(
        self,
        machine: Machine,
        uri: str,
        timeout: float,
        timeouts: Timeouts,
        verify_full: bool,
        cancel: threading.Event | None,
        on_phase: Callable[[str], None] | None,
        vm: str | None,
        records: Records | None,
        storage: str = "shared",
        mirror: MirrorOptions | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.m = machine
        self.storage = storage
        self.mirror_opts = mirror or MirrorOptions()
        self.on_progress = on_progress
        self.mirror: MirrorSource | None = None
        if storage == "mirror":
            # The destination's disks are its own: no record either side could read about the
            # other's, so an in-doubt source never resolves on its own (simple mode).
            self.records: dict[str, str | None] = {name: None for name, _ in machine.iter_nodes()}
        else:
            # node name → ownership record path (None: an NBD image without one, simple mode)
            self.records = resolve_records(
                {name: node.name for name, node in machine.iter_nodes()}, records
            )
        self.simple = any(p is None for p in self.records.values())
        # an NBD node holds no lock: only the coordinator keeps a single writer
        self.lockless = any(is_lockless(node.name) for _, node in machine.iter_nodes())
        self.uri = uri
        self.timeout = timeout
        self.deadline = Deadline(timeout)
        self.t = timeouts
        self.full = verify_full
        self.cancel = cancel
        self.phases = Phases(on_phase)
        self.vm = vm or "vm"
        self.session = uuid.uuid4().bytes
        self.ch: Channel | None = None
        self.was_running = machine.running
        self.epoch = 0
        self.sent_inactive: dict[str, Any] = {}
        self.stop_time = 0.0
        self.report: dict[str, Any] = {
            "role": "source",
            "session": self.session.hex(),
            "ownership": "simple" if self.simple else "fenced",
            "storage": storage,
        }
        self.traced: list[Any] = []
        self.dest_geometry: Any = None

    # ------------------------------------------------------------------ helpers

    def _paths(self) -> dict[str, str]:
        """Node name → its ownership record's path (the nodes that have one)."""
        return {name: p for name, p in self.records.items() if p is not None}

    def _recv(self, timeout: float, expect: tuple[Msg, ...]) -> Frame:
        """The next frame of an expected type (or a refusal/abort); PING is answered, PING and
        PONG are skipped. Raises :class:`_Cancel` when the operator cancels while waiting, and
        :class:`PeerLost` when the heartbeat runs and no frame came for ``peer_dead``."""
        assert self.ch is not None
        end = time.monotonic() + timeout
        while True:
            if self._cancelled():
                raise _Cancel("cancelled by the operator")
            left = end - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"timed out waiting for {expect[0].name}")
            step = left
            if self.cancel is not None:
                step = min(step, 0.05)
            if self.ch.heartbeat:
                step = min(step, max(0.01, self.t.peer_dead - self.ch.silence()), 0.1)
            try:
                f = self.ch.recv(step)
            except PeerTimeout:
                # judged only after a read: frames may have waited while this side was busy
                self._check_heartbeat()
                continue
            if f.type in (Msg.PING, Msg.PONG):
                self.ch.pong(f)
                continue
            if f.type in expect:
                return f
            if f.type in (Msg.ABORT, Msg.REFUSE, Msg.PREPARE_FAILED, Msg.LOAD_FAILED):
                return f
            raise ProtocolError(f"unexpected {f.type.name} while waiting for {expect[0].name}")

    def _check_heartbeat(self) -> None:
        """PeerLost when the heartbeat runs and no frame came for ``peer_dead``."""
        assert self.ch is not None
        if self.ch.heartbeat and self.ch.silence() >= self.t.peer_dead:
            raise PeerLost(f"no frame from the destination for {self.t.peer_dead:g} s (heartbeat)")

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _resume(self) -> bool:
        """Back to running with the images it never released (before SOURCE_INACTIVE)."""
        if self.m.running:
            return True  # never stopped (a failure while mirroring)
        if self.was_running:
            self.m.start()
        else:
            self.m.set_state("paused")
        return self.m.running

    def _abort(self, reason: str) -> None:
        if self.ch is not None:
            self.ch.try_send(Msg.ABORT, {"reason": reason, "phase": self.phases.current})

    def _fail_resume(self, message: str) -> MigrationError:
        phase = self.phases.current
        self._abort(message)
        resumed = self._resume()
        return MigrationError(f"{message}; source resumed", phase=phase, source_resumed=resumed)

    # ------------------------------------------------------------------ ownership

    def _init_records(self) -> None:
        epochs = []
        missing = []
        for name, path in self._paths().items():
            rec = read_record_at(path)
            if rec is None:
                missing.append(name)
            else:
                epochs.append(rec.epoch)
        self.epoch = max(epochs, default=0)
        if missing:
            nodes = self.m.nodes
            if all(nodes[n].active for n in missing):
                self.epoch = max(self.epoch, 1)
                for n in missing:
                    self._write_record(self._paths()[n], self.epoch)

    def _write_record(self, path: str, epoch: int) -> None:
        write_record_at(
            path,
            OwnerRecord(
                vm=self.vm,
                owner=INSTANCE_ID,
                role="source",
                epoch=epoch,
                session=self.session.hex(),
            ),
        )

    def _records_committed_elsewhere(self) -> bool:
        for path in self._paths().values():
            rec = read_record_at(path)
            if rec is not None and rec.epoch > self.epoch:
                return True
        return False

    def _try_reclaim(self, lock_timeout: float, *, definite: bool = True) -> str:
        """S_RECLAIMING/S_IN_DOUBT: "reclaimed", "retired" (the destination committed) or
        "locked" (the write lock stayed unavailable, or nothing can fence the destination).

        Without a definite "no commit", only the write lock fences a destination that may still
        commit. NBD nodes hold none: the source then never reclaims on its own; with records it
        polls them until ``lock_timeout`` and retires when they show the commit, and in simple
        mode (an NBD image without a record) it stays in doubt at once."""
        end = time.monotonic() + lock_timeout
        if not definite and self.simple:
            self.report["in_doubt_reason"] = (
                "simple mode (an NBD image without an ownership record): an operator decides"
            )
            return "locked"
        if not definite and self.lockless:
            delay = 0.02
            while True:
                try:
                    if self._records_committed_elsewhere():
                        return "retired"
                    self.report["in_doubt_reason"] = (
                        "NBD storage holds no lock to fence the destination, and the ownership"
                        " record shows no commit"
                    )
                except (ValueError, OSError) as e:
                    self.report["in_doubt_reason"] = f"unreadable ownership record: {e}"
                if time.monotonic() + delay >= end:
                    return "locked"
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        delay = 0.02
        while True:
            try:
                if self._records_committed_elsewhere():
                    return "retired"
                self.m.activate()
                break
            except (LockError, ValueError, OSError) as e:
                # the lock is elsewhere, or the record cannot be read: stay in doubt for now
                self.report["in_doubt_reason"] = f"{type(e).__name__}: {e}"
                if time.monotonic() + delay >= end:
                    return "locked"
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        # Under the write lock now: nobody can commit any more. Read the record afresh.
        try:
            committed = self._records_committed_elsewhere()
        except (ValueError, OSError) as e:
            self.m.inactivate()
            self.report["in_doubt_reason"] = f"unreadable ownership record: {e}"
            return "locked"
        if committed:
            self.m.inactivate()
            return "retired"
        nodes = self.m.nodes
        for name, info in self.sent_inactive.items():
            problem = verify(nodes[name], info)
            if problem is not None:
                self.m.inactivate()
                raise MigrationError(
                    f"reclaim refused: {name}: {problem}; the guest stays paused",
                    phase="reclaim",
                    source_resumed=False,
                )
        new_epoch = self.epoch + 2
        for path in self._paths().values():
            self._write_record(path, new_epoch)
        self.report["reclaimed_epoch"] = new_epoch
        return "reclaimed"

    def _listen(self, timeout: float) -> tuple[str, Frame | None]:
        """S_IN_DOUBT with the connection still open: keep listening (the destination may only
        be slow, spec §13 scenario 22) and watch the ownership record. Returns "committed",
        "failed" (the destination said it will not commit), "retired" (the record says it
        did), "dead" (the connection is gone or sent garbage) or "silent"."""
        if self.ch is None or self.ch.closed:
            return "dead", None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self._records_committed_elsewhere():
                    return "retired", None
            except (ValueError, OSError):
                pass
            if self.ch.heartbeat and self.ch.silence() >= self.t.peer_dead:
                return "dead", None  # the heartbeat says the peer is gone: ask the record
            try:
                f = self.ch.recv(min(0.1, max(0.0, end - time.monotonic())))
            except PeerTimeout:
                continue
            except (PeerLost, ProtocolError):
                return "dead", None
            if f.type == Msg.DEST_COMMITTED:
                return "committed", f
            if f.type in (Msg.DEST_ACTIVATION_FAILED, Msg.ABORT_ACK, Msg.ABORT):
                return "failed", f
            self.ch.pong(f)
        return "silent", None

    def _settle(self, why: str, *, definite: bool) -> dict[str, Any]:
        """After SOURCE_INACTIVE: reclaim when the destination definitely did not commit (or the
        record, under the lock, says so); retire when it committed; otherwise stay in doubt.
        While the connection stays open the source first listens (up to ``in_doubt``) and only
        then looks for the write lock; a closed connection goes to the lock at once."""
        failed_phase = self.phases.current
        self.report["settle_cause"] = why
        self.phases.enter("reclaiming" if definite else "in_doubt")
        if not definite:
            heard, f = self._listen(self.deadline.cap(self.t.in_doubt))
            self.report["in_doubt"] = heard
            if heard == "committed" and f is not None:
                return self._commit(f, False)
            if heard == "retired":
                self.m.set_state("postmigrate")
                self.report["resolved_by"] = "ownership record"
                return self._finish("completed")
        limit = self.t.lock if definite else max(self.t.lock, self.t.in_doubt)
        outcome = self._try_reclaim(max(0.5, self.deadline.cap(limit)), definite=definite)
        if outcome == "retired":
            self.m.set_state("postmigrate")
            self.report["resolved_by"] = "ownership record"
            return self._finish("completed")
        if outcome == "reclaimed":
            resumed = self._resume()
            raise MigrationError(
                f"{why}; source reclaimed its images (epoch {self.epoch + 2}) and resumed",
                phase=failed_phase,
                source_resumed=resumed,
            )
        self.m.set_state("paused")
        if self.simple:
            unknown = "simple mode: the outcome is unknown (no ownership record to tell)"
        elif self.lockless:
            unknown = "the outcome is unknown (NBD: no lock; the ownership record shows no commit)"
        else:
            unknown = "the outcome is unknown and the write lock is held elsewhere"
        raise MigrationError(
            f"{why}; {unknown}: the source stays paused with inactive images (in doubt)",
            phase="in_doubt",
            source_resumed=False,
        )

    # ------------------------------------------------------------------ the run

    def _finish(self, outcome: str) -> dict[str, Any]:
        self.report["outcome"] = outcome
        self.report["phases"] = self.phases.finish()
        if self.ch is not None:
            self.report["bytes_sent"] = self.ch.bytes_sent
            self.report["bytes_received"] = self.ch.bytes_received
            self.report["pings_sent"] = self.ch.pings_sent
        for node in self.traced:
            node.disable_trace()
        return self.report

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            if self.mirror is not None:
                self.mirror.cancel()
                self.mirror = None
            for node in self.traced:
                if not node.closed:
                    node.disable_trace()
            self.traced = []
            if self.ch is not None:
                self.ch.close()

    def _run(self) -> dict[str, Any]:
        m = self.m
        if m.state in ("postmigrate", "failed", "inmigrate"):
            raise MigrationError(
                f"cannot migrate a machine in state {m.state!r}",
                phase="setup",
                source_resumed=m.running,
            )
        self.phases.enter("connecting")
        try:
            self._init_records()
        except (ValueError, OSError) as e:
            raise MigrationError(
                f"ownership record: {e}", phase="connecting", source_resumed=m.running
            ) from e
        for _, node in m.iter_nodes():
            if node.active:
                node.enable_trace(256)
                self.traced.append(node)
        images = [
            {
                "name": name,
                "path": node.name,
                "format": node.format,
                "size": node.size,
                "readonly": node.readonly,
            }
            for name, node in m.iter_nodes()
        ]
        try:
            sock = connect(self.uri, self.deadline.cap(self.t.connect))
            self.ch = Channel(sock, session=self.session, epoch=self.epoch)
            self.ch.send(
                Msg.HELLO,
                {
                    "versions": [1],
                    "caps": ["late_activate", "witness_blocks", "fenced_ownership"],
                    "vm": self.vm,
                    "epoch": self.epoch,
                    "images": images,
                    "devices": _describe_devices(m),
                    "vcpus": sorted(m.vcpus),
                    "storage": self.storage,
                },
            )
            kill_point("src:after_hello")
            self.phases.enter("preparing")
            f = self._recv(self.deadline.cap(self.t.connect + self.t.prepare), (Msg.HELLO_ACK,))
        except (OSError, PeerLost, ProtocolError, _Cancel) as e:
            raise self._fail_resume(f"handshake with {self.uri} failed: {e}") from e
        if f.type != Msg.HELLO_ACK:
            reason = f.json().get("reason", "")
            raise self._fail_resume(f"destination answered {f.type.name}: {reason}")
        ack = f.json()
        self.report["destination"] = ack.get("prepared", {})
        if self._cancelled():
            raise self._fail_resume("cancelled before stop")
        if self.storage == "mirror":
            self._mirror_phase(ack.get("mirror"))

        # -------------------------------------------------------------- S_STOPPING
        self.phases.enter("stopping")
        self.stop_time = time.monotonic()
        try:
            end = time.monotonic() + max(0.01, self.deadline.cap(self.t.stop))
            m.stop(timeout=end - time.monotonic())
            m.flush(timeout=max(0.0, end - time.monotonic()))
        except (OSError, BlockemuError) as e:
            raise self._fail_resume(f"drain/flush at stop failed: {e}") from e
        if self.mirror is not None:
            # the guest is stopped: what is still dirty is the last of the copy
            t0 = time.monotonic()
            try:
                final = self.mirror.complete(max(0.01, self.deadline.cap(self.t.stop)))
            except (OSError, BlockemuError, TimeoutError) as e:
                raise self._fail_resume(f"the final mirror pass failed: {e}") from e
            self.mirror = None
            final["ms"] = round((time.monotonic() - t0) * 1000, 3)
            self.report["mirror"]["final"] = final

        # -------------------------------------------------------------- S_SENDING_STATE
        self.phases.enter("sending_state")
        try:
            state = m.save_state()
            cpu = json.dumps(m.save_cpu_state(), separators=(",", ":")).encode()
            data = state + cpu  # the vCPU state (JSON) follows the device state in the stream
            self.report["state_bytes"] = len(state)
            self.report["sections"] = [
                {"name": sec["name"], "kind": sec["kind"], "size": sec["size"]}
                for sec in describe_state(state)
            ]
            self.report["cpu_state_bytes"] = len(cpu)
            self.report["geometry"] = geometry_of(m)
            for pos in range(0, max(1, len(data)), MAX_CHUNK):
                self.ch.send(Msg.DEVICE_STATE, data[pos : pos + MAX_CHUNK])
                kill_point("src:mid_state")
            self.ch.send(
                Msg.DEVICE_STATE_DONE,
                {
                    "length": len(data),
                    "state_length": len(state),
                    "sha256": hashlib.sha256(data).hexdigest(),
                },
            )
            f = self._recv(self.deadline.cap(self.t.state_loaded), (Msg.STATE_LOADED,))
        except (OSError, BlockemuError, ValueError, PeerLost, ProtocolError, _Cancel) as e:
            raise self._fail_resume(f"sending the device state failed: {e}") from e
        if f.type == Msg.STATE_LOADED:
            self.dest_geometry = f.json().get("geometry")
            # the switchover: heartbeats from here to the end (§12.5)
            self.ch.start_heartbeat(self.t.heartbeat_interval)
        if f.type != Msg.STATE_LOADED:
            reason = f.json().get("reason", "") if f.type != Msg.ABORT else "abort"
            raise self._fail_resume(f"destination answered {f.type.name}: {reason}")
        if self._cancelled():
            raise self._fail_resume("cancelled after the device state")

        # -------------------------------------------------------------- S_INACTIVATING
        self.phases.enter("inactivating")
        try:
            for name, node in m.iter_nodes():
                recent: list[int] = []
                if node in self.traced:
                    recent = [e["offset"] for e in node.trace() if e["op"] == "write"][-16:]
                self.sent_inactive[name] = witnesses(node, full=self.full, extra=recent)
            kill_point("src:inactivating")
            m.inactivate()
        except (OSError, BlockemuError) as e:
            try:
                m.activate()
            except BlockemuError as e2:
                m.set_state("paused")
                raise MigrationError(
                    f"inactivation failed ({e}) and re-activation failed ({e2})",
                    phase="inactivating",
                    source_resumed=False,
                ) from e
            raise self._fail_resume(f"inactivation failed: {e}") from e
        try:
            self.ch.send(Msg.SOURCE_INACTIVE, {"epoch": self.epoch, "images": self.sent_inactive})
        except PeerLost as e:
            return self._settle(f"sending SOURCE_INACTIVE failed: {e}", definite=False)
        kill_point("src:after_source_inactive")

        # -------------------------------------------------------------- S_HANDED_OFF
        self.phases.enter("handed_off")
        abort_sent = False
        timer = self.t.activate
        try:
            while True:
                try:
                    f = self._recv(
                        self.deadline.cap(timer),
                        (
                            Msg.DEST_ACTIVATED,
                            Msg.DEST_ACTIVATION_FAILED,
                            Msg.DEST_COMMITTED,
                            Msg.ABORT_ACK,
                        ),
                    )
                except _Cancel:
                    # 18(c): allowed only if the destination answers ABORT_ACK; a
                    # DEST_COMMITTED racing with it wins and the cancel is refused.
                    self._abort("operator cancel after SOURCE_INACTIVE")
                    abort_sent = True
                    self.report["cancel"] = "requested"
                    self.cancel = None
                    continue
                if f.type == Msg.DEST_ACTIVATED:
                    self.phases.enter("await_commit")
                    timer = self.t.commit
                    continue
                break
        except (PeerLost, ProtocolError) as e:
            return self._settle(f"no answer after SOURCE_INACTIVE ({e})", definite=False)
        if f.type == Msg.DEST_COMMITTED:
            return self._commit(f, abort_sent)
        if f.type in (Msg.DEST_ACTIVATION_FAILED, Msg.ABORT_ACK):
            reason = f.json().get("reason", "")
            return self._settle(
                f"destination answered {f.type.name} {reason}".strip(), definite=True
            )
        # ABORT from the destination: it promises not to commit only with ABORT_ACK semantics;
        # its ABORT is sent after it released everything, so treat it as definite.
        return self._settle(f"destination aborted: {f.json().get('reason', '')}", definite=True)

    def _mirror_phase(self, offer: Any) -> None:
        """S_MIRRORING (storage="mirror"): the guest keeps running while each disk is copied to
        the destination's NBD export and then re-copied where it was dirtied, until the
        remainder is small. Any failure here leaves the guest running on its own images."""
        assert self.ch is not None
        self.phases.enter("mirroring")
        # heartbeats through the copy: a destination that dies or stalls is noticed in peer_dead
        self.ch.start_heartbeat(self.t.heartbeat_interval)
        try:
            if not isinstance(offer, dict):
                raise ProtocolError("the destination offered no mirror target")
            self.mirror = MirrorSource(self.m.nodes, self.uri, offer, self.mirror_opts)
            t_end = time.monotonic() + self.t.mirror
            prog = self.mirror.wait_ready(self.t.mirror, self._poll_during_mirror, self.on_progress)
            # write the copy back on the destination now, not during the downtime; then the
            # remainder has converged again (the guest kept writing meanwhile)
            self.mirror.flush_targets()
            prog = self.mirror.wait_ready(
                max(0.0, t_end - time.monotonic()), self._poll_during_mirror, self.on_progress
            )
        except (OSError, BlockemuError, ValueError, RuntimeError, PeerLost, ProtocolError) as e:
            detail = self._mirror_failure(e)
            raise self._fail_resume(f"mirroring the disks failed: {detail}") from e
        except _Cancel as e:
            raise self._fail_resume(f"mirroring the disks: {e}") from e
        self.report["mirror"] = {
            k: prog[k]
            for k in ("bytes_total", "bytes_copied", "bytes_zero", "passes", "dirty_rate")
        }
        self.report["mirror"]["converged_after_s"] = round(prog["elapsed"], 3)
        self.report["mirror"]["throughput"] = round(prog["throughput"])
        # the switchover has its own time budget, counted from convergence
        self.deadline = Deadline(self.timeout)

    def _mirror_failure(self, e: BaseException) -> str:
        if self.mirror is not None:
            try:
                prog = self.mirror.progress()
                self.report["mirror"] = {
                    k: prog[k] for k in ("bytes_total", "bytes_done", "passes", "state")
                }
            except BlockemuError:
                pass
            self.mirror.cancel()
            self.mirror = None
        return f"{type(e).__name__}: {e}"

    def _poll_during_mirror(self) -> None:
        """Between progress checks: answer heartbeats, notice a lost or aborting destination
        and the operator's cancel."""
        assert self.ch is not None
        if self._cancelled():
            raise _Cancel("cancelled by the operator")
        while True:
            try:
                f = self.ch.recv(0.005)
            except PeerTimeout:
                self._check_heartbeat()
                return
            if f.type in (Msg.PING, Msg.PONG):
                self.ch.pong(f)
                continue
            if f.type in (Msg.ABORT, Msg.PREPARE_FAILED, Msg.LOAD_FAILED):
                raise ProtocolError(f"destination sent {f.type.name}: {f.json().get('reason', '')}")
            raise ProtocolError(f"unexpected {f.type.name} while mirroring")

    def _commit(self, f: Frame, cancel_refused: bool) -> dict[str, Any]:
        assert self.ch is not None
        self.ch.try_send(Msg.COMMIT_ACK, {})
        self.report["downtime_ms"] = round((time.monotonic() - self.stop_time) * 1000, 3)
        if cancel_refused:
            self.report["cancel"] = "refused: the destination had committed"
        info = f.json()
        self.report["epoch"] = info.get("epoch")
        dest = info.get("report", {})
        if isinstance(dest, dict):
            for key in ("reads_before_activation", "writes_before_activation", "activation_ms"):
                if key in dest:
                    self.report[key] = dest[key]
        self.report["destination_geometry"] = self.dest_geometry
        self.m.set_state("postmigrate")
        return self._finish("completed")


class _Cancel(Exception):
    pass


def migrate(
    machine: Machine,
    uri: str,
    *,
    timeout: float = 30.0,
    timeouts: Timeouts | None = None,
    verify: str = "witness",
    cancel: threading.Event | None = None,
    on_phase: Callable[[str], None] | None = None,
    vm: str | None = None,
    records: Records | None = None,
    storage: str = "shared",
    mirror: MirrorOptions | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Migrates ``machine`` to the destination listening on ``uri`` (``tcp:HOST:PORT`` or
    ``unix:PATH``). ``records`` maps node names to ownership record paths (needed for NBD
    images; give the destination the same). ``storage="mirror"`` copies the disks to the
    destination's own images while the guest runs (``mirror`` tunes it, ``on_progress`` gets
    the copy's progress about ten times a second); ``timeout`` then counts from convergence.
    See :mod:`blockemu.migration`."""
    if verify not in ("witness", "full"):
        raise ValueError("verify is 'witness' or 'full'")
    if storage not in ("shared", "mirror"):
        raise ValueError("storage is 'shared' or 'mirror'")
    if storage == "mirror" and records:
        raise ValueError("ownership records apply to shared storage, not storage='mirror'")
    src = _Source(
        machine,
        uri,
        timeout,
        timeouts or Timeouts(),
        verify == "full",
        cancel,
        on_phase,
        vm,
        records,
        storage,
        mirror,
        on_progress,
    )
    return src.run()
