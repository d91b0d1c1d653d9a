//! The VM configuration: plain serde data ([`VmConfig`]) validated once into [`VmResources`].
//!
//! JSON shape (unknown fields are rejected):
//!
//! ```json
//! {
//!   "kernel": "/path/to/vmlinux",
//!   "initrd": null,
//!   "cmdline_extra": "root=/dev/vda rw init=/sbin/sandbox-test-init",
//!   "vcpus": 2,
//!   "memory_mib": 256,
//!   "disks": [{ "path": "/tmp/rootfs.ext4", "read_only": false }],
//!   "console": { "path": "/tmp/console.log", "cap_bytes": 1048576 },
//!   "vsock": { "guest_cid": 3, "uds_path": "/tmp/vm.vsock" }
//! }
//! ```
//!
//! Only `kernel` is required. `console.path` absent means standard output (still capped).
//!
//! Every file entry (`kvm`, `kernel`, `initrd`, `disks[].path`, `disks[].backing`,
//! `disks[].full_report`, `console.path`, `vsock.uds_path`) is either a path, which the VMM opens
//! itself, or `{"fd": N}`, an fd the VMM process inherited already open ([`FileSource`]): the
//! jailed VMM gets every file that way and opens nothing by path (docs/jail.md). An fd entry is
//! checked to be open and of the right kind ([`FdProblem`]); no two entries may name one fd.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[cfg(feature = "vmm")]
use crate::devices::console::ConsoleRing;
use crate::layout;

/// Most vCPUs a VM may have (xAPIC ids fit in 8 bits; the MADT lists them all).
pub const MAX_VCPUS: u8 = 32;
/// Least guest RAM, MiB (the kernel loads at 16 MiB and needs room to run).
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most guest RAM, MiB (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Longest `cmdline_extra`, bytes (the whole command line must stay below 2 KiB).
pub const MAX_CMDLINE_EXTRA: usize = 1024;
/// Default console cap, bytes (1 MiB).
pub const DEFAULT_CONSOLE_CAP: u64 = 1 << 20;
/// Largest console cap, bytes (1 GiB).
pub const MAX_CONSOLE_CAP: u64 = 1 << 30;
/// The command line every VM starts with: console on COM1, reset via the keyboard controller,
/// reboot immediately on panic (which ends the VM as "reset"), and no PCI probing (there is no PCI
/// bus; the guest kernel has `CONFIG_PCI=y` only because its ACPI code needs it, and every probe
/// of the 0xcf8/0xcfc config ports would be a vCPU exit).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// The exit status of a VMM that made a system call its seccomp filter forbids
/// ([`SeccompMode::Kill`]).
pub const EXIT_SECCOMP: i32 = 7;

/// What a system call outside the VMM's seccomp allowlists does (docs/jail.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// The VMM ends with [`EXIT_SECCOMP`], naming the call and the thread in its log.
    #[default]
    Kill,
    /// The call goes through and the kernel logs it (audit): for finding what a list lacks.
    Log,
    /// No filter.
    Off,
}

/// A file the VMM uses: a path it opens itself, or an fd it inherited, already open.
///
/// JSON: a string (`"/path/to/file"`) or an object (`{"fd": 5}`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum FileSource {
    /// A path the VMM opens (relative paths from its working directory).
    Path(PathBuf),
    /// An fd the VMM process inherited, 3 or more. Building a VM takes ownership of it (and
    /// closes it with the VM), so a [`VmResources`] naming fds is built once.
    Fd(InheritedFd),
}

/// An inherited fd's number, as [`FileSource::Fd`] names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InheritedFd {
    /// The fd number in the VMM process.
    pub fd: i32,
}

impl<'de> Deserialize<'de> for FileSource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileSource;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a path string or an inherited fd as {"fd": N}"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<FileSource, E> {
                Ok(FileSource::Path(PathBuf::from(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<FileSource, A::Error> {
                InheritedFd::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(FileSource::Fd)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl FileSource {
    /// The inherited fd `fd`.
    pub fn fd(fd: i32) -> Self {
        FileSource::Fd(InheritedFd { fd })
    }

    /// The path, for a path entry.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            FileSource::Path(p) => Some(p),
            FileSource::Fd(_) => None,
        }
    }

    /// The fd number, for an fd entry.
    pub fn as_fd(&self) -> Option<i32> {
        match self {
            FileSource::Path(_) => None,
            FileSource::Fd(f) => Some(f.fd),
        }
    }

    /// What errors and logs call it: the path, or `fd N`.
    pub fn label(&self) -> PathBuf {
        match self {
            FileSource::Path(p) => p.clone(),
            FileSource::Fd(f) => PathBuf::from(format!("fd {}", f.fd)),
        }
    }
}

impl std::fmt::Display for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileSource::Path(p) => write!(f, "{}", p.display()),
            FileSource::Fd(i) => write!(f, "fd {}", i.fd),
        }
    }
}

impl From<PathBuf> for FileSource {
    fn from(p: PathBuf) -> Self {
        FileSource::Path(p)
    }
}

impl From<&PathBuf> for FileSource {
    fn from(p: &PathBuf) -> Self {
        FileSource::Path(p.clone())
    }
}

impl From<&Path> for FileSource {
    fn from(p: &Path) -> Self {
        FileSource::Path(p.to_path_buf())
    }
}

