//! An NBD client backend: an image served by an NBD server (qemu-nbd, qemu-storage-daemon,
//! nbdkit, ...) over TCP or a Unix socket.
//!
//! - One connection, many requests in flight (pipelining): worker threads send whole requests
//!   under a send lock, each with its own cookie, and replies (which the server may send in
//!   any order) are matched by cookie, leader/follower style (see [`Conn`]).
//! - Every operation has a deadline (`timeout`, 30 s by default): the socket waits in slices of
//!   [`interrupt::POLL`], so a stalled or vanished server becomes an error (`Timeout` or an
//!   I/O error) and a Python caller's Ctrl-C gets through. After any failure that leaves the
//!   stream in an unknown state (timeout, interruption, protocol violation, EOF) the
//!   connection is dropped; the next operation reconnects (and checks the export kept its size).
//!   A command the server fails cleanly (an errno in the reply) keeps the connection.
//! - Opening connects and negotiates (NBD_OPT_GO): that is how a typing error in the URI or
//!   the export name fails early and how the size and the read-only flag are known. Negotiation
//!   reads no data: an inactive node sends zero transmission commands (no READ, WRITE, FLUSH,
//!   ...) until it is activated.
//! - An NBD client holds no image lock: the server owns the image. Keeping a single writer
//!   over NBD is the migration coordinator's job (the node is inactive on the destination).

pub mod proto;
pub mod server;
pub mod uri;

