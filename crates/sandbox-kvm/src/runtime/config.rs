//! [`KvmRuntimeConfig`]: where the runtime finds `sandbox-vmm`, the guest artifacts and its state
//! directory, and its deadlines and limits. Unset fields get defaults from the environment when
//! [`KvmRuntime::new`](super::KvmRuntime::new) resolves them, once.

use super::jail::{JailConfig, JailSupport};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Result, RuntimeError};

/// Environment variable naming the `sandbox-vmm` binary.
pub const ENV_VMM: &str = "SANDBOX_VMM";
/// Environment variable naming the default guest kernel (`vmlinux`).
pub const ENV_KERNEL: &str = "SANDBOX_KERNEL";
/// Environment variable naming the image store directory.
pub const ENV_IMAGE_STORE: &str = "SANDBOX_IMAGE_STORE";
/// Environment variable naming the default guest rootfs (raw ext4).
pub const ENV_ROOTFS: &str = "SANDBOX_ROOTFS";
/// Environment variable naming the state directory (the sandboxes' directories and disks).
pub const ENV_STATE_DIR: &str = "SANDBOX_STATE_DIR";
/// Default deadline for a new sandbox's agent handshake (generous: nested test hosts are slow).
pub const DEFAULT_CREATE_DEADLINE: Duration = Duration::from_secs(120);
/// Default wait for the agent's power-off during `destroy()` before the VMM is killed.
pub const DEFAULT_DESTROY_GRACE: Duration = Duration::from_secs(3);
/// Default cap of each sandbox's console log, bytes (256 KiB).
pub const DEFAULT_CONSOLE_CAP_BYTES: u64 = 256 * 1024;
/// Default most live sandboxes per runtime.
pub const DEFAULT_MAX_SANDBOXES: usize = 64;

/// How a [`KvmRuntime`](super::KvmRuntime) runs sandboxes. Build with
/// [`KvmRuntimeConfig::builder`]; every field has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvmRuntimeConfig {
    /// The `sandbox-vmm` binary. Default: `$SANDBOX_VMM`, else `sandbox-vmm` next to the current
    /// executable (or one directory up, for examples and test binaries).
    pub vmm: Option<PathBuf>,
    /// Default guest kernel for [`KvmRuntime::spec_builder`](super::KvmRuntime::spec_builder).
    /// Default: `$SANDBOX_KERNEL`.
    pub kernel: Option<PathBuf>,
    /// Default guest rootfs. Default: `$SANDBOX_ROOTFS`.
    pub rootfs: Option<PathBuf>,
    /// Where per-sandbox directories live, with each sandbox's writable disk (its overlay).
    /// Default: `$SANDBOX_STATE_DIR`, else `/var/lib/sandbox-sdk` for root, else
    /// `$XDG_STATE_HOME/sandbox-sdk`, else `$HOME/.local/state/sandbox-sdk`, else
    /// `$TMPDIR/sandbox-sdk-<uid>`. Put it on a disk, not a tmpfs such as `/run`: a disk there
    /// lives in memory, charged to its sandbox's cgroup (`KvmRuntime::new` warns).
    pub state_dir: Option<PathBuf>,
    /// The KVM device checked at startup.
    pub kvm_device: PathBuf,
    /// How long `create()` may take, from its call to the agent's handshake (the rootfs copy and
    /// the boot included).
    pub create_deadline: Duration,
    /// How long `destroy()` waits for a clean power-off before killing the VMM.
    pub destroy_grace: Duration,
    /// Cap of each sandbox's console log, bytes.
    pub console_cap_bytes: u64,
    /// Most sandboxes alive at once in this runtime.
    pub max_sandboxes: usize,
    /// The guest vsock port the agent listens on ([`sandbox_core::AGENT_VSOCK_PORT`]); tests set
    /// another port to get an agent that never answers.
    pub agent_port: u32,
    /// The jail each `sandbox-vmm` starts in (docs/jail.md). Default: every layer the host
    /// allows.
    pub jail: JailConfig,
    /// How a writable root disk is made from its base image (docs/disks.md).
    pub disk_mode: DiskMode,
    /// The image store that specs name bases from (`SandboxSpec::image`, docs/images.md),
    /// opened (and created) the first time a spec names an image. Default:
    /// `$SANDBOX_IMAGE_STORE`, else `$XDG_CACHE_HOME/sandbox-sdk/images`, else
    /// `$HOME/.cache/sandbox-sdk/images`, else `<state_dir>/images`.
    pub image_store: Option<PathBuf>,
    /// How sandbox networks are made (docs/network.md): the veth address pool, the guest's
    /// addressing, the exposed-port bind address. Default: `NetConfig::default()` with name
    /// prefixes unique to the state directory. Set up the first time a spec asks for a network.
    pub network: Option<sandbox_net::NetConfig>,
    /// How egress policies are enforced (docs/policy.md): the upstream DNS resolver (default:
    /// the host's `/etc/resolv.conf`), resolver limits, the deny-event rate.
    pub policy: sandbox_net::PolicyOptions,
}

