//! The block layer: backends (where bytes live) and the node that guards them.
//!
//! Read in this order: `backend` (the storage interface), `file` and `memory` (backends), `fault`
//! (fault injection stacked on any backend),
//! `qcow2` (the qcow2 format over a backend), `nbd` (an NBD client backend), `shared_store`
//! and `cor` (caches in front of a backend: the weakly coherent shared-store model and the
//! copy-on-read overlay), `lock` (QEMU-compatible image locks), `dirty` (dirty bitmaps), `node` (lifecycle, stats,
//! trace), `image` (opening
//! and creating images).

pub mod backend;
pub mod cor;
pub mod dirty;
pub mod fault;
pub mod file;
pub mod image;
pub mod lock;
pub mod memory;
pub mod nbd;
pub mod node;
pub mod qcow2;
pub mod shared_store;

pub use backend::{Backend, BlockStatus};
pub use cor::CorCache;
pub use dirty::DirtyBitmap;
pub use fault::{FaultInjector, FaultRules, OpKind};
pub use file::FileBackend;
pub use image::{
    create_image, create_image_with, image_info, memory_node, open_image, CacheLayers, Format,
    ImageInfo, ImageOptions, ImageSpec,
};
pub use lock::{LockProbe, LockSet, Perm};
pub use memory::MemoryBackend;
pub use nbd::NbdBackend;
pub use node::{BlockNode, CacheMode, NodeConfig, NodeStats, Op, Outcome, Phase, TraceEntry};
pub use qcow2::Qcow2Backend;
pub use shared_store::HostCache;

/// A zero-filled buffer whose size comes from a caller or guest: allocation failure is an
/// error (ENOMEM), never an abort of the process. The memory comes zeroed from the allocator
/// (calloc-style), so a large buffer costs nothing until it is touched.
pub fn zeroed_buffer(len: usize) -> crate::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let nomem = || crate::Error::os(libc::ENOMEM, format!("cannot allocate a {len}-byte buffer"));
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|_| nomem())?;
    // SAFETY: non-zero size; on success the allocation has exactly the layout a Vec<u8> of
    // capacity `len` owns (align 1), and alloc_zeroed initialized all `len` bytes.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout);
        if ptr.is_null() {
            return Err(nomem());
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}
