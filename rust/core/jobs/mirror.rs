//! `MirrorJob`: copies a live source node to a target node while the source keeps being
//! written, the block half of a storage migration.
//!
//! The job adds its own dirty bitmap to the source (enabled before the first copy), then:
//! 1. **bulk**: walks the image in `chunk_size` pieces, up to `max_in_flight` copies at once
//!    (source read, target write, on the [`IoPool`]); with `sparse`, what the source reports
//!    as zeroes (holes, unallocated clusters) and chunks that read back as zeroes are not
//!    sent as data: skipped when the target is known to be zeroed, else written as zeroes;
//! 2. **dirty passes**: takes dirty runs from the bitmap (clearing them before the copy is
//!    correct because the node marks *after* each write completes) and copies them;
//! 3. **ready**: after the bulk phase, when what is dirty is at most `converge_bytes` (or
//!    would take at most `max_downtime` at the measured throughput); the job keeps copying
//!    what is dirtied meanwhile, and goes back to "dirty" if the remainder grows well past
//!    the threshold (twice it);
//! 4. **complete**: the caller stopped the writers; the job copies all that is still dirty
//!    (ignoring the speed limit), flushes the target, removes its bitmap and ends.
//!
//! Two copies of the same bytes are never in flight at once (a slow old copy could
//! otherwise land after a newer one). Any source read or target write error fails the job;
//! `cancel` lets the copies in flight finish and starts nothing new. Every wait has a
//! timeout and polls `interrupt::check`. Dropping the last handle of a running job cancels it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::io_pool::IoPool;
use super::lock;
use crate::block::dirty::{self, DirtyBitmap};
use crate::block::{zeroed_buffer, BlockNode, BlockStatus};
use crate::{interrupt, Error, ErrorKind, Result};

/// Smallest and largest `chunk_size`.
pub const MIN_CHUNK: u64 = 64 << 10;
pub const MAX_CHUNK: u64 = 32 << 20;
/// Largest `max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 64;
/// How often the controller re-evaluates rates and readiness when nothing else wakes it.
const TICK: Duration = Duration::from_millis(20);
/// Time constant of the smoothed rates.
const SMOOTHING: f64 = 1.0;

/// How a mirror runs.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Granularity of the job's dirty bitmap (a power of two >= 512).
    pub granularity: u64,
    /// Largest copy, and the size of each copy buffer (64 KiB ..= 32 MiB).
    pub chunk_size: u64,
    /// Copies in flight at most (1 ..= 64).
    pub max_in_flight: usize,
    /// Bytes per second read from the source (0: unlimited); changeable with `set_speed`.
    pub speed: u64,
    /// Ready when at most this many bytes are dirty.
    pub converge_bytes: u64,
    /// Ready too when the dirty bytes would take at most this long at the measured
    /// throughput.
    pub max_downtime: Option<Duration>,
    /// The target reads as zeroes already: zero regions are skipped in the bulk phase.
    pub target_zeroed: bool,
    /// Do not send zeroes as data (holes, zero clusters, all-zero chunks).
    pub sparse: bool,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            granularity: dirty::DEFAULT_GRANULARITY,
            chunk_size: 1 << 20,
            max_in_flight: 8,
            speed: 0,
            converge_bytes: 1 << 20,
            max_downtime: None,
            target_zeroed: false,
            sparse: true,
        }
    }
}

impl MirrorConfig {
    fn check(&self) -> Result<()> {
        dirty::check_granularity(self.granularity)?;
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_size) || self.chunk_size % 512 != 0 {
            return Err(Error::invalid(format!(
                "chunk_size must be a multiple of 512 from {MIN_CHUNK} to {MAX_CHUNK} bytes, \
                 got {}",
                self.chunk_size
            )));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_in_flight) {
            return Err(Error::invalid(format!(
                "max_in_flight must be from 1 to {MAX_IN_FLIGHT}, got {}",
                self.max_in_flight
            )));
        }
        Ok(())
    }
}

