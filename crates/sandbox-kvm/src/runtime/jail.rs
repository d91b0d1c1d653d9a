//! The jail every `sandbox-vmm` process starts in (docs/jail.md).
//!
//! Applied by the runtime's spawn path, each layer on by default where the host allows it:
//!
//! 1. a cgroup v2 leaf per sandbox, `<cgroup_root>/<sandbox id>`, with `memory.max` (guest RAM
//!    plus a fixed overhead), `pids.max` and `cpu.max` (one CPU per vCPU plus one for the device
//!    thread); the child joins it before exec, and teardown goes through `cgroup.kill`;
//! 2. new mount, IPC, UTS and network namespaces (the VMM needs no network: it accepts on an
//!    inherited Unix listener, and the tap is an inherited fd);
//! 3. rlimits: open files, and file size (the largest file the VMM writes, plus room for its log);
//! 4. an empty capability bounding set, so the exec'd VMM has no capability even as root;
//! 5. `PR_SET_NO_NEW_PRIVS`;
//! 6. exactly the fds the VM config names (`/dev/kvm`, kernel, disks, console, vsock listener,
//!    tap), everything else closed at exec;
//! 7. a private root: the child's mounts made private, an empty directory of the sandbox
//!    (`root/`) bind-mounted read-only onto itself with only what the exec needs bound into it
//!    (the `sandbox-vmm` binary, its ELF interpreter and shared libraries, `vm.json`, all
//!    read-only), `pivot_root` into it and the old root detached: no host path is left;
//! 8. an unprivileged uid/gid, when configured.
//!
//! Everything the child does between fork and exec is prepared here first (`PreparedJail`):
//! after the fork it only makes async-signal-safe syscalls with plain integers and buffers that
//! already exist.
//!
//! The VMM installs its own seccomp filters per thread (`sandbox_vmm::seccomp`).

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use sandbox_vmm::vmm::SeccompMode;

/// Default parent of the per-sandbox cgroups.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/sandbox-sdk";
/// Memory the VMM process may use beyond guest RAM (its own heap, stacks, page tables, device
/// buffers), MiB. The VMM's own RSS is a few MiB (docs/SPEC.md); the rest is headroom.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 64;
/// Default `pids.max` (threads count): vCPU threads, the device loop, the main thread.
pub const DEFAULT_PIDS_MAX: u64 = 64;
/// `RLIMIT_NOFILE` of the VMM.
pub const NOFILE_LIMIT: u64 = 4096;
/// Room above the largest file the VMM writes, for its log: `RLIMIT_FSIZE` slack, bytes.
pub const FSIZE_SLACK_BYTES: u64 = 64 << 20;

/// How hard to insist on a layer the host may not support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum JailMode {
    /// Fail `KvmRuntime::new` (kind `HostSetup`) when the host cannot provide it.
    Required,
    /// Use it where the host provides it; otherwise warn once and go on without it.
    #[default]
    BestEffort,
    /// Never use it (debugging).
    Off,
}

/// The jail's configuration (part of `KvmRuntimeConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JailConfig {
    /// The cgroup v2 leaf per sandbox.
    pub cgroup: JailMode,
    /// Where the per-sandbox cgroups go (created if missing).
    pub cgroup_root: PathBuf,
    /// `memory.max` = guest RAM + this, MiB.
    pub memory_overhead_mib: u64,
    /// `pids.max` of each sandbox's cgroup.
    pub pids_max: u64,
    /// New mount, IPC, UTS and network namespaces for the VMM (needs `CAP_SYS_ADMIN`).
    pub namespaces: JailMode,
    /// Rlimits, an empty capability bounding set and `PR_SET_NO_NEW_PRIVS` (always possible).
    pub restrict_process: bool,
    /// A private root for the VMM: `pivot_root` into an empty directory of the sandbox where
    /// only the binary, its libraries and its config are bound (needs the mount namespace, so
    /// `namespaces` on, and `CAP_SYS_ADMIN`).
    pub private_root: JailMode,
    /// Run the VMM as this uid/gid (needs root). `None` (default): it stays uid 0, without
    /// any capability. Why not a default user: one uid shared by every VMM would let an escaped
    /// VMM signal the others, and a uid per sandbox needs an allocation the host must reserve;
    /// set one where the host has such a range.
    pub user: Option<VmmUser>,
    /// The seccomp filters of the VMM's threads: `Kill` (default), `Log` to find what an
    /// allowlist lacks, `Off`.
    pub seccomp: SeccompMode,
    /// Test hook: the VMM's device thread makes a forbidden system call right after start.
    #[doc(hidden)]
    pub debug_forbidden_syscall: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            cgroup: JailMode::BestEffort,
            cgroup_root: PathBuf::from(DEFAULT_CGROUP_ROOT),
            memory_overhead_mib: DEFAULT_MEMORY_OVERHEAD_MIB,
            pids_max: DEFAULT_PIDS_MAX,
            namespaces: JailMode::BestEffort,
            restrict_process: true,
            private_root: JailMode::BestEffort,
            user: None,
            seccomp: SeccompMode::Kill,
            debug_forbidden_syscall: false,
        }
    }
}

