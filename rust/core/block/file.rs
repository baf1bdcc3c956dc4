//! The raw file backend: positional I/O on a host file, optionally with O_DIRECT.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::backend::write_zeroes_by_writing;
use super::{Backend, BlockStatus};
use crate::{Error, Result};

/// Alignment of O_DIRECT transfers. 4 KiB satisfies both 512-byte and 4 KiB-sector storage.
pub const DIRECT_ALIGN: usize = 4096;

/// A host file accessed with `pread`/`pwrite` (never mmap: a truncation by another process
/// would be a SIGBUS instead of an I/O error).
pub struct FileBackend {
    path: PathBuf,
    file: File,
    /// With O_DIRECT: a second, buffered descriptor for the requests O_DIRECT cannot do (the
    /// partial block at the end of a file whose size is not aligned).
    buffered: Option<File>,
    /// Unaligned O_DIRECT writes are read-modify-write of whole blocks; they exclude every
    /// other direct write so that a concurrent write to the same block is not undone.
    rmw: RwLock<()>,
}

impl FileBackend {
    /// Opens `path` for reading (and writing unless `readonly`); `direct` uses O_DIRECT.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self> {
        let open = |direct: bool| {
            let mut opts = OpenOptions::new();
            opts.read(true).write(!readonly);
            if direct {
                opts.custom_flags(libc::O_DIRECT);
            }
            opts.open(path)
        };
        let file = open(direct).map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                Error::invalid(
                    "cache=\"none\" needs O_DIRECT, which this file system does not support",
                )
                .with_path(path)
            } else {
                Error::io(e).with_path(path).with_op("open")
            }
        })?;
        let meta = file.metadata().map_err(|e| Error::io(e).with_path(path))?;
        if meta.is_dir() {
            return Err(Error::os(libc::EISDIR, "is a directory").with_path(path));
        }
        let buffered = if direct {
            Some(open(false).map_err(|e| Error::io(e).with_path(path))?)
        } else {
            None
        };
        Ok(FileBackend {
            path: path.to_path_buf(),
            file,
            buffered,
            rmw: RwLock::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: io::Error, op: &'static str, offset: u64) -> Error {
        let e = if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::os(libc::EIO, "short transfer: the file ended early")
        } else {
            Error::io(e)
        };
        e.with_path(&self.path).with_op(op).with_offset(offset)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn direct(&self) -> bool {
        self.buffered.is_some()
    }

    fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io(e).with_path(&self.path))?
            .len())
    }
}

fn aligned(x: u64) -> bool {
    x % DIRECT_ALIGN as u64 == 0
}

fn is_aligned_request(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize) % DIRECT_ALIGN == 0 && len % DIRECT_ALIGN == 0 && aligned(offset)
}

