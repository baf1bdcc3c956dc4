//! Migration frames: `decode_frame_header`, `check_frame`, `frame_crc` (see
//! `blockemu_core::migration::frame`). A refused frame raises
//! `blockemu.migration.frames.ProtocolError`.

use blockemu_core::migration::frame;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::ByteView;
use crate::errors::IntoPyResult;

/// `(version, type, session, epoch, seq, length)`.
type HeaderTuple<'py> = (u16, u16, Bound<'py, PyBytes>, u64, u64, u32);

fn with_bytes<T>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> T) -> PyResult<T> {
    let view = ByteView::get(obj, false)?;
    // SAFETY: read at once, with the GIL held and the buffer exported.
    Ok(f(unsafe { view.as_slice() }))
}

/// Parses and checks a 44-byte frame header: magic, version, known type, payload bound.
#[pyfunction]
fn decode_frame_header<'py>(
    py: Python<'py>,
    head: &Bound<'py, PyAny>,
) -> PyResult<HeaderTuple<'py>> {
    let h = with_bytes(head, frame::decode_header)?.py_err()?;
    Ok((
        h.version,
        h.msg_type,
        PyBytes::new(py, &h.session),
        h.epoch,
        h.seq,
        h.length,
    ))
}

/// Payloads above this are checked with the GIL released (a 1 MiB state chunk takes about a
/// millisecond).
const DETACH_ABOVE: usize = 64 * 1024;

/// Checks a whole frame: its header, the payload's length and the CRC.
#[pyfunction]
fn check_frame(
    py: Python<'_>,
    head: &Bound<'_, PyAny>,
    payload: &Bound<'_, PyAny>,
    crc: u32,
) -> PyResult<()> {
    let header = with_bytes(head, frame::decode_header)?.py_err()?;
    let payload = ByteView::get(payload, false)?;
    let big = payload.len() > DETACH_ABOVE;
    // SAFETY: the buffer stays exported (and so fixed) while the closure owns its view.
    let check = move || frame::check_frame(&header, unsafe { payload.as_slice() }, crc);
    if big { py.detach(check) } else { check() }.py_err()
}

/// The frame CRC (zlib's crc32) over a header's bytes and then a payload.
#[pyfunction]
fn frame_crc(py: Python<'_>, head: &Bound<'_, PyAny>, payload: &Bound<'_, PyAny>) -> PyResult<u32> {
    let head = ByteView::get(head, false)?;
    let payload = ByteView::get(payload, false)?;
    let big = payload.len() > DETACH_ABOVE;
    // SAFETY: both buffers stay exported while the closure owns their views.
    let crc = move || unsafe { frame::frame_crc(head.as_slice(), payload.as_slice()) };
    Ok(if big { py.detach(crc) } else { crc() })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_frame_header, m)?)?;
    m.add_function(wrap_pyfunction!(check_frame, m)?)?;
    m.add_function(wrap_pyfunction!(frame_crc, m)?)?;
    Ok(())
}
