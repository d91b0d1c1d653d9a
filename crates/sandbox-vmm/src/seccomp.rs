//! seccomp-bpf filters for the VMM's threads (`seccomp(2)`, built with rust-vmm's seccompiler).
//!
//! Each thread kind gets its own allowlist, installed on the thread itself once its setup is
//! done and before it handles anything a guest controls:
//! - [`ThreadKind::Vcpu`]: `KVM_RUN` and the three read-only vCPU ioctls the exit reports use,
//!   plus what device register writes do on a vCPU thread (a virtio-mmio `QueueNotify` or
//!   `Status` write runs the device there);
//! - [`ThreadKind::Devices`]: the event loop: epoll, eventfds, disk and tap I/O, the vsock Unix
//!   sockets; of `ioctl`, only `FIONBIO` (std's `set_nonblocking`);
//! - [`ThreadKind::Main`]: waiting for the VM to end and tearing it down.
//!
//! Nothing after start opens a file or a socket, creates a process or a thread, or changes
//! credentials, mounts or namespaces: `openat`, `socket`, `connect`, `execve`, `clone`,
//! `ptrace` and the rest are refused on every thread. The lists were measured by tracing the VMM
//! through the KVM-tier tests (docs/jail.md says how to redo it).
//!
//! Modes ([`SeccompMode`]): `kill` (the default) ends the process on a forbidden call: the
//! filter returns `SECCOMP_RET_TRAP`, and a `SIGSYS` handler writes the call's number and the
//! thread to stderr (the VMM log) and exits with [`EXIT_SECCOMP`]; `log` lets the call through
//! and the kernel logs it (audit), for finding what a list lacks; `off` installs nothing.

use std::collections::BTreeMap;
use std::convert::TryInto;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use crate::vmm::config::{SeccompMode, EXIT_SECCOMP};

/// The VMM's thread kinds, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that built the VM, after start: waits and tears down.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// The device event-loop thread.
    Devices,
}

impl ThreadKind {
    fn name(self) -> &'static [u8] {
        match self {
            ThreadKind::Main => b"main",
            ThreadKind::Vcpu => b"vcpu",
            ThreadKind::Devices => b"devices",
        }
    }
}

/// Errors of building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built (a bug in the lists).
    #[error("cannot build the {kind:?} seccomp filter.")]
    Build {
        /// The thread kind.
        kind: ThreadKind,
        /// The cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {kind:?} seccomp filter.")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler.")]
    Handler(#[source] std::io::Error),
}

// vCPU ioctls (KVM API, `linux/kvm.h`): _IO(0xAE, 0x80), _IOR(0xAE, 0x81, struct kvm_regs),
// _IOR(0xAE, 0x83, struct kvm_sregs), _IOWR(0xAE, 0x85, struct kvm_translation).
mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, 0xAE, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, 0xAE, 0x81, kvm_bindings::kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, 0xAE, 0x83, kvm_bindings::kvm_sregs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, 0xAE, 0x85, kvm_bindings::kvm_translation);
}
use ioctls::{KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN, KVM_TRANSLATE};

/// `FIONBIO` (`asm-generic/ioctls.h`): set or clear `O_NONBLOCK` on a socket.
const FIONBIO: u64 = 0x5421;

/// Calls every thread makes: memory, locks, time, signals, logging, thread exit.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
];

/// What the device event loop and device code on any thread do: epoll, eventfds and irqfds,
/// timers, disk and tap I/O, the vsock Unix sockets.
const DEVICES: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fcntl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// What the main thread does after start: kick and join the vCPUs, stop the event loop,
/// remove the vsock socket, exit.
const MAIN: &[libc::c_long] = &[libc::SYS_tgkill, libc::SYS_unlink, libc::SYS_unlinkat];

/// The allowlist of `kind`: syscall number → rules (empty: allowed whatever the arguments).
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let plain = |map: &mut BTreeMap<i64, Vec<SeccompRule>>, list: &[libc::c_long]| {
        for &nr in list {
            map.insert(nr, Vec::new());
        }
    };
    plain(&mut map, COMMON);
    // Device code runs on every thread kind (a register write runs it on a vCPU thread, and
    // teardown on the main thread drops devices, which flushes their images).
    plain(&mut map, DEVICES);
    let ioctl = |request: u64| -> Result<SeccompRule, seccompiler::BackendError> {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            request,
        )?])
    };
    // Every thread may make a socket non-blocking: std's `set_nonblocking` is `ioctl(FIONBIO)`
    // (the vsock muxer does it to each accepted connection, and device code runs on any thread).
    let mut ioctls = vec![ioctl(FIONBIO)?];
    match kind {
        ThreadKind::Vcpu => {
            for request in [KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS(), KVM_TRANSLATE()] {
                ioctls.push(ioctl(request)?);
            }
        }
        ThreadKind::Main => plain(&mut map, MAIN),
        ThreadKind::Devices => {}
    }
    map.insert(libc::SYS_ioctl, ioctls);
    Ok(map)
}

