//! One regression test per row of spec §6 (bad guest input), with our policy's outcome.

mod virtio_common;

use blockemu_core::virtio::features as f;
use blockemu_core::virtio::mmio::*;
use virtio_common::*;

/// A valid read chain in slot 0 at descriptor 0 (header, 4 KiB, status).
fn good_read(d: &mut Driver) -> u16 {
    d.read_chain(0, 8, DATA, 4096)
}

fn snapshot(d: &Driver) -> Vec<u8> {
    let mut m = vec![0u8; MEM_SIZE];
    d.mem.read(0, &mut m).unwrap();
    m
}

#[test]
fn row01_avail_idx_jumps_more_than_q() {
    let mut d = Driver::ready(0);
    let h = good_read(&mut d);
    d.mem.write_u16(AVAIL + 4, h).unwrap();
    d.mem.write_u16(AVAIL + 2, 257).unwrap();
    d.kick();
    d.assert_fatal_and_recover(0);
}

#[test]
fn row01_avail_idx_goes_backwards() {
    let mut d = Driver::ready(0);
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
    d.mem.write_u16(AVAIL + 2, 0).unwrap(); // next_avail is 1: 0 - 1 = 65535 > Q
    d.kick();
    d.assert_fatal_and_recover(1);
}

#[test]
fn row02_head_beyond_q() {
    let mut d = Driver::ready(0);
    d.submit(300);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row03_next_beyond_q() {
    let mut d = Driver::ready(0);
    d.write_desc(0, HDR, 16, NEXT, 256);
    d.header(0, T_IN, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row03_next_beyond_indirect_table() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let table = 0x60000;
    d.header(0, T_IN, 0);
    d.write_desc_at(table, 0, HDR, 16, NEXT, 1);
    d.write_desc_at(table, 1, DATA, 512, WRITE | NEXT, 3); // table has 3 entries
    d.write_desc_at(table, 2, STATUS, 1, WRITE, 0);
    d.write_desc(0, table, 48, INDIRECT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row04_loops_and_overlong_chains() {
    // 0 -> 1 -> 0
    let mut d = Driver::ready(f::INDIRECT_DESC);
    d.write_desc(0, HDR, 16, NEXT, 1);
    d.write_desc(1, DATA, 512, NEXT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
    // Self loop 5 -> 5.
    let mut d = Driver::ready(f::INDIRECT_DESC);
    d.write_desc(5, HDR, 16, NEXT, 5);
    d.submit(5);
    d.assert_fatal_and_recover(0);
    // A loop inside an indirect table.
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let table = 0x60000;
    d.write_desc_at(table, 0, HDR, 16, NEXT, 1);
    d.write_desc_at(table, 1, DATA, 16, NEXT, 0);
    d.write_desc(0, table, 32, INDIRECT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
    // 257 hops through an indirect table of 512 entries, Q = 256.
    let mut d = Driver::ready(f::INDIRECT_DESC);
    d.header(0, T_IN, 0);
    for i in 0..512u16 {
        d.write_desc_at(table, i, DATA + u64::from(i), 1, WRITE | NEXT, i + 1);
    }
    d.write_desc_at(table, 0, HDR, 16, NEXT, 1);
    d.write_desc_at(table, 256, STATUS, 1, WRITE, 0); // the 257th descriptor
    d.write_desc(0, table, 512 * 16, INDIRECT, 0);
    let t0 = std::time::Instant::now();
    d.submit(0);
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    d.assert_fatal_and_recover(0);
}

#[test]
fn row04_a_chain_of_exactly_q_descriptors_is_fine() {
    let mut d = Driver::new();
    d.init(0, 4);
    let h = d.header(0, T_IN, 1);
    d.mem.write(STATUS, &[0xff]).unwrap();
    let head = d.chain(&[
        (h, 16, false),
        (DATA, 512, true),
        (DATA + 512, 512, true),
        (STATUS, 1, true),
    ]);
    let (s, len) = d.one(head, 0);
    assert_eq!((s, len), (0, 1025));
}

#[test]
fn row05_buffer_outside_guest_memory() {
    for (addr, len) in [(MEM_SIZE as u64 - 100, 4096u32), (u64::MAX - 15, 64)] {
        let mut d = Driver::ready(0);
        let h = d.header(0, T_IN, 0);
        d.chain(&[(h, 16, false), (addr, len, true), (STATUS, 1, true)]);
        let before = snapshot(&d);
        d.put(0);
        d.publish();
        let mut after_publish = before.clone();
        after_publish[(AVAIL + 2) as usize..(AVAIL + 4) as usize]
            .copy_from_slice(&1u16.to_le_bytes());
        after_publish[(AVAIL + 4) as usize..(AVAIL + 6) as usize]
            .copy_from_slice(&0u16.to_le_bytes());
        let before = snapshot(&d);
        d.kick();
        d.drain();
        assert_eq!(snapshot(&d), before, "guest memory byte-for-byte unchanged");
        d.assert_fatal_and_recover(0);
    }
}

#[test]
fn row06_addr_plus_len_overflows() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_IN, 0);
    d.chain(&[(h, 16, false), (u64::MAX - 8, 512, true), (STATUS, 1, true)]);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row07_total_length_beyond_4g() {
    // 64 MiB of guest memory: reach 2^32 bytes by repeating one in-memory range.
    let mut d = Driver::with_mem(node(SECTORS, false), config(), 64 << 20);
    d.init(0, 256);
    let h = d.header(0, T_IN, 0);
    let mut parts = vec![(h, 16u32, false)];
    for _ in 0..130 {
        parts.push((DATA, 32 << 20, true));
    }
    d.chain(&parts);
    d.submit(0);
    d.drain();
    assert!(d.dev.needs_reset_reason().unwrap().contains("2^32"));
    d.assert_fatal_and_recover(0);
}

#[test]
fn row08_nested_indirect() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    let table = 0x60000;
    d.write_desc_at(table, 0, 0x61000, 32, INDIRECT, 0);
    d.write_desc(0, table, 16, INDIRECT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row09_bad_indirect_lengths() {
    for len in [0u32, 24] {
        let mut d = Driver::ready(f::INDIRECT_DESC);
        d.write_desc(0, 0x60000, len, INDIRECT, 0);
        d.submit(0);
        d.assert_fatal_and_recover(0);
    }
    // INDIRECT together with NEXT.
    let mut d = Driver::ready(f::INDIRECT_DESC);
    d.write_desc(0, 0x60000, 32, INDIRECT | NEXT, 1);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row10_indirect_table_outside_memory() {
    let mut d = Driver::ready(f::INDIRECT_DESC);
    d.write_desc(0, MEM_SIZE as u64 - 16, 32, INDIRECT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row11_indirect_without_the_feature() {
    let mut d = Driver::ready(0);
    let table = 0x60000;
    let h = d.header(0, T_IN, 0);
    d.write_desc_at(table, 0, h, 16, NEXT, 1);
    d.write_desc_at(table, 1, DATA, 512, WRITE | NEXT, 2);
    d.write_desc_at(table, 2, STATUS, 1, WRITE, 0);
    d.write_desc(0, table, 48, INDIRECT, 0);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row12_readable_after_writable() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_OUT, 0);
    d.chain(&[(h, 16, false), (STATUS, 1, true), (DATA, 512, false)]);
    d.submit(0);
    d.assert_fatal_and_recover(0);
}

#[test]
fn row13_zero_length_descriptor_is_allowed() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_IN, 8);
    d.mem.write(STATUS, &[0xff]).unwrap();
    let head = d.chain(&[
        (h, 16, false),
        (DATA, 2048, true),
        (0xdead_0000_0000, 0, true),
        (DATA + 2048, 2048, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(d.one(head, 0), (0, 4097));
    let mut buf = vec![0u8; 4096];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, image(8192)[4096..].to_vec());
}

#[test]
fn row14_short_header_gets_used_len_0() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_IN, 0);
    d.mem.write(STATUS, &[0xee]).unwrap();
    let head = d.chain(&[(h, 8, false), (STATUS, 1, true)]);
    let before = snapshot(&d);
    d.submit(head);
    d.wait_used(1);
    assert_eq!(d.used_elem(0), (u32::from(head), 0));
    assert_eq!(d.status_byte(0), 0xee, "nothing written");
    let mut after = snapshot(&d);
    // Only the used ring and the avail ring (our own submit) changed.
    after[USED as usize..USED as usize + 0x1000]
        .copy_from_slice(&before[USED as usize..USED as usize + 0x1000]);
    after[AVAIL as usize..AVAIL as usize + 0x1000]
        .copy_from_slice(&before[AVAIL as usize..AVAIL as usize + 0x1000]);
    assert!(after == before);
    // The next request is processed normally.
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
    assert!(!d.is_broken());
}

#[test]
fn row15_no_writable_byte_gets_used_len_0() {
    let mut d = Driver::ready(0);
    let h = d.header(0, T_OUT, 0);
    let head = d.chain(&[(h, 16, false), (DATA, 512, false)]);
    d.submit(head);
    d.wait_used(1);
    assert_eq!(d.used_elem(0).1, 0);
    assert_eq!(d.node.stats().writes, 0, "nothing written");
    let (s, _) = d.read(0, 512);
    assert_eq!(s, 0);
}

#[test]
fn row16_out_of_range_and_overflow_ioerr() {
    let mut d = Driver::ready(0);
    d.mem.write(DATA, &[0x5a; 1024]).unwrap();
    for (sector, len) in [
        (SECTORS - 1, 1024u32),
        (u64::MAX, 512),
        (SECTORS, 512),
        (u64::MAX / 512 + 1, 512),
    ] {
        let h = d.read_chain(0, sector, DATA, len);
        assert_eq!(d.one(h, 0), (1, 1), "sector {sector}");
        let mut buf = vec![0u8; 1024];
        d.mem.read(DATA, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a), "data untouched");
    }
    assert!(!d.is_broken());
    // The last sector itself is fine.
    let (s, data) = d.read(SECTORS - 1, 512);
    assert_eq!(s, 0);
    assert_eq!(
        data,
        image(SECTORS * 512)[((SECTORS - 1) * 512) as usize..].to_vec()
    );
}

#[test]
fn row17_length_not_a_multiple_of_512() {
    let mut d = Driver::ready(0);
    let h = d.read_chain(0, 0, DATA, 1000);
    assert_eq!(d.one(h, 0), (1, 1));
    let h = d.write_chain(1, 0, DATA, 1000);
    assert_eq!(d.one(h, 1), (1, 1));
}

#[test]
fn row18_write_to_read_only_device() {
    let mut d = Driver::with(node(SECTORS, true), config());
    assert_ne!(d.offered() & f::BLK_RO, 0);
    d.init(f::BLK_RO | f::BLK_DISCARD | f::BLK_WRITE_ZEROES, 256);
    d.mem.write(DATA, &[0x77; 512]).unwrap();
    let h = d.write_chain(0, 100, DATA, 512);
    assert_eq!(d.one(h, 0), (1, 1));
    for t in [T_DISCARD, T_WRITE_ZEROES] {
        let hdr = d.header(1, t, 0);
        d.mem.write_u64(DATA + 8192, 16).unwrap();
        d.mem.write_u32(DATA + 8200, 8).unwrap();
        d.mem.write_u32(DATA + 8204, 0).unwrap();
        let head = d.chain(&[
            (hdr, 16, false),
            (DATA + 8192, 16, false),
            (STATUS + 1, 1, true),
        ]);
        assert_eq!(d.one(head, 1), (1, 1));
    }
    let (s, data) = d.read(100, 512);
    assert_eq!(s, 0);
    assert_eq!(data, image(101 * 512)[100 * 512..].to_vec());
}

#[test]
fn row19_unknown_types_unsupp() {
    let mut d = Driver::ready(0);
    for t in [0xff, 0x8000_0000, 5, 2, 3, 10, 14] {
        let h = d.header(0, t, 0);
        d.mem.write(DATA, &[0x33; 512]).unwrap();
        d.mem.write(STATUS, &[0xff]).unwrap();
        let head = d.chain(&[(h, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(d.one(head, 0), (2, 1), "type {t:#x}");
        let mut buf = vec![0u8; 512];
        d.mem.read(DATA, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33));
    }
    assert!(!d.is_broken());
}

#[test]
fn row20_get_id_buffer_sizes() {
    let mut d = Driver::ready(0);
    // 8 bytes: IOERR, untouched.
    let h = d.header(0, T_GET_ID, 0);
    d.mem.write(DATA, &[0xaa; 32]).unwrap();
    let head = d.chain(&[(h, 16, false), (DATA, 8, true), (STATUS, 1, true)]);
    assert_eq!(d.one(head, 0), (1, 1));
    let mut buf = [0u8; 32];
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(buf, [0xaa; 32]);
    // 32 bytes: 20 written, the rest untouched.
    let head = d.chain(&[(h, 16, false), (DATA, 32, true), (STATUS, 1, true)]);
    assert_eq!(d.one(head, 0), (0, 21));
    d.mem.read(DATA, &mut buf).unwrap();
    let mut want = [0u8; 32];
    want[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    want[20..].fill(0xaa);
    assert_eq!(buf, want);
    // Split across descriptors (7 + 13) works too.
    d.mem.write(DATA, &[0xaa; 32]).unwrap();
    let head = d.chain(&[
        (h, 16, false),
        (DATA, 7, true),
        (DATA + 7, 13, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(d.one(head, 0), (0, 21));
    d.mem.read(DATA, &mut buf).unwrap();
    assert_eq!(&buf[..20], &want[..20]);
}

#[test]
fn row21_head_already_in_flight_is_fatal() {
    let mut d = Driver::ready(0);
    let h = good_read(&mut d);
    d.put(h);
    d.put(h);
    d.publish();
    d.kick();
    d.drain();
    assert!(d.is_broken());
    assert!(d.dev.needs_reset_reason().unwrap().contains("in flight"));
    assert_eq!(
        d.used_idx(),
        0,
        "the first request's completion is dropped too"
    );
    let used = d.used_idx();
    d.assert_fatal_and_recover(used);
}

#[test]
fn row22_notify_for_a_missing_queue_is_ignored() {
    let mut d = Driver::ready(0);
    let h = good_read(&mut d);
    d.put(h);
    d.publish();
    d.wr(R_QUEUE_NOTIFY, 7);
    d.wr(R_QUEUE_NOTIFY, u32::MAX);
    d.drain();
    assert_eq!(d.used_idx(), 0);
    assert!(!d.is_broken());
    assert_eq!(d.dev.stats().ignored_notifies, 2);
    d.kick();
    d.wait_used(1);
}

#[test]
fn row23_notify_before_driver_ok_or_queue_not_ready_is_ignored() {
    let mut d = Driver::new();
    assert_eq!(d.negotiate(f::VERSION_1), 0xb);
    d.setup_queue(0, 256, DESC, AVAIL, USED);
    let h = good_read(&mut d);
    d.put(h);
    d.publish();
    let before = snapshot(&d);
    d.kick(); // before DRIVER_OK
    d.drain();
    assert!(snapshot(&d) == before, "no memory written");
    d.wr(R_QUEUE_READY, 0);
    d.wr(R_STATUS, 0xf);
    d.kick(); // queue not ready
    d.drain();
    assert!(snapshot(&d) == before);
    assert!(!d.is_broken());
    assert_eq!(d.dev.stats().ignored_notifies, 2);
    d.wr(R_QUEUE_READY, 1);
    d.kick();
    d.wait_used(1);
}

#[test]
fn row24_misaligned_or_outside_memory_rings() {
    for (desc, avail, used) in [
        (DESC + 8, AVAIL, USED),
        (DESC, AVAIL + 1, USED),
        (DESC, AVAIL, USED + 2),
        (MEM_SIZE as u64 - 0x800, AVAIL, USED),
        (DESC, AVAIL, u64::MAX - 3),
    ] {
        // At DRIVER_OK ...
        let mut d = Driver::new();
        d.negotiate(f::VERSION_1);
        d.setup_queue(0, 256, desc, avail, used);
        d.wr(R_STATUS, 0xf);
        assert!(d.is_broken(), "{desc:#x} {avail:#x} {used:#x}");
        assert_ne!(d.isr() & 2, 0);
        d.desc = DESC;
        d.avail = AVAIL;
        d.used = USED;
        d.features = f::VERSION_1;
        d.assert_fatal_and_recover(0);
        // ... or at QueueReady after DRIVER_OK.
        let mut d = Driver::new();
        d.negotiate(f::VERSION_1);
        d.wr(R_STATUS, 0xf);
        d.setup_queue(0, 256, desc, avail, used);
        assert!(d.is_broken());
    }
}

#[test]
fn row25_bad_queue_size() {
    for q in [0u16, 3, 100, 512] {
        let mut d = Driver::new();
        d.negotiate(f::VERSION_1);
        d.setup_queue(0, q, DESC, AVAIL, USED);
        d.wr(R_STATUS, 0xf);
        assert!(d.is_broken(), "Q = {q}");
        assert!(d.dev.needs_reset_reason().unwrap().contains("queue size"));
    }
}

#[test]
fn row26_driver_scribbling_on_used_idx_is_ignored() {
    let mut d = Driver::ready(0);
    let (s, _) = d.read(8, 512);
    assert_eq!(s, 0);
    d.mem.write_u16(USED + 2, 500).unwrap();
    d.mem.write_u32(USED + 4, 0xdead).unwrap();
    let h = good_read(&mut d);
    d.submit(h);
    d.drain();
    assert_eq!(d.used_idx(), 2, "the device's own next_used wins");
    assert_eq!(d.used_elem(1).1, 4097);
}

#[test]
fn row27_descriptors_are_read_once_at_pop() {
    // The chain is read and validated when it is popped: rewriting the descriptors
    // afterwards (while the request runs) changes nothing of that request.
    let rules = std::sync::Arc::new(blockemu_core::block::FaultRules::new());
    let mut d = Driver::with(fault_node(SECTORS, rules.clone()), config());
    d.init(0, 256);
    rules.stall();
    let h = good_read(&mut d);
    d.submit(h);
    // Point the data descriptor outside memory and the status elsewhere.
    d.write_desc(1, u64::MAX - 100, 4096, WRITE | NEXT, 2);
    d.write_desc(2, STATUS + 9, 1, WRITE, 0);
    rules.release();
    d.wait_used(1);
    assert_eq!(d.status_byte(0), 0);
    assert!(!d.is_broken());
}
