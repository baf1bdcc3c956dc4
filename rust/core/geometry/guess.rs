//! Resolving a device's geometry as QEMU's realize does (geometry.md §3, §4, §11): the user's
//! values when any is given, else the MBR guess, else the size-based default; then the
//! translation.
//!
//! All arithmetic is u64 and clamps before narrowing, so disks past QEMU's 32-bit wrap
//! (about 1.1 PB, §3.5) get the saturated answer instead of QEMU's sawtooth.

use std::fmt;

use super::mbr::{BootSector, PartitionTable};
use super::{Geometry, GeometryConfig, Translation, TranslationRequest};
use crate::Result;

/// Heads and sectors per track of the size-based default.
pub const DEFAULT_HEADS: u32 = 16;
pub const DEFAULT_SECS: u32 = 63;
/// The default never reports fewer cylinders than this, even for a 1-sector disk.
pub const MIN_GUESSED_CYLS: u64 = 2;
/// Most cylinders a guess reports (the MBR guess rejects more, the default caps here).
pub const MAX_GUESSED_CYLS: u64 = 16383;
/// The most heads a guess keeps; an MBR with more means a BIOS translation was in use.
pub const MAX_GUESSED_HEADS: u32 = 16;
/// "large" fits while C x 16 stays at or below this (QEMU's code uses <=, its docs say <).
pub const LARGE_MAX_CYLS_X_HEADS: u64 = 131_072;
/// Above these, `auto` becomes lba: the 528 MB limit of the original INT 13h interface.
const AUTO_NONE_MAX_CYLS: u32 = 1024;
const AUTO_NONE_MAX_SECS: u32 = 63;

/// Why the geometry is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuessSource {
    /// The user gave cylinders/heads/sectors.
    User,
    /// Partition entry `index` decided: its end head and end sector, cylinders from the size.
    MbrEntry { index: usize },
    /// Partition entry `index` was acceptable but had `heads` > 16: its cylinders and sectors
    /// were discarded for the size default, and it only chose large or lba.
    MbrEntryManyHeads { index: usize, heads: u32 },
    /// Size-based default: no boot sector (none given, the read failed, or too short).
    NoBootSector,
    /// Size-based default: sector 0 lacks the 0x55AA signature.
    NoSignature,
    /// Size-based default: no partition entry gave a usable geometry.
    NoAcceptableEntry,
    /// Arrived with migrated device state (the source's geometry; nothing was read here).
    Migrated,
}

impl GuessSource {
    /// The partition entry that decided, if one did.
    pub fn entry(self) -> Option<usize> {
        match self {
            GuessSource::MbrEntry { index } | GuessSource::MbrEntryManyHeads { index, .. } => {
                Some(index)
            }
            _ => None,
        }
    }

    /// A short machine-readable name ("user", "mbr", "mbr-many-heads", "no-boot-sector",
    /// "no-signature", "no-acceptable-entry", "migrated").
    pub fn as_str(self) -> &'static str {
        match self {
            GuessSource::User => "user",
            GuessSource::MbrEntry { .. } => "mbr",
            GuessSource::MbrEntryManyHeads { .. } => "mbr-many-heads",
            GuessSource::NoBootSector => "no-boot-sector",
            GuessSource::NoSignature => "no-signature",
            GuessSource::NoAcceptableEntry => "no-acceptable-entry",
            GuessSource::Migrated => "migrated",
        }
    }
}

/// One sentence for people.
impl fmt::Display for GuessSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GuessSource::User => f.write_str("cylinders, heads and sectors were given by the user"),
            GuessSource::MbrEntry { index } => write!(
                f,
                "partition entry {index} ends on a cylinder boundary: its end head and sector \
                 give heads and sectors per track, the disk size gives the cylinders"
            ),
            GuessSource::MbrEntryManyHeads { index, heads } => write!(
                f,
                "partition entry {index} implies {heads} heads (more than 16, so a BIOS \
                 translation was in use): size-based default, translation large up to 8192 \
                 cylinders, else lba"
            ),
            GuessSource::NoBootSector => f.write_str(
                "no boot sector (none read, or shorter than 512 bytes): size-based default",
            ),
            GuessSource::NoSignature => {
                f.write_str("sector 0 has no 0x55AA signature: size-based default")
            }
            GuessSource::NoAcceptableEntry => {
                f.write_str("no partition entry gives a usable geometry: size-based default")
            }
            GuessSource::Migrated => {
                f.write_str("carried by migrated device state: the source's geometry, nothing read")
            }
        }
    }
}

