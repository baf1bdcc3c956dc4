//! The virtio-blk device: transport registers, queues, and request execution on the job
//! engine.
//!
//! Threads and locks: one mutex guards all device state (registers, queues, pending lists).
//! A QueueNotify pops and validates the new chains under it (at most Q chains of at most Q
//! descriptors each; no storage I/O) and appends block requests to the queue's pending list;
//! requests that need no storage (bad requests, GET_ID, chains without a status byte)
//! complete right there. Pending requests are run by *runners* on the elastic [`IoPool`]: a
//! runner claims the next pending request, runs it outside the lock with positional I/O
//! straight into/out of guest memory, then publishes the completion (status byte, used
//! element, then used.idx with release ordering), takes the notification decision and claims
//! the next one under the same lock hold. How many runners a queue gets depends on how long
//! backend operations take (the moving share of slow ones): fast ones (page cache, memory) keep to one
//! runner per two CPUs, so a CPU-bound workload is not drowned in context switches; slow
//! ones (O_DIRECT) get a runner per waiting request, up to the in-flight cap.
//!
//! Resets: every queue has a generation. A device reset (Status = 0), a QueueReset or
//! QueueReady = 0 bumps it and drops the pending requests; the requests already running
//! finish their backend operation but their completion is dropped, so the old ring is never
//! touched again. Until those operations have finished, Status reads back the value it had
//! before the reset (non-zero) and QueueReset reads 1: a driver that waits for them to read
//! 0, as the virtio spec allows, knows the device no longer writes into its old buffers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::super::chain::{self, Chain, Seg};
use super::super::features as f;
use super::super::mmio::*;
use super::super::queue::SplitQueue;
use super::super::status as st_bits;
use super::super::{INT_CONFIG, INT_USED, MAX_QUEUE_SIZE};
use super::config::{self, ConfigValues};
use super::request::{self, Context, Parsed, Work, ID_LEN, S_IOERR, S_OK};
use crate::block::BlockNode;
use crate::geometry::{DeviceKind, Geometry, GeometryConfig};
use crate::guest_memory::GuestMemory;
use crate::interrupt;
use crate::jobs::{GeometryPrefetch, IoPool, WorkerPool};
use crate::state::virtio::{QueueImage, VirtioImage};
use crate::{Error, ErrorKind, Result, SECTOR_SIZE};

/// Backend operations mostly slower than this are blocking I/O: run requests in parallel.
pub const SLOW_NS: u64 = 10_000;
/// Used-buffer notifications a runner may hold back while it works through fast requests.
const MAX_DEFERRED: u32 = 32;
/// How long a save waits for a geometry read in progress.
const PREFETCH_WAIT: Duration = Duration::from_secs(30);
/// Runners started by one call at most (new runners start more).
const WAKE_BATCH: usize = 8;
/// How long `wait_irq` watches InterruptStatus before it sleeps while blocking I/O runs.
const SPIN: Duration = Duration::from_micros(50);

/// How the device is built (API.md names; `features` and `max_in_flight` are extras).
#[derive(Debug, Clone, Default)]
pub struct VirtioBlkConfig {
    /// QueueSizeMax of every queue (power of two, 1..=32768); 0 means 256.
    pub queue_size: u16,
    /// Number of request queues; 0 means 1.
    pub num_queues: u16,
    /// GET_ID answer (at most 20 bytes are used); none = empty, as QEMU without `serial`.
    pub serial: Option<String>,
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
    /// A mask applied to the offered features (VERSION_1 is always offered).
    pub features: Option<u64>,
    /// Backend operations in flight per queue; 0 means min(queue_size, 64).
    pub max_in_flight: usize,
}

/// Counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtioStats {
    /// Used entries published (any status, used length 0 included).
    pub requests_completed: u64,
    /// Chains returned with used length 0 (no status room or short header).
    pub requests_dropped: u64,
    /// Used-buffer notifications raised (InterruptStatus bit 0 set).
    pub notifications: u64,
    /// Configuration-change interrupts raised.
    pub config_interrupts: u64,
    /// Times the device went NEEDS_RESET.
    pub fatal_errors: u64,
    /// QueueNotify writes ignored (no such queue, not DRIVER_OK, queue not ready, broken).
    pub ignored_notifies: u64,
    /// Why the device last went NEEDS_RESET (kept across reset for tests).
    pub needs_reset_reason: Option<String>,
    /// Requests popped and not yet completed.
    pub in_flight: u64,
}

/// A request waiting for (or running on) the backend.
#[derive(Debug)]
struct Pending {
    head: u16,
    status_addr: u64,
    work: Work,
}

#[derive(Debug)]
struct QueueSlot {
    q: SplitQueue,
    gen: u64,
    pending: VecDeque<Pending>,
    /// Backend operations of the current generation running now.
    running: usize,
    /// Backend operations of older generations still running (their results are dropped).
    old_running: usize,
    runners: usize,
    /// Runners started that have not claimed their first request yet.
    starting: usize,
    /// Heads popped and not yet returned (§6 row 21).
    in_flight: Vec<bool>,
    in_flight_count: usize,
    /// Notified while the device was stopped: processed at start().
    deferred: bool,
    /// Used-buffer notifications decided but not yet raised (coalesced while this queue's
    /// fast requests keep a runner busy).
    irq_deferred: u32,
}

