//! Python face of `blockemu_core::geometry`: the `Geometry` class, `guess_geometry`,
//! `explain_geometry`, `chs_to_lba` and `lba_to_chs`.

use blockemu_core::geometry::mbr::{BootSector, ChsAddress, BOOT_SECTOR_SIZE, SIGNATURE};
use blockemu_core::geometry::{
    self as core, DeviceKind, Geometry, GeometryConfig, Guess, Translation, TranslationRequest,
};
use blockemu_core::Error;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList};

use crate::errors::{to_py, IntoPyResult};

/// An immutable disk geometry: cylinders, heads, sectors per track and BIOS translation.
#[pyclass(
    frozen,
    eq,
    ord,
    hash,
    from_py_object,
    module = "blockemu",
    name = "Geometry"
)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PyGeometry(Geometry);

impl From<Geometry> for PyGeometry {
    fn from(g: Geometry) -> Self {
        PyGeometry(g)
    }
}

#[pymethods]
impl PyGeometry {
    #[new]
    #[pyo3(signature = (cyls, heads, secs, trans = "none"))]
    fn new(
        cyls: &Bound<'_, PyAny>,
        heads: &Bound<'_, PyAny>,
        secs: &Bound<'_, PyAny>,
        trans: &str,
    ) -> PyResult<Self> {
        let trans = Translation::parse(trans).py_err()?;
        let (cyls, heads, secs) = (chs_count(cyls)?, chs_count(heads)?, chs_count(secs)?);
        Geometry::new(cyls, heads, secs, trans).map(Self).py_err()
    }

    #[getter]
    fn cyls(&self) -> u32 {
        self.0.cyls
    }

    #[getter]
    fn heads(&self) -> u32 {
        self.0.heads
    }

    #[getter]
    fn secs(&self) -> u32 {
        self.0.secs
    }

    #[getter]
    fn trans(&self) -> &'static str {
        self.0.trans.as_str()
    }

    fn __repr__(&self) -> String {
        let g = &self.0;
        format!(
            "Geometry(cyls={}, heads={}, secs={}, trans='{}')",
            g.cyls, g.heads, g.secs, g.trans
        )
    }

    /// Lets `pickle` and `copy` rebuild the object through `__new__`.
    fn __getnewargs__(&self) -> (u32, u32, u32, &'static str) {
        let g = &self.0;
        (g.cyls, g.heads, g.secs, g.trans.as_str())
    }
}

/// A Python int as given: its value if it fits in u64, else which way it overflows.
enum IntArg {
    Value(u64),
    Negative,
    TooLarge,
}

fn int_arg(obj: &Bound<'_, PyAny>) -> PyResult<IntArg> {
    match obj.extract::<u64>() {
        Ok(value) => Ok(IntArg::Value(value)),
        // Only an int's overflow is ours to explain; anything else keeps its TypeError.
        Err(err) if !obj.is_instance_of::<PyInt>() => Err(err),
        Err(_) if obj.lt(0)? => Ok(IntArg::Negative),
        Err(_) => Ok(IntArg::TooLarge),
    }
}

/// A cylinder/head/sector count from the user. Values no u32 holds (negative or huge) become
/// u32::MAX, which every device rejects, so validation reports them with QEMU's message and in
/// QEMU's order.
fn chs_count(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    Ok(match int_arg(obj)? {
        IntArg::Value(value) => u32::try_from(value).unwrap_or(u32::MAX),
        IntArg::Negative | IntArg::TooLarge => u32::MAX,
    })
}

/// An address (c, h, s or an LBA): negative is a ValueError, beyond u64 out of range.
fn address(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    match int_arg(obj)? {
        IntArg::Value(value) => Ok(value),
        IntArg::Negative => Err(to_py(Error::invalid(format!(
            "{name} must not be negative, got {obj}"
        )))),
        IntArg::TooLarge => Err(to_py(Error::out_of_range(format!(
            "{name} {obj} out of range"
        )))),
    }
}

