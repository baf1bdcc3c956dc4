//! ide.md §11 acceptance scenarios on memory disks.

mod ide_common;

use ide_common::*;

#[test]
fn s01_power_on_registers() {
    let g = Guest::f1();
    assert_eq!(
        [g.r(7), g.r(2), g.r(3), g.r(4), g.r(5), g.r(6), g.r(1)],
        [0x50, 1, 1, 0, 0, 0xA0, 0]
    );
    assert!(!g.irq());
}

#[test]
fn s02_devchk_and_absent_slave() {
    let g = Guest::f1();
    for dev in [0xA0, 0xB0] {
        g.w(6, dev);
        for (a, b) in [(0x55, 0xAA), (0xAA, 0x55), (0x55, 0xAA)] {
            g.w(2, a);
            g.w(3, b);
        }
        assert_eq!((g.r(2), g.r(3)), (0x55, 0xAA));
    }
    assert_eq!((g.r(7), g.alt()), (0, 0));
}

#[test]
fn s03_srst_classify() {
    let g = Guest::f1();
    g.ctl(0x08);
    g.ctl(0x0C);
    g.ctl(0x08);
    assert_ne!(g.r(7) & 0x80, 0);
    g.settle();
    assert_eq!(
        [g.r(7), g.r(1), g.r(2), g.r(3), g.r(4), g.r(5)],
        [0x50, 1, 1, 1, 0, 0]
    );
    g.w(6, 0xB0);
    assert_eq!(
        [g.r(2), g.r(3), g.r(1), g.r(4), g.r(5), g.r(7)],
        [1, 1, 0, 0xFF, 0xFF, 0]
    );
    g.w(7, 0xEC);
    g.settle();
    assert_eq!(g.r(7), 0);
    assert!(!g.irq());
}

#[test]
fn s04_srst_irq_vs_nien() {
    let g = Guest::f1();
    g.ctl(0x0C);
    g.ctl(0x08);
    g.settle();
    assert!(g.irq());
    g.r(7);
    assert!(!g.irq());
    g.ctl(0x0E);
    g.ctl(0x0A);
    g.settle();
    assert!(!g.irq());
    g.ctl(0x08);
    assert!(!g.irq());
}

#[test]
fn s05_seabios_probe() {
    let g = Guest::f1();
    g.w(6, 0xA0);
    assert_eq!(g.r(6), 0xA0);
    g.ctl(0x0E);
    g.ctl(0x0A);
    g.settle();
    g.w(6, 0xA0);
    assert_eq!(g.r(7), 0x50);
    g.w(7, 0xA1);
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    g.w(7, 0xEC);
    assert_eq!(g.r(7), 0x58);
    let w = g.words(256);
    assert_eq!(w[93], 0x6001);
    g.w(6, 0xB0);
    g.w(7, 0xA1);
    assert_eq!(g.r(7), 0);
}

#[test]
fn s06_identify_contents() {
    let g = Guest::f1();
    g.w(6, 0xA0);
    g.w(7, 0xEC);
    assert!(g.irq());
    assert_eq!(g.r(7), 0x58);
    assert!(!g.irq());
    let mut w = vec![g.d16()];
    for _ in 1..256 {
        assert_eq!(g.alt(), 0x58);
        w.push(g.d16());
    }
    assert_eq!(g.r(7), 0x50);
    assert!(!g.irq());
    let expect: &[(usize, u16)] = &[
        (0, 0x0040),
        (1, 130),
        (3, 16),
        (4, 0x7E00),
        (5, 512),
        (6, 63),
        (10, 0x514D),
        (11, 0x3030),
        (12, 0x3030),
        (13, 0x3120),
        (14, 0x2020),
        (23, 0x322E),
        (24, 0x352B),
        (25, 0x2020),
        (27, 0x5145),
        (28, 0x4D55),
        (29, 0x2048),
        (30, 0x4152),
        (31, 0x4444),
        (32, 0x4953),
        (33, 0x4B20),
        (34, 0x2020),
        (47, 0x8010),
        (49, 0x0B00),
        (53, 7),
        (54, 130),
        (55, 16),
        (56, 63),
        (57, 0xFFE0),
        (58, 1),
        (59, 0x0110),
        (60, 0),
        (61, 2),
        (64, 3),
        (80, 0xF0),
        (82, 0x4021),
        (83, 0x7400),
        (85, 0x4021),
        (86, 0x3400),
        (88, 0x203F),
        (93, 0x6001),
        (100, 0),
        (101, 2),
        (102, 0),
        (103, 0),
        (255, 0),
    ];
    for &(i, v) in expect {
        assert_eq!(w[i], v, "word {i}");
    }
}

