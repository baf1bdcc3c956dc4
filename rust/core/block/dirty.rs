//! Dirty bitmaps: which parts of a node were written since a point in time.
//!
//! One bit per `granularity` bytes (a power of two, at least 512), in atomic 64-bit words:
//! many writer threads mark without a lock (`fetch_or`), and a mirror job takes dirty runs
//! (`take_next`: find, clear, return) while they do. The node marks a bitmap *after* each
//! write, write_zeroes or discard returns (success or failure: a failed write may have
//! changed some of the data), so a consumer that clears a run before it reads the data never
//! loses a write: either the write's mark comes after the clear (and the run is taken again),
//! or the write completed before the read (and the read sees it).
//!
//! Bitmaps live in memory only; they are not persisted in the image.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{Error, Result};

/// The default granularity (64 KiB), as QEMU's mirror uses.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// The smallest granularity: one sector.
pub const MIN_GRANULARITY: u64 = 512;
/// The largest granularity (1 GiB).
pub const MAX_GRANULARITY: u64 = 1 << 30;
/// Longest bitmap name, in bytes (QEMU's limit).
pub const MAX_NAME_LEN: usize = 1023;

/// A dirty bitmap over `size` bytes.
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    shift: u32,
    size: u64,
    /// Number of granules (bits in use).
    bits: u64,
    words: Box<[AtomicU64]>,
    enabled: AtomicBool,
    /// Owned by a job (a mirror): operations that would lose dirty bits are refused.
    busy: AtomicBool,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

/// Checks a bitmap name: non-empty, at most [`MAX_NAME_LEN`] bytes.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "a dirty bitmap name must have 1 to {MAX_NAME_LEN} bytes, got {}",
            name.len()
        )));
    }
    Ok(())
}

/// Checks a granularity: a power of two from 512 bytes to 1 GiB.
pub fn check_granularity(granularity: u64) -> Result<()> {
    if !granularity.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
    {
        return Err(Error::invalid(format!(
            "dirty bitmap granularity must be a power of two from {MIN_GRANULARITY} to \
             {MAX_GRANULARITY} bytes, got {granularity}"
        )));
    }
    Ok(())
}

