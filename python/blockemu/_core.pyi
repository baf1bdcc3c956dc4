# Hand-written stubs of the native module blockemu._core; checked by mypy's stubtest.

from collections.abc import Sequence
from os import PathLike
from types import TracebackType
from typing import Literal, NotRequired, TypedDict, final

from typing_extensions import Buffer

from blockemu.geometry import GeometryReport
from blockemu.jobs import Job

__version__: str
__all__ = [
    "BlockNode",
    "DirtyBitmap",
    "FaultInjector",
    "Geometry",
    "GuestMemory",
    "IdeChannel",
    "IdeDisk",
    "JobHandle",
    "MirrorJob",
    "NbdServer",
    "VirtioBlk",
    "__version__",
    "check_frame",
    "chs_to_lba",
    "create_image",
    "decode_frame_header",
    "describe_state",
    "explain_geometry",
    "frame_crc",
    "guess_geometry",
    "image_info",
    "lba_to_chs",
    "load_state",
    "memory_node",
    "open_image",
    "save_state",
]

_Format = Literal["raw", "qcow2"]
_Cache = Literal["writeback", "writethrough", "none", "directsync", "unsafe"]

class _NodeStats(TypedDict):
    reads: int
    writes: int
    flushes: int
    discards: int
    write_zeroes: int
    bytes_read: int
    bytes_written: int
    errors: int
    cache_hits: int
    cache_bytes_read: int

class _NbdServerStats(TypedDict):
    connections: int
    active_connections: int
    refused: int
    requests: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    zero_writes: int
    trims: int
    flushes: int
    errors: int

class _TraceEntry(TypedDict):
    seq: int
    time_ns: int
    op: str
    offset: int
    length: int
    active: bool
    outcome: str

class _NodeLocks(TypedDict):
    held: list[str]
    unshared: list[str]

class _ImageInfo(TypedDict):
    path: str
    format: str
    virtual_size: int
    file_size: int
    allocated_size: int
    dirty: bool
    lock: str
    locks_held: list[str]
    locks_unshared: list[str]
    read_only: NotRequired[bool]

