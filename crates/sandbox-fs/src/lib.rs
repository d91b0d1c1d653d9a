//! Block storage for sandboxes: the [`BlockBackend`] trait the VMM's virtio-blk device drives
//! with its raw ([`RawFile`]) and copy-on-write ([`Qcow2Disk`]) implementations, and the image
//! store that holds the read-only bases the copy-on-write disks are made from.
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
//!
//! # The image store
//!
//! [`ImageStore`] keeps read-only base images in a directory the runtime is configured with,
//! content-addressed by the SHA-256 of their raw bytes (`images/sha256-<hex>.img`, mode 0444),
//! with named tags (`tags/<name>`). Images come in three ways:
//!
//! 1. [`ImageStore::import_raw`]: a raw ext4 image, copied sparsely;
//! 2. [`ImageStore::import_dir`]: a directory tree, made into ext4 with `mkfs.ext4 -d`;
//! 3. [`ImageStore::import_oci`]: an OCI image layout directory or a `docker save` tarball;
//!    its linux/amd64 layers are checked against their digests and applied in order
//!    (whiteouts included, hostile entries refused), the guest agent is put in as `/sbin/init`,
//!    and the tree is made into ext4 as in 2.
//!
//! Then [`ImageStore::resolve`] (`"sha256:<hex>"` or a tag) gives an [`ImageRef`] whose `path`
//! is the base an overlay is created on.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sandbox_fs::ImageStore;
//! use std::path::Path;
//!
//! let store = ImageStore::open("/var/cache/sandbox-sdk/images")?;
//! let agent = Path::new("target/x86_64-unknown-linux-gnu/release/sandbox-agent");
//! let import = store.import_oci(Path::new("python.tar"), agent, 2 << 30)?;
//! store.tag("python", &import.image.digest)?;
//! let base = store.resolve("python")?; // base.path: the read-only image file
//! # Ok(()) }
//! ```
//!
//! See `docs/images.md` for what an image must contain.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod oci;
pub mod qcow2;
pub mod quota;
pub mod store;

pub use backend::{write_zeroes_by_writing, BackendError, BlockBackend, RawFile};
pub use oci::{OciError, OciImport};
pub use qcow2::{create_overlay, flatten, Qcow2Config, Qcow2Disk, Qcow2Error};
pub use quota::QuotaHandle;
pub use store::{ImageDigest, ImageRef, ImageStore, StoreError};
