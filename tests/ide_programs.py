"""Register-level IDE programs: steps, an executor over an IDE target, and a random generator.

A program is a list of :class:`Step`. The executor runs one step, then *settles* (polls
Alternate Status until BSY clears, and waits for a started bus-master transfer to finish), then
records the step's result and the channel's IRQ level. Because every step settles, no result
depends on timing, so the same program gives the same record on QEMU and on blockemu.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ide_targets import DMA_OPCODES

SECTOR = 512
PRD_TABLE = 0x100000
PRD_TABLE2 = 0x101000
DMA_BUF = 0x200000
DMA_SETTLE = 0.2  # seconds a started bus-master transfer gets to finish
STALE_DMA_SETTLE = 0.05  # seconds a START without a fresh DMA command gets (see Executor)
DMA_AREA = 0x80000  # bytes of DMA_BUF the programs use (hashed at the end of random programs)


@dataclass
class Step:
    op: str
    args: tuple[Any, ...] = ()
    expect: Any = None  # value, or a callable(result) -> bool, checked on QEMU (spec reading)
    irq: bool | None = None  # expected IRQ level after the step (checked on QEMU)
    label: str = ""
    allow: str = ""  # a KNOWN_DIVERGENCES key: blockemu may differ from QEMU at this step

    def __repr__(self) -> str:
        a = ", ".join(f"{x:#x}" if isinstance(x, int) else repr(x)[:40] for x in self.args)
        return f"{self.op}({a}){' ' + self.label if self.label else ''}"


# ---------------------------------------------------------------------- step builders


def W(reg: int, v: int, **kw: Any) -> Step:
    return Step("outb", (reg, v), **kw)


def R(reg: int, expect: Any = None, **kw: Any) -> Step:
    return Step("inb", (reg,), expect=expect, **kw)


def CTL(v: int, **kw: Any) -> Step:
    return Step("ctl", (v,), **kw)


def ALT(expect: Any = None, **kw: Any) -> Step:
    return Step("alt", (), expect=expect, **kw)


def D16(n: int = 1, expect: Any = None, **kw: Any) -> Step:
    """Reads up to n data words (stops after the word that ends the DRQ block)."""
    return Step("insw", (n,), expect=expect, **kw)


def D16w(words: list[int], expect: Any = None, **kw: Any) -> Step:
    return Step("outsw", (tuple(words),), expect=expect, **kw)


def DATA(size: int, expect: Any = None, **kw: Any) -> Step:
    """One data-port read of 1, 2 or 4 bytes."""
    return Step("in_data", (size,), expect=expect, **kw)


def DATAw(size: int, v: int, **kw: Any) -> Step:
    return Step("out_data", (size, v), **kw)


def BMW(off: int, v: int, size: int = 1, **kw: Any) -> Step:
    return Step("bmw", (off, v, size), **kw)


def BMR(off: int, size: int = 1, expect: Any = None, **kw: Any) -> Step:
    return Step("bmr", (off, size), expect=expect, **kw)


def MEMW(addr: int, data: bytes) -> Step:
    return Step("memw", (addr, bytes(data)))


def MEMR(addr: int, n: int, expect: Any = None, **kw: Any) -> Step:
    return Step("memr", (addr, n), expect=expect, **kw)


def IRQ(level: bool | None = None, **kw: Any) -> Step:
    return Step("irq", (), irq=level, **kw)


def taskfile(
    cmd: int,
    *,
    count: int = 1,
    lba: int = 0,
    dev: int = 0xE0,
    feat: int = 0,
    ext: bool = False,
) -> list[Step]:
    """Task-file writes (HOB bytes first for EXT) and the command write."""
    steps: list[Step] = []
    if ext:
        steps += [
            W(1, (feat >> 8) & 0xFF),
            W(2, (count >> 8) & 0xFF),
            W(3, (lba >> 24) & 0xFF),
            W(4, (lba >> 32) & 0xFF),
            W(5, (lba >> 40) & 0xFF),
        ]
    steps += [
        W(1, feat & 0xFF),
        W(2, count & 0xFF),
        W(3, lba & 0xFF),
        W(4, (lba >> 8) & 0xFF),
        W(5, (lba >> 16) & 0xFF),
        W(6, dev),
        W(7, cmd),
    ]
    return steps


def prd_table(entries: list[tuple[int, int, bool]]) -> bytes:
    out = bytearray()
    for addr, count, eot in entries:
        out += addr.to_bytes(4, "little")
        out += ((count & 0xFFFF) | (0x8000_0000 if eot else 0)).to_bytes(4, "little")
    return bytes(out)


def words_of(data: bytes) -> list[int]:
    return [data[i] | data[i + 1] << 8 for i in range(0, len(data), 2)]


# ---------------------------------------------------------------------- executor


class StepError(RuntimeError):
    """A target failed (for QEMU: died) while running a step."""


class Executor:
    def __init__(self, target: Any, settle_timeout: float = 5.0) -> None:
        self.t = target
        self.bm_started = False
        self.settle_timeout = settle_timeout

    def settle(self) -> None:
        t = self.t
        # ide.md §11 settle(): run all pending asynchronous completions. QEMU runs them
        # between qtest commands; blockemu's worker-pool completions are waited for, including
        # ones that show neither BSY nor DRQ (a bus-master transfer of a command that a reset
        # left registered, restarted by START).
        drain = getattr(t, "drain", None)
        if drain is not None:
            drain()
        deadline = time.monotonic() + self.settle_timeout
        dma_deadline = time.monotonic() + DMA_SETTLE
        while True:
            st = t.ctrl_read()
            if st & 0x80:
                if time.monotonic() > deadline:
                    return
                continue
            if (
                st & 0x08
                and self.bm_started
                and t.last_command in DMA_OPCODES
                and t.bmdma_read(2) & 0x01
            ):
                # A started transfer of a few KiB ends within milliseconds; one that has not
                # ended after DMA_SETTLE is stuck in the device's state, not slow.
                if time.monotonic() > dma_deadline:
                    return
                t.wait_irq(0.001)
                continue
            return

    def settle_started_dma(self) -> None:
        """START may run a DMA command that a reset left registered (QEMU keeps its DMA
        callback): the transfer then shows neither BSY nor DRQ, only the bus master's ACTIVE
        bit until it ends (or an IRQ). Give it STALE_DMA_SETTLE to finish."""
        t = self.t
        st = t.ctrl_read()
        if st & 0x80 or (st & 0x08 and t.last_command in DMA_OPCODES):
            return  # a fresh DMA command (or BSY): settle() waits for it
        events = getattr(t, "irq_events", None)
        if events is None:
            return  # blockemu: settle() drains its completions
        seen = len(events)
        deadline = time.monotonic() + STALE_DMA_SETTLE
        while time.monotonic() < deadline:
            if not t.bmdma_read(2) & 0x01 or True in events[seen:]:
                return
            t.ctrl_read()  # lets QEMU's main loop run; IRQ events arrive with the reply

    def step(self, s: Step) -> Any:
        t = self.t
        op, a = s.op, s.args
        result: Any = None
        if op == "outb":
            t.ioport_write(a[0], a[1], 1)
        elif op == "inb":
            result = t.ioport_read(a[0], 1)
        elif op == "ctl":
            t.ctrl_write(a[0])
        elif op == "alt":
            result = t.ctrl_read()
        elif op == "insw":
            result = t.insw_paired(a[0])
        elif op == "outsw":
            result = t.outsw_paired(list(a[0]))
        elif op == "in_data":
            result = t.ioport_read(0, a[0])
        elif op == "out_data":
            t.ioport_write(0, a[1], a[0])
        elif op == "bmw":
            was_started = self.bm_started
            t.bmdma_write(a[0], a[1], a[2])
            if a[0] == 0 and a[2] in (1, 2, 4):
                self.bm_started = bool(a[1] & 1)
            if a[0] == 0 and a[2] == 1 and a[1] & 1 and not was_started:
                self.settle_started_dma()
        elif op == "bmr":
            result = t.bmdma_read(a[0], a[1])
        elif op == "memw":
            t.memory.write(a[0], a[1])
        elif op == "memr":
            result = t.memory.read(a[0], a[1])
        elif op == "memhash":
            result = hashlib.sha256(t.memory.read(a[0], a[1])).hexdigest()
        elif op == "irq":
            pass
        else:  # pragma: no cover
            raise ValueError(op)
        self.settle()
        return result

    def run(self, program: list[Step]) -> list[tuple[Any, bool]]:
        record: list[tuple[Any, bool]] = []
        for i, s in enumerate(program):
            try:
                result = self.step(s)
            except Exception as e:
                recent = "; ".join(repr(p) for p in program[max(0, i - 30) : i])
                raise StepError(
                    f"{self.t.name} failed at step {i} {s!r}: {e} (after: {recent})"
                ) from e
            record.append((result, bool(self.t.irq)))
        return record


def check_expectations(program: list[Step], record: list[tuple[Any, bool]]) -> list[str]:
    """Steps whose result or IRQ level differs from the spec's expectation."""
    bad: list[str] = []
    for i, (s, (result, irq)) in enumerate(zip(program, record, strict=True)):
        if s.expect is not None:
            ok = s.expect(result) if callable(s.expect) else result == s.expect
            if not ok:
                shown = f"{result:#x}" if isinstance(result, int) else repr(result)[:200]
                bad.append(f"step {i} {s!r}: got {shown}, expected {s.expect!r}")
        if s.irq is not None and irq != s.irq:
            bad.append(f"step {i} {s!r}: IRQ {irq}, expected {s.irq}")
    return bad


