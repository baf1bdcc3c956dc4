//! Device state: `save_state`, `load_state`, `describe_state` (see `blockemu_core::state`),
//! and the one-device conveniences of `IdeChannel` and `VirtioBlk`.

use blockemu_core::state::{self, Device};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::convert::ByteView;
use crate::errors::{detach_interruptible, IntoPyResult};
use crate::guest_memory::PyGuestMemory;
use crate::ide::PyIdeChannel;
use crate::virtio::PyVirtioBlk;

/// The `(name, device)` pairs, kept alive while the core borrows them.
struct Devices<'py> {
    items: Vec<(String, Bound<'py, PyAny>)>,
}

impl<'py> Devices<'py> {
    fn extract(devices: &Bound<'py, PyAny>) -> PyResult<Self> {
        let mut items = Vec::new();
        for item in devices.try_iter()? {
            let item = item?;
            let (name, dev): (String, Bound<'py, PyAny>) = item.extract().map_err(|_| {
                PyTypeError::new_err("devices must be a sequence of (name, device) tuples")
            })?;
            items.push((name, dev));
        }
        Ok(Devices { items })
    }

    fn refs(&self) -> PyResult<Vec<(&str, Device<'_>)>> {
        self.items
            .iter()
            .map(|(name, obj)| {
                let dev = if let Ok(c) = obj.cast::<PyIdeChannel>() {
                    Device::Ide(&c.get().inner)
                } else if let Ok(v) = obj.cast::<PyVirtioBlk>() {
                    Device::Virtio(&v.get().inner)
                } else if let Ok(m) = obj.cast::<PyGuestMemory>() {
                    Device::Memory(&m.get().inner)
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "device {name:?} must be an IdeChannel, VirtioBlk or GuestMemory, not {}",
                        obj.get_type().name()?
                    )));
                };
                Ok((name.as_str(), dev))
            })
            .collect()
    }
}

fn data_arg(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let view = ByteView::get(data, false)?;
    // SAFETY: copied at once, with the GIL held.
    Ok(unsafe { view.as_slice() }.to_vec())
}

/// Saves the devices (all quiescent) into one stream; section names are the given names.
#[pyfunction]
fn save_state<'py>(py: Python<'py>, devices: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let devs = Devices::extract(devices)?;
    let refs = devs.refs()?;
    let data = detach_interruptible(py, || state::save(&refs)).py_err()?;
    Ok(PyBytes::new(py, &data))
}

/// Loads a stream into the devices: all or nothing.
#[pyfunction]
fn load_state(py: Python<'_>, devices: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let devs = Devices::extract(devices)?;
    let refs = devs.refs()?;
    let data = data_arg(data)?;
    detach_interruptible(py, || state::load(&refs, &data)).py_err()
}

/// The sections of a stream: name, kind, instance, version, size, subsections.
#[pyfunction]
fn describe_state<'py>(py: Python<'py>, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
    let data = data_arg(data)?;
    let sections = state::describe(&data).py_err()?;
    let out = PyList::empty(py);
    for s in sections {
        let d = PyDict::new(py);
        d.set_item("name", s.name)?;
        d.set_item("kind", s.kind)?;
        d.set_item("instance", s.instance)?;
        d.set_item("version", s.version)?;
        d.set_item("size", s.size)?;
        let subs = PyList::empty(py);
        for x in s.subsections {
            let sd = PyDict::new(py);
            sd.set_item("name", x.name)?;
            sd.set_item("version", x.version)?;
            sd.set_item("optional", x.optional)?;
            sd.set_item("size", x.size)?;
            subs.append(sd)?;
        }
        d.set_item("subsections", subs)?;
        out.append(d)?;
    }
    Ok(out)
}

/// A one-device stream (section name "device").
pub fn save_one(py: Python<'_>, dev: Device<'_>) -> PyResult<Py<PyBytes>> {
    let data = detach_interruptible(py, || state::save(&[("device", dev)])).py_err()?;
    Ok(PyBytes::new(py, &data).unbind())
}

/// Loads a one-device stream written by [`save_one`].
pub fn load_one(py: Python<'_>, dev: Device<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
    let data = data_arg(data)?;
    detach_interruptible(py, || state::load(&[("device", dev)], &data)).py_err()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(save_state, m)?)?;
    m.add_function(wrap_pyfunction!(load_state, m)?)?;
    m.add_function(wrap_pyfunction!(describe_state, m)?)?;
    Ok(())
}
