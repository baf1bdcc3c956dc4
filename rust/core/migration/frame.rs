//! One frame of the migration protocol (specs/migration.md §12.1), parsed and checked:
//!
//! ```text
//! magic "BLKM" (4) | version u16 | type u16 | session id (16) | epoch u64 | seq u64
//! | payload length u32 | payload | crc32 u32
//! ```
//!
//! big-endian. The CRC is CRC-32/ISO-HDLC (zlib's `crc32`, not CRC-32C) over everything
//! before it. The stream is hostile: a header is checked (magic, version, known type, the
//! payload bound of its type: [`MAX_CONTROL`] for control messages, [`MAX_CHUNK`] for
//! `DEVICE_STATE`) before its payload is waited for, so a length field never makes a receiver
//! buffer more than the bound. Every violation is a [`Protocol`](crate::ErrorKind::Protocol)
//! error. The session, epoch and sequence checks belong to the channel (they need its state).
//!
//! ```
//! use blockemu_core::migration::frame::{decode_frame, encode_frame, FrameHeader, Next};
//! let header = FrameHeader::new(16, [7; 16], 3, 1, 2);
//! let data = encode_frame(&header, b"{}").unwrap();
//! match decode_frame(&data).unwrap() {
//!     Next::Frame { header: h, payload, used } => {
//!         assert_eq!((h, payload, used), (header, &b"{}"[..], data.len()));
//!     }
//!     Next::NeedMore(_) => unreachable!(),
//! }
//! ```

use crate::state::crc::crc32_update;
use crate::{Error, ErrorKind, Result};

pub const MAGIC: [u8; 4] = *b"BLKM";
pub const PROTO_VERSION: u16 = 1;
/// Bytes of a header: magic, version, type, session, epoch, seq, payload length.
pub const HEADER_LEN: usize = 44;
/// Bytes of the CRC after the payload.
pub const TRAILER_LEN: usize = 4;
/// The payload bound of every control message (JSON).
pub const MAX_CONTROL: u32 = 64 * 1024;
/// The payload bound of a `DEVICE_STATE` chunk.
pub const MAX_CHUNK: u32 = 1024 * 1024;
/// The one message type whose payload is raw device state (bounded by [`MAX_CHUNK`]).
pub const DEVICE_STATE: u16 = 5;

/// The message types, numbered from 1 (the Python `Msg` enum has the same numbers).
const NAMES: [&str; 17] = [
    "HELLO",
    "HELLO_ACK",
    "REFUSE",
    "PREPARE_FAILED",
    "DEVICE_STATE",
    "DEVICE_STATE_DONE",
    "STATE_LOADED",
    "LOAD_FAILED",
    "SOURCE_INACTIVE",
    "DEST_ACTIVATED",
    "DEST_ACTIVATION_FAILED",
    "DEST_COMMITTED",
    "COMMIT_ACK",
    "ABORT",
    "ABORT_ACK",
    "PING",
    "PONG",
];

/// The name of a known message type.
pub fn type_name(msg_type: u16) -> Option<&'static str> {
    NAMES.get(usize::from(msg_type).checked_sub(1)?).copied()
}

/// The payload bound of a message type.
pub fn max_payload(msg_type: u16) -> u32 {
    if msg_type == DEVICE_STATE {
        MAX_CHUNK
    } else {
        MAX_CONTROL
    }
}

fn protocol(message: String) -> Error {
    Error::new(ErrorKind::Protocol, message)
}

/// The fields of a header. [`decode_header`] returns only headers that pass every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    pub version: u16,
    pub msg_type: u16,
    pub session: [u8; 16],
    pub epoch: u64,
    pub seq: u64,
    /// The payload's length in bytes.
    pub length: u32,
}

impl FrameHeader {
    /// A header of this side's protocol version.
    pub fn new(msg_type: u16, session: [u8; 16], epoch: u64, seq: u64, length: u32) -> Self {
        FrameHeader {
            version: PROTO_VERSION,
            msg_type,
            session,
            epoch,
            seq,
            length,
        }
    }

