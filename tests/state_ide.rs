//! IDE channel state: round trips mid-transfer, geometry rules, quiescence.

mod ide_common;

use std::sync::Arc;

use blockemu_core::block::{BlockNode, FaultRules};
use blockemu_core::geometry::{Translation, TranslationRequest};
use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::ide::{IdeChannel, IdeDisk, IdeDiskConfig};
use blockemu_core::state::{self, Device};
use blockemu_core::ErrorKind;
use ide_common::*;

/// A destination: same image, a channel that was never started (nothing read).
struct Dest {
    g: Guest,
}

fn dest_with(config: IdeDiskConfig, memory: bool) -> Dest {
    let node = pattern_node(F1_SECTORS, None);
    let reads = node.stats().reads;
    assert_eq!(reads, 0);
    let disk = Arc::new(IdeDisk::new(node.clone(), config).unwrap());
    let memory = memory.then(|| Arc::new(GuestMemory::new(1 << 20).unwrap()));
    let ch = IdeChannel::new(Some(disk), None, memory.clone()).unwrap();
    Dest {
        g: Guest { ch, node, memory },
    }
}

fn dest() -> Dest {
    dest_with(IdeDiskConfig::default(), false)
}

fn save(g: &Guest) -> Vec<u8> {
    g.ch.stop().unwrap();
    match &g.memory {
        Some(m) => state::save(&[("ide0", Device::Ide(&g.ch)), ("ram", Device::Memory(m))]),
        None => state::save(&[("ide0", Device::Ide(&g.ch))]),
    }
    .unwrap()
}

fn load(d: &Dest, data: &[u8]) -> blockemu_core::Result<()> {
    match &d.g.memory {
        Some(m) => state::load(
            &[("ide0", Device::Ide(&d.g.ch)), ("ram", Device::Memory(m))],
            data,
        ),
        None => state::load(&[("ide0", Device::Ide(&d.g.ch))], data),
    }
}

fn reads(node: &Arc<BlockNode>) -> u64 {
    node.stats().reads
}

#[test]
fn mid_pio_read_continues_on_the_destination_without_reading_the_mbr() {
    let src = Guest::f1();
    src.lba28(0x20, 100, 4);
    src.settle();
    assert_eq!(src.r(7) & 0x08, 0x08, "DRQ");
    let first = src.bytes(256);
    assert_eq!(first, pattern(100)[..256]);
    let data = save(&src);
    let d = dest();
    load(&d, &data).unwrap();
    assert_eq!(reads(&d.g.node), 0, "loading reads nothing");
    let g = d.g.ch.disk(0).unwrap().geometry().unwrap();
    assert_eq!(
        (g.cyls, g.heads, g.secs),
        (130, 16, 63),
        "geometry travelled"
    );
    assert_eq!(d.g.alt() & 0x88, 0x08, "DRQ, not BSY");
    assert_eq!(d.g.bytes(254), pattern(100)[256..510]);
    assert_eq!(
        reads(&d.g.node),
        0,
        "the rest of the block came with the state"
    );
    // The last word ends the block: the next one is fetched from the image.
    assert_eq!(d.g.bytes(2), pattern(100)[510..]);
    for k in 101..104 {
        d.g.settle();
        assert_eq!(d.g.bytes(512), pattern(k), "sector {k}");
    }
    d.g.settle();
    assert_eq!(d.g.r(7), 0x50);
    let before = reads(&d.g.node);
    d.g.ch.start();
    d.g.settle();
    assert_eq!(
        reads(&d.g.node),
        before,
        "start() after a load reads no MBR"
    );
}

#[test]
fn mid_pio_write_lands_on_the_destination_image() {
    let src = Guest::f1();
    src.lba28(0x30, 200, 2);
    src.settle();
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(src.ch.write_data(&payload[..300]), 300);
    let data = save(&src);
    let d = dest();
    load(&d, &data).unwrap();
    assert_eq!(d.g.ch.write_data(&payload[300..512]), 212);
    d.g.settle();
    assert_eq!(d.g.ch.write_data(&payload[512..]), 512);
    d.g.settle();
    assert_eq!(d.g.r(7), 0x50);
    let mut back = vec![0u8; 1024];
    d.g.node.read(200 * 512, &mut back).unwrap();
    assert_eq!(back, payload);
    let mut old = vec![0u8; 512];
    src.node.read(200 * 512, &mut old).unwrap();
    assert_eq!(old, pattern(200), "the source image was not written");
}

#[test]
fn mid_dma_setup_runs_when_the_destination_starts_the_bus_master() {
    let src = Guest::f1_with(None, true);
    prd(&src, &[(BUF as u32, EOT | 1024)]);
    src.lba28(0xC8, 10, 2);
    src.settle();
    let data = save(&src);
    let names = state::describe(&data).unwrap();
    assert_eq!(names.len(), 2);
    assert!(names[0].subsections.iter().any(|s| s.name == "bmdma"));
    let d = dest_with(IdeDiskConfig::default(), true);
    load(&d, &data).unwrap();
    assert_eq!(bm_status(&d.g) & 1, 0);
    d.g.ch.bmdma_write(0, 0x09, 1).unwrap();
    d.g.settle();
    let mut buf = vec![0u8; 1024];
    d.g.memory.as_ref().unwrap().read(BUF, &mut buf).unwrap();
    assert_eq!(&buf[..512], &pattern(10)[..]);
    assert_eq!(&buf[512..], &pattern(11)[..]);
    assert!(d.g.irq());
    assert_eq!(d.g.r(7), 0x50);
}

