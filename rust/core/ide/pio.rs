//! PIO data phases: the DRQ block being moved through the data port, what runs when its last
//! byte moves, and the read-ahead that serves READ SECTORS/MULTIPLE blocks from large backend
//! reads (ide.md §5).

/// What runs when the last byte of a DRQ block has moved (QEMU's end-of-transfer handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndOfBlock {
    /// No transfer (after reset): the data port returns 0.
    #[default]
    Idle,
    /// Single data-in block (IDENTIFY, SMART data): DRQ clears, nothing else.
    Stop,
    /// Next block of a PIO read.
    SectorRead,
    /// Commit this block of a PIO write.
    SectorWrite,
}

/// The DRQ block of one drive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PioTransfer {
    pub buf: Vec<u8>,
    pub pos: usize,
    pub end_of_block: EndOfBlock,
}

impl PioTransfer {
    pub fn start(&mut self, data: Vec<u8>, end_of_block: EndOfBlock) {
        self.buf = data;
        self.pos = 0;
        self.end_of_block = end_of_block;
    }

    pub fn halt(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.end_of_block = EndOfBlock::Idle;
    }

    /// A data-out phase: the guest writes, reads return 0.
    pub fn is_out(&self) -> bool {
        self.end_of_block == EndOfBlock::SectorWrite
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes `n` bytes if the block has them (never past its end: CVE-2015-5154).
    pub fn take(&mut self, n: usize) -> Option<&[u8]> {
        let at = self.pos;
        let out = self.buf.get(at..at.checked_add(n)?)?;
        self.pos += n;
        Some(out)
    }

    /// Stores `data` if the block has room for all of it (an empty `data` too only within the
    /// block: a position past its end never indexes it).
    pub fn put(&mut self, data: &[u8]) -> bool {
        let at = self.pos;
        let Some(dst) = at
            .checked_add(data.len())
            .and_then(|end| self.buf.get_mut(at..end))
        else {
            return false;
        };
        dst.copy_from_slice(data);
        self.pos += data.len();
        true
    }

    pub fn block_done(&self) -> bool {
        !self.buf.is_empty() && self.pos >= self.buf.len()
    }
}

/// Sectors of a PIO read fetched ahead of the guest: `data` holds the sectors from `lba` on;
/// `fail_at` is the first block whose backend read failed (nothing at or after it is valid).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadAhead {
    pub lba: u64,
    pub data: Vec<u8>,
    pub fail_at: Option<u64>,
    /// A backend read of this drive's command is in flight.
    pub fetching: bool,
    /// The guest waits (BSY) for the block at the current registers.
    pub waiting: bool,
}

/// Where the block `[lba, lba + n)` stands in the read-ahead buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Bytes `offset..offset + n*512` of `data`.
    Ready(usize),
    /// The backend read of (part of) this block failed.
    Failed,
    Missing,
}

impl ReadAhead {
    pub fn clear(&mut self) {
        *self = ReadAhead::default();
    }

    pub fn end(&self) -> u64 {
        self.lba + (self.data.len() / 512) as u64
    }

    pub fn lookup(&self, lba: u64, n: u64) -> Lookup {
        if lba < self.lba {
            return Lookup::Missing;
        }
        if let Some(fail) = self.fail_at {
            if lba <= fail && fail < lba + n && lba <= self.end() {
                return Lookup::Failed;
            }
        }
        if lba + n <= self.end() {
            Lookup::Ready(((lba - self.lba) * 512) as usize)
        } else {
            Lookup::Missing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz crash (ata, `fuzz/corpus/ata/regress-empty-write-after-sector-commit`): a block
    /// handed to the backend left the position past an empty buffer, and an empty `rep outsw`
    /// indexed past its end.
    #[test]
    fn a_position_past_the_block_never_indexes_it() {
        let mut t = PioTransfer {
            buf: Vec::new(),
            pos: 512,
            end_of_block: EndOfBlock::SectorWrite,
        };
        assert!(!t.put(&[]));
        assert!(!t.put(&[1, 2]));
        assert!(t.take(0).is_none());
        assert_eq!(t.remaining(), 0);
        t.start(vec![0; 4], EndOfBlock::SectorWrite);
        assert!(t.put(&[]) && t.put(&[1, 2]) && t.put(&[3, 4]) && !t.put(&[5, 6]));
        assert!(t.block_done());
        assert_eq!(t.take(0), Some(&[][..]));
    }

    #[test]
    fn block_bounds() {
        let mut p = PioTransfer::default();
        p.start(vec![1, 2, 3, 4], EndOfBlock::Stop);
        assert_eq!(p.take(2), Some(&[1u8, 2][..]));
        assert_eq!(p.take(4), None);
        assert_eq!(p.take(2), Some(&[3u8, 4][..]));
        assert!(p.block_done());
        p.start(vec![0; 2], EndOfBlock::SectorWrite);
        assert!(p.is_out());
        assert!(!p.put(&[1, 2, 3, 4]));
        assert!(p.put(&[9, 9]));
    }

    #[test]
    fn read_ahead_lookup() {
        let ra = ReadAhead {
            lba: 10,
            data: vec![0; 4 * 512],
            fail_at: Some(14),
            ..ReadAhead::default()
        };
        assert_eq!(ra.lookup(10, 2), Lookup::Ready(0));
        assert_eq!(ra.lookup(12, 2), Lookup::Ready(1024));
        assert_eq!(ra.lookup(14, 2), Lookup::Failed);
        assert_eq!(ra.lookup(9, 1), Lookup::Missing);
        assert_eq!(ra.lookup(16, 1), Lookup::Missing);
    }
}
