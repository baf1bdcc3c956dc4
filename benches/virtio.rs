//! virtio-blk: what the device costs per request without storage.
//!
//! - `virtio/parse_3desc_chain`: walk one 3-descriptor chain (header, 4 KiB, status) and parse
//!   its block request from guest memory (target < 100 ns);
//! - `virtio/batch_128x4k_reads_memory_node`: 128 4 KiB reads exposed with one avail.idx
//!   update and one notify, through the whole device (pop, runners, completion) from a
//!   memory node, until used.idx shows all 128.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

use blockemu_core::block::memory_node;
use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::virtio::blk::request::{parse, Context};
use blockemu_core::virtio::chain::{walk_into, Chain};
use blockemu_core::virtio::features as f;
use blockemu_core::virtio::mmio::*;
use blockemu_core::virtio::{VirtioBlk, VirtioBlkConfig};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x10000;
const USED: u64 = 0x20000;
const HDR: u64 = 0x30000;
const STATUS: u64 = 0x40000;
const DATA: u64 = 0x100000;

fn write_desc(mem: &GuestMemory, idx: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let at = DESC + idx * 16;
    mem.write_u64(at, addr).unwrap();
    mem.write_u32(at + 8, len).unwrap();
    mem.write_u16(at + 12, flags).unwrap();
    mem.write_u16(at + 14, next).unwrap();
}

/// Request `i`: descriptors 3i..3i+2, reading sector 8i.
fn read_request(mem: &GuestMemory, i: u64) -> u16 {
    let h = HDR + 16 * i;
    mem.write_u32(h, 0).unwrap();
    mem.write_u64(h + 8, 8 * i).unwrap();
    let d = 3 * i;
    write_desc(mem, d, h, 16, 1, (d + 1) as u16);
    write_desc(mem, d + 1, DATA + 4096 * i, 4096, 3, (d + 2) as u16);
    write_desc(mem, d + 2, STATUS + i, 1, 2, 0);
    d as u16
}

fn parse_chain(c: &mut Criterion) {
    let mem = GuestMemory::new(16 << 20).unwrap();
    let head = read_request(&mem, 0);
    let ctx = Context {
        capacity: 64 << 20,
        readonly: false,
        discard: true,
        write_zeroes: true,
    };
    let mut chain = Chain::default();
    c.bench_function("virtio/parse_3desc_chain", |b| {
        b.iter(|| {
            walk_into(&mem, DESC, 256, black_box(head), true, &mut chain).unwrap();
            black_box(parse(&mem, &chain, &ctx))
        })
    });
}

fn batch(c: &mut Criterion) {
    let mem = Arc::new(GuestMemory::new(16 << 20).unwrap());
    let node = Arc::new(memory_node(64 << 20, false, |b| b).unwrap());
    let dev = VirtioBlk::new(
        node,
        mem.clone(),
        VirtioBlkConfig {
            queue_size: 512,
            ..VirtioBlkConfig::default()
        },
    )
    .unwrap();
    let wr = |o, v| dev.mmio_write(o, v, 4).unwrap();
    wr(R_STATUS, 1);
    wr(R_STATUS, 3);
    wr(R_DRIVER_FEATURES_SEL, 1);
    wr(R_DRIVER_FEATURES, (f::VERSION_1 >> 32) as u32);
    wr(R_STATUS, 0xb);
    wr(R_QUEUE_NUM, 512);
    wr(R_QUEUE_DESC_LOW, DESC as u32);
    wr(R_QUEUE_DRIVER_LOW, AVAIL as u32);
    wr(R_QUEUE_DEVICE_LOW, USED as u32);
    wr(R_QUEUE_READY, 1);
    wr(R_STATUS, 0xf);
    // NO_INTERRUPT: the bench polls used.idx.
    mem.write_u16(AVAIL, 1).unwrap();
    let heads: Vec<u16> = (0..128).map(|i| read_request(&mem, i)).collect();
    let mut avail_idx: u16 = 0;
    let mut group = c.benchmark_group("virtio");
    group.throughput(Throughput::Elements(128));
    group.bench_function("batch_128x4k_reads_memory_node", |b| {
        b.iter(|| {
            for &h in &heads {
                let slot = u64::from(avail_idx % 512);
                mem.write_u16(AVAIL + 4 + 2 * slot, h).unwrap();
                avail_idx = avail_idx.wrapping_add(1);
            }
            mem.write_u16(AVAIL + 2, avail_idx).unwrap();
            dev.mmio_write(R_QUEUE_NOTIFY, 0, 4).unwrap();
            let t0 = Instant::now();
            while mem.read_u16(USED + 2).unwrap() != avail_idx {
                assert!(t0.elapsed() < Duration::from_secs(10), "device stuck");
                std::hint::spin_loop();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parse_chain, batch);
criterion_main!(benches);
