//! `OnceJob<T>`: a value computed at most once on a pool, or known without computing it
//! (the geometry: prefetched from sector 0 once per device, or given by the user or by the
//! migrated device state).

use std::fmt;
use std::sync::Mutex;

use super::{lock, Job, WorkerPool};
use crate::Result;

enum Once<T> {
    Idle,
    /// Set by `set_known`: nothing ran.
    Known(Job<T>),
    /// Submitted by `start`.
    Started(Job<T>),
}

pub struct OnceJob<T> {
    once: Mutex<Once<T>>,
}

impl<T: Clone + Send + Sync + 'static> Default for OnceJob<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for OnceJob<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*lock(&self.once) {
            Once::Idle => "idle",
            Once::Known(_) => "known",
            Once::Started(_) => "started",
        };
        f.debug_struct("OnceJob").field("state", &state).finish()
    }
}

impl<T: Clone + Send + Sync + 'static> OnceJob<T> {
    pub fn new() -> Self {
        OnceJob {
            once: Mutex::new(Once::Idle),
        }
    }

    pub fn known(value: T) -> Self {
        OnceJob {
            once: Mutex::new(Once::Known(Job::ready(Ok(value)))),
        }
    }

    /// Submits `compute` to `pool` the first time; later calls (and calls after
    /// [`set_known`](Self::set_known)) submit nothing. Returns the job that has or will
    /// have the value.
    pub fn start<F>(&self, pool: &WorkerPool, compute: F) -> Job<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let mut once = lock(&self.once);
        match &*once {
            Once::Known(job) | Once::Started(job) => job.clone(),
            Once::Idle => {
                // Under the lock so that racing callers submit once; submitting never blocks.
                let job = pool.submit(compute);
                *once = Once::Started(job.clone());
                job
            }
        }
    }

    /// Records a value known without computing it. Replaces an earlier known value; refused
    /// (false) once a computation was started, whose result then stands.
    pub fn set_known(&self, value: T) -> bool {
        let mut once = lock(&self.once);
        if let Once::Started(_) = &*once {
            return false;
        }
        *once = Once::Known(Job::ready(Ok(value)));
        true
    }

    /// Records the outcome of a computation done by the caller, as if `start` had run it:
    /// later `set_known` calls are refused. False (nothing changes) if a value is there.
    pub fn set_computed(&self, value: Result<T>) -> bool {
        let mut once = lock(&self.once);
        if !matches!(&*once, Once::Idle) {
            return false;
        }
        *once = Once::Started(Job::ready(value));
        true
    }

    /// The value (or the computation's error) once there; never blocks.
    pub fn get(&self) -> Option<Result<T>> {
        self.job()?.poll()
    }

    /// The job that has or will have the value, if `start` or `set_known` was called.
    pub fn job(&self) -> Option<Job<T>> {
        match &*lock(&self.once) {
            Once::Idle => None,
            Once::Known(job) | Once::Started(job) => Some(job.clone()),
        }
    }

    /// True once `start` submitted the computation (not for a known value).
    pub fn is_started(&self) -> bool {
        matches!(&*lock(&self.once), Once::Started(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn a_known_value_wins_until_a_computation_starts() {
        let pool = WorkerPool::new(1).unwrap();
        let once = OnceJob::new();
        assert!(once.get().is_none() && once.job().is_none());
        assert!(once.set_known(1u32));
        assert!(once.set_known(2));
        let job = once.start(&pool, || panic!("must not run"));
        assert_eq!(job.wait(None).unwrap(), 2);
        assert!(!once.is_started());

        let once = OnceJob::new();
        assert_eq!(once.start(&pool, || Ok(9u32)).wait(None).unwrap(), 9);
        assert!(once.is_started());
        assert!(!once.set_known(2));
        assert_eq!(once.get().unwrap().unwrap(), 9);
    }

    #[test]
    fn a_failed_computation_is_not_retried() {
        let pool = WorkerPool::new(1).unwrap();
        let once = OnceJob::<u8>::new();
        let err = once
            .start(&pool, || Err(Error::os(libc::EIO, "sector 0")))
            .wait(None)
            .unwrap_err();
        assert_eq!(err.os_code(), Some(libc::EIO));
        let again = once.start(&pool, || Ok(1)).wait(None);
        assert!(again.is_err());
    }
}
