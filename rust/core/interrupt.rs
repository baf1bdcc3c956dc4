//! How a long wait inside the core stays interruptible.
//!
//! The core knows nothing of Python, but a wait that can last (a stalled backend, a job wait)
//! must let Ctrl-C through. The bindings install a per-thread hook before they release the GIL;
//! waits call [`check`] every [`POLL`] and give up with `ErrorKind::Interrupted` when the hook
//! says a signal is pending.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How often a long wait asks whether it was interrupted.
pub const POLL: Duration = Duration::from_millis(50);

type Hook = Box<dyn Fn() -> bool>;

thread_local! {
    static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
}

/// Runs `f` with `hook` installed on this thread; the hook returns true when the wait must stop.
pub fn with_hook<R>(hook: impl Fn() -> bool + 'static, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Hook>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            HOOK.with(|h| *h.borrow_mut() = prev);
        }
    }
    let prev = HOOK.with(|h| h.borrow_mut().replace(Box::new(hook)));
    let _restore = Restore(prev);
    f()
}

/// Installs `hook` on this thread for good (the bindings do this once per Python thread, so
/// that every later wait on it is interruptible without per-call cost).
pub fn install(hook: impl Fn() -> bool + 'static) {
    HOOK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
}

/// Whether this thread has a hook installed.
pub fn installed() -> bool {
    HOOK.with(|h| h.borrow().is_some())
}

/// `Err(Interrupted)` when this thread's hook reports a pending interruption.
pub fn check() -> Result<()> {
    let interrupted = HOOK.with(|h| h.borrow().as_ref().is_some_and(|hook| hook()));
    if interrupted {
        Err(Error::interrupted())
    } else {
        Ok(())
    }
}

/// Sleeps for `duration`, checking for interruption every [`POLL`].
pub fn sleep(duration: Duration) -> Result<()> {
    let deadline = Instant::now() + duration;
    loop {
        check()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(POLL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn hook_interrupts_sleep_and_is_restored() {
        let calls = Rc::new(Cell::new(0));
        let c = calls.clone();
        let r = with_hook(
            move || {
                c.set(c.get() + 1);
                c.get() > 2
            },
            || sleep(Duration::from_secs(10)),
        );
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Interrupted);
        assert!(calls.get() >= 3);
        assert!(check().is_ok(), "hook must be removed after with_hook");
    }
}
