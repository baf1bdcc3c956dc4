//! Caches in front of a backend that serve what was read earlier, and the two models built on
//! them that reproduce the 2010 hazard (DESIGN.md):
//!
//! - [`HostCache`]: a *weakly coherent shared store*. Each node stands for one host's open of
//!   a shared file (an NFS client): it keeps its own copy of every page it read or wrote and
//!   serves it again even after another host (another node, another process) wrote the file.
//!   Only a re-open revalidates: activation (`drop_caches`) drops the copies, as NFS
//!   close-to-open consistency does. Processes share no memory, so two processes on one
//!   machine see each other's writes only as two NFS clients would.
//! - [`CorCache`] (in `cor`): a copy-on-read overlay, whose cache lives in a local file.
//!
//! Both count the reads they answer from the cache, so the node can count them as cache hits
//! and not as reads that reached the storage. `revalidate = false` keeps the cache across
//! activation: QEMU's behaviour before 2010, kept only to demonstrate the hazard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Backend;
use crate::Result;

/// The cache granule of both models (a page).
pub const CACHE_BLOCK: u64 = 4096;

/// Most memory one [`HostCache`] holds (256 MiB of pages): like a real page cache it evicts
/// (an arbitrary page) when full, so guest reads of a big image cannot grow it without bound.
pub const HOST_CACHE_MAX_BYTES: u64 = 256 << 20;

/// Where a block cache keeps its blocks.
pub(crate) trait BlockStore: Send + Sync {
    /// The cached copy of block `index` (`len` bytes), if valid.
    fn get(&self, index: u64, buf: &mut [u8]) -> Result<bool>;
    /// Stores `data` as block `index` (valid from now on).
    fn put(&self, index: u64, data: &[u8]) -> Result<()>;
    /// Updates `data` at `within` of block `index` if that block is cached (else nothing).
    fn update(&self, index: u64, within: usize, data: &[u8]) -> Result<()>;
    /// Invalidates every block cached so far.
    fn invalidate(&self) -> Result<()>;
    /// Blocks cached and valid now.
    fn valid_blocks(&self) -> Result<u64>;
}

/// A backend behind a block cache (the common read/write logic of both models).
pub(crate) struct Cached<S: BlockStore> {
    pub(crate) base: Arc<dyn Backend>,
    pub(crate) store: S,
    pub(crate) revalidate: bool,
    /// Serializes fills and write-through so a block never mixes two versions.
    pub(crate) io: Mutex<()>,
}

impl<S: BlockStore> Cached<S> {
    /// Reads through the cache; `Ok(true)` when every byte came from the cache.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        let _g = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + buf.len() as u64;
        let base_len = self.base.len()?.max(end);
        let mut all_hit = true;
        let mut block = vec![0u8; CACHE_BLOCK as usize];
        let mut index = offset / CACHE_BLOCK;
        while index * CACHE_BLOCK < end {
            let bstart = index * CACHE_BLOCK;
            let blen = CACHE_BLOCK.min(base_len - bstart) as usize;
            let data = &mut block[..blen];
            if !self.store.get(index, data)? {
                all_hit = false;
                self.base.read_at(data, bstart)?;
                self.store.put(index, data)?;
            }
            let from = offset.max(bstart);
            let to = end.min(bstart + blen as u64);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            index += 1;
        }
        Ok(all_hit)
    }

    /// Writes through to the base, then into the cached copies the write touches.
    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _g = self.io.lock().unwrap_or_else(|p| p.into_inner());
        self.base.write_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        let mut index = offset / CACHE_BLOCK;
        while index * CACHE_BLOCK < end {
            let bstart = index * CACHE_BLOCK;
            let from = offset.max(bstart);
            let to = end.min(bstart + CACHE_BLOCK);
            let part = &buf[(from - offset) as usize..(to - offset) as usize];
            self.store.update(index, (from - bstart) as usize, part)?;
            index += 1;
        }
        Ok(())
    }

    /// Invalidates after a change of the data the cache cannot follow (discard, zeroes).
    pub(crate) fn forget(&self) -> Result<()> {
        let _g = self.io.lock().unwrap_or_else(|p| p.into_inner());
        self.store.invalidate()
    }

    /// Activation: revalidate (drop every cached block), unless told not to.
    pub(crate) fn drop_caches(&self) -> Result<()> {
        if self.revalidate {
            self.forget()?;
        }
        self.base.drop_caches()
    }
}

/// Blocks in memory: one host's page cache of a shared file, at most `max_blocks` of them.
pub(crate) struct MemoryStore {
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    max_blocks: usize,
}

