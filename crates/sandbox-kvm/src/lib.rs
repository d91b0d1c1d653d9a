//! The KVM sandbox backend: [`KvmRuntime`] and [`KvmSandbox`] implement `sandbox-core`'s
//! `Runtime` and `Sandbox` traits with one `sandbox-vmm` process per sandbox.
//!
//! 1. [`KvmRuntime::new`] resolves a [`KvmRuntimeConfig`] (the `sandbox-vmm` binary, the guest
//!    kernel and rootfs, the state directory), checks `/dev/kvm` and removes what dead
//!    processes left in the state directory.
//! 2. `create(spec)` gives each sandbox a directory, a disk, a `sandbox-vmm` config
//!    (`sandbox_vmm::vmm::VmConfig`, the only part of the VMM crate this one depends on), spawns
//!    the VMM and waits for the guest agent's handshake over virtio-vsock.
//! 3. `exec`, file calls and `destroy` go through `sandbox-core`'s agent client; `destroy`,
//!    `Drop` and the TTL release every process and file.
//!
//! docs/runtime.md has the details; docs/embedding.md is for platform teams.
#![warn(missing_docs)]

pub mod runtime;

pub use runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};
