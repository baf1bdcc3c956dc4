//! `BlockNode`: one image as the rest of blockemu sees it. It guards a backend with the
//! migration lifecycle (active / inactive), the image lock, range checks and the cache mode,
//! and it counts and traces every operation that reaches the storage.
//!
//! The lifecycle rules (DESIGN.md) are enforced here:
//! - an inactive node issues no read or write at all: every I/O fails with `Inactive`;
//! - `activate` takes the write lock, then drops every cache, then lets I/O through;
//! - `inactivate` stops new I/O, waits for the I/O in flight, flushes, then lets go of the
//!   write lock; after it nothing is written;
//! - closing an inactive node writes nothing.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::dirty::{self, DirtyBitmap};
use super::lock::{self, LockSet};
use super::{Backend, BlockStatus};
use crate::{interrupt, Error, ErrorKind, Result};

/// How writes reach the storage (QEMU's `cache=` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Host page cache; a write completes when the host has it; `flush` makes it durable.
    Writeback,
    /// Host page cache, but every write is followed by a flush.
    Writethrough,
    /// O_DIRECT (bypass the host page cache); `flush` still needed for durability.
    None,
    /// O_DIRECT and a flush after every write.
    Directsync,
    /// Host page cache and flushes are ignored (fast, loses data on a host crash).
    Unsafe,
}

impl CacheMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "none" => CacheMode::None,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            other => {
                return Err(Error::invalid(format!(
                    "unknown cache mode {other:?} (expected writeback, writethrough, none, \
                     directsync or unsafe)"
                )))
            }
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::None => "none",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
    /// Whether the file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    fn flush_each_write(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
}

/// An operation, as it appears in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Lifecycle events, traced so that tests can check their order against the I/O.
    Activate,
    Inactivate,
    DropCaches,
    Close,
    /// A read answered by a cache in the backend: nothing reached the storage.
    CacheHit,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Activate => "activate",
            Op::Inactivate => "inactivate",
            Op::DropCaches => "drop_caches",
            Op::Close => "close",
            Op::CacheHit => "cache_hit",
        }
    }
}

/// What became of a traced operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It reached the storage and succeeded.
    Ok,
    /// It reached the storage and failed.
    Failed(ErrorKind),
    /// The node refused it; nothing reached the storage.
    Refused(ErrorKind),
}

/// One traced operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    pub seq: u64,
    /// CLOCK_MONOTONIC in nanoseconds (the clock of Python's `time.monotonic_ns`).
    pub time_ns: u64,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    /// Whether the node was active when the operation arrived.
    pub active: bool,
    pub outcome: Outcome,
}

/// Counters of operations that reached the storage (refused ones are not counted), and of
/// the reads a cache answered instead (`cache_hits`, `cache_bytes_read`: not in `reads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub cache_hits: u64,
    pub cache_bytes_read: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    cache_bytes_read: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// The node's lifecycle phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Active = 0,
    Inactive = 1,
    /// Between active and inactive (draining, flushing) or the other way.
    Transition = 2,
    Closed = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Active,
            1 => Phase::Inactive,
            2 => Phase::Transition,
            _ => Phase::Closed,
        }
    }
}

/// Bit of `gate` that says I/O may enter; the low bits count the I/O in flight.
const OPEN: u64 = 1 << 63;
const INFLIGHT: u64 = OPEN - 1;

/// At most this many dirty bitmaps per node (each write marks every one of them).
pub const MAX_DIRTY_BITMAPS: usize = 64;

/// How a node is put together.
pub struct NodeConfig {
    /// What the user named (path or URI); shown in messages.
    pub name: String,
    /// The image file, when there is one (locks, info).
    pub path: Option<PathBuf>,
    pub format: &'static str,
    pub readonly: bool,
    pub cache: CacheMode,
    /// Take QEMU-compatible image locks on `path`.
    pub locking: bool,
    /// The virtual size when it is known without reading the image (raw: the file size).
    pub size: Option<u64>,
}

