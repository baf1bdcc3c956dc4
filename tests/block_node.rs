//! Lifecycle, locking, stats and trace of `BlockNode` over real files.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use blockemu_core::block::{
    create_image, image_info, memory_node, open_image, Backend, BlockNode, CacheMode, Format,
    ImageOptions, LockSet, Op, Outcome, Phase,
};
use blockemu_core::ErrorKind;

fn image(dir: &tempfile::TempDir, name: &str, size: u64) -> String {
    let p = dir.path().join(name);
    create_image(&p, size, Format::Raw).unwrap();
    p.to_str().unwrap().to_string()
}

fn open(spec: &str, active: bool) -> BlockNode {
    let opts = ImageOptions {
        format: Some(Format::Raw),
        active,
        ..Default::default()
    };
    open_image(spec, &opts, |b| b).unwrap()
}

#[test]
fn inactive_node_issues_nothing_until_activated() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 1 << 20);
    let node = open(&spec, false);
    node.set_trace(64);
    assert_eq!(node.phase(), Phase::Inactive);
    assert_eq!(node.size().unwrap(), Some(1 << 20));
    let mut buf = [0u8; 512];
    for err in [
        node.read(0, &mut buf).unwrap_err(),
        node.write(0, &buf).unwrap_err(),
        node.flush().unwrap_err(),
        node.write_zeroes(0, 512).unwrap_err(),
        node.discard(0, 512).map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::Inactive, "{err}");
    }
    let s = node.stats();
    assert_eq!((s.reads, s.writes, s.flushes), (0, 0, 0));
    assert!(node
        .trace()
        .iter()
        .all(|e| matches!(e.outcome, Outcome::Refused(ErrorKind::Inactive)) && !e.active));

    node.activate().unwrap();
    node.write(512, b"data").unwrap();
    node.read(512, &mut buf[..4]).unwrap();
    assert_eq!(&buf[..4], b"data");
    let ops: Vec<Op> = node.trace().iter().map(|e| e.op).collect();
    let act = ops.iter().position(|&o| o == Op::Activate).unwrap();
    let drop = ops.iter().position(|&o| o == Op::DropCaches).unwrap();
    let first_io = ops.iter().rposition(|&o| o == Op::Write).unwrap();
    assert!(drop < act && act < first_io, "{ops:?}");
}

#[test]
fn opening_inactive_does_not_read_and_needs_a_format() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 4096);
    let opts = ImageOptions {
        active: false,
        ..Default::default()
    };
    let err = open_image(&spec, &opts, |b| b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    // A typing error fails early, even inactive.
    let missing = dir.path().join("missing.img");
    let opts = ImageOptions {
        active: false,
        format: Some(Format::Raw),
        ..Default::default()
    };
    let err = open_image(missing.to_str().unwrap(), &opts, |b| b).unwrap_err();
    assert_eq!(err.io_kind(), Some(std::io::ErrorKind::NotFound));
}

#[test]
fn handover_between_two_nodes_follows_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 1 << 20);
    let src = open(&spec, true);
    let dst = open(&spec, false);
    assert_eq!(src.locks(), LockSet::READ_WRITE);
    assert_eq!(dst.locks(), LockSet::INACTIVE);
    // The destination cannot take over while the source writes.
    let err = dst.activate().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Lock);
    assert_eq!(dst.phase(), Phase::Inactive);
    assert_eq!(dst.locks(), LockSet::INACTIVE);

    src.write(0, b"before handover").unwrap();
    src.inactivate().unwrap();
    assert!(src.stats().flushes >= 1, "inactivation flushes");
    dst.activate().unwrap();
    let mut buf = [0u8; 15];
    dst.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"before handover");
    // The old source can neither write nor come back.
    assert_eq!(src.write(0, b"x").unwrap_err().kind(), ErrorKind::Inactive);
    assert_eq!(src.activate().unwrap_err().kind(), ErrorKind::Lock);
    // Failing back: destination lets go, source resumes.
    dst.inactivate().unwrap();
    src.activate().unwrap();
    src.write(0, b"y").unwrap();
}

