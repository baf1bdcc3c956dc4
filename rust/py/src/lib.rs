//! blockemu._core: the Python face of blockemu-core. Only conversions and error mapping live
//! here; every decision is made in the core crate.

use pyo3::prelude::*;

mod convert;
mod errors;
mod fault;
mod geometry;
mod guest_memory;
mod ide;
mod jobs;
mod migration;
mod mirror;
mod nbd_server;
mod node;
mod state;
mod virtio;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    node::register(m)?;
    nbd_server::register(m)?;
    guest_memory::register(m)?;
    fault::register(m)?;
    jobs::register(m)?;
    geometry::register(m)?;
    ide::register(m)?;
    virtio::register(m)?;
    state::register(m)?;
    mirror::register(m)?;
    migration::register(m)?;
    Ok(())
}
