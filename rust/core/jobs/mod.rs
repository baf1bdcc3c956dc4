//! The worker pool that keeps storage off the register path, and the handles of its jobs.
//!
//! Devices submit backend work to [`WorkerPool::global`] and attach completion callbacks with
//! [`Job::on_complete_for`], so that a device reset ([`Owner::invalidate`]) cuts off every
//! callback of the requests it had in flight. The geometry prefetch is a [`OnceJob`].

mod io_pool;
mod job;
mod mirror;
mod once;
mod owner;
mod pool;
mod prefetch;

pub use io_pool::IoPool;
pub use job::{Job, JobState};
pub use mirror::{
    MirrorConfig, MirrorJob, MirrorProgress, MirrorState, MAX_CHUNK, MAX_IN_FLIGHT, MIN_CHUNK,
};
pub use once::OnceJob;
pub use owner::{Owner, Ticket};
pub use pool::WorkerPool;
pub use prefetch::{guess_from_node, GeometryPolicy, GeometryPrefetch};

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, ignoring poison: no user code runs under the locks of this module (jobs and
/// callbacks run outside them), so a poisoned lock still guards consistent data.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
