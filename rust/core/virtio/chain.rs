//! Walking one descriptor chain: direct descriptors, at most one indirect table, one hop
//! budget of Q buffer descriptors for the whole chain. Every descriptor is read exactly once into a local copy
//! (no double fetch, §6 row 27); the result holds guest ranges only, never guest data.
//!
//! Any structural error is one of the §6 fatal classes ([`ChainError`]): the caller marks the
//! device NEEDS_RESET. Zero-length descriptors are allowed and contribute nothing (row 13).

use std::fmt;

use crate::guest_memory::GuestMemory;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// The largest total length of a chain (the spec: "no more than 2^32 bytes").
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// One guest-memory range of a chain (already checked to lie inside guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
}

/// A validated chain: the device-readable ranges, then the device-writable ones, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    pub readable_len: u64,
    pub writable_len: u64,
}

/// Why a chain is rejected (each a fatal row of §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainError {
    /// Row 3: `next` beyond the table (Q, or the indirect table's entry count).
    BadNext { next: u16, entries: u64 },
    /// Row 4: more than Q descriptors (a loop, or just too long).
    TooLong { budget: u16 },
    /// Row 5: a buffer outside guest memory.
    OutOfMemory { addr: u64, len: u32 },
    /// Row 6: `addr + len` overflows.
    Overflow { addr: u64, len: u32 },
    /// Row 7: more than 2^32 - 1 bytes in total.
    TotalTooLarge,
    /// Row 8: INDIRECT inside an indirect table.
    NestedIndirect,
    /// Row 9: indirect table length 0 or not a multiple of 16.
    IndirectLength { len: u32 },
    /// Row 9 (variant): INDIRECT together with NEXT.
    IndirectWithNext,
    /// Row 10: indirect table outside guest memory.
    IndirectOutOfMemory { addr: u64, len: u32 },
    /// Row 11: INDIRECT without the feature.
    IndirectNotNegotiated,
    /// Row 12: a readable descriptor after a writable one.
    ReadableAfterWritable,
    /// The descriptor table itself could not be read (cannot happen after validation).
    TableUnreadable { addr: u64 },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::BadNext { next, entries } => {
                write!(
                    f,
                    "descriptor next {next} is beyond the table ({entries} entries)"
                )
            }
            ChainError::TooLong { budget } => {
                write!(
                    f,
                    "descriptor chain longer than the queue size {budget} (loop?)"
                )
            }
            ChainError::OutOfMemory { addr, len } => {
                write!(
                    f,
                    "descriptor buffer {addr:#x}+{len} is outside guest memory"
                )
            }
            ChainError::Overflow { addr, len } => {
                write!(
                    f,
                    "descriptor buffer {addr:#x}+{len} overflows the address space"
                )
            }
            ChainError::TotalTooLarge => write!(f, "descriptor chain longer than 2^32 bytes"),
            ChainError::NestedIndirect => write!(f, "INDIRECT descriptor inside an indirect table"),
            ChainError::IndirectLength { len } => {
                write!(
                    f,
                    "indirect table length {len} is not a non-zero multiple of 16"
                )
            }
            ChainError::IndirectWithNext => write!(f, "INDIRECT descriptor with NEXT set"),
            ChainError::IndirectOutOfMemory { addr, len } => {
                write!(f, "indirect table {addr:#x}+{len} is outside guest memory")
            }
            ChainError::IndirectNotNegotiated => {
                write!(
                    f,
                    "INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated"
                )
            }
            ChainError::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a device-writable one")
            }
            ChainError::TableUnreadable { addr } => {
                write!(f, "descriptor at {addr:#x} is outside guest memory")
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemory, at: u64) -> Result<Desc, ChainError> {
    let mut raw = [0u8; 16];
    mem.read(at, &mut raw)
        .map_err(|_| ChainError::TableUnreadable { addr: at })?;
    Ok(Desc {
        addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
        len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
        flags: u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes")),
        next: u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes")),
    })
}

/// Walks the chain starting at `head` (< `q`) of the descriptor table at `table`.
pub fn walk(
    mem: &GuestMemory,
    table: u64,
    q: u16,
    head: u16,
    indirect_ok: bool,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    walk_into(mem, table, q, head, indirect_ok, &mut chain)?;
    Ok(chain)
}

