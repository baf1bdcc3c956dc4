//! An NBD server: exports [`BlockNode`]s over TCP or a Unix socket (fixed newstyle handshake,
//! simple replies), for mirror migration and for any NBD client (qemu-img, qemu-io, ours).
//!
//! - The protocol logic ([`negotiate`], [`read_request`], [`Session::execute`], [`reply`],
//!   [`serve_stream`]) is generic over `Read`/`Write`: the fuzz target and the unit tests drive
//!   it from memory; the socket server ([`NbdServer`]) runs the same functions on threads.
//! - Every request goes through the node (`read`, `write`, `write_zeroes`, `discard`, `flush`),
//!   so node stats, the trace and the lifecycle apply: an inactive node answers EPERM.
//! - Everything a client sends is bounded before we act on it: option data (64 KiB), the number
//!   of options, a write's payload (32 MiB). A request that cannot be resynchronised (bad
//!   magic, over-long write) closes the connection; anything else gets an errno.
//! - One connection = a reader thread (parses requests, reads payloads) and a worker thread
//!   (executes in order, writes the replies, buffered, flushed when no request waits), so a
//!   pipelining client overlaps its transfer with our storage work.
//! - Export names are capabilities: NBD_OPT_LIST is refused (NBD_REP_ERR_POLICY).

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::*;
use super::uri::MAX_NAME;
use crate::block::BlockNode;
use crate::{Error, ErrorKind, Result};

pub const OPT_INFO: u32 = 6;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The largest option payload we read (NBD_OPT_GO with a 4096-byte name fits easily).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// How many options one client may send before we give up on it.
pub const MAX_OPTIONS: usize = 32;
/// The largest READ/WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// The advertised preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Requests read ahead of the one being executed (per connection).
const QUEUE_DEPTH: usize = 8;

// NBD errnos (the spec's values are Linux errnos).
const EPERM: u32 = 1;
const EIO: u32 = 5;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const ENOTSUP: u32 = 95;
const ESHUTDOWN: u32 = 108;

/// One exported node.
pub struct Export {
    pub name: String,
    pub node: Arc<BlockNode>,
    pub writable: bool,
    removed: AtomicBool,
}

