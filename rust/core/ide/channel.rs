//! An IDE channel: two drive slots sharing one task-file bus, one IRQ line, one Device
//! Control register and (optionally) a bus master. Register accesses run under the channel
//! lock and never touch storage; backend work is submitted to the worker pool as actions
//! after the lock is released, and its completion re-takes the lock, checks that no reset
//! happened since (generation + per-drive command sequence), sets status and raises the IRQ.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::addressing::{self, ChsShape};
use super::commands::{self, CommandInfo};
use super::disk::DiscardMode;
use super::disk::{IdeDisk, DEFAULT_FIRMWARE, DEFAULT_MODEL};
use super::dma::{self, BusMaster, DmaKind, BM_CMD_START, BM_STATUS_ACTIVE, BM_STATUS_INTERRUPT};
use super::identify::MAX_MULT_SECTORS;
use super::pio::{EndOfBlock, Lookup, PioTransfer, ReadAhead};
use super::regs::*;
use crate::block::BlockNode;
use crate::guest_memory::GuestMemory;
use crate::jobs::{Job, Owner, WorkerPool};
use crate::{interrupt, Error, Result, SECTOR_SIZE};

/// Most sectors one backend read of a PIO read fetches ahead (128 KiB).
pub const READ_AHEAD_SECTORS: u64 = 256;

/// How long a soft reset shows BSY when nobody waits for it. QEMU completes it in a bottom
/// half after the Device Control write returned, so BSY is observable right after SRST; real
/// drives take milliseconds and drivers wait longer (SeaBIOS 2 ms, then polls; Linux 150 ms).
/// The reset needs no storage: it completes at the first channel access after this delay, or
/// at once when someone drains the channel (`drain`, `stop`).
pub const SRST_DELAY: Duration = Duration::from_millis(10);

/// Default serial numbers: QEMU numbers its IDE slots "QM%05d" in creation order, so the
/// primary channel's master and slave are QM00001 and QM00002. A channel does not know
/// whether it is primary; it numbers like the primary one (deterministic whatever else the
/// process created). Give `serial` explicitly for a secondary channel (QEMU: 3 and 4).
const MASTER_SERIAL: u32 = 1;

/// One drive slot: its task file and everything QEMU keeps per drive.
#[derive(Debug, Clone)]
pub struct Drive {
    pub tf: TaskFile,
    pub present: bool,
    pub disk: Option<Arc<IdeDisk>>,
    pub pio: PioTransfer,
    pub read_ahead: ReadAhead,
    /// Sectors per DRQ block of the running command.
    pub req_nb_sectors: u32,
    pub mult_sectors: u32,
    pub identify: [u16; 256],
    pub identify_set: bool,
    pub write_cache: bool,
    /// Heads/sectors set by INITIALIZE DEVICE PARAMETERS.
    pub chs_override: Option<ChsShape>,
    pub reset_reverts: bool,
    pub smart_enabled: bool,
    pub smart_autosave: bool,
    pub smart_selftests: u8,
    /// The self-test log entries (24 bytes each from offset 2, as READ LOG 6 returns them).
    pub smart_selftest_log: Vec<u8>,
    /// A command that waits for the geometry prefetch (status BSY meanwhile).
    pub pending: Option<CommandInfo>,
    /// Bumped by every accepted command and reset: completions of older ones are dropped.
    pub seq: u64,
    pub serial: String,
}

impl Drive {
    fn new(disk: Option<Arc<IdeDisk>>, serial_number: u32) -> Self {
        let present = disk.is_some();
        let serial = disk
            .as_ref()
            .and_then(|d| d.config().serial.clone())
            .unwrap_or_else(|| format!("QM{serial_number:05}"));
        let write_cache = disk.as_ref().is_none_or(|d| d.config().write_cache);
        let mut tf = TaskFile::default();
        tf.reset(present);
        Drive {
            tf,
            present,
            disk,
            pio: PioTransfer::default(),
            read_ahead: ReadAhead::default(),
            req_nb_sectors: 1,
            mult_sectors: MAX_MULT_SECTORS,
            identify: [0; 256],
            identify_set: false,
            write_cache,
            chs_override: None,
            reset_reverts: false,
            smart_enabled: true,
            smart_autosave: true,
            smart_selftests: 0,
            smart_selftest_log: vec![0; 512],
            pending: None,
            seq: 0,
            serial,
        }
    }

    pub fn total_sectors(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.total_sectors())
    }

    pub(crate) fn strings(&self) -> (String, String) {
        let model = self
            .disk
            .as_ref()
            .and_then(|d| d.config().model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        (model, DEFAULT_FIRMWARE.to_string())
    }
}

/// Backend work decided under the lock, submitted after it is released.
#[derive(Debug)]
pub(crate) enum Action {
    Read {
        unit: usize,
        seq: u64,
        lba: u64,
        sectors: u64,
        block: u64,
    },
    Write {
        unit: usize,
        seq: u64,
        lba: u64,
        data: Vec<u8>,
        flush: bool,
    },
    Flush {
        unit: usize,
        seq: u64,
    },
    Geometry {
        unit: usize,
        seq: Option<u64>,
    },
    Dma {
        unit: usize,
        seq: u64,
        lba: u64,
        sectors: u64,
        prd: dma::PrdList,
        kind: DmaKind,
        flush: bool,
        /// TRIM: capacity for the per-range check, and whether ranges are discarded.
        total: u64,
        unmap: bool,
    },
    Reset,
}

/// The state of the channel (plain data, so a later change can serialize it).
#[derive(Debug, Clone)]
pub struct ChannelState {
    pub drives: [Drive; 2],
    /// The selected drive (DEV bit of the last Device write).
    pub unit: usize,
    /// Device Control as last written (SRST cleared when a reset completes).
    pub ctrl: u8,
    pub irq: bool,
    /// How often the line was raised (tests count interrupts with it).
    pub irq_raises: u64,
    /// Bumped by SRST: completions of older generations are dropped.
    pub gen: u64,
    /// A soft reset is pending (BSY shown) and completes at this instant, or later: not
    /// before the backend operations of this channel have finished.
    pub reset_due: Option<Instant>,
    /// Backend operations of this channel submitted and not finished, every generation
    /// (not device state: the operations of this process). A soft reset waits for them, as
    /// QEMU's reset drains the I/O in flight: otherwise a guest that repeats "command, SRST"
    /// against slow storage would queue operations without bound, and a write of an older
    /// generation could land after a newer one.
    pub(crate) ops_in_flight: u32,
    pub bm: Option<BusMaster>,
    /// Guest memory the bus master reads PRD tables from (not device state).
    pub(crate) memory_hint: Option<MemoryRef>,
}

