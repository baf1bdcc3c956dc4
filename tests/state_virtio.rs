//! virtio-blk state: spec §10 scenario 36 and the checks of a restored queue.

mod virtio_common;

use std::sync::Arc;

use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::state::stream::{self, SectionOut};
use blockemu_core::state::virtio::{self as vstate, VirtioImage};
use blockemu_core::state::{self, Device};
use blockemu_core::virtio::features as f;
use blockemu_core::virtio::VirtioBlk;
use blockemu_core::ErrorKind;
use virtio_common::*;

fn devices(d: &Driver) -> [(&'static str, Device<'_>); 2] {
    [
        ("ram", Device::Memory(&d.mem)),
        ("vblk", Device::Virtio(&d.dev)),
    ]
}

/// A fresh destination over the same image (a new node with the same bytes), not started.
fn fresh(config: blockemu_core::virtio::VirtioBlkConfig) -> Driver {
    Driver::with(node(SECTORS, false), config)
}

/// Source after 10 completions, stopped, with 3 more read chains in the avail ring.
fn source_with_pending(extra: u64) -> (Driver, Vec<u8>) {
    let mut d = Driver::new();
    // Started: the geometry is read in the background (a save waits for it).
    d.dev.start();
    d.init(extra, 256);
    for i in 0..10u64 {
        let (s, buf) = d.read(i * 8, 512);
        assert_eq!(s, 0);
        assert_eq!(buf[7], image_byte(i * 8 * 512 + 7));
    }
    assert_eq!(d.used_idx(), 10);
    d.dev.stop().unwrap();
    for slot in 1..=3u64 {
        let h = d.read_chain(slot, 100 + slot, DATA + slot * 0x1000, 512);
        d.put(h);
    }
    d.publish();
    d.kick();
    assert_eq!(d.used_idx(), 10, "stopped: nothing popped");
    let data = state::save(&devices(&d)).unwrap();
    (d, data)
}

#[test]
fn scenario_36_pending_chains_complete_after_restore() {
    for extra in [0, f::EVENT_IDX] {
        let (src, data) = source_with_pending(extra);
        let dst = fresh(config());
        state::load(&devices(&dst), &data).unwrap();
        assert_eq!(dst.node.stats().reads, 0, "nothing read before start");
        assert_eq!(dst.dev.driver_features(), src.dev.driver_features());
        assert_eq!(dst.status(), 0xf);
        dst.dev.start();
        dst.wait_used(13);
        dst.drain();
        for slot in 1..=3u64 {
            assert_eq!(dst.status_byte(slot), 0, "slot {slot}");
            let mut buf = vec![0u8; 512];
            dst.mem.read(DATA + slot * 0x1000, &mut buf).unwrap();
            let at = (100 + slot) * 512;
            assert_eq!(buf[..16], image(at + 16)[at as usize..], "slot {slot}");
        }
        assert_eq!(dst.used_idx(), 13);
        assert_eq!(dst.dev.stats().requests_completed, 3);
        // The source never ran them.
        assert_eq!(src.used_idx(), 10);
        // And the device keeps going with the driver's next request.
        let mut dst = dst;
        dst.q = src.q;
        dst.avail_idx = src.avail_idx;
        dst.next_desc = src.next_desc;
        let (s, buf) = dst.read(5, 512);
        assert_eq!(s, 0);
        assert_eq!(buf[..8], image(5 * 512 + 8)[5 * 512..]);
        assert_eq!(dst.used_idx(), 14);
    }
}

#[test]
fn geometry_travels_and_nothing_reads_the_mbr() {
    let (src, data) = source_with_pending(0);
    let dst = fresh(config());
    state::load(&devices(&dst), &data).unwrap();
    assert_eq!(dst.dev.geometry(), src.dev.geometry());
    assert!(dst.dev.geometry().is_some());
    dst.dev.start();
    dst.wait_used(13);
    dst.drain();
    assert_eq!(dst.node.stats().reads, 3, "the three requests, no sector 0");
}

type Edit = Box<dyn Fn(&mut VirtioImage)>;

fn tamper(data: &[u8], f: impl Fn(&mut VirtioImage)) -> Vec<u8> {
    let sections = stream::parse(data).unwrap();
    let mut out = Vec::new();
    for s in &sections {
        let (fields, subsections) = if s.kind == vstate::KIND {
            let mut img = vstate::decode(s).unwrap();
            f(&mut img);
            vstate::encode(&img)
        } else {
            (s.fields.to_vec(), Vec::new())
        };
        out.push(SectionOut {
            name: s.name.clone(),
            kind: if s.kind == vstate::KIND {
                vstate::KIND
            } else {
                "memory"
            },
            instance: s.instance,
            version: s.version,
            fields,
            subsections,
        });
    }
    stream::write(&out).unwrap()
}

