//! `WorkerPool`: a fixed set of worker threads fed through one channel.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};

use super::job::{new_task, Job, Task};
use super::lock;
use crate::{Error, Result};

/// A cheap, cloneable handle of a worker pool. The pool shuts down when its last handle is
/// dropped (or at [`shutdown`](Self::shutdown)): running jobs finish, queued jobs complete with
/// a `Closed` error without running, and the threads are joined.
///
/// A job must not wait for another job of the same pool unless the pool has a free thread
/// for it; with every worker waiting, nothing runs.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// `None` once shut down. Submitters share the read side, so they never wait on each other.
    sender: RwLock<Option<Sender<Box<dyn Task>>>>,
    /// Set before the sender goes: a worker then gives up every job it still receives.
    closing: Arc<AtomicBool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    threads: usize,
    /// The process-wide pool outlives everyone; `shutdown()` on it does nothing.
    global: bool,
}

impl fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerPool")
            .field("threads", &self.inner.threads)
            .field("shut_down", &self.is_shut_down())
            .finish()
    }
}

static GLOBAL: OnceLock<WorkerPool> = OnceLock::new();

impl WorkerPool {
    /// A pool of `threads` workers named "blockemu-worker-N".
    pub fn new(threads: usize) -> Result<Self> {
        Self::spawn(threads, false)
    }

    /// The process-wide pool the devices submit their backend I/O to, created on first use.
    /// It has several threads (max(2, CPUs), at most 8) so that a few blocking backend
    /// operations can be in flight at once.
    pub fn global() -> Result<Self> {
        if let Some(pool) = GLOBAL.get() {
            return Ok(pool.clone());
        }
        let threads = thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let pool = Self::spawn(threads, true)?;
        // Losing a race to another first caller drops (and joins) this pool.
        Ok(GLOBAL.get_or_init(|| pool).clone())
    }

    fn spawn(threads: usize, global: bool) -> Result<Self> {
        if threads == 0 {
            return Err(Error::invalid("a worker pool needs at least one thread"));
        }
        let (sender, receiver) = crossbeam_channel::unbounded();
        let closing = Arc::new(AtomicBool::new(false));
        let pool = WorkerPool {
            inner: Arc::new(PoolInner {
                sender: RwLock::new(Some(sender)),
                closing: closing.clone(),
                workers: Mutex::new(Vec::with_capacity(threads)),
                threads,
                global,
            }),
        };
        for n in 0..threads {
            let (receiver, closing) = (receiver.clone(), closing.clone());
            let handle = thread::Builder::new()
                .name(format!("blockemu-worker-{n}"))
                .spawn(move || work(receiver, closing))
                // On failure, dropping `pool` joins the workers already started.
                .map_err(|e| Error::from(e).with_op("start worker thread"))?;
            lock(&pool.inner.workers).push(handle);
        }
        Ok(pool)
    }

    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    pub fn is_shut_down(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire)
    }

    /// Queues `work` and returns its job at once. On a shut-down pool the job is already
    /// complete with a `Closed` error.
    pub fn submit<T, F>(&self, work: F) -> Job<T>
    where
        T: Clone + Send + Sync + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let (job, task) = new_task(work);
        let refused = {
            let sender = self
                .inner
                .sender
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            match sender.as_ref() {
                // Unbounded: sending never blocks.
                Some(sender) => sender.send(task).err().map(|e| e.into_inner()),
                None => Some(task),
            }
        };
        // Outside the lock: giving up drops the closure, which may drop a pool handle.
        if let Some(task) = refused {
            task.abandon(closed_error());
        }
        job
    }

    /// Stops the pool: running jobs finish, queued ones complete with `Closed`, and the
    /// threads are joined before this returns (except the calling thread, if it is one of
    /// the workers). Later submits complete with `Closed` at once. Does nothing on the
    /// process-wide pool.
    pub fn shutdown(&self) {
        if !self.inner.global {
            self.inner.close();
        }
    }
}

impl PoolInner {
    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let sender = self
            .sender
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The workers leave their loop once the channel is empty and has no sender.
        drop(sender);
        let workers = std::mem::take(&mut *lock(&self.workers));
        let me = thread::current().id();
        for worker in workers {
            // A job that drops the last pool handle runs on a worker, which cannot join itself;
            // that worker leaves its loop on its own.
            if worker.thread().id() != me {
                let _ = worker.join();
            }
        }
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.close();
    }
}

fn closed_error() -> Error {
    Error::closed("the worker pool shut down before the job ran")
}

fn work(receiver: Receiver<Box<dyn Task>>, closing: Arc<AtomicBool>) {
    for task in receiver.iter() {
        if closing.load(Ordering::Acquire) {
            task.abandon(closed_error());
        } else {
            task.run();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn zero_threads_is_refused() {
        let err = WorkerPool::new(0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn the_global_pool_is_shared_and_survives_shutdown() {
        let a = WorkerPool::global().unwrap();
        let b = WorkerPool::global().unwrap();
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        assert!((2..=8).contains(&a.threads()));
        a.shutdown();
        assert!(!a.is_shut_down());
        assert_eq!(b.submit(|| Ok(5)).wait(None).unwrap(), 5);
    }

    #[test]
    fn workers_are_named() {
        let pool = WorkerPool::new(1).unwrap();
        let name = pool
            .submit(|| Ok(thread::current().name().map(str::to_owned)))
            .wait(None)
            .unwrap();
        assert_eq!(name.as_deref(), Some("blockemu-worker-0"));
    }

    #[test]
    fn a_job_may_drop_the_last_handle_of_its_pool() {
        let pool = WorkerPool::new(2).unwrap();
        let handle = pool.clone();
        let job = pool.submit(move || {
            drop(handle);
            Ok(1)
        });
        drop(pool);
        // Whichever handle went last, the job completed and nothing deadlocked.
        assert_eq!(job.wait(None).unwrap(), 1);
    }
}