/// Where a mirror is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MirrorState {
    Bulk,
    Dirty,
    Ready,
    Completing,
    Completed,
    Failed,
    Cancelled,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorState::Bulk => "bulk",
            MirrorState::Dirty => "dirty",
            MirrorState::Ready => "ready",
            MirrorState::Completing => "completing",
            MirrorState::Completed => "completed",
            MirrorState::Failed => "failed",
            MirrorState::Cancelled => "cancelled",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MirrorState::Completed | MirrorState::Failed | MirrorState::Cancelled
        )
    }
}

/// A snapshot of a mirror's progress.
#[derive(Debug, Clone)]
pub struct MirrorProgress {
    pub state: MirrorState,
    /// `bytes_done` plus what remains (bulk not yet copied, dirty, in flight).
    pub bytes_total: u64,
    /// Bytes handled: bulk (copied, zero or skipped) and dirty runs copied.
    pub bytes_done: u64,
    /// Bytes written to the target as data.
    pub bytes_copied: u64,
    /// Bytes not sent as data because they are zeroes (skipped or written as zeroes).
    pub bytes_zero: u64,
    /// Sweeps over the dirty bitmap that copied something.
    pub passes: u64,
    /// Bytes dirty now (in the bitmap and in flight).
    pub dirty_bytes: u64,
    /// Bytes dirtied per second (smoothed).
    pub dirty_rate: f64,
    /// Bytes copied per second of copying (smoothed; 0 until measured).
    pub throughput: f64,
    pub elapsed: Duration,
    pub error: Option<Error>,
}

enum Next {
    Work(Work),
    Nothing,
    Again,
}

/// Why a piece of work did not start now.
#[derive(PartialEq, Eq)]
enum Blocked {
    No,
    Throttle,
    Overlap,
}

/// One piece of work.
#[derive(Debug, Clone, Copy)]
struct Work {
    offset: u64,
    len: u64,
    /// Write zeroes without reading (the source said zero).
    zero: bool,
    bulk: bool,
}

struct St {
    state: MirrorState,
    error: Option<Error>,
    cancel: bool,
    complete: bool,
    /// Incremented each time the job becomes ready (wait_ready cannot miss a short visit).
    ready_epoch: u64,
    in_flight: Vec<Work>,
    bulk_in_flight: usize,
    buffers: Vec<Vec<u8>>,
    speed: u64,
    /// Set by set_speed: the controller restarts its throttle clock.
    speed_changed: bool,
    // Progress.
    bulk_left: u64,
    dirty_bytes: u64,
    dirty_rate: f64,
    throughput: f64,
    passes: u64,
    ended: Option<Instant>,
    /// Since when some copy has been in flight (None: none is).
    busy_start: Option<Instant>,
    /// Copying time before `busy_start`.
    busy_total: Duration,
}

struct Shared {
    source: Arc<BlockNode>,
    target: Arc<BlockNode>,
    bitmap: Arc<DirtyBitmap>,
    config: MirrorConfig,
    size: u64,
    started: Instant,
    st: Mutex<St>,
    /// Wakes the controller (a copy ended, a request came) and the waiters (state changed).
    cv: Condvar,
    bytes_done: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_zero: AtomicU64,
    /// Bytes the copies handled by reading or writing (for the throughput).
    bytes_worked: AtomicU64,
    handles: AtomicU64,
}

/// A running (or finished) mirror. Cheap to clone; dropping the last clone of a running job
/// cancels it.
pub struct MirrorJob {
    shared: Arc<Shared>,
}

