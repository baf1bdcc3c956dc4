//! IDENTIFY geometry and capacity words for disks A (30 MiB), B (4 GiB) and D (256 GiB),
//! geometry.md scenarios 1-5 and 7-9, on sparse raw files.

mod ide_common;

use std::sync::Arc;

use blockemu_core::block::{create_image, open_image, Format, ImageOptions};
use blockemu_core::ide::IdeDiskConfig;
use ide_common::Guest;

fn disk(sectors: u64) -> (Guest, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    create_image(&path, sectors * 512, Format::Raw).unwrap();
    let node = open_image(path.to_str().unwrap(), &ImageOptions::default(), |b| b).unwrap();
    (
        Guest::with(Arc::new(node), IdeDiskConfig::default(), false),
        dir,
    )
}

#[test]
fn geometry_and_capacity_words() {
    // (sectors, C/H/S, w57, w58, w60, w61, w100..103)
    type Case = (u64, [u16; 3], [u16; 4], [u16; 4]);
    let cases: [Case; 3] = [
        (
            61_440,
            [60, 16, 63],
            [0xEC40, 0x0000, 0xF000, 0x0000],
            [0xF000, 0, 0, 0],
        ),
        (
            8_388_608,
            [8322, 16, 63],
            [0xFFE0, 0x007F, 0x0000, 0x0080],
            [0, 0x0080, 0, 0],
        ),
        (
            536_870_912,
            [16383, 16, 63],
            [0xFC10, 0x00FB, 0xFFFF, 0x0FFF],
            [0, 0x2000, 0, 0],
        ),
    ];
    for (sectors, chs, capacity, lba48) in cases {
        let (g, _dir) = disk(sectors);
        let w = g.identify();
        assert_eq!([w[1], w[3], w[6]], chs, "{sectors}");
        assert_eq!([w[54], w[55], w[56]], chs);
        assert_eq!([w[57], w[58], w[60], w[61]], capacity);
        assert_eq!([w[100], w[101], w[102], w[103]], lba48);
        assert_eq!(
            (w[53], w[49], w[83], w[86], w[47]),
            (7, 0x0B00, 0x7400, 0x3400, 0x8010)
        );
        // READ NATIVE MAX: LBA28 on A-sized and LBA48 on D-sized disks.
        if sectors < 1 << 28 {
            g.w(6, 0xE0);
            g.w(7, 0xF8);
            let max = sectors - 1;
            assert_eq!(
                [g.r(3), g.r(4), g.r(5), g.r(6) & 0x0F],
                [
                    max as u8,
                    (max >> 8) as u8,
                    (max >> 16) as u8,
                    (max >> 24) as u8
                ]
            );
        } else {
            g.w(6, 0x40);
            g.w(7, 0x27);
            let max = sectors - 1;
            let low = [g.r(3), g.r(4), g.r(5)];
            g.ctl(0x88);
            let high = [g.r(3), g.r(4), g.r(5)];
            g.ctl(0x08);
            assert_eq!(low, [max as u8, (max >> 8) as u8, (max >> 16) as u8]);
            assert_eq!(
                high,
                [(max >> 24) as u8, (max >> 32) as u8, (max >> 40) as u8]
            );
        }
    }
}

#[test]
fn lba28_register_encoding_and_chs_round_trip_on_b() {
    let (g, _dir) = disk(8_388_608);
    g.node.write(1008 * 512, &[0x77; 512]).unwrap();
    g.w(6, 0xA0);
    g.w(5, 0);
    g.w(4, 1);
    g.w(3, 1);
    g.w(2, 1);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), vec![0x77; 512]);
    g.node.write(8_388_575 * 512, &[0x66; 512]).unwrap();
    g.w(6, 0xAF);
    g.w(5, 0x20);
    g.w(4, 0x81);
    g.w(3, 63);
    g.w(2, 1);
    g.w(7, 0x20);
    g.settle();
    assert_eq!(g.bytes(512), vec![0x66; 512]);
}

#[test]
fn lba28_wrap_at_2_28_on_a_large_disk() {
    let (g, _dir) = disk((1 << 28) + 2048);
    g.node.write(0x0FFF_FFFF * 512, &[0x11; 512]).unwrap();
    g.node.write(0, &[0x22; 512]).unwrap();
    g.lba28(0x20, 0x0FFF_FFFF, 2);
    g.settle();
    // Registers advance when a block becomes available; bit 28 is lost.
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(6)], [0, 0, 0, 0xE0]);
    assert_eq!(g.bytes(512), vec![0x11; 512]);
    g.settle();
    // QEMU decodes the wrapped registers: the second sector is LBA 0.
    assert_eq!(g.bytes(512), vec![0x22; 512]);
    // LBA48 at 2^28 and at the end.
    g.lba48(0x24, 1 << 28, 2);
    g.settle();
    g.bytes(512);
    g.settle();
    g.bytes(512);
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(2)], [2, 0, 0, 0]);
    g.ctl(0x88);
    assert_eq!([g.r(3), g.r(4), g.r(5), g.r(2)], [0x10, 0, 0, 0]);
    g.ctl(0x08);
    let n = (1u64 << 28) + 2048;
    g.lba48(0x24, n - 1, 2);
    g.settle();
    g.bytes(512);
    g.settle();
    assert_eq!((g.r(7), g.r(1)), (0x41, 0x04));
}
