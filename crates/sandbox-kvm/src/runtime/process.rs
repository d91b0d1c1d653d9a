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

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use std::os::unix::process::{CommandExt, ExitStatusExt};

use tokio::sync::watch;

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

/// The arguments and stdio of one VMM: `sandbox-vmm --config <vm.json>`, stdin and stdout null
/// (the console goes to the file the config names), stderr to `log`.
pub(crate) fn vmm_command(vmm: &Path, config: &Path, log: std::fs::File) -> Command {
    let mut cmd = Command::new(vmm);
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .env_remove("RUST_LOG");
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe syscalls
    // (prctl, getppid, close_range) without allocating or taking locks.
    unsafe {
        cmd.pre_exec(move || sys::child_setup(parent));
    }
    cmd
}

/// How a VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmmExit(pub ExitStatus);

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(0), _) => write!(f, "the guest powered off (sandbox-vmm exit 0)"),
            (Some(1), _) => write!(f, "sandbox-vmm failed (exit 1, see vmm.log)"),
            (Some(2), _) => write!(f, "sandbox-vmm usage error (exit 2)"),
            (Some(3), _) => write!(f, "the guest reset or panicked (sandbox-vmm exit 3)"),
            (Some(4), _) => write!(f, "a vCPU triple-faulted (sandbox-vmm exit 4)"),
            (Some(5), _) => write!(f, "KVM reported an internal error (sandbox-vmm exit 5)"),
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
    reaped: Arc<Mutex<Reaped>>,
    exit_rx: watch::Receiver<Option<VmmExit>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl VmmProcess {
    /// Spawns `cmd` on the spawner thread and starts its watcher. Blocking: call it off the
    /// async workers.
    pub fn spawn(cmd: Command) -> std::io::Result<Arc<Self>> {
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| std::io::Error::other("the spawner lock is poisoned"))?
            .send((cmd, reply_tx))
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
        let child = reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("the spawner thread is gone"))??;
        let pid = child.id();
        let reaped = Arc::new(Mutex::new(Reaped::default()));
        let (tx, exit_rx) = watch::channel(None);
        let watcher = {
            let reaped = reaped.clone();
            std::thread::Builder::new()
                .name(format!("vmm-watch-{pid}"))
                .spawn(move || watch_child(child, &reaped, &tx))?
        };
        Ok(Arc::new(Self {
            pid,
            reaped,
            exit_rx,
            watcher: Mutex::new(Some(watcher)),
        }))
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.pid
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
                return VmmExit(ExitStatus::from_raw(libc::SIGKILL));
            }
        }
    }
}

fn watch_child(mut child: Child, reaped: &Mutex<Reaped>, tx: &watch::Sender<Option<VmmExit>>) {
    // Errors other than EINTR mean the child is not waitable: fall through to wait(), which
    // reports the same failure.
    let _ = sys::wait_exited_no_reap(child.id());
    let mut guard = reaped.lock().unwrap_or_else(|p| p.into_inner());
    let status = child
        .wait()
        .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
    let exit = VmmExit(status);
    guard.exit = Some(exit);
    drop(guard);
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

/// The pid file of a sandbox: `<pid> <start time>\n`.
pub(crate) fn write_pid_file(path: &Path, pid: u32) -> std::io::Result<()> {
    let start = start_time(pid).unwrap_or(0);
    std::fs::write(path, format!("{pid} {start}\n"))
}

/// Reads a pid file written by [`write_pid_file`].
pub(crate) fn read_pid_file(path: &Path) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Whether `pid` is alive (not a zombie) and is the process that had `start` as start time.
pub(crate) fn same_process_alive(pid: u32, start: u64) -> bool {
    matches!(proc_stat(pid), Some((state, s)) if s == start && state != 'Z' && state != 'X')
}

/// The file names a sandbox directory holds.
pub(crate) struct SandboxFiles {
    pub dir: PathBuf,
}

impl SandboxFiles {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs.ext4")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_command_has_only_the_chosen_arguments_and_stdio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("vmm.log")).expect("log");
        let cmd = vmm_command(
            Path::new("/opt/sandbox-vmm"),
            &dir.path().join("vm.json"),
            log,
        );
        assert_eq!(cmd.get_program(), "/opt/sandbox-vmm");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args.len(), 2);
        assert_eq!(args[0], "--config");
        assert_eq!(Path::new(args[1]), dir.path().join("vm.json"));
    }

    #[test]
    fn spawn_kill_and_reap_a_real_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000").stdin(Stdio::null());
        let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits");
        // SAFETY: as in vmm_command: only async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(move || sys::child_setup(parent));
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
            cmd.pre_exec(move || sys::child_setup(parent));
        }
        let out = cmd.output().expect("sh runs");
        drop((r, w));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "closed\n");
    }

    #[test]
    fn pid_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.pid");
        let me = std::process::id();
        write_pid_file(&path, me).expect("write");
        let (pid, start) = read_pid_file(&path).expect("read");
        assert_eq!(pid, me);
        assert!(same_process_alive(pid, start));
        assert!(!same_process_alive(pid, start + 1));
    }
}
