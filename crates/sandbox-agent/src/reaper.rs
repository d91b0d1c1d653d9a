//! Reaping: one thread calls `waitpid(-1)` for every child and orphan, and hands the exit status
//! of each *command* (a pid some connection registered) to that connection.
//!
//! The agent is PID 1 (or a child subreaper), so every orphaned descendant becomes its child and
//! must be reaped, or zombies pile up. A blanket `waitpid(-1)` would also swallow the statuses of
//! our own commands; so spawning happens under the registry lock and the reaper looks the pid up
//! under the same lock: a command that exits instantly is still found after it is registered.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::conn::Event;

#[derive(Debug, Default)]
struct Registry {
    waiters: HashMap<Pid, Sender<Event>>,
    /// Bumped on every spawn, so the reaper knows a new child may exist after `ECHILD`.
    generation: u64,
    orphans_reaped: u64,
}

/// Shared between the reaper thread and every connection.
#[derive(Debug, Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `spawn` with the registry locked and registers the pid it returns, so its exit
    /// status goes to `tx` as [`Event::Exited`].
    pub fn spawn_registered(
        &self,
        tx: Sender<Event>,
        spawn: impl FnOnce() -> io::Result<Pid>,
    ) -> io::Result<Pid> {
        let mut reg = self.lock();
        let pid = spawn()?;
        reg.waiters.insert(pid, tx);
        reg.generation = reg.generation.wrapping_add(1);
        self.spawned.notify_all();
        Ok(pid)
    }

    /// Sends `SIGKILL` to the process group of every running command (before power-off, so that
    /// outside a VM no command outlives the agent).
    pub fn kill_all_groups(&self) {
        for pid in self.lock().waiters.keys() {
            let _ = nix::sys::signal::killpg(*pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// How many processes nobody registered (orphans) have been reaped.
    #[cfg(test)]
    pub fn orphans_reaped(&self) -> u64 {
        self.lock().orphans_reaped
    }

    fn run(&self) {
        loop {
            let generation = self.lock().generation;
            match waitpid(None::<Pid>, None) {
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                        continue;
                    }
                    let waiter = {
                        let mut reg = self.lock();
                        let w = reg.waiters.remove(&pid);
                        if w.is_none() {
                            reg.orphans_reaped += 1;
                        }
                        w
                    };
                    if let Some(tx) = waiter {
                        // The connection may be gone; then nobody needs the status.
                        let _ = tx.send(Event::Exited(status));
                    }
                }
                Err(Errno::ECHILD) => {
                    // No children: sleep until the next spawn (orphans only ever come from
                    // descendants of our children, so none can appear before that).
                    let mut reg = self.lock();
                    while reg.generation == generation {
                        reg = self.spawned.wait(reg).unwrap_or_else(|p| p.into_inner());
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    crate::log!("waitpid failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::sys::{spawn, SpawnPlan};

    fn sh(script: &str) -> SpawnPlan {
        let c = |s: &str| CString::new(s).expect("no NUL");
        SpawnPlan::new(
            c("/bin/sh"),
            vec![c("sh"), c("-c"), c(script)],
            vec![],
            c("/"),
            None,
            "sh",
        )
    }

    /// Commands that exit at once keep their statuses, and their orphans are reaped too.
    /// (This is the only test in this binary that forks, so the blanket waitpid(-1) cannot steal
    /// another test's child.)
    #[test]
    fn keeps_command_statuses_and_reaps_orphans() {
        nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
        let reaper = Reaper::start().expect("reaper");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = null.as_raw_fd();
        let mut waiting = Vec::new();
        for i in 0..100 {
            let (tx, rx) = mpsc::channel();
            // Every fifth command leaves an orphan behind.
            let script = if i % 5 == 0 {
                format!("sleep 0.01 & exit {i}")
            } else {
                format!("exit {i}")
            };
            let plan = sh(&script);
            let pid = reaper
                .spawn_registered(tx, || spawn(&plan, fd, fd, fd))
                .expect("spawn");
            waiting.push((i, pid, rx));
        }
        for (i, pid, rx) in waiting {
            match rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a status for every command")
            {
                Event::Exited(WaitStatus::Exited(p, code)) => assert_eq!((p, code), (pid, i)),
                other => panic!("command {i}: {other:?}"),
            }
        }
        for _ in 0..300 {
            if reaper.orphans_reaped() >= 20 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("only {} of 20 orphans were reaped", reaper.orphans_reaped());
    }
}