/// Bits `lo..hi` (0 <= lo < hi <= 64) of a word.
fn mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl DirtyBitmap {
    /// An enabled, clean bitmap over `size` bytes. Its memory is `size / granularity / 8`
    /// bytes; failing to allocate it is ENOMEM, not an abort.
    pub fn new(name: &str, size: u64, granularity: u64) -> Result<Self> {
        check_name(name)?;
        check_granularity(granularity)?;
        let shift = granularity.trailing_zeros();
        let bits = size.div_ceil(granularity);
        let nwords = usize::try_from(bits.div_ceil(64))
            .map_err(|_| Error::invalid(format!("a dirty bitmap over {size} bytes is too big")))?;
        let mut words = Vec::new();
        words.try_reserve_exact(nwords).map_err(|_| {
            Error::os(
                libc::ENOMEM,
                format!("cannot allocate a dirty bitmap of {nwords} words"),
            )
        })?;
        words.resize_with(nwords, || AtomicU64::new(0));
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            shift,
            size,
            bits,
            words: words.into_boxed_slice(),
            enabled: AtomicBool::new(true),
            busy: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
    /// Whether a job owns the bitmap (then clear, disable and remove are refused).
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
    pub(crate) fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    fn refuse_if_busy(&self, what: &str) -> Result<()> {
        if self.is_busy() {
            return Err(Error::invalid(format!(
                "cannot {what} dirty bitmap {:?}: it is in use by a mirror job",
                self.name
            )));
        }
        Ok(())
    }

    /// Starts recording the node's writes.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// Stops recording the node's writes (refused while a job owns the bitmap).
    pub fn disable(&self) -> Result<()> {
        self.refuse_if_busy("disable")?;
        self.enabled.store(false, Ordering::Release);
        Ok(())
    }

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(Error::out_of_range(format!(
                "{what} of {len} bytes at offset {offset} is beyond the end of dirty bitmap \
                 {:?} ({} bytes)",
                self.name, self.size
            ))),
        }
    }

    /// Sets granules `first..last` (bit indexes).
    fn set_bits(&self, first: u64, last: u64) {
        let mut i = first;
        while i < last {
            let w = i / 64;
            let lo = i % 64;
            let hi = (last - w * 64).min(64);
            let m = mask(lo, hi);
            let word = &self.words[w as usize];
            // Skip the read-modify-write when every bit is set already (re-dirtied data).
            if word.load(Ordering::Relaxed) & m != m {
                word.fetch_or(m, Ordering::Release);
            }
            i = w * 64 + hi;
        }
    }

    /// Clears granules `first..last`.
    fn clear_bits(&self, first: u64, last: u64) {
        let mut i = first;
        while i < last {
            let w = i / 64;
            let lo = i % 64;
            let hi = (last - w * 64).min(64);
            self.words[w as usize].fetch_and(!mask(lo, hi), Ordering::AcqRel);
            i = w * 64 + hi;
        }
    }

    /// The granules touched by bytes `offset..end` (end > offset).
    fn granules(&self, offset: u64, end: u64) -> (u64, u64) {
        (offset >> self.shift, (end - 1) >> self.shift)
    }

    /// Marks `offset..offset+len` dirty (every granule it touches), enabled or not.
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.check_range("mark", offset, len)?;
        if len > 0 {
            let (a, b) = self.granules(offset, end);
            self.set_bits(a, b + 1);
        }
        Ok(())
    }

    /// The node's write path: marks the range if the bitmap is enabled (clipped to the size;
    /// the node has range-checked it already).
    pub(crate) fn note_write(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size || !self.is_enabled() {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (a, b) = self.granules(offset, end);
        self.set_bits(a, b + 1);
    }

    /// Clears `offset..offset+len`. The range must start on a granule boundary and end on
    /// one (or at the end of the bitmap): clearing part of a granule would forget a write to
    /// the rest of it. Refused while a job owns the bitmap.
    pub fn clear(&self, offset: u64, len: u64) -> Result<()> {
        self.refuse_if_busy("clear")?;
        let end = self.check_range("clear", offset, len)?;
        if offset % self.granularity != 0 || (end % self.granularity != 0 && end != self.size) {
            return Err(Error::invalid(format!(
                "clear of {len} bytes at offset {offset}: the range must be aligned to the \
                 granularity ({} bytes) or end at the end of the bitmap",
                self.granularity
            )));
        }
        if len > 0 {
            let (a, b) = self.granules(offset, end);
            self.clear_bits(a, b + 1);
        }
        Ok(())
    }

    /// Whether the granule holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> Result<bool> {
        if offset >= self.size {
            return Err(Error::out_of_range(format!(
                "offset {offset} is beyond the end of dirty bitmap {:?} ({} bytes)",
                self.name, self.size
            )));
        }
        Ok(self.bit(offset >> self.shift))
    }

    fn bit(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Dirty bytes (dirty granules times the granularity, the last one clipped to the size).
    pub fn count(&self) -> u64 {
        let granules: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        let mut bytes = granules << self.shift;
        if self.bits > 0 && self.bit(self.bits - 1) {
            bytes -= (self.bits << self.shift) - self.size;
        }
        bytes
    }

    /// The first dirty granule at or after `from` and before `limit`.
    fn next_set(&self, from: u64, limit: u64) -> Option<u64> {
        let mut i = from;
        while i < limit {
            let w = i / 64;
            let word = self.words[w as usize].load(Ordering::Acquire) & !((1u64 << (i % 64)) - 1);
            if word != 0 {
                let found = w * 64 + u64::from(word.trailing_zeros());
                return (found < limit).then_some(found);
            }
            i = (w + 1) * 64;
        }
        None
    }

    /// The first clean granule at or after `from`, or `limit`.
    fn next_clear(&self, from: u64, limit: u64) -> u64 {
        let mut i = from;
        while i < limit {
            let w = i / 64;
            let word = !self.words[w as usize].load(Ordering::Acquire) & !((1u64 << (i % 64)) - 1);
            if word != 0 {
                return (w * 64 + u64::from(word.trailing_zeros())).min(limit);
            }
            i = (w + 1) * 64;
        }
        limit
    }

    /// The merged dirty runs as (offset, length) in bytes, clipped to
    /// `offset..offset+len` (`len` None: to the end).
    pub fn ranges(&self, offset: u64, len: Option<u64>) -> Result<Vec<(u64, u64)>> {
        let len = len.unwrap_or(self.size.saturating_sub(offset));
        let end = self.check_range("ranges", offset, len)?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let (mut i, last) = self.granules(offset, end);
        let limit = last + 1;
        while let Some(a) = self.next_set(i, limit) {
            let b = self.next_clear(a, limit);
            let start = (a << self.shift).max(offset);
            let stop = (b << self.shift).min(end);
            out.push((start, stop - start));
            i = b;
        }
        Ok(out)
    }

    /// ORs `other` into this bitmap: both must have the same granularity and size.
    pub fn merge(&self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity != self.granularity || other.size != self.size {
            return Err(Error::invalid(format!(
                "cannot merge dirty bitmap {:?} ({} bytes, granularity {}) into {:?} ({} bytes, \
                 granularity {}): sizes and granularities must match",
                other.name, other.size, other.granularity, self.name, self.size, self.granularity
            )));
        }
        for (dst, src) in self.words.iter().zip(other.words.iter()) {
            let v = src.load(Ordering::Acquire);
            if v != 0 {
                dst.fetch_or(v, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Finds the first dirty run at or after byte `from` (not wrapping around), clears it
    /// and returns it as (offset, length) in bytes: at most `max_bytes` long (but at least one
    /// granule), clipped to the size. Safe against concurrent marks (a mark after the clear
    /// stays set) and concurrent takers (each granule is returned to one taker).
    pub fn take_next(&self, from: u64, max_bytes: u64) -> Option<(u64, u64)> {
        if from >= self.size {
            return None;
        }
        let max_granules = (max_bytes >> self.shift).max(1);
        let mut i = from >> self.shift;
        loop {
            let first = self.next_set(i, self.bits)?;
            let limit = first.saturating_add(max_granules).min(self.bits);
            let stop = self.next_clear(first, limit);
            // Clear first..stop word by word; keep the prefix of granules that were still set
            // (another taker may have won some), give back the rest.
            let mut got_end = first;
            let mut j = first;
            let mut broken = false;
            while j < stop {
                let w = j / 64;
                let lo = j % 64;
                let hi = (stop - w * 64).min(64);
                let m = mask(lo, hi);
                let was = self.words[w as usize].fetch_and(!m, Ordering::AcqRel) & m;
                if broken {
                    if was != 0 {
                        self.words[w as usize].fetch_or(was, Ordering::AcqRel);
                    }
                } else if was == m {
                    got_end = w * 64 + hi;
                } else {
                    // The prefix of set bits from `lo` is ours; bits after a gap go back.
                    let run = (was >> lo).trailing_ones() as u64;
                    got_end = w * 64 + lo + run;
                    let ours = if run == 0 { 0 } else { mask(lo, lo + run) };
                    let back = was & !ours;
                    if back != 0 {
                        self.words[w as usize].fetch_or(back, Ordering::AcqRel);
                    }
                    broken = true;
                }
                j = w * 64 + hi;
            }
            if got_end > first {
                let start = first << self.shift;
                let end = (got_end << self.shift).min(self.size);
                return Some((start, end - start));
            }
            // Someone else took `first` between our look and our clear: look again after it.
            i = first + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::Arc;

    #[test]
    fn granularity_and_name_are_checked() {
        for g in [0, 256, 511, 513, 1000, 3 << 9, MAX_GRANULARITY * 2] {
            let e = DirtyBitmap::new("b", 1 << 20, g).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "granularity {g}");
        }
        for g in [512, 4096, DEFAULT_GRANULARITY, MAX_GRANULARITY] {
            assert_eq!(DirtyBitmap::new("b", 1 << 20, g).unwrap().granularity(), g);
        }
        assert!(DirtyBitmap::new("", 4096, 512).is_err());
        assert!(DirtyBitmap::new(&"x".repeat(1024), 4096, 512).is_err());
        let empty = DirtyBitmap::new("e", 0, 512).unwrap();
        assert_eq!(empty.count(), 0);
        assert_eq!(empty.take_next(0, 1 << 20), None);
        assert!(empty.ranges(0, None).unwrap().is_empty());
    }

    #[test]
    fn marks_round_out_to_granules_and_count_clips_the_last() {
        // 10 granules of 512 plus a partial one of 100 bytes.
        let size = 10 * 512 + 100;
        let b = DirtyBitmap::new("b", size, 512).unwrap();
        b.mark(1, 1).unwrap();
        assert_eq!(b.count(), 512);
        assert!(b.is_dirty(0).unwrap() && b.is_dirty(511).unwrap());
        assert!(!b.is_dirty(512).unwrap());
        b.mark(511, 2).unwrap(); // straddles two granules
        assert_eq!(b.ranges(0, None).unwrap(), vec![(0, 1024)]);
        b.mark(size - 1, 1).unwrap(); // the partial last granule
        assert_eq!(b.count(), 1024 + 100);
        assert_eq!(b.ranges(0, None).unwrap(), vec![(0, 1024), (5120, 100)]);
        assert_eq!(b.ranges(100, Some(200)).unwrap(), vec![(100, 200)]);
        assert_eq!(b.take_next(1024, 1 << 20), Some((5120, 100)));
        assert_eq!(b.take_next(0, 512), Some((0, 512)));
        assert_eq!(b.take_next(0, 0), Some((512, 512)));
        assert_eq!(b.count(), 0);
        assert_eq!(b.mark(size, 1).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(b.is_dirty(size).unwrap_err().kind(), ErrorKind::OutOfRange);
        b.mark(size, 0).unwrap();
    }

    #[test]
    fn words_boundaries_and_long_runs() {
        let g = 512;
        let b = DirtyBitmap::new("b", 300 * g, g).unwrap();
        b.mark(60 * g, 10 * g).unwrap(); // crosses the first word boundary
        b.mark(127 * g, 130 * g).unwrap(); // crosses two
        assert_eq!(
            b.ranges(0, None).unwrap(),
            vec![(60 * g, 10 * g), (127 * g, 130 * g)]
        );
        assert_eq!(b.count(), 140 * g);
        assert_eq!(b.take_next(0, 4 * g), Some((60 * g, 4 * g)));
        assert_eq!(b.take_next(0, 1 << 30), Some((64 * g, 6 * g)));
        assert_eq!(b.take_next(0, 1 << 30), Some((127 * g, 130 * g)));
        assert_eq!(b.take_next(0, 1 << 30), None);
    }

    #[test]
    fn clear_must_be_aligned_and_busy_bitmaps_refuse() {
        let b = DirtyBitmap::new("b", 4096 + 10, 1024).unwrap();
        b.mark(0, 4106).unwrap();
        assert_eq!(
            b.clear(1, 1023).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            b.clear(0, 1000).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        b.clear(1024, 1024).unwrap();
        b.clear(4096, 10).unwrap(); // ends at the end
        assert_eq!(b.ranges(0, None).unwrap(), vec![(0, 1024), (2048, 2048)]);
        b.set_busy(true);
        assert!(b.clear(0, 4106).is_err());
        assert!(b.disable().is_err());
        b.set_busy(false);
        b.clear(0, 4106).unwrap();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn disabled_bitmaps_ignore_writes_but_take_explicit_marks() {
        let b = DirtyBitmap::new("b", 1 << 20, 4096).unwrap();
        b.disable().unwrap();
        b.note_write(0, 10);
        assert_eq!(b.count(), 0);
        b.mark(0, 10).unwrap();
        assert_eq!(b.count(), 4096);
        b.enable();
        b.note_write(8192, 1);
        assert_eq!(b.count(), 8192);
        // Past the end: clipped, no panic.
        b.note_write((1 << 20) - 1, 100);
        b.note_write(1 << 30, 100);
        assert_eq!(b.count(), 3 * 4096);
    }

    #[test]
    fn merge_needs_the_same_shape() {
        let a = DirtyBitmap::new("a", 1 << 20, 4096).unwrap();
        let b = DirtyBitmap::new("b", 1 << 20, 4096).unwrap();
        a.mark(0, 1).unwrap();
        b.mark(65536, 1).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.ranges(0, None).unwrap(), vec![(0, 4096), (65536, 4096)]);
        let c = DirtyBitmap::new("c", 1 << 20, 8192).unwrap();
        assert_eq!(a.merge(&c).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let d = DirtyBitmap::new("d", (1 << 20) + 512, 4096).unwrap();
        assert_eq!(a.merge(&d).unwrap_err().kind(), ErrorKind::InvalidArgument);
        a.merge(&a).unwrap();
    }

    #[test]
    fn concurrent_marks_and_takes_lose_nothing() {
        let g = 512u64;
        let n = 4096u64;
        let b = Arc::new(DirtyBitmap::new("b", n * g, g).unwrap());
        let taken: Vec<std::sync::atomic::AtomicU64> = (0..n)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let taken = Arc::new(taken);
        let marks_per_thread = 20_000u64;
        let stop = Arc::new(AtomicBool::new(false));
        let mut markers = Vec::new();
        for t in 0..3u64 {
            let b = b.clone();
            markers.push(std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut marked = vec![0u64; n as usize];
                for _ in 0..marks_per_thread {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let gi = x % n;
                    let len = 1 + (x >> 32) % (3 * g);
                    let len = len.min(n * g - gi * g);
                    b.mark(gi * g, len).unwrap();
                    for k in gi..=(gi * g + len - 1) / g {
                        marked[k as usize] += 1;
                    }
                }
                marked
            }));
        }
        let mut takers = Vec::new();
        for _ in 0..2 {
            let (b, taken, stop) = (b.clone(), taken.clone(), stop.clone());
            takers.push(std::thread::spawn(move || {
                let mut cursor = 0;
                loop {
                    match b.take_next(cursor, 8 * g) {
                        Some((off, len)) => {
                            for k in off / g..(off + len).div_ceil(g) {
                                taken[k as usize].fetch_add(1, Ordering::Relaxed);
                            }
                            cursor = off + len;
                        }
                        None if stop.load(Ordering::Acquire) && cursor == 0 => return,
                        None => cursor = 0,
                    }
                }
            }));
        }
        let mut ever_marked = vec![false; n as usize];
        for m in markers {
            for (k, c) in m.join().unwrap().into_iter().enumerate() {
                ever_marked[k] |= c > 0;
            }
        }
        stop.store(true, Ordering::Release);
        for t in takers {
            t.join().unwrap();
        }
        // Whatever is left in the bitmap plus what was taken covers every marked granule.
        for k in 0..n {
            if ever_marked[k as usize] {
                assert!(
                    taken[k as usize].load(Ordering::Relaxed) > 0 || b.bit(k),
                    "granule {k} was marked but neither taken nor left dirty"
                );
            } else {
                assert_eq!(taken[k as usize].load(Ordering::Relaxed), 0);
            }
        }
    }
}
