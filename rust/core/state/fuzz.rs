//! Fuzz bytes → a device-state load into fresh devices, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/state.rs`) and the corpus replay test (`tests/state_fuzz_corpus.rs`).
//!
//! Input: one mode byte, then a stream. Mode bit 0 set: the framing checksums are repaired
//! first ([`repair_crcs`]), so that mutations reach the field decoders and the device checks
//! instead of stopping at the CRC. The devices: guest RAM of [`MEM`] bytes ("ram"), an IDE
//! channel with two 1 MiB disks and a bus master on that RAM ("ide0"), a virtio-blk device
//! with queues of [`QUEUE`] on it ("vblk"). What is checked: nothing panics, a failed load
//! is a State error, and a load that succeeded leaves devices that keep working: registers
//! and data ports are poked, the devices started, drained and saved again.

use std::sync::Arc;
use std::time::Duration;

use super::crc::crc32c;
use super::{Device, MAX_SECTION_SIZE};
use crate::block::memory_node;
use crate::guest_memory::GuestMemory;
use crate::ide::{IdeChannel, IdeDisk, IdeDiskConfig};
use crate::virtio::{VirtioBlk, VirtioBlkConfig};
use crate::ErrorKind;

pub const MEM: usize = 0x10000;
pub const QUEUE: u16 = 16;
const DISK: u64 = 1 << 20;
const DRAIN: Option<Duration> = Some(Duration::from_secs(30));

/// The fuzz target's device set.
pub struct Devices {
    pub mem: Arc<GuestMemory>,
    pub ide: IdeChannel,
    pub vblk: VirtioBlk,
}

impl Devices {
    pub fn new() -> Devices {
        let mem = Arc::new(GuestMemory::new(MEM).expect("guest memory"));
        let disk = || {
            let node = Arc::new(memory_node(DISK, false, |b| b).expect("memory node"));
            Some(Arc::new(
                IdeDisk::new(node, IdeDiskConfig::default()).expect("IDE disk"),
            ))
        };
        let ide = IdeChannel::new(disk(), disk(), Some(mem.clone())).expect("IDE channel");
        let node = Arc::new(memory_node(DISK, false, |b| b).expect("memory node"));
        let vblk = VirtioBlk::new(
            node,
            mem.clone(),
            VirtioBlkConfig {
                queue_size: QUEUE,
                ..VirtioBlkConfig::default()
            },
        )
        .expect("virtio-blk");
        Devices { mem, ide, vblk }
    }

    pub fn list(&self) -> [(&'static str, Device<'_>); 3] {
        [
            ("ide0", Device::Ide(&self.ide)),
            ("ram", Device::Memory(&self.mem)),
            ("vblk", Device::Virtio(&self.vblk)),
        ]
    }
}

impl Default for Devices {
    fn default() -> Self {
        Self::new()
    }
}

/// Recomputes every section CRC and the end record's stream CRC and section count, as far
/// as the framing can be followed (a length beyond the input stops the walk).
pub fn repair_crcs(data: &mut [u8]) {
    let mut at = 12;
    let mut count = 0u32;
    let rd = |d: &[u8], at: usize, n: usize| d.get(at..at + n).map(<[u8]>::to_vec);
    while at < data.len() {
        match data[at] {
            0x53 => {
                let start = at;
                let mut p = at + 1;
                for _ in 0..2 {
                    let Some(&n) = data.get(p) else { return };
                    p += 1 + usize::from(n);
                }
                p += 8;
                let Some(len) = rd(data, p, 8) else { return };
                let len = u64::from_le_bytes(len.try_into().expect("8"));
                if len > MAX_SECTION_SIZE {
                    return;
                }
                p += 8;
                let end = match p.checked_add(len as usize) {
                    Some(e) if e + 4 <= data.len() => e,
                    _ => return,
                };
                let crc = crc32c(&data[start..end]);
                data[end..end + 4].copy_from_slice(&crc.to_le_bytes());
                at = end + 4;
                count += 1;
            }
            0x45 => {
                if at + 9 <= data.len() {
                    let crc = crc32c(&data[..at]);
                    data[at + 1..at + 5].copy_from_slice(&count.to_le_bytes());
                    data[at + 5..at + 9].copy_from_slice(&crc.to_le_bytes());
                }
                return;
            }
            _ => return,
        }
    }
}

/// Loads `data` (mode byte + stream) into fresh devices and exercises them.
pub fn replay(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut stream = stream.to_vec();
    if mode & 1 != 0 {
        repair_crcs(&mut stream);
    }
    let devs = Devices::new();
    match super::load(&devs.list(), &stream) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::State, "{e}"),
        Ok(()) => exercise(&devs, mode),
    }
}

/// Drives restored devices: they must neither panic nor hang.
fn exercise(d: &Devices, mode: u8) {
    let ide = &d.ide;
    for reg in 1..=7 {
        let _ = ide.ioport_read(reg, 1);
    }
    let _ = ide.ctrl_read();
    let _ = ide.bmdma_read(2, 1);
    if mode & 2 != 0 {
        let _ = ide.write_data(&[0x5A; 8192]);
    } else {
        let _ = ide.read_data(8192);
    }
    let _ = ide.ioport_read(0, 2);
    let _ = ide.bmdma_write(0, 0x09, 1);
    ide.start();
    ide.drain(DRAIN).expect("IDE drains");
    let _ = ide.read_data(8192);
    ide.drain(DRAIN).expect("IDE drains");
    let v = &d.vblk;
    for off in (0..0x100u32).step_by(4) {
        let _ = v.mmio_read(off, 4);
    }
    v.start();
    let _ = v.mmio_write(0x50, 0, 4);
    v.drain(DRAIN).expect("virtio drains");
    v.stop().expect("virtio stops");
    ide.stop().expect("IDE stops");
    // Whatever was restored can be saved again.
    let again = super::save(&d.list());
    if let Err(e) = again {
        assert_eq!(e.kind(), ErrorKind::State, "{e}");
    }
}