fn chs_config() -> IdeDiskConfig {
    IdeDiskConfig {
        cyls: 130,
        heads: 16,
        secs: 63,
        trans: TranslationRequest::Fixed(Translation::Lba),
        serial: Some("QM00001".into()),
        ..IdeDiskConfig::default()
    }
}

/// CHS READ SECTORS of one sector at (c, h, s).
fn chs_read(g: &Guest, c: u16, h: u8, s: u8) -> Vec<u8> {
    g.w(2, 1);
    g.w(3, s);
    g.w(4, c as u8);
    g.w(5, (c >> 8) as u8);
    g.w(6, 0xA0 | h);
    g.w(7, 0x20);
    g.settle();
    g.bytes(512)
}

#[test]
fn after_identify_with_chs_translation() {
    let src = Guest::with(pattern_node(F1_SECTORS, None), chs_config(), false);
    let words = src.identify();
    assert_eq!((words[1], words[3], words[6]), (130, 16, 63));
    let data = save(&src);
    let before = src.ch.state();

    // Same user geometry: accepted, and the IDENTIFY buffer travelled.
    let d = dest_with(chs_config(), false);
    load(&d, &data).unwrap();
    let after = d.g.ch.state();
    assert!(after.drives[0].identify_set);
    assert_eq!(after.drives[0].identify, before.drives[0].identify);
    assert_eq!(after.drives[0].tf, before.drives[0].tf);
    assert_eq!(chs_read(&d.g, 0, 1, 1), pattern(63));

    // No geometry configured: the state's is installed, sector 0 is never read.
    let d = dest();
    load(&d, &data).unwrap();
    let g = d.g.ch.disk(0).unwrap().geometry().unwrap();
    assert_eq!((g.cyls, g.heads, g.secs), (130, 16, 63));
    d.g.ch.start();
    d.g.settle();
    assert_eq!(reads(&d.g.node), 0, "start() after a load reads no MBR");
    assert_eq!(chs_read(&d.g, 1, 0, 2), pattern(16 * 63 + 1));
    assert_eq!(reads(&d.g.node), 1);
}

#[test]
fn geometry_mismatch_with_a_user_geometry_is_refused() {
    let src = Guest::with(pattern_node(F1_SECTORS, None), chs_config(), false);
    src.identify();
    let data = save(&src);
    let other = IdeDiskConfig {
        cyls: 260,
        heads: 8,
        secs: 63,
        ..chs_config()
    };
    let d = dest_with(other, false);
    let before = save(&d.g);
    let e = load(&d, &data).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(e.message().contains("geometry mismatch"), "{e}");
    assert_eq!(save(&d.g), before, "nothing changed");
    assert_eq!(reads(&d.g.node), 0);
}

#[test]
fn a_command_waiting_for_storage_refuses_the_save() {
    let rules = Arc::new(FaultRules::new());
    let src = Guest::f1_with(Some(rules.clone()), false);
    rules.stall();
    src.lba28(0x20, 5, 1);
    let e = state::save(&[("ide0", Device::Ide(&src.ch))]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(
        e.message().contains("device is running; stop it first"),
        "{e}"
    );
    rules.release();
    src.settle();
    assert_eq!(src.bytes(512), pattern(5));
    state::save(&[("ide0", Device::Ide(&src.ch))]).unwrap();
}

#[test]
fn pending_soft_reset_travels() {
    let src = Guest::f1();
    src.ctl(0x0C);
    // Not drained: the reset is still pending (stop() would complete it).
    let data = state::save(&[("ide0", Device::Ide(&src.ch))]).unwrap();
    let info = state::describe(&data).unwrap();
    assert!(info[0].subsections.iter().any(|s| s.name == "srst"));
    let d = dest();
    load(&d, &data).unwrap();
    assert_eq!(d.g.alt() & 0x80, 0x80, "BSY while the reset is pending");
    d.g.ctl(0x08);
    d.g.settle();
    assert_eq!(d.g.alt(), 0x50);
    assert_eq!((d.g.r(4), d.g.r(5)), (0, 0), "signature");
}

#[test]
fn wrong_presence_is_refused() {
    let src = Guest::f1();
    let data = save(&src);
    let node = pattern_node(F1_SECTORS, None);
    let disk = || {
        Some(Arc::new(
            IdeDisk::new(node.clone(), IdeDiskConfig::default()).unwrap(),
        ))
    };
    let ch = IdeChannel::new(disk(), disk(), None).unwrap();
    let e = state::load(&[("ide0", Device::Ide(&ch))], &data).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(
        e.message()
            .contains("drive 1 is absent in the state but present here"),
        "{e}"
    );
}
