//! The black-box acceptance scenarios of spec §10 that are natural in Rust (1-24, 35, 39;
//! 25-34 are the §6 rows in `virtio_bad_inputs.rs`; 37 is `virtio_fuzz_corpus.rs`), plus
//! lifecycle, multi-queue and reset-with-requests-in-flight tests.

mod virtio_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockemu_core::block::FaultRules;
use blockemu_core::virtio::features as f;
use blockemu_core::virtio::mmio::*;
use blockemu_core::virtio::VirtioBlkConfig;
use virtio_common::*;

fn sectors(from: u64, n: u64) -> Vec<u8> {
    image((from + n) * 512)[(from * 512) as usize..].to_vec()
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "condition not reached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn s01_probe() {
    let d = Driver::new();
    assert_eq!(d.rd(R_MAGIC), 0x7472_6976);
    assert_eq!(d.rd(R_VERSION), 2);
    assert_eq!(d.rd(R_DEVICE_ID), 2);
    assert_eq!(d.rd(R_VENDOR_ID), 0x554D_4551);
    d.wr(R_QUEUE_SEL, 0);
    assert_eq!(d.rd(R_QUEUE_NUM_MAX), 256);
    d.wr(R_QUEUE_SEL, 1);
    assert_eq!(d.rd(R_QUEUE_NUM_MAX), 0);
    // Unknown and write-only registers read 0, as QEMU.
    assert_eq!(d.rd(0x0d0), 0);
    assert_eq!(d.rd(R_QUEUE_NOTIFY), 0);
    assert_eq!(d.rd(R_CONFIG_GENERATION), 0);
    // Caller errors are errors; guest misuse is not.
    assert!(d.dev.mmio_read(0x70, 2).is_err());
    assert!(d.dev.mmio_read(0x200, 4).is_err());
    assert!(d.dev.mmio_write(0x71, 0, 4).is_err());
}

#[test]
fn s02_features_match_qemu() {
    let d = Driver::new();
    assert_eq!(d.offered(), 0x0000_0101_3000_6e54);
    let mq = Driver::with(
        node(SECTORS, false),
        VirtioBlkConfig {
            num_queues: 2,
            ..config()
        },
    );
    assert_eq!(mq.offered(), 0x0000_0101_3000_7e54);
    let ro = Driver::with(node(SECTORS, true), config());
    assert_eq!(ro.offered(), 0x0000_0101_3000_6e74);
    let masked = Driver::with(
        node(SECTORS, false),
        VirtioBlkConfig {
            features: Some(!(f::EVENT_IDX | f::BLK_DISCARD)),
            ..config()
        },
    );
    assert_eq!(masked.offered(), 0x0000_0101_1000_4e54);
}

#[test]
fn s03_unoffered_feature_is_refused() {
    let mut d = Driver::new();
    let s = d.negotiate(f::VERSION_1 | (1 << 34));
    assert_eq!(s & 8, 0, "FEATURES_OK must not stick");
    d.wr(R_STATUS, s | 4);
    assert_eq!(d.status() & 4, 0, "DRIVER_OK has no effect");
    // A valid subset then works.
    assert_eq!(d.negotiate(f::VERSION_1 | f::BLK_FLUSH), 0xb);
}

#[test]
fn the_driver_cannot_set_needs_reset() {
    let mut d = Driver::ready(0);
    d.wr(R_STATUS, 0x4f);
    assert_eq!(d.status(), 0xf);
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
}

#[test]
fn s04_no_version_1_is_refused() {
    let mut d = Driver::new();
    assert_eq!(d.negotiate(f::BLK_FLUSH) & 8, 0);
}

