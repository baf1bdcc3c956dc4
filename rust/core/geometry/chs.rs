//! CHS <-> LBA (geometry.md §6): LBA = (c x H + h) x S + (s - 1), sectors 1-based.

use super::Geometry;
use crate::{Error, Result};

/// The LBA of cylinder `c`, head `h`, sector `s` (1-based), each within the geometry.
#[inline]
pub fn chs_to_lba(geometry: &Geometry, c: u64, h: u64, s: u64) -> Result<u64> {
    let (cyls, heads, secs) = (
        u64::from(geometry.cyls),
        u64::from(geometry.heads),
        u64::from(geometry.secs),
    );
    if c >= cyls || h >= heads || s == 0 || s > secs {
        return Err(chs_out_of_range(geometry, c, h, s));
    }
    // c x H + h < C x H < 2^64 (both factors are u32); only the product with S can overflow.
    match (c * heads + h).checked_mul(secs) {
        Some(lba) => Ok(lba + (s - 1)),
        None => Err(chs_out_of_range(geometry, c, h, s)),
    }
}

// Errors are built out of line so that the checks above stay a few instructions.
#[cold]
#[inline(never)]
fn chs_out_of_range(geometry: &Geometry, c: u64, h: u64, s: u64) -> Error {
    let Geometry {
        cyls, heads, secs, ..
    } = *geometry;
    let message = if c >= u64::from(cyls) {
        format!("cylinder {c} out of range 0..{cyls}")
    } else if h >= u64::from(heads) {
        format!("head {h} out of range 0..{heads}")
    } else if s == 0 || s > u64::from(secs) {
        format!("sector {s} out of range 1..={secs}")
    } else {
        format!("CHS {c}/{h}/{s} is beyond 2^64 sectors")
    };
    Error::out_of_range(message)
}

/// The (cylinder, head, sector) of `lba`, which must be below C x H x S.
#[inline]
pub fn lba_to_chs(geometry: &Geometry, lba: u64) -> Result<(u32, u32, u32)> {
    let capacity = geometry.chs_sectors();
    if lba >= capacity {
        return Err(lba_out_of_range(geometry, lba));
    }
    // capacity > 0, so heads and secs are non-zero; c < C, h < H and s <= S all fit in u32.
    // Every geometry a device accepts has fewer than 2^32 sectors: 32-bit division is faster.
    let (c, h, s) = match u32::try_from(lba) {
        Ok(lba) => {
            let track = lba / geometry.secs;
            (
                track / geometry.heads,
                track % geometry.heads,
                lba % geometry.secs,
            )
        }
        Err(_) => {
            let (heads, secs) = (u64::from(geometry.heads), u64::from(geometry.secs));
            let track = lba / secs;
            (
                (track / heads) as u32,
                (track % heads) as u32,
                (lba % secs) as u32,
            )
        }
    };
    Ok((c, h, s + 1))
}

#[cold]
#[inline(never)]
fn lba_out_of_range(geometry: &Geometry, lba: u64) -> Error {
    Error::out_of_range(format!(
        "LBA {lba} is not CHS-addressable: {}/{}/{} covers LBA 0..{}",
        geometry.cyls,
        geometry.heads,
        geometry.secs,
        geometry.chs_sectors()
    ))
}

/// How an IDE device decodes its CHS registers (geometry.md §7): no range checks at all, so a
/// head >= `heads` or a sector > `secs` aliases into a later LBA, and sector 0 gives the LBA
/// before (-1 for 0/0/0). `heads` and `secs` are the decoding geometry (the PCHS, or what
/// INITIALIZE DEVICE PARAMETERS set). The caller range-checks the result against the disk.
#[inline]
pub fn chs_to_lba_unchecked(heads: u16, secs: u16, c: u16, h: u8, s: u8) -> i64 {
    // At most 65535^3 + 255 x 65535 + 255: far inside i64.
    (i64::from(c) * i64::from(heads) + i64::from(h)) * i64::from(secs) + i64::from(s) - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Translation;
    use crate::ErrorKind;

    const DISK_4G: Geometry = Geometry {
        cyls: 8322,
        heads: 16,
        secs: 63,
        trans: Translation::Lba,
    };

    #[test]
    fn spec_examples() {
        for (lba, chs) in [
            (0, (0, 0, 1)),
            (62, (0, 0, 63)),
            (63, (0, 1, 1)),
            (1007, (0, 15, 63)),
            (1008, (1, 0, 1)),
            (8_388_575, (8321, 15, 63)),
        ] {
            assert_eq!(lba_to_chs(&DISK_4G, lba).unwrap(), chs);
            let (c, h, s) = chs;
            assert_eq!(
                chs_to_lba(&DISK_4G, c.into(), h.into(), s.into()).unwrap(),
                lba
            );
        }
        // The last 32 sectors of a 4 GiB disk are not CHS-addressable.
        let err = lba_to_chs(&DISK_4G, 8_388_576).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn range_checks() {
        for (c, h, s) in [
            (8322, 0, 1),
            (0, 16, 1),
            (0, 0, 0),
            (0, 0, 64),
            (u64::MAX, 0, 1),
        ] {
            let err = chs_to_lba(&DISK_4G, c, h, s).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::OutOfRange, "{c}/{h}/{s}");
        }
        assert_eq!(
            chs_to_lba(&DISK_4G, 0, 0, 0).unwrap_err().message(),
            "sector 0 out of range 1..=63"
        );
        let empty = Geometry {
            heads: 0,
            ..DISK_4G
        };
        assert!(lba_to_chs(&empty, 0).is_err());
        assert!(chs_to_lba(&empty, 0, 0, 1).is_err());
    }

    #[test]
    fn beyond_32_bit_lbas() {
        // No device accepts this geometry, but the arithmetic must still be exact.
        let huge = Geometry {
            cyls: u32::MAX,
            heads: 255,
            secs: 255,
            trans: Translation::None,
        };
        for lba in [1 << 32, (1 << 40) + 12345, huge.chs_sectors() - 1] {
            let (c, h, s) = lba_to_chs(&huge, lba).unwrap();
            assert_eq!(
                chs_to_lba(&huge, c.into(), h.into(), s.into()).unwrap(),
                lba
            );
        }
    }

    #[test]
    fn unchecked_decode_aliases() {
        assert_eq!(chs_to_lba_unchecked(16, 63, 0, 0, 0), -1);
        assert_eq!(chs_to_lba_unchecked(16, 63, 1, 0, 1), 1008);
        // Head 16 of cylinder 0 is cylinder 1's head 0; sector 64 is the next track's first.
        assert_eq!(chs_to_lba_unchecked(16, 63, 0, 16, 1), 1008);
        assert_eq!(chs_to_lba_unchecked(16, 63, 0, 0, 64), 63);
        assert_eq!(
            chs_to_lba_unchecked(u16::MAX, u16::MAX, u16::MAX, u8::MAX, u8::MAX),
            65535_i64.pow(3) + 255 * 65535 + 254
        );
    }
}
