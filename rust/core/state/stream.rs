//! The device-state stream: our own versioned, self-describing, checksummed encoding (the
//! ideas of QEMU's migration stream, not its bytes).
//!
//! ```text
//! stream     = header section* end
//! header     = magic "BEMUSTAT" (8 bytes) | format version u32 (= 1)
//! section    = 0x53 'S'
//!              | name (u8 length 1..=64, printable ASCII)      the device's name
//!              | kind (u8 length 1..=64, printable ASCII)      "ide", "virtio-blk", "memory"
//!              | instance u32 | version u32
//!              | body length u64 (<= MAX_SECTION_SIZE and <= the bytes left)
//!              | body
//!              | CRC-32C u32 of everything from the 0x53 tag to the end of the body
//! body       = fields length u32 | fields
//!              | subsection count u16 (<= MAX_SUBSECTIONS)
//!              | subsection*                                    (exactly fills the body)
//! subsection = name (u8 length 1..=64) | version u32 | flags u8 (bit 0: optional; others 0)
//!              | length u32 | bytes
//! end        = 0x45 'E' | section count u32 | CRC-32C u32 of the whole stream before it
//! ```
//!
//! All integers are little-endian. Fields are fixed-order per (kind, version); a device's
//! decoder names every field it reads, so an error says which section, which field and what
//! was expected. The reader treats its input as hostile: every length is checked against its
//! bound and against the bytes left before anything is sliced or allocated; a section name
//! appears once; nothing may follow the end record. A subsection the reader does not know is
//! skipped only if it is marked optional (QEMU's rule: an unknown mandatory one fails). A
//! section or subsection version newer than the reader's is refused.
//!
//! Bounds: [`MAX_NAME_LEN`] for names and kinds, [`MAX_SECTIONS`] sections,
//! [`MAX_SUBSECTIONS`] subsections per section, [`MAX_SECTION_SIZE`] bytes per section body,
//! and per field what the device decoders document (byte strings carry their own maximum).

use super::crc::crc32c;
use crate::{Error, Result};

/// "BEMUSTAT": blockemu device state.
pub const MAGIC: [u8; 8] = *b"BEMUSTAT";
/// The stream format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest section, kind or subsection name.
pub const MAX_NAME_LEN: usize = 64;
/// Most sections in one stream.
pub const MAX_SECTIONS: usize = 256;
/// Most subsections in one section.
pub const MAX_SUBSECTIONS: usize = 32;
/// Largest section body (guest RAM is the big one: 16 GiB).
pub const MAX_SECTION_SIZE: u64 = 16 << 30;

const TAG_SECTION: u8 = 0x53;
const TAG_END: u8 = 0x45;
const HEADER_LEN: usize = 12;

fn err(msg: impl Into<String>) -> Error {
    Error::state(msg)
}

// ---- writing --------------------------------------------------------------------------

/// Fixed-order fields of a section or subsection.
#[derive(Debug, Default, Clone)]
pub struct Enc {
    pub buf: Vec<u8>,
}

impl Enc {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// u32 length, then the bytes.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
    }
    /// Raw bytes whose length the reader knows.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
}

/// One subsection to write.
#[derive(Debug, Clone)]
pub struct SubsectionOut {
    pub name: String,
    pub version: u32,
    pub optional: bool,
    pub data: Vec<u8>,
}

