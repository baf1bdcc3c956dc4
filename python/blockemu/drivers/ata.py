"""A scripted ATA (IDE hard disk) guest driver.

:class:`AtaDriver` drives one unit of an IDE channel through the port protocol alone — the
command block (offsets 0-7), the control block (alternate status / device control), the data
port in DRQ-block-sized bulk transfers, the channel's interrupt line and, for DMA, a PIIX-style
bus-master block with PRD tables in guest memory. Anything that offers those calls
(:class:`AtaChannel`, :class:`BusMaster`) can be driven: blockemu's ``IdeChannel``, or QEMU's
IDE controller through qtest, which is how the differential tests compare the two.

The probe follows what Linux libata and SeaBIOS do on a PC IDE channel: a software-reset pulse,
wait for BSY to clear, classify the unit by its signature, select it, IDENTIFY DEVICE, then
SET FEATURES "set transfer mode". Reads and writes pick the addressing mode like Linux (LBA28
when the request fits, else LBA48; CHS only when IDENTIFY says the device has no LBA).

Everything here follows the ATA register protocol as documented (status/error bits, task-file
encodings, PIO data-in/data-out and bus-master DMA sequences); no timing is assumed: every wait
is a poll with a deadline and ends in :class:`TimeoutError` instead of hanging.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Protocol, runtime_checkable

from blockemu.errors import BlockemuError

__all__ = [
    "AtaChannel",
    "AtaDriver",
    "AtaError",
    "BusMaster",
    "Memory",
]

SECTOR = 512

# Command-block register offsets.
REG_DATA = 0
REG_ERROR = 1  # read
REG_FEATURES = 1  # write
REG_NSECT = 2
REG_LBAL = 3
REG_LBAM = 4
REG_LBAH = 5
REG_DEVICE = 6
REG_STATUS = 7  # read
REG_COMMAND = 7  # write

# Status bits.
ST_BSY = 0x80
ST_DRDY = 0x40
ST_DF = 0x20
ST_DRQ = 0x08
ST_ERR = 0x01

# Error bits.
ERR_ABRT = 0x04

# Device register bits.
DEV_OBS = 0xA0
DEV_LBA = 0x40
DEV_SEL = 0x10

# Device control bits.
CTL_OBS = 0x08
CTL_NIEN = 0x02
CTL_SRST = 0x04
CTL_HOB = 0x80

# Bus-master registers (offsets in the channel's 8 bytes) and bits.
BM_CMD = 0
BM_STATUS = 2
BM_PRDT = 4
BM_CMD_START = 0x01
BM_CMD_TO_MEMORY = 0x08  # device -> memory, i.e. a disk read
BM_ST_ACTIVE = 0x01
BM_ST_ERROR = 0x02
BM_ST_INTR = 0x04
PRD_EOT = 0x8000_0000

# Opcodes.
CMD_READ_SECTORS = 0x20
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_DMA_EXT = 0x25
CMD_READ_NATIVE_MAX_EXT = 0x27
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS = 0x30
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_DMA_EXT = 0x35
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_INIT_DEV_PARAMS = 0x91
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE = 0xC6
CMD_READ_DMA = 0xC8
CMD_WRITE_DMA = 0xCA
CMD_FLUSH = 0xE7
CMD_FLUSH_EXT = 0xEA
CMD_IDENTIFY = 0xEC
CMD_SET_FEATURES = 0xEF
CMD_READ_NATIVE_MAX = 0xF8

LBA28_LIMIT = 1 << 28
LBA48_LIMIT = 1 << 48

Mode = Literal["chs", "lba28", "lba48", "auto"]
_MODES = ("chs", "lba28", "lba48", "auto")

# The PIO command for (write, multiple, ext).
_PIO_COMMANDS = {
    (False, False, False): CMD_READ_SECTORS,
    (False, False, True): CMD_READ_SECTORS_EXT,
    (False, True, False): CMD_READ_MULTIPLE,
    (False, True, True): CMD_READ_MULTIPLE_EXT,
    (True, False, False): CMD_WRITE_SECTORS,
    (True, False, True): CMD_WRITE_SECTORS_EXT,
    (True, True, False): CMD_WRITE_MULTIPLE,
    (True, True, True): CMD_WRITE_MULTIPLE_EXT,
}


@runtime_checkable
class AtaChannel(Protocol):
    """The port protocol of one IDE channel (what blockemu's ``IdeChannel`` offers)."""

    def ioport_read(self, offset: int, size: int = 1) -> int: ...
    def ioport_write(self, offset: int, value: int, size: int = 1) -> None: ...
    def ctrl_read(self) -> int: ...
    def ctrl_write(self, value: int) -> None: ...
    def read_data(self, nbytes: int) -> bytes: ...
    def write_data(self, data: bytes) -> Any: ...
    @property
    def irq(self) -> bool: ...
    def wait_irq(self, timeout: float) -> bool: ...


@runtime_checkable
class BusMaster(Protocol):
    """The bus-master DMA registers of the channel (PIIX layout: command, status, PRD address)."""

    def bmdma_read(self, offset: int, size: int = 1) -> int: ...
    def bmdma_write(self, offset: int, value: int, size: int = 1) -> None: ...


@runtime_checkable
class Memory(Protocol):
    """Guest physical memory the bus master reads PRD tables and buffers from."""

    @property
    def size(self) -> int: ...
    def read(self, addr: int, n: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> None: ...


class AtaError(BlockemuError):
    """The device ended a command with ERR (or a bus-master error): carries the registers."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error: int,
        command: int | None = None,
        bm_status: int | None = None,
    ) -> None:
        detail = f"status={status:#04x} error={error:#04x}"
        if command is not None:
            detail = f"command={command:#04x} " + detail
        if bm_status is not None:
            detail += f" bm_status={bm_status:#04x}"
        super().__init__(f"{message} ({detail})")
        self.status = status
        self.error = error
        self.command = command
        self.bm_status = bm_status


def _word(ident: bytes, i: int) -> int:
    return ident[2 * i] | ident[2 * i + 1] << 8


def _string(ident: bytes, first: int, last: int) -> str:
    """An IDENTIFY string: two characters per word, the first one in the high byte."""
    chars = bytearray()
    for i in range(first, last + 1):
        w = _word(ident, i)
        chars += bytes((w >> 8, w & 0xFF))
    return chars.decode("ascii", "replace").strip(" \0")


def parse_identify(ident: bytes) -> dict[str, Any]:
    """The facts a driver takes from the 256 IDENTIFY DEVICE words."""
    if len(ident) != SECTOR:
        raise ValueError("IDENTIFY data is 512 bytes")
    w = [_word(ident, i) for i in range(256)]
    lba = bool(w[49] & 0x0200)
    # Word 83: bits 15:14 must read 01 for the word to be valid; bit 10 = 48-bit address feature.
    lba48 = lba and (w[83] & 0xC000) == 0x4000 and bool(w[83] & 0x0400)
    lba28_sectors = w[60] | w[61] << 16
    lba48_sectors = w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48
    if lba48:
        sectors = lba48_sectors
    elif lba:
        sectors = lba28_sectors
    else:
        sectors = w[1] * w[3] * w[6]
    mult_max = w[47] & 0xFF if (w[47] >> 8) == 0x80 else 0
    udma = w[88] & 0xFF if w[53] & 0x0004 else 0
    return {
        "model": _string(ident, 27, 46),
        "serial": _string(ident, 10, 19),
        "firmware": _string(ident, 23, 26),
        "cyls": w[1],
        "heads": w[3],
        "secs": w[6],
        "cur_cyls": w[54],
        "cur_heads": w[55],
        "cur_secs": w[56],
        "chs_sectors": w[57] | w[58] << 16,
        "lba": lba,
        "dma": bool(w[49] & 0x0100),
        "lba48": lba48,
        "lba28_sectors": lba28_sectors,
        "lba48_sectors": lba48_sectors,
        "sectors": sectors,
        "multiple_max": mult_max,
        "multiple": w[59] & 0xFF if w[59] & 0x0100 else 0,
        "pio_modes": w[64] & 0xFF if w[53] & 0x0002 else 0,
        "mwdma_modes": w[63] & 0x07,
        "udma_modes": udma,
        "write_cache": bool(w[85] & 0x0020),
        "flush_ext": bool(w[83] & 0x2000) and (w[83] & 0xC000) == 0x4000,
        "ata_major": w[80] if w[80] not in (0, 0xFFFF) else 0,
    }


class AtaDriver:
    """Drives unit ``unit`` (0 = master, 1 = slave) of an IDE channel.

    ``memory`` is the guest memory the bus master uses (default: ``channel.memory`` when the
    channel has one); ``dma=True`` makes :meth:`read`/:meth:`write` use READ/WRITE DMA through
    the bus master (needs ``bmdma_read``/``bmdma_write`` and memory). ``dma_base`` is where the
    PRD table goes in guest memory; buffers follow it, 64 KiB aligned. ``timeout`` bounds every
    wait, in seconds.
    """

    def __init__(
        self,
        channel: AtaChannel,
        unit: int = 0,
        *,
        dma: bool = False,
        memory: Memory | None = None,
        dma_base: int = 0x1000,
        timeout: float = 10.0,
    ) -> None:
        if unit not in (0, 1):
            raise ValueError("unit is 0 (master) or 1 (slave)")
        self.channel = channel
        self.unit = unit
        self.timeout = timeout
        self.dma = dma
        self._memory = memory if memory is not None else getattr(channel, "memory", None)
        self.dma_base = dma_base & ~3
        self._ident: bytes | None = None
        self._info: dict[str, Any] | None = None
        self.multiple = 0  # sectors per DRQ block for READ/WRITE MULTIPLE; 0 = not used
        self.heads = 0  # logical geometry used for CHS addressing
        self.secs = 0
        self.cyls = 0
        if dma:
            self._check_dma()

    # ------------------------------------------------------------------ low level

    def _select_byte(self) -> int:
        return DEV_OBS | (DEV_SEL if self.unit else 0)

    def _status(self) -> int:
        """Reads Status (acknowledges the interrupt)."""
        return self.channel.ioport_read(REG_STATUS)

    def _error(self) -> int:
        return self.channel.ioport_read(REG_ERROR)

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _pause(self, deadline: float, what: str, spins: int) -> None:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"ATA unit {self.unit}: timed out waiting for {what}")
        if spins > 64:
            # Sleep until the line rises (or a short while): wakes at once on completion.
            self.channel.wait_irq(min(0.002, max(0.0, deadline - now)))

    def _wait_not_busy(self, what: str = "BSY to clear") -> int:
        """Polls Alternate Status until BSY clears; returns it."""
        deadline = self._deadline()
        spins = 0
        while True:
            st = self.channel.ctrl_read()
            if not st & ST_BSY:
                return st
            spins += 1
            self._pause(deadline, what, spins)

    def _wait_dma_done(self) -> int:
        """Polls until the device leaves the DMA phase (neither BSY nor DRQ) or the bus master
        stops on its own; returns Alternate Status."""
        deadline = self._deadline()
        spins = 0
        bm = self._bm()
        while True:
            st = self.channel.ctrl_read()
            if not st & (ST_BSY | ST_DRQ):
                return st
            if not bm.bmdma_read(BM_STATUS) & BM_ST_ACTIVE and not st & ST_BSY:
                return st
            spins += 1
            self._pause(deadline, "the DMA transfer", spins)

    def _fail(self, message: str, command: int | None, status: int | None = None) -> AtaError:
        st = self._status() if status is None else status
        return AtaError(message, status=st, error=self._error(), command=command)

    def _finish(self, command: int) -> int:
        """Waits for a non-data command, acknowledges the IRQ, raises on ERR; returns Status."""
        self._wait_not_busy()
        st = self._status()
        if st & (ST_ERR | ST_DF):
            raise self._fail("command failed", command, st)
        return st

    def _load_taskfile(
        self,
        command: int,
        *,
        features: int = 0,
        count: int = 0,
        lba: int = 0,
        device: int | None = None,
        ext: bool = False,
    ) -> None:
        """Waits for the device, writes the task file (HOB bytes first for EXT) and the command."""
        ch = self.channel
        self._wait_not_busy()
        dev = self._select_byte() if device is None else device
        ch.ioport_write(REG_DEVICE, dev)
        st = self._wait_not_busy()
        if st & ST_DRQ:
            raise AtaError(
                "device is in a data phase; reset it first", status=st, error=0, command=command
            )
        if ext:
            ch.ioport_write(REG_FEATURES, (features >> 8) & 0xFF)
            ch.ioport_write(REG_NSECT, (count >> 8) & 0xFF)
            ch.ioport_write(REG_LBAL, (lba >> 24) & 0xFF)
            ch.ioport_write(REG_LBAM, (lba >> 32) & 0xFF)
            ch.ioport_write(REG_LBAH, (lba >> 40) & 0xFF)
        ch.ioport_write(REG_FEATURES, features & 0xFF)
        ch.ioport_write(REG_NSECT, count & 0xFF)
        ch.ioport_write(REG_LBAL, lba & 0xFF)
        ch.ioport_write(REG_LBAM, (lba >> 8) & 0xFF)
        ch.ioport_write(REG_LBAH, (lba >> 16) & 0xFF)
        ch.ioport_write(REG_DEVICE, dev)
        ch.ioport_write(REG_COMMAND, command)

    def _pio_in_block(self, nbytes: int, command: int) -> bytes:
        """Waits for DRQ and reads one DRQ block of ``nbytes``."""
        st = self._wait_not_busy("data (DRQ)")
        if st & (ST_ERR | ST_DF) or not st & ST_DRQ:
            raise self._fail("no data phase", command)
        self._status()  # acknowledge the block's interrupt
        out = bytearray()
        while len(out) < nbytes:
            chunk = self.channel.read_data(nbytes - len(out))
            if not chunk:
                raise self._fail("data phase ended early", command)
            out += chunk
        return bytes(out)

    def _pio_out_block(self, data: bytes, command: int) -> None:
        st = self._wait_not_busy("DRQ for data-out")
        if st & (ST_ERR | ST_DF) or not st & ST_DRQ:
            raise self._fail("device does not accept data", command)
        done = 0
        while done < len(data):
            moved = self.channel.write_data(data[done:])
            n = len(data) - done if moved is None else int(moved)
            if n <= 0:
                raise self._fail("data phase ended early", command)
            done += n

    # ------------------------------------------------------------------ probe / identify

    def soft_reset(self) -> None:
        """Pulses SRST (nIEN clear) and waits for BSY to clear, then selects this unit."""
        ch = self.channel
        ch.ctrl_write(CTL_OBS)
        ch.ctrl_write(CTL_OBS | CTL_SRST)
        ch.ctrl_write(CTL_OBS)
        self._wait_not_busy("the end of the software reset")
        self._status()  # acknowledge the reset's interrupt
        self.multiple = 0  # the device is back at its power-on multiple count

    def signature(self) -> tuple[int, int, int, int]:
        """(sector count, LBA low, LBA mid, LBA high) of the selected unit."""
        ch = self.channel
        return (
            ch.ioport_read(REG_NSECT),
            ch.ioport_read(REG_LBAL),
            ch.ioport_read(REG_LBAM),
            ch.ioport_read(REG_LBAH),
        )

    def probe(self) -> dict[str, Any]:
        """Resets the channel, checks the unit is an ATA disk, IDENTIFYs it and sets the
        transfer mode. Returns the parsed IDENTIFY data (``model``, ``serial``, ``cyls``,
        ``heads``, ``secs``, ``sectors``, ``lba48``, ...). Raises :class:`AtaError` when the unit
        is absent or not an ATA disk."""
        ch = self.channel
        self.soft_reset()
        ch.ioport_write(REG_DEVICE, self._select_byte())
        st = self._wait_not_busy()
        sig = self.signature()
        if st == 0 or st == 0xFF:
            raise AtaError(
                f"no device at unit {self.unit}", status=st, error=self._error(), command=None
            )
        if sig[2:] == (0x14, 0xEB):
            raise AtaError(
                f"unit {self.unit} is an ATAPI device", status=st, error=self._error(), command=None
            )
        if sig[2:] not in ((0x00, 0x00), (0xFF, 0xFF)):
            raise AtaError(
                f"unit {self.unit}: unknown signature {sig[2]:#04x}/{sig[3]:#04x}",
                status=st,
                error=self._error(),
                command=None,
            )
        info = parse_identify(self.identify())
        # Set the transfer mode as Linux does: the fastest the device offers for the path used.
        if self.dma and info["udma_modes"]:
            mode = 0x40 | (info["udma_modes"].bit_length() - 1)
        elif self.dma and info["mwdma_modes"]:
            mode = 0x20 | (info["mwdma_modes"].bit_length() - 1)
        else:
            pio = info["pio_modes"]
            mode = 0x08 | (2 + pio.bit_length() if pio else 0)
        self.set_features(0x03, mode)
        self._ident = None  # the transfer-mode words changed
        return self.info()

    def identify(self) -> bytes:
        """IDENTIFY DEVICE: the 512 bytes of the 256 words."""
        self._load_taskfile(CMD_IDENTIFY)
        st = self._wait_not_busy("IDENTIFY data")
        if st == 0:
            raise AtaError(f"no device at unit {self.unit}", status=0, error=0, command=0xEC)
        data = self._pio_in_block(SECTOR, CMD_IDENTIFY)
        st = self._wait_not_busy()
        if st & ST_DRQ:
            raise self._fail("IDENTIFY returned more than 512 bytes", CMD_IDENTIFY)
        self._ident = data
        info = parse_identify(data)
        self._info = info
        if not self.heads:
            self.cyls, self.heads, self.secs = info["cyls"], info["heads"], info["secs"]
        return data

    def info(self) -> dict[str, Any]:
        """The parsed IDENTIFY data (issues IDENTIFY when none is cached)."""
        if self._ident is None or self._info is None:
            self.identify()
        assert self._info is not None
        return dict(self._info)

    # ------------------------------------------------------------------ non-data commands

    def set_features(self, subcommand: int, count: int = 0) -> None:
        self._load_taskfile(CMD_SET_FEATURES, features=subcommand, count=count)
        self._finish(CMD_SET_FEATURES)
        self._ident = None

    def set_multiple(self, sectors: int) -> None:
        """SET MULTIPLE MODE; afterwards reads/writes use READ/WRITE MULTIPLE (0 = back to
        single-sector READ/WRITE SECTORS)."""
        self._load_taskfile(CMD_SET_MULTIPLE, count=sectors)
        self._finish(CMD_SET_MULTIPLE)
        self.multiple = sectors

    def initialize_device_parameters(self, heads: int, secs: int) -> None:
        """INITIALIZE DEVICE PARAMETERS: the logical heads/sectors used for CHS addressing."""
        if not 1 <= heads <= 16 or not 1 <= secs <= 255:
            raise ValueError("heads are 1..16 and sectors 1..255")
        self._load_taskfile(CMD_INIT_DEV_PARAMS, count=secs, device=self._select_byte() | heads - 1)
        self._finish(CMD_INIT_DEV_PARAMS)
        total = self.info()["chs_sectors"] or self.info()["sectors"]
        self.heads, self.secs = heads, secs
        self.cyls = min(total // (heads * secs), 65535)

    def read_native_max(self, ext: bool = False) -> int:
        """READ NATIVE MAX ADDRESS (EXT): the highest native LBA."""
        command = CMD_READ_NATIVE_MAX_EXT if ext else CMD_READ_NATIVE_MAX
        self._load_taskfile(command, device=self._select_byte() | DEV_LBA)
        self._finish(command)
        ch = self.channel
        low = (
            ch.ioport_read(REG_LBAL)
            | ch.ioport_read(REG_LBAM) << 8
            | ch.ioport_read(REG_LBAH) << 16
        )
        if not ext:
            return low | (ch.ioport_read(REG_DEVICE) & 0x0F) << 24
        ch.ctrl_write(CTL_OBS | CTL_HOB)
        high = (
            ch.ioport_read(REG_LBAL)
            | ch.ioport_read(REG_LBAM) << 8
            | ch.ioport_read(REG_LBAH) << 16
        )
        ch.ctrl_write(CTL_OBS)
        return low | high << 24

    def flush(self) -> None:
        """FLUSH CACHE (the EXT form when the device is beyond LBA28 and offers it, as Linux)."""
        info = self.info()
        ext = info["lba48"] and info["flush_ext"] and info["sectors"] > LBA28_LIMIT
        command = CMD_FLUSH_EXT if ext else CMD_FLUSH
        self._load_taskfile(command)
        self._finish(command)

    # ------------------------------------------------------------------ addressing

    def _pick_mode(self, lba: int, count: int, mode: str) -> str:
        if mode not in _MODES:
            raise ValueError(f"mode is one of {', '.join(_MODES)}")
        info = self.info()
        if mode == "auto":
            if not info["lba"]:
                return "chs"
            # Like Linux libata: LBA28 only while the request ends below 2^28 - 1 (the last
            # LBA28 address is never touched) and fits one 256-sector command.
            if lba + count < LBA28_LIMIT - 1 and count <= 256:
                return "lba28"
            if info["lba48"]:
                return "lba48"
            raise ValueError("request is beyond LBA28 and the device has no LBA48")
        return mode

    def _chunk_limit(self, mode: str) -> int:
        return 65536 if mode == "lba48" else 256

    def _encode(self, lba: int, count: int, mode: str) -> tuple[int, int, bool]:
        """(register LBA field, device byte, ext) for a request."""
        sel = self._select_byte()
        if mode == "lba48":
            if lba + count > LBA48_LIMIT:
                raise ValueError("beyond LBA48")
            return lba, sel | DEV_LBA, True
        if mode == "lba28":
            if lba + count > LBA28_LIMIT:
                raise ValueError("beyond LBA28")
            return lba & 0xFFFFFF, sel | DEV_LBA | (lba >> 24) & 0x0F, False
        # CHS
        heads, secs = self.heads, self.secs
        if not heads or not secs:
            raise ValueError("no CHS geometry")
        if lba + count > self.cyls * heads * secs:
            raise ValueError("beyond the CHS-addressable capacity")
        cyl, rem = divmod(lba, heads * secs)
        head, sec = divmod(rem, secs)
        if cyl > 0xFFFF:
            raise ValueError("cylinder beyond 65535")
        return (sec + 1) | cyl << 8, sel | head, False

    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0:
            raise ValueError("negative LBA or count")
        total = self.info()["sectors"]
        if lba + count > total:
            raise ValueError(f"sectors {lba}+{count} beyond the disk's {total}")

    def _check_dma(self) -> None:
        if not isinstance(self.channel, BusMaster):
            raise ValueError("the channel has no bus master (bmdma_read/bmdma_write)")
        if self._memory is None:
            raise ValueError("DMA needs guest memory (memory=... or channel.memory)")

    def _bm(self) -> BusMaster:
        assert isinstance(self.channel, BusMaster)
        return self.channel

    def _dma_window(self) -> tuple[int, int]:
        """(buffer address, capacity in sectors) of the DMA buffer in guest memory."""
        assert self._memory is not None
        buf = (self.dma_base + 0x1000 + 0xFFFF) & ~0xFFFF
        room = (self._memory.size - buf) // SECTOR
        if room <= 0:
            raise ValueError("guest memory too small for a DMA buffer")
        return buf, room

    # ------------------------------------------------------------------ transfers

    def read(
        self, lba: int, count: int, mode: Mode | str = "auto", *, dma: bool | None = None
    ) -> bytes:
        """Reads ``count`` sectors at ``lba``."""
        self._check_range(lba, count)
        use_dma = self.dma if dma is None else dma
        out = bytearray()
        done = 0
        while done < count:
            m = self._pick_mode(lba + done, min(count - done, 256), mode)
            n = min(count - done, self._chunk_limit(m))
            if use_dma:
                n = min(n, self._dma_window()[1])
                out += self._dma_transfer(lba + done, n, m, None)
            else:
                out += self._pio_read(lba + done, n, m)
            done += n
        return bytes(out)

    def write(
        self, lba: int, data: bytes, mode: Mode | str = "auto", *, dma: bool | None = None
    ) -> None:
        """Writes ``data`` (a whole number of sectors) at ``lba``."""
        data = bytes(data)
        if len(data) % SECTOR:
            raise ValueError("data must be a whole number of 512-byte sectors")
        count = len(data) // SECTOR
        self._check_range(lba, count)
        use_dma = self.dma if dma is None else dma
        done = 0
        while done < count:
            m = self._pick_mode(lba + done, min(count - done, 256), mode)
            n = min(count - done, self._chunk_limit(m))
            part = data[done * SECTOR : (done + n) * SECTOR]
            if use_dma:
                n = min(n, self._dma_window()[1])
                part = part[: n * SECTOR]
                self._dma_transfer(lba + done, n, m, part)
            else:
                self._pio_write(lba + done, n, m, part)
            done += n

    def _pio_read(self, lba: int, count: int, mode: str) -> bytes:
        field, dev, ext = self._encode(lba, count, mode)
        mult = self.multiple
        command = _PIO_COMMANDS[False, bool(mult), ext]
        self._load_taskfile(command, count=count, lba=field, device=dev, ext=ext)
        out = bytearray()
        left = count
        while left:
            block = min(left, mult) if mult else 1
            out += self._pio_in_block(block * SECTOR, command)
            left -= block
        st = self._wait_not_busy()
        if st & (ST_ERR | ST_DRQ | ST_DF):
            raise self._fail("read did not end cleanly", command)
        return bytes(out)

    def _pio_write(self, lba: int, count: int, mode: str, data: bytes) -> None:
        field, dev, ext = self._encode(lba, count, mode)
        mult = self.multiple
        command = _PIO_COMMANDS[True, bool(mult), ext]
        self._load_taskfile(command, count=count, lba=field, device=dev, ext=ext)
        pos = 0
        while pos < count:
            block = min(count - pos, mult) if mult else 1
            self._pio_out_block(data[pos * SECTOR : (pos + block) * SECTOR], command)
            pos += block
            # The device raises an interrupt after every block it commits (the last included).
            st = self._wait_not_busy("the block to be written")
            self._status()
            if st & (ST_ERR | ST_DF):
                raise self._fail("write failed", command, st)
        st = self.channel.ctrl_read()
        if st & ST_DRQ:
            raise self._fail("device wants more data than was sent", command, st)

    def _dma_transfer(self, lba: int, count: int, mode: str, data: bytes | None) -> bytes:
        """One READ/WRITE DMA (EXT) command through the bus master."""
        self._check_dma()
        mem = self._memory
        assert mem is not None
        bm = self._bm()
        field, dev, ext = self._encode(lba, count, mode)
        to_memory = data is None
        if to_memory:
            command = CMD_READ_DMA_EXT if ext else CMD_READ_DMA
        else:
            command = CMD_WRITE_DMA_EXT if ext else CMD_WRITE_DMA
        buf, _ = self._dma_window()
        nbytes = count * SECTOR
        # The PRD table: one entry per 64 KiB (a PRD never crosses a 64 KiB boundary).
        prdt = bytearray()
        pos = 0
        while pos < nbytes:
            n = min(0x10000, nbytes - pos)
            flags = PRD_EOT if pos + n == nbytes else 0
            prdt += (buf + pos).to_bytes(4, "little")
            prdt += ((n & 0xFFFF) | flags).to_bytes(4, "little")
            pos += n
        mem.write(self.dma_base, bytes(prdt))
        if data is not None:
            mem.write(buf, data)
        bm.bmdma_write(BM_CMD, 0)
        bm.bmdma_write(BM_STATUS, BM_ST_ERROR | BM_ST_INTR)
        bm.bmdma_write(BM_PRDT, self.dma_base, 4)
        self._load_taskfile(command, count=count, lba=field, device=dev, ext=ext)
        bm.bmdma_write(BM_CMD, BM_CMD_START | (BM_CMD_TO_MEMORY if to_memory else 0))
        try:
            st = self._wait_dma_done()
        finally:
            bm.bmdma_write(BM_CMD, BM_CMD_TO_MEMORY if to_memory else 0)
        bms = bm.bmdma_read(BM_STATUS)
        st = self._status()
        bm.bmdma_write(BM_STATUS, BM_ST_ERROR | BM_ST_INTR)
        if st & (ST_ERR | ST_DF | ST_DRQ | ST_BSY) or bms & BM_ST_ERROR:
            raise AtaError(
                "DMA command failed",
                status=st,
                error=self._error(),
                command=command,
                bm_status=bms,
            )
        if not bms & BM_ST_INTR:
            raise AtaError(
                "DMA ended without an interrupt (PRD table shorter than the transfer?)",
                status=st,
                error=self._error(),
                command=command,
                bm_status=bms,
            )
        return mem.read(buf, nbytes) if to_memory else b""