impl Export {
    pub fn new(name: &str, node: Arc<BlockNode>, writable: bool) -> Result<Arc<Export>> {
        check_name(name)?;
        if writable && node.readonly() {
            return Err(Error::invalid(format!(
                "node {:?} is read-only: export it with writable=False",
                node.name()
            )));
        }
        Ok(Arc::new(Export {
            name: name.to_string(),
            node,
            writable,
            removed: AtomicBool::new(false),
        }))
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.len() > MAX_NAME || name.contains('\0') {
        return Err(Error::invalid(
            "an NBD export name is at most 4096 bytes and holds no NUL",
        ));
    }
    Ok(())
}

/// The server's counters.
#[derive(Debug, Default)]
pub struct ServerCounters {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub zero_writes: AtomicU64,
    pub trims: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
}

/// A snapshot of [`ServerCounters`] plus the open connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub connections: u64,
    pub active_connections: u64,
    pub refused: u64,
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub zero_writes: u64,
    pub trims: u64,
    pub flushes: u64,
    pub errors: u64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// What the handshake agreed on: the export and what we told the client of it.
pub struct Session {
    pub export: Arc<Export>,
    pub size: u64,
    pub flags: u16,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn opt_reply<W: Write>(w: &mut W, opt: u32, rtype: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&rtype.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

/// The size and transmission flags of an export, or why it cannot be served now.
fn export_facts(export: &Export) -> std::result::Result<(u64, u16), &'static str> {
    let size = match export.node.size() {
        Ok(Some(s)) => s,
        Ok(None) => return Err("the export's size is unknown while its node is inactive"),
        Err(_) => return Err("the export's node is closed"),
    };
    let mut flags = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    if !export.writable {
        flags |= TFLAG_READ_ONLY;
    }
    Ok((size, flags))
}

fn closed_conn(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, msg.to_string())
}

/// Runs the server side of the fixed-newstyle handshake on `s`. `Ok(Some)` enters
/// transmission; `Ok(None)` means the client aborted or must be disconnected (the spec's
/// answer to some errors); `Err` is an I/O failure. `lookup` finds an export by name.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    lookup: &dyn Fn(&str) -> Option<Arc<Export>>,
) -> io::Result<Option<Session>> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Ok(None); // unknown client flags: the spec says close
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        if be64(&h, 0) != IHAVEOPT {
            return Ok(None);
        }
        let opt = be32(&h, 8);
        let len = be32(&h, 12);
        if len > MAX_OPTION_DATA {
            if opt != OPT_EXPORT_NAME {
                opt_reply(s, opt, REP_ERR_TOO_BIG, b"option data too long")?;
                s.flush()?;
            }
            return Ok(None);
        }
        data.clear();
        data.resize(len as usize, 0);
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(&data) else {
                    return Ok(None);
                };
                let Some(export) = lookup(name) else {
                    return Ok(None);
                };
                let Ok((size, flags)) = export_facts(&export) else {
                    return Ok(None);
                };
                let mut r = [0u8; 10 + 124];
                r[..8].copy_from_slice(&size.to_be_bytes());
                r[8..10].copy_from_slice(&flags.to_be_bytes());
                let n = if no_zeroes { 10 } else { r.len() };
                s.write_all(&r[..n])?;
                s.flush()?;
                return Ok(Some(Session {
                    export,
                    size,
                    flags,
                }));
            }
            OPT_GO | OPT_INFO => {
                // u32 name length, name, u16 count, count x u16 info types.
                let valid = data.len() >= 6 && {
                    let nlen = be32(&data, 0) as usize;
                    nlen <= data.len() - 6 && {
                        let n = be16(&data, 4 + nlen) as usize;
                        data.len() == 4 + nlen + 2 + 2 * n
                    }
                };
                if !valid {
                    opt_reply(s, opt, REP_ERR_INVALID, b"malformed option data")?;
                    s.flush()?;
                    continue;
                }
                let nlen = be32(&data, 0) as usize;
                let export = std::str::from_utf8(&data[4..4 + nlen])
                    .ok()
                    .and_then(lookup);
                let Some(export) = export else {
                    opt_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    s.flush()?;
                    continue;
                };
                let (size, flags) = match export_facts(&export) {
                    Ok(f) => f,
                    Err(why) => {
                        opt_reply(s, opt, REP_ERR_POLICY, why.as_bytes())?;
                        s.flush()?;
                        continue;
                    }
                };
                let mut info = [0u8; 12];
                info[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
                info[2..10].copy_from_slice(&size.to_be_bytes());
                info[10..12].copy_from_slice(&flags.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info)?;
                let mut bs = [0u8; 14];
                bs[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs[2..6].copy_from_slice(&1u32.to_be_bytes());
                bs[6..10].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &bs)?;
                opt_reply(s, opt, REP_ACK, &[])?;
                s.flush()?;
                if opt == OPT_GO {
                    return Ok(Some(Session {
                        export,
                        size,
                        flags,
                    }));
                }
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[])?;
                s.flush()?;
                return Ok(None);
            }
            OPT_LIST => {
                opt_reply(s, opt, REP_ERR_POLICY, b"export names are not listed")?;
                s.flush()?;
            }
            _ => {
                opt_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?;
                s.flush()?;
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// One request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Reads the next request (and a write's payload into `payload`, reused across requests).
/// `Ok(None)` = the client closed the connection between requests. `Err` = the stream cannot
/// be trusted any more (I/O error, bad magic, over-long write): close the connection.
pub fn read_request<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let mut h = [0u8; 28];
    // EOF before the first byte is a clean close; inside the header it is an error.
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(closed_conn("truncated request")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if be32(&h, 0) != REQUEST_MAGIC {
        return Err(closed_conn("bad request magic"));
    }
    let req = Request {
        flags: be16(&h, 4),
        cmd: be16(&h, 6),
        cookie: be64(&h, 8),
        offset: be64(&h, 16),
        len: be32(&h, 24),
    };
    if req.cmd == CMD_WRITE {
        if req.len > MAX_PAYLOAD {
            return Err(closed_conn("write payload beyond the maximum"));
        }
        let len = req.len as usize;
        if payload.len() < len {
            payload
                .try_reserve_exact(len - payload.len())
                .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
            payload.resize(len, 0);
        }
        r.read_exact(&mut payload[..len])?;
    }
    Ok(Some(req))
}

/// The NBD errno of a core error.
pub fn errno_of(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::Inactive | ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::Closed => ESHUTDOWN,
        _ => match e.os_code() {
            Some(c) if c == libc::ENOSPC => ENOSPC,
            Some(c) if c == libc::EPERM || c == libc::EACCES || c == libc::EROFS => EPERM,
            Some(c) if c == libc::ENOMEM => ENOMEM,
            Some(c) if c == libc::EINVAL => EINVAL,
            Some(c) if c == libc::EOVERFLOW => EOVERFLOW,
            Some(c) if c == libc::ENOTSUP => ENOTSUP,
            Some(c) if c == libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        },
    }
}

