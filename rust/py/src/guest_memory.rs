//! `GuestMemory`: guest RAM that Python sees through the buffer protocol.

use std::os::raw::c_int;
use std::sync::Arc;

use blockemu_core::guest_memory::GuestMemory;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::convert::{ByteView, NonNeg};
use crate::errors::IntoPyResult;

/// Guest RAM: devices read rings and buffers from it; Python reads and writes it directly,
/// through `.read`/`.write` or as a writable buffer (`memoryview(mem)`).
#[pyclass(frozen, name = "GuestMemory", module = "blockemu")]
pub struct PyGuestMemory {
    pub inner: Arc<GuestMemory>,
}

#[pymethods]
impl PyGuestMemory {
    #[new]
    fn new(size: NonNeg) -> PyResult<Self> {
        let size = size.0;
        let size = usize::try_from(size)
            .map_err(|_| pyo3::exceptions::PyValueError::new_err("size does not fit in memory"))?;
        Ok(PyGuestMemory {
            inner: Arc::new(GuestMemory::new(size).py_err()?),
        })
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.len()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// Reads `n` bytes at guest-physical address `addr`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        addr: NonNeg,
        n: NonNeg,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let addr = addr.0;
        let n = n.0;
        let n = usize::try_from(n)
            .map_err(|_| pyo3::exceptions::PyValueError::new_err("n does not fit in memory"))?;
        self.inner.check(addr, n).py_err()?;
        let mem = &self.inner;
        pyo3::types::PyBytes::new_with(py, n, |buf| mem.read(addr, buf).py_err())
    }

    /// Writes a bytes-like object at guest-physical address `addr`.
    fn write(&self, addr: NonNeg, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let addr = addr.0;
        let view = ByteView::get(data, false)?;
        // SAFETY: the export keeps the source buffer alive while we copy.
        let r = self.inner.write(addr, unsafe { view.as_slice() });
        drop(view);
        r.py_err()
    }

    fn __repr__(&self) -> String {
        format!("GuestMemory(size={:#x})", self.inner.len())
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let mem = &slf.get().inner;
        // SAFETY: the allocation is fixed for the object's life; the view holds a reference
        // to the object (PyBuffer_FillInfo increments it), so the memory outlives the view.
        let r = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                mem.as_ptr().cast(),
                mem.len() as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if r == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGuestMemory>()
}
