//! Argument conversions shared by the bindings.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyOverflowError, PyValueError};
use pyo3::prelude::*;

/// A non-negative offset or length. Negative values are a `ValueError` (API.md), not the
/// `OverflowError` a plain `u64` extraction would raise.
pub fn nonneg(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    match value.extract::<i64>() {
        Ok(v) if v >= 0 => Ok(v as u64),
        Ok(v) => Err(PyValueError::new_err(format!(
            "{name} must be >= 0, got {v}"
        ))),
        Err(e) if e.is_instance_of::<PyOverflowError>(value.py()) => value
            .extract::<u64>()
            .map_err(|_| PyValueError::new_err(format!("{name} is out of range: {value}"))),
        Err(e) => Err(e),
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