#[test]
fn s08_lba28_single_read() {
    let g = Guest::f1();
    g.lba28(0x20, 5, 1);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x58);
    assert_eq!(g.bytes(512), pattern(5));
    assert_eq!(g.r(7), 0x50);
    assert!(!g.irq());
    assert_eq!([g.r(2), g.r(3), g.r(4), g.r(5), g.r(6)], [0, 6, 0, 0, 0xE0]);
}

#[test]
fn s09_count_zero_is_256() {
    let g = Guest::f1();
    let before = g.ch.irq_raises();
    g.lba28(0x20, 0, 0);
    g.settle();
    assert_eq!(g.r(2), 0xFF);
    for k in 0..256u64 {
        g.settle();
        assert_eq!(g.r(7), 0x58, "block {k}");
        assert_eq!(g.bytes(512), pattern(k));
    }
    assert_eq!(g.ch.irq_raises() - before, 256);
    assert_eq!([g.r(2), g.r(3), g.r(4), g.r(7)], [0, 0, 1, 0x50]);
    // Read-ahead: far fewer backend reads than blocks.
    assert!(g.node.stats().reads < 10, "{:?}", g.node.stats());
}

#[test]
fn s11_pio_write_two_sectors() {
    let g = Guest::f1();
    g.lba28(0x30, 10, 2);
    assert_eq!(g.r(7), 0x58);
    assert!(!g.irq());
    let data: Vec<u8> = (0..1024).map(|i| (i * 7) as u8).collect();
    assert_eq!(g.ch.write_data(&data[..512]), 512);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x58);
    assert_eq!(g.ch.write_data(&data[512..]), 512);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x50);
    assert_eq!((g.r(3), g.r(2)), (12, 0));
    let mut back = vec![0; 1024];
    g.node.read(10 * 512, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn s12_chs_addressing() {
    let g = Guest::f1();
    g.w(6, 0xA2);
    g.w(5, 0);
    g.w(4, 1);
    g.w(3, 3);
    g.w(2, 1);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), pattern(1136));
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(6)], [4, 1, 0, 0xA2]);
    g.w(6, 0xA0);
    g.w(4, 0);
    g.w(3, 63);
    g.w(2, 2);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), pattern(62));
    g.settle();
    assert_eq!(g.bytes(512), pattern(63));
    assert_eq!([g.r(3), g.r(6), g.r(4)], [2, 0xA1, 0]);
}

#[test]
fn s13_chs_sector_zero() {
    let g = Guest::f1();
    g.w(6, 0xA0);
    g.w(5, 0);
    g.w(4, 0);
    g.w(3, 0);
    g.w(2, 1);
    g.w(7, 0x20);
    assert!(g.irq());
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
}

#[test]
fn s14_lba28_end_of_disk() {
    let g = Guest::f1();
    let n = F1_SECTORS as u32;
    g.lba28(0x20, n - 1, 1);
    g.settle();
    assert_eq!(g.bytes(512), pattern(u64::from(n - 1)));
    g.lba28(0x20, n - 1, 2);
    g.settle();
    assert_eq!(g.r(7), 0x58);
    g.bytes(512);
    g.settle();
    assert!(g.irq());
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(6), g.r(2)], [0, 0, 2, 0xE0, 1]);
    g.lba28(0x20, n, 1);
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    g.w(2, 1);
    g.w(6, 0xE1);
    g.w(7, 0x20);
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
}

