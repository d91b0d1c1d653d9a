//! The KVM backend of `sandbox-core`'s [`Runtime`](sandbox_core::Runtime) and
//! [`Sandbox`](sandbox_core::Sandbox) traits (see `docs/runtime.md`).
//!
//! 1. [`KvmRuntime::new`] resolves a [`KvmRuntimeConfig`] once: finds `sandbox-vmm` and the guest
//!    artifacts (`SANDBOX_VMM`, `SANDBOX_KERNEL`, `SANDBOX_ROOTFS`), checks `/dev/kvm`, creates
//!    the state directory and removes what dead owners left in it.
//! 2. [`Runtime::create`](sandbox_core::Runtime::create) makes `<state>/sbx-<hex>/` with a private
//!    copy of the rootfs (reflink or sparse copy), the VM config, the vsock socket and a capped
//!    console log, and starts one `sandbox-vmm` process (exec'd directly, `PR_SET_PDEATHSIG`,
//!    only stdin/stdout/stderr inherited). It returns once the guest agent answered the protocol
//!    handshake over vsock, or fails with a typed error carrying the console tail and removes
//!    everything it made.
//! 3. A [`KvmSandbox`] talks to its agent over the VMM's vsock Unix socket (`CONNECT 1024`), with
//!    a small pool of handshaken connections; a host-side task kills the VMM when the TTL ends.
//! 4. `destroy()` asks the agent to power off, then kills and reaps the VMM and removes the
//!    directory; `Drop` does the same, synchronously and best effort.
//!
//! ```no_run
//! use sandbox_core::{ExecRequest, Runtime};
//! use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let runtime = KvmRuntime::new(KvmRuntimeConfig::default())?;
//! let sb = runtime.create(runtime.spec_builder().memory_mib(256).build()?).await?;
//! let out = sb.exec(ExecRequest::shell("uname -r")).await?;
//! println!("{}", out.stdout_str());
//! sb.destroy().await?;
//! # Ok(()) }
//! ```

mod config;
mod copy;
mod dirfd;
pub mod jail;
mod net;
mod process;
mod reconcile;
mod sandbox;
mod sys;

use std::path::PathBuf;
use std::time::Duration;

pub use config::{
    DiskMode, KvmRuntimeConfig, KvmRuntimeConfigBuilder, DEFAULT_CONSOLE_CAP_BYTES,
    DEFAULT_CREATE_DEADLINE, DEFAULT_DESTROY_GRACE, DEFAULT_MAX_SANDBOXES, ENV_KERNEL, ENV_ROOTFS,
    ENV_STATE_DIR, ENV_VMM,
};
pub use copy::CopyMethod;
pub use sandbox::{DiskUsage, KvmRuntime, KvmSandbox, HOST_EXEC_GRACE};

use sandbox_core::{Error, ErrorKind};

/// A local `Result` for the runtime.
pub type Result<T> = std::result::Result<T, RuntimeError>;

