//! The one place where core errors become Python exceptions.
//!
//! The exception classes live in Python (`blockemu.errors`) so that they can use multiple
//! inheritance (`OutOfRangeError` is also a `ValueError`, ...); they are imported here. The
//! migration protocol's `ProtocolError` lives with the framing (`blockemu.migration.frames`).

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
pyo3::import_exception!(blockemu.migration.frames, ProtocolError);
pyo3::import_exception!(concurrent.futures, CancelledError);

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
        ErrorKind::Protocol => ProtocolError::new_err(msg),
        // The signal handler's exception is still set on this thread (see `signal_pending`).
        ErrorKind::Interrupted => Python::attach(PyErr::take)
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

/// The interrupt hook of Python threads: runs the signal handlers (Ctrl-C) from inside a wait
/// that released the GIL. It uses the C API directly (not pyo3's attach), because the thread
/// is detached behind pyo3's back (see `detach_interruptible`). An exception raised by a
/// handler stays set on the thread state, where `to_py` picks it up.
fn signal_pending() -> bool {
    // SAFETY: the interpreter is initialized (we were called from Python); Ensure/Release
    // bracket the call on this thread.
    unsafe {
        let gil = pyo3::ffi::PyGILState_Ensure();
        let raised = pyo3::ffi::PyErr_CheckSignals() != 0;
        pyo3::ffi::PyGILState_Release(gil);
        raised
    }
}

/// Re-attaches when dropped, also while unwinding from a panic.
struct Reattach(*mut pyo3::ffi::PyThreadState);

impl Drop for Reattach {
    fn drop(&mut self) {
        // SAFETY: the state saved by PyEval_SaveThread on this thread.
        unsafe { pyo3::ffi::PyEval_RestoreThread(self.0) };
    }
}

/// Runs `f` with the GIL released and Ctrl-C honoured: long waits inside the core poll
/// `interrupt::check`, which runs Python's signal handlers. This is the hot path of every
/// node I/O, so it releases the GIL with the bare C API (pyo3's `detach` also takes its
/// reference-pool lock on the way back); `f` must not touch Python, which the core cannot.
pub fn detach_interruptible<T, F>(_py: Python<'_>, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    if !HOOKED.with(|h| h.replace(true)) {
        blockemu_core::interrupt::install(signal_pending);
    }
    // SAFETY: we hold the GIL (`_py`); `Reattach` restores it before returning or unwinding.
    let _reattach = Reattach(unsafe { pyo3::ffi::PyEval_SaveThread() });
    f()
}
