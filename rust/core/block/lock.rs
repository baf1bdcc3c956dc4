//! Image locking that QEMU understands: open-file-description byte-range locks at QEMU's
//! lock-byte offsets (specs/migration.md §4).
//!
//! One byte per permission: byte `100 + p` is held by whoever *holds* permission `p`, byte
//! `200 + p` by whoever *refuses to share* it. Every byte is taken as a shared (read) lock;
//! a conflict is found by testing whether an exclusive lock on the opposite byte could be
//! taken. OFD locks belong to the open file description, so they vanish when the file is
//! closed or the process dies, and two descriptors in one process do conflict (which lets the
//! tests exercise two "processes" with two opens).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits, in lock-byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The name QEMU prints in its lock errors.
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }
}

/// A set of permissions held, and a set of permissions refused to others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockSet {
    pub held: u8,
    pub unshared: u8,
}

impl LockSet {
    /// Nothing held, nothing refused (a closed or force-shared image).
    pub const NONE: LockSet = LockSet {
        held: 0,
        unshared: 0,
    };
    /// An inactive node: it may read, and lets others write and resize (QEMU's inactive
    /// permissions: consistent read only).
    pub const INACTIVE: LockSet = LockSet {
        held: 1 << Perm::ConsistentRead as u8,
        unshared: 0,
    };
    /// An active read-only node: reads, and refuses to share write (as `qemu-img info` does,
    /// so opening read-only beside a running writer fails like QEMU's tools).
    pub const READ_ONLY: LockSet = LockSet {
        held: 1 << Perm::ConsistentRead as u8,
        unshared: 1 << Perm::Write as u8,
    };
    /// An active writable node: holds read, write and resize; shares neither write nor resize
    /// (QEMU's file node under a read-write device with share-rw=off).
    pub const READ_WRITE: LockSet = LockSet {
        held: (1 << Perm::ConsistentRead as u8)
            | (1 << Perm::Write as u8)
            | (1 << Perm::Resize as u8),
        unshared: (1 << Perm::Write as u8) | (1 << Perm::Resize as u8),
    };

    pub fn holds(self, p: Perm) -> bool {
        self.held & p.bit() != 0
    }
    pub fn refuses(self, p: Perm) -> bool {
        self.unshared & p.bit() != 0
    }

