//! The MBR of sector 0 (geometry.md §2): the 0x55AA signature and the four partition entries.
//!
//! Parsing never fails and never panics: any byte string is either "no MBR" (missing or short),
//! "no signature", or a table of four entries (which may hold nonsense; the guess decides).

/// Size of the boot sector read for the guess (QEMU reads one 512-byte sector).
pub const BOOT_SECTOR_SIZE: usize = 512;
/// Offset of the first of the four partition entries.
pub const PARTITION_TABLE_OFFSET: usize = 0x1BE;
pub const PARTITION_ENTRY_SIZE: usize = 16;
pub const PARTITION_ENTRIES: usize = 4;
/// Offset of the two signature bytes, which must be 0x55 then 0xAA.
pub const SIGNATURE_OFFSET: usize = 510;
pub const SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Boot indicator of an active (bootable) partition.
pub const BOOT_ACTIVE: u8 = 0x80;

/// A packed MBR CHS address: 10-bit cylinder, 8-bit head, 6-bit sector (1-based on disk,
/// but stored as found: 0 is possible in a broken table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChsAddress {
    pub cylinder: u16,
    pub head: u8,
    pub sector: u8,
}

impl ChsAddress {
    /// Unpacks head byte, sector byte (sector in bits 5:0, cylinder bits 9:8 in bits 7:6) and
    /// cylinder byte (cylinder bits 7:0).
    pub fn unpack(bytes: [u8; 3]) -> Self {
        let [head, sector_byte, cylinder_low] = bytes;
        ChsAddress {
            cylinder: (u16::from(sector_byte & 0xC0) << 2) | u16::from(cylinder_low),
            head,
            sector: sector_byte & 0x3F,
        }
    }

    /// Packs back into the three bytes; cylinder bits above 9 and sector bits above 5 are lost,
    /// as in the on-disk format.
    pub fn pack(self) -> [u8; 3] {
        let high_cylinder_bits = ((self.cylinder >> 2) & 0xC0) as u8;
        [
            self.head,
            (self.sector & 0x3F) | high_cylinder_bits,
            (self.cylinder & 0xFF) as u8,
        ]
    }
}

/// One 16-byte partition entry, all fields as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PartitionEntry {
    pub boot_indicator: u8,
    pub start: ChsAddress,
    pub partition_type: u8,
    pub end: ChsAddress,
    pub start_lba: u32,
    pub sectors: u32,
}

impl PartitionEntry {
    pub fn parse(bytes: &[u8; PARTITION_ENTRY_SIZE]) -> Self {
        let le32 = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        PartitionEntry {
            boot_indicator: bytes[0],
            start: ChsAddress::unpack([bytes[1], bytes[2], bytes[3]]),
            partition_type: bytes[4],
            end: ChsAddress::unpack([bytes[5], bytes[6], bytes[7]]),
            start_lba: le32(8),
            sectors: le32(12),
        }
    }

    pub fn to_bytes(&self) -> [u8; PARTITION_ENTRY_SIZE] {
        let mut out = [0u8; PARTITION_ENTRY_SIZE];
        out[0] = self.boot_indicator;
        out[1..4].copy_from_slice(&self.start.pack());
        out[4] = self.partition_type;
        out[5..8].copy_from_slice(&self.end.pack());
        out[8..12].copy_from_slice(&self.start_lba.to_le_bytes());
        out[12..16].copy_from_slice(&self.sectors.to_le_bytes());
        out
    }

    pub fn is_bootable(&self) -> bool {
        self.boot_indicator == BOOT_ACTIVE
    }

    /// An entry of all zeros: an unused slot.
    pub fn is_unused(&self) -> bool {
        *self == PartitionEntry::default()
    }
}

/// The four entries of a signed MBR, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PartitionTable {
    pub entries: [PartitionEntry; PARTITION_ENTRIES],
}

