//! A backend wrapper that injects faults: latency, errors, torn writes and stalls.
//!
//! The rules live in a [`FaultRules`] shared through an `Arc`, so a test (or a Python object)
//! changes them while devices keep issuing I/O. Each operation goes through three steps:
//! wait while stalled, sleep its latency, then let the rules decide (and count) whether it
//! fails. Waits and sleeps poll `interrupt::check()`, so Ctrl-C reaches a stalled caller.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::Backend;
use crate::jobs::lock;
use crate::{interrupt, Error, Result};

/// The kinds of backend operation a rule can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OpKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        OpKind::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown operation {s:?} (expected read, write, flush, discard or write_zeroes)"
                ))
            })
    }
}

/// Fail operations `first ..= last` (1-based, counted from when the rule was set) that match.
struct FailNth {
    op: Option<OpKind>,
    seen: u64,
    first: u64,
    last: u64,
    errno: i32,
}

/// Fail every matching operation that touches `[offset, end)`.
struct FailRange {
    op: Option<OpKind>,
    offset: u64,
    end: u64,
    errno: i32,
}

/// The `nth` write (counted from when the rule was set) writes only its first `keep` bytes.
struct TornWrite {
    seen: u64,
    nth: u64,
    keep: u64,
}

#[derive(Default)]
struct Stall {
    on: bool,
    /// Bumped by every release, so a waiter leaves even if a new stall begins at once.
    releases: u64,
    waiting: usize,
}

#[derive(Default)]
struct Rules {
    latency: [Duration; OpKind::ALL.len()],
    fail_nth: Vec<FailNth>,
    fail_range: Vec<FailRange>,
    torn_write: Option<TornWrite>,
    stall: Stall,
}

/// The fault rules, changeable at any time from any thread.
#[derive(Default)]
pub struct FaultRules {
    rules: Mutex<Rules>,
    released: Condvar,
    injected: AtomicU64,
}

impl fmt::Debug for FaultRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultRules")
            .field("injected", &self.injected())
            .field("stalled", &self.stalled_count())
            .finish_non_exhaustive()
    }
}

impl FaultRules {
    pub fn new() -> Self {
        Self::default()
    }

    /// Delays every operation of kind `op` (every kind with `None`) by `latency`.
    pub fn set_latency(&self, op: Option<OpKind>, latency: Duration) {
        let mut rules = lock(&self.rules);
        for kind in OpKind::ALL {
            if op.is_none_or(|op| op == kind) {
                rules.latency[kind.index()] = latency;
            }
        }
    }

    /// Fails the `nth` matching operation from now on (1 = the next one) and the `count - 1`
    /// after it with `errno`. `op` restricts the rule (and its counting) to one kind.
    pub fn fail_nth(&self, nth: u64, op: Option<OpKind>, count: u64, errno: i32) -> Result<()> {
        if nth == 0 || count == 0 {
            return Err(Error::invalid(format!(
                "fail_nth needs nth >= 1 and count >= 1 (got nth={nth}, count={count})"
            )));
        }
        check_errno(errno)?;
        lock(&self.rules).fail_nth.push(FailNth {
            op,
            seen: 0,
            first: nth,
            last: nth.saturating_add(count - 1),
            errno,
        });
        Ok(())
    }