impl JailConfig {
    /// No jail at all (debugging a VMM with strace or gdb).
    pub fn off() -> Self {
        JailConfig {
            cgroup: JailMode::Off,
            namespaces: JailMode::Off,
            restrict_process: false,
            private_root: JailMode::Off,
            user: None,
            seccomp: SeccompMode::Off,
            ..JailConfig::default()
        }
    }
}

/// The uid and gid the VMM runs as ([`JailConfig::user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmUser {
    /// The user id.
    pub uid: u32,
    /// The group id (the only group: supplementary groups are cleared).
    pub gid: u32,
}

/// What this host supports, probed once by `KvmRuntime::new`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct JailSupport {
    /// cgroup v2 with the memory, pids and cpu controllers usable under `cgroup_root`.
    pub cgroup: Option<PathBuf>,
    /// New namespaces can be created (we have `CAP_SYS_ADMIN`).
    pub namespaces: bool,
    /// The files a private root needs, when it is used.
    pub private_root: Option<std::sync::Arc<RootFiles>>,
}

/// Why a required layer is unavailable: the message names the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JailError {
    /// cgroup v2 is not mounted at `/sys/fs/cgroup`, or the controllers cannot be enabled.
    #[error(
        "The jail needs cgroup v2 with the memory, pids and cpu controllers at {root}: {why}. \
         Boot the host with cgroup v2 (systemd.unified_cgroup_hierarchy=1), run as root, or set \
         the jail's cgroup mode to best_effort or off."
    )]
    NoCgroup {
        /// The configured cgroup root.
        root: PathBuf,
        /// What was missing.
        why: String,
    },
    /// New namespaces cannot be created.
    #[error(
        "The jail needs new namespaces (CAP_SYS_ADMIN): {0}. Run as root, or set the jail's \
         namespace mode to best_effort or off."
    )]
    NoNamespaces(String),
    /// The private root cannot be used.
    #[error(
        "The jail's private root cannot be used: {0}. Run as root with the namespaces layer on, \
         or set the jail's private_root mode to best_effort or off."
    )]
    NoPrivateRoot(String),
    /// A VMM user is configured but this process cannot change uid.
    #[error(
        "The jail is configured to run the VMM as uid {uid}, which needs root; run as root or \
         unset JailConfig::user."
    )]
    UserNeedsRoot {
        /// The configured uid.
        uid: u32,
    },
    /// A VMM user is configured but the private root is not in use.
    #[error(
        "The jail is configured to run the VMM as uid {uid}, which needs the private root (the \
         VMM reads its config there); run as root with the namespaces and private_root layers \
         on, or unset JailConfig::user."
    )]
    UserNeedsPrivateRoot {
        /// The configured uid.
        uid: u32,
    },
    /// A cgroup file could not be created or written.
    #[error("Cannot set up the sandbox cgroup {path}.")]
    Cgroup {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The cgroup v2 controllers a sandbox leaf uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Probes what the host supports for `config` and the VMM binary `vmm` (the private root by
/// running `vmm --version` in one, in a scratch directory made under `scratch`); a `Required`
/// layer that is missing is an error.
pub(crate) fn probe(
    config: &JailConfig,
    vmm: &Path,
    scratch: &Path,
) -> Result<JailSupport, JailError> {
    let cgroup = match config.cgroup {
        JailMode::Off => None,
        mode => match prepare_cgroup_root(&config.cgroup_root) {
            Ok(()) => Some(config.cgroup_root.clone()),
            Err(why) if mode == JailMode::Required => {
                return Err(JailError::NoCgroup {
                    root: config.cgroup_root.clone(),
                    why,
                })
            }
            Err(why) => {
                tracing::warn!(
                    root = %config.cgroup_root.display(),
                    %why,
                    "no cgroup v2 for the VMMs: running them without memory, pids and cpu limits"
                );
                None
            }
        },
    };
    let namespaces = match config.namespaces {
        JailMode::Off => false,
        mode => match namespaces_available() {
            Ok(()) => true,
            Err(why) if mode == JailMode::Required => return Err(JailError::NoNamespaces(why)),
            Err(why) => {
                tracing::warn!(%why, "the VMMs run without their own namespaces");
                false
            }
        },
    };
    let private_root = match config.private_root {
        JailMode::Off => None,
        mode => {
            let found = if namespaces {
                RootFiles::for_vmm(vmm).and_then(|files| {
                    probe_private_root(&files, scratch)?;
                    Ok(files)
                })
            } else {
                Err("it needs the namespaces layer (a mount namespace of its own)".to_string())
            };
            match found {
                Ok(files) => Some(std::sync::Arc::new(files)),
                Err(why) if mode == JailMode::Required => {
                    return Err(JailError::NoPrivateRoot(why))
                }
                Err(why) => {
                    tracing::warn!(%why, "the VMMs run without a private root");
                    None
                }
            }
        }
    };
    if let Some(user) = config.user {
        if !super::sys::is_root() {
            return Err(JailError::UserNeedsRoot { uid: user.uid });
        }
        // Outside a private root the VMM would read vm.json in the sandbox directory, which
        // only the runtime's user may enter.
        if private_root.is_none() {
            return Err(JailError::UserNeedsPrivateRoot { uid: user.uid });
        }
    }
    Ok(JailSupport {
        cgroup,
        namespaces,
        private_root,
    })
}

/// What a private root holds besides `vm.json`: the files the VMM's exec opens by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootFiles {
    /// Absolute host paths, bound at the same paths in the root: the binary (first, its
    /// canonical path), its ELF interpreter and its shared libraries.
    pub files: Vec<PathBuf>,
    /// `LD_LIBRARY_PATH` for the VMM: the libraries' directories (the root has no
    /// `/etc/ld.so.cache`).
    pub library_path: OsString,
}

/// Runs `<vmm> --version` in a private root made of `files` in a scratch directory under
/// `scratch` (removed after), the way a sandbox's VMM is started: whether this host's mounts,
/// `pivot_root` and the exec inside the root all work.
fn probe_private_root(files: &RootFiles, scratch: &Path) -> Result<(), String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = scratch.join(format!(".jail-probe-{}-{nanos}", std::process::id()));
    let result = (|| {
        fs::create_dir(&dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
        fs::write(dir.join("vm.json"), b"{}").map_err(|e| e.to_string())?;
        let root = PreparedRoot::create(&dir, files, "vm.json").map_err(|e| e.to_string())?;
        let cwd = fs::File::open(&dir).map_err(|e| e.to_string())?;
        let cwd_fd = cwd.as_raw_fd();
        let mut cmd = std::process::Command::new(&root.exe);
        cmd.arg("--version")
            .env_clear()
            .env("LD_LIBRARY_PATH", &root.library_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: the closure makes only async-signal-safe syscalls (fchdir, unshare, mount,
        // pivot_root, umount2, chdir) on integers and C strings built before the fork; `cwd`
        // is open until the spawn returns.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                super::sys::enter_dir(cwd_fd)?;
                super::sys::unshare_namespaces()?;
                root.enter()
            });
        }
        let out = cmd
            .output()
            .map_err(|e| format!("a VMM in a private root did not start: {e}"))?;
        drop(cwd);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "a VMM in a private root failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// Longest ELF interpreter path read, bytes.
const MAX_INTERP: u64 = 4096;

impl RootFiles {
    /// The files `vmm` needs to exec: itself, and for a dynamically linked binary its ELF
    /// interpreter (`PT_INTERP`) and the libraries the interpreter resolves
    /// (`<interp> --list <vmm>`, what `ldd` runs).
    fn for_vmm(vmm: &Path) -> Result<Self, String> {
        let vmm = fs::canonicalize(vmm).map_err(|e| format!("{}: {e}", vmm.display()))?;
        let mut files = vec![vmm.clone()];
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(interp) = elf_interpreter(&vmm)? {
            let out = std::process::Command::new(&interp)
                .arg("--list")
                .arg(&vmm)
                .env_clear()
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {} --list: {e}", interp.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} --list {} failed ({})",
                    interp.display(),
                    vmm.display(),
                    out.status
                ));
            }
            files.push(interp);
            for lib in parse_ld_list(&String::from_utf8_lossy(&out.stdout)) {
                if let Some(d) = lib.parent() {
                    if !dirs.iter().any(|x| x == d) {
                        dirs.push(d.to_path_buf());
                    }
                }
                if !files.contains(&lib) {
                    files.push(lib);
                }
            }
        }
        let library_path = std::env::join_paths(&dirs).map_err(|e| e.to_string())?;
        Ok(RootFiles {
            files,
            library_path,
        })
    }
}

