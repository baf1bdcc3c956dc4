//! `DirtyBitmap` and `MirrorJob`: dirty tracking on nodes and the mirror job that copies a
//! live node to another one.

use std::sync::Arc;
use std::time::Duration;

use blockemu_core::block::{BlockNode, DirtyBitmap};
use blockemu_core::jobs::{MirrorConfig, MirrorJob, MirrorProgress};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{timeout_arg, NonNeg};
use crate::errors::{detach_interruptible, IntoPyResult};
use crate::node::PyBlockNode;

/// A node's record of which granules were written since it was added (or cleared).
#[pyclass(frozen, name = "DirtyBitmap", module = "blockemu")]
pub struct PyDirtyBitmap {
    pub inner: Arc<DirtyBitmap>,
}

#[pymethods]
impl PyDirtyBitmap {
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    #[getter]
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    #[getter]
    fn enabled(&self) -> bool {
        self.inner.is_enabled()
    }

    /// Starts recording the node's writes.
    fn enable(&self) {
        self.inner.enable();
    }

    /// Stops recording the node's writes (refused while a mirror job owns the bitmap).
    fn disable(&self) -> PyResult<()> {
        self.inner.disable().py_err()
    }

    /// Dirty bytes (dirty granules times the granularity, clipped to the size).
    fn count(&self) -> u64 {
        self.inner.count()
    }

    /// Whether the granule holding `offset` is dirty.
    fn is_dirty(&self, offset: NonNeg) -> PyResult<bool> {
        self.inner.is_dirty(offset.0).py_err()
    }

    /// Merged dirty runs as (offset, length), clipped to offset..offset+length.
    #[pyo3(signature = (offset=NonNeg(0), length=None), text_signature = "($self, offset=0, length=None)")]
    fn ranges(&self, offset: NonNeg, length: Option<NonNeg>) -> PyResult<Vec<(u64, u64)>> {
        self.inner.ranges(offset.0, length.map(|l| l.0)).py_err()
    }

    /// Marks offset..offset+length dirty (every granule it touches), enabled or not.
    fn mark(&self, offset: NonNeg, length: NonNeg) -> PyResult<()> {
        self.inner.mark(offset.0, length.0).py_err()
    }

    /// Clears offset..offset+length (granule-aligned, or ending at the end); all by default.
    #[pyo3(signature = (offset=NonNeg(0), length=None), text_signature = "($self, offset=0, length=None)")]
    fn clear(&self, offset: NonNeg, length: Option<NonNeg>) -> PyResult<()> {
        let length = match length {
            Some(l) => l.0,
            None => self.inner.size().saturating_sub(offset.0),
        };
        self.inner.clear(offset.0, length).py_err()
    }

    /// ORs `other` into this bitmap (same granularity and size).
    fn merge(&self, other: &Bound<'_, PyDirtyBitmap>) -> PyResult<()> {
        self.inner.merge(&other.get().inner).py_err()
    }

    fn __repr__(&self) -> String {
        format!(
            "<DirtyBitmap {:?} granularity={} size={} {} dirty={}>",
            self.inner.name(),
            self.inner.granularity(),
            self.inner.size(),
            if self.inner.is_enabled() {
                "enabled"
            } else {
                "disabled"
            },
            self.inner.count()
        )
    }
}

/// `BlockNode.add_dirty_bitmap`.
pub fn add_dirty_bitmap(
    node: &BlockNode,
    name: &str,
    granularity: NonNeg,
) -> PyResult<PyDirtyBitmap> {
    let inner = node.add_dirty_bitmap(name, granularity.0).py_err()?;
    Ok(PyDirtyBitmap { inner })
}

fn no_bitmap(node: &BlockNode, name: &str) -> PyErr {
    PyKeyError::new_err(format!(
        "node {:?} has no dirty bitmap named {name:?}",
        node.name()
    ))
}

/// `BlockNode.dirty_bitmap`.
pub fn dirty_bitmap(node: &BlockNode, name: &str) -> PyResult<PyDirtyBitmap> {
    match node.dirty_bitmap(name) {
        Some(inner) => Ok(PyDirtyBitmap { inner }),
        None => Err(no_bitmap(node, name)),
    }
}

/// `BlockNode.remove_dirty_bitmap`.
pub fn remove_dirty_bitmap(node: &BlockNode, name: &str) -> PyResult<()> {
    match node.remove_dirty_bitmap(name).py_err()? {
        Some(_) => Ok(()),
        None => Err(no_bitmap(node, name)),
    }
}

