"""Hand-written IDE programs: ide.md §11 scenarios, geometry.md "Scenarios a driver would run",
and the bad inputs of ide.md §9. Expectations are the spec's statements; they are checked on
QEMU (so a wrong reading of QEMU shows up), and blockemu is held to whatever QEMU records.
"""

from __future__ import annotations

from collections.abc import Callable

from ide_programs import (
    ALT,
    BMR,
    BMW,
    CTL,
    D16,
    DATA,
    DMA_BUF,
    IRQ,
    MEMR,
    MEMW,
    PRD_TABLE,
    D16w,
    DATAw,
    R,
    Step,
    W,
    expect_words,
    prd_table,
    taskfile,
    words_of,
)

SECTOR = 512

# Disks: F1 = 64 MiB patterned (ide.md fixture F1), A = 30 MiB, B = 4 GiB, D = 256 GiB (sparse).
SIZES = {"F1": 131072, "A": 61440, "B": 8388608, "D": 536870912}
# Patterned sectors written into the sparse images (F1 is patterned everywhere).
MARKED = [
    0,
    1,
    5,
    10,
    11,
    62,
    63,
    100,
    1008,
    1136,
    8388575,
    0x0ABCDEF1,
    0x0FFFFFFF,
    1 << 28,
    (1 << 28) + 1,
    0x12345678,
]


def pattern_sector(k: int) -> bytes:
    """Sector k: bytes 0-3 = k little-endian, the rest = k & 0xFF (ide.md F1)."""
    return k.to_bytes(8, "little")[:4] + bytes([k & 0xFF]) * 508


def sector_words(k: int) -> list[int]:
    return words_of(pattern_sector(k))


def status_is(v: int) -> Step:
    return R(7, v)


def lba28_read(lba: int, count: int = 1) -> list[Step]:
    return taskfile(0x20, count=count, lba=lba, dev=0xE0 | (lba >> 24) & 0x0F)


def regs() -> list[Step]:
    return [R(1), R(2), R(3), R(4), R(5), R(6), R(7)]


Scenario = Callable[[int], list[Step]]
SCENARIOS: dict[str, tuple[str, Scenario]] = {}


