//! The agent's raw system calls: `fork`+`execve` of commands, adopting accepted socket fds, and
//! making sure PID 1 has a console. Everything `unsafe` in the agent lives here.

use std::ffi::{c_char, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

/// Everything a child needs, prepared before `fork` so the child only makes async-signal-safe
/// calls (no allocation, no locks: other agent threads may hold the allocator's lock at fork time).
#[derive(Debug)]
pub struct SpawnPlan {
    path: CString,
    /// Keeps the strings `argv_ptrs` points into alive.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const c_char>,
    cwd: CString,
    /// `(uid, gid)` to switch to, after dropping supplementary groups.
    ids: Option<(u32, u32)>,
    msg_not_found: Vec<u8>,
    msg_cannot_exec: Vec<u8>,
    msg_cwd: Vec<u8>,
    msg_user: Vec<u8>,
}

// SAFETY: the raw pointers in `argv_ptrs`/`envp_ptrs` point into the heap buffers of the
// `CString`s owned by the same struct, which are never mutated or dropped while it exists; moving
// the struct to another thread moves ownership of those buffers with it.
unsafe impl Send for SpawnPlan {}

impl SpawnPlan {
    /// A plan to run `path` with `argv` and `env` (`NAME=value` strings) in `cwd`, optionally as
    /// `(uid, gid)`. `argv0` is used in the error messages the child prints if `execve` fails.
    pub fn new(
        path: CString,
        argv: Vec<CString>,
        env: Vec<CString>,
        cwd: CString,
        ids: Option<(u32, u32)>,
        argv0: &str,
    ) -> Self {
        let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<*const c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        let cwd_text = cwd.to_string_lossy().into_owned();
        SpawnPlan {
            path,
            _argv: argv,
            argv_ptrs,
            _envp: env,
            envp_ptrs,
            cwd,
            ids,
            msg_not_found: format!("sandbox-agent: {argv0}: command not found\n").into_bytes(),
            msg_cannot_exec: format!("sandbox-agent: {argv0}: cannot execute\n").into_bytes(),
            msg_cwd: format!("sandbox-agent: cannot change directory to {cwd_text}\n").into_bytes(),
            msg_user: b"sandbox-agent: cannot switch user\n".to_vec(),
        }
    }
}

/// Forks and execs `plan` in a new process group (pgid = pid) with the given stdio fds.
///
/// The caller must reap the child (the agent's reaper does). If `execve` fails, the child writes a
/// message to its stderr and exits with 127 (not found) or 126 (anything else), like a shell.
///
/// # Errors
/// `fork` failure.
pub fn spawn(plan: &SpawnPlan, stdin: RawFd, stdout: RawFd, stderr: RawFd) -> io::Result<Pid> {
    let cgroup = crate::workload::procs_fd();
    // SAFETY: after `fork` the child calls only async-signal-safe functions (setpgid, dup2,
    // sigprocmask, signal, write, chdir, setgroups, setgid, setuid, execve, _exit) on data
    // prepared before the fork; it never returns into Rust code. The parent just returns the pid.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: we are the child of a fork; see above. The fds are open in the child (they
        // were open in the parent), the pointers come from `plan`, alive for the whole call.
        unsafe { child_exec(plan, cgroup, stdin, stdout, stderr) }
    }
    let pid = Pid::from_raw(pid);
    // The child makes itself a group leader too, but maybe not yet: set it from this side as
    // well (as shells do), so a `killpg` right after we report `Started` cannot miss the group.
    // EACCES (the child already exec'd, after its own setpgid) and ESRCH are fine.
    let _ = nix::unistd::setpgid(pid, pid);
    Ok(pid)
}

/// Never returns.
///
/// # Safety
/// Only to be called in a freshly forked child, with `plan` prepared before the fork; `cgroup`,
/// when set, is an open `cgroup.procs` of the workload cgroup (`workload`).
unsafe fn child_exec(
    plan: &SpawnPlan,
    cgroup: Option<RawFd>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
) -> ! {
    // SAFETY: only async-signal-safe libc calls, on valid pointers from `plan` (whole body).
    unsafe {
        // Own process group, so a timeout can kill the command and everything it started.
        libc::setpgid(0, 0);
        // The pipe ends are O_CLOEXEC; dup2 clears that flag on 0, 1, 2 only.
        libc::dup2(stdin, 0);
        libc::dup2(stdout, 1);
        libc::dup2(stderr, 2);
        // Undo what the agent changed: Rust ignores SIGPIPE, and ignored signals survive execve.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // Join the workload cgroup while still root ("0" = the writing process). A failure
        // leaves the command in the agent's cgroup: it runs, without the agent's reserve.
        if let Some(fd) = cgroup {
            libc::write(fd, b"0".as_ptr().cast(), 1);
        }
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(&plan.msg_cwd, 126);
        }
        if let Some((uid, gid)) = plan.ids {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                fail(&plan.msg_user, 126);
            }
        }
        libc::execve(
            plan.path.as_ptr(),
            plan.argv_ptrs.as_ptr(),
            plan.envp_ptrs.as_ptr(),
        );
        let errno = *libc::__errno_location();
        if errno == libc::ENOENT || errno == libc::ENOTDIR {
            fail(&plan.msg_not_found, 127);
        }
        fail(&plan.msg_cannot_exec, 126);
    }
}

/// Writes `msg` to fd 2 and exits. Async-signal-safe.
///
/// # Safety
/// Only in a forked child.
unsafe fn fail(msg: &[u8], code: i32) -> ! {
    // SAFETY: `msg` is a valid buffer; write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(code)
    }
}

/// Takes ownership of an fd returned by `accept4`.
///
/// # Safety
/// `fd` must be a freshly returned, open descriptor that nothing else owns.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees sole ownership of an open fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Whether `fd` is open.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the descriptor table; an unknown fd yields EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Makes fds 0, 1 and 2 point at `console` (the kernel gives PID 1 no stdio when the rootfs has
/// no `/dev/console` node when it starts init).
pub fn attach_console(console: &OwnedFd) {
    for target in 0..=2 {
        // SAFETY: `console` is an open fd; dup2 onto 0..=2 replaces whatever is there.
        unsafe {
            libc::dup2(console.as_raw_fd(), target);
        }
    }
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP`), so guest programs can use
/// `localhost`.
///
/// # Errors
/// Socket or ioctl failure.
pub fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as c_char;
    }
    // SAFETY: `sock` is open and `req` is a valid ifreq for the duration of each call.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
