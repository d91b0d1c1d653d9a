//! [`KvmRuntime`] and [`KvmSandbox`]: the trait implementations.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandbox_core::client::{self, AgentClient, ClientError};
use sandbox_core::exec::DEFAULT_EXEC_BUFFER;
use sandbox_core::{
    exec_channel, Error, ErrorKind, ExecRequest, ExecStream, FileOptions, Listing, RootMode,
    Runtime, Sandbox, SandboxId, SandboxSpec, SandboxSpecBuilder, SandboxState,
};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

use super::config::DiskMode;
use super::config::{
    check_socket_path, check_vmm_identity, resolve, Env, KvmRuntimeConfig, Resolved,
};
use super::copy::{copy_image, CopyMethod};
use super::dirfd::{OpenError, SandboxDir, StateDir};
use super::jail::{self, CgroupLimits, PreparedJail, PreparedRoot, SandboxCgroup};
use super::net::{NetLease, Networks, Plumbing, GUEST_MAC};
use super::process::{names, vmm_command, write_pid_file, VmmExit, VmmProcess};
use super::reconcile::reconcile;
use super::{sys, Result, RuntimeError};
use sandbox_vmm::vmm::{
    DiskConfig, FileSource, NetDeviceConfig, VmConfig, VmResources, VsockDeviceConfig,
};

/// The guest CID of every sandbox. Each VMM has its own vsock device and no host kernel vsock is
/// involved, so the CIDs of different sandboxes never meet.
const GUEST_CID: u64 = 3;
/// How long a new connection to a running agent may take (connect + `CONNECT` + handshake).
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// How far past an exec's own timeout the host gives up on the agent (the agent kills the
/// command at the timeout; this catches an agent that hangs).
pub const HOST_EXEC_GRACE: Duration = Duration::from_secs(10);
/// Idle handshaken connections kept per sandbox.
const POOL_MAX: usize = 4;
/// After a connection failure, how long to wait for the VMM's exit to tell a dead guest from a
/// broken connection.
const EXIT_PROBE: Duration = Duration::from_millis(500);
/// Lines of console (and VMM log) shown in errors.
const TAIL_LINES: usize = 25;

/// Counts live sandboxes; dropping a slot frees it.
#[derive(Debug)]
struct LiveSlot(Arc<AtomicUsize>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type CleanupJob = Box<dyn FnOnce() + Send>;

/// The runtime's cleanup thread: blocking cleanup (kill, reap, remove a directory) left behind
/// by a `create()` future that was dropped runs here, never in an async drop. The thread ends
/// when the runtime and every guard holding a handle are gone.
#[derive(Debug, Clone)]
struct Cleaner(mpsc::Sender<CleanupJob>);

impl Cleaner {
    fn start() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<CleanupJob>();
        std::thread::Builder::new()
            .name("sandbox-cleanup".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self(tx))
    }

    /// Runs `job` on the cleanup thread (inline if that thread is gone).
    fn run(&self, job: CleanupJob) {
        if let Err(mpsc::SendError(job)) = self.0.send(job) {
            job();
        }
    }
}

/// Everything a `create()` in progress has made, armed to be undone: dropped anywhere (the
/// caller dropped the future, an error returned early), it hands the cleanup to the
/// [`Cleaner`]: kill and reap the VMM, remove the directory, then release the lock and, last,
/// the live-sandbox slot (so `live_sandboxes()` counts a sandbox until nothing of it is left).
/// Success disarms it ([`CreateGuard::disarm`]).
struct CreateGuard {
    cleaner: Cleaner,
    slot: Option<LiveSlot>,
    dir: Option<SandboxDir>,
    lock: Option<File>,
    proc: Option<Arc<VmmProcess>>,
    net: Option<NetLease>,
}

impl CreateGuard {
    /// Kills and reaps the VMM, removes the directory, releases the lock; keeps the slot.
    /// Blocking.
    fn undo_blocking(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
            p.wait_blocking();
        }
        if let Some(n) = self.net.take() {
            n.teardown_blocking();
        }
        if let Some(d) = self.dir.take() {
            if let Err(e) = d.remove_all() {
                tracing::warn!(dir = %d.path().display(), error = %e, "cannot remove a sandbox directory");
            }
        }
        self.lock.take();
    }

    /// The pieces, for a sandbox that came up; the guard is then inert.
    fn disarm(mut self) -> Option<Made> {
        let net = self.net.take();
        Some(Made {
            slot: self.slot.take()?,
            dir: self.dir.take()?,
            lock: self.lock.take()?,
            proc: self.proc.take()?,
            net,
        })
    }
}

/// What a successful create made, out of its guard.
struct Made {
    slot: LiveSlot,
    dir: SandboxDir,
    lock: File,
    proc: Arc<VmmProcess>,
    net: Option<NetLease>,
}

impl Drop for CreateGuard {
    fn drop(&mut self) {
        let slot = self.slot.take();
        if self.proc.is_none() && self.dir.is_none() && self.lock.is_none() && self.net.is_none() {
            drop(slot);
            return;
        }
        let mut rest = CreateGuard {
            cleaner: self.cleaner.clone(),
            slot: None,
            dir: self.dir.take(),
            lock: self.lock.take(),
            proc: self.proc.take(),
            net: self.net.take(),
        };
        self.cleaner.run(Box::new(move || {
            rest.undo_blocking();
            drop(slot);
        }));
    }
}

impl std::fmt::Debug for CreateGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateGuard")
            .field("dir", &self.dir.as_ref().map(|d| d.path()))
            .field("pid", &self.proc.as_ref().map(|p| p.pid()))
            .finish()
    }
}

/// Sets a flag when dropped: tells the blocking half of `create()` that nobody waits for it.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs sandboxes as `sandbox-vmm` processes on this host's KVM. Cheap to share behind an `Arc`;
/// sandboxes it created keep working after it is dropped.
#[derive(Debug)]
pub struct KvmRuntime {
    cfg: Resolved,
    state: Arc<StateDir>,
    live: Arc<AtomicUsize>,
    cleaner: Cleaner,
    nets: Arc<Networks>,
}

impl KvmRuntime {
    /// Validates `config` (the builder's rules, also for a config edited field by field),
    /// resolves it (defaults from `SANDBOX_VMM`, `SANDBOX_KERNEL`, `SANDBOX_ROOTFS`,
    /// `SANDBOX_STATE_DIR`, `XDG_STATE_HOME`, `HOME`), warns when the state directory is a
    /// tmpfs (a sandbox's writable disk would live in memory), refuses a state directory whose sandbox socket paths would not fit a
    /// Unix socket address, checks `/dev/kvm`, creates the state directory (mode 0700) or checks
    /// that the existing one is ours (see `docs/runtime.md`), and removes stale sandboxes left
    /// in it by processes that are gone (killing their VMMs once verified).
    ///
    /// # Errors
    /// [`RuntimeError::Config`] (kind `InvalidSpec`); [`RuntimeError`]s of kind `HostSetup` that
    /// name the fix: no `sandbox-vmm`, guest artifacts not built (`cargo xtask guest`), `/dev/kvm`
    /// missing or not accessible, a kernel or rootfs that is not one
    /// ([`RuntimeError::ArtifactInvalid`]), a `vmm` that is not sandbox-vmm
    /// ([`RuntimeError::VmmNotOurs`]), state directory not writable
    /// ([`RuntimeError::StateDir`]) or not trusted ([`RuntimeError::StateDirUntrusted`]), socket
    /// path too long ([`RuntimeError::SocketPathTooLong`]).
    pub fn new(config: KvmRuntimeConfig) -> Result<Self> {
        Self::start(&config, &Env::process(), true)
    }

    /// [`KvmRuntime::new`] with the process environment given, and optionally without the
    /// `sandbox-vmm --version` and KVM checks (tests with a fake `sandbox-vmm`).
    fn start(config: &KvmRuntimeConfig, env: &Env<'_>, check_kvm: bool) -> Result<Self> {
        // Validation, path resolution and the socket-length check, before anything is made.
        let mut cfg = resolve(config, env)?;
        if check_kvm {
            // A wrong binary (`/bin/true`) would otherwise fail every create as a guest exit.
            check_vmm_identity(&cfg.vmm)?;
            drop(sandbox_vmm::kvm::open_kvm_at(&config.kvm_device)?);
        } else {
            // A stand-in VMM: no /dev/kvm to pass (the host may have none).
            cfg.kvm_device = None;
        }
        let state = StateDir::open(&cfg.state_dir, env.uid).map_err(|e| match e {
            OpenError::Distrust(d) => RuntimeError::StateDirUntrusted {
                path: cfg.state_dir.clone(),
                problem: d.problem(),
                fix: d.fix(),
            },
            OpenError::Io(source) => RuntimeError::StateDir {
                path: cfg.state_dir.clone(),
                source,
            },
        })?;
        if in_memory(&cfg.state_dir) {
            tracing::warn!(
                state_dir = %cfg.state_dir.display(),
                "the state directory is in memory (tmpfs): each sandbox's writable disk lives \
                 there, so its guest's writes count against its VMM's memory.max and a guest \
                 that writes more than the jail's memory overhead gets its VMM OOM-killed; put \
                 the state directory on a disk (KvmRuntimeConfig::state_dir, SANDBOX_STATE_DIR)"
            );
        }
        let state = Arc::new(state);
        // A VMM left by an earlier run may run as the jail's user.
        let owners: Vec<u32> = std::iter::once(env.uid)
            .chain(cfg.jail.user.map(|u| u.uid))
            .collect();
        let cleaned = reconcile(&state, &owners).map_err(|source| RuntimeError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        if !cleaned.is_empty() {
            tracing::info!(
                state_dir = %cfg.state_dir.display(),
                count = cleaned.len(),
                "cleaned stale sandboxes"
            );
        }
        // The jail (docs/jail.md): what this host provides; a required layer it lacks fails here.
        cfg.jail_support = jail::probe(&cfg.jail, &cfg.vmm, &cfg.state_dir)?;
        if let Some(root) = &cfg.jail_support.cgroup {
            // Cgroups of this state directory's sandboxes whose directory is gone were left by
            // runtimes that died (their VMMs were killed by reconciliation above, or died with
            // their runtime through the parent-death signal).
            let state_dir = cfg.state_dir.clone();
            jail::reconcile(root, &jail::state_key(&state_dir), |id| {
                state_dir.join(id).exists()
            });
        }
        let cleaner = Cleaner::start().map_err(|source| RuntimeError::Io {
            action: "start the cleanup thread for",
            path: cfg.state_dir.clone(),
            source,
        })?;
        // Networks of sandboxes whose directory reconciliation just removed (docs/network.md).
        let nets = Arc::new(Networks::new(cfg.network.clone(), cfg.policy.clone()));
        nets.reconcile_blocking(&cfg.state_dir);
        Ok(Self {
            cfg,
            state,
            live: Arc::new(AtomicUsize::new(0)),
            cleaner,
            nets,
        })
    }

    /// A spec builder for the runtime's default kernel and rootfs.
    pub fn spec_builder(&self) -> SandboxSpecBuilder {
        SandboxSpec::builder(&self.cfg.kernel, &self.cfg.rootfs)
    }

    /// The state directory (absolute): one `sbx-<hex>/` directory per live sandbox.
    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    /// The `sandbox-vmm` binary this runtime starts.
    pub fn vmm_path(&self) -> &Path {
        &self.cfg.vmm
    }

    /// The directory of sandbox `id` (whether or not it exists).
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.cfg.state_dir.join(id.as_str())
    }

