//! Raw syscalls of the VMM: the signal plumbing that kicks a vCPU thread out of `KVM_RUN`, and the
//! guest RAM mappings (`crate::memory`), and the checks of inherited fds (`crate::vmm::config`).
//!
//! Kicks: a kicker sends [`kick_signal`] to the vCPU thread with `pthread_kill`. The handler sets
//! `kvm_run.immediate_exit` of the vCPU that thread runs (found through a thread-local pointer):
//! if the thread is inside `KVM_RUN`, the signal makes it return `EINTR`; if the signal lands just
//! before `KVM_RUN`, `immediate_exit` makes the next `KVM_RUN` return `EINTR` at once
//! (KVM API doc, `KVM_CAP_IMMEDIATE_EXIT`). Either way no kick is lost.

use std::cell::Cell;
use std::io;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used for kicks (the first one glibc leaves to applications).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_num: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // `try_with` on a const-initialized Cell neither allocates nor registers a destructor, so it is
    // async-signal-safe.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` was set by `set_immediate_exit_target` on this thread and points into the
            // vCPU's `kvm_run` mapping, which stays mapped until `clear_immediate_exit_target` runs
            // on this same thread (before the VcpuFd is dropped). A byte write is atomic enough for
            // KVM, which only reads the byte at the next KVM_RUN.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// Installs the kick handler once per process.
///
/// # Errors
/// The `sigaction` error.
pub fn install_kick_handler() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(io::Error::from_raw_os_error)
}

/// Points this thread's kick handler at `immediate_exit`.
///
/// # Safety
/// `immediate_exit` must stay valid for writes until [`clear_immediate_exit_target`] is called on
/// this thread.
pub unsafe fn set_immediate_exit_target(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
}

/// Detaches this thread's kick handler from its vCPU (before the vCPU is dropped).
pub fn clear_immediate_exit_target() {
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
}