    fn bytes(self) -> impl Iterator<Item = i64> {
        Perm::ALL.into_iter().flat_map(move |p| {
            let a = self.holds(p).then_some(PERM_BASE + p as i64);
            let b = self.refuses(p).then_some(SHARED_BASE + p as i64);
            a.into_iter().chain(b)
        })
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_byte(file: &File, byte: i64, lock: bool) -> std::io::Result<()> {
    let kind = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
    let mut fl = flock(kind as libc::c_short, byte);
    // SAFETY: valid fd and a pointer to a live flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether some other open file description holds a lock on `byte`.
fn byte_taken(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Moves `file`'s locks from `old` to `new`, QEMU's way: lock the union, check for
/// conflicts, then drop what is no longer needed; on a conflict, go back to `old`.
pub fn transition(file: &File, path: &Path, old: LockSet, new: LockSet) -> Result<()> {
    let union = LockSet {
        held: old.held | new.held,
        unshared: old.unshared | new.unshared,
    };
    let io = |e: std::io::Error| Error::io(e).with_path(path).with_op("lock");
    let rollback = |file: &File| {
        for byte in union.bytes() {
            if !old.bytes().any(|b| b == byte) {
                let _ = set_byte(file, byte, false);
            }
        }
    };
    for byte in union.bytes() {
        if let Err(e) = set_byte(file, byte, true) {
            rollback(file);
            if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES) {
                // Only an exclusive lock could block a shared one; nobody takes those here.
                return Err(Error::lock(format!(
                    "Failed to lock byte {byte}; is another process using the image [{}]?",
                    path.display()
                )));
            }
            return Err(io(e));
        }
    }
    for p in Perm::ALL {
        // A permission I want must not be refused by anyone else.
        if new.holds(p) && byte_taken(file, SHARED_BASE + p as i64).map_err(io)? {
            rollback(file);
            return Err(Error::lock(format!(
                "Failed to get \"{}\" lock; is another process using the image [{}]?",
                p.name(),
                path.display()
            )));
        }
        // A permission I refuse to share must not be held by anyone else.
        if new.refuses(p) && byte_taken(file, PERM_BASE + p as i64).map_err(io)? {
            rollback(file);
            return Err(Error::lock(format!(
                "Failed to get shared \"{}\" lock; is another process using the image [{}]?",
                p.name(),
                path.display()
            )));
        }
    }
    for byte in union.bytes() {
        if !new.bytes().any(|b| b == byte) {
            set_byte(file, byte, false).map_err(io)?;
        }
    }
    Ok(())
}

/// What other processes hold on an image, as seen through a fresh descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockProbe {
    pub others: LockSet,
}

impl LockProbe {
    /// A short description: "unlocked", "read by another process", "written by another
    /// process" (someone holds the write permission).
    pub fn describe(self) -> &'static str {
        if self.others.holds(Perm::Write) {
            "locked for writing by another process"
        } else if self.others.held != 0 || self.others.unshared != 0 {
            "opened read-only by another process"
        } else {
            "unlocked"
        }
    }
}

/// Looks at the lock bytes of `path` without taking any (opens it read-only).
pub fn probe(path: &Path) -> Result<LockProbe> {
    let file = File::open(path).map_err(|e| Error::io(e).with_path(path))?;
    let io = |e: std::io::Error| Error::io(e).with_path(path).with_op("lock probe");
    let mut others = LockSet::NONE;
    for p in Perm::ALL {
        if byte_taken(&file, PERM_BASE + p as i64).map_err(io)? {
            others.held |= p.bit();
        }
        if byte_taken(&file, SHARED_BASE + p as i64).map_err(io)? {
            others.unshared |= p.bit();
        }
    }
    Ok(LockProbe { others })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::fs::OpenOptions;

    fn two_opens() -> (tempfile::NamedTempFile, File, File) {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let a = OpenOptions::new()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        let b = OpenOptions::new()
            .read(true)
            .write(true)
            .open(tmp.path())
            .unwrap();
        (tmp, a, b)
    }

    #[test]
    fn second_writer_is_refused_with_qemus_message() {
        let (tmp, a, b) = two_opens();
        transition(&a, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap();
        let err = transition(&b, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Lock);
        assert!(
            err.message().contains("Failed to get \"write\" lock"),
            "{err}"
        );
        assert!(err.message().contains(&tmp.path().display().to_string()));
        // The refused side holds nothing afterwards.
        assert_eq!(probe(tmp.path()).unwrap().others, LockSet::READ_WRITE);
    }

    #[test]
    fn inactive_coexists_with_a_writer_and_takes_over_after_it_lets_go() {
        let (tmp, src, dst) = two_opens();
        transition(&src, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap();
        transition(&dst, tmp.path(), LockSet::NONE, LockSet::INACTIVE).unwrap();
        // Destination cannot activate while the source writes.
        let err = transition(&dst, tmp.path(), LockSet::INACTIVE, LockSet::READ_WRITE).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Lock);
        // Source inactivates: releases write; destination activates.
        transition(&src, tmp.path(), LockSet::READ_WRITE, LockSet::INACTIVE).unwrap();
        transition(&dst, tmp.path(), LockSet::INACTIVE, LockSet::READ_WRITE).unwrap();
        // Now the source can't come back.
        let err = transition(&src, tmp.path(), LockSet::INACTIVE, LockSet::READ_WRITE).unwrap_err();
        assert!(err.message().contains("Failed to get"), "{err}");
    }

    #[test]
    fn read_only_beside_a_writer_fails_on_shared_write() {
        let (tmp, a, b) = two_opens();
        transition(&a, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap();
        let err = transition(&b, tmp.path(), LockSet::NONE, LockSet::READ_ONLY).unwrap_err();
        assert!(
            err.message()
                .contains("Failed to get shared \"write\" lock"),
            "{err}"
        );
        // Two readers are fine.
        transition(&a, tmp.path(), LockSet::READ_WRITE, LockSet::READ_ONLY).unwrap();
        transition(&b, tmp.path(), LockSet::NONE, LockSet::READ_ONLY).unwrap();
    }

    #[test]
    fn locks_vanish_with_the_descriptor() {
        let (tmp, a, b) = two_opens();
        transition(&a, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap();
        drop(a);
        transition(&b, tmp.path(), LockSet::NONE, LockSet::READ_WRITE).unwrap();
        assert_eq!(
            probe(tmp.path()).unwrap().describe(),
            "locked for writing by another process"
        );
        drop(b);
        assert_eq!(probe(tmp.path()).unwrap().describe(), "unlocked");
    }
}
