//! qcow2 (version 3, and version 2 images) as a `Backend` over another backend (the file).
//!
//! Our own layer rather than a crate, so that the migration lifecycle is exact:
//! - nothing is read until the node is active: the header is read by the first `len()` (the
//!   node's activation, or an active open) and every piece of metadata is dropped by
//!   `drop_caches` (activation) and `quiesce` (inactivation, close of an active node);
//! - metadata is written through (L1/L2 entries, refcounts), so "flush the caches" is a
//!   flush of the file; the caches only save reads;
//! - with lazy refcounts the dirty bit is set on the first allocating write (8-byte header
//!   write + flush, before the L2 update) and cleared by `quiesce` after a flush; a node that
//!   is closed while inactive never reaches `quiesce`, so it writes nothing.
//!
//! Not supported (clear `ImageFormatError`s): backing files, encryption, compressed clusters,
//! external data files, extended L2, writes to clusters shared with internal snapshots,
//! allocating writes with a refcount_order other than 4, a refcount table that must grow.

pub mod fuzz;
pub mod header;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::node::NodeStats;
use super::{Backend, BlockStatus};
use crate::{Error, Result};
pub use header::{create_empty, Header};

/// L1/L2 entry: bits 9..=55 hold the offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the cluster may be written in place.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// v3: the cluster reads as zeroes.
const ZERO: u64 = 1;
/// Memory the L2 cache may hold.
const L2_CACHE_BYTES: u64 = 32 << 20;

#[derive(Default)]
struct MetaCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// What is known of the image while the node is active.
struct State {
    h: Header,
    cs: u64,
    l1: Vec<u64>,
    reftable: Vec<u64>,
    l2_cache: HashMap<u64, Box<[u64]>>,
    l2_cache_max: usize,
    /// Where the next cluster is allocated (end of file, cluster-aligned).
    file_end: u64,
    /// Bytes of the file that may be read (data and metadata must lie below it).
    file_len: u64,
    dirty: bool,
}

/// A qcow2 image over `file`.
pub struct Qcow2Backend {
    file: Arc<dyn Backend>,
    readonly: bool,
    state: Mutex<Option<State>>,
    meta: MetaCounters,
}

enum Mapping {
    Zero,
    Data(u64),
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::format(format!("corrupt qcow2 image: {msg}"))
}

impl Qcow2Backend {
    /// Wraps `file`; reads nothing (the header is read at the first `len()`).
    pub fn new(file: Arc<dyn Backend>, readonly: bool) -> Self {
        Qcow2Backend {
            file,
            readonly,
            state: Mutex::new(None),
            meta: MetaCounters::default(),
        }
    }

    /// The file under the image.
    pub fn file(&self) -> &Arc<dyn Backend> {
        &self.file
    }

