//! Block storage for sandboxes: the [`BlockBackend`] trait the VMM's virtio-blk device drives,
//! and its raw implementation, [`RawFile`].
//!
//! Copy-on-write qcow2 overlays on a read-only base image (the backing file), the image store
//! and image builds are being added to this crate; until they land, each sandbox gets a plain
//! copy of the root file system image.
//!
//! # Copy-on-write disks (qcow2 overlays)
//!
//! A sandbox's disk is a qcow2 overlay on a read-only raw base image; `docs/disks.md` has the
//! details. Sizes and offsets are in bytes.
//!
//! 1. [`create_overlay`]`(overlay, base, virtual_size)` writes a qcow2 v3 file (64 KiB clusters,
//!    16-bit refcounts, under 256 KiB) whose backing file is `base`, named by its file name only.
//!    The base is only `stat`ed: constant time whatever its size.
//! 2. [`Qcow2Disk::open`]`(overlay, base, &config)` checks the overlay's header and tables with
//!    our own parser ([`qcow2::header`]; the file may have been written by a guest-controlled
//!    VMM), opens `base` itself read-only, and hands both to imago with implicit opens denied.
//!    [`Qcow2Config::host_bytes_cap`] caps the overlay file's length ([`quota`]).
//! 3. The VMM's virtio-blk device drives the [`Qcow2Disk`] as a [`BlockBackend`]: writes
//!    allocate clusters, `flush` writes imago's metadata caches and `fsync`s, `discard` and
//!    `write_zeroes` free whole clusters and punch their host blocks out. Take
//!    [`Qcow2Disk::quota_handle`] before moving the disk to the device thread to report refused
//!    writes ([`QuotaHandle::hits`]).
//! 4. [`flatten`]`(overlay, base, dest)` writes the merged disk as a new sparse raw image, to save
//!    a sandbox's disk as a new base.
//!
//! ```no_run
//! use sandbox_fs::{create_overlay, BlockBackend, Qcow2Config, Qcow2Disk};
//! use std::path::Path;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (base, overlay) = (Path::new("debian.raw"), Path::new("sandbox-42.qcow2"));
//! create_overlay(overlay, base, 8 << 30)?;
//! let config = Qcow2Config::new().host_bytes_cap(Some(2 << 30));
//! let mut disk = Qcow2Disk::open(overlay, base, &config)?;
//! let quota = disk.quota_handle();
//! disk.write_at(0, &[0u8; 512])?;
//! disk.flush()?;
//! assert_eq!(quota.hits(), 0);
//! sandbox_fs::flatten(overlay, base, Path::new("debian-2.raw"))?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod qcow2;
pub mod quota;

pub use backend::{write_zeroes_by_writing, BackendError, BlockBackend, RawFile};
pub use qcow2::{create_overlay, flatten, Qcow2Config, Qcow2Disk, Qcow2Error};
pub use quota::QuotaHandle;