fn ok_tf(d: &Drive) -> bool {
    d.tf.status & (BSY | DRQ) == 0
}

impl ChannelState {
    fn new(master: Option<Arc<IdeDisk>>, slave: Option<Arc<IdeDisk>>, bus_master: bool) -> Self {
        ChannelState {
            drives: [
                Drive::new(master, MASTER_SERIAL),
                Drive::new(slave, MASTER_SERIAL + 1),
            ],
            unit: 0,
            ctrl: 0,
            irq: false,
            irq_raises: 0,
            gen: 0,
            reset_due: None,
            ops_in_flight: 0,
            bm: bus_master.then(BusMaster::default),
            memory_hint: None,
        }
    }

    fn any_present(&self) -> bool {
        self.drives[0].present || self.drives[1].present
    }

    /// Raises the line unless nIEN is set (QEMU checks nIEN only here; nothing is latched).
    pub(crate) fn set_irq(&mut self) {
        if self.ctrl & CTRL_NIEN == 0 {
            self.irq = true;
            self.irq_raises += 1;
            if let Some(bm) = &mut self.bm {
                bm.status |= BM_STATUS_INTERRUPT;
            }
        }
    }

    pub(crate) fn chs_shape(&self, unit: usize) -> ChsShape {
        let d = &self.drives[unit];
        d.chs_override
            .or_else(|| {
                d.disk
                    .as_ref()
                    .and_then(|disk| disk.geometry())
                    .map(|g| ChsShape {
                        heads: g.heads,
                        secs: g.secs,
                    })
            })
            .unwrap_or(ChsShape { heads: 0, secs: 0 })
    }

    /// ABRT: status 0x41, error ABRT, transfer stopped (no IRQ here).
    pub(crate) fn abort(&mut self, unit: usize) {
        self.transfer_stop(unit);
        let d = &mut self.drives[unit];
        d.read_ahead.clear();
        d.tf.status = DRDY | ERR;
        d.tf.error = ABRT;
    }

    /// A failed or out-of-range read/write: ABRT and IRQ.
    fn rw_error(&mut self, unit: usize) {
        self.abort(unit);
        self.set_irq();
    }

    pub(crate) fn transfer_start(&mut self, unit: usize, data: Vec<u8>, end: EndOfBlock) {
        let d = &mut self.drives[unit];
        d.pio.start(data, end);
        if d.tf.status & ERR == 0 {
            d.tf.status |= DRQ;
        }
    }

    fn transfer_stop(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.pio.halt();
        d.tf.status &= !DRQ;
    }

    pub(crate) fn flush_action(&self, unit: usize) -> Action {
        Action::Flush {
            unit,
            seq: self.drives[unit].seq,
        }
    }

    // ---- commands ---------------------------------------------------------------------

    fn exec_command(&mut self, opcode: u8, out: &mut Vec<Action>) {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        // Commands to an absent device 1 are dropped entirely.
        if unit == 1 && !d.present {
            return;
        }
        if !ok_tf(d) {
            return;
        }
        let Some(info) = commands::lookup(opcode) else {
            self.abort(unit);
            self.set_irq();
            return;
        };
        d.tf.status = DRDY | BSY;
        d.tf.error = 0;
        d.seq += 1;
        self.run_command(unit, info, out);
    }

