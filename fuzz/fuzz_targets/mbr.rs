//! Sector 0 and the disk size from the fuzzer: MBR parsing and the guess must never panic, and
//! must keep their promises (a guess within 16383/16/63, a table that packs back to its bytes).
//!
//! Input layout: 8 bytes of total sectors (little-endian), 1 byte choosing the device and the
//! translation request, then sector 0 (any length; fewer than 512 bytes means "no MBR").

#![no_main]

use blockemu_core::geometry::mbr::{
    BootSector, PARTITION_ENTRY_SIZE, PARTITION_TABLE_OFFSET, SIGNATURE_OFFSET,
};
use blockemu_core::geometry::{
    chs_to_lba, lba_to_chs, resolve, DeviceKind, GeometryConfig, GuessSource, Translation,
    TranslationRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let total_sectors = u64::from_le_bytes(*size);
    let (selector, sector) = rest.split_first().map_or((0, &[][..]), |(s, r)| (*s, r));
    let device =
        [DeviceKind::Ide, DeviceKind::Virtio, DeviceKind::ScsiHd][usize::from(selector % 3)];
    let trans = match (selector / 3) % 5 {
        0 => TranslationRequest::Auto,
        n => TranslationRequest::Fixed(Translation::ALL[usize::from(n - 1)]),
    };

    let boot = BootSector::parse(Some(sector));
    if let BootSector::Table(table) = &boot {
        for (i, entry) in table.entries.iter().enumerate() {
            let at = PARTITION_TABLE_OFFSET + i * PARTITION_ENTRY_SIZE;
            assert_eq!(entry.to_bytes(), sector[at..at + PARTITION_ENTRY_SIZE]);
        }
        let rebuilt = table.to_boot_sector();
        assert_eq!(BootSector::parse(Some(&rebuilt)), boot);
        assert_eq!(
            rebuilt[SIGNATURE_OFFSET..],
            sector[SIGNATURE_OFFSET..SIGNATURE_OFFSET + 2]
        );
    }

    let config = GeometryConfig {
        trans,
        ..GeometryConfig::for_device(device)
    };
    let guess = resolve(&config, Some(sector), total_sectors).expect("a guess never fails");
    let g = guess.geometry;
    assert!((1..=16383).contains(&g.cyls), "{guess:?}");
    assert!((1..=16).contains(&g.heads), "{guess:?}");
    assert!((1..=63).contains(&g.secs), "{guess:?}");
    if !device.has_translation() {
        assert_eq!(g.trans, Translation::None);
    }
    match guess.source {
        GuessSource::MbrEntry { index } | GuessSource::MbrEntryManyHeads { index, .. } => {
            assert!(boot.table().is_some() && index < 4)
        }
        GuessSource::User => panic!("no user geometry was given"),
        _ => {}
    }

    // The last CHS-addressable sector and the one after it.
    let last = g.chs_sectors() - 1;
    let (c, h, s) = lba_to_chs(&g, last).expect("last sector is addressable");
    assert_eq!(
        chs_to_lba(&g, c.into(), h.into(), s.into()).ok(),
        Some(last)
    );
    assert!(lba_to_chs(&g, last + 1).is_err());
});