def scenario(disk: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[fn.__name__] = (disk, fn)
        return fn

    return register


# ---------------------------------------------------------------------- ide.md §11


@scenario("F1")
def s01_power_on(n: int) -> list[Step]:
    return [IRQ(False), R(7, 0x50), R(2, 1), R(3, 1), R(4, 0), R(5, 0), R(6, 0xA0), R(1, 0)]


@scenario("F1")
def s02_devchk(n: int) -> list[Step]:
    seq = [W(2, 0x55), W(3, 0xAA), W(2, 0xAA), W(3, 0x55), W(2, 0x55), W(3, 0xAA)]
    return [
        W(6, 0xA0),
        *seq,
        R(2, 0x55),
        R(3, 0xAA),
        W(6, 0xB0),
        *seq,
        R(2, 0x55),
        R(3, 0xAA),
        R(7, 0x00),
        ALT(0x00),
        R(1, 0x00),
    ]


@scenario("F1")
def s03_srst_classify(n: int) -> list[Step]:
    return [
        CTL(0x08),
        CTL(0x0C),
        CTL(0x08),
        R(7, 0x50),
        R(1, 0x01),
        R(2, 1),
        R(3, 1),
        R(4, 0),
        R(5, 0),
        W(6, 0xB0),
        R(2, 1),
        R(3, 1),
        R(1, 0x00),
        R(4, 0xFF),
        R(5, 0xFF),
        R(7, 0x00),
        W(7, 0xEC, irq=False),
        R(7, 0x00),
        ALT(0x00),
        D16(1, [0]),
        W(6, 0xA0),
        R(7, 0x50),
    ]


@scenario("F1")
def s04_srst_irq_nien(n: int) -> list[Step]:
    return [
        CTL(0x0C),
        CTL(0x08, irq=True),
        R(7, 0x50, irq=False),
        CTL(0x0E),
        CTL(0x0A, irq=False),
        CTL(0x08, irq=False),
        R(7, 0x50),
    ]


@scenario("F1")
def s05_seabios_probe(n: int) -> list[Step]:
    return [
        ALT(0x50),
        W(6, 0xA0),
        R(6, 0xA0),
        W(2, 0x55),
        W(3, 0xAA),
        R(2, 0x55),
        R(3, 0xAA),
        CTL(0x0E),
        CTL(0x0A),
        W(6, 0xA0),
        R(7, 0x50),
        W(7, 0xA1),
        R(7, 0x41),
        R(1, 0x04),
        W(7, 0xEC),
        R(7, 0x58),
        D16(256, expect_words({0: 0x0040, 93: 0x6001})),
        R(7, 0x50),
        W(6, 0xB0),
        W(7, 0xA1),
        R(7, 0x00),
        CTL(0x08),
        W(6, 0xA0),
        R(7, 0x50),
    ]


def identify(dev: int = 0xA0) -> list[Step]:
    return [W(6, dev), W(7, 0xEC, irq=True), R(7, 0x58, irq=False)]


F1_IDENTIFY = {
    0: 0x0040,
    1: 130,
    3: 16,
    4: 0x7E00,
    5: 512,
    6: 63,
    10: 0x514D,
    11: 0x3030,
    12: 0x3030,
    13: 0x3120,
    14: 0x2020,
    19: 0x2020,
    23: 0x322E,
    24: 0x352B,
    25: 0x2020,
    26: 0x2020,
    27: 0x5145,
    28: 0x4D55,
    29: 0x2048,
    30: 0x4152,
    31: 0x4444,
    32: 0x4953,
    33: 0x4B20,
    34: 0x2020,
    47: 0x8010,
    49: 0x0B00,
    53: 0x0007,
    54: 130,
    55: 16,
    56: 63,
    57: 0xFFE0,
    58: 0x0001,
    59: 0x0110,
    60: 0x0000,
    61: 0x0002,
    64: 0x0003,
    80: 0x00F0,
    82: 0x4021,
    83: 0x7400,
    85: 0x4021,
    86: 0x3400,
    88: 0x203F,
    93: 0x6001,
    100: 0x0000,
    101: 0x0002,
    102: 0,
    103: 0,
    255: 0,
}


@scenario("F1")
def s06_identify(n: int) -> list[Step]:
    return [
        *identify(),
        D16(1, [0x0040]),
        R(7, 0x58),
        D16(254),
        R(7, 0x58, irq=False),
        D16(1),
        R(7, 0x50, irq=False),
        *identify(),
        D16(256, expect_words(F1_IDENTIFY)),
        ALT(0x50),
    ]


def identify_words(n: int) -> dict[int, int]:
    """geometry.md scenarios 1-5 for a blank disk of n sectors."""
    cyls = max(2, min(16383, n // 1008))
    chs = cyls * 16 * 63
    lba28 = min(n, 0x0FFFFFFF)
    return {
        1: cyls,
        3: 16,
        6: 63,
        53: 0x0007,
        54: cyls,
        55: 16,
        56: 63,
        57: chs & 0xFFFF,
        58: chs >> 16,
        60: lba28 & 0xFFFF,
        61: lba28 >> 16,
        49: 0x0B00,
        83: 0x7400,
        86: 0x3400,
        100: n & 0xFFFF,
        101: (n >> 16) & 0xFFFF,
        102: (n >> 32) & 0xFFFF,
        103: n >> 48,
    }


@scenario("A")
def g01_identify_30m(n: int) -> list[Step]:
    return [*identify(), D16(256, expect_words(identify_words(n)))]


@scenario("B")
def g01_identify_4g(n: int) -> list[Step]:
    return [*identify(), D16(256, expect_words(identify_words(n)))]


@scenario("D")
def g01_identify_256g(n: int) -> list[Step]:
    return [*identify(), D16(256, expect_words(identify_words(n)))]


@scenario("F1")
def s08_lba28_read(n: int) -> list[Step]:
    return [
        *lba28_read(5),
        IRQ(True),
        R(7, 0x58, irq=False),
        D16(256, sector_words(5)),
        R(7, 0x50, irq=False),
        R(2, 0),
        R(3, 6),
        R(4, 0),
        R(5, 0),
        R(6, 0xE0),
    ]


@scenario("F1")
def s09_count0_is_256(n: int) -> list[Step]:
    steps = [*taskfile(0x20, count=0, lba=0), R(2, 0xFF)]
    for k in range(256):
        steps += [IRQ(True), R(7, 0x58, irq=False)]
        steps += [D16(256, sector_words(k) if k in (0, 1, 128, 255) else None)]
    steps += [R(2, 0), R(3, 0), R(4, 1), R(7, 0x50)]
    return steps


@scenario("D")
def s10_lba48_count0(n: int) -> list[Step]:
    return [
        *taskfile(0x24, count=0, lba=0, dev=0x40, ext=True),
        R(2, 0xFF),
        D16(256, sector_words(0)),
        R(2, 0xFE),
        CTL(0x88),
        R(2, 0x00),
        CTL(0x08),
        CTL(0x0C),
        CTL(0x08),
        R(7, 0x50),
        ALT(0x50),
        D16(1, [0]),
    ]


@scenario("F1")
def s11_pio_write(n: int) -> list[Step]:
    a = [(i * 7 + 3) & 0xFFFF for i in range(256)]
    b = [(i * 13 + 1) & 0xFFFF for i in range(256)]
    return [
        *taskfile(0x30, count=2, lba=10),
        R(7, 0x58, irq=False),
        D16w(a, 256),
        IRQ(True),
        R(7, 0x58),
        D16w(b, 256),
        IRQ(True),
        R(7, 0x50),
        R(3, 12),
        R(2, 0),
        *lba28_read(10, 2),
        D16(256, a),
        D16(256, b),
    ]


@scenario("F1")
def s12_chs(n: int) -> list[Step]:
    return [
        W(6, 0xA2),
        W(5, 0),
        W(4, 1),
        W(3, 3),
        W(2, 1),
        W(7, 0x20),
        D16(256, sector_words(1136)),
        R(3, 4),
        R(4, 1),
        R(5, 0),
        R(6, 0xA2),
        *taskfile(0x20, count=2, lba=63, dev=0xA0),
        D16(256, sector_words(62)),
        D16(256, sector_words(63)),
        R(3, 2),
        R(6, 0xA1),
        R(4, 0),
    ]


@scenario("F1")
def s13_chs_sector0(n: int) -> list[Step]:
    return [*taskfile(0x20, count=1, lba=0, dev=0xA0), IRQ(True), R(7, 0x41), R(1, 0x04)]


@scenario("F1")
def s14_lba28_end(n: int) -> list[Step]:
    return [
        *lba28_read(n - 1),
        D16(256, sector_words(n - 1)),
        R(7, 0x50),
        *lba28_read(n - 1, 2),
        R(7, 0x58),
        D16(256, sector_words(n - 1)),
        IRQ(True),
        R(7, 0x41),
        R(1, 0x04),
        R(3, 0x00),
        R(4, 0x00),
        R(5, 0x02),
        R(6, 0xE0),
        R(2, 1),
        *lba28_read(n),
        IRQ(True),
        R(7, 0x41),
        R(1, 0x04),
        *taskfile(0x20, count=1, lba=0, dev=0xE1),
        R(7, 0x41),
        R(1, 0x04),
    ]


@scenario("D")
def s15_lba48_boundary(n: int) -> list[Step]:
    return [
        *taskfile(0x24, count=2, lba=1 << 28, dev=0x40, ext=True),
        D16(256, sector_words(1 << 28)),
        D16(256, sector_words((1 << 28) + 1)),
        R(3, 0x02),
        R(4, 0),
        R(5, 0),
        R(2, 0),
        CTL(0x88),
        R(3, 0x10),
        R(4, 0),
        R(5, 0),
        R(2, 0),
        W(1, 0),
        R(3, 0x02),
        CTL(0x08),
        *taskfile(0x24, count=2, lba=n - 1, dev=0x40, ext=True),
        D16(256),
        R(7, 0x41),
        R(1, 0x04),
    ]


@scenario("D")
def s16_lba28_wrap(n: int) -> list[Step]:
    return [
        *taskfile(0x20, count=1, lba=0x0FFFFFFF, dev=0xEF),
        D16(256, sector_words(0x0FFFFFFF)),
        R(3, 0),
        R(4, 0),
        R(5, 0),
        R(6, 0xE0),
    ]


@scenario("F1")
def s17_multiple(n: int) -> list[Step]:
    data = [(i * 3) & 0xFFFF for i in range(256 * 5)]
    return [
        *taskfile(0xC6, count=4),
        IRQ(True),
        R(7, 0x50),
        *taskfile(0xC4, count=10, lba=100),
        IRQ(True),
        R(7, 0x58, irq=False),
        D16(1024, lambda w: len(w) == 1024 and w[:256] == sector_words(100)),
        IRQ(True),
        R(7, 0x58, irq=False),
        D16(1024, lambda w: len(w) == 1024 and w[768:] == sector_words(107)),
        IRQ(True),
        R(7, 0x58),
        D16(1024, lambda w: len(w) == 512),
        IRQ(False),
        R(3, 110),
        R(7, 0x50),
        *taskfile(0xC5, count=5, lba=200),
        IRQ(False),
        R(7, 0x58),
        D16w(data[:1024], 1024),
        IRQ(True),
        R(7, 0x58),
        D16w(data[1024:], 256),
        IRQ(True),
        R(7, 0x50),
        *taskfile(0xC6, count=3),
        R(7, 0x41),
        *taskfile(0xC6, count=32),
        R(7, 0x41),
        *taskfile(0xC6, count=0),
        R(7, 0x50),
        *taskfile(0xC4, count=1, lba=0),
        R(7, 0x41),
        R(1, 0x04),
        CTL(0x0C),
        CTL(0x08),
        *taskfile(0xC4, count=20, lba=200),
        D16(16 * 256 + 1, lambda w: len(w) == 16 * 256 and w[:1024] == data[:1024]),
        D16(4 * 256 + 1, lambda w: len(w) == 4 * 256),
        R(7, 0x50),
        *identify(),
        D16(256, expect_words({59: 0x0110})),
    ]


@scenario("F1")
def s18_unsupported(n: int) -> list[Step]:
    steps: list[Step] = []
    for op in (0x00, 0x08, 0x11, 0x2F, 0xA0, 0xA1, 0xF9, 0xFF, 0x03, 0x38, 0x87, 0xC0, 0xF0):
        steps += [W(7, op, irq=True), R(7, 0x41, label=f"op {op:#x}"), R(1, 0x04)]
    steps += [W(7, 0xE5), R(7, 0x50), R(1, 0x00)]
    return steps


@scenario("F1")
def s19_busy_interlock(n: int) -> list[Step]:
    return [
        W(2, 0x11),
        *identify(),
        D16(10),
        W(2, 0x33),
        W(6, 0xB0),
        W(7, 0x20),
        R(2, 0x11),
        R(7, 0x58),
        D16(1, [0x514D]),
        D16(245),
        R(7, 0x50),
        W(2, 0x33),
        R(2, 0x33),
    ]


@scenario("F1")
def s20_data_port_no_drq(n: int) -> list[Step]:
    return [
        DATA(2, 0),
        DATA(4, 0),
        DATA(1, 0),
        DATAw(2, 0x1234),
        DATAw(4, 0x12345678),
        R(7, 0x50),
        *identify(),
        DATA(1, 0x40),
        DATA(2, 130),
        DATA(4),
        DATAw(2, 0xFFFF),
        DATAw(1, 0xFF),
        D16(251),
        DATA(4, 0),  # two bytes left: a 32-bit read is refused (CVE-2015-5154 check)
        ALT(0x58),
        DATA(2),
        ALT(0x50),
        # 32-bit access during a data-out phase, then the block's end.
        *taskfile(0x30, count=1, lba=20),
        DATAw(4, 0xDEADBEEF),
        DATA(2, 0),
        D16w([0x1111] * 253, 253),
        DATAw(4, 0xCAFEF00D),
        ALT(0x58),
        DATAw(2, 0x2222),
        R(7, 0x50),
        *lba28_read(20),
        D16(256, lambda w: w[:2] == [0xBEEF, 0xDEAD] and w[2:255] == [0x1111] * 253),
    ]


@scenario("F1")
def s21_alt_status(n: int) -> list[Step]:
    return [
        W(6, 0xA0),
        W(7, 0xEC, irq=True),
        ALT(0x58, irq=True),
        R(7, 0x58, irq=False),
        D16(256),
        W(7, 0x10, irq=True),
        W(2, 0),
        W(7, 0xE5, irq=True),
        R(2, 0xFF),
        R(7, 0x50, irq=False),
    ]


@scenario("F1")
def s22_nien(n: int) -> list[Step]:
    return [
        CTL(0x0A),
        W(7, 0x90, irq=False),
        R(7, 0x50),
        R(1, 0x01),
        R(2, 1),
        R(3, 1),
        R(4, 0),
        R(5, 0),
        R(6, 0xA0),
        CTL(0x08, irq=False),
        W(7, 0x10, irq=True),
        CTL(0x0A, irq=True),
        R(7, 0x50, irq=False),
        CTL(0x08),
    ]


@scenario("F1")
def s23_edd_absent_slave(n: int) -> list[Step]:
    return [W(6, 0xB0), W(7, 0x90, irq=False), R(7, 0x00), W(6, 0xA0), R(7, 0x50)]


def set_features(sub: int, count: int = 0) -> list[Step]:
    return taskfile(0xEF, count=count, feat=sub, dev=0xA0)


@scenario("F1")
def s24_set_features(n: int) -> list[Step]:
    return [
        *identify(),
        D16(256),
        *set_features(0x82),
        IRQ(True),
        R(7, 0x50),
        *identify(),
        D16(256, expect_words({85: 0x4001})),
        *set_features(0x02),
        *identify(),
        D16(256, expect_words({85: 0x4021})),
        *set_features(0x03, 0x45),
        *identify(),
        D16(256, expect_words({88: 0x203F})),
        *set_features(0x03, 0x22),
        *identify(),
        D16(256, expect_words({63: 0x0407, 88: 0x003F})),
        *set_features(0x03, 0x0C),
        *identify(),
        D16(256, expect_words({62: 0x0007, 63: 0x0007})),
        *set_features(0x03, 0x80),
        R(7, 0x41),
        *set_features(0x77),
        R(7, 0x41),
        R(1, 0x04),
    ]


@scenario("F1")
def s25_flush(n: int) -> list[Step]:
    return [
        *taskfile(0x30, count=1, lba=30),
        D16w(list(range(256))),
        *taskfile(0xE7, dev=0xA0),
        IRQ(True),
        R(7, 0x50),
        *taskfile(0xEA, dev=0xA0),
        IRQ(True),
        R(7, 0x50),
        *set_features(0x82),
        *taskfile(0x30, count=1, lba=31),
        D16w(list(range(256, 512))),
        *taskfile(0xE7, dev=0xA0),
        R(7, 0x50),
    ]


@scenario("F1")
def s26_power(n: int) -> list[Step]:
    steps: list[Step] = []
    for op in (0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96, 0x97, 0x99):
        steps += [W(7, op, irq=True), R(7, 0x40, label=f"op {op:#x}")]
    for op in (0xE5, 0x98):
        steps += [W(2, 0), W(7, op), R(2, 0xFF), R(7, 0x50)]
    steps += [*lba28_read(3), D16(256, sector_words(3))]
    steps += [W(7, 0x10, irq=True), R(7, 0x50)]
    steps += [*taskfile(0x70, lba=0xFFFFFF, dev=0xEF), IRQ(True), R(7, 0x50)]
    return steps


@scenario("F1")
def s27_native_max(n: int) -> list[Step]:
    return [
        W(6, 0xE0),
        W(7, 0xF8, irq=True),
        R(7, 0x50),
        R(3, 0xFF),
        R(4, 0xFF),
        R(5, 0x01),
        R(6, 0xE0),
        W(6, 0xA0),
        W(7, 0xF8),
        R(3, 0x20),
        R(4, 0x82),
        R(5, 0x00),
        R(6, 0xA0),
    ]


@scenario("A")
def g09_native_max_30m(n: int) -> list[Step]:
    return [W(6, 0xE0), W(7, 0xF8), R(3, 0xFF), R(4, 0xEF), R(5, 0x00), R(6, 0xE0)]


@scenario("D")
def g09_native_max_ext_256g(n: int) -> list[Step]:
    m = n - 1
    return [
        W(6, 0x40),
        W(7, 0x27),
        R(3, m & 0xFF),
        R(4, (m >> 8) & 0xFF),
        R(5, (m >> 16) & 0xFF),
        CTL(0x88),
        R(3, (m >> 24) & 0xFF),
        R(4, (m >> 32) & 0xFF),
        R(5, (m >> 40) & 0xFF),
        CTL(0x08),
        W(6, 0xE0),
        W(7, 0xF8),
        R(3, 0xFF),
        R(4, 0xFF),
        R(5, 0xFF),
        R(6, 0xEF),
    ]


@scenario("F1")
def s28_init_dev_params(n: int) -> list[Step]:
    return [
        *taskfile(0x91, count=32, dev=0xA7),
        IRQ(True),
        R(7, 0x50),
        *taskfile(0x20, count=1, lba=1, dev=0xA1),
        D16(256, sector_words(32)),
        CTL(0x0C),
        CTL(0x08),
        *taskfile(0x20, count=1, lba=1, dev=0xA1),
        D16(256, sector_words(32)),
        *set_features(0xCC),
        CTL(0x0C),
        CTL(0x08),
        *taskfile(0x20, count=1, lba=1, dev=0xA1),
        D16(256, sector_words(63)),
        *identify(),
        D16(256, expect_words({54: 130, 55: 16, 56: 63})),
        *set_features(0x66),
    ]


@scenario("B")
def g10_init_dev_params_4g(n: int) -> list[Step]:
    return [
        *taskfile(0x91, count=32, dev=0xA7),
        R(7, 0x50),
        *taskfile(0x20, count=1, lba=1 | 4 << 8, dev=0xA3),  # C4/H3/S1 with 8x32: LBA 1120
        D16(256),
        R(3, 2),
        R(4, 4),
        R(6, 0xA3),
        *identify(),
        # QEMU builds the IDENTIFY buffer on the first IDENTIFY: after 0x91 it shows the new
        # logical heads/sectors (cylinders unchanged), in words 3/4/6, 54-56 and 57-58.
        D16(
            256,
            expect_words(
                {1: 8322, 3: 8, 4: 0x4000, 6: 32, 54: 8322, 55: 8, 56: 32, 57: 0x8200, 58: 0x0020}
            ),
        ),
    ]


@scenario("F1")
def s29_srst_aborts_read(n: int) -> list[Step]:
    return [
        *lba28_read(40, 4),
        D16(100),
        CTL(0x0C),
        CTL(0x08),
        R(7, 0x50),
        R(1, 0x01),
        R(2, 1),
        R(3, 1),
        R(4, 0),
        R(5, 0),
        D16(1, [0]),
        ALT(0x50),
        IRQ(),
    ]


def bm_reset() -> list[Step]:
    return [BMW(0, 0), BMW(2, 0x06)]


@scenario("F1")
def s30_dma(n: int) -> list[Step]:
    buf = DMA_BUF
    return [
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 512, True)])),
        BMW(4, PRD_TABLE, 4),
        BMR(4, 4, PRD_TABLE),
        *taskfile(0xC8, count=1, lba=0),
        R(7, 0x58),
        BMW(0, 0x09),
        BMR(2, 1, 0x04),
        IRQ(True),
        R(7, 0x50, irq=False),
        MEMR(buf, 512, pattern_sector(0)),
        BMW(0, 0x08),
        # PRD shorter than the request: no interrupt, neither ACTIVE nor INTERRUPT.
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 256, True)])),
        *taskfile(0xC8, count=1, lba=1),
        BMW(0, 0x09),
        BMR(2, 1, 0x00),
        IRQ(False),
        R(7, 0x50),
        BMW(0, 0x08),
        # PRD longer than the request: INTERRUPT and ACTIVE.
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 1024, True)])),
        *taskfile(0xC8, count=1, lba=2),
        BMW(0, 0x09),
        BMR(2, 1, 0x05),
        IRQ(True),
        R(7, 0x50),
        BMW(0, 0x08),
        BMR(2, 1, 0x04),
        # WRITE DMA round trip, START before the command.
        *bm_reset(),
        MEMW(buf, bytes(range(256)) * 4),
        MEMW(PRD_TABLE, prd_table([(buf, 512, False), (buf + 512, 512, True)])),
        BMW(0, 0x01),
        *taskfile(0xCA, count=2, lba=50),
        BMR(2, 1, 0x04),
        R(7, 0x50),
        BMW(0, 0x00),
        *lba28_read(50, 2),
        D16(256, words_of(bytes(range(256)) * 2)),
        D16(256, words_of(bytes(range(256)) * 2)),
        # DMA beyond the end: ABRT, INTERRUPT set, ACTIVE clear.
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 512, True)])),
        *taskfile(0xC8, count=1, lba=n),
        BMW(0, 0x09),
        IRQ(True),
        R(7, 0x41),
        R(1, 0x04),
        BMR(2, 1, 0x04),
        BMW(0, 0x08),
        # Clearing START with the absent slave selected must not crash (CVE-2020-25743).
        *bm_reset(),
        W(6, 0xB0),
        BMW(0, 0x09),
        BMW(0, 0x00),
        BMR(2),
        W(6, 0xA0),
        R(7),
        # READ DMA EXT across LBA 2^16 with a 3-entry table.
        *bm_reset(),
        MEMW(
            PRD_TABLE,
            prd_table(
                [(buf, 1024, False), (buf + 0x10000, 512, False), (buf + 0x20000, 512, True)]
            ),
        ),
        *taskfile(0x25, count=4, lba=65534, dev=0x40, ext=True),
        BMW(0, 0x09),
        IRQ(True),
        R(7, 0x50),
        MEMR(buf, 1024, pattern_sector(65534) + pattern_sector(65535)),
        MEMR(buf + 0x10000, 512, pattern_sector(65536)),
        MEMR(buf + 0x20000, 512, pattern_sector(65537)),
        R(3),
        R(4),
        R(5),
        BMW(0, 0x08),
    ]