#[test]
fn s17_multiple_mode() {
    let g = Guest::f1();
    g.w(2, 4);
    g.w(7, 0xC6);
    assert_eq!(g.r(7), 0x50);
    let before = g.ch.irq_raises();
    g.lba28(0xC4, 100, 10);
    let mut lba = 100;
    for blk in [4u64, 4, 2] {
        g.settle();
        assert_eq!(g.r(7), 0x58);
        let got = g.bytes((blk * 512) as usize);
        for i in 0..blk {
            assert_eq!(got[(i * 512) as usize..][..512], pattern(lba + i)[..]);
        }
        lba += blk;
    }
    assert_eq!(g.ch.irq_raises() - before, 3);
    assert_eq!((g.r(3), g.r(7)), (110, 0x50));
    // WRITE MULTIPLE 5: 4 then 1.
    g.lba28(0xC5, 200, 5);
    assert_eq!(g.r(7), 0x58);
    assert!(!g.irq());
    assert_eq!(g.ch.write_data(&[1; 4096]), 2048);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x58);
    assert_eq!(g.ch.write_data(&[1; 4096]), 512);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x50);
    for bad in [3, 32] {
        g.w(2, bad);
        g.w(7, 0xC6);
        assert_eq!(g.r(7), 0x41);
    }
    g.w(2, 0);
    g.w(7, 0xC6);
    assert_eq!(g.r(7), 0x50);
    g.lba28(0xC4, 0, 1);
    assert_eq!(g.r(7), 0x41);
    g.srst();
    g.lba28(0xC4, 0, 20);
    g.settle();
    assert_eq!(g.bytes(16 * 512).len(), 16 * 512);
    g.settle();
    assert_eq!(g.bytes(4 * 512).len(), 4 * 512);
    assert_eq!(g.r(7), 0x50);
    assert_eq!(g.identify()[59], 0x0110);
}

#[test]
fn s18_unsupported_opcodes() {
    let g = Guest::f1();
    for op in [0x00, 0x08, 0x11, 0x2F, 0xA0, 0xA1, 0xF9, 0xFF, 0x06] {
        g.w(7, op);
        assert!(g.irq());
        assert_eq!((g.r(7), g.r(1)), (0x41, 0x04), "opcode {op:#x}");
        g.w(7, 0xE5);
        assert_eq!((g.r(7), g.r(1)), (0x50, 0));
    }
}

#[test]
fn s19_busy_interlock() {
    let g = Guest::f1();
    g.w(2, 0x11);
    let id = g.identify();
    let _ = id;
    g.w(7, 0xEC);
    g.words(10);
    g.w(2, 0x33);
    g.w(6, 0xB0);
    g.w(7, 0x20);
    assert_eq!((g.r(2), g.r(7)), (0x11, 0x58));
    assert_eq!(g.d16(), 0x514D);
    g.words(245);
    g.w(2, 0x33);
    assert_eq!(g.r(2), 0x33);
}

#[test]
fn s20_data_port_without_drq() {
    let g = Guest::f1();
    assert_eq!(g.d16(), 0);
    assert_eq!(g.ch.ioport_read(0, 4).unwrap(), 0);
    g.d16w(0x1234);
    assert_eq!(g.r(7), 0x50);
    g.w(7, 0xEC);
    assert_eq!(g.ch.ioport_read(0, 1).unwrap(), 0x40);
    assert_eq!(g.d16(), 130);
}

#[test]
fn s21_alt_status_and_irq_cycle() {
    let g = Guest::f1();
    g.w(7, 0xEC);
    assert_eq!(g.alt(), 0x58);
    assert!(g.irq());
    g.r(7);
    assert!(!g.irq());
    g.words(256);
    g.w(2, 0);
    g.w(7, 0xE5);
    assert!(g.irq());
    assert_eq!((g.r(2), g.r(7)), (0xFF, 0x50));
}

