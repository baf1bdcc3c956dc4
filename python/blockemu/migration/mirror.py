"""Migration without shared storage: the disk is mirrored while the guest runs.

The transport is NBD, as in QEMU's drive-mirror migration: the destination exports each target
image on an :class:`~blockemu.NbdServer` of its own and the source writes to it with the NBD
client a :class:`~blockemu.MirrorJob` drives. Why not the migration channel:

- the bulk copy never queues behind (or in front of) control frames: heartbeats, PREPARE and
  the device state keep their latency while hundreds of megabytes move;
- many requests are in flight on the pipelined NBD client, and holes travel as
  ``WRITE_ZEROES`` (or not at all: the target starts empty) rather than as data;
- the export is a standard protocol, so the copy can be checked with ``qemu-img``/``qemu-io``
  and a real QEMU could be either end of it.

The cost is a second connection. NBD has no authentication: each export name is a 128-bit
random token that only travels on the migration channel, and the export exists only while the
migration does (no TLS: see the README).

Destination: the guest's nodes stay inactive (zero reads, zero writes, as with shared storage).
A *separate* active node per image (the export node, on the same file) receives the mirror's
writes; it is flushed and closed before the guest's node is activated, exactly like a source
handing over shared storage. Prepare empties each target image first (the mirror then skips
what is zero); a failed migration empties it again (``discarded``), so a partial copy is never
mistaken for the disk.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockemu._core import (
    BlockNode,
    MirrorJob,
    NbdServer,
    create_image,
    image_info,
    open_image,
)
from blockemu.errors import BlockemuError

__all__ = ["MirrorOptions", "MirrorSource", "MirrorTarget", "format_progress"]


@dataclass(frozen=True)
class MirrorOptions:
    """How the source mirrors its disks (``migrate(..., storage="mirror", mirror=...)``).

    ``speed`` caps the copy in bytes per second (0: no cap) so the guest is not starved;
    ``converge_bytes`` is the dirty remainder (per disk) below which the copy counts as
    converged and the guest is stopped; ``max_downtime`` (seconds), when set, also counts it
    converged when the remainder would copy within that time at the measured rate.
    ``nbd_timeout`` bounds each NBD request (a stalled destination fails the copy)."""

    speed: int = 0
    converge_bytes: int = 1 << 20
    max_downtime: float | None = None
    max_in_flight: int = 8
    chunk_size: int = 1 << 20
    granularity: int = 64 << 10
    nbd_timeout: float = 10.0


def nbd_listen_address(migration_uri: str) -> str:
    """Where the destination's NBD server listens, next to the migration listener: the same
    host on an ephemeral port, or a socket beside the migration socket."""
    kind, _, rest = migration_uri.partition(":")
    if kind == "unix":
        return f"unix:{rest}.nbd"
    host = rest.rpartition(":")[0] or "0.0.0.0"
    return f"tcp:{host}:0"


def _export_uri(migration_uri: str, server: dict[str, Any], export: str) -> str:
    """The URI the source connects to: the host it reached the destination on (the server may
    listen on a wildcard address) with the server's port, or the server's Unix socket."""
    kind, _, rest = migration_uri.partition(":")
    name = urllib.parse.quote(export, safe="")
    if "socket" in server:
        return f"nbd+unix:///{name}?socket={server['socket']}"
    host = rest.rpartition(":")[0] if kind == "tcp" else "127.0.0.1"
    if ":" in host.strip("[]"):
        host = f"[{host.strip('[]')}]"
    return f"nbd://{host}:{int(server['port'])}/{name}"


class MirrorTarget:
    """The destination's half: empty target images exported over NBD for the mirror."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.server: NbdServer | None = None
        self.exports: dict[str, BlockNode] = {}  # image name → its export node
        self.paths: dict[str, tuple[str, str, int]] = {}  # image name → (path, format, size)
        self.closed_stats: dict[str, Any] = {}

    def prepare(self, images: dict[str, tuple[BlockNode, int]]) -> dict[str, Any]:
        """Empties each target image (``images``: name → (the guest's inactive node, the
        source's size)), opens its export node and starts the server. Returns what the source
        needs: the server's port or socket and one random export name per image."""
        for name, (node, size) in images.items():
            path = node.name
            if not os.path.isfile(path):
                raise ValueError(f"{name}: a mirror target must be a local image file ({path})")
            fmt = node.format
            self.paths[name] = (path, fmt, size)
            _empty(path, fmt, size)
        self.server = NbdServer(self.address)
        out: dict[str, Any] = {"exports": {}}
        addr = self.server.address
        kind, _, rest = addr.partition(":")
        if kind == "unix":
            out["socket"] = rest
        else:
            out["port"] = int(rest.rpartition(":")[2])
        for name, (path, fmt, size) in self.paths.items():
            export = open_image(path, format="qcow2" if fmt == "qcow2" else "raw", active=True)
            if export.size != size:
                export.close()
                raise ValueError(f"{name}: target size {export.size} != source's {size}")
            self.exports[name] = export
            token = secrets.token_hex(16)
            self.server.add_export(token, export, writable=True)
            out["exports"][name] = token
        out["zeroed"] = True
        return out

    def stats(self) -> dict[str, Any]:
        if self.server is None:
            return dict(self.closed_stats)
        return dict(self.server.stats())

    def close(self) -> None:
        """Ends the export: disconnects the source, flushes and closes the export nodes (their
        write lock goes, as a shared-storage source's does at inactivation)."""
        if self.server is not None:
            self.closed_stats = dict(self.server.stats())
            self.server.close(timeout=10.0)
            self.server = None
        errors = []
        for export in self.exports.values():
            try:
                if not export.closed:
                    export.flush()
                    export.close()
            except BlockemuError as e:
                errors.append(e)
        self.exports = {}
        if errors:
            raise errors[0]

    def discard(self) -> None:
        """A failed migration: the partial copies are emptied again."""
        try:
            self.close()
        except BlockemuError:
            pass
        for path, fmt, size in self.paths.values():
            try:
                _empty(path, fmt, size)
            except (BlockemuError, OSError):
                pass