#[test]
fn restored_queues_are_validated() {
    let (_, data) = source_with_pending(0);
    let cases: Vec<(&str, Edit)> = vec![
        ("size 15", Box::new(|i| i.queues[0].size = 15)),
        ("size 512 > max", Box::new(|i| i.queues[0].size = 512)),
        ("misaligned desc", Box::new(|i| i.queues[0].desc += 8)),
        ("misaligned used", Box::new(|i| i.queues[0].used += 2)),
        (
            "avail outside",
            Box::new(|i| i.queues[0].avail = (MEM_SIZE - 4) as u64),
        ),
        (
            "next_avail - next_used > Q",
            Box::new(|i| i.queues[0].next_avail = i.queues[0].next_used.wrapping_add(257)),
        ),
        ("writeback 2", Box::new(|i| i.writeback = 2)),
        ("unknown status bits", Box::new(|i| i.status |= 0x10)),
        ("capacity", Box::new(|i| i.capacity += 1)),
        (
            "unoffered feature",
            Box::new(|i| i.driver_features |= 1 << 63),
        ),
        (
            "geometry heads 0",
            Box::new(|i| {
                if let Some(g) = &mut i.geometry {
                    g.heads = 0;
                }
            }),
        ),
        (
            "two queues",
            Box::new(|i| {
                let q = i.queues[0].clone();
                i.queues.push(q);
            }),
        ),
    ];
    let dst = fresh(config());
    dst.dev.stop().unwrap();
    let before = state::save(&devices(&dst)).unwrap();
    for (what, f) in cases {
        let bad = tamper(&data, f);
        let e = state::load(&devices(&dst), &bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::State, "{what}");
        assert_eq!(
            state::save(&devices(&dst)).unwrap(),
            before,
            "{what}: changed something"
        );
    }
    assert_eq!(dst.node.stats().reads, 0);
    // Untampered, it loads.
    state::load(&devices(&dst), &tamper(&data, |_| {})).unwrap();
}

#[test]
fn destination_mismatches_are_refused() {
    let (_, data) = source_with_pending(0);
    // Different memory size.
    let small = Driver::with_mem(node(SECTORS, false), config(), MEM_SIZE / 2);
    let e = state::load(&devices(&small), &data).unwrap_err();
    assert!(e.message().contains("guest memory is"), "{e}");
    // Different queue count.
    let two = fresh(blockemu_core::virtio::VirtioBlkConfig {
        num_queues: 2,
        ..config()
    });
    let e = state::load(&devices(&two), &data).unwrap_err();
    assert!(
        e.message()
            .contains("1 queues in the state, 2 on this device"),
        "{e}"
    );
    // User geometry that differs.
    let user = fresh(blockemu_core::virtio::VirtioBlkConfig {
        cyls: 100,
        heads: 16,
        secs: 63,
        ..config()
    });
    let e = state::load(&devices(&user), &data).unwrap_err();
    assert!(e.message().contains("geometry mismatch"), "{e}");
    // A device under another name, or missing, or of another kind.
    let dst = fresh(config());
    let e = state::load(
        &[
            ("ram", Device::Memory(&dst.mem)),
            ("other", Device::Virtio(&dst.dev)),
        ],
        &data,
    )
    .unwrap_err();
    assert!(e.message().contains("no such device here"), "{e}");
    let e = state::load(&[("ram", Device::Memory(&dst.mem))], &data).unwrap_err();
    assert!(e.message().contains("no such device"), "{e}");
    let mem2 = GuestMemory::new(MEM_SIZE).unwrap();
    let e = state::load(
        &[
            ("ram", Device::Memory(&dst.mem)),
            ("vblk", Device::Memory(&mem2)),
        ],
        &data,
    )
    .unwrap_err();
    assert!(
        e.message().contains("is a virtio-blk state, but device"),
        "{e}"
    );
    assert_eq!(dst.node.stats().reads, 0);
}

#[test]
fn a_running_device_refuses_the_save() {
    let d = Driver::ready(0);
    let e = state::save(&devices(&d)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::State);
    assert!(
        e.message().contains("device is running; stop it first"),
        "{e}"
    );
    let rules = Arc::new(blockemu_core::block::FaultRules::new());
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(0, 256);
    rules.stall();
    let h = d.read_chain(0, 1, DATA, 512);
    d.submit(h);
    // stop() would wait for the stalled request: save without it sees work in flight.
    let e = state::save(&[("vblk", Device::Virtio(&d.dev))]).unwrap_err();
    assert!(e.message().contains("stop it first"), "{e}");
    rules.release();
    d.dev.stop().unwrap();
    state::save(&[("vblk", Device::Virtio(&d.dev))]).unwrap();
}

#[test]
fn needs_reset_travels() {
    let mut d = Driver::ready(0);
    // A head beyond the queue size breaks the device (§6).
    d.put(300);
    d.publish();
    d.kick();
    assert!(d.is_broken());
    let reason = d.dev.needs_reset_reason().unwrap();
    d.dev.stop().unwrap();
    let data = state::save(&devices(&d)).unwrap();
    let dst = fresh(config());
    state::load(&devices(&dst), &data).unwrap();
    assert!(dst.is_broken());
    assert_eq!(dst.dev.needs_reset_reason().unwrap(), reason);
    let _: &VirtioBlk = &dst.dev;
}
