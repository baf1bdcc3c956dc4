//! The IDE/ATA disk device (QEMU `ide-hd` parity, QEMU 7.2): task-file registers, IDENTIFY,
//! addressing, the command set, PIO and bus-master DMA data phases, on a two-drive channel.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use blockemu_core::block::memory_node;
//! # use blockemu_core::ide::{IdeChannel, IdeDisk, IdeDiskConfig};
//! let node = Arc::new(memory_node(64 << 20, false, |b| b).unwrap());
//! let disk = Arc::new(IdeDisk::new(node, IdeDiskConfig::default()).unwrap()); // reads nothing
//! let channel = IdeChannel::new(Some(disk), None, None).unwrap();
//! channel.start(); // the geometry is prefetched from here on
//! channel.ioport_write(6, 0xA0, 1).unwrap();
//! channel.ioport_write(7, 0xEC, 1).unwrap(); // IDENTIFY: BSY until the geometry is known
//! channel.wait_irq(None).unwrap();
//! assert_eq!(channel.ioport_read(7, 1).unwrap(), 0x58);
//! let identify = channel.read_data(512);
//! # let _ = identify;
//! ```
//!
//! Modules, bottom up: [`regs`] (task file, HOB FIFOs, bit values), [`addressing`] (CHS/LBA
//! decode and write-back, range check), [`identify`] (the 256 words), [`pio`] (DRQ block and
//! read-ahead), [`dma`] (bus master registers, PRD walk), [`commands`] (table and handlers),
//! [`disk`] (configuration and lazy geometry), [`channel`] (locking, IRQ line, reset, and the
//! worker-pool completions); [`replay`] plays raw access sequences (fuzzing and its corpus).

pub mod addressing;
pub mod channel;
pub mod commands;
pub mod disk;
pub mod dma;
pub mod identify;
pub mod pio;
pub mod regs;
pub mod replay;

pub use channel::{ChannelState, Drive, IdeChannel};
pub use disk::{DiscardMode, IdeDisk, IdeDiskConfig};
