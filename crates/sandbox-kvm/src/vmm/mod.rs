//! The VMM: configuration, the build recipe, the running handle and exit reasons.
//!
//! ```no_run
//! use sandbox_kvm::vmm::{build, VmConfig, VmResources};
//!
//! let config = VmConfig::new("/path/to/vmlinux").vcpus(2).memory_mib(256);
//! let resources = VmResources::try_from(config)?;
//! let mut vm = build(resources)?; // paused
//! vm.start()?;
//! let reason = vm.wait();
//! println!("VM ended: {reason} (exit code {})", reason.exit_code());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod builder;
pub mod config;
pub mod exit;
pub mod handle;

pub use builder::{build, BuildError, MmioSlot, VmBuilder};
pub use config::{
    ConfigError, ConsoleConfig, DiskConfig, VmConfig, VmResources, VsockDeviceConfig,
};
pub use exit::{ExitReason, ExitState, InternalErrorInfo};
pub use handle::{HandleError, VmHandle, VmState};
