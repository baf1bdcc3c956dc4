//! A backend in process memory: for tests, scratch disks and demos.

use std::sync::RwLock;

use super::Backend;
use crate::Result;

/// A fixed-size disk held in a `Vec<u8>`.
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
}

impl MemoryBackend {
    /// A zero-filled disk of `size` bytes (ENOMEM if it cannot be allocated).
    pub fn new(size: usize) -> Result<Self> {
        Ok(MemoryBackend {
            data: RwLock::new(super::zeroed_buffer(size)?),
        })
    }

    pub fn from_vec(data: Vec<u8>) -> Self {
        MemoryBackend {
            data: RwLock::new(data),
        }
    }
}

impl Backend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }

    fn resize(&self, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| {
            crate::Error::invalid(format!("a memory disk of {len} bytes is too large"))
        })?;
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        let cur = data.len();
        if len > cur {
            data.try_reserve_exact(len - cur).map_err(|_| {
                crate::Error::os(
                    libc::ENOMEM,
                    format!("cannot grow a memory disk to {len} bytes"),
                )
            })?;
        }
        data.resize(len, 0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<bool> {
        self.write_zeroes(offset, len)?;
        Ok(true)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn allocated(&self) -> Result<Option<u64>> {
        self.len().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zeroes() {
        let m = MemoryBackend::new(4096).unwrap();
        m.write_at(&[1, 2, 3], 10).unwrap();
        let mut b = [0u8; 3];
        m.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [1, 2, 3]);
        m.write_zeroes(10, 2).unwrap();
        m.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [0, 0, 3]);
        assert_eq!(m.len().unwrap(), 4096);
    }
}