    /// Fails every operation (of kind `op`, or any) touching `[offset, offset + len)`.
    /// Flushes touch no range and never match.
    pub fn fail_range(&self, offset: u64, len: u64, op: Option<OpKind>, errno: i32) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid("fail_range needs a non-empty range"));
        }
        check_errno(errno)?;
        lock(&self.rules).fail_range.push(FailRange {
            op,
            offset,
            end: offset.saturating_add(len),
            errno,
        });
        Ok(())
    }

    /// Tears the `nth` write from now on (1 = the next one): only its first `keep` bytes reach
    /// the inner backend, then it fails with EIO. Replaces an earlier torn-write rule.
    /// Only `write_at` counts (not `write_zeroes`); if another rule fails that write, it
    /// fails whole and the tear is spent.
    pub fn torn_write(&self, nth: u64, keep: u64) -> Result<()> {
        if nth == 0 {
            return Err(Error::invalid("torn_write needs nth >= 1"));
        }
        lock(&self.rules).torn_write = Some(TornWrite { seen: 0, nth, keep });
        Ok(())
    }

    /// Stops answering: every operation from now on waits until [`release`](Self::release).
    pub fn stall(&self) {
        lock(&self.rules).stall.on = true;
    }

    /// Lets every stalled operation (and later ones) proceed.
    pub fn release(&self) {
        Self::release_locked(&mut lock(&self.rules).stall);
        self.released.notify_all();
    }

    fn release_locked(stall: &mut Stall) {
        if stall.on {
            stall.on = false;
            stall.releases += 1;
        }
    }

    pub fn is_stalled(&self) -> bool {
        lock(&self.rules).stall.on
    }

    /// How many operations are waiting on a stall right now.
    pub fn stalled_count(&self) -> usize {
        lock(&self.rules).stall.waiting
    }

    /// Removes every rule; a stall is released.
    pub fn clear(&self) {
        let mut rules = lock(&self.rules);
        let mut stall = std::mem::take(&mut rules.stall);
        Self::release_locked(&mut stall);
        *rules = Rules {
            stall,
            ..Rules::default()
        };
        drop(rules);
        self.released.notify_all();
    }

    /// How many faults (errors and torn writes) were injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Everything an operation goes through before it reaches the inner backend: an error
    /// (injected or an interruption), or `Some(keep)` for a write to tear after `keep` bytes.
    /// `range` is `(offset, len)` for operations that have one.
    fn admit(&self, op: OpKind, range: Option<(u64, u64)>) -> Result<Option<u64>> {
        let latency = self.wait_while_stalled(op)?;
        // Not even a zero sleep: asking the hook costs a trip into Python.
        if !latency.is_zero() {
            interrupt::sleep(latency)?;
        }
        let verdict = self.decide(op, range);
        if !matches!(verdict, Ok(None)) {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Waits out a stall; returns the operation's latency, read under the same lock.
    fn wait_while_stalled(&self, op: OpKind) -> Result<Duration> {
        let mut rules = lock(&self.rules);
        if rules.stall.on {
            let releases = rules.stall.releases;
            rules.stall.waiting += 1;
            let stalled = |rules: &Rules| rules.stall.on && rules.stall.releases == releases;
            let mut outcome = Ok(());
            while stalled(&rules) {
                rules = self
                    .released
                    .wait_timeout(rules, interrupt::POLL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if !stalled(&rules) {
                    break;
                }
                // Outside the lock: the hook may run arbitrary code (Python's signal handlers).
                drop(rules);
                outcome = interrupt::check();
                rules = lock(&self.rules);
                if outcome.is_err() {
                    break;
                }
            }
            rules.stall.waiting -= 1;
            outcome?;
        }
        Ok(rules.latency[op.index()])
    }

    fn decide(&self, op: OpKind, range: Option<(u64, u64)>) -> Result<Option<u64>> {
        let mut rules = lock(&self.rules);
        let rules = &mut *rules;
        let offset = range.map(|(offset, _)| offset);

        // Every counting rule counts this operation, whichever rule fires.
        let mut errno = None;
        for rule in rules.fail_nth.iter_mut() {
            if rule.op.is_none_or(|o| o == op) {
                rule.seen += 1;
                if errno.is_none() && (rule.first..=rule.last).contains(&rule.seen) {
                    errno = Some((rule.errno, String::new()));
                }
            }
        }
        rules.fail_nth.retain(|rule| rule.seen < rule.last);

        if errno.is_none() {
            if let Some((offset, len)) = range {
                let end = offset.saturating_add(len);
                errno = rules
                    .fail_range
                    .iter()
                    .find(|r| r.op.is_none_or(|o| o == op) && offset < r.end && r.offset < end)
                    .map(|r| (r.errno, format!(" (fault range {}..{})", r.offset, r.end)));
            }
        }

        let mut torn = None;
        if op == OpKind::Write {
            if let Some(rule) = &mut rules.torn_write {
                rule.seen += 1;
                if rule.seen == rule.nth {
                    torn = Some(rule.keep);
                    rules.torn_write = None;
                }
            }
        }

        match errno {
            Some((errno, why)) => Err(Error::os(
                errno,
                format!("{}{why}", injected_message(errno, op, offset)),
            )),
            None => Ok(torn),
        }
    }
}

fn check_errno(errno: i32) -> Result<()> {
    if errno <= 0 {
        return Err(Error::invalid(format!(
            "an injected error needs a positive errno (got {errno})"
        )));
    }
    Ok(())
}

fn injected_message(errno: i32, op: OpKind, offset: Option<u64>) -> String {
    match offset {
        Some(offset) => format!("injected {} on {op} at offset {offset}", errno_name(errno)),
        None => format!("injected {} on {op}", errno_name(errno)),
    }
}

/// The symbolic name of the errnos a fault test is likely to inject.
fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EROFS => "EROFS",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::ENXIO => "ENXIO",
        libc::ENODEV => "ENODEV",
        libc::EAGAIN => "EAGAIN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::ESTALE => "ESTALE",
        libc::EBADF => "EBADF",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// A backend that passes every operation to `inner` unless its [`FaultRules`] say otherwise.
pub struct FaultInjector {
    inner: Arc<dyn Backend>,
    rules: Arc<FaultRules>,
}

impl fmt::Debug for FaultInjector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultInjector")
            .field("inner", &self.inner.kind())
            .field("rules", &self.rules)
            .finish()
    }
}

