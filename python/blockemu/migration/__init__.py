"""Live migration of a :class:`~blockemu.Machine` between two processes (specs/migration.md §12).

:func:`migrate` (source) and :func:`incoming` (destination) speak a framed protocol
(:mod:`blockemu.migration.frames`) over ``tcp:HOST:PORT`` or ``unix:PATH``::

    HELLO → HELLO_ACK | REFUSE | PREPARE_FAILED     (the destination prepares: no image reads)
    [source stops the guest, drains, flushes]
    DEVICE_STATE… DEVICE_STATE_DONE → STATE_LOADED | LOAD_FAILED
    [source: witnesses, inactivate = flush + release the write lock]
    SOURCE_INACTIVE → DEST_ACTIVATED | DEST_ACTIVATION_FAILED
    [destination: ownership record owner=destination, epoch N+1 — the commit point]
    DEST_COMMITTED → COMMIT_ACK
    ABORT → ABORT_ACK (either side)
    PING → PONG (either side, from STATE_LOADED to the end: the switchover heartbeat)

HELLO and PREPARE of the spec are merged (HELLO carries the image list; HELLO_ACK means
PREPARED). Guarantees: the destination reads and writes nothing before SOURCE_INACTIVE and never
activates without it; the source resumes only while it still owns its images, or after it took the
write lock back and found the ownership record (:mod:`blockemu.migration.ownership`) unchanged; a
timeout only ever moves a side to a safer state. A source that cannot tell whether the destination
committed stays paused with inactive images ("in doubt") and raises :class:`MigrationError` with
``source_resumed=False``; when the record shows the destination committed, the source retires and
:func:`migrate` returns the report with ``resolved_by="ownership record"``.

Ownership records and NBD (spec §12.4 modes): by default each node's record is ``<image>.owner``
beside its image file, and the source, once in doubt, takes the write lock back before it reads
the record. An NBD node (``nbd://``, ``nbd+unix://``) has neither a file here nor a lock: the
coordinator alone keeps a single writer. Give its record a path with ``records={node name: path}``
(node names as :meth:`Machine.iter_nodes` yields them, e.g. ``"vblk0"``, ``"ide0.master"``; the
same mapping on both sides, on storage both hosts see): that is fenced mode without the lock; an
in-doubt source polls the record (up to ``Timeouts.in_doubt``) and retires when it shows the
destination's commit, and otherwise stays in doubt; it never reclaims NBD images on its own,
since no lock stops a slow destination from committing later (a definite DEST_ACTIVATION_FAILED
or ABORT_ACK still lets it reclaim). Without a record for an NBD node the migration runs in
simple mode (reported as ``"ownership": "simple"``): the handover is the same, but an in-doubt
source never resolves automatically; an operator decides. ``records`` may name file-backed nodes
too (the record then lives at that path instead of beside the image).

Heartbeats (spec §12.5): from STATE_LOADED (the guest is stopped and its state is on the
destination) until the end, each side sends PING every ``Timeouts.heartbeat_interval`` and answers
PING with PONG. A side that hears no frame for ``Timeouts.peer_dead`` takes the peer-loss
transition of its state: the source after SOURCE_INACTIVE goes in doubt (it never resumes on its
own: only the ownership record, read under the write lock, can let it reclaim); the destination
waiting for SOURCE_INACTIVE gives up (it has read and written nothing); a destination that has
SOURCE_INACTIVE activates and commits on its own, and after the commit it keeps running.

Without shared storage (``storage="mirror"`` on both :func:`migrate` and :func:`incoming`): the
destination's machine has disks of its own (local image files of the source's size, opened
``active=False``; any format). Prepare empties them and exports each over NBD (an
:class:`~blockemu.NbdServer` beside the migration listener, one random export name per disk, sent
in HELLO_ACK); the source runs a :class:`~blockemu.MirrorJob` per disk into those exports while
the guest keeps running (heartbeats from HELLO_ACK on), waits until the dirty remainder has
converged (:class:`~blockemu.migration.mirror.MirrorOptions`), then stops the guest, copies the
rest, and hands over exactly as with shared storage: the destination's own disk nodes read and
write nothing before activation (the mirror writes through separate export nodes, closed before
activation), and the witness digests check the copy. Every failure before SOURCE_INACTIVE leaves
the source running on its images and the destination empties its partial copies (the report says
``discarded``). Ownership records do not apply (neither side could read the other's), so an
in-doubt source stays paused for an operator, as in simple mode. Why NBD and not the migration
channel: see :mod:`blockemu.migration.mirror`.

Test hook: ``BLOCKEMU_MIGRATION_KILL_AT=<point>`` SIGKILLs the process at a named point:
``src:after_hello``, ``src:mid_state`` (after the first DEVICE_STATE frame),
``src:inactivating`` (after the final flush, before the images are released),
``src:after_source_inactive``, ``dst:after_loaded``, ``dst:after_activated`` (before the
ownership record), ``dst:after_commit``.
"""

from __future__ import annotations

from blockemu.migration.common import KILL_ENV, Timeouts
from blockemu.migration.destination import incoming
from blockemu.migration.frames import Msg, ProtocolError
from blockemu.migration.mirror import MirrorOptions
from blockemu.migration.ownership import OwnerRecord, Records, read_record, read_record_at
from blockemu.migration.source import migrate

__all__ = [
    "KILL_ENV",
    "MirrorOptions",
    "Msg",
    "OwnerRecord",
    "ProtocolError",
    "Records",
    "Timeouts",
    "incoming",
    "migrate",
    "read_record",
    "read_record_at",
]