@final
class BlockNode:
    @property
    def size(self) -> int | None: ...
    @property
    def format(self) -> str: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def active(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def cache(self) -> str: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buffer: Buffer) -> int: ...
    def write(self, offset: int, data: Buffer) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> bool: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def read_async(self, offset: int, length: int) -> Job[bytes]: ...
    def write_async(self, offset: int, data: Buffer) -> Job[None]: ...
    def flush_async(self) -> Job[None]: ...
    def inactivate(self) -> None: ...
    def activate(self) -> None: ...
    def stats(self) -> _NodeStats:
        """Operations that reached the storage; reads a cache answered (host cache,
        copy-on-read) are counted in ``cache_hits``/``cache_bytes_read`` only."""
    def cached_blocks(self) -> int | None:
        """4 KiB blocks the caches under this node hold now (None: no cache)."""
    def add_dirty_bitmap(self, name: str, *, granularity: int = 65536) -> DirtyBitmap:
        """Adds an enabled dirty bitmap over the node (a power-of-two granularity >= 512; at
        most 64 bitmaps per node; not persisted). Every write, write_zeroes and discard marks
        it after the storage answered, success or failure."""
    def dirty_bitmap(self, name: str) -> DirtyBitmap:
        """The bitmap named ``name`` (KeyError if there is none)."""
    def remove_dirty_bitmap(self, name: str) -> None:
        """Removes a bitmap (KeyError if there is none; ValueError while a mirror owns it)."""
    def dirty_bitmaps(self) -> list[str]: ...
    def enable_trace(self, capacity: int = 4096) -> None: ...
    def disable_trace(self) -> None: ...
    def trace(self) -> list[_TraceEntry]: ...
    def clear_trace(self) -> None: ...
    def locks(self) -> _NodeLocks: ...
    def close(self) -> None: ...
    def __enter__(self) -> BlockNode: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class DirtyBitmap:
    @property
    def name(self) -> str: ...
    @property
    def granularity(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def enabled(self) -> bool: ...
    def enable(self) -> None: ...
    def disable(self) -> None: ...
    def count(self) -> int:
        """Dirty bytes (dirty granules times the granularity, clipped to the size)."""
    def is_dirty(self, offset: int) -> bool: ...
    def ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Merged dirty runs as (offset, length), clipped to the window."""
    def mark(self, offset: int, length: int) -> None: ...
    def clear(self, offset: int = 0, length: int | None = None) -> None:
        """Clears a granule-aligned range (or one ending at the end); all by default."""
    def merge(self, other: DirtyBitmap) -> None: ...

_MirrorState = Literal["bulk", "dirty", "ready", "completing", "completed", "failed", "cancelled"]

class _MirrorProgress(TypedDict):
    state: _MirrorState
    bytes_total: int
    bytes_done: int
    bytes_copied: int
    bytes_zero: int
    passes: int
    dirty_bytes: int
    dirty_rate: float
    throughput: float
    elapsed: float
    error: str | None

@final
class MirrorJob:
    """Copies a live source node to a target node of the same size (see the README)."""

    def __new__(
        cls,
        source: BlockNode,
        target: BlockNode,
        *,
        granularity: int = 65536,
        chunk_size: int = 1048576,
        max_in_flight: int = 8,
        speed: int = 0,
        converge_bytes: int = 1048576,
        max_downtime: float | None = None,
        target_zeroed: bool = False,
        sparse: bool = True,
    ) -> MirrorJob: ...
    @property
    def bitmap(self) -> str:
        """The name of the job's own dirty bitmap on the source."""
    def progress(self) -> _MirrorProgress: ...
    def wait_ready(self, timeout: float | None = None) -> bool: ...
    def set_speed(self, bytes_per_second: int) -> None: ...
    def complete(self, timeout: float | None = None) -> _MirrorProgress: ...
    def cancel(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...

def open_image(
    spec: str | PathLike[str],
    *,
    format: _Format | None = None,
    readonly: bool = False,
    active: bool = True,
    cache: _Cache = "writeback",
    force_share: bool = False,
    faults: FaultInjector | None = None,
    timeout: float | None = None,
    host_cache: bool = False,
    cor_cache: str | PathLike[str] | None = None,
    revalidate: bool = True,
) -> BlockNode:
    """Opens an image as a node.

    ``host_cache=True`` models this open as one NFS client of a file on weakly coherent
    shared storage: the node keeps its own copy of every 4 KiB page it read or wrote and serves
    it again even after another node or process wrote the file, until activation revalidates
    (close-to-open). ``cor_cache=PATH`` puts a copy-on-read cache file in front of the image
    (tags in ``PATH.tags``): reads fill it, writes go through; activation starts a new epoch
    and blocks cached before it are never served. ``revalidate=False`` keeps both caches
    across activation: the pre-2010 hazard, for demonstrations only."""

def memory_node(
    size: int, *, readonly: bool = False, faults: FaultInjector | None = None
) -> BlockNode: ...
def create_image(
    path: str | PathLike[str], size: int, *, format: _Format = "raw", lazy_refcounts: bool = False
) -> None: ...
def image_info(path: str | PathLike[str], *, timeout: float | None = None) -> _ImageInfo: ...

@final
class NbdServer:
    """An NBD server exporting BlockNodes: ``NbdServer("tcp:127.0.0.1:0")`` (port 0 =
    ephemeral; IPv6 as ``tcp:[::1]:0``) or ``NbdServer("unix:/path.sock")``. Requests go
    through the node, so its lifecycle applies (an inactive node answers EPERM)."""

    def __new__(cls, address: str) -> NbdServer: ...
    @property
    def address(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def add_export(self, name: str, node: BlockNode, *, writable: bool = True) -> str:
        """Returns the URI a client opens (``nbd://HOST:PORT/NAME`` or
        ``nbd+unix:///NAME?socket=PATH``)."""
    def remove_export(self, name: str) -> None: ...
    def exports(self) -> list[str]: ...
    def stats(self) -> _NbdServerStats: ...
    def close(self, timeout: float | None = None) -> None: ...
    def __enter__(self) -> NbdServer: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class GuestMemory:
    def __new__(cls, size: int) -> GuestMemory: ...
    @property
    def size(self) -> int: ...
    def __len__(self) -> int: ...
    def read(self, addr: int, n: int) -> bytes: ...
    def write(self, addr: int, data: Buffer) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __release_buffer__(self, buffer: memoryview, /) -> None: ...

_Op = Literal["read", "write", "flush", "discard", "write_zeroes"]

@final
class FaultInjector:
    def __new__(cls) -> FaultInjector: ...
    def set_latency(self, seconds: float, *, op: _Op | None = None) -> None: ...
    def fail_nth(
        self, n: int, *, op: _Op | None = None, count: int = 1, errno: int = 5
    ) -> None: ...
    def fail_range(
        self, offset: int, length: int, *, op: _Op | None = None, errno: int = 5
    ) -> None: ...
    def torn_write(self, n: int, keep: int) -> None: ...
    def stall(self) -> None: ...
    def release(self) -> None: ...
    def clear(self) -> None: ...
    @property
    def stalled(self) -> bool: ...
    @property
    def waiting(self) -> int: ...
    @property
    def injected(self) -> int: ...

@final
class JobHandle:
    def cancel(self) -> bool: ...
    @property
    def state(self) -> str: ...

_Translation = Literal["none", "lba", "large", "rechs"]
_TranslationRequest = Literal["auto", "none", "lba", "large", "rechs"]
_Device = Literal["ide", "ide-hd", "virtio", "virtio-blk", "scsi-hd"]

@final
class Geometry:
    """An immutable disk geometry: cylinders, heads, sectors per track and BIOS translation."""

    def __new__(
        cls, cyls: int, heads: int, secs: int, trans: _Translation = "none"
    ) -> Geometry: ...
    @property
    def cyls(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def secs(self) -> int: ...
    @property
    def trans(self) -> _Translation: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __lt__(self, other: Geometry, /) -> bool: ...
    def __le__(self, other: Geometry, /) -> bool: ...
    def __gt__(self, other: Geometry, /) -> bool: ...
    def __ge__(self, other: Geometry, /) -> bool: ...
    def __hash__(self) -> int: ...
    def __getnewargs__(self) -> tuple[int, int, int, _Translation]: ...

def guess_geometry(
    boot_sector: Buffer | None,
    total_sectors: int,
    *,
    cyls: int = 0,
    heads: int = 0,
    secs: int = 0,
    trans: _TranslationRequest = "auto",
    device: _Device = "ide",
) -> Geometry: ...
def explain_geometry(
    boot_sector: Buffer | None,
    total_sectors: int,
    *,
    cyls: int = 0,
    heads: int = 0,
    secs: int = 0,
    trans: _TranslationRequest = "auto",
    device: _Device = "ide",
) -> GeometryReport: ...
def chs_to_lba(geometry: Geometry, c: int, h: int, s: int) -> int: ...
def lba_to_chs(geometry: Geometry, lba: int) -> tuple[int, int, int]: ...

@final
class IdeDisk:
    """An IDE hard disk (QEMU ``ide-hd``) over a block node. Creating it reads nothing.

    ``discard`` is QEMU's drive option: ``"ignore"`` (default) completes DATA SET MANAGEMENT
    TRIM without touching the data, ``"unmap"`` discards the ranges on the node."""

    def __new__(
        cls,
        node: BlockNode,
        *,
        cyls: int = 0,
        heads: int = 0,
        secs: int = 0,
        trans: _TranslationRequest = "auto",
        serial: str | None = None,
        model: str | None = None,
        write_cache: bool = True,
        discard: Literal["ignore", "unmap", "off", "on"] = "ignore",
        geometry_policy: Literal["lazy", "eager"] = "lazy",
    ) -> IdeDisk:
        """``geometry_policy="eager"`` reads sector 0 now, even on an inactive node, and the
        result stands (migrated state does not replace it): QEMU before 2010, kept only to
        demonstrate the hazard. The default ``"lazy"`` reads nothing here."""
    @property
    def geometry(self) -> Geometry | None: ...
    @property
    def node(self) -> BlockNode: ...

@final
class IdeChannel:
    """An IDE channel: master and slave slots, IRQ line, optional bus master DMA."""

    def __new__(
        cls,
        master: IdeDisk | None = None,
        slave: IdeDisk | None = None,
        *,
        memory: GuestMemory | None = None,
    ) -> IdeChannel: ...
    @property
    def master(self) -> IdeDisk | None: ...
    @property
    def slave(self) -> IdeDisk | None: ...
    @property
    def memory(self) -> GuestMemory | None: ...
    def ioport_read(self, offset: int, size: int = 1) -> int: ...
    def ioport_write(self, offset: int, value: int, size: int = 1) -> None: ...
    def ctrl_read(self) -> int: ...
    def ctrl_write(self, value: int) -> None: ...
    def read_data(self, nbytes: int) -> bytes: ...
    def write_data(self, data: Buffer) -> int: ...
    @property
    def irq(self) -> bool: ...
    def wait_irq(self, timeout: float | None = None) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def drain(self, timeout: float | None = None) -> None: ...
    def bmdma_read(self, offset: int, size: int = 1) -> int: ...
    def bmdma_write(self, offset: int, value: int, size: int = 1) -> None: ...
    def save_state(self) -> bytes: ...
    def load_state(self, data: Buffer) -> None: ...

@final
class VirtioBlk:
    """A virtio-blk device on virtio-mmio (version 2): registers at 0x000-0x0ff, config space
    at 0x100. Requests run in the background; a QueueNotify never waits for storage.

    A reset (Status = 0) or QueueReset returns at once: requests already on the backend finish
    there but their completions are dropped (the old rings are never touched again). Until
    they have finished, Status reads back non-zero (QueueReset reads 1); a driver that waits
    for 0 knows the device no longer writes into its old buffers. ``mmio_read``/``mmio_write``
    raise ``ValueError`` only for the caller's bad offset/size/value; anything a guest writes
    has a device outcome (e.g. DEVICE_NEEDS_RESET, see ``needs_reset_reason``)."""

    def __new__(
        cls,
        node: BlockNode,
        memory: GuestMemory,
        *,
        queue_size: int = 256,
        num_queues: int = 1,
        serial: str | None = None,
        cyls: int = 0,
        heads: int = 0,
        secs: int = 0,
        features: int | None = None,
        max_in_flight: int = 0,
        geometry_policy: Literal["lazy", "eager"] = "lazy",
    ) -> VirtioBlk:
        """``geometry_policy="eager"``: see ``IdeDisk`` (demonstrations of the hazard only)."""
    @property
    def node(self) -> BlockNode: ...
    @property
    def memory(self) -> GuestMemory: ...
    @property
    def geometry(self) -> Geometry | None: ...
    @property
    def queue_size(self) -> int: ...
    @property
    def num_queues(self) -> int: ...
    @property
    def offered_features(self) -> int: ...
    @property
    def driver_features(self) -> int: ...
    @property
    def needs_reset_reason(self) -> str | None: ...
    def mmio_read(self, offset: int, size: int = 4) -> int: ...
    def mmio_write(self, offset: int, value: int, size: int = 4) -> None: ...
    @property
    def irq(self) -> bool: ...
    def wait_irq(self, timeout: float | None = None) -> bool: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def drain(self, timeout: float | None = None) -> None: ...
    def resize(self, size: int) -> None: ...
    def stats(self) -> dict[str, int | str | None]: ...
    def save_state(self) -> bytes: ...
    def load_state(self, data: Buffer) -> None: ...

class _SubsectionInfo(TypedDict):
    name: str
    version: int
    optional: bool
    size: int

class _SectionInfo(TypedDict):
    name: str
    kind: str
    instance: int
    version: int
    size: int
    subsections: list[_SubsectionInfo]

_StateDevice = IdeChannel | VirtioBlk | GuestMemory

def save_state(devices: Sequence[tuple[str, _StateDevice]]) -> bytes: ...
def load_state(devices: Sequence[tuple[str, _StateDevice]], data: Buffer) -> None: ...
def describe_state(data: Buffer) -> list[_SectionInfo]: ...

# Migration frames (blockemu.migration.frames); a refused frame raises its ProtocolError.
def decode_frame_header(head: Buffer) -> tuple[int, int, bytes, int, int, int]: ...
def check_frame(head: Buffer, payload: Buffer, crc: int) -> None: ...
def frame_crc(head: Buffer, payload: Buffer) -> int: ...
