//! Replays the migration-frame fuzz corpus (`fuzz/corpus/migration_frame`) and a seeded loop of
//! mutations and truncations of it (half with the CRCs repaired, so they reach the header and
//! bound checks). The interpreter is `blockemu_core::migration::frame::fuzz`.
//! `BLOCKEMU_WRITE_FRAME_CORPUS=1` rewrites the seeds.

mod fuzz_common;

use std::path::{Path, PathBuf};

use blockemu_core::migration::frame::{self, encode_frame, fuzz, FrameHeader, DEVICE_STATE};
use fuzz_common::{count_panics, panics, replay_corpus, Rng};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/migration_frame")
}

const SESSION: [u8; 16] = *b"\x9a\x1e\x05\xc4\x18\x7fK\x02\xb3\x11\x8d\x0e\x64\xf2\x3a\x90";

/// A stream of frames with consecutive sequence numbers, as one side sends them.
fn stream(epoch: u64, frames: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (t, payload)) in frames.iter().enumerate() {
        let h = FrameHeader::new(*t, SESSION, epoch, i as u64 + 1, payload.len() as u32);
        out.extend_from_slice(&encode_frame(&h, payload).unwrap());
    }
    out
}

/// The seeds: every message type at least once, with the payloads the coordinators send (type
/// numbers as `blockemu.migration.frames.Msg`), state chunks of a few sizes, empty payloads.
fn seeds() -> Vec<(&'static str, u8, Vec<u8>)> {
    let chunk: Vec<u8> = (0..3000u32).map(|i| (i * 31 % 251) as u8).collect();
    vec![
        (
            "handshake",
            0,
            stream(
                3,
                &[
                    (
                        1,
                        br#"{"versions":[1],"caps":["late_activate","witness_blocks"],"vm":"a1"}"#,
                    ),
                    (2, br#"{"version":1,"caps":["late_activate"]}"#),
                    (16, br#"{"seq":2}"#),
                    (17, br#"{"seq":3}"#),
                ],
            ),
        ),
        (
            "device_state",
            1,
            stream(
                3,
                &[
                    (DEVICE_STATE, &chunk),
                    (DEVICE_STATE, &chunk[..1]),
                    (DEVICE_STATE, b""),
                    (6, br#"{"sections":3,"digest":"9f2c"}"#),
                    (7, b"{}"),
                ],
            ),
        ),
        (
            "handoff",
            0,
            stream(
                7,
                &[
                    (
                        9,
                        br#"{"epoch":7,"images":[{"id":"d0","size":1048576,"dirty":false}]}"#,
                    ),
                    (10, b"{}"),
                    (12, br#"{"epoch":8}"#),
                    (13, b"{}"),
                ],
            ),
        ),
        (
            "failures",
            1,
            stream(
                1,
                &[
                    (3, br#"{"reason":"incompatible"}"#),
                    (4, br#"{"image":"d0","errno":11,"lock_conflict":true}"#),
                    (8, br#"{"section":"vblk","reason":"bad queue size"}"#),
                    (11, br#"{"image":"d0","reason":"digest mismatch"}"#),
                    (14, br#"{"reason":"cancelled","phase":"streaming"}"#),
                    (15, b"{}"),
                ],
            ),
        ),
        (
            "ping_empty",
            0,
            stream(0, &[(16, b""), (17, b""), (16, b"[]")]),
        ),
    ]
}

#[test]
fn seeds_decode_whole_and_the_corpus_replays_without_a_panic() {
    count_panics();
    let mut types = std::collections::BTreeSet::new();
    for (name, mode, data) in seeds() {
        let mut input = vec![mode];
        input.extend_from_slice(&data);
        let mut at = 0;
        let mut n = 0;
        while let frame::Next::Frame { header, used, .. } =
            frame::decode_frame(&data[at..]).unwrap()
        {
            types.insert(header.msg_type);
            at += used;
            n += 1;
        }
        assert_eq!(at, data.len(), "seed {name}");
        assert_eq!(fuzz::replay(&input), n, "seed {name}");
        if std::env::var_os("BLOCKEMU_WRITE_FRAME_CORPUS").is_some() {
            std::fs::create_dir_all(corpus_dir()).unwrap();
            std::fs::write(corpus_dir().join(name), &input).unwrap();
        }
    }
    assert_eq!(types.len(), 17, "a seed of every message type");
    replay_corpus(&corpus_dir(), 5, |d| {
        fuzz::replay(d);
    });
}

#[test]
fn seeded_mutations_and_truncations_never_panic() {
    count_panics();
    let seeds = seeds();
    let mut rng = Rng(0xF4A3_E5EE_D00D);
    let rounds = if cfg!(debug_assertions) { 3000 } else { 20000 };
    for round in 0..rounds {
        let (_, _, seed) = &seeds[round % seeds.len()];
        let mut data = vec![rng.next() as u8 & 1];
        data.extend_from_slice(seed);
        for _ in 0..1 + rng.next() % 4 {
            let i = 1 + (rng.next() as usize) % (data.len() - 1);
            match rng.next() % 5 {
                0 => data[i] ^= 1 << (rng.next() % 8),
                1 => data[i] = rng.next() as u8,
                2 => data[i] = 0xFF,
                3 => data[i] = 0,
                _ => data.truncate(i),
            }
            if data.len() < 2 {
                break;
            }
        }
        fuzz::replay(&data);
        assert_eq!(panics(), 0, "round {round} panicked");
    }
}
