//! Replays the state fuzz corpus (`fuzz/corpus/state`) and a seeded loop of mutations of it
//! (with the framing CRCs repaired, so they reach the field decoders). The interpreter is
//! `blockemu_core::state::fuzz`. `BLOCKEMU_WRITE_STATE_CORPUS=1` rewrites the seeds.

mod fuzz_common;

use std::path::{Path, PathBuf};

use blockemu_core::ide::IdeChannel;
use blockemu_core::state::{self, fuzz};
use fuzz_common::{count_panics, panics, replay_corpus, Rng};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state")
}

fn ide_cmd(ch: &IdeChannel, regs: &[(u8, u8)]) {
    for &(r, v) in regs {
        ch.ioport_write(r, u32::from(v), 1).unwrap();
    }
    ch.drain(None).unwrap();
}

/// The seeds: fresh devices; an IDE PIO read half done and a virtio queue with a chain
/// pending; an IDE DMA registered; a PIO write half done on the slave.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let d = fuzz::Devices::new();
    d.vblk.stop().unwrap();
    out.push(("fresh", state::save(&d.list()).unwrap()));

    let d = fuzz::Devices::new();
    d.ide.start();
    ide_cmd(&d.ide, &[(2, 3), (3, 1), (6, 0xE0), (7, 0x20)]);
    assert_eq!(d.ide.read_data(200).len(), 200);
    let v = &d.vblk;
    for s in [0u32, 1, 3] {
        v.mmio_write(0x70, s, 4).unwrap();
    }
    v.mmio_write(0x24, 1, 4).unwrap();
    v.mmio_write(0x20, 1, 4).unwrap();
    v.mmio_write(0x70, 0xB, 4).unwrap();
    v.mmio_write(0x38, u32::from(fuzz::QUEUE), 4).unwrap();
    for (off, addr) in [(0x80, 0x1000u32), (0x90, 0x2000), (0xA0, 0x3000)] {
        v.mmio_write(off, addr, 4).unwrap();
    }
    v.mmio_write(0x44, 1, 4).unwrap();
    v.mmio_write(0x70, 0xF, 4).unwrap();
    v.stop().unwrap();
    let m = &d.mem;
    m.write_u32(0x4000, 0).unwrap();
    m.write_u64(0x4008, 2).unwrap();
    for (i, (addr, len, flags)) in [(0x4000u64, 16u32, 1u16), (0x5000, 512, 3), (0x6000, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let at = 0x1000 + 16 * i as u64;
        m.write_u64(at, addr).unwrap();
        m.write_u32(at + 8, len).unwrap();
        m.write_u16(at + 12, flags).unwrap();
        m.write_u16(at + 14, i as u16 + 1).unwrap();
    }
    m.write_u16(0x2004, 0).unwrap();
    m.write_u16(0x2002, 1).unwrap();
    v.mmio_write(0x50, 0, 4).unwrap();
    out.push(("pio_read_virtio_pending", state::save(&d.list()).unwrap()));

    let d = fuzz::Devices::new();
    d.ide.start();
    d.mem.write_u32(0x100, 0x8000).unwrap();
    d.mem.write_u32(0x104, 0x8000_0000 | 1024).unwrap();
    d.ide.bmdma_write(4, 0x100, 4).unwrap();
    ide_cmd(&d.ide, &[(2, 2), (3, 9), (6, 0xE0), (7, 0xC8)]);
    d.vblk.stop().unwrap();
    out.push(("dma_registered", state::save(&d.list()).unwrap()));

    let d = fuzz::Devices::new();
    d.ide.start();
    ide_cmd(&d.ide, &[(6, 0xF0), (2, 2), (3, 4), (7, 0x30)]);
    assert_eq!(d.ide.write_data(&[7; 100]), 100);
    d.vblk.stop().unwrap();
    out.push(("slave_pio_write", state::save(&d.list()).unwrap()));
    out
}

#[test]
fn seeds_load_and_the_corpus_replays_without_a_panic() {
    count_panics();
    for (name, data) in seeds() {
        let d = fuzz::Devices::new();
        state::load(&d.list(), &data).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        if std::env::var_os("BLOCKEMU_WRITE_STATE_CORPUS").is_some() {
            std::fs::create_dir_all(corpus_dir()).unwrap();
            let mut file = vec![1u8];
            file.extend_from_slice(&data);
            std::fs::write(corpus_dir().join(name), file).unwrap();
        }
    }
    replay_corpus(&corpus_dir(), 3, fuzz::replay);
}

#[test]
fn seeded_mutations_with_repaired_crcs_never_panic() {
    count_panics();
    let seeds = seeds();
    let mut rng = Rng(0x5EED_57A7E);
    let rounds = if cfg!(debug_assertions) { 1000 } else { 5000 };
    for round in 0..rounds {
        let (_, seed) = &seeds[round % seeds.len()];
        let mut data = vec![1u8 | (rng.next() as u8 & 2)];
        data.extend_from_slice(seed);
        for _ in 0..1 + rng.next() % 4 {
            let i = 1 + (rng.next() as usize) % (data.len() - 1);
            match rng.next() % 4 {
                0 => data[i] ^= 1 << (rng.next() % 8),
                1 => data[i] = rng.next() as u8,
                2 => data[i] = 0xFF,
                _ => data[i] = 0,
            }
        }
        fuzz::replay(&data);
        assert_eq!(panics(), 0, "round {round} panicked");
    }
}
