//! The 256 words of IDENTIFY DEVICE for a disk (ide.md §8, geometry.md §5.1). Strings have
//! their first character in the high byte of each word.

/// What the IDENTIFY words are built from.
#[derive(Debug, Clone)]
pub struct IdentifyInput<'a> {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
    pub total_sectors: u64,
    pub serial: &'a str,
    pub firmware: &'a str,
    pub model: &'a str,
    /// The multiple count at the moment of the first IDENTIFY (word 59).
    pub mult_sectors: u32,
    pub write_cache: bool,
}

/// Largest multiple count (word 47) and the reset value of the multiple count.
pub const MAX_MULT_SECTORS: u32 = 16;
/// Largest LBA28 capacity (words 60-61).
pub const LBA28_MAX: u64 = 0x0FFF_FFFF;

/// Writes `s` into `words[first..first+len/2]`, space padded.
fn put_string(words: &mut [u16; 256], first: usize, len_bytes: usize, s: &str) {
    let bytes = s.as_bytes();
    for i in 0..len_bytes / 2 {
        let hi = bytes.get(2 * i).copied().unwrap_or(b' ');
        let lo = bytes.get(2 * i + 1).copied().unwrap_or(b' ');
        words[first + i] = (u16::from(hi) << 8) | u16::from(lo);
    }
}

pub fn build(input: &IdentifyInput<'_>) -> [u16; 256] {
    let mut w = [0u16; 256];
    let cyls = input.cyls.min(0xFFFF) as u16;
    let heads = input.heads as u16;
    let secs = input.secs as u16;
    w[0] = 0x0040;
    w[1] = cyls;
    w[3] = heads;
    w[4] = 512u16.wrapping_mul(secs);
    w[5] = 512;
    w[6] = secs;
    put_string(&mut w, 10, 20, input.serial);
    w[20] = 3;
    w[21] = 512;
    w[22] = 4;
    put_string(&mut w, 23, 8, input.firmware);
    put_string(&mut w, 27, 40, input.model);
    w[47] = 0x8000 | MAX_MULT_SECTORS as u16;
    w[48] = 1;
    w[49] = (1 << 11) | (1 << 9) | (1 << 8);
    w[51] = 0x200;
    w[52] = 0x200;
    w[53] = 1 | 2 | 4;
    w[54] = cyls;
    w[55] = heads;
    w[56] = secs;
    let chs = u64::from(cyls) * u64::from(heads) * u64::from(secs);
    w[57] = chs as u16;
    w[58] = (chs >> 16) as u16;
    if input.mult_sectors != 0 {
        w[59] = 0x100 | input.mult_sectors as u16;
    }
    let lba28 = input.total_sectors.min(LBA28_MAX);
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    w[62] = 0x07;
    w[63] = 0x07;
    w[64] = 0x03;
    w[65..=68].fill(120);
    // QEMU 7.2's ide-hd has a discard granularity of 512 by default: deterministic TRIM.
    w[69] = 1 << 14;
    w[80] = 0xF0;
    w[81] = 0x16;
    w[82] = (1 << 14) | (1 << 5) | 1;
    w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10);
    w[84] = 1 << 14;
    w[85] = (1 << 14) | if input.write_cache { 1 << 5 } else { 0 } | 1;
    w[86] = (1 << 13) | (1 << 12) | (1 << 10);
    w[87] = 1 << 14;
    w[88] = 0x3F | (1 << 13);
    w[93] = 1 | (1 << 14) | 0x2000;
    for i in 0..4 {
        w[100 + i] = (input.total_sectors >> (16 * i)) as u16;
    }
    // Physical block size configured (512: exponent 0), bits 14 and 13 valid/multiple.
    w[106] = 0x6000;
    // DATA SET MANAGEMENT TRIM supported.
    w[169] = 1;
    w
}

/// The words as the 512 bytes the data port delivers (little-endian).
pub fn to_bytes(words: &[u16; 256]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f1(total: u64, cyls: u32) -> [u16; 256] {
        build(&IdentifyInput {
            cyls,
            heads: 16,
            secs: 63,
            total_sectors: total,
            serial: "QM00001",
            firmware: "2.5+",
            model: "QEMU HARDDISK",
            mult_sectors: 16,
            write_cache: true,
        })
    }

    #[test]
    fn scenario_6_words() {
        let w = f1(131072, 130);
        let expect: &[(usize, u16)] = &[
            (0, 0x0040),
            (1, 130),
            (3, 16),
            (4, 0x7E00),
            (5, 512),
            (6, 63),
            (10, 0x514D),
            (11, 0x3030),
            (12, 0x3030),
            (13, 0x3120),
            (19, 0x2020),
            (23, 0x322E),
            (24, 0x352B),
            (27, 0x5145),
            (33, 0x4B20),
            (34, 0x2020),
            (47, 0x8010),
            (49, 0x0B00),
            (53, 7),
            (57, 0xFFE0),
            (58, 1),
            (59, 0x0110),
            (60, 0),
            (61, 2),
            (64, 3),
            (80, 0xF0),
            (82, 0x4021),
            (83, 0x7400),
            (85, 0x4021),
            (86, 0x3400),
            (88, 0x203F),
            (93, 0x6001),
            (100, 0),
            (101, 2),
            (69, 0x4000),
            (106, 0x6000),
            (169, 1),
            (255, 0),
        ];
        for &(i, v) in expect {
            assert_eq!(w[i], v, "word {i}");
        }
    }

    #[test]
    fn scenario_7_clamp() {
        let w = f1(268_437_504, 16383);
        assert_eq!((w[60], w[61]), (0xFFFF, 0x0FFF));
        assert_eq!((w[100], w[101]), (0x0800, 0x1000));
        assert_eq!((w[57], w[58]), (0xFC10, 0x00FB));
    }
}