#[test]
fn s22_23_nien_and_edd() {
    let g = Guest::f1();
    g.ctl(0x0A);
    g.w(7, 0x90);
    assert!(!g.irq());
    assert_eq!(
        [g.r(7), g.r(1), g.r(2), g.r(3), g.r(4), g.r(5), g.r(6)],
        [0x50, 1, 1, 1, 0, 0, 0xA0]
    );
    g.ctl(0x08);
    assert!(!g.irq());
    g.w(7, 0xE5);
    assert!(g.irq());
    g.ctl(0x0A);
    assert!(g.irq(), "nIEN does not lower a raised line (QEMU)");
    g.ctl(0x08);
    g.r(7);
    g.w(6, 0xB0);
    g.w(7, 0x90);
    assert_eq!(g.r(7), 0);
    assert!(!g.irq());
}

#[test]
fn s24_set_features() {
    // The flush of SET FEATURES 0x82 takes a while, so BSY is observable.
    let rules = std::sync::Arc::new(blockemu_core::block::FaultRules::new());
    rules.set_latency(
        Some(blockemu_core::block::OpKind::Flush),
        std::time::Duration::from_millis(50),
    );
    let g = Guest::f1_with(Some(rules), false);
    g.w(1, 0x82);
    g.w(7, 0xEF);
    assert_eq!(g.r(7), 0xC0);
    g.settle();
    assert!(g.irq());
    assert_eq!(g.r(7), 0x50);
    assert_eq!(g.identify()[85], 0x4001);
    let set = |f: u8, n: u8| {
        g.w(1, f);
        g.w(2, n);
        g.w(7, 0xEF);
        g.r(7)
    };
    assert_eq!(set(0x02, 0), 0x50);
    assert_eq!(g.identify()[85], 0x4021);
    assert_eq!(set(0x03, 0x45), 0x50);
    assert_eq!(g.identify()[88], 0x203F);
    set(0x03, 0x22);
    let w = g.identify();
    assert_eq!((w[63], w[88]), (0x0407, 0x003F));
    set(0x03, 0x0C);
    let w = g.identify();
    assert_eq!((w[62], w[63]), (7, 7));
    assert_eq!(set(0x03, 0x80), 0x41);
    assert_eq!(set(0x77, 0), 0x41);
    assert_eq!(set(0xAA, 0), 0x50);
}

#[test]
fn s25_flush() {
    let rules = std::sync::Arc::new(blockemu_core::block::FaultRules::new());
    rules.set_latency(
        Some(blockemu_core::block::OpKind::Flush),
        std::time::Duration::from_millis(50),
    );
    let g = Guest::f1_with(Some(rules), false);
    for op in [0xE7, 0xEA] {
        let flushes = g.node.stats().flushes;
        g.w(7, op);
        assert_eq!(g.alt() & 0xC9, 0xC0);
        g.settle();
        assert!(g.irq());
        assert_eq!(g.r(7), 0x50);
        assert_eq!(g.node.stats().flushes, flushes + 1);
    }
}

#[test]
fn s26_power_and_noops() {
    let g = Guest::f1();
    for op in [0xE0, 0xE1, 0xE2, 0xE3, 0xE6, 0x94, 0x95, 0x96, 0x97, 0x99] {
        g.w(7, op);
        assert!(g.irq());
        assert_eq!(g.r(7), 0x40, "{op:#x}");
    }
    for op in [0xE5, 0x98] {
        g.w(2, 0);
        g.w(7, op);
        assert_eq!((g.r(2), g.r(7)), (0xFF, 0x50));
    }
    for op in [0x10, 0x70] {
        g.lba28(op, 0x0FFF_FFFF, 1);
        assert_eq!(g.r(7), 0x50);
    }
    g.lba28(0x20, 7, 1);
    g.settle();
    assert_eq!(g.bytes(512), pattern(7));
}