@scenario("F1")
def s30b_dma_bad_prdt(n: int) -> list[Step]:
    buf = DMA_BUF
    return [
        # A table without EOT: QEMU stops after 4 KiB of table (512 entries of 8 bytes).
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 2, False)] * 512)),
        BMW(4, PRD_TABLE, 4),
        *taskfile(0xC8, count=4, lba=0),
        BMW(0, 0x09),
        BMR(2),
        R(7),
        R(1),
        BMW(0, 0x08),
        # Zero-length entries mean 64 KiB; odd counts lose bit 0.
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 0, True)])),
        *taskfile(0xC8, count=1, lba=7),
        BMW(0, 0x09),
        BMR(2),
        R(7),
        MEMR(buf, 512),
        BMW(0, 0x08),
        *bm_reset(),
        MEMW(PRD_TABLE, prd_table([(buf, 511, False), (buf + 1024, 3, True)])),
        *taskfile(0xC8, count=1, lba=8),
        BMW(0, 0x09),
        BMR(2),
        R(7),
        MEMR(buf, 2048),
        BMW(0, 0x08),
        # Misaligned PRD table address: low bits dropped.
        BMW(4, PRD_TABLE + 3, 4),
        BMR(4, 4, PRD_TABLE),
        # Status bits: W1C for 1/2, R/W for 5/6, others read 0.
        BMW(2, 0xFF),
        BMR(2),
        BMW(2, 0x00),
        BMR(2),
        BMW(0, 0xFF),
        BMR(0),
        BMW(0, 0x00),
        BMR(0),
        # DMA command then SRST while waiting for START.
        *bm_reset(),
        *taskfile(0xC8, count=1, lba=9),
        R(7, 0x58),
        CTL(0x0C),
        CTL(0x08),
        R(7),
        BMW(0, 0x09),
        BMR(2),
        BMW(0, 0x08),
        R(7),
    ]


