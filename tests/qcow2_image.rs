//! qcow2: lifecycle (inactive reads nothing, dirty bit), hostile headers, qemu-img interop.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blockemu_core::block::qcow2::{create_empty, Header};
use blockemu_core::block::{
    create_image_with, image_info, open_image, Backend, BlockNode, Format, ImageOptions,
    MemoryBackend, Qcow2Backend,
};
use blockemu_core::ErrorKind;

const MIB: u64 = 1 << 20;

fn open(path: &Path, active: bool) -> BlockNode {
    let opts = ImageOptions {
        format: Some(Format::Qcow2),
        active,
        ..Default::default()
    };
    open_image(path.to_str().unwrap(), &opts, |b| b).unwrap()
}

fn byte79(path: &Path) -> u8 {
    std::fs::read(path).unwrap()[79]
}

fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    Command::new("qemu-img").args(args).output().ok()
}

/// A small deterministic PRNG (xorshift) for workloads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn created_image_reads_zero_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    create_image_with(&p, 10 * MIB, Format::Qcow2, false).unwrap();
    let info = image_info(&p).unwrap();
    assert_eq!(
        (info.format, info.virtual_size, info.dirty),
        (Format::Qcow2, 10 * MIB, false)
    );
    let node = open(&p, true);
    assert_eq!(node.size().unwrap(), Some(10 * MIB));
    let mut buf = vec![1u8; 8192];
    node.read(MIB - 100, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    node.write(65_000, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    node.read(65_000, &mut back).unwrap();
    assert_eq!(back, data);
    node.close().unwrap();
    let node = open(&p, true);
    let mut back = vec![0u8; data.len()];
    node.read(65_000, &mut back).unwrap();
    assert_eq!(back, data);
    node.close().unwrap();
    if let Some(out) = qemu_img(&["check", p.to_str().unwrap()]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn inactive_node_reads_nothing_and_closing_it_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("i.qcow2");
    create_image_with(&p, 4 * MIB, Format::Qcow2, true).unwrap();
    let before = std::fs::read(&p).unwrap();
    let node = open(&p, false);
    assert_eq!(node.size().unwrap(), None);
    assert_eq!(node.stats(), Default::default());
    assert_eq!(
        node.read(0, &mut [0u8; 512]).unwrap_err().kind(),
        ErrorKind::Inactive
    );
    node.close().unwrap();
    assert_eq!(node.stats().reads + node.stats().writes, 0);
    assert_eq!(std::fs::read(&p).unwrap(), before);

    let node = open(&p, false);
    node.activate().unwrap();
    assert_eq!(node.size().unwrap(), Some(4 * MIB));
    assert!(node.stats().reads >= 1, "activation reads the header");
}

#[test]
fn dirty_bit_ping_pong() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pp.qcow2");
    create_image_with(&p, 4 * MIB, Format::Qcow2, true).unwrap();
    let a = open(&p, true);
    a.write(0, &[0xaa; 4096]).unwrap();
    assert_eq!(byte79(&p), 1, "first allocating write sets the dirty bit");
    assert!(image_info(&p).unwrap().dirty);
    a.inactivate().unwrap();
    assert_eq!(byte79(&p), 0, "inactivation clears it");
    let a_stats = a.stats();

    let b = open(&p, false);
    b.activate().unwrap();
    let mut buf = [0u8; 4096];
    b.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0xaa; 4096]);
    b.write(MIB, &[0xbb; 4096]).unwrap();
    assert_eq!(byte79(&p), 1);
    let snapshot = std::fs::read(&p).unwrap();
    a.close().unwrap();
    assert_eq!(
        a.stats(),
        a_stats,
        "closing the inactive source issues nothing"
    );
    assert_eq!(std::fs::read(&p).unwrap(), snapshot);
    assert_eq!(byte79(&p), 1, "B's dirty bit survives A's close");
    b.close().unwrap();
    assert_eq!(byte79(&p), 0);
    if let Some(out) = qemu_img(&["check", "-r", "all", p.to_str().unwrap()]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn dirty_image_is_refused_read_write_but_readable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.qcow2");
    create_image_with(&p, MIB, Format::Qcow2, true).unwrap();
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[79] |= 1;
    std::fs::write(&p, &bytes).unwrap();
    let opts = ImageOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    let e = open_image(p.to_str().unwrap(), &opts, |b| b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ImageFormat);
    let ro = ImageOptions {
        readonly: true,
        ..opts
    };
    open_image(p.to_str().unwrap(), &ro, |b| b).unwrap();
}

