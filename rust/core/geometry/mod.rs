//! Disk geometry: what a BIOS and an IDE or virtio-blk driver see of the disk.
//!
//! QEMU-compatible guessing (geometry.md §2-§4, §11): the MBR of sector 0 ([`mbr`]), the guess
//! and the user's overrides with each device's validation ranges ([`guess`]), and CHS <-> LBA
//! ([`chs`]). Everything here is plain data and pure functions; reading sector 0 is the
//! caller's job (and only when [`needs_boot_sector`] says so).

pub mod chs;
pub mod guess;
pub mod mbr;

use std::fmt;

use crate::{Error, Result};

pub use chs::{chs_to_lba, chs_to_lba_unchecked, lba_to_chs};
pub use guess::{
    auto_translation, needs_boot_sector, resolve, resolve_parsed, size_default, Guess, GuessSource,
    TranslationSource,
};
pub use mbr::{BootSector, ChsAddress, PartitionEntry, PartitionTable};

/// The BIOS translation hint of an IDE disk (QEMU's `BiosAtaTranslation` without `auto`).
///
/// A hint for the firmware only: the device itself never translates. Declared in QEMU's
/// enum order, so the derived ordering matches QEMU's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Translation {
    None,
    Lba,
    Large,
    Rechs,
}

impl Translation {
    pub const ALL: [Translation; 4] = [
        Translation::None,
        Translation::Lba,
        Translation::Large,
        Translation::Rechs,
    ];

    /// The name QEMU's `bios-chs-trans` property uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Translation::None => "none",
            Translation::Lba => "lba",
            Translation::Large => "large",
            Translation::Rechs => "rechs",
        }
    }

    /// Parses "none", "lba", "large" or "rechs"; "auto" is a request, not a translation.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown translation '{name}' (expected none, lba, large or rechs)"
                ))
            })
    }

    /// The 2-bit code the PC CMOS byte 0x39 holds for this translation (QEMU value - 1).
    pub fn cmos_code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Translation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for in `bios-chs-trans`: a translation, or `auto` (the default), which
/// the resolution replaces with a computed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TranslationRequest {
    #[default]
    Auto,
    Fixed(Translation),
}

impl TranslationRequest {
    pub fn as_str(self) -> &'static str {
        match self {
            TranslationRequest::Auto => "auto",
            TranslationRequest::Fixed(t) => t.as_str(),
        }
    }

    /// Parses "auto", "none", "lba", "large" or "rechs".
    pub fn parse(name: &str) -> Result<Self> {
        if name == "auto" {
            return Ok(TranslationRequest::Auto);
        }
        Translation::parse(name)
            .map(TranslationRequest::Fixed)
            .map_err(|_| {
                Error::invalid(format!(
                    "unknown translation '{name}' (expected auto, none, lba, large or rechs)"
                ))
            })
    }
}

impl From<Translation> for TranslationRequest {
    fn from(t: Translation) -> Self {
        TranslationRequest::Fixed(t)
    }
}

/// The highest cylinder, head and sector counts a device accepts from the user (all from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
}

impl Limits {
    /// QEMU's validation order and wording (`blkconf_geometry`): cylinders, heads, sectors.
    pub fn check(&self, cyls: u32, heads: u32, secs: u32) -> Result<()> {
        for (name, value, max) in [
            ("cyls", cyls, self.cyls),
            ("heads", heads, self.heads),
            ("secs", secs, self.secs),
        ] {
            if !(1..=max).contains(&value) {
                return Err(Error::geometry(format!(
                    "{name} must be between 1 and {max}"
                )));
            }
        }
        Ok(())
    }
}

/// The device whose realize the resolution mirrors; each has its own ranges (geometry.md §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceKind {
    /// `ide-hd`: 65535/16/255, with the `bios-chs-trans` slot.
    #[default]
    Ide,
    /// `virtio-blk`: 65535/255/255, no translation.
    Virtio,
    /// `scsi-hd`: the same rules as virtio-blk.
    ScsiHd,
}

impl DeviceKind {
    /// The QEMU device name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Ide => "ide-hd",
            DeviceKind::Virtio => "virtio-blk",
            DeviceKind::ScsiHd => "scsi-hd",
        }
    }

    /// Parses the QEMU device name or its short form ("ide", "virtio").
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "ide" | "ide-hd" => Ok(DeviceKind::Ide),
            "virtio" | "virtio-blk" => Ok(DeviceKind::Virtio),
            "scsi-hd" => Ok(DeviceKind::ScsiHd),
            _ => Err(Error::invalid(format!(
                "unknown device '{name}' (expected ide, ide-hd, virtio, virtio-blk or scsi-hd)"
            ))),
        }
    }

    pub fn limits(self) -> Limits {
        match self {
            DeviceKind::Ide => Limits {
                cyls: 65535,
                heads: 16,
                secs: 255,
            },
            DeviceKind::Virtio | DeviceKind::ScsiHd => Limits {
                cyls: 65535,
                heads: 255,
                secs: 255,
            },
        }
    }

    /// Whether the device has a translation slot (only IDE's `bios-chs-trans`).
    pub fn has_translation(self) -> bool {
        matches!(self, DeviceKind::Ide)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resolved physical geometry (PCHS) and its BIOS translation hint.
///
/// Field order makes the derived ordering compare cylinders, then heads, sectors, translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Geometry {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
    pub trans: Translation,
}

impl Geometry {
    /// A geometry any of the emulated devices could have: 1..=65535 cylinders, 1..=255 heads,
    /// 1..=255 sectors (the widest ranges, virtio-blk's), with QEMU's messages otherwise.
    pub fn new(cyls: u32, heads: u32, secs: u32, trans: Translation) -> Result<Self> {
        DeviceKind::Virtio.limits().check(cyls, heads, secs)?;
        Ok(Geometry {
            cyls,
            heads,
            secs,
            trans,
        })
    }

    /// C x H x S: the sectors reachable by CHS addressing (IDENTIFY words 57-58 before their
    /// 32-bit truncation). Saturates for geometries no device accepts.
    pub fn chs_sectors(&self) -> u64 {
        (u64::from(self.cyls) * u64::from(self.heads)).saturating_mul(u64::from(self.secs))
    }
}

/// What the user configured on the device: all-zero cylinders/heads/sectors mean "guess".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GeometryConfig {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
    pub trans: TranslationRequest,
    pub device: DeviceKind,
}

impl GeometryConfig {
    /// The default configuration (guess everything) for `device`.
    pub fn for_device(device: DeviceKind) -> Self {
        GeometryConfig {
            device,
            ..Self::default()
        }
    }

    /// Whether any of cylinders/heads/sectors was given: then nothing is guessed, and all
    /// three are validated (a partial triple fails).
    pub fn has_user_chs(&self) -> bool {
        self.cyls != 0 || self.heads != 0 || self.secs != 0
    }
}
