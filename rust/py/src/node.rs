//! `BlockNode`, `open_image`, `create_image`, `image_info`, `memory_node`.

use std::path::PathBuf;
use std::sync::Arc;

use blockemu_core::block::{
    self, Backend, BlockNode, CacheLayers, CacheMode, FaultInjector, Format, ImageOptions,
    ImageSpec, LockSet, Outcome, Perm, TraceEntry,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::convert::{ByteView, NonNeg};
use crate::errors::{detach_interruptible, to_py, IntoPyResult};
use crate::fault::PyFaultInjector;
use crate::jobs;
use crate::mirror::{self, PyDirtyBitmap};

/// A disk image with its lifecycle (active/inactive), lock, stats and trace.
#[pyclass(frozen, name = "BlockNode", module = "blockemu")]
pub struct PyBlockNode {
    pub inner: Arc<BlockNode>,
}

fn outcome_str(o: Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Failed(k) => format!("failed: {}", k.as_str()),
        Outcome::Refused(k) => format!("refused: {}", k.as_str()),
    }
}

fn trace_dict<'py>(py: Python<'py>, e: &TraceEntry) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("seq", e.seq)?;
    d.set_item("time_ns", e.time_ns)?;
    d.set_item("op", e.op.as_str())?;
    d.set_item("offset", e.offset)?;
    d.set_item("length", e.len)?;
    d.set_item("active", e.active)?;
    d.set_item("outcome", outcome_str(e.outcome))?;
    Ok(d)
}

impl PyBlockNode {
    fn check_open(&self) -> PyResult<()> {
        self.inner.check_open().py_err()
    }
}