/// How a sandbox's writable root disk is made from its base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DiskMode {
    /// A qcow2 overlay over the read-only base: constant time and space whatever the base's
    /// size; the spec's disk size and cap apply.
    #[default]
    Overlay,
    /// A private copy of the base (reflink where the file system has it, else a sparse copy):
    /// time and space grow with the base. For comparison (`cargo xtask bench create`).
    Copy,
}

impl Default for KvmRuntimeConfig {
    fn default() -> Self {
        Self {
            vmm: None,
            kernel: None,
            rootfs: None,
            state_dir: None,
            kvm_device: PathBuf::from(sandbox_vmm::kvm::KVM_DEVICE),
            create_deadline: DEFAULT_CREATE_DEADLINE,
            destroy_grace: DEFAULT_DESTROY_GRACE,
            console_cap_bytes: DEFAULT_CONSOLE_CAP_BYTES,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            agent_port: sandbox_core::AGENT_VSOCK_PORT,
            jail: JailConfig::default(),
            disk_mode: DiskMode::default(),
            image_store: None,
            network: None,
            policy: sandbox_net::PolicyOptions::default(),
        }
    }
}

impl KvmRuntimeConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> KvmRuntimeConfigBuilder {
        KvmRuntimeConfigBuilder {
            config: Self::default(),
        }
    }

    /// Checks the ranges: the one validation behind both
    /// [`KvmRuntimeConfigBuilder::build`] and [`KvmRuntime::new`](super::KvmRuntime::new) (a
    /// config edited field by field is checked too).
    ///
    /// # Errors
    /// [`RuntimeError::Config`] naming the field: a zero create deadline, a console cap outside
    /// 1 byte..=1 GiB, `max_sandboxes` 0, or agent port 0 / `u32::MAX`.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let bad = |field: &'static str, problem: &'static str| {
            Err(RuntimeError::Config { field, problem })
        };
        if c.create_deadline.is_zero() {
            return bad("create_deadline", "must be above zero");
        }
        if c.console_cap_bytes == 0
            || c.console_cap_bytes > sandbox_vmm::vmm::config::MAX_CONSOLE_CAP
        {
            return bad("console_cap_bytes", "must be between 1 byte and 1 GiB");
        }
        if c.max_sandboxes == 0 {
            return bad("max_sandboxes", "must be at least 1");
        }
        if c.agent_port == 0 || c.agent_port == u32::MAX {
            return bad("agent_port", "must be 1..=4294967294");
        }
        Ok(())
    }
}

/// Builds a [`KvmRuntimeConfig`]; `build()` checks the ranges.
#[derive(Debug, Clone)]
pub struct KvmRuntimeConfigBuilder {
    config: KvmRuntimeConfig,
}

