//! Startup cleanup of the state directory: sandboxes whose owning process died leave a
//! `<state>/sbx-*` directory behind (and, if the VMM outlived its parent despite
//! `PR_SET_PDEATHSIG`, a process). Each live sandbox holds an exclusive `flock` on its `lock`
//! file for its whole life, so a lock we can take means the owner is gone.
//!
//! A pid file is never trusted on its own: the process it names is signalled only after
//! [`verify_vmm`] recognised it (pidfd first, then start time, owner, executable and command
//! line), and only through that pidfd. A pid file naming anything else is reported and the
//! process left alone; the stale directory is removed either way.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::dirfd::{SandboxDir, StateDir};
use super::process::{names, read_pid_file, same_process_alive, verify_vmm};
use super::sys;

/// A directory without a lock file younger than this may be one being created right now.
const CREATE_WINDOW: Duration = Duration::from_secs(60);
/// How long to wait for a killed leftover VMM to disappear.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// One stale sandbox that was cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cleaned {
    /// Its directory name (now removed).
    pub name: String,
    /// The leftover VMM that was killed, if any.
    pub killed_pid: Option<u32>,
    /// A pid its pid file named that was not recognised as its VMM, and so was not signalled.
    pub spared_pid: Option<u32>,
}

/// Whether a directory name is one of ours.
pub(crate) fn is_sandbox_name(name: &str) -> bool {
    name.strip_prefix("sbx-")
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes every stale sandbox directory under `state`, killing leftover VMMs that are verified
/// to be ours (owned by one of `owners`: our euid, and the jail's VMM user if any). Entries that are in use (locked), being created, or not directories
/// (a symlink named like a sandbox is not followed) are left alone. Failures on one entry are
/// logged and do not stop the others.
pub(crate) fn reconcile(state: &Arc<StateDir>, owners: &[u32]) -> std::io::Result<Vec<Cleaned>> {
    let mut cleaned = Vec::new();
    for entry in std::fs::read_dir(state.path())? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| is_sandbox_name(n)) else {
            continue;
        };
        // O_NOFOLLOW | O_DIRECTORY: a symlink or a file under a sandbox name is skipped.
        let Ok(dir) = SandboxDir::open(state.clone(), name) else {
            continue;
        };
        // Holding the lock while cleaning keeps a second reconciler off the same directory.
        let lock = match dir.open_read(names::LOCK) {
            Ok(f) => match sys::try_lock_exclusive(f.as_fd()) {
                Ok(true) => Some(f),
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(dir = %dir.path().display(), error = %e, "cannot lock a sandbox dir");
                    continue;
                }
            },
            Err(_) => {
                let age = std::fs::File::from(dir.fd().try_clone_to_owned()?)
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
        let (mut killed_pid, mut spared_pid) = (None, None);
        if let Some(rec) = read_pid_file(&dir) {
            match verify_vmm(&rec, owners) {
                Ok(pidfd) => {
                    // The owner is gone (we hold its lock) but its VMM is not: kill it.
                    if sys::pidfd_kill(pidfd.as_fd()).is_ok() {
                        killed_pid = Some(rec.pid);
                        let until = std::time::Instant::now() + KILL_WAIT;
                        while same_process_alive(rec.pid, rec.start)
                            && std::time::Instant::now() < until
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
                Err(super::process::NotOurs::Gone) => {}
                Err(why) => {
                    tracing::warn!(
                        dir = %dir.path().display(),
                        pid = rec.pid,
                        ?why,
                        "a stale pid file names a process that is not this sandbox's VMM; not signalled"
                    );
                    spared_pid = Some(rec.pid);
                }
            }
        }
        match dir.remove_all() {
            Ok(()) => {
                tracing::info!(
                    dir = %dir.path().display(),
                    killed_pid,
                    "removed a stale sandbox left by a process that is gone"
                );
                cleaned.push(Cleaned {
                    name: name.to_owned(),
                    killed_pid,
                    spared_pid,
                });
            }
            Err(e) => {
                tracing::warn!(dir = %dir.path().display(), error = %e, "cannot remove a stale sandbox")
            }
        }
        drop(lock);
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::runtime::process::{start_time, write_pid_file, PidRecord, VMM_ARGS};

    #[test]
    fn names() {
        assert!(is_sandbox_name("sbx-0123abcd"));
        assert!(!is_sandbox_name("sbx-"));
        assert!(!is_sandbox_name("sbx-xyz"));
        assert!(!is_sandbox_name("other"));
    }

    /// A child in its own session, like an orphaned VMM.
    fn orphan(program: &str, args: &[&str]) -> std::process::Child {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn().expect("spawn")
    }

    #[test]
    fn stale_dirs_go_live_ones_stay_and_only_verified_vmms_die() {
        let root = tempfile::tempdir().expect("tempdir");
        let state =
            Arc::new(StateDir::open(&root.path().join("state"), sys::euid()).expect("state"));
        let mk = |name: &str| {
            let dir = SandboxDir::create(state.clone(), name).expect("mkdir");
            dir.create_file(names::LOCK, 0o600).expect("lock file");
            dir.create_file(names::ROOTFS, 0o600).expect("file");
            dir
        };
        // 1. Stale, with a dead pid in its pid file.
        let dead = mk("sbx-01");
        let mut child = Command::new("true").spawn().expect("true");
        let dead_pid = child.id();
        child.wait().expect("reaped");
        std::fs::write(dead.join(names::PID), format!("{dead_pid} 1\n/bin/true\n")).expect("pid");
        // 2. Stale, and its "VMM" (a shell loop with the VMM's arguments, in its own session,
        // like an orphan) still runs.
        let orphan_dir = mk("sbx-02");
        let mut vmm = orphan(
            "sh",
            &[
                "-c",
                "while :; do sleep 0.05; done",
                "sh",
                VMM_ARGS[0],
                VMM_ARGS[1],
            ],
        );
        write_pid_file(&orphan_dir, vmm.id()).expect("pid");
        // 3. Stale, and its pid file was forged to name an unrelated live process (right pid,
        // start time and executable: only the command line gives it away).
        let forged_dir = mk("sbx-04");
        let mut bystander = orphan("sleep", &["1000"]);
        let rec = PidRecord::of(bystander.id()).expect("record");
        std::fs::write(
            forged_dir.join(names::PID),
            format!("{} {}\n{}\n", rec.pid, rec.start, rec.exe.display()),
        )
        .expect("forged pid file");
        // 4. Live: someone holds its lock.
        let live = mk("sbx-03");
        let held = live.open_read(names::LOCK).expect("open");
        assert!(sys::try_lock_exclusive(held.as_fd()).expect("lock"));
        // 5. Not ours, and a symlink under a sandbox name pointing elsewhere.
        std::fs::create_dir(state.path().join("keep-me")).expect("mkdir");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::write(elsewhere.join(names::LOCK), b"").expect("lock");
        std::os::unix::fs::symlink(&elsewhere, state.path().join("sbx-05")).expect("symlink");

        let mut cleaned = reconcile(&state, &[sys::euid()]).expect("reconcile");
        cleaned.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            cleaned,
            vec![
                Cleaned {
                    name: "sbx-01".into(),
                    killed_pid: None,
                    spared_pid: None,
                },
                Cleaned {
                    name: "sbx-02".into(),
                    killed_pid: Some(vmm.id()),
                    spared_pid: None,
                },
                Cleaned {
                    name: "sbx-04".into(),
                    killed_pid: None,
                    spared_pid: Some(bystander.id()),
                },
            ]
        );
        let status = vmm.wait().expect("reap the killed VMM stand-in");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert_eq!(start_time(vmm.id()), None);
        assert!(
            bystander.try_wait().expect("try_wait").is_none(),
            "the unrelated process was not signalled"
        );
        assert!(!dead.path().exists() && !orphan_dir.path().exists());
        assert!(
            !forged_dir.path().exists(),
            "the forged sandbox's files are gone"
        );
        assert!(
            live.join(names::ROOTFS).exists(),
            "a locked sandbox is left alone"
        );
        assert!(state.path().join("keep-me").exists());
        assert!(
            elsewhere.join(names::LOCK).exists()
                && Path::new(&state.path().join("sbx-05")).exists()
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
        drop(held);
    }
}