#[test]
fn s27_read_native_max() {
    let g = Guest::f1();
    g.w(6, 0xE0);
    g.w(7, 0xF8);
    assert!(g.irq());
    assert_eq!(
        [g.r(7), g.r(3), g.r(4), g.r(5), g.r(6)],
        [0x50, 0xFF, 0xFF, 0x01, 0xE0]
    );
    g.w(6, 0xA0);
    g.w(7, 0xF8);
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(6)], [0x20, 0x82, 0x00, 0xA0]);
    g.w(6, 0x40);
    g.w(7, 0x27);
    assert_eq!([g.r(3), g.r(4), g.r(5)], [0xFF, 0xFF, 0x01]);
    g.ctl(0x88);
    assert_eq!([g.r(3), g.r(4), g.r(5)], [0, 0, 0]);
    g.ctl(0x08);
}

#[test]
fn s28_initialize_device_parameters() {
    let g = Guest::f1();
    let chs_read = |c: u16, h: u8, s: u8| {
        g.w(6, 0xA0 | h);
        g.w(5, (c >> 8) as u8);
        g.w(4, c as u8);
        g.w(3, s);
        g.w(2, 1);
        g.w(7, 0x20);
        g.settle();
        g.bytes(512)
    };
    g.w(6, 0xA7);
    g.w(2, 32);
    g.w(7, 0x91);
    assert_eq!(g.r(7), 0x50);
    assert_eq!(chs_read(0, 1, 1), pattern(32));
    g.srst();
    assert_eq!(chs_read(0, 1, 1), pattern(32));
    g.w(1, 0xCC);
    g.w(7, 0xEF);
    assert_eq!(g.r(7), 0x50);
    g.srst();
    assert_eq!(chs_read(0, 1, 1), pattern(63));
    let w = g.identify();
    assert_eq!((w[55], w[56]), (16, 63));
    g.w(2, 0);
    g.w(7, 0x91);
    assert_eq!(g.r(7), 0x41);
}

#[test]
fn s29_srst_aborts_pio_read() {
    let g = Guest::f1();
    g.lba28(0x20, 0, 4);
    g.settle();
    g.words(100);
    g.ctl(0x0C);
    assert_eq!(g.r(7), 0xD8);
    g.ctl(0x08);
    g.settle();
    assert_eq!([g.r(7), g.r(1), g.r(2), g.r(3)], [0x50, 1, 1, 1]);
    assert_eq!(g.d16(), 0);
}

#[test]
fn s10_s15_lba48_on_a_small_disk() {
    // LBA48 register mechanics (HOB copies, count expansion) on F1.
    let g = Guest::f1();
    g.lba48(0x24, 0, 0);
    g.settle();
    assert_eq!(g.r(2), 0xFF);
    g.bytes(512);
    g.settle();
    assert_eq!(g.r(2), 0xFE);
    g.ctl(0x88);
    assert_eq!(g.r(2), 0);
    g.ctl(0x08);
    g.srst();
    assert_eq!(g.r(7), 0x50);
    assert_eq!(g.d16(), 0);
    g.lba48(0x24, 0x1_0000, 2);
    g.settle();
    assert_eq!(g.bytes(512), pattern(0x1_0000));
    g.settle();
    assert_eq!(g.bytes(512), pattern(0x1_0001));
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(2)], [2, 0, 1, 0]);
    g.ctl(0x88);
    assert_eq!([g.r(3), g.r(4), g.r(5)], [0, 0, 0]);
    g.w(1, 0);
    assert_eq!(g.r(3), 2, "any register write clears HOB");
}

#[test]
fn srst_completes_by_itself_for_polling_and_waiting_guests() {
    let g = Guest::f1();
    // SeaBIOS style: nIEN set, poll until !BSY.
    g.ctl(0x0E);
    g.ctl(0x0A);
    let t = std::time::Instant::now();
    while g.alt() & 0x80 != 0 {
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
    assert_eq!(g.r(7), 0x50);
    assert!(!g.irq());
    // Interrupt-driven: the line rises when the reset completes.
    g.ctl(0x0C);
    g.ctl(0x08);
    assert!(g.ch.wait_irq(WAIT).unwrap());
    assert_eq!((g.r(7), g.r(1)), (0x50, 0x01));
}
