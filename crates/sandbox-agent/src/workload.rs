//! The workload cgroup, and the agent's locked code.
//!
//! Every command the agent starts runs in `/sys/fs/cgroup/workload`, a cgroup v2 leaf whose
//! `pids.max` leaves the agent room for its threads (a fork bomb stops 64 tasks short of the
//! kernel's limit) and which counts the commands' memory (`memory.current`, `memory.events`)
//! apart from the agent's.
//!
//! No `memory.max`: measured in the KVM tier, a command filling a 208 MiB limit with shared
//! anonymous memory (Python's `mmap`) was still running 240 s later, with 41,037 `max` events
//! and not one OOM kill. On a swapless guest a memory cgroup at its limit keeps reclaiming the
//! command's own page cache (its program text), which the command faults back in, and the
//! cgroup's OOM killer, which only runs once reclaim makes no progress, never comes. The guest
//! kernel's global OOM killer ends the same command (about 100 s under nested emulation). What
//! keeps the agent alive through that is [`lock_agent_memory`].
//!
//! Only as PID 1: a test agent running as a normal process leaves cgroups alone.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::OnceLock;

/// Where the agent mounts cgroup v2.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The leaf every command joins.
const WORKLOAD: &str = "workload";
/// Tasks (processes and threads) kept out of the workload's reach, for the agent's threads.
const PIDS_RESERVE: u64 = 64;

/// `cgroup.procs` of the workload leaf, open for writing, once set up.
static PROCS: OnceLock<OwnedFd> = OnceLock::new();

/// `pids.max` of the workload leaf for a kernel-wide `threads_max`: all tasks but 64, never
/// fewer than half.
pub fn pids_max(threads_max: u64) -> u64 {
    threads_max
        .saturating_sub(PIDS_RESERVE)
        .max(threads_max / 2)
}

/// Mounts cgroup v2 at `/sys/fs/cgroup`, creates the workload leaf with its `pids.max` and keeps
/// its `cgroup.procs` open for [`procs_fd`]. Failures are logged and leave commands in the root
/// cgroup: the sandbox still works, without the task reserve.
pub fn setup() {
    match try_setup(Path::new(CGROUP_ROOT)) {
        Ok((fd, pids)) => {
            crate::debug!("workload cgroup: pids.max {pids:?}");
            let _ = PROCS.set(fd);
        }
        Err(e) => crate::log!("no workload cgroup, commands share the agent's task limit: {e}"),
    }
}

fn try_setup(root: &Path) -> Result<(OwnedFd, Option<u64>), String> {
    use nix::mount::{mount, MsFlags};
    // A guest's init starts in the root cgroup. PID 1 of a PID namespace on a host (the agent's
    // own PID-1 test) does not, and must not create cgroups in the host's hierarchy.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if !in_root_cgroup(&own) {
        return Err(format!(
            "not in the root cgroup ({:?}), so not a guest's init",
            own.trim()
        ));
    }
    let _ = std::fs::create_dir_all(root);
    match mount(
        Some("cgroup2"),
        root,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => return Err(format!("mount cgroup2 on {}: {e}", root.display())),
    }
    let write = |path: &Path, value: &str| {
        std::fs::write(path, value)
            .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
    };
    write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
    let leaf = root.join(WORKLOAD);
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", leaf.display())),
    }
    let pids = std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .map(pids_max);
    if let Some(pids) = pids {
        write(&leaf.join("pids.max"), &pids.to_string())?;
    }
    let procs = leaf.join("cgroup.procs");
    let fd = OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| format!("open {}: {e}", procs.display()))?;
    Ok((OwnedFd::from(fd), pids))
}

/// Whether a `/proc/self/cgroup` text puts the process at the root of every hierarchy it lists
/// (`0::/` for cgroup v2). An empty text counts as the root: Linux lists the v2 hierarchy only
/// once something has mounted cgroup2, which in a fresh guest nothing has yet.
fn in_root_cgroup(text: &str) -> bool {
    text.lines()
        .filter(|l| !l.is_empty())
        .all(|l| l.rsplit_once(':').is_some_and(|(_, path)| path == "/"))
}

/// The workload leaf's `cgroup.procs`, open for writing (a forked child writes `0` to join), or
/// `None` when there is no leaf. The fd is `O_CLOEXEC`: commands do not inherit it.
pub fn procs_fd() -> Option<RawFd> {
    PROCS.get().map(AsRawFd::as_raw_fd)
}

/// Locks every page the agent has mapped now (its program text and data, about 2 MiB) into RAM
/// (`mlockall(MCL_CURRENT)`); called before the agent starts any thread.
///
/// Why: when a command fills guest RAM, the guest kernel OOM-kills it, and the oom_reaper marks
/// the victim done after about 2 s even when it could free nothing (shared anonymous memory and
/// tmpfs files are only freed once the victim has exited). If the agent page-faults in that
/// window (its text evicted under the pressure), the kernel must allocate for PID 1, finds no
/// process it may kill (PID 1 never is one) and panics, "System is deadlocked on memory": the
/// whole sandbox is lost (seen once in CI, the agent faulting its code back in after a `read`).
/// With its text locked the agent runs through the window without faulting; the rest of its
/// memory is anonymous, which a swapless guest never evicts.
pub fn lock_agent_memory() {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    if let Err(e) = mlockall(MlockAllFlags::MCL_CURRENT) {
        crate::log!("cannot lock the agent's memory (mlockall): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_task_reserve_is_64_or_half() {
        assert_eq!(pids_max(1000), 936);
        assert_eq!(pids_max(100), 50);
        assert_eq!(pids_max(0), 0);
    }

    #[test]
    fn only_a_process_in_the_root_cgroup_sets_up_the_leaf() {
        assert!(in_root_cgroup("0::/\n"));
        assert!(in_root_cgroup("2:memory:/\n1:name=systemd:/\n"));
        assert!(!in_root_cgroup(
            "0::/user.slice/user-0.slice/session-1.scope\n"
        ));
        assert!(!in_root_cgroup("2:memory:/\n0::/init.scope\n"));
        // A fresh guest: no hierarchy mounted yet, nothing listed.
        assert!(in_root_cgroup(""));
    }
}