/// Where the translation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TranslationSource {
    /// The user's `bios-chs-trans` (anything but auto).
    User,
    /// `auto`, resolved by the guess or from the user's geometry.
    Auto,
    /// The device has no translation slot; reported as none.
    NoSlot,
}

impl TranslationSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TranslationSource::User => "user",
            TranslationSource::Auto => "auto",
            TranslationSource::NoSlot => "no-slot",
        }
    }
}

/// A resolved geometry and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guess {
    pub geometry: Geometry,
    pub source: GuessSource,
    pub translation_source: TranslationSource,
}

/// Whether resolving `config` reads sector 0: not when the user gave a geometry.
pub fn needs_boot_sector(config: &GeometryConfig) -> bool {
    !config.has_user_chs()
}

/// What `auto` becomes for a geometry: none within the classic INT 13h limits, else lba
/// (never large).
pub fn auto_translation(cyls: u32, heads: u32, secs: u32) -> Translation {
    if cyls <= AUTO_NONE_MAX_CYLS && heads <= MAX_GUESSED_HEADS && secs <= AUTO_NONE_MAX_SECS {
        Translation::None
    } else {
        Translation::Lba
    }
}

/// The size-based default (C, 16, 63): C = total / 1008 clamped to 2..=16383.
pub fn size_default(total_sectors: u64) -> (u32, u32, u32) {
    let per_cylinder = u64::from(DEFAULT_HEADS * DEFAULT_SECS);
    let cyls = (total_sectors / per_cylinder).clamp(MIN_GUESSED_CYLS, MAX_GUESSED_CYLS);
    (cyls as u32, DEFAULT_HEADS, DEFAULT_SECS)
}

/// The first entry, in table order, whose end head/sector give a geometry with 1..=16383
/// cylinders for this disk: (index, cyls, heads, secs). Entries with no sectors, end head 0
/// or end sector 0 are skipped; the end cylinder is never trusted.
fn lchs_from_table(table: &PartitionTable, total_sectors: u64) -> Option<(usize, u32, u32, u32)> {
    table.entries.iter().enumerate().find_map(|(index, entry)| {
        if entry.sectors == 0 || entry.end.head == 0 || entry.end.sector == 0 {
            return None;
        }
        let heads = u32::from(entry.end.head) + 1;
        let secs = u32::from(entry.end.sector);
        let cyls = total_sectors / u64::from(heads * secs);
        (1..=MAX_GUESSED_CYLS)
            .contains(&cyls)
            .then_some((index, cyls as u32, heads, secs))
    })
}

/// QEMU's guess with the translation it computes (before the user's request applies).
fn guess(boot_sector: &BootSector, total_sectors: u64) -> (Geometry, GuessSource) {
    let (cyls, heads, secs) = size_default(total_sectors);
    let default = |trans| Geometry {
        cyls,
        heads,
        secs,
        trans,
    };
    let auto = auto_translation(cyls, heads, secs);
    let table = match boot_sector {
        BootSector::Missing => return (default(auto), GuessSource::NoBootSector),
        BootSector::NoSignature(_) => return (default(auto), GuessSource::NoSignature),
        BootSector::Table(table) => table,
    };
    match lchs_from_table(table, total_sectors) {
        None => (default(auto), GuessSource::NoAcceptableEntry),
        Some((index, _, lchs_heads, _)) if lchs_heads > MAX_GUESSED_HEADS => {
            let trans = if u64::from(cyls) * u64::from(heads) <= LARGE_MAX_CYLS_X_HEADS {
                Translation::Large
            } else {
                Translation::Lba
            };
            let source = GuessSource::MbrEntryManyHeads {
                index,
                heads: lchs_heads,
            };
            (default(trans), source)
        }
        Some((index, cyls, heads, secs)) => (
            // Kept in sync with the partition table: none even beyond 1024 cylinders.
            Geometry {
                cyls,
                heads,
                secs,
                trans: Translation::None,
            },
            GuessSource::MbrEntry { index },
        ),
    }
}

/// Resolves a device's geometry from its configuration, sector 0 (`None`, or fewer than 512
/// bytes, when there is none or its read failed) and the disk size in sectors.
///
/// Fails only for user geometry outside the device's ranges, with QEMU's message.
pub fn resolve(
    config: &GeometryConfig,
    boot_sector: Option<&[u8]>,
    total_sectors: u64,
) -> Result<Guess> {
    let boot_sector = if needs_boot_sector(config) {
        BootSector::parse(boot_sector)
    } else {
        BootSector::Missing
    };
    resolve_parsed(config, &boot_sector, total_sectors)
}