/// [`walk`] into a reused `Chain` (its vectors keep their capacity).
pub fn walk_into(
    mem: &GuestMemory,
    table: u64,
    q: u16,
    head: u16,
    indirect_ok: bool,
    chain: &mut Chain,
) -> Result<(), ChainError> {
    chain.head = head;
    chain.readable.clear();
    chain.writable.clear();
    chain.readable_len = 0;
    chain.writable_len = 0;
    // Where we read descriptors from: the queue's table, or (after one hop) an indirect one.
    let mut base = table;
    let mut entries = u64::from(q);
    let mut in_indirect = false;
    let mut index = head;
    if u64::from(index) >= entries {
        return Err(ChainError::BadNext {
            next: index,
            entries,
        });
    }
    let mut hops: u32 = 0;
    let mut seen_writable = false;
    let mut total: u64 = 0;
    loop {
        let d = read_desc(mem, base + u64::from(index) * 16)?;
        if d.flags & F_INDIRECT == 0 {
            // Buffer descriptors, direct and indirect together, count toward one budget of
            // Q; the one INDIRECT pointer does not (so Q + 1 reads at most).
            hops += 1;
            if hops > u32::from(q) {
                return Err(ChainError::TooLong { budget: q });
            }
        }
        if d.flags & F_INDIRECT != 0 {
            if !indirect_ok {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(ChainError::NestedIndirect);
            }
            if d.flags & F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            if d.len == 0 || d.len % 16 != 0 {
                return Err(ChainError::IndirectLength { len: d.len });
            }
            if mem.check(d.addr, d.len as usize).is_err() {
                return Err(ChainError::IndirectOutOfMemory {
                    addr: d.addr,
                    len: d.len,
                });
            }
            base = d.addr;
            entries = u64::from(d.len / 16);
            in_indirect = true;
            index = 0;
            continue;
        }
        if d.len > 0 {
            let end = d
                .addr
                .checked_add(u64::from(d.len))
                .ok_or(ChainError::Overflow {
                    addr: d.addr,
                    len: d.len,
                })?;
            if end > mem.len() as u64 {
                return Err(ChainError::OutOfMemory {
                    addr: d.addr,
                    len: d.len,
                });
            }
            total += u64::from(d.len);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TotalTooLarge);
            }
        }
        let seg = Seg {
            addr: d.addr,
            len: d.len,
        };
        if d.flags & F_WRITE != 0 {
            seen_writable = true;
            if d.len > 0 {
                chain.writable.push(seg);
                chain.writable_len += u64::from(d.len);
            }
        } else {
            // A zero-length readable descriptor after a writable one is still out of order.
            if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            if d.len > 0 {
                chain.readable.push(seg);
                chain.readable_len += u64::from(d.len);
            }
        }
        if d.flags & F_NEXT == 0 {
            return Ok(());
        }
        if u64::from(d.next) >= entries {
            return Err(ChainError::BadNext {
                next: d.next,
                entries,
            });
        }
        index = d.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        mem.write_u64(at, addr).unwrap();
        mem.write_u32(at + 8, len).unwrap();
        mem.write_u16(at + 12, flags).unwrap();
        mem.write_u16(at + 14, next).unwrap();
    }

    #[test]
    fn walks_direct_and_indirect_and_names_each_error() {
        let mem = GuestMemory::new(0x10000).unwrap();
        // 0: readable 16, 1: zero-length writable, 2: INDIRECT -> [writable 512, writable 1]
        desc(&mem, 0, 0, 0x4000, 16, F_NEXT, 1);
        desc(&mem, 0, 1, 0, 0, F_NEXT | F_WRITE, 2);
        desc(&mem, 0, 2, 0x3000, 32, F_INDIRECT, 0);
        desc(&mem, 0x3000, 0, 0x5000, 512, F_WRITE | F_NEXT, 1);
        desc(&mem, 0x3000, 1, 0x6000, 1, F_WRITE, 0);
        let c = walk(&mem, 0, 4, 0, true).unwrap();
        assert_eq!(
            c.readable,
            vec![Seg {
                addr: 0x4000,
                len: 16
            }]
        );
        assert_eq!(c.writable_len, 513);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(
            walk(&mem, 0, 4, 0, false),
            Err(ChainError::IndirectNotNegotiated)
        );
        assert!(matches!(
            walk(&mem, 0, 4, 4, true),
            Err(ChainError::BadNext { .. })
        ));
        // A loop within the budget Q = 4.
        desc(&mem, 0, 3, 0x4000, 16, F_NEXT, 3);
        assert_eq!(
            walk(&mem, 0, 4, 3, true),
            Err(ChainError::TooLong { budget: 4 })
        );
        desc(&mem, 0, 3, 0xfff0, 0x20, 0, 0);
        assert!(matches!(
            walk(&mem, 0, 4, 3, true),
            Err(ChainError::OutOfMemory { .. })
        ));
        desc(&mem, 0, 3, u64::MAX, 2, 0, 0);
        assert!(matches!(
            walk(&mem, 0, 4, 3, true),
            Err(ChainError::Overflow { .. })
        ));
        desc(&mem, 0, 3, 0x3000, 24, F_INDIRECT, 0);
        assert_eq!(
            walk(&mem, 0, 4, 3, true),
            Err(ChainError::IndirectLength { len: 24 })
        );
        desc(&mem, 0, 3, 0x3000, 32, F_INDIRECT | F_NEXT, 0);
        assert_eq!(walk(&mem, 0, 4, 3, true), Err(ChainError::IndirectWithNext));
        desc(&mem, 0, 3, 0xfff0, 32, F_INDIRECT, 0);
        assert!(matches!(
            walk(&mem, 0, 4, 3, true),
            Err(ChainError::IndirectOutOfMemory { .. })
        ));
        desc(&mem, 0x3000, 0, 0x3000, 32, F_INDIRECT, 0);
        desc(&mem, 0, 3, 0x3000, 32, F_INDIRECT, 0);
        assert_eq!(walk(&mem, 0, 4, 3, true), Err(ChainError::NestedIndirect));
        desc(&mem, 0, 0, 0x5000, 1, F_WRITE | F_NEXT, 1);
        desc(&mem, 0, 1, 0x4000, 0, 0, 0);
        assert_eq!(
            walk(&mem, 0, 4, 0, true),
            Err(ChainError::ReadableAfterWritable)
        );
    }
}
