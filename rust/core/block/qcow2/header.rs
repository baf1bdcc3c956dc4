//! The qcow2 header (docs/interop/qcow2.txt): parsing with every field checked against the
//! file, and the bytes of a new empty image.

use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Offset of the incompatible-features field; the dirty bit is 0x01 in byte 79.
pub const INCOMPAT_OFFSET: u64 = 72;
/// Offset of the autoclear-features field.
pub const AUTOCLEAR_OFFSET: u64 = 88;
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// QEMU's limits: cluster_bits 9..=21, L1 table at most 32 MiB, refcount table at most 8 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// A v2 header ends at byte 72; a v3 header is at least 104 bytes.
pub const V2_HEADER_LEN: usize = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// What `create` writes as header_length (as qemu-img: 104 + compression type, padded).
pub const CREATE_HEADER_LEN: u32 = 112;

/// The fields blockemu uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::format(format!("invalid qcow2 image: {msg}"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }
    pub fn corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Parses the first bytes of an image (`head` holds at least the first 104 bytes of the
    /// file, or all of it when shorter) and checks every offset and size against `file_len`.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header> {
        if head.len() < 4 || head[..4] != MAGIC {
            return Err(bad("no qcow2 magic"));
        }
        if head.len() < V2_HEADER_LEN {
            return Err(bad(format!("truncated header ({} bytes)", head.len())));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported qcow2 version {version}")));
        }
        let backing_offset = be64(head, 8);
        if backing_offset != 0 {
            return Err(Error::format(
                "qcow2 images with a backing file are not supported by blockemu",
            ));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let size = be64(head, 24);
        if be32(head, 32) != 0 {
            return Err(Error::format(
                "encrypted qcow2 images are not supported by blockemu",
            ));
        }
        let l1_size = be32(head, 36);
        let l1_table_offset = be64(head, 40);
        let refcount_table_offset = be64(head, 48);
        let refcount_table_clusters = be32(head, 56);
        let nb_snapshots = be32(head, 60);
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if head.len() < V3_MIN_HEADER_LEN as usize {
                return Err(bad(format!("truncated v3 header ({} bytes)", head.len())));
            }
            let hl = be32(head, 100);
            if hl < V3_MIN_HEADER_LEN || hl % 8 != 0 || u64::from(hl) > cs {
                return Err(bad(format!("header_length {hl}")));
            }
            (
                be64(head, 72),
                be64(head, 80),
                be64(head, 88),
                be32(head, 96),
                hl,
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN as u32)
        };
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if incompatible & !known != 0 {
            return Err(Error::format(format!(
                "qcow2 image uses incompatible features blockemu does not support \
                 (incompatible_features {:#x}: external data file, compression type, \
                 extended L2 or unknown)",
                incompatible & !known
            )));
        }
        if refcount_order > 6 {
            return Err(bad(format!("refcount_order {refcount_order}")));
        }
        if file_len < cs {
            return Err(bad(format!(
                "file of {file_len} bytes is shorter than one cluster"
            )));
        }
        // L1 table: big enough for the virtual size, bounded, aligned, inside the file.
        let l2_entries = cs / 8;
        let per_l1 = cs * l2_entries;
        let needed = size.div_ceil(per_l1);
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {l1_size} entries is too large")));
        }
        if u64::from(l1_size) < needed {
            return Err(bad(format!(
                "L1 table of {l1_size} entries too small for a virtual size of {size} bytes"
            )));
        }
        let in_file = |what: &str, off: u64, len: u64| -> Result<()> {
            if off % cs != 0 {
                return Err(bad(format!(
                    "{what} offset {off:#x} is not cluster-aligned"
                )));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_len && (len == 0 || off > 0) => Ok(()),
                _ => Err(bad(format!(
                    "{what} at {off:#x} ({len} bytes) is beyond the end of the file \
                     ({file_len} bytes)"
                ))),
            }
        };
        if l1_size > 0 {
            in_file("L1 table", l1_table_offset, u64::from(l1_size) * 8)?;
        }
        let rt_bytes = u64::from(refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES || refcount_table_clusters == 0 {
            return Err(bad(format!(
                "refcount table of {refcount_table_clusters} clusters"
            )));
        }
        in_file("refcount table", refcount_table_offset, rt_bytes)?;
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
        })
    }
}

/// The layout of a new empty v3 image, as `qemu-img create -f qcow2` makes it: header in
/// cluster 0, refcount table in cluster 1, one refcount block in cluster 2, the L1 table from
/// cluster 3. Returns the whole file.
pub fn create_empty(size: u64, cluster_bits: u32, lazy_refcounts: bool) -> Result<Vec<u8>> {
    let cs = 1u64 << cluster_bits;
    let l1_size = size.div_ceil(cs * (cs / 8));
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "image size {size} is too large for a qcow2 image"
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let total_clusters = 3 + l1_clusters;
    // One refcount block (16-bit entries) must cover all the metadata clusters.
    if total_clusters > cs / 2 {
        return Err(Error::invalid(format!(
            "image size {size} is too large for a qcow2 image"
        )));
    }
    let mut img = vec![0u8; (total_clusters * cs) as usize];
    let h = &mut img[..CREATE_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_size as u32).to_be_bytes());
    h[40..48].copy_from_slice(&(3 * cs).to_be_bytes());
    h[48..56].copy_from_slice(&cs.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    let compat = if lazy_refcounts {
        COMPAT_LAZY_REFCOUNTS
    } else {
        0
    };
    h[80..88].copy_from_slice(&compat.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&CREATE_HEADER_LEN.to_be_bytes());
    // Refcount table entry 0 -> the refcount block in cluster 2.
    let rt = cs as usize;
    img[rt..rt + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    let rb = 2 * cs as usize;
    for i in 0..total_clusters as usize {
        img[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(img)
}