#[test]
fn s05_config_space() {
    let d = Driver::ready(0);
    let gen = d.rd(R_CONFIG_GENERATION);
    assert_eq!(d.rd(0x100), 131072);
    assert_eq!(d.rd(0x104), 0);
    // Geometry reads 0 until known; the read itself starts the prefetch.
    let _ = d.rd_n(0x110, 2);
    wait_until(|| d.dev.geometry().is_some());
    wait_until(|| d.rd(R_CONFIG_GENERATION) != gen);
    assert_ne!(
        d.isr() & 2,
        0,
        "config interrupt when the geometry became known"
    );
    d.ack(2);
    let gen = d.rd(R_CONFIG_GENERATION);
    assert_eq!(d.rd_n(0x110, 2), 130);
    assert_eq!(d.rd_n(0x112, 1), 16);
    assert_eq!(d.rd_n(0x113, 1), 63);
    assert_eq!(d.rd(0x114), 512);
    assert_eq!(d.rd(0x10c), 254, "seg_max = Q - 2");
    assert_eq!(d.rd_n(0x121, 1), 0);
    assert_eq!(
        d.rd_n(0x122, 2),
        1,
        "num_queues (filled even without MQ, as QEMU)"
    );
    assert_eq!(d.rd(0x124), 0x3f_ffff);
    assert_eq!(d.rd(0x128), 1);
    assert_eq!(d.rd(0x12c), 1);
    assert_eq!(d.rd(0x130), 0x3f_ffff);
    assert_eq!(d.rd(0x134), 1);
    assert_eq!(d.rd_n(0x138, 1), 1);
    // QEMU's config ends after write_zeroes_may_unmap (57 bytes): past it, all ones.
    assert_eq!(d.rd_n(0x139, 1), 0xff);
    assert_eq!(d.rd(0x138), 0xffff_ffff);
    assert_eq!(d.rd_n(0x1fe, 2), 0xffff);
    assert_eq!(d.rd(R_CONFIG_GENERATION), gen);
}

#[test]
fn s05_geometry_before_start_reads_zero_and_start_prefetches() {
    let d = Driver::new();
    assert!(d.dev.geometry().is_none());
    d.dev.start();
    wait_until(|| d.dev.geometry().is_some());
    assert_eq!(d.rd(0x110), 0x3f10_0082);
    // Before DRIVER_OK: the generation changed, no interrupt.
    assert_eq!(d.rd(R_CONFIG_GENERATION), 1);
    assert_eq!(d.isr(), 0);
    // User geometry is known from the start: no change at all.
    let u = Driver::with(
        node(SECTORS, false),
        VirtioBlkConfig {
            cyls: 1000,
            heads: 4,
            secs: 32,
            ..config()
        },
    );
    u.dev.start();
    assert_eq!(u.rd(0x110), (32 << 24) | (4 << 16) | 1000);
    assert_eq!(u.rd(R_CONFIG_GENERATION), 0);
}

#[test]
fn s06_writeback_toggle() {
    let mut d = Driver::ready(f::BLK_CONFIG_WCE | f::BLK_FLUSH);
    assert_eq!(d.rd_n(0x120, 1), 1);
    d.dev.mmio_write(0x120, 0, 1).unwrap();
    assert_eq!(d.rd_n(0x120, 1), 0);
    d.dev.mmio_write(0x100, 5, 4).unwrap();
    assert_eq!(d.rd(0x100), 131072);
    // Writethrough: every write is followed by a flush.
    let flushes = d.node.stats().flushes;
    d.mem.write(DATA, &[1; 512]).unwrap();
    let h = d.write_chain(0, 50, DATA, 512);
    assert_eq!(d.one(h, 0), (0, 1));
    assert_eq!(d.node.stats().flushes, flushes + 1);
    d.dev.mmio_write(0x120, 1, 1).unwrap();
    let h = d.write_chain(0, 50, DATA, 512);
    assert_eq!(d.one(h, 0), (0, 1));
    assert_eq!(d.node.stats().flushes, flushes + 1);
    // Reset restores writeback.
    d.wr(R_STATUS, 0);
    assert_eq!(d.rd_n(0x120, 1), 1);
}

#[test]
fn s07_single_read() {
    let mut d = Driver::ready(0);
    let h = d.read_chain(0, 8, DATA, 4096);
    assert_eq!(d.one(h, 0), (0, 4097));
    let mut buf = vec![0u8; 4096];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, sectors(8, 8));
    assert_eq!(d.used_elem(0), (u32::from(h), 4097));
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.isr() & 1, 1);
    assert!(d.dev.irq());
    d.ack(1);
    assert_eq!(d.isr(), 0);
    assert!(!d.dev.irq());
}

