//! The guest agent: PID 1 inside every sandbox (see `docs/agent.md`).
//!
//! 1. As PID 1 it mounts `/proc`, `/sys`, `/dev`, `/dev/pts`, `/dev/shm`, `/tmp` and `/run`,
//!    brings up `lo`, sets the hostname, and makes sure it has a console.
//!    Commands run in their own cgroup; the agent locks its code in RAM (`workload`).
//! 2. It becomes the reaper of every orphan (PID 1, or `PR_SET_CHILD_SUBREAPER` otherwise) while
//!    keeping the exit statuses of its own commands (`reaper`).
//! 3. It listens on vsock port [`AGENT_VSOCK_PORT`] (or a Unix socket / loopback TCP port when run
//!    as a normal process for tests) and prints `sandbox-init: ready` once listening.
//! 4. Each connection gets a thread and speaks the `sandbox_core::protocol` (`conn`): commands
//!    (`exec`), file operations (`files`) and power-off.
//!
//! Blocking I/O and plain threads only: no async runtime, so the static binary stays small.

mod conn;
mod exec;
mod files;
mod reaper;
mod sys;
mod workload;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use sandbox_core::AGENT_VSOCK_PORT;

/// Most connections served at once; more are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// The line boot tests and `KvmRuntime` wait for on the console.
const READY_LINE: &str = "sandbox-init: ready";

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Logs a line to stderr (the console when PID 1).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("sandbox-agent: {}", format_args!($($arg)*)) };
}

/// Logs a line only with `--verbose` (or `sandbox_agent_verbose=1` on the kernel command line).
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::verbose() { eprintln!("sandbox-agent: {}", format_args!($($arg)*)) }
    };
}

/// Whether debug logging is on.
pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    Vsock(u32),
    Unix(PathBuf),
    Tcp(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "vsock" {
        return Ok(Listen::Vsock(AGENT_VSOCK_PORT));
    }
    if let Some(port) = s.strip_prefix("vsock:") {
        return port
            .parse()
            .map(Listen::Vsock)
            .map_err(|e| format!("bad vsock port: {e}"));
    }
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = s.strip_prefix("tcp:") {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("bad TCP address: {e}"))?;
        // The agent runs commands for whoever connects: never listen beyond this machine.
        if !addr.ip().is_loopback() {
            return Err("TCP listening is only allowed on a loopback address".into());
        }
        return Ok(Listen::Tcp(addr));
    }
    Err("expected vsock[:PORT], unix:PATH or tcp:127.0.0.1:PORT".into())
}

/// The sandbox guest agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where to listen: `vsock[:PORT]`, `unix:PATH` or `tcp:127.0.0.1:PORT` (loopback only).
    #[arg(long, default_value = "vsock", value_parser = parse_listen)]
    listen: Listen,
    /// Hostname to set when running as PID 1.
    #[arg(long, default_value = "sandbox")]
    hostname: String,
    /// Log every connection and command to stderr.
    #[arg(long)]
    verbose: bool,
}

/// Agent-wide state shared by all connections.
#[derive(Debug)]
pub struct Agent {
    /// The hostname reported by `Ping`.
    pub hostname: String,
    /// Whether we are the guest's init (then power-off really powers off).
    pub pid1: bool,
}

impl Agent {
    /// Syncs and powers the VM off when PID 1; as a normal process, just exits.
    pub fn power_off(&self) -> ! {
        nix::unistd::sync();
        if self.pid1 {
            log!("powering off");
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            // reboot(2) only returns on failure; PID 1 must never exit (the kernel would panic).
            loop {
                std::thread::park();
            }
        }
        // Not init: powering off would take down the machine we run on. Exit instead.
        std::process::exit(0)
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    let cli = if pid1 {
        // The kernel hands init its unknown `key=value` parameters as environment variables and
        // bare words as arguments; never fail on them.
        let mut cli = Cli::try_parse().unwrap_or_else(|_| Cli {
            listen: Listen::Vsock(AGENT_VSOCK_PORT),
            hostname: "sandbox".into(),
            verbose: false,
        });
        if let Ok(h) = std::env::var("sandbox_hostname") {
            cli.hostname = h;
        }
        if std::env::var("sandbox_agent_verbose").is_ok_and(|v| v == "1") {
            cli.verbose = true;
        }
        cli
    } else {
        Cli::parse()
    };
    VERBOSE.store(cli.verbose, Ordering::Relaxed);
    let agent = Arc::new(Agent {
        hostname: cli.hostname.clone(),
        pid1,
    });
    if let Err(e) = run(&agent, &cli) {
        log!("fatal: {e}");
        if pid1 {
            agent.power_off();
        }
        std::process::exit(1);
    }
}

fn run(agent: &Arc<Agent>, cli: &Cli) -> Result<(), String> {
    // Bind before mounting: a Unix socket path under /tmp or /run must be created before the
    // tmpfs mounts hide it (tests run a PID-1 agent in namespaces that way; vsock does not care).
    let listener = bind(&cli.listen);
    if agent.pid1 {
        init_system(&agent.hostname);
    } else {
        // Orphans of our commands become our children, so we can reap them as init would.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    }
    let reaper = reaper::Reaper::start().map_err(|e| format!("cannot start the reaper: {e}"))?;
    let listener = listener?;
    println!("{READY_LINE}");
    let _ = std::io::stdout().flush();
    debug!("listening on {:?}", cli.listen);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                debug!("accept failed: {e}");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let Some(slot) = Slot::take(&active) else {
            debug!("too many connections, closing a new one");
            continue;
        };
        let (agent, reaper) = (agent.clone(), reaper.clone());
        // The slot moves into the thread and is released when the closure is dropped: after the
        // connection ends, when a handler panics (unwinding drops it), or right here when the
        // thread cannot be started (the unrun closure is dropped).
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _slot = slot;
                conn::serve(agent, reaper, stream);
            });
        if let Err(e) = spawned {
            log!("cannot start a connection thread: {e}");
        }
    }
}

