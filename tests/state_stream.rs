//! The state stream as a whole: every truncation, every byte flip, versions, subsections,
//! foreign sections, guest RAM — and a failed load changes nothing.

mod ide_common;
mod virtio_common;

use std::sync::Arc;

use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::ide::{IdeChannel, IdeDisk, IdeDiskConfig};
use blockemu_core::state::stream::{self, SectionOut, SubsectionOut};
use blockemu_core::state::{self, Device};
use blockemu_core::ErrorKind;

const RAM: usize = 2 << 20;

struct Set {
    ide: ide_common::Guest,
    vio: virtio_common::Driver,
}

impl Set {
    fn devices(&self) -> Vec<(&'static str, Device<'_>)> {
        vec![
            ("ide0", Device::Ide(&self.ide.ch)),
            ("ram", Device::Memory(&self.vio.mem)),
            ("vblk", Device::Virtio(&self.vio.dev)),
        ]
    }
}

/// A source with an IDE PIO read half done and a virtio device after 3 requests.
fn source() -> (Set, Vec<u8>) {
    let ide = ide_common::Guest::f1();
    ide.lba28(0x20, 7, 2);
    ide.settle();
    ide.bytes(100);
    let mut vio = virtio_common::Driver::with_mem(
        virtio_common::node(virtio_common::SECTORS, false),
        virtio_common::config(),
        RAM,
    );
    vio.init(0, 256);
    for i in 0..3 {
        assert_eq!(vio.read(i, 512).0, 0);
    }
    vio.dev.stop().unwrap();
    let set = Set { ide, vio };
    let data = state::save(&set.devices()).unwrap();
    (set, data)
}

/// A fresh destination, stopped so that it can be saved for comparison.
fn destination() -> Set {
    let node = ide_common::pattern_node(ide_common::F1_SECTORS, None);
    let disk = Arc::new(IdeDisk::new(node.clone(), IdeDiskConfig::default()).unwrap());
    let ch = IdeChannel::new(Some(disk), None, None).unwrap();
    let ide = ide_common::Guest {
        ch,
        node,
        memory: None,
    };
    let vio = virtio_common::Driver::with_mem(
        virtio_common::node(virtio_common::SECTORS, false),
        virtio_common::config(),
        RAM,
    );
    vio.dev.stop().unwrap();
    Set { ide, vio }
}

fn snapshot(s: &Set) -> Vec<u8> {
    state::save(&s.devices()).unwrap()
}

fn zero_reads(s: &Set) {
    assert_eq!(s.ide.node.stats().reads, 0);
    assert_eq!(s.vio.node.stats().reads, 0);
}

/// Re-encodes a stream after `f` edits its sections (CRCs recomputed).
fn rebuild(data: &[u8], f: impl Fn(&mut Vec<SectionOut>)) -> Vec<u8> {
    let mut out: Vec<SectionOut> = stream::parse(data)
        .unwrap()
        .iter()
        .map(|s| SectionOut {
            name: s.name.clone(),
            kind: match s.kind.as_str() {
                "ide" => "ide",
                "memory" => "memory",
                "virtio-blk" => "virtio-blk",
                other => panic!("kind {other}"),
            },
            instance: s.instance,
            version: s.version,
            fields: s.fields.to_vec(),
            subsections: s
                .subsections
                .iter()
                .map(|x| SubsectionOut {
                    name: x.name.clone(),
                    version: x.version,
                    optional: x.optional,
                    data: x.data.to_vec(),
                })
                .collect(),
        })
        .collect();
    f(&mut out);
    stream::write(&out).unwrap()
}

fn refused(dst: &Set, data: &[u8]) -> String {
    let e = state::load(&dst.devices(), data).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State, "{e}");
    e.message().to_string()
}

#[test]
fn every_truncation_and_every_byte_flip_is_refused_and_changes_nothing() {
    let (_, data) = source();
    let dst = destination();
    let before = snapshot(&dst);
    for n in 0..data.len() {
        refused(&dst, &data[..n]);
    }
    assert_eq!(snapshot(&dst), before);
    let mut bad = data.clone();
    for i in 0..data.len() {
        for bit in [0x01u8, 0x80] {
            bad[i] ^= bit;
            refused(&dst, &bad);
            bad[i] ^= bit;
        }
        if i % 4096 == 0 {
            assert_eq!(snapshot(&dst), before, "after flips up to {i}");
        }
    }
    assert_eq!(snapshot(&dst), before);
    zero_reads(&dst);
    state::load(&dst.devices(), &data).unwrap();
    zero_reads(&dst);
    assert_ne!(snapshot(&dst), before);
}

