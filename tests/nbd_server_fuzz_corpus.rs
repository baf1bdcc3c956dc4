//! Replays the NBD server fuzz corpus (`fuzz/corpus/nbd_server`) through the server's
//! handshake and transmission state machine (`blockemu_core::block::nbd::server::fuzz_session`),
//! plus a seeded loop of byte mutations and truncations of each seed: none may panic.

use std::path::Path;

mod fuzz_common;

use blockemu_core::block::nbd::server::fuzz_session;

#[test]
fn corpus_and_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/nbd_server");
    fuzz_common::replay_with_mutations(&dir, 5, fuzz_session);
}
