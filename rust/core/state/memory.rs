//! Guest RAM in the state stream: its size, a bitmap of the 4 KiB pages that are not all
//! zero, then those pages in order (the last page may be short). A 64 MiB RAM holding a few
//! rings and buffers takes a 2 KiB bitmap plus its non-zero pages.
//!
//! Fields (version 1): size u64 | page size u32 (= 4096) | bitmap (u32 length =
//! ceil(pages / 8), bit i of byte i/8 = page i present; unused high bits 0) | page data
//! length u64 (must equal the sum of the present pages' lengths) | the present pages.

use super::stream::{Enc, Section};
use crate::guest_memory::GuestMemory;
use crate::Result;

pub const KIND: &str = "memory";
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;

/// Encodes `mem` (the caller makes sure nothing writes to it meanwhile).
pub fn save(mem: &GuestMemory) -> Result<Vec<u8>> {
    let size = mem.len();
    let pages = size.div_ceil(PAGE);
    let mut bitmap = vec![0u8; pages.div_ceil(8)];
    let mut data = Vec::new();
    let mut page = vec![0u8; PAGE];
    for i in 0..pages {
        let len = PAGE.min(size - i * PAGE);
        mem.read((i * PAGE) as u64, &mut page[..len])?;
        if page[..len].iter().any(|&b| b != 0) {
            bitmap[i / 8] |= 1 << (i % 8);
            data.extend_from_slice(&page[..len]);
        }
    }
    let mut e = Enc::default();
    e.u64(size as u64);
    e.u32(PAGE as u32);
    e.bytes(&bitmap);
    e.u64(data.len() as u64);
    e.raw(&data);
    Ok(e.buf)
}

/// A decoded, checked memory image, ready to apply.
#[derive(Debug)]
pub struct MemoryImage<'a> {
    pub size: u64,
    bitmap: &'a [u8],
    data: &'a [u8],
}

/// Decodes and checks a memory section against the target `mem` (same size).
pub fn decode<'a>(sec: &Section<'a>, mem: &GuestMemory) -> Result<MemoryImage<'a>> {
    sec.subsections(&[])?;
    let mut d = sec.fields();
    let size = d.u64("size")?;
    if size != mem.len() as u64 {
        return Err(d.error(
            "size",
            format!(
                "guest memory is {size} bytes in the state, {} bytes here",
                mem.len()
            ),
        ));
    }
    let page = d.u32("page size")?;
    if page as usize != PAGE {
        return Err(d.error("page size", format!("expected {PAGE}, got {page}")));
    }
    let pages = (size as usize).div_ceil(PAGE);
    let bitmap = d.bytes("page bitmap", pages.div_ceil(8))?;
    if bitmap.len() != pages.div_ceil(8) {
        return Err(d.error(
            "page bitmap",
            format!("expected {} bytes, got {}", pages.div_ceil(8), bitmap.len()),
        ));
    }
    if pages % 8 != 0 {
        let unused = !((1u8 << (pages % 8)) - 1);
        if bitmap[bitmap.len() - 1] & unused != 0 {
            return Err(d.error("page bitmap", "bits set for pages beyond the end"));
        }
    }
    let mut want = 0u64;
    for i in 0..pages {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            want += PAGE.min(size as usize - i * PAGE) as u64;
        }
    }
    let len = d.u64("page data length")?;
    if len != want {
        return Err(d.error(
            "page data length",
            format!("the bitmap needs {want} bytes, got {len}"),
        ));
    }
    let data = d.take(len as usize, "page data")?;
    d.finish()?;
    Ok(MemoryImage { size, bitmap, data })
}

impl MemoryImage<'_> {
    /// Writes the image into `mem` (zero pages are zeroed).
    pub fn apply(&self, mem: &GuestMemory) -> Result<()> {
        let size = self.size as usize;
        let zero = vec![0u8; PAGE];
        let mut at = 0;
        for i in 0..size.div_ceil(PAGE) {
            let len = PAGE.min(size - i * PAGE);
            let addr = (i * PAGE) as u64;
            if self.bitmap[i / 8] & (1 << (i % 8)) != 0 {
                mem.write(addr, &self.data[at..at + len])?;
                at += len;
            } else {
                mem.write(addr, &zero[..len])?;
            }
        }
        Ok(())
    }
}
