//! The NBD wire protocol, client side: the fixed-newstyle handshake (NBD_OPT_GO, falling back
//! to NBD_OPT_EXPORT_NAME) and simple-reply transmission. Pure: it speaks through [`Io`], so
//! the fuzz target and the unit tests drive it from a byte slice.
//!
//! Everything the server sends is bounded before we act on it: option replies longer than
//! [`MAX_OPTION_REPLY`] are refused before any allocation, read payloads are exactly what we
//! asked for, structured replies (never negotiated) are a protocol error.

use crate::{Error, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// The longest option reply we accept (an NBD_REP_INFO is 14 bytes at most; an error message
/// is bounded by NBD_MAX_STRING_SIZE; name/description infos likewise).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// How many option replies one NBD_OPT_GO may bring before we call the server hostile.
pub const MAX_OPTION_REPLIES: usize = 64;
/// The largest payload of one request unless the server says otherwise (the spec's default).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// A byte stream to the server. Implementations enforce the deadline of the current operation.
pub trait Io {
    /// Fills `buf` completely or fails (EOF is an error).
    fn recv(&mut self, buf: &mut [u8]) -> Result<()>;
    /// Sends every byte of every part, in order.
    fn send(&mut self, parts: &[&[u8]]) -> Result<()>;
    /// Fills `hdr`, and may already read into `payload` whatever arrived with it (one system
    /// call for a read's reply); returns how many payload bytes it read.
    fn recv_reply(&mut self, hdr: &mut [u8; 16], _payload: &mut [u8]) -> Result<usize> {
        self.recv(hdr)?;
        Ok(0)
    }
}

/// A protocol violation by the server: the connection cannot be trusted any more.
pub fn protocol(msg: impl std::fmt::Display) -> Error {
    Error::os(libc::EPROTO, format!("NBD protocol error: {msg}"))
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

/// What the handshake learned of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (0 when the server did not set NBD_FLAG_HAS_FLAGS).
    pub flags: u16,
    pub min_block: u32,
    pub pref_block: u32,
    /// The largest payload of one request.
    pub max_payload: u32,
}

impl ExportInfo {
    pub fn readonly(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn export_info(size: u64, flags: u16) -> Result<ExportInfo> {
    if size > i64::MAX as u64 {
        return Err(protocol(format!("export size {size} is too large")));
    }
    let flags = if flags & TFLAG_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    Ok(ExportInfo {
        size,
        flags,
        min_block: 1,
        pref_block: 4096,
        max_payload: DEFAULT_MAX_PAYLOAD,
    })
}

/// The error an NBD_REP_ERR_* becomes.
fn option_error(kind: u32, export: &str, msg: &str) -> Error {
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    let (code, what) = match kind {
        REP_ERR_UNKNOWN => (
            libc::ENOENT,
            format!("the NBD server has no export {export:?}"),
        ),
        REP_ERR_POLICY => (
            libc::EACCES,
            format!("the NBD server refuses export {export:?}"),
        ),
        REP_ERR_TLS_REQD => (
            libc::EACCES,
            "the NBD server requires TLS (not supported)".into(),
        ),
        REP_ERR_SHUTDOWN => (libc::ESHUTDOWN, "the NBD server is shutting down".into()),
        REP_ERR_UNSUP => (
            libc::ENOTSUP,
            "the NBD server does not support NBD_OPT_GO".into(),
        ),
        REP_ERR_INVALID => (
            libc::EINVAL,
            "the NBD server calls our request invalid".into(),
        ),
        REP_ERR_PLATFORM => (
            libc::ENOTSUP,
            "the NBD server cannot do it on its platform".into(),
        ),
        REP_ERR_BLOCK_SIZE_REQD => (
            libc::ENOTSUP,
            "the NBD server requires block-size negotiation".into(),
        ),
        REP_ERR_TOO_BIG => (
            libc::EINVAL,
            "the NBD server finds the request too big".into(),
        ),
        other => (
            libc::EIO,
            format!("the NBD server refused the export (error {other:#x})"),
        ),
    };
    Error::os(code, format!("{what}{detail}"))
}

/// Runs the client side of the fixed-newstyle handshake and returns the export's facts.
/// On an option error we send NBD_OPT_ABORT (best effort) before returning it.
pub fn handshake<I: Io>(io: &mut I, export: &str) -> Result<ExportInfo> {
    if export.len() > super::uri::MAX_NAME {
        return Err(Error::invalid("NBD export name longer than 4096 bytes"));
    }
    let mut hello = [0u8; 18];
    io.recv(&mut hello[..16])?;
    if be64(&hello, 0) != NBDMAGIC {
        return Err(protocol("not an NBD server (bad greeting magic)"));
    }
    match be64(&hello, 8) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(protocol("oldstyle NBD servers are not supported")),
        m => return Err(protocol(format!("bad greeting magic {m:#x}"))),
    }
    io.recv(&mut hello[16..18])?;
    let hflags = be16(&hello, 16);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the server does not speak fixed newstyle"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    io.send(&[&cflags.to_be_bytes()])?;

    // NBD_OPT_GO: name length, name, one info request (block size).
    let name = export.as_bytes();
    let len = (4 + name.len() + 2 + 2) as u32;
    let mut opt = Vec::with_capacity(16 + len as usize);
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&len.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&1u16.to_be_bytes());
    opt.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    io.send(&[&opt])?;

    let mut info: Option<ExportInfo> = None;
    let mut block: Option<(u32, u32, u32)> = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let mut hdr = [0u8; 20];
        io.recv(&mut hdr)?;
        if be64(&hdr, 0) != OPTION_REPLY_MAGIC {
            return Err(protocol("bad option reply magic"));
        }
        if be32(&hdr, 8) != OPT_GO {
            return Err(protocol(format!(
                "reply to option {} we did not send",
                be32(&hdr, 8)
            )));
        }
        let rtype = be32(&hdr, 12);
        let rlen = be32(&hdr, 16);
        if rlen > MAX_OPTION_REPLY {
            return Err(protocol(format!("option reply of {rlen} bytes")));
        }
        let mut payload = vec![0u8; rlen as usize];
        io.recv(&mut payload)?;
        match rtype {
            REP_ACK => {
                if rlen != 0 {
                    return Err(protocol("NBD_REP_ACK with a payload"));
                }
                let mut info =
                    info.ok_or_else(|| protocol("NBD_OPT_GO acked without NBD_INFO_EXPORT"))?;
                if let Some((min, pref, max)) = block {
                    info.min_block = min;
                    info.pref_block = pref;
                    info.max_payload = max.min(DEFAULT_MAX_PAYLOAD);
                }
                return Ok(info);
            }
            REP_INFO => {
                if rlen < 2 {
                    return Err(protocol("short NBD_REP_INFO"));
                }
                match be16(&payload, 0) {
                    INFO_EXPORT => {
                        if rlen != 12 {
                            return Err(protocol("NBD_INFO_EXPORT of a wrong length"));
                        }
                        info = Some(export_info(be64(&payload, 2), be16(&payload, 10))?);
                    }
                    INFO_BLOCK_SIZE => {
                        if rlen != 14 {
                            return Err(protocol("NBD_INFO_BLOCK_SIZE of a wrong length"));
                        }
                        let (min, pref, max) =
                            (be32(&payload, 2), be32(&payload, 6), be32(&payload, 10));
                        if !min.is_power_of_two()
                            || min > 65536
                            || !pref.is_power_of_two()
                            || pref < min
                            || max < min
                        {
                            return Err(protocol(format!(
                                "invalid block sizes (min {min}, preferred {pref}, max {max})"
                            )));
                        }
                        block = Some((min, pref, max));
                    }
                    _ => {} // name, description, unknown infos: ignored, as the spec asks
                }
            }
            t if t & REP_FLAG_ERROR != 0 => {
                let msg = String::from_utf8_lossy(&payload).into_owned();
                let msg: String = msg.chars().filter(|c| !c.is_control()).take(512).collect();
                if t == REP_ERR_UNSUP {
                    // A server older than NBD_OPT_GO: the export-name option instead.
                    return export_name(io, name, no_zeroes);
                }
                let _ = send_abort(io);
                return Err(option_error(t, export, &msg));
            }
            t => return Err(protocol(format!("unexpected option reply type {t:#x}"))),
        }
    }
    Err(protocol("too many option replies"))
}

