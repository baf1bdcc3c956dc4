//! Opening and creating images: spec parsing, format probing, the node around a backend.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::file::FileBackend;
use super::lock::{self, LockSet};
use super::memory::MemoryBackend;
use super::node::{BlockNode, CacheMode, NodeConfig};
use super::qcow2::{self, Qcow2Backend};
use super::Backend;
use crate::{Error, Result, SECTOR_SIZE};

/// Image formats blockemu knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::format(format!(
                "unknown image format {other:?} (expected \"raw\" or \"qcow2\")"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
    /// Recognizes a format from the first bytes of an image (qcow2 magic, else raw).
    pub fn probe(head: &[u8]) -> Format {
        if head.len() >= 4 && &head[..4] == QCOW2_MAGIC {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }
}

/// What an image is opened from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    File(PathBuf),
    Nbd(String),
}

impl ImageSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
            return Ok(ImageSpec::Nbd(spec.to_string()));
        }
        if spec.is_empty() {
            return Err(Error::invalid("empty image path"));
        }
        Ok(ImageSpec::File(PathBuf::from(spec)))
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub format: Option<Format>,
    pub readonly: bool,
    pub active: bool,
    pub cache: CacheMode,
    /// Skip image locking altogether (like `qemu-img -U`); only for read-only opens.
    pub force_share: bool,
    /// NBD: the bound of one operation (connect, a command); `None` is 30 s.
    pub timeout: Option<std::time::Duration>,
    /// Caches stacked on the file (the shared-store model, copy-on-read).
    pub caches: CacheLayers,
}

/// Caches stacked on an image's backend, bottom up: the host cache of the weakly coherent
/// shared-store model, then a copy-on-read overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayers {
    /// Model this open as one NFS client of a shared file ([`super::HostCache`]).
    pub host_cache: bool,
    /// A copy-on-read cache file ([`super::CorCache`]).
    pub cor_cache: Option<PathBuf>,
    /// Activation drops both caches (default); `false` is the pre-2010 hazard.
    pub revalidate: bool,
}

impl Default for CacheLayers {
    fn default() -> Self {
        CacheLayers {
            host_cache: false,
            cor_cache: None,
            revalidate: true,
        }
    }
}

impl CacheLayers {
    /// Stacks the layers asked for on `backend`.
    pub fn stack(&self, mut backend: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
        if self.host_cache {
            backend = Arc::new(super::HostCache::new(backend, self.revalidate));
        }
        if let Some(cache) = &self.cor_cache {
            backend = Arc::new(super::CorCache::open(backend, cache, self.revalidate)?);
        }
        Ok(backend)
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            format: None,
            readonly: false,
            active: true,
            cache: CacheMode::Writeback,
            force_share: false,
            timeout: None,
            caches: CacheLayers::default(),
        }
    }
}

/// Opens an image as a node. An inactive open validates the file (it exists, is a regular
/// file or block device we may open as asked, its lock is compatible) and reads nothing.
/// `wrap` may stack a layer (fault injection, ...) on the file backend.
pub fn open_image(
    spec: &str,
    opts: &ImageOptions,
    wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>,
) -> Result<BlockNode> {
    let path = match ImageSpec::parse(spec)? {
        ImageSpec::File(p) => p,
        ImageSpec::Nbd(uri) => return super::nbd::open_node(&uri, opts, wrap),
    };
    if opts.force_share && !opts.readonly {
        return Err(Error::invalid(
            "force_share needs readonly=True (a writer must hold the image lock)",
        ));
    }
    if !opts.active && opts.format.is_none() {
        return Err(Error::invalid(
            "an inactive node must be opened with an explicit format: probing would read the \
             image before activation",
        ));
    }
    let backend = FileBackend::open(&path, opts.readonly, opts.cache.direct())?;
    let format = match opts.format {
        Some(f) => f,
        None => {
            // Probing is a read of the image: only for active opens (checked above).
            let mut head = [0u8; 4];
            let len = backend.len()?;
            if len >= 4 {
                let mut f = File::open(&path).map_err(|e| Error::io(e).with_path(&path))?;
                f.read_exact(&mut head)
                    .map_err(|e| Error::io(e).with_path(&path))?;
            }
            Format::probe(&head)
        }
    };
    let mut size = Some(backend.len()?);
    // The caches model what sits between a host and the file (an NFS client's page cache, a
    // copy-on-read file): below the format layer.
    let mut backend: Arc<dyn Backend> = opts.caches.stack(wrap(Arc::new(backend)))?;
    if format == Format::Qcow2 {
        let q = Arc::new(Qcow2Backend::new(backend, opts.readonly));
        // An active open reads and checks the header now; an inactive one reads nothing.
        size = if opts.active {
            Some(q.len().map_err(|e| e.with_path(&path))?)
        } else {
            None
        };
        backend = q;
    }
    BlockNode::new(
        backend,
        NodeConfig {
            name: spec.to_string(),
            path: Some(path),
            format: format.as_str(),
            readonly: opts.readonly,
            cache: opts.cache,
            locking: !opts.force_share,
            size,
        },
        opts.active,
    )
}

