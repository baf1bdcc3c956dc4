//! The IDE/ATA disk device (QEMU `ide-hd` parity, QEMU 7.2): task-file registers, IDENTIFY,
//! addressing, the command set, PIO and bus-master DMA data phases, on a two-drive channel.

pub mod addressing;
pub mod channel;
pub mod commands;
pub mod disk;
pub mod dma;
pub mod identify;
pub mod pio;
pub mod regs;

pub use channel::{ChannelState, Drive, IdeChannel};
pub use disk::{IdeDisk, IdeDiskConfig};
