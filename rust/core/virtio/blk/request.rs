//! A virtio-blk request, parsed from a validated chain (§3).
//!
//! The readable bytes, in chain order, are the 16-byte header then data-out; the writable
//! bytes are data-in then the status byte (the very last writable byte): any split into
//! descriptors is accepted ("any layout"). Parsing reads only the header and, for discard
//! and write-zeroes, the 16-byte segment; everything is decided here so that only requests
//! that will touch storage go to a worker.

use crate::guest_memory::GuestMemory;
use crate::SECTOR_SIZE;

use super::super::chain::{Chain, Seg};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const HEADER_LEN: u64 = 16;
pub const ID_LEN: usize = 20;
/// max_discard_sectors / max_write_zeroes_sectors, as QEMU reports them.
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 0x3f_ffff;

/// What the device knows when it parses a request.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Capacity in bytes (the node's current size).
    pub capacity: u64,
    pub readonly: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// The work a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Read `len` bytes at byte `offset` into `segs`.
    Read {
        offset: u64,
        segs: Vec<Seg>,
        len: u64,
    },
    /// Write `len` bytes from `segs` at byte `offset`.
    Write {
        offset: u64,
        segs: Vec<Seg>,
        len: u64,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// No room for a status, or a header under 16 bytes: used length 0, nothing written.
    Drop,
    /// Completes without storage: status (and with `get_id` the 20 serial bytes) written now.
    Done {
        status_addr: u64,
        status: u8,
        get_id: bool,
    },
    /// Needs the backend.
    Io { status_addr: u64, work: Work },
}

/// Copies `n` bytes from the start of a readable stream (`segs`) skipping `skip` bytes.
fn gather(mem: &GuestMemory, segs: &[Seg], skip: u64, out: &mut [u8]) -> bool {
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = ((len - skip) as usize).min(out.len() - done);
        if mem
            .read(s.addr + skip, &mut out[done..done + take])
            .is_err()
        {
            return false;
        }
        done += take;
        skip = 0;
    }
    done == out.len()
}

/// The ranges of `segs` after the first `skip` bytes, limited to `len` bytes.
fn sub_range(segs: &[Seg], skip: u64, len: u64) -> Vec<Seg> {
    let mut out = Vec::with_capacity(segs.len());
    let mut skip = skip;
    let mut left = len;
    for s in segs {
        if left == 0 {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let take = (slen - skip).min(left);
        out.push(Seg {
            addr: s.addr + skip,
            len: take as u32,
        });
        left -= take;
        skip = 0;
    }
    out
}

/// Byte range of `sectors` at `sector`, when inside `capacity` (checked arithmetic).
fn byte_range(sector: u64, bytes: u64, capacity: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= capacity).then_some(offset)
}