impl Session {
    /// Executes one request (never panics; every failure becomes an errno). Returns the errno
    /// of the reply (0 = success); on success of a READ the data is `readbuf[..len]`.
    pub fn execute(
        &self,
        req: &Request,
        payload: &[u8],
        readbuf: &mut Vec<u8>,
        stats: &ServerCounters,
    ) -> u32 {
        bump(&stats.requests, 1);
        let errno = self.execute_inner(req, payload, readbuf, stats);
        if errno != 0 {
            bump(&stats.errors, 1);
        }
        errno
    }

    fn execute_inner(
        &self,
        req: &Request,
        payload: &[u8],
        readbuf: &mut Vec<u8>,
        stats: &ServerCounters,
    ) -> u32 {
        let node = &self.export.node;
        let (offset, len) = (req.offset, req.len as u64);
        let in_range = offset.checked_add(len).is_some_and(|end| end <= self.size);
        // FUA is valid on every command once negotiated (ignored where nothing is written);
        // NO_HOLE only on WRITE_ZEROES; nothing else was negotiated.
        let allowed = match req.cmd {
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        };
        if req.flags & !allowed != 0 {
            return EINVAL;
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let r = match req.cmd {
            CMD_READ => {
                if req.len > MAX_PAYLOAD || !in_range {
                    return EINVAL;
                }
                let n = req.len as usize;
                if readbuf.len() < n {
                    if readbuf.try_reserve_exact(n - readbuf.len()).is_err() {
                        return ENOMEM;
                    }
                    readbuf.resize(n, 0);
                }
                let r = node.read(offset, &mut readbuf[..n]);
                if r.is_ok() {
                    bump(&stats.reads, 1);
                    bump(&stats.bytes_read, len);
                }
                r
            }
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                if !self.export.writable {
                    return EPERM;
                }
                if !in_range {
                    return EINVAL;
                }
                let r = match req.cmd {
                    CMD_WRITE => node.write(offset, &payload[..req.len as usize]).map(|_| {
                        bump(&stats.writes, 1);
                        bump(&stats.bytes_written, len);
                    }),
                    CMD_TRIM => node.discard(offset, len).map(|_| bump(&stats.trims, 1)),
                    _ => node
                        .write_zeroes(offset, len)
                        .map(|_| bump(&stats.zero_writes, 1)),
                };
                match r {
                    Ok(()) if fua => node.flush().map(|_| bump(&stats.flushes, 1)),
                    r => r,
                }
            }
            CMD_FLUSH => node.flush().map(|_| bump(&stats.flushes, 1)),
            _ => return EINVAL,
        };
        match r {
            Ok(()) => 0,
            Err(e) => errno_of(&e),
        }
    }
}

