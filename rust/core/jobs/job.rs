//! `Job<T>`: the handle of one piece of work submitted to a worker pool.

use std::any::Any;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::lock;
use super::owner::Owner;
use crate::{interrupt, Error, Result};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Submitted, waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// It ran; its result (value or error) is there.
    Done,
    /// It never ran (cancelled, or its pool shut down first); its result is that error.
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
        }
    }
}

type Callback<T> = Box<dyn FnOnce(&Result<T>) + Send>;

struct Shared<T> {
    /// Set once, under `slot`'s lock, together with the final state. Kept outside the lock so
    /// that `poll` and callbacks read it without locking or cloning.
    result: OnceLock<Result<T>>,
    slot: Mutex<Slot<T>>,
    completed: Condvar,
}

struct Slot<T> {
    state: JobState,
    callbacks: Vec<Callback<T>>,
}

/// A cheap, cloneable handle of one job; every clone sees the same result.
///
/// `T: Sync` because callbacks on different threads read the one stored result by reference.
pub struct Job<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Job<T> {
    fn clone(&self) -> Self {
        Job {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for Job<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("state", &lock(&self.shared.slot).state)
            .finish()
    }
}

impl<T: Clone + Send + Sync + 'static> Job<T> {
    fn with_state(state: JobState) -> Self {
        Job {
            shared: Arc::new(Shared {
                result: OnceLock::new(),
                slot: Mutex::new(Slot {
                    state,
                    callbacks: Vec::new(),
                }),
                completed: Condvar::new(),
            }),
        }
    }

    pub(crate) fn queued() -> Self {
        Self::with_state(JobState::Queued)
    }

    /// A job that is already complete: a value known without running anything, or an error
    /// decided before submitting.
    pub fn ready(result: Result<T>) -> Self {
        let job = Self::with_state(JobState::Done);
        let _ = job.shared.result.set(result);
        job
    }

    /// The result if the job is complete; never blocks.
    pub fn poll(&self) -> Option<Result<T>> {
        self.shared.result.get().cloned()
    }

    pub fn is_done(&self) -> bool {
        self.shared.result.get().is_some()
    }

    pub fn state(&self) -> JobState {
        lock(&self.shared.slot).state
    }

    /// Waits for the result, at most `timeout` (forever with `None`).
    ///
    /// Errors: `Timeout` when the time runs out, `Interrupted` when this thread's interrupt
    /// hook fires (it is asked every `interrupt::POLL`).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut slot = lock(&self.shared.slot);
            let mut step = interrupt::POLL;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() && self.shared.result.get().is_none() {
                    return Err(Error::timeout(format!(
                        "job did not complete within {:?}",
                        timeout.unwrap_or_default()
                    )));
                }
                step = step.min(left);
            }
            // The result is set under this lock and the waiters are woken under it, so
            // checking here and then waiting cannot miss the completion.
            if self.shared.result.get().is_none() {
                slot = self
                    .shared
                    .completed
                    .wait_timeout(slot, step)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(slot);
            if let Some(result) = self.shared.result.get() {
                return result.clone();
            }
            // Outside the lock: the hook may run arbitrary code (Python's signal handlers).
            interrupt::check()?;
        }
    }

    /// Cancels the job if it has not started; it then never runs and completes with a
    /// `Cancelled` error. Returns false when it is already running or complete.
    pub fn cancel(&self) -> bool {
        let slot = lock(&self.shared.slot);
        if slot.state != JobState::Queued {
            return false;
        }
        self.complete(
            slot,
            JobState::Cancelled,
            Err(Error::cancelled("job cancelled before it ran")),
        );
        true
    }

    /// Runs `callback` once with the result: on the worker right after completion, or here and
    /// now if the job is already complete. Never called under the job's lock, so the callback
    /// may use the job. A panic in the callback is caught (and reported by the panic hook).
    pub fn on_complete(&self, callback: impl FnOnce(&Result<T>) + Send + 'static) {
        let mut slot = lock(&self.shared.slot);
        match self.shared.result.get() {
            None => slot.callbacks.push(Box::new(callback)),
            Some(result) => {
                drop(slot);
                run_callback(Box::new(callback), result);
            }
        }
    }

    /// Like [`on_complete`](Self::on_complete), but the callback runs only if `owner` still has
    /// the generation it has now, and is alive, when the job completes. See [`Owner`].
    pub fn on_complete_for(
        &self,
        owner: &Owner,
        callback: impl FnOnce(&Result<T>) + Send + 'static,
    ) {
        let ticket = owner.ticket();
        self.on_complete(move |result| {
            ticket.run(|| callback(result));
        });
    }

    /// Starts the job on the current thread: false if it was cancelled meanwhile.
    fn begin(&self) -> bool {
        let mut slot = lock(&self.shared.slot);
        if slot.state != JobState::Queued {
            return false;
        }
        slot.state = JobState::Running;
        true
    }

    /// Stores the result, wakes the waiters, then runs the callbacks outside the lock.
    fn complete(&self, mut slot: MutexGuard<'_, Slot<T>>, state: JobState, result: Result<T>) {
        if self.shared.result.set(result).is_err() {
            return; // completed already: every transition to a final state is checked first
        }
        slot.state = state;
        let callbacks = std::mem::take(&mut slot.callbacks);
        self.shared.completed.notify_all();
        drop(slot);
        if let Some(result) = self.shared.result.get() {
            for callback in callbacks {
                run_callback(callback, result);
            }
        }
    }
}

