//! virtio-mmio version 2 register offsets (§5.3) and the checks of a *caller's* access.
//!
//! A bad offset or width from the caller (the Python script playing the CPU) is an error
//! (`Invalid`); whatever a guest writes to a valid register has a defined device outcome and
//! is never an error.

use crate::{Error, Result};

pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
pub const DEVICE_ID_BLOCK: u32 = 2;
pub const VENDOR_ID: u32 = 0x554D_4551;

pub const R_MAGIC: u32 = 0x000;
pub const R_VERSION: u32 = 0x004;
pub const R_DEVICE_ID: u32 = 0x008;
pub const R_VENDOR_ID: u32 = 0x00c;
pub const R_DEVICE_FEATURES: u32 = 0x010;
pub const R_DEVICE_FEATURES_SEL: u32 = 0x014;
pub const R_DRIVER_FEATURES: u32 = 0x020;
pub const R_DRIVER_FEATURES_SEL: u32 = 0x024;
pub const R_QUEUE_SEL: u32 = 0x030;
pub const R_QUEUE_NUM_MAX: u32 = 0x034;
pub const R_QUEUE_NUM: u32 = 0x038;
pub const R_QUEUE_READY: u32 = 0x044;
pub const R_QUEUE_NOTIFY: u32 = 0x050;
pub const R_INTERRUPT_STATUS: u32 = 0x060;
pub const R_INTERRUPT_ACK: u32 = 0x064;
pub const R_STATUS: u32 = 0x070;
pub const R_QUEUE_DESC_LOW: u32 = 0x080;
pub const R_QUEUE_DESC_HIGH: u32 = 0x084;
pub const R_QUEUE_DRIVER_LOW: u32 = 0x090;
pub const R_QUEUE_DRIVER_HIGH: u32 = 0x094;
pub const R_QUEUE_DEVICE_LOW: u32 = 0x0a0;
pub const R_QUEUE_DEVICE_HIGH: u32 = 0x0a4;
pub const R_SHM_SEL: u32 = 0x0ac;
pub const R_SHM_LEN_LOW: u32 = 0x0b0;
pub const R_SHM_LEN_HIGH: u32 = 0x0b4;
pub const R_SHM_BASE_LOW: u32 = 0x0b8;
pub const R_SHM_BASE_HIGH: u32 = 0x0bc;
pub const R_QUEUE_RESET: u32 = 0x0c0;
pub const R_CONFIG_GENERATION: u32 = 0x0fc;
pub const R_CONFIG: u32 = 0x100;
/// The size of the MMIO window (QEMU's is 0x200).
pub const WINDOW: u32 = 0x200;

/// Checks a caller's access: 1, 2 or 4 bytes inside the window. Whether the width suits the
/// register is the guest's business (see [`is_register_misuse`]), not a caller error.
pub fn check_access(offset: u32, size: u32) -> Result<()> {
    if !matches!(size, 1 | 2 | 4) {
        return Err(Error::invalid(format!(
            "virtio-mmio access size must be 1, 2 or 4, got {size}"
        )));
    }
    if offset.checked_add(size).is_none_or(|end| end > WINDOW) {
        return Err(Error::invalid(format!(
            "virtio-mmio offset {offset:#x} (size {size}) is outside the {WINDOW:#x}-byte window"
        )));
    }
    Ok(())
}

/// Registers below 0x100 take aligned 32-bit accesses only. A narrower or misaligned one is
/// guest misuse with QEMU's outcome: the read returns 0, the write is ignored.
pub fn is_register_misuse(offset: u32, size: u32) -> bool {
    offset < R_CONFIG && (size != 4 || offset % 4 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_access_rules() {
        assert!(check_access(0, 4).is_ok());
        assert!(check_access(0x70, 2).is_ok() && is_register_misuse(0x70, 2));
        assert!(check_access(0x72, 4).is_ok() && is_register_misuse(0x72, 4));
        assert!(!is_register_misuse(0x70, 4) && !is_register_misuse(0x113, 1));
        assert!(check_access(0x113, 1).is_ok());
        assert!(check_access(0x1ff, 2).is_err());
        assert!(check_access(0x100, 8).is_err());
        assert!(check_access(u32::MAX, 4).is_err());
    }
}
