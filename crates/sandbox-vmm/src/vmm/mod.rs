//! The VMM: configuration, the build recipe, the running handle and exit reasons. Without the
//! `vmm` feature, only the configuration.
//!
//! ```no_run
//! use sandbox_vmm::vmm::{build, VmConfig, VmResources};
//!
//! let config = VmConfig::new("/path/to/vmlinux").vcpus(2).memory_mib(256);
//! let resources = VmResources::try_from(config)?;
//! let mut vm = build(resources)?; // paused
//! vm.start()?;
//! let reason = vm.wait();
//! println!("VM ended: {reason} (exit code {})", reason.exit_code());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "vmm")]
pub mod builder;
pub mod config;
#[cfg(feature = "vmm")]
pub mod exit;
#[cfg(feature = "vmm")]
pub mod handle;

#[cfg(feature = "vmm")]
pub use builder::{build, BuildError, MmioSlot, VmBuilder};
pub use config::{
    ConfigError, ConsoleConfig, DiskConfig, DiskFormat, FdProblem, FileSource, InheritedFd,
    NetDeviceConfig, NetResources, SeccompMode, VmConfig, VmResources, VsockDeviceConfig,
    EXIT_SECCOMP,
};
#[cfg(feature = "vmm")]
pub use exit::{ExitReason, ExitState, InternalErrorInfo};
#[cfg(feature = "vmm")]
pub use handle::{HandleError, VmHandle, VmState};
