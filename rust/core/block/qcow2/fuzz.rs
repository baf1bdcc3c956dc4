//! The qcow2 fuzz interpreter, shared by `fuzz/fuzz_targets/qcow2.rs` and the corpus replay
//! test: random bytes opened as a qcow2 image in memory, then a few reads and writes. It must
//! never panic, and memory stays bounded (the image file may grow by at most `GROWTH_CAP`).

use std::sync::{Arc, RwLock};

use super::Qcow2Backend;
use crate::block::Backend;
use crate::{Error, Result};

/// How far writes may grow the in-memory file beyond the input.
pub const GROWTH_CAP: usize = 16 << 20;

/// A memory file that grows on writes past its end (as a host file does), up to a cap.
pub struct GrowingMemory {
    data: RwLock<Vec<u8>>,
    cap: usize,
}

impl GrowingMemory {
    pub fn new(data: Vec<u8>) -> Self {
        let cap = data.len() + GROWTH_CAP;
        GrowingMemory {
            data: RwLock::new(data),
            cap,
        }
    }
    /// The file's bytes now.
    pub fn bytes(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Backend for GrowingMemory {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(buf.len()) {
            Some(end) if end <= d.len() => {
                buf.copy_from_slice(&d[start..end]);
                Ok(())
            }
            _ => Err(Error::os(libc::EIO, "read beyond the end of the file")),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = match start.checked_add(buf.len()) {
            Some(end) if end <= self.cap => end,
            _ => return Err(Error::os(libc::ENOSPC, "fuzz file cap reached")),
        };
        if end > d.len() {
            d.resize(end, 0);
        }
        d[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
}

/// Input: one selector byte, then the image. Opens it, reads and writes a few sectors, then
/// quiesces (dirty bit cleared), drops the caches and reads again.
pub fn run(data: &[u8]) {
    let Some((&sel, image)) = data.split_first() else {
        return;
    };
    let file = Arc::new(GrowingMemory::new(image.to_vec()));
    let q = Qcow2Backend::new(file, sel & 0x80 != 0);
    let Ok(size) = q.len() else {
        return;
    };
    if size < 512 {
        return;
    }
    let sectors = size / 512;
    let pick = |k: u64| {
        (u64::from(sel)
            .wrapping_mul(0x9e37_79b9)
            .wrapping_add(k * 7919)
            % sectors)
            * 512
    };
    let mut buf = vec![0u8; 1024.min(size) as usize];
    let len = buf.len() as u64;
    let _ = q.read_at(&mut buf, 0);
    let _ = q.read_at(&mut buf[..512], pick(1));
    let _ = q.read_at(&mut buf, size - len);
    let pattern = [sel; 512];
    let at = pick(2);
    if q.write_at(&pattern, at).is_ok() {
        let mut back = [0u8; 512];
        let _ = q.read_at(&mut back, at);
    }
    let _ = q.write_at(&buf, size - len);
    let _ = q.write_at(&pattern, pick(3));
    let _ = q.flush();
    let _ = q.quiesce();
    let _ = q.drop_caches();
    if q.len().is_ok() {
        let _ = q.read_at(&mut buf[..512], at);
    }
}
