//! Python face of `blockemu_core::ide`: `IdeDisk` and `IdeChannel`.

use std::sync::Arc;

use blockemu_core::geometry::TranslationRequest;
use blockemu_core::ide::{DiscardMode, IdeChannel, IdeDisk, IdeDiskConfig};
use blockemu_core::jobs::GeometryPolicy;
use blockemu_core::state::Device;
use blockemu_core::Error;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::{at_most, timeout_arg, ByteView, NonNeg};
use crate::errors::{detach_interruptible, IntoPyResult};
use crate::geometry::PyGeometry;
use crate::guest_memory::PyGuestMemory;
use crate::node::PyBlockNode;

fn geometry_count(name: &str, v: NonNeg) -> PyResult<u32> {
    u32::try_from(v.0)
        .map_err(|_| Error::geometry(format!("{name} out of range: {}", v.0)))
        .py_err()
}

/// An IDE hard disk (QEMU `ide-hd`) over a block node. Creating it reads nothing.
/// `discard` is QEMU's drive option: "ignore" (default) completes TRIM without touching the
/// data, "unmap" discards the ranges on the node.
#[pyclass(frozen, name = "IdeDisk", module = "blockemu")]
pub struct PyIdeDisk {
    inner: Arc<IdeDisk>,
    node: Py<PyBlockNode>,
}

#[pymethods]
impl PyIdeDisk {
    #[new]
    #[pyo3(
        signature = (node, *, cyls = NonNeg(0), heads = NonNeg(0), secs = NonNeg(0), trans = "auto", serial = None, model = None, write_cache = true, discard = "ignore", geometry_policy = "lazy"),
        text_signature = "(node, *, cyls=0, heads=0, secs=0, trans='auto', serial=None, model=None, write_cache=True, discard='ignore', geometry_policy='lazy')"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: Bound<'_, PyBlockNode>,
        cyls: NonNeg,
        heads: NonNeg,
        secs: NonNeg,
        trans: &str,
        serial: Option<String>,
        model: Option<String>,
        write_cache: bool,
        discard: &str,
        geometry_policy: &str,
    ) -> PyResult<Self> {
        let policy = GeometryPolicy::parse(geometry_policy).py_err()?;
        let config = IdeDiskConfig {
            cyls: geometry_count("cyls", cyls)?,
            heads: geometry_count("heads", heads)?,
            secs: geometry_count("secs", secs)?,
            trans: TranslationRequest::parse(trans).py_err()?,
            serial,
            model,
            write_cache,
            discard: DiscardMode::parse(discard).py_err()?,
        };
        let inner = IdeDisk::new(node.get().inner.clone(), config).py_err()?;
        if policy == GeometryPolicy::Eager {
            node.py().detach(|| inner.read_geometry_now()).py_err()?;
        }
        Ok(PyIdeDisk {
            inner: Arc::new(inner),
            node: node.unbind(),
        })
    }

    /// The geometry, or None until it is known (user geometry, or after the prefetch).
    #[getter]
    fn geometry(&self) -> Option<PyGeometry> {
        self.inner.geometry().map(PyGeometry::from)
    }

    #[getter]
    fn node(&self, py: Python<'_>) -> Py<PyBlockNode> {
        self.node.clone_ref(py)
    }

    fn __repr__(&self) -> String {
        match self.inner.geometry() {
            Some(g) => format!("IdeDisk(geometry={}/{}/{})", g.cyls, g.heads, g.secs),
            None => "IdeDisk(geometry=None)".to_string(),
        }
    }
}

fn access(offset: NonNeg, size: NonNeg) -> PyResult<(u8, u8)> {
    let offset = at_most("offset", offset, 7)? as u8;
    let size = at_most("size", size, 4)? as u8;
    Ok((offset, size))
}

fn value_arg(value: NonNeg, size: u8) -> PyResult<u32> {
    let max = if size >= 4 {
        u64::from(u32::MAX)
    } else {
        (1u64 << (8 * u32::from(size))) - 1
    };
    Ok(at_most("value", value, max)? as u32)
}

/// An IDE channel with a master and a slave slot, an IRQ line and an optional bus master.
#[pyclass(frozen, name = "IdeChannel", module = "blockemu")]
pub struct PyIdeChannel {
    pub(crate) inner: IdeChannel,
    master: Option<Py<PyIdeDisk>>,
    slave: Option<Py<PyIdeDisk>>,
    memory: Option<Py<PyGuestMemory>>,
}

#[pymethods]
impl PyIdeChannel {
    #[new]
    #[pyo3(signature = (master = None, slave = None, *, memory = None))]
    fn new(
        master: Option<Bound<'_, PyIdeDisk>>,
        slave: Option<Bound<'_, PyIdeDisk>>,
        memory: Option<Bound<'_, PyGuestMemory>>,
    ) -> PyResult<Self> {
        let inner = IdeChannel::new(
            master.as_ref().map(|d| d.get().inner.clone()),
            slave.as_ref().map(|d| d.get().inner.clone()),
            memory.as_ref().map(|m| m.get().inner.clone()),
        )
        .py_err()?;
        Ok(PyIdeChannel {
            inner,
            master: master.map(Bound::unbind),
            slave: slave.map(Bound::unbind),
            memory: memory.map(Bound::unbind),
        })
    }

