//! Asynchronous completion and lazy geometry: no channel call waits on storage.

mod ide_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockemu_core::block::{memory_node, FaultRules, OpKind};
use blockemu_core::ide::{IdeChannel, IdeDisk, IdeDiskConfig};
use ide_common::*;

fn slow_node(latency: Duration) -> (Arc<blockemu_core::block::BlockNode>, Arc<FaultRules>) {
    let rules = Arc::new(FaultRules::new());
    let node = pattern_node(F1_SECTORS, Some(rules.clone()));
    rules.set_latency(None, latency);
    (node, rules)
}

#[test]
fn creating_a_disk_reads_nothing_and_identify_before_start_waits_for_the_prefetch() {
    let (node, _rules) = slow_node(Duration::from_millis(300));
    let before = node.stats();
    let disk = Arc::new(IdeDisk::new(node.clone(), IdeDiskConfig::default()).unwrap());
    let ch = IdeChannel::new(Some(disk.clone()), None, None).unwrap();
    assert_eq!(node.stats(), before, "creation reads nothing");
    assert!(disk.geometry().is_none());
    let t = Instant::now();
    ch.ioport_write(6, 0xA0, 1).unwrap();
    ch.ioport_write(7, 0xEC, 1).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "the command write returns at once"
    );
    assert_eq!(ch.ctrl_read(), 0xC0, "BSY while the geometry is read");
    assert!(!ch.irq());
    assert!(ch.wait_irq(WAIT).unwrap());
    assert_eq!(ch.ioport_read(7, 1).unwrap(), 0x58);
    assert_eq!(ch.ioport_read(0, 2).unwrap(), 0x0040);
    assert_eq!(ch.ioport_read(0, 2).unwrap(), 130);
    assert_eq!(node.stats().reads - before.reads, 1, "sector 0 read once");
    // A reset never re-reads the geometry.
    ch.ctrl_write(0x0C);
    ch.ctrl_write(0x08);
    ch.drain(WAIT).unwrap();
    ch.start();
    ch.drain(WAIT).unwrap();
    assert_eq!(node.stats().reads - before.reads, 1);
}

#[test]
fn start_prefetches_only_unknown_geometry() {
    let node = pattern_node(2048, None);
    let user = IdeDiskConfig {
        cyls: 2,
        heads: 16,
        secs: 63,
        ..IdeDiskConfig::default()
    };
    let disk = Arc::new(IdeDisk::new(node.clone(), user).unwrap());
    assert!(disk.geometry().is_some());
    let ch = IdeChannel::new(Some(disk), None, None).unwrap();
    ch.start();
    ch.drain(WAIT).unwrap();
    assert_eq!(node.stats().reads, 0);
}

#[test]
fn inactive_node_identify_aborts_and_reads_nothing() {
    let node = pattern_node(2048, None);
    node.inactivate().unwrap();
    let before = node.stats();
    let disk = Arc::new(IdeDisk::new(node.clone(), IdeDiskConfig::default()).unwrap());
    let ch = IdeChannel::new(Some(disk), None, None).unwrap();
    ch.ioport_write(7, 0xEC, 1).unwrap();
    assert!(ch.wait_irq(WAIT).unwrap());
    assert_eq!(ch.ioport_read(7, 1).unwrap(), 0x41);
    assert_eq!(ch.ioport_read(1, 1).unwrap(), 0x04);
    // LBA reads abort too (the node refuses I/O).
    for (r, v) in [(2, 1), (3, 0), (4, 0), (5, 0), (6, 0xE0), (7, 0x20)] {
        ch.ioport_write(r, v, 1).unwrap();
    }
    ch.drain(WAIT).unwrap();
    assert_eq!(ch.ioport_read(7, 1).unwrap(), 0x41);
    assert_eq!(node.stats().reads, before.reads);
    assert_eq!(node.stats().bytes_read, before.bytes_read);
}

#[test]
fn reads_show_bsy_and_complete_from_a_worker() {
    let (node, rules) = slow_node(Duration::ZERO);
    let g = Guest::with(node, IdeDiskConfig::default(), false);
    rules.set_latency(Some(OpKind::Read), Duration::from_millis(100));
    let t = Instant::now();
    g.lba28(0x20, 3, 1);
    assert!(t.elapsed() < Duration::from_millis(80));
    assert_eq!(g.alt(), 0xD0);
    assert!(g.ch.wait_irq(WAIT).unwrap());
    assert_eq!(g.r(7), 0x58);
    assert_eq!(g.bytes(512), pattern(3));
}

#[test]
fn reset_while_a_read_is_in_flight_drops_its_completion() {
    let (node, rules) = slow_node(Duration::ZERO);
    let g = Guest::with(node, IdeDiskConfig::default(), false);
    rules.set_latency(Some(OpKind::Read), Duration::from_millis(200));
    g.lba28(0x20, 3, 4);
    assert_eq!(g.alt(), 0xD0);
    g.ctl(0x0C);
    g.ctl(0x08);
    g.settle();
    g.r(7);
    assert_eq!([g.r(7), g.r(1), g.r(2), g.r(3)], [0x50, 1, 1, 1]);
    assert!(!g.irq(), "the stale read completion raised nothing");
    assert_eq!(g.d16(), 0);
    // The device works afterwards.
    rules.set_latency(Some(OpKind::Read), Duration::ZERO);
    g.lba28(0x20, 9, 1);
    g.settle();
    assert_eq!(g.bytes(512), pattern(9));
}