/// Sends one simple reply (and a successful read's data).
pub fn reply<W: Write>(w: &mut W, cookie: u64, errno: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&errno.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h)?;
    if errno == 0 && !data.is_empty() {
        w.write_all(data)?;
    }
    Ok(())
}

fn reply_for<W: Write>(w: &mut W, req: &Request, errno: u32, readbuf: &[u8]) -> io::Result<()> {
    let data = if req.cmd == CMD_READ && errno == 0 {
        &readbuf[..req.len as usize]
    } else {
        &[]
    };
    reply(w, req.cookie, errno, data)
}

/// The whole protocol on one stream, in one thread (no pipelining overlap): the handshake,
/// then requests until NBD_CMD_DISC, EOF or a fatal error. The fuzz target and the unit tests
/// use it; the socket server runs the same pieces on two threads.
pub fn serve_stream<S: Read + Write>(
    s: &mut S,
    lookup: &dyn Fn(&str) -> Option<Arc<Export>>,
    stats: &ServerCounters,
) -> io::Result<()> {
    let Some(session) = negotiate(s, lookup)? else {
        return Ok(());
    };
    let mut payload = Vec::new();
    let mut readbuf = Vec::new();
    while let Some(req) = read_request(s, &mut payload)? {
        if req.cmd == CMD_DISC {
            break;
        }
        let errno = session.execute(&req, &payload, &mut readbuf, stats);
        reply_for(s, &req, errno, &readbuf)?;
        s.flush()?;
    }
    Ok(())
}

/// An in-memory client: reads come from `input`, writes are collected.
pub struct MemStream<'a> {
    pub input: &'a [u8],
    pub output: Vec<u8>,
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded: a fuzz input cannot make us collect more than a few MiB of replies.
        if self.output.len() > 8 << 20 {
            self.output.clear();
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The fuzz entry point: `data` is everything a client says. Exports "" (a writable 1 MiB
/// memory disk), "ro" (read-only) and "off" (an inactive node). Must never panic.
pub fn fuzz_session(data: &[u8]) {
    use std::sync::OnceLock;
    static EXPORTS: OnceLock<Vec<Arc<Export>>> = OnceLock::new();
    let exports = EXPORTS.get_or_init(|| {
        let mk = |ro: bool| Arc::new(crate::block::memory_node(1 << 20, ro, |b| b).expect("node"));
        let off = mk(false);
        let _ = off.inactivate();
        vec![
            Export::new("", mk(false), true).expect("export"),
            Export::new("ro", mk(true), false).expect("export"),
            Export::new("off", off, true).expect("export"),
        ]
    });
    let lookup = |name: &str| exports.iter().find(|e| e.name == name).cloned();
    let stats = ServerCounters::default();
    let mut s = MemStream {
        input: data,
        output: Vec::new(),
    };
    let _ = serve_stream(&mut s, &lookup, &stats);
}

// ---------------------------------------------------------------------------------------------
// The socket server

/// Tunables of a server.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// How long a client may take for the whole handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf, (u64, u64)),
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The socket during the handshake: every read and write waits at most until `deadline`.
struct Deadlined<'a> {
    sock: &'a mut Sock,
    deadline: Instant,
}

impl Deadlined<'_> {
    fn arm(&self, write: bool) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"));
        }
        if write {
            self.sock.set_write_timeout(Some(left))
        } else {
            self.sock.set_read_timeout(Some(left))
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.sock.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One accepted connection, as the server tracks it.
struct ConnEntry {
    /// For shutdown(2) from `close()` / `remove_export()`.
    sock: Sock,
    /// Set once the handshake chose an export.
    export: Mutex<Option<Arc<Export>>>,
    /// Asks the worker to stop after the request it is executing.
    stop: AtomicBool,
    done: AtomicBool,
}

impl ConnEntry {
    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.sock.shutdown(Shutdown::Read);
    }
}