    fn run_command(&mut self, unit: usize, info: CommandInfo, out: &mut Vec<Action>) {
        let d = &mut self.drives[unit];
        if let Some(disk) = d.disk.clone() {
            if info.cmd.needs_geometry(&d.tf) {
                match disk.prefetch().get() {
                    None => {
                        d.pending = Some(info);
                        out.push(Action::Geometry {
                            unit,
                            seq: Some(d.seq),
                        });
                        return;
                    }
                    Some(Err(_)) => {
                        self.abort(unit);
                        self.set_irq();
                        return;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
        if self.handle(unit, info.cmd, out) {
            let d = &mut self.drives[unit];
            d.tf.status &= !BSY;
            if info.set_dsc && d.tf.error == 0 {
                d.tf.status |= DSC;
            }
            self.set_irq();
        }
    }

    // ---- PIO data-in ------------------------------------------------------------------

    /// QEMU's per-block read step: at command start and after each drained block.
    pub(crate) fn sector_read(&mut self, unit: usize, out: &mut Vec<Action>) {
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        d.tf.status = DRDY | DSC;
        d.tf.error = 0;
        if d.tf.nsector == 0 {
            self.transfer_stop(unit);
            return;
        }
        d.tf.status |= BSY;
        let lba = addressing::get_sector(&d.tf, chs);
        let n = d.tf.nsector.min(d.req_nb_sectors);
        if !addressing::range_ok(lba, u64::from(n), d.total_sectors()) {
            self.rw_error(unit);
            return;
        }
        self.serve_block(unit, lba as u64, u64::from(n), out);
    }

    /// Presents the block at `lba` from the read-ahead, or waits (BSY) for it.
    fn serve_block(&mut self, unit: usize, lba: u64, n: u64, out: &mut Vec<Action>) {
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        match d.read_ahead.lookup(lba, n) {
            Lookup::Ready(at) => {
                let data = d.read_ahead.data[at..at + (n * SECTOR_SIZE) as usize].to_vec();
                addressing::set_sector(&mut d.tf, chs, lba + n);
                d.tf.nsector = d.tf.nsector.saturating_sub(n as u32);
                d.tf.status &= !BSY;
                let exhausted = d.read_ahead.end() <= lba + n && d.read_ahead.fail_at.is_none();
                if d.tf.nsector > 0 && exhausted && !d.read_ahead.fetching {
                    // Keep the next backend read going while the guest drains this block.
                    if let Some(action) = self.plan_fetch(unit) {
                        self.drives[unit].read_ahead.fetching = true;
                        out.push(action);
                    }
                }
                self.transfer_start(unit, data, EndOfBlock::SectorRead);
                self.set_irq();
            }
            Lookup::Failed => self.rw_error(unit),
            Lookup::Missing => {
                d.read_ahead.waiting = true;
                if !d.read_ahead.fetching {
                    match self.plan_fetch(unit) {
                        Some(action) => {
                            self.drives[unit].read_ahead.fetching = true;
                            out.push(action);
                        }
                        None => self.rw_error(unit),
                    }
                }
            }
        }
    }

    /// One backend read covering as many whole in-range blocks from the current registers
    /// as are contiguous on disk (the register write-back may wrap), up to 128 KiB.
    fn plan_fetch(&self, unit: usize) -> Option<Action> {
        let chs = self.chs_shape(unit);
        let d = &self.drives[unit];
        let total = d.total_sectors();
        let block = u64::from(d.req_nb_sectors.max(1));
        let first = addressing::get_sector(&d.tf, chs);
        let mut lba = first;
        let mut left = u64::from(d.tf.nsector);
        let mut sectors = 0u64;
        while left > 0 {
            let n = left.min(block);
            if sectors > 0 && sectors + n > READ_AHEAD_SECTORS {
                break;
            }
            if !addressing::range_ok(lba, n, total) {
                break;
            }
            sectors += n;
            left -= n;
            let next = lba as u64 + n;
            if left == 0 || addressing::roundtrip(&d.tf, chs, next) != next as i64 {
                break;
            }
            lba = next as i64;
        }
        (sectors > 0).then_some(Action::Read {
            unit,
            seq: d.seq,
            lba: first as u64,
            sectors,
            block,
        })
    }

    fn read_done(
        &mut self,
        unit: usize,
        seq: u64,
        res: &Result<ReadResult>,
        out: &mut Vec<Action>,
    ) {
        let d = &mut self.drives[unit];
        if d.seq != seq {
            return;
        }
        d.read_ahead.fetching = false;
        let Ok(r) = res else {
            // The job never ran (pool shut down): a waiting block fails like a backend
            // error; otherwise the next block finds nothing and fetches again.
            let waiting = d.read_ahead.waiting;
            d.read_ahead.clear();
            if waiting {
                self.rw_error(unit);
            }
            return;
        };
        d.read_ahead.lba = r.lba;
        d.read_ahead.data = r.data.as_ref().clone();
        d.read_ahead.fail_at = r.fail_at;
        if d.read_ahead.waiting {
            d.read_ahead.waiting = false;
            let chs = self.chs_shape(unit);
            let d = &self.drives[unit];
            let lba = addressing::get_sector(&d.tf, chs);
            let n = d.tf.nsector.min(d.req_nb_sectors);
            if lba < 0 {
                self.rw_error(unit);
                return;
            }
            self.serve_block(unit, lba as u64, u64::from(n), out);
        }
    }

    // ---- PIO data-out -----------------------------------------------------------------

    fn sector_write(&mut self, unit: usize, out: &mut Vec<Action>) {
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        d.tf.status = DRDY | DSC | BSY;
        let lba = addressing::get_sector(&d.tf, chs);
        let n = d.tf.nsector.min(d.req_nb_sectors);
        if !addressing::range_ok(lba, u64::from(n), d.total_sectors()) {
            self.rw_error(unit);
            return;
        }
        // The block goes to the backend; the transfer is left with nothing to move (pos 0 of
        // an empty block, QEMU's data_ptr == data_end), never a position past its end.
        let mut data = std::mem::take(&mut d.pio.buf);
        d.pio.pos = 0;
        data.resize((u64::from(n) * SECTOR_SIZE) as usize, 0);
        out.push(Action::Write {
            unit,
            seq: d.seq,
            lba: lba as u64,
            data,
            flush: !d.write_cache,
        });
    }

    fn write_done(&mut self, unit: usize, seq: u64, res: &Result<()>) {
        if self.drives[unit].seq != seq {
            return;
        }
        if res.is_err() {
            self.rw_error(unit);
            return;
        }
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        d.tf.status &= !BSY;
        let n = d.tf.nsector.min(d.req_nb_sectors);
        d.tf.nsector -= n;
        let lba = addressing::get_sector(&d.tf, chs).max(0) as u64;
        addressing::set_sector(&mut d.tf, chs, lba + u64::from(n));
        if d.tf.nsector == 0 {
            self.transfer_stop(unit);
        } else {
            let next = d.tf.nsector.min(d.req_nb_sectors) as usize;
            self.transfer_start(unit, vec![0; next * 512], EndOfBlock::SectorWrite);
        }
        self.set_irq();
    }

    fn end_of_block(&mut self, unit: usize, out: &mut Vec<Action>) {
        match self.drives[unit].pio.end_of_block {
            EndOfBlock::Idle => {}
            EndOfBlock::Stop => self.transfer_stop(unit),
            EndOfBlock::SectorRead => self.sector_read(unit, out),
            EndOfBlock::SectorWrite => self.sector_write(unit, out),
        }
    }

    fn data_read(&mut self, size: usize, out: &mut Vec<Action>) -> u32 {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if d.tf.status & DRQ == 0 || d.pio.is_out() {
            return 0;
        }
        // An 8-bit read consumes a whole word and returns its low byte.
        let width = size.max(2);
        let Some(bytes) = d.pio.take(width) else {
            return 0;
        };
        let mut value = 0u32;
        for (i, b) in bytes.iter().enumerate() {
            value |= u32::from(*b) << (8 * i);
        }
        if size == 1 {
            value &= 0xFF;
        }
        if d.pio.block_done() {
            d.tf.status &= !DRQ;
            self.end_of_block(unit, out);
        }
        value
    }

    fn data_write(&mut self, value: u32, size: usize, out: &mut Vec<Action>) {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if size == 1 || d.tf.status & DRQ == 0 || !d.pio.is_out() {
            return;
        }
        if !d.pio.put(&value.to_le_bytes()[..size]) {
            return;
        }
        if d.pio.block_done() {
            d.tf.status &= !DRQ;
            self.end_of_block(unit, out);
        }
    }

    fn bulk_read(&mut self, max: usize, out: &mut Vec<Action>) -> Vec<u8> {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if d.tf.status & DRQ == 0 || d.pio.is_out() {
            return Vec::new();
        }
        let n = (max & !1).min(d.pio.remaining());
        let data = d.pio.take(n).map(<[u8]>::to_vec).unwrap_or_default();
        if d.pio.block_done() {
            d.tf.status &= !DRQ;
            self.end_of_block(unit, out);
        }
        data
    }

    fn bulk_write(&mut self, data: &[u8], out: &mut Vec<Action>) -> usize {
        let unit = self.unit;
        let d = &mut self.drives[unit];
        if d.tf.status & DRQ == 0 || !d.pio.is_out() {
            return 0;
        }
        let n = (data.len() & !1).min(d.pio.remaining());
        d.pio.put(&data[..n]);
        if d.pio.block_done() {
            d.tf.status &= !DRQ;
            self.end_of_block(unit, out);
        }
        n
    }

    // ---- DMA --------------------------------------------------------------------------

    pub(crate) fn dma_command(&mut self, unit: usize, kind: DmaKind, out: &mut Vec<Action>) {
        self.drives[unit].tf.status = DRDY | DSC | DRQ;
        let Some(bm) = &mut self.bm else {
            // No bus master: like QEMU's ISA IDE, the command waits forever (until reset).
            return;
        };
        bm.pending = Some((unit, kind));
        if bm.status & BM_STATUS_ACTIVE != 0 {
            self.dma_start(out);
        }
    }

    fn dma_error(&mut self, unit: usize) {
        self.abort(unit);
        if let Some(bm) = &mut self.bm {
            bm.status &= !BM_STATUS_ACTIVE;
            bm.pending = None;
        }
        self.set_irq();
    }

    fn dma_start(&mut self, out: &mut Vec<Action>) {
        let Some(bm) = &mut self.bm else { return };
        // The command stays registered until its transfer ends (QEMU's DMA callback): a
        // command cut short by SRST before START runs when START comes after all.
        let Some((unit, kind)) = bm.pending else {
            return;
        };
        if bm.busy {
            return;
        }
        let (table, cur) = (bm.addr, bm.cur_addr);
        let Some(MemoryRef(memory)) = self.memory_hint.clone() else {
            return;
        };
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        let lba = addressing::get_sector(&d.tf, chs);
        let count = u64::from(d.tf.nsector);
        if count == 0 {
            // Nothing to do (TRIM with count 0, or a registered command that a reset left
            // behind and that finished already): complete at once.
            d.tf.status = DRDY | DSC;
            if let Some(bm) = &mut self.bm {
                bm.status &= !BM_STATUS_ACTIVE;
                bm.pending = None;
            }
            self.set_irq();
            return;
        }
        let (mut prd, next) = dma::walk_prd_from(&memory, table, cur, count * SECTOR_SIZE);
        if let Some(bm) = &mut self.bm {
            bm.cur_addr = next;
        }
        let d = &mut self.drives[unit];
        let sectors = prd.bytes / SECTOR_SIZE;
        if prd.bytes < count * SECTOR_SIZE {
            // PRDs shorter than the request: nothing moves, ACTIVE cleared, no interrupt,
            // no error.
            d.tf.status = DRDY | DSC;
            if let Some(bm) = &mut self.bm {
                bm.status &= !BM_STATUS_ACTIVE;
                bm.pending = None;
            }
            return;
        }
        if kind != DmaKind::Trim && !addressing::range_ok(lba, count, d.total_sectors()) {
            self.dma_error(unit);
            return;
        }
        prd.truncate(sectors * SECTOR_SIZE);
        if let Some(bm) = &mut self.bm {
            bm.busy = true;
        }
        out.push(Action::Dma {
            unit,
            seq: d.seq,
            lba: lba as u64,
            sectors,
            prd,
            kind,
            flush: kind == DmaKind::Write && !d.write_cache,
            total: d.total_sectors(),
            unmap: d
                .disk
                .as_ref()
                .is_some_and(|k| k.config().discard == DiscardMode::Unmap),
        });
    }

    fn dma_done(&mut self, unit: usize, seq: u64, sectors: u64, longer: bool, res: &Result<()>) {
        if self.drives[unit].seq != seq {
            return;
        }
        if let Some(bm) = &mut self.bm {
            bm.busy = false;
            bm.pending = None;
        }
        if res.is_err() {
            self.dma_error(unit);
            return;
        }
        let chs = self.chs_shape(unit);
        let d = &mut self.drives[unit];
        // TRIM is not range checked: CHS sector 0 (-1) advances like any other address.
        let next = addressing::get_sector(&d.tf, chs) + sectors as i64;
        addressing::set_sector(&mut d.tf, chs, next.max(0) as u64);
        // The transfer was sized when it was set up; an SRST in between may have shrunk the
        // count (fuzz crash: subtract overflow), so never go below zero.
        d.tf.nsector = d.tf.nsector.saturating_sub(sectors as u32);
        d.tf.status = DRDY | DSC;
        let done = d.tf.nsector == 0;
        if let Some(bm) = &mut self.bm {
            if done && longer {
                bm.status |= BM_STATUS_ACTIVE;
            } else {
                bm.status &= !BM_STATUS_ACTIVE;
            }
        }
        if done {
            self.set_irq();
        }
    }

    fn bm_command(&mut self, val: u8, out: &mut Vec<Action>) {
        let Some(bm) = &mut self.bm else { return };
        if (val ^ bm.cmd) & BM_CMD_START != 0 {
            if val & BM_CMD_START == 0 {
                // QEMU drains an in-flight transfer here; ours completes on its own.
                bm.status &= !BM_STATUS_ACTIVE;
            } else {
                bm.cur_addr = bm.addr;
                if bm.status & BM_STATUS_ACTIVE != 0 {
                    bm.cmd = val & 0x09;
                    return;
                }
                bm.status |= BM_STATUS_ACTIVE;
                bm.cmd = val & 0x09;
                self.dma_start(out);
            }
        }
        if let Some(bm) = &mut self.bm {
            bm.cmd = val & 0x09;
        }
    }

    // ---- reset ------------------------------------------------------------------------

    /// SRST for one drive: halt PIO, reset (§7.1), then EXECUTE DEVICE DIAGNOSTIC.
    fn srst_drive(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.pio.halt();
        d.read_ahead.clear();
        d.pending = None;
        d.seq += 1;
        let present = d.present;
        d.tf.reset(present);
        d.mult_sectors = MAX_MULT_SECTORS;
        // "Revert to power-on defaults" applies to the next reset only (QEMU clears it).
        if d.reset_reverts {
            d.reset_reverts = false;
            d.chs_override = None;
        }
        self.diagnostic(unit);
    }

    /// Completes a pending soft reset if it is due and no backend operation of the channel
    /// is in flight (or `force`d: a host-side drain, which then waits for them itself).
    fn poll_reset(&mut self, force: bool) {
        match self.reset_due {
            Some(due) if force || (Instant::now() >= due && self.ops_in_flight == 0) => {
                self.reset_due = None;
                self.reset_done();
            }
            _ => {}
        }
    }

    fn reset_done(&mut self) {
        self.srst_drive(0);
        self.srst_drive(1);
        if let Some(bm) = &mut self.bm {
            // An in-flight transfer is over (QEMU drains it, which unregisters it); a
            // command still waiting for START stays registered.
            if bm.busy {
                bm.pending = None;
            }
            bm.busy = false;
        }
        self.ctrl &= !CTRL_SRST;
        if self.any_present() {
            self.set_irq();
        }
    }

    // ---- registers --------------------------------------------------------------------

    fn write_register(&mut self, reg: u8, val: u8, out: &mut Vec<Action>) {
        if reg == REG_STATUS {
            self.ctrl &= !CTRL_HOB;
            self.irq = false;
            self.exec_command(val, out);
            return;
        }
        // Busy interlock: register writes are dropped while the selected drive is busy.
        if !ok_tf(&self.drives[self.unit]) {
            return;
        }
        self.ctrl &= !CTRL_HOB;
        for d in &mut self.drives {
            d.tf.write(reg, val);
        }
        if reg == REG_DEVICE {
            self.unit = usize::from(val & DEV_SELECT != 0);
        }
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let absent_selected = self.unit == 1 && !self.drives[1].present;
        let none = !self.any_present();
        let d = &self.drives[self.unit];
        match reg {
            REG_STATUS => {
                let v = if none || absent_selected {
                    self.finish_unseen_reset();
                    0
                } else {
                    d.tf.status
                };
                self.irq = false;
                v
            }
            REG_ERROR if none || absent_selected => 0,
            _ if none => 0,
            _ => d.tf.read(reg, self.ctrl & CTRL_HOB != 0),
        }
    }

    /// A pending soft reset whose BSY the guest cannot see (the selected unit is absent, so
    /// Status reads 0, "not busy"): from the guest's view it is over, so it completes now
    /// (QEMU completes it in a bottom half before the guest's next access).
    /// Operations still in flight keep it pending (BSY on the present unit) until they end.
    fn finish_unseen_reset(&mut self) {
        if self.reset_due.is_some() && self.ops_in_flight == 0 {
            self.reset_due = None;
            self.reset_done();
        }
    }

    fn alt_status(&mut self) -> u8 {
        if !self.any_present() || (self.unit == 1 && !self.drives[1].present) {
            self.finish_unseen_reset();
            0
        } else {
            self.drives[self.unit].tf.status
        }
    }

    fn write_ctrl(&mut self, val: u8, out: &mut Vec<Action>) {
        if self.ctrl & CTRL_SRST == 0 && val & CTRL_SRST != 0 {
            // Edge-triggered: BSY now, the reset itself completes on a worker.
            for d in &mut self.drives {
                d.tf.status |= BSY;
            }
            self.gen += 1;
            self.reset_due = Some(Instant::now() + SRST_DELAY);
            out.push(Action::Reset);
        }
        self.ctrl = val;
    }
}

/// A handle of the guest memory inside the state (shown, not dumped, by `Debug`).
#[derive(Clone)]
pub struct MemoryRef(pub Arc<GuestMemory>);

impl std::fmt::Debug for MemoryRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestMemory({} bytes)", self.0.len())
    }
}

/// What a read-ahead job brings back.
#[derive(Debug, Clone)]
pub(crate) struct ReadResult {
    lba: u64,
    data: Arc<Vec<u8>>,
    fail_at: Option<u64>,
}

/// Reads `sectors` from `lba`; if that fails, block by block to find the first failing
/// block (everything before it is delivered, QEMU reports the error at that block).
fn read_chunk(node: &BlockNode, lba: u64, sectors: u64, block: u64) -> Result<ReadResult> {
    let mut buf = vec![0u8; (sectors * SECTOR_SIZE) as usize];
    if node.read(lba * SECTOR_SIZE, &mut buf).is_ok() {
        return Ok(ReadResult {
            lba,
            data: Arc::new(buf),
            fail_at: None,
        });
    }
    let mut done = 0u64;
    let mut fail_at = None;
    while done < sectors {
        let n = block.min(sectors - done);
        let range = (done * SECTOR_SIZE) as usize..((done + n) * SECTOR_SIZE) as usize;
        if node
            .read((lba + done) * SECTOR_SIZE, &mut buf[range])
            .is_err()
        {
            fail_at = Some(lba + done);
            break;
        }
        done += n;
    }
    buf.truncate((done * SECTOR_SIZE) as usize);
    Ok(ReadResult {
        lba,
        data: Arc::new(buf),
        fail_at,
    })
}

/// DATA SET MANAGEMENT TRIM: the range list, PRD segment by PRD segment (whole 8-byte
/// entries of each segment), range checked entry by entry; the first bad range fails the
/// command (ranges before it were already handled).
fn trim(
    node: &BlockNode,
    memory: &GuestMemory,
    prd: &dma::PrdList,
    total: u64,
    unmap: bool,
) -> Result<()> {
    for &(addr, len) in &prd.segments {
        let mut buf = vec![0u8; len];
        memory.read(addr, &mut buf)?;
        for chunk in buf.chunks_exact(8) {
            let entry = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let (lba, count) = dma::trim_entry(entry);
            if count == 0 {
                continue;
            }
            if !addressing::range_ok(lba as i64, count, total) {
                return Err(Error::invalid(format!(
                    "TRIM range {lba}+{count} beyond {total} sectors"
                )));
            }
            if unmap {
                node.discard(lba * SECTOR_SIZE, count * SECTOR_SIZE)?;
            }
        }
    }
    Ok(())
}

fn dma_transfer(
    node: &BlockNode,
    memory: &GuestMemory,
    lba: u64,
    prd: &dma::PrdList,
    kind: DmaKind,
    flush: bool,
) -> Result<()> {
    let mut buf = vec![0u8; prd.bytes as usize];
    if kind == DmaKind::Write {
        let mut at = 0;
        for &(addr, len) in &prd.segments {
            memory.read(addr, &mut buf[at..at + len])?;
            at += len;
        }
        node.write(lba * SECTOR_SIZE, &buf)?;
        if flush {
            node.flush()?;
        }
    } else {
        node.read(lba * SECTOR_SIZE, &mut buf)?;
        let mut at = 0;
        for &(addr, len) in &prd.segments {
            memory.write(addr, &buf[at..at + len])?;
            at += len;
        }
    }
    Ok(())
}

struct Shared {
    state: Mutex<ChannelState>,
    /// Notified when the IRQ line rises.
    irq_raised: Condvar,
    in_flight: Mutex<u32>,
    idle: Condvar,
    memory: Option<Arc<GuestMemory>>,
    pool: WorkerPool,
    owner: Owner,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn end(&self) {
        {
            let mut st = lock(&self.state);
            st.ops_in_flight = st.ops_in_flight.saturating_sub(1);
            // A soft reset that waited for this operation completes now.
            let before = st.irq_raises;
            st.poll_reset(false);
            if st.irq_raises != before {
                self.irq_raised.notify_all();
            }
        }
        let mut n = lock(&self.in_flight);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Runs `f` on the state under the lock, then submits the actions it produced.
    fn with_state<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut ChannelState, &mut Vec<Action>) -> R,
    ) -> R {
        let mut out = Vec::new();
        let (r, gen) = {
            let mut st = lock(&self.state);
            let before = st.irq_raises;
            st.poll_reset(false);
            let r = f(&mut st, &mut out);
            if st.irq_raises != before {
                self.irq_raised.notify_all();
            }
            // Counted while the lock is held, so that no reset completes between this
            // decision and the submission (`run` ends the ones it does not submit).
            let ops = out.iter().filter(|a| !matches!(a, Action::Reset)).count() as u32;
            if ops > 0 {
                st.ops_in_flight += ops;
                *lock(&self.in_flight) += ops;
            }
            (r, st.gen)
        };
        self.run(out, gen);
        r
    }

    /// Attaches the completion `f` (run under the lock, if no reset happened since) to `job`,
    /// and the end of the operation counted by `with_state`.
    fn attach<T: Clone + Send + Sync + 'static>(
        self: &Arc<Self>,
        job: Job<T>,
        gen: u64,
        f: impl FnOnce(&mut ChannelState, &Result<T>, &mut Vec<Action>) + Send + 'static,
    ) {
        let me = self.clone();
        job.on_complete_for(&self.owner, move |res| {
            me.with_state(|st, out| {
                if st.gen == gen {
                    f(st, res, out);
                }
            });
        });
        let me = self.clone();
        job.on_complete(move |_| me.end());
    }