    /// This channel's state as a one-device stream (it must be quiescent).
    fn save_state(&self, py: Python<'_>) -> PyResult<Py<PyBytes>> {
        crate::state::save_one(py, Device::Ide(&self.inner))
    }

    /// Loads a stream written by `save_state` (all or nothing).
    fn load_state(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        crate::state::load_one(py, Device::Ide(&self.inner), data)
    }

    /// The guest memory the bus master reaches (None without one).
    #[getter]
    fn memory(&self, py: Python<'_>) -> Option<Py<PyGuestMemory>> {
        self.memory.as_ref().map(|m| m.clone_ref(py))
    }

    #[getter]
    fn master(&self, py: Python<'_>) -> Option<Py<PyIdeDisk>> {
        self.master.as_ref().map(|d| d.clone_ref(py))
    }

    #[getter]
    fn slave(&self, py: Python<'_>) -> Option<Py<PyIdeDisk>> {
        self.slave.as_ref().map(|d| d.clone_ref(py))
    }

    /// Command block read (offset 0 = data port, size 1, 2 or 4; offsets 1-7 size 1).
    #[pyo3(signature = (offset, size = NonNeg(1)), text_signature = "($self, offset, size=1)")]
    fn ioport_read(&self, offset: NonNeg, size: NonNeg) -> PyResult<u32> {
        let (offset, size) = access(offset, size)?;
        self.inner.ioport_read(offset, size).py_err()
    }

    /// Command block write.
    #[pyo3(
        signature = (offset, value, size = NonNeg(1)),
        text_signature = "($self, offset, value, size=1)"
    )]
    fn ioport_write(&self, offset: NonNeg, value: NonNeg, size: NonNeg) -> PyResult<()> {
        let (offset, size) = access(offset, size)?;
        let value = value_arg(value, size)?;
        self.inner.ioport_write(offset, value, size).py_err()
    }

    /// Alternate Status (does not lower the IRQ).
    fn ctrl_read(&self) -> u8 {
        self.inner.ctrl_read()
    }

    /// Device Control.
    fn ctrl_write(&self, value: NonNeg) -> PyResult<()> {
        let value = value_arg(value, 1)?;
        self.inner.ctrl_write(value as u8);
        Ok(())
    }

    /// Bulk data-in (`rep insw`): at most `nbytes`, never past the current DRQ block.
    fn read_data<'py>(&self, py: Python<'py>, nbytes: NonNeg) -> Bound<'py, PyBytes> {
        let max = usize::try_from(nbytes.0).unwrap_or(usize::MAX);
        let data = self.inner.read_data(max);
        PyBytes::new(py, &data)
    }

    /// Bulk data-out (`rep outsw`): consumes at most the rest of the DRQ block; returns the
    /// number of bytes taken.
    fn write_data(&self, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        let view = ByteView::get(data, false)?;
        // SAFETY: the exporter keeps the buffer alive and fixed while `view` lives, and we
        // hold the GIL throughout (a DRQ block is at most 8 KiB: not worth releasing it).
        let bytes = unsafe { view.as_slice() };
        Ok(self.inner.write_data(bytes))
    }

    /// The level of the channel's IRQ line.
    #[getter]
    fn irq(&self) -> bool {
        self.inner.irq()
    }

    /// Waits (GIL released, Ctrl-C honoured) until the IRQ line is high; False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn wait_irq(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let timeout = timeout_arg(timeout)?;
        let ch = &self.inner;
        detach_interruptible(py, || ch.wait_irq(timeout)).py_err()
    }

    /// Waits (GIL released, Ctrl-C honoured) until no backend work of this channel is in
    /// flight; with `timeout`, raises `TimeoutError` when it has not drained by then (the
    /// channel is left as it was: the work goes on).
    #[pyo3(signature = (timeout = None))]
    fn drain(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = timeout_arg(timeout)?;
        let ch = &self.inner;
        detach_interruptible(py, || ch.drain(timeout)).py_err()
    }

    /// The guest starts: prefetch unknown geometries in the background.
    fn start(&self) {
        self.inner.start();
    }

    /// The guest stops: wait (GIL released) until in-flight I/O has completed.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let ch = &self.inner;
        detach_interruptible(py, || ch.stop()).py_err()
    }

    /// Bus-master register read (offsets 0-7 of the channel's 8 bytes).
    #[pyo3(signature = (offset, size = NonNeg(1)), text_signature = "($self, offset, size=1)")]
    fn bmdma_read(&self, offset: NonNeg, size: NonNeg) -> PyResult<u32> {
        let (offset, size) = access(offset, size)?;
        self.inner.bmdma_read(offset, size).py_err()
    }

    /// Bus-master register write.
    #[pyo3(
        signature = (offset, value, size = NonNeg(1)),
        text_signature = "($self, offset, value, size=1)"
    )]
    fn bmdma_write(&self, offset: NonNeg, value: NonNeg, size: NonNeg) -> PyResult<()> {
        let (offset, size) = access(offset, size)?;
        let value = value_arg(value, size)?;
        self.inner.bmdma_write(offset, value, size).py_err()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIdeDisk>()?;
    m.add_class::<PyIdeChannel>()?;
    Ok(())
}