fn mem_qcow2(bytes: Vec<u8>) -> Qcow2Backend {
    Qcow2Backend::new(Arc::new(MemoryBackend::from_vec(bytes)), false)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn hostile_headers_are_format_errors() {
    let good = create_empty(8 * MIB, 16, false).unwrap();
    assert!(Header::parse(&good, good.len() as u64).is_ok());
    let cases: Vec<(&str, Mutation)> = vec![
        ("truncated", Box::new(|b| b.truncate(50))),
        ("truncated v3", Box::new(|b| b.truncate(90))),
        ("huge l1_size", Box::new(|b| put32(b, 36, u32::MAX))),
        ("l1 beyond eof", Box::new(|b| put64(b, 40, 1 << 40))),
        ("l1 unaligned", Box::new(|b| put64(b, 40, 0x30008))),
        ("reftable beyond eof", Box::new(|b| put64(b, 48, 1 << 40))),
        ("reftable unaligned", Box::new(|b| put64(b, 48, 0x10200))),
        ("cluster_bits 8", Box::new(|b| put32(b, 20, 8))),
        ("cluster_bits 22", Box::new(|b| put32(b, 20, 22))),
        ("cluster_bits huge", Box::new(|b| put32(b, 20, 200))),
        ("unknown incompat", Box::new(|b| b[72] = 0x80)),
        ("external data", Box::new(|b| b[79] = 0x04)),
        ("corrupt", Box::new(|b| b[79] = 0x02)),
        ("version 4", Box::new(|b| put32(b, 4, 4))),
        ("backing file", Box::new(|b| put64(b, 8, 0x200))),
        ("encrypted", Box::new(|b| put32(b, 32, 1))),
        ("size > l1", Box::new(|b| put64(b, 24, 1 << 50))),
        (
            "refblock beyond eof",
            Box::new(|b| put64(b, 0x10000, 1 << 40)),
        ),
        ("header_length", Box::new(|b| put32(b, 100, 7))),
    ];
    for (name, mutate) in cases {
        let mut bytes = good.clone();
        mutate(&mut bytes);
        let q = mem_qcow2(bytes);
        let e = q.len().expect_err(name);
        assert_eq!(e.kind(), ErrorKind::ImageFormat, "{name}: {e}");
    }
}

#[test]
fn hostile_tables_fail_at_io_not_panic() {
    let mut bytes = create_empty(8 * MIB, 16, false).unwrap();
    // L1[0] -> an L2 table beyond the end of the file.
    put64(&mut bytes, 0x30000, (1 << 40) | (1 << 63));
    let q = mem_qcow2(bytes.clone());
    let mut buf = [0u8; 512];
    assert_eq!(
        q.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::ImageFormat
    );
    assert_eq!(
        q.write_at(&buf, 0).unwrap_err().kind(),
        ErrorKind::ImageFormat
    );
    // L1[0] -> cluster 2 (the refcount block) as L2, whose entries then point anywhere.
    put64(&mut bytes, 0x30000, 0x20000 | (1 << 63));
    put64(&mut bytes, 0x20000, 0x7fff_0000 | (1 << 63));
    put64(&mut bytes, 0x20008, 0x4000_0000_0000_0000 | 0x1000);
    let q = mem_qcow2(bytes);
    assert_eq!(
        q.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::ImageFormat
    );
    assert_eq!(
        q.read_at(&mut buf, 65536).unwrap_err().kind(),
        ErrorKind::ImageFormat
    );
}

#[test]
fn random_workload_matches_a_model_and_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    let size = 32 * MIB;
    create_image_with(&p, size, Format::Qcow2, false).unwrap();
    let mut model = vec![0u8; size as usize];
    let node = open(&p, true);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let len = 1 + (rng.next() % 150_000) as usize;
        let off = rng.next() % (size - len as u64);
        if rng.next() % 3 == 0 {
            let mut buf = vec![0u8; len];
            node.read(off, &mut buf).unwrap();
            assert_eq!(buf, model[off as usize..off as usize + len], "op {i}");
        } else {
            let fill = (rng.next() & 0xff) as u8;
            let data: Vec<u8> = (0..len).map(|j| fill.wrapping_add(j as u8)).collect();
            node.write(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    }
    node.close().unwrap();
    let raw = dir.path().join("w.raw");
    std::fs::write(&raw, &model).unwrap();
    if let Some(out) = qemu_img(&["check", p.to_str().unwrap()]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ])
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn parallel_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    create_image_with(&p, 64 * MIB, Format::Qcow2, true).unwrap();
    let node = Arc::new(open(&p, true));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    // Each thread owns every 4th 4 KiB block: allocations race on clusters.
                    let off = (i * 4 + t) * 4096 * 7 % (64 * MIB - 4096) / 4096 * 4096;
                    let off = off - off % 16384 + t * 4096;
                    node.write(off, &[t as u8 + 1; 4096]).unwrap();
                    let mut b = [0u8; 4096];
                    node.read(off, &mut b).unwrap();
                    assert_eq!(b, [t as u8 + 1; 4096]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    node.close().unwrap();
    if let Some(out) = qemu_img(&["check", p.to_str().unwrap()]) {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