impl PartitionTable {
    /// A boot sector holding these entries and the signature (zeros elsewhere).
    pub fn to_boot_sector(&self) -> [u8; BOOT_SECTOR_SIZE] {
        let mut sector = [0u8; BOOT_SECTOR_SIZE];
        for (i, entry) in self.entries.iter().enumerate() {
            let at = PARTITION_TABLE_OFFSET + i * PARTITION_ENTRY_SIZE;
            sector[at..at + PARTITION_ENTRY_SIZE].copy_from_slice(&entry.to_bytes());
        }
        sector[SIGNATURE_OFFSET..].copy_from_slice(&SIGNATURE);
        sector
    }
}

/// What sector 0 holds, as far as the guess is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootSector {
    /// No sector (not read, a failed read) or fewer than 512 bytes.
    Missing,
    /// 512 bytes without 0x55 0xAA at offset 510; carries the two bytes found.
    NoSignature([u8; 2]),
    /// A signed MBR.
    Table(PartitionTable),
}

impl BootSector {
    /// Classifies sector 0. Only the first 512 bytes count; fewer means [`BootSector::Missing`].
    pub fn parse(sector: Option<&[u8]>) -> Self {
        let Some(sector) = sector.and_then(|s| s.first_chunk::<BOOT_SECTOR_SIZE>()) else {
            return BootSector::Missing;
        };
        let signature = [sector[SIGNATURE_OFFSET], sector[SIGNATURE_OFFSET + 1]];
        if signature != SIGNATURE {
            return BootSector::NoSignature(signature);
        }
        let table = PartitionTable {
            entries: std::array::from_fn(|i| {
                let at = PARTITION_TABLE_OFFSET + i * PARTITION_ENTRY_SIZE;
                PartitionEntry::parse(&std::array::from_fn(|j| sector[at + j]))
            }),
        };
        BootSector::Table(table)
    }

    pub fn table(&self) -> Option<&PartitionTable> {
        match self {
            BootSector::Table(table) => Some(table),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chs_packing_matches_the_on_disk_layout() {
        // end CHS 1023/254/63 packs to FE FF FF (the "maxed out" end of large disks).
        let chs = ChsAddress {
            cylinder: 1023,
            head: 254,
            sector: 63,
        };
        assert_eq!(chs.pack(), [0xFE, 0xFF, 0xFF]);
        assert_eq!(ChsAddress::unpack([0xFE, 0xFF, 0xFF]), chs);
        assert_eq!(
            ChsAddress::unpack([0x03, 0x60, 0xDF]),
            ChsAddress {
                cylinder: 479,
                head: 3,
                sector: 32
            }
        );
    }

    #[test]
    fn entry_round_trips() {
        let raw: [u8; 16] = [
            0x80, 0x01, 0x01, 0x00, 0x83, 0xFE, 0x7F, 0x04, 0x3F, 0x00, 0x00, 0x00, 0x86, 0xFA,
            0x3F, 0x00,
        ];
        let entry = PartitionEntry::parse(&raw);
        assert!(entry.is_bootable());
        assert_eq!(entry.partition_type, 0x83);
        assert_eq!(entry.end.head, 254);
        assert_eq!(entry.end.sector, 63);
        assert_eq!(entry.end.cylinder, 260);
        assert_eq!(entry.start_lba, 63);
        assert_eq!(entry.sectors, 4_192_902);
        assert_eq!(entry.to_bytes(), raw);
    }

    #[test]
    fn classification() {
        assert_eq!(BootSector::parse(None), BootSector::Missing);
        assert_eq!(BootSector::parse(Some(&[0x55; 511])), BootSector::Missing);
        assert_eq!(
            BootSector::parse(Some(&[0u8; 512])),
            BootSector::NoSignature([0, 0])
        );
        let mut swapped = [0u8; 512];
        swapped[510] = 0xAA;
        swapped[511] = 0x55;
        assert_eq!(
            BootSector::parse(Some(&swapped)),
            BootSector::NoSignature([0xAA, 0x55])
        );
        let mut table = PartitionTable::default();
        table.entries[3].sectors = 7;
        let mut sector = table.to_boot_sector().to_vec();
        sector.extend_from_slice(&[0xFF; 100]); // bytes after the first sector are ignored
        assert_eq!(BootSector::parse(Some(&sector)), BootSector::Table(table));
    }
}
