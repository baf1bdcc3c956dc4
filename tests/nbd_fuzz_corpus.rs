//! Replays the NBD fuzz corpus (`fuzz/corpus/nbd`) through the client's handshake and reply
//! parser (`blockemu_core::block::nbd::proto::fuzz_session`), plus a seeded loop of byte
//! mutations and truncations of each seed: none may panic.

use std::path::Path;

mod fuzz_common;

use blockemu_core::block::nbd::proto::fuzz_session;

#[test]
fn corpus_and_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd");
    fuzz_common::replay_with_mutations(&dir, 5, fuzz_session);
}
