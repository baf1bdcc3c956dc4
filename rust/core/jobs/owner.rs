//! `Owner`: lets a device say "no callback of my old jobs runs after I was reset or dropped".
//!
//! A device keeps one `Owner`. Each callback it attaches carries a [`Ticket`] with the owner's
//! generation at that moment; the callback runs only if the generation is unchanged and the
//! owner alive. Callbacks run under a read guard and [`Owner::invalidate`] (and drop) take the
//! write guard, so once `invalidate()` returns no callback of an older generation runs or is
//! still running.
//!
//! Do not call `invalidate()` while holding a lock that such a callback takes: it waits for the
//! running callbacks to finish.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

struct OwnerShared {
    gate: RwLock<()>,
    generation: AtomicU64,
    alive: AtomicBool,
}

thread_local! {
    /// The owners whose read guard this thread holds (callbacks can nest). Invalidating one of
    /// them from inside its own callback must not wait for itself.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

impl OwnerShared {
    fn id(&self) -> usize {
        self as *const Self as usize
    }

    fn held_here(&self) -> bool {
        HELD.with(|held| held.borrow().contains(&self.id()))
    }

    fn is_current(&self, generation: u64) -> bool {
        self.alive.load(Ordering::Acquire) && self.generation.load(Ordering::Acquire) == generation
    }

    /// Runs `change` once no callback of this owner runs on another thread.
    fn exclusive<R>(&self, change: impl FnOnce() -> R) -> R {
        if self.held_here() {
            // Called from one of this owner's callbacks: this thread holds a read guard, so
            // waiting for the write guard would wait for itself.
            return change();
        }
        let _guard = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        change()
    }
}

/// The token of whatever owns jobs' callbacks (a device). Not `Clone`: dropping it ends it.
pub struct Owner {
    shared: Arc<OwnerShared>,
}

impl Default for Owner {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owner")
            .field("generation", &self.generation())
            .finish()
    }
}

impl Owner {
    pub fn new() -> Self {
        Owner {
            shared: Arc::new(OwnerShared {
                gate: RwLock::new(()),
                generation: AtomicU64::new(0),
                alive: AtomicBool::new(true),
            }),
        }
    }

    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A ticket of the current generation.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            shared: self.shared.clone(),
            generation: self.generation(),
        }
    }

    /// Starts a new generation (a device reset): every ticket taken before is void. Waits for
    /// callbacks of this owner that are running on other threads; returns the new generation.
    pub fn invalidate(&self) -> u64 {
        self.shared
            .exclusive(|| self.shared.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared
            .exclusive(|| self.shared.alive.store(false, Ordering::Release));
    }
}

/// An owner's generation, captured when a callback was attached.
#[derive(Clone)]
pub struct Ticket {
    shared: Arc<OwnerShared>,
    generation: u64,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("generation", &self.generation)
            .field("current", &self.is_current())
            .finish()
    }
}

impl Ticket {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// True while the owner is alive and still has this ticket's generation.
    pub fn is_current(&self) -> bool {
        self.shared.is_current(self.generation)
    }

    /// Runs `f` if the ticket is current, holding off `invalidate()` and drop of the owner
    /// until `f` returns. `None` (and `f` not run) when the ticket is void.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        if self.shared.held_here() {
            // Nested in a callback of the same owner: the guard is held already, and taking
            // a second read guard could deadlock behind a waiting writer.
            return self.is_current().then(f);
        }
        let guard = self
            .shared
            .gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if !self.is_current() {
            drop(guard);
            return None;
        }
        struct Held(usize);
        impl Drop for Held {
            fn drop(&mut self) {
                HELD.with(|held| {
                    let mut held = held.borrow_mut();
                    if let Some(at) = held.iter().rposition(|&id| id == self.0) {
                        held.remove(at);
                    }
                });
            }
        }
        let id = self.shared.id();
        HELD.with(|held| held.borrow_mut().push(id));
        let _held = Held(id);
        let value = f();
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_void_after_invalidate_or_drop() {
        let owner = Owner::new();
        let old = owner.ticket();
        assert_eq!(old.run(|| 1), Some(1));
        assert_eq!(owner.invalidate(), 1);
        assert_eq!(old.run(|| 1), None);
        let new = owner.ticket();
        assert!(new.is_current());
        drop(owner);
        assert!(!new.is_current());
        assert_eq!(new.run(|| 1), None);
    }

    #[test]
    fn a_callback_may_invalidate_or_drop_its_own_owner() {
        let owner = Owner::new();
        let ticket = owner.ticket();
        // Nested tickets of the same owner, then invalidate from inside: no self-deadlock.
        let r = ticket.run(|| {
            let inner = owner.ticket();
            let nested = inner.run(|| owner.invalidate());
            (nested, inner.is_current())
        });
        assert_eq!(r, Some((Some(1), false)));

        let owner = Owner::new();
        let ticket = owner.ticket();
        assert_eq!(ticket.run(move || drop(owner)), Some(()));
        assert!(!ticket.is_current());
        assert!(HELD.with(|h| h.borrow().is_empty()));
    }
}
