//! virtio-blk state: transport registers (status, feature selectors, driver features, queue
//! and shared-memory selectors, ConfigGeneration, InterruptStatus), the writeback flag, the
//! NEEDS_RESET condition, every queue (size, ready, the three ring addresses, the device's
//! next_avail / next_used, EVENT_IDX and the used index last signalled) and the geometry.
//!
//! Requests: a device is saved only when drained (stopped, nothing popped and not completed),
//! so no request travels. Chains the driver made available and the device has not popped
//! yet stay in the avail ring in guest RAM (which travels first); after a load every ready
//! queue is marked as notified, so `start()` on the destination pops and runs them.
//!
//! Fields of version 1, in order: status u8 | device features sel u32 | driver features sel
//! u32 | driver features u64 | queue sel u32 | shm sel u32 | config generation u32
//! | writeback u8 (0..=1) | InterruptStatus u32 (<= 3) | offered features u64 | capacity u64
//! (sectors) | geometry known bool | cyls u32 | heads u32 | secs u32 | queue max u16
//! | queue count u16 (1..=1024) | per queue: size u32 | ready bool | desc u64 | avail u64
//! | used u64 | next_avail u16 | next_used u16 | event_idx bool | signalled used u16.
//! Subsection "needs-reset" v1 (present when the device is in DEVICE_NEEDS_RESET): the reason
//! (u32 length <= 4096, UTF-8).

use super::stream::{Enc, Section, SubsectionOut};
use crate::geometry::{DeviceKind, Geometry, Guess, GuessSource, Translation, TranslationSource};
use crate::virtio::queue::SplitQueue;
use crate::virtio::{status as sb, VirtioBlk, MAX_QUEUE_SIZE};
use crate::{Error, Result};

pub const KIND: &str = "virtio-blk";
pub const VERSION: u32 = 1;
pub const MAX_QUEUES: u16 = 1024;
pub const MAX_REASON: usize = 4096;
const STATUS_BITS: u8 =
    sb::ACKNOWLEDGE | sb::DRIVER | sb::DRIVER_OK | sb::FEATURES_OK | sb::NEEDS_RESET | sb::FAILED;

/// One queue as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueImage {
    pub size: u32,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub signalled_used: u16,
}

/// The device as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioImage {
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub shm_sel: u32,
    pub config_gen: u32,
    pub writeback: u8,
    pub isr: u32,
    pub offered: u64,
    pub capacity: u64,
    pub geometry: Option<Geometry>,
    pub queue_max: u16,
    pub queues: Vec<QueueImage>,
    pub broken: Option<String>,
}

impl QueueImage {
    pub fn of(q: &SplitQueue) -> Self {
        QueueImage {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx,
            signalled_used: q.signalled_used,
        }
    }

    pub fn install(&self, q: &mut SplitQueue) {
        q.size = self.size;
        q.ready = self.ready;
        q.desc = self.desc;
        q.avail = self.avail;
        q.used = self.used;
        q.next_avail = self.next_avail;
        q.next_used = self.next_used;
        q.event_idx = self.event_idx;
        q.signalled_used = self.signalled_used;
    }
}

pub fn encode(img: &VirtioImage) -> (Vec<u8>, Vec<SubsectionOut>) {
    let mut e = Enc::default();
    e.u8(img.status);
    e.u32(img.device_features_sel);
    e.u32(img.driver_features_sel);
    e.u64(img.driver_features);
    e.u32(img.queue_sel);
    e.u32(img.shm_sel);
    e.u32(img.config_gen);
    e.u8(img.writeback);
    e.u32(img.isr);
    e.u64(img.offered);
    e.u64(img.capacity);
    e.bool(img.geometry.is_some());
    let g = img
        .geometry
        .map_or((0, 0, 0), |g| (g.cyls, g.heads, g.secs));
    e.u32(g.0);
    e.u32(g.1);
    e.u32(g.2);
    e.u16(img.queue_max);
    e.u16(img.queues.len() as u16);
    for q in &img.queues {
        e.u32(q.size);
        e.bool(q.ready);
        e.u64(q.desc);
        e.u64(q.avail);
        e.u64(q.used);
        e.u16(q.next_avail);
        e.u16(q.next_used);
        e.bool(q.event_idx);
        e.u16(q.signalled_used);
    }
    let mut subs = Vec::new();
    if let Some(reason) = &img.broken {
        let mut r = Enc::default();
        r.bytes(&reason.as_bytes()[..reason.len().min(MAX_REASON)]);
        subs.push(SubsectionOut {
            name: "needs-reset".into(),
            version: 1,
            optional: false,
            data: r.buf,
        });
    }
    (e.buf, subs)
}