impl KvmRuntimeConfigBuilder {
    /// The `sandbox-vmm` binary.
    pub fn vmm(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.vmm = Some(path.into());
        self
    }
    /// The default guest kernel.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kernel = Some(path.into());
        self
    }
    /// The default guest rootfs.
    pub fn rootfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.rootfs = Some(path.into());
        self
    }
    /// The state directory.
    pub fn state_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.state_dir = Some(path.into());
        self
    }
    /// The KVM device to check (default `/dev/kvm`).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kvm_device = path.into();
        self
    }
    /// The agent handshake deadline of `create()`.
    pub fn create_deadline(mut self, d: Duration) -> Self {
        self.config.create_deadline = d;
        self
    }
    /// The clean power-off wait of `destroy()`.
    pub fn destroy_grace(mut self, d: Duration) -> Self {
        self.config.destroy_grace = d;
        self
    }
    /// The console log cap, bytes.
    pub fn console_cap_bytes(mut self, bytes: u64) -> Self {
        self.config.console_cap_bytes = bytes;
        self
    }
    /// The most live sandboxes.
    pub fn max_sandboxes(mut self, n: usize) -> Self {
        self.config.max_sandboxes = n;
        self
    }
    /// The guest vsock port of the agent.
    pub fn agent_port(mut self, port: u32) -> Self {
        self.config.agent_port = port;
        self
    }

    /// The VMM's jail (docs/jail.md); [`JailConfig::off`] for debugging.
    pub fn jail(mut self, jail: JailConfig) -> Self {
        self.config.jail = jail;
        self
    }

    /// The image store directory.
    pub fn image_store(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.image_store = Some(path.into());
        self
    }

    /// How sandbox networks are made.
    pub fn network(mut self, config: sandbox_net::NetConfig) -> Self {
        self.config.network = Some(config);
        self
    }

    /// How egress policies are enforced.
    pub fn policy(mut self, options: sandbox_net::PolicyOptions) -> Self {
        self.config.policy = options;
        self
    }

    /// How writable root disks are made ([`DiskMode::Overlay`] by default).
    pub fn disk_mode(mut self, mode: DiskMode) -> Self {
        self.config.disk_mode = mode;
        self
    }

    /// Checks the ranges ([`KvmRuntimeConfig::validate`]).
    ///
    /// # Errors
    /// As [`KvmRuntimeConfig::validate`].
    pub fn build(self) -> Result<KvmRuntimeConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A config with every default filled in and every path checked.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub vmm: PathBuf,
    /// `/dev/kvm`, opened per sandbox and inherited by its VMM; `None` only for tests with a
    /// stand-in VMM (which never opens it).
    pub kvm_device: Option<PathBuf>,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub state_dir: PathBuf,
    pub create_deadline: Duration,
    pub destroy_grace: Duration,
    pub console_cap_bytes: u64,
    pub max_sandboxes: usize,
    pub agent_port: u32,
    pub jail: JailConfig,
    pub disk_mode: DiskMode,
    pub image_store: PathBuf,
    pub network: sandbox_net::NetConfig,
    pub policy: sandbox_net::PolicyOptions,
    /// What the host provides of `jail`: nothing until `KvmRuntime::new` probes it.
    pub jail_support: JailSupport,
}

/// What resolution may look at, so tests can fake the process environment.
pub(crate) struct Env<'a> {
    pub var: &'a dyn Fn(&str) -> Option<OsString>,
    pub current_exe: Option<PathBuf>,
    pub is_root: bool,
    pub uid: u32,
}

impl Env<'_> {
    pub fn process() -> Env<'static> {
        Env {
            var: &|k| std::env::var_os(k).filter(|v| !v.is_empty()),
            current_exe: std::env::current_exe().ok(),
            is_root: super::sys::is_root(),
            uid: super::sys::euid(),
        }
    }
}

