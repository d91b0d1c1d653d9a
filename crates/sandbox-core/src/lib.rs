//! Traits and data shared by every sandbox backend.
//!
//! This crate will hold the `Sandbox` and `Runtime` traits, `SandboxSpec`, exec and file types,
//! the lifecycle state machine, public error kinds, the guest agent wire protocol, and a
//! conformance test suite that every backend must pass. It is traits and data only: no unsafe code
//! and no runtime is spawned here.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
