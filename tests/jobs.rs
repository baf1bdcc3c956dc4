//! The job engine as the devices use it: a pool, job handles, owners and once-jobs.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blockemu_core::interrupt;
use blockemu_core::jobs::{Job, JobState, OnceJob, Owner, WorkerPool};
use blockemu_core::{Error, ErrorKind};
use crossbeam_channel::{bounded, Receiver, Sender};

/// A job that says when it started and then blocks until the gate opens (its sender drops).
fn gated(pool: &WorkerPool) -> (Job<&'static str>, Sender<()>) {
    let (started_tx, started_rx) = bounded::<()>(1);
    let (gate, gate_rx): (Sender<()>, Receiver<()>) = bounded(0);
    let job = pool.submit(move || {
        let _ = started_tx.send(());
        let _ = gate_rx.recv();
        Ok("gated")
    });
    started_rx.recv().unwrap();
    (job, gate)
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn results_and_errors_reach_every_handle() {
    let pool = WorkerPool::new(2).unwrap();
    let ok = pool.submit(|| Ok(vec![1u8, 2, 3]));
    let err = pool.submit::<(), _>(|| Err(Error::os(libc::EIO, "sector 7 unreadable")));
    let copy = ok.clone();
    assert_eq!(ok.wait(None).unwrap(), vec![1, 2, 3]);
    assert_eq!(copy.poll().unwrap().unwrap(), vec![1, 2, 3]);
    assert!(copy.is_done());
    assert_eq!(copy.state(), JobState::Done);
    let e = err.wait(Some(Duration::from_secs(10))).unwrap_err();
    assert_eq!(e.os_code(), Some(libc::EIO));
    assert_eq!(e.message(), "sector 7 unreadable");
    assert_eq!(err.state(), JobState::Done);
}

#[test]
fn a_panicking_job_fails_and_its_worker_lives_on() {
    let pool = WorkerPool::new(1).unwrap();
    let job = pool.submit::<u8, _>(|| panic!("bug in a backend"));
    let e = job.wait(None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.message().contains("bug in a backend"), "{e}");
    assert_eq!(pool.submit(|| Ok(2)).wait(None).unwrap(), 2);
}

#[test]
fn wait_times_out() {
    let pool = WorkerPool::new(1).unwrap();
    let (job, gate) = gated(&pool);
    let t = Instant::now();
    let e = job.wait(Some(Duration::from_millis(10))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(t.elapsed() >= Duration::from_millis(10));
    drop(gate);
    assert_eq!(job.wait(Some(Duration::from_secs(10))).unwrap(), "gated");
}

#[test]
fn wait_is_interrupted_by_the_hook() {
    let pool = WorkerPool::new(1).unwrap();
    let (job, gate) = gated(&pool);
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let r = interrupt::with_hook(
        move || a.fetch_add(1, Ordering::SeqCst) >= 1,
        || job.wait(None),
    );
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Interrupted);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(
        job.state(),
        JobState::Running,
        "an interrupted wait leaves the job alone"
    );
    drop(gate);
    job.wait(None).unwrap();
}

#[test]
fn only_queued_jobs_can_be_cancelled() {
    let pool = WorkerPool::new(1).unwrap();
    let (running, gate) = gated(&pool);
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    let queued = pool.submit(move || {
        r.store(true, Ordering::SeqCst);
        Ok(())
    });
    assert_eq!(queued.state(), JobState::Queued);
    assert!(!running.cancel());
    assert!(queued.cancel());
    assert!(!queued.cancel());
    assert_eq!(queued.state(), JobState::Cancelled);
    assert_eq!(queued.wait(None).unwrap_err().kind(), ErrorKind::Cancelled);
    drop(gate);
    running.wait(None).unwrap();
    // The worker took the cancelled job off the queue before this one, without running it.
    pool.submit(|| Ok(())).wait(None).unwrap();
    assert!(!ran.load(Ordering::SeqCst));
}

#[test]
fn callbacks_run_exactly_once_when_registration_races_completion() {
    let pool = WorkerPool::new(2).unwrap();
    const THREADS: usize = 3;
    const EACH: usize = 20;
    for _ in 0..50 {
        let runs: Arc<Vec<AtomicUsize>> =
            Arc::new((0..THREADS * EACH).map(|_| AtomicUsize::new(0)).collect());
        let start = Arc::new(Barrier::new(THREADS + 1));
        let registrars: Vec<_> = (0..THREADS)
            .map(|t| {
                let (runs, start) = (runs.clone(), start.clone());
                let pool = pool.clone();
                thread::spawn(move || {
                    start.wait();
                    let job: Job<usize> = pool.submit(|| Ok(1));
                    for i in 0..EACH {
                        let runs = runs.clone();
                        job.on_complete(move |r| {
                            runs[t * EACH + i].fetch_add(*r.as_ref().unwrap(), Ordering::SeqCst);
                        });
                    }
                })
            })
            .collect();
        // A shared job too, completed by a worker while the others register on it.
        let shared = pool.submit(|| Ok(1usize));
        let shared_runs = Arc::new(AtomicUsize::new(0));
        for _ in 0..EACH {
            let s = shared_runs.clone();
            shared.on_complete(move |_| {
                s.fetch_add(1, Ordering::SeqCst);
            });
        }
        start.wait();
        for r in registrars {
            r.join().unwrap();
        }
        eventually("every callback", || {
            runs.iter().all(|n| n.load(Ordering::SeqCst) >= 1)
                && shared_runs.load(Ordering::SeqCst) >= EACH
        });
        assert!(runs.iter().all(|n| n.load(Ordering::SeqCst) == 1));
        assert_eq!(shared_runs.load(Ordering::SeqCst), EACH);
    }
}

#[test]
fn no_callback_of_an_old_generation_runs_after_invalidate_returns() {
    let pool = WorkerPool::new(2).unwrap();
    let late = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    for round in 0..30 {
        let owner = Owner::new();
        let reset = Arc::new(AtomicBool::new(false));
        let jobs: Vec<Job<()>> = (0..20)
            .map(|_| {
                let job = pool.submit(|| Ok(()));
                let (reset, late, ran) = (reset.clone(), late.clone(), ran.clone());
                job.on_complete_for(&owner, move |_| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    if reset.load(Ordering::SeqCst) {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                    // Stay a moment, so that invalidate() often finds a callback running.
                    thread::sleep(Duration::from_micros(50));
                    if reset.load(Ordering::SeqCst) {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                });
                job
            })
            .collect();
        thread::sleep(Duration::from_micros(100));
        if round % 2 == 0 {
            owner.invalidate();
            reset.store(true, Ordering::SeqCst);
        } else {
            drop(owner);
            reset.store(true, Ordering::SeqCst);
        }
        for job in jobs {
            job.wait(None).unwrap();
        }
    }
    assert_eq!(late.load(Ordering::SeqCst), 0);
    assert!(
        ran.load(Ordering::SeqCst) > 0,
        "no callback ever ran before a reset"
    );
}

#[test]
fn callbacks_of_the_new_generation_still_run() {
    let pool = WorkerPool::new(1).unwrap();
    let owner = Owner::new();
    let (job, gate) = gated(&pool);
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    job.on_complete_for(&owner, move |_| {
        s.fetch_add(1, Ordering::SeqCst);
    });
    owner.invalidate();
    let s = seen.clone();
    job.on_complete_for(&owner, move |_| {
        s.fetch_add(10, Ordering::SeqCst);
    });
    drop(gate);
    job.wait(None).unwrap();
    eventually("the callback", || seen.load(Ordering::SeqCst) != 0);
    pool.shutdown(); // joins the worker: its callbacks are over
    assert_eq!(seen.load(Ordering::SeqCst), 10);
}

#[test]
fn shutdown_finishes_running_jobs_and_closes_queued_ones() {
    let pool = WorkerPool::new(1).unwrap();
    let (running, gate) = gated(&pool);
    let queued: Vec<Job<u8>> = (0..3).map(|i| pool.submit(move || Ok(i))).collect();
    let closed_seen = Arc::new(AtomicUsize::new(0));
    let c = closed_seen.clone();
    queued[0].on_complete(move |r| {
        if r.as_ref().is_err_and(|e| e.kind() == ErrorKind::Closed) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    let stopper = {
        let pool = pool.clone();
        thread::spawn(move || pool.shutdown())
    };
    eventually("the shutdown to begin", || pool.is_shut_down());
    assert_eq!(running.state(), JobState::Running);
    drop(gate);
    stopper.join().unwrap();
    assert_eq!(running.poll().unwrap().unwrap(), "gated");
    for job in &queued {
        assert_eq!(job.state(), JobState::Cancelled);
        assert_eq!(job.poll().unwrap().unwrap_err().kind(), ErrorKind::Closed);
    }
    assert_eq!(closed_seen.load(Ordering::SeqCst), 1);
    let late = pool.submit(|| Ok(1u8));
    assert_eq!(late.poll().unwrap().unwrap_err().kind(), ErrorKind::Closed);
    pool.shutdown(); // a second time: nothing left to do
}

#[test]
fn dropping_the_last_handle_joins_every_worker() {
    struct OnExit(Arc<AtomicUsize>);
    impl Drop for OnExit {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    thread_local! {
        static EXIT: RefCell<Option<OnExit>> = const { RefCell::new(None) };
    }
    const THREADS: usize = 3;
    let exited = Arc::new(AtomicUsize::new(0));
    let pool = WorkerPool::new(THREADS).unwrap();
    // Every worker takes one of these jobs: each waits until all of them run.
    let all = Arc::new(Barrier::new(THREADS));
    let jobs: Vec<_> = (0..THREADS)
        .map(|_| {
            let (all, exited) = (all.clone(), exited.clone());
            pool.submit(move || {
                EXIT.with(|e| *e.borrow_mut() = Some(OnExit(exited)));
                all.wait();
                Ok(())
            })
        })
        .collect();
    for job in &jobs {
        job.wait(None).unwrap();
    }
    assert_eq!(exited.load(Ordering::SeqCst), 0);
    drop(pool);
    // A worker's thread-locals are dropped as it exits, before its join returns.
    assert_eq!(exited.load(Ordering::SeqCst), THREADS);
}

#[test]
fn a_once_job_runs_once_under_concurrent_starts() {
    let pool = WorkerPool::new(2).unwrap();
    const CALLERS: usize = 6;
    let once = Arc::new(OnceJob::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(CALLERS));
    let callers: Vec<_> = (0..CALLERS)
        .map(|i| {
            let (once, runs, start, pool) =
                (once.clone(), runs.clone(), start.clone(), pool.clone());
            thread::spawn(move || {
                start.wait();
                once.start(&pool, move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(i)
                })
            })
        })
        .collect();
    let jobs: Vec<Job<usize>> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    let first = jobs[0].wait(None).unwrap();
    for job in &jobs {
        assert_eq!(job.wait(None).unwrap(), first);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(once.is_started());
    assert_eq!(once.get().unwrap().unwrap(), first);
    assert!(!once.set_known(99));
}
