//! A copy-on-read overlay: a local cache file in front of any base backend.
//!
//! Reads fill the cache (in 4 KiB blocks), later reads of a filled block are answered from it
//! (cache hits, not reads of the base); writes go through to the base and into the cached
//! blocks they touch. Every block carries the *epoch* in which it was filled; activation of
//! the node starts a new epoch, so a block cached before this host took the image over is
//! never served again (DESIGN.md: the destination must drop every cache before the guest
//! runs). The tags live beside the cache, in `<cache>.tags` (a u64 epoch counter, then one
//! u64 tag per block, little-endian), so an A → B → A ping-pong finds A's old blocks stale
//! even across a restart of A.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::shared_store::{cached_backend, BlockStore, Cached, CACHE_BLOCK};
use super::Backend;
use crate::{Error, Result};

pub(crate) struct FileStore {
    data: File,
    tags_file: File,
    path: PathBuf,
    epoch: AtomicU64,
    tags: Mutex<HashMap<u64, u64>>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(std::io::Error) -> Error + 'a {
    move |e| Error::io(e).with_path(path).with_op(op)
}

impl FileStore {
    fn open(path: &Path) -> Result<Self> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io_err(p, "open"))
        };
        let data = open(path)?;
        let mut tags_path = path.as_os_str().to_owned();
        tags_path.push(".tags");
        let tags_path = PathBuf::from(tags_path);
        let tags_file = open(&tags_path)?;
        let mut raw = Vec::new();
        {
            use std::io::Read;
            (&tags_file)
                .read_to_end(&mut raw)
                .map_err(io_err(&tags_path, "read"))?;
        }
        let word = |i: usize| {
            raw.get(i * 8..i * 8 + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        };
        let epoch = word(0).unwrap_or(0).max(1);
        let mut tags = HashMap::new();
        let mut i = 1;
        while let Some(t) = word(i) {
            if t != 0 {
                tags.insert(i as u64 - 1, t);
            }
            i += 1;
        }
        tags_file
            .write_all_at(&epoch.to_le_bytes(), 0)
            .map_err(io_err(&tags_path, "write"))?;
        Ok(FileStore {
            data,
            tags_file,
            path: path.to_path_buf(),
            epoch: AtomicU64::new(epoch),
            tags: Mutex::new(tags),
        })
    }

    fn set_tag(&self, index: u64, tag: u64) -> Result<()> {
        self.tags_file
            .write_all_at(&tag.to_le_bytes(), 8 + index * 8)
            .map_err(io_err(&self.path, "write tags"))?;
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, tag);
        Ok(())
    }

    fn valid(&self, index: u64) -> bool {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index)
            == Some(&epoch)
    }
}

impl BlockStore for FileStore {
    fn get(&self, index: u64, buf: &mut [u8]) -> Result<bool> {
        if !self.valid(index) {
            return Ok(false);
        }
        self.data
            .read_exact_at(buf, index * CACHE_BLOCK)
            .map_err(io_err(&self.path, "read"))?;
        Ok(true)
    }
    fn put(&self, index: u64, data: &[u8]) -> Result<()> {
        self.data
            .write_all_at(data, index * CACHE_BLOCK)
            .map_err(io_err(&self.path, "write"))?;
        self.set_tag(index, self.epoch.load(Ordering::Acquire))
    }
    fn update(&self, index: u64, within: usize, data: &[u8]) -> Result<()> {
        if self.valid(index) {
            self.data
                .write_all_at(data, index * CACHE_BLOCK + within as u64)
                .map_err(io_err(&self.path, "write"))?;
        }
        Ok(())
    }
    fn invalidate(&self) -> Result<()> {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.tags_file
            .write_all_at(&epoch.to_le_bytes(), 0)
            .map_err(io_err(&self.path, "write tags"))
    }
    fn valid_blocks(&self) -> Result<u64> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        Ok(tags.values().filter(|&&t| t == epoch).count() as u64)
    }
}

/// A copy-on-read overlay (see the module doc).
pub struct CorCache(pub(crate) Cached<FileStore>);

impl CorCache {
    /// Opens (creating if needed) the cache file `cache` in front of `base`. `revalidate`:
    /// activation starts a new epoch (blocks cached before are dropped); `false` keeps them
    /// (the pre-2010 hazard, for demonstrations only).
    pub fn open(base: Arc<dyn Backend>, cache: &Path, revalidate: bool) -> Result<Self> {
        Ok(CorCache(Cached {
            base,
            store: FileStore::open(cache)?,
            revalidate,
            io: Mutex::new(()),
        }))
    }

    /// The current epoch (starts at 1; activation adds one).
    pub fn epoch(&self) -> u64 {
        self.0.store.epoch.load(Ordering::Acquire)
    }
}

cached_backend!(CorCache, "copy-on-read");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemoryBackend;

    #[test]
    fn activation_drops_blocks_of_an_older_epoch_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cor.cache");
        let base: Arc<dyn Backend> = Arc::new(MemoryBackend::new(16384).unwrap());
        let mut buf = [0u8; 512];
        {
            let cor = CorCache::open(base.clone(), &cache, true).unwrap();
            assert!(!cor.read_at_cached(&mut buf, 4096).unwrap());
            assert!(cor.read_at_cached(&mut buf, 4096).unwrap());
            assert_eq!(cor.cached_blocks().unwrap(), Some(1));
        }
        base.write_at(&[5u8; 512], 4096).unwrap(); // the other host's write
        let cor = CorCache::open(base.clone(), &cache, true).unwrap();
        assert!(
            cor.read_at_cached(&mut buf, 4096).unwrap(),
            "same epoch: stale hit"
        );
        assert_eq!(buf, [0u8; 512]);
        cor.drop_caches().unwrap();
        assert_eq!(cor.cached_blocks().unwrap(), Some(0));
        assert!(!cor.read_at_cached(&mut buf, 4096).unwrap());
        assert_eq!(buf, [5u8; 512]);
        cor.write_at(&[6u8; 10], 4100).unwrap();
        assert!(cor.read_at_cached(&mut buf, 4096).unwrap());
        assert_eq!(buf[4..14], [6u8; 10]);
        let mut b2 = [0u8; 10];
        base.read_at(&mut b2, 4100).unwrap();
        assert_eq!(b2, [6u8; 10], "writes go through");
    }
}