    /// Submits `actions`, decided under the lock in generation `gen` (a reset since then
    /// voids their completions). Every action but `Reset` was counted in flight.
    fn run(self: &Arc<Self>, actions: Vec<Action>, gen: u64) {
        for action in actions {
            let disk_of = |unit: usize| lock(&self.state).drives[unit].disk.clone();
            match action {
                Action::Read {
                    unit,
                    seq,
                    lba,
                    sectors,
                    block,
                } => {
                    let Some(disk) = disk_of(unit) else {
                        self.end();
                        continue;
                    };
                    let node = disk.node().clone();
                    let job = self
                        .pool
                        .submit(move || read_chunk(&node, lba, sectors, block));
                    self.attach(job, gen, move |st, res, out| {
                        st.read_done(unit, seq, res, out)
                    });
                }
                Action::Write {
                    unit,
                    seq,
                    lba,
                    data,
                    flush,
                } => {
                    let Some(disk) = disk_of(unit) else {
                        self.end();
                        continue;
                    };
                    let node = disk.node().clone();
                    let job = self.pool.submit(move || {
                        node.write(lba * SECTOR_SIZE, &data)?;
                        if flush {
                            node.flush()?;
                        }
                        Ok(())
                    });
                    self.attach(job, gen, move |st, res, _| st.write_done(unit, seq, res));
                }
                Action::Flush { unit, seq } => {
                    let Some(disk) = disk_of(unit) else {
                        self.end();
                        continue;
                    };
                    let node = disk.node().clone();
                    let job = self.pool.submit(move || node.flush());
                    self.attach(job, gen, move |st, res, _| {
                        let d = &mut st.drives[unit];
                        if d.seq != seq {
                            return;
                        }
                        if res.is_err() {
                            st.rw_error(unit);
                        } else {
                            d.tf.status = DRDY | DSC;
                            st.set_irq();
                        }
                    });
                }
                Action::Geometry { unit, seq } => {
                    let Some(disk) = disk_of(unit) else {
                        self.end();
                        continue;
                    };
                    let job = disk.prefetch().start(&self.pool, disk.node().clone());
                    self.attach(job, gen, move |st, _, out| {
                        let d = &mut st.drives[unit];
                        if seq.is_none() || Some(d.seq) != seq {
                            return;
                        }
                        if let Some(info) = d.pending.take() {
                            if d.disk
                                .as_ref()
                                .is_some_and(|k| k.prefetch().get().is_none())
                            {
                                // Cannot happen (the job is complete); never loop on it.
                                st.abort(unit);
                                st.set_irq();
                                return;
                            }
                            st.run_command(unit, info, out);
                        }
                    });
                }
                Action::Dma {
                    unit,
                    seq,
                    lba,
                    sectors,
                    prd,
                    kind,
                    flush,
                    total,
                    unmap,
                } => {
                    let (Some(disk), Some(memory)) = (disk_of(unit), self.memory.clone()) else {
                        self.end();
                        continue;
                    };
                    let node = disk.node().clone();
                    let longer = prd.longer;
                    let job = self.pool.submit(move || match kind {
                        DmaKind::Trim => trim(&node, &memory, &prd, total, unmap),
                        _ => dma_transfer(&node, &memory, lba, &prd, kind, flush),
                    });
                    self.attach(job, gen, move |st, res, _| {
                        st.dma_done(unit, seq, sectors, longer, res)
                    });
                }
                Action::Reset => {
                    // Completions of the old generation must not land after the reset.
                    self.owner.invalidate();
                }
            }
        }
    }
}