impl QueueSlot {
    fn new(max: u16) -> Self {
        QueueSlot {
            q: SplitQueue::new(max),
            gen: 0,
            pending: VecDeque::new(),
            running: 0,
            old_running: 0,
            runners: 0,
            starting: 0,
            in_flight: vec![false; usize::from(max)],
            in_flight_count: 0,
            deferred: false,
            irq_deferred: 0,
        }
    }

    /// Forgets everything popped: a new generation (running operations become "old").
    fn cut_off(&mut self) {
        self.gen += 1;
        self.old_running += self.running;
        self.running = 0;
        self.pending.clear();
        self.in_flight.fill(false);
        self.in_flight_count = 0;
        self.deferred = false;
        self.irq_deferred = 0;
    }
}

#[derive(Debug)]
struct State {
    status: u8,
    /// What Status reads while a reset waits for old operations.
    status_before_reset: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    config_gen: u32,
    writeback: u8,
    queues: Vec<QueueSlot>,
    broken: bool,
    stopped: bool,
    /// Backend operations running, every generation.
    busy: usize,
    /// Threads in `wait_irq` / `drain` (a condvar notify is a syscall: skip it without them).
    irq_waiters: usize,
    idle_waiters: usize,
    stats: VirtioStats,
    scratch: Chain,
}

struct Shared {
    node: Arc<BlockNode>,
    memory: Arc<GuestMemory>,
    prefetch: GeometryPrefetch,
    prefetch_hooked: AtomicBool,
    pool: Option<WorkerPool>,
    io: IoPool,
    offered: u64,
    queue_max: u16,
    cap: usize,
    /// Runners per queue while backend operations are fast.
    fast_cap: usize,
    /// Moving share (x1024) of backend operations that took longer than [`SLOW_NS`].
    slow_share: AtomicU64,
    serial: [u8; ID_LEN],
    state: Mutex<State>,
    /// InterruptStatus: an atomic, so that reading and acknowledging it (what a driver does
    /// after every interrupt) never contends with the runners for the state lock. It is set
    /// under the state lock, so `wait_irq` (which sleeps under it) cannot miss an edge.
    isr: AtomicU32,
    /// Backend operations are running (a hint for `wait_irq`'s spin; read without the lock).
    busy_hint: AtomicBool,
    irq_cv: Condvar,
    idle_cv: Condvar,
}