/// Calls that fail with `EACCES` instead of ending the VMM: opening a path. glibc's malloc
/// opens `/proc/sys/vm/overcommit_memory` once per process when it first trims a thread's heap
/// (measured: the only open after start), and copes when it cannot; no VMM code opens anything
/// after start. The allowlist lets these through to a second filter that returns the error
/// (the kernel applies the most restrictive result of all filters: `ERRNO` over `ALLOW`).
const REFUSED: &[libc::c_long] = &[libc::SYS_openat, libc::SYS_open];

/// The BPF programs for `kind` in `mode`, to install in order: the filter that refuses
/// `openat`/`open` with `EACCES`, then the allowlist (last, since installing a filter takes
/// `prctl` and `seccomp`, which the allowlist forbids). Empty for [`SeccompMode::Off`].
///
/// # Errors
/// [`SeccompError::Build`].
pub fn filter(kind: ThreadKind, mode: SeccompMode) -> Result<Vec<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Kill => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let build = || -> Result<Vec<BpfProgram>, seccompiler::BackendError> {
        let mut allow = rules(kind)?;
        let mut refused = BTreeMap::new();
        for &nr in REFUSED {
            allow.insert(nr, Vec::new());
            refused.insert(nr, Vec::new());
        }
        let allowlist =
            SeccompFilter::new(allow, mismatch, SeccompAction::Allow, TargetArch::x86_64)?;
        let refusals = SeccompFilter::new(
            refused,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            TargetArch::x86_64,
        )?;
        Ok(vec![refusals.try_into()?, allowlist.try_into()?])
    };
    build().map_err(|source| SeccompError::Build { kind, source })
}

/// Installs the filter of `kind` on the calling thread (and the `SIGSYS` reporter, once per
/// process). Threads the caller starts afterwards inherit it.
///
/// # Errors
/// [`SeccompError`].
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let programs = filter(kind, mode)?;
    if programs.is_empty() {
        return Ok(());
    }
    if mode == SeccompMode::Kill {
        crate::sys::install_sigsys_reporter().map_err(SeccompError::Handler)?;
    }
    crate::sys::set_thread_kind(kind.name());
    for program in &programs {
        seccompiler::apply_filter(program)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    tracing::debug!(?kind, ?mode, "seccomp filter installed");
    Ok(())
}

/// A system call no thread's list allows (for the test hook [`forbidden_call_for_tests`]).
pub const FORBIDDEN_FOR_TESTS: libc::c_long = libc::SYS_getppid;

/// Makes a system call that every filter forbids: `getppid`, harmless when unfiltered. The
/// runtime's tests use it (through the VM config's `debug_forbidden_syscall`) to check that a
/// violation ends the VMM and is reported as such.
pub fn forbidden_call_for_tests() {
    // nix wraps getppid without a Result.
    let _ = nix::unistd::getppid();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_and_off_builds_nothing() {
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices] {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                let progs = filter(kind, mode).expect("builds");
                assert_eq!(progs.len(), 2);
                assert!(progs.iter().all(|p| !p.is_empty()));
            }
            assert!(filter(kind, SeccompMode::Off).expect("off").is_empty());
        }
    }

    #[test]
    fn the_lists_refuse_what_a_jailed_vmm_never_needs() {
        let forbidden = [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_setuid,
            libc::SYS_kill,
            FORBIDDEN_FOR_TESTS,
        ];
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices] {
            let map = rules(kind).expect("rules");
            for nr in forbidden {
                assert!(!map.contains_key(&nr), "{kind:?} allows syscall {nr}");
            }
        }
        // Devices and main: only FIONBIO; vCPU: FIONBIO and the four KVM requests.
        let ioctls = |kind| rules(kind).expect("rules")[&libc::SYS_ioctl].len();
        assert_eq!(ioctls(ThreadKind::Devices), 1);
        assert_eq!(ioctls(ThreadKind::Main), 1);
        assert_eq!(ioctls(ThreadKind::Vcpu), 5);
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE(), 0xc018_ae85);
    }

    /// A forked child installs the Devices filter in kill mode and makes a forbidden call: it
    /// must exit with EXIT_SECCOMP and name the call on stderr; an allowed call goes through.
    #[test]
    fn a_forbidden_call_ends_the_process_with_its_number() {
        let out = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "seccomp::tests::child_side",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SANDBOX_SECCOMP_CHILD", "1")
            .output()
            .expect("spawn the test binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(EXIT_SECCOMP), "{stdout}\n{stderr}");
        assert!(
            stderr.contains(&format!(
                "forbidden system call {} on a devices thread",
                FORBIDDEN_FOR_TESTS
            )),
            "{stderr}"
        );
        assert!(stdout.contains("allowed call went through"), "{stdout}");
    }

    /// The child half of the test above (does nothing unless spawned by it).
    #[test]
    fn child_side() {
        if std::env::var_os("SANDBOX_SECCOMP_CHILD").is_none() {
            return;
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        apply(ThreadKind::Devices, SeccompMode::Kill).expect("apply");
        // What the vsock muxer does to every stream it accepts on the devices thread.
        crate::sys::set_nonblocking(std::os::fd::AsFd::as_fd(&a)).expect("non-blocking");
        println!("allowed call went through");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        forbidden_call_for_tests();
        println!("still alive");
    }
}
