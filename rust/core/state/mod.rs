//! Device state for migration and snapshots: a versioned, length-framed, checksummed stream
//! ([`stream`]) with one section per device ([`ide`], [`virtio`], [`memory`]).
//!
//! Saving requires quiescent devices (stopped and drained: no backend work running, no
//! virtio request in flight); a PIO transfer waiting for the guest is saved. Loading is two
//! phases: every section is parsed and checked against the target devices first (kind,
//! name, instance, versions, every field's bounds, memory size, queue count, capacity,
//! geometry against a user geometry), and only then is anything applied, so a malformed,
//! truncated, tampered, newer or foreign stream raises a State error and changes nothing.
//! A section's name is the device's name; every device needs exactly one section.
//!
//! ```
//! # use std::sync::Arc;
//! # use blockemu_core::guest_memory::GuestMemory;
//! # use blockemu_core::state::{self, Device};
//! let src = GuestMemory::new(1 << 16).unwrap();
//! src.write(0x1000, b"hello").unwrap();
//! let data = state::save(&[("ram", Device::Memory(&src))]).unwrap();
//! let dst = GuestMemory::new(1 << 16).unwrap();
//! state::load(&[("ram", Device::Memory(&dst))], &data).unwrap();
//! let mut buf = [0u8; 5];
//! dst.read(0x1000, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! ```

pub mod crc;
pub mod fuzz;
pub mod ide;
pub mod memory;
pub mod stream;
pub mod virtio;

use crate::geometry::Geometry;
use crate::guest_memory::GuestMemory;
use crate::ide::IdeChannel;
use crate::virtio::VirtioBlk;
use crate::{Error, Result};
pub use stream::MAX_SECTION_SIZE;
use stream::{Section, SectionOut};

/// One device taking part in a save or load.
#[derive(Clone, Copy)]
pub enum Device<'a> {
    Ide(&'a IdeChannel),
    Virtio(&'a VirtioBlk),
    Memory(&'a GuestMemory),
}

impl Device<'_> {
    /// The section kind of this device.
    pub fn kind(&self) -> &'static str {
        match self {
            Device::Ide(_) => ide::KIND,
            Device::Virtio(_) => virtio::KIND,
            Device::Memory(_) => memory::KIND,
        }
    }

    fn version(&self) -> u32 {
        match self {
            Device::Ide(_) => ide::VERSION,
            Device::Virtio(_) => virtio::VERSION,
            Device::Memory(_) => memory::VERSION,
        }
    }
}

