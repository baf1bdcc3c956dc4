//! IDE channel state: both drive slots (geometry and translation, task file with HOB, status,
//! error, IDENTIFY buffer, multiple count, write cache, INITIALIZE DEVICE PARAMETERS shape,
//! SMART), the selected unit, Device Control, the IRQ line; subsections for a PIO transfer in
//! progress ("pio0"/"pio1"), the bus master ("bmdma") and a pending soft reset ("srst").
//!
//! Not carried: the read-ahead cache (data read from the image; the destination reads again
//! after activation), command sequences and generations (the destination voids its own), the
//! interrupt counter (a test statistic) and configuration (serial, model: the destination's
//! own, as in QEMU; what the guest saw of them travels in the IDENTIFY buffer).
//!
//! Fields of version 1, in order: unit u8 (0..=1) | ctrl u8 | irq bool | has bus master bool
//! | for each of the two drives: present bool | capacity u64 (sectors) | geometry known bool
//! | cyls u32 | heads u32 | secs u32 | translation u8 (none, lba, large, rechs) | feature u8
//! | error u8 | nsector u32 (<= 65536) | sector, lcyl, hcyl, hob_feature, hob_nsector,
//! hob_sector, hob_lcyl, hob_hcyl, select (0xA0 bits set), status u8 | lba48 bool
//! | req_nb_sectors u32 (1..=16) | mult_sectors u32 (0 or a power of two <= 16)
//! | identify_set bool | identify 512 bytes | write_cache bool | chs override bool | heads u32
//! (1..=16) | secs u32 (1..=255) | reset_reverts, smart_enabled, smart_autosave bool
//! | smart self-test count u8 (<= 21) | self-test log 512 bytes.
//!
//! Subsections: "pio<unit>" v1 = end of block u8 (idle, stop, sector read, sector write)
//! | buffer (u32 length <= 8192, even) | position u32 (<= length, even); "bmdma" v1 = cmd u8
//! | status u8 | PRD table address u32 | current PRD address u32 | pending bool | unit u8
//! | kind u8 (read, write, trim); "srst" v1 = nanoseconds left u64 (<= SRST_DELAY).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stream::{Dec, Enc, Section, SubsectionOut};
use crate::geometry::{DeviceKind, Geometry, Guess, GuessSource, Translation, TranslationSource};
use crate::ide::addressing::ChsShape;
use crate::ide::channel::{ChannelState, Drive, SRST_DELAY};
use crate::ide::dma::{BusMaster, DmaKind};
use crate::ide::identify::MAX_MULT_SECTORS;
use crate::ide::pio::{EndOfBlock, PioTransfer};
use crate::ide::regs::{TaskFile, BSY, DEV_ALWAYS_ON};
use crate::ide::{IdeChannel, IdeDisk};
use crate::{Error, Result};

pub const KIND: &str = "ide";
pub const VERSION: u32 = 1;
/// Largest PIO block: READ/WRITE MULTIPLE with the largest multiple count.
pub const MAX_PIO_BUF: usize = MAX_MULT_SECTORS as usize * 512;
const SMART_LOG_LEN: usize = 512;
const MAX_SELFTESTS: u8 = 21;

const SUBSECTIONS: [(&str, u32); 4] = [("pio0", 1), ("pio1", 1), ("bmdma", 1), ("srst", 1)];

/// One drive slot as it travels.
#[derive(Debug, Clone, PartialEq)]
pub struct DriveImage {
    pub present: bool,
    pub capacity: u64,
    pub geometry: Option<Geometry>,
    pub tf: TaskFile,
    pub req_nb_sectors: u32,
    pub mult_sectors: u32,
    pub identify_set: bool,
    pub identify: [u16; 256],
    pub write_cache: bool,
    pub chs_override: Option<ChsShape>,
    pub reset_reverts: bool,
    pub smart_enabled: bool,
    pub smart_autosave: bool,
    pub smart_selftests: u8,
    pub smart_selftest_log: Vec<u8>,
    pub pio: PioTransfer,
}

