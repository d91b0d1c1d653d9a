//! Startup cleanup of the state directory: sandboxes whose owning process died leave a
//! `<state>/sbx-*` directory behind (and, if the VMM outlived its parent despite
//! `PR_SET_PDEATHSIG`, a process). Each live sandbox holds an exclusive `flock` on its `lock`
//! file for its whole life, so a lock we can take means the owner is gone.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::process::{read_pid_file, same_process_alive, SandboxFiles};
use super::sys;

/// A directory without a lock file younger than this may be one being created right now.
const CREATE_WINDOW: Duration = Duration::from_secs(60);
/// How long to wait for a killed leftover VMM to disappear.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// One stale sandbox that was cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cleaned {
    /// Its directory (now removed).
    pub dir: PathBuf,
    /// The leftover VMM that was killed, if any.
    pub killed_pid: Option<u32>,
}

/// Whether a directory name is one of ours.
pub(crate) fn is_sandbox_name(name: &str) -> bool {
    name.strip_prefix("sbx-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes every stale sandbox directory under `state_dir`, killing leftover VMMs. Entries that
/// are in use (locked) or being created are left alone. Failures on one entry are logged and do
/// not stop the others.
pub(crate) fn reconcile(state_dir: &Path) -> std::io::Result<Vec<Cleaned>> {
    let mut cleaned = Vec::new();
    for entry in std::fs::read_dir(state_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !is_sandbox_name(&name.to_string_lossy()) || !entry.file_type()?.is_dir() {
            continue;
        }
        let files = SandboxFiles { dir: entry.path() };
        // Holding the lock while cleaning keeps a second reconciler off the same directory.
        let lock = match File::open(files.lock()) {
            Ok(f) => match sys::try_lock_exclusive(f.as_fd()) {
                Ok(true) => Some(f),
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(dir = %files.dir.display(), error = %e, "cannot lock a sandbox dir");
                    continue;
                }
            },
            Err(_) => {
                let age = entry
                    .metadata()?
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok());
                if age.is_none_or(|a| a < CREATE_WINDOW) {
                    continue;
                }
                None
            }
        };
        let mut killed_pid = None;
        if let Some((pid, start)) = read_pid_file(&files.pid()) {
            if same_process_alive(pid, start) {
                // The owner is gone (we hold its lock) but its VMM is not: kill it.
                if sys::kill_pid(pid).is_ok() {
                    killed_pid = Some(pid);
                    let until = std::time::Instant::now() + KILL_WAIT;
                    while same_process_alive(pid, start) && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        match std::fs::remove_dir_all(&files.dir) {
            Ok(()) => {
                tracing::info!(
                    dir = %files.dir.display(),
                    killed_pid,
                    "removed a stale sandbox left by a process that is gone"
                );
                cleaned.push(Cleaned {
                    dir: files.dir.clone(),
                    killed_pid,
                });
            }
            Err(e) => {
                tracing::warn!(dir = %files.dir.display(), error = %e, "cannot remove a stale sandbox")
            }
        }
        drop(lock);
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::runtime::process::{start_time, write_pid_file};

    #[test]
    fn names() {
        assert!(is_sandbox_name("sbx-0123abcd"));
        assert!(!is_sandbox_name("sbx-"));
        assert!(!is_sandbox_name("sbx-xyz"));
        assert!(!is_sandbox_name("other"));
    }

    #[test]
    fn stale_dirs_go_live_ones_stay_and_leftover_vmms_die() {
        let state = tempfile::tempdir().expect("tempdir");
        let mk = |name: &str| {
            let dir = state.path().join(name);
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::write(dir.join("lock"), b"").expect("lock file");
            std::fs::write(dir.join("rootfs.ext4"), b"disk").expect("file");
            dir
        };
        // 1. Stale, with a dead pid in its pid file.
        let dead = mk("sbx-01");
        let mut child = Command::new("true").spawn().expect("true");
        let dead_pid = child.id();
        child.wait().expect("reaped");
        std::fs::write(dead.join("vmm.pid"), format!("{dead_pid} 1\n")).expect("pid");
        // 2. Stale, but its "VMM" (a sleep in its own session, like an orphan) still runs.
        let orphan_dir = mk("sbx-02");
        let mut orphan = Command::new("sleep");
        orphan.arg("1000").stdin(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            orphan.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut orphan = orphan.spawn().expect("sleep");
        write_pid_file(&orphan_dir.join("vmm.pid"), orphan.id()).expect("pid");
        // 3. Live: someone holds its lock.
        let live = mk("sbx-03");
        let held = File::open(live.join("lock")).expect("open");
        assert!(sys::try_lock_exclusive(held.as_fd()).expect("lock"));
        // 4. Not ours.
        std::fs::create_dir(state.path().join("keep-me")).expect("mkdir");

        let mut cleaned = reconcile(state.path()).expect("reconcile");
        cleaned.sort_by(|a, b| a.dir.cmp(&b.dir));
        assert_eq!(
            cleaned,
            vec![
                Cleaned {
                    dir: dead.clone(),
                    killed_pid: None
                },
                Cleaned {
                    dir: orphan_dir.clone(),
                    killed_pid: Some(orphan.id())
                },
            ]
        );
        let status = orphan.wait().expect("reap the killed sleep");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(!dead.exists() && !orphan_dir.exists());
        assert!(
            live.join("rootfs.ext4").exists(),
            "a locked sandbox is left alone"
        );
        assert!(state.path().join("keep-me").exists());
        assert_eq!(start_time(orphan.id()), None);
        drop(held);
    }
}