fn check_names(devices: &[(&str, Device<'_>)]) -> Result<()> {
    for (i, (name, _)) in devices.iter().enumerate() {
        if devices[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::invalid(format!(
                "device name {name:?} is given twice"
            )));
        }
    }
    Ok(())
}

/// Saves `devices` into one stream. Every device must be quiescent (else a State error
/// "device is running; stop it first" naming the device).
pub fn save(devices: &[(&str, Device<'_>)]) -> Result<Vec<u8>> {
    check_names(devices)?;
    // Capture everything first: a running device fails the save before any encoding.
    enum Captured {
        Ide(Box<ide::IdeImage>),
        Virtio(virtio::VirtioImage),
        Memory,
    }
    let mut captured = Vec::with_capacity(devices.len());
    for (name, dev) in devices {
        let c = match dev {
            Device::Ide(ch) => ide::capture(ch).map(|i| Captured::Ide(Box::new(i))),
            Device::Virtio(v) => v.capture().map(Captured::Virtio),
            Device::Memory(_) => Ok(Captured::Memory),
        }
        .map_err(|e| Error::state(format!("{name:?} ({}): {}", dev.kind(), e.message())))?;
        captured.push(c);
    }
    let mut sections = Vec::with_capacity(devices.len());
    for ((name, dev), c) in devices.iter().zip(captured) {
        let (fields, subsections) = match (c, dev) {
            (Captured::Ide(img), _) => ide::encode(&img),
            (Captured::Virtio(img), _) => virtio::encode(&img),
            (Captured::Memory, Device::Memory(m)) => (memory::save(m)?, Vec::new()),
            (Captured::Memory, _) => unreachable!("captured from a memory device"),
        };
        sections.push(SectionOut {
            name: (*name).to_string(),
            kind: dev.kind(),
            instance: 0,
            version: dev.version(),
            fields,
            subsections,
        });
    }
    stream::write(&sections)
}

/// A section checked against its device, ready to apply.
enum Prepared<'s, 'd> {
    Ide(&'d IdeChannel, Box<ide::IdeImage>, [Option<Geometry>; 2]),
    Virtio(&'d VirtioBlk, virtio::VirtioImage, Option<Geometry>),
    Memory(&'d GuestMemory, memory::MemoryImage<'s>),
}

fn prepare<'s, 'd>(sec: &Section<'s>, dev: Device<'d>) -> Result<Prepared<'s, 'd>> {
    if sec.kind != dev.kind() {
        return Err(Error::state(format!(
            "section {:?} is a {} state, but device {:?} here is a {}",
            sec.name,
            sec.kind,
            sec.name,
            dev.kind()
        )));
    }
    if sec.instance != 0 {
        return Err(Error::state(format!(
            "{}: unknown instance {} (this build writes instance 0 only)",
            sec.label(),
            sec.instance
        )));
    }
    if sec.version == 0 || sec.version > dev.version() {
        return Err(Error::state(format!(
            "{}: unsupported version {} (this build reads {} versions 1..={})",
            sec.label(),
            sec.version,
            dev.kind(),
            dev.version()
        )));
    }
    Ok(match dev {
        Device::Ide(ch) => {
            let img = ide::decode(sec)?;
            let install = ide::check_target(sec, &img, ch)?;
            Prepared::Ide(ch, Box::new(img), install)
        }
        Device::Virtio(v) => {
            let img = virtio::decode(sec)?;
            let install = virtio::check_target(sec, &img, v)?;
            Prepared::Virtio(v, img, install)
        }
        Device::Memory(m) => Prepared::Memory(m, memory::decode(sec, m)?),
    })
}

/// Loads a stream into `devices`: all or nothing (see the module docs).
pub fn load(devices: &[(&str, Device<'_>)], data: &[u8]) -> Result<()> {
    check_names(devices)?;
    let sections = stream::parse(data)?;
    let mut prepared = Vec::with_capacity(sections.len());
    for sec in &sections {
        let Some((_, dev)) = devices.iter().find(|(n, _)| *n == sec.name) else {
            let names: Vec<&str> = devices.iter().map(|(n, _)| *n).collect();
            return Err(Error::state(format!(
                "{}: no such device here (devices: {names:?}); the destination must have the \
                 same devices as the source",
                sec.label()
            )));
        };
        prepared.push(prepare(sec, *dev)?);
    }
    for (name, dev) in devices {
        if !sections.iter().any(|s| s.name == *name) {
            return Err(Error::state(format!(
                "the state has no section for device {name:?} ({})",
                dev.kind()
            )));
        }
    }
    // Guest RAM first: device state refers to it.
    for p in &prepared {
        if let Prepared::Memory(m, img) = p {
            img.apply(m)?;
        }
    }
    for p in prepared {
        match p {
            Prepared::Ide(ch, img, install) => ide::apply(&img, ch, &install),
            Prepared::Virtio(v, img, install) => virtio::apply(&img, v, install),
            Prepared::Memory(..) => {}
        }
    }
    Ok(())
}

/// One subsection as [`describe`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsectionInfo {
    pub name: String,
    pub version: u32,
    pub optional: bool,
    pub size: usize,
}

/// One section as [`describe`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    pub name: String,
    pub kind: String,
    pub instance: u32,
    pub version: u32,
    /// Bytes of the whole section record.
    pub size: usize,
    pub subsections: Vec<SubsectionInfo>,
}

/// The sections of a stream (framing and CRCs checked, device fields not decoded).
pub fn describe(data: &[u8]) -> Result<Vec<SectionInfo>> {
    Ok(stream::parse(data)?
        .into_iter()
        .map(|s| SectionInfo {
            name: s.name,
            kind: s.kind,
            instance: s.instance,
            version: s.version,
            size: s.size,
            subsections: s
                .subsections
                .iter()
                .map(|x| SubsectionInfo {
                    name: x.name.clone(),
                    version: x.version,
                    optional: x.optional,
                    size: x.data.len(),
                })
                .collect(),
        })
        .collect())
}
