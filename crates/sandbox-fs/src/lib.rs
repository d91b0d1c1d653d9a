//! Block storage for sandboxes: the [`BlockBackend`] trait the VMM's virtio-blk device drives,
//! and its raw implementation, [`RawFile`].
//!
//! Copy-on-write qcow2 overlays on a read-only base image (the backing file), the image store
//! and image builds are being added to this crate; until they land, each sandbox gets a plain
//! copy of the root file system image.
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
pub mod store;

pub use backend::{write_zeroes_by_writing, BackendError, BlockBackend, RawFile};
pub use oci::{OciError, OciImport};
pub use store::{ImageDigest, ImageRef, ImageStore, StoreError};
