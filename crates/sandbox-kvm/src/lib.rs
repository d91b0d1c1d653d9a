//! A minimal virtual machine monitor on rust-vmm, and the KVM sandbox backend.
//!
//! This crate will hold the x86_64 boot path (Linux 64-bit boot protocol), the 16550 serial
//! console, i8042 reset, the virtio-mmio transport with virtio-blk and virtio-vsock, the
//! `sandbox-vmm` binary that runs one VM per process, and `KvmRuntime`/`KvmSandbox`.
#![warn(missing_docs)]

pub mod devices;