impl FaultInjector {
    pub fn new(inner: Arc<dyn Backend>, rules: Arc<FaultRules>) -> Self {
        FaultInjector { inner, rules }
    }

    pub fn rules(&self) -> &Arc<FaultRules> {
        &self.rules
    }

    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }
}

impl Backend for FaultInjector {
    fn kind(&self) -> &'static str {
        "fault"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.rules
            .admit(OpKind::Read, Some((offset, buf.len() as u64)))?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let Some(keep) = self
            .rules
            .admit(OpKind::Write, Some((offset, buf.len() as u64)))?
        else {
            return self.inner.write_at(buf, offset);
        };
        let keep = keep.min(buf.len() as u64);
        if keep > 0 {
            self.inner.write_at(&buf[..keep as usize], offset)?;
        }
        Err(Error::os(
            libc::EIO,
            format!(
                "{} (torn write: {keep} of {} bytes written)",
                injected_message(libc::EIO, OpKind::Write, Some(offset)),
                buf.len()
            ),
        ))
    }

    fn flush(&self) -> Result<()> {
        self.rules.admit(OpKind::Flush, None)?;
        self.inner.flush()
    }

    fn resize(&self, len: u64) -> Result<()> {
        self.inner.resize(len)
    }

    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<bool> {
        self.rules.admit(OpKind::Discard, Some((offset, len)))?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.rules.admit(OpKind::WriteZeroes, Some((offset, len)))?;
        self.inner.write_zeroes(offset, len)
    }

    fn drop_caches(&self) -> Result<()> {
        self.inner.drop_caches()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(super::BlockStatus, u64)> {
        // The data is the inner backend's: its map is ours (no rule targets a status query).
        self.inner.block_status(offset, len)
    }

    fn allocated(&self) -> Result<Option<u64>> {
        self.inner.allocated()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::sync::atomic::AtomicBool;
    use std::thread;
    use std::time::Instant;

    /// Bytes in memory; only what these tests need.
    struct Memory(Mutex<Vec<u8>>);

    impl Backend for Memory {
        fn kind(&self) -> &'static str {
            "memory"
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            let data = lock(&self.0);
            buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let mut data = lock(&self.0);
            data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn len(&self) -> Result<u64> {
            Ok(lock(&self.0).len() as u64)
        }
    }

    fn injector(size: usize) -> (Arc<FaultInjector>, Arc<FaultRules>, Arc<Memory>) {
        let memory = Arc::new(Memory(Mutex::new(vec![0; size])));
        let rules = Arc::new(FaultRules::new());
        let fault = Arc::new(FaultInjector::new(memory.clone(), rules.clone()));
        (fault, rules, memory)
    }

    fn errno_of(r: Result<impl Sized>) -> Option<i32> {
        r.err().and_then(|e| e.os_code())
    }

    #[test]
    fn without_rules_everything_passes_through() {
        let (fault, rules, _) = injector(4096);
        fault.write_at(b"abc", 10).unwrap();
        let mut buf = [0; 3];
        fault.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"abc");
        fault.flush().unwrap();
        fault.write_zeroes(10, 3).unwrap();
        fault.read_at(&mut buf, 10).unwrap();
        assert_eq!(buf, [0; 3]);
        assert!(!fault.discard(0, 512).unwrap());
        assert_eq!(fault.len().unwrap(), 4096);
        assert_eq!(fault.kind(), "fault");
        assert_eq!(rules.injected(), 0);
    }

    #[test]
    fn fail_nth_counts_from_when_it_is_set() {
        let (fault, rules, _) = injector(4096);
        let mut buf = [0; 512];
        fault.read_at(&mut buf, 0).unwrap(); // before the rule: not counted
        rules.fail_nth(2, None, 1, libc::EIO).unwrap();
        fault.read_at(&mut buf, 0).unwrap();
        let err = fault.write_at(&buf, 1024).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(err.os_code(), Some(libc::EIO));
        assert_eq!(err.message(), "injected EIO on write at offset 1024");
        fault.write_at(&buf, 1024).unwrap(); // spent
        assert_eq!(rules.injected(), 1);
    }

    #[test]
    fn fail_nth_of_one_kind_for_count_operations() {
        let (fault, rules, _) = injector(4096);
        rules
            .fail_nth(2, Some(OpKind::Flush), 2, libc::ENOSPC)
            .unwrap();
        let mut buf = [0; 512];
        fault.read_at(&mut buf, 0).unwrap(); // another kind: not counted
        fault.flush().unwrap();
        let err = fault.flush().unwrap_err();
        assert_eq!(err.message(), "injected ENOSPC on flush");
        assert_eq!(errno_of(fault.flush()), Some(libc::ENOSPC));
        fault.flush().unwrap();
        assert_eq!(rules.injected(), 2);
        assert!(rules.fail_nth(0, None, 1, libc::EIO).is_err());
        assert!(rules.fail_nth(1, None, 0, libc::EIO).is_err());
        assert!(rules.fail_nth(1, None, 1, 0).is_err());
    }

    #[test]
    fn fail_range_hits_operations_touching_it() {
        let (fault, rules, _) = injector(8192);
        rules.fail_range(4096, 512, None, libc::EIO).unwrap();
        let mut buf = [0; 512];
        fault.read_at(&mut buf, 3584).unwrap(); // ends where the range begins
        fault.read_at(&mut buf, 4608).unwrap(); // begins where it ends
        let err = fault.read_at(&mut buf, 4000).unwrap_err();
        assert_eq!(
            err.message(),
            "injected EIO on read at offset 4000 (fault range 4096..4608)"
        );
        assert_eq!(errno_of(fault.write_zeroes(0, 8192)), Some(libc::EIO));
        fault.flush().unwrap(); // no range
        rules.clear();
        rules
            .fail_range(0, 512, Some(OpKind::Discard), libc::EROFS)
            .unwrap();
        fault.write_at(&buf, 0).unwrap();
        assert_eq!(errno_of(fault.discard(0, 4096)), Some(libc::EROFS));
        assert_eq!(rules.injected(), 3);
    }

    #[test]
    fn a_torn_write_stores_only_its_first_bytes() {
        let (fault, rules, memory) = injector(4096);
        rules.torn_write(2, 100).unwrap();
        fault.flush().unwrap(); // only writes count
        fault.write_at(&[1; 512], 0).unwrap();
        let err = fault.write_at(&[2; 512], 0).unwrap_err();
        assert_eq!(err.os_code(), Some(libc::EIO));
        assert!(err.message().contains("100 of 512 bytes"), "{err}");
        let data = lock(&memory.0);
        assert!(data[..100].iter().all(|&b| b == 2));
        assert!(data[100..512].iter().all(|&b| b == 1));
        drop(data);
        fault.write_at(&[3; 512], 0).unwrap(); // one-shot
        assert_eq!(rules.injected(), 1);
    }

    #[test]
    fn latency_is_per_operation_kind() {
        let (fault, rules, _) = injector(4096);
        rules.set_latency(Some(OpKind::Flush), Duration::from_millis(5));
        let t = Instant::now();
        fault.flush().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(5));
        // With a hook that always interrupts, only an operation that sleeps notices it.
        rules.set_latency(Some(OpKind::Flush), Duration::from_secs(3600));
        interrupt::with_hook(
            || true,
            || {
                fault.write_at(&[0; 8], 0).unwrap();
                assert_eq!(fault.flush().unwrap_err().kind(), ErrorKind::Interrupted);
                rules.set_latency(None, Duration::ZERO);
                fault.flush().unwrap();
            },
        );
    }

    #[test]
    fn a_stall_holds_operations_until_released() {
        let (fault, rules, _) = injector(4096);
        rules.stall();
        let writers: Vec<_> = (0..3u64)
            .map(|i| {
                let fault = fault.clone();
                thread::spawn(move || fault.write_at(&[i as u8 + 1; 8], i * 8))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rules.stalled_count() < 3 {
            assert!(Instant::now() < deadline, "writers never stalled");
            thread::sleep(Duration::from_millis(1));
        }
        // A new stall right after the release must not catch the released operations.
        rules.release();
        rules.stall();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        assert_eq!(rules.stalled_count(), 0);
        rules.clear(); // releases too
        assert!(!rules.is_stalled());
        let mut buf = [0; 24];
        fault.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[0], 1);
        assert_eq!(buf[23], 3);
    }

    #[test]
    fn a_stalled_caller_is_interrupted() {
        let (fault, rules, _) = injector(4096);
        rules.stall();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let waiter = thread::spawn(move || {
            interrupt::with_hook(move || s.load(Ordering::SeqCst), || fault.flush())
        });
        while rules.stalled_count() == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::SeqCst);
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Interrupted);
        assert_eq!(rules.stalled_count(), 0);
        assert!(
            rules.is_stalled(),
            "an interruption does not release the others"
        );
        assert_eq!(rules.injected(), 0);
    }

    #[test]
    fn rules_change_while_operations_run() {
        let (fault, rules, _) = injector(64 * 512);
        let done = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..3u64)
            .map(|t| {
                let (fault, done, failures) = (fault.clone(), done.clone(), failures.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    let mut i = 0u64;
                    while !done.load(Ordering::SeqCst) {
                        let offset = ((i * 7 + t) % 64) * 512;
                        let r = match i % 3 {
                            0 => fault.read_at(&mut buf, offset),
                            1 => fault.write_at(&buf, offset),
                            _ => fault.flush(),
                        };
                        if let Err(e) = r {
                            assert_eq!(e.kind(), ErrorKind::Io, "{e}");
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        for round in 0..200u64 {
            match round % 5 {
                0 => rules.fail_nth(1 + round % 3, None, 2, libc::EIO).unwrap(),
                1 => rules
                    .fail_range((round % 64) * 512, 1024, Some(OpKind::Read), libc::EIO)
                    .unwrap(),
                2 => rules.torn_write(1, 10).unwrap(),
                3 => rules.set_latency(Some(OpKind::Flush), Duration::from_micros(50)),
                _ => rules.clear(),
            }
            thread::yield_now();
        }
        // However the threads were scheduled, at least one fault lands before the end.
        rules.fail_nth(1, None, 1, libc::EIO).unwrap();
        while rules.injected() == 0 {
            thread::sleep(Duration::from_millis(1));
        }
        done.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().unwrap();
        }
        // Every injected fault reached a caller as an error, and nothing else failed.
        assert_eq!(failures.load(Ordering::SeqCst), rules.injected());
    }

    #[test]
    fn op_kinds_parse_from_their_names() {
        for op in OpKind::ALL {
            assert_eq!(op.as_str().parse::<OpKind>().unwrap(), op);
        }
        assert_eq!(
            "trim".parse::<OpKind>().unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
