//! Guest RAM: a fixed, zero-filled buffer that device models read and write (rings,
//! descriptors, DMA buffers) while Python looks at it through the buffer protocol.
//!
//! Like any VMM's guest memory, it is shared with the guest and the devices at once, so it is
//! accessed only through raw copies (never through long-lived Rust references): a device on a
//! worker thread may write while Python reads, exactly as DMA races with a vCPU.

use crate::{Error, Result};

pub struct GuestMemory {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is a plain allocation owned by this value; every access is a bounds-
// checked raw copy, and concurrent accesses are the guest's business (as with real RAM).
unsafe impl Send for GuestMemory {}
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Allocates `size` bytes of zeroed guest RAM.
    pub fn new(size: usize) -> Result<Self> {
        if size == 0 {
            return Err(Error::invalid("guest memory size must be at least 1 byte"));
        }
        let layout = std::alloc::Layout::from_size_align(size, 4096)
            .map_err(|_| Error::invalid(format!("guest memory of {size} bytes is too large")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::invalid(format!(
                "cannot allocate {size} bytes of guest memory"
            )));
        }
        Ok(GuestMemory { ptr, len: size })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the buffer, for exporting it (Python's buffer protocol).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Checks that `[addr, addr + len)` lies inside guest memory.
    pub fn check(&self, addr: u64, len: usize) -> Result<usize> {
        match addr.checked_add(len as u64) {
            Some(end) if end <= self.len as u64 => Ok(addr as usize),
            _ => Err(Error::out_of_range(format!(
                "guest memory access of {len} bytes at {addr:#x} is beyond the end of guest \
                 memory ({:#x} bytes)",
                self.len
            ))),
        }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let start = self.check(addr, buf.len())?;
        // SAFETY: range checked above; buf is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(start), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let start = self.check(addr, data.len())?;
        // SAFETY: range checked above; data is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
        Ok(())
    }

    /// Runs `f` on `[addr, addr + len)` of guest memory as a mutable slice: the target of
    /// positional I/O straight into guest RAM (a DMA write). The guest may access the same
    /// bytes at the same time; as on real hardware, what it then sees is its own business.
    pub fn with_slice_mut<R>(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        let start = self.check(addr, len)?;
        // SAFETY: range checked above; the memory lives as long as `self`.
        let slice = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) };
        Ok(f(slice))
    }

    /// Runs `f` on `[addr, addr + len)` of guest memory as a slice (a DMA read).
    pub fn with_slice<R>(&self, addr: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let start = self.check(addr, len)?;
        // SAFETY: range checked above; the memory lives as long as `self`.
        let slice = unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) };
        Ok(f(slice))
    }

    pub fn read_u8(&self, addr: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Ok(b[0])
    }

    pub fn read_u16(&self, addr: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u16(&self, addr: u64, v: u16) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn write_u32(&self, addr: u64, v: u32) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("checked in new");
        // SAFETY: allocated in new() with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn bounds_are_checked_and_values_are_little_endian() {
        let m = GuestMemory::new(4096).unwrap();
        m.write_u32(8, 0x1234_5678).unwrap();
        assert_eq!(m.read_u16(8).unwrap(), 0x5678);
        assert_eq!(m.read_u64(8).unwrap(), 0x1234_5678);
        let err = m.write(4095, &[1, 2]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
        assert_eq!(
            m.read_u64(u64::MAX).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert!(GuestMemory::new(0).is_err());
    }
}