#[pymethods]
impl PyBlockNode {
    /// Virtual size in bytes (None on an inactive node whose size is inside the image).
    #[getter]
    fn size(&self) -> PyResult<Option<u64>> {
        self.inner.size().py_err()
    }

    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format()
    }

    #[getter]
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }

    #[getter]
    fn active(&self) -> bool {
        self.inner.is_active()
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// The path or URI the node was opened from.
    #[getter]
    fn name(&self) -> &str {
        self.inner.name()
    }

    #[getter]
    fn cache(&self) -> &'static str {
        self.inner.cache().as_str()
    }

    /// Reads `length` bytes at `offset`.
    fn read<'py>(
        &self,
        py: Python<'py>,
        offset: NonNeg,
        length: NonNeg,
    ) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
        let (offset, length) = (offset.0, length.0);
        let node = &self.inner;
        node.check_read(offset, length).py_err()?;
        let len = length as usize; // within the image's size, so it fits
                                   // An uninitialized bytes object, filled in place (as os.pread does): no zeroing, no copy.
                                   // SAFETY: PyBytes_FromStringAndSize(NULL, n) returns a new bytes object of n bytes (or
                                   // NULL with an exception set); it is not visible to any other thread until returned, so
                                   // filling it with the GIL released is sound, and it is fully written before it escapes.
        unsafe {
            let obj = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as isize);
            let obj = Bound::from_owned_ptr_or_err(py, obj)?;
            let ptr = pyo3::ffi::PyBytes_AsString(obj.as_ptr()) as usize;
            detach_interruptible(py, || {
                node.read(offset, std::slice::from_raw_parts_mut(ptr as *mut u8, len))
            })
            .map_err(to_py)?;
            Ok(obj.cast_into_unchecked())
        }
    }

    /// Reads `len(buffer)` bytes at `offset` into a writable buffer; returns the count.
    fn readinto(
        &self,
        py: Python<'_>,
        offset: NonNeg,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<usize> {
        let offset = offset.0;
        let view = ByteView::get(buffer, true)?;
        let n = view.len();
        let node = &self.inner;
        // SAFETY: the export keeps the buffer alive and unresized until release().
        let r = detach_interruptible(py, || node.read(offset, unsafe { view.as_mut_slice() }));
        drop(view);
        r.py_err()?;
        Ok(n)
    }

    /// Writes a bytes-like object at `offset`.
    fn write(&self, py: Python<'_>, offset: NonNeg, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let offset = offset.0;
        let view = ByteView::get(data, false)?;
        let node = &self.inner;
        // SAFETY: as in readinto.
        let r = detach_interruptible(py, || node.write(offset, unsafe { view.as_slice() }));
        drop(view);
        r.py_err()
    }

    /// Makes every completed write durable.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let node = &self.inner;
        detach_interruptible(py, || node.flush()).py_err()
    }

    /// Deallocates a range where the storage can; returns whether it did.
    fn discard(&self, py: Python<'_>, offset: NonNeg, length: NonNeg) -> PyResult<bool> {
        let offset = offset.0;
        let length = length.0;
        let node = &self.inner;
        detach_interruptible(py, || node.discard(offset, length)).py_err()
    }

    /// Makes a range read as zeroes.
    fn write_zeroes(&self, py: Python<'_>, offset: NonNeg, length: NonNeg) -> PyResult<()> {
        let offset = offset.0;
        let length = length.0;
        let node = &self.inner;
        detach_interruptible(py, || node.write_zeroes(offset, length)).py_err()
    }

    /// Reads on the worker pool; returns a `Job` future of the bytes.
    fn read_async<'py>(
        &self,
        py: Python<'py>,
        offset: NonNeg,
        length: NonNeg,
    ) -> PyResult<Bound<'py, PyAny>> {
        let offset = offset.0;
        let length = length.0;
        self.check_open()?;
        self.inner.check_read(offset, length).py_err()?;
        let len = length as usize; // within the image's size, so it fits
        let node = self.inner.clone();
        jobs::spawn(
            py,
            move || {
                let mut buf = block::zeroed_buffer(len)?;
                node.read(offset, &mut buf).map(|()| Arc::new(buf))
            },
            |py, buf: &Arc<Vec<u8>>| Ok(PyBytes::new(py, buf).into_any()),
        )
    }

    /// Writes on the worker pool (the data is copied first); returns a `Job` future of None.
    fn write_async<'py>(
        &self,
        py: Python<'py>,
        offset: NonNeg,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let offset = offset.0;
        self.check_open()?;
        let view = ByteView::get(data, false)?;
        // SAFETY: copied while the export is held (GIL held, buffer pinned).
        let data = unsafe { view.as_slice() }.to_vec();
        drop(view);
        let node = self.inner.clone();
        jobs::spawn(
            py,
            move || node.write(offset, &data),
            |py, _: &()| Ok(py.None().into_bound(py)),
        )
    }

    /// Flushes on the worker pool; returns a `Job` future of None.
    fn flush_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.check_open()?;
        let node = self.inner.clone();
        jobs::spawn(
            py,
            move || node.flush(),
            |py, _: &()| Ok(py.None().into_bound(py)),
        )
    }

    /// Flushes, then releases the write lock; afterwards the node refuses all I/O.
    fn inactivate(&self, py: Python<'_>) -> PyResult<()> {
        let node = &self.inner;
        detach_interruptible(py, || node.inactivate()).py_err()
    }

    /// Takes the write lock, drops every cache, then allows I/O.
    fn activate(&self, py: Python<'_>) -> PyResult<()> {
        let node = &self.inner;
        detach_interruptible(py, || node.activate()).py_err()
    }

    /// Operations that reached the storage.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.check_open()?;
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("reads", s.reads)?;
        d.set_item("writes", s.writes)?;
        d.set_item("flushes", s.flushes)?;
        d.set_item("discards", s.discards)?;
        d.set_item("write_zeroes", s.write_zeroes)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("errors", s.errors)?;
        d.set_item("cache_hits", s.cache_hits)?;
        d.set_item("cache_bytes_read", s.cache_bytes_read)?;
        Ok(d)
    }

    /// Blocks held by the caches under this node (host cache, copy-on-read); None without.
    /// (GIL released: a cache's lock may be held by I/O that waits on storage.)
    fn cached_blocks(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        let node = &self.inner;
        detach_interruptible(py, || node.cached_blocks()).py_err()
    }

    /// Adds an enabled dirty bitmap (marked by every write, write_zeroes and discard).
    #[pyo3(signature = (name, *, granularity=NonNeg(65536)), text_signature = "($self, name, *, granularity=65536)")]
    fn add_dirty_bitmap(&self, name: &str, granularity: NonNeg) -> PyResult<PyDirtyBitmap> {
        mirror::add_dirty_bitmap(&self.inner, name, granularity)
    }

    /// The dirty bitmap named `name` (KeyError if there is none).
    fn dirty_bitmap(&self, name: &str) -> PyResult<PyDirtyBitmap> {
        mirror::dirty_bitmap(&self.inner, name)
    }

    /// Removes the dirty bitmap named `name` (KeyError if there is none).
    fn remove_dirty_bitmap(&self, name: &str) -> PyResult<()> {
        mirror::remove_dirty_bitmap(&self.inner, name)
    }

    /// The names of the node's dirty bitmaps, oldest first.
    fn dirty_bitmaps(&self) -> Vec<String> {
        self.inner.dirty_bitmaps()
    }

    /// Keeps the last `capacity` operations in a trace (0 turns tracing off).
    #[pyo3(signature = (capacity=NonNeg(4096)), text_signature = "($self, capacity=4096)")]
    fn enable_trace(&self, capacity: NonNeg) -> PyResult<()> {
        self.check_open()?;
        let cap = capacity.0;
        let cap = usize::try_from(cap)
            .ok()
            .filter(|&c| c <= 1 << 24)
            .ok_or_else(|| PyValueError::new_err("trace capacity must be at most 16777216"))?;
        self.inner.set_trace(cap);
        Ok(())
    }

    fn disable_trace(&self) {
        self.inner.set_trace(0);
    }

    /// The traced operations, oldest first.
    fn trace<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for e in self.inner.trace() {
            list.append(trace_dict(py, &e)?)?;
        }
        Ok(list)
    }

    fn clear_trace(&self) {
        self.inner.clear_trace();
    }

    /// The image lock bytes this node holds: {"held": [...], "unshared": [...]}.
    fn locks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.check_open()?;
        let (held, unshared) = perm_names(self.inner.locks());
        let d = PyDict::new(py);
        d.set_item("held", held)?;
        d.set_item("unshared", unshared)?;
        Ok(d)
    }

    /// Flushes an active node, writes nothing on an inactive one, releases the locks.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let node = &self.inner;
        detach_interruptible(py, || node.close()).py_err()
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().check_open()?;
        Ok(slf)
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: &Bound<'_, PyAny>,
        _exc: &Bound<'_, PyAny>,
        _tb: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        let state = match self.inner.phase() {
            block::Phase::Active => "active",
            block::Phase::Inactive => "inactive",
            block::Phase::Transition => "changing",
            block::Phase::Closed => "closed",
        };
        format!(
            "<BlockNode {:?} format={} {}{}>",
            self.inner.name(),
            self.inner.format(),
            state,
            if self.inner.readonly() {
                " readonly"
            } else {
                ""
            }
        )
    }
}

