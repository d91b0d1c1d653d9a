//! One `sandbox-vmm` child process: spawned from a process-wide spawner thread, watched by a
//! thread of its own, killed without pid-reuse races.
//!
//! Why a spawner thread: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio's blocking threads exit after idling, which would kill every VMM they
//! spawned; the spawner thread lives as long as the process.
//!
//! Why `waitid(WNOWAIT)`: the watcher learns that the child exited without reaping it, then reaps
//! it under the same lock that `kill` takes. While the lock is held the child is either alive or
//! an unreaped zombie, so its pid cannot have been reused by another process.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use std::os::unix::process::{CommandExt, ExitStatusExt};

use tokio::sync::watch;

use super::dirfd::SandboxDir;
use super::jail::{PreparedJail, SandboxCgroup};
use super::sys;

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The process-wide spawner thread's queue.
fn spawner() -> &'static Mutex<mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        // The thread never exits (the queue's sender lives in a static), so children that set
        // PR_SET_PDEATHSIG die exactly when this process does.
        let spawned = std::thread::Builder::new()
            .name("sandbox-spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the sandbox spawner thread");
        }
        Mutex::new(tx)
    })
}

/// The arguments every VMM gets (the config is named relative to its working directory).
pub(crate) const VMM_ARGS: [&str; 2] = ["--config", names::CONFIG];

/// The arguments, working directory and stdio of one VMM: `sandbox-vmm --config vm.json`, run
/// in the sandbox directory (entered by `fchdir` on `dir`'s fd, so the config, the disk, the
/// console and the socket it names relatively are the directory's, even if it was renamed or
/// swapped), stdin and stdout null (the console goes to the file the config names), stderr to
/// `log`. `dir` must stay open until the command is spawned.
pub(crate) fn vmm_command(
    vmm: &Path,
    dir: &SandboxDir,
    log: std::fs::File,
    jail: PreparedJail,
) -> Command {
    // With a private root the exec happens inside it, where the binary is at its canonical path.
    let program = jail.root.as_ref().map_or(vmm, |r| r.exe.as_path());
    let mut cmd = Command::new(program);
    cmd.args(VMM_ARGS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .env_remove("RUST_LOG");
    if let Some(root) = &jail.root {
        // The private root has no /etc/ld.so.cache: name the libraries' directories.
        if !root.library_path.is_empty() {
            cmd.env("LD_LIBRARY_PATH", &root.library_path);
        }
    }
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    let cwd = dir.fd().as_raw_fd();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe syscalls
    // (fchdir, prctl, getppid, close_range, then the jail's write, unshare, mount, pivot_root,
    // umount2, chdir, setrlimit, prctl, setgroups, setresgid, setresuid, fcntl)
    // without allocating or taking locks; `cwd` and the jail's cgroup fd are open until the
    // spawn returns (documented requirement on the caller).
    unsafe {
        cmd.pre_exec(move || {
            sys::child_setup(parent, Some(cwd))?;
            jail.apply_in_child()
        });
    }
    cmd
}

/// How a VMM ended: its status, and whether its cgroup's OOM killer ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmmExit(pub ExitStatus, pub Option<OomKill>);

/// The kernel's OOM killer ended a process of the VMM's cgroup: `memory.events` counted an
/// `oom_kill` (cgroup v2, "memory.events").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OomKill {
    /// The cgroup's `memory.max`, bytes (`None`: unreadable or `max`).
    pub memory_max: Option<u64>,
    /// Bytes of files in memory charged to the cgroup (`memory.stat` `shmem`): a writable disk
    /// in a tmpfs state directory grows this with every guest write.
    pub shmem: Option<u64>,
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(0), _) => write!(f, "the guest powered off (sandbox-vmm exit 0)"),
            (Some(1), _) => write!(f, "sandbox-vmm failed (exit 1, see vmm.log)"),
            (Some(2), _) => write!(f, "sandbox-vmm usage error (exit 2)"),
            (Some(3), _) => write!(f, "the guest reset or panicked (sandbox-vmm exit 3)"),
            (Some(4), _) => write!(f, "a vCPU triple-faulted (sandbox-vmm exit 4)"),
            (Some(5), _) => write!(f, "KVM reported an internal error (sandbox-vmm exit 5)"),
            (Some(7), _) => write!(
                f,
                "sandbox-vmm made a system call its seccomp filter forbids (exit 7, see vmm.log)"
            ),
            (Some(c), _) => write!(f, "sandbox-vmm exited with status {c}"),
            (None, Some(s)) => write!(f, "sandbox-vmm was killed by signal {s}"),
            (None, None) => write!(f, "sandbox-vmm ended"),
        }
    }
}

