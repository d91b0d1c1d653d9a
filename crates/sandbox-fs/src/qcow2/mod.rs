//! Copy-on-write qcow2 overlays on a read-only raw base image.
//!
//! - [`create_overlay`] writes a qcow2 v3 image (64 KiB clusters, 16-bit refcounts) whose
//!   backing file is a raw base, in constant time and size whatever the base's size.
//! - [`Qcow2Disk::open`] validates the overlay with our own parser ([`header`]), opens the base
//!   itself read-only from the path given (never from the header), and serves a
//!   [`BlockBackend`] through imago's synchronous API.
//! - [`flatten`] merges an overlay and its base into a new sparse raw image.
//!
//! imago is built with its `sync` feature: every call runs on the caller's thread, with no
//! tokio runtime and no helper threads, which fits the VMM's single synchronous device thread.
//! (Its `sync-wrappers` feature would build a tokio runtime per call instead.) The feature is
//! exclusive with imago's default `async` feature, so no crate in the workspace may use imago
//! with default features.

pub mod header;

use crate::backend::BlockBackend;
use crate::quota::{storage_full, Quota, QuotaHandle};
use header::{HeaderError, HeaderInfo};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, Mapping,
    ShallowMapping, StorageExt, StorageOpenOptions,
};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The cluster size of the overlays we create, in bytes (QEMU's default).
pub const OVERLAY_CLUSTER_SIZE: u64 = 64 * 1024;
/// The refcount width of the overlays we create, in bits (QEMU's default).
pub const OVERLAY_REFCOUNT_BITS: usize = 16;

/// Errors of creating, opening and flattening overlays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The base image cannot be opened or its size read.
    #[error("cannot open the base image {path}.")]
    Base {
        /// The base path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The base path has no file name usable as a qcow2 backing file name (UTF-8, no `:`).
    #[error("the base image path {path} has no usable file name.")]
    BaseName {
        /// The base path.
        path: PathBuf,
    },
    /// The requested virtual size is 0, not a multiple of 512, or above 64 TiB.
    #[error("the virtual size {size} must be a nonzero multiple of 512 bytes, at most 64 TiB.")]
    VirtualSize {
        /// The requested size in bytes.
        size: u64,
    },
    /// The requested virtual size is smaller than the base image.
    #[error("the virtual size {virtual_size} is smaller than the base image ({base_size} bytes).")]
    TooSmall {
        /// The requested size in bytes.
        virtual_size: u64,
        /// The base image size in bytes.
        base_size: u64,
    },
    /// The destination exists already; overlays and flattened images never overwrite a file.
    #[error("{path} exists already.")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// Creating or writing the file failed.
    #[error("cannot write {path}.")]
    Write {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The overlay cannot be opened or read.
    #[error("cannot open the overlay {path}.")]
    Open {
        /// The overlay path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The overlay's header or tables are refused.
    #[error("the overlay {path} is refused.")]
    Header {
        /// The overlay path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// imago refused or failed to open the overlay or base.
    #[error("imago cannot open {path}.")]
    Imago {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the merged image failed while flattening.
    #[error("cannot read the overlay {path} while flattening.")]
    Read {
        /// The overlay path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A local result.
pub type Result<T> = std::result::Result<T, Qcow2Error>;

/// Options of [`Qcow2Disk::open`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Qcow2Config {
    host_bytes_cap: Option<u64>,
}

impl Qcow2Config {
    /// No cap.
    pub fn new() -> Self {
        Self::default()
    }

    /// Caps the overlay file's length at `cap` bytes (see [`crate::quota`]): a guest write that
    /// would grow the file past it fails with [`io::ErrorKind::StorageFull`]. `None`: no cap.
    pub fn host_bytes_cap(mut self, cap: Option<u64>) -> Self {
        self.host_bytes_cap = cap;
        self
    }

    /// The cap in bytes, if any.
    pub fn get_host_bytes_cap(&self) -> Option<u64> {
        self.host_bytes_cap
    }
}

/// The base's file name, which is the overlay's backing file name.
fn base_name(base: &Path) -> Result<&str> {
    let name = base
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| header::check_backing_name(n).is_ok())
        .ok_or_else(|| Qcow2Error::BaseName {
            path: base.to_owned(),
        })?;
    Ok(name)
}

/// Creates a qcow2 v3 overlay at `path` whose backing file is the raw image at `base`.
///
/// The header names the backing file by `base`'s file name (not its path; we never open the
/// backing file from the header) with format `raw`. Clusters are 64 KiB, refcounts 16 bits. The
/// base is only `stat`ed, never read: the overlay is 4 clusters (256 KiB) for any base up to
/// 4 TiB. `virtual_size` (bytes, a multiple of 512) must be at least the base's size; the guest
/// reads zeroes past the base's end. The file is created with `O_EXCL` and mode 0600 and made
/// durable (`fsync`) before returning; on error it is removed.
///
/// # Errors
/// [`Qcow2Error::Base`], [`Qcow2Error::BaseName`], [`Qcow2Error::VirtualSize`],
/// [`Qcow2Error::TooSmall`], [`Qcow2Error::Exists`], [`Qcow2Error::Write`].
pub fn create_overlay(path: &Path, base: &Path, virtual_size: u64) -> Result<()> {
    let name = base_name(base)?;
    let base_size = std::fs::metadata(base)
        .map_err(|source| Qcow2Error::Base {
            path: base.to_owned(),
            source,
        })?
        .len();
    if virtual_size == 0 || virtual_size % 512 != 0 || virtual_size > header::MAX_VIRTUAL_SIZE {
        return Err(Qcow2Error::VirtualSize { size: virtual_size });
    }
    if virtual_size < base_size {
        return Err(Qcow2Error::TooSmall {
            virtual_size,
            base_size,
        });
    }
    let file = create_new(path)?;
    let result = write_overlay(path, &file, name, virtual_size);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => Qcow2Error::Exists {
                path: path.to_owned(),
            },
            _ => Qcow2Error::Write {
                path: path.to_owned(),
                source,
            },
        })
}

fn write_overlay(path: &Path, file: &File, name: &str, virtual_size: u64) -> Result<()> {
    let write_err = |source| Qcow2Error::Write {
        path: path.to_owned(),
        source,
    };
    let storage = ImagoFile::from_open_file(
        file.try_clone().map_err(write_err)?,
        StorageOpenOptions::new().filename(path).write(true),
    )
    .map_err(write_err)?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .backing(name.to_owned(), "raw".to_owned())
        .cluster_size(OVERLAY_CLUSTER_SIZE as usize)
        .refcount_width(OVERLAY_REFCOUNT_BITS)
        .size(virtual_size)
        .create()
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

/// A qcow2 overlay on a raw base, as a [`BlockBackend`].
///
/// Reads of clusters the overlay does not hold come from the base; past the base's end (a disk
/// larger than its base) they are zeroes. Writes allocate 64 KiB clusters in the overlay, copying
/// the rest of a partly written cluster from the base (imago's copy-on-write).
///
/// - `discard`: whole clusters in the range become zero clusters and are freed (imago's
///   `discard_to_zero`), and their host ranges are punched out of the overlay file
///   (`FALLOC_FL_PUNCH_HOLE`), so the blocks go back to the host file system; partial clusters at
///   the ends are left as they are (the spec allows it).
/// - `write_zeroes`: the range reads zeroes afterwards, never the base. Whole clusters become
///   zero clusters: freed and punched with `unmap`, keeping their allocation without. Partial
///   clusters at the ends get zero bytes written (unless they read zero already).
/// - Freed clusters are reused by later writes before the file grows. The file length never
///   shrinks.
///
/// Drop flushes imago's metadata caches (imago's sync-mode `Drop`) but does not `fsync`; call
/// [`BlockBackend::flush`] for durability.
#[derive(Debug)]
pub struct Qcow2Disk {
    image: FormatAccess<ImagoFile>,
    /// The overlay file (a duplicate of imago's descriptor): its length for the cap, and
    /// hole punching.
    file: File,
    size: u64,
    cluster_size: u64,
    quota: Quota,
}

/// What [`Qcow2Disk::zero_range`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    /// VIRTIO_BLK_T_DISCARD: free whole clusters, leave partial ones.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES with unmap: free whole clusters, zero partial ones.
    Unmap,
    /// VIRTIO_BLK_T_WRITE_ZEROES without unmap: keep allocations.
    Keep,
}

impl Qcow2Disk {
    /// Opens the overlay at `overlay` read-write, over the raw base image at `base`.
    ///
    /// Steps: read and check the header and every table entry ([`header`]); require the
    /// header's backing file name to equal `base`'s file name and its backing format to be
    /// `raw`; open `base` ourselves, read-only, as raw (never probed); hand both to imago with
    /// its `DenyImplicitOpenGate`, so imago opens no file by itself.
    ///
    /// # Errors
    /// [`Qcow2Error::Open`], [`Qcow2Error::Header`], [`Qcow2Error::BaseName`],
    /// [`Qcow2Error::Base`], [`Qcow2Error::Imago`].
    pub fn open(overlay: &Path, base: &Path, config: &Qcow2Config) -> Result<Self> {
        let (image, file, info) = open_image(overlay, base, true)?;
        let len = open_len(&file, overlay)?;
        Ok(Self {
            image,
            file,
            size: info.virtual_size,
            cluster_size: info.cluster_size(),
            quota: Quota::new(config.host_bytes_cap, len),
        })
    }

    /// [`Qcow2Disk::open`] on files already open (the jailed VMM's inherited fds): `overlay`
    /// read-write, `base` read-only; `overlay_label` and `base_label` name them in errors. The
    /// header's backing file name must equal `expected_base_name` when given; without it, any
    /// valid name is accepted (whoever opened `base` chose it) but the format must still be raw.
    ///
    /// # Errors
    /// As [`Qcow2Disk::open`].
    pub fn open_files(
        overlay: (File, &Path),
        base: (File, &Path),
        expected_base_name: Option<&str>,
        config: &Qcow2Config,
    ) -> Result<Self> {
        let (image, file, info) = open_image_files(
            Opened {
                file: overlay.0,
                label: overlay.1,
            },
            Opened {
                file: base.0,
                label: base.1,
            },
            expected_base_name,
            true,
        )?;
        let len = open_len(&file, overlay.1)?;
        Ok(Self {
            image,
            file,
            size: info.virtual_size,
            cluster_size: info.cluster_size(),
            quota: Quota::new(config.host_bytes_cap, len),
        })
    }

    /// A handle that reads [`Self::quota_hits`] from another thread.
    pub fn quota_handle(&self) -> QuotaHandle {
        self.quota.handle()
    }

    /// Requests refused with `StorageFull` so far (the cap, or a host `ENOSPC`).
    pub fn quota_hits(&self) -> u64 {
        self.quota.handle().hits()
    }

    /// The image's cluster size in bytes (the granularity at which discards free space).
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The overlay file's length in bytes (what the cap bounds).
    ///
    /// # Errors
    /// `fstat` errors.
    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn check_bounds(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access past the end of the disk",
            )),
        }
    }

    /// Writes `buf` at `offset`, mapping data clusters chunk by chunk so the cap can refuse a
    /// chunk before its data is written (see [`crate::quota`]).
    fn write_data(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &buf[done..];
            let file_len = if self.quota.cap().is_some() {
                self.file_len()?
            } else {
                0
            };
            let want = self
                .quota
                .chunk_len(file_len, rest.len() as u64, at, self.cluster_size);
            let mapping = self.image.prepare_data_mapping(at, want, true)?;
            let n = mapping.length();
            if n == 0 || n > want {
                return Err(io::Error::other("imago returned an empty data mapping"));
            }
            if self.quota.refuses(mapping.offset(), n) {
                // Dropping the prepared mapping frees the clusters it allocated, but imago only
                // hands freed clusters out again after its metadata is written back: without
                // this flush every refused copy-on-write would take a new cluster at the end of
                // the file. (No sync: this is about imago's caches, not durability.)
                drop(mapping);
                self.image.flush()?;
                return Err(storage_full());
            }
            // n <= want <= rest.len(), so the cast and the slice are in range.
            let chunk = &rest[..n as usize];
            mapping.storage().write(chunk, mapping.offset())?;
            self.image.commit_data_mapping(mapping)?;
            done += n as usize;
        }
        Ok(())
    }

    /// Makes partial clusters `[offset, offset + len)` read as zeroes, skipping parts that read
    /// zero already.
    fn zero_partial(&mut self, mut offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let end = offset + len;
        while offset < end {
            let (is_zero, n) = {
                let (mapping, n) = self.image.get_mapping(offset, end - offset)?;
                (matches!(mapping, Mapping::Zero { .. }), n)
            };
            if n == 0 {
                return Err(io::Error::other("unexpected end of the image"));
            }
            let n = n.min(end - offset);
            if !is_zero {
                let mut at = offset;
                while at < offset + n {
                    let piece = (offset + n - at).min(ZEROES.len() as u64);
                    self.write_data(at, &ZEROES[..piece as usize])?;
                    at += piece;
                }
            }
            offset += n;
        }
        Ok(())
    }

    /// Discard and write-zeroes: partial clusters at both ends first, then whole clusters one
    /// L2 table at a time.
    fn zero_range(&mut self, offset: u64, len: u64, how: Zeroing) -> io::Result<()> {
        let end = self.check_bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size;
        let first_whole = offset
            .div_ceil(cs)
            .checked_mul(cs)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // imago treats the last cluster as whole when the range reaches the end of the disk.
        let whole_end = if end == self.size {
            end
        } else {
            end - end % cs
        };
        if first_whole >= whole_end {
            if how != Zeroing::Discard {
                self.zero_partial(offset, len)?;
            }
            return Ok(());
        }
        if how != Zeroing::Discard {
            self.zero_partial(offset, first_whole - offset)?;
            self.zero_partial(whole_end, end - whole_end)?;
        }
        if how == Zeroing::Keep {
            return self
                .image
                .write_zeroes(first_whole, whole_end - first_whole);
        }
        // One piece per L2 table ("Cluster mapping": an L2 table maps cs / 8 clusters), so that
        // imago allocates (an L2 table, at the start of the call) before it frees anything, and
        // a cluster freed in this call cannot be reused for metadata before we punch it.
        let l2_span = cs * (cs / 8);
        let mut at = first_whole;
        while at < whole_end {
            let next_l2 = (at / l2_span + 1).saturating_mul(l2_span);
            let n = whole_end.min(next_l2) - at;
            self.free_clusters(at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Turns the whole clusters of `[offset, offset + len)` into zero clusters and punches the
    /// host ranges they held.
    ///
    /// `[offset, offset + len)` lies within one L2 table. The host ranges are read before the
    /// discard. Only clusters mapped with refcount 1 (imago's `writable`, the qcow2 COPIED flag)
    /// are punched. imago allocates at most the L2 table, at the start of `discard_to_zero`,
    /// before it frees clusters, and nothing else runs before the punch (one synchronous call),
    /// so a punched range is either free or still mapped to a cluster of this range, which must
    /// read zeroes now anyway.
    fn free_clusters(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut host: Vec<(u64, u64)> = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let (mapping, n) = self.image.get_shallow_mapping(at, end - at)?;
            if n == 0 {
                break;
            }
            if let ShallowMapping::Raw {
                offset: host_offset,
                writable: true,
                ..
            } = mapping
            {
                match host.last_mut() {
                    Some((start, run)) if start.checked_add(*run) == Some(host_offset) => {
                        *run += n;
                    }
                    _ => host.push((host_offset, n)),
                }
            }
            at += n;
        }
        self.image.discard_to_zero(offset, len)?;
        for (start, run) in host {
            self.punch_hole(start, run)?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        match nix::fcntl::fallocate(
            &self.file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        ) {
            // A file system without hole punching keeps the blocks; the clusters are still free
            // for reuse inside the overlay.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            other => other.map_err(io::Error::from),
        }
    }
}

impl BlockBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        self.image.read(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_bounds(offset, buf.len() as u64)?;
        self.write_data(offset, buf)
            .map_err(|err| self.quota.count(err))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image
            .flush()
            .and_then(|()| self.image.sync())
            .map_err(|err| self.quota.count(err))
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len, Zeroing::Discard)
            .map_err(|err| self.quota.count(err))
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let how = if unmap { Zeroing::Unmap } else { Zeroing::Keep };
        self.zero_range(offset, len, how)
            .map_err(|err| self.quota.count(err))
    }
}

