//! A minimal virtual machine monitor on rust-vmm, and (later) the KVM sandbox backend.
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
//! use sandbox_kvm::vmm::{build, DiskConfig, VmConfig, VmResources};
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

pub mod boot;
pub mod bus;
pub mod devices;
pub mod event_loop;
pub mod kvm;
pub mod layout;
pub mod runtime;
pub mod sys;
pub mod vcpu;
pub mod vmm;

pub use runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};