#[test]
fn s08_chained_multi_descriptor_write() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_OUT, 100);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    d.mem.write(DATA, &data).unwrap();
    let mut parts = vec![(h, 10, false), (h + 10, 6, false)];
    for i in 0..8u64 {
        parts.push((DATA + i * 512, 512, false));
    }
    parts.push((STATUS, 1, true));
    let head = d.chain(&parts);
    assert_eq!(d.one(head, 0), (0, 1));
    let mut back = vec![0u8; 4096];
    d.node.read(100 * 512, &mut back).unwrap();
    assert_eq!(back, data);
    let (s, r) = d.read(100, 4096);
    assert_eq!((s, r), (0, data));
}

#[test]
fn s09_any_layout_status_shares_the_data_descriptor() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_IN, 8);
    d.mem.write(DATA + 4096, &[0xff]).unwrap();
    let head = d.chain(&[(h, 16, false), (DATA, 4097, true)]);
    d.submit(head);
    d.wait_used(1);
    let mut buf = vec![0u8; 4097];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &sectors(8, 8)[..]);
    assert_eq!(buf[4096], 0);
    assert_eq!(d.used_elem(0).1, 4097);
}

#[test]
fn s10_flush() {
    let mut d = Driver::ready(f::BLK_FLUSH);
    let flushes = d.node.stats().flushes;
    let h = d.header(0, T_FLUSH, 0);
    let head = d.chain(&[(h, 16, false), (STATUS, 1, true)]);
    assert_eq!(d.one(head, 0), (0, 1));
    assert_eq!(d.node.stats().flushes, flushes + 1);
}

#[test]
fn s11_get_id() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_GET_ID, 0);
    d.mem.write(DATA, &[0xaa; 20]).unwrap();
    let head = d.chain(&[(h, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(d.one(head, 0), (0, 21));
    let mut buf = [0u8; 20];
    d.mem.read(DATA, &mut buf).unwrap();
    let mut want = [0u8; 20];
    want[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    assert_eq!(buf, want);
    // No serial: an empty string (20 NULs), as QEMU without `serial`.
    let mut d = Driver::with(node(SECTORS, false), VirtioBlkConfig::default());
    d.init(0, 256);
    let h = d.header(0, T_GET_ID, 0);
    d.mem.write(DATA, &[0xaa; 20]).unwrap();
    let head = d.chain(&[(h, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(d.one(head, 0), (0, 21));
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 20]);
}

fn seg_request(d: &mut Driver, slot: u64, t: u32, segs: &[(u64, u32, u32)]) -> (u8, u32) {
    let h = d.header(slot, t, 0);
    let at = DATA + 0x10000 + slot * 0x100;
    for (i, &(sector, n, flags)) in segs.iter().enumerate() {
        let p = at + 16 * i as u64;
        d.mem.write_u64(p, sector).unwrap();
        d.mem.write_u32(p + 8, n).unwrap();
        d.mem.write_u32(p + 12, flags).unwrap();
    }
    d.mem.write(STATUS + slot, &[0xff]).unwrap();
    let head = d.chain(&[
        (h, 16, false),
        (at, 16 * segs.len() as u32, false),
        (STATUS + slot, 1, true),
    ]);
    d.one(head, slot)
}

#[test]
fn s16_write_zeroes_and_discard() {
    let mut d = Driver::ready(f::BLK_DISCARD | f::BLK_WRITE_ZEROES);
    assert_eq!(
        seg_request(&mut d, 0, T_WRITE_ZEROES, &[(16, 8, 0)]),
        (0, 1)
    );
    let (s, data) = d.read(16, 4096);
    assert_eq!(s, 0);
    assert!(data.iter().all(|&b| b == 0));
    assert_eq!(
        seg_request(&mut d, 0, T_WRITE_ZEROES, &[(16, 8, 1)]).0,
        0,
        "unmap allowed"
    );
    assert_eq!(seg_request(&mut d, 0, T_WRITE_ZEROES, &[(16, 8, 2)]).0, 2);
    assert_eq!(seg_request(&mut d, 0, T_DISCARD, &[(32, 8, 1)]).0, 2);
    assert_eq!(seg_request(&mut d, 0, T_DISCARD, &[(32, 8, 0)]).0, 0);
    assert_eq!(
        seg_request(&mut d, 0, T_DISCARD, &[(32, 8, 0), (48, 8, 0)]).0,
        2
    );
    assert_eq!(
        seg_request(&mut d, 0, T_DISCARD, &[(SECTORS - 4, 8, 0)]).0,
        1
    );
    assert_eq!(
        seg_request(&mut d, 0, T_WRITE_ZEROES, &[(0, 0x40_0000, 0)]).0,
        1
    );
    // Not negotiated: UNSUPP.
    let mut d = Driver::ready(0);
    assert_eq!(seg_request(&mut d, 0, T_WRITE_ZEROES, &[(16, 8, 0)]).0, 2);
    assert_eq!(seg_request(&mut d, 0, T_DISCARD, &[(16, 8, 0)]).0, 2);
}

#[test]
fn s17_indirect_descriptors() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let table = 0x60000;
    let h = d.header(0, T_IN, 8);
    d.write_desc_at(table, 0, h, 16, NEXT, 1);
    d.write_desc_at(table, 1, DATA, 4096, WRITE | NEXT, 2);
    d.write_desc_at(table, 2, STATUS, 1, WRITE, 0);
    d.write_desc(0, table, 48, INDIRECT | WRITE, 0); // WRITE on the pointer is ignored
    assert_eq!(d.one(0, 0), (0, 4097));
    let mut buf = vec![0u8; 4096];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, sectors(8, 8));
}

#[test]
fn s18_direct_then_indirect() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let table = 0x60000;
    let h = d.header(0, T_IN, 16);
    d.write_desc(0, h, 16, NEXT, 1);
    d.write_desc(1, table, 32, INDIRECT, 0);
    d.write_desc_at(table, 0, DATA, 4096, WRITE | NEXT, 1);
    d.write_desc_at(table, 1, STATUS, 1, WRITE, 0);
    d.mem.write(STATUS, &[0xff]).unwrap();
    assert_eq!(d.one(0, 0), (0, 4097));
    let mut buf = vec![0u8; 4096];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, sectors(16, 8));
}