# ---------------------------------------------------------------------- geometry.md scenarios


@scenario("B")
def g06_chs_round_trip_4g(n: int) -> list[Step]:
    data = [(0xA500 + i) & 0xFFFF for i in range(256)]
    return [
        *taskfile(0x30, count=1, lba=1008),
        D16w(data, 256),
        R(7, 0x50),
        *taskfile(0x20, count=1, lba=1 | 1 << 8, dev=0xA0),  # cyl 1, head 0, sector 1
        D16(256, data),
        *taskfile(0x20, count=1, lba=63 | 0x2081 << 8, dev=0xAF),  # LBA 8388575
        D16(256, sector_words(8388575)),
        R(3, 1),
        R(4, 0x82),
        R(5, 0x20),
        R(6, 0xA0),
        *taskfile(0x20, count=1, lba=0, dev=0xA0),
        R(7, 0x41),
        R(1, 0x04),
    ]


@scenario("D")
def g07_lba28_encoding_256g(n: int) -> list[Step]:
    lba = 0x0ABCDEF1
    return [
        *taskfile(0x20, count=1, lba=lba, dev=0xE0 | lba >> 24),
        D16(256, sector_words(lba)),
        R(3, 0xF2),
        R(4, 0xDE),
        R(5, 0xBC),
        R(6, 0xEA),
        *taskfile(0x20, count=0, lba=lba, dev=0xE0 | lba >> 24),
        R(2, 0xFF),
        *[D16(256) for _ in range(256)],
        R(2, 0),
        R(7, 0x50),
        R(3, 0xF1),
        R(4, 0xDF),
        R(5, 0xBC),
    ]