/// NBD_OPT_EXPORT_NAME: the server answers with size, flags and (unless NO_ZEROES) 124 zeroes,
/// or closes the connection when it has no such export.
fn export_name<I: Io>(io: &mut I, name: &[u8], no_zeroes: bool) -> Result<ExportInfo> {
    let mut opt = Vec::with_capacity(16 + name.len());
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    io.send(&[&opt])?;
    let mut reply = [0u8; 10 + 124];
    let n = if no_zeroes { 10 } else { reply.len() };
    io.recv(&mut reply[..n])?;
    export_info(be64(&reply, 0), be16(&reply, 8))
}

fn send_abort<I: Io>(io: &mut I) -> Result<()> {
    let mut opt = [0u8; 16];
    opt[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    opt[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
    io.send(&[&opt])
}

/// Encodes a 28-byte request header.
pub fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&0u16.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Checks a simple reply header; returns the server's errno (0 = success). A wrong magic or
/// cookie is a protocol error.
pub fn parse_reply(hdr: &[u8; 16], cookie: u64) -> Result<u32> {
    match be32(hdr, 0) {
        SIMPLE_REPLY_MAGIC => {}
        STRUCTURED_REPLY_MAGIC => return Err(protocol("structured reply (never negotiated)")),
        m => return Err(protocol(format!("bad reply magic {m:#x}"))),
    }
    let got = be64(hdr, 8);
    if got != cookie {
        return Err(protocol(format!(
            "reply cookie {got:#x}, expected {cookie:#x}"
        )));
    }
    Ok(be32(hdr, 4))
}

/// Checks a simple reply header of any cookie; returns `(cookie, errno)`. A wrong magic (or
/// a structured reply, never negotiated) is a protocol error.
pub fn parse_reply_any(hdr: &[u8; 16]) -> Result<(u64, u32)> {
    match be32(hdr, 0) {
        SIMPLE_REPLY_MAGIC => {}
        STRUCTURED_REPLY_MAGIC => return Err(protocol("structured reply (never negotiated)")),
        m => return Err(protocol(format!("bad reply magic {m:#x}"))),
    }
    Ok((be64(hdr, 8), be32(hdr, 4)))
}

/// How a command is named in an error message.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write-zeroes",
        _ => "command",
    }
}

