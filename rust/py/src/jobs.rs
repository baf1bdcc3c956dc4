//! Jobs of the worker pool as Python futures (`blockemu.Job`, a concurrent.futures.Future).

use blockemu_core::jobs::{Job, JobState, WorkerPool};
use blockemu_core::Result;
use pyo3::prelude::*;

use crate::errors::{to_py, IntoPyResult};

/// What the Python future needs of a job, whatever its result type.
trait ErasedJob: Send + Sync {
    fn cancel(&self) -> bool;
    fn state(&self) -> JobState;
}

impl<T: Clone + Send + Sync + 'static> ErasedJob for Job<T> {
    fn cancel(&self) -> bool {
        Job::cancel(self)
    }
    fn state(&self) -> JobState {
        Job::state(self)
    }
}

/// The Rust side of a `blockemu.Job`: cancels the queued job, reports its state.
#[pyclass(frozen, name = "JobHandle", module = "blockemu._core")]
pub struct PyJobHandle {
    job: Box<dyn ErasedJob>,
}

#[pymethods]
impl PyJobHandle {
    /// Cancels the job if it has not started; returns whether it did.
    fn cancel(&self) -> bool {
        self.job.cancel()
    }

    /// "queued", "running", "done" or "cancelled".
    #[getter]
    fn state(&self) -> &'static str {
        self.job.state().as_str()
    }
}

/// Runs `work` on the worker pool and returns a `blockemu.Job` future that the job settles
/// with `convert(result)` or the mapped error.
pub fn spawn<'py, T, F, C>(py: Python<'py>, work: F, convert: C) -> PyResult<Bound<'py, PyAny>>
where
    T: Clone + Send + Sync + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
    C: for<'a> Fn(Python<'a>, &T) -> PyResult<Bound<'a, PyAny>> + Send + 'static,
{
    let pool = WorkerPool::global().py_err()?;
    let job = pool.submit(work);
    let handle = Py::new(
        py,
        PyJobHandle {
            job: Box::new(job.clone()),
        },
    )?;
    let jobs = py.import("blockemu.jobs")?;
    let future = jobs.getattr("Job")?.call1((handle,))?;
    let settle = jobs.getattr("_settle")?.unbind();
    let target = future.clone().unbind();
    job.on_complete(move |result| {
        // The interpreter may be gone (exit with jobs in flight): then nobody waits. The
        // Python objects move into the attached closure so that they are dropped attached.
        Python::try_attach(move |py| {
            let (value, error) = match result {
                Ok(v) => match convert(py, v) {
                    Ok(obj) => (obj, None),
                    Err(e) => (py.None().into_bound(py), Some(e)),
                },
                Err(e) => (py.None().into_bound(py), Some(to_py(e.clone()))),
            };
            let error = error.map(|e| e.into_value(py).into_any());
            if let Err(e) = settle.call1(py, (target.bind(py), value, error)) {
                e.write_unraisable(py, Some(target.bind(py)));
            }
        });
    });
    Ok(future)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyJobHandle>()
}
