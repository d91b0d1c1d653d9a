//! Traits and data shared by every sandbox backend, the guest agent's wire protocol, and the
//! backend conformance suite.
//!
//! 1. Describe a sandbox with a [`SandboxSpec`] (validated once, via `TryFrom` or the builder).
//! 2. A backend's [`Runtime::create`] boots it and returns a [`Sandbox`] once the guest agent has
//!    completed the [`protocol`] handshake.
//! 3. Run commands with [`Sandbox::exec`] (collected) or [`Sandbox::exec_stream`] (streamed, bounded),
//!    move files with `write_file`/`read_file`/`remove`/`list`.
//! 4. [`Sandbox::destroy`] releases everything; [`SandboxState`] tracks the lifecycle.
//! 5. Backends talk to the agent with [`client::AgentClient`] over any byte stream, and prove
//!    themselves with the `conformance` suite (module and feature `conformance`).
//!
//! ```no_run
//! # #[cfg(feature = "host")]
//! # async fn demo(runtime: &dyn sandbox_core::Runtime) -> sandbox_core::Result<()> {
//! use sandbox_core::{ExecRequest, FileOptions, SandboxSpec};
//! let spec = SandboxSpec::builder("/cache/vmlinux", "/cache/rootfs.ext4").memory_mib(256).build()?;
//! let sb = runtime.create(spec).await?;
//! sb.write_file("/tmp/hello.txt", b"hi\n", &FileOptions::new()).await?;
//! let out = sb.exec(ExecRequest::new(["cat", "/tmp/hello.txt"])).await?;
//! assert_eq!(out.stdout, b"hi\n");
//! sb.destroy().await?;
//! # Ok(()) }
//! ```
//!
//! This crate is traits and data only: no unsafe code, and it never spawns a runtime or a task.
//! Without the default `host` feature it has no tokio dependency (the agent builds it that way).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod exec;
pub mod file;
pub mod protocol;
pub mod spec;
pub mod state;

#[cfg(feature = "host")]
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "host")]
mod sandbox;

pub use error::{Error, ErrorKind, Result};
pub use exec::{ExecEvent, ExecOutput, ExecRequest, ExitStatus};
pub use file::{DirEntry, FileKind, FileOptions, Listing};
pub use protocol::AGENT_VSOCK_PORT;
#[cfg(feature = "host")]
pub use sandbox::{exec_channel, ExecEventSender, ExecStream, Runtime, Sandbox, SandboxId};
pub use spec::{
    Egress, NetworkSpec, PolicyDocument, PolicyFormat, RootMode, SandboxSpec, SandboxSpecBuilder,
    SandboxSpecConfig,
};
pub use state::SandboxState;
