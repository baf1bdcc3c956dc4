//! The geometry prefetch job: sector 0 read once, never on an inactive node.

use std::sync::Arc;
use std::time::Duration;

use blockemu_core::block::{memory_node, FaultInjector, FaultRules, OpKind};
use blockemu_core::geometry::{
    DeviceKind, GeometryConfig, GuessSource, Translation, TranslationRequest,
};
use blockemu_core::jobs::{GeometryPrefetch, WorkerPool};
use blockemu_core::ErrorKind;

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

/// A 30 MiB disk whose MBR has one partition ending at head 15, sector 63.
fn disk_with_mbr() -> Arc<blockemu_core::block::BlockNode> {
    let node = memory_node(61_440 * 512, false, |b| b).unwrap();
    let mut mbr = [0u8; 512];
    mbr[0x1BE + 5] = 15; // end head
    mbr[0x1BE + 6] = 63; // end sector
    mbr[0x1BE + 12] = 0x10; // nsectors != 0
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    node.write(0, &mbr).unwrap();
    Arc::new(node)
}

#[test]
fn reads_sector_zero_once_however_often_started() {
    let pool = WorkerPool::new(2).unwrap();
    let node = disk_with_mbr();
    let before = node.stats().reads;
    let prefetch = GeometryPrefetch::new(GeometryConfig::default()).unwrap();
    assert!(
        prefetch.get().is_none(),
        "nothing is known before the guest starts"
    );
    let jobs: Vec<_> = (0..5)
        .map(|_| prefetch.start(&pool, node.clone()))
        .collect();
    for j in &jobs {
        let guess = j.wait(WAIT).unwrap();
        assert_eq!(
            (
                guess.geometry.cyls,
                guess.geometry.heads,
                guess.geometry.secs
            ),
            (60, 16, 63)
        );
        assert_eq!(guess.geometry.trans, Translation::None);
        assert_eq!(guess.source, GuessSource::MbrEntry { index: 0 });
    }
    assert_eq!(node.stats().reads - before, 1);
    assert_eq!(node.stats().bytes_read, 512);
    assert!(prefetch.get().unwrap().is_ok());
}

#[test]
fn inactive_node_fails_and_reads_nothing() {
    let pool = WorkerPool::new(1).unwrap();
    let node = disk_with_mbr();
    node.inactivate().unwrap();
    let before = node.stats();
    let prefetch = GeometryPrefetch::new(GeometryConfig::default()).unwrap();
    let err = prefetch.start(&pool, node.clone()).wait(WAIT).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Inactive);
    assert_eq!(node.stats(), before);
    // The failed result is cached too: no retry reads behind the device's back.
    node.activate().unwrap();
    let again = prefetch.start(&pool, node.clone()).wait(WAIT).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::Inactive);
    assert_eq!(node.stats().reads, before.reads);
}

#[test]
fn user_geometry_is_known_without_any_read() {
    let pool = WorkerPool::new(1).unwrap();
    let node = disk_with_mbr();
    let before = node.stats().reads;
    let config = GeometryConfig {
        cyls: 100,
        heads: 16,
        secs: 63,
        trans: TranslationRequest::Auto,
        device: DeviceKind::Ide,
    };
    let prefetch = GeometryPrefetch::new(config).unwrap();
    let g = prefetch.get().unwrap().unwrap();
    assert_eq!(
        (g.cyls, g.heads, g.secs, g.trans),
        (100, 16, 63, Translation::None)
    );
    prefetch.start(&pool, node.clone()).wait(WAIT).unwrap();
    assert_eq!(node.stats().reads, before);
}

#[test]
fn invalid_user_geometry_fails_at_creation_with_qemus_message() {
    let config = GeometryConfig {
        cyls: 100,
        heads: 17,
        secs: 63,
        ..Default::default()
    };
    let err = GeometryPrefetch::new(config).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Geometry);
    assert_eq!(err.message(), "heads must be between 1 and 16");
}

#[test]
fn failed_read_of_sector_zero_means_no_mbr() {
    let pool = WorkerPool::new(1).unwrap();
    let rules = Arc::new(FaultRules::new());
    rules
        .fail_range(0, 512, Some(OpKind::Read), libc::EIO)
        .unwrap();
    let r = rules.clone();
    let node = Arc::new(
        memory_node(8_388_608 * 512, false, move |b| {
            Arc::new(FaultInjector::new(b, r))
        })
        .unwrap(),
    );
    let prefetch = GeometryPrefetch::new(GeometryConfig::default()).unwrap();
    let guess = prefetch.start(&pool, node.clone()).wait(WAIT).unwrap();
    assert_eq!(guess.source, GuessSource::NoBootSector);
    assert_eq!(
        (
            guess.geometry.cyls,
            guess.geometry.heads,
            guess.geometry.secs
        ),
        (8322, 16, 63)
    );
    assert_eq!(guess.geometry.trans, Translation::Lba);
    assert_eq!(rules.injected(), 1);
}

#[test]
fn migrated_geometry_wins_when_nothing_started() {
    let pool = WorkerPool::new(1).unwrap();
    let node = disk_with_mbr();
    let prefetch = GeometryPrefetch::new(GeometryConfig::default()).unwrap();
    let migrated = blockemu_core::geometry::resolve(&GeometryConfig::default(), None, 1).unwrap();
    assert!(prefetch.set_known(migrated));
    let before = node.stats().reads;
    assert_eq!(
        prefetch.start(&pool, node.clone()).wait(WAIT).unwrap(),
        migrated
    );
    assert_eq!(node.stats().reads, before, "a destination never re-guesses");
}
