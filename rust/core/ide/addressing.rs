//! CHS / LBA28 / LBA48 decoding of the task file, the write-back after each block and the
//! range check (ide.md §4). Decoding returns an i64 because CHS sector 0 of C0/H0 is -1.

use super::regs::{TaskFile, DEV_HEAD, DEV_LBA};
use crate::geometry::chs_to_lba_unchecked;

/// The heads and sectors per track the drive decodes CHS with (PCHS, or what INITIALIZE
/// DEVICE PARAMETERS set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChsShape {
    pub heads: u32,
    pub secs: u32,
}

/// Whether decoding the registers needs the geometry (CHS mode).
pub fn needs_chs(tf: &TaskFile) -> bool {
    tf.select & DEV_LBA == 0
}

/// The LBA the registers address now.
pub fn get_sector(tf: &TaskFile, chs: ChsShape) -> i64 {
    if tf.select & DEV_LBA != 0 {
        if tf.lba48 {
            (i64::from(tf.hob_hcyl) << 40)
                | (i64::from(tf.hob_lcyl) << 32)
                | (i64::from(tf.hob_sector) << 24)
                | (i64::from(tf.hcyl) << 16)
                | (i64::from(tf.lcyl) << 8)
                | i64::from(tf.sector)
        } else {
            (i64::from(tf.select & DEV_HEAD) << 24)
                | (i64::from(tf.hcyl) << 16)
                | (i64::from(tf.lcyl) << 8)
                | i64::from(tf.sector)
        }
    } else {
        let cyl = (u16::from(tf.hcyl) << 8) | u16::from(tf.lcyl);
        chs_to_lba_unchecked(
            chs.heads.min(u32::from(u16::MAX)) as u16,
            chs.secs.min(u32::from(u16::MAX)) as u16,
            cyl,
            tf.select & DEV_HEAD,
            tf.sector,
        )
    }
}

/// Writes `lba` back into the registers in the current addressing mode. LBA28 drops bit 28
/// and above, CHS truncates the cylinder to 16 bits; a zero CHS shape leaves them unchanged
/// (never divide by zero).
pub fn set_sector(tf: &mut TaskFile, chs: ChsShape, lba: u64) {
    if tf.select & DEV_LBA != 0 {
        if tf.lba48 {
            tf.sector = lba as u8;
            tf.lcyl = (lba >> 8) as u8;
            tf.hcyl = (lba >> 16) as u8;
            tf.hob_sector = (lba >> 24) as u8;
            tf.hob_lcyl = (lba >> 32) as u8;
            tf.hob_hcyl = (lba >> 40) as u8;
        } else {
            tf.select = (tf.select & 0xF0) | ((lba >> 24) as u8 & DEV_HEAD);
            tf.hcyl = (lba >> 16) as u8;
            tf.lcyl = (lba >> 8) as u8;
            tf.sector = lba as u8;
        }
    } else {
        let track = u64::from(chs.heads) * u64::from(chs.secs);
        if track == 0 {
            return;
        }
        let cyl = lba / track;
        let r = lba % track;
        tf.hcyl = (cyl >> 8) as u8;
        tf.lcyl = cyl as u8;
        tf.select = (tf.select & 0xF0) | ((r / u64::from(chs.secs)) as u8 & DEV_HEAD);
        tf.sector = ((r % u64::from(chs.secs)) + 1) as u8;
    }
}

/// What the registers decode to after writing `lba` back: equal to `lba` unless the
/// write-back wraps (LBA28 past 2^28, CHS past 65535 cylinders or 16 heads).
pub fn roundtrip(tf: &TaskFile, chs: ChsShape, lba: u64) -> i64 {
    let mut copy = *tf;
    set_sector(&mut copy, chs, lba);
    get_sector(&copy, chs)
}

/// QEMU's range check: the whole `count` sectors from `start` lie inside `total`
/// (overflow-safe; a negative start is out of range).
pub fn range_ok(start: i64, count: u64, total: u64) -> bool {
    if start < 0 {
        return false;
    }
    let start = start as u64;
    start <= total && count <= total - start
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ide::regs::TaskFile;

    const F1: ChsShape = ChsShape {
        heads: 16,
        secs: 63,
    };

    #[test]
    fn chs_decode_and_write_back() {
        let mut tf = TaskFile {
            select: 0xA2,
            lcyl: 1,
            hcyl: 0,
            sector: 3,
            ..TaskFile::default()
        };
        assert_eq!(get_sector(&tf, F1), 1136);
        set_sector(&mut tf, F1, 1137);
        assert_eq!((tf.sector, tf.lcyl, tf.select), (4, 1, 0xA2));
        set_sector(&mut tf, F1, 63);
        assert_eq!((tf.sector, tf.lcyl, tf.select), (1, 0, 0xA1));
        tf.select = 0xA0;
        tf.sector = 0;
        tf.lcyl = 0;
        assert_eq!(get_sector(&tf, F1), -1);
        assert!(!range_ok(-1, 1, 100));
    }

    #[test]
    fn lba28_wraps_at_2_28() {
        let mut tf = TaskFile {
            select: 0xEF,
            sector: 0xFF,
            lcyl: 0xFF,
            hcyl: 0xFF,
            ..TaskFile::default()
        };
        assert_eq!(get_sector(&tf, F1), 0x0FFF_FFFF);
        assert_eq!(roundtrip(&tf, F1, 1 << 28), 0);
        set_sector(&mut tf, F1, 1 << 28);
        assert_eq!((tf.select, tf.sector, tf.lcyl, tf.hcyl), (0xE0, 0, 0, 0));
    }

    #[test]
    fn lba48_and_range() {
        let mut tf = TaskFile {
            select: 0x40,
            lba48: true,
            ..TaskFile::default()
        };
        set_sector(&mut tf, F1, 0x1234_5678_9ABC);
        assert_eq!(get_sector(&tf, F1), 0x1234_5678_9ABC);
        assert!(range_ok(10, 0, 10));
        assert!(!range_ok(10, 1, 10));
        assert!(!range_ok(i64::MAX, u64::MAX, 10));
        let zero = ChsShape { heads: 0, secs: 0 };
        tf.select = 0xA0;
        set_sector(&mut tf, zero, 5);
    }
}