    /// A new raw connection to sandbox `id`'s agent, after `CONNECT <port>` but before the
    /// protocol handshake (for protocol tests and tools). Bounded by 10 s.
    ///
    /// # Errors
    /// `AgentUnreachable` when the socket or the port does not answer in time.
    pub async fn raw_agent_stream(&self, id: &SandboxId) -> sandbox_core::Result<UnixStream> {
        let sock = self.sandbox_dir(id).join(names::VSOCK);
        raw_connect(&sock, self.cfg.agent_port).await
    }

    /// Sandboxes alive in this runtime now, counting a failed or abandoned `create()` until its
    /// cleanup has finished.
    pub fn live_sandboxes(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// [`Runtime::create`], returning the concrete type.
    ///
    /// Cancel-safe: dropping the future at any point leaves no process, no directory and no
    /// live-sandbox count behind once the runtime's cleanup thread has run (the blocking part
    /// stops at its next step; the cleanup is handed to that thread, not run in a drop).
    ///
    /// # Errors
    /// As [`Runtime::create`]: `HostSetup` (limits, spawn, socket path too long), `InvalidSpec`
    /// (the VM config refused the spec), `Io`, `GuestExited` (the VMM died while booting) and
    /// `AgentUnreachable` (no handshake before the deadline), the last two with the console tail
    /// in the message.
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> sandbox_core::Result<KvmSandbox> {
        let max = self.cfg.max_sandboxes;
        if self.live.fetch_add(1, Ordering::SeqCst) >= max {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::TooManySandboxes { max }.into());
        }
        let mut guard = CreateGuard {
            cleaner: self.cleaner.clone(),
            slot: Some(LiveSlot(self.live.clone())),
            dir: None,
            lock: None,
            proc: None,
            net: None,
        };
        let started = Instant::now();
        let id = SandboxId::new(new_id().map_err(|source| RuntimeError::Io {
            action: "read random bytes for",
            path: PathBuf::from("the sandbox id"),
            source,
        })?);
        check_socket_path(&self.sandbox_dir(&id).join(names::VSOCK))?;
        // The network first (docs/network.md): its tap goes to the VMM.
        let plumbing = match spec.network() {
            Some(n) => {
                let (lease, plumbing) = self.nets.create(id.as_str(), n).await?;
                guard.net = Some(lease);
                Some(plumbing)
            }
            None => None,
        };
        // The blocking half owns the guard while it runs and hands it back armed with what it
        // made; if this future is gone by then, dropping the unsent guard cleans up.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let cancelled = cancel.0.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (cfg, state, spec2, id2) = (
            self.cfg.clone(),
            self.state.clone(),
            spec.clone(),
            id.clone(),
        );
        tokio::task::spawn_blocking(move || {
            // `plumbing` (the tap) stays open until the VMM inherited it, then closes here.
            let r = prepare(
                &cfg,
                &spec2,
                &state,
                &id2,
                &mut guard,
                &cancelled,
                plumbing.as_ref(),
            );
            drop(plumbing);
            if r.is_err() {
                // Undo here, already on a blocking thread, so the error returns clean.
                guard.undo_blocking();
            }
            let _ = tx.send((guard, r));
        });
        let (mut guard, prepared) = rx
            .await
            .map_err(|e| Error::with_source(ErrorKind::Internal, "The create task failed.", e))?;
        let copy = prepared?;
        let (proc, sock) = match (&guard.proc, &guard.dir) {
            (Some(p), Some(d)) => (p.clone(), d.fd_path(names::VSOCK)),
            _ => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "create: the VMM or its directory is missing after a successful prepare.",
                ))
            }
        };
        tracing::info!(id = %id, pid = proc.pid(), ?copy, "sandbox VMM started");

        let port = self.cfg.agent_port;
        // The deadline covers the whole of create (the rootfs copy and the spawn included), so a
        // caller's bound on create() holds however slow the disk is.
        let deadline = self.cfg.create_deadline;
        let left = deadline.saturating_sub(started.elapsed());
        let outcome = tokio::select! {
            r = client::wait_for_agent(&sock, port, left) => Ok(r),
            exit = proc.wait() => Err(exit),
        };
        let failure = match outcome {
            Ok(Ok(client)) => {
                let Some(Made {
                    slot,
                    dir,
                    lock,
                    proc,
                    net,
                }) = guard.disarm()
                else {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        "create: the guard lost a piece of the sandbox.",
                    ));
                };
                drop(cancel);
                let shared = Arc::new(SandboxShared {
                    id: id.clone(),
                    dir,
                    proc,
                    state: Mutex::new(SandboxState::Creating.transition(SandboxState::Running)?),
                    env: spec.env().clone(),
                    pool: Mutex::new(vec![client]),
                    agent_port: port,
                    destroy_grace: self.cfg.destroy_grace,
                    lock: Mutex::new(Some(lock)),
                    slot: Mutex::new(Some(slot)),
                    torn_down: AtomicBool::new(false),
                    teardown_lock: Mutex::new(()),
                    net,
                    disk_cap: spec.disk_cap_mib().map(|m| m << 20),
                });
                let ttl_task = spec.ttl().map(|ttl| {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(ttl).await;
                        shared.expire(ttl).await;
                    })
                });
                tracing::info!(id = %id, ms = started.elapsed().as_millis() as u64, "sandbox running");
                return Ok(KvmSandbox {
                    shared,
                    ttl_task: Mutex::new(ttl_task),
                });
            }
            Ok(Err(e)) => Err(e),
            Err(exit) => Ok(exit),
        };
        // Failure: kill, collect the console tail, remove everything (on a blocking thread; if
        // this future is dropped meanwhile, that thread still finishes the job).
        let dir_path = self.sandbox_dir(&id);
        let teardown = tokio::task::spawn_blocking(move || {
            if let Some(p) = &guard.proc {
                p.kill();
                p.wait_blocking();
            }
            let console = guard.dir.as_ref().map(console_tail).unwrap_or_default();
            let exit = guard.proc.as_ref().and_then(|p| p.exit());
            guard.undo_blocking();
            drop(guard);
            (console, exit)
        })
        .await;
        let (console, exit) = teardown.unwrap_or_default();
        tracing::warn!(id = %id, dir = %dir_path.display(), "sandbox creation failed; cleaned up");
        Err(match failure {
            // Exit 5: KVM_EXIT_INTERNAL_ERROR before the agent answered. On a host whose KVM
            // cannot run the guest kernel (docs/testing.md) every boot ends this way.
            Ok(exit) if exit.0.code() == Some(5) => RuntimeError::KvmCannotRunGuest {
                id: id.to_string(),
                how: exit.to_string(),
                why: internal_error_detail(&console),
                console,
            },
            // Exit 1 (a VMM error: invalid config, kernel load, /dev/kvm) or 2 (usage) before
            // the agent answered: the VMM never ran the guest (docs/vmm.md's exit statuses).
            Ok(exit) if matches!(exit.0.code(), Some(1 | 2)) => {
                vmm_refused(id.as_str(), exit, console)
            }
            Ok(exit) => exit_error(id.as_str(), exit, console),
            Err(source) if source.kind() == ErrorKind::Protocol => {
                return Err(Error::with_source(
                    ErrorKind::Protocol,
                    format!("Sandbox {id}: the guest agent speaks another protocol.{console}"),
                    source,
                ))
            }
            // Ended on its own (not by our kill) at the moment the deadline passed: say so.
            Err(_) if exit.is_some_and(|e| e.0.signal().is_none()) => RuntimeError::GuestExited {
                id: id.to_string(),
                how: exit.map(|e| e.to_string()).unwrap_or_default(),
                console,
            },
            Err(source) => RuntimeError::AgentUnreachable {
                id: id.to_string(),
                after: started.elapsed(),
                console,
                source,
            },
        }
        .into())
    }
}

#[async_trait]
impl Runtime for KvmRuntime {
    async fn create(&self, spec: SandboxSpec) -> sandbox_core::Result<Box<dyn Sandbox>> {
        Ok(Box::new(self.create_sandbox(spec).await?))
    }
}

/// `sbx-` and 16 random hex digits.
fn new_id() -> std::io::Result<String> {
    let mut b = [0u8; 8];
    sys::random_bytes(&mut b)?;
    Ok(format!("sbx-{:016x}", u64::from_be_bytes(b)))
}