/// [`resolve`] on an already classified sector 0 (for callers that also show the table).
pub fn resolve_parsed(
    config: &GeometryConfig,
    boot_sector: &BootSector,
    total_sectors: u64,
) -> Result<Guess> {
    let device = config.device;
    let (geometry, source) = if config.has_user_chs() {
        device
            .limits()
            .check(config.cyls, config.heads, config.secs)?;
        let geometry = Geometry {
            cyls: config.cyls,
            heads: config.heads,
            secs: config.secs,
            trans: auto_translation(config.cyls, config.heads, config.secs),
        };
        (geometry, GuessSource::User)
    } else {
        guess(boot_sector, total_sectors)
    };
    let (trans, translation_source) = match (device.has_translation(), config.trans) {
        (false, _) => (Translation::None, TranslationSource::NoSlot),
        (true, TranslationRequest::Auto) => (geometry.trans, TranslationSource::Auto),
        (true, TranslationRequest::Fixed(trans)) => (trans, TranslationSource::User),
    };
    Ok(Guess {
        geometry: Geometry { trans, ..geometry },
        source,
        translation_source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::mbr::{ChsAddress, PartitionEntry};
    use crate::geometry::DeviceKind;
    use crate::ErrorKind;

    fn table_with_end(head: u8, sector: u8, sectors: u32) -> BootSector {
        let mut table = PartitionTable::default();
        table.entries[0] = PartitionEntry {
            end: ChsAddress {
                cylinder: 1023,
                head,
                sector,
            },
            sectors,
            ..PartitionEntry::default()
        };
        BootSector::Table(table)
    }

    fn ide() -> GeometryConfig {
        GeometryConfig::default()
    }

    #[test]
    fn size_default_clamps() {
        assert_eq!(size_default(0), (2, 16, 63));
        assert_eq!(size_default(3023), (2, 16, 63));
        assert_eq!(size_default(3024), (3, 16, 63));
        assert_eq!(size_default(u64::MAX), (16383, 16, 63));
    }

    #[test]
    fn large_threshold_is_inclusive() {
        let boot = table_with_end(254, 63, 1);
        let at = |cyls: u64| resolve_parsed(&ide(), &boot, cyls * 1008).unwrap();
        assert_eq!(at(8192).geometry.trans, Translation::Large);
        assert_eq!(at(8193).geometry.trans, Translation::Lba);
        assert_eq!(
            at(8192).source,
            GuessSource::MbrEntryManyHeads {
                index: 0,
                heads: 255
            }
        );
    }

    #[test]
    fn user_geometry_skips_the_boot_sector() {
        let config = GeometryConfig {
            cyls: 100,
            heads: 16,
            secs: 63,
            ..ide()
        };
        assert!(!needs_boot_sector(&config));
        assert!(needs_boot_sector(&ide()));
        let boot = table_with_end(3, 32, 1).table().unwrap().to_boot_sector();
        let guess = resolve(&config, Some(&boot), 61440).unwrap();
        assert_eq!(guess.source, GuessSource::User);
        assert_eq!(guess.geometry.cyls, 100);
    }

    #[test]
    fn partial_triple_fails_in_qemu_order() {
        let only_cyls = GeometryConfig { cyls: 100, ..ide() };
        let err = resolve(&only_cyls, None, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Geometry);
        assert_eq!(err.message(), "heads must be between 1 and 16");
        let only_secs = GeometryConfig { secs: 1, ..ide() };
        let err = resolve(&only_secs, None, 1).unwrap_err();
        assert_eq!(err.message(), "cyls must be between 1 and 65535");
    }

    #[test]
    fn devices_without_a_slot_report_none() {
        let config = GeometryConfig {
            trans: TranslationRequest::Fixed(Translation::Large),
            ..GeometryConfig::for_device(DeviceKind::ScsiHd)
        };
        let guess = resolve(&config, None, 1 << 30).unwrap();
        assert_eq!(guess.geometry.trans, Translation::None);
        assert_eq!(guess.translation_source, TranslationSource::NoSlot);
    }

    #[test]
    fn huge_disks_saturate() {
        let boot = table_with_end(15, 63, 1);
        let guess = resolve_parsed(&ide(), &boot, u64::MAX).unwrap();
        assert_eq!(guess.source, GuessSource::NoAcceptableEntry);
        assert_eq!(guess.geometry.cyls, 16383);
        assert_eq!(guess.geometry.trans, Translation::Lba);
    }
}
