//! Bus-master DMA (ide.md §3.3, scenario 30).

mod ide_common;

use ide_common::*;

#[test]
fn read_dma_one_sector() {
    let g = Guest::f1_with(None, true);
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    g.lba28(0xC8, 0x20, 1);
    assert_eq!(g.r(7), 0x58);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(bm_status(&g), 0x04);
    assert!(g.irq());
    assert_eq!(g.r(7), 0x50);
    assert!(!g.irq());
    let mut got = vec![0; 512];
    g.memory.as_ref().unwrap().read(BUF, &mut got).unwrap();
    assert_eq!(got, pattern(0x20));
    assert_eq!(g.r(3), 0x21);
}

#[test]
fn prd_shorter_equal_longer() {
    let g = Guest::f1_with(None, true);
    // Shorter: no IRQ, neither INTERRUPT nor ACTIVE, no ERR.
    prd(&g, &[(BUF as u32, 256 | EOT)]);
    g.lba28(0xC8, 0, 1);
    g.r(7);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(bm_status(&g), 0x00);
    assert!(!g.irq());
    assert_eq!(g.r(7), 0x50);
    // Longer: INTERRUPT and ACTIVE.
    prd(&g, &[(BUF as u32, 1024 | EOT)]);
    g.lba28(0xC8, 0, 1);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(bm_status(&g), 0x05);
    assert_eq!(g.r(7), 0x50);
}

#[test]
fn write_dma_round_trip_and_out_of_range() {
    let g = Guest::f1_with(None, true);
    let mem = g.memory.as_ref().unwrap();
    mem.write(BUF, &[0x5A; 1024]).unwrap();
    // Two PRDs of 512 bytes each.
    prd(&g, &[(BUF as u32, 512), (BUF as u32 + 512, 512 | EOT)]);
    g.lba28(0xCA, 40, 2);
    g.ch.bmdma_write(0, 0x01, 1).unwrap();
    g.settle();
    assert_eq!((bm_status(&g), g.r(7)), (0x04, 0x50));
    let mut back = vec![0; 1024];
    g.node.read(40 * 512, &mut back).unwrap();
    assert_eq!(back, vec![0x5A; 1024]);
    // Out of range: ABRT, IRQ, INTERRUPT set, ACTIVE clear.
    prd(&g, &[(BUF as u32, 512 | EOT)]);
    g.lba28(0xC8, F1_SECTORS as u32, 1);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert!(g.irq());
    assert_eq!((g.r(7), g.r(1), bm_status(&g)), (0x41, 0x04, 0x04));
}

#[test]
fn start_before_command_and_lba48_dma() {
    let g = Guest::f1_with(None, true);
    prd(&g, &[(BUF as u32, 1024 | EOT)]);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    assert_eq!(bm_status(&g) & 1, 1, "ACTIVE once started");
    g.lba48(0x25, 0x1_0000, 2);
    g.settle();
    assert_eq!(g.r(7), 0x50);
    let mut got = vec![0; 1024];
    g.memory.as_ref().unwrap().read(BUF, &mut got).unwrap();
    assert_eq!(got[..512], pattern(0x1_0000)[..]);
    assert_eq!(got[512..], pattern(0x1_0001)[..]);
}

#[test]
fn bad_prd_tables_and_stop_without_drive() {
    let g = Guest::f1_with(None, true);
    // No EOT anywhere: the walk stops after 4 KiB of table.
    let mem = g.memory.as_ref().unwrap();
    for i in 0..1024u64 {
        mem.write_u32(PRD + 8 * i, BUF as u32).unwrap();
        mem.write_u32(PRD + 8 * i + 4, 2).unwrap();
    }
    g.ch.bmdma_write(4, PRD as u32, 4).unwrap();
    g.lba28(0xC8, 0, 0);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(g.r(7) & 0x89, 0, "no hang, no error");
    // PRD table outside guest memory.
    g.ch.bmdma_write(0, 0, 1).unwrap();
    g.ch.bmdma_write(4, 0xFFFF_FFF0, 4).unwrap();
    g.lba28(0xC8, 0, 1);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.settle();
    assert_eq!(g.r(7), 0x50);
    // Clearing START with the (absent) slave selected.
    g.w(6, 0xB0);
    g.ch.bmdma_write(0, 0x09, 1).unwrap();
    g.ch.bmdma_write(0, 0x00, 1).unwrap();
    // Bad offsets are calling-convention errors.
    assert!(g.ch.bmdma_read(8, 1).is_err());
    assert!(g.ch.bmdma_read(1, 3).is_err());
    // An access running past offset 7 reaches the next channel's block: all ones, ignored.
    g.ch.bmdma_write(4, 0x1234_5678, 4).unwrap();
    g.ch.bmdma_write(6, 0xAAAA_0000, 4).unwrap();
    assert_eq!(g.ch.bmdma_read(4, 4).unwrap(), 0x0000_5678);
    assert_eq!(g.ch.bmdma_read(6, 4).unwrap(), 0xFFFF_0000);
    // Without guest memory there is no bus master.
    let plain = Guest::f1();
    assert!(plain.ch.bmdma_read(0, 1).is_err());
    plain.lba28(0xC8, 0, 1);
    assert_eq!(
        plain.r(7),
        0x58,
        "waits for a bus master that never comes (QEMU ISA)"
    );
    plain.srst();
    assert_eq!(plain.r(7), 0x50);
}