/// One section to write.
#[derive(Debug, Clone)]
pub struct SectionOut {
    pub name: String,
    pub kind: &'static str,
    pub instance: u32,
    pub version: u32,
    pub fields: Vec<u8>,
    pub subsections: Vec<SubsectionOut>,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name.bytes().all(|b| (0x20..0x7F).contains(&b))
    {
        return Err(Error::invalid(format!(
            "{what} {name:?} must be 1 to {MAX_NAME_LEN} printable ASCII characters"
        )));
    }
    Ok(())
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// Encodes a whole stream.
pub fn write(sections: &[SectionOut]) -> Result<Vec<u8>> {
    if sections.len() > MAX_SECTIONS {
        return Err(Error::invalid(format!(
            "at most {MAX_SECTIONS} devices fit in one state stream, got {}",
            sections.len()
        )));
    }
    let mut out = Vec::with_capacity(
        64 + sections
            .iter()
            .map(|s| {
                s.fields.len()
                    + s.subsections
                        .iter()
                        .map(|x| x.data.len() + 80)
                        .sum::<usize>()
            })
            .sum::<usize>(),
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for s in sections {
        check_name("device name", &s.name)?;
        if s.subsections.len() > MAX_SUBSECTIONS {
            return Err(Error::invalid("too many subsections"));
        }
        let start = out.len();
        out.push(TAG_SECTION);
        put_name(&mut out, &s.name);
        put_name(&mut out, s.kind);
        out.extend_from_slice(&s.instance.to_le_bytes());
        out.extend_from_slice(&s.version.to_le_bytes());
        let len_at = out.len();
        out.extend_from_slice(&0u64.to_le_bytes());
        let body_at = out.len();
        if s.fields.len() > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "state of {:?} is too large",
                s.name
            )));
        }
        out.extend_from_slice(&(s.fields.len() as u32).to_le_bytes());
        out.extend_from_slice(&s.fields);
        out.extend_from_slice(&(s.subsections.len() as u16).to_le_bytes());
        for sub in &s.subsections {
            check_name("subsection name", &sub.name)?;
            if sub.data.len() > u32::MAX as usize {
                return Err(Error::invalid(format!(
                    "state of {:?} is too large",
                    s.name
                )));
            }
            put_name(&mut out, &sub.name);
            out.extend_from_slice(&sub.version.to_le_bytes());
            out.push(u8::from(sub.optional));
            out.extend_from_slice(&(sub.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&sub.data);
        }
        let body_len = (out.len() - body_at) as u64;
        if body_len > MAX_SECTION_SIZE {
            return Err(Error::invalid(format!(
                "state of {:?} is {body_len} bytes, more than the {MAX_SECTION_SIZE} a section holds",
                s.name
            )));
        }
        out[len_at..len_at + 8].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c(&out);
    out.push(TAG_END);
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

// ---- reading --------------------------------------------------------------------------

/// A bounds-checked cursor; `what` names the place for error messages.
#[derive(Debug, Clone)]
pub struct Dec<'a> {
    data: &'a [u8],
    pos: usize,
    what: String,
}

impl<'a> Dec<'a> {
    pub fn new(data: &'a [u8], what: impl Into<String>) -> Self {
        Dec {
            data,
            pos: 0,
            what: what.into(),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn left(&self) -> usize {
        self.data.len() - self.pos
    }

    /// A StateError about `field` of this place.
    pub fn error(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        err(format!("{}: field {field}: {msg}", self.what))
    }

    pub fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(self.error(
                field,
                format!(
                    "truncated: needs {n} bytes at offset {}, {} left",
                    self.pos,
                    self.left()
                ),
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        Ok(self.take(N, field)?.try_into().expect("N bytes"))
    }

    pub fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    pub fn u16(&mut self, field: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    pub fn bool(&mut self, field: &str) -> Result<bool> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.error(field, format!("expected 0 or 1, got {v}"))),
        }
    }
    /// A u8 that must be `<= max`.
    pub fn u8_max(&mut self, field: &str, max: u8) -> Result<u8> {
        let v = self.u8(field)?;
        if v > max {
            return Err(self.error(field, format!("expected at most {max}, got {v}")));
        }
        Ok(v)
    }
    /// A u32 that must lie in `lo..=hi`.
    pub fn u32_in(&mut self, field: &str, lo: u32, hi: u32) -> Result<u32> {
        let v = self.u32(field)?;
        if v < lo || v > hi {
            return Err(self.error(field, format!("expected {lo}..={hi}, got {v}")));
        }
        Ok(v)
    }
    /// A u32 length (at most `max`), then that many bytes.
    pub fn bytes(&mut self, field: &str, max: usize) -> Result<&'a [u8]> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(self.error(field, format!("length {n} is more than the maximum {max}")));
        }
        self.take(n, field)
    }
    fn name(&mut self, field: &str) -> Result<String> {
        let n = usize::from(self.u8(field)?);
        if n == 0 || n > MAX_NAME_LEN {
            return Err(self.error(
                field,
                format!("name length {n} is not in 1..={MAX_NAME_LEN}"),
            ));
        }
        let raw = self.take(n, field)?;
        if !raw.iter().all(|b| (0x20..0x7F).contains(b)) {
            return Err(self.error(field, "name is not printable ASCII"));
        }
        Ok(String::from_utf8_lossy(raw).into_owned())
    }
    /// Nothing may be left.
    pub fn finish(&self) -> Result<()> {
        if self.left() != 0 {
            return Err(err(format!(
                "{}: {} unexpected trailing bytes after the last field",
                self.what,
                self.left()
            )));
        }
        Ok(())
    }
}