/// A virtio-blk device on virtio-mmio. Cheap to share (`Arc` inside).
pub struct VirtioBlk {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VirtioBlk {
    fn fmt(&self, fmt: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        fmt.debug_struct("VirtioBlk")
            .field("node", &self.shared.node.name())
            .field("status", &st.status)
            .field("queues", &st.queues.len())
            .finish()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Work to do once the state lock is released.
#[derive(Default)]
struct After {
    runners: Vec<usize>,
    kick_prefetch: bool,
    /// Wake `wait_irq` sleepers (done after unlocking, so they do not wake into a held lock).
    wake_irq: bool,
}

impl VirtioBlk {
    pub fn new(
        node: Arc<BlockNode>,
        memory: Arc<GuestMemory>,
        config: VirtioBlkConfig,
    ) -> Result<Self> {
        node.check_open()?;
        let queue_max = if config.queue_size == 0 {
            256
        } else {
            config.queue_size
        };
        if !queue_max.is_power_of_two() || queue_max > MAX_QUEUE_SIZE {
            return Err(Error::invalid(format!(
                "queue_size must be a power of two between 1 and {MAX_QUEUE_SIZE}, got {queue_max}"
            )));
        }
        let nq = config.num_queues.max(1);
        if nq > 1024 {
            return Err(Error::invalid(format!(
                "num_queues must be between 1 and 1024, got {nq}"
            )));
        }
        let serial = config.serial.unwrap_or_default();
        if !serial.is_ascii() {
            return Err(Error::invalid("serial must be ASCII"));
        }
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let geometry = GeometryConfig {
            cyls: config.cyls,
            heads: config.heads,
            secs: config.secs,
            ..GeometryConfig::for_device(DeviceKind::Virtio)
        };
        let prefetch = GeometryPrefetch::new(geometry)?;
        let mut offered = f::QEMU_DEFAULT;
        if nq > 1 {
            offered |= f::BLK_MQ;
        }
        if node.readonly() {
            offered |= f::BLK_RO;
        }
        if let Some(mask) = config.features {
            offered &= mask;
        }
        offered |= f::VERSION_1;
        let cap = if config.max_in_flight == 0 {
            usize::from(queue_max).min(64)
        } else {
            config.max_in_flight.min(usize::from(queue_max))
        };
        let queues = (0..nq).map(|_| QueueSlot::new(queue_max)).collect();
        let shared = Arc::new(Shared {
            node,
            memory,
            prefetch,
            prefetch_hooked: AtomicBool::new(false),
            pool: None,
            io: IoPool::global(),
            offered,
            queue_max,
            cap,
            fast_cap: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, cap),
            slow_share: AtomicU64::new(0),
            serial: id,
            state: Mutex::new(State {
                status: 0,
                status_before_reset: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                shm_sel: 0,
                config_gen: 0,
                writeback: 1,
                queues,
                broken: false,
                stopped: false,
                busy: 0,
                irq_waiters: 0,
                idle_waiters: 0,
                stats: VirtioStats::default(),
                scratch: Chain::default(),
            }),
            isr: AtomicU32::new(0),
            busy_hint: AtomicBool::new(false),
            irq_cv: Condvar::new(),
            idle_cv: Condvar::new(),
        });
        Ok(VirtioBlk { shared })
    }

    pub fn node(&self) -> &Arc<BlockNode> {
        &self.shared.node
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.memory
    }

    /// The features the device offers.
    pub fn offered_features(&self) -> u64 {
        self.shared.offered
    }

    /// The features the driver accepted (meaningful once FEATURES_OK stuck).
    pub fn driver_features(&self) -> u64 {
        self.shared.lock().driver_features
    }

    pub fn num_queues(&self) -> usize {
        self.shared.lock().queues.len()
    }

    pub fn queue_size(&self) -> u16 {
        self.shared.queue_max
    }

    /// The geometry if known now (never waits, never reads).
    pub fn geometry(&self) -> Option<Geometry> {
        self.shared.prefetch.get().and_then(|r| r.ok())
    }

    pub fn stats(&self) -> VirtioStats {
        let st = self.shared.lock();
        let mut s = st.stats.clone();
        s.in_flight = st.queues.iter().map(|q| q.in_flight_count as u64).sum();
        s
    }

    /// The reason of the current NEEDS_RESET, if the device is in that state.
    pub fn needs_reset_reason(&self) -> Option<String> {
        let st = self.shared.lock();
        if st.broken {
            st.stats.needs_reset_reason.clone()
        } else {
            None
        }
    }

    /// InterruptStatus != 0 (the level of the interrupt line).
    pub fn irq(&self) -> bool {
        self.shared.isr.load(Ordering::Acquire) != 0
    }

    /// Register read. `offset`/`size` are checked ([`check_access`]); guest-visible
    /// semantics follow QEMU's virtio-mmio (write-only and unknown registers read 0).
    pub fn mmio_read(&self, offset: u32, size: u32) -> Result<u32> {
        check_access(offset, size)?;
        if is_register_misuse(offset, size) {
            return Ok(0);
        }
        let sh = &self.shared;
        if offset == R_INTERRUPT_STATUS {
            return Ok(sh.isr.load(Ordering::Acquire));
        }
        let mut after = After::default();
        let v = {
            let mut st = sh.lock();
            sh.read_reg(&mut st, offset, size, &mut after)
        };
        sh.after(after);
        Ok(v)
    }

    /// Register write. Guest misuse has a defined outcome and is never an error.
    pub fn mmio_write(&self, offset: u32, value: u32, size: u32) -> Result<()> {
        check_access(offset, size)?;
        if is_register_misuse(offset, size) {
            return Ok(());
        }
        let sh = &self.shared;
        if offset == R_INTERRUPT_ACK {
            sh.isr.fetch_and(!value, Ordering::AcqRel);
            return Ok(());
        }
        let mut after = After::default();
        {
            let mut st = sh.lock();
            sh.write_reg(&mut st, offset, value, size, &mut after);
        }
        sh.after(after);
        Ok(())
    }

    /// Waits until InterruptStatus is non-zero (true) or `timeout` passes (false).
    /// Interruptible (Ctrl-C through the interrupt hook).
    pub fn wait_irq(&self, timeout: Option<Duration>) -> Result<bool> {
        let sh = &self.shared;
        if sh.isr.load(Ordering::Acquire) != 0 {
            return Ok(true);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        // While blocking I/O runs, the next completion is usually tens of microseconds away:
        // watch InterruptStatus that long before sleeping (waking a sleeping thread on a
        // virtual CPU costs as much). Not for fast operations: there the spin would take a
        // CPU from the runners.
        if sh.busy_hint.load(Ordering::Relaxed) && sh.slow_share.load(Ordering::Relaxed) > 512 {
            let spin_end = Instant::now() + SPIN;
            while Instant::now() < spin_end && deadline.is_none_or(|d| Instant::now() < d) {
                if sh.isr.load(Ordering::Acquire) != 0 {
                    return Ok(true);
                }
                std::hint::spin_loop();
            }
        }
        let mut st = sh.lock();
        loop {
            if sh.isr.load(Ordering::Acquire) != 0 {
                return Ok(true);
            }
            let mut step = interrupt::POLL;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                step = step.min(left);
            }
            st.irq_waiters += 1;
            st = sh
                .irq_cv
                .wait_timeout(st, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.irq_waiters -= 1;
            if sh.isr.load(Ordering::Acquire) == 0 {
                drop(st);
                interrupt::check()?;
                st = sh.lock();
            }
        }
    }

    /// The guest starts: the geometry prefetch begins (unless the geometry is known), and
    /// notifies remembered while stopped are processed now.
    pub fn start(&self) {
        let sh = &self.shared;
        let mut after = After {
            kick_prefetch: true,
            ..After::default()
        };
        {
            let mut st = sh.lock();
            st.stopped = false;
            for qi in 0..st.queues.len() {
                if std::mem::take(&mut st.queues[qi].deferred) {
                    sh.notify(&mut st, qi, &mut after);
                }
            }
        }
        sh.after(after);
    }

    /// The guest stops: requests popped so far run to completion (waited for,
    /// interruptibly); later notifies are remembered until [`start`](Self::start).
    pub fn stop(&self) -> Result<()> {
        self.shared.lock().stopped = true;
        self.drain(None)
    }

    /// Waits until no request is pending or running (old generations included).
    pub fn drain(&self, timeout: Option<Duration>) -> Result<()> {
        let sh = &self.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = sh.lock();
        loop {
            if st.busy == 0 && st.queues.iter().all(|q| q.pending.is_empty()) {
                return Ok(());
            }
            let mut step = interrupt::POLL;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::timeout("virtio-blk I/O did not drain"));
                }
                step = step.min(left);
            }
            st.idle_waiters += 1;
            st = sh
                .idle_cv
                .wait_timeout(st, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            st.idle_waiters -= 1;
            drop(st);
            interrupt::check()?;
            st = sh.lock();
        }
    }