use std::collections::HashMap;
use std::io::{ErrorKind as IoKind, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use self::proto::{ExportInfo, Io};
pub use self::uri::{NbdAddr, NbdUri};
use super::image::{Format, ImageOptions};
use super::node::{BlockNode, NodeConfig};
use super::Backend;
use crate::{interrupt, Error, ErrorKind, Result};

/// The default bound of one operation (connect + handshake, or one command and its reply).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_vectored(bufs),
            Stream::Unix(s) => s.read_vectored(bufs),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// One direction of a connection (or the whole socket during the handshake) with the
/// deadline of the operation under way.
struct Link {
    stream: Stream,
    deadline: Instant,
}

fn timed_out() -> Error {
    Error::timeout("the NBD server did not answer in time")
}

impl Link {
    fn wait_slice(&self) -> Result<()> {
        interrupt::check()?;
        if Instant::now() >= self.deadline {
            return Err(timed_out());
        }
        Ok(())
    }
}

fn io_err(e: std::io::Error) -> Error {
    Error::io(e).with_op("nbd")
}

impl Io for Link {
    fn recv(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(Error::os(
                        libc::ECONNRESET,
                        "the NBD server closed the connection",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
                    self.wait_slice()?
                }
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    fn recv_reply(&mut self, hdr: &mut [u8; 16], payload: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < hdr.len() {
            let r = {
                let mut bufs = [IoSliceMut::new(&mut hdr[got..]), IoSliceMut::new(payload)];
                self.stream.read_vectored(&mut bufs)
            };
            match r {
                Ok(0) => {
                    return Err(Error::os(
                        libc::ECONNRESET,
                        "the NBD server closed the connection",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
                    self.wait_slice()?
                }
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(got - hdr.len())
    }

    fn send(&mut self, parts: &[&[u8]]) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut done = 0;
        while done < total {
            // The parts not yet sent, the first one trimmed.
            let mut skip = done;
            let mut slices = Vec::with_capacity(parts.len());
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                slices.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
            match self.stream.write_vectored(&slices) {
                Ok(0) => return Err(Error::os(libc::EPIPE, "the NBD connection is closed")),
                Ok(n) => done += n,
                Err(e) if matches!(e.kind(), IoKind::WouldBlock | IoKind::TimedOut) => {
                    self.wait_slice()?
                }
                Err(e) if e.kind() == IoKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }
}

/// `connect(2)` on a Unix socket blocks while the server's backlog is full (a stalled server
/// that stopped accepting): with SO_SNDTIMEO set it gives up after one slice with EAGAIN, so we
/// retry until the deadline, interruptibly.
fn connect_unix(path: &std::path::Path, deadline: Instant) -> Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::invalid(format!(
            "NBD socket path {} is too long or holds a NUL",
            path.display()
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: interrupt::POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: valid descriptor and a timeval of the size we pass.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    loop {
        // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        };
        if r == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => {
                interrupt::check()?;
                if Instant::now() >= deadline {
                    return Err(Error::timeout(
                        "the NBD server does not accept connections (its backlog is full)",
                    ));
                }
            }
            Some(libc::EINTR) => {}
            _ => return Err(Error::io(e)),
        }
    }
}

fn connect_stream(addr: &NbdAddr, timeout: Duration) -> Result<Stream> {
    let stream = match addr {
        NbdAddr::Unix(path) => Stream::Unix(connect_unix(path, Instant::now() + timeout).map_err(
            |e| match e.kind() {
                ErrorKind::Io => e.with_path(path),
                _ => e,
            },
        )?),
        NbdAddr::Tcp { host, port } => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Error::io(e).with_op("nbd: resolve"))?;
            let mut last = None;
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = match (found, last) {
                (Some(s), _) => s,
                (None, Some(e)) => return Err(Error::io(e).with_op("nbd: connect")),
                (None, None) => {
                    return Err(Error::os(
                        libc::EHOSTUNREACH,
                        format!("{host} has no address"),
                    ))
                }
            };
            s.set_nodelay(true).map_err(io_err)?;
            Stream::Tcp(s)
        }
    };
    let slice = Some(interrupt::POLL);
    let r = match &stream {
        Stream::Tcp(s) => s.set_read_timeout(slice).and(s.set_write_timeout(slice)),
        Stream::Unix(s) => s.set_read_timeout(slice).and(s.set_write_timeout(slice)),
    };
    r.map_err(io_err)?;
    Ok(stream)
}

/// Connects and negotiates; no transmission command is sent.
fn connect(uri: &NbdUri, timeout: Duration) -> Result<(Conn, ExportInfo)> {
    let deadline = Instant::now() + timeout;
    let stream = connect_stream(&uri.addr, timeout)?;
    let mut link = Link { stream, deadline };
    let info = proto::handshake(&mut link, &uri.export)?;
    let rx = link.stream.try_clone().map_err(io_err)?;
    let ctl = link.stream.try_clone().map_err(io_err)?;
    let conn = Conn {
        ctl,
        tx: Mutex::new(link),
        rx: Mutex::new(Link {
            stream: rx,
            deadline,
        }),
        st: Mutex::new(ConnState {
            cookie: 0,
            pending: HashMap::new(),
            reader: Reader::Free,
            failed: None,
        }),
    };
    Ok((conn, info))
}

/// Who reads the stream's next reply (leader/follower, see [`Conn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Nobody: the first waiter that sees this becomes the reader.
    Free,
    /// A thread (the leader) is reading replies.
    Busy,
}

/// Where a request in flight stands.
enum SlotState {
    /// Sent (or being sent); no reply yet.
    Waiting,
    /// The leader is reading this request's payload into the owner's buffer: the owner may
    /// not return (its buffer must stay alive) until the state changes.
    Filling,
    /// Answered: success, or a clean failure by the server (an errno).
    Done(std::result::Result<(), Error>),
}

/// A request sent and not answered yet.
struct Slot {
    /// Its owner waits on this (with `st`'s mutex): only the thread concerned is woken.
    cv: Arc<Condvar>,
    cmd: u16,
    /// The owner's read buffer (address and length; 0 for anything but a read). Written only
    /// by the leader while the slot is `Filling`, during which the owner stays in
    /// [`Conn::command`], so the buffer is alive and nobody else touches it.
    buf: usize,
    len: usize,
    state: SlotState,
}

struct ConnState {
    cookie: u64,
    pending: HashMap<u64, Slot>,
    reader: Reader,
    /// Set once the stream is unusable: every waiter fails with it; the backend reconnects.
    failed: Option<Error>,
}

/// One connection with many requests in flight (pipelining).
///
/// - Sending: a thread takes `tx` (the send lock) and writes its whole request (header and
///   write payload) with a fresh cookie, registered in `pending` before the first byte goes.
/// - Receiving, leader/follower: a waiting requester that finds the read side free becomes
///   the leader and reads replies one after the other until its own has come. A reply's
///   cookie names its request: a read's data are read straight into that request's buffer
///   (its length is the request's own length: bounded memory, no copy), the request is
///   marked done and its owner (only it) is woken. When its own reply has come the leader
///   frees the read side and wakes one other waiter, which becomes the next leader. A cookie
///   nobody waits for, a bad magic or a structured reply is a protocol error (EPROTO).
/// - Every wait is in slices of [`interrupt::POLL`] up to the requester's own deadline: a
///   timeout, a Ctrl-C, a protocol error, EOF or any I/O error marks the connection failed
///   (`failed`), shuts the socket down (a reader blocked in `read` wakes up with EOF) and
///   fails every waiting request with that first failure (a stalled server is a timeout for
///   all of them); the backend's next operation reconnects.
/// - FLUSH is just another request: the server answers it once the writes it has *completed*
///   are durable. The node only flushes after the writes it covers were acknowledged, so
///   sending it right away is correct; a caller that wants a write covered must wait for that
///   write's ack before flushing (requests in flight may be executed in any order).
struct Conn {
    /// The socket, only to shut it down.
    ctl: Stream,
    tx: Mutex<Link>,
    rx: Mutex<Link>,
    st: Mutex<ConnState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a waiter other than the one that hit `e` gets.
fn shared_failure(e: &Error) -> Error {
    match e.kind() {
        ErrorKind::Timeout => Error::timeout(e.message().to_string()),
        ErrorKind::Interrupted => Error::os(
            libc::EIO,
            "the NBD connection was dropped (another request was interrupted)",
        ),
        _ => Error::os(e.os_code().unwrap_or(libc::EIO), e.message().to_string()),
    }
}

impl Conn {
    fn is_failed(&self) -> bool {
        lock(&self.st).failed.is_some()
    }

    /// Marks the connection unusable, wakes every waiter, shuts the socket down.
    fn fail(&self, st: &mut ConnState, e: &Error) {
        if st.failed.is_none() {
            st.failed = Some(shared_failure(e));
        }
        for slot in st.pending.values() {
            slot.cv.notify_one();
        }
        // shutdown(2) acts on the socket, not on one descriptor: a reader or a sender blocked
        // in a system call wakes up with EOF / EPIPE.
        self.ctl.shutdown();
    }

    /// Runs one command. `Ok(Err(e))` is a command the server failed cleanly.
    fn command(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        read_buf: &mut [u8],
        deadline: Instant,
    ) -> Result<std::result::Result<(), Error>> {
        let cv = Arc::new(Condvar::new());
        let cookie = {
            let mut st = lock(&self.st);
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            st.cookie = st.cookie.wrapping_add(1);
            let cookie = st.cookie;
            let (buf, blen) = if cmd == proto::CMD_READ {
                (read_buf.as_mut_ptr() as usize, read_buf.len())
            } else {
                (0, 0)
            };
            st.pending.insert(
                cookie,
                Slot {
                    cv: cv.clone(),
                    cmd,
                    buf,
                    len: blen,
                    state: SlotState::Waiting,
                },
            );
            cookie
        };
        let r = self.exchange(cmd, cookie, offset, len, payload, &cv, deadline);
        let mut st = lock(&self.st);
        let r = match r {
            Ok(r) => Ok(r),
            Err(e) => {
                let first = st.failed.clone();
                self.fail(&mut st, &e);
                // The leader may be writing into our buffer: wait until it stops (the socket
                // is shut down, so its read fails at once).
                while st
                    .pending
                    .get(&cookie)
                    .is_some_and(|s| matches!(s.state, SlotState::Filling))
                {
                    st = cv
                        .wait_timeout(st, interrupt::POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                // Another request failed the connection first (its shutdown is what we saw,
                // e.g. EOF): every request reports that first failure.
                Err(first.unwrap_or(e))
            }
        };
        st.pending.remove(&cookie);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
        my_cv: &Condvar,
        deadline: Instant,
    ) -> Result<std::result::Result<(), Error>> {
        {
            let hdr = proto::request(cmd, cookie, offset, len);
            // The send lock is held for one request's write: normally a few microseconds
            // (yield), but a sender blocked on a stalled server holds it up to its deadline, so
            // after a while we wait in short sleeps, interruptible and bounded by our deadline.
            let mut tries = 0u32;
            let mut tx = loop {
                match self.tx.try_lock() {
                    Ok(g) => break g,
                    Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        tries += 1;
                        if tries < 64 {
                            std::thread::yield_now();
                            continue;
                        }
                        if let Some(e) = &lock(&self.st).failed {
                            return Err(e.clone());
                        }
                        interrupt::check()?;
                        if Instant::now() >= deadline {
                            return Err(timed_out());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            };
            if let Some(e) = &lock(&self.st).failed {
                return Err(e.clone());
            }
            interrupt::check()?;
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            tx.deadline = deadline;
            if payload.is_empty() {
                tx.send(&[&hdr])?;
            } else {
                tx.send(&[&hdr, payload])?;
            }
        }
        let mut st = lock(&self.st);
        loop {
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let Some(slot) = st.pending.get_mut(&cookie) else {
                return Err(proto::protocol("request lost"));
            };
            if matches!(slot.state, SlotState::Done(_)) {
                match std::mem::replace(&mut slot.state, SlotState::Waiting) {
                    SlotState::Done(r) => return Ok(r),
                    _ => unreachable!("matched above"),
                }
            }
            match st.reader {
                Reader::Free => {
                    st.reader = Reader::Busy;
                    drop(st);
                    return self.lead(cookie, deadline);
                }
                Reader::Busy => {
                    interrupt::check()?;
                    if Instant::now() >= deadline {
                        return Err(timed_out());
                    }
                    st = my_cv
                        .wait_timeout(st, interrupt::POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// The leader's loop: reads replies (completing other requests) until its own has come.
    fn lead(&self, cookie: u64, deadline: Instant) -> Result<std::result::Result<(), Error>> {
        loop {
            let (c, errno) = self.read_header(deadline)?;
            let mut st = lock(&self.st);
            if let Some(e) = &st.failed {
                return Err(e.clone());
            }
            let Some(slot) = st.pending.get_mut(&c) else {
                return Err(proto::protocol(format!(
                    "reply cookie {c:#x} matches no request in flight"
                )));
            };
            if !matches!(slot.state, SlotState::Waiting) {
                return Err(proto::protocol(format!("second reply for cookie {c:#x}")));
            }
            let result = if errno != 0 {
                Ok(Err(proto::command_error(
                    errno,
                    proto::command_name(slot.cmd),
                )))
            } else if slot.len > 0 {
                slot.state = SlotState::Filling;
                let (ptr, n) = (slot.buf, slot.len);
                drop(st);
                // SAFETY: the slot is `Filling`: its owner stays in `command` (its `read_buf`
                // alive and untouched) until we change the state; no one else writes it.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, n) };
                let r = {
                    let mut rx = lock(&self.rx);
                    rx.deadline = deadline;
                    rx.recv(buf)
                };
                st = lock(&self.st);
                match r {
                    Ok(()) => Ok(Ok(())),
                    Err(e) => {
                        if let Some(slot) = st.pending.get_mut(&c) {
                            slot.state = SlotState::Waiting;
                        }
                        self.fail(&mut st, &e);
                        return Err(e);
                    }
                }
            } else {
                Ok(Ok(()))
            };
            let result: Result<std::result::Result<(), Error>> = result;
            if c == cookie {
                st.reader = Reader::Free;
                // One other waiter becomes the leader (any will do: each one checks the read
                // side under the lock before it sleeps).
                if let Some((_, s)) = st
                    .pending
                    .iter()
                    .find(|(k, s)| **k != cookie && matches!(s.state, SlotState::Waiting))
                {
                    s.cv.notify_one();
                }
                if let Some(slot) = st.pending.get_mut(&c) {
                    slot.state = SlotState::Waiting;
                }
                return result;
            }
            if let Some(slot) = st.pending.get_mut(&c) {
                slot.state = SlotState::Done(result?);
                slot.cv.notify_one();
            }
        }
    }

    fn read_header(&self, deadline: Instant) -> Result<(u64, u32)> {
        let mut rx = lock(&self.rx);
        rx.deadline = deadline;
        let mut hdr = [0u8; 16];
        rx.recv(&mut hdr)?;
        proto::parse_reply_any(&hdr)
    }
}

/// What `blockemu info` shows of an NBD export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdInfo {
    pub size: u64,
    pub readonly: bool,
    pub flags: u16,
}

/// Connects, negotiates, disconnects: the export's size and flags.
pub fn info(spec: &str, timeout: Duration) -> Result<NbdInfo> {
    let uri = NbdUri::parse(spec)?;
    let (conn, info) = connect(&uri, timeout)?;
    disconnect(&conn);
    Ok(NbdInfo {
        size: info.size,
        readonly: info.readonly(),
        flags: info.flags,
    })
}

fn disconnect(conn: &Conn) {
    let cookie = {
        let mut st = lock(&conn.st);
        st.cookie = st.cookie.wrapping_add(1);
        st.cookie
    };
    let mut tx = lock(&conn.tx);
    tx.deadline = Instant::now() + Duration::from_millis(100);
    let _ = tx.send(&[&proto::request(proto::CMD_DISC, cookie, 0, 0)]);
    tx.stream.shutdown();
}

/// The NBD client backend.
pub struct NbdBackend {
    uri: NbdUri,
    spec: String,
    info: ExportInfo,
    timeout: Duration,
    /// `None` (or a failed connection) after a failure that broke the stream: the next
    /// operation reconnects.
    conn: Mutex<Option<Arc<Conn>>>,
}

impl NbdBackend {
    /// Connects to `spec` and negotiates the export (no data is read).
    pub fn connect(spec: &str, timeout: Option<Duration>) -> Result<Self> {
        let uri = NbdUri::parse(spec)?;
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(Error::invalid("the NBD timeout must be positive"));
        }
        let (conn, info) = connect(&uri, timeout).map_err(|e| context(e, spec))?;
        Ok(NbdBackend {
            uri,
            spec: spec.to_string(),
            info,
            timeout,
            conn: Mutex::new(Some(Arc::new(conn))),
        })
    }

    pub fn export_info(&self) -> ExportInfo {
        self.info
    }
    pub fn readonly(&self) -> bool {
        self.info.readonly()
    }

    /// The current connection, reconnecting (and checking the export) if it failed.
    fn conn(&self) -> Result<Arc<Conn>> {
        let mut guard = lock(&self.conn);
        if let Some(c) = guard.as_ref() {
            if !c.is_failed() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let (conn, info) = connect(&self.uri, self.timeout).map_err(|e| context(e, &self.spec))?;
        if info.size != self.info.size || info.readonly() != self.info.readonly() {
            disconnect(&conn);
            return Err(Error::os(
                libc::EIO,
                format!(
                    "NBD export {} changed on reconnection (size {} -> {})",
                    self.spec, self.info.size, info.size
                ),
            ));
        }
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Runs one command (concurrently with other threads' commands on the one connection);
    /// on a connection-level failure the connection is marked failed.
    fn command(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        read_buf: &mut [u8],
    ) -> Result<()> {
        let conn = self.conn()?;
        let deadline = Instant::now() + self.timeout;
        match conn.command(cmd, offset, len, payload, read_buf, deadline) {
            Ok(r) => r.map_err(|e| e.with_offset(offset)),
            Err(e) => Err(context(e, &self.spec).with_offset(offset)),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.info.readonly() {
            return Err(Error::read_only(format!(
                "NBD export {} is read-only",
                self.spec
            )));
        }
        Ok(())
    }

    /// Splits `[offset, offset + len)` into requests of at most `max` bytes.
    fn chunks(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let mut done = 0u64;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let n = (len - done).min(max);
            let item = (offset + done, n as u32);
            done += n;
            Some(item)
        })
    }
}

/// Names the export in a message (I/O errors keep their errno).
fn context(e: Error, spec: &str) -> Error {
    match e.kind() {
        ErrorKind::Interrupted | ErrorKind::InvalidArgument | ErrorKind::ReadOnly => e,
        _ if e.context().path.is_some() => e,
        ErrorKind::Timeout => Error::timeout(format!("{} ({spec})", e.message())),
        _ => {
            let code = e.os_code().unwrap_or(libc::EIO);
            Error::os(code, format!("{} ({spec})", e.message()))
        }
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(conn) = conn {
            if !conn.is_failed() {
                disconnect(&conn);
            }
        }
    }
}

impl Backend for NbdBackend {
    fn kind(&self) -> &'static str {
        "nbd"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let max = u64::from(self.info.max_payload);
        let mut at = 0usize;
        for (off, n) in Self::chunks(offset, buf.len() as u64, max) {
            let end = at + n as usize;
            self.command(proto::CMD_READ, off, n, &[], &mut buf[at..end])?;
            at = end;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let max = u64::from(self.info.max_payload);
        let mut at = 0usize;
        for (off, n) in Self::chunks(offset, buf.len() as u64, max) {
            let end = at + n as usize;
            self.command(proto::CMD_WRITE, off, n, &buf[at..end], &mut [])?;
            at = end;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.info.has(proto::TFLAG_SEND_FLUSH) && !self.info.readonly() {
            self.command(proto::CMD_FLUSH, 0, 0, &[], &mut [])?;
        }
        Ok(())
    }

    /// The size negotiated at connection (NBD has no way to re-read it without reconnecting).
    fn len(&self) -> Result<u64> {
        Ok(self.info.size)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<bool> {
        self.check_writable()?;
        if !self.info.has(proto::TFLAG_SEND_TRIM) {
            return Ok(false);
        }
        for (off, n) in Self::chunks(offset, len, 1 << 30) {
            self.command(proto::CMD_TRIM, off, n, &[], &mut [])?;
        }
        Ok(true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.info.has(proto::TFLAG_SEND_WRITE_ZEROES) {
            return super::backend::write_zeroes_by_writing(self, offset, len);
        }
        for (off, n) in Self::chunks(offset, len, 1 << 30) {
            self.command(proto::CMD_WRITE_ZEROES, off, n, &[], &mut [])?;
        }
        Ok(())
    }
}

/// Opens an NBD export as a node (see the module comment for what an inactive open does).
/// A read-only export makes a read-only node. `format=None` on an active open probes the
/// first bytes (one READ); qcow2 over NBD is not supported.
pub fn open_node(
    spec: &str,
    opts: &ImageOptions,
    wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>,
) -> Result<BlockNode> {
    if !opts.active && opts.format.is_none() {
        return Err(Error::invalid(
            "an inactive node must be opened with an explicit format: probing would read the \
             image before activation",
        ));
    }
    let backend = NbdBackend::connect(spec, opts.timeout)?;
    let format = match opts.format {
        Some(f) => f,
        None => {
            let mut head = [0u8; 4];
            if backend.info.size >= 4 {
                backend.read_at(&mut head, 0)?;
            }
            Format::probe(&head)
        }
    };
    if format != Format::Raw {
        return Err(Error::format(format!(
            "{} images over NBD are not supported yet ({spec})",
            format.as_str()
        )));
    }
    let readonly = opts.readonly || backend.readonly();
    let size = backend.info.size;
    BlockNode::new(
        wrap(Arc::new(backend)),
        NodeConfig {
            name: spec.to_string(),
            path: None,
            format: format.as_str(),
            readonly,
            cache: opts.cache,
            // The server owns the image: an NBD client holds no file lock.
            locking: false,
            size: Some(size),
        },
        opts.active,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_at_max() {
        let c: Vec<_> = NbdBackend::chunks(10, 25, 10).collect();
        assert_eq!(c, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(NbdBackend::chunks(0, 0, 10).count(), 0);
    }

    #[test]
    fn refused_connection_is_an_os_error() {
        let dir = std::env::temp_dir().join(format!("blockemu-nbd-{}", std::process::id()));
        let spec = format!("nbd+unix:///x?socket={}", dir.join("none.sock").display());
        let e = NbdBackend::connect(&spec, Some(Duration::from_millis(200)))
            .err()
            .expect("no server");
        assert_eq!(e.kind(), ErrorKind::Io);
    }

    #[test]
    fn full_backlog_times_out() {
        let dir = std::env::temp_dir().join(format!("blockemu-nbd-bl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Never accepted: fill the backlog until a connect would block.
        let mut held = Vec::new();
        let t = Instant::now();
        let err = loop {
            match connect_unix(&sock, Instant::now() + Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "backlog never filled");
        };
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A one-connection fake server: the handshake, then `n` requests read before any reply;
    /// `reply` writes the replies (in any order) given the requests (cookie, offset, len).
    fn fake_server(
        tag: &str,
        n: usize,
        reply: impl FnOnce(&mut UnixStream, &[(u64, u64, u32)]) + Send + 'static,
    ) -> (String, std::path::PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("blockemu-nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let spec = format!("nbd+unix:///x?socket={}", sock.display());
        let h = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(&proto::tests::server_hello(1 << 20, proto::TFLAG_HAS_FLAGS))
                .unwrap();
            let mut flags = [0u8; 4];
            c.read_exact(&mut flags).unwrap();
            let mut opt = [0u8; 16];
            c.read_exact(&mut opt).unwrap();
            let len = u32::from_be_bytes(opt[12..16].try_into().unwrap()) as usize;
            c.read_exact(&mut vec![0u8; len]).unwrap();
            let mut reqs = Vec::new();
            for _ in 0..n {
                let mut r = [0u8; 28];
                c.read_exact(&mut r).unwrap();
                reqs.push((
                    u64::from_be_bytes(r[8..16].try_into().unwrap()),
                    u64::from_be_bytes(r[16..24].try_into().unwrap()),
                    u32::from_be_bytes(r[24..28].try_into().unwrap()),
                ));
            }
            reply(&mut c, &reqs);
            // Hold the connection until the client is done.
            let _ = c.read(&mut [0u8; 64]);
        });
        (spec, dir, h)
    }

    fn simple_reply(cookie: u64, errno: u32) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&errno.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h
    }

    #[test]
    fn replies_out_of_order_reach_their_requesters() {
        let (spec, dir, server) = fake_server("ooo", 8, |c, reqs| {
            // Reverse order; request 3 fails cleanly (EIO), the others carry their offset.
            for (i, &(cookie, offset, len)) in reqs.iter().enumerate().rev() {
                if offset == 3 * 4096 {
                    c.write_all(&simple_reply(cookie, 5)).unwrap();
                    continue;
                }
                let mut m = simple_reply(cookie, 0).to_vec();
                m.extend(std::iter::repeat_n((offset / 4096) as u8 + 1, len as usize));
                // Split a reply across writes now and then.
                let cut = if i % 2 == 0 { 7 } else { m.len() };
                c.write_all(&m[..cut]).unwrap();
                c.write_all(&m[cut..]).unwrap();
            }
        });
        let b = Arc::new(NbdBackend::connect(&spec, Some(Duration::from_secs(10))).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|k| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 512 + k as usize];
                    let r = b.read_at(&mut buf, k * 4096);
                    (k, r.map(|()| buf))
                })
            })
            .collect();
        for t in threads {
            let (k, r) = t.join().unwrap();
            if k == 3 {
                let e = r.expect_err("server failed it");
                assert_eq!(e.os_code(), Some(libc::EIO), "{e}");
            } else {
                let buf = r.unwrap();
                assert_eq!(buf.len(), 512 + k as usize);
                assert!(buf.iter().all(|&x| x == k as u8 + 1), "request {k}");
            }
        }
        drop(b);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_cookie_fails_every_request_in_flight() {
        let (spec, dir, server) = fake_server("cookie", 4, |c, reqs| {
            let bogus = reqs.iter().map(|r| r.0).max().unwrap() + 100;
            c.write_all(&simple_reply(bogus, 0)).unwrap();
        });
        let b = Arc::new(NbdBackend::connect(&spec, Some(Duration::from_secs(10))).unwrap());
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let b = b.clone();
                std::thread::spawn(move || b.read_at(&mut [0u8; 512], k * 4096))
            })
            .collect();
        for t in threads {
            let e = t.join().unwrap().expect_err("protocol error");
            assert_eq!(e.os_code(), Some(libc::EPROTO), "{e}");
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(b);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stalled_server_times_out() {
        let dir = std::env::temp_dir().join(format!("blockemu-nbd-stall-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let spec = format!("nbd+unix:///x?socket={}", sock.display());
        let t = Instant::now();
        let e = NbdBackend::connect(&spec, Some(Duration::from_millis(200)))
            .err()
            .expect("silent server");
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