def first_difference(
    program: list[Step], a: list[tuple[Any, bool]], b: list[tuple[Any, bool]]
) -> str | None:
    for i, (s, x, y) in enumerate(zip(program, a, b, strict=True)):
        if x != y and not s.allow:
            ctx = "; ".join(repr(p) for p in program[max(0, i - 6) : i])
            return f"step {i} {s!r}: qemu={x!r:.300} blockemu={y!r:.300} (after: {ctx})"
    return None


# ---------------------------------------------------------------------- random programs

COMMON_OPCODES = [
    0x20, 0x21, 0x24, 0x29, 0x30, 0x31, 0x34, 0x39, 0x3C, 0x40, 0x41, 0x42, 0x70, 0x10,
    0x90, 0x91, 0xC4, 0xC5, 0xC6, 0xC8, 0xCA, 0x25, 0x35, 0xE0, 0xE1, 0xE2, 0xE3, 0xE5,
    0xE6, 0xE7, 0xEA, 0xEC, 0xEF, 0xF8, 0x27, 0xB0, 0xF5, 0x94, 0x98, 0x00, 0x08, 0xA0,
    0xA1, 0x2F, 0xF9,
]  # fmt: skip
PIO_IN_OPCODES = frozenset({0x20, 0x21, 0x24, 0x29, 0xC4, 0xEC, 0xB0})
PIO_OUT_OPCODES = frozenset({0x30, 0x31, 0x34, 0x39, 0x3C, 0xC5})
SET_FEATURES_SUBS = [0x02, 0x03, 0x82, 0xCC, 0x66, 0xAA, 0x55, 0x05, 0x85, 0x01, 0x77, 0x42]
SMART_SUBS = [0xD0, 0xD1, 0xD2, 0xD4, 0xD5, 0xD8, 0xD9, 0xDA, 0x00]
DEVICE_BYTES = [0xA0, 0xE0, 0x40, 0x00, 0xB0, 0xF0, 0xA1, 0xE1, 0xAF, 0xEF]