/// The channel as it travels.
#[derive(Debug, Clone, PartialEq)]
pub struct IdeImage {
    pub drives: [DriveImage; 2],
    pub unit: usize,
    pub ctrl: u8,
    pub irq: bool,
    pub bm: Option<BusMaster>,
    pub srst_left: Option<Duration>,
}

fn running() -> Error {
    Error::state("device is running; stop it first")
}

fn trans_code(t: Translation) -> u8 {
    match t {
        Translation::None => 0,
        Translation::Lba => 1,
        Translation::Large => 2,
        Translation::Rechs => 3,
    }
}

fn eob_code(e: EndOfBlock) -> u8 {
    match e {
        EndOfBlock::Idle => 0,
        EndOfBlock::Stop => 1,
        EndOfBlock::SectorRead => 2,
        EndOfBlock::SectorWrite => 3,
    }
}

fn kind_code(k: DmaKind) -> u8 {
    match k {
        DmaKind::Read => 0,
        DmaKind::Write => 1,
        DmaKind::Trim => 2,
    }
}

/// Takes the channel's state for saving; refused while backend work runs (a PIO transfer
/// waiting for the guest is not backend work).
pub fn capture(ch: &IdeChannel) -> Result<IdeImage> {
    let (st, srst_left, in_flight) = ch.freeze();
    if in_flight > 0 || st.bm.as_ref().is_some_and(|b| b.busy) {
        return Err(running());
    }
    for d in &st.drives {
        // BSY without a pending reset means a command waits for storage.
        let busy = d.tf.status & BSY != 0 && st.reset_due.is_none();
        if busy || d.pending.is_some() || d.read_ahead.fetching || d.read_ahead.waiting {
            return Err(running());
        }
    }
    Ok(image_of(&st, srst_left))
}

fn image_of(st: &ChannelState, srst_left: Option<Duration>) -> IdeImage {
    let drive = |d: &Drive| DriveImage {
        present: d.present,
        capacity: d.total_sectors(),
        geometry: d.disk.as_ref().and_then(|k| k.geometry()),
        tf: d.tf,
        req_nb_sectors: d.req_nb_sectors,
        mult_sectors: d.mult_sectors,
        identify_set: d.identify_set,
        identify: d.identify,
        write_cache: d.write_cache,
        chs_override: d.chs_override,
        reset_reverts: d.reset_reverts,
        smart_enabled: d.smart_enabled,
        smart_autosave: d.smart_autosave,
        smart_selftests: d.smart_selftests,
        smart_selftest_log: d.smart_selftest_log.clone(),
        pio: d.pio.clone(),
    };
    IdeImage {
        drives: [drive(&st.drives[0]), drive(&st.drives[1])],
        unit: st.unit,
        ctrl: st.ctrl,
        irq: st.irq,
        bm: st.bm.clone(),
        srst_left,
    }
}

