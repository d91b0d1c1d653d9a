//! A minimal virtual machine monitor on rust-vmm: the library behind the `sandbox-vmm` binary.
//!
//! One `sandbox-vmm` process runs one sandbox's VM; `sandbox-kvm`'s runtime writes its JSON
//! config ([`vmm::VmConfig`]) and spawns it. Cargo features: `vmm` (default) is the VMM itself;
//! without it only the config types, their validation ([`vmm::VmResources`]), [`layout`] and the
//! `/dev/kvm` checks ([`kvm`]) are compiled, which is all the runtime needs. `cli` (default)
//! adds the binary's dependencies.
//!
//! How a VM comes to life (see docs/vmm.md for the details and the reasons):
//! 1. A JSON [`vmm::VmConfig`] is validated once into [`vmm::VmResources`].
//! 2. [`vmm::build`] runs the recipe: open and check `/dev/kvm` ([`kvm`]), map guest RAM around
//!    the 32-bit MMIO gap ([`layout`]), create the in-kernel irqchip and PIT, load the kernel and
//!    initrd ([`boot`]), attach the serial console, i8042, RTC, ACPI power registers and
//!    virtio-mmio disks ([`devices`]) on the PIO/MMIO [`bus`]es, write ACPI tables and
//!    `boot_params`, and create the vCPUs with filtered CPUID and long-mode registers.
//! 3. The result is a paused [`vmm::VmHandle`]: one thread per vCPU ([`vcpu`]) plus a device
//!    event-loop thread ([`event_loop`]). `start()` boots it; `wait()` returns the
//!    [`vmm::ExitReason`] (poweroff, reset, triple fault, internal error, stopped).
//!
//! ```no_run
//! use sandbox_vmm::vmm::{build, DiskConfig, VmConfig, VmResources};
//!
//! let config = VmConfig::new("vmlinux")
//!     .vcpus(2)
//!     .disk(DiskConfig::new("rootfs.ext4", false))
//!     .cmdline_extra("root=/dev/vda rw init=/sbin/sandbox-test-init");
//! let mut vm = build(VmResources::try_from(config)?)?;
//! vm.start()?;
//! println!("{}", vm.wait());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "vmm")]
pub mod boot;
#[cfg(feature = "vmm")]
pub mod bus;
#[cfg(feature = "vmm")]
pub mod devices;
#[cfg(feature = "vmm")]
pub mod event_loop;
pub mod kvm;
pub mod layout;
#[cfg(feature = "vmm")]
pub mod logging;
#[cfg(feature = "vmm")]
pub mod memory;
#[cfg(feature = "vmm")]
pub mod seccomp;
pub mod sys;
#[cfg(feature = "vmm")]
pub mod vcpu;
pub mod vmm;
