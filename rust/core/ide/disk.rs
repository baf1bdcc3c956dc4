//! `IdeDisk`: the configuration of one disk (node, user geometry, strings, write cache) and
//! its lazily known geometry.

use std::sync::Arc;

use crate::block::BlockNode;
use crate::geometry::{DeviceKind, Geometry, GeometryConfig, TranslationRequest};
use crate::jobs::GeometryPrefetch;
use crate::{Result, SECTOR_SIZE};

/// User configuration of a disk, as `-device ide-hd` properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdeDiskConfig {
    pub cyls: u32,
    pub heads: u32,
    pub secs: u32,
    pub trans: TranslationRequest,
    /// `None`: QEMU's "QM%05d" of the slot on a primary channel (QM00001 master, QM00002 slave).
    pub serial: Option<String>,
    pub model: Option<String>,
    pub write_cache: bool,
    /// What DATA SET MANAGEMENT TRIM does with the ranges (QEMU's drive option `discard`).
    pub discard: DiscardMode,
}

/// QEMU's `-drive discard=`: `ignore` (QEMU's default) completes TRIM without touching the
/// data; `unmap` passes the ranges to the node's discard. IDENTIFY advertises TRIM either
/// way, as QEMU 7.2's `ide-hd` does (its discard granularity defaults to 512).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiscardMode {
    #[default]
    Ignore,
    Unmap,
}

impl DiscardMode {
    /// Parses QEMU's spellings (`ignore`/`off`, `unmap`/`on`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ignore" | "off" => Ok(DiscardMode::Ignore),
            "unmap" | "on" => Ok(DiscardMode::Unmap),
            _ => Err(crate::Error::invalid(format!(
                "discard must be 'ignore' or 'unmap', got {s:?}"
            ))),
        }
    }
}

impl Default for IdeDiskConfig {
    fn default() -> Self {
        IdeDiskConfig {
            cyls: 0,
            heads: 0,
            secs: 0,
            trans: TranslationRequest::Auto,
            serial: None,
            model: None,
            write_cache: true,
            discard: DiscardMode::Ignore,
        }
    }
}

/// QEMU's default strings.
pub const DEFAULT_MODEL: &str = "QEMU HARDDISK";
pub const DEFAULT_FIRMWARE: &str = "2.5+";

/// A disk ready to be attached to a channel. Creating one reads nothing; user geometry is
/// validated now.
#[derive(Debug)]
pub struct IdeDisk {
    node: Arc<BlockNode>,
    config: IdeDiskConfig,
    geometry: GeometryPrefetch,
}

impl IdeDisk {
    pub fn new(node: Arc<BlockNode>, config: IdeDiskConfig) -> Result<Self> {
        let geometry = GeometryPrefetch::new(GeometryConfig {
            cyls: config.cyls,
            heads: config.heads,
            secs: config.secs,
            trans: config.trans,
            device: DeviceKind::Ide,
        })?;
        Ok(IdeDisk {
            node,
            config,
            geometry,
        })
    }

    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }

    pub fn config(&self) -> &IdeDiskConfig {
        &self.config
    }

    /// The `eager` geometry policy: reads sector 0 now, even on an inactive node, as QEMU did
    /// before 2010 (see [`crate::jobs::GeometryPolicy::Eager`]); demonstrations only.
    pub fn read_geometry_now(&self) -> Result<()> {
        self.geometry.read_now(&self.node)
    }

    pub fn prefetch(&self) -> &GeometryPrefetch {
        &self.geometry
    }

    /// The geometry if known now (never waits); `None` while unknown or if the read failed.
    pub fn geometry(&self) -> Option<Geometry> {
        self.geometry.get().and_then(|r| r.ok())
    }

    /// Capacity in 512-byte sectors as QEMU counts it (size >> 9); 0 while unknown.
    pub fn total_sectors(&self) -> u64 {
        match self.node.size() {
            Ok(Some(size)) => size / SECTOR_SIZE,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::memory_node;
    use crate::ErrorKind;

    #[test]
    fn creation_reads_nothing_and_validates_user_geometry() {
        let node = Arc::new(memory_node(1 << 20, false, |b| b).unwrap());
        let disk = IdeDisk::new(node.clone(), IdeDiskConfig::default()).unwrap();
        assert!(disk.geometry().is_none());
        assert_eq!(disk.total_sectors(), 2048);
        assert_eq!(node.stats().reads, 0);
        let bad = IdeDiskConfig {
            cyls: 10,
            heads: 17,
            secs: 63,
            ..IdeDiskConfig::default()
        };
        let err = IdeDisk::new(node.clone(), bad).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Geometry);
        assert_eq!(err.message(), "heads must be between 1 and 16");
        let user = IdeDiskConfig {
            cyls: 10,
            heads: 16,
            secs: 255,
            ..IdeDiskConfig::default()
        };
        let g = IdeDisk::new(node, user).unwrap().geometry().unwrap();
        assert_eq!((g.cyls, g.heads, g.secs), (10, 16, 255));
    }
}
