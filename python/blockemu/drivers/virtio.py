"""A scripted virtio-blk guest driver for the virtio-mmio (version 2) transport.

:class:`VirtioBlkDriver` plays the guest: it negotiates features through the register file,
lays out a split virtqueue (descriptor table, available ring, used ring) in guest memory, builds
request chains there, notifies the device and collects used elements. Anything with
``mmio_read``/``mmio_write``/``irq``/``wait_irq`` (:class:`VirtioMmio`) and a guest memory with
``read``/``write`` (:class:`~blockemu.drivers.ata.Memory`) can be driven: blockemu's
``VirtioBlk`` over a ``GuestMemory``, or QEMU's virtio-blk-device through qtest, which is how the
differential tests compare the two.

Two levels:

* the block API (:meth:`~VirtioBlkDriver.read`, :meth:`~VirtioBlkDriver.write`,
  :meth:`~VirtioBlkDriver.flush`, :meth:`~VirtioBlkDriver.get_id`,
  :meth:`~VirtioBlkDriver.discard`, :meth:`~VirtioBlkDriver.write_zeroes`), which raises
  :class:`VirtioRequestError` on a non-OK status;
* a request/ring level for tests: :class:`Request` describes one chain in any layout (header
  split over several descriptors, data and status sharing a descriptor, indirect tables, direct
  descriptors followed by an indirect one), :meth:`~VirtioBlkDriver.submit` exposes many chains
  with one ``avail.idx`` update and one notify, :meth:`~VirtioBlkDriver.wait_used` collects used
  elements; raw descriptor and ring writes (:meth:`~VirtioBlkDriver.write_desc`,
  :meth:`~VirtioBlkDriver.expose`) build anything, including what a driver must never send.

Every wait is bounded and ends in :class:`VirtioTimeoutError`; a device that sets
DEVICE_NEEDS_RESET while we wait ends it in :class:`VirtioNeedsReset`.

Guest memory is accessed through the buffer protocol (``memoryview`` + ``struct.pack_into``) when
the memory object exports one, else through its ``read``/``write`` methods.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from blockemu._core import Geometry
from blockemu.drivers.ata import Memory
from blockemu.errors import BlockemuError

__all__ = [
    "Request",
    "RingLayout",
    "Submitted",
    "UsedElem",
    "VirtioBlkDriver",
    "VirtioError",
    "VirtioMmio",
    "VirtioNeedsReset",
    "VirtioRequestError",
    "VirtioTimeoutError",
]

SECTOR = 512

# virtio-mmio v2 registers.
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100

MAGIC = 0x74726976
DEVICE_ID_BLOCK = 2

# Device status bits.
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
S_FAILED = 0x80

# InterruptStatus bits.
INT_USED = 1
INT_CONFIG = 2

# Feature bits.
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_GEOMETRY = 1 << 4
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

#: Everything this driver understands (and accepts by default when offered).
KNOWN_FEATURES = (
    F_SIZE_MAX
    | F_SEG_MAX
    | F_GEOMETRY
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_TOPOLOGY
    | F_CONFIG_WCE
    | F_MQ
    | F_DISCARD
    | F_WRITE_ZEROES
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_VERSION_1
)

# Descriptor and ring flags.
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

# Request types and statuses.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
STATUS_NAMES = {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}

# Config-space offsets (relative to 0x100).
CFG_CAPACITY = 0x00
CFG_SEG_MAX = 0x0C
CFG_CYLINDERS = 0x10
CFG_HEADS = 0x12
CFG_SECTORS = 0x13
CFG_BLK_SIZE = 0x14
CFG_WRITEBACK = 0x20
CFG_NUM_QUEUES = 0x22
CFG_MAX_DISCARD_SECTORS = 0x24
CFG_MAX_WRITE_ZEROES_SECTORS = 0x30

GET_ID_LEN = 20
DATA_FILL = 0xAA  # what writable areas hold before the device writes them
STATUS_FILL = 0xFF


class VirtioError(BlockemuError):
    """A virtio device refused, failed or did not answer (root of this module's errors)."""


class VirtioRequestError(VirtioError):
    """A request completed with a status other than OK (``status``: 1 IOERR, 2 UNSUPP)."""

    def __init__(self, message: str, *, status: int, request_type: int) -> None:
        name = STATUS_NAMES.get(status, f"{status:#04x}")
        super().__init__(f"{message}: status {name} (type {request_type})")
        self.status = status
        self.request_type = request_type


class VirtioNeedsReset(VirtioError):
    """The device set DEVICE_NEEDS_RESET (it stopped processing until the driver resets it)."""

    def __init__(self, message: str, *, device_status: int) -> None:
        super().__init__(f"{message} (device status {device_status:#04x})")
        self.device_status = device_status


class VirtioTimeoutError(VirtioError, TimeoutError):
    """A bounded wait (for used elements) ran out."""


@runtime_checkable
class VirtioMmio(Protocol):
    """The register file of one virtio-mmio device (what blockemu's ``VirtioBlk`` offers)."""

    def mmio_read(self, offset: int, size: int = 4) -> int: ...
    def mmio_write(self, offset: int, value: int, size: int = 4) -> None: ...
    @property
    def irq(self) -> bool: ...
    def wait_irq(self, timeout: float) -> bool: ...


@dataclass(frozen=True)
class RingLayout:
    """Where the three areas of a split virtqueue and the request buffers live."""

    desc: int
    avail: int
    used: int
    data: int = 0x100000
    data_end: int | None = None  # end of the buffer area (default: end of guest memory)

    @classmethod
    def packed(cls, queue_size: int, base: int = 0x1000, data: int = 0x100000) -> RingLayout:
        """The three areas one after another from ``base``, each on a 4 KiB boundary (Q = 256 and
        base 0x1000 give the spec's 0x1000 / 0x2000 / 0x3000)."""
        desc = base
        avail = _align(desc + 16 * queue_size, 4096)
        used = _align(avail + 6 + 2 * queue_size, 4096)
        end = _align(used + 6 + 8 * queue_size, 4096)
        return cls(desc, avail, used, max(data, end))


@dataclass(frozen=True)
class UsedElem:
    id: int
    len: int


@dataclass
class Request:
    """One virtio-blk request chain, laid out over one contiguous region of guest memory.

    The region is ``header`` (16 bytes built from ``type``/``sector``/``reserved`` unless given
    raw), then ``data`` (device-readable), then ``in_len`` device-writable bytes, then
    ``status_len`` (normally 1) writable status bytes. ``split`` gives the descriptor lengths that
    cover the region in order (default: one descriptor per non-empty part); a descriptor is
    writable when it starts at or after the readable part's end, and must not straddle it.
    ``mode``: ``"direct"``, ``"indirect"`` (the whole chain in one indirect table) or
    ``"mixed"`` (the first ``direct_count`` descriptors direct, the rest in an indirect table).
    ``zero_len_at`` inserts zero-length descriptors before those positions of ``split``.
    """

    type: int
    sector: int = 0
    data: bytes = b""
    in_len: int = 0
    header: bytes | None = None
    reserved: int = 0
    status_len: int = 1
    split: Sequence[int] | None = None
    mode: str = "direct"
    direct_count: int = 1
    zero_len_at: Sequence[int] = ()

    def header_bytes(self) -> bytes:
        if self.header is not None:
            return self.header
        return struct.pack("<IIQ", self.type & 0xFFFF_FFFF, self.reserved, self.sector % (1 << 64))


@dataclass
class Submitted:
    """A chain the driver exposed: where its parts are, and which descriptors it holds."""

    request: Request
    head: int
    addr: int  # start of the region
    readable: int  # header + data-out length
    in_len: int
    status_len: int
    descs: list[int] = field(default_factory=list)
    table: int | None = None  # indirect table address

    @property
    def in_addr(self) -> int:
        return self.addr + self.readable

    @property
    def status_addr(self) -> int:
        return self.addr + self.readable + self.in_len


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


class _Mem:
    """Guest memory through the buffer protocol when available, else read/write."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.view: memoryview | None
        try:
            view = memoryview(memory)  # type: ignore[arg-type]
        except TypeError:
            self.view = None
        else:
            self.view = None if view.readonly else view.cast("B")
        self.size = memory.size

    def read(self, addr: int, n: int) -> bytes:
        if self.view is not None:
            return bytes(self.view[addr : addr + n])
        return self.memory.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        if self.view is not None:
            self.view[addr : addr + len(data)] = data
        else:
            self.memory.write(addr, bytes(data))

    def pack(self, fmt: str, addr: int, *values: int) -> None:
        if self.view is not None:
            struct.pack_into(fmt, self.view, addr, *values)
        else:
            self.memory.write(addr, struct.pack(fmt, *values))

    def unpack(self, fmt: str, addr: int) -> tuple[int, ...]:
        if self.view is not None:
            return struct.unpack_from(fmt, self.view, addr)
        return struct.unpack(fmt, self.memory.read(addr, struct.calcsize(fmt)))

    def u16(self, addr: int) -> int:
        return self.unpack("<H", addr)[0]

    def release(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None


class VirtioBlkDriver:
    """Drives queue ``queue`` of a virtio-mmio block device.

    ``features``: a mask of the features to accept (default: everything this driver understands
    that the device offers); ``event_idx``/``indirect`` switch those two off when False.
    ``queue_size`` (default: the device's QueueSizeMax) and ``layout`` (default:
    :meth:`RingLayout.packed`) place the queue. ``timeout`` bounds every wait, in seconds.
    """

    def __init__(
        self,
        device: VirtioMmio,
        memory: Memory,
        *,
        queue: int = 0,
        queue_size: int | None = None,
        layout: RingLayout | None = None,
        features: int | None = None,
        event_idx: bool = True,
        indirect: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.device = device
        self.memory = memory
        self.mem = _Mem(memory)
        self.queue = queue
        self.timeout = timeout
        self._want_queue_size = queue_size
        self._want_layout = layout
        mask = KNOWN_FEATURES if features is None else features
        if not event_idx:
            mask &= ~F_EVENT_IDX
        if not indirect:
            mask &= ~F_INDIRECT_DESC
        self.feature_mask = mask
        self.device_features = 0
        self.features = 0
        self.queue_size = 0
        self.layout: RingLayout = layout or RingLayout.packed(256)
        self.avail_idx = 0  # shadow of avail.idx (what we last published)
        self.last_used = 0  # used.idx up to which we consumed used elements
        self._free: list[int] = []
        self._inflight: dict[int, Submitted] = {}
        self._alloc_next = 0
        self._fast: _FastReads | None = None
        #: With False, setup_queue writes any QueueSize (tests of a device's checks).
        self.strict = True
        #: Configuration-change interrupts acknowledged while waiting for used elements.
        self.config_changes = 0

    # ------------------------------------------------------------------ registers

    def reg(self, offset: int) -> int:
        return self.device.mmio_read(offset, 4)

    def set_reg(self, offset: int, value: int) -> None:
        self.device.mmio_write(offset, value, 4)

    @property
    def device_status(self) -> int:
        return self.reg(REG_STATUS)

    def set_status(self, value: int) -> None:
        self.set_reg(REG_STATUS, value)

    def reset(self, timeout: float | None = None) -> None:
        """Writes 0 to Status, waits until Status reads back 0 (a device with requests still
        running in its backend keeps the old value until none of them can touch guest memory
        any more), and forgets every in-flight chain."""
        self.set_status(0)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self.device_status != 0:
            if time.monotonic() > deadline:
                raise VirtioTimeoutError("Status did not read back 0 after a reset")
            time.sleep(0.0005)
        self._inflight.clear()
        self._fast = None

    def interrupt_status(self) -> int:
        return self.reg(REG_INTERRUPT_STATUS)

    def ack_interrupts(self, bits: int | None = None) -> int:
        """Reads InterruptStatus and acknowledges ``bits`` (default: everything set); returns what
        was set."""
        isr = self.interrupt_status()
        todo = isr if bits is None else bits
        if todo:
            self.set_reg(REG_INTERRUPT_ACK, todo)
        return isr

    def read_features(self) -> int:
        self.set_reg(REG_DEVICE_FEATURES_SEL, 0)
        low = self.reg(REG_DEVICE_FEATURES)
        self.set_reg(REG_DEVICE_FEATURES_SEL, 1)
        high = self.reg(REG_DEVICE_FEATURES)
        return low | high << 32

    def write_features(self, value: int) -> None:
        self.set_reg(REG_DRIVER_FEATURES_SEL, 0)
        self.set_reg(REG_DRIVER_FEATURES, value & 0xFFFF_FFFF)
        self.set_reg(REG_DRIVER_FEATURES_SEL, 1)
        self.set_reg(REG_DRIVER_FEATURES, value >> 32 & 0xFFFF_FFFF)

    # ------------------------------------------------------------------ probe

    def check_identity(self) -> None:
        magic = self.reg(REG_MAGIC)
        if magic != MAGIC:
            raise VirtioError(f"not a virtio-mmio device (magic {magic:#010x})")
        version = self.reg(REG_VERSION)
        if version != 2:
            raise VirtioError(f"virtio-mmio version {version} (this driver needs version 2)")
        dev_id = self.reg(REG_DEVICE_ID)
        if dev_id != DEVICE_ID_BLOCK:
            raise VirtioError(f"device id {dev_id} is not a block device (2)")

    def negotiate(self, accept: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK (checked by read-back).
        ``accept`` overrides the computed subset (tests use it to accept what was not offered)."""
        self.check_identity()
        self.reset()
        self.set_status(S_ACKNOWLEDGE)
        self.set_status(S_ACKNOWLEDGE | S_DRIVER)
        self.device_features = self.read_features()
        wanted = self.device_features & self.feature_mask if accept is None else accept
        self.write_features(wanted)
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK)
        status = self.device_status
        if not status & S_FEATURES_OK:
            self.set_status(status | S_FAILED)
            raise VirtioError(f"the device refused features {wanted:#x} (status {status:#04x})")
        self.features = wanted
        return wanted

    def setup_queue(self) -> None:
        """Selects our queue, checks it exists and is not ready, writes Q and the three areas,
        zeroes them, then sets QueueReady."""
        self.set_reg(REG_QUEUE_SEL, self.queue)
        if self.reg(REG_QUEUE_READY) != 0:
            raise VirtioError(f"queue {self.queue} is already ready")
        qmax = self.reg(REG_QUEUE_NUM_MAX)
        if qmax == 0:
            raise VirtioError(f"queue {self.queue} does not exist")
        q = self._want_queue_size if self._want_queue_size is not None else qmax
        if self.strict and (q > qmax or q <= 0 or q & (q - 1)):
            raise ValueError(f"queue size {q} (device maximum {qmax}; a power of 2)")
        self.queue_size = q
        lay = self._want_layout or RingLayout.packed(q)
        self.layout = lay
        for addr, n in ((lay.desc, 16 * q), (lay.avail, 6 + 2 * q), (lay.used, 6 + 8 * q)):
            n = max(0, min(n, self.mem.size - addr))  # a test may place a ring past the end
            self.mem.write(addr, bytes(n))
        self.set_reg(REG_QUEUE_NUM, q)
        for reg, addr in (
            (REG_QUEUE_DESC_LOW, lay.desc),
            (REG_QUEUE_DRIVER_LOW, lay.avail),
            (REG_QUEUE_DEVICE_LOW, lay.used),
        ):
            self.set_reg(reg, addr & 0xFFFF_FFFF)
            self.set_reg(reg + 4, addr >> 32)
        self.set_reg(REG_QUEUE_READY, 1)
        self.avail_idx = 0
        self.last_used = 0
        self._free = list(range(q - 1, -1, -1))
        self._inflight.clear()
        self._alloc_next = lay.data
        self._fast = None

    def probe(self, *, extra: Sequence[VirtioBlkDriver] = ()) -> int:
        """Initialises the device (spec §5.2) and our queue; ``extra`` drivers (same device, other
        queues) get their queues set up too before DRIVER_OK. Returns the negotiated features."""
        feats = self.negotiate()
        self.setup_queue()
        for other in extra:
            other.device_features = self.device_features
            other.features = feats
            other.setup_queue()
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK)
        status = self.device_status
        if status & S_NEEDS_RESET or not status & S_DRIVER_OK:
            raise VirtioError(f"the device did not accept DRIVER_OK (status {status:#04x})")
        return feats

    def has(self, feature: int) -> bool:
        return self.features & feature == feature

    # ------------------------------------------------------------------ config space

    def config_read(self, offset: int, size: int) -> int:
        return self.device.mmio_read(REG_CONFIG + offset, size)

    def config_write(self, offset: int, value: int, size: int) -> None:
        self.device.mmio_write(REG_CONFIG + offset, value, size)

    def config_generation(self) -> int:
        return self.reg(REG_CONFIG_GENERATION)

    @property
    def capacity(self) -> int:
        """Capacity in 512-byte sectors (two 32-bit reads bracketed by ConfigGeneration)."""
        for _ in range(100):
            gen = self.config_generation()
            low = self.config_read(CFG_CAPACITY, 4)
            high = self.config_read(CFG_CAPACITY + 4, 4)
            if self.config_generation() == gen:
                return low | high << 32
        raise VirtioError("config space kept changing while reading capacity")

    @property
    def geometry(self) -> Geometry | None:
        """The CHS geometry from config space; None without GEOMETRY or when it reads zero."""
        if not self.has(F_GEOMETRY):
            return None
        cyls = self.config_read(CFG_CYLINDERS, 2)
        heads = self.config_read(CFG_HEADS, 1)
        secs = self.config_read(CFG_SECTORS, 1)
        if not (cyls and heads and secs):
            return None
        return Geometry(cyls, heads, secs)

    @property
    def blk_size(self) -> int:
        return self.config_read(CFG_BLK_SIZE, 4) if self.has(F_BLK_SIZE) else SECTOR

    @property
    def num_queues(self) -> int:
        return self.config_read(CFG_NUM_QUEUES, 2) if self.has(F_MQ) else 1

    # ------------------------------------------------------------------ guest memory helpers

    def alloc(self, n: int, align: int = 16) -> int:
        """Bump-allocates ``n`` bytes of buffer space (reset by :meth:`reset_alloc`)."""
        addr = _align(self._alloc_next, align)
        end = self.layout.data_end if self.layout.data_end is not None else self.mem.size
        if addr + n > end:
            raise VirtioError(f"out of buffer space ({n} bytes wanted)")
        self._alloc_next = addr + n
        return addr

    def reset_alloc(self) -> None:
        self._alloc_next = self.layout.data

    def write_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next: int = 0, *, table: int = -1
    ) -> None:
        """Writes descriptor ``index`` of the queue's table (or of the table at ``table``)."""
        base = self.layout.desc if table < 0 else table
        self.mem.pack(
            "<QIHH", base + 16 * index, addr % (1 << 64), length & 0xFFFF_FFFF, flags, next
        )

    def set_avail_flags(self, flags: int) -> None:
        self.mem.pack("<H", self.layout.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.pack("<H", self.layout.avail + 4 + 2 * self.queue_size, value & 0xFFFF)

    def avail_event(self) -> int:
        return self.mem.u16(self.layout.used + 4 + 8 * self.queue_size)

    def used_idx(self) -> int:
        return self.mem.u16(self.layout.used + 2)

    def used_flags(self) -> int:
        return self.mem.u16(self.layout.used)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.pack("<H", self.layout.avail + 2, self.avail_idx)

    def expose(self, heads: Sequence[int], *, bump: bool = True) -> None:
        """Puts ``heads`` in the available ring after the current avail.idx; with ``bump`` then
        publishes them with one avail.idx update."""
        q = self.queue_size
        for i, head in enumerate(heads):
            self.mem.pack("<H", self.layout.avail + 4 + 2 * ((self.avail_idx + i) % q), head)
        if bump:
            self.set_avail_idx(self.avail_idx + len(heads))

    def notify(self, queue: int | None = None) -> None:
        self.set_reg(REG_QUEUE_NOTIFY, self.queue if queue is None else queue)

    def read_used(self, start: int, n: int) -> list[UsedElem]:
        """Used elements ``start`` .. ``start + n - 1`` (free-running indices)."""
        q = self.queue_size
        out: list[UsedElem] = []
        i = 0
        while i < n:
            slot = (start + i) % q
            k = min(n - i, q - slot)
            raw = self.mem.read(self.layout.used + 4 + 8 * slot, 8 * k)
            for j in range(k):
                ident, length = struct.unpack_from("<II", raw, 8 * j)
                out.append(UsedElem(ident, length))
            i += k
        return out

    # ------------------------------------------------------------------ chains

    def _take_descs(self, n: int) -> list[int]:
        if n > len(self._free):
            raise VirtioError(f"no {n} free descriptors ({len(self._free)} left)")
        return [self._free.pop() for _ in range(n)]

    def free_descs(self) -> int:
        return len(self._free)

    def build(self, req: Request) -> Submitted:
        """Lays out ``req`` in guest memory and writes its descriptors; returns the chain (not yet
        exposed)."""
        header = req.header_bytes()
        readable = len(header) + len(req.data)
        total = readable + req.in_len + req.status_len
        addr = self.alloc(max(total, 1))
        self.mem.write(addr, header + req.data)
        if req.in_len:
            self.mem.write(addr + readable, bytes([DATA_FILL]) * req.in_len)
        if req.status_len:
            self.mem.write(addr + readable + req.in_len, bytes([STATUS_FILL]) * req.status_len)
        if req.split is not None:
            lengths = list(req.split)
            if sum(lengths) != total:
                raise ValueError(f"split {lengths} does not cover the {total}-byte request")
        else:
            lengths = [n for n in (len(header), len(req.data), req.in_len, req.status_len) if n > 0]
        pieces: list[tuple[int, int, bool]] = []  # (addr, len, writable)
        pos = 0
        for k, n in enumerate(lengths):
            for _ in range(list(req.zero_len_at).count(k)):
                pieces.append((addr + pos, 0, pos >= readable))
            if pos < readable < pos + n:
                raise ValueError("a descriptor may not straddle the readable/writable boundary")
            pieces.append((addr + pos, n, pos >= readable))
            pos += n
        sub = Submitted(req, 0, addr, readable, req.in_len, req.status_len)
        if req.mode == "direct":
            direct, inner = pieces, []
        elif req.mode == "indirect":
            direct, inner = [], pieces
        elif req.mode == "mixed":
            direct, inner = pieces[: req.direct_count], pieces[req.direct_count :]
        else:
            raise ValueError(f"mode {req.mode!r}")
        ndirect = len(direct) + (1 if inner else 0)
        if ndirect == 0:
            raise ValueError("a request needs at least one descriptor")
        idx = self._take_descs(ndirect)
        sub.descs = idx
        sub.head = idx[0]
        for k, (a, n, w) in enumerate(direct):
            last = k == ndirect - 1
            flags = (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(idx[k], a, n, flags, 0 if last else idx[k + 1])
        if inner:
            table = self.alloc(16 * len(inner))
            sub.table = table
            blob = bytearray()
            for k, (a, n, w) in enumerate(inner):
                last = k == len(inner) - 1
                flags = (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT)
                blob += struct.pack("<QIHH", a, n, flags, 0 if last else k + 1)
            self.mem.write(table, bytes(blob))
            self.write_desc(idx[-1], table, 16 * len(inner), DESC_F_INDIRECT, 0)
        return sub

    def submit(
        self,
        requests: Sequence[Request],
        *,
        notify: bool = True,
        used_event: int | None = None,
    ) -> list[Submitted]:
        """Builds every request, exposes all heads with one avail.idx update, then (with
        ``notify``) one QueueNotify. With EVENT_IDX, used_event is set (unless given) so that the
        device interrupts once, when the last of them completes."""
        subs = [self.build(r) for r in requests]
        for s in subs:
            self._inflight[s.head] = s
        self.expose([s.head for s in subs], bump=False)
        if self.has(F_EVENT_IDX):
            if used_event is None:
                used_event = self.last_used + len(self._inflight) - 1
            self.set_used_event(used_event)
        self.set_avail_idx(self.avail_idx + len(subs))
        if notify:
            self.notify()
        return subs

    def wait_used(
        self, n: int, timeout: float | None = None, *, ack: bool = True
    ) -> list[UsedElem]:
        """Waits until ``n`` new used elements exist (interrupt or poll of used.idx), consumes and
        returns them, frees their descriptors and (with ``ack``) acknowledges the used-buffer
        interrupt."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        pause = 0.0002
        while True:
            idx = self.used_idx()
            ready = (idx - self.last_used) & 0xFFFF
            if ready >= n:
                break
            if ready > self.queue_size:
                raise VirtioError(f"used.idx moved by {ready} (> queue size {self.queue_size})")
            status = self.device_status
            if status & S_NEEDS_RESET:
                raise VirtioNeedsReset(
                    f"device needs reset ({ready} of {n} completions)", device_status=status
                )
            now = time.monotonic()
            if now >= deadline:
                raise VirtioTimeoutError(f"{ready} of {n} used elements after the timeout")
            if ack and self.device.irq and self.interrupt_status() & INT_CONFIG:
                # A configuration change (e.g. the geometry became known): handle it like a
                # guest would, else the level-triggered line keeps wait_irq from sleeping.
                self.set_reg(REG_INTERRUPT_ACK, INT_CONFIG)
                self.config_changes += 1
            self.device.wait_irq(min(pause, deadline - now))
            pause = min(pause * 2, 0.02)
        elems = self.read_used(self.last_used, n)
        self.last_used = (self.last_used + n) & 0xFFFF
        for e in elems:
            sub = self._inflight.pop(e.id, None)
            if sub is not None:
                self._free.extend(sub.descs)
        if ack and self.device.irq:
            self.ack_interrupts(INT_USED)
        if not self._inflight:
            self.reset_alloc()
        return elems

    def status(self, sub: Submitted) -> int:
        return self.mem.read(sub.status_addr, 1)[0] if sub.status_len else -1

    def data_in(self, sub: Submitted) -> bytes:
        return self.mem.read(sub.in_addr, sub.in_len)

    def run(self, requests: Sequence[Request]) -> list[tuple[Submitted, UsedElem]]:
        """Submits ``requests`` in one batch and waits for all; returns (chain, used) pairs in
        submission order."""
        subs = self.submit(requests)
        elems = self.wait_used(len(subs))
        by_head = {e.id: e for e in elems}
        return [(s, by_head[s.head]) for s in subs]

    # ------------------------------------------------------------------ block API

    def _one(self, req: Request, what: str) -> tuple[Submitted, UsedElem]:
        (sub, used), *_ = self.run([req])
        st = self.status(sub)
        if st != S_OK:
            raise VirtioRequestError(what, status=st, request_type=req.type)
        return sub, used

    def _chunk_sectors(self) -> int:
        end = self.layout.data_end if self.layout.data_end is not None else self.mem.size
        room = (end - self.layout.data) // 2
        return max(1, min(2048, room // SECTOR))

    def read(self, sector: int, count: int) -> bytes:
        """Reads ``count`` sectors at ``sector``."""
        out = bytearray()
        step = self._chunk_sectors()
        for s in range(sector, sector + count, step):
            n = min(step, sector + count - s)
            sub, _ = self._one(Request(T_IN, s, in_len=n * SECTOR), f"read of sector {s}")
            out += self.data_in(sub)
        return bytes(out)

    def write(self, sector: int, data: bytes) -> None:
        """Writes ``data`` (whole sectors) at ``sector``."""
        data = bytes(data)
        if len(data) % SECTOR:
            raise ValueError("data must be whole 512-byte sectors")
        step = self._chunk_sectors() * SECTOR
        for pos in range(0, len(data), step):
            s = sector + pos // SECTOR
            self._one(Request(T_OUT, s, data=data[pos : pos + step]), f"write of sector {s}")

    def flush(self) -> None:
        self._one(Request(T_FLUSH, 0), "flush")

    def get_id(self) -> bytes:
        """The device's serial: the 20-byte GET_ID answer up to its first NUL."""
        sub, _ = self._one(Request(T_GET_ID, 0, in_len=GET_ID_LEN), "GET_ID")
        return self.data_in(sub).split(b"\0", 1)[0]

    @staticmethod
    def segment(sector: int, count: int, flags: int = 0) -> bytes:
        return struct.pack("<QII", sector, count, flags)

    def discard(self, sector: int, count: int) -> None:
        if not self.has(F_DISCARD):
            raise VirtioError("DISCARD was not negotiated")
        self._one(Request(T_DISCARD, 0, data=self.segment(sector, count)), "discard")

    def write_zeroes(self, sector: int, count: int, *, unmap: bool = False) -> None:
        if not self.has(F_WRITE_ZEROES):
            raise VirtioError("WRITE_ZEROES was not negotiated")
        seg = self.segment(sector, count, 1 if unmap else 0)
        self._one(Request(T_WRITE_ZEROES, 0, data=seg), "write zeroes")

    def set_writeback(self, on: bool) -> None:
        if not self.has(F_CONFIG_WCE):
            raise VirtioError("CONFIG_WCE was not negotiated")
        self.config_write(CFG_WRITEBACK, 1 if on else 0, 1)

    # ------------------------------------------------------------------ benchmark fast path

    def prepare_reads(self, n: int, length: int) -> None:
        """Lays out ``n`` read chains of ``length`` bytes once (header/data/status descriptors;
        status bytes contiguous) for :meth:`resubmit`. Needs an idle queue with 3n descriptors."""
        if self._inflight:
            raise VirtioError("prepare_reads needs an idle queue")
        if 3 * n > self.queue_size:
            raise ValueError(f"{n} chains of 3 descriptors do not fit a queue of {self.queue_size}")
        if length % SECTOR:
            raise ValueError("length must be whole sectors")
        self.reset_alloc()
        self._free = list(range(self.queue_size - 1, 3 * n - 1, -1))
        headers = self.alloc(16 * n)
        statuses = self.alloc(n)
        data = self.alloc(n * length, 4096)
        for i in range(n):
            self.mem.pack("<IIQ", headers + 16 * i, T_IN, 0, 0)
            self.write_desc(3 * i, headers + 16 * i, 16, DESC_F_NEXT, 3 * i + 1)
            self.write_desc(
                3 * i + 1, data + length * i, length, DESC_F_NEXT | DESC_F_WRITE, 3 * i + 2
            )
            self.write_desc(3 * i + 2, statuses + i, 1, DESC_F_WRITE, 0)
        self._fast = _FastReads(self, n, length, headers, statuses, data)

    def resubmit(self, sectors: Sequence[int]) -> bytes:
        """Reads at ``sectors`` (at most the prepared number) through the prepared chains: rewrites
        the headers' sectors and the avail slots, bumps avail.idx once, notifies once and waits
        for all; returns the status bytes (all zero when every read succeeded)."""
        if self._fast is None:
            raise VirtioError("call prepare_reads first")
        return self._fast.run(sectors)

    def release_reads(self) -> None:
        """Gives the prepared chains' descriptors and buffers back (the queue must be idle)."""
        if self._fast is not None:
            self._free = list(range(self.queue_size - 1, -1, -1))
            self._fast = None
            self.reset_alloc()

    def fast_data(self, i: int) -> bytes:
        """The data buffer of prepared chain ``i``."""
        if self._fast is None:
            raise VirtioError("call prepare_reads first")
        f = self._fast
        return self.mem.read(f.data + f.length * i, f.length)


class _FastReads:
    def __init__(
        self, drv: VirtioBlkDriver, n: int, length: int, headers: int, statuses: int, data: int
    ) -> None:
        self.drv = drv
        self.n = n
        self.length = length
        self.headers = headers
        self.statuses = statuses
        self.data = data
        self.heads = [3 * i for i in range(n)]
        self.event_idx = drv.has(F_EVENT_IDX)
        self.view = drv.mem.view
        self.ff = b"\xff" * n
        lay = drv.layout
        self.avail_ring = lay.avail + 4
        self.avail_idx_addr = lay.avail + 2
        self.used_event_addr = lay.avail + 4 + 2 * drv.queue_size
        self.used_idx_addr = lay.used + 2
        self.wait_irq: Callable[[float], bool] = drv.device.wait_irq
        self.mmio_write = drv.device.mmio_write
        self._structs: dict[int, struct.Struct] = {}

    def _headers_struct(self, k: int) -> struct.Struct:
        st = self._structs.get(k)
        if st is None:
            st = self._structs[k] = struct.Struct("<" + "8xQ" * k)
        return st

    def run(self, sectors: Sequence[int]) -> bytes:
        drv = self.drv
        k = len(sectors)
        if k > self.n:
            raise ValueError(f"{k} sectors for {self.n} prepared chains")
        q = drv.queue_size
        start = drv.avail_idx
        slot = start % q
        first = min(k, q - slot)
        view = self.view
        if view is not None:
            # Every header is {IN = 0, reserved 0, sector}: one pack writes all k of them.
            self._headers_struct(k).pack_into(view, self.headers, *sectors)
            view[self.statuses : self.statuses + k] = self.ff[:k]
            struct.pack_into(f"<{first}H", view, self.avail_ring + 2 * slot, *self.heads[:first])
            if first < k:
                struct.pack_into(f"<{k - first}H", view, self.avail_ring, *self.heads[first:k])
            new_idx = (start + k) & 0xFFFF
            if self.event_idx:
                struct.pack_into("<H", view, self.used_event_addr, (drv.last_used + k - 1) & 0xFFFF)
            struct.pack_into("<H", view, self.avail_idx_addr, new_idx)
        else:
            mem = drv.mem
            for i, s in enumerate(sectors):
                mem.pack("<Q", self.headers + 16 * i + 8, s)
            mem.write(self.statuses, self.ff[:k])
            drv.expose(self.heads[:k], bump=False)
            if self.event_idx:
                drv.set_used_event(drv.last_used + k - 1)
            new_idx = (start + k) & 0xFFFF
            mem.pack("<H", self.avail_idx_addr, new_idx)
        drv.avail_idx = new_idx
        self.mmio_write(REG_QUEUE_NOTIFY, drv.queue, 4)
        target = (drv.last_used + k) & 0xFFFF
        deadline = time.monotonic() + drv.timeout
        while True:
            if view is not None:
                used = struct.unpack_from("<H", view, self.used_idx_addr)[0]
            else:
                used = drv.used_idx()
            if (used - drv.last_used) & 0xFFFF >= k:
                break
            if time.monotonic() > deadline:
                status = drv.device_status
                if status & S_NEEDS_RESET:
                    raise VirtioNeedsReset("device needs reset", device_status=status)
                raise VirtioTimeoutError(f"batch of {k} reads did not complete")
            self.wait_irq(0.05)
        drv.last_used = target
        self.mmio_write(REG_INTERRUPT_ACK, INT_USED, 4)
        return drv.mem.read(self.statuses, k)
