//! `NbdServer`: exports BlockNodes over NBD (TCP or a Unix socket).

use std::sync::Arc;

use blockemu_core::block::nbd::server::{NbdServer, ServerOptions};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::timeout_arg;
use crate::errors::{detach_interruptible, IntoPyResult};
use crate::node::PyBlockNode;

/// An NBD server: `NbdServer("tcp:127.0.0.1:0")` or `NbdServer("unix:/path/to.sock")`.
#[pyclass(frozen, name = "NbdServer", module = "blockemu")]
pub struct PyNbdServer {
    inner: Arc<NbdServer>,
}

#[pymethods]
impl PyNbdServer {
    #[new]
    fn new(py: Python<'_>, address: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| NbdServer::bind(address, ServerOptions::default()))
            .py_err()?;
        Ok(PyNbdServer {
            inner: Arc::new(inner),
        })
    }

    /// The bound address: "tcp:HOST:PORT" or "unix:PATH".
    #[getter]
    fn address(&self) -> String {
        self.inner.address()
    }

    /// Exports `node` as `name`; returns the URI a client (``open_image``, qemu-img) opens.
    #[pyo3(signature = (name, node, *, writable = true))]
    fn add_export(
        &self,
        name: &str,
        node: &Bound<'_, PyBlockNode>,
        writable: bool,
    ) -> PyResult<String> {
        self.inner
            .add_export(name, node.get().inner.clone(), writable)
            .py_err()
    }

    /// Removes an export and disconnects its clients (a request in progress finishes first).
    fn remove_export(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let inner = self.inner.clone();
        detach_interruptible(py, || inner.remove_export(name, None)).py_err()
    }

    fn exports(&self) -> Vec<String> {
        self.inner.exports()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        for (k, v) in [
            ("connections", s.connections),
            ("active_connections", s.active_connections),
            ("refused", s.refused),
            ("requests", s.requests),
            ("reads", s.reads),
            ("writes", s.writes),
            ("bytes_read", s.bytes_read),
            ("bytes_written", s.bytes_written),
            ("zero_writes", s.zero_writes),
            ("trims", s.trims),
            ("flushes", s.flushes),
            ("errors", s.errors),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Stops accepting, disconnects every client (requests in progress get up to `timeout`
    /// seconds, default 5, to finish), joins the server's threads. Idempotent.
    #[pyo3(signature = (timeout = None))]
    fn close(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let grace = timeout_arg(timeout)?;
        let inner = self.inner.clone();
        detach_interruptible(py, || inner.close(grace)).py_err()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.close(py, None)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = if self.inner.is_closed() {
            "closed"
        } else {
            "open"
        };
        format!(
            "<NbdServer {} {state}, {} export(s)>",
            self.inner.address(),
            self.inner.exports().len()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNbdServer>()
}