impl From<&str> for FileSource {
    fn from(p: &str) -> Self {
        FileSource::Path(PathBuf::from(p))
    }
}

impl From<String> for FileSource {
    fn from(p: String) -> Self {
        FileSource::Path(PathBuf::from(p))
    }
}

/// What an fd entry must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FdKind {
    /// `/dev/kvm`: a character device answering `KVM_GET_API_VERSION` with 12.
    Kvm,
    /// A regular file open for reading (kernel, initrd).
    ReadFile,
    /// A regular file or block device, open for reading, and for writing when `writable`.
    Disk { writable: bool },
    /// A regular file open for writing (console log, disk-full report).
    WriteFile,
    /// A listening Unix stream socket (the vsock device's host side).
    UnixListener,
}

/// Why an fd entry of a config was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FdProblem {
    /// 0-2 are stdio.
    #[error("is stdio (inherited fds are 3 or more)")]
    Stdio,
    /// No such fd is open in this process.
    #[error("is not open")]
    NotOpen,
    /// Not `/dev/kvm`.
    #[error("is not /dev/kvm (KVM_GET_API_VERSION did not answer 12)")]
    NotKvm,
    /// Not a regular file.
    #[error("is not a regular file")]
    NotRegularFile,
    /// Neither a regular file nor a block device.
    #[error("is neither a regular file nor a block device")]
    NotDisk,
    /// Not open for reading.
    #[error("is not open for reading")]
    NotReadable,
    /// Not open for writing, though the entry is written.
    #[error("is not open for writing")]
    NotWritable,
    /// Not a listening Unix stream socket.
    #[error("is not a listening Unix stream socket")]
    NotUnixListener,
    /// Another entry names the same fd (each fd is one file, claimed once).
    #[error("is named by another entry too")]
    Duplicate,
}

/// Checks that fd `fd` is open and of `kind`.
fn check_fd(field: &'static str, fd: i32, kind: FdKind) -> Result<()> {
    let fail = |problem| ConfigError::Fd { field, fd, problem };
    if fd < 3 {
        return Err(fail(FdProblem::Stdio));
    }
    let info = crate::sys::fd_info(fd).map_err(|_| fail(FdProblem::NotOpen))?;
    let regular = info.file_type == libc::S_IFREG;
    match kind {
        FdKind::Kvm => {
            if info.file_type != libc::S_IFCHR
                || crate::sys::kvm_api_version(fd).ok() != Some(crate::kvm::KVM_API_VERSION)
            {
                return Err(fail(FdProblem::NotKvm));
            }
        }
        FdKind::ReadFile | FdKind::WriteFile if !regular => {
            return Err(fail(FdProblem::NotRegularFile))
        }
        FdKind::ReadFile if !info.readable => return Err(fail(FdProblem::NotReadable)),
        FdKind::WriteFile if !info.writable => return Err(fail(FdProblem::NotWritable)),
        FdKind::ReadFile | FdKind::WriteFile => {}
        FdKind::Disk { writable } => {
            if !regular && info.file_type != libc::S_IFBLK {
                return Err(fail(FdProblem::NotDisk));
            }
            if !info.readable {
                return Err(fail(FdProblem::NotReadable));
            }
            if writable && !info.writable {
                return Err(fail(FdProblem::NotWritable));
            }
        }
        FdKind::UnixListener => {
            if !crate::sys::is_unix_listener(fd).unwrap_or(false) {
                return Err(fail(FdProblem::NotUnixListener));
            }
        }
    }
    Ok(())
}

/// The format of a disk image. Always given, never probed from the file's contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image: disk byte N is file byte N.
    #[default]
    Raw,
    /// A qcow2 (v3) overlay over a raw backing file (qcow2 spec, QEMU `docs/interop/qcow2.txt`).
    Qcow2,
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DiskConfig {
    /// The image file (a regular file or block device; an fd entry opened read-write unless
    /// `read_only`).
    pub path: FileSource,
    /// Expose the disk read-only (writes fail in the guest with an I/O error).
    #[serde(default)]
    pub read_only: bool,
    /// The image's format.
    #[serde(default)]
    pub format: DiskFormat,
    /// For [`DiskFormat::Qcow2`]: the raw backing file, which the VMM opens itself, read-only
    /// (or inherits). The backing file name in the overlay's header must be this file's name (for
    /// a path; an inherited fd has no name to compare, so any valid name goes); its path is never
    /// taken from the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<FileSource>,
    /// For [`DiskFormat::Qcow2`]: the most bytes the overlay file may grow to. A guest write
    /// past it fails with VIRTIO_BLK_S_IOERR (the guest sees an I/O error) and the VM goes on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_bytes_cap: Option<u64>,
    /// A file (created or truncated at start) where the VMM keeps the count of guest writes the
    /// disk refused for lack of space (the cap, or a full host file system): 8 bytes, a
    /// little-endian `u64`, rewritten in place after each queue pass that added some.
    /// An fd entry is written from offset 0 and never truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_report: Option<FileSource>,
}

impl DiskConfig {
    /// A raw disk backed by `path`.
    pub fn new(path: impl Into<FileSource>, read_only: bool) -> Self {
        Self {
            path: path.into(),
            read_only,
            format: DiskFormat::Raw,
            backing: None,
            host_bytes_cap: None,
            full_report: None,
        }
    }