    /// The geometry of the device (known, guessing, or not started).
    /// The `eager` geometry policy: reads sector 0 now, even on an inactive node, as QEMU did
    /// before 2010 (see [`crate::jobs::GeometryPolicy::Eager`]); demonstrations only.
    pub fn read_geometry_now(&self) -> Result<()> {
        self.prefetch().read_now(self.node())
    }

    pub(crate) fn prefetch(&self) -> &GeometryPrefetch {
        &self.shared.prefetch
    }

    /// Err(State(msg)) unless no request is pending, running or popped-and-not-completed.
    pub(crate) fn check_idle(&self, msg: &str) -> Result<()> {
        let st = self.shared.lock();
        Self::idle_or(&st, msg)
    }

    fn idle_or(st: &State, msg: &str) -> Result<()> {
        let idle = st.busy == 0
            && st
                .queues
                .iter()
                .all(|q| q.pending.is_empty() && q.in_flight_count == 0 && q.old_running == 0);
        if idle {
            Ok(())
        } else {
            Err(Error::state(msg))
        }
    }

    /// The migratable state; refused unless stopped and drained.
    pub(crate) fn capture(&self) -> Result<VirtioImage> {
        let sh = &self.shared;
        // The geometry read (one sector) is part of draining: let it finish so that the
        // geometry travels and the destination never reads the MBR.
        if let Some(job) = sh.prefetch.job() {
            if !job.is_done() {
                if let Err(e) = job.wait(Some(PREFETCH_WAIT)) {
                    if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Interrupted) {
                        return Err(Error::state(
                            "device is running; stop it first (its geometry read is in progress)",
                        ));
                    }
                }
            }
        }
        let st = sh.lock();
        if !st.stopped {
            return Err(Error::state("device is running; stop it first"));
        }
        Self::idle_or(&st, "device is running; stop it first")?;
        Ok(VirtioImage {
            status: st.status,
            device_features_sel: st.device_features_sel,
            driver_features_sel: st.driver_features_sel,
            driver_features: st.driver_features,
            queue_sel: st.queue_sel,
            shm_sel: st.shm_sel,
            config_gen: st.config_gen,
            writeback: st.writeback,
            isr: sh.isr.load(Ordering::Acquire),
            offered: sh.offered,
            capacity: sh.node.size().ok().flatten().unwrap_or(0) / SECTOR_SIZE,
            geometry: self.geometry(),
            queue_max: sh.queue_max,
            queues: st.queues.iter().map(|q| QueueImage::of(&q.q)).collect(),
            broken: st
                .broken
                .then(|| st.stats.needs_reset_reason.clone().unwrap_or_default()),
        })
    }

    /// Installs checked state (see `state::virtio`). Every ready queue counts as notified,
    /// so `start()` pops what the driver made available before the save.
    pub(crate) fn restore(&self, img: &VirtioImage) {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.status = img.status;
        st.status_before_reset = 0;
        st.device_features_sel = img.device_features_sel;
        st.driver_features_sel = img.driver_features_sel;
        st.driver_features = img.driver_features;
        st.queue_sel = img.queue_sel;
        st.shm_sel = img.shm_sel;
        st.config_gen = img.config_gen;
        st.writeback = img.writeback;
        st.broken = img.broken.is_some();
        if st.broken {
            st.stats.needs_reset_reason = img.broken.clone();
        }
        for (slot, q) in st.queues.iter_mut().zip(&img.queues) {
            slot.cut_off();
            q.install(&mut slot.q);
            slot.deferred = q.ready;
        }
        sh.isr.store(img.isr, Ordering::Release);
        let wake = img.isr != 0 && st.irq_waiters > 0;
        drop(st);
        if wake {
            sh.irq_cv.notify_all();
        }
    }

    /// A host-side capacity change: resizes the node, then bumps ConfigGeneration and raises
    /// the configuration-change interrupt (if DRIVER_OK). Capacity is always read from the
    /// node, so the new size shows at the next config read.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.shared.node.resize(new_size)?;
        let mut st = self.shared.lock();
        self.shared.config_changed(&mut st);
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wake_irq(&self, st: &State) {
        if st.irq_waiters > 0 {
            self.irq_cv.notify_all();
        }
    }

    fn wake_idle(&self, st: &State) {
        if st.idle_waiters > 0 {
            self.idle_cv.notify_all();
        }
    }

    fn after(self: &Arc<Self>, after: After) {
        if after.wake_irq {
            self.irq_cv.notify_all();
        }
        for qi in after.runners {
            let me = self.clone();
            self.io.spawn(move || me.run_queue(qi));
        }
        if after.kick_prefetch {
            self.kick_prefetch();
        }
    }