pub fn decode(sec: &Section<'_>) -> Result<VirtioImage> {
    let subs = sec.subsections(&[("needs-reset", 1)])?;
    let mut d = sec.fields();
    let status = d.u8("status")?;
    if status & !STATUS_BITS != 0 {
        return Err(d.error("status", format!("unknown bits in {status:#04x}")));
    }
    let device_features_sel = d.u32("device features sel")?;
    let driver_features_sel = d.u32("driver features sel")?;
    let driver_features = d.u64("driver features")?;
    let queue_sel = d.u32("queue sel")?;
    let shm_sel = d.u32("shm sel")?;
    let config_gen = d.u32("config generation")?;
    let writeback = d.u8_max("writeback", 1)?;
    let isr = d.u32_in("InterruptStatus", 0, 3)?;
    let offered = d.u64("offered features")?;
    let capacity = d.u64("capacity")?;
    let known = d.bool("geometry known")?;
    let (cyls, heads, secs) = (
        d.u32("cylinders")?,
        d.u32("heads")?,
        d.u32("sectors per track")?,
    );
    let geometry = if known {
        if let Err(e) = DeviceKind::Virtio.limits().check(cyls, heads, secs) {
            return Err(d.error(
                "geometry",
                format!("{cyls}/{heads}/{secs}: {}", e.message()),
            ));
        }
        Some(Geometry {
            cyls,
            heads,
            secs,
            trans: Translation::None,
        })
    } else {
        if (cyls, heads, secs) != (0, 0, 0) {
            return Err(d.error("geometry", "values given for an unknown geometry"));
        }
        None
    };
    let queue_max = d.u16("queue max")?;
    if queue_max == 0 || !queue_max.is_power_of_two() || queue_max > MAX_QUEUE_SIZE {
        return Err(d.error(
            "queue max",
            format!("{queue_max} is not a power of two in 1..={MAX_QUEUE_SIZE}"),
        ));
    }
    let n = d.u16("queue count")?;
    if n == 0 || n > MAX_QUEUES {
        return Err(d.error("queue count", format!("{n} is not in 1..={MAX_QUEUES}")));
    }
    let mut queues = Vec::with_capacity(usize::from(n));
    for i in 0..n {
        let f = |name: &str| format!("queue {i} {name}");
        let q = QueueImage {
            size: d.u32(&f("size"))?,
            ready: d.bool(&f("ready"))?,
            desc: d.u64(&f("descriptor table address"))?,
            avail: d.u64(&f("available ring address"))?,
            used: d.u64(&f("used ring address"))?,
            next_avail: d.u16(&f("next_avail"))?,
            next_used: d.u16(&f("next_used"))?,
            event_idx: d.bool(&f("event_idx"))?,
            signalled_used: d.u16(&f("signalled used"))?,
        };
        if q.ready {
            let qs = q.size;
            if qs == 0 || !qs.is_power_of_two() || qs > u32::from(queue_max) {
                return Err(d.error(
                    &f("size"),
                    format!("{qs} is not a power of two in 1..={queue_max}"),
                ));
            }
            let gap = q.next_avail.wrapping_sub(q.next_used);
            if u32::from(gap) > qs {
                return Err(d.error(
                    &f("next_avail"),
                    format!(
                        "next_avail {} is {gap} ahead of next_used {}: more than the queue size {qs}",
                        q.next_avail, q.next_used
                    ),
                ));
            }
        }
        queues.push(q);
    }
    d.finish()?;
    let broken = match subs.into_iter().next().flatten() {
        Some(mut r) => {
            let raw = r.bytes("reason", MAX_REASON)?;
            r.finish()?;
            Some(String::from_utf8_lossy(raw).into_owned())
        }
        None => None,
    };
    if broken.is_some() != (status & sb::NEEDS_RESET != 0) {
        return Err(Error::state(format!(
            "{}: DEVICE_NEEDS_RESET in status and subsection \"needs-reset\" disagree",
            sec.label()
        )));
    }
    Ok(VirtioImage {
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        shm_sel,
        config_gen,
        writeback,
        isr,
        offered,
        capacity,
        geometry,
        queue_max,
        queues,
        broken,
    })
}

