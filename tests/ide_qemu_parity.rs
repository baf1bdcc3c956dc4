//! Regression tests for behaviour settled against QEMU 7.2 through the differential harness
//! (black-box qtest observations).

mod ide_common;

use std::sync::Arc;

use blockemu_core::ide::{DiscardMode, IdeDiskConfig};
use ide_common::*;

fn trim_entry(lba: u64, count: u64) -> [u8; 8] {
    (lba | count << 48).to_le_bytes()
}

fn trim_list(g: &Guest, ranges: &[(u64, u64)]) {
    let mut page = vec![0u8; 512];
    for (i, &(lba, count)) in ranges.iter().enumerate() {
        page[8 * i..8 * i + 8].copy_from_slice(&trim_entry(lba, count));
    }
    g.memory.as_ref().unwrap().write(BUF, &page).unwrap();
}

fn trim(g: &Guest, count: u8) {
    g.w(1, 0x01);
    g.lba28(0x06, 0x1234, count);
}

#[test]
fn identify_advertises_trim_and_physical_block_size() {
    let w = Guest::f1().identify();
    assert_eq!((w[69], w[106], w[169]), (0x4000, 0x6000, 1));
}

#[test]
fn trim_with_discard_ignore_keeps_the_data() {
    let g = Guest::f1_with(None, true);
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    trim_list(&g, &[(5, 2), (0, 0), (100, 1)]);
    trim(&g, 1);
    assert_eq!(g.r(7), 0x58);
    g.ch.bmdma_write(0, 0x01, 1).unwrap();
    g.settle();
    assert!(g.irq());
    assert_eq!(bm_status(&g), 0x04);
    assert_eq!(g.r(7), 0x50);
    // The registers advance by the list's sectors like any DMA command.
    assert_eq!((g.r(2), g.r(3), g.r(4)), (0, 0x35, 0x12));
    let mut s5 = vec![0; 512];
    g.node.read(5 * 512, &mut s5).unwrap();
    assert_eq!(s5, pattern(5));
}

#[test]
fn trim_with_discard_unmap_zeroes_and_checks_ranges() {
    let config = IdeDiskConfig {
        discard: DiscardMode::Unmap,
        ..IdeDiskConfig::default()
    };
    let g = Guest::with(pattern_node(F1_SECTORS, None), config, true);
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    trim_list(&g, &[(5, 2)]);
    trim(&g, 1);
    g.ch.bmdma_write(0, 0x01, 1).unwrap();
    g.settle();
    assert_eq!(g.r(7), 0x50);
    let mut s = vec![0xAA; 1024];
    g.node.read(5 * 512, &mut s).unwrap();
    assert!(s.iter().all(|&b| b == 0));
    // A range past the end aborts: ABRT, IRQ, INTERRUPT set, ACTIVE clear.
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    trim_list(&g, &[(F1_SECTORS - 1, 2)]);
    trim(&g, 1);
    g.ch.bmdma_write(0, 0x01, 1).unwrap();
    g.settle();
    assert!(g.irq());
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    assert_eq!(bm_status(&g), 0x04);
    // Count 0: done at once; Features other than 1: ABRT.
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    trim(&g, 0);
    g.ch.bmdma_write(0, 0x01, 1).unwrap();
    g.settle();
    assert_eq!((g.r(7), bm_status(&g)), (0x50, 0x04));
    g.w(1, 0);
    g.lba28(0x06, 0, 1);
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    assert!(Arc::strong_count(&g.node) >= 1);
}

#[test]
fn smart_pages_match_qemu() {
    let g = Guest::f1();
    let smart = |feature: u8, sector: u8| {
        g.w(1, feature);
        g.w(2, 1);
        g.w(3, sector);
        g.w(4, 0x4F);
        g.w(5, 0xC2);
        g.w(6, 0xA0);
        g.w(7, 0xB0);
        g.settle();
    };
    smart(0xD0, 0);
    let page = g.bytes(512);
    assert_eq!(&page[..7], &[1, 0, 1, 3, 0, 100, 100]);
    assert_eq!(
        &page[74..83],
        &[0xBE, 3, 0, 0x45, 0x45, 0x1F, 0, 0x1F, 0x1F]
    );
    assert_eq!(
        &page[362..375],
        &[0x82, 0, 0x20, 1, 0, 25, 3, 0, 1, 0, 2, 0x36, 1]
    );
    assert_eq!(page[511], 6);
    smart(0xD1, 0);
    let page = g.bytes(512);
    assert_eq!(
        (page[3], page[27], page[39], page[75], page[511]),
        (6, 20, 36, 50, 175)
    );
    // READ LOG takes the log address from LBA low: 0 aborts.
    smart(0xD5, 0);
    assert_eq!(g.r(7), 0x41);
    smart(0xD4, 1);
    smart(0xD4, 2);
    smart(0xD5, 6);
    let page = g.bytes(512);
    assert_eq!(&page[..6], &[1, 0, 1, 0, 0x34, 0x12]);
    assert_eq!(&page[26..30], &[2, 0, 0x34, 0x12]);
    assert_eq!((page[508], page[511]), (2, 110));
}

#[test]
fn first_identify_after_initialize_device_parameters_shows_the_new_geometry() {
    let g = Guest::f1();
    g.w(2, 32);
    g.w(6, 0xA7);
    g.w(7, 0x91);
    assert_eq!(g.r(7), 0x50);
    let w = g.identify();
    assert_eq!((w[1], w[3], w[4], w[6]), (130, 8, 16384, 32));
    assert_eq!((w[54], w[55], w[56], w[57]), (130, 8, 32, 33280));
    // Cached from now on.
    g.w(2, 17);
    g.w(6, 0xA3);
    g.w(7, 0x91);
    assert_eq!(g.identify()[3], 8);
}

