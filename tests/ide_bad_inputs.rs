//! ide.md §9: guest-controlled inputs the device must survive, each with its outcome.

mod ide_common;

use std::sync::Arc;

use blockemu_core::block::memory_node;
use blockemu_core::ide::IdeDiskConfig;
use ide_common::*;

#[test]
fn b01_data_port_past_the_block_end() {
    let g = Guest::f1();
    g.w(7, 0xEC);
    g.words(255);
    // 32-bit access with 2 bytes left: refused, nothing moves.
    assert_eq!(g.ch.ioport_read(0, 4).unwrap(), 0);
    assert_eq!(g.r(7), 0x58);
    g.d16();
    assert_eq!(g.r(7), 0x50);
    for _ in 0..1000 {
        assert_eq!(g.d16(), 0);
        g.d16w(0xFFFF);
        assert!(g.ch.read_data(4096).is_empty());
        assert_eq!(g.ch.write_data(&[0; 4096]), 0);
    }
    assert_eq!(g.r(7), 0x50);
    // Writes during a data-in phase and reads during data-out are ignored.
    g.w(7, 0xEC);
    g.d16w(0x1234);
    assert_eq!(g.d16(), 0x0040);
    g.words(255);
    g.lba28(0x30, 1, 1);
    assert_eq!(g.d16(), 0);
    g.ch.ioport_write(0, 0xAB, 1).unwrap(); // 8-bit writes are ignored
    for _ in 0..128 {
        g.ch.ioport_write(0, 0x0101_0101, 4).unwrap();
    }
    g.settle();
    assert_eq!(g.r(7), 0x50);
}

#[test]
fn b02_smart_offline_many_times() {
    let g = Guest::f1();
    let smart = |feature: u8, sector: u8, count: u8| {
        g.w(1, feature);
        g.w(2, count);
        g.w(3, sector);
        g.w(4, 0x4F);
        g.w(5, 0xC2);
        g.w(7, 0xB0);
        g.r(7)
    };
    for _ in 0..100 {
        assert_eq!(smart(0xD4, 1, 0), 0x50);
    }
    // READ LOG takes the log address from LBA low (QEMU); count 6 there is not a log.
    assert_eq!(smart(0xD5, 0, 0x06), 0x41);
    assert_eq!(smart(0xD5, 0x06, 1), 0x58);
    let page = g.bytes(512);
    assert_eq!(page.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
    assert_eq!(smart(0xDA, 0, 0), 0x50);
    assert_eq!((g.r(4), g.r(5)), (0x4F, 0xC2));
    assert_eq!(smart(0xD4, 0x40, 0), 0x41);
    assert_eq!(smart(0xD2, 0, 0x33), 0x41);
    assert_eq!(smart(0x00, 0, 0), 0x41);
    assert_eq!(smart(0xD9, 0, 0), 0x50);
    assert_eq!(smart(0xD0, 0, 0), 0x41, "disabled");
    assert_eq!(smart(0xD8, 0, 0), 0x50);
    // Wrong signature.
    g.w(4, 0);
    g.w(1, 0xDA);
    g.w(7, 0xB0);
    assert_eq!(g.r(7), 0x41);
}

#[test]
fn b03_zero_capacity_disk() {
    let node = Arc::new(memory_node(0, false, |b| b).unwrap());
    let g = Guest::with(node, IdeDiskConfig::default(), false);
    for cmd in [0xF8u8, 0x27] {
        g.w(6, 0x40);
        g.w(7, cmd);
        assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    }
    let w = g.identify();
    assert_eq!((w[60], w[61], w[100]), (0, 0, 0));
    g.lba28(0x20, 0, 1);
    assert_eq!(g.r(7), 0x41);
    g.w(6, 0xA0);
    g.w(7, 0x20);
    assert_eq!(g.r(7), 0x41);
}

#[test]
fn b08_b09_b16_counts_and_chs_aliasing() {
    let g = Guest::f1();
    // LBA28 count 0 at the last 255 sectors: out of range at the first block past the end.
    g.lba28(0x20, F1_SECTORS as u32 - 1, 0);
    g.settle();
    g.bytes(512);
    g.settle();
    assert_eq!(g.r(7), 0x41);
    // CHS head >= heads and sector > sectors alias into later LBAs.
    g.w(6, 0xAF);
    g.w(5, 0);
    g.w(4, 0);
    g.w(3, 200);
    g.w(2, 1);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), pattern(15 * 63 + 199));
    // Cylinder 65535: far beyond the disk.
    g.w(6, 0xA0);
    g.w(5, 0xFF);
    g.w(4, 0xFF);
    g.w(3, 1);
    g.w(2, 1);
    g.w(7, 0x20);
    assert_eq!(g.r(7), 0x41);
    // EXT command without the LBA bit decodes CHS (C0/H0/S5 = LBA 4) and is range checked.
    g.w(2, 0);
    g.w(2, 1);
    g.w(3, 5);
    g.w(4, 0);
    g.w(5, 0);
    g.w(6, 0x00);
    g.w(7, 0x24);
    g.settle();
    assert_eq!(g.bytes(512), pattern(4));
    g.w(5, 0xFF);
    g.w(6, 0x00);
    g.w(7, 0x24);
    assert_eq!(g.r(7), 0x41);
}