/// The `PT_INTERP` path of the ELF64 file at `path`, `None` for a static binary.
fn elf_interpreter(path: &Path) -> Result<Option<PathBuf>, String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| format!("{} is not an ELF64 executable: {what}", path.display());
    let f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ehdr = [0u8; 64];
    f.read_exact_at(&mut ehdr, 0)
        .map_err(|_| bad("short header"))?;
    if &ehdr[..4] != b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(bad("not a little-endian ELF64 file"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u64::from(u16_at(&ehdr, 0x36));
    let phnum = u16_at(&ehdr, 0x38).min(256);
    if phentsize < 56 {
        return Err(bad("program header entries too small"));
    }
    let mut ph = [0u8; 56];
    for i in 0..u64::from(phnum) {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| bad("program headers out of range"))?;
        f.read_exact_at(&mut ph, at)
            .map_err(|_| bad("program headers past the end"))?;
        // PT_INTERP = 3.
        if u32_at(&ph, 0) != 3 {
            continue;
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
        if size == 0 || size > MAX_INTERP {
            return Err(bad("interpreter path of a bad size"));
        }
        let mut name = vec![0u8; size as usize];
        f.read_exact_at(&mut name, off)
            .map_err(|_| bad("interpreter path past the end"))?;
        let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
        if name.first() != Some(&b'/') {
            return Err(bad("interpreter path not absolute"));
        }
        return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
    }
    Ok(None)
}

/// The library paths in `ld.so --list` output: `name => /path (0x...)` lines; the vDSO (no
/// path) and the interpreter's own line (`/path (0x...)`, found from `PT_INTERP` instead) are
/// skipped, and so is `name => not found` (the exec would fail, which the spawn reports).
fn parse_ld_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| l.split_once("=>"))
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// The name of the private root's directory inside the sandbox directory.
pub(crate) const ROOT_DIR: &str = "root";