/// What went wrong in the KVM runtime. Converted into the public [`sandbox_core::Error`] at the
/// trait boundary (the kind is stated per variant).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A config field is out of range (`InvalidSpec`).
    #[error("KvmRuntimeConfig.{field} {problem}.")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// No `sandbox-vmm` binary was found (`HostSetup`).
    #[error(
        "The sandbox-vmm binary was not found; fix: build it with \
         `cargo build --release --bin sandbox-vmm` and set SANDBOX_VMM to its path \
         (or install it next to this executable)."
    )]
    VmmNotFound,
    /// A guest artifact path is not configured (`HostSetup`).
    #[error("No {what} is configured; fix: run `cargo xtask guest` and set {var} to the path it prints.")]
    ArtifactUnset {
        /// `guest kernel` or `guest rootfs`.
        what: &'static str,
        /// The environment variable that would name it.
        var: &'static str,
    },
    /// A configured file cannot be read (`HostSetup`).
    #[error(
        "The {what} {path} cannot be read; fix: build the guest artifacts with `cargo xtask guest` \
         (sandbox-vmm: `cargo build --release --bin sandbox-vmm`) and check the path."
    )]
    ArtifactUnreadable {
        /// What it is.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A configured artifact is readable but not what it must be: a kernel that is neither a
    /// vmlinux ELF file nor a bzImage, a rootfs without an ext2/3/4 superblock (`HostSetup`).
    #[error("The {what} {path} cannot be used: {problem}; fix: {fix}.")]
    ArtifactInvalid {
        /// `guest kernel` or `guest rootfs`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with the file.
        problem: String,
        /// How to fix it.
        fix: &'static str,
    },
    /// The configured `sandbox-vmm` is not one: its `--version` does not name sandbox-vmm
    /// (`HostSetup`).
    #[error(
        "{path} is not a sandbox-vmm binary: {problem}; fix: set SANDBOX_VMM (or \
         KvmRuntimeConfig::vmm) to the sandbox-vmm built by `cargo build --release --bin sandbox-vmm`."
    )]
    VmmNotOurs {
        /// The configured path.
        path: PathBuf,
        /// What `--version` did.
        problem: String,
    },
    /// The spec's kernel or rootfs is readable but not a kernel or a file system (`InvalidSpec`).
    #[error("The spec's {field} {path} cannot be used: {problem}; fix: point the spec at a vmlinux (or bzImage) kernel and a raw ext4 rootfs (`cargo xtask guest` builds both).")]
    SpecFileInvalid {
        /// `kernel` or `rootfs`.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong with the file.
        problem: String,
    },
    /// `sandbox-vmm` refused to start the VM (exit 1 or 2 before the agent answered: a VM
    /// config, artifact or host problem, not the guest's) (`HostSetup`).
    #[error(
        "Sandbox {id}: sandbox-vmm refused to start the VM ({how}): {reason}; fix: use a \
         sandbox-vmm, kernel and rootfs from the same build (`cargo build --release --bin \
         sandbox-vmm`, `cargo xtask guest`) and see its log below.{console}"
    )]
    VmmRefused {
        /// The sandbox id.
        id: String,
        /// How the VMM ended.
        how: String,
        /// The VMM's error line, or `no error line in its log`.
        reason: String,
        /// The last console and VMM log lines.
        console: String,
    },
    /// `/dev/kvm` is missing or unusable; the message names the fix (`HostSetup`).
    #[error("KVM is not usable: {0}.")]
    Kvm(#[from] sandbox_vmm::kvm::KvmError),
    /// The state directory cannot be created or read (`HostSetup`).
    #[error("The state directory {path} is not usable; fix: make it writable or set KvmRuntimeConfig.state_dir.")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state directory is not one we can trust: a symlink, not ours, writable by others, or
    /// under a directory others can modify (`HostSetup`).
    #[error("The state directory {path} {problem}; fix: {fix}.")]
    StateDirUntrusted {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// What to do about it.
        fix: &'static str,
    },
    /// A sandbox's Unix socket path would exceed the kernel's `sun_path` limit (`HostSetup`).
    #[error(
        "The sandbox socket path {path} is {len} bytes, over the kernel's limit of {max} bytes for \
         a Unix socket path (108 with the terminating NUL); fix: set KvmRuntimeConfig.state_dir \
         to a shorter directory."
    )]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length, bytes.
        len: usize,
        /// The longest allowed, bytes (without the NUL).
        max: usize,
    },
    /// Too many live sandboxes in this runtime (`HostSetup`).
    #[error("This runtime already runs {max} sandboxes; fix: destroy some or raise KvmRuntimeConfig.max_sandboxes.")]
    TooManySandboxes {
        /// The limit.
        max: usize,
    },
    /// A file operation while preparing or removing a sandbox failed (`Io`).
    #[error("Could not {action} {path}.")]
    Io {
        /// What we tried, as a verb phrase.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file the spec names cannot be read (`InvalidSpec`).
    #[error("The spec's {field} {path} cannot be read: {source}; fix: point the spec at an existing, readable file (`cargo xtask guest` builds the default ones).")]
    SpecFile {
        /// `kernel` or `rootfs`.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spec's disk settings do not fit its base image or the runtime's disk mode
    /// (`InvalidSpec`).
    #[error("The spec's disk settings cannot be used: {problem}.")]
    DiskSpec {
        /// What is wrong, as a phrase.
        problem: String,
    },
    /// The image store cannot be opened (created if missing) to look up the spec's image
    /// (`HostSetup`): the message has the cause (read-only file system, permission...) and the
    /// fix.
    #[error(
        "The image store {store} cannot be opened to find the spec's image {reference:?}: {}; \
         fix: set SANDBOX_IMAGE_STORE (or KvmRuntimeConfig::image_store) to a directory this \
         user can create or write, holding the imported images (docs/images.md).",
        chain(source)
    )]
    ImageStore {
        /// The reference (a tag or `sha256:<hex>`).
        reference: String,
        /// The store directory.
        store: PathBuf,
        /// The cause (part of the text, so not also the `source()`).
        source: sandbox_fs::StoreError,
    },
    /// The spec's image cannot be used from the store: unknown (`InvalidSpec`), or its file
    /// cannot be read (`Io`). The message has the cause.
    #[error(
        "The spec's image {reference:?} cannot be used from the image store {store}: {}{}",
        chain(source),
        image_hint(source)
    )]
    Image {
        /// The reference (a tag or `sha256:<hex>`).
        reference: String,
        /// The store directory.
        store: PathBuf,
        /// The cause (part of the text, so not also the `source()`).
        source: sandbox_fs::StoreError,
    },
    /// The sandbox's network could not be set up (`HostSetup` when the host lacks something
    /// the message names: root, `/dev/net/tun`, the `nft` binary, free addresses; else `Io`).
    #[error("The sandbox network could not be set up: {problem}.")]
    Network {
        /// What went wrong, with the fix when there is one.
        problem: String,
        /// The cause.
        #[source]
        source: Option<Box<sandbox_net::NetError>>,
    },
    /// The spec's egress policy document is invalid (`InvalidSpec`): the message names the
    /// rule and its line.
    #[error("The spec's egress policy is invalid: {source}")]
    Policy {
        /// The parser's or validator's error.
        #[source]
        source: sandbox_policy::PolicyError,
    },
    /// The sandbox's copy-on-write disk could not be created (`Io`).
    #[error("Could not create the disk overlay {path} over {base}.")]
    Overlay {
        /// The overlay path.
        path: PathBuf,
        /// The base image.
        base: PathBuf,
        /// The cause.
        #[source]
        source: sandbox_fs::Qcow2Error,
    },
    /// The VM config the spec produced was refused (`InvalidSpec`).
    #[error("The sandbox spec does not make a valid VM config.")]
    VmConfig(#[from] sandbox_vmm::vmm::ConfigError),
    /// `sandbox-vmm` could not be started (`HostSetup`).
    #[error("Could not start {vmm}; fix: check that it is an executable sandbox-vmm binary.")]
    Spawn {
        /// The binary.
        vmm: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The host cannot provide a jail layer the config requires (`HostSetup`).
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// KVM stopped the guest with an internal error while it booted: this host's `/dev/kvm`
    /// cannot run the guest kernel (`HostSetup`).
    #[error(
        "Sandbox {id}: this machine's /dev/kvm cannot run the guest: {how} while the guest \
         booted{why}. This happens where KVM emulates the guest's kernel code instead of running \
         it on hardware virtualization (KVM inside a micro-VM without nested VT-x/AMD-V). Fix: \
         run on a host with hardware virtualization (bare metal, or a VM with nested \
         virtualization); for development on such a machine, `cargo xtask run -- <program>` \
         runs a program in a nested test host where KVM works (docs/testing.md).{console}"
    )]
    KvmCannotRunGuest {
        /// The sandbox id.
        id: String,
        /// How the VMM ended.
        how: String,
        /// What KVM reported, when the VMM's log says (for example ", an emulation failure").
        why: String,
        /// The last console and VMM log lines.
        console: String,
    },
    /// The VMM made a system call its seccomp filter forbids and ended (`GuestExited`): a bug in
    /// the VMM's allowlists, or a guest that took over the VMM process (docs/jail.md).
    #[error("Sandbox {id}: sandbox-vmm made a forbidden system call and was stopped ({report}).{console}")]
    VmmSeccomp {
        /// The sandbox id.
        id: String,
        /// The VMM's own report: the call's number and the thread kind.
        report: String,
        /// The last console and VMM log lines.
        console: String,
    },
    /// The VMM's cgroup reached `memory.max` and the kernel's OOM killer ended the VMM
    /// (`GuestExited`): the VMM needed more than guest RAM plus the jail's overhead
    /// (docs/jail.md). A guest that fills its own RAM meets its own kernel's OOM killer instead.
    #[error(
        "Sandbox {id}: sandbox-vmm ran out of memory: its cgroup reached memory.max \
         ({memory_max}) and the kernel's OOM killer ended it; fix: {fix}.{console}"
    )]
    VmmOutOfMemory {
        /// The sandbox id.
        id: String,
        /// The cgroup's `memory.max`, for people (`"335544320 bytes"`).
        memory_max: String,
        /// What to change: the jail's overhead, or, when most of the memory was files in
        /// memory, the state directory's file system.
        fix: String,
        /// The last console and VMM log lines.
        console: String,
    },
    /// The VMM ended while the sandbox was booting or in use (`GuestExited`).
    #[error("Sandbox {id}: {how}.{console}")]
    GuestExited {
        /// The sandbox id.
        id: String,
        /// How the VMM ended.
        how: String,
        /// The last console and VMM log lines, formatted for people (may be empty).
        console: String,
    },
    /// The agent did not complete the handshake before the deadline (`AgentUnreachable`).
    #[error("Sandbox {id}: the guest agent did not answer; gave up after {after:?}.{console}")]
    AgentUnreachable {
        /// The sandbox id.
        id: String,
        /// How long `create()` had run when it gave up (the time actually waited).
        after: Duration,
        /// The last console lines.
        console: String,
        /// The last connection error.
        #[source]
        source: sandbox_core::client::ClientError,
    },
}