/// The backend wrapper that puts an injector's rules in front of the storage (or nothing).
fn with_faults(
    faults: Option<&Bound<'_, PyFaultInjector>>,
) -> impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend> + Send {
    let rules = faults.map(|f| f.get().rules.clone());
    move |backend| match rules {
        Some(rules) => Arc::new(FaultInjector::new(backend, rules)),
        None => backend,
    }
}

/// The names of the permissions a lock set holds, and of those it refuses to share.
fn perm_names(set: LockSet) -> (Vec<&'static str>, Vec<&'static str>) {
    let names = |f: &dyn Fn(Perm) -> bool| {
        Perm::ALL
            .into_iter()
            .filter(|p| f(*p))
            .map(Perm::name)
            .collect()
    };
    (names(&|p| set.holds(p)), names(&|p| set.refuses(p)))
}

fn path_str(path: &Bound<'_, PyAny>) -> PyResult<String> {
    let fspath = path.py().import("os")?.getattr("fspath")?;
    let p = fspath.call1((path,))?;
    p.extract::<String>()
        .map_err(|_| PyValueError::new_err("image path must be a str or os.PathLike of str"))
}

/// Opens an image as a node.
#[pyfunction]
#[pyo3(signature = (spec, *, format=None, readonly=false, active=true, cache="writeback", force_share=false, faults=None, timeout=None, host_cache=false, cor_cache=None, revalidate=true))]
#[allow(clippy::too_many_arguments)]
pub fn open_image(
    py: Python<'_>,
    spec: &Bound<'_, PyAny>,
    format: Option<&str>,
    readonly: bool,
    active: bool,
    cache: &str,
    force_share: bool,
    faults: Option<&Bound<'_, PyFaultInjector>>,
    timeout: Option<f64>,
    host_cache: bool,
    cor_cache: Option<&Bound<'_, PyAny>>,
    revalidate: bool,
) -> PyResult<PyBlockNode> {
    let spec = path_str(spec)?;
    let timeout = nbd_timeout(timeout)?;
    let cor_cache = cor_cache.map(path_str).transpose()?.map(PathBuf::from);
    let opts = ImageOptions {
        format: format.map(Format::parse).transpose().py_err()?,
        readonly,
        active,
        cache: CacheMode::parse(cache).py_err()?,
        force_share,
        timeout,
        caches: CacheLayers {
            host_cache,
            cor_cache,
            revalidate,
        },
    };
    let wrap = with_faults(faults);
    // Interruptible: an NBD open waits for a server.
    let node = detach_interruptible(py, || block::open_image(&spec, &opts, wrap)).py_err()?;
    Ok(PyBlockNode {
        inner: Arc::new(node),
    })
}

