//! The one error type of the core: a kind that says what went wrong (and so which Python
//! exception it becomes), a message in the field's words, and optional context.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong. The bindings map each kind onto one exception of API.md's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The operating system refused or failed an operation (keeps its `io::ErrorKind`).
    Io,
    /// I/O or a metadata write on an inactive node.
    Inactive,
    /// The image is locked by another process in a conflicting way.
    Lock,
    /// An access beyond the end of an image or of guest memory.
    OutOfRange,
    /// Unknown, malformed or corrupt image.
    ImageFormat,
    /// Invalid user-supplied geometry.
    Geometry,
    /// Malformed, truncated, tampered or incompatible device state.
    State,
    /// A write to a read-only node.
    ReadOnly,
    /// A caller passed a value outside what the operation accepts.
    InvalidArgument,
    /// The object was closed (or its owner shut down) before the operation.
    Closed,
    /// A job was cancelled before it ran.
    Cancelled,
    /// A wait ran out of time.
    Timeout,
    /// A long wait was interrupted (the bindings deliver the pending signal, e.g. Ctrl-C).
    Interrupted,
    /// A migration frame that must abort the session (bad magic, version, type, bound, CRC).
    Protocol,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Inactive => "inactive node",
            ErrorKind::Lock => "image locked",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::ImageFormat => "image format",
            ErrorKind::Geometry => "geometry",
            ErrorKind::State => "device state",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Closed => "closed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::Protocol => "protocol error",
        }
    }
}

/// Where an error happened, when that is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    pub path: Option<PathBuf>,
    pub offset: Option<u64>,
    pub op: Option<&'static str>,
}

/// The core's error: kind + message + context (+ the OS error behind an `Io` kind).
/// It is `Clone` because one job's error is delivered to every waiter of that job.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: ErrorContext,
    io_kind: Option<io::ErrorKind>,
    os_code: Option<i32>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            context: ErrorContext::default(),
            io_kind: None,
            os_code: None,
        }
    }

    /// An operating-system failure; the `io::ErrorKind` and errno travel with it so the
    /// bindings can raise `FileNotFoundError`, `PermissionError`, ... as Python would.
    pub fn io(err: io::Error) -> Self {
        // Keep strerror's text only: Python's OSError prints the errno itself.
        let mut message = err.to_string();
        if let Some(i) = message.find(" (os error ") {
            message.truncate(i);
        }
        Error {
            kind: ErrorKind::Io,
            message,
            context: ErrorContext::default(),
            io_kind: Some(err.kind()),
            os_code: err.raw_os_error(),
        }
    }

    /// An `Io` error from an errno value (EIO from a fault injector, for example).
    pub fn os(code: i32, message: impl Into<String>) -> Self {
        let err = io::Error::from_raw_os_error(code);
        Error {
            kind: ErrorKind::Io,
            message: message.into(),
            context: ErrorContext::default(),
            io_kind: Some(err.kind()),
            os_code: Some(code),
        }
    }

    pub fn inactive(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Inactive, message)
    }
    pub fn lock(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Lock, message)
    }
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ImageFormat, message)
    }
    pub fn geometry(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Geometry, message)
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::State, message)
    }
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn closed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Closed, message)
    }
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    pub fn interrupted() -> Self {
        Self::new(ErrorKind::Interrupted, "interrupted while waiting")
    }

    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        self.context.path = Some(path.as_ref().to_path_buf());
        self
    }
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.context.offset = Some(offset);
        self
    }
    pub fn with_op(mut self, op: &'static str) -> Self {
        self.context.op = Some(op);
        self
    }

    /// The same error (kind, errno, context) with `prefix: ` in front of its message: where
    /// it happened, in the words of the layer that saw it.
    pub fn prefixed(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn context(&self) -> &ErrorContext {
        &self.context
    }
    /// For `Io` errors: the operating system's error kind.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.io_kind
    }
    /// For `Io` errors: the errno, when there was one.
    pub fn os_code(&self) -> Option<i32> {
        self.os_code
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(op) = self.context.op {
            write!(f, "{op}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(path) = &self.context.path {
            write!(f, " [{}]", path.display())?;
        }
        if let Some(offset) = self.context.offset {
            write!(f, " (offset {offset})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_context() {
        let e = Error::out_of_range("read of 512 bytes past the end")
            .with_path("/tmp/x.img")
            .with_offset(4096)
            .with_op("read");
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(
            e.to_string(),
            "read: read of 512 bytes past the end [/tmp/x.img] (offset 4096)"
        );
    }

    #[test]
    fn io_errors_keep_their_kind() {
        let e = Error::from(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotFound));
        assert_eq!(e.os_code(), Some(libc::ENOENT));
        let eio = Error::os(libc::EIO, "injected");
        assert_eq!(eio.os_code(), Some(libc::EIO));
    }
}