    /// The header's bytes (the fields as they are, checked or not).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_be_bytes());
        out[6..8].copy_from_slice(&self.msg_type.to_be_bytes());
        out[8..24].copy_from_slice(&self.session);
        out[24..32].copy_from_slice(&self.epoch.to_be_bytes());
        out[32..40].copy_from_slice(&self.seq.to_be_bytes());
        out[40..44].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The message type's name ("type N" when it is not a known one).
    pub fn type_name(&self) -> String {
        type_name(self.msg_type).map_or_else(|| format!("type {}", self.msg_type), str::to_string)
    }

    /// Version, known type and the payload bound of the type, in that order.
    pub fn check(&self) -> Result<()> {
        if self.version != PROTO_VERSION {
            return Err(protocol(format!(
                "unsupported protocol version {} (this side speaks {PROTO_VERSION})",
                self.version
            )));
        }
        let Some(name) = type_name(self.msg_type) else {
            return Err(protocol(format!("unknown message type {}", self.msg_type)));
        };
        if self.length > max_payload(self.msg_type) {
            return Err(protocol(format!(
                "{name} payload length {} is over the bound",
                self.length
            )));
        }
        Ok(())
    }

    /// Bytes of the whole frame: header, payload, CRC.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.length as usize + TRAILER_LEN
    }
}

/// `bytes` as Python's `repr` writes them (`b'XX\x00'`; double quotes when there is a single
/// quote and no double one), for messages about the magic.
fn bytes_repr(bytes: &[u8]) -> String {
    let quote = if bytes.contains(&b'\'') && !bytes.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::from("b");
    out.push(quote);
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\'' if quote == '\'' => out.push_str("\\'"),
            0x20..=0x7E => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push(quote);
    out
}

/// Parses and checks a header: exactly [`HEADER_LEN`] bytes; magic, version, known type and the
/// payload bound, in that order (the first failing check is the error).
pub fn decode_header(head: &[u8]) -> Result<FrameHeader> {
    let head: &[u8; HEADER_LEN] = head.try_into().map_err(|_| {
        protocol(format!(
            "a frame header is {HEADER_LEN} bytes, not {}",
            head.len()
        ))
    })?;
    if head[0..4] != MAGIC {
        return Err(protocol(format!("bad magic {}", bytes_repr(&head[0..4]))));
    }
    let u16_at = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let mut session = [0u8; 16];
    session.copy_from_slice(&head[8..24]);
    let header = FrameHeader {
        version: u16_at(4),
        msg_type: u16_at(6),
        session,
        epoch: u64_at(24),
        seq: u64_at(32),
        length: u32::from_be_bytes([head[40], head[41], head[42], head[43]]),
    };
    header.check()?;
    Ok(header)
}

/// The CRC of a frame: CRC-32/ISO-HDLC over the header's bytes and then the payload.
pub fn frame_crc(head: &[u8], payload: &[u8]) -> u32 {
    crc32_update(crc32_update(0, head), payload)
}

/// Checks a frame whose header passed [`decode_header`]: its header again, the payload's
/// length against the header's, and the CRC over both.
pub fn check_frame(header: &FrameHeader, payload: &[u8], crc: u32) -> Result<()> {
    header.check()?;
    if payload.len() != header.length as usize {
        return Err(protocol(format!(
            "{} payload of {} bytes, the header says {}",
            header.type_name(),
            payload.len(),
            header.length
        )));
    }
    if frame_crc(&header.encode(), payload) != crc {
        return Err(protocol(format!(
            "bad CRC in a {} frame",
            header.type_name()
        )));
    }
    Ok(())
}

/// A whole frame: header, payload and CRC. The header must pass its checks (an
/// [`InvalidArgument`](crate::ErrorKind::InvalidArgument) error otherwise: this side never
/// sends a frame it would refuse) and `payload` be `header.length` bytes.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Result<Vec<u8>> {
    if payload.len() != header.length as usize {
        return Err(Error::invalid(format!(
            "payload of {} bytes for a header that says {}",
            payload.len(),
            header.length
        )));
    }
    header
        .check()
        .map_err(|e| Error::invalid(e.message().to_string()))?;
    let head = header.encode();
    let mut out = Vec::with_capacity(header.frame_len());
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    out.extend_from_slice(&frame_crc(&head, payload).to_be_bytes());
    Ok(out)
}