/// One parsed subsection.
#[derive(Debug, Clone)]
pub struct Subsection<'a> {
    pub name: String,
    pub version: u32,
    pub optional: bool,
    pub data: &'a [u8],
}

/// One parsed, CRC-checked section.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    pub name: String,
    pub kind: String,
    pub instance: u32,
    pub version: u32,
    /// Size of the whole section record in the stream.
    pub size: usize,
    pub fields: &'a [u8],
    pub subsections: Vec<Subsection<'a>>,
}

impl<'a> Section<'a> {
    /// "section 'disk0' (ide v1)", for messages.
    pub fn label(&self) -> String {
        format!("section {:?} ({} v{})", self.name, self.kind, self.version)
    }

    /// A decoder of the fields.
    pub fn fields(&self) -> Dec<'a> {
        Dec::new(self.fields, self.label())
    }

    /// The subsections this reader knows (`(name, newest version)`), by position in `known`:
    /// an unknown optional one is skipped; an unknown mandatory one, a newer version or a
    /// repeated name is an error.
    pub fn subsections(&self, known: &[(&str, u32)]) -> Result<Vec<Option<Dec<'a>>>> {
        let mut out: Vec<Option<Dec<'a>>> = vec![None; known.len()];
        for sub in &self.subsections {
            match known.iter().position(|(n, _)| *n == sub.name) {
                Some(i) => {
                    let max = known[i].1;
                    if sub.version == 0 || sub.version > max {
                        return Err(err(format!(
                            "{}: unsupported version {} of subsection {:?} (this build reads 1..={max})",
                            self.label(),
                            sub.version,
                            sub.name
                        )));
                    }
                    if out[i].is_some() {
                        return Err(err(format!(
                            "{}: subsection {:?} appears twice",
                            self.label(),
                            sub.name
                        )));
                    }
                    out[i] = Some(Dec::new(
                        sub.data,
                        format!("{} subsection {:?}", self.label(), sub.name),
                    ));
                }
                None if sub.optional => {}
                None => {
                    return Err(err(format!(
                        "{}: unknown mandatory subsection {:?} v{}",
                        self.label(),
                        sub.name,
                        sub.version
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// Parses and checks the framing of a whole stream (header, every section's CRC, names
/// unique, the end record, nothing after it). Device fields are checked by their decoders.
pub fn parse(data: &[u8]) -> Result<Vec<Section<'_>>> {
    if data.len() < HEADER_LEN {
        return Err(err(format!(
            "device state truncated: {} bytes, the header alone is {HEADER_LEN}",
            data.len()
        )));
    }
    if data[..8] != MAGIC {
        return Err(err(format!(
            "not a blockemu device state stream: bad magic {:02x?} (expected \"BEMUSTAT\")",
            &data[..8]
        )));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(err(format!(
            "unsupported device state stream version {version} (this build reads version {FORMAT_VERSION})"
        )));
    }
    let mut d = Dec::new(data, "device state stream");
    d.pos = HEADER_LEN;
    let mut sections: Vec<Section<'_>> = Vec::new();
    loop {
        let at = d.pos;
        let tag = d.u8("record tag").map_err(|_| {
            err(format!(
                "device state truncated after {} sections: no end record",
                sections.len()
            ))
        })?;
        match tag {
            TAG_SECTION => {
                if sections.len() >= MAX_SECTIONS {
                    return Err(err(format!(
                        "device state has more than {MAX_SECTIONS} sections"
                    )));
                }
                let s = parse_section(&mut d, at, sections.len())?;
                if sections.iter().any(|o| o.name == s.name) {
                    return Err(err(format!(
                        "device state has two sections for {:?}",
                        s.name
                    )));
                }
                sections.push(s);
            }
            TAG_END => {
                let mut e = Dec::new(&data[d.pos..], "end record");
                let count = e.u32("section count").map_err(|_| truncated_end())?;
                let crc = e.u32("stream CRC").map_err(|_| truncated_end())?;
                if count as usize != sections.len() {
                    return Err(err(format!(
                        "end record: field section count: expected {}, got {count}",
                        sections.len()
                    )));
                }
                let want = crc32c(&data[..at]);
                if crc != want {
                    return Err(err(format!(
                        "end record: stream CRC mismatch (stored {crc:#010x}, computed {want:#010x})"
                    )));
                }
                if e.left() != 0 {
                    return Err(err(format!(
                        "{} bytes of trailing garbage after the end record",
                        e.left()
                    )));
                }
                return Ok(sections);
            }
            t => {
                return Err(err(format!(
                    "unknown record tag {t:#04x} at offset {at} (expected a section 0x53 or the end 0x45)"
                )))
            }
        }
    }
}

fn truncated_end() -> Error {
    err("device state truncated in the end record")
}

fn parse_section<'a>(d: &mut Dec<'a>, start: usize, index: usize) -> Result<Section<'a>> {
    d.what = format!("section #{index} header");
    let name = d.name("name")?;
    d.what = format!("section #{index} ({name:?}) header");
    let kind = d.name("kind")?;
    let instance = d.u32("instance")?;
    let version = d.u32("version")?;
    let body_len = d.u64("body length")?;
    if body_len > MAX_SECTION_SIZE {
        return Err(d.error(
            "body length",
            format!("{body_len} is more than the maximum {MAX_SECTION_SIZE}"),
        ));
    }
    let body = d.take(body_len as usize, "body")?;
    let end = d.pos;
    let crc = d.u32("CRC")?;
    let want = crc32c(&d.data[start..end]);
    d.what = "device state stream".into();
    let label = format!("section {name:?} ({kind} v{version})");
    if crc != want {
        return Err(err(format!(
            "{label}: CRC mismatch (stored {crc:#010x}, computed {want:#010x}): the state is corrupt"
        )));
    }
    let mut b = Dec::new(body, label.clone());
    let fields = b.bytes("fields", body.len())?;
    let count = usize::from(b.u16("subsection count")?);
    if count > MAX_SUBSECTIONS {
        return Err(b.error(
            "subsection count",
            format!("{count} is more than the maximum {MAX_SUBSECTIONS}"),
        ));
    }
    let mut subsections = Vec::with_capacity(count);
    for i in 0..count {
        let sname = b.name(&format!("subsection {i} name"))?;
        let sversion = b.u32(&format!("subsection {sname:?} version"))?;
        let flags = b.u8(&format!("subsection {sname:?} flags"))?;
        if flags & !1 != 0 {
            return Err(b.error(
                &format!("subsection {sname:?} flags"),
                format!("unknown flag bits {flags:#04x}"),
            ));
        }
        let data = b.bytes(&format!("subsection {sname:?} data"), body.len())?;
        subsections.push(Subsection {
            name: sname,
            version: sversion,
            optional: flags & 1 != 0,
            data,
        });
    }
    b.finish()?;
    Ok(Section {
        name,
        kind,
        instance,
        version,
        size: end + 4 - start,
        fields,
        subsections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn sample() -> Vec<u8> {
        let mut f = Enc::default();
        f.u32(7);
        f.bytes(b"abc");
        write(&[SectionOut {
            name: "dev".into(),
            kind: "test",
            instance: 0,
            version: 1,
            fields: f.buf,
            subsections: vec![SubsectionOut {
                name: "extra".into(),
                version: 1,
                optional: true,
                data: vec![1, 2, 3],
            }],
        }])
        .unwrap()
    }

    #[test]
    fn round_trip_and_every_corruption_is_a_state_error() {
        let s = sample();
        let p = parse(&s).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].name.as_str(), p[0].kind.as_str()), ("dev", "test"));
        let mut f = p[0].fields();
        assert_eq!(f.u32("x").unwrap(), 7);
        assert_eq!(f.bytes("y", 3).unwrap(), b"abc");
        f.finish().unwrap();
        assert_eq!(p[0].subsections[0].data, &[1, 2, 3]);
        for n in 0..s.len() {
            assert_eq!(
                parse(&s[..n]).unwrap_err().kind(),
                ErrorKind::State,
                "prefix {n}"
            );
        }
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x01;
            assert_eq!(parse(&t).unwrap_err().kind(), ErrorKind::State, "flip {i}");
        }
        let mut t = s.clone();
        t.push(0);
        assert!(parse(&t)
            .unwrap_err()
            .message()
            .contains("trailing garbage"));
    }

    #[test]
    fn unknown_subsections_follow_the_optional_rule() {
        let s = sample();
        let p = parse(&s).unwrap();
        let subs = p[0].subsections(&[]).unwrap();
        assert!(subs.is_empty(), "optional unknown is skipped");
        let mut sec = p[0].clone();
        sec.subsections[0].optional = false;
        let e = sec.subsections(&[]).unwrap_err();
        assert!(e.message().contains("unknown mandatory subsection"), "{e}");
        let e = sec.subsections(&[("extra", 0)]).unwrap_err();
        assert!(e.message().contains("unsupported version 1"), "{e}");
    }

    /// The record of one section named `name` (as `write` frames it).
    fn record(name: &str) -> Vec<u8> {
        let s = write(&[SectionOut {
            name: name.into(),
            kind: "test",
            instance: 0,
            version: 1,
            fields: vec![1, 2],
            subsections: vec![],
        }])
        .unwrap();
        s[HEADER_LEN..s.len() - 9].to_vec()
    }

    fn framed(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        for r in records {
            out.extend_from_slice(r);
        }
        let crc = crc32c(&out);
        out.push(TAG_END);
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn bounds_are_enforced() {
        let many: Vec<Vec<u8>> = (0..=MAX_SECTIONS)
            .map(|i| record(&format!("d{i}")))
            .collect();
        assert_eq!(
            parse(&framed(&many[..MAX_SECTIONS])).unwrap().len(),
            MAX_SECTIONS
        );
        let e = parse(&framed(&many)).unwrap_err();
        assert!(e.message().contains("more than 256 sections"), "{e}");
        let e = parse(&framed(&[record("a"), record("a")])).unwrap_err();
        assert!(e.message().contains("two sections for \"a\""), "{e}");
        // A name longer than the bound, and an empty one.
        let mut long = record("x");
        long[1] = (MAX_NAME_LEN + 1) as u8;
        let e = parse(&framed(&[long])).unwrap_err();
        assert!(e.message().contains("name length 65"), "{e}");
        let mut empty = record("x");
        empty[1] = 0;
        assert!(parse(&framed(&[empty])).is_err());
        // A body length beyond the bound is refused before anything is sliced.
        let mut huge = record("x");
        let at = 1 + 2 + 1 + 4 + 8;
        huge[at..at + 8].copy_from_slice(&(MAX_SECTION_SIZE + 1).to_le_bytes());
        let e = parse(&framed(&[huge])).unwrap_err();
        assert!(e.message().contains("body length"), "{e}");
        assert!(write(&[SectionOut {
            name: "bad name\n".into(),
            kind: "test",
            instance: 0,
            version: 1,
            fields: vec![],
            subsections: vec![],
        }])
        .is_err());
    }
}
