//! Raw syscalls of the runtime: reflink, flock, waitid without reaping, kill, pidfds, prctl and
//! fchdir in the child, and random bytes. Each wrapper returns `io::Result` and documents its
//! invariant.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `FICLONE` (`_IOW(0x94, 9, int)`, linux/fs.h): share all of `src`'s extents with `dst`.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// `CLOSE_RANGE_CLOEXEC` (linux/close_range.h, Linux 5.11): mark instead of close.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// Makes `dst` a reflink (copy-on-write clone) of `src` (Btrfs, XFS with reflink, bcachefs...).
///
/// # Errors
/// `EOPNOTSUPP`/`EINVAL`/`EXDEV`/`ENOTTY` where the file system cannot clone; other I/O errors.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both fds are valid for the borrow's lifetime; FICLONE takes the source fd as its
    // integer argument and writes no memory of ours.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Tries to take an exclusive `flock` on `fd` without blocking. `Ok(false)`: someone holds it.
///
/// # Errors
/// Any `flock` error but `EWOULDBLOCK`.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: `fd` is valid for the borrow; flock touches no memory of ours.
    let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Blocks until child `pid` has exited, *without* reaping it (`waitid(WEXITED | WNOWAIT)`), so
/// the pid cannot be reused until the caller reaps it.
///
/// # Errors
/// `ECHILD` if `pid` is not our child (or was already reaped).
pub fn wait_exited_no_reap(pid: u32) -> io::Result<()> {
    let id = libc::id_t::from(pid);
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value (plain C data); waitid writes into it
        // and nothing else.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call.
        let r = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends `SIGKILL` to `pid`. The caller guarantees `pid` names the intended process (our
/// unreaped child, or a process whose start time was just checked).
///
/// # Errors
/// `ESRCH` when it is gone, `EPERM`.
pub fn kill_pid(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes plain integers and touches no memory.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `pidfd_open(2)` (Linux 5.3): an fd that names process `pid` itself, not its number. Signals
/// sent through it ([`pidfd_kill`]) reach that process or nobody, never a later owner of the pid.
///
/// # Errors
/// `ESRCH` when no such process exists; `ENOSYS` on older kernels.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags (0) and touches no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned `fd` as a new open file descriptor (with O_CLOEXEC, as
    // pidfds always are) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `SIGKILL` through a pidfd (`pidfd_send_signal(2)`, Linux 5.1).
///
/// # Errors
/// `ESRCH` when the process has exited, `EPERM`.
pub fn pidfd_kill(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the fd is valid for the borrow; a null siginfo is allowed (the kernel fills in a
    // SI_USER one); no memory of ours is touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// In a freshly forked child, before exec: enter the directory `cwd` (`fchdir`: the child gets
/// the directory the fd names, whatever its path names now), die with the parent
/// (`PR_SET_PDEATHSIG(SIGKILL)`), refuse to run if the parent already died (the signal would
/// never come), and mark every fd above 2 close-on-exec so only stdin/stdout/stderr (chosen by
/// the caller) are inherited.
///
/// Only async-signal-safe syscalls: this runs between fork and exec.
///
/// # Errors
/// `fchdir` or `prctl` failure, or `ESRCH` when the parent is no longer `parent`.
pub fn child_setup(parent: libc::pid_t, cwd: Option<RawFd>) -> io::Result<()> {
    if let Some(fd) = cwd {
        // SAFETY: fchdir takes an integer; the parent keeps `fd` open until spawn returns, and
        // the child's copy is open until exec (it is O_CLOEXEC).
        if unsafe { libc::fchdir(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integers only.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid cannot fail and touches no memory.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // Std's own exec-error pipe is already close-on-exec, so marking (not closing) keeps its
    // error reporting intact. Kernels before 5.11 lack the flag; std opens everything CLOEXEC
    // anyway, so ignoring the failure only loses the belt, not the braces.
    // SAFETY: close_range takes integers only.
    let _ = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    Ok(())
}

/// `fchdir(fd)`: enters the directory `fd` names (async-signal-safe).
///
/// # Errors
/// The `fchdir` error.
pub fn enter_dir(fd: RawFd) -> io::Result<()> {
    // SAFETY: fchdir takes an integer and touches no memory.
    if unsafe { libc::fchdir(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clears `FD_CLOEXEC` on `fd`, so it survives exec (async-signal-safe).
///
/// # Errors
/// The `fcntl` error.
pub fn clear_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_SETFD) takes integers only and touches no memory.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fills `buf` from the kernel's random pool (`getrandom(2)`).
///
/// # Errors
/// `getrandom` failures other than `EINTR`.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += r as usize;
    }
    Ok(())
}

/// Whether the current process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

// The jail (`jail.rs`): called between fork and exec, so each is a single async-signal-safe
// syscall (or a bounded loop of them) on plain integers.

/// `write(2)` of all of `buf` to `fd`, retrying on `EINTR`.
pub fn write_all_fd(fd: std::os::fd::RawFd, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: `buf[done..]` is a live, readable slice for the duration of the call.
        let n = unsafe {
            libc::write(
                fd,
                buf[done..].as_ptr().cast::<libc::c_void>(),
                buf.len() - done,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// New mount, IPC, UTS and network namespaces for this process (`unshare(2)`; needs
/// `CAP_SYS_ADMIN`).
pub fn unshare_namespaces() -> io::Result<()> {
    // SAFETY: unshare takes integer flags only.
    let r = unsafe {
        libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets both the soft and the hard limit of `resource` to `value`.
pub fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(resource, &limit) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Empties the capability bounding set and the ambient set, so that the next `execve` gives no
/// capability even to uid 0 (capabilities(7): a root exec gets its bounding set as permitted).
/// Without `CAP_SETPCAP` (not root) there is nothing to drop: the process has no capabilities.
pub fn drop_all_capabilities() -> io::Result<()> {
    // PR_CAP_AMBIENT_CLEAR_ALL (Linux 4.3); an older kernel has no ambient set to clear.
    // SAFETY: prctl with integer arguments only.
    let _ = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Past the last capability this kernel knows.
                Some(libc::EINVAL) => break,
                // Not privileged: the bounding set cannot matter for an exec without privileges.
                Some(libc::EPERM) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: no exec of this process or its children can gain privileges.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// The private root (`jail.rs`): mount calls between fork and exec, in the child's own mount
// namespace. Each takes C strings built before the fork.

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes every mount of this (new) mount namespace private, recursively, so nothing the child
/// mounts or unmounts propagates to the host's namespace (`mount(2)`, `MS_REC | MS_PRIVATE`).
pub fn make_mounts_private() -> io::Result<()> {
    // SAFETY: the path is a static NUL-terminated string; the other pointers are null, which
    // mount(2) allows for a propagation change.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
}

/// Bind-mounts `src` onto `dst` (a file onto a file or a directory onto a directory), then
/// remounts the bind with `flags` (`MS_RDONLY`, `MS_NOSUID`, ... ; 0: leave it as it is).
pub fn bind_mount(
    src: &std::ffi::CStr,
    dst: &std::ffi::CStr,
    flags: libc::c_ulong,
) -> io::Result<()> {
    // SAFETY: both paths are NUL-terminated C strings that outlive the call; no data argument.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    if flags == 0 {
        return Ok(());
    }
    // SAFETY: as above; a bind remount changes only the per-mount flags of `dst`.
    check(unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            std::ptr::null(),
        )
    })
}

/// Makes the mount at `root` this process's root: `chdir(root)`, `pivot_root(".", ".")` (the old
/// root ends up stacked on the new one), `umount2(".", MNT_DETACH)` (off goes the old root, so
/// no host path stays reachable), `chdir("/")`. `root` must be a mount point.
pub fn pivot_into(root: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: `root` is a NUL-terminated C string that outlives the call.
    check(unsafe { libc::chdir(root.as_ptr()) })?;
    let dot = c".";
    // SAFETY: pivot_root takes two NUL-terminated paths (static here) and no other memory.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a static path and integer flags.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })?;
    // SAFETY: a static path.
    check(unsafe { libc::chdir(c"/".as_ptr()) })
}

/// Drops to `uid`/`gid` for good: no supplementary groups (`setgroups(0)`), then real,
/// effective and saved gid, then uid (the gid first: after the uid change there is no
/// privilege left to change it). Needs `CAP_SETUID`/`CAP_SETGID`.
pub fn set_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: a zero-length list with a null pointer is allowed by setgroups(2).
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}