/// `n` 4 KiB reads (sector 8*i) as one-descriptor indirect chains, exposed with one
/// avail.idx update and one notify.
fn batch_reads(d: &mut Driver, n: u16, first: u16) {
    for i in 0..n {
        let k = u64::from(first + i);
        let slot = u64::from(i);
        let table = 0x60000 + slot * 48;
        let h = d.header(slot, T_IN, 8 * k);
        d.mem.write(STATUS + slot, &[0xff]).unwrap();
        d.write_desc_at(table, 0, h, 16, NEXT, 1);
        d.write_desc_at(table, 1, DATA + slot * 4096, 4096, WRITE | NEXT, 2);
        d.write_desc_at(table, 2, STATUS + slot, 1, WRITE, 0);
        let desc = i % d.q;
        d.write_desc(desc, table, 48, INDIRECT, 0);
        d.put(desc);
    }
    d.publish();
    d.kick();
}

#[test]
fn s19_batching_200_reads() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    batch_reads(&mut d, 200, 0);
    d.wait_used(200);
    let mut seen = [false; 200];
    for i in 0..200u16 {
        let (id, len) = d.used_elem(i);
        assert_eq!(len, 4097);
        seen[id as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    let img = image(201 * 4096);
    for i in 0..200u64 {
        let mut buf = vec![0u8; 4096];
        d.mem.read(DATA + i * 4096, &mut buf).unwrap();
        let want = if i == 0 {
            let mut w = img[..4096].to_vec();
            w[..512].fill(0);
            w
        } else {
            img[(i * 4096) as usize..((i + 1) * 4096) as usize].to_vec()
        };
        assert_eq!(buf, want, "request {i}");
        assert_eq!(d.status_byte(i), 0);
    }
    assert_eq!(d.dev.stats().requests_completed, 200);
}

#[test]
fn s20_no_interrupt_flag() {
    let mut d = Driver::ready(0);
    d.mem.write_u16(AVAIL, 1).unwrap();
    for i in 0..5u64 {
        let h = d.read_chain(i, i, DATA + i * 512, 512);
        d.put(h);
    }
    d.publish();
    d.kick();
    d.wait_used(5);
    d.drain();
    assert_eq!(d.isr() & 1, 0);
    d.mem.write_u16(AVAIL, 0).unwrap();
    let h = d.read_chain(5, 5, DATA, 512);
    d.submit(h);
    d.wait_used(6);
    d.drain();
    assert_eq!(d.isr() & 1, 1);
}

#[test]
fn s21_event_idx_suppression() {
    let mut d = Driver::ready(f::EVENT_IDX | f::INDIRECT_DESC);
    let used_event = AVAIL + 4 + 2 * 256;
    let avail_event = USED + 4 + 8 * 256;
    d.mem.write_u16(used_event, 9).unwrap();
    batch_reads(&mut d, 16, 0);
    d.wait_used(16);
    d.drain();
    assert_eq!(d.dev.stats().notifications, 1);
    assert_eq!(d.isr() & 1, 1);
    d.ack(1);
    d.mem.write_u16(used_event, 20).unwrap();
    // Next batch uses descriptors 16..19.
    for i in 0..4u16 {
        let slot = u64::from(i);
        let h = d.header(slot, T_IN, slot);
        d.mem.write(STATUS + slot, &[0xff]).unwrap();
        let table = 0x70000 + slot * 48;
        d.write_desc_at(table, 0, h, 16, NEXT, 1);
        d.write_desc_at(table, 1, DATA + slot * 512, 512, WRITE | NEXT, 2);
        d.write_desc_at(table, 2, STATUS + slot, 1, WRITE, 0);
        d.write_desc(16 + i, table, 48, INDIRECT, 0);
        d.put(16 + i);
    }
    d.publish();
    d.kick();
    d.wait_used(20);
    d.drain();
    assert_eq!(
        d.dev.stats().notifications,
        1,
        "used.idx 20 did not cross used_event 20"
    );
    assert_eq!(d.isr() & 1, 0);
    assert_eq!(d.mem.read_u16(avail_event).unwrap(), d.avail_idx);
}

/// Fills the ring with `n` cheap (UNSUPP, completed inline) 2-descriptor requests.
fn cheap_requests(d: &mut Driver, n: u32) {
    let h = d.header(0, 0xff, 0);
    d.write_desc(0, h, 16, NEXT, 1);
    d.write_desc(1, STATUS, 1, WRITE, 0);
    let mut left = n;
    while left > 0 {
        // Head 0 is returned inline, so it may be made available again at once.
        d.put(0);
        d.publish();
        d.kick();
        left -= 1;
    }
}

#[test]
fn s22_event_idx_across_the_wrap() {
    let mut d = Driver::ready(f::EVENT_IDX | f::INDIRECT_DESC);
    let used_event = AVAIL + 4 + 2 * 256;
    d.mem.write_u16(used_event, 0xffff).unwrap(); // only when crossing 65535
    cheap_requests(&mut d, 65530);
    assert_eq!(d.used_idx(), 65530);
    let before = d.dev.stats().notifications;
    d.ack(1);
    d.mem.write_u16(used_event, 65534).unwrap();
    // 10 requests in one batch: crosses 65534 once; used.idx wraps to 4.
    let h = d.header(0, 0xff, 0);
    for i in 0..10u16 {
        let desc = 2 + 2 * i;
        d.write_desc(desc, h, 16, NEXT, desc + 1);
        d.write_desc(desc + 1, STATUS + u64::from(i), 1, WRITE, 0);
        d.put(desc);
    }
    d.publish();
    d.kick();
    assert_eq!(d.used_idx(), 4);
    assert_eq!(d.dev.stats().notifications, before + 1);
}

#[test]
fn s23_ring_wrap_around() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let total: u32 = 70_000;
    let mut done: u32 = 0;
    let img = image(SECTORS * 512);
    while done < total {
        let n = (total - done).min(256) as u16;
        for i in 0..n {
            let slot = u64::from(i);
            let k = u64::from(done) + slot;
            let sector = (k * 7) % SECTORS;
            let h = d.header(slot, T_IN, sector);
            let table = 0x60000 + slot * 32;
            d.write_desc_at(table, 0, h, 16, NEXT, 1);
            d.write_desc_at(table, 1, DATA + slot * 1024, 513, WRITE, 0);
            d.write_desc(i, table, 32, INDIRECT, 0);
            d.put(i);
        }
        d.publish();
        d.kick();
        let target = (done + u32::from(n)) as u16;
        d.wait_used(target);
        // Spot-check a few.
        for i in [0u16, n / 2, n - 1] {
            let slot = u64::from(i);
            let sector = ((u64::from(done) + slot) * 7) % SECTORS;
            let mut buf = vec![0u8; 513];
            d.mem.read(DATA + slot * 1024, &mut buf).unwrap();
            let mut want = img[(sector * 512) as usize..(sector * 512 + 512) as usize].to_vec();
            if sector == 0 {
                want.fill(0);
            }
            assert_eq!(&buf[..512], &want[..], "request {}", u64::from(done) + slot);
            assert_eq!(buf[512], 0);
        }
        done += u32::from(n);
        d.drain();
    }
    assert_eq!(d.used_idx(), (70_000u32 % 65536) as u16);
    assert_eq!(d.used_idx(), 4464);
    assert_eq!(d.dev.stats().requests_completed, 70_000);
}