/// A private root prepared for one sandbox: the mount points exist, and the C strings the child
/// passes to `mount(2)` are built (paths relative to the sandbox directory, the child's working
/// directory when it mounts).
#[derive(Debug, Clone)]
pub(crate) struct PreparedRoot {
    /// `root`.
    root: CString,
    /// (source, mount point) pairs: each file bound read-only.
    binds: Vec<(CString, CString)>,
    /// `LD_LIBRARY_PATH` for the VMM.
    pub library_path: OsString,
    /// The binary's canonical path: where the exec finds it inside the root.
    pub exe: PathBuf,
}

impl PreparedRoot {
    /// Creates `<sandbox dir>/root` (mode 0755, reached through `dir`, a path that resolves to
    /// the sandbox directory) with an empty mount point for each of `files`, at its own absolute
    /// path, and for `config` at `/<config>`.
    pub fn create(dir: &Path, files: &RootFiles, config: &str) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::DirBuilderExt;
        let cstr = |b: &[u8]| {
            CString::new(b)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
        };
        let root = dir.join(ROOT_DIR);
        fs::DirBuilder::new().mode(0o755).create(&root)?;
        let mut binds = Vec::with_capacity(files.files.len() + 1);
        let mut add = |src: &Path, rel: &Path| -> io::Result<()> {
            let at = root.join(rel);
            if let Some(parent) = at.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
            }
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&at)?;
            let target = Path::new(ROOT_DIR).join(rel);
            binds.push((
                cstr(src.as_os_str().as_bytes())?,
                cstr(target.as_os_str().as_bytes())?,
            ));
            Ok(())
        };
        for f in &files.files {
            let rel = f.strip_prefix("/").map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a root file path is not absolute",
                )
            })?;
            add(f, rel)?;
        }
        add(Path::new(config), Path::new(config))?;
        let exe = files.files.first().cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "no binary in the root files")
        })?;
        Ok(PreparedRoot {
            exe,
            root: cstr(ROOT_DIR.as_bytes())?,
            binds,
            library_path: files.library_path.clone(),
        })
    }

    /// In the child, in its own mount namespace, with the sandbox directory as its working
    /// directory: private mounts, the binds, the root itself read-only, `pivot_root`.
    fn enter(&self) -> io::Result<()> {
        use super::sys;
        let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        sys::make_mounts_private()?;
        // A mount point of its own (pivot_root needs one), read-only and without exec.
        sys::bind_mount(&self.root, &self.root, ro | libc::MS_NOEXEC)?;
        for (src, dst) in &self.binds {
            sys::bind_mount(src, dst, ro)?;
        }
        sys::pivot_into(&self.root)
    }
}

/// Creates `root` and enables the controllers for its children, in the cgroup v2 hierarchy.
fn prepare_cgroup_root(root: &Path) -> Result<(), String> {
    let parent = root
        .parent()
        .ok_or_else(|| "the cgroup root has no parent".to_string())?;
    let available = fs::read_to_string(parent.join("cgroup.controllers"))
        .map_err(|e| format!("{} is not a cgroup v2 directory ({e})", parent.display()))?;
    for c in CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(format!(
                "the {c} controller is not available in {}",
                parent.display()
            ));
        }
    }
    enable_controllers(parent)?;
    match fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {} ({e})", root.display())),
    }
    enable_controllers(root)
}

fn enable_controllers(dir: &Path) -> Result<(), String> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&path).unwrap_or_default();
    for c in CONTROLLERS {
        if enabled.split_whitespace().any(|e| e == c) {
            continue;
        }
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(format!("+{c}").as_bytes()))
            .map_err(|e| {
                format!(
                    "cannot enable the {c} controller in {} ({e})",
                    path.display()
                )
            })?;
    }
    Ok(())
}

/// Whether this process may create namespaces: unshare(2) in a short-lived child.
fn namespaces_available() -> Result<(), String> {
    let status = std::process::Command::new("/bin/true");
    let mut cmd = status;
    // SAFETY: the closure only calls unshare(2) with integer flags between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, super::sys::unshare_namespaces);
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("the probe exited with {s}")),
        Err(e) => Err(format!("unshare failed: {e}")),
    }
}

/// One sandbox's cgroup: created before the spawn, joined by the child, killed and removed at
/// teardown.
#[derive(Debug)]
pub(crate) struct SandboxCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for the child to write `0` into (joining it) before exec.
    procs: OwnedFd,
}

