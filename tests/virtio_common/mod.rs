//! A driver played in Rust for the virtio-blk tests: init, queue setup, chains, notify, wait.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockemu_core::block::{memory_node, BlockNode};
use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::virtio::features as f;
use blockemu_core::virtio::mmio::*;
use blockemu_core::virtio::{VirtioBlk, VirtioBlkConfig};

pub const MEM_SIZE: usize = 16 << 20;
pub const SECTORS: u64 = 131_072;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x20000;
pub const USED: u64 = 0x30000;
pub const HDR: u64 = 0x40000;
pub const STATUS: u64 = 0x50000;
pub const DATA: u64 = 0x100000;
pub const SERIAL: &str = "EMU-VIRTIO-0001";

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

fn word(w: u64) -> u64 {
    let x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// Byte `i` of the image: a cheap pseudo-random function of its offset.
pub fn image_byte(i: u64) -> u8 {
    (word(i / 8) >> (8 * (i % 8))) as u8
}

pub fn image(bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes as usize + 8);
    for w in 0..bytes.div_ceil(8) {
        v.extend_from_slice(&word(w).to_le_bytes());
    }
    v.truncate(bytes as usize);
    v
}

/// A memory node of `sectors` filled with [`image_byte`] (sector 0 zero: size geometry).
pub fn node(sectors: u64, readonly: bool) -> Arc<BlockNode> {
    let mut data = image(sectors * 512);
    data[..512].fill(0);
    let node = memory_node(sectors * 512, false, |b| {
        b.write_at(&data, 0).unwrap();
        b
    })
    .unwrap();
    if readonly {
        let ro = memory_node(sectors * 512, true, |b| {
            b.write_at(&data, 0).unwrap();
            b
        })
        .unwrap();
        return Arc::new(ro);
    }
    Arc::new(node)
}

pub struct Driver {
    pub dev: VirtioBlk,
    pub mem: Arc<GuestMemory>,
    pub node: Arc<BlockNode>,
    pub q: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub next_desc: u16,
    pub used_seen: u16,
    pub features: u64,
}

pub fn config() -> VirtioBlkConfig {
    VirtioBlkConfig {
        serial: Some(SERIAL.into()),
        ..VirtioBlkConfig::default()
    }
}

impl Driver {
    pub fn with(node: Arc<BlockNode>, config: VirtioBlkConfig) -> Driver {
        Driver::with_mem(node, config, MEM_SIZE)
    }

    pub fn with_mem(node: Arc<BlockNode>, config: VirtioBlkConfig, mem_size: usize) -> Driver {
        let mem = Arc::new(GuestMemory::new(mem_size).unwrap());
        let dev = VirtioBlk::new(node.clone(), mem.clone(), config).unwrap();
        Driver {
            dev,
            mem,
            node,
            q: 256,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            avail_idx: 0,
            next_desc: 0,
            used_seen: 0,
            features: 0,
        }
    }

    /// A device over a fresh 64 MiB pattern node, not initialised.
    pub fn new() -> Driver {
        Driver::with(node(SECTORS, false), config())
    }

    /// A device initialised with `extra` features (besides VERSION_1), queue 0 of `q`.
    pub fn ready(extra: u64) -> Driver {
        let mut d = Driver::new();
        d.init(extra, 256);
        d
    }

    pub fn rd(&self, off: u32) -> u32 {
        self.dev.mmio_read(off, 4).unwrap()
    }
    pub fn rd_n(&self, off: u32, size: u32) -> u32 {
        self.dev.mmio_read(off, size).unwrap()
    }
    pub fn wr(&self, off: u32, v: u32) {
        self.dev.mmio_write(off, v, 4).unwrap()
    }
    pub fn status(&self) -> u32 {
        self.rd(R_STATUS)
    }

