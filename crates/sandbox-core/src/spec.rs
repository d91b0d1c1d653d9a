//! `SandboxSpec`: what a sandbox is made of, validated once.
//!
//! Users (or config files) write a plain [`SandboxSpecConfig`]; `SandboxSpec::try_from(config)`
//! checks every field exactly once and produces the immutable [`SandboxSpec`] that runtimes accept.
//! [`SandboxSpec::builder`] is the programmatic path to the same validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most vCPUs a sandbox may have.
pub const MAX_VCPUS: u8 = 32;
/// The least guest memory, in MiB, that boots our kernel and agent.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most guest memory, in MiB (32 GiB).
pub const MAX_MEMORY_MIB: u32 = 32 * 1024;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The longest sandbox lifetime (7 days).
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Maximum length in bytes of all extra kernel command-line parameters joined by spaces.
pub const MAX_EXTRA_CMDLINE_BYTES: usize = 1024;
/// Maximum number of spec-level environment variables.
pub const MAX_ENV_VARS: usize = 256;
/// Maximum length in bytes of one environment variable (name plus value).
pub const MAX_ENV_VAR_BYTES: usize = 32 * 1024;
/// Kernel parameters the backend owns; setting them through `extra_cmdline` is refused.
pub const RESERVED_CMDLINE_KEYS: &[&str] = &[
    "init",
    "rdinit",
    "root",
    "rootfstype",
    "rootflags",
    "virtio_mmio.device",
];

/// The largest root disk, MiB (1 TiB).
pub const MAX_DISK_MIB: u64 = 1 << 20;
/// The longest image reference (a tag or `sha256:<64 hex>`), bytes.
pub const MAX_IMAGE_REF_BYTES: usize = 128;

/// Result of spec validation.
pub type Result<T> = std::result::Result<T, SpecError>;

/// Why a spec was refused. Each variant names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// `vcpus` is 0 or above [`MAX_VCPUS`].
    #[error("vcpus must be between 1 and {max}, got {got}.")]
    Vcpus {
        /// The value given.
        got: u8,
        /// [`MAX_VCPUS`].
        max: u8,
    },
    /// `memory_mib` is outside [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    #[error("memory_mib must be between {min} and {max}, got {got}.")]
    Memory {
        /// The value given.
        got: u32,
        /// [`MIN_MEMORY_MIB`].
        min: u32,
        /// [`MAX_MEMORY_MIB`].
        max: u32,
    },
    /// A path field is empty or contains a NUL byte.
    #[error("{field} must be a non-empty path without NUL bytes.")]
    Path {
        /// `kernel` or `rootfs`.
        field: &'static str,
    },
    /// An extra kernel command-line parameter could inject other parameters.
    #[error("Kernel command-line parameter {param:?} is not allowed: {reason}.")]
    Cmdline {
        /// The offending parameter.
        param: String,
        /// Why, as a phrase.
        reason: &'static str,
    },
    /// The TTL is zero or above [`MAX_TTL`].
    #[error("ttl must be between 1 s and {max_secs} s, got {got_secs} s.")]
    Ttl {
        /// The value given, in seconds.
        got_secs: u64,
        /// [`MAX_TTL`] in seconds.
        max_secs: u64,
    },
    /// An environment variable has a bad name or value, or there are too many.
    #[error("Environment variable {name:?} is not allowed: {reason}.")]
    Env {
        /// The variable name (possibly truncated).
        name: String,
        /// Why, as a phrase.
        reason: &'static str,
    },
    /// `disk_size_mib` or `disk_cap_mib` is 0 or above [`MAX_DISK_MIB`].
    #[error("{field} must be between 1 and {max} MiB, got {got}.")]
    Disk {
        /// `disk_size_mib` or `disk_cap_mib`.
        field: &'static str,
        /// The value given, MiB.
        got: u64,
        /// [`MAX_DISK_MIB`].
        max: u64,
    },
    /// `image` is not a tag or a `sha256:` digest.
    #[error(
        "image must be a tag ([a-z0-9][a-z0-9._-]*, at most 128 bytes) or sha256:<64 hex digits>, \
         got {got:?}."
    )]
    Image {
        /// The value given (possibly truncated).
        got: String,
    },
}