    /// Starts the geometry prefetch once; when the geometry becomes known the config
    /// generation changes and (after DRIVER_OK) a configuration-change interrupt is raised.
    fn kick_prefetch(self: &Arc<Self>) {
        if self.prefetch.get().is_some() || self.prefetch_hooked.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = match &self.pool {
            Some(p) => p.clone(),
            None => match WorkerPool::global() {
                Ok(p) => p,
                Err(_) => {
                    self.prefetch_hooked.store(false, Ordering::Release);
                    return;
                }
            },
        };
        let job = self.prefetch.start(&pool, self.node.clone());
        let weak: Weak<Shared> = Arc::downgrade(self);
        job.on_complete(move |result| {
            let Some(me) = weak.upgrade() else { return };
            if result.is_ok() {
                let mut st = me.lock();
                me.config_changed(&mut st);
            }
        });
    }

    /// ConfigGeneration changes; the driver hears of it once DRIVER_OK.
    fn config_changed(&self, st: &mut State) {
        st.config_gen = st.config_gen.wrapping_add(1);
        if st.status & st_bits::DRIVER_OK != 0 {
            self.isr.fetch_or(INT_CONFIG, Ordering::AcqRel);
            st.stats.config_interrupts += 1;
            self.wake_irq(st);
        }
    }

    /// DEVICE_NEEDS_RESET: nothing more is processed or completed until reset.
    fn fatal(&self, st: &mut State, reason: String) {
        if st.broken {
            return;
        }
        st.broken = true;
        st.status |= st_bits::NEEDS_RESET;
        st.stats.fatal_errors += 1;
        st.stats.needs_reset_reason = Some(reason);
        for q in &mut st.queues {
            q.pending.clear();
        }
        self.config_changed(st);
        self.wake_idle(st);
    }

    fn negotiated(&self, st: &State, bit: u64) -> bool {
        st.driver_features & bit != 0
    }

    fn config_values(&self, st: &State) -> ConfigValues {
        let capacity = self.node.size().ok().flatten().unwrap_or(0) / SECTOR_SIZE;
        let geometry = match self.prefetch.get() {
            Some(Ok(g)) => (g.cyls as u16, g.heads as u8, g.secs as u8),
            _ => (0, 0, 0),
        };
        ConfigValues {
            capacity,
            seg_max: u32::from(self.queue_max).saturating_sub(2),
            geometry,
            blk_size: SECTOR_SIZE as u32,
            writeback: st.writeback,
            num_queues: st.queues.len() as u16,
        }
    }

