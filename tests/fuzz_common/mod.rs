//! Shared pieces of the fuzz-corpus tests: a panic hook that counts panics on any thread (a
//! panic inside a worker job is caught by the pool, so only the hook sees it), the corpus
//! replay loop and a fixed-seed generator.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

/// Installs (once per test binary) the hook that counts panics, then the default hook's output.
pub fn count_panics() {
    HOOK.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default_hook(info);
        }));
    });
}

/// Panics counted since [`count_panics`] installed the hook.
pub fn panics() -> usize {
    PANICS.load(Ordering::SeqCst)
}

/// Replays every file of `dir` (sorted by name; at least `min_inputs` of them) through `replay`,
/// failing on the first input that panicked on any thread.
pub fn replay_corpus(dir: &Path, min_inputs: usize, replay: impl Fn(&[u8])) {
    count_panics();
    let mut inputs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= min_inputs,
        "corpus missing at {}",
        dir.display()
    );
    for path in inputs {
        replay(&std::fs::read(&path).unwrap());
        assert_eq!(panics(), 0, "{} panicked", path.display());
    }
}

/// Replays every seed of `dir` (at least `min_inputs`), each of its first 200 truncations, and
/// 300 copies of it with 1–4 bytes changed at random (fixed seed) through `replay`: a parser
/// fed by a peer must survive all of them.
pub fn replay_with_mutations(dir: &Path, min_inputs: usize, replay: impl Fn(&[u8])) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seeds = 0;
    for entry in std::fs::read_dir(dir).expect("corpus directory") {
        let data = std::fs::read(entry.expect("entry").path()).expect("seed");
        seeds += 1;
        replay(&data);
        for cut in 0..data.len().min(200) {
            replay(&data[..cut]);
        }
        if data.is_empty() {
            continue;
        }
        for _ in 0..300 {
            let mut m = data.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() % m.len() as u64) as usize;
                m[i] = rng.next() as u8;
            }
            replay(&m);
        }
    }
    assert!(
        seeds >= min_inputs,
        "the seed corpus at {} is missing",
        dir.display()
    );
}

/// xorshift64*: a fixed-seed generator, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
