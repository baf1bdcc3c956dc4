//! The block layer: backends (where bytes live) and the node that guards them.
//!
//! Read in this order: `backend` (the storage interface), `file` and `memory` (backends), `fault`
//! (fault injection stacked on any backend),
//! `lock` (QEMU-compatible image locks), `node` (lifecycle, stats, trace), `image` (opening
//! and creating images).

pub mod backend;
pub mod fault;
pub mod file;
pub mod image;
pub mod lock;
pub mod memory;
pub mod node;

pub use backend::Backend;
pub use fault::{FaultInjector, FaultRules, OpKind};
pub use file::FileBackend;
pub use image::{
    create_image, image_info, memory_node, open_image, Format, ImageInfo, ImageOptions,
};
pub use lock::{LockProbe, LockSet, Perm};
pub use memory::MemoryBackend;
pub use node::{BlockNode, CacheMode, NodeConfig, NodeStats, Op, Outcome, Phase, TraceEntry};