/// A heap buffer aligned for O_DIRECT.
struct Bounce {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Bounce {
    /// An aligned buffer of `len` bytes; ENOMEM (an I/O error, not an abort) when the
    /// allocation fails, since the size comes from a caller's request.
    fn new(len: usize) -> Result<Self> {
        let nomem = || {
            Error::os(
                libc::ENOMEM,
                format!("cannot allocate a {len}-byte bounce buffer"),
            )
        };
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|_| nomem())?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(nomem());
        }
        Ok(Bounce { ptr, layout })
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Reads as much as the file has into `buf` at `offset`; the rest (past end of file) is zero.
fn read_upto(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether fallocate failed because the file system cannot do that mode.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl Backend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if !self.direct() || is_aligned_request(buf.as_ptr(), buf.len(), offset) {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.err(e, "read", offset));
        }
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let mut bounce = Bounce::new((end - start) as usize)?;
        read_upto(&self.file, bounce.as_mut(), start).map_err(|e| self.err(e, "read", offset))?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_mut()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.direct() {
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| self.err(e, "write", offset));
        }
        if is_aligned_request(buf.as_ptr(), buf.len(), offset) {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| self.err(e, "write", offset));
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let start = offset - offset % DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        if end > self.file_len()? {
            // The aligned span would grow the file: write this request buffered instead.
            let buffered = self.buffered.as_ref().expect("direct has a buffered fd");
            return buffered
                .write_all_at(buf, offset)
                .map_err(|e| self.err(e, "write", offset));
        }
        let mut bounce = Bounce::new((end - start) as usize)?;
        let span = bounce.as_mut();
        read_upto(&self.file, span, start).map_err(|e| self.err(e, "write", offset))?;
        let skip = (offset - start) as usize;
        span[skip..skip + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(span, start)
            .map_err(|e| self.err(e, "write", offset))
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(e).with_path(&self.path).with_op("flush"))
    }

    fn len(&self) -> Result<u64> {
        self.file_len()
    }

    fn resize(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(e).with_path(&self.path).with_op("resize"))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<bool> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(self.err(e, "discard", offset)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // No cheap way on this file system: write real zeroes.
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                write_zeroes_by_writing(self, offset, len)
            }
            Err(e) => Err(self.err(e, "write_zeroes", offset)),
        }
    }

    fn drop_caches(&self) -> Result<()> {
        // Another host may have written the file since we last looked: forget the host page
        // cache of it, so the next read goes to the storage.
        let fd = self.file.as_raw_fd();
        // SAFETY: plain syscall on a valid fd.
        let r = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 && r != libc::ESPIPE {
            return Err(Error::io(io::Error::from_raw_os_error(r))
                .with_path(&self.path)
                .with_op("drop caches"));
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let fd = self.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: plain syscall on a valid fd; we use positional I/O only, so moving the
            // file position disturbs nothing.
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(data) if data > offset => Ok((BlockStatus::Zero, (data - offset).min(len))),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(hole) if hole > offset => Ok((BlockStatus::Data, (hole - offset).min(len))),
                // Raced with a change of the file: say data (never zero for data).
                _ => Ok((BlockStatus::Data, len)),
            },
            // No data from `offset` to the end of the file: a hole (or past the end, which
            // reads as zeroes too).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((BlockStatus::Zero, len)),
            // SEEK_DATA unsupported (or any other failure): data.
            Err(_) => Ok((BlockStatus::Data, len)),
        }
    }

    fn allocated(&self) -> Result<Option<u64>> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io(e).with_path(&self.path))?;
        Ok(Some(meta.blocks() * 512))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        // Not /dev/shm: tmpfs refuses O_DIRECT.
        let tmp = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        tmp.as_file().set_len(len).unwrap();
        tmp
    }

    fn direct_supported(path: &Path) -> bool {
        FileBackend::open(path, false, true).is_ok()
    }

    #[test]
    fn read_write_flush_len() {
        let tmp = image(1 << 16);
        let b = FileBackend::open(tmp.path(), false, false).unwrap();
        b.write_at(b"hello", 1000).unwrap();
        let mut buf = [0u8; 5];
        b.read_at(&mut buf, 1000).unwrap();
        assert_eq!(&buf, b"hello");
        b.flush().unwrap();
        assert_eq!(b.len().unwrap(), 1 << 16);
    }

    #[test]
    fn read_past_end_is_an_io_error_not_garbage() {
        let tmp = image(1024);
        let b = FileBackend::open(tmp.path(), false, false).unwrap();
        let mut buf = [0u8; 512];
        let err = b.read_at(&mut buf, 768).unwrap_err();
        assert_eq!(err.os_code(), Some(libc::EIO));
    }

    #[test]
    fn readonly_refuses_writes_at_the_os() {
        let tmp = image(4096);
        let b = FileBackend::open(tmp.path(), true, false).unwrap();
        assert!(b.write_at(b"x", 0).is_err());
    }

    #[test]
    fn direct_unaligned_requests_round_trip() {
        let tmp = image(3 * 4096 + 512); // size not 4 KiB-aligned
        if !direct_supported(tmp.path()) {
            eprintln!("O_DIRECT unsupported on {:?}; skipped", tmp.path());
            return;
        }
        let b = FileBackend::open(tmp.path(), false, true).unwrap();
        let pattern: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        b.write_at(&pattern, 100).unwrap(); // unaligned, inside the file
        let tail = vec![7u8; 300];
        b.write_at(&tail, 3 * 4096 + 100).unwrap(); // in the partial last block
        let mut got = vec![0u8; 5000];
        b.read_at(&mut got, 100).unwrap();
        assert_eq!(got, pattern);
        let mut got_tail = vec![0u8; 300];
        b.read_at(&mut got_tail, 3 * 4096 + 100).unwrap();
        assert_eq!(got_tail, tail);
        assert_eq!(b.len().unwrap(), 3 * 4096 + 512, "the file must not grow");
        // Seen through a buffered open too.
        let plain = FileBackend::open(tmp.path(), true, false).unwrap();
        let mut again = vec![0u8; 5000];
        plain.read_at(&mut again, 100).unwrap();
        assert_eq!(again, pattern);
    }

    #[test]
    fn block_status_sees_holes() {
        let tmp = image(0);
        let b = FileBackend::open(tmp.path(), false, false).unwrap();
        let mb = 1u64 << 20;
        b.resize(8 * mb).unwrap();
        b.write_at(&vec![1u8; mb as usize], 2 * mb).unwrap();
        b.write_at(&vec![2u8; 4096], 7 * mb).unwrap();
        // The first status answers for the whole range or a prefix of it, never beyond.
        let (s, n) = b.block_status(0, 8 * mb).unwrap();
        assert!(n >= 1 && n <= 8 * mb);
        // Walk the file: data must cover the written ranges (a file system without
        // SEEK_DATA says data everywhere, which is allowed).
        let mut off = 0;
        let mut map = Vec::new();
        while off < 8 * mb {
            let (st, n) = b.block_status(off, 8 * mb - off).unwrap();
            assert!(n >= 1 && off + n <= 8 * mb);
            map.push((off, n, st));
            off += n;
        }
        let status_at = |x: u64| {
            map.iter()
                .find(|(o, n, _)| *o <= x && x < o + n)
                .map(|e| e.2)
                .unwrap()
        };
        for x in [2 * mb, 3 * mb - 1, 7 * mb, 7 * mb + 4095] {
            assert_eq!(status_at(x), BlockStatus::Data, "offset {x}");
        }
        if s == BlockStatus::Zero {
            // SEEK_DATA works here: the untouched parts are holes.
            for x in [0, mb, 5 * mb, 8 * mb - 1] {
                assert_eq!(status_at(x), BlockStatus::Zero, "offset {x}");
            }
        }
        // A length limit is honoured inside data too.
        assert_eq!(
            b.block_status(2 * mb, 100).unwrap(),
            (BlockStatus::Data, 100)
        );
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let tmp = image(1 << 20);
        let b = FileBackend::open(tmp.path(), false, false).unwrap();
        b.write_at(&vec![0xAB; 1 << 20], 0).unwrap();
        b.write_zeroes(4096, 8192).unwrap();
        let mut buf = vec![0u8; 8192];
        b.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        if b.discard(65536, 65536).unwrap() {
            let mut buf = vec![1u8; 65536];
            b.read_at(&mut buf, 65536).unwrap();
            assert!(buf.iter().all(|&x| x == 0));
        }
        let mut edge = [0u8; 1];
        b.read_at(&mut edge, 4095).unwrap();
        assert_eq!(edge[0], 0xAB);
    }
}
