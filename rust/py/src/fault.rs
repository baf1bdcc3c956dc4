//! `FaultInjector`: storage faults a test switches on and off while devices run.

use std::sync::Arc;
use std::time::Duration;

use blockemu_core::block::{FaultRules, OpKind};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::NonNeg;
use crate::errors::IntoPyResult;

/// Rules of injected faults, shared by every node opened with `faults=` this object.
#[pyclass(frozen, name = "FaultInjector", module = "blockemu")]
pub struct PyFaultInjector {
    pub rules: Arc<FaultRules>,
}

fn op_kind(op: Option<&str>) -> PyResult<Option<OpKind>> {
    op.map(|s| {
        s.parse::<OpKind>().map_err(|_| {
            PyValueError::new_err(format!(
                "unknown operation {s:?} (expected read, write, flush, discard or write_zeroes)"
            ))
        })
    })
    .transpose()
}

fn errno_arg(errno: i32) -> PyResult<i32> {
    if errno <= 0 {
        return Err(PyValueError::new_err(format!(
            "errno must be > 0, got {errno}"
        )));
    }
    Ok(errno)
}

#[pymethods]
impl PyFaultInjector {
    #[new]
    fn new() -> Self {
        PyFaultInjector {
            rules: Arc::new(FaultRules::new()),
        }
    }

    /// Delays every operation (or only `op`) by `seconds`.
    #[pyo3(signature = (seconds, *, op=None))]
    fn set_latency(&self, seconds: f64, op: Option<&str>) -> PyResult<()> {
        if !(seconds.is_finite() && (0.0..=3600.0).contains(&seconds)) {
            return Err(PyValueError::new_err(
                "latency must be between 0 and 3600 seconds",
            ));
        }
        self.rules
            .set_latency(op_kind(op)?, Duration::from_secs_f64(seconds));
        Ok(())
    }

    /// Fails the `n`-th operation from now (1 = the next one), of kind `op` if given, and the
    /// `count - 1` after it, with `errno`.
    #[pyo3(
        signature = (n, *, op=None, count=NonNeg(1), errno=5),
        text_signature = "($self, n, *, op=None, count=1, errno=5)"
    )]
    fn fail_nth(&self, n: NonNeg, op: Option<&str>, count: NonNeg, errno: i32) -> PyResult<()> {
        self.rules
            .fail_nth(n.0, op_kind(op)?, count.0, errno_arg(errno)?)
            .py_err()
    }

    /// Fails every operation (of kind `op` if given) touching [offset, offset+length).
    #[pyo3(signature = (offset, length, *, op=None, errno=5))]
    fn fail_range(
        &self,
        offset: NonNeg,
        length: NonNeg,
        op: Option<&str>,
        errno: i32,
    ) -> PyResult<()> {
        self.rules
            .fail_range(offset.0, length.0, op_kind(op)?, errno_arg(errno)?)
            .py_err()
    }

    /// The `n`-th write from now writes only its first `keep` bytes, then fails with EIO.
    fn torn_write(&self, n: NonNeg, keep: NonNeg) -> PyResult<()> {
        self.rules.torn_write(n.0, keep.0).py_err()
    }

    /// Storage stops answering: operations wait until `release()`.
    fn stall(&self) {
        self.rules.stall();
    }

    /// Lets stalled operations proceed.
    fn release(&self) {
        self.rules.release();
    }

    /// Removes every rule (and releases a stall).
    fn clear(&self) {
        self.rules.clear();
    }

    #[getter]
    fn stalled(&self) -> bool {
        self.rules.is_stalled()
    }

    /// How many operations wait in a stall now.
    #[getter]
    fn waiting(&self) -> usize {
        self.rules.stalled_count()
    }

    /// How many faults were injected so far.
    #[getter]
    fn injected(&self) -> u64 {
        self.rules.injected()
    }

    fn __repr__(&self) -> String {
        format!("<FaultInjector {:?}>", self.rules)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFaultInjector>()
}