/// A node over a zero-filled disk in memory (no file, no locks).
pub fn memory_node(
    size: u64,
    readonly: bool,
    wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>,
) -> Result<BlockNode> {
    let len = usize::try_from(size)
        .map_err(|_| Error::invalid(format!("memory disk of {size} bytes is too large")))?;
    let backend = wrap(Arc::new(MemoryBackend::new(len)?));
    BlockNode::new(
        backend,
        NodeConfig {
            name: format!("memory:{size}"),
            path: None,
            format: "raw",
            readonly,
            cache: CacheMode::Writeback,
            locking: false,
            size: Some(size),
        },
        true,
    )
}

/// Creates (or overwrites) an image of `size` bytes, rounded up to whole sectors as
/// `qemu-img create` does. Refuses to touch an image another process has open.
pub fn create_image(path: &Path, size: u64, format: Format) -> Result<u64> {
    create_image_with(path, size, format, false)
}

/// `create_image`, with qcow2 options: `lazy_refcounts` (qcow2 only) sets the compatible
/// feature. A qcow2 image is version 3 with 64 KiB clusters and 16-bit refcounts.
pub fn create_image_with(
    path: &Path,
    size: u64,
    format: Format,
    lazy_refcounts: bool,
) -> Result<u64> {
    if lazy_refcounts && format != Format::Qcow2 {
        return Err(Error::invalid("lazy_refcounts is a qcow2 option"));
    }
    let size = size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| Error::invalid(format!("image size {size} is too large")))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(e).with_path(path).with_op("create"))?;
    // Hold the write lock while we truncate, as qemu-img does.
    lock::transition(&file, path, LockSet::NONE, LockSet::READ_WRITE)?;
    let content = match format {
        Format::Raw => None,
        Format::Qcow2 => Some(qcow2::create_empty(size, 16, lazy_refcounts)?),
    };
    file.set_len(0)
        .and_then(|_| match &content {
            None => file.set_len(size),
            Some(bytes) => std::os::unix::fs::FileExt::write_all_at(&file, bytes, 0),
        })
        .map_err(|e| Error::io(e).with_path(path).with_op("create"))?;
    file.sync_all()
        .map_err(|e| Error::io(e).with_path(path).with_op("create"))?;
    Ok(size)
}

/// What `blockemu info` shows of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    pub file_size: u64,
    pub allocated: u64,
    /// qcow2: the dirty bit (lazy refcounts of a writer that has not closed); raw: false.
    pub dirty: bool,
    pub lock: lock::LockProbe,
}

/// Inspects an image without opening it as a node (no locks taken).
pub fn image_info(path: &Path) -> Result<ImageInfo> {
    let mut file = File::open(path).map_err(|e| Error::io(e).with_path(path))?;
    let meta = file.metadata().map_err(|e| Error::io(e).with_path(path))?;
    if meta.is_dir() {
        return Err(Error::os(libc::EISDIR, "is a directory").with_path(path));
    }
    let mut head = [0u8; 80];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::io(e).with_path(path)),
        }
    }
    let format = Format::probe(&head[..got]);
    let (virtual_size, dirty) = match format {
        Format::Raw => (meta.len(), false),
        Format::Qcow2 => {
            if got < 32 {
                return Err(Error::format("truncated qcow2 header").with_path(path));
            }
            let v3 = got == head.len() && head[4..8] == 3u32.to_be_bytes();
            (
                u64::from_be_bytes(head[24..32].try_into().expect("8 bytes")),
                v3 && head[79] & 1 != 0,
            )
        }
    };
    use std::os::unix::fs::MetadataExt;
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format,
        virtual_size,
        file_size: meta.len(),
        allocated: meta.blocks() * 512,
        dirty,
        lock: lock::probe(path)?,
    })
}