/// A connection and its thread (taken when joined).
type Tracked = (Arc<ConnEntry>, Option<JoinHandle<()>>);

struct Shared {
    opts: ServerOptions,
    closing: AtomicBool,
    exports: RwLock<HashMap<String, Arc<Export>>>,
    conns: Mutex<Vec<Tracked>>,
    /// Signalled whenever a connection ends.
    ended: Condvar,
    active: AtomicUsize,
    stats: ServerCounters,
}

/// The bound address of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// An NBD server listening on one socket. `close()` (or drop) stops it and joins every thread.
pub struct NbdServer {
    shared: Arc<Shared>,
    addr: ServerAddr,
    listen_fd: RawFd,
    accept: Mutex<Option<JoinHandle<()>>>,
    listener_path: Mutex<Option<(PathBuf, (u64, u64))>>,
}

/// Encodes an export name or a socket path for a URI (RFC 3986 unreserved bytes and '/' stay).
fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses "tcp:HOST:PORT" (HOST may be [v6]) or "unix:PATH".
fn bind(address: &str) -> Result<Listener> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "invalid NBD server address {address:?}: {why} (expected tcp:HOST:PORT or unix:PATH)"
        ))
    };
    if let Some(path) = address.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let path = PathBuf::from(path);
        let l = UnixListener::bind(&path)
            .map_err(|e| Error::io(e).with_path(&path).with_op("nbd-server bind"))?;
        let md = std::fs::metadata(&path).map_err(Error::io)?;
        return Ok(Listener::Unix(l, path, (md.dev(), md.ino())));
    }
    let Some(rest) = address.strip_prefix("tcp:") else {
        return Err(bad("unknown scheme"));
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::io(e).with_op("nbd-server resolve"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpListener::bind(a) {
            Ok(l) => return Ok(Listener::Tcp(l)),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => Error::io(e).with_op("nbd-server bind"),
        None => bad("host resolves to nothing"),
    })
}

/// Waits until `fd` is readable or `ms` pass.
fn poll_readable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

impl NbdServer {
    /// Binds and listens on `address` ("tcp:HOST:PORT", port 0 = ephemeral, or "unix:PATH")
    /// and starts the accept thread.
    pub fn bind(address: &str, opts: ServerOptions) -> Result<NbdServer> {
        if opts.max_connections == 0 || opts.handshake_timeout.is_zero() {
            return Err(Error::invalid(
                "max_connections and handshake_timeout must be positive",
            ));
        }
        let listener = bind(address)?;
        let (addr, fd, path) = match &listener {
            Listener::Tcp(l) => (
                ServerAddr::Tcp(l.local_addr().map_err(Error::io)?),
                l.as_raw_fd(),
                None,
            ),
            Listener::Unix(l, p, id) => (
                ServerAddr::Unix(p.clone()),
                l.as_raw_fd(),
                Some((p.clone(), *id)),
            ),
        };
        let shared = Arc::new(Shared {
            opts,
            closing: AtomicBool::new(false),
            exports: RwLock::new(HashMap::new()),
            conns: Mutex::new(Vec::new()),
            ended: Condvar::new(),
            active: AtomicUsize::new(0),
            stats: ServerCounters::default(),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(sh, listener))
            .map_err(Error::io)?;
        Ok(NbdServer {
            shared,
            addr,
            listen_fd: fd,
            accept: Mutex::new(Some(accept)),
            listener_path: Mutex::new(path),
        })
    }

    pub fn local_addr(&self) -> &ServerAddr {
        &self.addr
    }

    /// "tcp:HOST:PORT" or "unix:PATH".
    pub fn address(&self) -> String {
        match &self.addr {
            ServerAddr::Tcp(a) => format!("tcp:{a}"),
            ServerAddr::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// The URI a client opens to reach export `name`.
    pub fn uri(&self, name: &str) -> String {
        match &self.addr {
            ServerAddr::Tcp(a) => {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v) if v.is_unspecified() => {
                        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                    }
                    std::net::IpAddr::V6(v) if v.is_unspecified() => {
                        std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
                    }
                    ip => ip,
                };
                let host = match ip {
                    std::net::IpAddr::V6(v) => format!("[{v}]"),
                    v => v.to_string(),
                };
                format!("nbd://{host}:{}/{}", a.port(), percent_encode(name, false))
            }
            ServerAddr::Unix(p) => format!(
                "nbd+unix:///{}?socket={}",
                percent_encode(name, false),
                percent_encode(&p.to_string_lossy(), true)
            ),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Error::closed("the NBD server is closed"));
        }
        Ok(())
    }