#[test]
fn dropping_the_channel_with_io_in_flight_is_safe() {
    let (node, rules) = slow_node(Duration::ZERO);
    let g = Guest::with(node, IdeDiskConfig::default(), false);
    rules.set_latency(Some(OpKind::Read), Duration::from_millis(100));
    g.lba28(0x20, 3, 200);
    drop(g);
    std::thread::sleep(Duration::from_millis(250));
}

#[test]
fn write_completes_per_block_with_bsy_then_irq() {
    let (node, rules) = slow_node(Duration::ZERO);
    let g = Guest::with(node.clone(), IdeDiskConfig::default(), false);
    rules.set_latency(Some(OpKind::Write), Duration::from_millis(100));
    g.lba28(0x30, 20, 1);
    assert_eq!(g.ch.write_data(&[0xAB; 512]), 512);
    assert_eq!(g.alt(), 0xD0);
    assert!(!g.irq());
    assert!(g.ch.wait_irq(WAIT).unwrap());
    assert_eq!(g.r(7), 0x50);
    let mut back = [0u8; 512];
    node.read(20 * 512, &mut back).unwrap();
    assert_eq!(back, [0xAB; 512]);
}

#[test]
fn read_error_mid_chunk_is_reported_at_its_block() {
    let rules = Arc::new(FaultRules::new());
    let node = pattern_node(F1_SECTORS, Some(rules.clone()));
    let g = Guest::with(node, IdeDiskConfig::default(), false);
    // Sector 105 fails: blocks 100..=104 arrive, the block of 105 aborts.
    rules
        .fail_range(105 * 512, 512, Some(OpKind::Read), libc_eio())
        .unwrap();
    g.lba28(0x20, 100, 10);
    for k in 100..105 {
        g.settle();
        assert_eq!(g.r(7), 0x58, "block {k}");
        assert_eq!(g.bytes(512), pattern(k));
    }
    g.settle();
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
    assert_eq!((g.r(3), g.r(2)), (105, 5));
    // Multiple mode: the error lands on the 4-sector block holding 105.
    g.w(2, 4);
    g.w(7, 0xC6);
    g.lba28(0xC4, 100, 10);
    g.settle();
    assert_eq!(g.bytes(2048).len(), 2048);
    g.settle();
    assert_eq!((g.r(7), g.r(3)), (0x41, 104));
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn read_only_node_write_aborts_after_the_data_phase() {
    let node = Arc::new(memory_node(2048 * 512, true, |b| b).unwrap());
    let g = Guest::with(node.clone(), IdeDiskConfig::default(), false);
    g.lba28(0x30, 1, 1);
    assert_eq!(g.ch.write_data(&[1; 512]), 512);
    g.settle();
    assert!(g.irq());
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
}

/// Resource bound: a soft reset waits for the channel's backend operations, as QEMU's reset
/// drains them. Before, SRST completed after its 10 ms whatever was in flight, so a guest
/// repeating "WRITE SECTORS, SRST" against stalled storage queued one write per cycle
/// without bound, and a stale write could land after a newer one to the same sector.
#[test]
fn soft_reset_waits_for_io_in_flight_so_a_guest_cannot_pile_it_up() {
    let (node, rules) = slow_node(Duration::ZERO);
    let g = Guest::with(node.clone(), IdeDiskConfig::default(), false);
    let writes_before = node.stats().writes;
    rules.stall();
    // A write is in flight (stalled), then SRST.
    g.lba28(0x30, 40, 1);
    assert_eq!(g.ch.write_data(&[0x11; 512]), 512);
    g.ctl(0x0C);
    g.ctl(0x08);
    // Long after the reset delay, BSY stays: no new command can be issued.
    let until = Instant::now() + Duration::from_millis(100);
    while Instant::now() < until {
        assert_eq!(
            g.alt() & 0x80,
            0x80,
            "the reset completed with a write in flight"
        );
        assert_eq!(g.r(7) & 0x80, 0x80);
        std::thread::sleep(Duration::from_millis(5));
    }
    // A command written now is ignored (BSY): the guest cannot queue a second write.
    g.lba28(0x30, 40, 1);
    assert_eq!(g.ch.write_data(&[0x22; 512]), 0);
    assert!(!g.ch.wait_irq(Some(Duration::from_millis(20))).unwrap());
    // The storage answers: the stale write lands, then the reset completes (with its IRQ).
    rules.release();
    assert!(
        g.ch.wait_irq(WAIT).unwrap(),
        "the reset completes once the write is done"
    );
    assert_eq!(g.alt() & 0x80, 0);
    g.settle();
    assert_eq!(node.stats().writes - writes_before, 1);
    // Now the device works, and the newer write is the one that stays.
    g.lba28(0x30, 40, 1);
    assert_eq!(g.ch.write_data(&[0x33; 512]), 512);
    assert!(g.ch.wait_irq(WAIT).unwrap());
    g.settle();
    let mut back = [0u8; 512];
    node.read(40 * 512, &mut back).unwrap();
    assert_eq!(back, [0x33; 512]);
}
