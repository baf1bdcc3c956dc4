//! The command table of a disk and the handlers of its commands (ide.md §3). Opcodes not in
//! the table, or not for a disk, abort.

use super::addressing::{self, ChsShape};
use super::channel::{Action, ChannelState};
use super::dma::DmaKind;
use super::identify::{self, IdentifyInput, MAX_MULT_SECTORS};
use super::pio::EndOfBlock;
use super::regs::*;

/// What the table knows of an opcode: the command and whether success adds DSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub cmd: Command,
    pub set_dsc: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Nop,
    ReadPio { ext: bool },
    ReadMultiple { ext: bool },
    WritePio { ext: bool },
    WriteMultiple { ext: bool },
    ReadDma { ext: bool },
    WriteDma { ext: bool },
    Verify { ext: bool },
    NativeMax { ext: bool },
    Diagnostic,
    Specify,
    CheckPower,
    Smart,
    SetMultiple,
    Flush,
    Identify,
    SetFeatures,
    SecurityFreeze,
    DataSetManagement,
}

/// The disk's entry for `opcode`, if it has one.
pub fn lookup(opcode: u8) -> Option<CommandInfo> {
    use Command::*;
    let (cmd, set_dsc) = match opcode {
        0x06 => (DataSetManagement, false),
        0x10 | 0x70 => (Nop, true),
        0x20 | 0x21 => (ReadPio { ext: false }, false),
        0x24 => (ReadPio { ext: true }, false),
        0x25 => (ReadDma { ext: true }, false),
        0x27 => (NativeMax { ext: true }, true),
        0x29 => (ReadMultiple { ext: true }, false),
        0x30 | 0x31 | 0x3C => (WritePio { ext: false }, false),
        0x34 => (WritePio { ext: true }, false),
        0x35 => (WriteDma { ext: true }, false),
        0x39 => (WriteMultiple { ext: true }, false),
        0x40 | 0x41 => (Verify { ext: false }, true),
        0x42 => (Verify { ext: true }, true),
        0x90 => (Diagnostic, false),
        0x91 => (Specify, true),
        0x94..=0x97 | 0x99 | 0xE0..=0xE3 | 0xE6 => (Nop, false),
        0x98 | 0xE5 => (CheckPower, true),
        0xB0 => (Smart, true),
        0xC4 => (ReadMultiple { ext: false }, false),
        0xC5 => (WriteMultiple { ext: false }, false),
        0xC6 => (SetMultiple, true),
        0xC8 | 0xC9 => (ReadDma { ext: false }, false),
        0xCA | 0xCB => (WriteDma { ext: false }, false),
        0xE7 | 0xEA => (Flush, false),
        0xEC => (Identify, false),
        0xEF => (SetFeatures, true),
        0xF5 => (SecurityFreeze, true),
        0xF8 => (NativeMax { ext: false }, true),
        _ => return None,
    };
    Some(CommandInfo { cmd, set_dsc })
}

impl Command {
    /// Whether the command cannot run before the geometry is known: IDENTIFY, INITIALIZE
    /// DEVICE PARAMETERS and addressing commands in CHS mode.
    pub fn needs_geometry(self, tf: &TaskFile) -> bool {
        use Command::*;
        match self {
            Identify | Specify => true,
            ReadPio { .. }
            | ReadMultiple { .. }
            | WritePio { .. }
            | WriteMultiple { .. }
            | ReadDma { .. }
            | WriteDma { .. }
            | NativeMax { .. }
            | DataSetManagement => addressing::needs_chs(tf),
            _ => false,
        }
    }
}