#[test]
fn framing_errors_say_what_is_wrong() {
    let (_, data) = source();
    let dst = destination();
    let before = snapshot(&dst);

    let mut v = data.clone();
    v[8] = 2;
    assert!(refused(&dst, &v).contains("unsupported device state stream version 2"));
    let mut v = data.clone();
    v[0] = b'Q';
    assert!(refused(&dst, &v).contains("bad magic"));
    let mut v = data.clone();
    v.extend_from_slice(b"junk");
    assert!(refused(&dst, &v).contains("trailing garbage"));
    let m = refused(&dst, &data[..data.len() - 20]);
    assert!(m.contains("truncated"), "{m}");

    let newer = rebuild(&data, |s| s[2].version = 2);
    let m = refused(&dst, &newer);
    assert!(m.contains("unsupported version 2"), "{m}");
    let dup = rebuild(&data, |s| {
        let again = s[0].clone();
        s.push(again);
    });
    assert!(refused(&dst, &dup).contains("two sections for \"ide0\""));
    let mandatory = rebuild(&data, |s| {
        s[0].subsections.push(SubsectionOut {
            name: "from-the-future".into(),
            version: 1,
            optional: false,
            data: vec![1, 2, 3],
        })
    });
    let m = refused(&dst, &mandatory);
    assert!(
        m.contains("unknown mandatory subsection \"from-the-future\""),
        "{m}"
    );
    let sub_newer = rebuild(&data, |s| {
        let sub = s[0]
            .subsections
            .iter_mut()
            .find(|x| x.name == "pio0")
            .unwrap();
        sub.version = 2;
    });
    assert!(refused(&dst, &sub_newer).contains("unsupported version 2 of subsection \"pio0\""));
    let instance = rebuild(&data, |s| s[1].instance = 1);
    assert!(refused(&dst, &instance).contains("unknown instance 1"));
    let fields = rebuild(&data, |s| s[0].fields.push(0));
    assert!(refused(&dst, &fields).contains("trailing bytes"));
    let pio_pos = rebuild(&data, |s| {
        let sub = s[0]
            .subsections
            .iter_mut()
            .find(|x| x.name == "pio0")
            .unwrap();
        let n = sub.data.len();
        sub.data[n - 4..].copy_from_slice(&600u32.to_le_bytes());
    });
    let m = refused(&dst, &pio_pos);
    assert!(m.contains("field position") && m.contains("600"), "{m}");
    let foreign = rebuild(&data, |s| s[1].name = "rom".into());
    assert!(refused(&dst, &foreign).contains("no such device here"));

    assert_eq!(snapshot(&dst), before);
    zero_reads(&dst);

    // An unknown optional subsection is skipped.
    let optional = rebuild(&data, |s| {
        s[0].subsections.push(SubsectionOut {
            name: "hint".into(),
            version: 7,
            optional: true,
            data: vec![9; 10],
        })
    });
    state::load(&dst.devices(), &optional).unwrap();
}

#[test]
fn describe_lists_sections() {
    let (_, data) = source();
    let info = state::describe(&data).unwrap();
    let names: Vec<(&str, &str)> = info
        .iter()
        .map(|s| (s.name.as_str(), s.kind.as_str()))
        .collect();
    assert_eq!(
        names,
        [("ide0", "ide"), ("ram", "memory"), ("vblk", "virtio-blk")]
    );
    assert_eq!(info[0].subsections[0].name, "pio0");
    assert_eq!(
        info.iter().map(|s| s.size).sum::<usize>() + 12 + 9,
        data.len()
    );
}

#[test]
fn guest_ram_elides_zero_pages() {
    let src = GuestMemory::new(64 << 20).unwrap();
    src.write(0x1000, b"ring").unwrap();
    src.write((64 << 20) - 3, b"end").unwrap();
    src.write(40 << 20, &[0xAB; 10_000]).unwrap();
    let data = state::save(&[("ram", Device::Memory(&src))]).unwrap();
    // 16384 pages: a 2 KiB bitmap and 5 non-zero pages.
    assert!(data.len() < 2048 + 5 * 4096 + 200, "{} bytes", data.len());
    let dst = GuestMemory::new(64 << 20).unwrap();
    dst.write(0x5000, b"stale").unwrap();
    state::load(&[("ram", Device::Memory(&dst))], &data).unwrap();
    let mut a = vec![0u8; 64 << 20];
    let mut b = vec![0u8; 64 << 20];
    src.read(0, &mut a).unwrap();
    dst.read(0, &mut b).unwrap();
    assert!(a == b, "RAM differs after the round trip");
    // An odd size (a short last page) and a size mismatch.
    let odd = GuestMemory::new(10_000).unwrap();
    odd.write(9_999, &[1]).unwrap();
    let data = state::save(&[("m", Device::Memory(&odd))]).unwrap();
    let back = GuestMemory::new(10_000).unwrap();
    state::load(&[("m", Device::Memory(&back))], &data).unwrap();
    assert_eq!(back.read_u8(9_999).unwrap(), 1);
    let other = GuestMemory::new(12_288).unwrap();
    let e = state::load(&[("m", Device::Memory(&other))], &data).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(
        e.message()
            .contains("10000 bytes in the state, 12288 bytes here"),
        "{e}"
    );
}
