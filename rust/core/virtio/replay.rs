//! Fuzz bytes → a guest program against a virtio-blk device, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/virtqueue.rs`), the corpus replay test and the seeded smoke loop
//! (`tests/virtio_fuzz_corpus.rs`).
//!
//! What is checked: nothing panics; every register access returns; every notify's work
//! drains within 30 s; guest memory changes only inside the used ring and inside buffers
//! that descriptors in the table (or in an indirect table it points to) marked device-
//! writable at the time of the notify (the canary); and at the end a reset and a normal init
//! bring the device back to a working read.
//!
//! Layout: 64 KiB of guest memory, descriptor table at 0, avail ring at 0x1000, used ring at
//! 0x2000, buffers from 0x3000. Input: one setup byte (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC,
//! bits 2-3 Q from {4, 16, 64, 256}, bit 4 skip the initial init), then 8-byte operations
//! (kind, then 7 argument bytes).

use std::sync::Arc;
use std::time::Duration;

use super::features as f;
use super::mmio::*;
use super::{VirtioBlk, VirtioBlkConfig};
use crate::block::{memory_node, FaultInjector, FaultRules, OpKind};
use crate::guest_memory::GuestMemory;

const MEM: usize = 0x10000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const USED_MAX: u64 = 6 + 8 * 256;
const BUF: u64 = 0x3000;
const SECTORS: u64 = 64;
const DRAIN: Option<Duration> = Some(Duration::from_secs(30));

struct Guest {
    dev: VirtioBlk,
    mem: Arc<GuestMemory>,
    q: u16,
    features: u64,
    avail_idx: u16,
    /// Guest memory as the driver left it after the last check.
    shadow: Vec<u8>,
    /// Ranges the device may have written since the last check.
    allowed: Vec<(u64, u64)>,
}

fn arg_u16(a: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([a[i], a[i + 1]])
}