fn run_callback<T>(callback: Callback<T>, result: &Result<T>) {
    // The panic hook has already reported it; a worker (or a caller across the FFI
    // boundary) must not unwind because of someone's callback.
    let _ = panic::catch_unwind(AssertUnwindSafe(|| callback(result)));
}

/// Why a job failed when its closure panicked. A panic is a bug; the job's waiters see an EIO,
/// which is what a device would report for a request that could not complete.
fn panic_error(payload: Box<dyn Any + Send>) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    Error::os(libc::EIO, format!("internal error: job panicked: {what}"))
}

/// What the pool's channel carries: a job's closure, run or given up by a worker.
pub(crate) trait Task: Send {
    fn run(self: Box<Self>);
    /// Completes the job without running it (the pool is shutting down).
    fn abandon(self: Box<Self>, error: Error);
}

struct JobTask<T, F> {
    job: Job<T>,
    work: F,
}

impl<T, F> Task for JobTask<T, F>
where
    T: Clone + Send + Sync + 'static,
    F: FnOnce() -> Result<T> + Send,
{
    fn run(self: Box<Self>) {
        let JobTask { job, work } = *self;
        if !job.begin() {
            return;
        }
        let result =
            panic::catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|p| Err(panic_error(p)));
        let slot = lock(&job.shared.slot);
        job.complete(slot, JobState::Done, result);
    }

    fn abandon(self: Box<Self>, error: Error) {
        let JobTask { job, work } = *self;
        // The closure's captures may own anything (even a pool handle): drop them before
        // completing, outside every lock.
        drop(work);
        let slot = lock(&job.shared.slot);
        if slot.state == JobState::Queued {
            job.complete(slot, JobState::Cancelled, Err(error));
        }
    }
}

/// A new queued job and the task that runs it.
pub(crate) fn new_task<T, F>(work: F) -> (Job<T>, Box<dyn Task>)
where
    T: Clone + Send + Sync + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let job = Job::queued();
    let task = Box::new(JobTask {
        job: job.clone(),
        work,
    });
    (job, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_task_runs_once_and_completes_its_job() {
        let (job, task) = new_task(|| Ok(7u32));
        assert_eq!(job.state(), JobState::Queued);
        assert!(job.poll().is_none());
        task.run();
        assert_eq!(job.state(), JobState::Done);
        assert_eq!(job.poll().unwrap().unwrap(), 7);
        assert!(!job.cancel(), "a complete job cannot be cancelled");
    }

    #[test]
    fn a_cancelled_task_never_runs() {
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let (job, task) = new_task(move || {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        assert!(job.cancel());
        assert!(!job.cancel());
        task.run();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!(job.wait(None).unwrap_err().kind(), ErrorKind::Cancelled);
    }

    #[test]
    fn an_abandoned_task_completes_with_the_given_error() {
        let (job, task) = new_task(|| Ok(1u8));
        task.abandon(Error::closed("pool gone"));
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!(job.poll().unwrap().unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn a_panic_becomes_an_eio_error() {
        let (job, task) = new_task::<u8, _>(|| panic!("boom"));
        task.run();
        let err = job.poll().unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(err.os_code(), Some(libc::EIO));
        assert!(err.message().contains("boom"), "{err}");
    }

    #[test]
    fn callbacks_run_on_completion_or_at_once_and_may_use_the_job() {
        let (job, task) = new_task(|| Ok(3u8));
        let seen = Arc::new(AtomicUsize::new(0));
        let (s, j) = (seen.clone(), job.clone());
        job.on_complete(move |r| {
            // Touching the job from its own callback must not deadlock.
            assert_eq!(j.state(), JobState::Done);
            s.fetch_add(*r.as_ref().unwrap() as usize, Ordering::SeqCst);
        });
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        task.run();
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        let s = seen.clone();
        job.on_complete(move |_| {
            s.fetch_add(10, Ordering::SeqCst);
        });
        assert_eq!(seen.load(Ordering::SeqCst), 13);
    }

    #[test]
    fn a_panicking_callback_does_not_stop_the_others() {
        let job = Job::ready(Ok(()));
        job.on_complete(|_| panic!("callback bug"));
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        job.on_complete(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn wait_times_out_on_a_job_that_never_runs() {
        let (job, _task) = new_task(|| Ok(()));
        let err = job.wait(Some(Duration::from_millis(5))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert_eq!(job.state(), JobState::Queued);
    }
}