#[derive(Debug, Default)]
struct Reaped {
    exit: Option<VmmExit>,
}

/// A running (or ended) `sandbox-vmm`.
#[derive(Debug)]
pub(crate) struct VmmProcess {
    pid: u32,
    /// The VMM's cgroup (docs/jail.md), removed by the watcher once the VMM is reaped.
    cgroup_dir: Option<PathBuf>,
    reaped: Arc<Mutex<Reaped>>,
    exit_rx: watch::Receiver<Option<VmmExit>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl VmmProcess {
    /// Spawns `cmd` on the spawner thread and starts its watcher. Blocking: call it off the
    /// async workers.
    #[cfg(test)]
    pub fn spawn(cmd: Command) -> std::io::Result<Arc<Self>> {
        Self::spawn_jailed(cmd, None)
    }

    /// [`VmmProcess::spawn`] for a command whose child joins `cgroup` (see
    /// [`PreparedJail`]); the watcher kills and removes the cgroup once the VMM is reaped, and
    /// a failed spawn removes it at once.
    pub fn spawn_jailed(cmd: Command, cgroup: Option<SandboxCgroup>) -> std::io::Result<Arc<Self>> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let child = spawner()
            .lock()
            .map_err(|_| std::io::Error::other("the spawner lock is poisoned"))
            .and_then(|tx| {
                tx.send((cmd, reply_tx))
                    .map_err(|_| std::io::Error::other("the spawner thread is gone"))
            })
            .and_then(|()| {
                reply_rx
                    .recv()
                    .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
            });
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    let _ = cg.kill_and_remove();
                }
                return Err(e);
            }
        };
        let cgroup_dir = cgroup.as_ref().map(|c| c.dir().to_path_buf());
        let pid = child.id();
        let reaped = Arc::new(Mutex::new(Reaped::default()));
        let (tx, exit_rx) = watch::channel(None);
        let watcher = {
            let reaped = reaped.clone();
            std::thread::Builder::new()
                .name(format!("vmm-watch-{pid}"))
                .spawn(move || watch_child(child, &reaped, &tx, cgroup))?
        };
        Ok(Arc::new(Self {
            pid,
            cgroup_dir,
            reaped,
            exit_rx,
            watcher: Mutex::new(Some(watcher)),
        }))
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VMM's cgroup directory, if it runs in one (gone once the VMM was reaped).
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.cgroup_dir.as_deref()
    }

    /// How it ended, if it has.
    pub fn exit(&self) -> Option<VmmExit> {
        *self.exit_rx.borrow()
    }

    /// Sends `SIGKILL` unless it was already reaped (then the pid may belong to someone else).
    pub fn kill(&self) {
        let guard = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if guard.exit.is_none() {
            let _ = sys::kill_pid(self.pid);
        }
    }

    /// Waits until the watcher has reaped the VMM. Blocking; bounded by the VMM's exit (after
    /// [`VmmProcess::kill`], immediate unless it is stuck in uninterruptible I/O).
    pub fn wait_blocking(&self) {
        let handle = self
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Waits (async) until the VMM has been reaped.
    pub async fn wait(&self) -> VmmExit {
        let mut rx = self.exit_rx.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The watcher is gone without a status: treat it as killed.
                return VmmExit(ExitStatus::from_raw(libc::SIGKILL), None);
            }
        }
    }
}

fn watch_child(
    mut child: Child,
    reaped: &Mutex<Reaped>,
    tx: &watch::Sender<Option<VmmExit>>,
    cgroup: Option<SandboxCgroup>,
) {
    // Errors other than EINTR mean the child is not waitable: fall through to wait(), which
    // reports the same failure.
    let _ = sys::wait_exited_no_reap(child.id());
    // While the cgroup still exists: did its OOM killer end the VMM?
    let oom = cgroup
        .as_ref()
        .and_then(|cg| super::jail::oom_killed(cg.dir()));
    let mut guard = reaped.lock().unwrap_or_else(|p| p.into_inner());
    let status = child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
    let exit = VmmExit(status, oom);
    guard.exit = Some(exit);
    drop(guard);
    // Before anyone learns of the exit: whoever waited for it finds the cgroup gone too.
    if let Some(cg) = cgroup {
        if let Err(err) = cg.kill_and_remove() {
            tracing::warn!(cgroup = %cg.dir().display(), %err, "cannot remove a sandbox cgroup");
        }
    }
    let _ = tx.send(Some(exit));
}

