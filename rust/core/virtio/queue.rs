//! One split virtqueue: the driver-visible registers plus the device's own indices.
//!
//! The device's indices (`next_avail`, `next_used`) are authoritative: the driver scribbling
//! on `used.idx` changes nothing here (§6 row 26). All ring accesses go through
//! [`GuestMemory`]'s bounds-checked copies, and the areas are validated when the queue goes
//! live, so an access failing later means the guest memory is gone — reported as an error.

use std::sync::atomic::{fence, Ordering};

use crate::guest_memory::GuestMemory;

pub const DESC_SIZE: u64 = 16;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// `need_event` of the virtio spec: true when `event` lies in `[old, new)` modulo 2^16, i.e.
/// the index the driver asked to be told about was crossed moving from `old` to `new`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[derive(Debug, Clone)]
pub struct SplitQueue {
    /// QueueSizeMax (0 would mean "no such queue"; we never expose one).
    pub max_size: u16,
    /// QueueSize as the driver wrote it (validated when the queue goes live).
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    /// EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// used.idx at the last notification decision (EVENT_IDX's "old").
    pub signalled_used: u16,
}

impl SplitQueue {
    pub fn new(max_size: u16) -> Self {
        SplitQueue {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
            signalled_used: 0,
        }
    }

    /// Back to the state after reset (QueueReset or device reset).
    pub fn reset(&mut self) {
        *self = SplitQueue::new(self.max_size);
    }

    /// Q, valid only after [`validate`](Self::validate) succeeded.
    pub fn q(&self) -> u16 {
        self.size as u16
    }

    /// Checks size and ring areas before the queue is used (§6 rows 24/25): Q a power of two
    /// in 1..=max, descriptor table 16-aligned, avail 2-aligned, used 4-aligned, all three
    /// inside guest memory.
    pub fn validate(&self, mem: &GuestMemory) -> std::result::Result<(), String> {
        let q = self.size;
        if q == 0 || !q.is_power_of_two() || q > u32::from(self.max_size) {
            return Err(format!(
                "queue size {q} is not a power of two in 1..={}",
                self.max_size
            ));
        }
        let q = u64::from(q);
        let areas = [
            ("descriptor table", self.desc, 16, 16 * q),
            ("available ring", self.avail, 2, 6 + 2 * q),
            ("used ring", self.used, 4, 6 + 8 * q),
        ];
        for (name, addr, align, len) in areas {
            if addr % align != 0 {
                return Err(format!("{name} at {addr:#x} is not {align}-byte aligned"));
            }
            if mem.check(addr, len as usize).is_err() {
                return Err(format!(
                    "{name} at {addr:#x} ({len} bytes) is outside guest memory"
                ));
            }
        }
        Ok(())
    }

    /// avail.idx, read with acquire ordering: ring slots and descriptors are read after it.
    pub fn avail_idx(&self, mem: &GuestMemory) -> crate::Result<u16> {
        let idx = mem.read_u16(self.avail + 2)?;
        fence(Ordering::Acquire);
        Ok(idx)
    }

    pub fn avail_flags(&self, mem: &GuestMemory) -> crate::Result<u16> {
        mem.read_u16(self.avail)
    }

    /// The head in avail ring slot `idx mod Q`.
    pub fn avail_ring(&self, mem: &GuestMemory, idx: u16) -> crate::Result<u16> {
        let slot = u64::from(idx % self.q());
        mem.read_u16(self.avail + 4 + 2 * slot)
    }

    pub fn used_event(&self, mem: &GuestMemory) -> crate::Result<u16> {
        mem.read_u16(self.avail + 4 + 2 * u64::from(self.q()))
    }

    /// Publishes avail_event = next_avail ("kick me when you add the next one").
    pub fn publish_avail_event(&self, mem: &GuestMemory) -> crate::Result<()> {
        mem.write_u16(self.used + 4 + 8 * u64::from(self.q()), self.next_avail)
    }

    /// Writes the used element, then (release) the new used.idx.
    pub fn add_used(&mut self, mem: &GuestMemory, id: u16, len: u32) -> crate::Result<()> {
        let slot = u64::from(self.next_used % self.q());
        let at = self.used + 4 + 8 * slot;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(id).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(at, &elem)?;
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        mem.write_u16(self.used + 2, self.next_used)
    }

    /// Whether the driver wants a used-buffer notification now (taken after each publish).
    /// Without EVENT_IDX: unless avail.flags has NO_INTERRUPT. With EVENT_IDX: if used_event
    /// was crossed since the last decision.
    pub fn should_notify(&mut self, mem: &GuestMemory) -> crate::Result<bool> {
        fence(Ordering::SeqCst);
        if !self.event_idx {
            return Ok(self.avail_flags(mem)? & AVAIL_F_NO_INTERRUPT == 0);
        }
        let old = self.signalled_used;
        let new = self.next_used;
        self.signalled_used = new;
        Ok(need_event(self.used_event(mem)?, new, old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_is_the_spec_inequality() {
        // Crossing: old=9 → new=10 crosses event 9.
        assert!(need_event(9, 10, 9));
        assert!(!need_event(9, 9, 8));
        assert!(!need_event(20, 20, 16));
        assert!(need_event(20, 21, 16));
        // Across the wrap: event 65534, old 65530 → new 4 crosses it.
        assert!(need_event(65534, 4, 65530));
        assert!(!need_event(65534, 65533, 65530));
        // The spec's example: used_event = 0 notifies after the first buffer (0 → 1) ...
        assert!(need_event(0, 1, 0));
        // ... and, one buffer at a time, next when the index goes 0 → 1 again, i.e. after the
        // 65 537th buffer (the prose says 65 536th; the formula is normative).
        let mut old = 1u16;
        let mut count = 1u32;
        let mut next_at = None;
        for _ in 0..70_000u32 {
            let new = old.wrapping_add(1);
            count += 1;
            if need_event(0, new, old) {
                next_at = Some(count);
                break;
            }
            old = new;
        }
        assert_eq!(next_at, Some(65_537));
        // A batch that moves 0 → 16 crosses 0..15.
        assert!(need_event(0, 16, 0));
        assert!(need_event(15, 16, 0));
        assert!(!need_event(16, 16, 0));
    }

    #[test]
    fn validate_checks_size_alignment_and_bounds() {
        let mem = GuestMemory::new(0x10000).unwrap();
        let mut q = SplitQueue::new(256);
        q.size = 256;
        q.desc = 0x1000;
        q.avail = 0x2000;
        q.used = 0x3000;
        assert!(q.validate(&mem).is_ok());
        for bad in [0, 3, 512, 100] {
            let mut b = q.clone();
            b.size = bad;
            assert!(b.validate(&mem).is_err(), "size {bad}");
        }
        let mut b = q.clone();
        b.desc = 0x1008;
        assert!(b.validate(&mem).is_err());
        let mut b = q.clone();
        b.avail = 0x2001;
        assert!(b.validate(&mem).is_err());
        let mut b = q.clone();
        b.used = 0x3002;
        assert!(b.validate(&mem).is_err());
        let mut b = q.clone();
        b.used = 0xfff0;
        assert!(b.validate(&mem).is_err());
        let mut b = q;
        b.desc = u64::MAX - 15;
        assert!(b.validate(&mem).is_err());
    }
}
