//! `cargo xtask guest`: the guest kernel and root file system. Not written yet.

use anyhow::{bail, Result};
use clap::Subcommand;

/// What to build.
#[derive(Subcommand)]
pub enum GuestCmd {
    /// The guest `vmlinux`.
    Kernel,
    /// The guest root file system image (ext4).
    Rootfs,
}

pub fn run(_what: GuestCmd) -> Result<()> {
    bail!("cargo xtask guest is not written yet")
}