#[test]
fn s24_small_queue_with_indirect() {
    let mut d = Driver::new();
    d.init(f::INDIRECT_DESC, 4);
    batch_reads(&mut d, 4, 0);
    d.wait_used(4);
    for i in 0..4u64 {
        assert_eq!(d.status_byte(i), 0);
    }
}

#[test]
fn s35_reset_mid_stream() {
    let mut d = Driver::ready(0);
    d.dev.stop().unwrap();
    let h = d.read_chain(0, 8, DATA, 4096);
    d.submit(h); // remembered, not processed: the device is stopped
    let mut old_used = vec![0u8; 0x1000];
    d.mem.read(USED, &mut old_used).unwrap();
    d.wr(R_STATUS, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(d.isr(), 0);
    d.wr(R_QUEUE_SEL, 0);
    assert_eq!(d.rd(R_QUEUE_READY), 0);
    d.dev.start();
    d.drain();
    let mut now = vec![0u8; 0x1000];
    d.mem.read(USED, &mut now).unwrap();
    assert_eq!(now, old_used, "old ring never touched");
    // Re-init with new ring addresses.
    d.negotiate(f::VERSION_1);
    d.setup_queue(0, 256, 0x80000, 0x90000, 0xa0000);
    d.wr(R_STATUS, 0xf);
    let h = d.read_chain(0, 8, DATA, 4096);
    assert_eq!(d.one(h, 0), (0, 4097));
    d.mem.read(USED, &mut now).unwrap();
    assert_eq!(now, old_used);
}

#[test]
fn reset_with_requests_in_flight() {
    let rules = Arc::new(FaultRules::new());
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(0, 256);
    rules.stall();
    for i in 0..4u64 {
        let h = d.read_chain(i, 8 * i, DATA + i * 4096, 4096);
        d.put(h);
    }
    d.publish();
    d.kick();
    wait_until(|| rules.stalled_count() >= 1);
    let mut old_used = vec![0u8; 0x1000];
    d.mem.read(USED, &mut old_used).unwrap();
    // The reset returns at once, but Status reads non-zero while old operations run.
    let t0 = Instant::now();
    d.wr(R_STATUS, 0);
    assert!(t0.elapsed() < Duration::from_millis(500));
    assert_ne!(d.status(), 0);
    assert_eq!(d.isr(), 0);
    rules.release();
    wait_until(|| d.status() == 0);
    d.drain();
    let mut now = vec![0u8; 0x1000];
    d.mem.read(USED, &mut now).unwrap();
    assert_eq!(
        now, old_used,
        "completions of the old generation are dropped"
    );
    d.init(0, 256);
    let (s, data) = d.read(8, 4096);
    assert_eq!((s, data), (0, sectors(8, 8)));
}

#[test]
fn queue_reset_with_requests_in_flight() {
    let rules = Arc::new(FaultRules::new());
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(f::RING_RESET, 256);
    rules.stall();
    let h = d.read_chain(0, 8, DATA, 4096);
    d.submit(h);
    wait_until(|| rules.stalled_count() >= 1);
    d.wr(R_QUEUE_SEL, 0);
    d.wr(R_QUEUE_RESET, 1);
    assert_eq!(
        d.rd(R_QUEUE_RESET),
        1,
        "reads 1 while the old operation runs"
    );
    assert_eq!(d.rd(R_QUEUE_READY), 0);
    rules.release();
    wait_until(|| d.rd(R_QUEUE_RESET) == 0);
    assert_eq!(d.used_idx(), 0);
    d.setup_queue(0, 256, DESC, AVAIL, USED);
    d.mem.write_u16(AVAIL + 2, 0).unwrap();
    let (s, _) = d.read(8, 4096);
    assert_eq!(s, 0);
}

#[test]
fn s39_capacity_change() {
    let mut d = Driver::ready(0);
    let gen = d.rd(R_CONFIG_GENERATION);
    d.dev.resize((SECTORS * 512) + (1 << 20)).unwrap();
    assert_ne!(d.isr() & 2, 0);
    assert_ne!(d.rd(R_CONFIG_GENERATION), gen);
    assert_eq!(d.rd(0x100), 133_120);
    d.ack(2);
    assert_eq!(d.isr() & 2, 0);
    d.mem.write(DATA, &[0x42; 512]).unwrap();
    let h = d.write_chain(0, 133_119, DATA, 512);
    assert_eq!(d.one(h, 0), (0, 1));
    let h = d.read_chain(0, 133_119, DATA + 4096, 512);
    assert_eq!(d.one(h, 0), (0, 513));
    let mut buf = [0u8; 512];
    d.mem.read(DATA + 4096, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 512]);
    // A read-only node refuses.
    let ro = Driver::with(node(SECTORS, true), config());
    assert!(ro.dev.resize(1 << 20).is_err());
}