/// What the start of a receive buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next<'a> {
    /// A checked frame; `used` bytes of the buffer are its.
    Frame {
        header: FrameHeader,
        payload: &'a [u8],
        used: usize,
    },
    /// Not a whole frame yet: the buffer must hold this many bytes (never more than a
    /// header, or than a frame whose header passed its checks).
    NeedMore(usize),
}

/// Parses the frame at the start of `buf`: the header is checked as soon as it is there, the
/// payload and CRC once the whole frame is.
pub fn decode_frame(buf: &[u8]) -> Result<Next<'_>> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(Next::NeedMore(HEADER_LEN));
    };
    let header = decode_header(head)?;
    let total = header.frame_len();
    let Some(frame) = buf.get(..total) else {
        return Ok(Next::NeedMore(total));
    };
    let payload = &frame[HEADER_LEN..total - TRAILER_LEN];
    let crc = u32::from_be_bytes([
        frame[total - 4],
        frame[total - 3],
        frame[total - 2],
        frame[total - 1],
    ]);
    check_frame(&header, payload, crc)?;
    Ok(Next::Frame {
        header,
        payload,
        used: total,
    })
}

/// Fuzz bytes → a stream of frames, shared by the cargo-fuzz target
/// (`fuzz/fuzz_targets/migration_frame.rs`) and the corpus replay test
/// (`tests/migration_frame_fuzz_corpus.rs`).
///
/// Input: one mode byte, then the stream. Mode bit 0 set: the CRC of every frame whose header
/// can be followed is recomputed first ([`repair_crcs`]), so that mutations reach the field
/// checks. Frames are then decoded one after the other until the stream ends, a frame is
/// incomplete or one is refused. What is checked: nothing panics, a refusal is a Protocol
/// error, a decoded frame re-encodes to exactly its bytes, and no frame is larger than its
/// type's bound.
pub mod fuzz {
    use super::*;

    /// Recomputes the CRC of each frame in `stream`, walking the length fields as far as they
    /// lead (a length beyond the input stops the walk; the header is not checked).
    pub fn repair_crcs(stream: &mut [u8]) {
        let mut at = 0usize;
        while let Some(head) = stream.get(at..at + HEADER_LEN) {
            let length = u32::from_be_bytes([head[40], head[41], head[42], head[43]]) as usize;
            let end = at + HEADER_LEN + length;
            if end + TRAILER_LEN > stream.len() {
                return;
            }
            let crc = frame_crc(&stream[at..at + HEADER_LEN], &stream[at + HEADER_LEN..end]);
            stream[end..end + TRAILER_LEN].copy_from_slice(&crc.to_be_bytes());
            at = end + TRAILER_LEN;
        }
    }