    fn lock(&self) -> MutexGuard<'_, Option<State>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count<T>(&self, r: &Result<T>, write: bool, len: u64) {
        let m = &self.meta;
        if write {
            m.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            m.reads.fetch_add(1, Ordering::Relaxed);
        }
        if r.is_ok() {
            let b = if write {
                &m.bytes_written
            } else {
                &m.bytes_read
            };
            b.fetch_add(len, Ordering::Relaxed);
        } else {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn meta_read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let r = self.file.read_at(buf, off);
        self.count(&r, false, buf.len() as u64);
        r
    }
    fn meta_write(&self, buf: &[u8], off: u64) -> Result<()> {
        let r = self.file.write_at(buf, off);
        self.count(&r, true, buf.len() as u64);
        r
    }
    fn meta_flush(&self) -> Result<()> {
        let r = self.file.flush();
        self.meta.flushes.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.meta.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Reads and validates the header, the L1 table and the refcount table.
    fn load(&self) -> Result<State> {
        let file_len = self.file.len()?;
        let mut head = vec![0u8; file_len.min(4096) as usize];
        self.meta_read(&mut head, 0)?;
        let h = Header::parse(&head, file_len)?;
        if !self.readonly {
            if h.corrupt() {
                return Err(Error::format(
                    "qcow2 image is marked corrupt: it can be opened read-only only (repair it \
                     with qemu-img check -r all)",
                ));
            }
            if h.dirty() {
                return Err(Error::format(
                    "qcow2 image is dirty (lazy refcounts of a writer that did not close it): \
                     repair it with qemu-img check -r all, or open it read-only",
                ));
            }
        }
        let cs = h.cluster_size();
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        if !l1.is_empty() {
            self.meta_read(&mut l1, h.l1_table_offset)?;
        }
        let l1: Vec<u64> = l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut rt = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        self.meta_read(&mut rt, h.refcount_table_offset)?;
        let reftable: Vec<u64> = rt
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        for (i, &e) in reftable.iter().enumerate() {
            if e != 0 && (e % cs != 0 || e.checked_add(cs).is_none_or(|end| end > file_len)) {
                return Err(corrupt(format!(
                    "refcount block {i} at {e:#x} is unaligned or beyond the end of the file"
                )));
            }
        }
        let l2_cache_max = (L2_CACHE_BYTES / cs).max(4) as usize;
        Ok(State {
            dirty: h.dirty(),
            cs,
            l1,
            reftable,
            l2_cache: HashMap::new(),
            l2_cache_max,
            file_end: file_len.next_multiple_of(cs),
            file_len,
            h,
        })
    }

    /// The loaded state, loading it when needed.
    fn state<'a>(&self, g: &'a mut MutexGuard<'_, Option<State>>) -> Result<&'a mut State> {
        if g.is_none() {
            **g = Some(self.load()?);
        }
        Ok(g.as_mut().expect("loaded"))
    }

    /// Whether the cluster at `off` holds the header, the L1 table or the refcount table: a
    /// data cluster or an L2 table there is corrupt metadata, and writing it would destroy the
    /// image (QEMU's overlap check, for the fixed structures).
    fn overlaps_metadata(st: &State, off: u64) -> bool {
        let end = off.saturating_add(st.cs);
        let hits = |start: u64, len: u64| len > 0 && off < start.saturating_add(len) && start < end;
        off < st.cs
            || hits(st.h.l1_table_offset, u64::from(st.h.l1_size) * 8)
            || hits(
                st.h.refcount_table_offset,
                u64::from(st.h.refcount_table_clusters) * st.cs,
            )
    }

    /// The L2 table at `l2_off` (from the cache, or read and cached).
    fn l2_table<'a>(&self, st: &'a mut State, l2_off: u64) -> Result<&'a mut [u64]> {
        if !st.l2_cache.contains_key(&l2_off) {
            if l2_off % st.cs != 0
                || l2_off.checked_add(st.cs).is_none_or(|e| e > st.file_len)
                || Self::overlaps_metadata(st, l2_off)
            {
                return Err(corrupt(format!(
                    "L2 table at {l2_off:#x} is unaligned, beyond the end of the file or over \
                     the header, L1 or refcount table"
                )));
            }
            let mut raw = vec![0u8; st.cs as usize];
            self.meta_read(&mut raw, l2_off)?;
            let table: Box<[u64]> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect();
            if st.l2_cache.len() >= st.l2_cache_max {
                if let Some(k) = st.l2_cache.keys().next().copied() {
                    st.l2_cache.remove(&k);
                }
            }
            st.l2_cache.insert(l2_off, table);
        }
        Ok(st.l2_cache.get_mut(&l2_off).expect("cached"))
    }

    fn indexes(st: &State, guest: u64) -> (usize, usize) {
        let cb = st.h.cluster_bits;
        let l2_bits = cb - 3;
        let l1_i = (guest >> (cb + l2_bits)) as usize;
        let l2_i = ((guest >> cb) & ((1 << l2_bits) - 1)) as usize;
        (l1_i, l2_i)
    }

    /// Where the cluster holding guest offset `guest` lives (the raw L2 entry, 0 if none).
    fn l2_entry(&self, st: &mut State, guest: u64) -> Result<u64> {
        let (l1_i, l2_i) = Self::indexes(st, guest);
        let l1e = st.l1.get(l1_i).copied().unwrap_or(0);
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        Ok(self.l2_table(st, l2_off)?[l2_i])
    }

    fn map(&self, st: &mut State, guest: u64, len: u64) -> Result<Mapping> {
        let e = self.l2_entry(st, guest)?;
        if e & COMPRESSED != 0 {
            return Err(Error::format(
                "compressed qcow2 clusters are not supported by blockemu",
            ));
        }
        let off = e & OFFSET_MASK;
        if (st.h.version >= 3 && e & ZERO != 0) || off == 0 {
            return Ok(Mapping::Zero);
        }
        if off % st.cs != 0 {
            return Err(corrupt(format!(
                "data cluster offset {off:#x} is unaligned"
            )));
        }
        let host = off + (guest & (st.cs - 1));
        if host.checked_add(len).is_none_or(|end| end > st.file_len) {
            return Err(corrupt(format!(
                "data cluster at {off:#x} is beyond the end of the file"
            )));
        }
        Ok(Mapping::Data(host))
    }

    /// With lazy refcounts: marks the image dirty before the first metadata update
    /// (8-byte header write, then a flush; the flag changes only if both worked). Any
    /// autoclear bit is cleared before the first write too, as the specification asks.
    fn before_metadata_update(&self, st: &mut State) -> Result<()> {
        if st.h.autoclear != 0 {
            self.meta_write(&[0u8; 8], header::AUTOCLEAR_OFFSET)?;
            st.h.autoclear = 0;
        }
        if st.h.version >= 3 && st.h.lazy_refcounts() && !st.dirty {
            let v = st.h.incompatible | header::INCOMPAT_DIRTY;
            self.meta_write(&v.to_be_bytes(), header::INCOMPAT_OFFSET)?;
            self.meta_flush()?;
            st.h.incompatible = v;
            st.dirty = true;
        }
        Ok(())
    }

    /// Sets the refcount of the cluster at `off` to 1 (allocating a refcount block if needed).
    fn set_refcount_one(&self, st: &mut State, off: u64) -> Result<()> {
        if st.h.refcount_order != 4 {
            return Err(Error::format(format!(
                "writing qcow2 images with refcount_order {} is not supported (only 4)",
                st.h.refcount_order
            )));
        }
        let per_block = st.cs / 2;
        let idx = off >> st.h.cluster_bits;
        let rt_i = (idx / per_block) as usize;
        if rt_i >= st.reftable.len() {
            return Err(Error::format(
                "qcow2 refcount table is full (growing it is not supported by blockemu)",
            ));
        }
        let mut block = st.reftable[rt_i];
        let mut self_ref_elsewhere = None;
        if block == 0 {
            block = st.file_end;
            st.file_end += st.cs;
            st.file_len = st.file_len.max(st.file_end);
            let mut zeroes = vec![0u8; st.cs as usize];
            let self_idx = block >> st.h.cluster_bits;
            if self_idx / per_block == rt_i as u64 {
                let at = (2 * (self_idx % per_block)) as usize;
                zeroes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
            } else {
                self_ref_elsewhere = Some(block);
            }
            self.meta_write(&zeroes, block)?;
            let at = st.h.refcount_table_offset + 8 * rt_i as u64;
            self.meta_write(&block.to_be_bytes(), at)?;
            st.reftable[rt_i] = block;
        }
        let at = block + 2 * (idx % per_block);
        self.meta_write(&1u16.to_be_bytes(), at)?;
        if let Some(b) = self_ref_elsewhere {
            self.set_refcount_one(st, b)?;
        }
        Ok(())
    }

    /// A new cluster at the end of the file, its refcount set (the caller writes it).
    fn alloc_cluster(&self, st: &mut State) -> Result<u64> {
        let off = st.file_end;
        st.file_end += st.cs;
        st.file_len = st.file_len.max(st.file_end);
        self.set_refcount_one(st, off)?;
        Ok(off)
    }

    /// Writes `data` into the cluster holding `guest`, allocating it (metadata lock held).
    fn write_cluster(
        &self,
        guard: &mut MutexGuard<'_, Option<State>>,
        data: &[u8],
        guest: u64,
    ) -> Result<()> {
        let st = self.state(guard)?;
        let e = self.l2_entry(st, guest)?;
        let shared = || {
            Error::format(
                "writing a qcow2 cluster shared with an internal snapshot is not supported",
            )
        };
        if e & COMPRESSED != 0 {
            return Err(Error::format(
                "compressed qcow2 clusters are not supported by blockemu",
            ));
        }
        let in_off = (guest & (st.cs - 1)) as usize;
        let off = e & OFFSET_MASK;
        let zero_flag = st.h.version >= 3 && e & ZERO != 0;
        if off != 0 && !zero_flag {
            // Allocated but not COPIED (write_at writes COPIED clusters in place itself).
            return Err(shared());
        }
        // Allocating write (or a zero cluster): metadata changes.
        self.before_metadata_update(st)?;
        let (l1_i, l2_i) = Self::indexes(st, guest);
        if l1_i >= st.l1.len() {
            return Err(corrupt("write beyond the L1 table"));
        }
        let mut l2_off = st.l1[l1_i] & OFFSET_MASK;
        if l2_off == 0 {
            let zeroes = vec![0u8; st.cs as usize];
            l2_off = self.alloc_cluster(st)?;
            self.meta_write(&zeroes, l2_off)?;
            let v = l2_off | COPIED;
            self.meta_write(&v.to_be_bytes(), st.h.l1_table_offset + 8 * l1_i as u64)?;
            st.l1[l1_i] = v;
            if st.l2_cache.len() >= st.l2_cache_max {
                if let Some(k) = st.l2_cache.keys().next().copied() {
                    st.l2_cache.remove(&k);
                }
            }
            st.l2_cache
                .insert(l2_off, vec![0u64; (st.cs / 8) as usize].into_boxed_slice());
        } else if st.l1[l1_i] & COPIED == 0 {
            return Err(shared());
        }
        let mut cluster = vec![0u8; st.cs as usize];
        cluster[in_off..in_off + data.len()].copy_from_slice(data);
        let host = if zero_flag && off != 0 {
            if e & COPIED == 0 {
                return Err(shared());
            }
            if off % st.cs != 0 || off + st.cs > st.file_len || Self::overlaps_metadata(st, off) {
                return Err(corrupt(format!(
                    "zero cluster at {off:#x} is out of the file"
                )));
            }
            off
        } else {
            self.alloc_cluster(st)?
        };
        self.file.write_at(&cluster, host)?;
        let v = host | COPIED;
        self.meta_write(&v.to_be_bytes(), l2_off + 8 * l2_i as u64)?;
        self.l2_table(st, l2_off)?[l2_i] = v;
        Ok(())
    }

    /// Whether the image is marked dirty now (None before the header was read).
    pub fn dirty(&self) -> Option<bool> {
        self.lock().as_ref().map(|s| s.dirty)
    }
}