/// The state letter and the start time of `pid` in clock ticks since boot (`/proc/<pid>/stat`
/// fields 3 and 22); the start time with the pid identifies one process across pid reuse.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some((state, rest.nth(18)?.parse().ok()?))
}

/// The start time of `pid` (see [`proc_stat`]).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, start)| start)
}

/// The longest pid file read back (a pid, a start time and a path).
const MAX_PID_FILE: u64 = 8 * 1024;

/// What a sandbox's pid file records about its VMM: enough to recognise that very process later,
/// across pid reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PidRecord {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start: u64,
    /// The executable (`/proc/<pid>/exe` after the exec).
    pub exe: PathBuf,
}

impl PidRecord {
    /// The record of a running process.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        let start =
            start_time(pid).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
        Ok(Self { pid, start, exe })
    }

    /// `<pid> <start>\n<exe>\n`.
    fn encode(&self) -> Vec<u8> {
        let mut v = format!("{} {}\n", self.pid, self.start).into_bytes();
        v.extend_from_slice(self.exe.as_os_str().as_bytes());
        v.push(b'\n');
        v
    }

    /// Parses [`PidRecord::encode`]'s format; `None` for anything else (an older pid file
    /// without the executable included: such a file never names a process to signal).
    pub fn parse(text: &[u8]) -> Option<Self> {
        let nl = text.iter().position(|&b| b == b'\n')?;
        let first = std::str::from_utf8(&text[..nl]).ok()?;
        let mut it = first.split(' ');
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        if it.next().is_some() {
            return None;
        }
        let exe = text[nl + 1..].strip_suffix(b"\n")?;
        if exe.is_empty() || exe.contains(&b'\n') {
            return None;
        }
        let exe = PathBuf::from(std::ffi::OsStr::from_bytes(exe));
        Some(Self { pid, start, exe })
    }
}

/// Writes the pid file of the VMM `pid` into the sandbox directory (a new file, through the
/// directory's fd).
pub(crate) fn write_pid_file(dir: &SandboxDir, pid: u32) -> std::io::Result<()> {
    use std::io::Write;
    let rec = PidRecord::of(pid)?;
    let mut f = dir.create_file(names::PID, 0o600)?;
    f.write_all(&rec.encode())
}

/// Reads a sandbox's pid file (through the directory's fd, not following symlinks, at most
/// [`MAX_PID_FILE`] bytes); `None` when missing or malformed.
pub(crate) fn read_pid_file(dir: &SandboxDir) -> Option<PidRecord> {
    let f = dir.open_read(names::PID).ok()?;
    let mut buf = Vec::new();
    f.take(MAX_PID_FILE).read_to_end(&mut buf).ok()?;
    PidRecord::parse(&buf)
}

/// Why a recorded process was not recognised (so it must not be signalled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotOurs {
    /// No such process, or it is a zombie.
    Gone,
    /// The pid belongs to a process started at another time (pid reuse).
    StartTime,
    /// Another user's process.
    Owner,
    /// Another executable.
    Exe,
    /// Not started with a VMM's arguments.
    Cmdline,
}