    /// Keeps the count of writes refused for space in `path` (see [`DiskConfig::full_report`]).
    #[must_use]
    pub fn with_full_report(mut self, path: impl Into<FileSource>) -> Self {
        self.full_report = Some(path.into());
        self
    }

    /// A writable qcow2 overlay at `path` over the raw image `backing`, its file capped at
    /// `host_bytes_cap` bytes if given.
    pub fn qcow2_overlay(
        path: impl Into<FileSource>,
        backing: impl Into<FileSource>,
        host_bytes_cap: Option<u64>,
    ) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            format: DiskFormat::Qcow2,
            backing: Some(backing.into()),
            host_bytes_cap,
            full_report: None,
        }
    }
}

/// Where guest console output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsoleConfig {
    /// Log file (created or truncated; an inherited fd is written as it is); standard output
    /// if absent.
    #[serde(default)]
    pub path: Option<FileSource>,
    /// Most bytes written; the rest is dropped.
    #[serde(default = "default_console_cap")]
    pub cap_bytes: u64,
}

fn default_console_cap() -> u64 {
    DEFAULT_CONSOLE_CAP
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            path: None,
            cap_bytes: DEFAULT_CONSOLE_CAP,
        }
    }
}

/// virtio-vsock: the guest's context ID and the host-side Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VsockDeviceConfig {
    /// The guest's CID, 3..=2^32 - 2 (0-2 are reserved, 2^32 - 1 is "any").
    pub guest_cid: u64,
    /// Where the VMM listens: a path that must not exist yet (the VMM creates it and removes it
    /// at exit), or an inherited listening Unix stream socket (whoever made it removes its file).
    pub uds_path: FileSource,
}

impl VsockDeviceConfig {
    /// A vsock device with CID `guest_cid` and host socket `uds_path`.
    pub fn new(guest_cid: u64, uds_path: impl Into<FileSource>) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.into(),
        }
    }
}

/// virtio-net: a tap the VMM process inherits, and the guest's MAC address.
///
/// The VMM never opens or configures a tap itself (it runs in an empty network namespace): the
/// caller opens it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, sets a 12-byte header with
/// `TUNSETVNETHDRSZ`, and passes the fd to the VMM process under the number given here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetDeviceConfig {
    /// The inherited tap fd's number, 3 or more.
    pub tap_fd: i32,
    /// The guest's MAC address, six hex bytes separated by colons (`02:53:42:00:00:02`); a
    /// unicast address.
    pub mac: String,
}

impl NetDeviceConfig {
    /// A network device on inherited fd `tap_fd` with MAC `mac`.
    pub fn new(tap_fd: i32, mac: impl Into<String>) -> Self {
        Self {
            tap_fd,
            mac: mac.into(),
        }
    }
}

/// A validated [`NetDeviceConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetResources {
    /// The inherited tap fd's number.
    pub tap_fd: i32,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Parses `aa:bb:cc:dd:ee:ff` into a unicast MAC address.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    // The low bit of the first byte marks a multicast (group) address.
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u32 {
    256
}

/// One VM, as a user writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmConfig {
    /// `/dev/kvm`: absent means the VMM opens `/dev/kvm` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<FileSource>,
    /// Guest kernel: a `vmlinux` ELF or a bzImage.
    pub kernel: FileSource,
    /// Optional initrd.
    #[serde(default)]
    pub initrd: Option<FileSource>,
    /// Appended to [`BASE_CMDLINE`] and the device entries.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    #[serde(default = "default_vcpus", deserialize_with = "de_vcpus")]
    pub vcpus: u8,
    /// Guest RAM, MiB, [`MIN_MEMORY_MIB`]..=[`MAX_MEMORY_MIB`].
    #[serde(default = "default_memory_mib", deserialize_with = "de_memory_mib")]
    pub memory_mib: u32,
    /// virtio-blk disks, in order (/dev/vda, /dev/vdb...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Console destination.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Optional virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockDeviceConfig>,
    /// Optional virtio-net device (none: the guest has only `lo`).
    #[serde(default)]
    pub net: Option<NetDeviceConfig>,
    /// The seccomp filters of the VMM's threads.
    #[serde(default)]
    pub seccomp: SeccompMode,
    /// Test hook: after start, the device thread makes a system call its filter forbids, so a
    /// test can check how a violation is reported. Never set it otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[doc(hidden)]
    pub debug_forbidden_syscall: bool,
}