/// The limits of one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CgroupLimits {
    /// `memory.max`, bytes.
    pub memory_bytes: u64,
    /// `pids.max`.
    pub pids: u64,
    /// `cpu.max` quota per 100 ms period, microseconds.
    pub cpu_quota_us: u64,
}

impl CgroupLimits {
    /// For a guest of `memory_mib` MiB and `vcpus` vCPUs under `config`.
    pub fn for_guest(config: &JailConfig, memory_mib: u32, vcpus: u8) -> Self {
        CgroupLimits {
            memory_bytes: (u64::from(memory_mib) + config.memory_overhead_mib) << 20,
            pids: config.pids_max,
            cpu_quota_us: (u64::from(vcpus) + 1) * CPU_PERIOD_US,
        }
    }
}

/// The `cpu.max` period, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

impl SandboxCgroup {
    /// Creates `<root>/<name>` with `limits`.
    pub fn create(root: &Path, name: &str, limits: CgroupLimits) -> Result<Self, JailError> {
        let dir = root.join(name);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JailError::Cgroup { path, source }
        };
        fs::create_dir(&dir).map_err(err(&dir))?;
        let cg = (|| {
            write_file(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            // No swap: a guest must not push the host into swapping its RAM.
            let _ = write_file(&dir.join("memory.swap.max"), "0");
            write_file(&dir.join("pids.max"), &limits.pids.to_string())?;
            write_file(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
            )?;
            let procs = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?;
            Ok::<_, io::Error>(OwnedFd::from(procs))
        })();
        match cg {
            Ok(procs) => Ok(SandboxCgroup { dir, procs }),
            Err(source) => {
                let _ = fs::remove_dir(&dir);
                Err(JailError::Cgroup { path: dir, source })
            }
        }
    }

    /// The fd the child writes `0` into to join the cgroup.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills every process in the cgroup and removes it (bounded: 2 s).
    pub fn kill_and_remove(&self) -> io::Result<()> {
        kill_and_remove(&self.dir)
    }
}

