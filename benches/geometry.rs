//! The geometry guess on a valid MBR (target < 200 ns) and CHS <-> LBA (target < 5 ns).

use std::hint::black_box;

use blockemu_core::geometry::mbr::{ChsAddress, PartitionEntry, PartitionTable};
use blockemu_core::geometry::{
    chs_to_lba, chs_to_lba_unchecked, lba_to_chs, resolve, Geometry, GeometryConfig, Translation,
};
use criterion::{criterion_group, criterion_main, Criterion};

/// A 16-head, 63-sector table on a 4 GiB disk: the scan stops at entry 0 and keeps it.
fn mbr_16_heads() -> [u8; 512] {
    let mut table = PartitionTable::default();
    table.entries[0] = PartitionEntry {
        boot_indicator: 0x80,
        start: ChsAddress {
            cylinder: 0,
            head: 1,
            sector: 1,
        },
        partition_type: 0x83,
        end: ChsAddress {
            cylinder: 1023,
            head: 15,
            sector: 63,
        },
        start_lba: 63,
        sectors: 8_388_545,
    };
    table.to_boot_sector()
}

fn guess(c: &mut Criterion) {
    let sector = mbr_16_heads();
    let config = GeometryConfig::default();
    c.bench_function("guess/mbr_16_heads", |b| {
        b.iter(|| {
            resolve(
                black_box(&config),
                Some(black_box(&sector[..])),
                black_box(8_388_608),
            )
        })
    });
    c.bench_function("guess/no_signature", |b| {
        let blank = [0u8; 512];
        b.iter(|| {
            resolve(
                black_box(&config),
                Some(black_box(&blank[..])),
                black_box(8_388_608),
            )
        })
    });
}

fn chs(c: &mut Criterion) {
    let g = Geometry {
        cyls: 8322,
        heads: 16,
        secs: 63,
        trans: Translation::Lba,
    };
    c.bench_function("chs/chs_to_lba", |b| {
        b.iter(|| chs_to_lba(black_box(&g), black_box(4160), black_box(7), black_box(31)))
    });
    c.bench_function("chs/lba_to_chs", |b| {
        b.iter(|| lba_to_chs(black_box(&g), black_box(4_194_303)))
    });
    c.bench_function("chs/chs_to_lba_unchecked", |b| {
        b.iter(|| {
            chs_to_lba_unchecked(
                black_box(16),
                black_box(63),
                black_box(4160),
                black_box(7),
                black_box(31),
            )
        })
    });
}

criterion_group!(benches, guess, chs);
criterion_main!(benches);