/// Copies a live source node to a target node (see the README's "Dirty bitmaps and mirror
/// jobs").
#[pyclass(frozen, name = "MirrorJob", module = "blockemu")]
pub struct PyMirrorJob {
    inner: MirrorJob,
}

fn progress_dict<'py>(py: Python<'py>, p: &MirrorProgress) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("state", p.state.as_str())?;
    d.set_item("bytes_total", p.bytes_total)?;
    d.set_item("bytes_done", p.bytes_done)?;
    d.set_item("bytes_copied", p.bytes_copied)?;
    d.set_item("bytes_zero", p.bytes_zero)?;
    d.set_item("passes", p.passes)?;
    d.set_item("dirty_bytes", p.dirty_bytes)?;
    d.set_item("dirty_rate", p.dirty_rate)?;
    d.set_item("throughput", p.throughput)?;
    d.set_item("elapsed", p.elapsed.as_secs_f64())?;
    d.set_item("error", p.error.as_ref().map(|e| e.to_string()))?;
    Ok(d)
}

#[pymethods]
impl PyMirrorJob {
    #[new]
    #[pyo3(
        signature = (source, target, *, granularity=NonNeg(65536), chunk_size=NonNeg(1 << 20), max_in_flight=NonNeg(8), speed=NonNeg(0), converge_bytes=NonNeg(1 << 20), max_downtime=None, target_zeroed=false, sparse=true),
        text_signature = "(source, target, *, granularity=65536, chunk_size=1048576, max_in_flight=8, speed=0, converge_bytes=1048576, max_downtime=None, target_zeroed=False, sparse=True)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        source: &Bound<'_, PyBlockNode>,
        target: &Bound<'_, PyBlockNode>,
        granularity: NonNeg,
        chunk_size: NonNeg,
        max_in_flight: NonNeg,
        speed: NonNeg,
        converge_bytes: NonNeg,
        max_downtime: Option<f64>,
        target_zeroed: bool,
        sparse: bool,
    ) -> PyResult<Self> {
        let max_downtime = match max_downtime {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t.min(1e9))),
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "max_downtime must be a number of seconds >= 0, got {t}"
                )))
            }
        };
        let config = MirrorConfig {
            granularity: granularity.0,
            chunk_size: chunk_size.0,
            max_in_flight: usize::try_from(max_in_flight.0).unwrap_or(usize::MAX),
            speed: speed.0,
            converge_bytes: converge_bytes.0,
            max_downtime,
            target_zeroed,
            sparse,
        };
        let inner = MirrorJob::start(
            source.get().inner.clone(),
            target.get().inner.clone(),
            config,
        )
        .py_err()?;
        Ok(PyMirrorJob { inner })
    }

    /// The name of the job's own dirty bitmap on the source.
    #[getter]
    fn bitmap(&self) -> &str {
        self.inner.bitmap_name()
    }

    /// A snapshot of the job's progress (never waits for a copy).
    fn progress<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        progress_dict(py, &self.inner.progress())
    }

    /// Waits until the job is ready: False on timeout; raises the job's error if it failed
    /// (CancelledError if it was cancelled).
    #[pyo3(signature = (timeout=None))]
    fn wait_ready(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout_arg(timeout)?;
        let job = &self.inner;
        detach_interruptible(py, || job.wait_ready(timeout)).py_err()
    }

    /// Changes the speed limit (bytes per second; 0 = unlimited).
    fn set_speed(&self, bytes_per_second: NonNeg) {
        self.inner.set_speed(bytes_per_second.0);
    }

    /// The writers are stopped: copies what is still dirty, flushes the target, ends the job;
    /// returns the final progress. TimeoutError if not done in time (the job keeps going).
    #[pyo3(signature = (timeout=None))]
    fn complete<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyDict>> {
        let timeout = timeout_arg(timeout)?;
        let job = &self.inner;
        let p = detach_interruptible(py, || job.complete(timeout)).py_err()?;
        progress_dict(py, &p)
    }

    /// Stops the job (copies in flight finish, nothing new starts); see wait().
    fn cancel(&self) {
        self.inner.cancel();
    }

    /// Waits until the job has ended (completed, failed or cancelled): False on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout_arg(timeout)?;
        let job = &self.inner;
        detach_interruptible(py, || job.wait(timeout)).py_err()
    }

    fn __repr__(&self) -> String {
        let p = self.inner.progress();
        format!(
            "<MirrorJob {} {}/{} bytes>",
            p.state.as_str(),
            p.bytes_done,
            p.bytes_total
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDirtyBitmap>()?;
    m.add_class::<PyMirrorJob>()?;
    Ok(())
}