/// Opens a pidfd for `rec.pid` and then checks, while the pidfd pins the process, that it is the
/// recorded one: same start time, alive, owned by one of `owners` (our euid, and the jail's
/// VMM user when one is configured), same executable (a `(deleted)` suffix
/// allowed: the binary may have been rebuilt), and a command line ending in [`VMM_ARGS`].
/// Signal only through the returned pidfd: it cannot reach a later owner of the pid.
pub(crate) fn verify_vmm(rec: &PidRecord, owners: &[u32]) -> Result<OwnedFd, NotOurs> {
    // The pidfd first: if the process dies and the pid is reused after this point, the checks
    // below see the newcomer (different start time) and refuse; the pidfd still names the
    // original, so a signal through it can only ever reach the process that was checked.
    let pidfd = sys::pidfd_open(rec.pid).map_err(|_| NotOurs::Gone)?;
    if !same_process_alive(rec.pid, rec.start) {
        return Err(match start_time(rec.pid) {
            Some(s) if s != rec.start => NotOurs::StartTime,
            _ => NotOurs::Gone,
        });
    }
    let proc = PathBuf::from(format!("/proc/{}", rec.pid));
    match std::fs::metadata(&proc) {
        Ok(m) if owners.contains(&m.uid()) => {}
        Ok(_) => return Err(NotOurs::Owner),
        Err(_) => return Err(NotOurs::Gone),
    }
    let exe = std::fs::read_link(proc.join("exe")).map_err(|_| NotOurs::Exe)?;
    let mut deleted = rec.exe.clone().into_os_string();
    deleted.push(" (deleted)");
    if exe != rec.exe && exe.as_os_str() != deleted {
        return Err(NotOurs::Exe);
    }
    let cmdline = std::fs::read(proc.join("cmdline")).map_err(|_| NotOurs::Gone)?;
    let args: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(&cmdline)
        .split(|&b| b == 0)
        .collect();
    let tail = args.len().checked_sub(VMM_ARGS.len()).map(|i| &args[i..]);
    if !tail.is_some_and(|t| t.iter().zip(VMM_ARGS).all(|(a, b)| *a == b.as_bytes())) {
        return Err(NotOurs::Cmdline);
    }
    Ok(pidfd)
}

/// Whether `pid` is alive (not a zombie) and is the process that had `start` as start time.
pub(crate) fn same_process_alive(pid: u32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, s)) if s == start && state != 'Z' && state != 'X')
}

/// The file names a sandbox directory holds.
pub(crate) mod names {
    /// The private rootfs copy (`DiskMode::Copy`).
    pub const ROOTFS: &str = "rootfs.ext4";
    /// The root disk's qcow2 overlay (`DiskMode::Overlay`).
    pub const OVERLAY: &str = "disk.qcow2";
    /// The VMM's count of guest writes the overlay refused for space (8 bytes, `u64` LE).
    pub const DISK_FULL: &str = "disk-full.count";
    /// The VM config.
    pub const CONFIG: &str = "vm.json";
    /// The VMM's vsock Unix socket.
    pub const VSOCK: &str = "vsock.sock";
    /// The guest console log.
    pub const CONSOLE: &str = "console.log";
    /// The VMM's stderr.
    pub const VMM_LOG: &str = "vmm.log";
    /// The pid file.
    pub const PID: &str = "vmm.pid";
    /// The lock file.
    pub const LOCK: &str = "lock";
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use crate::runtime::dirfd::StateDir;

    fn sandbox_dir(root: &Path, name: &str) -> SandboxDir {
        let state = StateDir::open(&root.join("state"), sys::euid()).expect("state");
        SandboxDir::create(Arc::new(state), name).expect("sandbox dir")
    }