impl BlockStore for MemoryStore {
    fn get(&self, index: u64, buf: &mut [u8]) -> Result<bool> {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        match blocks.get(&index) {
            Some(b) if b.len() >= buf.len() => {
                buf.copy_from_slice(&b[..buf.len()]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    fn put(&self, index: u64, data: &[u8]) -> Result<()> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if blocks.len() >= self.max_blocks && !blocks.contains_key(&index) {
            // Full: evict a page (it is read from the storage again when needed).
            if let Some(k) = blocks.keys().next().copied() {
                blocks.remove(&k);
            }
        }
        blocks.insert(index, data.into());
        Ok(())
    }
    fn update(&self, index: u64, within: usize, data: &[u8]) -> Result<()> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = blocks.get_mut(&index) {
            if within + data.len() <= b.len() {
                b[within..within + data.len()].copy_from_slice(data);
            } else {
                blocks.remove(&index);
            }
        }
        Ok(())
    }
    fn invalidate(&self) -> Result<()> {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }
    fn valid_blocks(&self) -> Result<u64> {
        Ok(self.blocks.lock().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
}

/// One host's view of a file on weakly coherent shared storage (see the module doc).
pub struct HostCache(pub(crate) Cached<MemoryStore>);

impl HostCache {
    /// `revalidate`: activation drops the cached pages (NFS close-to-open); `false` keeps
    /// them (the pre-2010 hazard, for demonstrations only).
    pub fn new(base: Arc<dyn Backend>, revalidate: bool) -> Self {
        Self::with_capacity(
            base,
            revalidate,
            (HOST_CACHE_MAX_BYTES / CACHE_BLOCK) as usize,
        )
    }

    /// Like [`new`](Self::new), holding at most `max_blocks` pages (at least 1).
    pub fn with_capacity(base: Arc<dyn Backend>, revalidate: bool, max_blocks: usize) -> Self {
        HostCache(Cached {
            base,
            store: MemoryStore {
                blocks: Mutex::new(HashMap::new()),
                max_blocks: max_blocks.max(1),
            },
            revalidate,
            io: Mutex::new(()),
        })
    }
}

/// Implements `Backend` for a `Cached` wrapper (both models share it).
macro_rules! cached_backend {
    ($ty:ty, $kind:literal) => {
        impl $crate::block::Backend for $ty {
            fn kind(&self) -> &'static str {
                $kind
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> $crate::Result<()> {
                self.0.read(buf, offset).map(|_| ())
            }
            fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> $crate::Result<bool> {
                self.0.read(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> $crate::Result<()> {
                self.0.write(buf, offset)
            }
            fn flush(&self) -> $crate::Result<()> {
                self.0.base.flush()
            }
            fn len(&self) -> $crate::Result<u64> {
                self.0.base.len()
            }
            fn discard(&self, offset: u64, len: u64) -> $crate::Result<bool> {
                let r = self.0.base.discard(offset, len)?;
                self.0.forget()?;
                Ok(r)
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> $crate::Result<()> {
                self.0.base.write_zeroes(offset, len)?;
                self.0.forget()
            }
            fn drop_caches(&self) -> $crate::Result<()> {
                self.0.drop_caches()
            }
            fn resize(&self, len: u64) -> $crate::Result<()> {
                self.0.base.resize(len)?;
                self.0.forget()
            }
            fn allocated(&self) -> $crate::Result<Option<u64>> {
                self.0.base.allocated()
            }
            fn cached_blocks(&self) -> $crate::Result<Option<u64>> {
                let below = self.0.base.cached_blocks()?.unwrap_or(0);
                Ok(Some(self.0.store.valid_blocks()? + below))
            }
        }
    };
}
pub(crate) use cached_backend;

cached_backend!(HostCache, "host-cache");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemoryBackend;

    #[test]
    fn a_host_serves_its_stale_copy_until_it_revalidates() {
        let shared: Arc<dyn Backend> = Arc::new(MemoryBackend::new(16384).unwrap());
        let dest = HostCache::new(shared.clone(), true);
        let mut buf = [0u8; 512];
        assert!(!dest.read_at_cached(&mut buf, 0).unwrap());
        shared.write_at(&[7u8; 512], 0).unwrap(); // another host writes
        assert!(dest.read_at_cached(&mut buf, 0).unwrap());
        assert_eq!(buf, [0u8; 512], "stale copy served");
        dest.drop_caches().unwrap();
        assert!(!dest.read_at_cached(&mut buf, 0).unwrap());
        assert_eq!(buf, [7u8; 512]);
        // Own writes are seen at once.
        dest.write_at(&[9u8; 100], 10).unwrap();
        assert!(dest.read_at_cached(&mut buf, 0).unwrap());
        assert_eq!(buf[10..110], [9u8; 100]);
        assert_eq!(dest.cached_blocks().unwrap(), Some(1));

        let legacy = HostCache::new(shared.clone(), false);
        legacy.read_at(&mut buf, 0).unwrap();
        shared.write_at(&[1u8; 512], 0).unwrap();
        legacy.drop_caches().unwrap();
        legacy.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 7, "no revalidation: stale after activation");
    }

    /// Resource bound: reading a whole image through a host cache keeps at most its
    /// capacity of pages (before, every page read stayed: memory grew with the image).
    #[test]
    fn a_host_cache_holds_at_most_its_capacity() {
        let shared: Arc<dyn Backend> =
            Arc::new(MemoryBackend::new(64 * CACHE_BLOCK as usize).unwrap());
        for i in 0..64u64 {
            shared
                .write_at(&[i as u8; CACHE_BLOCK as usize], i * CACHE_BLOCK)
                .unwrap();
        }
        let host = HostCache::with_capacity(shared.clone(), true, 8);
        let mut buf = vec![0u8; 3 * CACHE_BLOCK as usize];
        for i in (0..62u64).step_by(3) {
            host.read_at(&mut buf, i * CACHE_BLOCK).unwrap();
            assert_eq!(buf[0], i as u8);
            assert_eq!(buf[2 * CACHE_BLOCK as usize], (i + 2) as u8);
            assert!(host.cached_blocks().unwrap().unwrap() <= 8);
        }
        // What is still cached is served from the cache, stale, as before.
        host.read_at(&mut buf[..512], 61 * CACHE_BLOCK).unwrap();
        shared.write_at(&[0xEE; 512], 61 * CACHE_BLOCK).unwrap();
        assert!(host
            .read_at_cached(&mut buf[..512], 61 * CACHE_BLOCK)
            .unwrap());
        assert_eq!(buf[0], 61);
        assert_eq!(
            HostCache::new(shared, true).0.store.max_blocks as u64,
            HOST_CACHE_MAX_BYTES / CACHE_BLOCK
        );
    }
}
