//! `cargo xtask guest`: the guest kernel (`vmlinux`) and root file system (ext4 image).
//!
//! Both are slow to build (minutes), so both are cache entries under
//! `<cache>/guest/` (see [`util::cache_dir`]) keyed by a hash of their inputs, verified by the
//! SHA-256 recorded in their manifest every time they are reused. Layout, keys and timings:
//! `docs/guest.md`.
//!
//! 1. [`kernel`]: Debian's `linux-source-6.1` + `resources/guest/microvm.config` → `vmlinux`.
//! 2. [`rootfs`]: `debootstrap --variant=minbase` → base ext4 image → final image with our init
//!    files written in.
//! 3. [`ensure_artifacts`]: both, with the default rootfs settings; what the test harness and the
//!    demo call.

mod cache;
mod kernel;
mod rootfs;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::util;

pub use rootfs::RootfsConfig;

/// What to build. With no subcommand, `cargo xtask guest` builds both.
#[derive(Debug, Subcommand)]
pub enum GuestCmd {
    /// Both the kernel and the rootfs (the default).
    All(RootfsArgs),
    /// The guest `vmlinux` (Debian's linux-source-6.1 with resources/guest/microvm.config).
    Kernel(CommonArgs),
    /// The guest root file system image (ext4, raw): Debian bookworm minbase + our init.
    Rootfs(RootfsArgs),
}

/// Flags every guest subcommand takes.
#[derive(Debug, Default, Args)]
pub struct CommonArgs {
    /// Rebuild even if a valid cache entry exists (the new entry replaces it).
    #[arg(long)]
    pub force: bool,
}

/// Flags of the rootfs build.
#[derive(Debug, Args)]
pub struct RootfsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Image size in MiB (the file is sparse; this is the file system's capacity).
    #[arg(long, default_value_t = rootfs::DEFAULT_SIZE_MIB)]
    pub size_mib: u32,
    /// Extra Debian packages to install, beyond bash, coreutils, python3, sqlite3, git and
    /// ca-certificates (comma-separated or repeated).
    #[arg(long = "package", value_name = "NAME", value_delimiter = ',')]
    pub extra_packages: Vec<String>,
}

impl Default for RootfsArgs {
    fn default() -> Self {
        Self {
            common: CommonArgs::default(),
            size_mib: rootfs::DEFAULT_SIZE_MIB,
            extra_packages: Vec::new(),
        }
    }
}

impl RootfsArgs {
    fn config(&self) -> RootfsConfig {
        RootfsConfig {
            size_mib: self.size_mib,
            extra_packages: self.extra_packages.clone(),
            ..RootfsConfig::default()
        }
    }
}

/// The guest artifacts, as read-only cache entries: a user that needs a writable rootfs copies it
/// first (`cp --sparse=always`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(dead_code)] // See ensure_artifacts.
pub struct GuestArtifacts {
    /// The guest kernel: an uncompressed `vmlinux` ELF with a PVH entry note.
    pub kernel: PathBuf,
    /// The root file system: a raw ext4 image (whole disk, no partition table; `root=/dev/vda`).
    pub rootfs: PathBuf,
}

/// Builds whatever guest artifact is missing or stale (default rootfs settings) and returns the
/// paths of both.
///
/// Takes the kernel's and then the rootfs's cache lock, so concurrent callers wait for each other
/// instead of building twice. Installs what it needs with apt-get (as root). A fresh build takes minutes; a reuse
/// costs one SHA-256 pass over each artifact (about a second).
// Called by `cargo xtask test` and the demo (issue 2 item 4); until they land, only by name.
#[allow(dead_code)]
pub fn ensure_artifacts() -> Result<GuestArtifacts> {
    let kernel = kernel::ensure(false)?;
    let rootfs = rootfs::ensure(&RootfsConfig::default(), false)?;
    Ok(GuestArtifacts { kernel, rootfs })
}

/// The guest agent binary to install as `/sbin/init`: built here, static, and returned.
///
/// `cargo build --release -p sandbox-agent --target x86_64-unknown-linux-gnu` with
/// `RUSTFLAGS=-C target-feature=+crt-static`, into its own target dir (`target/agent`) so that the
/// different RUSTFLAGS do not invalidate the other builds. Cargo makes a no-op rebuild cheap, and
/// an unchanged agent is byte-identical, so the rootfs cache key (which hashes this file) stays
/// stable. A failed build stops xtask: a rootfs without its agent boots but never answers, which
/// is a much more confusing failure later on.
pub fn agent_binary() -> Option<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let root = util::workspace_root();
    let target_dir = root.join("target").join("agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "-j2",
        "-p",
        "sandbox-agent",
        "--target",
        TARGET,
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&root)
    // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS; the agent gets exactly ours. No line
    // tables and no checkout path in the binary, so two checkouts of the same source build the
    // same bytes and share one rootfs cache entry.
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env(
        "RUSTFLAGS",
        format!(
            "-C target-feature=+crt-static -C strip=debuginfo --remap-path-prefix={}=/sandbox-sdk",
            root.display()
        ),
    );
    eprintln!(
        "xtask: building the guest agent (static) into {}",
        target_dir.display()
    );
    if let Err(e) = util::run(&mut cmd) {
        eprintln!("xtask: building the guest agent failed: {e:#}");
        std::process::exit(1);
    }
    let bin = target_dir
        .join(TARGET)
        .join("release")
        .join("sandbox-agent");
    if !bin.is_file() {
        eprintln!("xtask: the agent build produced no {}", bin.display());
        std::process::exit(1);
    }
    Some(bin)
}

/// `cargo xtask guest [all|kernel|rootfs]`.
pub fn run(what: Option<GuestCmd>) -> Result<()> {
    let what = what.unwrap_or_else(|| GuestCmd::All(RootfsArgs::default()));
    match what {
        GuestCmd::All(args) => {
            let kernel = kernel::ensure(args.common.force)?;
            let rootfs = rootfs::ensure(&args.config(), args.common.force)?;
            println!("kernel {}", kernel.display());
            println!("rootfs {}", rootfs.display());
        }
        GuestCmd::Kernel(args) => {
            let kernel = kernel::ensure(args.force)?;
            println!("kernel {}", kernel.display());
        }
        GuestCmd::Rootfs(args) => {
            let rootfs = rootfs::ensure(&args.config(), args.common.force)?;
            println!("rootfs {}", rootfs.display());
        }
    }
    Ok(())
}

/// `resources/guest/<name>` in the checkout.
fn resource(name: &str) -> PathBuf {
    util::workspace_root().join("resources/guest").join(name)
}
