//! `IoPool`: an elastic set of threads for blocking backend I/O.
//!
//! The [`WorkerPool`](super::WorkerPool) has a few threads (one per CPU): right for CPU-bound
//! work, too few to keep 32 O_DIRECT reads in flight. This pool grows on demand up to a cap
//! and shrinks again: a thread that found nothing to do for [`IDLE_EXIT`] exits. A task handed
//! to an idle thread wakes exactly that thread (a token per wake-up), so a burst of tasks
//! never wakes more threads than it has tasks.
//!
//! Devices do not submit one task per request: they submit a "runner" that claims requests
//! from the device's own pending list in a loop, and start another runner only while requests
//! are still waiting (see `virtio::blk::device`). That keeps a CPU-bound page-cache workload
//! on few threads (no context-switch storm on 2 cores) while a slow device still gets its
//! queue depth.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Duration;

/// How long an idle thread waits for work before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);

type Task = Box<dyn FnOnce() + Send + 'static>;

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    cap: usize,
}

struct State {
    queue: VecDeque<Task>,
    threads: usize,
    idle: usize,
    /// Wake-ups handed to idle threads and not yet taken (each one owns one queued task).
    tokens: usize,
    spawned_total: u64,
}

/// A cheap, cloneable handle of an elastic I/O pool.
#[derive(Clone)]
pub struct IoPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("IoPool")
            .field("cap", &self.inner.cap)
            .field("threads", &st.threads)
            .field("idle", &st.idle)
            .finish()
    }
}

static GLOBAL: OnceLock<IoPool> = OnceLock::new();

impl IoPool {
    /// A pool of at most `cap` threads (at least 1).
    pub fn new(cap: usize) -> Self {
        IoPool {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    threads: 0,
                    idle: 0,
                    tokens: 0,
                    spawned_total: 0,
                }),
                wake: Condvar::new(),
                cap: cap.max(1),
            }),
        }
    }

    /// The process-wide I/O pool (up to 256 threads).
    pub fn global() -> Self {
        GLOBAL.get_or_init(|| IoPool::new(256)).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Threads alive now.
    pub fn threads(&self) -> usize {
        self.lock().threads
    }

    /// Threads started since the pool was created.
    pub fn spawned_total(&self) -> u64 {
        self.lock().spawned_total
    }

    /// Runs `task` on a pool thread: an idle one if there is one, else a new one while under
    /// the cap, else the next thread that finishes its task. Never blocks. A panicking task
    /// is caught (the thread survives).
    pub fn spawn(&self, task: impl FnOnce() + Send + 'static) {
        let mut st = self.lock();
        st.queue.push_back(Box::new(task));
        if st.idle > st.tokens {
            st.tokens += 1;
            drop(st);
            self.inner.wake.notify_one();
            return;
        }
        if st.threads < self.inner.cap {
            let inner = self.inner.clone();
            let started = thread::Builder::new()
                .name("blockemu-io".into())
                .spawn(move || work(inner));
            if started.is_ok() {
                st.threads += 1;
                st.spawned_total += 1;
            }
            // On failure the task waits for a busy thread (there is one unless threads == 0).
            if st.threads == 0 {
                // No thread at all could be started: run it here rather than lose it.
                let task = st.queue.pop_back();
                drop(st);
                if let Some(task) = task {
                    run(task);
                }
            }
        }
    }
}

fn run(task: Task) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
}

fn work(inner: Arc<Inner>) {
    let mut st = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(task) = st.queue.pop_front() {
            drop(st);
            run(task);
            st = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            continue;
        }
        st.idle += 1;
        loop {
            let (g, timeout) = inner
                .wake
                .wait_timeout(st, IDLE_EXIT)
                .unwrap_or_else(PoisonError::into_inner);
            st = g;
            if st.tokens > 0 {
                // Woken for a task (the submitter counted us out of the idle ones).
                st.tokens -= 1;
                st.idle -= 1;
                break;
            }
            if timeout.timed_out() {
                st.idle -= 1;
                if st.queue.is_empty() {
                    st.threads -= 1;
                    return;
                }
                break;
            }
            // Spurious wake-up: still idle.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn runs_tasks_concurrently_up_to_the_cap() {
        let pool = IoPool::new(4);
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..4 {
            let (tx, running, gate) = (tx.clone(), running.clone(), gate.clone());
            pool.spawn(move || {
                running.fetch_add(1, Ordering::SeqCst);
                let mut open = gate.0.lock().unwrap();
                while !*open {
                    open = gate.1.wait(open).unwrap();
                }
                tx.send(()).unwrap();
            });
        }
        while running.load(Ordering::SeqCst) < 4 {
            thread::yield_now();
        }
        assert_eq!(pool.threads(), 4);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for _ in 0..4 {
            rx.recv().unwrap();
        }
        // Over the cap: queued behind the busy threads, still run.
        for _ in 0..20 {
            let tx = tx.clone();
            pool.spawn(move || tx.send(()).unwrap());
        }
        for _ in 0..20 {
            rx.recv().unwrap();
        }
        assert!(pool.threads() <= 4);
    }

    #[test]
    fn a_panicking_task_does_not_kill_the_pool() {
        let pool = IoPool::new(1);
        pool.spawn(|| panic!("boom"));
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || tx.send(7).unwrap());
        assert_eq!(rx.recv().unwrap(), 7);
    }
}