#[test]
fn revert_on_reset_applies_once_and_edd_clears_device() {
    let g = Guest::f1();
    let chs_read_c1 = || {
        g.w(2, 1);
        g.w(3, 1);
        g.w(4, 1);
        g.w(5, 0);
        g.w(6, 0xA0);
        g.w(7, 0x20);
        g.settle();
        let d = g.bytes(512);
        u32::from_le_bytes(d[..4].try_into().unwrap())
    };
    g.w(2, 32);
    g.w(6, 0xA7);
    g.w(7, 0x91);
    assert_eq!(chs_read_c1(), 256);
    g.w(1, 0xCC);
    g.w(6, 0xE0);
    g.w(7, 0xEF);
    g.srst();
    assert_eq!(chs_read_c1(), 1008);
    g.w(2, 17);
    g.w(6, 0xA3);
    g.w(7, 0x91);
    assert_eq!(chs_read_c1(), 68);
    g.srst();
    assert_eq!(
        chs_read_c1(),
        68,
        "the revert was used up by the first reset"
    );
    g.w(6, 0xE0);
    g.w(7, 0x90);
    assert_eq!(g.r(6), 0xA0);
}

#[test]
fn bus_master_wide_accesses_like_piix() {
    let g = Guest::f1_with(None, true);
    g.ch.bmdma_write(4, 0x0010_0000, 4).unwrap();
    g.ch.bmdma_write(2, 0x60, 1).unwrap();
    assert_eq!(g.ch.bmdma_read(0, 4).unwrap(), 0xFFFF_FFFF);
    assert_eq!(g.ch.bmdma_read(2, 4).unwrap(), 0x0000_FFFF);
    assert_eq!(g.ch.bmdma_read(2, 1).unwrap(), 0x60);
    assert_eq!(g.ch.bmdma_read(3, 2).unwrap(), 0x00FF);
    assert_eq!(g.ch.bmdma_read(4, 2).unwrap(), 0);
    assert_eq!(g.ch.bmdma_read(6, 2).unwrap(), 0x10);
    // Wide writes to command/status are dropped.
    g.ch.bmdma_write(0, 0x0101, 2).unwrap();
    assert_eq!(g.ch.bmdma_read(0, 1).unwrap(), 0);
    g.ch.bmdma_write(4, 0xABCD, 2).unwrap();
    assert_eq!(g.ch.bmdma_read(4, 4).unwrap(), 0x0010_ABCC);
}

#[test]
fn dma_command_cut_by_srst_runs_at_the_next_start() {
    let g = Guest::f1_with(None, true);
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    g.lba28(0xC8, 9, 1);
    assert_eq!(g.r(7), 0x58);
    g.srst();
    assert_eq!(g.r(7), 0x50);
    assert!(!g.irq());
    // QEMU keeps the DMA callback: START runs it on the reset registers (CHS C0/H0/S1).
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert!(g.irq());
    assert_eq!(bm_status(&g), 0x04);
    assert_eq!((g.r(7), g.r(2), g.r(3)), (0x50, 0, 2));
    let mut got = vec![0xAA; 512];
    g.memory.as_ref().unwrap().read(BUF, &mut got).unwrap();
    assert_eq!(got, vec![0; 512], "sector 0");
    // Once it ran, START does nothing.
    g.ch.bmdma_write(0, 0, 1).unwrap();
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert!(!g.irq());
    assert_eq!(bm_status(&g), 0x05);
}

#[test]
fn prd_cursor_continues_while_active_and_short_tables_move_nothing() {
    let g = Guest::f1_with(None, true);
    // Entry 0 longer than the first request (ACTIVE stays), entry 1 serves the second.
    prd(
        &g,
        &[(BUF as u32, 1024 | EOT), (BUF as u32 + 0x1000, 512 | EOT)],
    );
    g.lba28(0xC8, 3, 1);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(bm_status(&g), 0x05);
    g.r(7);
    g.lba28(0xC8, 7, 1);
    g.settle();
    assert_eq!(g.r(7), 0x50);
    let mut got = vec![0; 512];
    g.memory
        .as_ref()
        .unwrap()
        .read(BUF + 0x1000, &mut got)
        .unwrap();
    assert_eq!(got, pattern(7));
    // A table shorter than the request moves nothing (no partial transfer), no IRQ.
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    g.memory.as_ref().unwrap().write(BUF, &[0xEE; 512]).unwrap();
    g.lba28(0xC8, 11, 2);
    g.r(7);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!((bm_status(&g), g.irq(), g.r(7)), (0x00, false, 0x50));
    g.memory.as_ref().unwrap().read(BUF, &mut got).unwrap();
    assert_eq!(got, vec![0xEE; 512]);
}

#[test]
fn srst_with_the_absent_slave_selected_completes_when_its_status_reads_zero() {
    let g = Guest::f1();
    g.w(6, 0xB0);
    g.ctl(0x0C);
    g.ctl(0x08);
    assert_eq!(g.alt(), 0x00);
    assert!(g.irq(), "the reset is over: its interrupt is up");
    g.w(6, 0xA0);
    assert_eq!(
        g.r(7),
        0x50,
        "the Device write was not blocked by a stale BSY"
    );
}