/// Encodes an image: (fields, subsections).
pub fn encode(img: &IdeImage) -> (Vec<u8>, Vec<SubsectionOut>) {
    let mut e = Enc::default();
    e.u8(img.unit as u8);
    e.u8(img.ctrl);
    e.bool(img.irq);
    e.bool(img.bm.is_some());
    let mut subs = Vec::new();
    for (unit, d) in img.drives.iter().enumerate() {
        e.bool(d.present);
        e.u64(d.capacity);
        e.bool(d.geometry.is_some());
        let g = d.geometry.unwrap_or(Geometry {
            cyls: 0,
            heads: 0,
            secs: 0,
            trans: Translation::None,
        });
        e.u32(g.cyls);
        e.u32(g.heads);
        e.u32(g.secs);
        e.u8(trans_code(g.trans));
        let tf = &d.tf;
        e.u8(tf.feature);
        e.u8(tf.error);
        e.u32(tf.nsector);
        for v in [
            tf.sector,
            tf.lcyl,
            tf.hcyl,
            tf.hob_feature,
            tf.hob_nsector,
            tf.hob_sector,
            tf.hob_lcyl,
            tf.hob_hcyl,
            tf.select,
            tf.status,
        ] {
            e.u8(v);
        }
        e.bool(tf.lba48);
        e.u32(d.req_nb_sectors);
        e.u32(d.mult_sectors);
        e.bool(d.identify_set);
        for w in d.identify {
            e.u16(w);
        }
        e.bool(d.write_cache);
        e.bool(d.chs_override.is_some());
        let o = d.chs_override.unwrap_or(ChsShape { heads: 0, secs: 0 });
        e.u32(o.heads);
        e.u32(o.secs);
        e.bool(d.reset_reverts);
        e.bool(d.smart_enabled);
        e.bool(d.smart_autosave);
        e.u8(d.smart_selftests);
        e.raw(&d.smart_selftest_log);
        if !d.pio.buf.is_empty() || d.pio.end_of_block != EndOfBlock::Idle {
            let mut p = Enc::default();
            p.u8(eob_code(d.pio.end_of_block));
            p.bytes(&d.pio.buf);
            p.u32(d.pio.pos as u32);
            subs.push(SubsectionOut {
                name: format!("pio{unit}"),
                version: 1,
                optional: false,
                data: p.buf,
            });
        }
    }
    if let Some(bm) = &img.bm {
        let mut b = Enc::default();
        b.u8(bm.cmd);
        b.u8(bm.status);
        b.u32(bm.addr);
        b.u32(bm.cur_addr);
        b.bool(bm.pending.is_some());
        let (unit, kind) = bm.pending.unwrap_or((0, DmaKind::Read));
        b.u8(unit as u8);
        b.u8(kind_code(kind));
        subs.push(SubsectionOut {
            name: "bmdma".into(),
            version: 1,
            optional: false,
            data: b.buf,
        });
    }
    if let Some(left) = img.srst_left {
        let mut s = Enc::default();
        s.u64(left.as_nanos().min(u128::from(u64::MAX)) as u64);
        subs.push(SubsectionOut {
            name: "srst".into(),
            version: 1,
            optional: false,
            data: s.buf,
        });
    }
    (e.buf, subs)
}