impl Backend for Qcow2Backend {
    fn kind(&self) -> &'static str {
        "qcow2"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let mapping;
            let n;
            {
                let mut g = self.lock();
                let st = self.state(&mut g)?;
                let in_off = guest & (st.cs - 1);
                n = ((st.cs - in_off) as usize).min(buf.len() - done);
                mapping = self.map(st, guest, n as u64)?;
            }
            let part = &mut buf[done..done + n];
            match mapping {
                Mapping::Zero => part.fill(0),
                Mapping::Data(host) => self.file.read_at(part, host)?,
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.readonly {
            return Err(Error::read_only("qcow2 image is open read-only"));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let mut g = self.lock();
            let st = self.state(&mut g)?;
            let in_off = guest & (st.cs - 1);
            let n = ((st.cs - in_off) as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            let e = self.l2_entry(st, guest)?;
            let in_place = e & (COMPRESSED | COPIED) == COPIED
                && e & OFFSET_MASK != 0
                && !(st.h.version >= 3 && e & ZERO != 0);
            if in_place && Self::overlaps_metadata(st, e & OFFSET_MASK) {
                return Err(corrupt(format!(
                    "data cluster at {:#x} overlaps the header, L1 or refcount table",
                    e & OFFSET_MASK
                )));
            }
            if in_place {
                // Allocated and ours alone: the data goes out without the metadata lock.
                let Mapping::Data(host) = self.map(st, guest, n as u64)? else {
                    unreachable!("an allocated cluster maps to data")
                };
                drop(g);
                self.file.write_at(part, host)?;
            } else {
                self.write_cluster(&mut g, part, guest)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        // Metadata is written through: flushing the file flushes every cache.
        self.file.flush()
    }

    /// The virtual size; reads the header when the image is not loaded yet.
    fn len(&self) -> Result<u64> {
        let mut g = self.lock();
        Ok(self.state(&mut g)?.h.size)
    }

    fn drop_caches(&self) -> Result<()> {
        *self.lock() = None;
        self.file.drop_caches()
    }

    fn quiesce(&self) -> Result<()> {
        let mut g = self.lock();
        if let Some(st) = g.as_mut() {
            if st.dirty && !self.readonly {
                // Caches are written through: flush the file, then clear the dirty bit.
                self.meta_flush()?;
                let v = st.h.incompatible & !header::INCOMPAT_DIRTY;
                self.meta_write(&v.to_be_bytes(), header::INCOMPAT_OFFSET)?;
                self.meta_flush()?;
                st.h.incompatible = v;
                st.dirty = false;
            }
        }
        *g = None;
        Ok(())
    }

    fn allocated(&self) -> Result<Option<u64>> {
        self.file.allocated()
    }

    /// Unallocated clusters and (v3) zero clusters read as zeroes; every other cluster
    /// (allocated, compressed) is data. Looks at most 1 GiB ahead per call.
    fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let len = len.min(1 << 30);
        let mut g = self.lock();
        let st = self.state(&mut g)?;
        let status_of = |e: u64, v3: bool| {
            if e & COMPRESSED != 0 {
                BlockStatus::Data
            } else if (v3 && e & ZERO != 0) || e & OFFSET_MASK == 0 {
                BlockStatus::Zero
            } else {
                BlockStatus::Data
            }
        };
        let v3 = st.h.version >= 3;
        let mut first = None;
        let mut done = 0u64;
        while done < len {
            let guest = offset + done;
            let e = self.l2_entry(st, guest)?;
            let status = status_of(e, v3);
            match first {
                None => first = Some(status),
                Some(s) if s != status => break,
                Some(_) => {}
            }
            done += st.cs - (guest & (st.cs - 1));
        }
        Ok((first.unwrap_or(BlockStatus::Data), done.min(len)))
    }

    fn metadata_stats(&self) -> NodeStats {
        let m = &self.meta;
        NodeStats {
            reads: m.reads.load(Ordering::Relaxed),
            writes: m.writes.load(Ordering::Relaxed),
            flushes: m.flushes.load(Ordering::Relaxed),
            bytes_read: m.bytes_read.load(Ordering::Relaxed),
            bytes_written: m.bytes_written.load(Ordering::Relaxed),
            errors: m.errors.load(Ordering::Relaxed),
            ..NodeStats::default()
        }
    }
}
