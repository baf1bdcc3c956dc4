//! blockemu-core: the engine of blockemu, with no Python in it.
//!
//! Read the modules bottom up, as a request travels: `block` (backends and the node that
//! guards them), `geometry` (what a BIOS sees of the disk), `jobs` (the worker pool that keeps
//! storage off the register path).

pub mod block;
pub mod error;
pub mod geometry;
pub mod guest_memory;
pub mod ide;
pub mod interrupt;
pub mod jobs;
pub mod migration;
pub mod state;
pub mod virtio;

pub use error::{Error, ErrorContext, ErrorKind, Result};

/// Every sector in blockemu is 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