pub struct BlockNode {
    name: String,
    path: Option<PathBuf>,
    format: &'static str,
    readonly: bool,
    cache: CacheMode,
    backend: Arc<dyn Backend>,
    /// Entry gate of I/O: OPEN bit + number of operations in flight.
    gate: AtomicU64,
    phase: AtomicU8,
    size: AtomicU64,
    size_known: AtomicBool,
    /// Serializes lifecycle transitions; holds the lock descriptor and what it holds.
    lifecycle: Mutex<Lifecycle>,
    /// A copy of `Lifecycle::locks` (`held << 8 | unshared`) for `locks()`, which must not
    /// wait for a transition: a transition holds `lifecycle` while it drains and flushes, and
    /// its waits run the interrupt hook, which needs the GIL that a Python caller of `locks()`
    /// would hold while it waited (a deadlock the concurrency hammer found).
    locks_now: AtomicU16,
    drained: Condvar,
    drain_lock: Mutex<()>,
    counters: Counters,
    trace_on: AtomicBool,
    trace: Mutex<Trace>,
    /// Number of dirty bitmaps: the write path reads only this when it is 0.
    bitmap_count: AtomicUsize,
    bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
}

struct Lifecycle {
    lock_file: Option<File>,
    locks: LockSet,
}

struct Trace {
    capacity: usize,
    next_seq: u64,
    entries: VecDeque<TraceEntry>,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Leaves the gate when dropped, so an early return cannot leak an in-flight count.
struct InFlight<'a>(&'a BlockNode);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let prev = self.0.gate.fetch_sub(1, Ordering::AcqRel);
        if prev & OPEN == 0 && prev & INFLIGHT == 1 {
            // The last operation of a draining node: wake the transition waiting for it.
            let _g = self.0.drain_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.0.drained.notify_all();
        }
    }
}

fn pack_locks(l: LockSet) -> u16 {
    u16::from(l.held) << 8 | u16::from(l.unshared)
}

impl BlockNode {
    /// Builds a node over `backend`. An active node takes the read-write (or read-only) image
    /// lock; an inactive one only the shared one. Nothing is read or written here.
    pub fn new(backend: Arc<dyn Backend>, config: NodeConfig, active: bool) -> Result<Self> {
        let mut lifecycle = Lifecycle {
            lock_file: None,
            locks: LockSet::NONE,
        };
        if config.locking {
            if let Some(path) = &config.path {
                let file = File::open(path).map_err(|e| Error::io(e).with_path(path))?;
                let want = Self::lockset(active, config.readonly);
                lock::transition(&file, path, LockSet::NONE, want)?;
                lifecycle.lock_file = Some(file);
                lifecycle.locks = want;
            }
        }
        let phase = if active {
            Phase::Active
        } else {
            Phase::Inactive
        };
        Ok(BlockNode {
            name: config.name,
            path: config.path,
            format: config.format,
            readonly: config.readonly,
            cache: config.cache,
            backend,
            gate: AtomicU64::new(if active { OPEN } else { 0 }),
            phase: AtomicU8::new(phase as u8),
            size: AtomicU64::new(config.size.unwrap_or(0)),
            size_known: AtomicBool::new(config.size.is_some()),
            locks_now: AtomicU16::new(pack_locks(lifecycle.locks)),
            lifecycle: Mutex::new(lifecycle),
            drained: Condvar::new(),
            drain_lock: Mutex::new(()),
            counters: Counters::default(),
            trace_on: AtomicBool::new(false),
            trace: Mutex::new(Trace {
                capacity: 0,
                next_seq: 0,
                entries: VecDeque::new(),
            }),
            bitmap_count: AtomicUsize::new(0),
            bitmaps: RwLock::new(Vec::new()),
        })
    }

    fn lockset(active: bool, readonly: bool) -> LockSet {
        match (active, readonly) {
            (false, _) => LockSet::INACTIVE,
            (true, true) => LockSet::READ_ONLY,
            (true, false) => LockSet::READ_WRITE,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    pub fn format(&self) -> &'static str {
        self.format
    }
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    pub fn cache(&self) -> CacheMode {
        self.cache
    }
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }
    pub fn is_active(&self) -> bool {
        self.phase() == Phase::Active
    }
    pub fn is_closed(&self) -> bool {
        self.phase() == Phase::Closed
    }
    /// The backend under this node (for layers stacked on it).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The virtual size in bytes; `None` while it is unknown (an inactive image whose size
    /// is inside the image). Fails on a closed node.
    pub fn size(&self) -> Result<Option<u64>> {
        self.check_open()?;
        Ok(self
            .size_known
            .load(Ordering::Acquire)
            .then(|| self.size.load(Ordering::Acquire)))
    }

