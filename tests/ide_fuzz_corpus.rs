//! Replays every input of the ata fuzz corpus (`fuzz/corpus/ata`), including the inputs of
//! crashes found and fixed, with a panic hook that counts panics on any thread: a panic inside
//! a worker job is caught by the pool, so only the hook sees it.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn every_corpus_input_replays_without_a_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/ata");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 6, "corpus missing at {}", dir.display());
    for path in inputs {
        let data = std::fs::read(&path).unwrap();
        blockemu_core::ide::replay::replay(&data);
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            0,
            "{} panicked",
            path.display()
        );
    }
}