fn arg_u32(a: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// A buffer address: mostly inside the buffer area, sometimes somewhere hostile.
fn addr(sel: u8, v: u16) -> u64 {
    match sel {
        0..=239 => BUF + u64::from(v) % (MEM as u64 - BUF),
        240 => MEM as u64 - 8,
        241 => u64::MAX - 7,
        242 => AVAIL,
        243 => DESC,
        244 => USED,
        245 => MEM as u64,
        _ => u64::from(v),
    }
}

fn len(sel: u8, v: u16) -> u32 {
    match sel {
        0..=199 => u32::from(v % 0x1200),
        200..=219 => 512 * u32::from(v % 9),
        220..=239 => 16 * u32::from(v % 9),
        240 => u32::MAX,
        241 => 0,
        _ => u32::from(v),
    }
}

impl Guest {
    fn rd(&self, off: u32) -> u32 {
        self.dev.mmio_read(off, 4).unwrap_or(0)
    }

    fn wr(&self, off: u32, v: u32) {
        let _ = self.dev.mmio_write(off, v, 4);
    }

    fn init(&mut self) {
        self.wr(R_STATUS, 0);
        self.settle();
        self.wr(R_STATUS, 1);
        self.wr(R_STATUS, 3);
        self.wr(R_DRIVER_FEATURES_SEL, 0);
        self.wr(R_DRIVER_FEATURES, self.features as u32);
        self.wr(R_DRIVER_FEATURES_SEL, 1);
        self.wr(R_DRIVER_FEATURES, (self.features >> 32) as u32);
        self.wr(R_STATUS, 0xb);
        self.wr(R_QUEUE_SEL, 0);
        self.wr(R_QUEUE_NUM, u32::from(self.q));
        self.wr(R_QUEUE_DESC_LOW, DESC as u32);
        self.wr(R_QUEUE_DESC_HIGH, 0);
        self.wr(R_QUEUE_DRIVER_LOW, AVAIL as u32);
        self.wr(R_QUEUE_DRIVER_HIGH, 0);
        self.wr(R_QUEUE_DEVICE_LOW, USED as u32);
        self.wr(R_QUEUE_DEVICE_HIGH, 0);
        self.wr(R_QUEUE_READY, 1);
        self.wr(R_STATUS, 0xf);
        self.avail_idx = 0;
        self.mem.write_u16(AVAIL + 2, 0).unwrap();
        self.sync();
    }

    /// Waits for the device to finish what it popped (a hang is a finding).
    fn settle(&mut self) {
        if self.dev.drain(DRAIN).is_err() {
            panic!("virtio-blk did not drain within 30 s");
        }
        self.check();
    }

    fn allow(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(MEM as u64);
        if start < end {
            self.allowed.push((start, end));
        }
    }

    /// Records what the device may write for the chains visible now.
    fn allow_visible(&mut self) {
        self.allow(USED, USED_MAX);
        let mut table = [0u8; 4096];
        self.mem.read(DESC, &mut table).unwrap();
        for raw in table.chunks_exact(16) {
            let (a, l, fl) = desc(raw.try_into().expect("16 bytes"));
            if fl & 4 != 0 {
                let n = (u64::from(l) / 16).min(4096);
                for j in 0..n {
                    let Some(at) = a.checked_add(16 * j) else {
                        break;
                    };
                    let mut e = [0u8; 16];
                    if self.mem.read(at, &mut e).is_err() {
                        break;
                    }
                    let (a2, l2, f2) = desc(&e);
                    if f2 & 2 != 0 {
                        self.allow(a2, u64::from(l2));
                    }
                }
            } else if fl & 2 != 0 {
                self.allow(a, u64::from(l));
            }
        }
    }

    /// The canary: every byte that changed since the last sync was allowed.
    fn check(&mut self) {
        let mut now = vec![0u8; MEM];
        self.mem.read(0, &mut now).unwrap();
        // Compare in 64-byte blocks first (memcmp); a bitmap of the allowed ranges is built
        // only when something changed.
        let mut map: Option<Vec<bool>> = None;
        for (blk, (a, b)) in now.chunks(64).zip(self.shadow.chunks(64)).enumerate() {
            if a == b {
                continue;
            }
            let map = map.get_or_insert_with(|| {
                let mut m = vec![false; MEM];
                for &(s, e) in &self.allowed {
                    m[s as usize..e as usize].fill(true);
                }
                m
            });
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                let i = blk * 64 + j;
                if x != y && !map[i] {
                    panic!("guest memory at {i:#x} changed outside every device-writable buffer");
                }
            }
        }
        self.shadow = now;
        self.allowed.clear();
    }

    fn sync(&mut self) {
        self.mem.read(0, &mut self.shadow).unwrap();
        self.allowed.clear();
    }

    fn write(&mut self, at: u64, data: &[u8]) {
        if self.mem.write(at, data).is_ok() {
            self.shadow[at as usize..at as usize + data.len()].copy_from_slice(data);
        }
    }

    fn write_desc(&mut self, idx: u16, a: u64, l: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&a.to_le_bytes());
        d[8..12].copy_from_slice(&l.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(DESC + 16 * u64::from(idx % 256), &d);
    }

    fn notify(&mut self, queue: u32) {
        self.allow_visible();
        self.wr(R_QUEUE_NOTIFY, queue);
        self.settle();
    }

    fn expose(&mut self, n: u16) {
        self.avail_idx = self.avail_idx.wrapping_add(n);
        let v = self.avail_idx.to_le_bytes();
        self.write(AVAIL + 2, &v);
    }

    fn op(&mut self, kind: u8, a: &[u8]) {
        match kind % 12 {
            0 => {
                // A raw descriptor.
                let (x, l) = (addr(a[0], arg_u16(a, 1)), len(a[3], arg_u16(a, 4)));
                self.write_desc(u16::from(a[6]), x, l, u16::from(a[6] >> 5), u16::from(a[3]));
            }
            1 => {
                // An avail ring slot.
                let slot = u64::from(a[0]) % 256;
                let head = if a[1] < 240 {
                    u16::from(a[2]) % self.q.max(1)
                } else {
                    arg_u16(a, 2)
                };
                self.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
            }
            2 => {
                // Expose n and notify.
                let n = if a[0] < 250 {
                    u16::from(a[1] % 8)
                } else {
                    arg_u16(a, 1)
                };
                self.expose(n);
                self.notify(0);
            }
            3 => self.notify(u32::from(a[0] % 3)),
            4 => {
                // Raw bytes anywhere.
                let at = u64::from(arg_u16(a, 0));
                let v = [a[2], a[3], a[4], a[5]];
                let end = (at as usize + 4).min(MEM);
                let n = end - at as usize;
                self.write(at, &v[..n]);
            }
            5 => {
                // A guest register write (rings stay where init put them).
                let v = arg_u32(a, 2);
                let off = match a[0] % 12 {
                    0 => R_STATUS,
                    1 => R_DRIVER_FEATURES,
                    2 => R_DRIVER_FEATURES_SEL,
                    3 => R_QUEUE_SEL,
                    4 => R_QUEUE_READY,
                    5 => R_QUEUE_NUM,
                    6 => R_INTERRUPT_ACK,
                    7 => R_QUEUE_RESET,
                    8 => R_DEVICE_FEATURES_SEL,
                    9 => 0x100 + u32::from(a[1] % 0x40),
                    10 => 0x0d0,
                    _ => R_SHM_SEL,
                };
                let size = if off >= 0x100 {
                    1 << (a[1] >> 6).min(2)
                } else {
                    4
                };
                let v = if size == 4 {
                    v
                } else {
                    v & ((1 << (8 * size)) - 1)
                };
                let _ = self.dev.mmio_write(off, v, size);
                self.settle();
            }
            6 => {
                let off = u32::from(a[0]) * 2;
                let _ = self.dev.mmio_read(off, 1 << (a[1] % 3));
            }
            7 => self.init(),
            8 => {
                // A block request header.
                let at = BUF + 16 * u64::from(a[0] % 64);
                let t = match a[1] % 10 {
                    0 | 1 => 0,
                    2 | 3 => 1,
                    4 => 4,
                    5 => 8,
                    6 => 11,
                    7 => 13,
                    _ => u32::from(a[2]) << (a[3] % 25),
                };
                let sector = if a[4] < 240 {
                    u64::from(a[5] % 70)
                } else {
                    u64::MAX - u64::from(a[5])
                };
                let mut h = [0u8; 16];
                h[..4].copy_from_slice(&t.to_le_bytes());
                h[8..].copy_from_slice(&sector.to_le_bytes());
                self.write(at, &h);
            }
            9 => {
                // A well-formed chain: header, data, status at `first` (direct or indirect).
                let first = u16::from(a[0]);
                let hdr = BUF + 16 * u64::from(a[1] % 64);
                let data = 0x8000 + 512 * u64::from(a[2] % 32);
                let dlen = 512 * u32::from(a[3] % 9);
                let write = a[4] & 1 != 0;
                let status = 0x4000 + u64::from(a[5]);
                if a[6] & 1 != 0 && self.features & f::INDIRECT_DESC != 0 {
                    let table = 0x5000 + 48 * u64::from(a[6] >> 1 & 0x3f);
                    let dflags = if write { 1 } else { 3 };
                    for (i, (x, l, fl)) in [(hdr, 16, 1), (data, dlen, dflags), (status, 1, 2)]
                        .into_iter()
                        .enumerate()
                    {
                        let mut e = [0u8; 16];
                        e[..8].copy_from_slice(&x.to_le_bytes());
                        e[8..12].copy_from_slice(&l.to_le_bytes());
                        e[12..14].copy_from_slice(&(fl as u16).to_le_bytes());
                        e[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
                        self.write(table + 16 * i as u64, &e);
                    }
                    self.write_desc(first, table, 48, 4, 0);
                } else {
                    let q = self.q.max(1);
                    let (i0, i1, i2) = (first % q, (first + 1) % q, (first + 2) % q);
                    self.write_desc(i0, hdr, 16, 1, i1);
                    self.write_desc(i1, data, dlen, if write { 1 } else { 3 }, i2);
                    self.write_desc(i2, status, 1, 2, 0);
                }
                let slot = u64::from(self.avail_idx % self.q.max(1));
                let head = first % self.q.max(1);
                self.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
                self.expose(1);
                if a[5] & 1 == 0 {
                    self.notify(0);
                }
            }
            10 => {
                // avail.flags / used_event.
                let v = arg_u16(a, 1);
                if a[0] & 1 == 0 {
                    self.write(AVAIL, &v.to_le_bytes());
                } else {
                    let at = AVAIL + 4 + 2 * u64::from(self.q);
                    self.write(at, &v.to_le_bytes());
                }
            }
            _ => {
                // Lifecycle.
                match a[0] % 3 {
                    0 => {
                        let _ = self.dev.stop();
                    }
                    1 => {
                        self.allow_visible();
                        self.dev.start();
                    }
                    _ => {
                        let _ = self.dev.wait_irq(Some(Duration::ZERO));
                    }
                }
                self.settle();
            }
        }
    }
}

fn desc(d: &[u8; 16]) -> (u64, u32, u16) {
    (
        u64::from_le_bytes(d[..8].try_into().expect("8")),
        u32::from_le_bytes(d[8..12].try_into().expect("4")),
        u16::from_le_bytes(d[12..14].try_into().expect("2")),
    )
}

/// Plays one fuzz input (see the module docs) and checks the device afterwards.
pub fn replay(data: &[u8]) {
    let Some((&setup, ops)) = data.split_first() else {
        return;
    };
    let rules = Arc::new(FaultRules::new());
    rules
        .fail_range(50 * 512, 512, Some(OpKind::Read), libc::EIO)
        .expect("valid rule");
    let r = rules.clone();
    let node = Arc::new(
        memory_node(SECTORS * 512, false, move |b| {
            Arc::new(FaultInjector::new(b, r))
        })
        .expect("small memory node"),
    );
    let mem = Arc::new(GuestMemory::new(MEM).expect("64 KiB"));
    let dev = VirtioBlk::new(
        node.clone(),
        mem.clone(),
        VirtioBlkConfig {
            queue_size: 256,
            serial: Some("FUZZ".into()),
            ..VirtioBlkConfig::default()
        },
    )
    .expect("device");
    let mut features = f::VERSION_1 | f::BLK_FLUSH | f::BLK_DISCARD | f::BLK_WRITE_ZEROES;
    if setup & 1 != 0 {
        features |= f::EVENT_IDX;
    }
    if setup & 2 != 0 {
        features |= f::INDIRECT_DESC;
    }
    let q = [4u16, 16, 64, 256][usize::from(setup >> 2 & 3)];
    let mut g = Guest {
        dev,
        mem,
        q,
        features,
        avail_idx: 0,
        shadow: vec![0u8; MEM],
        allowed: Vec::new(),
    };
    if setup & 16 == 0 {
        g.init();
    }
    for op in ops.chunks(8).take(4096) {
        let mut a = [0u8; 8];
        a[..op.len()].copy_from_slice(op);
        g.op(a[0], &a[1..]);
    }
    // A reset, a normal init and one read must work whatever happened before.
    g.allow_visible();
    g.dev.start();
    g.init();
    let mut status = g.rd(R_STATUS);
    let t0 = std::time::Instant::now();
    while status != 0xf && t0.elapsed() < Duration::from_secs(30) {
        g.init();
        status = g.rd(R_STATUS);
    }
    assert_eq!(status, 0xf, "device did not come back after reset + init");
    let hdr = BUF;
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&1u64.to_le_bytes());
    g.write(hdr, &h);
    g.write(0x4000, &[0xff]);
    g.write_desc(0, hdr, 16, 1, 1);
    g.write_desc(1, 0x8000, 512, 3, 2);
    g.write_desc(2, 0x4000, 1, 2, 0);
    g.write(AVAIL + 4, &0u16.to_le_bytes());
    g.write(AVAIL, &0u16.to_le_bytes());
    g.expose(1);
    g.notify(0);
    assert_eq!(
        g.mem.read_u16(USED + 2).unwrap(),
        1,
        "the final read completed"
    );
    assert_eq!(
        g.mem.read_u8(0x4000).unwrap(),
        0,
        "the final read succeeded"
    );
    let mut want = [0u8; 512];
    node.read(512, &mut want).expect("node read");
    let mut got = [0u8; 512];
    g.mem.read(0x8000, &mut got).unwrap();
    assert_eq!(got, want);
}