fn decode_drive(d: &mut Dec<'_>, unit: usize) -> Result<DriveImage> {
    let f = |name: &str| format!("drive {unit} {name}");
    let present = d.bool(&f("present"))?;
    let capacity = d.u64(&f("capacity"))?;
    let known = d.bool(&f("geometry known"))?;
    let cyls = d.u32(&f("cylinders"))?;
    let heads = d.u32(&f("heads"))?;
    let secs = d.u32(&f("sectors per track"))?;
    let trans = match d.u8_max(&f("translation"), 3)? {
        0 => Translation::None,
        1 => Translation::Lba,
        2 => Translation::Large,
        _ => Translation::Rechs,
    };
    let geometry = if known {
        if let Err(e) = DeviceKind::Ide.limits().check(cyls, heads, secs) {
            return Err(d.error(
                &f("geometry"),
                format!("{cyls}/{heads}/{secs}: {}", e.message()),
            ));
        }
        Some(Geometry {
            cyls,
            heads,
            secs,
            trans,
        })
    } else {
        if cyls != 0 || heads != 0 || secs != 0 || trans != Translation::None {
            return Err(d.error(&f("geometry"), "values given for an unknown geometry"));
        }
        None
    };
    let mut tf = TaskFile {
        feature: d.u8(&f("feature"))?,
        error: d.u8(&f("error"))?,
        nsector: d.u32_in(&f("nsector"), 0, 65536)?,
        ..TaskFile::default()
    };
    tf.sector = d.u8(&f("sector"))?;
    tf.lcyl = d.u8(&f("lcyl"))?;
    tf.hcyl = d.u8(&f("hcyl"))?;
    tf.hob_feature = d.u8(&f("hob_feature"))?;
    tf.hob_nsector = d.u8(&f("hob_nsector"))?;
    tf.hob_sector = d.u8(&f("hob_sector"))?;
    tf.hob_lcyl = d.u8(&f("hob_lcyl"))?;
    tf.hob_hcyl = d.u8(&f("hob_hcyl"))?;
    tf.select = d.u8(&f("select"))?;
    if tf.select & DEV_ALWAYS_ON != DEV_ALWAYS_ON {
        return Err(d.error(
            &f("select"),
            format!("bits 0xA0 must be set, got {:#04x}", tf.select),
        ));
    }
    tf.status = d.u8(&f("status"))?;
    tf.lba48 = d.bool(&f("lba48"))?;
    let req_nb_sectors = d.u32_in(&f("req_nb_sectors"), 1, MAX_MULT_SECTORS)?;
    let mult_sectors = d.u32_in(&f("mult_sectors"), 0, MAX_MULT_SECTORS)?;
    if mult_sectors != 0 && !mult_sectors.is_power_of_two() {
        return Err(d.error(
            &f("mult_sectors"),
            format!("{mult_sectors} is not a power of two"),
        ));
    }
    let identify_set = d.bool(&f("identify_set"))?;
    let mut identify = [0u16; 256];
    for (i, w) in identify.iter_mut().enumerate() {
        *w = d.u16(&f(&format!("identify word {i}")))?;
    }
    let write_cache = d.bool(&f("write_cache"))?;
    let has_override = d.bool(&f("chs override"))?;
    let oh = d.u32(&f("chs override heads"))?;
    let os = d.u32(&f("chs override sectors"))?;
    let chs_override = if has_override {
        if !(1..=16).contains(&oh) || !(1..=255).contains(&os) {
            return Err(d.error(
                &f("chs override"),
                format!("heads {oh} (1..=16) / sectors {os} (1..=255)"),
            ));
        }
        Some(ChsShape {
            heads: oh,
            secs: os,
        })
    } else {
        None
    };
    let reset_reverts = d.bool(&f("reset_reverts"))?;
    let smart_enabled = d.bool(&f("smart_enabled"))?;
    let smart_autosave = d.bool(&f("smart_autosave"))?;
    let smart_selftests = d.u8_max(&f("smart self-test count"), MAX_SELFTESTS)?;
    let smart_selftest_log = d.take(SMART_LOG_LEN, &f("smart self-test log"))?.to_vec();
    Ok(DriveImage {
        present,
        capacity,
        geometry,
        tf,
        req_nb_sectors,
        mult_sectors,
        identify_set,
        identify,
        write_cache,
        chs_override,
        reset_reverts,
        smart_enabled,
        smart_autosave,
        smart_selftests,
        smart_selftest_log,
        pio: PioTransfer::default(),
    })
}

fn decode_pio(mut p: Dec<'_>) -> Result<PioTransfer> {
    let end_of_block = match p.u8_max("end of block", 3)? {
        0 => EndOfBlock::Idle,
        1 => EndOfBlock::Stop,
        2 => EndOfBlock::SectorRead,
        _ => EndOfBlock::SectorWrite,
    };
    let buf = p.bytes("buffer", MAX_PIO_BUF)?.to_vec();
    if buf.len() % 2 != 0 {
        return Err(p.error("buffer", format!("odd length {}", buf.len())));
    }
    let pos = p.u32("position")? as usize;
    if pos > buf.len() || pos % 2 != 0 {
        return Err(p.error(
            "position",
            format!(
                "{pos} is not an even offset within the {}-byte buffer",
                buf.len()
            ),
        ));
    }
    p.finish()?;
    Ok(PioTransfer {
        buf,
        pos,
        end_of_block,
    })
}