#[test]
fn stop_defers_notifies_until_start() {
    let mut d = Driver::ready(0);
    d.dev.stop().unwrap();
    let h = d.read_chain(0, 8, DATA, 512);
    d.submit(h);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 0);
    d.dev.start();
    d.wait_used(1);
    assert_eq!(d.status_byte(0), 0);
}

#[test]
fn inactive_node_gives_ioerr_and_reaches_no_storage() {
    let mut d = Driver::ready(0);
    d.node.inactivate().unwrap();
    let reads = d.node.stats().reads;
    let h = d.read_chain(0, 8, DATA, 512);
    assert_eq!(d.one(h, 0), (1, 1));
    assert_eq!(d.node.stats().reads, reads);
    d.node.activate().unwrap();
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
}

#[test]
fn backend_error_is_ioerr() {
    let rules = Arc::new(FaultRules::new());
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(0, 256);
    rules.fail_nth(1, None, 1, libc::EIO).unwrap();
    let h = d.read_chain(0, 8, DATA, 512);
    assert_eq!(d.one(h, 0), (1, 1));
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
}

#[test]
fn two_queues_are_independent() {
    let mut d = Driver::with(
        node(SECTORS, false),
        VirtioBlkConfig {
            num_queues: 2,
            ..config()
        },
    );
    d.init(f::BLK_MQ, 256);
    d.setup_queue(1, 256, 0x80000, 0x90000, 0xa0000);
    // The driver's rings are now queue 1's: a request there completes on queue 1 only.
    let h = d.read_chain(0, 8, DATA, 512);
    d.submit(h);
    d.wr(R_QUEUE_NOTIFY, 1);
    d.wait_used(1);
    assert_eq!(d.mem.read_u16(0xa0002).unwrap(), 1);
    assert_eq!(d.mem.read_u16(USED + 2).unwrap(), 0, "queue 0 untouched");
    assert_eq!(d.rd_n(0x122, 2), 2);
}

#[test]
fn wait_irq_wakes_on_completion_and_times_out() {
    let mut d = Driver::ready(0);
    assert!(!d.dev.wait_irq(Some(Duration::from_millis(10))).unwrap());
    let h = d.read_chain(0, 8, DATA, 512);
    d.submit(h);
    assert!(d.dev.wait_irq(Some(Duration::from_secs(10))).unwrap());
}
