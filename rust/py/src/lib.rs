//! blockemu._core: the Python face of blockemu-core. Only conversions and error mapping live
//! here; every decision is made in the core crate.

use pyo3::prelude::*;

mod errors;
mod geometry;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    geometry::register(m)?;
    Ok(())
}
