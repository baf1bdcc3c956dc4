//! Table-driven CRC-32s, 8 bytes at a time: CRC-32C (Castagnoli, reflected polynomial
//! 0x82F63B78) for the device-state stream, and CRC-32/ISO-HDLC (zlib's `crc32`, reflected
//! 0xEDB88320) for the migration protocol's frames.

const POLY_C: u32 = 0x82F6_3B78;
const POLY_ISO_HDLC: u32 = 0xEDB8_8320;

const fn tables(poly: u32) -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static TABLES: [[u32; 256]; 8] = tables(POLY_C);
static TABLES_ISO_HDLC: [[u32; 256]; 8] = tables(POLY_ISO_HDLC);

/// CRC-32C of `data` (the iSCSI/ext4 checksum: "123456789" gives 0xE3069283).
pub fn crc32c(data: &[u8]) -> u32 {
    !raw(&TABLES, !0, data)
}

/// CRC-32/ISO-HDLC of `data` continued from `crc`, the CRC of the bytes before it (0 for none),
/// as zlib's `crc32(data, crc)`: "123456789" from 0 gives 0xCBF43926.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    !raw(&TABLES_ISO_HDLC, !crc, data)
}

/// The register after `data`, from `crc` (neither inverted).
fn raw(t: &[[u32; 256]; 8], mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(b)) & 0xFF) as usize];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        // The 8-byte path agrees with the byte-at-a-time definition.
        let mut slow = !0u32;
        for &b in &data {
            slow = (slow >> 8) ^ TABLES[0][((slow ^ u32::from(b)) & 0xFF) as usize];
        }
        assert_eq!(crc32c(&data), !slow);
    }

    #[test]
    fn iso_hdlc_vectors() {
        assert_eq!(crc32_update(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_update(0, b""), 0);
        // continuing equals one pass (zlib.crc32(b, zlib.crc32(a)) == zlib.crc32(a + b))
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 13) as u8).collect();
        for cut in [0, 1, 7, 8, 9, 500, 1000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(crc32_update(crc32_update(0, a), b), crc32_update(0, &data));
        }
        // zlib.crc32(bytes(range(256))) in Python
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(crc32_update(0, &all), 0x2905_8C73);
    }
}