/// Opens and validates an overlay and its base; see [`Qcow2Disk::open`].
/// The overlay file's length when it is opened (the cap's floor, see [`crate::quota`]).
fn open_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| Qcow2Error::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn open_image(
    overlay: &Path,
    base: &Path,
    writable: bool,
) -> Result<(FormatAccess<ImagoFile>, File, HeaderInfo)> {
    let expected = base_name(base)?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(overlay)
        .map_err(|source| Qcow2Error::Open {
            path: overlay.to_owned(),
            source,
        })?;
    let base_file = File::open(base).map_err(|source| Qcow2Error::Base {
        path: base.to_owned(),
        source,
    })?;
    open_image_files(
        Opened {
            file,
            label: overlay,
        },
        Opened {
            file: base_file,
            label: base,
        },
        Some(expected),
        writable,
    )
}

/// An open file and the path (or `fd N`) its errors name.
struct Opened<'a> {
    file: File,
    label: &'a Path,
}

fn open_image_files(
    overlay: Opened<'_>,
    base: Opened<'_>,
    expected: Option<&str>,
    writable: bool,
) -> Result<(FormatAccess<ImagoFile>, File, HeaderInfo)> {
    let Opened {
        file,
        label: overlay,
    } = overlay;
    let Opened {
        file: base_file,
        label: base,
    } = base;
    let open_err = |source| Qcow2Error::Open {
        path: overlay.to_owned(),
        source,
    };
    let header_err = |source| Qcow2Error::Header {
        path: overlay.to_owned(),
        source,
    };
    let imago_err = |path: &Path| {
        let path = path.to_owned();
        move |source| Qcow2Error::Imago { path, source }
    };
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let file_len = meta.len();

    // The fixed header first (to learn the cluster size), then the header cluster: at most
    // 2 MiB, bounded by cluster_bits <= 21.
    let mut head =
        vec![0u8; usize::try_from(file_len.min(header::V3_HEADER_LEN as u64)).unwrap_or(0)];
    file.read_exact_at(&mut head, 0).map_err(open_err)?;
    let bits = header::peek_cluster_bits(&head).map_err(header_err)?;
    let cluster = (1u64 << bits).min(file_len);
    let mut first = vec![0u8; usize::try_from(cluster).unwrap_or(0)];
    file.read_exact_at(&mut first, 0).map_err(open_err)?;
    let info = header::parse_header(&first, file_len).map_err(header_err)?;
    drop(first);
    match expected {
        Some(name) => header::check_backing(&info, name).map_err(header_err)?,
        None => header::check_backing_format(&info).map_err(header_err)?,
    }
    header::scan_tables(&file, &info, file_len).map_err(header_err)?;

    let base_storage = ImagoFile::from_open_file(
        base_file,
        StorageOpenOptions::new().filename(base).write(false),
    )
    .map_err(imago_err(base))?;
    let base_image = Raw::builder(base_storage)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(imago_err(base))?;

    let storage = ImagoFile::from_open_file(
        file.try_clone().map_err(open_err)?,
        StorageOpenOptions::new().filename(overlay).write(writable),
    )
    .map_err(imago_err(overlay))?;
    let qcow2 = Qcow2::<ImagoFile>::builder(storage)
        .write(writable)
        .backing(Some(FormatAccess::new(base_image)))
        .data_file(None)
        .open(DenyImplicitOpenGate::default())
        .map_err(imago_err(overlay))?;
    Ok((FormatAccess::new(qcow2), file, info))
}