    #[test]
    fn vmm_command_has_only_the_chosen_arguments_and_stdio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = sandbox_dir(dir.path(), "sbx-01");
        let log = sb.create_file(names::VMM_LOG, 0o600).expect("log");
        let cmd = vmm_command(
            Path::new("/opt/sandbox-vmm"),
            &sb,
            log,
            PreparedJail::none(),
        );
        assert_eq!(cmd.get_program(), "/opt/sandbox-vmm");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["--config", "vm.json"]);
    }

    #[test]
    fn the_vmm_runs_in_the_directory_it_was_given_even_after_a_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = sandbox_dir(dir.path(), "sbx-02");
        let script = dir.path().join("fake-vmm");
        std::fs::write(&script, "#!/bin/sh\ncat \"$2\" > seen\n").expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        sb.create_file(names::CONFIG, 0o600)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{}"))
            .expect("config");
        // Swap the directory for a symlink to a decoy before the spawn.
        let moved = dir.path().join("moved");
        std::fs::rename(sb.path(), &moved).expect("rename");
        let decoy = dir.path().join("decoy");
        std::fs::create_dir(&decoy).expect("decoy");
        std::fs::write(decoy.join(names::CONFIG), b"decoy").expect("decoy config");
        std::os::unix::fs::symlink(&decoy, sb.path()).expect("symlink");
        let log = sb.create_file(names::VMM_LOG, 0o600).expect("log");
        let p =
            VmmProcess::spawn(vmm_command(&script, &sb, log, PreparedJail::none())).expect("spawn");
        p.wait_blocking();
        assert_eq!(p.exit().and_then(|e| e.0.code()), Some(0));
        assert_eq!(std::fs::read(moved.join("seen")).expect("seen"), b"{}");
        assert!(!decoy.join("seen").exists());
    }

    #[test]
    fn spawn_kill_and_reap_a_real_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits");
        // SAFETY: as in vmm_command: only async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || sys::child_setup(parent, None));
        }
        let p = VmmProcess::spawn(cmd).expect("spawn sleep");
        let start = start_time(p.pid()).expect("alive");
        assert!(same_process_alive(p.pid(), start));
        assert_eq!(p.exit(), None);
        p.kill();
        p.wait_blocking();
        assert_eq!(p.exit().and_then(|e| e.0.signal()), Some(libc::SIGKILL));
        assert!(!same_process_alive(p.pid(), start));
        // A second kill after the reap is a no-op (the pid may already be someone else's).
        p.kill();
        assert_eq!(p.exit().and_then(|e| e.0.signal()), Some(libc::SIGKILL));
    }

    #[test]
    fn child_setup_marks_inherited_fds_cloexec() {
        // An fd *without* CLOEXEC in the parent must not reach the child.
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let raw = std::os::fd::AsRawFd::as_raw_fd(&w);
        // SAFETY: `raw` is a valid fd owned by `w` for this scope; F_SETFD touches no memory.
        unsafe { libc::fcntl(raw, libc::F_SETFD, 0) };
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "[ -e /proc/self/fd/{raw} ] && echo leaked || echo closed"
        ));
        cmd.stdout(Stdio::piped()).stdin(Stdio::null());
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits");
        // SAFETY: only async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || sys::child_setup(parent, None));
        }
        let out = cmd.output().expect("sh runs");
        drop((r, w));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "closed\n");
    }

    #[test]
    fn pid_files_round_trip_and_verify_only_the_recorded_vmm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sb = sandbox_dir(dir.path(), "sbx-03");
        // A stand-in VMM: a shell loop started with the VMM's arguments.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do sleep 0.05; done", "sh"])
            .args(VMM_ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let p = VmmProcess::spawn(cmd).expect("spawn");
        write_pid_file(&sb, p.pid()).expect("write");
        let rec = read_pid_file(&sb).expect("read");
        assert_eq!(rec.pid, p.pid());
        assert_eq!(PidRecord::parse(&rec.encode()), Some(rec.clone()));
        let euid = sys::euid();
        assert!(verify_vmm(&rec, &[euid]).is_ok());
        // A VMM that runs as the jail's user (JailConfig::user) is ours too.
        assert!(verify_vmm(&rec, &[euid.wrapping_add(1), euid]).is_ok());
        let wrong = |f: &dyn Fn(&mut PidRecord)| {
            let mut r = rec.clone();
            f(&mut r);
            verify_vmm(&r, &[euid]).err()
        };
        assert_eq!(wrong(&|r| r.start += 1), Some(NotOurs::StartTime));
        assert_eq!(
            wrong(&|r| r.exe = PathBuf::from("/bin/true")),
            Some(NotOurs::Exe)
        );
        assert!(matches!(
            verify_vmm(&rec, &[euid.wrapping_add(1)]),
            Err(NotOurs::Owner)
        ));
        // The test process itself: right start time and exe, but not a VMM's command line.
        let me = PidRecord::of(std::process::id()).expect("me");
        assert_eq!(verify_vmm(&me, &[euid]).err(), Some(NotOurs::Cmdline));
        p.kill();
        p.wait_blocking();
        assert_eq!(verify_vmm(&rec, &[euid]).err(), Some(NotOurs::Gone));
        // Malformed and old-format files name nothing.
        for bad in [
            &b"123 456\n"[..],
            b"123\n/x\n",
            b"x y\n/x\n",
            b"1 2 3\n/x\n",
            b"",
        ] {
            assert_eq!(PidRecord::parse(bad), None, "{bad:?}");
        }
    }
}
