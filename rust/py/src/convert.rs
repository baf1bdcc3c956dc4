//! Argument conversions shared by the bindings.

use std::time::Duration;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

/// A non-negative integer argument (offset, length, size, count): a negative value or one
/// beyond 2**64 - 1 is a `ValueError`, as API.md asks, not an `OverflowError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonNeg(pub u64);

impl<'a, 'py> FromPyObject<'a, 'py> for NonNeg {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i64>() {
            Ok(v) if v >= 0 => Ok(NonNeg(v as u64)),
            Ok(v) => Err(PyValueError::new_err(format!(
                "expected a value >= 0, got {v}"
            ))),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => obj
                .extract::<u64>()
                .map(NonNeg)
                .map_err(|_| PyValueError::new_err(format!("value out of range: {}", &*obj))),
            Err(e) => Err(e),
        }
    }
}

/// A borrowed, C-contiguous byte buffer of a bytes-like object. The pointer stays valid while
/// the `PyBuffer` lives (the exporter cannot resize while exported), so it may be used with
/// the GIL released.
pub struct ByteView {
    buf: PyBuffer<u8>,
}

// SAFETY: the view only carries a pointer into a buffer the Python object keeps alive and
// fixed while exported; we read it from one thread at a time.
unsafe impl Send for ByteView {}

impl ByteView {
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let buf = PyBuffer::<u8>::get(obj)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("buffer must be C-contiguous"));
        }
        if writable && buf.readonly() {
            return Err(pyo3::exceptions::PyTypeError::new_err(
                "buffer must be writable (bytearray, memoryview, ...)",
            ));
        }
        Ok(ByteView { buf })
    }

    pub fn len(&self) -> usize {
        self.buf.len_bytes()
    }

    /// # Safety
    /// The caller must not let another thread resize or free the exporter meanwhile (the
    /// export prevents that for every well-behaved exporter).
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.buf.buf_ptr() as *const u8, self.len())
    }

    /// # Safety
    /// As `as_slice`, and the buffer was obtained with `writable = true`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.buf.buf_ptr() as *mut u8, self.len())
    }
}

/// `v` when it is at most `max` (a register offset, an access width, a count), else a
/// `ValueError` naming the argument.
pub fn at_most(name: &str, v: NonNeg, max: u64) -> PyResult<u64> {
    if v.0 > max {
        return Err(PyValueError::new_err(format!(
            "{name} must be between 0 and {max}, got {}",
            v.0
        )));
    }
    Ok(v.0)
}

/// A wait's timeout in seconds: `None` waits for ever; negative or NaN is a `ValueError`.
pub fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be >= 0, got {t}"
        ))),
    }
}