def _empty(path: str, fmt: str, size: int) -> None:
    """Makes the image at ``path`` an empty one of ``size`` bytes, in place (the guest's
    inactive node keeps its open file and reads nothing until activation)."""
    if fmt == "qcow2":
        create_image(path, size, format="qcow2")
        return
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 0)
        os.ftruncate(f.fileno(), size)
        os.fsync(f.fileno())
    if image_info(path)["virtual_size"] != size:
        raise ValueError(f"{path}: could not empty the target")


class MirrorSource:
    """The source's half: one :class:`MirrorJob` per disk, from the guest's node to the
    destination's export through an NBD client node."""

    def __init__(
        self,
        nodes: dict[str, BlockNode],
        migration_uri: str,
        offer: dict[str, Any],
        opts: MirrorOptions,
    ) -> None:
        self.jobs: dict[str, MirrorJob] = {}
        self.targets: list[BlockNode] = []
        self.opts = opts
        exports = offer.get("exports")
        if not isinstance(exports, dict) or set(exports) != set(nodes):
            raise ValueError(f"the destination exports {exports!r}, expected {sorted(nodes)}")
        try:
            for name, node in nodes.items():
                uri = _export_uri(migration_uri, offer, str(exports[name]))
                target = open_image(uri, format="raw", timeout=opts.nbd_timeout)
                self.targets.append(target)
                self.jobs[name] = MirrorJob(
                    node,
                    target,
                    granularity=opts.granularity,
                    chunk_size=opts.chunk_size,
                    max_in_flight=opts.max_in_flight,
                    speed=opts.speed,
                    converge_bytes=opts.converge_bytes,
                    max_downtime=opts.max_downtime,
                    target_zeroed=bool(offer.get("zeroed")),
                    sparse=True,
                )
        except BaseException:
            self.cancel()
            raise
        self.started = time.monotonic()

    def progress(self) -> dict[str, Any]:
        """Totals over the disks (bytes, passes, the dirty remainder and rate) plus each disk."""
        per = {name: job.progress() for name, job in self.jobs.items()}
        total: dict[str, Any] = {
            "bytes_total": sum(p["bytes_total"] for p in per.values()),
            "bytes_done": sum(p["bytes_done"] for p in per.values()),
            "bytes_copied": sum(p["bytes_copied"] for p in per.values()),
            "bytes_zero": sum(p["bytes_zero"] for p in per.values()),
            "dirty_bytes": sum(p["dirty_bytes"] for p in per.values()),
            "dirty_rate": sum(p["dirty_rate"] for p in per.values()),
            "throughput": sum(p["throughput"] for p in per.values()),
            "passes": max((p["passes"] for p in per.values()), default=0),
            "elapsed": time.monotonic() - self.started,
            "ready": all(p["state"] == "ready" for p in per.values()),
            "disks": per,
        }
        states = {p["state"] for p in per.values()}
        for bad in ("failed", "cancelled"):
            if bad in states:
                total["state"] = bad
                total["error"] = next(
                    f"{n}: {p['error']}" for n, p in per.items() if p["state"] == bad
                )
                break
        else:
            phase = "bulk" if "bulk" in states else "dirty"
            total["state"] = "ready" if total["ready"] else phase
        return total

    def wait_ready(
        self,
        timeout: float,
        poll: Callable[[], None],
        on_progress: Callable[[dict[str, Any]], None] | None,
        interval: float = 0.1,
    ) -> dict[str, Any]:
        """Waits until every disk has converged. ``poll`` runs between checks (the coordinator
        answers heartbeats and watches for cancel there; it raises to stop). Raises the job's
        error when one fails, ``TimeoutError`` when the copy did not converge in ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            prog = self.progress()
            if on_progress is not None:
                on_progress(prog)
            if prog["state"] in ("failed", "cancelled"):
                # wait_ready raises the job's own typed error
                for job in self.jobs.values():
                    job.wait_ready(0)
                raise RuntimeError(prog.get("error", "mirror failed"))
            if prog["ready"]:
                return prog
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"the mirror did not converge in {timeout:g} s: "
                    f"{prog['dirty_bytes']} bytes dirty, dirtied at {prog['dirty_rate']:.0f} B/s,"
                    f" copied at {prog['throughput']:.0f} B/s"
                )
            poll()
            # wait on one job a little (releases the GIL); the others are checked next round
            for job in self.jobs.values():
                if not job.progress()["state"] == "ready":
                    job.wait_ready(min(interval, max(0.0, left)))
                    break

    def flush_targets(self) -> None:
        """Makes what was copied so far durable on the destination while the guest still runs,
        so that the flush at the stop only covers the last few blocks."""
        for target in self.targets:
            target.flush()

    def complete(self, timeout: float) -> dict[str, Any]:
        """The guest is stopped: copy what is still dirty, flush the targets, end the jobs."""
        end = time.monotonic() + timeout
        before = sum(job.progress()["bytes_done"] for job in self.jobs.values())
        finals = {}
        for name, job in self.jobs.items():
            finals[name] = job.complete(max(0.001, end - time.monotonic()))
        for target in self.targets:
            target.close()
        self.targets = []
        return {
            "final_bytes": sum(p["bytes_done"] for p in finals.values()) - before,
            "bytes_copied": sum(p["bytes_copied"] for p in finals.values()),
            "bytes_zero": sum(p["bytes_zero"] for p in finals.values()),
            "passes": max((p["passes"] for p in finals.values()), default=0),
        }

    def cancel(self) -> None:
        """Stops every job (without waiting for a stalled request) and drops the NBD clients."""
        for job in self.jobs.values():
            try:
                job.cancel()
            except (BlockemuError, OSError):
                pass
        # Not closed here: a close would wait for a request stuck on a stalled destination.
        # The jobs hold their own references; the NBD connections go when the last one ends.
        self.jobs = {}
        self.targets = []


def format_progress(prog: dict[str, Any], width: int = 30) -> str:
    """One line of plain-text progress: bar, bytes, passes, dirty remainder and rate."""
    total = max(1, int(prog.get("bytes_total", 0)))
    done = min(total, int(prog.get("bytes_done", 0)))
    filled = width * done // total
    mib = 1 << 20
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}%"
        f" {done / mib:.0f}/{total / mib:.0f} MiB, pass {prog.get('passes', 0)},"
        f" dirty {prog.get('dirty_bytes', 0) / mib:.1f} MiB"
        f" ({prog.get('dirty_rate', 0) / mib:.1f} MiB/s),"
        f" {prog.get('throughput', 0) / mib:.0f} MiB/s"
    )
