//! Raw guest access sequences against an IDE channel, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/ata.rs`) and the regression test that replays its corpus
//! (`tests/ide_fuzz_corpus.rs`): nothing a guest does may panic, hang or leave a present disk
//! unable to reset (SRST always ends at status 0x50).
//!
//! Input layout: 1 byte of setup (bit 0 start() first, bit 1 slave present, bit 2 user
//! geometry, bit 3 write cache off), then 4-byte operations: kind, offset, value lo, value hi.

use std::sync::Arc;
use std::time::Duration;

use super::{IdeChannel, IdeDisk, IdeDiskConfig};
use crate::block::{memory_node, FaultInjector, FaultRules, OpKind};
use crate::guest_memory::GuestMemory;

const SECTORS: u64 = 256;
const WAIT: Option<Duration> = Some(Duration::from_secs(30));

fn disk(setup: u8, rules: &Arc<FaultRules>) -> Arc<IdeDisk> {
    let r = rules.clone();
    let node = memory_node(SECTORS * 512, false, move |b| {
        Arc::new(FaultInjector::new(b, r))
    })
    .unwrap();
    let config = IdeDiskConfig {
        cyls: if setup & 4 != 0 { 4 } else { 0 },
        heads: if setup & 4 != 0 { 4 } else { 0 },
        secs: if setup & 4 != 0 { 16 } else { 0 },
        write_cache: setup & 8 == 0,
        ..IdeDiskConfig::default()
    };
    Arc::new(IdeDisk::new(Arc::new(node), config).unwrap())
}

/// Plays one fuzz input (see the module docs) against a fresh channel and checks that a
/// soft reset brings the master back to 0x50.
pub fn replay(data: &[u8]) {
    let Some((&setup, ops)) = data.split_first() else {
        return;
    };
    let rules = Arc::new(FaultRules::new());
    // One bad sector, so error paths run too.
    rules
        .fail_range(100 * 512, 512, Some(OpKind::Read), 5)
        .unwrap();
    rules
        .fail_range(101 * 512, 512, Some(OpKind::Write), 5)
        .unwrap();
    let memory = Arc::new(GuestMemory::new(1 << 16).unwrap());
    let slave = (setup & 2 != 0).then(|| disk(setup, &rules));
    let ch = IdeChannel::new(Some(disk(setup, &rules)), slave, Some(memory.clone())).unwrap();
    if setup & 1 != 0 {
        ch.start();
    }
    for op in ops.chunks_exact(4).take(4096) {
        let offset = op[1];
        let value = u32::from(u16::from_le_bytes([op[2], op[3]]));
        match op[0] % 12 {
            0 => {
                let _ = ch.ioport_read(offset % 8, [1, 2, 4][usize::from(offset / 8 % 3)]);
            }
            1 | 2 => {
                let reg = offset % 8;
                let size = if reg == 0 {
                    [1, 2, 4][usize::from(offset / 8 % 3)]
                } else {
                    1
                };
                let _ = ch.ioport_write(reg, value, size);
            }
            3 => {
                ch.ctrl_read();
            }
            4 => ch.ctrl_write(op[2]),
            5 => {
                let got = ch.read_data(usize::from(op[2]) * 64);
                assert!(got.len() <= 16 * 512);
            }
            6 => {
                let n = usize::from(op[2]) * 64;
                let taken = ch.write_data(&vec![op[3]; n]);
                assert!(taken <= n);
            }
            7 => {
                let _ = ch.bmdma_read(offset % 8, [1, 2, 4][usize::from(offset / 8 % 3)]);
            }
            8 => {
                let _ = ch.bmdma_write(offset % 8, value | u32::from(op[3]) << 16, 1);
            }
            9 => {
                // PRD entry or buffer bytes in guest memory.
                let addr = u64::from(value) & 0xFFF8;
                let _ = memory.write_u32(addr, u32::from(op[1]) << 8 | 0x1000);
                let _ = memory.write_u32(addr + 4, u32::from(op[3]) << 24 | u32::from(op[2]) << 1);
            }
            10 => ch.drain(WAIT).unwrap(),
            _ => {
                let _ = ch.wait_irq(Some(Duration::ZERO));
            }
        }
    }
    // Whatever happened, a soft reset brings the master back to 0x50.
    ch.drain(WAIT).unwrap();
    ch.ctrl_write(0x00);
    ch.ctrl_write(0x04);
    ch.ctrl_write(0x00);
    ch.drain(WAIT).unwrap();
    ch.ioport_write(6, 0xA0, 1).unwrap();
    assert_eq!(ch.ioport_read(7, 1).unwrap(), 0x50);
}