#[test]
fn b10_specify_then_chs() {
    let g = Guest::f1();
    // 1 head, 1 sector per track: CHS maps cylinder to LBA.
    g.w(6, 0xA0);
    g.w(2, 1);
    g.w(7, 0x91);
    assert_eq!(g.r(7), 0x50);
    g.w(6, 0xA0);
    g.w(5, 0);
    g.w(4, 9);
    g.w(3, 1);
    g.w(2, 2);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), pattern(9));
    g.settle();
    assert_eq!(g.bytes(512), pattern(10));
    assert_eq!((g.r(4), g.r(3)), (11, 1));
    // Sector count 0 is refused.
    g.w(2, 0);
    g.w(7, 0x91);
    assert_eq!(g.r(7), 0x41);
}

#[test]
fn b14_srst_during_dma_and_writes() {
    let g = Guest::f1_with(None, true);
    let mem = g.memory.as_ref().unwrap();
    mem.write_u32(0x1000, 0x8000).unwrap();
    mem.write_u32(0x1004, 0x8000_0000).unwrap(); // 64 KiB, EOT
    g.ch.bmdma_write(4, 0x1000, 4).unwrap();
    g.lba28(0xC8, 0, 128);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.ctl(0x0C);
    g.ctl(0x08);
    g.settle();
    assert_eq!(g.r(7), 0x50);
    g.lba28(0x30, 0, 4);
    g.ch.write_data(&[1; 512]);
    g.ctl(0x0C);
    g.ctl(0x08);
    g.settle();
    assert_eq!([g.r(7), g.r(1)], [0x50, 1]);
    assert_eq!(g.ch.write_data(&[1; 512]), 0);
}

#[test]
fn b_random_register_storm_never_panics() {
    // A deterministic pseudo-random storm over every entry point.
    let g = Guest::f1_with(None, true);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = (x >> 8) as u32;
        match x % 9 {
            0 => {
                let _ = g.ch.ioport_read((v % 8) as u8, [1, 2, 4][(v % 3) as usize]);
            }
            1 | 2 => {
                let reg = (v % 8) as u8;
                // Mostly harmless opcodes so the storm gets past BSY phases.
                let _ = g.ch.ioport_write(reg, v >> 8, if reg == 0 { 2 } else { 1 });
            }
            3 => {
                g.ch.ctrl_write((v & 0x8A) as u8 | if v % 50 == 0 { 4 } else { 0 })
            }
            4 => {
                let _ = g.ch.read_data((v % 2048) as usize);
            }
            5 => {
                let _ = g.ch.write_data(&vec![v as u8; (v % 2048) as usize]);
            }
            6 => {
                let _ = g.ch.bmdma_write((v % 8) as u8, v >> 4, 1);
            }
            7 => {
                let _ = g.ch.bmdma_read((v % 8) as u8, 1);
            }
            _ => g.ch.drain(WAIT).unwrap(),
        }
    }
    g.ch.drain(WAIT).unwrap();
}

#[test]
fn srst_always_returns_0x50_for_a_present_disk() {
    // SRST from every kind of state: idle, data-in, data-out, BSY read, pending DMA, error,
    // nIEN set, slave selected, SRST held high.
    let g = Guest::f1_with(None, true);
    let states: [fn(&Guest); 9] = [
        |_| {},
        |g| g.w(7, 0xEC),
        |g| g.lba28(0x30, 0, 8),
        |g| g.lba28(0x20, 0, 0),
        |g| g.lba28(0xC8, 0, 1),
        |g| g.w(7, 0xFF),
        |g| g.ctl(0x0A),
        |g| g.w(6, 0xB0),
        |g| {
            g.ctl(0x0C);
            g.settle();
        },
    ];
    for (i, enter) in states.iter().enumerate() {
        enter(&g);
        g.ctl(0x08);
        g.ctl(0x0C);
        g.ctl(0x08);
        g.settle();
        g.w(6, 0xA0);
        assert_eq!(g.r(7), 0x50, "state {i}");
        assert_eq!(g.r(1), 0x01, "state {i}");
        assert_eq!(g.d16(), 0);
    }
}