/// The NBD operation timeout in seconds: positive and finite.
fn nbd_timeout(timeout: Option<f64>) -> PyResult<Option<std::time::Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t > 0.0 && t < 1e9 => {
            Ok(Some(std::time::Duration::from_secs_f64(t)))
        }
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a positive number of seconds, not {t}"
        ))),
    }
}

/// A node over a zero-filled disk held in memory.
#[pyfunction]
#[pyo3(signature = (size, *, readonly=false, faults=None))]
pub fn memory_node(
    size: NonNeg,
    readonly: bool,
    faults: Option<&Bound<'_, PyFaultInjector>>,
) -> PyResult<PyBlockNode> {
    let size = size.0;
    let node = block::memory_node(size, readonly, with_faults(faults)).py_err()?;
    Ok(PyBlockNode {
        inner: Arc::new(node),
    })
}

/// Creates (or overwrites) an image; the size is rounded up to whole sectors.
#[pyfunction]
#[pyo3(signature = (path, size, *, format="raw", lazy_refcounts=false))]
pub fn create_image(
    py: Python<'_>,
    path: &Bound<'_, PyAny>,
    size: NonNeg,
    format: &str,
    lazy_refcounts: bool,
) -> PyResult<()> {
    let path = path_str(path)?;
    let size = size.0;
    let format = Format::parse(format).py_err()?;
    py.detach(|| {
        block::create_image_with(std::path::Path::new(&path), size, format, lazy_refcounts)
    })
    .py_err()?;
    Ok(())
}

/// What an image is: format, sizes and who holds its locks (takes no lock itself). An NBD
/// URI is asked of its server (a handshake, no data read): size and read-only flag.
#[pyfunction]
#[pyo3(signature = (path, *, timeout=None))]
pub fn image_info<'py>(
    py: Python<'py>,
    path: &Bound<'py, PyAny>,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let path = path_str(path)?;
    let timeout = nbd_timeout(timeout)?;
    if let ImageSpec::Nbd(uri) = ImageSpec::parse(&path).py_err()? {
        let timeout = timeout.unwrap_or(block::nbd::DEFAULT_TIMEOUT);
        let info = detach_interruptible(py, || block::nbd::info(&uri, timeout)).py_err()?;
        let d = PyDict::new(py);
        d.set_item("path", &uri)?;
        d.set_item("format", "raw")?;
        d.set_item("virtual_size", info.size)?;
        d.set_item("file_size", info.size)?;
        d.set_item("allocated_size", info.size)?;
        d.set_item(
            "lock",
            "none (an NBD client holds no image lock; the server owns the image)",
        )?;
        d.set_item("locks_held", Vec::<&str>::new())?;
        d.set_item("locks_unshared", Vec::<&str>::new())?;
        d.set_item("read_only", info.readonly)?;
        return Ok(d);
    }
    let info = py
        .detach(|| block::image_info(std::path::Path::new(&path)))
        .py_err()?;
    let d = PyDict::new(py);
    d.set_item("path", info.path.display().to_string())?;
    d.set_item("format", info.format.as_str())?;
    d.set_item("virtual_size", info.virtual_size)?;
    d.set_item("file_size", info.file_size)?;
    d.set_item("allocated_size", info.allocated)?;
    d.set_item("dirty", info.dirty)?;
    d.set_item("lock", info.lock.describe())?;
    let (held, unshared) = perm_names(info.lock.others);
    d.set_item("locks_held", held)?;
    d.set_item("locks_unshared", unshared)?;
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockNode>()?;
    m.add_function(wrap_pyfunction!(open_image, m)?)?;
    m.add_function(wrap_pyfunction!(memory_node, m)?)?;
    m.add_function(wrap_pyfunction!(create_image, m)?)?;
    m.add_function(wrap_pyfunction!(image_info, m)?)?;
    Ok(())
}