@scenario("D")
def g08_lba48_encoding_256g(n: int) -> list[Step]:
    lba = 0x12345678
    return [
        *taskfile(0x24, count=8, lba=lba, dev=0x40, ext=True),
        R(6, 0xE0),
        D16(256, sector_words(lba)),
        *[D16(256) for _ in range(7)],
        R(3, 0x80),
        R(4, 0x56),
        R(5, 0x34),
        R(2, 0),
        CTL(0x88),
        R(3, 0x12),
        R(4, 0x00),
        R(5, 0x00),
        R(2, 0x00),
        R(1, 0x00),
        R(6, 0xE0),
        R(7, 0x50),
        CTL(0x08),
        # An EXT command without the LBA bit is decoded as CHS by QEMU (ide.md §9 #16).
        *taskfile(0x24, count=1, lba=1 | 1 << 8, dev=0xA0, ext=True),
        D16(256, sector_words(1008)),
        R(7, 0x50),
    ]


@scenario("F1")
def b09_bad_inputs(n: int) -> list[Step]:
    return [
        # Keep reading/writing the data port after the block: nothing moves.
        *lba28_read(2),
        D16(600, lambda w: len(w) == 256),
        DATA(2, 0),
        DATA(4, 0),
        *taskfile(0x30, count=1, lba=60),
        D16w([7] * 256, 256),
        DATAw(2, 9),
        D16w([8] * 10, 1),
        R(7, 0x50),
        # CHS with head >= heads and sector > sectors alias into later LBAs.
        *taskfile(0x20, count=1, lba=64 | 0 << 8, dev=0xAF),
        D16(256, sector_words(15 * 63 + 63)),
        # Sector count 0 on WRITE near the end: the in-range blocks are written, then ABRT.
        *taskfile(0x30, count=0, lba=n - 2),
        D16w([0x5151] * 256, 256),
        D16w([0x5252] * 256, 256),
        D16w([0x5353] * 256),
        R(7),
        R(1),
        R(3),
        R(4),
        R(5),
        # READ VERIFY / SEEK far beyond the end: no range check.
        *taskfile(0x40, count=0, lba=0xFFFFFF, dev=0xEF),
        R(7, 0x50),
        *taskfile(0x42, count=0, lba=(1 << 47), dev=0x40, ext=True),
        R(7, 0x50),
        # SMART without the signature, SMART commands with it.
        *taskfile(0xB0, feat=0xDA),
        R(7, 0x41),
        *taskfile(0xB0, feat=0xD8, lba=0xC24F00, dev=0xA0),
        R(7),
        *taskfile(0xB0, feat=0xDA, lba=0xC24F00, dev=0xA0),
        R(4),
        R(5),
        *taskfile(0xB0, feat=0xD0, lba=0xC24F00, dev=0xA0),
        D16(256),
        R(7),
        *[s for _ in range(25) for s in taskfile(0xB0, feat=0xD4, lba=0xC24F00, dev=0xA0)],
        *taskfile(0xB0, feat=0xD5, lba=0xC24F06, dev=0xA0),
        D16(256),
        R(7),
        # CFA erase / security freeze lock opcode.
        W(2, 7),
        W(7, 0xF5),
        R(7),
        R(2),
        # SET MULTIPLE limits and a transfer-mode class out of range.
        *taskfile(0xC6, count=16),
        R(7, 0x50),
        *taskfile(0xC6, count=17),
        R(7, 0x41),
        *set_features(0x03, 0x18),
        R(7, 0x41),
        *set_features(0x03, 0x47),
        R(7),
    ]