/// The SMART attribute table QEMU 7.2 reports (observed through READ DATA / READ
/// THRESHOLDS): id, flags (2 bytes), current, worst, raw value (6 bytes), reserved, and the
/// threshold in the last byte.
const SMART_ATTRIBUTES: [[u8; 12]; 7] = [
    [
        0x01, 0x03, 0x00, 0x64, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x06,
    ],
    [
        0x03, 0x03, 0x00, 0x64, 0x64, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
    [
        0x04, 0x02, 0x00, 0x64, 0x64, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14,
    ],
    [
        0x05, 0x03, 0x00, 0x64, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x24,
    ],
    [
        0x09, 0x03, 0x00, 0x64, 0x64, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
    [
        0x0C, 0x03, 0x00, 0x64, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ],
    [
        0xBE, 0x03, 0x00, 0x45, 0x45, 0x1F, 0x00, 0x1F, 0x1F, 0x00, 0x00, 0x32,
    ],
];

/// SET FEATURES sub-commands accepted without effect (look-ahead, APM, AAM, ...).
const FEATURE_NOOPS: [u8; 10] = [0xAA, 0x55, 0x05, 0x85, 0x69, 0x67, 0x96, 0x9A, 0x42, 0xC2];

impl ChannelState {
    /// Runs the handler of `cmd` on `unit` (status is DRDY|BSY, error 0). True when the
    /// command completed synchronously; the caller then finishes it (DSC, IRQ).
    pub(crate) fn handle(&mut self, unit: usize, cmd: Command, out: &mut Vec<Action>) -> bool {
        use Command::*;
        if !self.drives[unit].present {
            self.abort(unit);
            return true;
        }
        match cmd {
            Nop => true,
            ReadPio { ext } | ReadMultiple { ext } => {
                let d = &mut self.drives[unit];
                // READ MULTIPLE moves `mult_sectors` per DRQ block; it needs SET MULTIPLE first.
                let per_block = match cmd {
                    ReadMultiple { .. } => d.mult_sectors,
                    _ => 1,
                };
                if per_block == 0 {
                    self.abort(unit);
                    return true;
                }
                d.tf.expand_count(ext);
                d.req_nb_sectors = per_block;
                d.read_ahead.clear();
                self.sector_read(unit, out);
                false
            }
            WritePio { ext } => {
                let d = &mut self.drives[unit];
                d.tf.expand_count(ext);
                d.req_nb_sectors = 1;
                d.tf.status = DSC | DRDY;
                self.transfer_start(unit, vec![0; 512], EndOfBlock::SectorWrite);
                false
            }
            WriteMultiple { ext } => {
                let d = &mut self.drives[unit];
                if d.mult_sectors == 0 {
                    self.abort(unit);
                    return true;
                }
                d.tf.expand_count(ext);
                d.req_nb_sectors = d.mult_sectors;
                let n = d.tf.nsector.min(d.mult_sectors) as usize;
                d.tf.status = DSC | DRDY;
                self.transfer_start(unit, vec![0; n * 512], EndOfBlock::SectorWrite);
                false
            }
            ReadDma { ext } | WriteDma { ext } => {
                self.drives[unit].tf.expand_count(ext);
                let kind = if matches!(cmd, WriteDma { .. }) {
                    DmaKind::Write
                } else {
                    DmaKind::Read
                };
                self.dma_command(unit, kind, out);
                false
            }
            DataSetManagement => {
                // Only TRIM; the range list comes by DMA. The count register is used as
                // written (no LBA48 expansion, no range check of the registers).
                if self.drives[unit].tf.feature != 0x01 {
                    self.abort(unit);
                    return true;
                }
                self.dma_command(unit, DmaKind::Trim, out);
                false
            }
            Verify { ext } => {
                self.drives[unit].tf.expand_count(ext);
                true
            }
            NativeMax { ext } => {
                let total = self.drives[unit].total_sectors();
                if total == 0 {
                    self.abort(unit);
                    return true;
                }
                let chs = self.chs_shape(unit);
                let d = &mut self.drives[unit];
                d.tf.expand_count(ext);
                addressing::set_sector(&mut d.tf, chs, total - 1);
                true
            }
            Diagnostic => {
                self.diagnostic(unit);
                true
            }
            Specify => {
                let d = &mut self.drives[unit];
                // QEMU 7.2 accepts 0 sectors per track and later divides by it; refuse it.
                if d.tf.nsector & 0xFF == 0 {
                    self.abort(unit);
                    return true;
                }
                d.chs_override = Some(ChsShape {
                    heads: u32::from(d.tf.select & DEV_HEAD) + 1,
                    secs: d.tf.nsector & 0xFF,
                });
                true
            }
            CheckPower => {
                self.drives[unit].tf.nsector = 0xFF;
                true
            }
            Smart => self.smart(unit),
            SetMultiple => {
                let d = &mut self.drives[unit];
                let n = d.tf.nsector & 0xFF;
                if n != 0 && (n > MAX_MULT_SECTORS || !n.is_power_of_two()) {
                    self.abort(unit);
                } else {
                    d.mult_sectors = n;
                }
                true
            }
            Flush => {
                self.drives[unit].tf.status |= BSY;
                out.push(self.flush_action(unit));
                false
            }
            Identify => {
                self.identify(unit);
                false
            }
            SetFeatures => self.set_features(unit, out),
            SecurityFreeze => {
                self.drives[unit].tf.nsector = 0;
                true
            }
        }
    }

    /// EXECUTE DEVICE DIAGNOSTIC on a disk: Device := 0xA0 (DEV, LBA and head cleared),
    /// signature, 0x50, Error 0x01.
    pub(crate) fn diagnostic(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.tf.select = 0xA0;
        let present = d.present;
        d.tf.set_signature(present);
        d.tf.status = DRDY | DSC;
        d.tf.error = 0x01;
    }

    fn identify(&mut self, unit: usize) {
        let chs = self.drives[unit]
            .disk
            .as_ref()
            .and_then(|disk| disk.geometry());
        let d = &mut self.drives[unit];
        if !d.identify_set {
            let Some(geo) = chs else {
                // Only reachable if the geometry read failed after all: abort.
                self.abort(unit);
                self.set_irq();
                return;
            };
            let total = d.total_sectors();
            let (model, firmware) = d.strings();
            // Built from the current logical geometry: heads and sectors set by INITIALIZE
            // DEVICE PARAMETERS before the first IDENTIFY show in words 3-6 and 54-58.
            let shape = d.chs_override.unwrap_or(ChsShape {
                heads: geo.heads,
                secs: geo.secs,
            });
            d.identify = identify::build(&IdentifyInput {
                cyls: geo.cyls,
                heads: shape.heads,
                secs: shape.secs,
                total_sectors: total,
                serial: &d.serial,
                firmware: &firmware,
                model: &model,
                mult_sectors: d.mult_sectors,
                write_cache: d.write_cache,
            });
            d.identify_set = true;
        }
        let data = identify::to_bytes(&d.identify);
        d.tf.status = DRDY | DSC;
        self.transfer_start(unit, data, EndOfBlock::Stop);
        self.set_irq();
    }

    fn set_features(&mut self, unit: usize, out: &mut Vec<Action>) -> bool {
        let d = &mut self.drives[unit];
        match d.tf.feature {
            0x02 => {
                d.write_cache = true;
                d.identify[85] |= 1 << 5;
                true
            }
            0x82 => {
                d.write_cache = false;
                d.identify[85] &= !(1 << 5);
                d.tf.status |= BSY;
                out.push(self.flush_action(unit));
                false
            }
            0xCC => {
                d.reset_reverts = true;
                true
            }
            0x66 => {
                d.reset_reverts = false;
                true
            }
            0x03 => {
                let val = (d.tf.nsector & 7) as u16;
                let (w62, w63, w88) = match (d.tf.nsector & 0xFF) >> 3 {
                    0 | 1 => (0x07, 0x07, 0x3F),
                    2 => (0x07 | 1 << (val + 8), 0x07, 0x3F),
                    4 => (0x07, 0x07 | 1 << (val + 8), 0x3F),
                    8 => (0x07, 0x07, 0x3F | 1 << (val + 8)),
                    _ => {
                        self.abort(unit);
                        return true;
                    }
                };
                d.identify[62] = w62;
                d.identify[63] = w63;
                d.identify[88] = w88;
                true
            }
            f if FEATURE_NOOPS.contains(&f) => true,
            _ => {
                self.abort(unit);
                true
            }
        }
    }

    /// SMART: the sub-commands QEMU knows, with a minimal data page of our own.
    fn smart(&mut self, unit: usize) -> bool {
        let d = &mut self.drives[unit];
        if d.tf.hcyl != 0xC2 || d.tf.lcyl != 0x4F {
            self.abort(unit);
            return true;
        }
        if !d.smart_enabled && d.tf.feature != 0xD8 {
            self.abort(unit);
            return true;
        }
        match d.tf.feature {
            0xD9 => d.smart_enabled = false,
            0xD8 => d.smart_enabled = true,
            0xD2 => match d.tf.nsector & 0xFF {
                0xF1 => d.smart_autosave = true,
                0x00 => d.smart_autosave = false,
                _ => {
                    self.abort(unit);
                    return true;
                }
            },
            0xDA => {
                d.tf.lcyl = 0x4F;
                d.tf.hcyl = 0xC2;
            }
            0xD0 | 0xD1 | 0xD5 => {
                let mut page = vec![0u8; 512];
                page[0] = 0x01;
                match d.tf.feature {
                    0xD0 => {
                        for (n, attr) in SMART_ATTRIBUTES.iter().enumerate() {
                            page[2 + n * 12..2 + n * 12 + 11].copy_from_slice(&attr[..11]);
                        }
                        page[362] = 0x02 | if d.smart_autosave { 0x80 } else { 0 };
                        if d.smart_selftests != 0 {
                            page[363] =
                                d.smart_selftest_log[3 + (usize::from(d.smart_selftests) - 1) * 24];
                        }
                        page[364] = 0x20;
                        page[365] = 0x01;
                        page[367] = (1 << 4) | (1 << 3) | 1;
                        page[368] = 0x03;
                        page[370] = 0x01;
                        page[372] = 0x02;
                        page[373] = 0x36;
                        page[374] = 0x01;
                    }
                    0xD1 => {
                        for (n, attr) in SMART_ATTRIBUTES.iter().enumerate() {
                            page[2 + n * 12] = attr[0];
                            page[3 + n * 12] = attr[11];
                        }
                    }
                    // READ LOG: the log address is in LBA low.
                    _ => match d.tf.sector {
                        0x01 => {}
                        0x06 => {
                            page[2..506].copy_from_slice(&d.smart_selftest_log[2..506]);
                            page[508] = d.smart_selftests;
                        }
                        _ => {
                            self.abort(unit);
                            return true;
                        }
                    },
                }
                let sum = page[..511].iter().fold(0u8, |a, &b| a.wrapping_add(b));
                page[511] = sum.wrapping_neg();
                d.tf.status = DRDY | DSC;
                self.transfer_start(unit, page, EndOfBlock::Stop);
                self.set_irq();
                return false;
            }
            0xD4 => match d.tf.sector {
                test @ 0..=2 => {
                    // The self-test log index wraps (CVE-2014-2894).
                    d.smart_selftests = d.smart_selftests % 21 + 1;
                    let at = 2 + (usize::from(d.smart_selftests) - 1) * 24;
                    // Test number, status "completed without error", power-on hours 0x1234.
                    d.smart_selftest_log[at..at + 4].copy_from_slice(&[test, 0x00, 0x34, 0x12]);
                }
                _ => {
                    self.abort(unit);
                    return true;
                }
            },
            _ => {
                self.abort(unit);
                return true;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        assert!(lookup(0x00).is_none());
        assert!(lookup(0x08).is_none());
        assert!(lookup(0xA1).is_none());
        assert_eq!(lookup(0x06).unwrap().cmd, Command::DataSetManagement);
        assert!(!lookup(0xE0).unwrap().set_dsc);
        assert_eq!(lookup(0xE5).unwrap().cmd, Command::CheckPower);
        let lba = TaskFile {
            select: 0xE0,
            ..TaskFile::default()
        };
        assert!(!Command::ReadPio { ext: false }.needs_geometry(&lba));
        assert!(Command::ReadPio { ext: false }.needs_geometry(&TaskFile::default()));
        assert!(Command::Identify.needs_geometry(&lba));
    }
}