/// The error a non-zero NBD errno becomes (the spec's values are Linux errnos).
pub fn command_error(errno: u32, what: &str) -> Error {
    let code = match errno {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => errno as i32,
        _ => libc::EIO,
    };
    Error::os(
        code,
        format!("the NBD server failed the {what} (errno {errno})"),
    )
}

/// One command with a simple reply: sends the header (and `payload` for a write), reads the
/// reply header and, on success of a read, exactly `read_buf.len()` bytes into it.
/// `Ok(Err(e))` is a command the server failed cleanly (the connection stays usable); `Err`
/// means the connection is unusable.
pub fn command<I: Io>(
    io: &mut I,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
    read_buf: &mut [u8],
) -> Result<std::result::Result<(), Error>> {
    let hdr = request(cmd, cookie, offset, len);
    if payload.is_empty() {
        io.send(&[&hdr])?;
    } else {
        io.send(&[&hdr, payload])?;
    }
    let mut reply = [0u8; 16];
    let early = if cmd == CMD_READ {
        io.recv_reply(&mut reply, read_buf)?
    } else {
        io.recv(&mut reply)?;
        0
    };
    let errno = parse_reply(&reply, cookie)?;
    if errno != 0 {
        if early > 0 {
            return Err(protocol("data after an error reply"));
        }
        return Ok(Err(command_error(errno, command_name(cmd))));
    }
    if cmd == CMD_READ {
        io.recv(&mut read_buf[early..])?;
    }
    Ok(Ok(()))
}

/// An in-memory stream: reads come from `input`, writes are collected (tests, fuzzing).
pub struct SliceIo<'a> {
    pub input: &'a [u8],
    pub sent: Vec<u8>,
}

impl<'a> SliceIo<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        SliceIo {
            input,
            sent: Vec::new(),
        }
    }
}

