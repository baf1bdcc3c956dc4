//! Dirty bitmaps and mirror jobs: the cost of a mark on the write path (bitmap alone, and a
//! 4 KiB node write with and without a bitmap), and a 64 MiB memory-to-memory mirror against
//! a plain read/write copy loop of the same bytes.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use blockemu_core::block::{memory_node, DirtyBitmap};
use blockemu_core::jobs::{MirrorConfig, MirrorJob};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const IMAGE: u64 = 64 << 20;

fn offsets(n: usize, block: u64) -> Vec<u64> {
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

fn marks(c: &mut Criterion) {
    let offs = offsets(4096, 4096);
    let bitmap = DirtyBitmap::new("b", IMAGE, 65536).unwrap();
    let mut g = c.benchmark_group("dirty_mark");
    let mut i = 0;
    g.bench_function("bitmap_mark_4k", |b| {
        b.iter(|| {
            i = (i + 1) % offs.len();
            bitmap.mark(black_box(offs[i]), 4096).unwrap();
        })
    });
    g.bench_function("bitmap_mark_and_clear_4k", |b| {
        b.iter(|| {
            i = (i + 1) % offs.len();
            bitmap.mark(black_box(offs[i]), 4096).unwrap();
            bitmap.clear(offs[i] & !65535, 65536).unwrap();
        })
    });
    // The write path: a 4 KiB write to a memory node, without and with a bitmap (baseline
    // and cost measured in the same run).
    let buf = vec![7u8; 4096];
    for bitmaps in [0, 1] {
        let node = memory_node(IMAGE, false, |b| b).unwrap();
        for k in 0..bitmaps {
            node.add_dirty_bitmap(&format!("b{k}"), 65536).unwrap();
        }
        g.bench_function(format!("node_write_4k_{bitmaps}_bitmaps"), |b| {
            b.iter(|| {
                i = (i + 1) % offs.len();
                node.write(black_box(offs[i]), &buf).unwrap();
            })
        });
    }
    g.finish();
}

fn mirror(c: &mut Criterion) {
    let src = Arc::new(memory_node(IMAGE, false, |b| b).unwrap());
    let data: Vec<u8> = (0..IMAGE).map(|i| (i % 251) as u8 | 1).collect();
    src.write(0, &data).unwrap();
    drop(data);
    let dst = Arc::new(memory_node(IMAGE, false, |b| b).unwrap());
    let mut g = c.benchmark_group("mirror");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(IMAGE));
    // Baseline: the same bytes copied by a plain loop of 1 MiB node reads and writes.
    g.bench_function("memory_64m_copy_loop_baseline", |b| {
        let mut buf = vec![0u8; 1 << 20];
        b.iter(|| {
            let mut off = 0;
            while off < IMAGE {
                src.read(off, &mut buf).unwrap();
                dst.write(off, &buf).unwrap();
                off += buf.len() as u64;
            }
        })
    });
    for inflight in [1, 8] {
        g.bench_function(format!("memory_64m_inflight_{inflight}"), |b| {
            b.iter(|| {
                let job = MirrorJob::start(
                    src.clone(),
                    dst.clone(),
                    MirrorConfig {
                        max_in_flight: inflight,
                        ..Default::default()
                    },
                )
                .unwrap();
                let p = job.complete(Some(Duration::from_secs(120))).unwrap();
                assert_eq!(p.bytes_copied, IMAGE);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, marks, mirror);
criterion_main!(benches);