/// Parses the request carried by `chain`.
pub fn parse(mem: &GuestMemory, chain: &Chain, ctx: &Context) -> Parsed {
    if chain.readable_len < HEADER_LEN || chain.writable_len == 0 {
        return Parsed::Drop;
    }
    let last = chain.writable.last().expect("writable_len > 0");
    let status_addr = last.addr + u64::from(last.len) - 1;
    let mut hdr = [0u8; 16];
    if !gather(mem, &chain.readable, 0, &mut hdr) {
        return Parsed::Drop;
    }
    let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8"));
    let data_in = chain.writable_len - 1;
    let data_out = chain.readable_len - HEADER_LEN;
    let done = |status| Parsed::Done {
        status_addr,
        status,
        get_id: false,
    };
    match rtype {
        T_IN => {
            if data_in % SECTOR_SIZE != 0 {
                return done(S_IOERR);
            }
            let Some(offset) = byte_range(sector, data_in, ctx.capacity) else {
                return done(S_IOERR);
            };
            let segs = sub_range(&chain.writable, 0, data_in);
            Parsed::Io {
                status_addr,
                work: Work::Read {
                    offset,
                    segs,
                    len: data_in,
                },
            }
        }
        T_OUT => {
            if data_out % SECTOR_SIZE != 0 {
                return done(S_IOERR);
            }
            let Some(offset) = byte_range(sector, data_out, ctx.capacity) else {
                return done(S_IOERR);
            };
            if ctx.readonly {
                return done(S_IOERR);
            }
            let segs = sub_range(&chain.readable, HEADER_LEN, data_out);
            Parsed::Io {
                status_addr,
                work: Work::Write {
                    offset,
                    segs,
                    len: data_out,
                },
            }
        }
        T_FLUSH => Parsed::Io {
            status_addr,
            work: Work::Flush,
        },
        T_GET_ID => {
            if data_in < ID_LEN as u64 {
                return done(S_IOERR);
            }
            Parsed::Done {
                status_addr,
                status: S_OK,
                get_id: true,
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = rtype == T_DISCARD;
            if (discard && !ctx.discard) || (!discard && !ctx.write_zeroes) {
                return done(S_UNSUPP);
            }
            // One segment at most (max_*_seg = 1), as QEMU: more data is UNSUPP.
            if data_out > 16 {
                return done(S_UNSUPP);
            }
            if data_out < 16 {
                return done(S_IOERR);
            }
            let mut seg = [0u8; 16];
            if !gather(mem, &chain.readable, HEADER_LEN, &mut seg) {
                return done(S_IOERR);
            }
            let s_sector = u64::from_le_bytes(seg[0..8].try_into().expect("8"));
            let n = u32::from_le_bytes(seg[8..12].try_into().expect("4"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4"));
            if flags & !1 != 0 || (discard && flags & 1 != 0) {
                return done(S_UNSUPP);
            }
            let max = if discard {
                MAX_DISCARD_SECTORS
            } else {
                MAX_WRITE_ZEROES_SECTORS
            };
            if n > max {
                return done(S_IOERR);
            }
            let len = u64::from(n) * SECTOR_SIZE;
            let Some(offset) = byte_range(s_sector, len, ctx.capacity) else {
                return done(S_IOERR);
            };
            if ctx.readonly {
                return done(S_IOERR);
            }
            let work = if discard {
                Work::Discard { offset, len }
            } else {
                Work::WriteZeroes { offset, len }
            };
            Parsed::Io { status_addr, work }
        }
        _ => done(S_UNSUPP),
    }
}

/// Writes the 20-byte serial into the first 20 bytes of the writable stream.
pub fn write_id(mem: &GuestMemory, chain_writable: &[Seg], id: &[u8; ID_LEN]) -> bool {
    let mut done = 0usize;
    for s in chain_writable {
        if done == ID_LEN {
            break;
        }
        let take = (s.len as usize).min(ID_LEN - done);
        if mem.write(s.addr, &id[done..done + take]).is_err() {
            return false;
        }
        done += take;
    }
    done == ID_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Chain {
        let segs = |v: &[(u64, u32)]| v.iter().map(|&(addr, len)| Seg { addr, len }).collect();
        Chain {
            head: 0,
            readable: segs(readable),
            writable: segs(writable),
            readable_len: readable.iter().map(|s| u64::from(s.1)).sum(),
            writable_len: writable.iter().map(|s| u64::from(s.1)).sum(),
        }
    }

    const CTX: Context = Context {
        capacity: 1 << 20,
        readonly: false,
        discard: true,
        write_zeroes: true,
    };

    #[test]
    fn header_gathered_across_segments_and_status_is_the_last_writable_byte() {
        let mem = GuestMemory::new(0x10000).unwrap();
        mem.write_u32(0x100, T_IN).unwrap();
        mem.write_u64(0x108, 3).unwrap();
        // Header split 10 + 6; data and status in one 1025-byte descriptor.
        let c = chain(&[(0x100, 10), (0x10a, 6)], &[(0x1000, 1025)]);
        match parse(&mem, &c, &CTX) {
            Parsed::Io {
                status_addr,
                work: Work::Read { offset, segs, len },
            } => {
                assert_eq!((status_addr, offset, len), (0x1400, 3 * 512, 1024));
                assert_eq!(
                    segs,
                    vec![Seg {
                        addr: 0x1000,
                        len: 1024
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
        // Header of 15 bytes, or no writable byte: dropped (used len 0).
        assert_eq!(
            parse(&mem, &chain(&[(0x100, 15)], &[(0x1000, 1)]), &CTX),
            Parsed::Drop
        );
        assert_eq!(parse(&mem, &chain(&[(0x100, 16)], &[]), &CTX), Parsed::Drop);
    }

    #[test]
    fn per_request_errors() {
        let mem = GuestMemory::new(0x10000).unwrap();
        let status = |t: u32, sector: u64, w: u32| {
            mem.write_u32(0x100, t).unwrap();
            mem.write_u64(0x108, sector).unwrap();
            match parse(&mem, &chain(&[(0x100, 16)], &[(0x1000, w)]), &CTX) {
                Parsed::Done { status, .. } => status,
                Parsed::Io { .. } => S_OK,
                Parsed::Drop => 0xff,
            }
        };
        assert_eq!(status(T_IN, 0, 1001), S_IOERR, "not a multiple of 512");
        assert_eq!(status(T_IN, 2047, 1025), S_IOERR, "beyond capacity");
        assert_eq!(status(T_IN, u64::MAX, 513), S_IOERR, "overflow");
        assert_eq!(status(T_IN, 2047, 513), S_OK, "last sector");
        assert_eq!(status(T_GET_ID, 0, 20), S_IOERR, "19-byte buffer");
        assert_eq!(status(T_GET_ID, 0, 21), S_OK);
        for t in [2, 3, 5, 10, 14, 0x8000_0000, 0xff] {
            assert_eq!(status(t, 0, 513), S_UNSUPP, "type {t:#x}");
        }
        let ro = Context {
            readonly: true,
            ..CTX
        };
        mem.write_u32(0x100, T_OUT).unwrap();
        mem.write_u64(0x108, 0).unwrap();
        let c = chain(&[(0x100, 16), (0x2000, 512)], &[(0x1000, 1)]);
        assert!(matches!(
            parse(&mem, &c, &ro),
            Parsed::Done {
                status: S_IOERR,
                ..
            }
        ));
    }
}
