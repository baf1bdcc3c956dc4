//! Mirror jobs: a live source copied to a target while a writer keeps writing; errors,
//! cancel, throttle, sparse copies; dirty bitmaps on nodes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use blockemu_core::block::qcow2::create_empty;
use blockemu_core::block::{
    create_image, create_image_with, memory_node, open_image, Backend, BlockNode, BlockStatus,
    FaultInjector, FaultRules, Format, ImageOptions, MemoryBackend, OpKind, Qcow2Backend,
};
use blockemu_core::jobs::{MirrorConfig, MirrorJob, MirrorState};
use blockemu_core::ErrorKind;

const MIB: u64 = 1 << 20;
const LONG: Option<Duration> = Some(Duration::from_secs(60));

fn mem(size: u64) -> Arc<BlockNode> {
    Arc::new(memory_node(size, false, |b| b).unwrap())
}

fn file(dir: &tempfile::TempDir, name: &str, size: u64) -> Arc<BlockNode> {
    let p = dir.path().join(name);
    create_image(&p, size, Format::Raw).unwrap();
    let opts = ImageOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    Arc::new(open_image(p.to_str().unwrap(), &opts, |b| b).unwrap())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn fill(node: &BlockNode, seed: u64) {
    let size = node.size().unwrap().unwrap();
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        for b in buf[..n].iter_mut() {
            *b = rng.next() as u8;
        }
        node.write(off, &buf[..n]).unwrap();
        off += n as u64;
    }
}

fn same(a: &BlockNode, b: &BlockNode) -> bool {
    let size = a.size().unwrap().unwrap();
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        a.read(off, &mut x[..n]).unwrap();
        b.read(off, &mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            return false;
        }
        off += n as u64;
    }
    true
}

/// A writer hammering random writes (and some zeroes) on `node` until stopped.
fn writer(node: Arc<BlockNode>, stop: Arc<AtomicBool>, seed: u64) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let size = node.size().unwrap().unwrap();
        let mut rng = Rng(seed);
        let mut n = 0u64;
        let buf: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
        while !stop.load(Ordering::Acquire) {
            let len = 1 + rng.next() % (buf.len() as u64);
            let off = rng.next() % (size - len);
            if rng.next() % 8 == 0 {
                node.write_zeroes(off, len).unwrap();
            } else {
                let start = (rng.next() % 1000) as usize;
                let len = len.min((buf.len() - start) as u64) as usize;
                node.write(off, &buf[start..start + len]).unwrap();
            }
            n += 1;
            if n % 64 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        n
    })
}

fn mirror_under_writes(source: Arc<BlockNode>, target: Arc<BlockNode>, config: MirrorConfig) {
    fill(&source, 42);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(source.clone(), stop.clone(), 7);
    let job = MirrorJob::start(source.clone(), target.clone(), config).unwrap();
    assert!(job.wait_ready(LONG).unwrap(), "ready");
    // Keep writing while ready: the job keeps copying.
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let writes = w.join().unwrap();
    assert!(writes > 10, "the writer wrote ({writes})");
    let before = job.progress();
    let p = job.complete(LONG).unwrap();
    eprintln!("before complete: {before:?}\nafter: {p:?}");
    assert!(p.passes >= 1, "dirty passes ran: {p:?}");
    assert!(before.dirty_rate > 0.0, "the writer dirtied: {before:?}");
    assert_eq!(p.state, MirrorState::Completed);
    assert_eq!(p.bytes_done, p.bytes_total);
    assert!(source.dirty_bitmaps().is_empty());
    assert!(same(&source, &target), "target differs from source");
}

#[test]
fn memory_to_memory_under_writes() {
    let size = 24 * MIB + 4096 + 512; // a partial last chunk and granule
    mirror_under_writes(
        mem(size),
        mem(size),
        MirrorConfig {
            chunk_size: 256 << 10,
            max_in_flight: 4,
            converge_bytes: 4 * MIB,
            ..Default::default()
        },
    );
}

#[test]
fn file_to_file_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    mirror_under_writes(
        file(&dir, "src.img", size),
        file(&dir, "dst.img", size),
        MirrorConfig {
            granularity: 4096,
            max_in_flight: 8,
            converge_bytes: 2 * MIB,
            ..Default::default()
        },
    );
}