/// Validates `c`, fills the defaults and checks that the binary and artifacts are readable
/// files. The state directory comes out absolute and short enough for the sandboxes' sockets.
pub(crate) fn resolve(c: &KvmRuntimeConfig, env: &Env<'_>) -> Result<Resolved> {
    c.validate()?;
    let vmm = match c
        .vmm
        .clone()
        .or_else(|| (env.var)(ENV_VMM).map(PathBuf::from))
    {
        Some(p) => p,
        None => find_vmm_near(env.current_exe.as_deref()).ok_or(RuntimeError::VmmNotFound)?,
    };
    check_file("sandbox-vmm", &vmm)?;
    let artifact = |field: &Option<PathBuf>, what: &'static str, var: &'static str| {
        let p = field
            .clone()
            .or_else(|| (env.var)(var).map(PathBuf::from))
            .ok_or(RuntimeError::ArtifactUnset { what, var })?;
        check_file(what, &p)?;
        Ok::<_, RuntimeError>(p)
    };
    let kernel = artifact(&c.kernel, "guest kernel", ENV_KERNEL)?;
    check_format(&kernel, "guest kernel", kernel_problem, FIX_KERNEL)?;
    let rootfs = artifact(&c.rootfs, "guest rootfs", ENV_ROOTFS)?;
    check_format(&rootfs, "guest rootfs", rootfs_problem, FIX_ROOTFS)?;
    let state_dir = match &c.state_dir {
        Some(p) => p.clone(),
        None => default_state_dir(env),
    };
    let state_dir = std::path::absolute(&state_dir).map_err(|source| RuntimeError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    check_socket_path(&sandbox_socket_path(&state_dir))?;
    let image_store = c
        .image_store
        .clone()
        .or_else(|| (env.var)(ENV_IMAGE_STORE).map(PathBuf::from))
        .or_else(|| {
            (env.var)("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sandbox-sdk/images"))
        })
        .or_else(|| (env.var)("HOME").map(|d| PathBuf::from(d).join(".cache/sandbox-sdk/images")))
        .unwrap_or_else(|| state_dir.join("images"));
    let network = super::net::scoped_config(c.network.clone(), &state_dir);
    Ok(Resolved {
        vmm,
        kernel,
        rootfs,
        state_dir,
        create_deadline: c.create_deadline,
        destroy_grace: c.destroy_grace,
        console_cap_bytes: c.console_cap_bytes,
        max_sandboxes: c.max_sandboxes,
        agent_port: c.agent_port,
        jail: c.jail.clone(),
        kvm_device: Some(c.kvm_device.clone()),
        disk_mode: c.disk_mode,
        image_store,
        network,
        policy: c.policy.clone(),
        jail_support: JailSupport::default(),
    })
}

/// The longest socket path a sandbox under `state_dir` gets: `<state>/sbx-<16 hex>/vsock.sock`
/// (every sandbox name has the same length).
pub(crate) fn sandbox_socket_path(state_dir: &Path) -> PathBuf {
    state_dir
        .join("sbx-0000000000000000")
        .join(super::process::names::VSOCK)
}

/// Refuses a Unix socket path that does not fit `sun_path` (108 bytes with the NUL).
///
/// # Errors
/// [`RuntimeError::SocketPathTooLong`].
pub(crate) fn check_socket_path(path: &Path) -> Result<()> {
    if super::dirfd::fits_sun_path(path) {
        Ok(())
    } else {
        Err(RuntimeError::SocketPathTooLong {
            path: path.to_path_buf(),
            len: super::dirfd::path_len(path.as_os_str()),
            max: super::dirfd::SUN_PATH_MAX - 1,
        })
    }
}

/// `sandbox-vmm` in the executable's directory or its parent (`target/debug/examples/x` and
/// `target/debug/deps/x` have the binary one level up).
fn find_vmm_near(exe: Option<&Path>) -> Option<PathBuf> {
    let dir = exe?.parent()?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("sandbox-vmm"))
        .find(|p| p.is_file())
}

