//! Replays the NBD server fuzz corpus (`fuzz/corpus/nbd_server`) through the server's
//! handshake and transmission state machine (`blockemu_core::block::nbd::server::fuzz_session`),
//! plus a seeded loop of byte mutations and truncations of each seed: none may panic.

use std::path::Path;

use blockemu_core::block::nbd::server::fuzz_session;

#[test]
fn corpus_and_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd_server");
    let mut seeds = 0;
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.expect("entry").path()).expect("seed");
        seeds += 1;
        fuzz_session(&data);
        for cut in 0..data.len().min(200) {
            fuzz_session(&data[..cut]);
        }
        for _ in 0..300 {
            let mut m = data.clone();
            if m.is_empty() {
                break;
            }
            for _ in 0..1 + next() % 4 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = next() as u8;
            }
            fuzz_session(&m);
        }
    }
    assert!(seeds >= 5, "the NBD server seed corpus is missing");
}
