//! A scripted guest for the IDE integration tests: register helpers in ide.md §11 notation.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use blockemu_core::block::{memory_node, BlockNode, FaultInjector, FaultRules};
use blockemu_core::guest_memory::GuestMemory;
use blockemu_core::ide::{IdeChannel, IdeDisk, IdeDiskConfig};

pub const F1_SECTORS: u64 = 131_072;
pub const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// Sector k holds k (LE) in bytes 0-3 and k & 0xFF elsewhere.
pub fn pattern(k: u64) -> Vec<u8> {
    let mut s = vec![k as u8; 512];
    s[..4].copy_from_slice(&(k as u32).to_le_bytes());
    s
}

pub fn pattern_node(sectors: u64, rules: Option<Arc<FaultRules>>) -> Arc<BlockNode> {
    let node = memory_node(sectors * 512, false, move |b| match rules {
        Some(r) => Arc::new(FaultInjector::new(b, r)),
        None => b,
    })
    .unwrap();
    let mut all = Vec::with_capacity((sectors * 512) as usize);
    for k in 0..sectors {
        all.extend_from_slice(&pattern(k));
    }
    // Sector 0 blank, so the geometry is the size default.
    all[..512].fill(0);
    node.write(0, &all).unwrap();
    Arc::new(node)
}

pub struct Guest {
    pub ch: IdeChannel,
    pub node: Arc<BlockNode>,
    pub memory: Option<Arc<GuestMemory>>,
}

impl Guest {
    pub fn with(node: Arc<BlockNode>, config: IdeDiskConfig, memory: bool) -> Guest {
        let disk = Arc::new(IdeDisk::new(node.clone(), config).unwrap());
        let memory = memory.then(|| Arc::new(GuestMemory::new(1 << 20).unwrap()));
        let ch = IdeChannel::new(Some(disk), None, memory.clone()).unwrap();
        ch.start();
        let g = Guest { ch, node, memory };
        g.settle();
        g
    }

    /// F1: 64 MiB, geometry 130/16/63 guessed, serial QM00001.
    pub fn f1() -> Guest {
        Self::f1_with(None, false)
    }

    pub fn f1_with(rules: Option<Arc<FaultRules>>, memory: bool) -> Guest {
        let config = IdeDiskConfig {
            serial: Some("QM00001".into()),
            ..IdeDiskConfig::default()
        };
        Self::with(pattern_node(F1_SECTORS, rules), config, memory)
    }

    pub fn w(&self, r: u8, v: u8) {
        self.ch.ioport_write(r, u32::from(v), 1).unwrap();
    }
    pub fn r(&self, r: u8) -> u8 {
        self.ch.ioport_read(r, 1).unwrap() as u8
    }
    pub fn ctl(&self, v: u8) {
        self.ch.ctrl_write(v);
    }
    pub fn alt(&self) -> u8 {
        self.ch.ctrl_read()
    }
    pub fn d16(&self) -> u16 {
        self.ch.ioport_read(0, 2).unwrap() as u16
    }
    pub fn d16w(&self, v: u16) {
        self.ch.ioport_write(0, u32::from(v), 2).unwrap();
    }
    pub fn irq(&self) -> bool {
        self.ch.irq()
    }
    pub fn settle(&self) {
        self.ch.drain(WAIT).unwrap();
    }
    pub fn words(&self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.d16()).collect()
    }
    pub fn bytes(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let chunk = self.ch.read_data(n - out.len());
            assert!(!chunk.is_empty(), "no DRQ data (status {:#x})", self.alt());
            out.extend(chunk);
        }
        out
    }
    /// LBA28 command with count and LBA.
    pub fn lba28(&self, cmd: u8, lba: u32, count: u8) {
        self.w(2, count);
        self.w(3, lba as u8);
        self.w(4, (lba >> 8) as u8);
        self.w(5, (lba >> 16) as u8);
        self.w(6, 0xE0 | ((lba >> 24) as u8 & 0x0F));
        self.w(7, cmd);
    }
    pub fn lba48(&self, cmd: u8, lba: u64, count: u16) {
        self.w(2, (count >> 8) as u8);
        self.w(3, (lba >> 24) as u8);
        self.w(4, (lba >> 32) as u8);
        self.w(5, (lba >> 40) as u8);
        self.w(2, count as u8);
        self.w(3, lba as u8);
        self.w(4, (lba >> 8) as u8);
        self.w(5, (lba >> 16) as u8);
        self.w(6, 0x40);
        self.w(7, cmd);
    }
    pub fn identify(&self) -> Vec<u16> {
        self.w(6, 0xA0);
        self.w(7, 0xEC);
        self.settle();
        assert_eq!(self.r(7), 0x58);
        self.words(256)
    }
    pub fn srst(&self) {
        self.ctl(0x0C);
        self.ctl(0x08);
        self.settle();
    }
}

/// Guest-physical address of the PRD table the DMA tests build.
pub const PRD: u64 = 0x1000;
/// Guest-physical address of the DMA data buffer.
pub const BUF: u64 = 0x8000;
/// End-of-table bit of a PRD entry's second dword.
pub const EOT: u32 = 0x8000_0000;

/// Writes a PRD table (address, count|flags) at `PRD`, stops the bus master, clears its
/// status and points it at the table.
pub fn prd(g: &Guest, entries: &[(u32, u32)]) {
    let mem = g.memory.as_ref().unwrap();
    for (i, &(addr, word)) in entries.iter().enumerate() {
        mem.write_u32(PRD + 8 * i as u64, addr).unwrap();
        mem.write_u32(PRD + 8 * i as u64 + 4, word).unwrap();
    }
    g.ch.bmdma_write(0, 0, 1).unwrap();
    g.ch.bmdma_write(2, 0x06, 1).unwrap();
    g.ch.bmdma_write(4, PRD as u32, 4).unwrap();
}

/// The bus master's status register.
pub fn bm_status(g: &Guest) -> u8 {
    g.ch.bmdma_read(2, 1).unwrap() as u8
}
