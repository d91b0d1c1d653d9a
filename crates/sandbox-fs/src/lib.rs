//! Copy-on-write block images for sandboxes. **Not implemented yet.**
//!
//! This crate will hold qcow2 overlays on a read-only base image (the backing file), an image
//! store, and image builds. Until it exists, each sandbox gets a plain copy of the root file
//! system image. Nothing in it works today.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