/// The blocking part of create: directory, lock, rootfs copy, VM config, log, spawn, pid file,
/// each recorded in `guard` as soon as it exists. Every file is created through the directory's
/// fd (`O_EXCL | O_NOFOLLOW`), and the VMM runs in that directory (`fchdir`) with relative
/// names for its config, disk, console and socket. Stops early (`Interrupted`) once `cancelled`
/// is set: nobody waits for the result.
fn prepare(
    cfg: &Resolved,
    spec: &SandboxSpec,
    state: &Arc<StateDir>,
    id: &SandboxId,
    guard: &mut CreateGuard,
    cancelled: &AtomicBool,
    plumbing: Option<&Plumbing>,
) -> Result<Option<CopyMethod>> {
    let path = state.path().join(id.as_str());
    let io = |action: &'static str, name: &str| {
        let path = path.join(name);
        move |source| RuntimeError::Io {
            action,
            path,
            source,
        }
    };
    let check = || {
        if cancelled.load(Ordering::SeqCst) {
            Err(io("finish (the caller gave up on)", "")(
                std::io::Error::from(std::io::ErrorKind::Interrupted),
            ))
        } else {
            Ok(())
        }
    };
    check()?;
    // The spec's files first, so a typo is `InvalidSpec` naming the path, before any copy.
    let base = base_image(cfg, spec)?;
    for (field, path) in [("kernel", spec.kernel()), ("rootfs", base.as_path())] {
        let f = File::open(path).map_err(|source| RuntimeError::SpecFile {
            field,
            path: path.to_path_buf(),
            source,
        })?;
        // A text file as the kernel or the rootfs would otherwise end the VMM or panic the
        // guest kernel, reported as if the guest had exited.
        let problem = match field {
            "kernel" => super::config::kernel_problem(&f),
            _ => super::config::rootfs_problem(&f),
        };
        if let Some(problem) = problem {
            return Err(RuntimeError::SpecFileInvalid {
                field,
                path: path.to_path_buf(),
                problem,
            });
        }
    }
    let disk = DiskPlan::new(cfg.disk_mode, spec, &base)?;
    let dir = guard
        .dir
        .insert(SandboxDir::create(state.clone(), id.as_str()).map_err(io("create", ""))?);
    let lock = dir
        .create_file(names::LOCK, 0o600)
        .map_err(io("create", names::LOCK))?;
    // Nobody else knows the new random directory yet, so this cannot fail with "busy".
    sys::try_lock_exclusive(lock.as_fd()).map_err(io("lock", names::LOCK))?;
    guard.lock = Some(lock);
    check()?;
    // Every file the VMM uses is opened here and inherited, named by number in its config
    // (docs/jail.md): it opens nothing by path, so its root can be an empty directory.
    let mut files = InheritedFiles::default();
    let kvm = match &cfg.kvm_device {
        Some(path) => {
            let kvm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|source| RuntimeError::Io {
                    action: "open",
                    path: path.clone(),
                    source,
                })?;
            Some(files.add(kvm))
        }
        None => None,
    };
    let kernel = File::open(spec.kernel()).map_err(|source| RuntimeError::SpecFile {
        field: "kernel",
        path: spec.kernel().to_path_buf(),
        source,
    })?;
    let kernel = files.add(kernel);
    let open_base = |base: &Path| {
        File::open(base).map_err(|source| RuntimeError::SpecFile {
            field: "rootfs",
            path: base.to_path_buf(),
            source,
        })
    };
    let (disk_config, copy) = match (spec.root(), disk.mode) {
        (RootMode::Writable, DiskMode::Overlay) => {
            let base = std::path::absolute(&base).map_err(io("resolve the rootfs path for", ""))?;
            let at = dir.join(names::OVERLAY);
            sandbox_fs::create_overlay(&at, &base, disk.virtual_size).map_err(|source| {
                RuntimeError::Overlay {
                    path: at.clone(),
                    base: base.clone(),
                    source,
                }
            })?;
            let overlay = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.fd_path(names::OVERLAY))
                .map_err(io("open", names::OVERLAY))?;
            let report = dir
                .create_file(names::DISK_FULL, 0o600)
                .map_err(io("create", names::DISK_FULL))?;
            (
                DiskConfig::qcow2_overlay(
                    files.add(overlay),
                    files.add(open_base(&base)?),
                    disk.cap,
                )
                .with_full_report(files.add(report)),
                None,
            )
        }
        (RootMode::Writable, _) => {
            let to = dir
                .create_file(names::ROOTFS, 0o600)
                .map_err(io("create", names::ROOTFS))?;
            let m = copy_image(&base, &to, cancelled)
                .map_err(io("copy the rootfs to", names::ROOTFS))?;
            (DiskConfig::new(files.add(to), false), Some(m))
        }
        (RootMode::ReadOnly, _) => (DiskConfig::new(files.add(open_base(&base)?), true), None),
    };
    let console = dir
        .create_file(names::CONSOLE, 0o600)
        .map_err(io("create", names::CONSOLE))?;
    let console = files.add(console);
    // The runtime makes the vsock listener (so the socket file is in place before the VMM
    // runs) and connects to its path; the VMM only accepts on the inherited fd.
    let listener = std::os::unix::net::UnixListener::bind(dir.fd_path(names::VSOCK))
        .map_err(io("create the socket", names::VSOCK))?;
    let vsock = files.add(OwnedFd::from(listener));
    check()?;
    let net = plumbing.map(|p| (std::os::fd::AsRawFd::as_raw_fd(&p.tap), p.ip_param.as_str()));
    let vm = vm_config(
        cfg,
        spec,
        VmFiles {
            kvm,
            kernel,
            console,
            vsock,
        },
        disk_config,
        net,
    );
    // Validate here, with the typed error, rather than in the child: the fds are this
    // process's, at the numbers the child inherits them under.
    VmResources::try_from(vm.clone())?;
    let json = serde_json::to_vec_pretty(&vm)
        .map_err(|e| io("serialize", names::CONFIG)(std::io::Error::other(e)))?;
    let config = dir
        .create_file(names::CONFIG, 0o600)
        .map_err(io("write", names::CONFIG))?;
    std::io::Write::write_all(&mut &config, &json).map_err(io("write", names::CONFIG))?;
    if let Some(user) = cfg.jail.user {
        // The VMM reads its config as that user.
        std::os::unix::fs::fchown(&config, Some(user.uid), Some(user.gid))
            .map_err(io("change the owner of", names::CONFIG))?;
    }
    drop(config);
    let log = dir
        .create_file(names::VMM_LOG, 0o600)
        .map_err(io("create", names::VMM_LOG))?;
    let root = match &cfg.jail_support.private_root {
        Some(root_files) => Some(
            PreparedRoot::create(&dir.fd_path("."), root_files, names::CONFIG)
                .map_err(io("prepare the private root in", jail::ROOT_DIR))?,
        ),
        None => None,
    };
    check()?;
    // The jail (docs/jail.md): the cgroup exists before the fork, so the child can join it.
    let cgroup = match &cfg.jail_support.cgroup {
        Some(root) => Some(SandboxCgroup::create(
            root,
            &jail::cgroup_name(&cfg.state_dir, id.as_str()),
            CgroupLimits::for_guest(&cfg.jail, spec.memory_mib(), spec.vcpus()),
        )?),
        None => None,
    };
    let mut inherit = [-1; jail::MAX_INHERITED_FDS];
    for (slot, fd) in inherit
        .iter_mut()
        .zip(files.raw().chain(net.map(|(fd, _)| fd)))
    {
        *slot = fd;
    }
    let prepared = PreparedJail {
        cgroup_procs: cgroup.as_ref().map_or(-1, SandboxCgroup::procs_fd),
        namespaces: cfg.jail_support.namespaces,
        restrict: cfg.jail.restrict_process,
        fsize: jail_fsize(cfg, disk.virtual_size),
        inherit,
        root,
        user: cfg.jail.user,
    };
    let cmd = vmm_command(&cfg.vmm, dir, log, prepared);
    // `cgroup` (and its procs fd) lives until the spawn returned, then goes to the watcher;
    // `files` until here too, then the VMM holds the only copies.
    let proc = VmmProcess::spawn_jailed(cmd, cgroup).map_err(|source| RuntimeError::Spawn {
        vmm: cfg.vmm.clone(),
        source,
    })?;
    drop(files);
    let pid = proc.pid();
    guard.proc = Some(proc);
    write_pid_file(dir, pid).map_err(io("write", names::PID))?;
    Ok(copy)
}

/// The files a VMM inherits, open until it is spawned.
#[derive(Default)]
struct InheritedFiles(Vec<OwnedFd>);

impl InheritedFiles {
    /// Keeps `f` open and returns the config entry naming it.
    fn add(&mut self, f: impl Into<OwnedFd>) -> FileSource {
        let f = f.into();
        let n = f.as_raw_fd();
        self.0.push(f);
        FileSource::fd(n)
    }

    fn raw(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.0.iter().map(AsRawFd::as_raw_fd)
    }
}

/// `RLIMIT_FSIZE` of a sandbox's VMM: the largest file it writes (its disk, its console log)
/// plus room for its own log and an overlay's metadata.
fn jail_fsize(cfg: &Resolved, disk_bytes: u64) -> u64 {
    disk_bytes
        .max(cfg.console_cap_bytes)
        .saturating_add(jail::FSIZE_SLACK_BYTES)
}

/// The root disk's base: the spec's image from the store, else its rootfs file.
fn base_image(cfg: &Resolved, spec: &SandboxSpec) -> Result<PathBuf> {
    let Some(reference) = spec.image() else {
        return Ok(spec.rootfs().to_path_buf());
    };
    let err = |source| RuntimeError::Image {
        reference: reference.to_string(),
        store: cfg.image_store.clone(),
        source,
    };
    let store = sandbox_fs::ImageStore::open(&cfg.image_store).map_err(|source| {
        RuntimeError::ImageStore {
            reference: reference.to_string(),
            store: cfg.image_store.clone(),
            source,
        }
    })?;
    Ok(store.resolve(reference).map_err(err)?.path)
}

