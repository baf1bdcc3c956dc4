//! The PIIX-style bus master of a channel: command, status and PRD table address registers,
//! and the PRD table walk in guest memory (ide.md §3.3).

use crate::guest_memory::GuestMemory;

pub const BM_CMD_START: u8 = 0x01;
pub const BM_CMD_TO_MEMORY: u8 = 0x08;
pub const BM_STATUS_ACTIVE: u8 = 0x01;
pub const BM_STATUS_ERROR: u8 = 0x02;
pub const BM_STATUS_INTERRUPT: u8 = 0x04;
/// "Drive 0/1 DMA capable": plain read/write bits.
pub const BM_STATUS_CAPABLE: u8 = 0x60;

/// QEMU walks at most 4 KiB of PRD table (a fail-safe against tables without EOT).
pub const PRD_TABLE_LIMIT: u64 = 4096;
const PRD_EOT: u32 = 0x8000_0000;

/// What a DMA command moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaKind {
    /// Disk to memory (READ DMA).
    Read,
    /// Memory to disk (WRITE DMA).
    Write,
    /// DATA SET MANAGEMENT TRIM: memory holds the range list.
    Trim,
}

/// One TRIM range entry: LBA in bits 47:0, count in bits 63:48 (0 = unused entry).
pub fn trim_entry(entry: u64) -> (u64, u64) {
    (entry & 0xFFFF_FFFF_FFFF, entry >> 48)
}

/// Registers of the bus master plus the DMA command waiting for START.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusMaster {
    pub cmd: u8,
    pub status: u8,
    pub addr: u32,
    /// The PRD table cursor: set to `addr` by START, advanced by every table walk.
    pub cur_addr: u32,
    /// A DMA command issued to this unit waits for START.
    pub pending: Option<(usize, DmaKind)>,
    /// A transfer is running on a worker.
    pub busy: bool,
}

impl BusMaster {
    /// One byte of the 8-byte block.
    pub fn read_byte(&self, offset: u8) -> u8 {
        match offset {
            0 => self.cmd,
            2 => self.status,
            4..=7 => (self.addr >> (8 * (offset - 4))) as u8,
            _ => 0xFF,
        }
    }

    /// Status write: ACTIVE is read-only, ERROR and INTERRUPT are write-1-to-clear, the
    /// capable bits are stored.
    pub fn write_status(&mut self, val: u8) {
        self.status = (val & BM_STATUS_CAPABLE)
            | (self.status & BM_STATUS_ACTIVE)
            | (self.status & !val & (BM_STATUS_ERROR | BM_STATUS_INTERRUPT));
    }

    /// `len` bytes of the PRD table address from byte `at` (0-3); the address stays dword
    /// aligned.
    pub fn write_addr(&mut self, at: u8, len: u8, val: u32) {
        let shift = 8 * u32::from(at);
        let mask = if len >= 4 {
            u32::MAX
        } else {
            (1u32 << (8 * u32::from(len))) - 1
        };
        self.addr = (self.addr & !(mask << shift)) | ((val & mask) << shift);
        self.addr &= !3;
    }

    /// A byte of the PRD table address; the address stays dword aligned.
    pub fn write_addr_byte(&mut self, offset: u8, val: u8) {
        let shift = 8 * u32::from(offset - 4);
        self.addr = (self.addr & !(0xFF << shift)) | (u32::from(val) << shift);
        self.addr &= !3;
    }
}

/// The buffers a PRD table describes, cut at `limit` bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrdList {
    pub segments: Vec<(u64, usize)>,
    pub bytes: u64,
    /// The table describes more than `limit` bytes.
    pub longer: bool,
}

/// Walks the PRD table at `table` until EOT, the 4 KiB cap, or an entry or buffer outside
/// guest memory (which ends the table there).
pub fn walk_prd(memory: &GuestMemory, table: u32, limit: u64) -> PrdList {
    walk_prd_from(memory, table, table, limit).0
}

/// Walks the PRD table whose base is `table` from the entry at `cur` (QEMU keeps its table
/// cursor between the commands of one START), consuming entries up to EOT or the 4 KiB cap
/// even past `limit` (the extra length only sets `longer`). Returns the list and the cursor
/// after the last entry read.
pub fn walk_prd_from(memory: &GuestMemory, table: u32, cur: u32, limit: u64) -> (PrdList, u32) {
    let mut list = PrdList::default();
    let mut at = cur;
    while u64::from(at.wrapping_sub(table)) < PRD_TABLE_LIMIT {
        let (Ok(base), Ok(word)) = (
            memory.read_u32(u64::from(at)),
            memory.read_u32(u64::from(at) + 4),
        ) else {
            break;
        };
        at = at.wrapping_add(8);
        let mut len = u64::from(word & 0xFFFE);
        if len == 0 {
            len = 0x10000;
        }
        if list.bytes < limit {
            if memory.check(u64::from(base), len as usize).is_err() {
                break;
            }
            let take = len.min(limit - list.bytes);
            list.segments.push((u64::from(base), take as usize));
            list.bytes += take;
            if take < len {
                list.longer = true;
            }
        } else {
            list.longer = true;
        }
        if word & PRD_EOT != 0 {
            break;
        }
    }
    (list, at)
}

impl PrdList {
    /// Keeps the first `bytes` bytes.
    pub fn truncate(&mut self, bytes: u64) {
        let mut left = bytes;
        let mut keep = Vec::new();
        for &(addr, len) in &self.segments {
            if left == 0 {
                break;
            }
            let take = (len as u64).min(left);
            keep.push((addr, take as usize));
            left -= take;
        }
        self.segments = keep;
        self.bytes = bytes - left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers() {
        let mut bm = BusMaster {
            status: BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT | BM_STATUS_ERROR,
            ..BusMaster::default()
        };
        bm.write_status(0x64);
        assert_eq!(bm.status, 0x60 | BM_STATUS_ACTIVE | BM_STATUS_ERROR);
        bm.write_addr_byte(4, 0x13);
        bm.write_addr_byte(5, 0x20);
        assert_eq!(bm.addr, 0x2010);
        assert_eq!(bm.read_byte(5), 0x20);
        assert_eq!(bm.read_byte(1), 0xFF);
    }

    #[test]
    fn prd_walk() {
        let mem = GuestMemory::new(0x20000).unwrap();
        mem.write_u32(0x100, 0x1000).unwrap();
        mem.write_u32(0x104, 256).unwrap();
        mem.write_u32(0x108, 0x2000).unwrap();
        mem.write_u32(0x10C, 0x8000_0000 | 512).unwrap();
        let l = walk_prd(&mem, 0x100, 1 << 20);
        assert_eq!(l.bytes, 768);
        assert!(!l.longer);
        let l = walk_prd(&mem, 0x100, 512);
        assert_eq!((l.bytes, l.longer), (512, true));
        // No EOT anywhere: zeroed entries are 64 KiB each at address 0, capped by 4 KiB.
        let l = walk_prd(&mem, 0x1000, u64::MAX);
        assert_eq!(l.segments.len(), 512);
        // Entry outside memory ends the table.
        let l = walk_prd(&mem, 0x1FFFC, u64::MAX);
        assert_eq!(l.bytes, 0);
    }
}