impl VmConfig {
    /// A config with defaults (1 vCPU, 256 MiB, no disks, console on stdout) for `kernel`.
    pub fn new(kernel: impl Into<FileSource>) -> Self {
        Self {
            kvm: None,
            kernel: kernel.into(),
            initrd: None,
            cmdline_extra: String::new(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            disks: Vec::new(),
            console: ConsoleConfig::default(),
            vsock: None,
            net: None,
            seccomp: SeccompMode::Kill,
            debug_forbidden_syscall: false,
        }
    }

    /// Sets the seccomp mode.
    pub fn seccomp(mut self, mode: SeccompMode) -> Self {
        self.seccomp = mode;
        self
    }

    /// Sets the test hook [`VmConfig::debug_forbidden_syscall`].
    #[doc(hidden)]
    pub fn debug_forbidden_syscall(mut self, on: bool) -> Self {
        self.debug_forbidden_syscall = on;
        self
    }

    /// Adds a virtio-net device.
    pub fn net(mut self, net: NetDeviceConfig) -> Self {
        self.net = Some(net);
        self
    }

    /// Adds a virtio-vsock device.
    pub fn vsock(mut self, vsock: VsockDeviceConfig) -> Self {
        self.vsock = Some(vsock);
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, vcpus: u8) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets guest RAM, MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the extra kernel arguments.
    pub fn cmdline_extra(mut self, extra: impl Into<String>) -> Self {
        self.cmdline_extra = extra.into();
        self
    }

    /// Adds a disk.
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// Uses `kvm` for `/dev/kvm` (an inherited fd, typically).
    pub fn kvm(mut self, kvm: impl Into<FileSource>) -> Self {
        self.kvm = Some(kvm.into());
        self
    }

    /// Sets the initrd.
    pub fn initrd(mut self, path: impl Into<FileSource>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Sends console output to a capped file.
    pub fn console_file(mut self, path: impl Into<FileSource>, cap_bytes: u64) -> Self {
        self.console = ConsoleConfig {
            path: Some(path.into()),
            cap_bytes,
        };
        self
    }

    /// Parses JSON.
    ///
    /// # Errors
    /// [`ConfigError::Json`].
    pub fn from_json(text: &str) -> Result<Self> {
        // serde would also take a struct from a JSON array, by field position.
        if !text.trim_start().starts_with('{') {
            return Err(invalid(
                "config",
                "must be a JSON object (`{\"kernel\": ...}`)",
            ));
        }
        serde_json::from_str(text).map_err(ConfigError::Json)
    }
}

/// An integer field of `T`, whatever its JSON size: a number too large for `T` gets the same
/// range message as [`VmResources::try_from`]'s check, not serde's "expected u8".
fn de_bounded<'de, D, T>(d: D, field: &str, min: u64, max: u64) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Visitor<'a> {
        field: &'a str,
        min: u64,
        max: u64,
    }
    impl serde::de::Visitor<'_> for Visitor<'_> {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{} as an integer {}..={}",
                self.field, self.min, self.max
            )
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<u64, E> {
            u64::try_from(v).map_err(|_| {
                E::custom(format!(
                    "{} must be {}..={}, got {v}",
                    self.field, self.min, self.max
                ))
            })
        }
    }
    let v = d.deserialize_u64(Visitor { field, min, max })?;
    T::try_from(v)
        .map_err(|_| serde::de::Error::custom(format!("{field} must be {min}..={max}, got {v}")))
}

fn de_vcpus<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u8, D::Error> {
    de_bounded(d, "vcpus", 1, u64::from(MAX_VCPUS))
}

fn de_memory_mib<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    de_bounded(
        d,
        "memory_mib",
        u64::from(MIN_MEMORY_MIB),
        u64::from(MAX_MEMORY_MIB),
    )
}

/// Errors from reading or validating a [`VmConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON for a [`VmConfig`].
    #[error("invalid VM config JSON")]
    Json(#[source] serde_json::Error),
    /// A field is out of range.
    #[error("invalid VM config: {field} {problem}")]
    Invalid {
        /// The field name.
        field: &'static str,
        /// What is wrong, as a sentence fragment.
        problem: String,
    },
    /// An fd entry is not usable.
    #[error("invalid VM config: {field} names fd {fd}, which {problem}")]
    Fd {
        /// The field name.
        field: &'static str,
        /// The fd number.
        fd: i32,
        /// What is wrong with it.
        problem: FdProblem,
    },
    /// A file the config names is missing or not a regular file.
    #[error("invalid VM config: {field} {path:?} is not a readable file")]
    MissingFile {
        /// The field name.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A local `Result` for this module.
pub type Result<T> = std::result::Result<T, ConfigError>;

/// A validated VM description: every range checked, every file present.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VmResources {
    /// `/dev/kvm` (absent: the VMM opens it).
    pub kvm: Option<FileSource>,
    /// Kernel image.
    pub kernel: FileSource,
    /// Initrd.
    pub initrd: Option<FileSource>,
    /// Extra kernel arguments (printable ASCII, at most [`MAX_CMDLINE_EXTRA`] bytes).
    pub cmdline_extra: String,
    /// vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// Console destination.
    pub console: ConsoleConfig,
    /// An extra in-memory console copy (library users: wait for lines on it).
    #[cfg(feature = "vmm")]
    pub console_ring: Option<ConsoleRing>,
    /// virtio-vsock.
    pub vsock: Option<VsockDeviceConfig>,
    /// virtio-net.
    pub net: Option<NetResources>,
    /// The seccomp filters of the VMM's threads.
    pub seccomp: SeccompMode,
    /// See [`VmConfig::debug_forbidden_syscall`].
    #[doc(hidden)]
    pub debug_forbidden_syscall: bool,
}

#[cfg(feature = "vmm")]
impl VmResources {
    /// Also copies console lines into `ring`.
    pub fn with_console_ring(mut self, ring: ConsoleRing) -> Self {
        self.console_ring = Some(ring);
        self
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn check_file(field: &'static str, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::MissingFile {
        field,
        path: path.into(),
        source,
    })?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(ConfigError::MissingFile {
            field,
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        })
    }
}

/// The fd entries seen so far, to refuse two entries naming one fd.
#[derive(Default)]
struct FdSet(Vec<i32>);

impl FdSet {
    fn add(&mut self, field: &'static str, fd: i32) -> Result<()> {
        if self.0.contains(&fd) {
            return Err(ConfigError::Fd {
                field,
                fd,
                problem: FdProblem::Duplicate,
            });
        }
        self.0.push(fd);
        Ok(())
    }