#[test]
fn max_downtime_makes_a_busy_job_ready() {
    let size = 8 * MIB;
    let (a, b) = (mem(size), mem(size));
    fill(&a, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(a.clone(), stop.clone(), 5);
    let job = MirrorJob::start(
        a.clone(),
        b.clone(),
        MirrorConfig {
            converge_bytes: 0,
            max_downtime: Some(Duration::from_secs(10)),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(job.wait_ready(LONG).unwrap());
    stop.store(true, Ordering::Release);
    w.join().unwrap();
    let p = job.complete(LONG).unwrap();
    assert!(p.throughput > 0.0, "{p:?}");
    assert!(same(&a, &b));
}

#[test]
fn a_target_write_error_fails_the_job_cleanly() {
    let size = 8 * MIB;
    let source = mem(size);
    fill(&source, 1);
    let rules = Arc::new(FaultRules::new());
    let target = Arc::new(
        memory_node(size, false, |b| {
            Arc::new(FaultInjector::new(b, rules.clone())) as Arc<dyn Backend>
        })
        .unwrap(),
    );
    rules
        .fail_range(3 * MIB, 4096, Some(OpKind::Write), libc::ENOSPC)
        .unwrap();
    let job = MirrorJob::start(
        source.clone(),
        target,
        MirrorConfig {
            sparse: false,
            ..Default::default()
        },
    )
    .unwrap();
    let e = job.wait_ready(LONG).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(e.to_string().contains("mirror copy"), "{e}");
    assert!(job.wait(LONG).unwrap());
    let p = job.progress();
    assert_eq!(p.state, MirrorState::Failed);
    assert_eq!(p.error.as_ref().unwrap().os_code(), Some(libc::ENOSPC));
    assert_eq!(job.complete(LONG).unwrap_err().kind(), ErrorKind::Io);
    assert!(
        source.dirty_bitmaps().is_empty(),
        "bitmap removed on failure"
    );
    // The source is untouched and still writable without a bitmap.
    source.write(0, b"x").unwrap();
}

#[test]
fn a_source_read_error_fails_the_job() {
    let size = 4 * MIB;
    let rules = Arc::new(FaultRules::new());
    let source = Arc::new(
        memory_node(size, false, |b| {
            Arc::new(FaultInjector::new(b, rules.clone())) as Arc<dyn Backend>
        })
        .unwrap(),
    );
    rules.fail_nth(2, Some(OpKind::Read), 1, libc::EIO).unwrap();
    let job = MirrorJob::start(source, mem(size), MirrorConfig::default()).unwrap();
    assert!(job.wait(LONG).unwrap());
    assert_eq!(job.state(), MirrorState::Failed);
    assert_eq!(
        job.progress().error.unwrap().os_code(),
        Some(libc::EIO),
        "the kind and errno are kept"
    );
}

#[test]
fn cancel_mid_bulk() {
    let size = 64 * MIB;
    let (a, b) = (mem(size), mem(size));
    let job = MirrorJob::start(
        a.clone(),
        b,
        MirrorConfig {
            speed: 4 * MIB,
            chunk_size: MIB,
            sparse: false,
            ..Default::default()
        },
    )
    .unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(job.state(), MirrorState::Bulk);
    job.cancel();
    assert!(job.wait(Some(Duration::from_secs(10))).unwrap());
    let p = job.progress();
    assert_eq!(p.state, MirrorState::Cancelled);
    assert!(p.bytes_done < size);
    assert!(a.dirty_bitmaps().is_empty());
    assert_eq!(
        job.wait_ready(Some(Duration::ZERO)).unwrap_err().kind(),
        ErrorKind::Cancelled
    );
    assert_eq!(job.complete(LONG).unwrap_err().kind(), ErrorKind::Cancelled);
}

#[test]
fn dropping_the_last_handle_cancels() {
    let size = 64 * MIB;
    let a = mem(size);
    let job = MirrorJob::start(
        a.clone(),
        mem(size),
        MirrorConfig {
            speed: MIB,
            sparse: false,
            ..Default::default()
        },
    )
    .unwrap();
    let other = job.clone();
    drop(job);
    assert_eq!(other.state(), MirrorState::Bulk, "a clone keeps it running");
    let name = other.bitmap_name().to_string();
    drop(other);
    for _ in 0..500 {
        if a.dirty_bitmaps().is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        a.dirty_bitmap(&name).is_none(),
        "the job ended and removed its bitmap"
    );
}

#[test]
fn throttle_holds_the_copy_back() {
    let size = 16 * MIB;
    let (a, b) = (mem(size), mem(size));
    let job = MirrorJob::start(
        a,
        b,
        MirrorConfig {
            speed: 256 << 10,
            chunk_size: 64 << 10,
            sparse: false,
            ..Default::default()
        },
    )
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    let p = job.progress();
    assert!(p.bytes_done < size / 2, "{p:?}");
    assert_eq!(p.state, MirrorState::Bulk);
    // Lifting the limit lets it finish.
    job.set_speed(0);
    assert!(job.wait_ready(LONG).unwrap());
    job.complete(LONG).unwrap();
}

#[test]
fn sparse_source_sends_almost_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let a = file(&dir, "holes.img", size);
    a.write(5 * MIB, &vec![9u8; 65536]).unwrap();
    a.write(40 * MIB + 512, &vec![8u8; 1000]).unwrap();
    a.flush().unwrap();
    let b = file(&dir, "dst.img", size);
    // A target with stale data: zero regions must be written as zeroes.
    b.write(20 * MIB, &vec![7u8; 4096]).unwrap();
    let job = MirrorJob::start(a.clone(), b.clone(), MirrorConfig::default()).unwrap();
    let p = job.complete(LONG).unwrap();
    assert!(p.bytes_copied <= 4 * MIB, "{p:?}");
    assert_eq!(p.bytes_copied + p.bytes_zero, size, "{p:?}");
    assert!(same(&a, &b));
    // Into a target known to be zeroed, zero regions are skipped outright.
    let c = file(&dir, "zeroed.img", size);
    let job = MirrorJob::start(
        a.clone(),
        c.clone(),
        MirrorConfig {
            target_zeroed: true,
            ..Default::default()
        },
    )
    .unwrap();
    let p = job.complete(LONG).unwrap();
    assert!(p.bytes_copied <= 4 * MIB, "{p:?}");
    assert!(same(&a, &c));
    assert!(c.stats().write_zeroes <= 8, "{:?}", c.stats());
}

#[test]
fn bitmaps_on_a_node() {
    let node = mem(MIB + 100);
    let b = node.add_dirty_bitmap("b", 4096).unwrap();
    assert_eq!(
        node.add_dirty_bitmap("b", 4096).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        node.add_dirty_bitmap("c", 1000).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    node.write(10, b"abc").unwrap();
    node.write_zeroes(8192, 1).unwrap();
    node.discard(MIB, 100).unwrap();
    assert_eq!(
        b.ranges(0, None).unwrap(),
        vec![(0, 4096), (8192, 4096), (MIB, 100)]
    );
    assert_eq!(b.count(), 8192 + 100);
    // A failed write is marked too (it may have changed the data).
    let rules = Arc::new(FaultRules::new());
    let faulty = memory_node(MIB, false, |x| {
        Arc::new(FaultInjector::new(x, rules.clone())) as Arc<dyn Backend>
    })
    .unwrap();
    let fb = faulty.add_dirty_bitmap("f", 512).unwrap();
    rules
        .fail_nth(1, Some(OpKind::Write), 1, libc::EIO)
        .unwrap();
    assert!(faulty.write(1024, b"x").is_err());
    assert_eq!(fb.ranges(0, None).unwrap(), vec![(1024, 512)]);
    // Refused and out-of-range writes mark nothing.
    assert!(faulty.write(MIB, b"x").is_err());
    assert_eq!(fb.count(), 512);
    // The bound, and resize.
    assert_eq!(
        node.resize(2 * MIB).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    for i in 1..64 {
        node.add_dirty_bitmap(&format!("n{i}"), 65536).unwrap();
    }
    assert_eq!(
        node.add_dirty_bitmap("one-too-many", 65536)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(node.dirty_bitmaps().len(), 64);
    for name in node.dirty_bitmaps() {
        assert!(node.remove_dirty_bitmap(&name).unwrap().is_some());
    }
    assert!(node.remove_dirty_bitmap("b").unwrap().is_none());
    node.resize(2 * MIB).unwrap();
    // A removed bitmap is no longer marked.
    node.write(0, &[1; 4096 * 3]).unwrap();
    assert_eq!(b.count(), 8192 + 100);
    // Closed nodes refuse new bitmaps.
    node.close().unwrap();
    assert_eq!(
        node.add_dirty_bitmap("x", 65536).unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[test]
fn block_status_of_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let node = file(&dir, "s.img", 4 * MIB);
    node.write(MIB, &[1u8; 4096]).unwrap();
    let (st, n) = node.block_status(MIB, 4096).unwrap();
    assert_eq!((st, n), (BlockStatus::Data, 4096));
    assert_eq!(
        node.block_status(4 * MIB, 1).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        node.block_status(0, 0).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    node.inactivate().unwrap();
    assert_eq!(
        node.block_status(0, 512).unwrap_err().kind(),
        ErrorKind::Inactive
    );
    // Memory: data (allowed: unsure means data).
    let m = mem(MIB);
    assert_eq!(m.block_status(0, MIB).unwrap(), (BlockStatus::Data, MIB));
}

/// qcow2 over a memory file: unallocated clusters and zero clusters are zero, allocated
/// ones data.
#[test]
fn qcow2_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    create_image_with(&p, 8 * MIB, Format::Qcow2, false).unwrap();
    let opts = ImageOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    let node = open_image(p.to_str().unwrap(), &opts, |b| b).unwrap();
    let cs = 65536u64;
    assert_eq!(
        node.block_status(0, 8 * MIB).unwrap(),
        (BlockStatus::Zero, 8 * MIB)
    );
    node.write(2 * cs + 100, b"data").unwrap();
    node.write(3 * cs, &vec![5u8; cs as usize]).unwrap();
    assert_eq!(
        node.block_status(0, 8 * MIB).unwrap(),
        (BlockStatus::Zero, 2 * cs)
    );
    assert_eq!(
        node.block_status(2 * cs + 10, 8 * MIB - 2 * cs - 10)
            .unwrap(),
        (BlockStatus::Data, 2 * cs - 10)
    );
    assert_eq!(
        node.block_status(4 * cs, 4 * MIB).unwrap(),
        (BlockStatus::Zero, 4 * MIB)
    );
    node.close().unwrap();
    // Set the zero flag on the L2 entry of cluster 3 (an allocated zero cluster), in a copy of
    // the image held in memory.
    let mut bytes = std::fs::read(&p).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&bytes, l2 + 3 * 8);
    assert_ne!(e & 0x00ff_ffff_ffff_fe00, 0);
    bytes[l2 + 3 * 8..l2 + 4 * 8].copy_from_slice(&(e | 1).to_be_bytes());
    let q = Qcow2Backend::new(Arc::new(MemoryBackend::from_vec(bytes)), true);
    assert_eq!(q.block_status(2 * cs, cs).unwrap(), (BlockStatus::Data, cs));
    assert_eq!(
        q.block_status(3 * cs, 8 * MIB - 3 * cs).unwrap(),
        (BlockStatus::Zero, 8 * MIB - 3 * cs)
    );
    let mut buf = vec![1u8; cs as usize];
    q.read_at(&mut buf, 3 * cs).unwrap();
    assert!(
        buf.iter().all(|&x| x == 0),
        "a zero cluster reads as zeroes"
    );
    // A fresh image built in memory: all zero.
    let fresh = Qcow2Backend::new(
        Arc::new(MemoryBackend::from_vec(
            create_empty(MIB, 16, false).unwrap(),
        )),
        true,
    );
    assert_eq!(
        fresh.block_status(0, MIB).unwrap(),
        (BlockStatus::Zero, MIB)
    );
}

#[test]
fn qcow2_source_mirrors_sparsely() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let size = 32 * MIB;
    create_image_with(&p, size, Format::Qcow2, false).unwrap();
    let opts = ImageOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    let src = Arc::new(open_image(p.to_str().unwrap(), &opts, |b| b).unwrap());
    src.write(7 * MIB, &vec![3u8; 200_000]).unwrap();
    let dst = file(&dir, "d.img", size);
    let job = MirrorJob::start(src.clone(), dst.clone(), MirrorConfig::default()).unwrap();
    let p = job.complete(LONG).unwrap();
    assert!(p.bytes_copied <= 2 * MIB, "{p:?}");
    assert!(same(&src, &dst));
}

/// A stalled target: cancel returns at once, wait times out (no hang), and once the storage
/// answers again the copies in flight finish and the job ends cancelled.
#[test]
fn cancel_with_a_stalled_target_never_hangs() {
    let size = 8 * MIB;
    let source = mem(size);
    fill(&source, 2);
    let rules = Arc::new(FaultRules::new());
    let target = Arc::new(
        memory_node(size, false, |b| {
            Arc::new(FaultInjector::new(b, rules.clone())) as Arc<dyn Backend>
        })
        .unwrap(),
    );
    rules.stall();
    let job = MirrorJob::start(source.clone(), target, MirrorConfig::default()).unwrap();
    thread::sleep(Duration::from_millis(50));
    job.cancel();
    assert!(!job.wait(Some(Duration::from_millis(200))).unwrap());
    assert!(!job.wait_ready(Some(Duration::from_millis(50))).unwrap());
    assert_eq!(
        job.complete(Some(Duration::from_millis(50)))
            .unwrap_err()
            .kind(),
        ErrorKind::Timeout
    );
    rules.release();
    assert!(job.wait(LONG).unwrap());
    assert_eq!(job.state(), MirrorState::Cancelled);
    assert!(source.dirty_bitmaps().is_empty());
}
