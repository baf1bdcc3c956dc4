//! Replays the qcow2 fuzz corpus (`fuzz/corpus/qcow2`) and a seeded loop of mutations of it
//! through `blockemu_core::block::qcow2::fuzz::run`. `BLOCKEMU_WRITE_QCOW2_CORPUS=1` rewrites
//! the seeds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockemu_core::block::qcow2::fuzz::{run, GrowingMemory};
use blockemu_core::block::qcow2::{create_empty, Qcow2Backend};
use blockemu_core::block::Backend;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qcow2")
}

/// Small images (512-byte clusters): empty, lazy refcounts, and one with data written.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let empty = create_empty(1 << 20, 9, false).unwrap();
    out.push(("empty", [&[0u8][..], &empty].concat()));
    let lazy = create_empty(1 << 16, 9, true).unwrap();
    out.push(("lazy", [&[3u8][..], &lazy].concat()));
    let file = Arc::new(GrowingMemory::new(empty));
    let q = Qcow2Backend::new(file.clone(), false);
    q.write_at(&[0x5a; 700], 1000).unwrap();
    q.write_at(&[0xa5; 512], 300_000).unwrap();
    out.push(("written", [&[0x41u8][..], &file.bytes()].concat()));
    out
}

#[test]
fn corpus_replays_without_panic() {
    let dir = corpus_dir();
    if std::env::var_os("BLOCKEMU_WRITE_QCOW2_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut inputs: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries {
            inputs.push(std::fs::read(e.unwrap().path()).unwrap());
        }
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for input in &inputs {
        run(input);
        // Mutations: header bytes and table entries flipped, truncations.
        for _ in 0..300 {
            let mut m = input.clone();
            for _ in 0..1 + next() % 4 {
                let at = if next() % 2 == 0 {
                    (next() % 112.min(m.len() as u64)) as usize
                } else {
                    (next() % m.len() as u64) as usize
                };
                m[at] ^= 1 << (next() % 8);
            }
            if next() % 10 == 0 {
                m.truncate((next() % m.len() as u64) as usize);
            }
            run(&m);
        }
    }
}
