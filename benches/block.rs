//! Reads through the core: 4 KiB random and 1 MiB sequential, node vs the bare backend.

use std::hint::black_box;
use std::sync::Arc;

use blockemu_core::block::{open_image, Backend, FileBackend, Format, ImageOptions};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const IMAGE: u64 = 64 << 20;

fn image() -> tempfile::NamedTempFile {
    // /dev/shm keeps the numbers about our overhead, not about a disk.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    let data: Vec<u8> = (0..IMAGE).map(|i| (i % 251) as u8).collect();
    std::fs::write(tmp.path(), data).unwrap();
    tmp
}

fn offsets(n: usize, block: u64) -> Vec<u64> {
    // A fixed LCG: the same offsets every run.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 16) % (IMAGE / block) * block
        })
        .collect()
}

fn reads(c: &mut Criterion) {
    let tmp = image();
    let path = tmp.path().to_str().unwrap().to_string();
    let node = open_image(
        &path,
        &ImageOptions {
            format: Some(Format::Raw),
            ..Default::default()
        },
        |b| b,
    )
    .unwrap();
    let raw: Arc<dyn Backend> = Arc::new(FileBackend::open(tmp.path(), true, false).unwrap());

    let offs = offsets(4096, 4096);
    let mut g = c.benchmark_group("read_4k_random");
    g.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    let mut i = 0;
    g.bench_function("node", |b| {
        b.iter(|| {
            i = (i + 1) % offs.len();
            node.read(black_box(offs[i]), &mut buf).unwrap();
        })
    });
    g.bench_function("backend_pread", |b| {
        b.iter(|| {
            i = (i + 1) % offs.len();
            raw.read_at(&mut buf, black_box(offs[i])).unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("read_1m_sequential");
    g.throughput(Throughput::Bytes(1 << 20));
    let mut big = vec![0u8; 1 << 20];
    let mut off = 0u64;
    g.bench_function("node", |b| {
        b.iter(|| {
            node.read(black_box(off), &mut big).unwrap();
            off = (off + (1 << 20)) % IMAGE;
        })
    });
    g.bench_function("backend_pread", |b| {
        b.iter(|| {
            raw.read_at(&mut big, black_box(off)).unwrap();
            off = (off + (1 << 20)) % IMAGE;
        })
    });
    g.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