/// Decodes an IDE section (every field checked against its bounds).
pub fn decode(sec: &Section<'_>) -> Result<IdeImage> {
    let subs = sec.subsections(&SUBSECTIONS)?;
    let mut d = sec.fields();
    let unit = usize::from(d.u8_max("unit", 1)?);
    let ctrl = d.u8("device control")?;
    let irq = d.bool("irq")?;
    let has_bm = d.bool("has bus master")?;
    let mut drives = [decode_drive(&mut d, 0)?, decode_drive(&mut d, 1)?];
    d.finish()?;
    let [pio0, pio1, bmdma, srst] = <[Option<Dec<'_>>; 4]>::try_from(subs).expect("4 known");
    for (unit, p) in [pio0, pio1].into_iter().enumerate() {
        if let Some(p) = p {
            if !drives[unit].present {
                return Err(p.error("buffer", format!("a PIO transfer on absent drive {unit}")));
            }
            drives[unit].pio = decode_pio(p)?;
        }
    }
    let bm = match (has_bm, bmdma) {
        (false, None) => None,
        (true, Some(mut b)) => {
            let mut bm = BusMaster {
                cmd: b.u8("cmd")?,
                status: b.u8("status")?,
                addr: b.u32("PRD table address")?,
                cur_addr: b.u32("current PRD address")?,
                ..BusMaster::default()
            };
            if bm.addr & 3 != 0 {
                return Err(b.error("PRD table address", "not 4-byte aligned"));
            }
            let pending = b.bool("pending")?;
            let punit = usize::from(b.u8_max("pending unit", 1)?);
            let kind = match b.u8_max("pending kind", 2)? {
                0 => DmaKind::Read,
                1 => DmaKind::Write,
                _ => DmaKind::Trim,
            };
            if pending {
                if !drives[punit].present {
                    return Err(b.error("pending unit", format!("drive {punit} is absent")));
                }
                bm.pending = Some((punit, kind));
            }
            b.finish()?;
            Some(bm)
        }
        (true, None) => {
            return Err(Error::state(format!(
                "{}: the channel has a bus master but subsection \"bmdma\" is missing",
                sec.label()
            )))
        }
        (false, Some(b)) => return Err(b.error("cmd", "a bus master on a channel without one")),
    };
    let srst_left = match srst {
        Some(mut s) => {
            let ns = s.u64("nanoseconds left")?;
            if u128::from(ns) > SRST_DELAY.as_nanos() {
                return Err(s.error(
                    "nanoseconds left",
                    format!("{ns} is more than the reset delay {SRST_DELAY:?}"),
                ));
            }
            s.finish()?;
            Some(Duration::from_nanos(ns))
        }
        None => None,
    };
    Ok(IdeImage {
        drives,
        unit,
        ctrl,
        irq,
        bm,
        srst_left,
    })
}

/// Checks an image against the destination channel; returns the geometries to install.
pub fn check_target(
    sec: &Section<'_>,
    img: &IdeImage,
    ch: &IdeChannel,
) -> Result<[Option<Geometry>; 2]> {
    let label = sec.label();
    let fail = |msg: String| Err(Error::state(format!("{label}: {msg}")));
    let (st, _, in_flight) = ch.freeze();
    if in_flight > 0 || st.bm.as_ref().is_some_and(|b| b.busy) {
        return fail("the destination channel has I/O in flight".into());
    }
    if img.bm.is_some() != st.bm.is_some() {
        return fail(format!(
            "bus master in the state: {}, on this channel: {}",
            img.bm.is_some(),
            st.bm.is_some()
        ));
    }
    let mut install = [None, None];
    for (unit, (want, have)) in img.drives.iter().zip(&st.drives).enumerate() {
        if want.present != have.present {
            return fail(format!(
                "drive {unit} is {} in the state but {} here",
                if want.present { "present" } else { "absent" },
                if have.present { "present" } else { "absent" },
            ));
        }
        let Some(disk) = &have.disk else { continue };
        check_capacity(&label, unit, want.capacity, disk)?;
        install[unit] = check_geometry(&label, unit, want, disk)?;
    }
    Ok(install)
}

fn check_capacity(label: &str, unit: usize, want: u64, disk: &IdeDisk) -> Result<()> {
    // An inactive qcow2 node does not know its size before activation: nothing to compare.
    if let Ok(Some(size)) = disk.node().size() {
        let have = size / 512;
        if have != want {
            return Err(Error::state(format!(
                "{label}: drive {unit} capacity is {want} sectors in the state, {have} here"
            )));
        }
    }
    Ok(())
}

/// A user geometry here must equal the state's (and what the guest saw in IDENTIFY); without
/// one, the state's geometry is installed so the MBR is never read.
fn check_geometry(
    label: &str,
    unit: usize,
    want: &DriveImage,
    disk: &IdeDisk,
) -> Result<Option<Geometry>> {
    let config = disk.prefetch().config();
    let fail = |msg: String| Err(Error::state(format!("{label}: drive {unit} {msg}")));
    if config.has_user_chs() {
        let Some(Ok(user)) = disk.prefetch().get() else {
            return fail("has a user geometry that did not resolve".into());
        };
        if let Some(g) = want.geometry {
            if (g.cyls, g.heads, g.secs, g.trans) != (user.cyls, user.heads, user.secs, user.trans)
            {
                return fail(format!(
                    "geometry mismatch: the state has {}/{}/{} ({}), this disk is configured \
                     with {}/{}/{} ({})",
                    g.cyls,
                    g.heads,
                    g.secs,
                    g.trans.as_str(),
                    user.cyls,
                    user.heads,
                    user.secs,
                    user.trans.as_str()
                ));
            }
        }
        if want.identify_set {
            let w = &want.identify;
            let seen = (u32::from(w[1]), u32::from(w[3]), u32::from(w[6]));
            if seen != (user.cyls.min(0xFFFF), user.heads, user.secs) {
                return fail(format!(
                    "geometry mismatch: the guest saw {}/{}/{} in IDENTIFY, this disk is \
                     configured with {}/{}/{}",
                    seen.0, seen.1, seen.2, user.cyls, user.heads, user.secs
                ));
            }
        }
        return Ok(None);
    }
    let Some(g) = want.geometry else {
        return Ok(None);
    };
    if disk.prefetch().is_eager() {
        // QEMU before 2010: the destination's own early guess stands (the hazard).
        return Ok(None);
    }
    if disk.prefetch().job().is_some() {
        return match disk.prefetch().get() {
            Some(Ok(have)) if have == g => Ok(None),
            _ => fail(
                "already has (or is guessing) its own geometry: load state before start()".into(),
            ),
        };
    }
    Ok(Some(g))
}

/// Installs a checked image (and the geometries [`check_target`] returned).
pub fn apply(img: &IdeImage, ch: &IdeChannel, install: &[Option<Geometry>; 2]) {
    for (unit, g) in install.iter().enumerate() {
        if let (Some(g), Some(disk)) = (*g, ch.disk(unit)) {
            install_geometry(&disk, g);
        }
    }
    // An eager disk (QEMU before 2010) rebuilds IDENTIFY from its own early geometry.
    let eager = [0, 1].map(|u| ch.disk(u).is_some_and(|d| d.prefetch().is_eager()));
    let img = img.clone();
    ch.restore_with(move |st| {
        for ((d, w), eager) in st.drives.iter_mut().zip(img.drives).zip(eager) {
            d.tf = w.tf;
            d.req_nb_sectors = w.req_nb_sectors;
            d.mult_sectors = w.mult_sectors;
            d.identify_set = w.identify_set && !eager;
            d.identify = w.identify;
            d.write_cache = w.write_cache;
            d.chs_override = w.chs_override;
            d.reset_reverts = w.reset_reverts;
            d.smart_enabled = w.smart_enabled;
            d.smart_autosave = w.smart_autosave;
            d.smart_selftests = w.smart_selftests;
            d.smart_selftest_log = w.smart_selftest_log;
            d.pio = w.pio;
        }
        st.unit = img.unit;
        st.ctrl = img.ctrl;
        st.irq = img.irq;
        st.bm = img.bm;
        st.reset_due = img.srst_left.map(|left| Instant::now() + left);
    });
}

fn install_geometry(disk: &Arc<IdeDisk>, g: Geometry) {
    // Refused only if a prefetch started since the check (the caller raced us); its result
    // then stands.
    disk.prefetch().set_known(Guess {
        geometry: g,
        source: GuessSource::Migrated,
        translation_source: TranslationSource::Auto,
    });
}