/// An IDE channel (see the module docs). Cheap to share by reference across threads.
pub struct IdeChannel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdeChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdeChannel").finish_non_exhaustive()
    }
}

fn bad_access(what: &str, offset: u8, size: u8) -> Error {
    Error::invalid(format!(
        "invalid {what} access: offset {offset}, size {size}"
    ))
}

impl IdeChannel {
    /// A channel with up to two disks; with `memory`, a bus master DMAs into it.
    pub fn new(
        master: Option<Arc<IdeDisk>>,
        slave: Option<Arc<IdeDisk>>,
        memory: Option<Arc<GuestMemory>>,
    ) -> Result<Self> {
        let mut state = ChannelState::new(master, slave, memory.is_some());
        state.memory_hint = memory.clone().map(MemoryRef);
        Ok(IdeChannel {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                irq_raised: Condvar::new(),
                in_flight: Mutex::new(0),
                idle: Condvar::new(),
                memory,
                pool: WorkerPool::global()?,
                owner: Owner::new(),
            }),
        })
    }

    /// The disk in `unit` (0 master, 1 slave).
    pub fn disk(&self, unit: usize) -> Option<Arc<IdeDisk>> {
        lock(&self.shared.state).drives.get(unit)?.disk.clone()
    }

    pub fn has_bus_master(&self) -> bool {
        self.shared.memory.is_some()
    }

    /// A copy of the whole state (for inspection and, later, migration).
    pub fn state(&self) -> ChannelState {
        lock(&self.shared.state).clone()
    }

    /// For saving: the state, how long a pending soft reset still has to go, and the number
    /// of backend operations in flight — all taken under the lock at one instant.
    pub(crate) fn freeze(&self) -> (ChannelState, Option<Duration>, u32) {
        let st = lock(&self.shared.state);
        let in_flight = *lock(&self.shared.in_flight);
        let srst = st
            .reset_due
            .map(|due| due.saturating_duration_since(Instant::now()));
        (st.clone(), srst, in_flight)
    }

    /// For loading: `f` installs restored state under the lock; then every completion still
    /// on its way is voided (new generation and command sequences), the read-ahead cache is
    /// dropped, and waiters see the restored IRQ line.
    pub(crate) fn restore_with(&self, f: impl FnOnce(&mut ChannelState)) {
        {
            let mut st = lock(&self.shared.state);
            f(&mut st);
            st.gen += 1;
            for d in &mut st.drives {
                d.seq += 1;
                d.read_ahead.clear();
                d.pending = None;
            }
            if st.irq {
                self.shared.irq_raised.notify_all();
            }
        }
        self.shared.owner.invalidate();
    }

    /// Command block read: offset 0 is the data port (size 1, 2 or 4), 1-7 bytes.
    pub fn ioport_read(&self, offset: u8, size: u8) -> Result<u32> {
        match (offset, size) {
            (0, 1 | 2 | 4) => Ok(self
                .shared
                .with_state(|st, out| st.data_read(usize::from(size), out))),
            (1..=7, 1) => Ok(u32::from(
                self.shared.with_state(|st, _| st.read_register(offset)),
            )),
            _ => Err(bad_access("command block", offset, size)),
        }
    }

    /// Command block write: offset 0 is the data port (8-bit writes are ignored).
    pub fn ioport_write(&self, offset: u8, value: u32, size: u8) -> Result<()> {
        match (offset, size) {
            (0, 1 | 2 | 4) => self
                .shared
                .with_state(|st, out| st.data_write(value, usize::from(size), out)),
            (1..=7, 1) => self
                .shared
                .with_state(|st, out| st.write_register(offset, value as u8, out)),
            _ => return Err(bad_access("command block", offset, size)),
        }
        Ok(())
    }

    /// Alternate Status: like Status but the IRQ stays as it is.
    pub fn ctrl_read(&self) -> u8 {
        self.shared.with_state(|st, _| st.alt_status())
    }

    /// Device Control (nIEN, SRST, HOB).
    pub fn ctrl_write(&self, value: u8) {
        self.shared.with_state(|st, out| st.write_ctrl(value, out));
    }

    /// `rep insw`: at most `max` bytes (even), never past the current DRQ block.
    pub fn read_data(&self, max: usize) -> Vec<u8> {
        self.shared.with_state(|st, out| st.bulk_read(max, out))
    }

    /// `rep outsw`: consumes at most the rest of the current DRQ block; returns the bytes taken.
    pub fn write_data(&self, data: &[u8]) -> usize {
        self.shared.with_state(|st, out| st.bulk_write(data, out))
    }

    pub fn irq(&self) -> bool {
        self.shared.with_state(|st, _| st.irq)
    }

    /// How often the line was raised since the channel was created.
    pub fn irq_raises(&self) -> u64 {
        lock(&self.shared.state).irq_raises
    }

    /// Waits until the IRQ line is high (true) or `timeout` passes (false). Interruptible.
    pub fn wait_irq(&self, timeout: Option<Duration>) -> Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = lock(&self.shared.state);
        loop {
            // A pending soft reset raises the line when it is due (it needs no storage).
            st.poll_reset(false);
            if st.irq {
                return Ok(true);
            }
            let mut step = interrupt::POLL;
            if let Some(due) = st.reset_due {
                // Past due, the reset waits for operations in flight: the last one to end
                // completes it and wakes us.
                let left = due.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    step = step.min(left);
                }
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                step = step.min(left);
            }
            st = self
                .shared
                .irq_raised
                .wait_timeout(st, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if !st.irq {
                drop(st);
                interrupt::check()?;
                st = lock(&self.shared.state);
            }
        }
    }

    /// The guest starts: prefetch the geometry of every disk that does not know it yet.
    pub fn start(&self) {
        self.shared.with_state(|st, out| {
            for unit in 0..2 {
                if let Some(disk) = &st.drives[unit].disk {
                    if disk.prefetch().get().is_none() {
                        out.push(Action::Geometry { unit, seq: None });
                    }
                }
            }
        });
    }

    /// Waits until no backend work of this channel is in flight (completions included).
    pub fn drain(&self, timeout: Option<Duration>) -> Result<()> {
        self.shared.with_state(|st, _| st.poll_reset(true));
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut n = lock(&self.shared.in_flight);
        while *n > 0 {
            let mut step = interrupt::POLL;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::timeout("IDE channel I/O did not drain"));
                }
                step = step.min(left);
            }
            n = self
                .shared
                .idle
                .wait_timeout(n, step)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if *n > 0 {
                drop(n);
                interrupt::check()?;
                n = lock(&self.shared.in_flight);
            }
        }
        Ok(())
    }

    /// The guest stops: in-flight I/O is drained.
    pub fn stop(&self) -> Result<()> {
        self.drain(None)
    }

    /// Bus-master register read (offsets 0-7, size 1, 2 or 4 within the block). As on QEMU's
    /// PIIX, the access is split at the command/status and PRD address sub-blocks (and by
    /// alignment); in the command/status block only byte accesses work, wider ones read all
    /// ones.
    pub fn bmdma_read(&self, offset: u8, size: u8) -> Result<u32> {
        check_bm(offset, size)?;
        let st = lock(&self.shared.state);
        let Some(bm) = &st.bm else {
            return Err(Error::invalid(
                "this channel has no bus master (no guest memory)",
            ));
        };
        let mut v = 0u32;
        for (off, len) in bm_pieces(offset, size) {
            let mask = if len >= 4 {
                u32::MAX
            } else {
                (1u32 << (8 * len)) - 1
            };
            let piece = if off >= 8 {
                mask
            } else if off >= 4 {
                (bm.addr >> (8 * u32::from(off - 4))) & mask
            } else if len == 1 {
                u32::from(bm.read_byte(off))
            } else {
                mask
            };
            v |= piece << (8 * (off - offset));
        }
        Ok(v)
    }

    /// Bus-master register write, split like a read; wider-than-byte writes to the
    /// command/status block are ignored.
    pub fn bmdma_write(&self, offset: u8, value: u32, size: u8) -> Result<()> {
        check_bm(offset, size)?;
        if !self.has_bus_master() {
            return Err(Error::invalid(
                "this channel has no bus master (no guest memory)",
            ));
        }
        self.shared.with_state(|st, out| {
            for (off, len) in bm_pieces(offset, size) {
                let piece = value >> (8 * (off - offset));
                if off >= 8 {
                    continue;
                }
                if off >= 4 {
                    if let Some(bm) = &mut st.bm {
                        bm.write_addr(off - 4, len, piece);
                    }
                    continue;
                }
                if len != 1 {
                    continue;
                }
                match off {
                    0 => st.bm_command(piece as u8, out),
                    2 => {
                        if let Some(bm) = &mut st.bm {
                            bm.write_status(piece as u8);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(())
    }
}

/// How an I/O access to the bus-master block reaches its two 4-byte sub-blocks: cut at the
/// sub-block boundary, then into naturally aligned power-of-two pieces.
fn bm_pieces(offset: u8, size: u8) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let (mut off, mut left) = (offset, size);
    while left > 0 {
        let end = if off < 4 {
            4
        } else if off < 8 {
            8
        } else {
            // Past this channel's block: one piece the callers leave alone.
            out.push((off, left));
            break;
        };
        let mut len = left.min(end - off);
        let rel = off % 4;
        if rel != 0 {
            len = len.min(1 << rel.trailing_zeros());
        }
        len = if len >= 4 {
            4
        } else if len >= 2 {
            2
        } else {
            1
        };
        out.push((off, len));
        off += len;
        left -= len;
    }
    out
}

/// Offsets 0-7, sizes 1, 2 or 4; bytes of an access beyond offset 7 belong to the next
/// channel's block (they read as all ones here, writes to them are dropped).
fn check_bm(offset: u8, size: u8) -> Result<()> {
    if matches!(size, 1 | 2 | 4) && offset < 8 {
        Ok(())
    } else {
        Err(bad_access("bus master", offset, size))
    }
}

impl Drop for IdeChannel {
    fn drop(&mut self) {
        lock(&self.shared.state).gen += 1;
        self.shared.owner.invalidate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory_node;
    use crate::ide::IdeDiskConfig;

    fn channel(slave: bool) -> IdeChannel {
        let disk = || {
            let node = Arc::new(memory_node(1 << 20, false, |b| b).unwrap());
            Some(Arc::new(
                IdeDisk::new(node, IdeDiskConfig::default()).unwrap(),
            ))
        };
        IdeChannel::new(disk(), if slave { disk() } else { None }, None).unwrap()
    }

    #[test]
    fn register_writes_reach_both_drives_and_serials_follow_slots() {
        let ch = channel(true);
        ch.ioport_write(3, 0x12, 1).unwrap();
        ch.ioport_write(6, 0xB0, 1).unwrap();
        let st = ch.state();
        assert_eq!(
            (st.drives[0].tf.sector, st.drives[1].tf.sector),
            (0x12, 0x12)
        );
        assert_eq!(st.unit, 1);
        assert_eq!(
            (&*st.drives[0].serial, &*st.drives[1].serial),
            ("QM00001", "QM00002")
        );
        assert_eq!(ch.ioport_read(7, 1).unwrap(), 0x50, "present slave");
    }

    #[test]
    fn bad_port_accesses_are_argument_errors() {
        let ch = channel(false);
        for (off, size) in [(8, 1), (1, 2), (0, 3), (7, 4)] {
            assert!(ch.ioport_read(off, size).is_err());
            assert!(ch.ioport_write(off, 0, size).is_err());
        }
        assert!(ch.bmdma_read(0, 1).is_err(), "no bus master without memory");
    }

    #[test]
    fn no_drives_read_zero() {
        let ch = IdeChannel::new(None, None, None).unwrap();
        for reg in 1..=7 {
            assert_eq!(ch.ioport_read(reg, 1).unwrap(), 0);
        }
        ch.ioport_write(7, 0xEC, 1).unwrap();
        assert_eq!(ch.ctrl_read(), 0);
    }
}
