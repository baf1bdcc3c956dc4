//! The geometry prefetch: sector 0 read once, in the background, when the guest starts.
//!
//! QEMU's lesson (DESIGN.md): the geometry must not be read before the guest runs, must be
//! read at most once per device, and a command that needs it must never block on storage. A
//! device holds one `GeometryPrefetch`; `start` submits the read to the worker pool the first
//! time, and everyone else looks at the result without waiting.

use std::sync::Arc;

use super::{Job, OnceJob, WorkerPool};
use crate::block::BlockNode;
use crate::geometry::{self, Geometry, GeometryConfig, Guess};
use crate::{ErrorKind, Result, SECTOR_SIZE};

/// The geometry of one device: known up front (user geometry, migrated state) or guessed once
/// from the node's sector 0.
#[derive(Debug)]
pub struct GeometryPrefetch {
    config: GeometryConfig,
    once: OnceJob<Guess>,
    eager: std::sync::atomic::AtomicBool,
}

/// When a device reads its geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GeometryPolicy {
    /// In the background once the guest starts, unless migrated state brought it (QEMU since
    /// 2010; the default).
    #[default]
    Lazy,
    /// At device creation, even on an inactive node, and it then stands: migrated state does
    /// not replace it (QEMU before 2010, whose stream carried no geometry). Kept only to
    /// demonstrate the hazard.
    Eager,
}

impl GeometryPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "lazy" => Ok(GeometryPolicy::Lazy),
            "eager" => Ok(GeometryPolicy::Eager),
            _ => Err(crate::Error::invalid(format!(
                "geometry_policy must be 'lazy' or 'eager', got {s:?}"
            ))),
        }
    }
}

/// Reads sector 0 and resolves the geometry, as QEMU's realize does: a failed read of sector
/// 0 means "no MBR" (size default), except on an inactive node, which must read nothing and
/// fails with `Inactive`.
pub fn guess_from_node(node: &BlockNode, config: &GeometryConfig) -> Result<Guess> {
    guess(node, config, false)
}

fn guess(node: &BlockNode, config: &GeometryConfig, early: bool) -> Result<Guess> {
    let size = node.size()?.ok_or_else(|| {
        crate::Error::inactive(format!(
            "the size of {:?} is unknown until it is activated",
            node.name()
        ))
    })?;
    let total_sectors = size.div_ceil(SECTOR_SIZE);
    if !geometry::needs_boot_sector(config) {
        return geometry::resolve(config, None, total_sectors);
    }
    let mut sector = vec![0u8; SECTOR_SIZE.min(size) as usize];
    let read = if early {
        node.read_early(0, &mut sector)
    } else {
        node.read(0, &mut sector)
    };
    let boot = match read {
        Ok(()) => Some(&sector[..]),
        Err(e) if matches!(e.kind(), ErrorKind::Inactive | ErrorKind::Closed) => return Err(e),
        Err(_) => None,
    };
    geometry::resolve(config, boot, total_sectors)
}

impl GeometryPrefetch {
    /// A prefetch for `config`. User geometry is validated now (a device with a bad geometry
    /// fails at creation, as QEMU's realize does) and is then known without any read.
    pub fn new(config: GeometryConfig) -> Result<Self> {
        let once = OnceJob::new();
        if !geometry::needs_boot_sector(&config) {
            once.set_known(geometry::resolve(&config, None, 0)?);
        }
        Ok(GeometryPrefetch {
            config,
            once,
            eager: Default::default(),
        })
    }

    /// The `eager` policy: reads sector 0 now, on the caller's thread, even on an inactive
    /// node (see [`GeometryPolicy::Eager`]); the result then stands for the device's life.
    /// A device whose geometry is known without a read (user values) reads nothing.
    pub fn read_now(&self, node: &BlockNode) -> Result<()> {
        if self.once.job().is_some() {
            return Ok(());
        }
        self.eager.store(true, std::sync::atomic::Ordering::Release);
        let g = guess(node, &self.config, true);
        self.once.set_computed(g);
        Ok(())
    }

    /// Whether the geometry was read eagerly (migrated state then does not replace it).
    pub fn is_eager(&self) -> bool {
        self.eager.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn config(&self) -> &GeometryConfig {
        &self.config
    }

    /// Starts the background read the first time it is called (later calls, and calls after
    /// the geometry is known, do nothing) and returns the job holding the result.
    pub fn start(&self, pool: &WorkerPool, node: Arc<BlockNode>) -> Job<Guess> {
        let config = self.config;
        self.once
            .start(pool, move || guess_from_node(&node, &config))
    }

    /// The geometry if it is known now; never waits.
    pub fn get(&self) -> Option<Result<Geometry>> {
        self.once.get().map(|r| r.map(|g| g.geometry))
    }

    /// The full result (geometry and why) if known now.
    pub fn guess(&self) -> Option<Result<Guess>> {
        self.once.get()
    }

    /// The job of the prefetch, once started or known.
    pub fn job(&self) -> Option<Job<Guess>> {
        self.once.job()
    }

    /// Records a geometry that arrived with migrated device state; refused (false) when a
    /// prefetch already started, whose result then stands.
    pub fn set_known(&self, guess: Guess) -> bool {
        self.once.set_known(guess)
    }
}
