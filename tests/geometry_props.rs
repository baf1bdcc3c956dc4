//! Properties of the geometry code over random inputs: CHS <-> LBA round trips, and a guess
//! that never panics and always stays within the device's ranges.

use blockemu_core::geometry::mbr::{BOOT_SECTOR_SIZE, SIGNATURE, SIGNATURE_OFFSET};
use blockemu_core::geometry::{
    chs_to_lba, chs_to_lba_unchecked, lba_to_chs, resolve, DeviceKind, Geometry, GeometryConfig,
    GuessSource, Translation, TranslationRequest,
};
use blockemu_core::ErrorKind;
use proptest::prelude::*;

fn any_geometry() -> impl Strategy<Value = Geometry> {
    (1..=65535u32, 1..=255u32, 1..=255u32, 0..4usize).prop_map(|(cyls, heads, secs, t)| Geometry {
        cyls,
        heads,
        secs,
        trans: Translation::ALL[t],
    })
}

/// Disk sizes with the edges spelled out: tiny, the clamps, the 32-bit wraps, u64::MAX.
fn any_total_sectors() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2015),
        Just(16_514_064),
        Just(1008 << 31),
        Just(u64::MAX),
        0..100_000_000u64,
        any::<u64>(),
    ]
}

/// Sector 0 candidates: any length, and half of the 512-byte ones signed so that the
/// partition-table path is exercised, not only "no signature".
fn any_boot_sector() -> impl Strategy<Value = Option<Vec<u8>>> {
    let signed = prop::collection::vec(any::<u8>(), BOOT_SECTOR_SIZE).prop_map(|mut s| {
        s[SIGNATURE_OFFSET..].copy_from_slice(&SIGNATURE);
        s
    });
    prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..600).prop_map(Some),
        signed.prop_map(Some),
    ]
}

fn any_device() -> impl Strategy<Value = DeviceKind> {
    prop_oneof![
        Just(DeviceKind::Ide),
        Just(DeviceKind::Virtio),
        Just(DeviceKind::ScsiHd)
    ]
}

fn any_request() -> impl Strategy<Value = TranslationRequest> {
    prop_oneof![
        Just(TranslationRequest::Auto),
        (0..4usize).prop_map(|t| TranslationRequest::Fixed(Translation::ALL[t])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn lba_round_trips(g in any_geometry(), seed in any::<u64>()) {
        let lba = seed % g.chs_sectors();
        let (c, h, s) = lba_to_chs(&g, lba).unwrap();
        prop_assert!(c < g.cyls && h < g.heads && (1..=g.secs).contains(&s));
        prop_assert_eq!(chs_to_lba(&g, c.into(), h.into(), s.into()).unwrap(), lba);
    }

    #[test]
    fn chs_round_trips(g in any_geometry(), c in any::<u32>(), h in any::<u32>(), s in any::<u32>()) {
        let (c, h, s) = (c % g.cyls, h % g.heads, s % g.secs + 1);
        let lba = chs_to_lba(&g, c.into(), h.into(), s.into()).unwrap();
        prop_assert!(lba < g.chs_sectors());
        prop_assert_eq!(lba_to_chs(&g, lba).unwrap(), (c, h, s));
        // The IDE decode agrees wherever the registers are in range.
        if let (Ok(c16), Ok(h8), Ok(s8)) = (u16::try_from(c), u8::try_from(h), u8::try_from(s)) {
            let aliased = chs_to_lba_unchecked(g.heads as u16, g.secs as u16, c16, h8, s8);
            prop_assert_eq!(aliased, lba as i64);
        }
    }

    #[test]
    fn out_of_range_is_an_error(g in any_geometry(), extra in 0..u64::MAX / 2) {
        let err = lba_to_chs(&g, g.chs_sectors() + extra).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::OutOfRange);
        let err = chs_to_lba(&g, u64::from(g.cyls) + extra, 0, 1).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn guess_stays_in_range(
        sector in any_boot_sector(),
        total_sectors in any_total_sectors(),
        device in any_device(),
        trans in any_request(),
    ) {
        let config = GeometryConfig { trans, ..GeometryConfig::for_device(device) };
        let guess = resolve(&config, sector.as_deref(), total_sectors).unwrap();
        let g = guess.geometry;
        let limits = device.limits();
        prop_assert!((1..=limits.cyls).contains(&g.cyls));
        prop_assert!((1..=limits.heads).contains(&g.heads));
        prop_assert!((1..=limits.secs).contains(&g.secs));
        // Whatever the disk says, a guess keeps to 16383/16/63.
        prop_assert!(g.cyls <= 16383 && g.heads <= 16 && g.secs <= 63);
        if !device.has_translation() {
            prop_assert_eq!(g.trans, Translation::None);
        }
        if let GuessSource::MbrEntry { index } | GuessSource::MbrEntryManyHeads { index, .. } =
            guess.source
        {
            prop_assert!(index < 4);
        }
    }

    #[test]
    fn user_geometry_is_used_or_rejected(
        cyls in prop_oneof![Just(0u32), 1..70000u32, any::<u32>()],
        heads in prop_oneof![Just(0u32), 1..300u32],
        secs in prop_oneof![Just(0u32), 1..300u32],
        device in any_device(),
        sector in any_boot_sector(),
        total_sectors in any_total_sectors(),
    ) {
        let config = GeometryConfig { cyls, heads, secs, ..GeometryConfig::for_device(device) };
        let limits = device.limits();
        let valid = (1..=limits.cyls).contains(&cyls)
            && (1..=limits.heads).contains(&heads)
            && (1..=limits.secs).contains(&secs);
        match resolve(&config, sector.as_deref(), total_sectors) {
            Ok(guess) if config.has_user_chs() => {
                prop_assert!(valid);
                let g = guess.geometry;
                prop_assert_eq!((g.cyls, g.heads, g.secs), (cyls, heads, secs));
                prop_assert_eq!(guess.source, GuessSource::User);
            }
            Ok(_) => prop_assert_eq!((cyls, heads, secs), (0, 0, 0)),
            Err(e) => {
                prop_assert!(!valid);
                prop_assert_eq!(e.kind(), ErrorKind::Geometry);
            }
        }
    }
}