/// `e` and its causes, joined with `: ` (for errors whose text carries their cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What to do about an image the store does not have.
fn image_hint(e: &sandbox_fs::StoreError) -> &'static str {
    match e {
        sandbox_fs::StoreError::NotFound { .. } => {
            " Import it first (`ImageStore::import_dir`, `import_oci`) and tag it, or name it by \
             `sha256:<hex>` (docs/images.md)."
        }
        _ => "",
    }
}

impl RuntimeError {
    /// The public kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::Config { .. }
            | RuntimeError::VmConfig(_)
            | RuntimeError::SpecFile { .. }
            | RuntimeError::SpecFileInvalid { .. }
            | RuntimeError::DiskSpec { .. }
            | RuntimeError::Policy { .. } => ErrorKind::InvalidSpec,
            RuntimeError::VmmNotFound
            | RuntimeError::ArtifactUnset { .. }
            | RuntimeError::ArtifactUnreadable { .. }
            | RuntimeError::ArtifactInvalid { .. }
            | RuntimeError::ImageStore { .. }
            | RuntimeError::VmmNotOurs { .. }
            | RuntimeError::VmmRefused { .. }
            | RuntimeError::Kvm(_)
            | RuntimeError::StateDir { .. }
            | RuntimeError::StateDirUntrusted { .. }
            | RuntimeError::SocketPathTooLong { .. }
            | RuntimeError::TooManySandboxes { .. }
            | RuntimeError::Jail(_)
            | RuntimeError::KvmCannotRunGuest { .. }
            | RuntimeError::Spawn { .. } => ErrorKind::HostSetup,
            RuntimeError::Image { source, .. } => match source {
                sandbox_fs::StoreError::NotFound { .. }
                | sandbox_fs::StoreError::InvalidDigest { .. }
                | sandbox_fs::StoreError::InvalidTag { .. } => ErrorKind::InvalidSpec,
                _ => ErrorKind::Io,
            },
            RuntimeError::Network { source, .. } => match source.as_deref() {
                Some(
                    sandbox_net::NetError::NotPermitted { .. }
                    | sandbox_net::NetError::Tap(_)
                    | sandbox_net::NetError::NftMissing
                    | sandbox_net::NetError::Pool(_),
                ) => ErrorKind::HostSetup,
                _ => ErrorKind::Io,
            },
            RuntimeError::Io { .. } | RuntimeError::Overlay { .. } => ErrorKind::Io,
            RuntimeError::GuestExited { .. }
            | RuntimeError::VmmSeccomp { .. }
            | RuntimeError::VmmOutOfMemory { .. } => ErrorKind::GuestExited,
            RuntimeError::AgentUnreachable { .. } => ErrorKind::AgentUnreachable,
        }
    }
}

impl From<RuntimeError> for Error {
    /// The message is this error's text; the source is its cause (not the error itself, so a
    /// `{:#}` chain does not print the text twice).
    fn from(e: RuntimeError) -> Self {
        let kind = e.kind();
        let message = e.to_string();
        match e {
            RuntimeError::ArtifactUnreadable { source, .. }
            | RuntimeError::StateDir { source, .. }
            | RuntimeError::Io { source, .. }
            | RuntimeError::Spawn { source, .. } => Error::with_source(kind, message, source),
            RuntimeError::VmConfig(source) => Error::with_source(kind, message, source),
            RuntimeError::AgentUnreachable { source, .. } => {
                Error::with_source(kind, message, source)
            }
            _ => Error::new(kind, message),
        }
    }
}