    pub fn offered(&self) -> u64 {
        self.wr(R_DEVICE_FEATURES_SEL, 0);
        let lo = self.rd(R_DEVICE_FEATURES);
        self.wr(R_DEVICE_FEATURES_SEL, 1);
        let hi = self.rd(R_DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Reset, ACK, DRIVER, features; returns Status after FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.wr(R_STATUS, 0);
        self.wr(R_STATUS, 1);
        self.wr(R_STATUS, 3);
        self.wr(R_DRIVER_FEATURES_SEL, 0);
        self.wr(R_DRIVER_FEATURES, features as u32);
        self.wr(R_DRIVER_FEATURES_SEL, 1);
        self.wr(R_DRIVER_FEATURES, (features >> 32) as u32);
        self.wr(R_STATUS, 0xb);
        self.features = features;
        self.status()
    }

    pub fn setup_queue(&mut self, qi: u32, q: u16, desc: u64, avail: u64, used: u64) {
        self.wr(R_QUEUE_SEL, qi);
        self.wr(R_QUEUE_NUM, u32::from(q));
        self.wr(R_QUEUE_DESC_LOW, desc as u32);
        self.wr(R_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.wr(R_QUEUE_DRIVER_LOW, avail as u32);
        self.wr(R_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.wr(R_QUEUE_DEVICE_LOW, used as u32);
        self.wr(R_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.wr(R_QUEUE_READY, 1);
        self.q = q;
        self.desc = desc;
        self.avail = avail;
        self.used = used;
        self.avail_idx = 0;
        self.next_desc = 0;
        self.used_seen = 0;
    }

    /// Normal init: negotiate VERSION_1 | extra, queue 0 of `q` at the usual places, DRIVER_OK.
    pub fn init(&mut self, extra: u64, q: u16) {
        let s = self.negotiate(f::VERSION_1 | extra);
        assert_eq!(s & 8, 8, "FEATURES_OK refused");
        self.setup_queue(0, q, DESC, AVAIL, USED);
        self.wr(R_STATUS, 0xf);
        assert_eq!(self.status(), 0xf);
    }

    pub fn write_desc_at(&self, table: u64, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + u64::from(idx) * 16;
        self.mem.write_u64(at, addr).unwrap();
        self.mem.write_u32(at + 8, len).unwrap();
        self.mem.write_u16(at + 12, flags).unwrap();
        self.mem.write_u16(at + 14, next).unwrap();
    }

    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_at(self.desc, idx, addr, len, flags, next)
    }

    /// Writes a chain of (addr, len, writable) into consecutive descriptors; returns the head.
    pub fn chain(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        let n = parts.len() as u16;
        for (i, &(addr, len, w)) in parts.iter().enumerate() {
            let idx = (head + i as u16) % self.q;
            let last = i as u16 == n - 1;
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            self.write_desc(idx, addr, len, flags, (idx + 1) % self.q);
        }
        self.next_desc = (head + n) % self.q;
        head
    }

    /// Puts `head` in the next avail slot (without bumping avail.idx).
    pub fn put(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.q);
        self.mem.write_u16(self.avail + 4 + 2 * slot, head).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    pub fn publish(&self) {
        self.mem.write_u16(self.avail + 2, self.avail_idx).unwrap();
    }

    pub fn kick(&self) {
        self.wr(R_QUEUE_NOTIFY, 0);
    }

    pub fn submit(&mut self, head: u16) {
        self.put(head);
        self.publish();
        self.kick();
    }

    pub fn header(&self, slot: u64, rtype: u32, sector: u64) -> u64 {
        let at = HDR + slot * 16;
        self.mem.write_u32(at, rtype).unwrap();
        self.mem.write_u32(at + 4, 0).unwrap();
        self.mem.write_u64(at + 8, sector).unwrap();
        at
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_u16(self.used + 2).unwrap()
    }

    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.q);
        (
            self.mem.read_u32(at).unwrap(),
            self.mem.read_u32(at + 4).unwrap(),
        )
    }

    /// Waits until used.idx == `target`; panics after 10 s.
    pub fn wait_used(&self, target: u16) {
        let t0 = Instant::now();
        while self.used_idx() != target {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "used.idx stuck at {} (want {target})",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Waits until every popped request completed.
    pub fn drain(&self) {
        self.dev.drain(Some(Duration::from_secs(10))).unwrap();
    }

    /// A read request in slot `slot` (header, data, status as three descriptors).
    pub fn read_chain(&mut self, slot: u64, sector: u64, data: u64, len: u32) -> u16 {
        let h = self.header(slot, T_IN, sector);
        self.mem.write(STATUS + slot, &[0xff]).unwrap();
        self.chain(&[(h, 16, false), (data, len, true), (STATUS + slot, 1, true)])
    }

    pub fn write_chain(&mut self, slot: u64, sector: u64, data: u64, len: u32) -> u16 {
        let h = self.header(slot, T_OUT, sector);
        self.mem.write(STATUS + slot, &[0xff]).unwrap();
        self.chain(&[(h, 16, false), (data, len, false), (STATUS + slot, 1, true)])
    }

    pub fn status_byte(&self, slot: u64) -> u8 {
        self.mem.read_u8(STATUS + slot).unwrap()
    }

    /// One request submitted and waited for: (status, used len).
    pub fn one(&mut self, head: u16, slot: u64) -> (u8, u32) {
        let target = self.used_idx().wrapping_add(1);
        self.submit(head);
        self.wait_used(target);
        let (_, len) = self.used_elem(target.wrapping_sub(1));
        (self.status_byte(slot), len)
    }

    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let h = self.read_chain(0, sector, DATA, len);
        let (s, _) = self.one(h, 0);
        let mut buf = vec![0u8; len as usize];
        self.mem.read(DATA, &mut buf).unwrap();
        (s, buf)
    }

    pub fn is_broken(&self) -> bool {
        self.status() & 0x40 != 0
    }

    pub fn isr(&self) -> u32 {
        self.rd(R_INTERRUPT_STATUS)
    }

    pub fn ack(&self, bits: u32) {
        self.wr(R_INTERRUPT_ACK, bits);
    }

    /// Asserts the device went NEEDS_RESET with a config interrupt, then that a reset and a
    /// normal init bring it back.
    pub fn assert_fatal_and_recover(&mut self, used_before: u16) {
        assert!(
            self.is_broken(),
            "expected NEEDS_RESET, status {:#x}",
            self.status()
        );
        assert_ne!(self.isr() & 2, 0, "config interrupt on NEEDS_RESET");
        assert_eq!(
            self.used_idx(),
            used_before,
            "no used entries after a fatal error"
        );
        assert!(self.dev.needs_reset_reason().is_some());
        // Later notifies are ignored.
        self.kick();
        assert_eq!(self.used_idx(), used_before);
        self.drain();
        let features = self.features;
        self.mem.with_slice_mut(0, 0x40000, |b| b.fill(0)).unwrap();
        self.init(features & !f::VERSION_1, 256);
        assert!(!self.is_broken());
        let (s, data) = self.read(8, 4096);
        assert_eq!(s, 0);
        assert_eq!(data, image(16384)[4096..8192].to_vec());
    }
}

/// A pattern node behind a fault injector (stall/release, latency, failures).
pub fn fault_node(sectors: u64, rules: Arc<blockemu_core::block::FaultRules>) -> Arc<BlockNode> {
    let mut data = image(sectors * 512);
    data[..512].fill(0);
    let node = memory_node(sectors * 512, false, move |b| {
        b.write_at(&data, 0).unwrap();
        Arc::new(blockemu_core::block::FaultInjector::new(b, rules))
    })
    .unwrap();
    Arc::new(node)
}