/// The state directory when the config names none. On a disk by default (`/var/lib`, the XDG
/// state directory), not in `/run` or `$XDG_RUNTIME_DIR`: those are tmpfs, where a sandbox's
/// overlay would grow its VMM's memory with every guest write.
fn default_state_dir(env: &Env<'_>) -> PathBuf {
    if let Some(dir) = (env.var)(ENV_STATE_DIR) {
        return PathBuf::from(dir);
    }
    if env.is_root {
        return PathBuf::from("/var/lib/sandbox-sdk");
    }
    if let Some(xdg) = (env.var)("XDG_STATE_HOME") {
        return PathBuf::from(xdg).join("sandbox-sdk");
    }
    if let Some(home) = (env.var)("HOME") {
        return PathBuf::from(home).join(".local/state/sandbox-sdk");
    }
    let tmp = (env.var)("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tmp.join(format!("sandbox-sdk-{}", env.uid))
}

const FIX_KERNEL: &str = "set SANDBOX_KERNEL (or KvmRuntimeConfig::kernel) to the vmlinux that \
                          `cargo xtask guest` builds";
const FIX_ROOTFS: &str = "set SANDBOX_ROOTFS (or KvmRuntimeConfig::rootfs) to the raw ext4 \
                          rootfs.ext4 that `cargo xtask guest` builds";

/// Offset of the bzImage setup header's `HdrS` magic (Linux x86 boot protocol).
const BZIMAGE_MAGIC_AT: u64 = 0x202;
/// Offset of the ext2/3/4 superblock's `s_magic` (superblock at 1024, field at +56).
const EXT_MAGIC_AT: u64 = 1080;
/// `s_magic` of ext2/3/4, little-endian on disk.
const EXT_MAGIC: [u8; 2] = 0xEF53_u16.to_le_bytes();

/// Why `f` is not a kernel the VMM boots (a vmlinux ELF file or a bzImage), or `None`.
pub(crate) fn kernel_problem(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut elf = [0u8; 4];
    let mut hdrs = [0u8; 4];
    if f.read_exact_at(&mut elf, 0).is_ok() && elf == *b"\x7fELF" {
        return None;
    }
    match f.read_exact_at(&mut hdrs, BZIMAGE_MAGIC_AT) {
        Ok(()) if hdrs == *b"HdrS" => None,
        Ok(()) => Some("it is neither a vmlinux ELF file nor a bzImage".into()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Some("it is neither a vmlinux ELF file nor a bzImage (too short for either)".into())
        }
        Err(e) => Some(format!("it cannot be read ({e})")),
    }
}

/// Why `f` is not a raw ext2/3/4 image, or `None`.
pub(crate) fn rootfs_problem(f: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    match f.read_exact_at(&mut magic, EXT_MAGIC_AT) {
        Ok(()) if magic == EXT_MAGIC => None,
        Ok(()) => Some("it has no ext2/3/4 superblock (magic 0xEF53 at byte 1080)".into()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Some("it is too short to hold an ext2/3/4 file system".into())
        }
        Err(e) => Some(format!("it cannot be read ({e})")),
    }
}

fn check_format(
    path: &Path,
    what: &'static str,
    problem: fn(&std::fs::File) -> Option<String>,
    fix: &'static str,
) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|source| RuntimeError::ArtifactUnreadable {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    match problem(&f) {
        None => Ok(()),
        Some(problem) => Err(RuntimeError::ArtifactInvalid {
            what,
            path: path.to_path_buf(),
            problem,
            fix,
        }),
    }
}

/// How long `sandbox-vmm --version` may take.
const VERSION_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `<vmm> --version` and checks that it names sandbox-vmm (so a wrong binary fails
/// `KvmRuntime::new` instead of every `create` with a confusing guest exit).
///
/// # Errors
/// [`RuntimeError::VmmNotOurs`] (`HostSetup`).
pub(crate) fn check_vmm_identity(vmm: &Path) -> Result<()> {
    use std::io::Read;
    let not_ours = |problem: String| RuntimeError::VmmNotOurs {
        path: vmm.to_path_buf(),
        problem,
    };
    let mut child = std::process::Command::new(vmm)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| not_ours(format!("it cannot be run ({e})")))?;
    let until = std::time::Instant::now() + VERSION_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(not_ours(format!(
                    "`--version` did not finish within {VERSION_DEADLINE:?}"
                )));
            }
        }
    };
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(256).read_to_end(&mut out);
    }
    let out = String::from_utf8_lossy(&out);
    let line = out.lines().next().unwrap_or("").trim();
    if status.success() && line.starts_with("sandbox-vmm ") {
        Ok(())
    } else {
        Err(not_ours(format!(
            "`--version` printed {line:?} and ended with {status}, not `sandbox-vmm <version>`"
        )))
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(RuntimeError::ArtifactUnreadable {
            what,
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        }),
        Err(source) => Err(RuntimeError::ArtifactUnreadable {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_with<'a>(vars: &'a dyn Fn(&str) -> Option<OsString>, exe: Option<PathBuf>) -> Env<'a> {
        Env {
            var: vars,
            current_exe: exe,
            is_root: false,
            uid: 1000,
        }
    }

    #[test]
    fn builder_checks_ranges() {
        let e = KvmRuntimeConfig::builder()
            .create_deadline(Duration::ZERO)
            .build()
            .expect_err("zero deadline");
        assert!(matches!(
            e,
            RuntimeError::Config {
                field: "create_deadline",
                ..
            }
        ));
        let e = KvmRuntimeConfig::builder()
            .max_sandboxes(0)
            .build()
            .expect_err("zero sandboxes");
        assert!(matches!(
            e,
            RuntimeError::Config {
                field: "max_sandboxes",
                ..
            }
        ));
        let e = KvmRuntimeConfig::builder()
            .console_cap_bytes(0)
            .build()
            .expect_err("zero cap");
        assert!(matches!(
            e,
            RuntimeError::Config {
                field: "console_cap_bytes",
                ..
            }
        ));
        let c = KvmRuntimeConfig::builder()
            .agent_port(4000)
            .build()
            .expect("valid");
        assert_eq!(
            (c.agent_port, c.create_deadline),
            (4000, DEFAULT_CREATE_DEADLINE)
        );
    }

    #[test]
    // Field edits on a default config are the point: that is what callers outside the builder do.
    #[allow(clippy::field_reassign_with_default)]
    fn a_config_edited_past_the_builder_is_validated_by_the_same_rules() {
        let mut c = KvmRuntimeConfig::default();
        assert!(c.validate().is_ok());
        c.max_sandboxes = 0;
        assert!(matches!(
            c.validate(),
            Err(RuntimeError::Config {
                field: "max_sandboxes",
                ..
            })
        ));
        // resolve() (behind KvmRuntime::new) refuses it before looking at anything else.
        let none = |_: &str| None;
        assert!(matches!(
            resolve(&c, &env_with(&none, None)),
            Err(RuntimeError::Config {
                field: "max_sandboxes",
                ..
            })
        ));
        let mut c = KvmRuntimeConfig::default();
        c.agent_port = u32::MAX;
        assert!(matches!(
            resolve(&c, &env_with(&none, None)),
            Err(RuntimeError::Config {
                field: "agent_port",
                ..
            })
        ));
        c.agent_port = 5000;
        c.create_deadline = Duration::ZERO;
        assert!(c.clone().validate().is_err());
        c.create_deadline = Duration::from_secs(1);
        c.console_cap_bytes = 2 << 30;
        assert!(matches!(
            c.validate(),
            Err(RuntimeError::Config {
                field: "console_cap_bytes",
                ..
            })
        ));
    }

    #[test]
    fn socket_paths_over_the_kernel_limit_are_refused_with_the_numbers() {
        let short = Path::new("/run/user/1000/sandbox-sdk");
        assert!(check_socket_path(&sandbox_socket_path(short)).is_ok());
        // `<state>/sbx-<16>/vsock.sock` adds 32 bytes: a 76-byte state dir gives 108.
        let long = PathBuf::from(format!("/{}", "d".repeat(75)));
        let e = check_socket_path(&sandbox_socket_path(&long)).expect_err("too long");
        match &e {
            RuntimeError::SocketPathTooLong { len, max, .. } => {
                assert_eq!((*len, *max), (108, 107))
            }
            other => panic!("{other}"),
        }
        let text = e.to_string();
        assert!(text.contains("108") && text.contains("107"), "{text}");
        assert!(text.contains("state_dir"), "{text}");
        let ok = PathBuf::from(format!("/{}", "d".repeat(74)));
        assert!(check_socket_path(&sandbox_socket_path(&ok)).is_ok());
    }

    #[test]
    fn defaults_come_from_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmm = dir.path().join("sandbox-vmm");
        let kernel = dir.path().join("vmlinux");
        let rootfs = dir.path().join("rootfs.ext4");
        std::fs::write(&vmm, b"x").expect("write");
        std::fs::write(&kernel, b"\x7fELF").expect("write");
        let mut ext = vec![0u8; 2048];
        ext[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        std::fs::write(&rootfs, ext).expect("write");
        let vars: HashMap<&str, OsString> = [
            (ENV_VMM, vmm.clone().into_os_string()),
            (ENV_KERNEL, kernel.clone().into_os_string()),
            (ENV_ROOTFS, rootfs.clone().into_os_string()),
            ("XDG_RUNTIME_DIR", OsString::from("/run/user/1000")),
            ("HOME", OsString::from("/home/u")),
        ]
        .into_iter()
        .collect();
        let get = |k: &str| vars.get(k).cloned();
        let r = resolve(&KvmRuntimeConfig::default(), &env_with(&get, None)).expect("resolves");
        assert_eq!((r.vmm, r.kernel, r.rootfs), (vmm, kernel, rootfs));
        // On a disk: not in $XDG_RUNTIME_DIR (a tmpfs).
        assert_eq!(
            r.state_dir,
            PathBuf::from("/home/u/.local/state/sandbox-sdk")
        );
    }

    #[test]
    fn vmm_is_found_next_to_the_executable_or_one_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let examples = dir.path().join("examples");
        std::fs::create_dir(&examples).expect("mkdir");
        std::fs::write(dir.path().join("sandbox-vmm"), b"x").expect("write");
        assert_eq!(
            find_vmm_near(Some(&examples.join("agent_task"))),
            Some(dir.path().join("sandbox-vmm"))
        );
        assert_eq!(find_vmm_near(Some(Path::new("/nonexistent/dir/x"))), None);
    }

    #[test]
    fn missing_pieces_name_the_fix() {
        let none = |_: &str| None;
        let e = resolve(&KvmRuntimeConfig::default(), &env_with(&none, None)).expect_err("no vmm");
        assert!(matches!(e, RuntimeError::VmmNotFound));
        assert!(e.to_string().contains("cargo build"), "{e}");

        let dir = tempfile::tempdir().expect("tempdir");
        let vmm = dir.path().join("sandbox-vmm");
        std::fs::write(&vmm, b"x").expect("write");
        let c = KvmRuntimeConfig::builder()
            .vmm(&vmm)
            .build()
            .expect("valid");
        let e = resolve(&c, &env_with(&none, None)).expect_err("no kernel");
        assert!(matches!(
            e,
            RuntimeError::ArtifactUnset {
                var: ENV_KERNEL,
                ..
            }
        ));
        assert!(e.to_string().contains("cargo xtask guest"), "{e}");

        let c = KvmRuntimeConfig::builder()
            .vmm(&vmm)
            .kernel(dir.path().join("missing-vmlinux"))
            .build()
            .expect("valid");
        let e = resolve(&c, &env_with(&none, None)).expect_err("missing kernel file");
        assert!(matches!(
            e,
            RuntimeError::ArtifactUnreadable {
                what: "guest kernel",
                ..
            }
        ));
        assert!(e.to_string().contains("cargo xtask guest"), "{e}");
        let public: sandbox_core::Error = e.into();
        assert_eq!(public.kind(), sandbox_core::ErrorKind::HostSetup);
    }

    #[test]
    fn artifacts_of_the_wrong_format_are_host_setup_errors_naming_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmm = dir.path().join("sandbox-vmm");
        std::fs::write(&vmm, b"x").expect("write");
        let text = dir.path().join("notakernel");
        std::fs::write(&text, b"just some text\n").expect("write");
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz_path = dir.path().join("bzImage");
        std::fs::write(&bz_path, bz).expect("write");
        let mut ext = vec![0u8; 4096];
        ext[1080..1082].copy_from_slice(&0xEF53_u16.to_le_bytes());
        let ext_path = dir.path().join("rootfs.ext4");
        std::fs::write(&ext_path, ext).expect("write");
        let none = |_: &str| None;
        let resolve_with = |kernel: &Path, rootfs: &Path| {
            let c = KvmRuntimeConfig::builder()
                .vmm(&vmm)
                .kernel(kernel)
                .rootfs(rootfs)
                .build()
                .expect("valid");
            resolve(&c, &env_with(&none, None))
        };
        let e = resolve_with(&text, &ext_path).expect_err("a text kernel");
        assert!(
            matches!(&e, RuntimeError::ArtifactInvalid { what: "guest kernel", problem, .. }
                if problem.contains("neither a vmlinux ELF file nor a bzImage")),
            "{e:?}"
        );
        assert!(e.to_string().contains("fix: set SANDBOX_KERNEL"), "{e}");
        assert_eq!(e.kind(), sandbox_core::ErrorKind::HostSetup);
        let e = resolve_with(&bz_path, &text).expect_err("a text rootfs");
        assert!(
            matches!(&e, RuntimeError::ArtifactInvalid { what: "guest rootfs", problem, .. }
                if problem.contains("too short")),
            "{e:?}"
        );
        let e = resolve_with(&bz_path, &bz_path).expect_err("a kernel as rootfs");
        assert!(e.to_string().contains("no ext2/3/4 superblock"), "{e}");
        assert!(e.to_string().contains("fix: set SANDBOX_ROOTFS"), "{e}");
        resolve_with(&bz_path, &ext_path).expect("a bzImage and an ext4 image");
    }

    #[test]
    fn state_dir_defaults_by_user() {
        let none = |_: &str| None;
        let mut env = env_with(&none, None);
        assert_eq!(
            default_state_dir(&env),
            PathBuf::from("/tmp/sandbox-sdk-1000")
        );
        env.is_root = true;
        assert_eq!(
            default_state_dir(&env),
            PathBuf::from("/var/lib/sandbox-sdk")
        );
        let vars = |k: &str| match k {
            "XDG_STATE_HOME" => Some(OsString::from("/s")),
            "HOME" => Some(OsString::from("/home/u")),
            _ => None,
        };
        let env = env_with(&vars, None);
        assert_eq!(default_state_dir(&env), PathBuf::from("/s/sandbox-sdk"));
        // The variable wins over every default, for root too.
        let vars = |k: &str| (k == ENV_STATE_DIR).then(|| OsString::from("/disk/sbx"));
        let mut env = env_with(&vars, None);
        env.is_root = true;
        assert_eq!(default_state_dir(&env), PathBuf::from("/disk/sbx"));
    }
}