fn total_sectors_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    match int_arg(obj)? {
        IntArg::Value(value) => Ok(value),
        IntArg::Negative => Err(to_py(Error::invalid(format!(
            "total_sectors must not be negative, got {obj}"
        )))),
        IntArg::TooLarge => Err(to_py(Error::invalid(format!(
            "total_sectors must be below 2**64, got {obj}"
        )))),
    }
}

/// The first 512 bytes of a bytes-like object (all of it when shorter): only those count.
fn first_sector(py: Python<'_>, buffer: &PyBuffer<u8>) -> PyResult<Vec<u8>> {
    match buffer.as_slice(py) {
        Some(cells) => Ok(cells
            .iter()
            .take(BOOT_SECTOR_SIZE)
            .map(|c| c.get())
            .collect()),
        None => {
            let mut bytes = buffer.to_vec(py)?;
            bytes.truncate(BOOT_SECTOR_SIZE);
            Ok(bytes)
        }
    }
}

/// The keyword arguments `guess_geometry` and `explain_geometry` share, converted.
struct Request {
    config: GeometryConfig,
    boot_sector: BootSector,
    total_sectors: u64,
}

/// A user count left out: 0, "not given".
fn optional_count(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
    obj.map_or(Ok(0), chs_count)
}

impl Request {
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        boot_sector: Option<PyBuffer<u8>>,
        total_sectors: &Bound<'_, PyAny>,
        cyls: Option<&Bound<'_, PyAny>>,
        heads: Option<&Bound<'_, PyAny>>,
        secs: Option<&Bound<'_, PyAny>>,
        trans: &str,
        device: &str,
    ) -> PyResult<Self> {
        let config = GeometryConfig {
            cyls: optional_count(cyls)?,
            heads: optional_count(heads)?,
            secs: optional_count(secs)?,
            trans: TranslationRequest::parse(trans).py_err()?,
            device: DeviceKind::parse(device).py_err()?,
        };
        let total_sectors = total_sectors_arg(total_sectors)?;
        let sector = boot_sector.map(|b| first_sector(py, &b)).transpose()?;
        Ok(Request {
            config,
            boot_sector: BootSector::parse(sector.as_deref()),
            total_sectors,
        })
    }

    fn resolve(&self) -> PyResult<Guess> {
        core::resolve_parsed(&self.config, &self.boot_sector, self.total_sectors).py_err()
    }
}

// The counts are taken as objects (None standing for the documented default 0) so that any
// int, however large or negative, gets QEMU's range message rather than an OverflowError.

/// The geometry QEMU's realize gives the disk: the user's values (validated against the
/// device's ranges) when any is non-zero, else the MBR guess, else the size-based default.
#[pyfunction]
#[pyo3(
    signature = (boot_sector, total_sectors, *, cyls = None, heads = None, secs = None, trans = "auto", device = "ide"),
    text_signature = "(boot_sector, total_sectors, *, cyls=0, heads=0, secs=0, trans='auto', device='ide')"
)]
#[allow(clippy::too_many_arguments)]
fn guess_geometry(
    py: Python<'_>,
    boot_sector: Option<PyBuffer<u8>>,
    total_sectors: &Bound<'_, PyAny>,
    cyls: Option<&Bound<'_, PyAny>>,
    heads: Option<&Bound<'_, PyAny>>,
    secs: Option<&Bound<'_, PyAny>>,
    trans: &str,
    device: &str,
) -> PyResult<PyGeometry> {
    let request = Request::new(
        py,
        boot_sector,
        total_sectors,
        cyls,
        heads,
        secs,
        trans,
        device,
    )?;
    Ok(PyGeometry(request.resolve()?.geometry))
}

