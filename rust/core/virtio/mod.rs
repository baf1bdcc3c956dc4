//! virtio-blk on the virtio-mmio (version 2) transport, with split virtqueues.
//!
//! Read bottom up: [`queue`] (one split virtqueue's state and index arithmetic), [`chain`]
//! (walking and validating one descriptor chain), [`blk`] (the block request format, the
//! config space and the device that runs requests on the job engine), [`mmio`] (register
//! offsets and the checks of a caller's access), [`replay`] (fuzz bytes → a guest program).
//!
//! Policy for bad guest input is spec §6 of `shared/specs/virtio.md`: anything that breaks
//! ring structure or memory bounds sets DEVICE_NEEDS_RESET (the device then does nothing until
//! reset); a well-formed chain carrying a bad block request gets a status byte; a chain with
//! no room for the status or too short a header is returned with used length 0.

pub mod blk;
pub mod chain;
pub mod mmio;
pub mod queue;
pub mod replay;

pub use blk::{VirtioBlk, VirtioBlkConfig, VirtioStats};

/// Feature bits (bit numbers as masks).
pub mod features {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    pub const BLK_GEOMETRY: u64 = 1 << 4;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    pub const BLK_MQ: u64 = 1 << 12;
    pub const BLK_DISCARD: u64 = 1 << 13;
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    pub const RING_RESET: u64 = 1 << 40;

    /// What QEMU 7.2's `virtio-blk-device` offers on virtio-mmio (read with qtest: low word
    /// 0x30006e54, high word 0x101); MQ and RO are added per device.
    pub const QEMU_DEFAULT: u64 = BLK_SEG_MAX
        | BLK_GEOMETRY
        | BLK_BLK_SIZE
        | BLK_FLUSH
        | BLK_TOPOLOGY
        | BLK_CONFIG_WCE
        | BLK_DISCARD
        | BLK_WRITE_ZEROES
        | INDIRECT_DESC
        | EVENT_IDX
        | VERSION_1
        | RING_RESET;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// InterruptStatus bits.
pub const INT_USED: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The largest queue size the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
