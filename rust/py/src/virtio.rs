//! Python face of `blockemu_core::virtio`: `VirtioBlk`.

use blockemu_core::jobs::GeometryPolicy;
use blockemu_core::state::Device;
use blockemu_core::virtio::{VirtioBlk, VirtioBlkConfig};
use blockemu_core::Error;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::{at_most, timeout_arg, NonNeg};
use crate::errors::{detach_interruptible, IntoPyResult};
use crate::geometry::PyGeometry;
use crate::guest_memory::PyGuestMemory;
use crate::node::PyBlockNode;

/// A virtio-blk device on the virtio-mmio (version 2) transport.
#[pyclass(frozen, name = "VirtioBlk", module = "blockemu")]
pub struct PyVirtioBlk {
    pub(crate) inner: VirtioBlk,
    node: Py<PyBlockNode>,
    memory: Py<PyGuestMemory>,
}

#[pymethods]
impl PyVirtioBlk {
    #[new]
    #[pyo3(
        signature = (node, memory, *, queue_size = NonNeg(256), num_queues = NonNeg(1), serial = None, cyls = NonNeg(0), heads = NonNeg(0), secs = NonNeg(0), features = None, max_in_flight = NonNeg(0), geometry_policy = "lazy"),
        text_signature = "(node, memory, *, queue_size=256, num_queues=1, serial=None, cyls=0, heads=0, secs=0, features=None, max_in_flight=0, geometry_policy='lazy')"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: Bound<'_, PyBlockNode>,
        memory: Bound<'_, PyGuestMemory>,
        queue_size: NonNeg,
        num_queues: NonNeg,
        serial: Option<String>,
        cyls: NonNeg,
        heads: NonNeg,
        secs: NonNeg,
        features: Option<NonNeg>,
        max_in_flight: NonNeg,
        geometry_policy: &str,
    ) -> PyResult<Self> {
        let policy = GeometryPolicy::parse(geometry_policy).py_err()?;
        let queue_size = at_most("queue_size", queue_size, 32768)? as u32;
        if queue_size == 0 {
            return Err(PyValueError::new_err("queue_size must be at least 1"));
        }
        let num_queues = at_most("num_queues", num_queues, 1024)? as u32;
        if num_queues == 0 {
            return Err(PyValueError::new_err("num_queues must be at least 1"));
        }
        let geometry = |name: &str, v: NonNeg| {
            u32::try_from(v.0)
                .map_err(|_| Error::geometry(format!("{name} out of range: {}", v.0)))
                .py_err()
        };
        let config = VirtioBlkConfig {
            queue_size: queue_size as u16,
            num_queues: num_queues as u16,
            serial,
            cyls: geometry("cyls", cyls)?,
            heads: geometry("heads", heads)?,
            secs: geometry("secs", secs)?,
            features: features.map(|f| f.0),
            max_in_flight: usize::try_from(max_in_flight.0).unwrap_or(usize::MAX),
        };
        let inner = VirtioBlk::new(node.get().inner.clone(), memory.get().inner.clone(), config)
            .py_err()?;
        if policy == GeometryPolicy::Eager {
            node.py().detach(|| inner.read_geometry_now()).py_err()?;
        }
        Ok(PyVirtioBlk {
            inner,
            node: node.unbind(),
            memory: memory.unbind(),
        })
    }

    #[getter]
    fn node(&self, py: Python<'_>) -> Py<PyBlockNode> {
        self.node.clone_ref(py)
    }

    #[getter]
    fn memory(&self, py: Python<'_>) -> Py<PyGuestMemory> {
        self.memory.clone_ref(py)
    }

    /// The geometry once known (None before: the config fields read 0 until then).
    #[getter]
    fn geometry(&self) -> Option<PyGeometry> {
        self.inner.geometry().map(PyGeometry::from)
    }

    #[getter]
    fn queue_size(&self) -> u16 {
        self.inner.queue_size()
    }

    #[getter]
    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }

    /// The 64 feature bits the device offers.
    #[getter]
    fn offered_features(&self) -> u64 {
        self.inner.offered_features()
    }

    /// The 64 feature bits the driver wrote (negotiated once FEATURES_OK stuck).
    #[getter]
    fn driver_features(&self) -> u64 {
        self.inner.driver_features()
    }

    /// Why the device is in DEVICE_NEEDS_RESET, or None when it is not.
    #[getter]
    fn needs_reset_reason(&self) -> Option<String> {
        self.inner.needs_reset_reason()
    }

    /// Register read of 1, 2 or 4 bytes inside the 0x200-byte window. Registers below 0x100
    /// take aligned 32-bit accesses: a narrower or misaligned one reads 0 (writes are ignored),
    /// as on QEMU.
    #[pyo3(signature = (offset, size = NonNeg(4)), text_signature = "($self, offset, size=4)")]
    fn mmio_read(&self, offset: NonNeg, size: NonNeg) -> PyResult<u32> {
        let offset = at_most("offset", offset, 0x1ff)? as u32;
        let size = at_most("size", size, 4)? as u32;
        self.inner.mmio_read(offset, size).py_err()
    }

    /// Register write (a QueueNotify returns at once; storage I/O runs in the background).
    #[pyo3(
        signature = (offset, value, size = NonNeg(4)),
        text_signature = "($self, offset, value, size=4)"
    )]
    fn mmio_write(&self, offset: NonNeg, value: NonNeg, size: NonNeg) -> PyResult<()> {
        let offset = at_most("offset", offset, 0x1ff)? as u32;
        let size = at_most("size", size, 4)? as u32;
        let max = if size >= 4 {
            u64::from(u32::MAX)
        } else {
            (1u64 << (8 * size)) - 1
        };
        let value = at_most("value", value, max)? as u32;
        self.inner.mmio_write(offset, value, size).py_err()
    }

    /// InterruptStatus != 0.
    #[getter]
    fn irq(&self) -> bool {
        self.inner.irq()
    }

    /// Waits (GIL released, Ctrl-C honoured) until InterruptStatus is non-zero; False on
    /// timeout.
    #[pyo3(signature = (timeout = None))]
    fn wait_irq(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout_arg(timeout)?;
        let dev = &self.inner;
        detach_interruptible(py, || dev.wait_irq(timeout)).py_err()
    }

    /// The guest starts: geometry prefetch; notifies remembered while stopped run now.
    fn start(&self) {
        self.inner.start();
    }

    /// The guest stops: waits (GIL released) for the requests in flight.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let dev = &self.inner;
        detach_interruptible(py, || dev.stop()).py_err()
    }

    /// This device's state as a one-device stream (it must be stopped and drained).
    fn save_state(&self, py: Python<'_>) -> PyResult<Py<PyBytes>> {
        crate::state::save_one(py, Device::Virtio(&self.inner))
    }

    /// Loads a stream written by `save_state` (all or nothing).
    fn load_state(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        crate::state::load_one(py, Device::Virtio(&self.inner), data)
    }

    /// Waits (GIL released) until no request is pending or running.
    #[pyo3(signature = (timeout = None))]
    fn drain(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout_arg(timeout)?;
        let dev = &self.inner;
        detach_interruptible(py, || dev.drain(timeout)).py_err()
    }

    /// Host-side resize of the node (bytes): config interrupt and generation change.
    fn resize(&self, py: Python<'_>, size: NonNeg) -> PyResult<()> {
        let dev = &self.inner;
        detach_interruptible(py, || dev.resize(size.0)).py_err()
    }

    /// Counters: requests_completed, requests_dropped, notifications, config_interrupts,
    /// fatal_errors, ignored_notifies, in_flight, needs_reset_reason (last, kept after reset).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("requests_completed", s.requests_completed)?;
        d.set_item("requests_dropped", s.requests_dropped)?;
        d.set_item("notifications", s.notifications)?;
        d.set_item("config_interrupts", s.config_interrupts)?;
        d.set_item("fatal_errors", s.fatal_errors)?;
        d.set_item("ignored_notifies", s.ignored_notifies)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("needs_reset_reason", s.needs_reset_reason)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let status = self.inner.mmio_read(0x70, 4).unwrap_or(0);
        format!(
            "VirtioBlk(node={:?}, queues={}, queue_size={}, status={status:#x})",
            self.inner.node().name(),
            self.inner.num_queues(),
            self.inner.queue_size()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyVirtioBlk>()?;
    Ok(())
}