/// Writes the merged content of `overlay` over `base` into a new raw image at `dest`: the
/// disk's full virtual size, with ranges that read zero left as holes (checked per 4 KiB).
/// `dest` is created with `O_EXCL` and mode 0600, made durable (`fsync`), and removed on error.
/// The overlay is opened read-only and validated like [`Qcow2Disk::open`].
///
/// # Errors
/// Those of [`Qcow2Disk::open`], [`Qcow2Error::Exists`], [`Qcow2Error::Write`],
/// [`Qcow2Error::Read`].
pub fn flatten(overlay: &Path, base: &Path, dest: &Path) -> Result<()> {
    let (image, _file, info) = open_image(overlay, base, false)?;
    let out = create_new(dest)?;
    let result = copy_sparse(&image, info.virtual_size, overlay, &out, dest);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

fn copy_sparse(
    image: &FormatAccess<ImagoFile>,
    size: u64,
    overlay: &Path,
    out: &File,
    dest: &Path,
) -> Result<()> {
    const BLOCK: usize = 4096;
    let write_err = |source| Qcow2Error::Write {
        path: dest.to_owned(),
        source,
    };
    let read_err = |source| Qcow2Error::Read {
        path: overlay.to_owned(),
        source,
    };
    out.set_len(size).map_err(write_err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        // Ranges that map to zeroes (unallocated past the base, zero clusters) are skipped
        // without reading; everything else is read and written block by block.
        let (is_zero, mapped) = {
            let (mapping, n) = image.get_mapping(offset, size - offset).map_err(read_err)?;
            (matches!(mapping, Mapping::Zero { .. }), n)
        };
        if mapped == 0 {
            break;
        }
        let end = offset + mapped.min(size - offset);
        if is_zero {
            offset = end;
            continue;
        }
        while offset < end {
            let n = usize::try_from(end - offset).map_or(buf.len(), |left| left.min(buf.len()));
            let chunk = &mut buf[..n];
            image.read(&mut *chunk, offset).map_err(read_err)?;
            for (i, block) in chunk.chunks(BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    out.write_all_at(block, offset + (i * BLOCK) as u64)
                        .map_err(write_err)?;
                }
            }
            offset += n as u64;
        }
    }
    out.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests;