/// How the root disk is made, decided before anything is created.
struct DiskPlan {
    mode: DiskMode,
    /// The disk's size as the guest sees it, bytes.
    virtual_size: u64,
    /// The overlay's cap, bytes.
    cap: Option<u64>,
}

impl DiskPlan {
    fn new(mode: DiskMode, spec: &SandboxSpec, base: &Path) -> Result<Self> {
        let not_file = |source| RuntimeError::SpecFile {
            field: "rootfs",
            path: base.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(base).map_err(not_file)?;
        if !meta.is_file() {
            return Err(not_file(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let base_size = meta.len();
        let wants_overlay = spec.disk_size_mib().is_some() || spec.disk_cap_mib().is_some();
        let writable = spec.root() == RootMode::Writable;
        if wants_overlay && !(writable && mode == DiskMode::Overlay) {
            return Err(RuntimeError::DiskSpec {
                problem: "disk_size_mib and disk_cap_mib need a writable root on an overlay \
                          (RootMode::Writable, DiskMode::Overlay)"
                    .into(),
            });
        }
        // Whole 512-byte sectors; a base that is not (a raw image of odd size) is rounded up.
        let virtual_size = match spec.disk_size_mib() {
            Some(mib) => mib << 20,
            None => base_size.div_ceil(512) * 512,
        };
        if virtual_size < base_size {
            return Err(RuntimeError::DiskSpec {
                problem: format!(
                    "disk_size_mib {} is smaller than the base image ({base_size} bytes)",
                    virtual_size >> 20
                ),
            });
        }
        Ok(DiskPlan {
            mode,
            virtual_size,
            cap: spec.disk_cap_mib().map(|mib| mib << 20),
        })
    }
}

/// The files of a sandbox's VM config besides its disk.
struct VmFiles {
    /// `None`: the VMM opens `/dev/kvm` (tests with a stand-in VMM only).
    kvm: Option<FileSource>,
    kernel: FileSource,
    console: FileSource,
    vsock: FileSource,
}

/// The VM config for one sandbox: the spec's shape, the disk, `/dev/kvm`, the kernel, the
/// console log and the vsock listener.
fn vm_config(
    cfg: &Resolved,
    spec: &SandboxSpec,
    files: VmFiles,
    disk: DiskConfig,
    net: Option<(std::os::fd::RawFd, &str)>,
) -> VmConfig {
    let mode = if disk.read_only { "ro" } else { "rw" };
    let mut cmdline = format!("root=/dev/vda {mode}");
    if let Some((_, ip)) = net {
        cmdline.push(' ');
        cmdline.push_str(ip);
    }
    for p in spec.extra_cmdline() {
        cmdline.push(' ');
        cmdline.push_str(p);
    }
    let mut vm = VmConfig::new(files.kernel);
    vm.kvm = files.kvm;
    let vm = vm
        .vcpus(spec.vcpus())
        .memory_mib(spec.memory_mib())
        .disk(disk)
        .cmdline_extra(cmdline)
        .console_file(files.console, cfg.console_cap_bytes)
        .vsock(VsockDeviceConfig::new(GUEST_CID, files.vsock))
        .seccomp(cfg.jail.seccomp)
        .debug_forbidden_syscall(cfg.jail.debug_forbidden_syscall);
    match net {
        Some((tap_fd, _)) => vm.net(NetDeviceConfig::new(tap_fd, GUEST_MAC)),
        None => vm,
    }
}

/// The last `n` lines of the console log and of the VMM's log, formatted for an error message
/// (empty when both are empty).
fn console_tail(dir: &SandboxDir) -> String {
    let mut out = String::new();
    for (label, name) in [
        ("console", names::CONSOLE),
        ("sandbox-vmm log", names::VMM_LOG),
    ] {
        let lines = dir
            .open_read(name)
            .map(|f| tail_lines(f, TAIL_LINES))
            .unwrap_or_default();
        if !lines.is_empty() {
            out.push_str(&format!("\n--- {label} (last lines) ---\n{lines}"));
        }
    }
    out
}

/// Whether `dir` is on a file system that lives in memory (tmpfs, ramfs).
fn in_memory(dir: &Path) -> bool {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // ramfs(7): nix names no constant for it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    statfs(dir).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// What to change after a VMM's OOM kill. Files in memory (`shmem`) that are at least a quarter
/// of the limit (and 16 MiB) are a writable disk in a tmpfs state directory: every byte the
/// guest writes is charged to the VMM's cgroup and cannot be reclaimed (no swap).
fn oom_fix(oom: super::process::OomKill) -> String {
    const MIB: u64 = 1024 * 1024;
    match (oom.shmem, oom.memory_max) {
        (Some(shmem), Some(max)) if shmem >= 16 * MIB && shmem.saturating_mul(4) >= max => format!(
            "{} MiB of it were files in memory: the state directory is in memory (tmpfs), so \
             the sandbox's writable disk grows the VMM's memory with every write; put the \
             state directory on a disk (KvmRuntimeConfig::state_dir or SANDBOX_STATE_DIR; \
             docs/runtime.md)",
            shmem / MIB
        ),
        _ => "raise JailConfig::memory_overhead_mib (or the spec's memory)".to_string(),
    }
}

/// The error for a VMM that ended with `exit`: [`RuntimeError::VmmOutOfMemory`] when its
/// cgroup's OOM killer ended it, [`RuntimeError::VmmSeccomp`] for a seccomp violation (its log
/// line quoted), [`RuntimeError::GuestExited`] otherwise.
fn exit_error(id: &str, exit: VmmExit, console: String) -> RuntimeError {
    if let Some(oom) = exit.1 {
        return RuntimeError::VmmOutOfMemory {
            id: id.to_string(),
            memory_max: oom
                .memory_max
                .map_or_else(|| "its limit".to_string(), |b| format!("{b} bytes")),
            fix: oom_fix(oom),
            console,
        };
    }
    if exit.0.code() == Some(sandbox_vmm::vmm::EXIT_SECCOMP) {
        let report = console
            .lines()
            .find_map(|l| l.split_once("seccomp: ").map(|(_, r)| r.trim()))
            .unwrap_or("no report in its log")
            .chars()
            .take(200)
            .collect();
        return RuntimeError::VmmSeccomp {
            id: id.to_string(),
            report,
            console,
        };
    }
    RuntimeError::GuestExited {
        id: id.to_string(),
        how: exit.to_string(),
        console,
    }
}

/// [`RuntimeError::VmmRefused`] for a VMM that ended with exit 1 or 2 before the agent answered,
/// quoting its `sandbox-vmm: error: ...` line (or clap's `error: ...`).
fn vmm_refused(id: &str, exit: VmmExit, console: String) -> RuntimeError {
    let reason = console
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once("sandbox-vmm: error: ")
                .map(|(_, r)| r)
                .or_else(|| l.strip_prefix("error: "))
        })
        .map_or_else(
            || "no error line in its log".to_string(),
            |r| r.trim().chars().take(300).collect(),
        );
    RuntimeError::VmmRefused {
        id: id.to_string(),
        how: exit.to_string(),
        reason,
        console,
    }
}

/// What the VMM's log says KVM reported, for [`RuntimeError::KvmCannotRunGuest`]: `", an
/// emulation failure on vCPU 0 at RIP ..."` from its `KVM internal error: ...` line, or nothing.
fn internal_error_detail(console: &str) -> String {
    console
        .lines()
        .find_map(|l| l.split_once("KVM internal error: ").map(|(_, d)| d.trim()))
        .map(|d| format!(" (KVM: {})", d.chars().take(200).collect::<String>()))
        .unwrap_or_default()
}

/// The last `n` lines of a file, reading at most its last 16 KiB.
fn tail_lines(mut f: File, n: usize) -> String {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(16 * 1024);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(16 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

/// Connects to a VMM's vsock socket and asks for guest `port`, within [`CONNECT_DEADLINE`].
async fn raw_connect(sock: &Path, port: u32) -> sandbox_core::Result<UnixStream> {
    let attempt = async {
        let mut s = UnixStream::connect(sock).await.map_err(|e| {
            Error::with_source(
                ErrorKind::AgentUnreachable,
                "Cannot connect to the sandbox's vsock socket.",
                e,
            )
        })?;
        client::vsock_connect(&mut s, port).await?;
        Ok(s)
    };
    let started = Instant::now();
    match tokio::time::timeout(CONNECT_DEADLINE, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            ErrorKind::AgentUnreachable,
            format!(
                "The sandbox's vsock socket did not answer CONNECT {port}; gave up after {:?}.",
                started.elapsed()
            ),
        )),
    }
}

/// State shared by a sandbox handle and its background tasks (TTL, exec streams).
#[derive(Debug)]
struct SandboxShared {
    id: SandboxId,
    /// The sandbox directory, held open: files and the socket are reached through its fd.
    dir: SandboxDir,
    proc: Arc<VmmProcess>,
    state: Mutex<SandboxState>,
    env: BTreeMap<String, String>,
    pool: Mutex<Vec<AgentClient<UnixStream>>>,
    agent_port: u32,
    destroy_grace: Duration,
    /// The directory's `flock`, held for the sandbox's life (see `reconcile`).
    lock: Mutex<Option<File>>,
    slot: Mutex<Option<LiveSlot>>,
    torn_down: AtomicBool,
    teardown_lock: Mutex<()>,
    /// The sandbox's network, deleted at teardown.
    net: Option<NetLease>,
    /// The root disk's cap, bytes.
    disk_cap: Option<u64>,
}

impl SandboxShared {
    fn state(&self) -> SandboxState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `to` if the table allows it from the current state; returns whether it did.
    fn try_transition(&self, to: SandboxState) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.transition(to) {
            Ok(next) => {
                *s = next;
                true
            }
            Err(_) => false,
        }
    }

    fn guest_exited(&self, exit: VmmExit) -> Error {
        self.try_transition(SandboxState::Failed);
        exit_error(self.id.as_str(), exit, console_tail(&self.dir)).into()
    }

    fn check_running(&self) -> sandbox_core::Result<()> {
        if let Some(exit) = self.proc.exit() {
            if self.state() == SandboxState::Running {
                return Err(self.guest_exited(exit));
            }
        }
        let s = self.state();
        if !s.can_exec() {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!("Sandbox {} is {s:?}.", self.id),
            ));
        }
        Ok(())
    }