    /// Exports `node` as `name`; returns the URI of the export.
    pub fn add_export(&self, name: &str, node: Arc<BlockNode>, writable: bool) -> Result<String> {
        self.check_open()?;
        node.check_open()?;
        let export = Export::new(name, node, writable)?;
        let mut map = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if map.contains_key(name) {
            return Err(Error::invalid(format!(
                "NBD export {name:?} already exists"
            )));
        }
        map.insert(name.to_string(), export);
        Ok(self.uri(name))
    }

    /// Removes an export and disconnects its clients (a request being executed finishes
    /// and is answered first). Waits up to `timeout` (default 30 s) for them to go.
    pub fn remove_export(&self, name: &str, timeout: Option<Duration>) -> Result<()> {
        let export = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| Error::invalid(format!("no NBD export {name:?}")))?;
        export.removed.store(true, Ordering::Release);
        let of_export = |c: &ConnEntry| {
            c.export
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|e| Arc::ptr_eq(e, &export))
        };
        self.stop_conns(&of_export, timeout.unwrap_or(Duration::from_secs(30)))
    }

    /// Stops the matching connections gracefully, then forcibly after `grace`; waits for them.
    fn stop_conns(&self, matches: &dyn Fn(&ConnEntry) -> bool, grace: Duration) -> Result<()> {
        let targets: Vec<Arc<ConnEntry>> = {
            let conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns
                .iter()
                .filter(|(c, _)| !c.done.load(Ordering::Acquire) && matches(c))
                .map(|(c, _)| c.clone())
                .collect()
        };
        for c in &targets {
            c.stop();
        }
        let all_done = |deadline: Instant| -> bool {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if targets.iter().all(|c| c.done.load(Ordering::Acquire)) {
                    return true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                conns = self
                    .shared
                    .ended
                    .wait_timeout(conns, left.min(Duration::from_millis(100)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if !all_done(Instant::now() + grace) {
            for c in &targets {
                c.sock.shutdown(Shutdown::Both);
            }
            // A thread can now only be inside a node operation, which is bounded.
            if !all_done(Instant::now() + Duration::from_secs(60)) {
                return Err(Error::timeout(
                    "NBD connections did not end (a node operation is stuck)",
                ));
            }
        }
        self.reap();
        Ok(())
    }

    /// Joins the threads of ended connections.
    fn reap(&self) {
        reap(&self.shared);
    }

    pub fn exports(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections: g(&c.connections),
            active_connections: self.shared.active.load(Ordering::Relaxed) as u64,
            refused: g(&c.refused),
            requests: g(&c.requests),
            reads: g(&c.reads),
            writes: g(&c.writes),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            zero_writes: g(&c.zero_writes),
            trims: g(&c.trims),
            flushes: g(&c.flushes),
            errors: g(&c.errors),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
    }

    /// Stops accepting, disconnects every client (requests being executed finish first, for
    /// at most `grace`, default 5 s), joins every thread and removes the Unix socket file.
    /// Idempotent.
    pub fn close(&self, grace: Option<Duration>) -> Result<()> {
        let mut accept = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = accept.take() {
            // Wakes a blocked accept (Linux); the accept loop also polls `closing`.
            // SAFETY: the accept thread owns the listener and drops it (closing the
            // descriptor) only after it sees `closing`, which we set after this call.
            unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
            self.shared.closing.store(true, Ordering::Release);
            let _ = h.join();
        }
        self.shared.closing.store(true, Ordering::Release);
        drop(accept);
        if let Some((path, (dev, ino))) = self
            .listener_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // Only the file we created (not one someone bound after us).
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == ino) {
                let _ = std::fs::remove_file(&path);
            }
        }
        let r = self.stop_conns(&|_| true, grace.unwrap_or(Duration::from_secs(5)));
        self.shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        r
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.close(Some(Duration::from_secs(1)));
    }
}

fn reap(shared: &Shared) {
    let finished: Vec<JoinHandle<()>> = {
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        conns.retain_mut(|(c, h)| {
            if c.done.load(Ordering::Acquire) {
                if let Some(h) = h.take() {
                    out.push(h);
                }
                false
            } else {
                true
            }
        });
        out
    };
    for h in finished {
        let _ = h.join();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: Listener) {
    let fd = match &listener {
        Listener::Tcp(l) => l.as_raw_fd(),
        Listener::Unix(l, ..) => l.as_raw_fd(),
    };
    loop {
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        if !poll_readable(fd, 100) {
            continue;
        }
        if shared.closing.load(Ordering::Acquire) {
            break;
        }
        let sock = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Sock::Tcp(s)
            }),
            Listener::Unix(l, ..) => l.accept().map(|(s, _)| Sock::Unix(s)),
        };
        let sock = match sock {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        reap(&shared);
        if shared.active.load(Ordering::Acquire) >= shared.opts.max_connections {
            bump(&shared.stats.refused, 1);
            sock.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(handle) = sock.try_clone() else {
            continue;
        };
        let entry = Arc::new(ConnEntry {
            sock: handle,
            export: Mutex::new(None),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        bump(&shared.stats.connections, 1);
        shared.active.fetch_add(1, Ordering::AcqRel);
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        let (sh, en) = (shared.clone(), entry.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                serve_conn(&sh, &en, sock);
                en.sock.shutdown(Shutdown::Both);
                sh.active.fetch_sub(1, Ordering::AcqRel);
                let _guard = sh.conns.lock().unwrap_or_else(|p| p.into_inner());
                en.done.store(true, Ordering::Release);
                sh.ended.notify_all();
            });
        match spawned {
            Ok(h) => conns.push((entry, Some(h))),
            Err(_) => {
                shared.active.fetch_sub(1, Ordering::AcqRel);
                entry.sock.shutdown(Shutdown::Both);
            }
        }
    }
    drop(listener);
}

/// Write payload bytes read ahead of the worker, per connection.
const QUEUED_BYTES: usize = 64 << 20;

fn payload_len(req: &Request) -> usize {
    if req.cmd == CMD_WRITE {
        req.len as usize
    } else {
        0
    }
}

/// Bounds the write payloads queued between a connection's reader and worker: the reader
/// waits while more than [`QUEUED_BYTES`] wait (one request always passes).
#[derive(Default)]
struct Budget {
    state: Mutex<(usize, bool)>,
    cv: Condvar,
}

impl Budget {
    /// Waits for room; false once the worker is gone.
    fn acquire(&self, n: usize) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.1 && st.0 > 0 && st.0 + n > QUEUED_BYTES {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += n;
        !st.1
    }
    fn release(&self, n: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(n);
        self.cv.notify_all();
    }
    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cv.notify_all();
    }
}

/// One connection: handshake (bounded in time), then reader (this thread) + worker.
fn serve_conn(shared: &Shared, entry: &ConnEntry, mut sock: Sock) {
    let lookup = |name: &str| {
        shared
            .exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    };
    let session = {
        let mut d = Deadlined {
            sock: &mut sock,
            deadline: Instant::now() + shared.opts.handshake_timeout,
        };
        match negotiate(&mut d, &lookup) {
            Ok(Some(s)) => s,
            _ => return,
        }
    };
    if sock.set_read_timeout(None).is_err() || sock.set_write_timeout(None).is_err() {
        return;
    }
    *entry.export.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.export.clone());
    // Removed between the lookup and now, or the server is closing: stop here.
    if session.export.removed.load(Ordering::Acquire)
        || shared.closing.load(Ordering::Acquire)
        || entry.stop.load(Ordering::Acquire)
    {
        return;
    }
    let Ok(wsock) = sock.try_clone() else {
        return;
    };
    let (tx, rx) = crossbeam_channel::bounded::<(Request, Vec<u8>)>(QUEUE_DEPTH);
    let budget = Budget::default();
    let (recycle_tx, recycle_rx) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE_DEPTH + 2);
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("nbd-worker".into())
            .spawn_scoped(scope, || {
                // Owned by the worker: when it ends, a reader blocked on a full queue wakes.
                let (rx, recycle_tx) = (rx, recycle_tx);
                let mut w = BufWriter::with_capacity(256 * 1024, wsock);
                let mut readbuf = Vec::new();
                let mut ok = true;
                while let Ok((req, payload)) = rx.recv() {
                    if entry.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let errno = session.execute(&req, &payload, &mut readbuf, &shared.stats);
                    budget.release(payload_len(&req));
                    // Only small buffers are kept: a burst of 32 MiB writes must not pin
                    // hundreds of MiB per connection.
                    if payload.len() <= 4 << 20 {
                        let _ = recycle_tx.try_send(payload);
                    }
                    if reply_for(&mut w, &req, errno, &readbuf).is_err()
                        || (rx.is_empty() && w.flush().is_err())
                    {
                        ok = false;
                        break;
                    }
                    // A read buffer grown for one huge request is not kept for ever.
                    if readbuf.len() > 4 << 20 {
                        readbuf = Vec::new();
                    }
                }
                if ok {
                    let _ = w.flush();
                }
                // Whatever ended us, the reader must stop too.
                budget.close();
                entry.sock.shutdown(Shutdown::Both);
            });
        let Ok(worker) = worker else {
            return;
        };
        let mut r = BufReader::with_capacity(256 * 1024, sock);
        loop {
            let mut payload = recycle_rx.try_recv().unwrap_or_default();
            match read_request(&mut r, &mut payload) {
                Ok(Some(req)) if req.cmd != CMD_DISC => {
                    if !budget.acquire(payload_len(&req)) || tx.send((req, payload)).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        drop(tx);
        let _ = worker.join();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(size: u64) -> Arc<BlockNode> {
        Arc::new(crate::block::memory_node(size, false, |b| b).unwrap())
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b/c", false), "a%20b%2Fc");
        assert_eq!(percent_encode("/tmp/x y", true), "/tmp/x%20y");
    }

    #[test]
    fn addresses() {
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:port",
            "unix:",
            "udp:h:1",
        ] {
            assert!(bind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errnos() {
        assert_eq!(errno_of(&Error::inactive("x")), EPERM);
        assert_eq!(errno_of(&Error::read_only("x")), EPERM);
        assert_eq!(errno_of(&Error::out_of_range("x")), EINVAL);
        assert_eq!(errno_of(&Error::os(libc::ENOSPC, "x")), ENOSPC);
        assert_eq!(errno_of(&Error::os(libc::EBADF, "x")), EIO);
    }

    #[test]
    fn export_of_read_only_node_must_be_read_only() {
        let ro = Arc::new(crate::block::memory_node(4096, true, |b| b).unwrap());
        assert!(Export::new("x", ro.clone(), true).is_err());
        assert!(Export::new("x", ro, false).is_ok());
        assert!(Export::new("a\0b", node(512), true).is_err());
        assert!(Export::new(&"n".repeat(MAX_NAME + 1), node(512), true).is_err());
    }
}