impl Clone for MirrorJob {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::AcqRel);
        MirrorJob {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.request(|st| st.cancel = true);
        }
    }
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("source", &self.shared.source.name())
            .field("target", &self.shared.target.name())
            .field("state", &self.state())
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = unsafe {
        // SAFETY: any bit pattern is a valid u64.
        buf.align_to::<u64>()
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body.chunks(8).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

impl MirrorJob {
    /// Checks everything, adds the job's bitmap to `source` and starts copying at once on
    /// background threads. Errors (before anything starts): sizes differ or are unknown,
    /// source and target are one node, the target is read-only, a node is not active, a
    /// config value is out of its bounds, the source has 64 bitmaps already.
    pub fn start(
        source: Arc<BlockNode>,
        target: Arc<BlockNode>,
        config: MirrorConfig,
    ) -> Result<MirrorJob> {
        config.check()?;
        if Arc::ptr_eq(&source, &target) {
            return Err(Error::invalid("a mirror needs two different nodes"));
        }
        for (what, node) in [("source", &source), ("target", &target)] {
            node.check_open()?;
            if !node.is_active() {
                return Err(Error::inactive(format!(
                    "mirror refused: the {what} node {:?} is not active",
                    node.name()
                )));
            }
        }
        if target.readonly() {
            return Err(Error::read_only(format!(
                "mirror refused: the target node {:?} is read-only",
                target.name()
            )));
        }
        let ssize = source.size()?;
        let tsize = target.size()?;
        let size = match (ssize, tsize) {
            (Some(a), Some(b)) if a == b => a,
            _ => {
                return Err(Error::invalid(format!(
                    "mirror refused: the source is {} bytes and the target {} bytes (they must \
                     be the same size)",
                    ssize.map_or("?".into(), |s| s.to_string()),
                    tsize.map_or("?".into(), |s| s.to_string()),
                )))
            }
        };
        let bitmap = loop {
            let name = format!("mirror-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
            match source.add_dirty_bitmap(&name, config.granularity) {
                Ok(b) => break b,
                // A user's bitmap has this name: take the next one.
                Err(_) if source.dirty_bitmap(&name).is_some() => continue,
                Err(e) => return Err(e),
            }
        };
        bitmap.set_busy(true);
        let speed = config.speed;
        let shared = Arc::new(Shared {
            source,
            target,
            bitmap,
            config,
            size,
            started: Instant::now(),
            st: Mutex::new(St {
                state: MirrorState::Bulk,
                error: None,
                cancel: false,
                complete: false,
                ready_epoch: 0,
                in_flight: Vec::new(),
                bulk_in_flight: 0,
                buffers: Vec::new(),
                speed,
                speed_changed: false,
                bulk_left: size,
                dirty_bytes: 0,
                dirty_rate: 0.0,
                throughput: 0.0,
                passes: 0,
                ended: None,
                busy_start: None,
                busy_total: Duration::ZERO,
            }),
            cv: Condvar::new(),
            bytes_done: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            bytes_zero: AtomicU64::new(0),
            bytes_worked: AtomicU64::new(0),
            handles: AtomicU64::new(1),
        });
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name("blockemu-mirror".into())
            .spawn(move || Controller::new(s).run());
        if let Err(e) = spawned {
            shared.bitmap.set_busy(false);
            shared.source.detach_dirty_bitmap(&shared.bitmap);
            return Err(Error::from(e).with_op("start mirror thread"));
        }
        Ok(MirrorJob { shared })
    }

    /// The name of the job's bitmap on the source.
    pub fn bitmap_name(&self) -> &str {
        self.shared.bitmap.name()
    }

    pub fn state(&self) -> MirrorState {
        lock(&self.shared.st).state
    }

    /// A snapshot of the progress (takes the job's lock only briefly).
    pub fn progress(&self) -> MirrorProgress {
        let s = &self.shared;
        let st = lock(&s.st);
        let in_flight: u64 = st.in_flight.iter().map(|w| w.len).sum();
        let done = s.bytes_done.load(Ordering::Acquire);
        let remaining = if st.state == MirrorState::Completed {
            0
        } else {
            st.bulk_left + st.dirty_bytes + in_flight
        };
        MirrorProgress {
            state: st.state,
            bytes_total: done + remaining,
            bytes_done: done,
            bytes_copied: s.bytes_copied.load(Ordering::Acquire),
            bytes_zero: s.bytes_zero.load(Ordering::Acquire),
            passes: st.passes,
            dirty_bytes: if st.state == MirrorState::Completed {
                0
            } else {
                st.dirty_bytes + in_flight
            },
            dirty_rate: st.dirty_rate,
            throughput: st.throughput,
            elapsed: st.ended.unwrap_or_else(Instant::now) - s.started,
            error: st.error.clone(),
        }
    }

    /// Changes the speed limit (bytes per second read from the source; 0: unlimited).
    pub fn set_speed(&self, bytes_per_second: u64) {
        self.shared.request(|st| {
            st.speed = bytes_per_second;
            st.speed_changed = true;
        });
    }

    /// Waits until the job is ready (or has been ready since this call began, or is
    /// completing or completed): `Ok(true)`; `Ok(false)` on timeout; the job's error if it
    /// failed, `Cancelled` if it was cancelled.
    pub fn wait_ready(&self, timeout: Option<Duration>) -> Result<bool> {
        let mut epoch = None;
        self.wait_until(timeout, |st| {
            let e = *epoch.get_or_insert(st.ready_epoch);
            match st.state {
                MirrorState::Failed => Some(Err(job_error(st))),
                MirrorState::Cancelled => Some(Err(cancelled())),
                MirrorState::Ready | MirrorState::Completing | MirrorState::Completed => {
                    Some(Ok(()))
                }
                _ if st.ready_epoch != e => Some(Ok(())),
                _ => None,
            }
        })
        .map(|r| r.is_some())
    }

    /// The caller has stopped every writer of the source: copies all that is still dirty,
    /// flushes the target and ends the job; returns the final progress. `Timeout` if that
    /// does not happen within `timeout` (the job keeps completing: call again to wait, or
    /// cancel); the job's error if it failed; `Cancelled` if it was cancelled.
    pub fn complete(&self, timeout: Option<Duration>) -> Result<MirrorProgress> {
        self.shared.request(|st| st.complete = true);
        let ended = self.wait_until(timeout, |st| match st.state {
            MirrorState::Completed => Some(Ok(())),
            MirrorState::Failed => Some(Err(job_error(st))),
            MirrorState::Cancelled => Some(Err(cancelled())),
            _ => None,
        })?;
        match ended {
            Some(()) => Ok(self.progress()),
            None => Err(Error::timeout(
                "the mirror did not complete in time (it keeps completing: call complete() \
                 again, or cancel())",
            )),
        }
    }

    /// Stops the job: copies in flight finish, nothing new starts, the bitmap is removed,
    /// the state becomes "cancelled" (see `wait`). Does nothing on a finished job.
    pub fn cancel(&self) {
        self.shared.request(|st| st.cancel = true);
    }

    /// Waits until the job has ended (completed, failed or cancelled): `Ok(false)` on
    /// timeout. Does not raise the job's error (see `progress`).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        self.wait_until(timeout, |st| st.state.is_final().then_some(Ok(())))
            .map(|r| r.is_some())
    }

    /// Waits (interruptibly) until `f` says something: `Some(result)`, or `None` on timeout.
    fn wait_until(
        &self,
        timeout: Option<Duration>,
        mut f: impl FnMut(&St) -> Option<Result<()>>,
    ) -> Result<Option<()>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.shared.st);
        loop {
            if let Some(r) = f(&st) {
                return r.map(Some);
            }
            let now = Instant::now();
            let mut wait = interrupt::POLL;
            if let Some(d) = deadline {
                if now >= d {
                    return Ok(None);
                }
                wait = wait.min(d - now);
            }
            drop(st);
            interrupt::check()?;
            st = lock(&self.shared.st);
            if f(&st).is_none() {
                st = self
                    .shared
                    .cv
                    .wait_timeout(st, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

fn job_error(st: &St) -> Error {
    st.error
        .clone()
        .unwrap_or_else(|| Error::new(ErrorKind::Io, "the mirror failed"))
}

fn cancelled() -> Error {
    Error::cancelled("the mirror job was cancelled")
}

impl Shared {
    fn request(&self, f: impl FnOnce(&mut St)) {
        let mut st = lock(&self.st);
        f(&mut st);
        drop(st);
        self.cv.notify_all();
    }

    /// Records the first error; the controller stops on it.
    fn fail(&self, st: &mut St, e: Error) {
        if st.error.is_none() {
            st.error = Some(e);
        }
    }

    /// Copies `w`, using `buf` (chunk_size bytes) for the data.
    fn copy(&self, w: Work, buf: &mut Vec<u8>) -> Result<()> {
        let zeroes = |off: u64, len: u64| -> Result<()> {
            if !(w.bulk && self.config.target_zeroed) {
                self.target.write_zeroes(off, len)?;
                self.bytes_worked.fetch_add(len, Ordering::Relaxed);
            }
            self.bytes_zero.fetch_add(len, Ordering::Relaxed);
            Ok(())
        };
        if w.zero {
            return zeroes(w.offset, w.len);
        }
        if buf.is_empty() {
            *buf = zeroed_buffer(self.config.chunk_size as usize)?;
        }
        let mut done = 0;
        while done < w.len {
            let n = (w.len - done).min(buf.len() as u64);
            let off = w.offset + done;
            let data = &mut buf[..n as usize];
            self.source.read(off, data)?;
            if self.config.sparse && is_zero(data) {
                zeroes(off, n)?;
            } else {
                self.target.write(off, data)?;
                self.bytes_copied.fetch_add(n, Ordering::Relaxed);
                self.bytes_worked.fetch_add(n, Ordering::Relaxed);
            }
            done += n;
        }
        Ok(())
    }
}

/// Ends a copy: returns its buffer, records its outcome (a panic is a failure), wakes the
/// controller. Runs on drop so that no copy can leave the job waiting for ever.
struct CopyDone {
    shared: Arc<Shared>,
    work: Work,
    buf: Option<Vec<u8>>,
    result: Option<Result<()>>,
}

impl Drop for CopyDone {
    fn drop(&mut self) {
        let s = &self.shared;
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err(Error::new(ErrorKind::Io, "a mirror copy panicked")));
        let mut st = lock(&s.st);
        if let Some(i) = st
            .in_flight
            .iter()
            .position(|w| w.offset == self.work.offset && w.len == self.work.len)
        {
            st.in_flight.swap_remove(i);
        }
        if st.in_flight.is_empty() {
            if let Some(t) = st.busy_start.take() {
                st.busy_total += t.elapsed();
            }
        }
        if self.work.bulk {
            st.bulk_in_flight -= 1;
        }
        if let Some(buf) = self.buf.take() {
            st.buffers.push(buf);
        }
        match result {
            Ok(()) => {
                s.bytes_done.fetch_add(self.work.len, Ordering::AcqRel);
            }
            Err(e) => {
                let e = e.prefixed(format_args!(
                    "mirror copy of {} bytes at offset {}",
                    self.work.len, self.work.offset
                ));
                s.fail(&mut st, e);
            }
        }
        drop(st);
        s.cv.notify_all();
    }
}

/// The thread that decides what to copy next, and when the job changes state.
struct Controller {
    s: Arc<Shared>,
    pool: IoPool,
    bulk_pos: u64,
    /// The source's status from `bulk_pos` up to this offset, as last asked: one query per
    /// extent, not per chunk (on tmpfs a SEEK_HOLE walks every page up to the next hole, so
    /// asking per chunk of a dense file is quadratic).
    status_until: u64,
    status: BlockStatus,
    cursor: u64,
    sweep_took: bool,
    pending: Option<Work>,
    /// Throttle: the next read may start at this instant.
    next_at: Instant,
    // Rates.
    last_tick: Instant,
    last_dirty: u64,
    taken_since_tick: u64,
    worked_at_tick: u64,
    /// Copying time (some copy in flight) measured at the last throughput sample.
    busy_at_sample: Duration,
    bulk_done: bool,
}

impl Controller {
    fn new(s: Arc<Shared>) -> Self {
        let now = Instant::now();
        Controller {
            s,
            pool: IoPool::global(),
            bulk_pos: 0,
            status_until: 0,
            status: BlockStatus::Data,
            cursor: 0,
            sweep_took: false,
            pending: None,
            next_at: now,
            last_tick: now,
            last_dirty: 0,
            taken_since_tick: 0,
            worked_at_tick: 0,
            busy_at_sample: Duration::ZERO,
            bulk_done: false,
        }
    }

    fn run(mut self) {
        let s = self.s.clone();
        // A bug here must end the job (failed), never leave its waiters waiting.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.main()))
            .unwrap_or_else(|_| {
                s.fail(
                    &mut lock(&s.st),
                    Error::new(ErrorKind::Io, "the mirror controller panicked"),
                );
                MirrorState::Failed
            });
        // Let every copy in flight finish (they hold the nodes; they end on their own).
        let mut st = lock(&s.st);
        while !st.in_flight.is_empty() {
            st =
                s.cv.wait_timeout(st, TICK)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        drop(st);
        let outcome = match outcome {
            MirrorState::Completed => match s.target.flush() {
                Ok(()) => MirrorState::Completed,
                Err(e) => {
                    s.fail(&mut lock(&s.st), e);
                    MirrorState::Failed
                }
            },
            o => o,
        };
        s.bitmap.set_busy(false);
        s.source.detach_dirty_bitmap(&s.bitmap);
        let mut st = lock(&s.st);
        st.state = outcome;
        st.ended = Some(Instant::now());
        st.buffers.clear();
        if outcome == MirrorState::Completed {
            st.bulk_left = 0;
            st.dirty_bytes = 0;
        }
        drop(st);
        s.cv.notify_all();
    }

    /// Runs until the job must end; returns how it ends.
    fn main(&mut self) -> MirrorState {
        let s = self.s.clone();
        loop {
            let mut st = lock(&s.st);
            if st.cancel {
                return MirrorState::Cancelled;
            }
            if st.error.is_some() {
                return MirrorState::Failed;
            }
            if st.complete && !matches!(st.state, MirrorState::Completing) {
                st.state = MirrorState::Completing;
                s.cv.notify_all();
            }
            if st.speed_changed {
                st.speed_changed = false;
                self.next_at = Instant::now();
            }
            let completing = st.complete;
            let speed = if completing { 0 } else { st.speed };
            let room = st.in_flight.len() < s.config.max_in_flight;
            drop(st);

            let mut blocked = Blocked::No;
            if room {
                let work = match self.pending.take() {
                    Some(w) => Some(w),
                    None => match self.next_work() {
                        Ok(Next::Work(w)) => Some(w),
                        Ok(Next::Again) => continue,
                        Ok(Next::Nothing) => None,
                        Err(e) => {
                            s.fail(&mut lock(&s.st), e);
                            return MirrorState::Failed;
                        }
                    },
                };
                if let Some(w) = work {
                    blocked = self.try_dispatch(w, speed);
                    if blocked == Blocked::No {
                        continue;
                    }
                    self.pending = Some(w);
                }
            }

            let mut st = lock(&s.st);
            if !self.bulk_done && self.bulk_pos >= s.size && st.bulk_in_flight == 0 {
                self.bulk_done = true;
                self.tick(&mut st, true);
            }
            if self.bulk_done
                && completing
                && self.pending.is_none()
                && st.in_flight.is_empty()
                && st.error.is_none()
                && s.bitmap.count() == 0
            {
                return MirrorState::Completed;
            }
            if self.last_tick.elapsed() >= TICK {
                self.tick(&mut st, false);
            }
            // Sleep until a copy ends, a request comes, the throttle opens or the tick.
            let mut wait = TICK;
            if blocked == Blocked::Throttle {
                wait = wait.min(self.next_at.saturating_duration_since(Instant::now()));
            }
            if !wait.is_zero() {
                let _ = s.cv.wait_timeout(st, wait);
            }
        }
    }

    /// The next piece of work, if there is one now (`Again`: some bytes were skipped, call
    /// again after looking at the requests).
    fn next_work(&mut self) -> Result<Next> {
        let s = self.s.clone();
        let chunk = s.config.chunk_size;
        if self.bulk_pos < s.size {
            // Bounded, so that a huge sparse image still sees cancel() between rounds.
            for _ in 0..256 {
                if self.bulk_pos >= s.size {
                    return Ok(Next::Again);
                }
                let off = self.bulk_pos;
                if s.config.sparse && off >= self.status_until {
                    let (status, n) = s.source.block_status(off, s.size - off)?;
                    self.status = status;
                    self.status_until = off + n.max(1);
                }
                let (status, n) = if s.config.sparse {
                    (self.status, chunk.min(self.status_until - off))
                } else {
                    (BlockStatus::Data, chunk.min(s.size - off))
                };
                self.bulk_pos += n;
                lock(&s.st).bulk_left = s.size - self.bulk_pos;
                let zero = status == BlockStatus::Zero;
                if zero && s.config.target_zeroed {
                    // Nothing to do for these bytes.
                    s.bytes_zero.fetch_add(n, Ordering::Relaxed);
                    s.bytes_done.fetch_add(n, Ordering::AcqRel);
                    continue;
                }
                return Ok(Next::Work(Work {
                    offset: off,
                    len: n,
                    zero,
                    bulk: true,
                }));
            }
            return Ok(Next::Again);
        }
        if !self.bulk_done {
            return Ok(Next::Nothing);
        }
        let mut wrapped = false;
        loop {
            match s.bitmap.take_next(self.cursor, chunk) {
                Some((off, len)) => {
                    self.cursor = off + len;
                    self.sweep_took = true;
                    self.taken_since_tick += len;
                    return Ok(Next::Work(Work {
                        offset: off,
                        len,
                        zero: false,
                        bulk: false,
                    }));
                }
                None => {
                    if self.sweep_took {
                        self.sweep_took = false;
                        lock(&s.st).passes += 1;
                    }
                    if self.cursor == 0 || wrapped {
                        self.cursor = 0;
                        return Ok(Next::Nothing);
                    }
                    self.cursor = 0;
                    wrapped = true;
                }
            }
        }
    }

    /// Starts `w` if the throttle and the copies in flight allow it now.
    fn try_dispatch(&mut self, w: Work, speed: u64) -> Blocked {
        let s = self.s.clone();
        let now = Instant::now();
        let reads = !w.zero;
        if reads && speed > 0 && now < self.next_at {
            return Blocked::Throttle;
        }
        let mut st = lock(&s.st);
        let end = w.offset + w.len;
        if st
            .in_flight
            .iter()
            .any(|x| x.offset < end && w.offset < x.offset + x.len)
        {
            // An older copy of these bytes is still running: this one must land after it.
            return Blocked::Overlap;
        }
        if reads && speed > 0 {
            let secs = w.len as f64 / speed as f64;
            self.next_at = self.next_at.max(now) + Duration::from_secs_f64(secs.min(1e6));
        }
        if st.in_flight.is_empty() {
            st.busy_start = Some(now);
        }
        st.in_flight.push(w);
        if w.bulk {
            st.bulk_in_flight += 1;
        }
        let buf = if w.zero {
            None
        } else {
            Some(st.buffers.pop().unwrap_or_default())
        };
        drop(st);
        let shared = s.clone();
        self.pool.spawn(move || {
            let mut done = CopyDone {
                shared,
                work: w,
                buf,
                result: None,
            };
            let mut buf = done.buf.take().unwrap_or_default();
            let r = done.shared.copy(w, &mut buf);
            if !w.zero {
                done.buf = Some(buf);
            }
            done.result = Some(r);
        });
        Blocked::No
    }

    /// Updates the rates and the state (dirty / ready) from the bitmap.
    fn tick(&mut self, st: &mut St, force: bool) {
        let s = &self.s;
        let now = Instant::now();
        let dt = (now - self.last_tick).as_secs_f64();
        if dt <= 0.0 && !force {
            return;
        }
        let in_bitmap = s.bitmap.count();
        let dirty = in_bitmap + self.pending.map_or(0, |w| w.len);
        if dt > 0.0 {
            let alpha = 1.0 - (-dt / SMOOTHING).exp();
            // Newly dirtied = what the bitmap gained plus what we took out of it meanwhile.
            let dirtied = (in_bitmap + self.taken_since_tick).saturating_sub(self.last_dirty);
            st.dirty_rate += (dirtied as f64 / dt - st.dirty_rate) * alpha;
            let worked = s.bytes_worked.load(Ordering::Relaxed);
            let busy_now = st.busy_total
                + st.busy_start
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let busy = busy_now.saturating_sub(self.busy_at_sample).as_secs_f64();
            // A sample needs some copying time; the very first one takes what there is (a
            // short job must not end with no throughput measured).
            if busy >= 0.005 || (busy > 0.0 && st.throughput == 0.0) {
                let sample = (worked - self.worked_at_tick) as f64 / busy;
                st.throughput = if st.throughput == 0.0 {
                    sample
                } else {
                    st.throughput + (sample - st.throughput) * alpha
                };
                self.worked_at_tick = worked;
                self.busy_at_sample = busy_now;
            }
        }
        self.last_tick = now;
        self.last_dirty = in_bitmap;
        self.taken_since_tick = 0;
        st.dirty_bytes = dirty;
        if !self.bulk_done {
            return;
        }
        let in_flight: u64 = st.in_flight.iter().map(|w| w.len).sum();
        let remaining = dirty + in_flight;
        let fits = |factor: u64| {
            remaining <= s.config.converge_bytes.saturating_mul(factor)
                || s.config.max_downtime.is_some_and(|d| {
                    st.throughput > 0.0
                        && remaining as f64 / st.throughput <= d.as_secs_f64() * factor as f64
                })
        };
        let (ok1, ok2) = (fits(1), fits(2));
        match st.state {
            MirrorState::Bulk | MirrorState::Dirty if ok1 => {
                st.state = MirrorState::Ready;
                st.ready_epoch += 1;
                s.cv.notify_all();
            }
            MirrorState::Bulk => {
                st.state = MirrorState::Dirty;
                s.cv.notify_all();
            }
            MirrorState::Ready if !ok2 => {
                st.state = MirrorState::Dirty;
                s.cv.notify_all();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory_node;

    fn node(size: u64) -> Arc<BlockNode> {
        Arc::new(memory_node(size, false, |b| b).unwrap())
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4097]));
        for i in [0usize, 7, 8, 63, 64, 4096] {
            let mut v = vec![0u8; 4097];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(!is_zero(&v[i..]), "from {i}");
        }
    }

    #[test]
    fn bad_configs_are_refused_before_anything_starts() {
        let (a, b) = (node(1 << 20), node(1 << 20));
        let bad = [
            MirrorConfig {
                chunk_size: 32 << 10,
                ..Default::default()
            },
            MirrorConfig {
                chunk_size: (32 << 20) + 512,
                ..Default::default()
            },
            MirrorConfig {
                chunk_size: (64 << 10) + 1,
                ..Default::default()
            },
            MirrorConfig {
                max_in_flight: 0,
                ..Default::default()
            },
            MirrorConfig {
                max_in_flight: 65,
                ..Default::default()
            },
            MirrorConfig {
                granularity: 1000,
                ..Default::default()
            },
        ];
        for c in bad {
            let e = MirrorJob::start(a.clone(), b.clone(), c.clone()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{c:?}");
        }
        let e = MirrorJob::start(a.clone(), a.clone(), MirrorConfig::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = MirrorJob::start(a.clone(), node(2 << 20), MirrorConfig::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let ro = Arc::new(memory_node(1 << 20, true, |b| b).unwrap());
        let e = MirrorJob::start(a.clone(), ro, MirrorConfig::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(a.dirty_bitmaps().is_empty(), "no bitmap left behind");
    }

    #[test]
    fn small_mirror_completes_and_removes_its_bitmap() {
        let (a, b) = (node(3 << 20), node(3 << 20));
        let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
        a.write(0, &data).unwrap();
        let job = MirrorJob::start(a.clone(), b.clone(), MirrorConfig::default()).unwrap();
        assert_eq!(a.dirty_bitmaps(), vec![job.bitmap_name().to_string()]);
        assert!(a.remove_dirty_bitmap(job.bitmap_name()).is_err(), "busy");
        assert_eq!(
            a.resize(1 << 20).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert!(job.wait_ready(Some(Duration::from_secs(30))).unwrap());
        let p = job.complete(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(p.state, MirrorState::Completed);
        assert_eq!(p.bytes_done, p.bytes_total);
        assert_eq!(p.dirty_bytes, 0);
        assert!(p.throughput > 0.0, "measured even for a short job: {p:?}");
        assert!(a.dirty_bitmaps().is_empty());
        let mut got = vec![0u8; data.len()];
        b.read(0, &mut got).unwrap();
        assert!(got == data);
        // Finished: these are no-ops / immediate.
        job.cancel();
        assert!(job.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(job.state(), MirrorState::Completed);
    }
}