/// One of the [`MAX_CONNECTIONS`] connection slots, held for the life of a connection thread and
/// given back on drop, whatever way the thread ends.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a slot, or `None` when all are in use.
    fn take(active: &Arc<AtomicUsize>) -> Option<Slot> {
        active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A bound listener of any of the three kinds, accepting `conn::Stream`s.
enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<conn::Stream> {
        match self {
            Listener::Vsock(fd) => {
                let raw = socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 just returned this fd and nothing else owns it.
                let owned = unsafe { sys::adopt_fd(raw) };
                Ok(UnixStream::from(owned))
            }
            Listener::Unix(l) => Ok(l.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(UnixStream::from(OwnedFd::from(s)))
            }
        }
    }
}

fn bind(listen: &Listen) -> Result<Listener, String> {
    match listen {
        Listen::Vsock(port) => {
            let fd = socket::socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| format!("vsock socket: {e} (is CONFIG_VIRTIO_VSOCKETS enabled?)"))?;
            let addr = VsockAddr::new(libc::VMADDR_CID_ANY, *port);
            socket::bind(fd.as_raw_fd(), &addr)
                .map_err(|e| format!("vsock bind to port {port}: {e}"))?;
            socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
                .map_err(|e| format!("vsock listen: {e}"))?;
            Ok(Listener::Vsock(fd))
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(Listener::Unix)
                .map_err(|e| format!("bind {}: {e}", path.display()))
        }
        Listen::Tcp(addr) => TcpListener::bind(addr)
            .map(Listener::Tcp)
            .map_err(|e| format!("bind {addr}: {e}")),
    }
}

/// PID 1 duties before serving: pseudo file systems, console, loopback, hostname. Failures are
/// logged, not fatal: a missing `/run` must not stop the sandbox from answering.
fn init_system(hostname: &str) {
    use nix::mount::{mount, MsFlags};
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => log!("mount {fstype} on {target}: {e}"),
        }
        if target == "/dev" && !sys::fd_is_open(1) {
            // No /dev/console in the image when the kernel started us: stdio is closed.
            if let Ok(console) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/console")
            {
                sys::attach_console(&OwnedFd::from(console));
            }
        }
    }
    if let Err(e) = sys::loopback_up() {
        log!("cannot bring up lo: {e}");
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        log!("sethostname {hostname}: {e}");
    }
    install_resolver(Path::new("/proc/net/pnp"), Path::new("/etc/resolv.conf"));
    workload::setup();
    workload::lock_agent_memory();
}

/// With a network, the kernel configured `eth0` from the `ip=` command-line parameter and
/// wrote the resolver it was given to `/proc/net/pnp` (in resolv.conf syntax): copy its
/// `nameserver` lines to `/etc/resolv.conf`. Without a network there is no such file, or no
/// nameserver in it, and nothing changes.
fn install_resolver(pnp: &Path, resolv: &Path) {
    let Ok(text) = std::fs::read_to_string(pnp) else {
        return;
    };
    let servers: String = text
        .lines()
        // The kernel writes 0.0.0.0 for a server it was not given.
        .filter(|l| l.starts_with("nameserver ") && l.trim_end() != "nameserver 0.0.0.0")
        .map(|l| format!("{l}\n"))
        .collect();
    if servers.is_empty() {
        return;
    }
    if let Err(e) = std::fs::write(resolv, servers) {
        log!("cannot write {}: {e}", resolv.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_comes_from_proc_net_pnp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pnp = dir.path().join("pnp");
        let resolv = dir.path().join("resolv.conf");
        std::fs::write(&resolv, "# placeholder\n").expect("write");
        // No network: no file, nothing changes.
        install_resolver(&pnp, &resolv);
        assert_eq!(
            std::fs::read_to_string(&resolv).expect("read"),
            "# placeholder\n"
        );
        std::fs::write(
            &pnp,
            "#PROTO: MANUAL\nnameserver 172.30.0.1\nnameserver 0.0.0.0\n",
        )
        .expect("write");
        install_resolver(&pnp, &resolv);
        assert_eq!(
            std::fs::read_to_string(&resolv).expect("read"),
            "nameserver 172.30.0.1\n"
        );
    }

    /// Slots are capped and come back on every way a connection thread can end.
    #[test]
    fn slots_are_capped_and_released_on_drop_and_panic() {
        let active = Arc::new(AtomicUsize::new(0));
        let held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| Slot::take(&active).expect("a free slot"))
            .collect();
        assert!(Slot::take(&active).is_none(), "one slot too many");
        drop(held);
        assert_eq!(active.load(Ordering::SeqCst), 0);
        let slot = Slot::take(&active).expect("a free slot");
        let t = std::thread::spawn(move || {
            let _slot = slot;
            panic!("a handler panics");
        });
        assert!(t.join().is_err(), "the thread panicked");
        assert_eq!(
            active.load(Ordering::SeqCst),
            0,
            "the panic released its slot"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("vsock"), Ok(Listen::Vsock(1024)));
        assert_eq!(parse_listen("vsock:5000"), Ok(Listen::Vsock(5000)));
        assert_eq!(
            parse_listen("unix:/tmp/a.sock"),
            Ok(Listen::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            parse_listen("tcp:127.0.0.1:7000"),
            Ok(Listen::Tcp("127.0.0.1:7000".parse().expect("addr")))
        );
        assert!(parse_listen("tcp:0.0.0.0:7000").is_err());
        assert!(parse_listen("http://x").is_err());
    }
}
