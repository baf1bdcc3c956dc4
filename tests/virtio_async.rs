//! The asynchronous engine: slow storage gets requests in parallel (queue depth), resets at
//! random moments with requests in flight never let an old completion reach the new rings.

mod virtio_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockemu_core::block::FaultRules;
use blockemu_core::virtio::features as f;
use blockemu_core::virtio::mmio::*;
use virtio_common::*;

/// `n` 4 KiB reads (sector 8*i) as one-descriptor indirect chains, one notify.
fn batch(d: &mut Driver, n: u16) {
    for i in 0..n {
        let slot = u64::from(i);
        let table = 0x60000 + slot * 48;
        let h = d.header(slot, T_IN, 8 * slot);
        d.mem.write(STATUS + slot, &[0xff]).unwrap();
        d.write_desc_at(table, 0, h, 16, NEXT, 1);
        d.write_desc_at(table, 1, DATA + slot * 4096, 4096, WRITE | NEXT, 2);
        d.write_desc_at(table, 2, STATUS + slot, 1, WRITE, 0);
        d.write_desc(i, table, 48, INDIRECT, 0);
        d.put(i);
    }
    d.publish();
    d.kick();
}

#[test]
fn slow_storage_runs_requests_in_parallel() {
    let rules = Arc::new(FaultRules::new());
    rules.set_latency(None, Duration::from_millis(20));
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(f::INDIRECT_DESC, 256);
    // Warm up: the device learns that operations are slow.
    batch(&mut d, 16);
    d.wait_used(16);
    let t0 = Instant::now();
    batch(&mut d, 64);
    let notify_took = t0.elapsed();
    d.wait_used(80);
    let took = t0.elapsed();
    assert!(
        notify_took < Duration::from_millis(20),
        "the notify waited for storage"
    );
    // 64 x 20 ms one at a time would be 1.28 s.
    assert!(
        took < Duration::from_millis(640),
        "no queue depth: {took:?}"
    );
    let img = image(64 * 4096);
    for i in 0..64u64 {
        assert_eq!(d.status_byte(i), 0);
        let mut buf = vec![0u8; 4096];
        d.mem.read(DATA + i * 4096, &mut buf).unwrap();
        let mut want = img[(i * 4096) as usize..((i + 1) * 4096) as usize].to_vec();
        if i == 0 {
            want[..512].fill(0);
        }
        assert_eq!(buf, want, "request {i}");
    }
}

#[test]
fn o_direct_file_node_reads_correctly_at_depth() {
    use blockemu_core::block::{open_image, CacheMode, ImageOptions};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.img");
    let mut data = image(SECTORS * 512);
    data[..512].fill(0);
    std::fs::write(&path, &data).unwrap();
    let opts = ImageOptions {
        cache: CacheMode::None,
        ..ImageOptions::default()
    };
    let node = match open_image(path.to_str().unwrap(), &opts, |b| b) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            eprintln!("O_DIRECT not supported here ({e}); skipped");
            return;
        }
    };
    let mut d = Driver::with(node, config());
    d.init(f::INDIRECT_DESC, 256);
    for round in 0..4u16 {
        batch(&mut d, 32);
        d.wait_used(32 * (round + 1));
    }
    for i in 0..32u64 {
        assert_eq!(d.status_byte(i), 0);
        let mut buf = vec![0u8; 4096];
        d.mem.read(DATA + i * 4096, &mut buf).unwrap();
        assert_eq!(
            buf,
            data[(i * 4096) as usize..((i + 1) * 4096) as usize].to_vec()
        );
    }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn resets_at_random_moments_never_reach_the_new_rings() {
    let rules = Arc::new(FaultRules::new());
    rules.set_latency(None, Duration::from_micros(300));
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    let mut rng = Rng(0xBAD_5EED);
    // Two ring layouts used alternately: after a reset the old one must stay untouched.
    let layouts = [(DESC, AVAIL, USED), (0x80000, 0x90000, 0xa0000)];
    for round in 0..40usize {
        let (desc, avail, used) = layouts[round % 2];
        let (_, _, old_used) = layouts[(round + 1) % 2];
        d.negotiate(f::VERSION_1 | f::INDIRECT_DESC | f::EVENT_IDX);
        d.setup_queue(0, 256, desc, avail, used);
        d.wr(R_STATUS, 0xf);
        d.mem.with_slice_mut(used, 0x1000, |b| b.fill(0)).unwrap();
        let mut before_old = vec![0u8; 0x1000];
        d.mem.read(old_used, &mut before_old).unwrap();
        batch(&mut d, 1 + (rng.next() % 64) as u16);
        std::thread::sleep(Duration::from_micros(rng.next() % 3000));
        d.wr(R_STATUS, 0);
        let t0 = Instant::now();
        while d.status() != 0 {
            assert!(t0.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_micros(100));
        }
        // Nothing completes after Status read 0.
        let mut after_reset = vec![0u8; 0x1000];
        d.mem.read(used, &mut after_reset).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let mut later = vec![0u8; 0x1000];
        d.mem.read(used, &mut later).unwrap();
        assert_eq!(later, after_reset, "round {round}: completion after reset");
        let mut now_old = vec![0u8; 0x1000];
        d.mem.read(old_used, &mut now_old).unwrap();
        assert_eq!(now_old, before_old, "round {round}: old ring touched");
    }
    rules.set_latency(None, Duration::ZERO);
    d.mem.with_slice_mut(0, 0x40000, |b| b.fill(0)).unwrap();
    d.init(0, 256);
    let (s, _) = d.read(8, 4096);
    assert_eq!(s, 0);
}