    /// The lock bytes this node holds now.
    /// Never blocks (during a transition: what was held when it started, or what it has
    /// taken so far).
    pub fn locks(&self) -> LockSet {
        let v = self.locks_now.load(Ordering::Acquire);
        LockSet {
            held: (v >> 8) as u8,
            unshared: v as u8,
        }
    }

    fn set_locks(&self, slot: &mut LockSet, locks: LockSet) {
        *slot = locks;
        self.locks_now.store(pack_locks(locks), Ordering::Release);
    }

    /// `Closed` on a closed node (for callers that must refuse before doing any work).
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(self.closed_error())
        } else {
            Ok(())
        }
    }

    fn closed_error(&self) -> Error {
        Error::closed(format!("I/O operation on closed node {:?}", self.name))
    }

    /// Enters the gate, or says why I/O is refused now.
    fn enter(&self, op: Op, offset: u64, len: u64) -> Result<InFlight<'_>> {
        let prev = self.gate.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self);
        if prev & OPEN != 0 {
            return Ok(guard);
        }
        drop(guard);
        let err = match self.phase() {
            Phase::Closed => self.closed_error(),
            Phase::Transition => Error::inactive(format!(
                "{} refused: node {:?} is changing state (activation or inactivation)",
                op.as_str(),
                self.name
            )),
            _ => Error::inactive(format!(
                "{} refused: node {:?} is inactive (it must not touch the image before \
                 activate())",
                op.as_str(),
                self.name
            )),
        };
        self.record(op, offset, len, Outcome::Refused(err.kind()));
        Err(err)
    }

    fn check_range(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => {
                let err = Error::out_of_range(format!(
                    "{} of {len} bytes at offset {offset} is beyond the end of {:?} \
                     ({size} bytes)",
                    op.as_str(),
                    self.name
                ));
                self.record(op, offset, len, Outcome::Refused(err.kind()));
                Err(err)
            }
        }
    }

    fn check_writable(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        if self.readonly {
            let err = Error::read_only(format!(
                "{} refused: node {:?} is read-only",
                op.as_str(),
                self.name
            ));
            self.record(op, offset, len, Outcome::Refused(err.kind()));
            return Err(err);
        }
        Ok(())
    }

    /// Counts and traces one operation that reached the storage.
    fn finish<T>(&self, op: Op, offset: u64, len: u64, result: Result<T>) -> Result<T> {
        let c = &self.counters;
        match &result {
            Ok(_) => {
                match op {
                    Op::Read => {
                        c.reads.fetch_add(1, Ordering::Relaxed);
                        c.bytes_read.fetch_add(len, Ordering::Relaxed);
                    }
                    Op::Write => {
                        c.writes.fetch_add(1, Ordering::Relaxed);
                        c.bytes_written.fetch_add(len, Ordering::Relaxed);
                    }
                    Op::Flush => {
                        c.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    Op::Discard => {
                        c.discards.fetch_add(1, Ordering::Relaxed);
                    }
                    Op::WriteZeroes => {
                        c.write_zeroes.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                self.record(op, offset, len, Outcome::Ok);
            }
            Err(e) => {
                // A failed operation reached the storage too: count it, and the error.
                match op {
                    Op::Read => c.reads.fetch_add(1, Ordering::Relaxed),
                    Op::Write => c.writes.fetch_add(1, Ordering::Relaxed),
                    Op::Flush => c.flushes.fetch_add(1, Ordering::Relaxed),
                    Op::Discard => c.discards.fetch_add(1, Ordering::Relaxed),
                    Op::WriteZeroes => c.write_zeroes.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                c.errors.fetch_add(1, Ordering::Relaxed);
                self.record(op, offset, len, Outcome::Failed(e.kind()));
            }
        }
        result
    }

    /// Checks, without issuing anything, that a read of `len` bytes at `offset` would be
    /// accepted now; callers use it before allocating a buffer for the read (a request for
    /// terabytes must fail as out of range, not as an allocation failure).
    pub fn check_read(&self, offset: u64, len: u64) -> Result<()> {
        if self.gate.load(Ordering::Acquire) & OPEN == 0 {
            // Not open for I/O: let `enter` say why (and trace the refusal).
            self.enter(Op::Read, offset, len)?;
        }
        self.check_range(Op::Read, offset, len)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let _in = self.enter(Op::Read, offset, len)?;
        self.check_range(Op::Read, offset, len)?;
        self.read_counted(offset, buf)
    }

    fn read_counted(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        match self.backend.read_at_cached(buf, offset) {
            Ok(true) => {
                let c = &self.counters;
                c.cache_hits.fetch_add(1, Ordering::Relaxed);
                c.cache_bytes_read.fetch_add(len, Ordering::Relaxed);
                self.record(Op::CacheHit, offset, len, Outcome::Ok);
                Ok(())
            }
            r => self.finish(Op::Read, offset, len, r.map(|_| ())),
        }
    }

    /// Reads even though the node is not active: what QEMU did before 2010 when a device was
    /// created on the destination of a migration (the `eager` geometry policy). Kept only to
    /// demonstrate the hazard; counted and traced like any read (the trace shows
    /// `active=false`). Refused only on a closed node or out of range.
    pub fn read_early(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_open()?;
        let len = buf.len() as u64;
        self.check_range(Op::Read, offset, len)?;
        self.read_counted(offset, buf)
    }

    /// Blocks held by the caches under this node (host cache, copy-on-read), if any.
    pub fn cached_blocks(&self) -> Result<Option<u64>> {
        self.check_open()?;
        self.backend.cached_blocks()
    }

    /// Writes `data` at `offset` (and flushes it when the cache mode asks for that).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let _in = self.enter(Op::Write, offset, len)?;
        self.check_writable(Op::Write, offset, len)?;
        self.check_range(Op::Write, offset, len)?;
        let r = self.backend.write_at(data, offset);
        self.mark_dirty(offset, len);
        self.finish(Op::Write, offset, len, r)?;
        if self.cache.flush_each_write() {
            let r = self.backend.flush();
            self.finish(Op::Flush, 0, 0, r)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        let _in = self.enter(Op::Flush, 0, 0)?;
        self.flush_inner()
    }

    fn flush_inner(&self) -> Result<()> {
        if self.readonly || self.cache == CacheMode::Unsafe {
            // Nothing of ours can be dirty / the user asked us to skip flushes.
            return Ok(());
        }
        let r = self.backend.flush();
        self.finish(Op::Flush, 0, 0, r)
    }

    /// Deallocates a range where the storage can (then it reads as zeroes); returns whether
    /// anything was deallocated.
    pub fn discard(&self, offset: u64, len: u64) -> Result<bool> {
        let _in = self.enter(Op::Discard, offset, len)?;
        self.check_writable(Op::Discard, offset, len)?;
        self.check_range(Op::Discard, offset, len)?;
        let r = self.backend.discard(offset, len);
        self.mark_dirty(offset, len);
        self.finish(Op::Discard, offset, len, r)
    }

    /// Makes a range read as zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _in = self.enter(Op::WriteZeroes, offset, len)?;
        self.check_writable(Op::WriteZeroes, offset, len)?;
        self.check_range(Op::WriteZeroes, offset, len)?;
        let r = self.backend.write_zeroes(offset, len);
        self.mark_dirty(offset, len);
        self.finish(Op::WriteZeroes, offset, len, r)?;
        if self.cache.flush_each_write() {
            let r = self.backend.flush();
            self.finish(Op::Flush, 0, 0, r)?;
        }
        Ok(())
    }

    /// Changes the virtual size (a host-side resize, e.g. `block_resize`): only on an active,
    /// writable node. Devices read the new size from here; growing adds zeroes.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        let _in = self.enter(Op::Write, new_size, 0)?;
        if self.readonly {
            return Err(Error::read_only(format!(
                "resize refused: node {:?} is read-only",
                self.name
            )));
        }
        // Held across the resize, so no bitmap can be added meanwhile.
        let bitmaps = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        if !bitmaps.is_empty() {
            let names: Vec<&str> = bitmaps.iter().map(|b| b.name()).collect();
            return Err(Error::invalid(format!(
                "resize refused: node {:?} has dirty bitmaps {names:?} (a mirror may be in \
                 progress); remove them first",
                self.name
            )));
        }
        self.backend.resize(new_size)?;
        self.size.store(new_size, Ordering::Release);
        self.size_known.store(true, Ordering::Release);
        Ok(())
    }

    /// Marks every enabled dirty bitmap after a write-like operation returned (whatever its
    /// outcome). One atomic load when the node has no bitmap.
    fn mark_dirty(&self, offset: u64, len: u64) {
        if self.bitmap_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let bitmaps = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        for b in bitmaps.iter() {
            b.note_write(offset, len);
        }
    }

    /// Adds an enabled, clean dirty bitmap named `name` over the node's current size.
    /// Refused on a closed node, on a node whose size is not known yet, for a name in use,
    /// and beyond [`MAX_DIRTY_BITMAPS`].
    pub fn add_dirty_bitmap(&self, name: &str, granularity: u64) -> Result<Arc<DirtyBitmap>> {
        dirty::check_name(name)?;
        dirty::check_granularity(granularity)?;
        let mut bitmaps = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let size = self.size()?.ok_or_else(|| {
            Error::inactive(format!(
                "node {:?} does not know its size yet: activate it before adding a dirty bitmap",
                self.name
            ))
        })?;
        if bitmaps.iter().any(|b| b.name() == name) {
            return Err(Error::invalid(format!(
                "node {:?} already has a dirty bitmap named {name:?}",
                self.name
            )));
        }
        if bitmaps.len() >= MAX_DIRTY_BITMAPS {
            return Err(Error::invalid(format!(
                "node {:?} has {MAX_DIRTY_BITMAPS} dirty bitmaps already (the limit)",
                self.name
            )));
        }
        let bitmap = Arc::new(DirtyBitmap::new(name, size, granularity)?);
        bitmaps.push(bitmap.clone());
        self.bitmap_count.store(bitmaps.len(), Ordering::Release);
        Ok(bitmap)
    }

    /// The dirty bitmap named `name`.
    pub fn dirty_bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let bitmaps = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        bitmaps.iter().find(|b| b.name() == name).cloned()
    }

    /// The names of the node's dirty bitmaps, oldest first.
    pub fn dirty_bitmaps(&self) -> Vec<String> {
        let bitmaps = self.bitmaps.read().unwrap_or_else(|p| p.into_inner());
        bitmaps.iter().map(|b| b.name().to_string()).collect()
    }

    /// Removes the dirty bitmap named `name` (it stops being marked); `Ok(None)` when there
    /// is none. Refused for a bitmap a mirror job owns.
    pub fn remove_dirty_bitmap(&self, name: &str) -> Result<Option<Arc<DirtyBitmap>>> {
        let mut bitmaps = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = bitmaps.iter().position(|b| b.name() == name) else {
            return Ok(None);
        };
        if bitmaps[i].is_busy() {
            return Err(Error::invalid(format!(
                "cannot remove dirty bitmap {name:?}: it is in use by a mirror job"
            )));
        }
        let b = bitmaps.remove(i);
        self.bitmap_count.store(bitmaps.len(), Ordering::Release);
        Ok(Some(b))
    }

    /// Removes this very bitmap (a job's own, busy or not); false if it is gone already.
    pub(crate) fn detach_dirty_bitmap(&self, bitmap: &Arc<DirtyBitmap>) -> bool {
        let mut bitmaps = self.bitmaps.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = bitmaps.iter().position(|b| Arc::ptr_eq(b, bitmap)) else {
            return false;
        };
        bitmaps.remove(i);
        self.bitmap_count.store(bitmaps.len(), Ordering::Release);
        true
    }

    /// What `offset..offset+len` holds (data or zeroes) and how many bytes from `offset`
    /// share that status (the backend's knowledge: holes, unallocated clusters). Refused like
    /// a read on an inactive node; counted nowhere (it reads no data).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let _in = self.enter(Op::Read, offset, len)?;
        self.check_range(Op::Read, offset, len)?;
        if len == 0 {
            return Err(Error::invalid("block_status of 0 bytes"));
        }
        let (status, n) = self.backend.block_status(offset, len)?;
        // Whatever a backend answers, never claim more than asked, never 0 bytes.
        Ok((status, n.clamp(1, len)))
    }

    /// Lets the format write back its metadata, clear its dirty bit (a read-only node has
    /// none) and forget its cached metadata. Only ever called on an active node.
    fn quiesce(&self) -> Result<()> {
        self.backend.quiesce()
    }

    /// Closes the gate and waits (interruptibly) until no operation is in flight.
    fn close_gate_and_drain(&self) -> Result<()> {
        self.gate.fetch_and(!OPEN, Ordering::AcqRel);
        loop {
            {
                let g = self.drain_lock.lock().unwrap_or_else(|p| p.into_inner());
                if self.gate.load(Ordering::Acquire) & INFLIGHT == 0 {
                    return Ok(());
                }
                drop(
                    self.drained
                        .wait_timeout(g, interrupt::POLL.min(Duration::from_millis(10)))
                        .unwrap_or_else(|p| p.into_inner()),
                );
            }
            // Outside `drain_lock`: the hook takes the GIL, and a Python thread holding the
            // GIL may be in `InFlight::drop` (a refused `check_read`) waiting for that lock.
            interrupt::check()?;
        }
    }

    fn open_gate(&self) {
        self.gate.fetch_or(OPEN, Ordering::AcqRel);
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Hands the image over: stops new I/O, waits for the I/O in flight, flushes, then lets go
    /// of the write lock. On failure the node stays active. A no-op on an inactive node.
    pub fn inactivate(&self) -> Result<()> {
        let mut guard = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let life = &mut *guard;
        match self.phase() {
            Phase::Closed => return Err(self.closed_error()),
            Phase::Inactive => return Ok(()),
            _ => {}
        }
        self.set_phase(Phase::Transition);
        let back_to_active = |e: Error| {
            self.set_phase(Phase::Active);
            self.open_gate();
            self.record(Op::Inactivate, 0, 0, Outcome::Failed(e.kind()));
            e
        };
        self.close_gate_and_drain().map_err(back_to_active)?;
        self.flush_inner().map_err(back_to_active)?;
        self.quiesce().map_err(back_to_active)?;
        if let (Some(file), Some(path)) = (&life.lock_file, &self.path) {
            lock::transition(file, path, life.locks, LockSet::INACTIVE).map_err(back_to_active)?;
            self.set_locks(&mut life.locks, LockSet::INACTIVE);
        }
        self.set_phase(Phase::Inactive);
        self.record(Op::Inactivate, 0, 0, Outcome::Ok);
        Ok(())
    }

    /// Takes the image over: takes the write lock (failing with `Lock` if another process
    /// still holds it), drops every cache, refreshes the size, then lets I/O through.
    /// On failure the node stays inactive. A no-op on an active node.
    pub fn activate(&self) -> Result<()> {
        let mut guard = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let life = &mut *guard;
        match self.phase() {
            Phase::Closed => return Err(self.closed_error()),
            Phase::Active => return Ok(()),
            _ => {}
        }
        self.set_phase(Phase::Transition);
        let want = Self::lockset(true, self.readonly);
        let old = life.locks;
        let back_to_inactive = |e: Error| {
            self.set_phase(Phase::Inactive);
            self.record(Op::Activate, 0, 0, Outcome::Failed(e.kind()));
            e
        };
        if let (Some(file), Some(path)) = (&life.lock_file, &self.path) {
            lock::transition(file, path, old, want).map_err(back_to_inactive)?;
            self.set_locks(&mut life.locks, want);
        }
        // The lock is ours: whatever anyone cached before this instant may be stale.
        let undo_lock = |life: &mut Lifecycle, e: Error| {
            if let (Some(file), Some(path)) = (&life.lock_file, &self.path) {
                if lock::transition(file, path, want, old).is_ok() {
                    self.set_locks(&mut life.locks, old);
                }
            }
            back_to_inactive(e)
        };
        let dropped = self.backend.drop_caches();
        self.record(
            Op::DropCaches,
            0,
            0,
            match &dropped {
                Ok(()) => Outcome::Ok,
                Err(e) => Outcome::Failed(e.kind()),
            },
        );
        if let Err(e) = dropped {
            return Err(undo_lock(life, e));
        }
        match self.backend.len() {
            Ok(len) => {
                self.size.store(len, Ordering::Release);
                self.size_known.store(true, Ordering::Release);
            }
            Err(e) => return Err(undo_lock(life, e)),
        }
        self.set_phase(Phase::Active);
        self.open_gate();
        self.record(Op::Activate, 0, 0, Outcome::Ok);
        Ok(())
    }

    /// Closes the node: an active writable node is flushed first; an inactive node writes
    /// nothing. Locks are released in every case; a second close is a no-op. The node is
    /// closed even when the final flush fails (that error is returned).
    pub fn close(&self) -> Result<()> {
        let mut guard = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let life = &mut *guard;
        let was = self.phase();
        if was == Phase::Closed {
            return Ok(());
        }
        self.set_phase(Phase::Transition);
        if let Err(e) = self.close_gate_and_drain() {
            self.set_phase(was);
            if was == Phase::Active {
                self.open_gate();
            }
            return Err(e);
        }
        let flushed = if was == Phase::Active {
            self.flush_inner().and_then(|()| self.quiesce())
        } else {
            Ok(())
        };
        // Dropping the descriptor releases every OFD lock it holds.
        life.lock_file = None;
        self.set_locks(&mut life.locks, LockSet::NONE);
        self.set_phase(Phase::Closed);
        self.record(Op::Close, 0, 0, Outcome::Ok);
        flushed
    }

    /// Operations that reached the storage: the node's own, plus the metadata I/O of the
    /// format (qcow2 headers and tables).
    pub fn stats(&self) -> NodeStats {
        let c = &self.counters;
        let m = self.backend.metadata_stats();
        NodeStats {
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_bytes_read: c.cache_bytes_read.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed) + m.reads,
            writes: c.writes.load(Ordering::Relaxed) + m.writes,
            flushes: c.flushes.load(Ordering::Relaxed) + m.flushes,
            discards: c.discards.load(Ordering::Relaxed) + m.discards,
            write_zeroes: c.write_zeroes.load(Ordering::Relaxed) + m.write_zeroes,
            bytes_read: c.bytes_read.load(Ordering::Relaxed) + m.bytes_read,
            bytes_written: c.bytes_written.load(Ordering::Relaxed) + m.bytes_written,
            errors: c.errors.load(Ordering::Relaxed) + m.errors,
        }
    }

    /// Bytes allocated on the storage, where the backend knows.
    pub fn allocated(&self) -> Result<Option<u64>> {
        self.check_open()?;
        self.backend.allocated()
    }

    /// Starts (or resizes) the trace: it keeps the last `capacity` operations; 0 stops it.
    pub fn set_trace(&self, capacity: usize) {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        t.capacity = capacity;
        while t.entries.len() > capacity {
            t.entries.pop_front();
        }
        self.trace_on.store(capacity > 0, Ordering::Release);
    }

    /// The traced operations, oldest first.
    pub fn trace(&self) -> Vec<TraceEntry> {
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        t.entries.iter().cloned().collect()
    }

    pub fn clear_trace(&self) {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        t.entries.clear();
    }

    fn record(&self, op: Op, offset: u64, len: u64, outcome: Outcome) {
        if !self.trace_on.load(Ordering::Acquire) {
            return;
        }
        let active = self.phase() == Phase::Active;
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if t.capacity == 0 {
            return;
        }
        if t.entries.len() == t.capacity {
            t.entries.pop_front();
        }
        let seq = t.next_seq;
        t.next_seq += 1;
        t.entries.push_back(TraceEntry {
            seq,
            time_ns: monotonic_ns(),
            op,
            offset,
            len,
            active,
            outcome,
        });
    }
}

impl Drop for BlockNode {
    fn drop(&mut self) {
        // Flush an active node that its owner forgot to close; never write an inactive one.
        let _ = self.close();
    }
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("phase", &self.phase())
            .field("readonly", &self.readonly)
            .finish()
    }
}