impl Io for SliceIo<'_> {
    fn recv(&mut self, buf: &mut [u8]) -> Result<()> {
        if self.input.len() < buf.len() {
            self.input = &[];
            return Err(Error::os(
                libc::ECONNRESET,
                "NBD server closed the connection",
            ));
        }
        let (head, rest) = self.input.split_at(buf.len());
        buf.copy_from_slice(head);
        self.input = rest;
        Ok(())
    }
    fn send(&mut self, parts: &[&[u8]]) -> Result<()> {
        for p in parts {
            self.sent.extend_from_slice(p);
        }
        Ok(())
    }
}

/// The fuzz entry point: `data` is everything a server says. Runs the handshake, then a read,
/// a write and a flush against the rest; must never panic or allocate beyond the bounds.
pub fn fuzz_session(data: &[u8]) {
    let mut io = SliceIo::new(data);
    let Ok(info) = handshake(&mut io, "fuzz") else {
        return;
    };
    let _ = info.readonly();
    let mut buf = [0u8; 4096];
    let _ = command(&mut io, CMD_READ, 1, 0, 4096, &[], &mut buf);
    let _ = command(&mut io, CMD_WRITE, 2, 0, 512, &[0u8; 512], &mut []);
    let _ = command(&mut io, CMD_FLUSH, 3, 0, 0, &[], &mut []);
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A server greeting + GO replies for an export of `size` bytes with `flags`.
    pub fn server_hello(size: u64, flags: u16) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&NBDMAGIC.to_be_bytes());
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        opt_reply(&mut s, REP_INFO, &{
            let mut p = INFO_EXPORT.to_be_bytes().to_vec();
            p.extend_from_slice(&size.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
            p
        });
        opt_reply(&mut s, REP_INFO, &{
            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [1u32, 4096, 1 << 20] {
                p.extend_from_slice(&v.to_be_bytes());
            }
            p
        });
        opt_reply(&mut s, REP_ACK, &[]);
        s
    }

    pub fn opt_reply(s: &mut Vec<u8>, rtype: u32, payload: &[u8]) {
        s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&rtype.to_be_bytes());
        s.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        s.extend_from_slice(payload);
    }

    fn reply(s: &mut Vec<u8>, errno: u32, cookie: u64) {
        s.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&errno.to_be_bytes());
        s.extend_from_slice(&cookie.to_be_bytes());
    }

    #[test]
    fn handshake_go() {
        let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM;
        let s = server_hello(1 << 20, flags);
        let mut io = SliceIo::new(&s);
        let info = handshake(&mut io, "exp").unwrap();
        assert_eq!(info.size, 1 << 20);
        assert_eq!(info.flags, flags);
        assert_eq!(info.max_payload, 1 << 20);
        assert!(!info.readonly());
        // client flags, then IHAVEOPT GO len namelen "exp" 1 BLOCK_SIZE
        assert_eq!(&io.sent[..4], &3u32.to_be_bytes());
        assert_eq!(&io.sent[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&io.sent[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&io.sent[16..20], &11u32.to_be_bytes());
        assert_eq!(&io.sent[24..27], b"exp");
        assert_eq!(io.sent.len(), 20 + 11);
    }

    #[test]
    fn flags_without_has_flags_are_ignored() {
        let s = server_hello(512, TFLAG_READ_ONLY);
        let info = handshake(&mut SliceIo::new(&s), "").unwrap();
        assert_eq!(info.flags, 0);
    }

    fn greeting() -> Vec<u8> {
        let mut s = server_hello(0, 0);
        s.truncate(18);
        s
    }

    #[test]
    fn unknown_export_is_enoent_and_aborts() {
        let mut s = greeting();
        opt_reply(&mut s, REP_ERR_UNKNOWN, b"no such export");
        let mut io = SliceIo::new(&s);
        let e = handshake(&mut io, "nope").unwrap_err();
        assert_eq!(e.os_code(), Some(libc::ENOENT));
        assert!(e.to_string().contains("\"nope\""), "{e}");
        assert!(e.to_string().contains("no such export"), "{e}");
        let abort = &io.sent[io.sent.len() - 16..];
        assert_eq!(&abort[8..12], &OPT_ABORT.to_be_bytes());
    }

    #[test]
    fn hostile_handshakes_fail_cleanly() {
        // Huge option reply: refused before allocation.
        let mut s = greeting();
        s.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        s.extend_from_slice(&OPT_GO.to_be_bytes());
        s.extend_from_slice(&REP_INFO.to_be_bytes());
        s.extend_from_slice(&u32::MAX.to_be_bytes());
        let e = handshake(&mut SliceIo::new(&s), "").unwrap_err();
        assert_eq!(e.os_code(), Some(libc::EPROTO));
        // Bad magic, oldstyle, truncated, ACK without info, wrong info length, endless infos.
        let mut bad = greeting();
        bad[0] ^= 1;
        assert!(handshake(&mut SliceIo::new(&bad), "").is_err());
        let mut old = greeting();
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(handshake(&mut SliceIo::new(&old), "").is_err());
        let full = server_hello(4096, TFLAG_HAS_FLAGS);
        for cut in 0..full.len() {
            assert!(
                handshake(&mut SliceIo::new(&full[..cut]), "").is_err(),
                "cut {cut}"
            );
        }
        let mut s = greeting();
        opt_reply(&mut s, REP_ACK, &[]);
        assert!(handshake(&mut SliceIo::new(&s), "").is_err());
        let mut s = greeting();
        opt_reply(&mut s, REP_INFO, &[0, 0, 1]);
        assert!(handshake(&mut SliceIo::new(&s), "").is_err());
        let mut s = greeting();
        for _ in 0..MAX_OPTION_REPLIES + 1 {
            opt_reply(&mut s, REP_INFO, &[0, 1, b'x']);
        }
        assert!(handshake(&mut SliceIo::new(&s), "").is_err());
        let mut s = greeting();
        opt_reply(&mut s, REP_INFO, &{
            let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [3u32, 4096, 1 << 20] {
                p.extend_from_slice(&v.to_be_bytes());
            }
            p
        });
        assert!(handshake(&mut SliceIo::new(&s), "").is_err());
    }

    #[test]
    fn export_name_fallback() {
        let mut s = greeting();
        opt_reply(&mut s, REP_ERR_UNSUP, &[]);
        s.extend_from_slice(&8192u64.to_be_bytes());
        s.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        let info = handshake(&mut SliceIo::new(&s), "x").unwrap();
        assert_eq!(info.size, 8192);
        assert!(info.readonly());
    }

    #[test]
    fn replies() {
        let mut s = Vec::new();
        reply(&mut s, 0, 7);
        s.extend_from_slice(&[0xab; 8]);
        let mut io = SliceIo::new(&s);
        let mut buf = [0u8; 8];
        command(&mut io, CMD_READ, 7, 0, 8, &[], &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(buf, [0xab; 8]);
        assert_eq!(io.sent, request(CMD_READ, 7, 0, 8));
        // Server error: clean, no payload.
        let mut s = Vec::new();
        reply(&mut s, 5, 8);
        let r = command(&mut SliceIo::new(&s), CMD_READ, 8, 0, 8, &[], &mut buf).unwrap();
        assert_eq!(r.unwrap_err().os_code(), Some(libc::EIO));
        // Wrong cookie, bad magic, structured reply, truncated payload: connection errors.
        let mut s = Vec::new();
        reply(&mut s, 0, 9);
        assert!(command(&mut SliceIo::new(&s), CMD_FLUSH, 10, 0, 0, &[], &mut []).is_err());
        let mut bad = s.clone();
        bad[0] = 0;
        assert!(command(&mut SliceIo::new(&bad), CMD_FLUSH, 9, 0, 0, &[], &mut []).is_err());
        let mut st = s.clone();
        st[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(command(&mut SliceIo::new(&st), CMD_FLUSH, 9, 0, 0, &[], &mut []).is_err());
        s.extend_from_slice(&[1, 2, 3]);
        assert!(command(&mut SliceIo::new(&s), CMD_READ, 9, 0, 8, &[], &mut buf).is_err());
    }

    #[test]
    fn fuzz_session_survives_garbage() {
        fuzz_session(&[]);
        fuzz_session(&server_hello(1 << 30, 0xffff));
        let mut s = server_hello(4096, TFLAG_HAS_FLAGS);
        reply(&mut s, 0, 1);
        s.extend_from_slice(&[0; 4096]);
        reply(&mut s, 0, 2);
        reply(&mut s, 0, 3);
        fuzz_session(&s);
    }
}