def random_program(seed: int, total: int, n_ops: int = 50) -> list[Step]:
    """~n_ops operations mixing task-file writes, commands from the whole opcode space,
    data-port traffic, device-control writes and bus-master DMA."""
    rng = random.Random(seed)
    prog: list[Step] = []

    def lba() -> int:
        c = rng.random()
        if c < 0.4:
            return rng.randrange(0, min(total, 4096))
        if c < 0.6:
            return max(0, total - rng.randrange(1, 4))
        if c < 0.7:
            return (1 << 28) - rng.randrange(0, 3)
        if c < 0.8:
            return total + rng.randrange(0, 3)
        return rng.randrange(0, total)

    def count() -> int:
        return rng.choice([0, 1, 1, 1, 2, 3, 4, 5, 17, rng.randrange(256)])

    for _ in range(n_ops):
        c = rng.random()
        if c < 0.30:
            op = rng.choice(COMMON_OPCODES) if rng.random() < 0.85 else rng.randrange(256)
            ext = op in (0x24, 0x25, 0x27, 0x29, 0x34, 0x35, 0x39, 0x42) and rng.random() < 0.9
            feat = 0
            n = count()
            lb = lba()
            dev = rng.choice(DEVICE_BYTES) if rng.random() < 0.3 else (0x40 if ext else 0xE0)
            if rng.random() < 0.15:  # CHS
                dev = 0xA0 | rng.randrange(16)
                lb = rng.randrange(1, 64) | rng.randrange(70) << 8
            if op == 0xEF:
                feat = rng.choice(SET_FEATURES_SUBS)
                if feat == 0x03:
                    n = rng.choice([0x00, 0x08, 0x0C, 0x10, 0x22, 0x45, 0x46, 0x80, 0x0F])
            elif op == 0xB0:
                feat = rng.choice(SMART_SUBS)
                lb = 0xC24F00 | rng.choice([0, 1, 6, 0xFF]) if rng.random() < 0.8 else lb
            elif op == 0xC6:
                n = rng.choice([0, 1, 2, 3, 4, 8, 16, 32])
            elif op == 0x91 and n == 0:
                n = 17  # QEMU 7.2 divides by zero on a later CHS transfer: KNOWN_DIVERGENCES
            elif op == 0x06:
                feat = rng.choice([0, 1])
            if op in (0x20, 0x21, 0x24, 0x29, 0xC4) and n == 0 and rng.random() < 0.8:
                n = 1
            prog += taskfile(op, count=n, lba=lb, dev=dev, feat=feat, ext=ext)
            # Often follow the command the way a driver would: drain or fill a few DRQ blocks.
            if rng.random() < 0.6:
                blocks = rng.choice([1, 1, 2, 3])
                if op in PIO_IN_OPCODES:
                    prog += [D16(256 * rng.choice([1, 4, 16]) + 1) for _ in range(blocks)]
                elif op in PIO_OUT_OPCODES:
                    for _ in range(blocks):
                        words = 256 * rng.choice([1, 4, 16])
                        prog.append(D16w([rng.randrange(65536) for _ in range(words)]))
        elif c < 0.40:
            prog.append(W(rng.randrange(1, 7), rng.randrange(256)))
        elif c < 0.52:
            prog.append(R(rng.randrange(1, 8)))
        elif c < 0.56:
            prog.append(ALT())
        elif c < 0.61:
            v = rng.choice([0x08, 0x0A, 0x88, 0x8A, 0x00, 0x02, 0x80, 0x0C, 0x0E, 0x04])
            prog.append(CTL(v))
            if v & 0x04:
                prog.append(CTL(v & ~0x04))
        elif c < 0.75:
            k = rng.random()
            if k < 0.6:
                prog.append(D16(rng.choice([1, 2, 100, 255, 256, 257, 512, 600])))
            else:
                prog.append(DATA(rng.choice([1, 2, 4])))
        elif c < 0.85:
            k = rng.random()
            if k < 0.6:
                n = rng.choice([1, 2, 255, 256, 257, 512])
                prog.append(D16w([rng.randrange(65536) for _ in range(n)]))
            else:
                size = rng.choice([1, 2, 4])
                prog.append(DATAw(size, rng.randrange(1 << (8 * size))))
        elif c < 0.97:
            k = rng.random()
            if k < 0.25:
                entries = []
                for _ in range(rng.choice([1, 1, 2, 3])):
                    addr = DMA_BUF + rng.randrange(0, DMA_AREA // 2, 512)
                    size = rng.choice([512, 1024, 256, 4096, 0, 510, 513])
                    entries.append((addr, size, False))
                if rng.random() < 0.95:
                    entries[-1] = (entries[-1][0], entries[-1][1], True)
                table = rng.choice([PRD_TABLE, PRD_TABLE2])
                prog.append(MEMW(table, prd_table(entries)))
                prog.append(BMW(4, table, 4))
            elif k < 0.55:
                prog.append(BMW(0, rng.choice([0x00, 0x01, 0x08, 0x09, 0xFF])))
            elif k < 0.7:
                prog.append(BMW(2, rng.choice([0x06, 0x02, 0x04, 0x60, 0xFF, 0x00])))
            elif k < 0.85:
                prog.append(BMR(rng.choice([0, 2, 4]), rng.choice([1, 1, 4])))
            else:
                addr = DMA_BUF + rng.randrange(0, DMA_AREA // 2, 512)
                if rng.random() < 0.5:
                    prog.append(MEMW(addr, rng.randbytes(rng.choice([512, 1024]))))
                else:
                    prog.append(MEMR(addr, 64))
        else:
            prog.append(IRQ())
    # Finish: stop the bus master, pulse SRST, look at the result.
    prog += [
        BMW(0, 0),
        BMR(2),
        Step("memhash", (DMA_BUF, DMA_AREA)),
        CTL(0x0C),
        CTL(0x08),
        W(6, 0xA0),
        R(7),
        R(1),
        R(2),
        R(3),
        R(4),
        R(5),
        R(6),
    ]
    return prog


def expect_words(want: dict[int, int]) -> Callable[[list[int]], bool]:
    def check(words: list[int]) -> bool:
        return all(i < len(words) and words[i] == v for i, v in want.items())

    check.__name__ = f"words{ {i: hex(v) for i, v in want.items()} }"
    return check