#[test]
fn second_writer_gets_a_lock_error_naming_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 4096);
    let _a = open(&spec, true);
    let opts = ImageOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let err = open_image(&spec, &opts, |b| b).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Lock);
    assert!(err.message().contains("a.img"), "{err}");
    let info = image_info(Path::new(&spec)).unwrap();
    assert_eq!(
        info.lock.describe(),
        "locked for writing by another process"
    );
    // A force-shared read-only open ignores locks, like qemu-img -U.
    let opts = ImageOptions {
        readonly: true,
        force_share: true,
        ..Default::default()
    };
    open_image(&spec, &opts, |b| b).unwrap();
}

#[test]
fn closing_an_inactive_node_writes_nothing_and_releases_locks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 4096);
    let node = open(&spec, false);
    node.close().unwrap();
    assert_eq!(node.stats(), Default::default());
    assert_eq!(node.phase(), Phase::Closed);
    assert_eq!(
        node.read(0, &mut [0u8; 1]).unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(node.size().unwrap_err().kind(), ErrorKind::Closed);
    node.close().unwrap();
    assert_eq!(
        image_info(Path::new(&spec)).unwrap().lock.describe(),
        "unlocked"
    );
}

#[test]
fn range_and_readonly_checks_issue_nothing() {
    let node = memory_node(4096, false, |b| b).unwrap();
    let err = node.read(4000, &mut [0u8; 200]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    let err = node.write(u64::MAX, &[0u8; 2]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfRange);
    assert_eq!(node.stats(), Default::default());
    let ro = memory_node(4096, true, |b| b).unwrap();
    assert_eq!(ro.write(0, b"x").unwrap_err().kind(), ErrorKind::ReadOnly);
    assert_eq!(ro.stats().writes, 0);
}

#[test]
fn writethrough_flushes_each_write_and_unsafe_never_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = image(&dir, "a.img", 1 << 16);
    for (mode, flushes_after_two_writes_and_flush) in [
        (CacheMode::Writeback, 1),
        (CacheMode::Writethrough, 3),
        (CacheMode::Unsafe, 0),
    ] {
        let opts = ImageOptions {
            cache: mode,
            ..Default::default()
        };
        let node = open_image(&spec, &opts, |b| b).unwrap();
        node.write(0, b"a").unwrap();
        node.write(1, b"b").unwrap();
        node.flush().unwrap();
        assert_eq!(
            node.stats().flushes,
            flushes_after_two_writes_and_flush,
            "{mode:?}"
        );
        node.close().unwrap();
    }
}

#[test]
fn cache_none_round_trips_when_the_fs_allows_o_direct() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let spec = image(&dir, "a.img", 1 << 16);
    let opts = ImageOptions {
        cache: CacheMode::None,
        ..Default::default()
    };
    match open_image(&spec, &opts, |b| b) {
        Ok(node) => {
            node.write(3, b"direct").unwrap();
            let mut buf = [0u8; 6];
            node.read(3, &mut buf).unwrap();
            assert_eq!(&buf, b"direct");
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}"),
    }
}