    fn read_reg(&self, st: &mut State, offset: u32, size: u32, after: &mut After) -> u32 {
        let sel = st.queue_sel as usize;
        let q = st.queues.get(sel);
        match offset {
            R_MAGIC => MAGIC_VALUE,
            R_VERSION => VERSION,
            R_DEVICE_ID => DEVICE_ID_BLOCK,
            R_VENDOR_ID => VENDOR_ID,
            R_DEVICE_FEATURES => match st.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            R_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.q.max_size)),
            R_QUEUE_READY => q.map_or(0, |q| u32::from(q.q.ready)),
            R_QUEUE_RESET => q.map_or(0, |q| u32::from(q.old_running > 0)),
            R_INTERRUPT_STATUS => self.isr.load(Ordering::Acquire),
            R_STATUS => if st.status == 0 && st.queues.iter().any(|q| q.old_running > 0) {
                st.status_before_reset.max(st_bits::ACKNOWLEDGE)
            } else {
                u32::from(st.status) as u8
            }
            .into(),
            R_SHM_LEN_LOW | R_SHM_LEN_HIGH | R_SHM_BASE_LOW | R_SHM_BASE_HIGH => u32::MAX,
            R_CONFIG_GENERATION => st.config_gen,
            o if o >= R_CONFIG => {
                let off = (o - R_CONFIG) as usize;
                let size = size as usize;
                if config::touches_geometry(off, size) && self.prefetch.get().is_none() {
                    // A geometry read before start() may start the prefetch itself.
                    after.kick_prefetch = true;
                }
                let values = self.config_values(st);
                let bytes = config::build(&values, self.offered);
                config::read(&bytes, config::config_len(self.offered), off, size)
            }
            // Write-only and unknown registers read 0 (QEMU).
            _ => 0,
        }
    }

    fn write_reg(&self, st: &mut State, offset: u32, value: u32, size: u32, after: &mut After) {
        let sel = st.queue_sel as usize;
        match offset {
            R_DEVICE_FEATURES_SEL => st.device_features_sel = value,
            R_DRIVER_FEATURES_SEL => st.driver_features_sel = value,
            // Fixed once FEATURES_OK is set.
            R_DRIVER_FEATURES if st.status & st_bits::FEATURES_OK == 0 => {
                match st.driver_features_sel {
                    0 => {
                        st.driver_features = (st.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        st.driver_features =
                            (st.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            R_QUEUE_SEL => st.queue_sel = value,
            R_SHM_SEL => st.shm_sel = value,
            R_QUEUE_NUM | R_QUEUE_DESC_LOW | R_QUEUE_DESC_HIGH | R_QUEUE_DRIVER_LOW
            | R_QUEUE_DRIVER_HIGH | R_QUEUE_DEVICE_LOW | R_QUEUE_DEVICE_HIGH => {
                let Some(slot) = st.queues.get_mut(sel) else {
                    return;
                };
                // The driver must not change a live queue; we keep the live values.
                if slot.q.ready {
                    return;
                }
                let q = &mut slot.q;
                let lo = |a: u64| (a & !0xffff_ffff) | u64::from(value);
                let hi = |a: u64| (a & 0xffff_ffff) | (u64::from(value) << 32);
                match offset {
                    R_QUEUE_NUM => q.size = value,
                    R_QUEUE_DESC_LOW => q.desc = lo(q.desc),
                    R_QUEUE_DESC_HIGH => q.desc = hi(q.desc),
                    R_QUEUE_DRIVER_LOW => q.avail = lo(q.avail),
                    R_QUEUE_DRIVER_HIGH => q.avail = hi(q.avail),
                    R_QUEUE_DEVICE_LOW => q.used = lo(q.used),
                    _ => q.used = hi(q.used),
                }
            }
            R_QUEUE_READY => {
                if sel >= st.queues.len() {
                    return;
                }
                let event_idx = self.negotiated(st, f::EVENT_IDX);
                let driver_ok = st.status & st_bits::DRIVER_OK != 0;
                let slot = &mut st.queues[sel];
                if value & 1 != 0 {
                    if !slot.q.ready {
                        slot.q.ready = true;
                        slot.q.event_idx = event_idx;
                        slot.q.signalled_used = slot.q.next_used;
                        if driver_ok {
                            if let Err(e) = slot.q.validate(&self.memory) {
                                self.fatal(st, format!("queue {sel}: {e}"));
                            }
                        }
                    }
                } else if slot.q.ready {
                    // Stop the queue: what was popped is forgotten (completions dropped).
                    slot.q.ready = false;
                    slot.cut_off();
                }
            }
            R_QUEUE_NOTIFY => self.notify_reg(st, value, after),
            R_INTERRUPT_ACK => {
                self.isr.fetch_and(!value, Ordering::AcqRel);
            }
            R_STATUS => self.write_status(st, value as u8),
            R_QUEUE_RESET if value == 1 && self.negotiated(st, f::RING_RESET) => {
                if let Some(slot) = st.queues.get_mut(sel) {
                    slot.cut_off();
                    slot.q.reset();
                }
                self.wake_idle(st);
            }
            o if o >= R_CONFIG => {
                let off = (o - R_CONFIG) as usize;
                let len = config::config_len(self.offered);
                if let Some(wb) = config::written_writeback(len, off, size as usize, value) {
                    if self.offered & f::BLK_CONFIG_WCE != 0 {
                        st.writeback = wb;
                    }
                }
            }
            // Read-only and unknown registers: ignored.
            _ => {}
        }
    }

    fn write_status(&self, st: &mut State, value: u8) {
        if value == 0 {
            self.reset(st);
            return;
        }
        let old = st.status;
        // DEVICE_NEEDS_RESET is the device's to set, never the driver's.
        let mut new = value & !st_bits::NEEDS_RESET;
        if new & st_bits::FEATURES_OK != 0 && old & st_bits::FEATURES_OK == 0 {
            let d = st.driver_features;
            // Modern-only device: refuse unoffered bits and a driver without VERSION_1
            // (QEMU masks the bits and accepts; spec §5.2 lets us refuse).
            if d & !self.offered != 0 || d & f::VERSION_1 == 0 {
                new &= !st_bits::FEATURES_OK;
            }
        }
        if new & st_bits::DRIVER_OK != 0
            && old & st_bits::DRIVER_OK == 0
            && new & st_bits::FEATURES_OK == 0
        {
            new &= !st_bits::DRIVER_OK;
        }
        st.status = new | (old & st_bits::NEEDS_RESET);
        if st.status & st_bits::FEATURES_OK != 0 && old & st_bits::FEATURES_OK == 0 {
            let event_idx = self.negotiated(st, f::EVENT_IDX);
            for q in &mut st.queues {
                q.q.event_idx = event_idx;
            }
        }
        if st.status & st_bits::DRIVER_OK != 0 && old & st_bits::DRIVER_OK == 0 {
            let bad = st.queues.iter().enumerate().find_map(|(i, q)| {
                if q.q.ready {
                    q.q.validate(&self.memory)
                        .err()
                        .map(|e| format!("queue {i}: {e}"))
                } else {
                    None
                }
            });
            if let Some(reason) = bad {
                self.fatal(st, reason);
            }
        }
    }

    fn reset(&self, st: &mut State) {
        if st.busy > 0 {
            st.status_before_reset = st.status;
        }
        for slot in &mut st.queues {
            slot.cut_off();
            slot.q.reset();
        }
        st.status = 0;
        self.isr.store(0, Ordering::Release);
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.queue_sel = 0;
        st.shm_sel = 0;
        st.writeback = 1;
        st.broken = false;
        self.wake_idle(st);
    }

    fn notify_reg(&self, st: &mut State, value: u32, after: &mut After) {
        let qi = value as usize;
        let ok = qi < st.queues.len()
            && st.status & st_bits::DRIVER_OK != 0
            && !st.broken
            && st.queues[qi].q.ready;
        if !ok {
            st.stats.ignored_notifies += 1;
            return;
        }
        if st.stopped {
            st.queues[qi].deferred = true;
            return;
        }
        self.notify(st, qi, after);
    }

    /// Pops every new chain of queue `qi` (at most Q), completing at once what needs no
    /// storage and queueing the rest for runners.
    fn notify(&self, st: &mut State, qi: usize, after: &mut After) {
        if st.broken || !st.queues[qi].q.ready || st.status & st_bits::DRIVER_OK == 0 {
            return;
        }
        let mem = &*self.memory;
        let ctx = Context {
            capacity: self.node.size().ok().flatten().unwrap_or(0),
            readonly: self.node.readonly() || self.offered & f::BLK_RO != 0,
            discard: self.negotiated(st, f::BLK_DISCARD),
            write_zeroes: self.negotiated(st, f::BLK_WRITE_ZEROES),
        };
        let indirect = self.negotiated(st, f::INDIRECT_DESC);
        let mut chain = std::mem::take(&mut st.scratch);
        let result = self.pop_all(st, qi, mem, &ctx, indirect, &mut chain);
        st.scratch = chain;
        if let Err(reason) = result {
            self.fatal(st, format!("queue {qi}: {reason}"));
            return;
        }
        // Completions made right here (no storage) are raised now unless runners follow.
        after.wake_irq |= self.deliver(st, qi, false);
        self.want_runner(st, qi, after);
    }

    fn pop_all(
        &self,
        st: &mut State,
        qi: usize,
        mem: &GuestMemory,
        ctx: &Context,
        indirect: bool,
        chain: &mut Chain,
    ) -> std::result::Result<(), String> {
        let q = st.queues[qi].q.clone();
        let size = q.q();
        let avail_idx = q
            .avail_idx(mem)
            .map_err(|e| format!("avail ring unreadable: {e}"))?;
        let n = avail_idx.wrapping_sub(q.next_avail);
        if n > size {
            return Err(format!(
                "avail.idx moved from {} to {avail_idx}: more than the queue size {size} \
                 (or backwards)",
                q.next_avail
            ));
        }
        for _ in 0..n {
            let slot = &mut st.queues[qi];
            let next = slot.q.next_avail;
            let head = slot
                .q
                .avail_ring(mem, next)
                .map_err(|e| format!("avail ring unreadable: {e}"))?;
            if head >= size {
                return Err(format!(
                    "avail ring slot {} holds head {head}, beyond the queue size {size}",
                    next % size
                ));
            }
            if slot.in_flight[usize::from(head)] {
                return Err(format!(
                    "head {head} made available while already in flight"
                ));
            }
            slot.q.next_avail = next.wrapping_add(1);
            if slot.q.event_idx {
                slot.q
                    .publish_avail_event(mem)
                    .map_err(|e| format!("used ring unwritable: {e}"))?;
            }
            chain::walk_into(mem, slot.q.desc, size, head, indirect, chain)
                .map_err(|e| format!("chain at head {head}: {e}"))?;
            slot.in_flight[usize::from(head)] = true;
            slot.in_flight_count += 1;
            match request::parse(mem, chain, ctx) {
                Parsed::Drop => {
                    st.stats.requests_dropped += 1;
                    self.publish(st, qi, head, None, 0);
                }
                Parsed::Done {
                    status_addr,
                    status,
                    get_id,
                } => {
                    let mut status = status;
                    let mut used = 1;
                    if get_id {
                        if request::write_id(mem, &chain.writable, &self.serial) {
                            used = ID_LEN as u32 + 1;
                        } else {
                            status = S_IOERR;
                        }
                    }
                    self.publish(st, qi, head, Some((status_addr, status)), used);
                }
                Parsed::Io { status_addr, work } => {
                    st.queues[qi].pending.push_back(Pending {
                        head,
                        status_addr,
                        work,
                    });
                }
            }
            if st.broken {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Starts runners for waiting requests. Fast backend operations (page cache, memory:
    /// mostly under [`SLOW_NS`]) get one more runner at a time and at most
    /// `fast_cap`, so a CPU-bound workload does not drown 2 cores in context switches; slow
    /// ones (blocking device I/O) get a runner per waiting request up to the in-flight cap,
    /// at most [`WAKE_BATCH`] per call (each new runner tops up again when it starts).
    fn want_runner(&self, st: &mut State, qi: usize, after: &mut After) {
        let slow = self.slow_share.load(Ordering::Relaxed) > 512;
        let (limit, per_call, max_starting) = if slow {
            (self.cap, WAKE_BATCH, usize::MAX)
        } else {
            (self.fast_cap, 1, 1)
        };
        let slot = &mut st.queues[qi];
        let mut n = 0;
        while n < per_call
            && slot.starting < slot.pending.len()
            && slot.starting < max_starting
            && slot.runners < limit
        {
            slot.runners += 1;
            slot.starting += 1;
            after.runners.push(qi);
            n += 1;
        }
    }

    /// Returns a chain: status byte, used element, used.idx; then the notification decision.
    ///
    /// The notification decision (NO_INTERRUPT, or need_event with EVENT_IDX) is taken here,
    /// for this used.idx. Raising it is coalesced: while fast requests of the queue are still
    /// pending, the runner keeps going and raises InterruptStatus when the pending list runs
    /// empty or [`MAX_DEFERRED`] decisions have piled up (QEMU's dataplane coalesces its
    /// guest notifications the same way); slow requests raise at once.
    fn publish(&self, st: &mut State, qi: usize, head: u16, status: Option<(u64, u8)>, len: u32) {
        let mem = &*self.memory;
        if let Some((addr, s)) = status {
            // Inside a checked writable descriptor: cannot fail.
            let _ = mem.write(addr, &[s]);
        }
        let slot = &mut st.queues[qi];
        if slot.in_flight[usize::from(head)] {
            slot.in_flight[usize::from(head)] = false;
            slot.in_flight_count -= 1;
        }
        if let Err(e) = slot.q.add_used(mem, head, len) {
            self.fatal(st, format!("queue {qi}: used ring unwritable: {e}"));
            return;
        }
        st.stats.requests_completed += 1;
        match slot.q.should_notify(mem) {
            Ok(true) => {
                slot.irq_deferred += 1;
                st.stats.notifications += 1;
            }
            Ok(false) => {}
            Err(e) => self.fatal(st, format!("queue {qi}: avail ring unreadable: {e}")),
        }
    }

    /// Raises the used-buffer notifications decided for queue `qi`, unless the queue's fast
    /// requests are still being worked through (see [`publish`](Self::publish)).
    fn deliver(&self, st: &mut State, qi: usize, force: bool) -> bool {
        let slot = &mut st.queues[qi];
        if slot.irq_deferred == 0
            || !(force || slot.pending.is_empty() || slot.irq_deferred >= MAX_DEFERRED)
        {
            return false;
        }
        slot.irq_deferred = 0;
        let was = self.isr.fetch_or(INT_USED, Ordering::AcqRel);
        // Waiters wait for a non-zero InterruptStatus: wake them on the edge only (the caller
        // notifies once the state lock is released: a waiter checks InterruptStatus under the
        // lock before it sleeps, so the wake-up cannot be missed).
        was == 0 && st.irq_waiters > 0
    }

    /// A runner: claims pending requests of queue `qi` one at a time until none is left.
    fn run_queue(self: Arc<Self>, qi: usize) {
        let mut st = self.lock();
        st.queues[qi].starting -= 1;
        let mut wake = false;
        loop {
            let slot = &mut st.queues[qi];
            let Some(p) = slot.pending.pop_front() else {
                slot.runners -= 1;
                break;
            };
            let gen = slot.gen;
            slot.running += 1;
            st.busy += 1;
            self.busy_hint.store(true, Ordering::Relaxed);
            let writeback = st.writeback;
            let mut after = After {
                wake_irq: std::mem::take(&mut wake),
                ..After::default()
            };
            self.want_runner(&mut st, qi, &mut after);
            drop(st);
            self.after(after);
            let t0 = Instant::now();
            let (status, used) = self.execute(&p.work, writeback);
            let slow_op = t0.elapsed() >= Duration::from_nanos(SLOW_NS);
            // Moving share of slow operations (x1024): a preempted page-cache read now and
            // then does not switch the device into parallel mode, blocking I/O does.
            let frac = self.slow_share.load(Ordering::Relaxed);
            let frac = frac - frac / 16 + if slow_op { 1024 / 16 } else { 0 };
            self.slow_share.store(frac, Ordering::Relaxed);
            st = self.lock();
            st.busy -= 1;
            if st.busy == 0 {
                self.busy_hint.store(false, Ordering::Relaxed);
            }
            let slot = &mut st.queues[qi];
            if slot.gen != gen {
                slot.old_running -= 1;
                if slot.old_running == 0 {
                    // A reset waiting for its old operations may read 0 now.
                    self.wake_idle(&st);
                }
            } else {
                slot.running -= 1;
                if !st.broken {
                    self.publish(&mut st, qi, p.head, Some((p.status_addr, status)), used);
                    wake |= self.deliver(&mut st, qi, slow_op);
                }
            }
        }
        if st.busy == 0 && st.queues.iter().all(|q| q.pending.is_empty()) {
            self.wake_idle(&st);
        }
        drop(st);
        if wake {
            self.irq_cv.notify_all();
        }
    }

    /// Runs one request on the node: (status, used length).
    fn execute(&self, work: &Work, writeback: u8) -> (u8, u32) {
        let node = &*self.node;
        let mem = &*self.memory;
        let each = |segs: &[Seg], offset: u64, write: bool| -> Result<()> {
            let mut at = offset;
            for s in segs {
                let len = s.len as usize;
                if write {
                    mem.with_slice(s.addr, len, |buf| node.write(at, buf))??;
                } else {
                    mem.with_slice_mut(s.addr, len, |buf| node.read(at, buf))??;
                }
                at += u64::from(s.len);
            }
            Ok(())
        };
        let flush_after = |r: Result<()>| -> Result<()> {
            r?;
            if writeback == 0 {
                node.flush()?;
            }
            Ok(())
        };
        let (result, ok_len) = match work {
            Work::Read { offset, segs, len } => (each(segs, *offset, false), *len as u32 + 1),
            Work::Write { offset, segs, .. } => (flush_after(each(segs, *offset, true)), 1),
            Work::Flush => (node.flush(), 1),
            Work::Discard { offset, len } => (node.discard(*offset, *len).map(|_| ()), 1),
            Work::WriteZeroes { offset, len } => (flush_after(node.write_zeroes(*offset, *len)), 1),
        };
        match result {
            Ok(()) => (S_OK, ok_len),
            Err(_) => (S_IOERR, 1),
        }
    }
}
