//! Replays every input of the ata fuzz corpus (`fuzz/corpus/ata`), including the inputs of
//! crashes found and fixed, with a panic hook that counts panics on any thread: a panic inside
//! a worker job is caught by the pool, so only the hook sees it.

mod fuzz_common;

use std::path::Path;

#[test]
fn every_corpus_input_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ata");
    fuzz_common::replay_corpus(&dir, 6, blockemu_core::ide::replay::replay);
}