    async fn client(&self) -> sandbox_core::Result<AgentClient<UnixStream>> {
        self.check_running()?;
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(c) = pooled {
            return Ok(c);
        }
        let sock = self.dir.fd_path(names::VSOCK);
        match client::connect_vsock_unix(&sock, self.agent_port, CONNECT_DEADLINE).await {
            Ok(c) => Ok(c),
            Err(e) => Err(self.map_client_err(e).await),
        }
    }

    /// Returns a healthy connection to the pool.
    fn put(&self, c: AgentClient<UnixStream>) {
        // `torn_down` is read under the pool lock, which teardown holds while clearing the pool,
        // so a connection can never be parked in the pool of a torn-down sandbox.
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if !c.is_broken() && !self.torn_down.load(Ordering::SeqCst) && pool.len() < POOL_MAX {
            pool.push(c);
        }
    }

    /// A connection-level failure while the VMM is dying is reported as `GuestExited`.
    async fn map_client_err(&self, e: ClientError) -> Error {
        if matches!(
            e.kind(),
            ErrorKind::AgentUnreachable | ErrorKind::Protocol | ErrorKind::Io
        ) {
            if let Ok(exit) = tokio::time::timeout(EXIT_PROBE, self.proc.wait()).await {
                return self.guest_exited(exit);
            }
        }
        e.into()
    }

    /// `map_client_err` for an error already in its public form (from an exec
    /// stream): a connection-level failure while the VMM is dying becomes `GuestExited`.
    async fn map_public_err(&self, e: Error) -> Error {
        if matches!(
            e.kind(),
            ErrorKind::AgentUnreachable | ErrorKind::Protocol | ErrorKind::Io
        ) {
            if let Ok(exit) = tokio::time::timeout(EXIT_PROBE, self.proc.wait()).await {
                return self.guest_exited(exit);
            }
        }
        e
    }

    /// Returns `c` to the pool and maps a failure of the request it ran.
    async fn finish<T>(
        &self,
        c: AgentClient<UnixStream>,
        r: client::Result<T>,
    ) -> sandbox_core::Result<T> {
        self.put(c);
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(self.map_client_err(e).await),
        }
    }

    /// Kills and reaps the VMM, closes pooled connections, removes the directory, releases the
    /// lock and the live slot. Blocking; idempotent; serialized.
    fn teardown_blocking(&self) -> std::io::Result<()> {
        let _serial = self.teardown_lock.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            self.torn_down.store(true, Ordering::SeqCst);
            pool.clear();
        }
        self.proc.kill();
        self.proc.wait_blocking();
        if let Some(net) = &self.net {
            net.teardown_blocking();
        }
        let r = self.dir.remove_all();
        if r.is_ok() {
            self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
            self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        r
    }

    /// The TTL ended: kill everything, whatever the agent is doing.
    async fn expire(self: Arc<Self>, ttl: Duration) {
        tracing::warn!(id = %self.id, ttl_secs = ttl.as_secs(), "sandbox TTL expired; killing its VMM");
        self.try_transition(SandboxState::Failed);
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.teardown_blocking()).await;
    }
}

/// A sandbox's root disk use of host space ([`KvmSandbox::disk_usage`]). Bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskUsage {
    /// The overlay file's length.
    pub file_bytes: u64,
    /// Host blocks the overlay file holds.
    pub allocated_bytes: u64,
    /// The spec's cap (`disk_cap_mib`), if any.
    pub cap_bytes: Option<u64>,
    /// Guest writes refused for lack of space so far (each an I/O error in the guest).
    pub refused_writes: u64,
}

/// One sandbox: a `sandbox-vmm` process and its directory. Dropping it without `destroy()`
/// kills the VMM and removes the directory (synchronously, best effort).
#[derive(Debug)]
pub struct KvmSandbox {
    shared: Arc<SandboxShared>,
    ttl_task: Mutex<Option<JoinHandle<()>>>,
}

impl KvmSandbox {
    /// The sandbox's directory under the runtime's state directory.
    pub fn dir(&self) -> &Path {
        self.shared.dir.path()
    }

    /// The VMM's vsock Unix socket (host side of virtio-vsock; speak `CONNECT <port>\n` first).
    pub fn vsock_path(&self) -> PathBuf {
        self.shared.dir.join(names::VSOCK)
    }

