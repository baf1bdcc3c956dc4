//! Replays the virtqueue fuzz corpus (`fuzz/corpus/virtqueue`) and runs spec §10 scenario 37:
//! 10 000 seeded random programs (random descriptor tables, avail entries, guest memory and
//! register writes). The interpreter (`blockemu_core::virtio::replay`) checks that nothing
//! panics, every notify drains, guest memory changes only in device-writable buffers, and
//! the device works again after a reset. A panic hook counts panics on worker threads too.

mod fuzz_common;

use std::path::Path;

use fuzz_common::{count_panics, panics, replay_corpus, Rng};

#[test]
fn every_corpus_input_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/virtqueue");
    replay_corpus(&dir, 6, blockemu_core::virtio::replay::replay);
}

#[test]
fn scenario37_seeded_random_programs() {
    count_panics();
    let iterations: u64 = std::env::var("VIRTIO_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut rng = Rng(0x5EED_0037);
    for i in 0..iterations {
        let ops = 1 + rng.next() % 24;
        let mut data = vec![(rng.next() & 0x1f) as u8];
        for _ in 0..ops {
            // Bias towards the structured operations (headers, chains, exposure).
            let kind = match rng.next() % 8 {
                0 => 8,
                1 | 2 => 9,
                3 => 2,
                _ => (rng.next() % 12) as u8,
            };
            data.push(kind);
            for _ in 0..7 {
                data.push(rng.next() as u8);
            }
        }
        blockemu_core::virtio::replay::replay(&data);
        assert_eq!(panics(), 0, "iteration {i} panicked");
    }
}