#[test]
fn inactivate_waits_for_io_in_flight_and_refuses_new_io() {
    // A backend whose reads take a while, so inactivation meets them in flight.
    struct Slow(blockemu_core::block::MemoryBackend);
    impl Backend for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockemu_core::Result<()> {
            thread::sleep(std::time::Duration::from_millis(20));
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> blockemu_core::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> blockemu_core::Result<()> {
            Ok(())
        }
        fn len(&self) -> blockemu_core::Result<u64> {
            self.0.len()
        }
    }
    let node = Arc::new(
        memory_node(1 << 16, false, |_| {
            Arc::new(Slow(
                blockemu_core::block::MemoryBackend::new(1 << 16).unwrap(),
            ))
        })
        .unwrap(),
    );
    node.set_trace(1000);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let n = node.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                let mut ok = 0;
                for _ in 0..5 {
                    if n.read(0, &mut buf).is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    thread::sleep(std::time::Duration::from_millis(30));
    node.inactivate().unwrap();
    let t = node.trace();
    let inact = t.iter().position(|e| e.op == Op::Inactivate).unwrap();
    // Nothing reached the storage after the inactivation was recorded.
    assert!(t[inact..]
        .iter()
        .skip(1)
        .all(|e| matches!(e.outcome, Outcome::Refused(_))));
    for r in readers {
        r.join().unwrap();
    }
}

#[test]
fn impossible_memory_disk_is_an_error_not_an_abort() {
    let err = memory_node(1 << 62, false, |b| b).unwrap_err();
    assert_eq!(err.os_code(), Some(libc::ENOMEM));
    assert!(blockemu_core::block::zeroed_buffer(1 << 62).is_err());
    assert_eq!(
        blockemu_core::block::zeroed_buffer(3).unwrap(),
        vec![0, 0, 0]
    );
}

/// Regression (concurrency hammer): a transition waiting for I/O in flight runs the
/// interrupt hook, which in the Python bindings takes the GIL. It must not hold a lock there
/// that a GIL holder may wait for: `drain_lock` (taken when a refused `check_read` leaves the
/// gate) and `lifecycle` (taken by `locks()`). Here a mutex plays the GIL: the hook of the
/// inactivating thread takes it, and another thread holds it while it calls `check_read` and
/// `locks()` on the draining node.
#[test]
fn a_draining_transition_never_holds_a_lock_a_gil_holder_needs() {
    use std::sync::mpsc;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    struct Blocking {
        mem: blockemu_core::block::MemoryBackend,
        st: Mutex<(bool, bool)>, // (a write entered, writes released)
        cv: Condvar,
    }
    impl Backend for Blocking {
        fn kind(&self) -> &'static str {
            "blocking"
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> blockemu_core::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> blockemu_core::Result<()> {
            let mut g = self.st.lock().unwrap();
            g.0 = true;
            self.cv.notify_all();
            while !g.1 {
                g = self.cv.wait(g).unwrap();
            }
            drop(g);
            self.mem.write_at(buf, offset)
        }
        fn flush(&self) -> blockemu_core::Result<()> {
            Ok(())
        }
        fn len(&self) -> blockemu_core::Result<u64> {
            self.mem.len()
        }
    }
    let backend = Arc::new(Blocking {
        mem: blockemu_core::block::MemoryBackend::new(1 << 16).unwrap(),
        st: Mutex::new((false, false)),
        cv: Condvar::new(),
    });
    let b = backend.clone();
    let node = Arc::new(memory_node(1 << 16, false, move |_| b).unwrap());
    let gil = Arc::new(Mutex::new(()));

    // A write in flight, blocked in the backend.
    let n = node.clone();
    let writer = thread::spawn(move || n.write(0, &[1u8; 512]));
    {
        let mut g = backend.st.lock().unwrap();
        while !g.0 {
            g = backend.cv.wait(g).unwrap();
        }
    }
    // The "GIL holder" takes the GIL and keeps it until told to use the node.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let (held_tx, held_rx) = mpsc::channel::<()>();
    let (n, g) = (node.clone(), gil.clone());
    let holder = thread::spawn(move || {
        let _gil = g.lock().unwrap();
        held_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let refused = n.check_read(0, 512).map_err(|e| e.kind());
        let locks = n.locks();
        done_tx.send((refused, locks)).unwrap();
    });
    held_rx.recv().unwrap();
    // The inactivation drains; its hook (the GIL) blocks while the holder runs.
    let (n, g) = (node.clone(), gil.clone());
    let inactivator = thread::spawn(move || {
        blockemu_core::interrupt::install(move || {
            drop(g.lock().unwrap());
            false
        });
        n.inactivate()
    });
    thread::sleep(Duration::from_millis(100)); // the inactivation is in its hook now
    {
        let mut g = backend.st.lock().unwrap();
        g.1 = true;
        backend.cv.notify_all();
    }
    thread::sleep(Duration::from_millis(50)); // the write has left the gate
    go_tx.send(()).unwrap();
    let (refused, locks) = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("deadlock: the GIL holder waits for a lock the draining transition holds");
    assert_eq!(refused, Err(ErrorKind::Inactive));
    assert_eq!(locks, LockSet::NONE); // a memory node holds no image lock
    holder.join().unwrap();
    writer.join().unwrap().unwrap();
    inactivator.join().unwrap().unwrap();
    assert_eq!(node.phase(), Phase::Inactive);
}