    /// Forwards a host TCP port to `guest_port` inside a sandbox that has a network, until
    /// [`KvmSandbox::unexpose`] or destroy; returns the host address to connect to
    /// (`127.0.0.1:<ephemeral>` by default, `KvmRuntimeConfig::network`'s bind address).
    ///
    /// # Errors
    /// `InvalidState` when the sandbox has no network; `Io` when the port cannot be opened.
    pub async fn expose(&self, guest_port: u16) -> sandbox_core::Result<std::net::SocketAddr> {
        let Some(net) = &self.shared.net else {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!(
                    "Sandbox {} has no network; fix: create it with SandboxSpec::network.",
                    self.shared.id
                ),
            ));
        };
        Ok(net.expose(guest_port).await?)
    }

    /// The root disk's use of host space, for an overlay root (`DiskMode::Overlay`, a writable
    /// root); `None` otherwise. `refused_writes` counts guest writes that failed because the
    /// spec's `disk_cap_mib` (or the host file system) was full: the guest saw an I/O error for
    /// each, and the sandbox goes on.
    ///
    /// # Errors
    /// `Io` if the overlay cannot be read.
    pub fn disk_usage(&self) -> sandbox_core::Result<Option<DiskUsage>> {
        let overlay = self.shared.dir.fd_path(names::OVERLAY);
        let meta = match std::fs::symlink_metadata(&overlay) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(RuntimeError::Io {
                    action: "read the size of",
                    path: self.shared.dir.join(names::OVERLAY),
                    source,
                }
                .into())
            }
        };
        let refused_writes = std::fs::read(self.shared.dir.fd_path(names::DISK_FULL))
            .ok()
            .and_then(|b| {
                b.get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            })
            .unwrap_or(0);
        Ok(Some(DiskUsage {
            file_bytes: meta.len(),
            allocated_bytes: std::os::unix::fs::MetadataExt::blocks(&meta) * 512,
            cap_bytes: self.shared.disk_cap,
            refused_writes,
        }))
    }

    /// The deny events of the sandbox's egress policy (docs/policy.md): every refused name and
    /// denied connection, rate-limited and bounded. The first call takes the stream; later
    /// calls, and sandboxes without a policy, get `None`.
    pub fn egress_events(&self) -> Option<tokio::sync::mpsc::Receiver<sandbox_policy::DenyEvent>> {
        self.shared.net.as_ref().and_then(NetLease::events)
    }

    /// Counters of the sandbox's egress enforcement (DNS queries, refusals, pin batches,
    /// deny events); `None` for a sandbox without a policy.
    pub fn egress_stats(&self) -> Option<sandbox_net::PolicyStats> {
        self.shared
            .net
            .as_ref()
            .and_then(NetLease::policy)
            .map(sandbox_net::PolicyHandle::stats)
    }

    /// The newest (at most 4096) times from an upstream DNS answer's arrival at the host
    /// resolver to the kernel's acknowledgement of the pin batch that let the guest reach the
    /// answered addresses (the answer leaves for the guest right after). Empty for a sandbox
    /// without a policy.
    pub fn egress_pin_latencies(&self) -> Vec<Duration> {
        self.shared
            .net
            .as_ref()
            .and_then(NetLease::policy)
            .map(sandbox_net::PolicyHandle::pin_latencies)
            .unwrap_or_default()
    }

    /// Learn mode's record of the sandbox's egress (docs/policy.md, "Learn mode"): the flows
    /// and names a `deny` policy would have refused, bounded (overflow counted in
    /// `dropped()`). `None` for a sandbox without a policy; empty unless the policy is, or
    /// was, `default = "learn"`.
    pub fn learned_egress(&self) -> Option<sandbox_policy::LearnLog> {
        self.shared
            .net
            .as_ref()
            .and_then(NetLease::policy)
            .map(sandbox_net::PolicyHandle::learned)
    }

    /// The policy learn mode suggests for this sandbox, as TOML: `default = "deny"`, the
    /// current policy's rules, and one allow rule per name (or bare address) and protocol the
    /// guest used, with the ports it used. Names resolved but never connected to are listed
    /// in a comment.
    ///
    /// # Errors
    /// `InvalidState` when the sandbox has no network or no egress policy.
    pub fn learned_policy(&self) -> sandbox_core::Result<String> {
        match self.shared.net.as_ref().and_then(NetLease::policy) {
            Some(h) => Ok(h.suggested_policy()),
            None => Err(Error::new(
                ErrorKind::InvalidState,
                format!(
                    "Sandbox {} has no egress policy; fix: create it with \
                     NetworkSpec::with_policy (default = \"learn\").",
                    self.shared.id
                ),
            )),
        }
    }

    /// Replaces the sandbox's egress policy in one nftables transaction: no moment allows more
    /// than either policy.
    ///
    /// # Errors
    /// `InvalidSpec` for an invalid document (with its line); `Io` when the sandbox has no
    /// policy or the kernel refused the change.
    pub async fn replace_egress_policy(
        &self,
        document: &sandbox_core::PolicyDocument,
    ) -> sandbox_core::Result<()> {
        match &self.shared.net {
            Some(net) => Ok(net.replace_policy(document).await?),
            None => Err(Error::new(
                ErrorKind::InvalidState,
                format!(
                    "Sandbox {} has no network; fix: create it with SandboxSpec::network.",
                    self.shared.id
                ),
            )),
        }
    }

    /// Stops forwarding to `guest_port`; whether it was forwarded.
    pub fn unexpose(&self, guest_port: u16) -> bool {
        self.shared
            .net
            .as_ref()
            .is_some_and(|n| n.unexpose(guest_port))
    }

    /// The pid of the `sandbox-vmm` process.
    pub fn vmm_pid(&self) -> u32 {
        self.shared.proc.pid()
    }

    /// The cgroup the VMM runs in (docs/jail.md), if the host provides cgroup v2; it is removed
    /// once the VMM has exited.
    pub fn cgroup_dir(&self) -> Option<&Path> {
        self.shared.proc.cgroup_dir()
    }

    /// The last `lines` lines of the guest console (capped log in the sandbox directory).
    pub fn console_tail(&self, lines: usize) -> String {
        self.shared
            .dir
            .open_read(names::CONSOLE)
            .map(|f| tail_lines(f, lines))
            .unwrap_or_default()
    }

    /// A new raw connection to the agent, after `CONNECT <port>` but before the protocol
    /// handshake (for protocol tests).
    ///
    /// # Errors
    /// `AgentUnreachable` when the socket or the port does not answer.
    pub async fn raw_agent_stream(&self) -> sandbox_core::Result<UnixStream> {
        self.shared.check_running()?;
        let sock = self.shared.dir.fd_path(names::VSOCK);
        raw_connect(&sock, self.shared.agent_port).await
    }

    fn abort_ttl(&self) {
        if let Some(t) = self
            .ttl_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

#[async_trait]
impl Sandbox for KvmSandbox {
    fn id(&self) -> &SandboxId {
        &self.shared.id
    }

    fn state(&self) -> SandboxState {
        self.shared.state()
    }

    async fn exec_stream(&self, mut req: ExecRequest) -> sandbox_core::Result<ExecStream> {
        req.validate()?;
        for (k, v) in &self.shared.env {
            req.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut c = self.shared.client().await?;
        let (tx, stream) = exec_channel(DEFAULT_EXEC_BUFFER);
        let shared = self.shared.clone();
        let host_deadline = req.timeout.map(|t| t + HOST_EXEC_GRACE);
        tokio::spawn(async move {
            let tx_late = tx.clone();
            // The client's events go through a relay that turns a connection failure caused by
            // the VMM dying into `GuestExited` (as every other call does in `map_client_err`),
            // and that closes the client's side as soon as the caller drops the stream.
            let (inner_tx, mut inner_rx) = tokio::sync::mpsc::channel(DEFAULT_EXEC_BUFFER);
            let relay_shared = shared.clone();
            let relay = async move {
                loop {
                    let ev = tokio::select! {
                        ev = inner_rx.recv() => ev,
                        () = tx.closed() => None,
                    };
                    let Some(ev) = ev else { break };
                    let ev = match ev {
                        Err(e) => Err(relay_shared.map_public_err(e).await),
                        ok => ok,
                    };
                    if tx.send(ev).await.is_err() {
                        break;
                    }
                }
            };
            let run = c.exec_to_channel(&req, inner_tx);
            let run = async move {
                match host_deadline {
                    Some(d) => tokio::time::timeout(d, run).await.ok(),
                    None => Some(run.await),
                }
            };
            let (r, ()) = tokio::join!(run, relay);
            match r {
                Some(Ok(())) => shared.put(c),
                // Already forwarded as the stream's last item.
                Some(Err(_)) => {}
                None => {
                    let _ = tx_late
                        .send(Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "Sandbox {}: the agent did not report the command's end within \
                                 its timeout plus {HOST_EXEC_GRACE:?}.",
                                shared.id
                            ),
                        )))
                        .await;
                }
            }
        });
        Ok(stream)
    }

    async fn write_file(
        &self,
        path: &str,
        data: &[u8],
        opts: &FileOptions,
    ) -> sandbox_core::Result<()> {
        let mut c = self.shared.client().await?;
        let r = c.write_file(path, data, opts).await;
        self.shared.finish(c, r).await
    }

    async fn read_file(&self, path: &str, opts: &FileOptions) -> sandbox_core::Result<Vec<u8>> {
        let mut c = self.shared.client().await?;
        let r = c.read_file(path, opts).await;
        self.shared.finish(c, r).await
    }

    async fn remove(&self, path: &str, opts: &FileOptions) -> sandbox_core::Result<()> {
        let mut c = self.shared.client().await?;
        let r = c.remove(path, opts).await;
        self.shared.finish(c, r).await
    }

    async fn list(&self, path: &str, opts: &FileOptions) -> sandbox_core::Result<Listing> {
        let mut c = self.shared.client().await?;
        let r = c.list(path, opts).await;
        self.shared.finish(c, r).await
    }

    async fn destroy(&self) -> sandbox_core::Result<()> {
        {
            let mut s = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            match *s {
                SandboxState::Destroyed => return Ok(()),
                // A concurrent destroy: run the (serialized, idempotent) teardown too.
                SandboxState::Stopping => {}
                other => *s = other.transition(SandboxState::Stopping)?,
            }
        }
        self.abort_ttl();
        let shared = &self.shared;
        if shared.proc.exit().is_none() && !shared.torn_down.load(Ordering::SeqCst) {
            // Ask the agent to sync and power off, briefly; the kill below makes sure.
            let polite = async {
                let pooled = shared.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let c = match pooled {
                    Some(c) => Some(c),
                    None => client::connect_vsock_unix(
                        &shared.dir.fd_path(names::VSOCK),
                        shared.agent_port,
                        shared.destroy_grace,
                    )
                    .await
                    .ok(),
                };
                if let Some(mut c) = c {
                    c.set_request_timeout(shared.destroy_grace);
                    if c.power_off().await.is_ok() {
                        shared.proc.wait().await;
                    }
                }
            };
            let _ = tokio::time::timeout(shared.destroy_grace, polite).await;
        }
        let me = shared.clone();
        let r = tokio::task::spawn_blocking(move || me.teardown_blocking()).await;
        let mut s = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(Ok(())) => {
                *s = SandboxState::Destroyed;
                tracing::info!(id = %shared.id, "sandbox destroyed");
                Ok(())
            }
            Ok(Err(source)) => {
                *s = SandboxState::Failed;
                Err(RuntimeError::Io {
                    action: "remove",
                    path: shared.dir.path().to_path_buf(),
                    source,
                }
                .into())
            }
            Err(e) => {
                *s = SandboxState::Failed;
                Err(Error::with_source(
                    ErrorKind::Internal,
                    "The teardown task failed.",
                    e,
                ))
            }
        }
    }
}