    /// Decodes the frames of one fuzz input; returns how many were accepted.
    pub fn replay(data: &[u8]) -> usize {
        let Some((&mode, rest)) = data.split_first() else {
            return 0;
        };
        let mut stream = rest.to_vec();
        if mode & 1 != 0 {
            repair_crcs(&mut stream);
        }
        let mut at = 0;
        let mut frames = 0;
        loop {
            match decode_frame(&stream[at..]) {
                Ok(Next::Frame {
                    header,
                    payload,
                    used,
                }) => {
                    assert!(payload.len() as u32 <= max_payload(header.msg_type));
                    assert!(type_name(header.msg_type).is_some());
                    let again = encode_frame(&header, payload).expect("a decoded frame encodes");
                    assert_eq!(
                        again,
                        stream[at..at + used],
                        "re-encoding changed the frame"
                    );
                    at += used;
                    frames += 1;
                }
                Ok(Next::NeedMore(n)) => {
                    assert!(n > stream.len() - at, "asked for bytes it has");
                    assert!(n <= HEADER_LEN + MAX_CHUNK as usize + TRAILER_LEN);
                    return frames;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
                    return frames;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: [u8; 16] = *b"0123456789abcdef";

    fn good(msg_type: u16, payload: &[u8]) -> Vec<u8> {
        encode_frame(
            &FrameHeader::new(msg_type, S, 2, 1, payload.len() as u32),
            payload,
        )
        .unwrap()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        e.to_string()
    }

    #[test]
    fn crc_is_zlib_crc32() {
        // CRC-32/ISO-HDLC check value
        assert_eq!(frame_crc(b"1234", b"56789"), 0xCBF4_3926);
        assert_eq!(frame_crc(b"", b""), 0);
    }

    #[test]
    fn round_trip_and_need_more() {
        let data = good(DEVICE_STATE, &[9; 1000]);
        for cut in 0..data.len() {
            let want = if cut < HEADER_LEN {
                HEADER_LEN
            } else {
                data.len()
            };
            assert_eq!(decode_frame(&data[..cut]).unwrap(), Next::NeedMore(want));
        }
        let mut two = data.clone();
        two.extend_from_slice(&data);
        let Next::Frame { header, used, .. } = decode_frame(&two).unwrap() else {
            panic!()
        };
        assert_eq!(used, data.len());
        assert_eq!(header.epoch, 2);
        assert_eq!(header.session, S);
    }

    #[test]
    fn every_check_has_its_message() {
        let d = good(16, b"{}");
        let mut m = d.clone();
        m[0..4].copy_from_slice(b"X\0'\\");
        assert_eq!(err(decode_frame(&m)), r#"bad magic b"X\x00'\\""#);
        m[0..4].copy_from_slice(b"'\t\n\x7f");
        assert_eq!(err(decode_frame(&m)), r#"bad magic b"'\t\n\x7f""#);
        m[0..4].copy_from_slice(b"'\"\r\xff");
        assert_eq!(err(decode_frame(&m)), r#"bad magic b'\'"\r\xff'"#);
        let mut m = d.clone();
        m[5] = 9;
        assert_eq!(
            err(decode_frame(&m)),
            "unsupported protocol version 9 (this side speaks 1)"
        );
        for t in [0u16, 18, 0xFFFF] {
            let mut m = d.clone();
            m[6..8].copy_from_slice(&t.to_be_bytes());
            assert_eq!(err(decode_frame(&m)), format!("unknown message type {t}"));
        }
        let mut m = d.clone();
        let n = d.len() - 1;
        m[n] ^= 1;
        assert_eq!(err(decode_frame(&m)), "bad CRC in a PING frame");
        let mut m = d.clone();
        m[HEADER_LEN] = b'[';
        assert_eq!(err(decode_frame(&m)), "bad CRC in a PING frame");
        assert!(err(decode_header(&d[..43])).contains("44 bytes, not 43"));
        let h = decode_header(&d[..HEADER_LEN]).unwrap();
        assert!(err(check_frame(&h, b"{", 0)).contains("payload of 1 bytes"));
    }

    #[test]
    fn bounds_are_checked_from_the_header_alone() {
        for (t, bound) in [(1u16, MAX_CONTROL), (DEVICE_STATE, MAX_CHUNK)] {
            let ok = FrameHeader::new(t, S, 0, 1, bound).encode();
            assert_eq!(decode_header(&ok).unwrap().length, bound);
            let over = FrameHeader::new(t, S, 0, 1, bound + 1).encode();
            let name = type_name(t).unwrap();
            assert_eq!(
                err(decode_frame(&over)),
                format!("{name} payload length {} is over the bound", bound + 1)
            );
            let e = encode_frame(
                &FrameHeader::new(t, S, 0, 1, bound + 1),
                &vec![0; bound as usize + 1],
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        }
        let huge = FrameHeader::new(1, S, 0, 1, u32::MAX).encode();
        assert!(err(decode_frame(&huge)).contains("over the bound"));
    }

    #[test]
    fn fuzz_replay_repairs_crcs() {
        let mut data = vec![0u8];
        data.extend_from_slice(&good(1, b"{\"a\":1}"));
        data.extend_from_slice(&good(DEVICE_STATE, &[1, 2, 3]));
        assert_eq!(fuzz::replay(&data), 2);
        data[HEADER_LEN + 2] ^= 0x40; // in the first payload: the CRC no longer matches
        assert_eq!(fuzz::replay(&data), 0);
        data[0] = 1;
        assert_eq!(fuzz::replay(&data), 2);
    }
}