@scenario("F1")
def b09_srst_during_write(n: int) -> list[Step]:
    return [
        *taskfile(0x30, count=3, lba=70),
        D16w([0x7070] * 256, 256),
        D16w([0x7171] * 100, 100),
        CTL(0x0C),
        CTL(0x08),
        R(7, 0x50),
        D16w([0x7272] * 10, 1),
        R(7, 0x50),
        *lba28_read(70, 2),
        D16(256, [0x7070] * 256),
        D16(256, sector_words(71)),
    ]


@scenario("F1")
def b09_hob_and_device(n: int) -> list[Step]:
    return [
        W(1, 0x11),
        W(1, 0x22),
        W(2, 0x33),
        W(2, 0x44),
        W(3, 0x55),
        W(3, 0x66),
        W(4, 0x77),
        W(4, 0x88),
        W(5, 0x99),
        W(5, 0xAA),
        CTL(0x88),
        R(1, 0x11),
        R(2, 0x33),
        R(3, 0x55),
        R(4, 0x77),
        R(5, 0x99),
        R(6),
        R(7, 0x50),
        R(1, 0x11),
        W(6, 0x0F),
        R(6, 0xAF),
        R(3, 0x66),
        CTL(0x08),
        W(6, 0x10),
        R(6, 0xB0),
        R(7, 0),
        R(1, 0),
        W(6, 0x00),
        R(6, 0xA0),
        R(1, 0x00),
    ]


