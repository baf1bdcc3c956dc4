//! The virtio-blk config space (§2), regenerated on every access like QEMU's.
//!
//! Its length depends on what is offered: 36 bytes (up to `max_discard_sectors`), 48 with
//! DISCARD, 60 with WRITE_ZEROES (through `unused1`, which the virtio spec says the device
//! initialises to 0; QEMU 7.2 stops at `write_zeroes_may_unmap`, 57 bytes, and reads 0xff
//! there). An access that runs past the end reads all ones, cut to the access width; writes
//! change only `writeback`.

use super::super::features as f;
use super::request::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS};

pub const CONFIG_MAX: usize = 0x60;
pub const OFF_GEOMETRY: usize = 0x10;
pub const GEOMETRY_LEN: usize = 4;
pub const OFF_WRITEBACK: usize = 0x20;

/// The values that go into the config space.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigValues {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub seg_max: u32,
    /// (cylinders, heads, sectors), zero while unknown.
    pub geometry: (u16, u8, u8),
    pub blk_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
}

/// Config length for the offered features.
pub fn config_len(offered: u64) -> usize {
    if offered & f::BLK_WRITE_ZEROES != 0 {
        60
    } else if offered & f::BLK_DISCARD != 0 {
        48
    } else {
        36
    }
}

/// The config bytes (fields of features not offered read as zero, as QEMU fills them).
pub fn build(v: &ConfigValues, offered: u64) -> [u8; CONFIG_MAX] {
    let mut c = [0u8; CONFIG_MAX];
    c[0..8].copy_from_slice(&v.capacity.to_le_bytes());
    if offered & f::BLK_SEG_MAX != 0 {
        c[0x0c..0x10].copy_from_slice(&v.seg_max.to_le_bytes());
    }
    if offered & f::BLK_GEOMETRY != 0 {
        c[0x10..0x12].copy_from_slice(&v.geometry.0.to_le_bytes());
        c[0x12] = v.geometry.1;
        c[0x13] = v.geometry.2;
    }
    c[0x14..0x18].copy_from_slice(&v.blk_size.to_le_bytes());
    c[OFF_WRITEBACK] = v.writeback;
    // QEMU fills num_queues whether or not MQ is offered.
    c[0x22..0x24].copy_from_slice(&v.num_queues.to_le_bytes());
    if offered & f::BLK_DISCARD != 0 {
        c[0x24..0x28].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[0x28..0x2c].copy_from_slice(&1u32.to_le_bytes());
        c[0x2c..0x30].copy_from_slice(&(v.blk_size / 512).to_le_bytes());
    }
    if offered & f::BLK_WRITE_ZEROES != 0 {
        c[0x30..0x34].copy_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        c[0x34..0x38].copy_from_slice(&1u32.to_le_bytes());
        c[0x38] = 1;
    }
    c
}

/// Reads `size` (1, 2 or 4) bytes at `offset` of a config of `len` bytes.
pub fn read(bytes: &[u8; CONFIG_MAX], len: usize, offset: usize, size: usize) -> u32 {
    let all_ones = if size >= 4 {
        u32::MAX
    } else {
        (1u32 << (8 * size)) - 1
    };
    match offset.checked_add(size) {
        Some(end) if end <= len => {
            let mut v = [0u8; 4];
            v[..size].copy_from_slice(&bytes[offset..end]);
            u32::from_le_bytes(v)
        }
        _ => all_ones,
    }
}

/// Whether an access of `size` at `offset` overlaps the geometry fields.
pub fn touches_geometry(offset: usize, size: usize) -> bool {
    offset < OFF_GEOMETRY + GEOMETRY_LEN && offset + size > OFF_GEOMETRY
}

/// The new `writeback` after a driver write of `size` bytes of `value` at `offset`, if the
/// write covers that byte (QEMU takes the byte from the written config: non-zero = 1).
pub fn written_writeback(len: usize, offset: usize, size: usize, value: u32) -> Option<u8> {
    if offset + size > len || !(offset..offset + size).contains(&OFF_WRITEBACK) {
        return None;
    }
    let byte = (value >> (8 * (OFF_WRITEBACK - offset))) as u8;
    Some(u8::from(byte != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_layout_and_all_ones_past_the_end() {
        let v = ConfigValues {
            capacity: 131072,
            seg_max: 254,
            geometry: (130, 16, 63),
            blk_size: 512,
            writeback: 1,
            num_queues: 1,
        };
        let offered = f::QEMU_DEFAULT;
        let c = build(&v, offered);
        let len = config_len(offered);
        assert_eq!(len, 60);
        assert_eq!(read(&c, len, 0, 4), 0x20000);
        assert_eq!(read(&c, len, 0x0c, 4), 0xfe);
        assert_eq!(read(&c, len, 0x10, 4), 0x3f10_0082);
        assert_eq!(read(&c, len, 0x20, 4), 0x0001_0001);
        assert_eq!(read(&c, len, 0x24, 4), 0x3f_ffff);
        assert_eq!(read(&c, len, 0x38, 1), 1);
        // unused1 reads 0 (QEMU: past its end, all ones); past 60 bytes, all ones.
        assert_eq!(read(&c, len, 0x38, 4), 1);
        assert_eq!(read(&c, len, 0x39, 1), 0);
        assert_eq!(read(&c, len, 0x3b, 1), 0);
        assert_eq!(read(&c, len, 0x3b, 2), 0xffff);
        assert_eq!(read(&c, len, 0x3c, 1), 0xff);
        assert_eq!(config_len(offered & !f::BLK_WRITE_ZEROES), 48);
        assert_eq!(
            config_len(offered & !f::BLK_WRITE_ZEROES & !f::BLK_DISCARD),
            36
        );
        assert_eq!(written_writeback(len, 0x20, 1, 0), Some(0));
        assert_eq!(written_writeback(len, 0x20, 4, 0x0100_0005), Some(1));
        assert_eq!(written_writeback(len, 0x1c, 4, 0), None);
        assert!(touches_geometry(0x13, 1) && !touches_geometry(0x14, 4));
    }
}