impl SpecError {
    /// The public kind of every spec error: [`crate::ErrorKind::InvalidSpec`].
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::InvalidSpec
    }
}

impl From<SpecError> for crate::Error {
    fn from(e: SpecError) -> Self {
        // The specific reason is the message (the kind already says "invalid spec").
        crate::Error::new(crate::ErrorKind::InvalidSpec, e.to_string())
    }
}

/// A sandbox's network (`SandboxSpec::network`): without one the guest has only `lo`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkSpec {
    /// What may leave the sandbox when no policy is given.
    #[serde(default)]
    pub egress: Egress,
    /// A declarative egress policy (docs/policy.md), enforced on the host: when set it decides
    /// what leaves, names and addresses alike, and `egress` is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyDocument>,
}

/// An egress policy document as written (docs/policy.md); the runtime parses and validates it
/// at create, an invalid one failing with kind `InvalidSpec` and the offending line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PolicyDocument {
    /// The document's syntax.
    pub format: PolicyFormat,
    /// The document.
    pub text: String,
}

impl PolicyDocument {
    /// A TOML policy document.
    pub fn toml(text: impl Into<String>) -> Self {
        PolicyDocument {
            format: PolicyFormat::Toml,
            text: text.into(),
        }
    }
    /// A JSON policy document.
    pub fn json(text: impl Into<String>) -> Self {
        PolicyDocument {
            format: PolicyFormat::Json,
            text: text.into(),
        }
    }
    /// A YAML policy document.
    pub fn yaml(text: impl Into<String>) -> Self {
        PolicyDocument {
            format: PolicyFormat::Yaml,
            text: text.into(),
        }
    }
}

/// The syntax of a [`PolicyDocument`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PolicyFormat {
    /// TOML.
    Toml,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

impl NetworkSpec {
    /// A network whose guest may reach anything outside the host (the host itself and other
    /// sandboxes stay unreachable).
    pub fn allow_egress() -> Self {
        NetworkSpec {
            egress: Egress::Allow,
            policy: None,
        }
    }

    /// A network with no egress: the guest reaches its gateway's DNS port and exposed ports
    /// reach it, nothing else.
    pub fn deny_egress() -> Self {
        NetworkSpec {
            egress: Egress::Deny,
            policy: None,
        }
    }

    /// A network whose egress the policy `document` decides.
    pub fn with_policy(document: PolicyDocument) -> Self {
        NetworkSpec {
            egress: Egress::Deny,
            policy: Some(document),
        }
    }
}

/// What may leave a sandbox's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Egress {
    /// Nothing leaves.
    #[default]
    Deny,
    /// Everything outside the host and the other sandboxes may be reached.
    Allow,
}

/// Whether the guest's root file system may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootMode {
    /// Mounted read-only; the rootfs image can be shared without copying.
    ReadOnly,
    /// Mounted read-write; the backend gives each sandbox its own copy or overlay.
    #[default]
    Writable,
}

/// Plain, unvalidated spec data as users write it (JSON, TOML, code). Convert with
/// `SandboxSpec::try_from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpecConfig {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB, [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Guest kernel (an uncompressed `vmlinux` ELF for the KVM backend).
    pub kernel: PathBuf,
    /// Root file system image (raw ext4 for the KVM backend).
    pub rootfs: PathBuf,
    /// Read-only or writable root.
    #[serde(default)]
    pub root: RootMode,
    /// Extra kernel command-line parameters, one `key=value` or flag per entry.
    #[serde(default)]
    pub extra_cmdline: Vec<String>,
    /// Lifetime in seconds after which the host destroys the sandbox; `None` means no limit.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Environment added to every command (the command's own env wins).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The base image of the root disk from the runtime's image store: a tag or
    /// `sha256:<hex>` (docs/images.md). `None`: the `rootfs` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The root disk's size in MiB as the guest sees it (at least the base image's size).
    /// `None`: the base image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size_mib: Option<u64>,
    /// The most host disk space, MiB, the sandbox's writes may take (its copy-on-write layer).
    /// Past it the guest's writes fail with an I/O error. `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_cap_mib: Option<u64>,
    /// The sandbox's network. `None` (the default): no network device at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
}

fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl SandboxSpecConfig {
    /// A config with defaults for everything but the two required paths.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> Self {
        SandboxSpecConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            root: RootMode::default(),
            extra_cmdline: Vec::new(),
            ttl_secs: None,
            env: BTreeMap::new(),
            image: None,
            disk_size_mib: None,
            disk_cap_mib: None,
            network: None,
        }
    }
}

/// A validated sandbox spec. Build it with [`SandboxSpec::builder`] or `TryFrom<SandboxSpecConfig>`;
/// it serializes as its [`SandboxSpecConfig`] and is re-validated on deserialization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SandboxSpecConfig", into = "SandboxSpecConfig")]
#[non_exhaustive]
pub struct SandboxSpec {
    vcpus: u8,
    memory_mib: u32,
    kernel: PathBuf,
    rootfs: PathBuf,
    root: RootMode,
    extra_cmdline: Vec<String>,
    ttl: Option<Duration>,
    env: BTreeMap<String, String>,
    image: Option<String>,
    disk_size_mib: Option<u64>,
    disk_cap_mib: Option<u64>,
    network: Option<NetworkSpec>,
}

impl SandboxSpec {
    /// A builder with defaults (1 vCPU, 256 MiB, writable root, no TTL) for the two required paths.
    pub fn builder(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> SandboxSpecBuilder {
        SandboxSpecBuilder {
            config: SandboxSpecConfig::new(kernel, rootfs),
        }
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpus
    }
    /// Guest memory in MiB.
    pub fn memory_mib(&self) -> u32 {
        self.memory_mib
    }
    /// Guest kernel path.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }
    /// Root file system image path.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }
    /// Read-only or writable root.
    pub fn root(&self) -> RootMode {
        self.root
    }
    /// Extra kernel command-line parameters, each already checked.
    pub fn extra_cmdline(&self) -> &[String] {
        &self.extra_cmdline
    }
    /// Lifetime after which the host destroys the sandbox.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }
    /// Environment added to every command.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }
    /// The root disk's base image from the image store (a tag or `sha256:<hex>`), if any.
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }
    /// The root disk's size, MiB, if set.
    pub fn disk_size_mib(&self) -> Option<u64> {
        self.disk_size_mib
    }
    /// The cap on host disk space for the sandbox's writes, MiB, if set.
    pub fn disk_cap_mib(&self) -> Option<u64> {
        self.disk_cap_mib
    }
    /// The sandbox's network, if it has one.
    pub fn network(&self) -> Option<&NetworkSpec> {
        self.network.as_ref()
    }
}

impl TryFrom<SandboxSpecConfig> for SandboxSpec {
    type Error = SpecError;