    /// Checks `source`: a path must name a regular file when `must_exist`; an fd must be open,
    /// of `kind`, and not named before.
    fn check(
        &mut self,
        field: &'static str,
        source: &FileSource,
        kind: FdKind,
        must_exist: bool,
    ) -> Result<()> {
        match source {
            FileSource::Path(p) if must_exist => check_file(field, p),
            FileSource::Path(_) => Ok(()),
            FileSource::Fd(f) => {
                check_fd(field, f.fd, kind)?;
                self.add(field, f.fd)
            }
        }
    }
}

impl TryFrom<VmConfig> for VmResources {
    type Error = ConfigError;

    fn try_from(c: VmConfig) -> Result<Self> {
        if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                format!("must be 1..={MAX_VCPUS}, got {}", c.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&c.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!(
                    "must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {}",
                    c.memory_mib
                ),
            ));
        }
        if c.cmdline_extra.len() > MAX_CMDLINE_EXTRA {
            return Err(invalid(
                "cmdline_extra",
                format!("is longer than {MAX_CMDLINE_EXTRA} bytes"),
            ));
        }
        if c.cmdline_extra.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(invalid(
                "cmdline_extra",
                "must be printable ASCII on one line",
            ));
        }
        let max_disks = layout::VIRTIO_MMIO_MAX_DEVICES as usize;
        if c.disks.len() > max_disks {
            return Err(invalid(
                "disks",
                format!("has {} entries, at most {max_disks} allowed", c.disks.len()),
            ));
        }
        if c.console.cap_bytes == 0 || c.console.cap_bytes > MAX_CONSOLE_CAP {
            return Err(invalid(
                "console.cap_bytes",
                format!("must be 1..={MAX_CONSOLE_CAP}"),
            ));
        }
        let mut fds = FdSet::default();
        if let Some(kvm) = &c.kvm {
            fds.check("kvm", kvm, FdKind::Kvm, false)?;
        }
        fds.check("kernel", &c.kernel, FdKind::ReadFile, true)?;
        if let Some(initrd) = &c.initrd {
            fds.check("initrd", initrd, FdKind::ReadFile, true)?;
        }
        if let Some(console) = &c.console.path {
            fds.check("console.path", console, FdKind::WriteFile, false)?;
            // Created at build time; a directory would only fail then, after the checks.
            if console.as_path().is_some_and(Path::is_dir) {
                return Err(invalid("console.path", format!("{console} is a directory")));
            }
        }
        for disk in &c.disks {
            let kind = FdKind::Disk {
                writable: !disk.read_only,
            };
            fds.check("disks[].path", &disk.path, kind, true)?;
            if let Some(report) = &disk.full_report {
                fds.check("disks[].full_report", report, FdKind::WriteFile, false)?;
            }
            match (disk.format, &disk.backing) {
                (DiskFormat::Raw, None) if disk.host_bytes_cap.is_none() => {}
                (DiskFormat::Raw, _) => {
                    return Err(invalid(
                        "disks[].format",
                        "raw disks take no backing file and no host_bytes_cap (use qcow2)",
                    ))
                }
                (DiskFormat::Qcow2, None) => {
                    return Err(invalid(
                        "disks[].backing",
                        "is required for a qcow2 disk (the raw base the overlay is over)",
                    ))
                }
                (DiskFormat::Qcow2, Some(backing)) => {
                    let kind = FdKind::Disk { writable: false };
                    fds.check("disks[].backing", backing, kind, true)?;
                    if disk.read_only {
                        return Err(invalid(
                            "disks[].read_only",
                            "is not supported for qcow2 overlays (attach the raw base read-only)",
                        ));
                    }
                    if disk.host_bytes_cap == Some(0) {
                        return Err(invalid("disks[].host_bytes_cap", "must be more than 0"));
                    }
                }
            }
        }
        if let Some(v) = &c.vsock {
            if !(3..u64::from(u32::MAX)).contains(&v.guest_cid) {
                return Err(invalid(
                    "vsock.guest_cid",
                    format!("must be 3..={}, got {}", u32::MAX - 1, v.guest_cid),
                ));
            }
            match &v.uds_path {
                FileSource::Path(path) => {
                    if path.exists() {
                        return Err(invalid(
                            "vsock.uds_path",
                            format!("{} already exists", path.display()),
                        ));
                    }
                    let parent = path
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    if !parent.is_dir() {
                        return Err(invalid(
                            "vsock.uds_path",
                            format!("directory {} does not exist", parent.display()),
                        ));
                    }
                }
                fd => fds.check("vsock.uds_path", fd, FdKind::UnixListener, false)?,
            }
        }
        let net = match &c.net {
            None => None,
            Some(n) => {
                if n.tap_fd < 3 {
                    return Err(invalid(
                        "net.tap_fd",
                        format!("must be 3 or more (0-2 are stdio), got {}", n.tap_fd),
                    ));
                }
                fds.add("net.tap_fd", n.tap_fd)?;
                let mac = parse_mac(&n.mac).ok_or_else(|| {
                    invalid(
                        "net.mac",
                        format!(
                            "must be a unicast MAC like 02:53:42:00:00:02, got {:?}",
                            n.mac
                        ),
                    )
                })?;
                Some(NetResources {
                    tap_fd: n.tap_fd,
                    mac,
                })
            }
        };
        let slots = c.disks.len() + usize::from(c.vsock.is_some()) + usize::from(net.is_some());
        if slots > max_disks {
            return Err(invalid(
                "disks",
                format!("and vsock and net need more than {max_disks} virtio-mmio slots"),
            ));
        }
        Ok(Self {
            kvm: c.kvm,
            kernel: c.kernel,
            initrd: c.initrd,
            cmdline_extra: c.cmdline_extra,
            vcpus: c.vcpus,
            memory_bytes: u64::from(c.memory_mib) << 20,
            disks: c.disks,
            console: c.console,
            #[cfg(feature = "vmm")]
            console_ring: None,
            vsock: c.vsock,
            net,
            seccomp: c.seccomp,
            debug_forbidden_syscall: c.debug_forbidden_syscall,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().expect("temp file")
    }

    #[test]
    fn disk_formats_are_validated() {
        let k = kernel_file();
        let img = tempfile::NamedTempFile::new().expect("image");
        let base = tempfile::NamedTempFile::new().expect("base");
        let ok = VmConfig::new(k.path())
            .disk(DiskConfig::qcow2_overlay(
                img.path(),
                base.path(),
                Some(1 << 20),
            ))
            .disk(DiskConfig::new(base.path(), true));
        VmResources::try_from(ok).expect("valid");
        let mut raw_with_backing = DiskConfig::new(img.path(), false);
        raw_with_backing.backing = Some(base.path().into());
        let mut raw_with_cap = DiskConfig::new(img.path(), false);
        raw_with_cap.host_bytes_cap = Some(1);
        let mut qcow2_without_backing = DiskConfig::qcow2_overlay(img.path(), base.path(), None);
        qcow2_without_backing.backing = None;
        let mut qcow2_ro = DiskConfig::qcow2_overlay(img.path(), base.path(), None);
        qcow2_ro.read_only = true;
        let cases = [
            (raw_with_backing, "disks[].format"),
            (raw_with_cap, "disks[].format"),
            (qcow2_without_backing, "disks[].backing"),
            (qcow2_ro, "disks[].read_only"),
            (
                DiskConfig::qcow2_overlay(img.path(), base.path(), Some(0)),
                "disks[].host_bytes_cap",
            ),
        ];
        for (disk, field) in cases {
            match VmResources::try_from(VmConfig::new(k.path()).disk(disk.clone())) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{disk:?}"),
                other => panic!("{disk:?}: {other:?}"),
            }
        }
        let missing = DiskConfig::qcow2_overlay(img.path(), "/nonexistent/base.img", None);
        match VmResources::try_from(VmConfig::new(k.path()).disk(missing)) {
            Err(ConfigError::MissingFile { field, .. }) => assert_eq!(field, "disks[].backing"),
            other => panic!("{other:?}"),
        }
        let json = r#"{"kernel": "/k", "disks": [{"path": "d.qcow2", "format": "qcow2",
            "backing": "/store/base.img", "host_bytes_cap": 1048576}]}"#;
        let c = VmConfig::from_json(json).expect("parse");
        assert_eq!(
            c.disks[0],
            DiskConfig::qcow2_overlay("d.qcow2", "/store/base.img", Some(1 << 20))
        );
        let plain = serde_json::to_value(DiskConfig::new("r.img", false)).expect("json");
        assert!(
            plain.get("backing").is_none(),
            "optional fields stay out: {plain}"
        );
        assert_eq!(plain["format"], "raw");
    }

    #[test]
    fn net_devices_are_validated() {
        let k = kernel_file();
        let ok = VmConfig::new(k.path()).net(NetDeviceConfig::new(7, "02:53:42:00:00:0a"));
        let r = VmResources::try_from(ok).expect("valid");
        assert_eq!(
            r.net,
            Some(NetResources {
                tap_fd: 7,
                mac: [2, 0x53, 0x42, 0, 0, 0x0a]
            })
        );
        let bad = [
            (2, "02:53:42:00:00:0a", "net.tap_fd"),
            (-1, "02:53:42:00:00:0a", "net.tap_fd"),
            (7, "03:53:42:00:00:0a", "net.mac"), // multicast
            (7, "00:00:00:00:00:00", "net.mac"),
            (7, "02:53:42:00:00", "net.mac"),
            (7, "02:53:42:00:00:0a:0b", "net.mac"),
            (7, "02:53:42:00:00:0g", "net.mac"),
            (7, "2:53:42:00:00:0a", "net.mac"),
        ];
        for (fd, mac, field) in bad {
            let c = VmConfig::new(k.path()).net(NetDeviceConfig::new(fd, mac));
            match VmResources::try_from(c) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{fd} {mac}"),
                other => panic!("{fd} {mac}: {other:?}"),
            }
        }
        let json = r#"{"kernel": "/k", "net": {"tap_fd": 3, "mac": "02:00:00:00:00:01"}}"#;
        let c = VmConfig::from_json(json).expect("parse");
        assert_eq!(c.net, Some(NetDeviceConfig::new(3, "02:00:00:00:00:01")));
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let c = VmConfig::from_json(r#"{"kernel": "/k"}"#).expect("parse");
        assert_eq!(c, VmConfig::new("/k"));
        assert_eq!(
            (c.vcpus, c.memory_mib, c.console.cap_bytes),
            (1, 256, DEFAULT_CONSOLE_CAP)
        );
    }

    #[test]
    fn full_json_round_trips() {
        let text = r#"{"kernel":"/k","initrd":null,"cmdline_extra":"root=/dev/vda rw","vcpus":2,
            "memory_mib":512,"disks":[{"path":"/d","read_only":true}],
            "console":{"path":"/c.log","cap_bytes":4096},"vsock":{"guest_cid":3,"uds_path":"/v.sock"}}"#;
        let c = VmConfig::from_json(text).expect("parse");
        let expected = VmConfig::new("/k")
            .vcpus(2)
            .memory_mib(512)
            .cmdline_extra("root=/dev/vda rw")
            .disk(DiskConfig::new("/d", true))
            .console_file("/c.log", 4096)
            .vsock(VsockDeviceConfig::new(3, "/v.sock"));
        assert_eq!(c, expected);
        let again =
            VmConfig::from_json(&serde_json::to_string(&c).expect("serialize")).expect("parse");
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_fields_and_missing_kernel_are_rejected() {
        assert!(matches!(
            VmConfig::from_json(r#"{"kernel":"/k","vcpu":2}"#),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            VmConfig::from_json(r#"{"vcpus":2}"#),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn json_errors_say_what_is_expected() {
        let msg = |json: &str| match VmConfig::from_json(json) {
            Err(ConfigError::Json(e)) => e.to_string(),
            Err(e) => e.to_string(),
            Ok(c) => panic!("{json} parsed: {c:?}"),
        };
        // Too large for the field's type: the range, as for a value that fits but is refused.
        assert!(
            msg(r#"{"kernel":"/k","vcpus":1000}"#).starts_with("vcpus must be 1..=32, got 1000")
        );
        assert!(msg(r#"{"kernel":"/k","vcpus":-1}"#).starts_with("vcpus must be 1..=32, got -1"));
        assert!(msg(r#"{"kernel":"/k","memory_mib":99999999999}"#)
            .starts_with("memory_mib must be 64..=65536, got 99999999999"));
        assert!(
            msg(r#"{"kernel":"/k","vcpus":"2"}"#).contains("expected vcpus as an integer 1..=32")
        );
        assert!(msg(r#"{"kernel":null}"#)
            .contains(r#"expected a path string or an inherited fd as {"fd": N}"#));
        assert!(msg(r#"{"kernel":{"fd":5,"x":1}}"#).contains("unknown field `x`"));
        // serde would fill a struct from an array by position.
        for text in ["[]", r#"["/k"]"#, " 5", ""] {
            assert_eq!(
                msg(text),
                r#"invalid VM config: config must be a JSON object (`{"kernel": ...}`)"#
            );
        }
        // In range, through the wider parse: the values arrive unchanged.
        let c = VmConfig::from_json(r#"{"kernel":"/k","vcpus":32,"memory_mib":65536}"#)
            .expect("in range");
        assert_eq!((c.vcpus, c.memory_mib), (32, 65536));
    }

    #[test]
    fn validation_checks_ranges() {
        let k = kernel_file();
        let base = VmConfig::new(k.path());
        let field = |c: VmConfig| match VmResources::try_from(c) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(field(base.clone().vcpus(0)), "vcpus");
        assert_eq!(field(base.clone().vcpus(MAX_VCPUS + 1)), "vcpus");
        assert_eq!(
            field(base.clone().memory_mib(MIN_MEMORY_MIB - 1)),
            "memory_mib"
        );
        assert_eq!(
            field(base.clone().memory_mib(MAX_MEMORY_MIB + 1)),
            "memory_mib"
        );
        assert_eq!(field(base.clone().cmdline_extra("a\nb")), "cmdline_extra");
        assert_eq!(
            field(
                base.clone()
                    .cmdline_extra("x".repeat(MAX_CMDLINE_EXTRA + 1))
            ),
            "cmdline_extra"
        );
        assert_eq!(
            field(base.clone().console_file("/c", 0)),
            "console.cap_bytes"
        );
        let mut many = base.clone();
        for _ in 0..=layout::VIRTIO_MMIO_MAX_DEVICES {
            many = many.disk(DiskConfig::new(k.path(), true));
        }
        assert_eq!(field(many), "disks");
        let ok =
            VmResources::try_from(base.vcpus(MAX_VCPUS).memory_mib(MIN_MEMORY_MIB)).expect("valid");
        assert_eq!((ok.vcpus, ok.memory_bytes), (MAX_VCPUS, 64 << 20));
    }

    #[test]
    fn validation_checks_vsock() {
        let k = kernel_file();
        let dir = tempfile::tempdir().expect("dir");
        let field =
            |v: VsockDeviceConfig| match VmResources::try_from(VmConfig::new(k.path()).vsock(v)) {
                Err(ConfigError::Invalid { field, .. }) => field,
                other => panic!("expected Invalid, got {other:?}"),
            };
        assert_eq!(
            field(VsockDeviceConfig::new(2, dir.path().join("v"))),
            "vsock.guest_cid"
        );
        assert_eq!(
            field(VsockDeviceConfig::new(
                u64::from(u32::MAX),
                dir.path().join("v")
            )),
            "vsock.guest_cid"
        );
        assert_eq!(field(VsockDeviceConfig::new(3, k.path())), "vsock.uds_path");
        assert_eq!(
            field(VsockDeviceConfig::new(3, "/nonexistent/dir/v.sock")),
            "vsock.uds_path"
        );
        let ok = VmResources::try_from(
            VmConfig::new(k.path()).vsock(VsockDeviceConfig::new(3, dir.path().join("v"))),
        );
        assert_eq!(ok.map(|r| r.vsock.map(|v| v.guest_cid)).ok(), Some(Some(3)));
    }

    #[test]
    fn fd_entries_are_checked_for_kind_and_typed() {
        use std::os::fd::AsRawFd;
        let k = kernel_file();
        let ro = std::fs::File::open(k.path()).expect("open ro");
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(k.path())
            .expect("open rw");
        let dir = tempfile::tempdir().expect("dir");
        let listener =
            std::os::unix::net::UnixListener::bind(dir.path().join("l.sock")).expect("bind");
        let (stream, _peer) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (ro, rw, l, s) = (
            ro.as_raw_fd(),
            rw.as_raw_fd(),
            listener.as_raw_fd(),
            stream.as_raw_fd(),
        );
        let fd = FileSource::fd;
        let problem = |c: VmConfig| match VmResources::try_from(c) {
            Err(ConfigError::Fd { field, problem, .. }) => (field, problem),
            other => panic!("expected an fd error, got {other:?}"),
        };
        assert_eq!(
            problem(VmConfig::new(fd(999_999))),
            ("kernel", FdProblem::NotOpen)
        );
        assert_eq!(problem(VmConfig::new(fd(0))), ("kernel", FdProblem::Stdio));
        assert_eq!(
            problem(VmConfig::new(fd(s))),
            ("kernel", FdProblem::NotRegularFile)
        );
        assert_eq!(
            problem(VmConfig::new(fd(ro)).kvm(fd(rw))),
            ("kvm", FdProblem::NotKvm)
        );
        assert_eq!(
            problem(VmConfig::new(k.path()).disk(DiskConfig::new(fd(ro), false))),
            ("disks[].path", FdProblem::NotWritable)
        );
        assert_eq!(
            problem(VmConfig::new(k.path()).disk(DiskConfig::new(fd(s), true))),
            ("disks[].path", FdProblem::NotDisk)
        );
        assert_eq!(
            problem(VmConfig::new(k.path()).console_file(fd(ro), 4096)),
            ("console.path", FdProblem::NotWritable)
        );
        assert_eq!(
            problem(VmConfig::new(k.path()).vsock(VsockDeviceConfig::new(3, fd(s)))),
            ("vsock.uds_path", FdProblem::NotUnixListener)
        );
        assert_eq!(
            problem(VmConfig::new(fd(ro)).initrd(fd(ro))),
            ("initrd", FdProblem::Duplicate)
        );
        assert_eq!(
            problem(
                VmConfig::new(k.path())
                    .vsock(VsockDeviceConfig::new(3, fd(l)))
                    .net(NetDeviceConfig::new(l, "02:00:00:00:00:01"))
            ),
            ("net.tap_fd", FdProblem::Duplicate)
        );
        // The right kinds pass: a read-only kernel, a writable disk, a read-only disk, a
        // listening socket.
        let ok = VmConfig::new(fd(ro))
            .disk(DiskConfig::new(fd(rw), false))
            .vsock(VsockDeviceConfig::new(3, fd(l)));
        let r = VmResources::try_from(ok).expect("valid fds");
        assert_eq!(r.kernel, fd(ro));
        // JSON: a path is a string, an fd is {"fd": N} and nothing else.
        let c = VmConfig::from_json(r#"{"kernel": {"fd": 5}, "kvm": {"fd": 4}}"#).expect("json");
        assert_eq!((c.kernel, c.kvm), (fd(5), Some(fd(4))));
        assert!(VmConfig::from_json(r#"{"kernel": {"fd": 5, "path": "/k"}}"#).is_err());
        let text = serde_json::to_string(&VmConfig::new(fd(7))).expect("serialize");
        assert!(text.contains(r#""kernel":{"fd":7}"#), "{text}");
    }

    #[test]
    fn validation_checks_files() {
        let missing = VmResources::try_from(VmConfig::new("/nonexistent/vmlinux"));
        assert!(matches!(
            missing,
            Err(ConfigError::MissingFile {
                field: "kernel",
                ..
            })
        ));
        let dir = tempfile::tempdir().expect("dir");
        let not_file = VmResources::try_from(VmConfig::new(dir.path()));
        assert!(matches!(
            not_file,
            Err(ConfigError::MissingFile {
                field: "kernel",
                ..
            })
        ));
        let k = kernel_file();
        let bad_disk = VmResources::try_from(
            VmConfig::new(k.path()).disk(DiskConfig::new("/nonexistent", false)),
        );
        assert!(matches!(
            bad_disk,
            Err(ConfigError::MissingFile {
                field: "disks[].path",
                ..
            })
        ));
        // A console log is created at build time: a directory is refused now, not then.
        let console_dir =
            VmResources::try_from(VmConfig::new(k.path()).console_file(dir.path(), 1024));
        assert!(matches!(
            console_dir,
            Err(ConfigError::Invalid {
                field: "console.path",
                ..
            })
        ));
        // Paths are quoted, so an empty one shows.
        let empty = VmResources::try_from(VmConfig::new("")).expect_err("empty path");
        assert!(
            empty
                .to_string()
                .starts_with(r#"invalid VM config: kernel "" is not"#),
            "{empty}"
        );
    }
}
