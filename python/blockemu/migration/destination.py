"""The destination side of a migration (specs/migration.md §12.4).

listening → preparing (the machine's nodes are inactive: zero reads, shared lock only; sizes and
formats match the source's) → loading (DEVICE_STATE frames, bounded; ``load_state`` validates
everything before it changes anything) → loaded (waits for SOURCE_INACTIVE; **never** activates
without it, even when the write lock is free) → activating (take the write lock, drop caches, read
and verify header digest and witness blocks) → activated → committing (ownership record
owner=destination, epoch N+1: the commit point) → running. Before the commit every failure leaves
the nodes inactive and unwritten.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from blockemu._core import GuestMemory
from blockemu.errors import BlockemuError, LockError, MigrationError, StateError
from blockemu.machine import Machine
from blockemu.migration.common import (
    INSTANCE_ID,
    Deadline,
    Phases,
    Timeouts,
    geometry_of,
    kill_point,
    listen,
    parse_uri,
    verify,
)
from blockemu.migration.frames import (
    Channel,
    Frame,
    Msg,
    PeerLost,
    PeerTimeout,
    ProtocolError,
)
from blockemu.migration.mirror import MirrorTarget, nbd_listen_address
from blockemu.migration.ownership import (
    OwnerRecord,
    Records,
    read_record_at,
    resolve_records,
    write_record_at,
)

__all__ = ["incoming"]

MachineSource = Machine | Callable[[], Machine]


class _Gone(Exception):
    """The destination gives up (D_GONE)."""

    def __init__(self, message: str, phase: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.phase = phase
        self.cause = cause


class _Destination:
    def __init__(
        self,
        machine: MachineSource,
        uri: str,
        timeout: float,
        timeouts: Timeouts,
        autostart: bool,
        on_phase: Callable[[str], None] | None,
        ready: Callable[[str], None] | None,
        max_state: int | None,
        records: Records | None,
        storage: str = "shared",
        nbd_address: str | None = None,
    ) -> None:
        self.source = machine
        self.storage = storage
        self.nbd_address = nbd_address or nbd_listen_address(uri)
        self.mirror: MirrorTarget | None = None
        self.timeout = timeout
        self.records_arg = records
        # node name → ownership record path (None: an NBD image without one); set at prepare
        self.records: dict[str, str | None] = {}
        self.m: Machine | None = machine if isinstance(machine, Machine) else None
        self.uri = uri
        self.deadline = Deadline(timeout)
        self.t = timeouts
        self.autostart = autostart
        self.phases = Phases(on_phase)
        self.ready = ready
        self.max_state = max_state
        self.ch: Channel | None = None
        self.epoch = 0
        self.vm = ""
        self.report: dict[str, Any] = {"role": "destination", "storage": storage}

    # ------------------------------------------------------------------ helpers

    def _recv(self, timeout: float) -> Frame:
        """The next frame but PING/PONG (PING is answered). :class:`PeerLost` when the heartbeat
        runs and no frame came for ``peer_dead``."""
        assert self.ch is not None
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise PeerTimeout("timed out")
            step = left
            if self.ch.heartbeat:
                step = min(step, max(0.01, self.t.peer_dead - self.ch.silence()), 0.1)
            try:
                f = self.ch.recv(step)
            except PeerTimeout:
                # judged only after a read: frames may have waited while this side was busy
                if self.ch.heartbeat and self.ch.silence() >= self.t.peer_dead:
                    raise PeerLost(
                        f"no frame from the source for {self.t.peer_dead:g} s (heartbeat)"
                    ) from None
                if step < left:
                    continue
                raise
            if f.type in (Msg.PING, Msg.PONG):
                self.ch.pong(f)
                continue
            return f

    def _send_fail(self, msg: Msg, reason: str) -> None:
        if self.ch is not None and self.ch.session is not None:
            self.ch.try_send(msg, {"reason": reason, "phase": self.phases.current})

    def _node_counts(self) -> dict[str, dict[str, int]]:
        assert self.m is not None
        out = {}
        for name, node in self.m.iter_nodes():
            st = node.stats()
            out[name] = {"reads": st["reads"], "writes": st["writes"]}
        return out

    def _check_untouched(self, where: str) -> None:
        for name, c in self._node_counts().items():
            if c["reads"] or c["writes"]:
                raise _Gone(
                    f"{name}: {c['reads']} reads / {c['writes']} writes before activation"
                    f" ({where})",
                    self.phases.current,
                )

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        server = listen(self.uri)
        try:
            if self.ready is not None:
                self.ready(self.uri)
            self.phases.enter("listening")
            server.settimeout(max(0.01, self.deadline.left()))
            try:
                conn, _ = server.accept()
            except TimeoutError:
                raise MigrationError(
                    "no source connected before the timeout", phase="listening"
                ) from None
            if parse_uri(self.uri)[0] == "tcp":
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            server.close()
            kind, addr = parse_uri(self.uri)
            if kind == "unix":
                import os

                try:
                    os.unlink(addr)
                except OSError:
                    pass
        self.ch = Channel(conn, session=None)
        try:
            return self._run()
        except _Gone as g:
            self._give_up()
            err = MigrationError(g.args[0], phase=g.phase, source_resumed=False)
            if g.cause is not None:
                raise err from g.cause
            raise err from None
        finally:
            self.ch.close()

    def _give_up(self) -> None:
        """D_GONE: nodes inactive, nothing written (a mirror's partial copies are emptied)."""
        if self.mirror is not None:
            self.mirror.discard()
            self.mirror = None
            self.report["discarded"] = True
        if self.m is None:
            return
        try:
            self.m.inactivate()
        except BlockemuError:
            pass
        self.m.set_state("failed")

    def _stream_error(self, e: Exception, what: str) -> _Gone:
        if isinstance(e, ProtocolError):
            self._send_fail(Msg.LOAD_FAILED, str(e))
            return _Gone(f"{what}: bad stream: {e}", self.phases.current, StateError(str(e)))
        return _Gone(f"{what}: {e}", self.phases.current, e)

    def _run(self) -> dict[str, Any]:
        assert self.ch is not None
        # ---------------------------------------------------------- HELLO / prepare
        self.phases.enter("negotiating")
        try:
            f = self._recv(self.deadline.cap(self.t.connect))
        except (PeerLost, ProtocolError) as e:
            raise self._stream_error(e, "waiting for HELLO") from None
        if f.type != Msg.HELLO:
            self._send_fail(Msg.REFUSE, f"expected HELLO, got {f.type.name}")
            raise _Gone(f"expected HELLO, got {f.type.name}", "negotiating")
        try:
            hello = f.json()
            versions = [int(v) for v in hello.get("versions", [])]
            self.epoch = int(hello["epoch"])
            images = list(hello["images"])
            devices = dict(hello["devices"])
            self.vm = str(hello.get("vm", ""))
            storage = str(hello.get("storage", "shared"))
        except (ProtocolError, KeyError, TypeError, ValueError) as e:
            self._send_fail(Msg.REFUSE, f"malformed HELLO: {e}")
            raise _Gone(f"malformed HELLO: {e}", "negotiating", StateError(str(e))) from None
        if f.epoch != self.epoch:
            self._send_fail(Msg.REFUSE, "HELLO epoch mismatch")
            raise _Gone("HELLO frame epoch differs from its payload", "negotiating")
        if 1 not in versions:
            self._send_fail(Msg.REFUSE, f"no common protocol version (offered {versions})")
            raise _Gone(f"no common protocol version (offered {versions})", "negotiating")
        if storage != self.storage:
            reason = (
                f"the source migrates with storage={storage!r}, this side expects {self.storage!r}"
            )
            self._send_fail(Msg.REFUSE, reason)
            raise _Gone(reason, "negotiating")
        self.ch.epoch = self.epoch
        self.report["session"] = f.session.hex()
        self.report["epoch_before"] = self.epoch

        self.phases.enter("preparing")
        try:
            if self.m is None:
                assert callable(self.source)
                self.m = self.source()
            self._prepare(images, devices)
            offer = self._prepare_mirror(images) if self.storage == "mirror" else None
        except _Gone as g:
            self._send_fail(Msg.PREPARE_FAILED, str(g))
            raise
        except (OSError, BlockemuError, ValueError) as e:
            self._send_fail(Msg.PREPARE_FAILED, f"{type(e).__name__}: {e}")
            raise _Gone(f"prepare failed: {e}", "preparing", e) from None
        m = self.m
        m.set_state("inmigrate")
        ack: dict[str, Any] = {
            "version": 1,
            "prepared": self._node_counts(),
            "host": socket.gethostname(),
        }
        if offer is not None:
            ack["mirror"] = offer
        self.ch.send(Msg.HELLO_ACK, ack)
        if offer is not None:
            # the copy takes a while: heartbeats from here show both sides are alive
            self.ch.start_heartbeat(self.t.heartbeat_interval)

        # ---------------------------------------------------------- loading
        if self.mirror is None:
            self.phases.enter("loading")
        limit = self.max_state
        if limit is None:
            ram = sum(d.size for d in m.devices.values() if isinstance(d, GuestMemory))
            limit = 2 * ram + (16 << 20)
        buf = bytearray()
        mirroring = self.mirror is not None
        if mirroring:
            self.phases.enter("mirroring")
        try:
            while True:
                if mirroring:
                    # the source copies the disks, then stops the guest and sends the state
                    f = self._recv(self.t.mirror)
                    if f.type in (Msg.DEVICE_STATE, Msg.DEVICE_STATE_DONE):
                        mirroring = False
                        self.deadline = Deadline(self.timeout)  # the switchover's own budget
                        self.phases.enter("loading")
                else:
                    f = self._recv(self.deadline.cap(self.t.peer_silence + self.t.state_loaded))
                if f.type == Msg.DEVICE_STATE:
                    if len(buf) + len(f.payload) > limit:
                        raise ProtocolError(f"device state larger than the bound ({limit} bytes)")
                    buf += f.payload
                    continue
                if f.type == Msg.DEVICE_STATE_DONE:
                    done = f.json()
                    break
                if f.type == Msg.ABORT:
                    reason = f.json().get("reason", "")
                    raise _Gone(
                        f"the source aborted during the {self.phases.current}: {reason}",
                        self.phases.current,
                    )
                raise ProtocolError(f"unexpected {f.type.name} in the state stream")
            if int(done.get("length", -1)) != len(buf):
                raise ProtocolError(f"state length {len(buf)} != announced {done.get('length')}")
            if hashlib.sha256(buf).hexdigest() != done.get("sha256"):
                raise ProtocolError("state digest mismatch")
            split = done.get("state_length")
            if not isinstance(split, int) or not 0 <= split <= len(buf):
                raise ProtocolError(f"bad state_length {split!r}")
            try:
                cpu = json.loads(bytes(buf[split:]).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ProtocolError(f"vCPU state is not JSON: {e}") from None
            if not isinstance(cpu, dict):
                raise ProtocolError("vCPU state is not an object")
            del buf[split:]
        except (PeerLost, ProtocolError) as e:
            raise self._stream_error(e, "receiving the device state") from None
        try:
            m.load_state(bytes(buf))
            m.load_cpu_state(cpu)
        except StateError as e:
            self._send_fail(Msg.LOAD_FAILED, str(e))
            raise _Gone(f"device state rejected: {e}", "loading", e) from None
        self.report["state_bytes"] = len(buf)
        self.report["geometry"] = geometry_of(m)
        self._check_untouched("after load")
        kill_point("dst:after_loaded")
        self.ch.send(Msg.STATE_LOADED, {"geometry": self.report["geometry"]})
        # the switchover: heartbeats from here to the end (§12.5)
        self.ch.start_heartbeat(self.t.heartbeat_interval)

        # ---------------------------------------------------------- D_LOADED
        self.phases.enter("loaded")
        try:
            f = self._recv(self.deadline.cap(self.t.wait_inactive))
        except (PeerLost, ProtocolError) as e:
            # timeout or peer loss (the heartbeat): give up, safe, nothing was read or written
            # Never activate without SOURCE_INACTIVE, even when the lock became free.
            raise self._stream_error(e, "waiting for SOURCE_INACTIVE") from None
        if f.type == Msg.ABORT:
            self._give_up()
            self.ch.try_send(Msg.ABORT_ACK, {})
            raise _Gone("the source aborted before SOURCE_INACTIVE", "loaded")
        if f.type != Msg.SOURCE_INACTIVE:
            self._send_fail(Msg.ABORT, f"unexpected {f.type.name}")
            raise _Gone(f"unexpected {f.type.name} while waiting for SOURCE_INACTIVE", "loaded")
        try:
            inactive = f.json()
            sent_images = dict(inactive["images"])
            ok_epoch = int(inactive["epoch"]) == self.epoch and f.epoch == self.epoch
        except (ProtocolError, KeyError, TypeError, ValueError) as e:
            self._send_fail(Msg.ABORT, "malformed SOURCE_INACTIVE")
            raise _Gone(f"malformed SOURCE_INACTIVE: {e}", "loaded", StateError(str(e))) from None
        if not ok_epoch:
            self._send_fail(Msg.ABORT, "SOURCE_INACTIVE of another epoch")
            raise _Gone("SOURCE_INACTIVE of another epoch (stale or replayed)", "loaded")
        self.report["reads_before_activation"] = {
            k: v["reads"] for k, v in self._node_counts().items()
        }
        self.report["writes_before_activation"] = {
            k: v["writes"] for k, v in self._node_counts().items()
        }
        self._check_untouched("at SOURCE_INACTIVE")
        if self.mirror is not None:
            # the source's last mirror writes are flushed: end the export and let go of the
            # export nodes' write lock, as a shared-storage source does at inactivation
            try:
                self.mirror.close()
            except BlockemuError as e:
                self._give_up()
                self._send_fail(Msg.DEST_ACTIVATION_FAILED, f"closing the mirror target: {e}")
                raise _Gone(f"closing the mirror target failed: {e}", "loaded", e) from None
            self.report["mirror"] = self.mirror.stats()
            self.mirror = None

        # ---------------------------------------------------------- D_ACTIVATING
        self.phases.enter("activating")
        t0 = time.monotonic()
        problem = self._activate(sent_images)
        if problem is not None:
            self._give_up()
            self._send_fail(Msg.DEST_ACTIVATION_FAILED, problem)
            raise _Gone(f"activation failed: {problem}", "activating")
        self.report["activation_ms"] = round((time.monotonic() - t0) * 1000, 3)
        self.ch.try_send(Msg.DEST_ACTIVATED, {})
        kill_point("dst:after_activated")

        # ---------------------------------------------------------- D_ACTIVATED
        self.phases.enter("activated")
        # A pending ABORT (operator cancel) wins over the commit: read what has arrived
        # (heartbeats included). Silence or a lost source does not stop the commit: with
        # SOURCE_INACTIVE the destination has everything (§13 scenario 12).
        while True:
            try:
                f = self.ch.recv(0.005)
            except PeerLost:
                break  # nothing pending, or the source is gone: what we have is complete
            except ProtocolError as e:
                self._give_up()
                self._send_fail(Msg.DEST_ACTIVATION_FAILED, f"bad frame before commit: {e}")
                raise _Gone(
                    f"bad frame before the commit: {e}", "activated", StateError(str(e))
                ) from None
            if f.type == Msg.ABORT:
                self._give_up()
                self.ch.try_send(Msg.ABORT_ACK, {})
                raise _Gone("the source cancelled before the commit", "activated")
            self.ch.pong(f)

        # ---------------------------------------------------------- commit point
        self.phases.enter("committing")
        new_epoch = self.epoch + 1
        for path in self.records.values():
            if path is None:
                continue  # simple mode for this image: no record
            write_record_at(
                path,
                OwnerRecord(
                    vm=self.vm,
                    owner=INSTANCE_ID,
                    role="destination",
                    epoch=new_epoch,
                    session=self.report["session"],
                ),
            )
        self.report["epoch"] = new_epoch
        self.ch.epoch = self.epoch  # frames keep the session's epoch
        if self.autostart:
            m.start()
        else:
            m.inactivate()
            m.set_state("paused")
        self.phases.enter("running" if self.autostart else "paused")
        self.ch.try_send(
            Msg.DEST_COMMITTED,
            {
                "epoch": new_epoch,
                "report": {
                    k: self.report[k]
                    for k in (
                        "reads_before_activation",
                        "writes_before_activation",
                        "activation_ms",
                        "geometry",
                    )
                },
            },
        )
        kill_point("dst:after_commit")
        try:
            f = self._recv(self.deadline.cap(self.t.commit_ack))
            self.report["commit_ack"] = f.type == Msg.COMMIT_ACK
        except (PeerLost, ProtocolError):
            self.report["commit_ack"] = False
        self.report["outcome"] = "completed"
        self.report["phases"] = self.phases.finish()
        self.report["bytes_received"] = self.ch.bytes_received
        self.report["bytes_sent"] = self.ch.bytes_sent
        self.report["pings_sent"] = self.ch.pings_sent
        return self.report

    def _prepare(self, images: list[Any], devices: dict[str, Any]) -> None:
        m = self.m
        assert m is not None
        mine = {name: type(dev).__name__ for name, dev in m.devices.items()}
        if mine != devices:
            raise _Gone(f"device set differs: source {devices}, destination {mine}", "preparing")
        nodes = m.nodes
        names = {str(img.get("name")) for img in images}
        if names != set(nodes):
            raise _Gone(f"image set differs: {sorted(names)} vs {sorted(nodes)}", "preparing")
        node_images = {n: node.name for n, node in nodes.items()}
        if self.storage == "mirror":
            # this side's own disks: the source could not read a record here (simple mode)
            self.records = {n: None for n in nodes}
        else:
            self.records = resolve_records(node_images, self.records_arg)
        simple = any(p is None for p in self.records.values())
        self.report["ownership"] = "simple" if simple else "fenced"
        for img in images:
            node = nodes[str(img["name"])]
            if node.active:
                raise _Gone(
                    f"{img['name']}: destination nodes must be opened active=False", "preparing"
                )
            if self.storage != "mirror" and node.format != img.get("format"):
                raise _Gone(
                    f"{img['name']}: format {node.format} != source's {img.get('format')}",
                    "preparing",
                )
            if (
                self.storage != "mirror"
                and node.size is not None
                and img.get("size") is not None
                and node.size != img["size"]
            ):
                raise _Gone(
                    f"{img['name']}: size {node.size} != source's {img['size']}", "preparing"
                )
            path = self.records[str(img["name"])]
            rec = None if path is None else read_record_at(path)
            if rec is not None and rec.epoch > self.epoch:
                raise _Gone(
                    f"{img['name']}: ownership record epoch {rec.epoch} is newer than the"
                    f" source's {self.epoch} (stale source)",
                    "preparing",
                )
        self._check_untouched("prepare")

    def _prepare_mirror(self, images: list[Any]) -> dict[str, Any]:
        """storage="mirror": empty each target image and export it for the source's copy."""
        assert self.m is not None
        nodes = self.m.nodes
        targets = {}
        for img in images:
            size = img.get("size")
            if not isinstance(size, int) or size <= 0:
                raise ValueError(f"{img.get('name')}: the source sent no size")
            targets[str(img["name"])] = (nodes[str(img["name"])], size)
        self.mirror = MirrorTarget(self.nbd_address)
        try:
            offer = self.mirror.prepare(targets)
        except BaseException:
            self._give_up()
            raise
        self.report["nbd"] = self.mirror.server.address if self.mirror.server else None
        return offer

    def _activate(self, sent: dict[str, Any]) -> str | None:
        m = self.m
        assert m is not None
        end = time.monotonic() + self.deadline.cap(self.t.lock)
        delay = 0.01
        while True:
            try:
                m.activate()
                break
            except LockError as e:
                if time.monotonic() + delay >= end:
                    return f"write lock unavailable: {e}"
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
            except (OSError, BlockemuError) as e:
                return f"{type(e).__name__}: {e}"
        try:
            for name, node in m.iter_nodes():
                path = self.records.get(name)
                rec = None if path is None else read_record_at(path)
                if rec is not None and rec.epoch != self.epoch:
                    return f"{name}: ownership record epoch {rec.epoch}, expected {self.epoch}"
                if name not in sent:
                    return f"{name}: not in SOURCE_INACTIVE"
                problem = verify(node, sent[name])
                if problem is not None:
                    return f"{name}: {problem}"
        except (OSError, BlockemuError, ValueError) as e:
            return f"verification failed: {e}"
        return None


def incoming(
    machine: MachineSource,
    uri: str,
    *,
    timeout: float = 30.0,
    timeouts: Timeouts | None = None,
    autostart: bool = True,
    on_phase: Callable[[str], None] | None = None,
    ready: Callable[[str], None] | None = None,
    max_state: int | None = None,
    records: Records | None = None,
    storage: str = "shared",
    nbd_address: str | None = None,
) -> dict[str, Any]:
    """Receives a migration on ``uri``. ``records`` maps node names to ownership record paths
    (the same as the source's). ``storage="mirror"``: the machine's disks are this side's own
    images, emptied at prepare and filled by the source's mirror through an NBD export on
    ``nbd_address`` (default: beside ``uri``); a failed migration empties them again.
    See :mod:`blockemu.migration`."""
    if storage not in ("shared", "mirror"):
        raise ValueError("storage is 'shared' or 'mirror'")
    if storage == "mirror" and records:
        raise ValueError("ownership records apply to shared storage, not storage='mirror'")
    dst = _Destination(
        machine,
        uri,
        timeout,
        timeouts or Timeouts(),
        autostart,
        on_phase,
        ready,
        max_state,
        records,
        storage,
        nbd_address,
    )
    return dst.run()