    fn try_from(c: SandboxSpecConfig) -> Result<Self> {
        if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus {
                got: c.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&c.memory_mib) {
            return Err(SpecError::Memory {
                got: c.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        check_path("kernel", &c.kernel)?;
        check_path("rootfs", &c.rootfs)?;
        let mut total = 0usize;
        for param in &c.extra_cmdline {
            check_cmdline_param(param)?;
            total = total.saturating_add(param.len()).saturating_add(1);
        }
        if total > MAX_EXTRA_CMDLINE_BYTES {
            return Err(SpecError::Cmdline {
                param: String::new(),
                reason: "the extra command line is longer than 1024 bytes",
            });
        }
        let ttl = match c.ttl_secs {
            None => None,
            Some(s) if s == 0 || s > MAX_TTL.as_secs() => {
                return Err(SpecError::Ttl {
                    got_secs: s,
                    max_secs: MAX_TTL.as_secs(),
                })
            }
            Some(s) => Some(Duration::from_secs(s)),
        };
        check_env(&c.env)?;
        for (field, value) in [
            ("disk_size_mib", c.disk_size_mib),
            ("disk_cap_mib", c.disk_cap_mib),
        ] {
            if let Some(got) = value.filter(|&v| v == 0 || v > MAX_DISK_MIB) {
                return Err(SpecError::Disk {
                    field,
                    got,
                    max: MAX_DISK_MIB,
                });
            }
        }
        if let Some(image) = &c.image {
            if !is_image_ref(image) {
                return Err(SpecError::Image {
                    got: image.chars().take(64).collect(),
                });
            }
        }
        Ok(SandboxSpec {
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            kernel: c.kernel,
            rootfs: c.rootfs,
            root: c.root,
            extra_cmdline: c.extra_cmdline,
            ttl,
            env: c.env,
            image: c.image,
            disk_size_mib: c.disk_size_mib,
            disk_cap_mib: c.disk_cap_mib,
            network: c.network,
        })
    }
}

/// A tag (`[a-z0-9][a-z0-9._-]*`) or `sha256:` and 64 lowercase hex digits, at most
/// [`MAX_IMAGE_REF_BYTES`].
fn is_image_ref(s: &str) -> bool {
    if s.len() > MAX_IMAGE_REF_BYTES {
        return false;
    }
    if let Some(hex) = s.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    }
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

impl From<SandboxSpec> for SandboxSpecConfig {
    fn from(s: SandboxSpec) -> Self {
        SandboxSpecConfig {
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            kernel: s.kernel,
            rootfs: s.rootfs,
            root: s.root,
            extra_cmdline: s.extra_cmdline,
            ttl_secs: s.ttl.map(|d| d.as_secs()),
            env: s.env,
            image: s.image,
            disk_size_mib: s.disk_size_mib,
            disk_cap_mib: s.disk_cap_mib,
            network: s.network,
        }
    }
}

fn check_path(field: &'static str, p: &Path) -> Result<()> {
    let bytes = p.as_os_str().as_encoded_bytes();
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(SpecError::Path { field });
    }
    Ok(())
}

/// One kernel parameter: printable ASCII without spaces, quotes or backslashes (they would let
/// one entry become several parameters, or quote text into `init`'s argv), not `--` (which hands
/// the rest of the line to init), and not a key the backend owns.
fn check_cmdline_param(param: &str) -> Result<()> {
    let bad = |reason| SpecError::Cmdline {
        param: param.chars().take(64).collect(),
        reason,
    };
    if param.is_empty() {
        return Err(bad("it is empty"));
    }
    if let Some(c) = param
        .bytes()
        .find(|b| !b.is_ascii_graphic() || matches!(b, b'"' | b'\'' | b'\\'))
    {
        return Err(if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' {
            bad("it contains whitespace")
        } else if c.is_ascii_control() || !c.is_ascii() {
            bad("it contains a control or non-ASCII character")
        } else {
            bad("it contains a quote or a backslash")
        });
    }
    if param == "--" {
        return Err(bad("`--` passes the rest of the line to init"));
    }
    let key = param.split('=').next().unwrap_or(param);
    if RESERVED_CMDLINE_KEYS.contains(&key) {
        return Err(bad("the backend sets this parameter"));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > MAX_ENV_VARS {
        return Err(SpecError::Env {
            name: String::new(),
            reason: "more than 256 variables",
        });
    }
    for (k, v) in env {
        let bad = |reason| SpecError::Env {
            name: k.chars().take(64).collect(),
            reason,
        };
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(bad("the name is empty or contains '=' or NUL"));
        }
        if v.contains('\0') {
            return Err(bad("the value contains NUL"));
        }
        if k.len().saturating_add(v.len()) > MAX_ENV_VAR_BYTES {
            return Err(bad("it is longer than 32 KiB"));
        }
    }
    Ok(())
}

/// Builds a [`SandboxSpec`]; `build()` runs the same validation as `TryFrom<SandboxSpecConfig>`.
#[derive(Debug, Clone)]
pub struct SandboxSpecBuilder {
    config: SandboxSpecConfig,
}

impl SandboxSpecBuilder {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub fn vcpus(mut self, n: u8) -> Self {
        self.config.vcpus = n;
        self
    }
    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.config.memory_mib = mib;
        self
    }
    /// Read-only or writable root.
    pub fn root(mut self, mode: RootMode) -> Self {
        self.config.root = mode;
        self
    }
    /// Appends one kernel parameter (`key=value` or a flag).
    pub fn cmdline_param(mut self, param: impl Into<String>) -> Self {
        self.config.extra_cmdline.push(param.into());
        self
    }
    /// Lifetime after which the host destroys the sandbox (whole seconds; sub-second parts are
    /// dropped).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl_secs = Some(ttl.as_secs());
        self
    }
    /// Adds an environment variable for every command.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.insert(name.into(), value.into());
        self
    }
    /// The root disk's base image from the runtime's image store: a tag or `sha256:<hex>`.
    pub fn image(mut self, reference: impl Into<String>) -> Self {
        self.config.image = Some(reference.into());
        self
    }
    /// The root disk's size in MiB as the guest sees it.
    pub fn disk_size_mib(mut self, mib: u64) -> Self {
        self.config.disk_size_mib = Some(mib);
        self
    }
    /// The most host disk space, MiB, the sandbox's writes may take.
    pub fn disk_cap_mib(mut self, mib: u64) -> Self {
        self.config.disk_cap_mib = Some(mib);
        self
    }
    /// Gives the sandbox a network.
    pub fn network(mut self, network: NetworkSpec) -> Self {
        self.config.network = Some(network);
        self
    }
    /// Validates and builds.
    ///
    /// # Errors
    /// A [`SpecError`] naming the first invalid field.
    pub fn build(self) -> Result<SandboxSpec> {
        SandboxSpec::try_from(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_fields_and_image_references_are_checked() {
        let b = || SandboxSpec::builder("/k", "/r");
        let spec = b()
            .disk_size_mib(2048)
            .disk_cap_mib(512)
            .image("base-1.0")
            .build()
            .expect("ok");
        assert_eq!(
            (spec.disk_size_mib(), spec.disk_cap_mib(), spec.image()),
            (Some(2048), Some(512), Some("base-1.0"))
        );
        let digest = format!("sha256:{}", "ab".repeat(32));
        b().image(&digest).build().expect("a digest");
        for bad in [
            "",
            "Upper",
            "-lead",
            "a b",
            "sha256:abc",
            &format!("sha256:{}", "AB".repeat(32)),
            &"a".repeat(129),
        ] {
            assert!(
                matches!(b().image(bad).build(), Err(SpecError::Image { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            b().disk_size_mib(0).build(),
            Err(SpecError::Disk {
                field: "disk_size_mib",
                ..
            })
        ));
        assert!(matches!(
            b().disk_cap_mib(MAX_DISK_MIB + 1).build(),
            Err(SpecError::Disk {
                field: "disk_cap_mib",
                ..
            })
        ));
        // The new fields round-trip through serde and stay out of the JSON when unset.
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(json["disk_cap_mib"], 512);
        let back: SandboxSpec = serde_json::from_value(json).expect("back");
        assert_eq!(back, spec);
        let plain = serde_json::to_value(b().build().expect("ok")).expect("json");
        assert!(plain.get("image").is_none(), "{plain}");
    }

    fn base() -> SandboxSpecConfig {
        SandboxSpecConfig::new("/k/vmlinux", "/k/rootfs.ext4")
    }

    #[test]
    fn defaults_are_valid() {
        let s = SandboxSpec::try_from(base()).expect("defaults are valid");
        assert_eq!(
            (s.vcpus(), s.memory_mib(), s.root()),
            (1, 256, RootMode::Writable)
        );
    }

    #[test]
    fn vcpu_bounds() {
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false)] {
            let r = SandboxSpec::builder("/k", "/r").vcpus(n).build();
            assert_eq!(r.is_ok(), ok, "vcpus={n}: {r:?}");
        }
        assert!(matches!(
            SandboxSpec::builder("/k", "/r").vcpus(0).build(),
            Err(SpecError::Vcpus { got: 0, max: 32 })
        ));
    }

    #[test]
    fn memory_bounds() {
        for (m, ok) in [
            (63, false),
            (64, true),
            (MAX_MEMORY_MIB, true),
            (MAX_MEMORY_MIB + 1, false),
        ] {
            let r = SandboxSpec::builder("/k", "/r").memory_mib(m).build();
            assert_eq!(r.is_ok(), ok, "memory={m}: {r:?}");
        }
    }

    #[test]
    fn empty_paths_refused() {
        assert_eq!(
            SandboxSpec::builder("", "/r").build(),
            Err(SpecError::Path { field: "kernel" })
        );
        assert_eq!(
            SandboxSpec::builder("/k", "").build(),
            Err(SpecError::Path { field: "rootfs" })
        );
    }

    #[test]
    fn cmdline_injection_refused() {
        for bad in [
            "quiet\ninit=/bin/sh",
            "a b",
            "x=\"y z\"",
            "x='y'",
            "x=\\",
            "--",
            "init=/bin/sh",
            "root=/dev/vdb",
            "virtio_mmio.device=4K@0x1000:5",
            "",
            "caf\u{e9}",
            "x\u{7f}",
        ] {
            let r = SandboxSpec::builder("/k", "/r").cmdline_param(bad).build();
            assert!(
                matches!(r, Err(SpecError::Cmdline { .. })),
                "{bad:?} was accepted: {r:?}"
            );
        }
        for good in [
            "quiet",
            "loglevel=3",
            "sandbox_hostname=box-1",
            "8250.nr_uarts=1",
        ] {
            let r = SandboxSpec::builder("/k", "/r").cmdline_param(good).build();
            assert!(r.is_ok(), "{good:?} was refused: {r:?}");
        }
    }

    #[test]
    fn cmdline_total_length_capped() {
        let mut b = SandboxSpec::builder("/k", "/r");
        for i in 0..200 {
            b = b.cmdline_param(format!("p{i}=xxxxxx"));
        }
        assert!(matches!(b.build(), Err(SpecError::Cmdline { .. })));
    }

    #[test]
    fn ttl_bounds() {
        let mut c = base();
        c.ttl_secs = Some(0);
        assert!(matches!(
            SandboxSpec::try_from(c.clone()),
            Err(SpecError::Ttl { .. })
        ));
        c.ttl_secs = Some(MAX_TTL.as_secs() + 1);
        assert!(matches!(
            SandboxSpec::try_from(c.clone()),
            Err(SpecError::Ttl { .. })
        ));
        c.ttl_secs = Some(60);
        assert_eq!(
            SandboxSpec::try_from(c).map(|s| s.ttl()),
            Ok(Some(Duration::from_secs(60)))
        );
    }

    #[test]
    fn env_checked() {
        for (k, v) in [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")] {
            let r = SandboxSpec::builder("/k", "/r").env(k, v).build();
            assert!(
                matches!(r, Err(SpecError::Env { .. })),
                "{k:?}={v:?}: {r:?}"
            );
        }
    }

    #[test]
    fn serde_round_trip_revalidates() {
        let s = SandboxSpec::builder("/k", "/r")
            .vcpus(2)
            .env("A", "1")
            .build()
            .expect("valid");
        let json = serde_json::to_string(&s).expect("serializes");
        let back: SandboxSpec = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, s);
        let bad = json.replace("\"vcpus\":2", "\"vcpus\":0");
        assert!(serde_json::from_str::<SandboxSpec>(&bad).is_err());
    }

    #[test]
    fn spec_error_maps_to_invalid_spec_kind() {
        let e: crate::Error = SpecError::Path { field: "kernel" }.into();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidSpec);
    }
}
