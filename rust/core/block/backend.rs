//! The storage interface every image format and transport implements.

use crate::Result;

/// What a range of a backend holds, as far as the backend knows without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// Data (or unknown): must be read to know.
    Data,
    /// Reads as zeroes (a hole, an unallocated or zero cluster).
    Zero,
}

impl BlockStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockStatus::Data => "data",
            BlockStatus::Zero => "zero",
        }
    }
}

/// Positional storage: the bottom of every node. Implementations are shared between the
/// thread that plays the CPU and the job workers, so every method takes `&self`.
///
/// Contract: `read_at`/`write_at` transfer the whole buffer or fail; callers (the node) have
/// already checked the range against `len()`. Reads past the end are the caller's bug.
// `len` is the storage length in bytes; an `is_empty` would mean nothing for a disk.
#[allow(clippy::len_without_is_empty)]
pub trait Backend: Send + Sync {
    /// A short name of the kind of backend ("file", "memory", "fault", ...).
    fn kind(&self) -> &'static str;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Reads like `read_at`; `Ok(true)` when a cache in this backend answered every byte and
    /// nothing reached the storage (the node then counts a cache hit, not a read).
    fn read_at_cached(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.read_at(buf, offset).map(|_| false)
    }

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// The current length in bytes (re-read from the storage, not cached).
    fn len(&self) -> Result<u64>;

    /// Deallocates a range where the backend can; the range then reads as zeroes.
    /// Backends that cannot discard return `Ok(false)` and leave the data as it was.
    fn discard(&self, _offset: u64, _len: u64) -> Result<bool> {
        Ok(false)
    }

    /// Makes a range read as zeroes, cheaply where the backend can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        write_zeroes_by_writing(self, offset, len)
    }

    /// Drops every cached copy of the data this backend (or the host for it) holds, so the
    /// next read goes to the storage. Called when a node is activated.
    fn drop_caches(&self) -> Result<()> {
        Ok(())
    }

    /// Changes the length to `len` bytes (a host-side resize of the disk): new bytes read as
    /// zeroes. Backends that cannot change their length refuse.
    fn resize(&self, _len: u64) -> Result<()> {
        Err(crate::Error::invalid(format!(
            "a {} backend cannot be resized",
            self.kind()
        )))
    }

    /// The node stops using the backend (inactivation, or close of an active node): write back
    /// everything cached, mark the image clean, forget what was cached. Never called on an
    /// inactive node. Formats with metadata (qcow2) implement it; raw has nothing to do.
    fn quiesce(&self) -> Result<()> {
        Ok(())
    }

    /// Operations the backend itself issued to the storage below it (format metadata:
    /// headers, tables); the node adds them to its own counters.
    fn metadata_stats(&self) -> super::node::NodeStats {
        super::node::NodeStats::default()
    }

    /// Blocks held by the caches in this backend (host cache, copy-on-read), if it has any.
    fn cached_blocks(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// What `offset..offset+len` holds (`len` > 0, inside the backend): the status of the
    /// byte at `offset` and how many bytes from there (1..=len) share it. A backend reports
    /// `Zero` only when it knows the bytes read as zeroes; when unsure it says `Data`. The
    /// default: data for the whole range.
    fn block_status(&self, _offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, len))
    }

    /// Bytes actually allocated on the storage, where known.
    fn allocated(&self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Makes a range read as zeroes the slow way: by writing zero-filled buffers.
pub fn write_zeroes_by_writing<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        backend.write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
