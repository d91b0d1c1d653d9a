//! Block storage for sandboxes: the [`BlockBackend`] trait the VMM's virtio-blk device drives,
//! and its raw implementation, [`RawFile`].
//!
//! Copy-on-write qcow2 overlays on a read-only base image (the backing file), the image store
//! and image builds are being added to this crate; until they land, each sandbox gets a plain
//! copy of the root file system image.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backend;
pub mod qcow2;
pub mod quota;

pub use backend::{write_zeroes_by_writing, BackendError, BlockBackend, RawFile};
pub use qcow2::{create_overlay, flatten, Qcow2Config, Qcow2Disk, Qcow2Error};
pub use quota::QuotaHandle;