/// Sends the kick signal to `thread`.
///
/// # Errors
/// The `pthread_kill` error (e.g. `ESRCH`).
pub fn kick_thread(thread: libc::pthread_t) -> io::Result<()> {
    // SAFETY: the callers pass the pthread_t of a thread they own through a JoinHandle that has
    // not been joined, so the id is valid.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Maps `len` bytes of private anonymous read-write memory (`MAP_NORESERVE`) at a host address
/// aligned to `align` (a power of two, a multiple of the page size): `len + align` bytes are
/// mapped, then the unaligned head and the tail are unmapped. Returns the address; the caller
/// owns the mapping and unmaps it with [`unmap`].
pub fn map_aligned_anonymous(len: usize, align: usize) -> io::Result<usize> {
    if len == 0 || !align.is_power_of_two() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let reserve = len
        .checked_add(align)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses (no MAP_FIXED): it cannot
    // alias anything that exists.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let aligned = (base + align - 1) & !(align - 1);
    let head = aligned - base;
    let tail = reserve - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside `aligned..aligned + len`;
    // nothing else refers to them.
    unsafe {
        if head > 0 {
            unmap(base, head)?;
        }
        if tail > 0 {
            unmap(aligned + len, tail)?;
        }
    }
    Ok(aligned)
}

/// `madvise(MADV_HUGEPAGE)` on `addr..addr + len` (transparent huge pages for this range even
/// when THP is in `madvise` mode). Fails with `EINVAL` where THP is compiled out or disabled.
pub fn advise_huge_pages(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: madvise with MADV_HUGEPAGE changes no contents and is defined for any range; a range
    // that is not mapped gives ENOMEM, not undefined behaviour.
    let rc = unsafe { libc::madvise(addr as *mut c_void, len, libc::MADV_HUGEPAGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Unmaps `addr..addr + len`.
///
/// # Safety
/// The range must be a mapping (or part of one) that the caller owns, and nothing may access it
/// afterwards.
pub unsafe fn unmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is its own and unused from now on.
    let rc = unsafe { libc::munmap(addr as *mut c_void, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TUNGETIFF` (`_IOR('T', 210, unsigned int)`; the kernel copies a whole `struct ifreq`).
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNGETVNETHDRSZ` (`_IOR('T', 215, int)`).
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;

#[cfg(feature = "vmm")]
/// Makes `fd` non-blocking with `fcntl(F_SETFL)`. Not std's `set_nonblocking`: that is
/// `ioctl(FIONBIO)`, which the devices thread's seccomp filter forbids (it allows no `ioctl`).
///
/// # Errors
/// The `fcntl` error.
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// The `ifr_flags` of the tun/tap device behind `fd` (`IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR`…).
///
/// # Errors
/// The ioctl's error (`EBADFD`/`EINVAL`/`ENOTTY` when `fd` is not an attached tun/tap fd).
pub fn tap_flags(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u16> {
    use std::os::fd::AsRawFd;
    // struct ifreq: 16 bytes of name, then a 24-byte union whose first member is `short
    // ifr_flags`.
    let mut ifr = [0u8; 40];
    // SAFETY: `fd` is a valid open fd for the call; TUNGETIFF writes at most
    // `sizeof(struct ifreq)` = 40 bytes into `ifr`, which is 40 bytes long and lives across the
    // call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u16::from_ne_bytes([ifr[16], ifr[17]]))
}

/// The virtio-net header length the tap behind `fd` reads and writes (`TUNSETVNETHDRSZ`).
///
/// # Errors
/// The ioctl's error.
pub fn tap_vnet_hdr_len(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut len: c_int = 0;
    // SAFETY: `fd` is valid for the call; TUNGETVNETHDRSZ writes one `int` into `len`, which
    // lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETVNETHDRSZ, &mut len as *mut c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Takes ownership of fd `fd`, inherited from the process that started the VMM (the fd map in
/// the VM config names it), after checking it is open. Marks it close-on-exec.
///
/// # Safety
/// Nothing else in the process may own fd `fd` (no `File`, `OwnedFd` or other owner), and the
/// function must be called at most once per fd number: the returned `OwnedFd` closes it.
///
/// # Errors
/// `EBADF` if no such fd is open; `EINVAL` for a number below 3 (stdio is never a device).
pub unsafe fn claim_inherited_fd(fd: c_int) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: F_GETFD only reads the fd table; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open (checked above) and, per the caller's contract, owned by nothing
    // else in this process.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: F_SETFD on an fd we own; no memory is touched.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// What an inherited fd is, as far as a VM config entry cares ([`fd_info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdInfo {
    /// The file type bits of `st_mode` (`S_IFREG`, `S_IFBLK`, `S_IFCHR`, `S_IFSOCK`...).
    pub file_type: u32,
    /// Opened for writing (`O_WRONLY` or `O_RDWR`).
    pub writable: bool,
    /// Opened for reading (`O_RDONLY` or `O_RDWR`).
    pub readable: bool,
}

/// The type and access mode of open fd `fd` (`fstat` and `fcntl(F_GETFL)`), without taking
/// ownership of it.
///
/// # Errors
/// `EBADF` when `fd` is not open.
pub fn fd_info(fd: c_int) -> io::Result<FdInfo> {
    // SAFETY: F_GETFL only reads the fd table; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero `stat` is a valid value (plain C data).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `stat` for the duration of the call; fstat writes only
    // into it.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let access = flags & libc::O_ACCMODE;
    Ok(FdInfo {
        file_type: st.st_mode & libc::S_IFMT,
        writable: access == libc::O_WRONLY || access == libc::O_RDWR,
        readable: access == libc::O_RDONLY || access == libc::O_RDWR,
    })
}

/// `KVM_GET_API_VERSION` (`_IO(0xAE, 0x00)`) on `fd`: 12 for a `/dev/kvm` fd.
///
/// # Errors
/// `ENOTTY`/`EINVAL` for an fd that is not `/dev/kvm`, `EBADF` when it is not open.
pub fn kvm_api_version(fd: c_int) -> io::Result<i32> {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and writes no memory of ours; callers
    // check first that `fd` is a character device, and ioctl type 0xAE is KVM's alone.
    let r = unsafe { libc::ioctl(fd, KVM_GET_API_VERSION, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Whether `fd` is a listening (`SO_ACCEPTCONN`) stream socket of the Unix domain.
///
/// # Errors
/// `ENOTSOCK` for a non-socket, `EBADF` when it is not open.
pub fn is_unix_listener(fd: c_int) -> io::Result<bool> {
    let opt = |name: c_int| -> io::Result<c_int> {
        let mut value: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes of an int and a socklen_t; the kernel
        // writes at most `len` bytes into `value`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                std::ptr::from_mut(&mut value).cast::<c_void>(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(value)
    };
    Ok(opt(libc::SO_DOMAIN)? == libc::AF_UNIX
        && opt(libc::SO_TYPE)? == libc::SOCK_STREAM
        && opt(libc::SO_ACCEPTCONN)? != 0)
}

thread_local! {
    /// The seccomp thread kind of this thread, for the SIGSYS report.
    static THREAD_KIND: Cell<&'static [u8]> = const { Cell::new(b"unfiltered") };
}

/// Records this thread's seccomp kind for [`install_sigsys_reporter`]'s message.
pub fn set_thread_kind(kind: &'static [u8]) {
    THREAD_KIND.with(|k| k.set(kind));
}

/// Writes `n` in decimal into `buf`; returns the digits.
#[cfg(feature = "vmm")]
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(feature = "vmm")]
extern "C" fn on_sigsys(_num: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // struct siginfo_t on x86_64: si_signo, si_errno, si_code, padding (16 bytes), then the
    // SIGSYS fields: void *_call_addr at 16, int _syscall at 24, unsigned _arch at 28.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; offset 24 is
        // inside it (it is 128 bytes) and 4-aligned.
        unsafe { info.cast::<u8>().add(24).cast::<i32>().read() }
    };
    let mut digits = [0u8; 20];
    let kind = THREAD_KIND.try_with(Cell::get).unwrap_or(b"unknown");
    let parts: [&[u8]; 5] = [
        b"sandbox-vmm: seccomp: forbidden system call ",
        decimal(u64::try_from(nr).unwrap_or(u64::MAX), &mut digits),
        b" on a ",
        kind,
        b" thread; the VMM ends (docs/jail.md)\n",
    ];
    for part in parts {
        // SAFETY: write(2) on stderr with a live buffer; async-signal-safe. A short or failed
        // write only shortens the report.
        let _ = unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(crate::seccomp::EXIT_SECCOMP) };
}

#[cfg(feature = "vmm")]
/// Installs, once per process, the `SIGSYS` handler that reports a forbidden system call (its
/// number and the thread's kind) on stderr and ends the process with
/// [`crate::seccomp::EXIT_SECCOMP`].
///
/// # Errors
/// The `sigaction` error.
pub fn install_sigsys_reporter() -> io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(libc::SIGSYS, on_sigsys).map_err(|e| e.errno()))
        .map_err(io::Error::from_raw_os_error)
}

#[cfg(test)]
mod tests {
    #[test]
    fn claiming_an_fd_checks_it_is_open_and_not_stdio() {
        // SAFETY: fd 999999 is not open in this process, and 1 is refused before any use.
        let err = unsafe { super::claim_inherited_fd(999_999) }.expect_err("not open");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        // SAFETY: as above.
        let err = unsafe { super::claim_inherited_fd(1) }.expect_err("stdio");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn kick_sets_the_target_byte_of_the_kicked_thread() {
        install_kick_handler().expect("install");
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let mut byte = 0u8;
            // SAFETY: `byte` lives until the target is cleared below.
            unsafe { set_immediate_exit_target(&mut byte) };
            ready_tx.send(()).expect("send");
            done_rx.recv().expect("recv");
            clear_immediate_exit_target();
            // SAFETY: plain read of a local the handler may have written.
            unsafe { std::ptr::read_volatile(&byte) }
        });
        ready_rx.recv().expect("ready");
        kick_thread(t.as_pthread_t()).expect("kick");
        // The handler runs before pthread_kill's target resumes; give it the message after.
        done_tx.send(()).expect("send");
        assert_eq!(t.join().expect("join"), 1);
    }
}