/// Checks an image against the destination device; returns the geometry to install.
pub fn check_target(
    sec: &Section<'_>,
    img: &VirtioImage,
    dev: &VirtioBlk,
) -> Result<Option<Geometry>> {
    let label = sec.label();
    let fail = |msg: String| Err(Error::state(format!("{label}: {msg}")));
    dev.check_idle("the destination device has requests in flight")?;
    if img.queues.len() != dev.num_queues() {
        return fail(format!(
            "{} queues in the state, {} on this device",
            img.queues.len(),
            dev.num_queues()
        ));
    }
    if img.queue_max > dev.queue_size() {
        return fail(format!(
            "queue size maximum {} in the state, {} on this device",
            img.queue_max,
            dev.queue_size()
        ));
    }
    let offered = dev.offered_features();
    if img.driver_features & !offered != 0 {
        return fail(format!(
            "the driver accepted features {:#x} that this device does not offer ({offered:#x})",
            img.driver_features
        ));
    }
    if let Ok(Some(size)) = dev.node().size() {
        if size / 512 != img.capacity {
            return fail(format!(
                "capacity is {} sectors in the state, {} here",
                img.capacity,
                size / 512
            ));
        }
    }
    if img.broken.is_none() {
        for (i, q) in img.queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            let mut sq = SplitQueue::new(img.queue_max);
            q.install(&mut sq);
            if let Err(e) = sq.validate(dev.memory()) {
                return fail(format!("queue {i}: {e}"));
            }
        }
    }
    let prefetch = dev.prefetch();
    if prefetch.config().has_user_chs() {
        if let (Some(g), Some(Ok(user))) = (img.geometry, prefetch.get()) {
            if (g.cyls, g.heads, g.secs) != (user.cyls, user.heads, user.secs) {
                return fail(format!(
                    "geometry mismatch: the state has {}/{}/{}, this device is configured with {}/{}/{}",
                    g.cyls, g.heads, g.secs, user.cyls, user.heads, user.secs
                ));
            }
        }
        return Ok(None);
    }
    let Some(g) = img.geometry else {
        return Ok(None);
    };
    if prefetch.is_eager() {
        // QEMU before 2010: the destination's own early guess stands (the hazard).
        return Ok(None);
    }
    if prefetch.job().is_some() {
        return match prefetch.get() {
            Some(Ok(have)) if have == g => Ok(None),
            _ => fail(
                "already has (or is guessing) its own geometry: load state before start()".into(),
            ),
        };
    }
    Ok(Some(g))
}

/// Installs a checked image.
pub fn apply(img: &VirtioImage, dev: &VirtioBlk, install: Option<Geometry>) {
    if let Some(g) = install {
        dev.prefetch().set_known(Guess {
            geometry: g,
            source: GuessSource::Migrated,
            translation_source: TranslationSource::NoSlot,
        });
    }
    dev.restore(img);
}