def trim_entry(lba: int, count: int) -> bytes:
    return (lba | count << 48).to_bytes(8, "little")


@scenario("F1")
def s31_trim(n: int) -> list[Step]:
    """DATA SET MANAGEMENT TRIM over the bus master: QEMU's default drive (discard=ignore)
    completes it without touching the data; ranges past the end abort."""
    buf = DMA_BUF
    return [
        *bm_reset(),
        MEMW(buf, trim_entry(5, 2) + trim_entry(0, 0) + trim_entry(100, 1) + bytes(488)),
        MEMW(PRD_TABLE, prd_table([(buf, 512, True)])),
        BMW(4, PRD_TABLE, 4),
        *taskfile(0x06, count=1, lba=0x1234, feat=1),
        R(7, 0x58),
        BMW(0, 0x01),
        BMR(2, 1, 0x04),
        IRQ(True),
        R(7, 0x50),
        R(2),
        R(3),
        R(4),
        BMW(0, 0x00),
        # A range past the end: ABRT, INTERRUPT, ACTIVE clear.
        *bm_reset(),
        MEMW(buf, trim_entry(n - 1, 2) + bytes(504)),
        *taskfile(0x06, count=1, lba=7, feat=1, dev=0xA0),
        BMW(0, 0x01),
        BMR(2, 1, 0x04),
        IRQ(True),
        R(7, 0x41),
        R(1, 0x04),
        BMW(0, 0x00),
        # Count 0 completes at once; Features other than TRIM abort.
        *bm_reset(),
        *taskfile(0x06, count=0, lba=7, feat=1),
        BMW(0, 0x01),
        BMR(2),
        R(7, 0x50),
        BMW(0, 0x00),
        *taskfile(0x06, count=1, lba=7, feat=0),
        R(7, 0x41),
        R(1, 0x04),
        # The data is unchanged.
        *taskfile(0x20, count=1, lba=5),
        D16(256, words_of(pattern_sector(5))),
    ]
