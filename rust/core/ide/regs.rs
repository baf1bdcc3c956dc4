//! Task-file registers of one drive, with the two-deep HOB FIFOs of LBA48, and the bit values
//! of Status, Error and Device Control (ide.md §1-§2).

/// Status bits.
pub const BSY: u8 = 0x80;
pub const DRDY: u8 = 0x40;
pub const DSC: u8 = 0x10;
pub const DRQ: u8 = 0x08;
pub const ERR: u8 = 0x01;

/// Error bits: QEMU reports every failure as ABRT.
pub const ABRT: u8 = 0x04;

/// Device/Head bits.
pub const DEV_ALWAYS_ON: u8 = 0xA0;
pub const DEV_LBA: u8 = 0x40;
pub const DEV_SELECT: u8 = 0x10;
pub const DEV_HEAD: u8 = 0x0F;

/// Device Control bits.
pub const CTRL_NIEN: u8 = 0x02;
pub const CTRL_SRST: u8 = 0x04;
pub const CTRL_HOB: u8 = 0x80;

/// Command-block register offsets.
pub const REG_DATA: u8 = 0;
pub const REG_ERROR: u8 = 1;
pub const REG_NSECT: u8 = 2;
pub const REG_LBAL: u8 = 3;
pub const REG_LBAM: u8 = 4;
pub const REG_LBAH: u8 = 5;
pub const REG_DEVICE: u8 = 6;
pub const REG_STATUS: u8 = 7;

/// The task file of one drive. `nsector` is QEMU's internal count (up to 65536 once a command
/// expanded it); the register reads back its low byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskFile {
    pub feature: u8,
    pub error: u8,
    pub nsector: u32,
    pub sector: u8,
    pub lcyl: u8,
    pub hcyl: u8,
    pub hob_feature: u8,
    pub hob_nsector: u8,
    pub hob_sector: u8,
    pub hob_lcyl: u8,
    pub hob_hcyl: u8,
    pub select: u8,
    pub status: u8,
    /// The running command is an EXT (48-bit) one.
    pub lba48: bool,
}

impl Default for TaskFile {
    fn default() -> Self {
        TaskFile {
            feature: 0,
            error: 0,
            nsector: 1,
            sector: 1,
            lcyl: 0,
            hcyl: 0,
            hob_feature: 0,
            hob_nsector: 0,
            hob_sector: 0,
            hob_lcyl: 0,
            hob_hcyl: 0,
            select: DEV_ALWAYS_ON,
            status: DRDY | DSC,
            lba48: false,
        }
    }
}

impl TaskFile {
    /// A guest write of registers 1-6 (broadcast to both drives by the channel): the old value
    /// of 1-5 moves into its HOB copy first.
    pub fn write(&mut self, reg: u8, val: u8) {
        match reg {
            REG_ERROR => {
                self.hob_feature = self.feature;
                self.feature = val;
            }
            REG_NSECT => {
                self.hob_nsector = self.nsector as u8;
                self.nsector = u32::from(val);
            }
            REG_LBAL => {
                self.hob_sector = self.sector;
                self.sector = val;
            }
            REG_LBAM => {
                self.hob_lcyl = self.lcyl;
                self.lcyl = val;
            }
            REG_LBAH => {
                self.hob_hcyl = self.hcyl;
                self.hcyl = val;
            }
            REG_DEVICE => self.select = val | DEV_ALWAYS_ON,
            _ => {}
        }
    }

    /// A guest read of registers 1-6; `hob` selects the previous values.
    pub fn read(&self, reg: u8, hob: bool) -> u8 {
        match (reg, hob) {
            (REG_ERROR, false) => self.error,
            (REG_ERROR, true) => self.hob_feature,
            (REG_NSECT, false) => self.nsector as u8,
            (REG_NSECT, true) => self.hob_nsector,
            (REG_LBAL, false) => self.sector,
            (REG_LBAL, true) => self.hob_sector,
            (REG_LBAM, false) => self.lcyl,
            (REG_LBAM, true) => self.hob_lcyl,
            (REG_LBAH, false) => self.hcyl,
            (REG_LBAH, true) => self.hob_hcyl,
            (REG_DEVICE, _) => self.select,
            _ => 0,
        }
    }

    /// The reset values of ide.md §7.1 plus the signature (ATA, or "no device").
    pub fn reset(&mut self, present: bool) {
        *self = TaskFile::default();
        self.set_signature(present);
    }

    pub fn set_signature(&mut self, present: bool) {
        self.select &= !DEV_HEAD;
        self.nsector = 1;
        self.sector = 1;
        let (lcyl, hcyl) = if present { (0, 0) } else { (0xFF, 0xFF) };
        self.lcyl = lcyl;
        self.hcyl = hcyl;
    }

    /// Sector count of a data command: 0 means 256, or 65536 for EXT (ide.md §4.2).
    pub fn expand_count(&mut self, lba48: bool) {
        self.lba48 = lba48;
        if !lba48 {
            if self.nsector == 0 {
                self.nsector = 256;
            }
        } else if self.nsector == 0 && self.hob_nsector == 0 {
            self.nsector = 65536;
        } else {
            self.nsector = (u32::from(self.hob_nsector) << 8) | (self.nsector & 0xFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hob_fifo_and_count_expansion() {
        let mut tf = TaskFile::default();
        tf.write(REG_NSECT, 0x12);
        tf.write(REG_NSECT, 0x34);
        assert_eq!(tf.read(REG_NSECT, false), 0x34);
        assert_eq!(tf.read(REG_NSECT, true), 0x12);
        tf.expand_count(true);
        assert_eq!(tf.nsector, 0x1234);
        tf.write(REG_NSECT, 0);
        tf.write(REG_NSECT, 0);
        tf.expand_count(true);
        assert_eq!(tf.nsector, 65536);
        tf.write(REG_NSECT, 0);
        tf.expand_count(false);
        assert_eq!(tf.nsector, 256);
        assert_eq!(tf.read(REG_NSECT, false), 0);
        tf.write(REG_DEVICE, 0x01);
        assert_eq!(tf.select, 0xA1);
    }

    #[test]
    fn reset_signature() {
        let mut tf = TaskFile::default();
        tf.reset(false);
        assert_eq!(
            (tf.nsector, tf.sector, tf.lcyl, tf.hcyl),
            (1, 1, 0xFF, 0xFF)
        );
        tf.reset(true);
        assert_eq!((tf.lcyl, tf.hcyl, tf.status, tf.error), (0, 0, 0x50, 0));
    }
}