/// `cgroup.kill` (Linux 5.14), wait until the cgroup is empty, `rmdir`. Idempotent.
pub(crate) fn kill_and_remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let _ = write_file(&dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while a killed process has not exited yet.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the cgroup `dir`'s OOM killer has killed a process (`memory.events`: `oom_kill` > 0),
/// with its `memory.max` and the `shmem` bytes of `memory.stat` (files in memory: a tmpfs
/// overlay). Reads at most 16 KiB of each file.
pub(crate) fn oom_killed(dir: &Path) -> Option<super::process::OomKill> {
    let read = |name: &str| -> Option<String> {
        use std::io::Read;
        let mut text = String::new();
        fs::File::open(dir.join(name))
            .ok()?
            .take(16 * 1024)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    };
    let kills = parse_oom_kills(&read("memory.events")?);
    (kills > 0).then(|| super::process::OomKill {
        memory_max: read("memory.max").and_then(|m| m.trim().parse().ok()),
        shmem: read("memory.stat").and_then(|s| parse_stat(&s, "shmem")),
    })
}

/// One counter of a `memory.stat` file (`<name> <bytes>` lines).
fn parse_stat(stat: &str, name: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The `oom_kill` count of a `memory.events` file (0 when absent).
fn parse_oom_kills(events: &str) -> u64 {
    events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A short key of a state directory (FNV-1a of its path, 8 hex digits): cgroups of sandboxes
/// are named `<key>-<sandbox id>`, so runtimes with different state directories on one host
/// never take each other's cgroups for leftovers.
pub(crate) fn state_key(state_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u32 = 0x811c_9dc5;
    for &b in state_dir.as_os_str().as_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// The cgroup name of sandbox `id` of the runtime on `state_dir`.
pub(crate) fn cgroup_name(state_dir: &Path, id: &str) -> String {
    format!("{}-{id}", state_key(state_dir))
}

/// Removes the cgroups under `root` of the runtime whose [`state_key`] is `key` for which
/// `is_live(sandbox id)` says no: leftovers of runtimes that died. Returns how many were removed.
pub(crate) fn reconcile(root: &Path, key: &str, is_live: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let prefix = format!("{key}-");
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !id.starts_with("sbx-") || is_live(id) {
            continue;
        }
        match kill_and_remove(&e.path()) {
            Ok(()) => {
                tracing::info!(cgroup = %e.path().display(), "removed a stale sandbox cgroup");
                removed += 1;
            }
            Err(err) => {
                tracing::warn!(cgroup = %e.path().display(), %err, "cannot remove a stale cgroup")
            }
        }
    }
    removed
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// What the child does between fork and exec, prepared in the parent.
#[derive(Debug, Clone)]
pub(crate) struct PreparedJail {
    /// `cgroup.procs` of the sandbox's cgroup, or -1.
    pub cgroup_procs: RawFd,
    pub namespaces: bool,
    pub restrict: bool,
    /// `RLIMIT_FSIZE`, bytes.
    pub fsize: u64,
    /// fds the VMM inherits (`/dev/kvm`, kernel, disks, console, vsock listener, tap), by their
    /// numbers in the parent, which the VM config names; -1 for none. Every other fd is closed
    /// on exec.
    pub inherit: [RawFd; MAX_INHERITED_FDS],
    /// The private root, if used (needs `namespaces`).
    pub root: Option<PreparedRoot>,
    /// The uid/gid to drop to, if configured.
    pub user: Option<VmmUser>,
}

/// How many fds a VMM may inherit beyond stdio.
pub(crate) const MAX_INHERITED_FDS: usize = 10;

impl PreparedJail {
    /// No jail at all.
    #[cfg(test)]
    pub fn none() -> Self {
        PreparedJail {
            cgroup_procs: -1,
            namespaces: false,
            restrict: false,
            fsize: u64::MAX,
            inherit: [-1; MAX_INHERITED_FDS],
            root: None,
            user: None,
        }
    }

    /// Runs in the child after fork: only async-signal-safe syscalls, no allocation. The order
    /// matters: joining the cgroup and unsharing need privileges that the last steps drop.
    pub fn apply_in_child(&self) -> io::Result<()> {
        use super::sys;
        if self.cgroup_procs >= 0 {
            sys::write_all_fd(self.cgroup_procs, b"0")?;
        }
        if self.namespaces {
            sys::unshare_namespaces()?;
        }
        if let Some(root) = &self.root {
            root.enter()?;
        }
        if self.restrict {
            sys::set_rlimit(libc::RLIMIT_NOFILE, NOFILE_LIMIT)?;
            sys::set_rlimit(libc::RLIMIT_FSIZE, self.fsize)?;
            // The bounding set needs CAP_SETPCAP: before the uid change.
            sys::drop_all_capabilities()?;
        }
        if let Some(user) = self.user {
            sys::set_user(user.uid, user.gid)?;
        }
        if self.restrict {
            sys::set_no_new_privs()?;
        }
        // Last: `child_setup` marked every fd above stdio close-on-exec; these stay open.
        for fd in self.inherit.iter().copied().filter(|&fd| fd >= 3) {
            sys::clear_cloexec(fd)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn limits_follow_the_guest() {
        let l = CgroupLimits::for_guest(&JailConfig::default(), 256, 2);
        assert_eq!(l.memory_bytes, (256 + DEFAULT_MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(l.pids, DEFAULT_PIDS_MAX);
        assert_eq!(l.cpu_quota_us, 300_000);
    }

    #[test]
    fn a_required_cgroup_on_a_host_without_cgroup_v2_names_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = JailConfig {
            cgroup: JailMode::Required,
            cgroup_root: dir.path().join("sandbox-sdk"),
            namespaces: JailMode::Off,
            private_root: JailMode::Off,
            ..JailConfig::default()
        };
        let err = probe(&config, Path::new("/bin/true"), dir.path())
            .expect_err("not a cgroup v2 directory");
        assert!(matches!(err, JailError::NoCgroup { .. }), "{err}");
        assert!(err.to_string().contains("best_effort"), "{err}");
        let best = JailConfig {
            cgroup: JailMode::BestEffort,
            ..config
        };
        assert_eq!(
            probe(&best, Path::new("/bin/true"), dir.path())
                .expect("best effort")
                .cgroup,
            None
        );
    }

    #[test]
    fn off_probes_nothing() {
        let s = probe(
            &JailConfig::off(),
            Path::new("/bin/true"),
            Path::new("/nonexistent"),
        )
        .expect("off");
        assert_eq!(
            s,
            JailSupport {
                cgroup: None,
                namespaces: false,
                private_root: None,
            }
        );
    }

    #[test]
    fn reconcile_removes_only_dead_sandboxes_cgroups() {
        // A plain directory tree stands in for the cgroup root: rmdir of an empty directory
        // behaves the same, and cgroup.kill simply does not exist.
        let root = tempfile::tempdir().expect("tempdir");
        let key = state_key(Path::new("/run/sandbox-sdk"));
        let other_key = state_key(Path::new("/run/other"));
        assert_ne!(key, other_key);
        let dead = format!("{key}-sbx-dead");
        let live = format!("{key}-sbx-live");
        let others = format!("{other_key}-sbx-dead");
        for name in [dead.as_str(), live.as_str(), others.as_str(), "unrelated"] {
            fs::create_dir(root.path().join(name)).expect("mkdir");
        }
        let removed = reconcile(root.path(), &key, |id| id == "sbx-live");
        assert_eq!(removed, 1);
        assert!(!root.path().join(&dead).exists());
        assert!(root.path().join(&live).exists());
        assert!(
            root.path().join(&others).exists(),
            "another runtime's cgroup"
        );
        assert!(root.path().join("unrelated").exists());
        assert_eq!(
            cgroup_name(Path::new("/run/sandbox-sdk"), "sbx-01"),
            format!("{key}-sbx-01")
        );
    }

    #[test]
    fn restricted_child_has_no_new_privs_no_capabilities_and_limits() {
        let jail = PreparedJail {
            cgroup_procs: -1,
            namespaces: false,
            restrict: true,
            fsize: 1 << 30,
            inherit: [-1; MAX_INHERITED_FDS],
            root: None,
            user: None,
        };
        let mut cmd = std::process::Command::new("/bin/cat");
        cmd.arg("/proc/self/status")
            .stdout(std::process::Stdio::piped());
        // SAFETY: apply_in_child makes only async-signal-safe syscalls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || jail.apply_in_child());
        }
        let out = cmd.output().expect("cat runs");
        let status = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{status}");
    }

    #[test]
    fn only_the_named_fds_are_inherited() {
        use std::os::fd::AsRawFd;
        let (keep, _k) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let (other, _o) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let (k, o) = (keep.as_raw_fd(), other.as_raw_fd());
        let mut jail = PreparedJail::none();
        jail.inherit[0] = k;
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!(
                "[ -e /proc/self/fd/{k} ] && echo kept; [ -e /proc/self/fd/{o} ] && echo leaked; true"
            ))
            .stdout(std::process::Stdio::piped());
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid");
        // SAFETY: child_setup and apply_in_child make only async-signal-safe syscalls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                super::super::sys::child_setup(parent, None)?;
                jail.apply_in_child()
            });
        }
        let out = cmd.output().expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
    }

    /// Runs `program args` jailed by `jail`, in `dir` (the sandbox directory), with `env`, and
    /// returns its stdout.
    fn run_jailed(
        program: &Path,
        args: &[&str],
        dir: &Path,
        jail: PreparedJail,
        env: Option<&OsString>,
    ) -> String {
        let cwd = fs::File::open(dir).expect("dir");
        let cwd_fd = cwd.as_raw_fd();
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .stdout(std::process::Stdio::piped());
        if let Some(p) = env {
            cmd.env("LD_LIBRARY_PATH", p);
        }
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid");
        // SAFETY: child_setup and apply_in_child make only async-signal-safe syscalls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                super::super::sys::child_setup(parent, Some(cwd_fd))?;
                jail.apply_in_child()
            });
        }
        let out = cmd.output().expect("the jailed child runs");
        drop(cwd);
        assert!(out.status.success(), "{:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_vmm_files_of_a_dynamic_binary_are_its_interpreter_and_libraries() {
        let files = RootFiles::for_vmm(Path::new("/bin/sh")).expect("sh's files");
        assert!(files.files.len() >= 3, "{files:?}");
        assert!(files.files.iter().all(|f| f.is_absolute() && f.exists()));
        assert!(
            files
                .files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(!files.library_path.is_empty());
        assert_eq!(
            parse_ld_list(
                "\tlinux-vdso.so.1 (0x1)\n\tlibc.so.6 => /lib/x/libc.so.6 (0x2)\n\
                 \t/lib64/ld-linux-x86-64.so.2 (0x3)\n\tlibz.so => not found\n"
            ),
            [PathBuf::from("/lib/x/libc.so.6")]
        );
        let not_elf = tempfile::NamedTempFile::new().expect("file");
        fs::write(not_elf.path(), b"#!/bin/sh\n").expect("write");
        assert!(elf_interpreter(not_elf.path()).is_err());
    }

    #[test]
    fn a_child_in_the_private_root_sees_no_host_path() {
        if !super::super::sys::is_root() {
            eprintln!("skipped: the private root needs root (CAP_SYS_ADMIN)");
            return;
        }
        let sandbox = tempfile::tempdir().expect("sandbox dir");
        fs::write(sandbox.path().join("vm.json"), b"config-line\n").expect("config");
        fs::write(sandbox.path().join("secret"), b"x").expect("secret");
        let files = RootFiles::for_vmm(Path::new("/bin/sh")).expect("sh's files");
        let root = PreparedRoot::create(sandbox.path(), &files, "vm.json").expect("root");
        let mut jail = PreparedJail::none();
        jail.namespaces = true;
        jail.restrict = true;
        jail.root = Some(root);
        let script = "for f in /* /*/*; do echo \"$f\"; done; \
            read l < /vm.json && echo \"config: $l\"; \
            [ -e /etc/passwd ] && echo host-etc; [ -e /proc/self ] && echo host-proc; \
            [ -e /secret ] && echo sandbox-secret; [ -e /root/vm.json ] && echo sandbox-dir; \
            (echo x > /new) 2>/dev/null && echo writable; true";
        let sh = files.files[0].clone();
        let out = run_jailed(
            &sh,
            &["-c", script],
            sandbox.path(),
            jail,
            Some(&files.library_path),
        );
        assert!(out.contains("config: config-line"), "{out}");
        for leak in [
            "host-etc",
            "host-proc",
            "sandbox-secret",
            "sandbox-dir",
            "writable",
        ] {
            assert!(!out.contains(leak), "{leak}: {out}");
        }
        // Only the directories leading to the bound files, and vm.json, are there.
        for line in out.lines().filter(|l| l.starts_with('/')) {
            let known = line == "/vm.json"
                || files
                    .files
                    .iter()
                    .any(|f| f.starts_with(line) || Path::new(line).starts_with(f));
            assert!(known, "{line} is visible: {out}");
        }
        // The host's namespace is untouched: the mount point is a plain empty file there.
        let seen = sandbox.path().join(ROOT_DIR).join("vm.json");
        assert_eq!(fs::read(&seen).expect("mount point"), b"");
    }

    #[test]
    fn a_configured_user_is_what_the_child_runs_as() {
        if !super::super::sys::is_root() {
            eprintln!("skipped: changing uid needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let mut jail = PreparedJail::none();
        jail.restrict = true;
        jail.user = Some(VmmUser {
            uid: 65534,
            gid: 65533,
        });
        let status = run_jailed(
            Path::new("/bin/cat"),
            &["/proc/self/status"],
            dir.path(),
            jail,
            None,
        );
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
        assert_eq!(field("Gid:"), "65533 65533 65533 65533", "{status}");
        assert_eq!(field("Groups:"), "", "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    }

    #[test]
    fn the_child_has_exactly_stdio_and_the_named_fds() {
        let (keep_a, _a) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let keep_b = fs::File::open("/dev/null").expect("null");
        let (_other, _o) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let mut jail = PreparedJail::none();
        jail.inherit[0] = keep_a.as_raw_fd();
        jail.inherit[3] = keep_b.as_raw_fd();
        let mut cmd = std::process::Command::new("/bin/sleep");
        cmd.arg("10")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid");
        // SAFETY: child_setup and apply_in_child make only async-signal-safe syscalls.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                super::super::sys::child_setup(parent, None)?;
                jail.apply_in_child()
            });
        }
        let mut child = cmd.spawn().expect("sleep runs");
        // spawn returns after the exec: the fd table is the exec'd program's.
        let mut fds: Vec<i32> = fs::read_dir(format!("/proc/{}/fd", child.id()))
            .expect("fd dir")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds.sort_unstable();
        let _ = child.kill();
        let _ = child.wait();
        let mut want = vec![0, 1, 2, keep_a.as_raw_fd(), keep_b.as_raw_fd()];
        want.sort_unstable();
        assert_eq!(fds, want);
    }

    #[test]
    fn memory_stat_counters_are_read_by_name() {
        let stat = "anon 1000\nfile 20\nshmem 300\nshmem_thp 7\n";
        assert_eq!(parse_stat(stat, "shmem"), Some(300));
        assert_eq!(parse_stat(stat, "shmem_thp"), Some(7));
        assert_eq!(parse_stat(stat, "sock"), None);
        assert_eq!(parse_stat("shmem x\n", "shmem"), None);
    }

    #[test]
    fn an_oom_kill_is_read_from_memory_events() {
        let dir = tempfile::tempdir().expect("dir");
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(events), 1);
        assert_eq!(parse_oom_kills("oom 3\noom_kill 0\n"), 0);
        assert_eq!(parse_oom_kills(""), 0);
        assert_eq!(oom_killed(dir.path()), None, "no memory.events: no report");
        fs::write(dir.path().join("memory.events"), "oom_kill 0\n").expect("write");
        assert_eq!(oom_killed(dir.path()), None);
        fs::write(dir.path().join("memory.events"), events).expect("write");
        fs::write(dir.path().join("memory.max"), "335544320\n").expect("write");
        fs::write(dir.path().join("memory.stat"), "anon 1\nshmem 4096\n").expect("write");
        assert_eq!(
            oom_killed(dir.path()),
            Some(super::super::process::OomKill {
                memory_max: Some(335_544_320),
                shmem: Some(4096),
            })
        );
    }

    #[test]
    fn the_private_root_is_probed_by_running_the_binary_in_one() {
        if !super::super::sys::is_root() {
            eprintln!("skipped: the private root needs root (CAP_SYS_ADMIN)");
            return;
        }
        let scratch = tempfile::tempdir().expect("scratch");
        let config = JailConfig {
            cgroup: JailMode::Off,
            namespaces: JailMode::Required,
            private_root: JailMode::Required,
            ..JailConfig::default()
        };
        // GNU true answers --version with status 0 from inside the root.
        let s = probe(&config, Path::new("/bin/true"), scratch.path()).expect("probe");
        assert!(s.private_root.is_some());
        // GNU false fails even for --version: the probe sees a VMM that does not run there.
        let err = probe(&config, Path::new("/bin/false"), scratch.path()).expect_err("fails");
        assert!(matches!(err, JailError::NoPrivateRoot(_)), "{err}");
        let best = JailConfig {
            private_root: JailMode::BestEffort,
            ..config
        };
        let s = probe(&best, Path::new("/bin/false"), scratch.path()).expect("best effort");
        assert_eq!(s.private_root, None);
        assert!(s.namespaces);
        let left: Vec<_> = fs::read_dir(scratch.path()).expect("ls").collect();
        assert!(left.is_empty(), "the probe left {left:?}");
    }
}