impl Drop for KvmSandbox {
    fn drop(&mut self) {
        self.abort_ttl();
        if !self.shared.torn_down.load(Ordering::SeqCst) {
            if let Err(e) = self.shared.teardown_blocking() {
                tracing::warn!(id = %self.shared.id, error = %e, "dropped sandbox: cleanup failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::runtime::KvmRuntimeConfigBuilder;

    /// Enough of a vmlinux for the runtime's format check.
    const FAKE_KERNEL: &[u8] = b"\x7fELF fake";

    /// `len` bytes with an ext2/3/4 superblock magic.
    fn fake_rootfs(len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len.max(2048)];
        b[1080..1082].copy_from_slice(&0xEF53_u16.to_le_bytes());
        b
    }

    #[test]
    fn a_vmm_that_refuses_its_config_is_host_setup_not_a_guest_exit() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        let console =
            "\n--- sandbox-vmm log (last lines) ---\nsandbox-vmm: error: building the VM: \
                       the kernel image is refused: not a vmlinux ELF file nor a bzImage"
                .to_string();
        let e = vmm_refused(
            "sbx-1",
            VmmExit(ExitStatus::from_raw(1 << 8), None),
            console,
        );
        let RuntimeError::VmmRefused { reason, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(
            reason.starts_with("building the VM: the kernel image"),
            "{reason}"
        );
        assert_eq!(e.kind(), ErrorKind::HostSetup);
        assert!(e.to_string().contains("fix: "), "{e}");
        let usage = vmm_refused(
            "sbx-1",
            VmmExit(ExitStatus::from_raw(2 << 8), None),
            "error: unexpected argument '--foo' found".into(),
        );
        assert!(usage.to_string().contains("unexpected argument"), "{usage}");
        assert_eq!(usage.kind(), ErrorKind::HostSetup);
    }

    #[test]
    fn only_a_sandbox_vmm_passes_the_identity_check() {
        use std::os::unix::fs::PermissionsExt;
        let e = check_vmm_identity(Path::new("/bin/true")).expect_err("/bin/true");
        assert!(matches!(e, RuntimeError::VmmNotOurs { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::HostSetup);
        assert!(e.to_string().contains("SANDBOX_VMM"), "{e}");
        let dir = tempfile::tempdir().expect("tempdir");
        let text = dir.path().join("text");
        std::fs::write(&text, b"not a program").expect("write");
        assert!(check_vmm_identity(&text).is_err());
        let ours = dir.path().join("sandbox-vmm");
        std::fs::write(&ours, b"#!/bin/sh\necho 'sandbox-vmm 0.1.0'\n").expect("write");
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        check_vmm_identity(&ours).expect("a sandbox-vmm");
        // The real binary, when this workspace has built it.
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/sandbox-vmm");
        if built.is_file() {
            check_vmm_identity(&built).expect("the built sandbox-vmm");
        }
    }

    #[test]
    fn image_errors_carry_their_cause_and_the_right_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = |image: &str| {
            SandboxSpec::builder(dir.path().join("vmlinux"), dir.path().join("rootfs.ext4"))
                .image(image)
                .build()
                .expect("spec")
        };
        // A store that cannot be created (its parent is a file): the host's setup, with the
        // cause and the fix.
        let mut cfg = resolved(dir.path());
        std::fs::write(dir.path().join("a-file"), b"").expect("file");
        cfg.image_store = dir.path().join("a-file/store");
        let e = base_image(&cfg, &spec("nosuchimage")).expect_err("no store");
        assert_eq!(e.kind(), ErrorKind::HostSetup, "{e}");
        let text = sandbox_core::Error::from(e).to_string();
        assert!(text.contains("Not a directory"), "the cause: {text}");
        assert!(text.contains("SANDBOX_IMAGE_STORE"), "the fix: {text}");
        // A store that exists but lacks the tag: the spec's mistake.
        let cfg = resolved(dir.path());
        let e = base_image(&cfg, &spec("nosuchimage")).expect_err("no such tag");
        assert_eq!(e.kind(), ErrorKind::InvalidSpec, "{e}");
        let text = e.to_string();
        assert!(text.contains("No image nosuchimage"), "{text}");
        assert!(text.contains("Import it first"), "{text}");
    }

    #[test]
    fn a_text_file_as_the_spec_kernel_or_rootfs_is_an_invalid_spec() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = resolved(dir.path());
        let state = Arc::new(StateDir::open(&cfg.state_dir, sys::euid()).expect("state"));
        std::fs::write(dir.path().join("notakernel"), b"hello\n").expect("kernel");
        std::fs::write(dir.path().join("rootfs.ext4"), fake_rootfs(4096)).expect("rootfs");
        let spec = SandboxSpec::builder(
            dir.path().join("notakernel"),
            dir.path().join("rootfs.ext4"),
        )
        .build()
        .expect("spec");
        let mut guard = test_guard();
        let err = prepare(
            &cfg,
            &spec,
            &state,
            &SandboxId::new("sbx-01"),
            &mut guard,
            &AtomicBool::new(false),
            None,
        )
        .expect_err("not a kernel");
        assert!(
            matches!(
                err,
                RuntimeError::SpecFileInvalid {
                    field: "kernel",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::InvalidSpec);
        assert!(err.to_string().contains("neither a vmlinux"), "{err}");
        assert!(guard.dir.is_none());
        // A text file as the rootfs: the same, before the guest kernel could panic on it.
        std::fs::write(dir.path().join("vmlinux"), FAKE_KERNEL).expect("kernel");
        let spec = SandboxSpec::builder(dir.path().join("vmlinux"), dir.path().join("notakernel"))
            .build()
            .expect("spec");
        let err = prepare(
            &cfg,
            &spec,
            &state,
            &SandboxId::new("sbx-02"),
            &mut guard,
            &AtomicBool::new(false),
            None,
        )
        .expect_err("not a rootfs");
        assert!(
            matches!(
                err,
                RuntimeError::SpecFileInvalid {
                    field: "rootfs",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::InvalidSpec);
    }

    #[test]
    fn a_seccomp_exit_is_reported_with_the_vmm_report() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        let console = "\n--- sandbox-vmm log (last lines) ---\nsandbox-vmm: seccomp: forbidden system call 110 on a devices thread; the VMM ends (docs/jail.md)\n".to_string();
        let e = exit_error(
            "sbx-1",
            VmmExit(ExitStatus::from_raw(7 << 8), None),
            console,
        );
        assert!(
            matches!(&e, RuntimeError::VmmSeccomp { report, .. } if report.starts_with("forbidden system call 110 on a devices thread")),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::GuestExited);
        let other = exit_error(
            "sbx-1",
            VmmExit(ExitStatus::from_raw(3 << 8), None),
            String::new(),
        );
        assert!(
            matches!(other, RuntimeError::GuestExited { .. }),
            "{other:?}"
        );
        // Killed by its cgroup's OOM killer: a typed error naming the limit and the fix.
        let oom = exit_error(
            "sbx-1",
            VmmExit(
                ExitStatus::from_raw(libc::SIGKILL),
                Some(super::super::process::OomKill {
                    memory_max: Some(335_544_320),
                    shmem: Some(1 << 20),
                }),
            ),
            String::new(),
        );
        assert!(
            matches!(&oom, RuntimeError::VmmOutOfMemory { .. }),
            "{oom:?}"
        );
        assert_eq!(oom.kind(), ErrorKind::GuestExited);
        let text = oom.to_string();
        assert!(text.contains("335544320 bytes"), "{text}");
        assert!(text.contains("memory_overhead_mib"), "{text}");
        // Mostly files in memory: the state directory is a tmpfs, and the fix says so.
        let tmpfs = exit_error(
            "sbx-1",
            VmmExit(
                ExitStatus::from_raw(libc::SIGKILL),
                Some(super::super::process::OomKill {
                    memory_max: Some(335_544_320),
                    shmem: Some(250 << 20),
                }),
            ),
            String::new(),
        );
        let text = tmpfs.to_string();
        assert!(
            text.contains("250 MiB of it were files in memory"),
            "{text}"
        );
        assert!(text.contains("SANDBOX_STATE_DIR"), "{text}");
    }

    #[test]
    fn a_tmpfs_is_in_memory_and_a_disk_is_not() {
        // /dev/shm is a tmpfs on every Linux this runs on; the crate's own directory is on
        // whatever holds the checkout (a disk, or overlayfs in a container).
        if Path::new("/dev/shm").is_dir() {
            assert!(in_memory(Path::new("/dev/shm")));
        }
        assert!(!in_memory(Path::new(env!("CARGO_MANIFEST_DIR"))));
        assert!(!in_memory(Path::new("/nonexistent-dir")));
    }

    #[test]
    fn a_kvm_internal_error_while_booting_is_a_host_setup_error_naming_the_fix() {
        let console =
            "\n--- sandbox-vmm log (last lines) ---\nsandbox-vmm: VM ended: KVM internal error: \
                       vCPU 0: KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure); RIP 0x1000";
        let why = internal_error_detail(console);
        assert!(why.contains("emulation failure"), "{why}");
        assert_eq!(internal_error_detail("no such line"), "");
        let e = RuntimeError::KvmCannotRunGuest {
            id: "sbx-01".into(),
            how: "KVM reported an internal error (sandbox-vmm exit 5)".into(),
            why,
            console: console.into(),
        };
        assert_eq!(e.kind(), ErrorKind::HostSetup);
        let text = e.to_string();
        assert!(text.contains("cannot run the guest"), "{text}");
        assert!(text.contains("cargo xtask run"), "{text}");
    }

    fn resolved(dir: &Path) -> Resolved {
        Resolved {
            vmm: dir.join("sandbox-vmm"),
            kvm_device: Some(dir.join("kvm")),
            kernel: dir.join("vmlinux"),
            rootfs: dir.join("rootfs.ext4"),
            state_dir: dir.join("state"),
            create_deadline: Duration::from_secs(5),
            destroy_grace: Duration::from_secs(1),
            console_cap_bytes: 4096,
            max_sandboxes: 2,
            agent_port: 1024,
            jail: jail::JailConfig::off(),
            disk_mode: DiskMode::Overlay,
            image_store: dir.join("images"),
            network: sandbox_net::NetConfig::default(),
            policy: sandbox_net::PolicyOptions::default(),
            jail_support: jail::JailSupport::default(),
        }
    }

    fn test_guard() -> CreateGuard {
        let live = Arc::new(AtomicUsize::new(1));
        CreateGuard {
            cleaner: Cleaner::start().expect("cleaner"),
            slot: Some(LiveSlot(live)),
            dir: None,
            lock: None,
            proc: None,
            net: None,
        }
    }

    #[test]
    fn ids_are_sbx_and_16_hex_digits_and_differ() {
        let a = new_id().expect("id");
        let b = new_id().expect("id");
        assert_eq!(a.len(), 20);
        assert!(super::super::reconcile::is_sandbox_name(&a), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn vm_config_names_every_sandbox_file_by_its_inherited_fd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = resolved(dir.path());
        let spec = SandboxSpec::builder("/k/vmlinux", "/k/rootfs.ext4")
            .vcpus(2)
            .memory_mib(512)
            .cmdline_param("quiet")
            .build()
            .expect("spec");
        let files = || VmFiles {
            kvm: Some(FileSource::fd(3)),
            kernel: FileSource::fd(4),
            console: FileSource::fd(5),
            vsock: FileSource::fd(6),
        };
        let vm = vm_config(
            &cfg,
            &spec,
            files(),
            DiskConfig::new(FileSource::fd(7), false),
            Some((8, "ip=10.0.0.2")),
        );
        let json = serde_json::to_value(&vm).expect("json");
        assert_eq!(json["kvm"]["fd"], 3);
        assert_eq!(json["kernel"]["fd"], 4);
        assert_eq!(
            (json["vcpus"].as_u64(), json["memory_mib"].as_u64()),
            (Some(2), Some(512))
        );
        assert_eq!(json["cmdline_extra"], "root=/dev/vda rw ip=10.0.0.2 quiet");
        assert_eq!(json["disks"][0]["read_only"], false);
        assert_eq!(json["disks"][0]["path"]["fd"], 7);
        assert_eq!(json["vsock"]["uds_path"]["fd"], 6);
        assert_eq!(json["console"]["path"]["fd"], 5);
        assert_eq!(json["console"]["cap_bytes"], 4096);
        assert_eq!(json["net"]["tap_fd"], 8);
        let text = serde_json::to_string(&vm).expect("json");
        // No host path anywhere: every string value that starts with '/' would be one.
        assert!(!text.contains("\":\"/"), "{text}");
        let ro = vm_config(
            &cfg,
            &spec,
            files(),
            DiskConfig::new(FileSource::fd(7), true),
            None,
        );
        assert_eq!(ro.cmdline_extra, "root=/dev/vda ro quiet");
    }

    #[test]
    fn a_failed_or_cancelled_prepare_leaves_nothing_after_undo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = resolved(dir.path());
        let state = Arc::new(StateDir::open(&cfg.state_dir, sys::euid()).expect("state"));
        // A missing file of the spec is refused before anything is made, naming it.
        std::fs::write(dir.path().join("vmlinux"), FAKE_KERNEL).expect("kernel");
        let missing = SandboxSpec::builder(dir.path().join("vmlinux"), dir.path().join("missing"))
            .build()
            .expect("spec");
        let id = SandboxId::new("sbx-01");
        let mut guard = test_guard();
        let err = prepare(
            &cfg,
            &missing,
            &state,
            &id,
            &mut guard,
            &AtomicBool::new(false),
            None,
        )
        .expect_err("no rootfs");
        assert!(
            matches!(
                err,
                RuntimeError::SpecFile {
                    field: "rootfs",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.kind(), ErrorKind::InvalidSpec);
        assert!(guard.dir.is_none() && guard.lock.is_none());
        // A stand-in for /dev/kvm (opened before the disk; checked only with the whole config).
        std::fs::write(dir.path().join("kvm"), b"").expect("kvm");
        // A base whose name cannot be an overlay's backing file name (a ':' reads as a protocol
        // in qcow2 tools): the overlay fails after the directory and lock were made.
        std::fs::write(dir.path().join("root:fs.ext4"), fake_rootfs(4096)).expect("base");
        let spec =
            SandboxSpec::builder(dir.path().join("vmlinux"), dir.path().join("root:fs.ext4"))
                .build()
                .expect("spec");
        let err = prepare(
            &cfg,
            &spec,
            &state,
            &id,
            &mut guard,
            &AtomicBool::new(false),
            None,
        )
        .expect_err("no overlay");
        assert!(matches!(err, RuntimeError::Overlay { .. }), "{err}");
        assert!(guard.dir.is_some() && guard.lock.is_some() && guard.proc.is_none());
        guard.undo_blocking();
        assert!(!cfg.state_dir.join("sbx-01").exists());
        // Cancelled before it starts: nothing is made at all.
        let mut guard = test_guard();
        let err = prepare(
            &cfg,
            &spec,
            &state,
            &id,
            &mut guard,
            &AtomicBool::new(true),
            None,
        )
        .expect_err("cancelled");
        assert!(
            matches!(&err, RuntimeError::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted),
            "{err}"
        );
        assert!(guard.dir.is_none());
        assert!(!cfg.state_dir.join("sbx-01").exists());
    }

    #[test]
    fn a_dropped_guard_cleans_up_on_the_cleanup_thread_and_frees_the_slot_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state =
            Arc::new(StateDir::open(&dir.path().join("state"), sys::euid()).expect("state"));
        let live = Arc::new(AtomicUsize::new(1));
        let sb = SandboxDir::create(state.clone(), "sbx-02").expect("dir");
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("1000")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let proc = VmmProcess::spawn(cmd).expect("spawn");
        let pid = proc.pid();
        let guard = CreateGuard {
            cleaner: Cleaner::start().expect("cleaner"),
            slot: Some(LiveSlot(live.clone())),
            dir: Some(sb),
            lock: None,
            proc: Some(proc),
            net: None,
        };
        drop(guard);
        wait_until(|| live.load(Ordering::SeqCst) == 0);
        assert!(!state.path().join("sbx-02").exists());
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the child is gone"
        );
    }

    #[test]
    fn tail_lines_returns_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).expect("write");
        assert_eq!(
            tail_lines(File::open(&p).expect("open"), 2),
            "line 98\nline 99"
        );
    }

    fn artifacts(dir: &Path) -> KvmRuntimeConfigBuilder {
        std::fs::write(dir.join("sandbox-vmm"), b"x").expect("write");
        std::fs::write(dir.join("vmlinux"), FAKE_KERNEL).expect("write");
        std::fs::write(dir.join("rootfs.ext4"), fake_rootfs(4096)).expect("write");
        KvmRuntimeConfig::builder()
            .vmm(dir.join("sandbox-vmm"))
            .kernel(dir.join("vmlinux"))
            .rootfs(dir.join("rootfs.ext4"))
            .state_dir(dir.join("state"))
    }

    fn test_env() -> Env<'static> {
        Env {
            var: &|_: &str| None::<OsString>,
            current_exe: None,
            is_root: sys::is_root(),
            uid: sys::euid(),
        }
    }

    #[test]
    fn new_reports_a_missing_kvm_device_as_host_setup() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A stand-in that answers `--version` like sandbox-vmm, so the KVM check is reached.
        let vmm = dir.path().join("fake-vmm");
        std::fs::write(&vmm, b"#!/bin/sh\necho 'sandbox-vmm 0.0.0'\n").expect("script");
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = artifacts(dir.path())
            .vmm(&vmm)
            .kvm_device(dir.path().join("no-kvm"))
            .build()
            .expect("config");
        let err = KvmRuntime::new(config).expect_err("no kvm");
        assert!(matches!(err, RuntimeError::Kvm(_)), "{err}");
        assert!(err.to_string().contains("modprobe"), "{err}");
        assert_eq!(sandbox_core::Error::from(err).kind(), ErrorKind::HostSetup);
    }

    #[test]
    fn new_refuses_a_long_state_dir_before_making_anything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = artifacts(dir.path()).build().expect("config");
        let prefix = dir.path().as_os_str().len();
        // Long enough that `<state>/sbx-<16>/vsock.sock` passes 107 bytes.
        let long = dir
            .path()
            .join("s".repeat(110usize.saturating_sub(prefix + 32).max(1)));
        let mut config = base.clone();
        config.state_dir = Some(long.clone());
        let err = KvmRuntime::start(&config, &test_env(), false).expect_err("too long");
        let RuntimeError::SocketPathTooLong { len, max, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(*max, 107);
        assert!(*len > 107, "{len}");
        assert!(!long.exists(), "nothing was created");
        assert_eq!(sandbox_core::Error::from(err).kind(), ErrorKind::HostSetup);
    }

    #[test]
    fn new_refuses_an_untrusted_state_dir_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = artifacts(dir.path()).build().expect("config");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = KvmRuntime::start(&config, &test_env(), false).expect_err("world writable");
        assert!(
            matches!(err, RuntimeError::StateDirUntrusted { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 700"), "{err}");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::rename(&state, dir.path().join("real")).expect("rename");
        std::os::unix::fs::symlink(dir.path().join("real"), &state).expect("symlink");
        let err = KvmRuntime::start(&config, &test_env(), false).expect_err("symlink");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(sandbox_core::Error::from(err).kind(), ErrorKind::HostSetup);
        // A config that skipped the builder is validated too.
        let mut bad = config.clone();
        bad.create_deadline = Duration::ZERO;
        assert!(matches!(
            KvmRuntime::start(&bad, &test_env(), false),
            Err(RuntimeError::Config {
                field: "create_deadline",
                ..
            })
        ));
    }

    fn wait_until(f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < until, "condition not reached in 20 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A runtime whose `sandbox-vmm` is a script that logs its pid and sleeps, never opening
    /// its socket.
    fn fake_runtime(dir: &Path, deadline: Duration) -> (KvmRuntime, PathBuf) {
        let base = artifacts(dir);
        let pids = dir.join("pids.log");
        let vmm = dir.join("fake-vmm");
        std::fs::write(
            &vmm,
            format!(
                "#!/bin/sh\necho $$ >> '{}'\nexec sleep 1000\n",
                pids.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Some data to copy, so that cancellation can land during the copy.
        let mut rootfs = vec![0x5a_u8; 8 << 20];
        rootfs[1080..1082].copy_from_slice(&0xEF53_u16.to_le_bytes());
        std::fs::write(dir.join("rootfs.ext4"), rootfs).expect("rootfs");
        let config = base
            .vmm(&vmm)
            .create_deadline(deadline)
            .build()
            .expect("config");
        let rt = KvmRuntime::start(&config, &test_env(), false).expect("runtime");
        (rt, pids)
    }

    fn logged_pids(pids: &Path) -> Vec<u32> {
        std::fs::read_to_string(pids)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn assert_nothing_left(rt: &KvmRuntime, pids: &Path) {
        wait_until(|| rt.live_sandboxes() == 0);
        let left: Vec<_> = std::fs::read_dir(rt.state_dir())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left in the state dir: {left:?}");
        for pid in logged_pids(pids) {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "fake VMM {pid} still runs"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_create_at_any_point_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rt, pids) = fake_runtime(dir.path(), Duration::from_secs(30));
        let spec = rt.spec_builder().build().expect("spec");
        for ms in [0u64, 1, 2, 5, 10, 20, 50, 100, 200, 400] {
            let r =
                tokio::time::timeout(Duration::from_millis(ms), rt.create_sandbox(spec.clone()))
                    .await;
            assert!(
                r.is_err(),
                "the fake VMM never answers: create cannot succeed"
            );
            assert_nothing_left(&rt, &pids);
        }
        // Cancelled once the VMM runs (its pid is logged): during the handshake.
        let before = logged_pids(&pids).len();
        tokio::select! {
            r = rt.create_sandbox(spec.clone()) => panic!("create ended: {:?}", r.err()),
            _ = async {
                while logged_pids(&pids).len() == before {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            } => {}
        }
        assert_nothing_left(&rt, &pids);
        assert!(
            !logged_pids(&pids).is_empty(),
            "some runs got as far as the VMM"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_that_times_out_is_clean_when_it_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (rt, pids) = fake_runtime(dir.path(), Duration::from_millis(700));
        let spec = rt.spec_builder().build().expect("spec");
        let started = Instant::now();
        let err = rt.create_sandbox(spec).await.expect_err("no agent");
        assert_eq!(err.kind(), ErrorKind::AgentUnreachable, "{err}");
        assert!(!err.to_string().contains("0ns"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // Synchronous cleanup: nothing to wait for.
        assert_eq!(rt.live_sandboxes(), 0);
        assert_nothing_left(&rt, &pids);
        assert_eq!(logged_pids(&pids).len(), 1);
    }
}
