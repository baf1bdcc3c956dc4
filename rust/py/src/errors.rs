//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in Python (`blockemu.errors`) so that they can use multiple
//! inheritance (`OutOfRangeError` is also a `ValueError`, ...); they are imported here.

use std::cell::RefCell;

use blockemu_core::{Error, ErrorKind};
use pyo3::exceptions::{PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

pyo3::import_exception!(blockemu.errors, BlockemuError);
pyo3::import_exception!(blockemu.errors, InactiveError);
pyo3::import_exception!(blockemu.errors, LockError);
pyo3::import_exception!(blockemu.errors, OutOfRangeError);
pyo3::import_exception!(blockemu.errors, ImageFormatError);
pyo3::import_exception!(blockemu.errors, GeometryError);
pyo3::import_exception!(blockemu.errors, StateError);
pyo3::import_exception!(blockemu.errors, ReadOnlyError);
pyo3::import_exception!(concurrent.futures, CancelledError);

thread_local! {
    /// The exception a signal handler raised while this thread waited with the GIL released.
    static PENDING_SIGNAL: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

/// Core error -> Python exception. Every binding returns errors through this.
pub fn to_py(err: Error) -> PyErr {
    let msg = err.to_string();
    match err.kind() {
        ErrorKind::Io => {
            let errno = err.os_code().unwrap_or(EIO);
            match &err.context().path {
                // OSError(errno, strerror[, filename]) picks the subclass (FileNotFoundError, ...).
                Some(path) => PyOSError::new_err((
                    errno,
                    err.message().to_string(),
                    path.display().to_string(),
                )),
                None => PyOSError::new_err((errno, msg)),
            }
        }
        ErrorKind::Inactive => InactiveError::new_err(msg),
        ErrorKind::Lock => LockError::new_err(msg),
        ErrorKind::OutOfRange => OutOfRangeError::new_err(msg),
        ErrorKind::ImageFormat => ImageFormatError::new_err(msg),
        ErrorKind::Geometry => GeometryError::new_err(msg),
        ErrorKind::State => StateError::new_err(msg),
        ErrorKind::ReadOnly => ReadOnlyError::new_err(msg),
        ErrorKind::InvalidArgument | ErrorKind::Closed => PyValueError::new_err(msg),
        ErrorKind::Cancelled => CancelledError::new_err(msg),
        ErrorKind::Timeout => PyTimeoutError::new_err(msg),
        ErrorKind::Interrupted => PENDING_SIGNAL
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| pyo3::exceptions::PyKeyboardInterrupt::new_err(msg)),
        _ => BlockemuError::new_err(msg),
    }
}

/// The errno of an I/O error that carries none.
const EIO: i32 = 5;

/// Extension so bindings can write `core_call().map_err_py()?`.
pub trait IntoPyResult<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

thread_local! {
    static HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the GIL released and Ctrl-C honoured: long waits inside the core poll
/// `interrupt::check`, which re-attaches briefly to run Python's signal handlers. The hook is
/// installed once per thread, so this costs a thread-local read per call.
pub fn detach_interruptible<T, F>(py: Python<'_>, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    if !HOOKED.with(|h| h.get()) {
        HOOKED.with(|h| h.set(true));
        // The hook lives in the core's thread-local, on this same thread.
        py.detach(|| {
            blockemu_core::interrupt::install(|| {
                Python::attach(|py| match py.check_signals() {
                    Ok(()) => false,
                    Err(e) => {
                        PENDING_SIGNAL.with(|p| *p.borrow_mut() = Some(e));
                        true
                    }
                })
            })
        });
    }
    py.detach(f)
}