/// `guess_geometry` with its reasons, for people and the CLI: a JSON-ready dict.
#[pyfunction]
#[pyo3(
    signature = (boot_sector, total_sectors, *, cyls = None, heads = None, secs = None, trans = "auto", device = "ide"),
    text_signature = "(boot_sector, total_sectors, *, cyls=0, heads=0, secs=0, trans='auto', device='ide')"
)]
#[allow(clippy::too_many_arguments)]
fn explain_geometry<'py>(
    py: Python<'py>,
    boot_sector: Option<PyBuffer<u8>>,
    total_sectors: &Bound<'py, PyAny>,
    cyls: Option<&Bound<'py, PyAny>>,
    heads: Option<&Bound<'py, PyAny>>,
    secs: Option<&Bound<'py, PyAny>>,
    trans: &str,
    device: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let request = Request::new(
        py,
        boot_sector,
        total_sectors,
        cyls,
        heads,
        secs,
        trans,
        device,
    )?;
    let guess = request.resolve()?;
    let g = guess.geometry;

    let geometry = PyDict::new(py);
    geometry.set_item("cyls", g.cyls)?;
    geometry.set_item("heads", g.heads)?;
    geometry.set_item("secs", g.secs)?;
    geometry.set_item("trans", g.trans.as_str())?;

    let (signature, partitions) = match &request.boot_sector {
        BootSector::Missing => (None, PyList::empty(py)),
        BootSector::NoSignature(found) => (Some(hex(found)), PyList::empty(py)),
        BootSector::Table(table) => {
            let partitions = PyList::empty(py);
            for (index, entry) in table.entries.iter().enumerate() {
                let item = PyDict::new(py);
                item.set_item("index", index)?;
                item.set_item("bootable", entry.is_bootable())?;
                item.set_item("type", entry.partition_type)?;
                item.set_item("start_chs", chs_tuple(entry.start))?;
                item.set_item("end_chs", chs_tuple(entry.end))?;
                item.set_item("start_lba", entry.start_lba)?;
                item.set_item("sectors", entry.sectors)?;
                partitions.append(item)?;
            }
            (Some(hex(&SIGNATURE)), partitions)
        }
    };

    let report = PyDict::new(py);
    report.set_item("device", request.config.device.as_str())?;
    report.set_item("total_sectors", request.total_sectors)?;
    report.set_item("geometry", geometry)?;
    report.set_item("chs_sectors", g.chs_sectors())?;
    report.set_item("source", guess.source.as_str())?;
    report.set_item("reason", guess.source.to_string())?;
    report.set_item("entry", guess.source.entry())?;
    report.set_item("translation_source", guess.translation_source.as_str())?;
    report.set_item("signature", signature)?;
    report.set_item("partitions", partitions)?;
    Ok(report)
}

fn chs_tuple(chs: ChsAddress) -> (u16, u8, u8) {
    (chs.cylinder, chs.head, chs.sector)
}

fn hex(bytes: &[u8; 2]) -> String {
    format!("{:02x}{:02x}", bytes[0], bytes[1])
}

/// The LBA of cylinder `c`, head `h`, sector `s` (1-based) in `geometry`.
#[pyfunction]
fn chs_to_lba(
    geometry: PyGeometry,
    c: &Bound<'_, PyAny>,
    h: &Bound<'_, PyAny>,
    s: &Bound<'_, PyAny>,
) -> PyResult<u64> {
    let (c, h, s) = (address(c, "c")?, address(h, "h")?, address(s, "s")?);
    core::chs_to_lba(&geometry.0, c, h, s).py_err()
}

/// The (cylinder, head, sector) of `lba` in `geometry`.
#[pyfunction]
fn lba_to_chs(geometry: PyGeometry, lba: &Bound<'_, PyAny>) -> PyResult<(u32, u32, u32)> {
    let lba = address(lba, "lba")?;
    core::lba_to_chs(&geometry.0, lba).py_err()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGeometry>()?;
    m.add_function(wrap_pyfunction!(guess_geometry, m)?)?;
    m.add_function(wrap_pyfunction!(explain_geometry, m)?)?;
    m.add_function(wrap_pyfunction!(chs_to_lba, m)?)?;
    m.add_function(wrap_pyfunction!(lba_to_chs, m)?)?;
    Ok(())
}
