//! [`KvmRuntime`] and [`KvmSandbox`]: the trait implementations.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

use super::config::{resolve, Env, KvmRuntimeConfig, Resolved};
use super::copy::{copy_image, CopyMethod};
use super::process::{vmm_command, write_pid_file, SandboxFiles, VmmExit, VmmProcess};
use super::reconcile::reconcile;
use super::{sys, Result, RuntimeError};
use sandbox_vmm::vmm::{DiskConfig, VmConfig, VmResources, VsockDeviceConfig};

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

/// Runs sandboxes as `sandbox-vmm` processes on this host's KVM. Cheap to share behind an `Arc`;
/// sandboxes it created keep working after it is dropped.
#[derive(Debug)]
pub struct KvmRuntime {
    cfg: Resolved,
    live: Arc<AtomicUsize>,
}

impl KvmRuntime {
    /// Resolves `config` (defaults from `SANDBOX_VMM`, `SANDBOX_KERNEL`, `SANDBOX_ROOTFS`,
    /// `XDG_RUNTIME_DIR`), checks `/dev/kvm`, creates the state directory (mode 0700) and removes
    /// stale sandboxes left in it by processes that are gone (killing their VMMs).
    ///
    /// # Errors
    /// [`RuntimeError`]s of kind `HostSetup` that name the fix: no `sandbox-vmm`, guest artifacts
    /// not built (`cargo xtask guest`), `/dev/kvm` missing or not accessible, state directory not
    /// writable.
    pub fn new(config: KvmRuntimeConfig) -> Result<Self> {
        let cfg = resolve(&config, &Env::process())?;
        drop(sandbox_vmm::kvm::open_kvm_at(&config.kvm_device)?);
        let state_err = |source| RuntimeError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(state_err)?;
        let cleaned = reconcile(&cfg.state_dir).map_err(state_err)?;
        if !cleaned.is_empty() {
            tracing::info!(
                state_dir = %cfg.state_dir.display(),
                count = cleaned.len(),
                "cleaned stale sandboxes"
            );
        }
        Ok(Self {
            cfg,
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A spec builder for the runtime's default kernel and rootfs.
    pub fn spec_builder(&self) -> SandboxSpecBuilder {
        SandboxSpec::builder(&self.cfg.kernel, &self.cfg.rootfs)
    }

    /// The state directory: one `sbx-<hex>/` directory per live sandbox.
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
    /// protocol handshake (for protocol tests and tools).
    ///
    /// # Errors
    /// `AgentUnreachable` when the socket or the port does not answer.
    pub async fn raw_agent_stream(&self, id: &SandboxId) -> sandbox_core::Result<UnixStream> {
        let files = SandboxFiles {
            dir: self.sandbox_dir(id),
        };
        raw_connect(&files.vsock(), self.cfg.agent_port).await
    }

    /// Sandboxes alive in this runtime now.
    pub fn live_sandboxes(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// [`Runtime::create`], returning the concrete type.
    ///
    /// # Errors
    /// As [`Runtime::create`]: `HostSetup` (limits, spawn), `InvalidSpec` (the VM config refused
    /// the spec), `Io`, `GuestExited` (the VMM died while booting) and `AgentUnreachable` (no
    /// handshake before the deadline), the last two with the console tail in the message.
    pub async fn create_sandbox(&self, spec: SandboxSpec) -> sandbox_core::Result<KvmSandbox> {
        let max = self.cfg.max_sandboxes;
        if self.live.fetch_add(1, Ordering::SeqCst) >= max {
            self.live.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::TooManySandboxes { max }.into());
        }
        let slot = LiveSlot(self.live.clone());
        let started = Instant::now();
        let id = SandboxId::new(new_id().map_err(|source| RuntimeError::Io {
            action: "read random bytes for",
            path: PathBuf::from("the sandbox id"),
            source,
        })?);
        let files = SandboxFiles {
            dir: self.sandbox_dir(&id),
        };
        let (cfg, spec2, dir) = (self.cfg.clone(), spec.clone(), files.dir.clone());
        let prepared =
            tokio::task::spawn_blocking(move || prepare(&cfg, &spec2, &SandboxFiles { dir }))
                .await
                .map_err(|e| {
                    Error::with_source(ErrorKind::Internal, "The create task failed.", e)
                })??;
        let Prepared { proc, lock, copy } = prepared;
        tracing::info!(id = %id, pid = proc.pid(), ?copy, "sandbox VMM started");

        let port = self.cfg.agent_port;
        // The deadline covers the whole of create (the rootfs copy and the spawn included), so a
        // caller's bound on create() holds however slow the disk is.
        let deadline = self.cfg.create_deadline;
        let left = deadline.saturating_sub(started.elapsed());
        let sock = files.vsock();
        let outcome = tokio::select! {
            r = client::wait_for_agent(&sock, port, left) => Ok(r),
            exit = proc.wait() => Err(exit),
        };
        let failure = match outcome {
            Ok(Ok(client)) => {
                let shared = Arc::new(SandboxShared {
                    id: id.clone(),
                    files,
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
        // Failure: kill, collect the console tail, remove everything.
        let dir = files.dir.clone();
        let teardown = tokio::task::spawn_blocking(move || {
            proc.kill();
            proc.wait_blocking();
            let console = console_tail(&files, TAIL_LINES);
            let _ = std::fs::remove_dir_all(&files.dir);
            drop(lock);
            (console, proc.exit())
        })
        .await;
        drop(slot);
        let (console, exit) = teardown.unwrap_or_default();
        tracing::warn!(id = %id, dir = %dir.display(), "sandbox creation failed; cleaned up");
        Err(match failure {
            Ok(exit) => RuntimeError::GuestExited {
                id: id.to_string(),
                how: exit.to_string(),
                console,
            },
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
                after: deadline,
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

struct Prepared {
    proc: Arc<VmmProcess>,
    lock: File,
    copy: Option<CopyMethod>,
}

/// The blocking part of create: directory, lock, rootfs copy, VM config, spawn, pid file. On
/// failure the directory is removed again.
fn prepare(cfg: &Resolved, spec: &SandboxSpec, files: &SandboxFiles) -> Result<Prepared> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&files.dir)
        .map_err(|source| RuntimeError::Io {
            action: "create",
            path: files.dir.clone(),
            source,
        })?;
    let r = prepare_in(cfg, spec, files);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&files.dir);
    }
    r
}

fn prepare_in(cfg: &Resolved, spec: &SandboxSpec, files: &SandboxFiles) -> Result<Prepared> {
    let io = |action: &'static str, path: PathBuf| {
        move |source| RuntimeError::Io {
            action,
            path,
            source,
        }
    };
    let lock = File::create(files.lock()).map_err(io("create", files.lock()))?;
    // Nobody else knows the new random directory yet, so this cannot fail with "busy".
    sys::try_lock_exclusive(lock.as_fd()).map_err(io("lock", files.lock()))?;
    let (disk, copy) = match spec.root() {
        RootMode::Writable => {
            let m = copy_image(spec.rootfs(), &files.rootfs())
                .map_err(io("copy the rootfs to", files.rootfs()))?;
            (DiskConfig::new(files.rootfs(), false), Some(m))
        }
        RootMode::ReadOnly => (DiskConfig::new(spec.rootfs(), true), None),
    };
    let vm = vm_config(cfg, spec, files, disk);
    // Validate here, with the typed error, rather than in the child.
    VmResources::try_from(vm.clone())?;
    let json = serde_json::to_vec_pretty(&vm).map_err(|e| RuntimeError::Io {
        action: "serialize",
        path: files.config(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(files.config(), json).map_err(io("write", files.config()))?;
    let log = File::create(files.vmm_log()).map_err(io("create", files.vmm_log()))?;
    let proc =
        VmmProcess::spawn(vmm_command(&cfg.vmm, &files.config(), log)).map_err(|source| {
            RuntimeError::Spawn {
                vmm: cfg.vmm.clone(),
                source,
            }
        })?;
    if let Err(e) = write_pid_file(&files.pid(), proc.pid()) {
        proc.kill();
        proc.wait_blocking();
        return Err(io("write", files.pid())(e));
    }
    Ok(Prepared { proc, lock, copy })
}

/// The VM config for one sandbox: the spec's shape, the private disk, the console log and the
/// vsock socket in the sandbox directory.
fn vm_config(
    cfg: &Resolved,
    spec: &SandboxSpec,
    files: &SandboxFiles,
    disk: DiskConfig,
) -> VmConfig {
    let mode = if disk.read_only { "ro" } else { "rw" };
    let mut cmdline = format!("root=/dev/vda {mode}");
    for p in spec.extra_cmdline() {
        cmdline.push(' ');
        cmdline.push_str(p);
    }
    VmConfig::new(spec.kernel())
        .vcpus(spec.vcpus())
        .memory_mib(spec.memory_mib())
        .disk(disk)
        .cmdline_extra(cmdline)
        .console_file(files.console(), cfg.console_cap_bytes)
        .vsock(VsockDeviceConfig::new(GUEST_CID, files.vsock()))
}

/// The last `n` lines of the console log and of the VMM's log, formatted for an error message
/// (empty when both are empty).
fn console_tail(files: &SandboxFiles, n: usize) -> String {
    let mut out = String::new();
    for (label, path) in [
        ("console", files.console()),
        ("sandbox-vmm log", files.vmm_log()),
    ] {
        let lines = tail_lines(&path, n);
        if !lines.is_empty() {
            out.push_str(&format!("\n--- {label} (last lines) ---\n{lines}"));
        }
    }
    out
}

/// The last `n` lines of a file, reading at most its last 16 KiB.
fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
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

/// Connects to a VMM's vsock socket and asks for guest `port`.
async fn raw_connect(sock: &Path, port: u32) -> sandbox_core::Result<UnixStream> {
    let mut s = UnixStream::connect(sock).await.map_err(|e| {
        Error::with_source(
            ErrorKind::AgentUnreachable,
            "Cannot connect to the sandbox's vsock socket.",
            e,
        )
    })?;
    client::vsock_connect(&mut s, port).await?;
    Ok(s)
}

/// State shared by a sandbox handle and its background tasks (TTL, exec streams).
#[derive(Debug)]
struct SandboxShared {
    id: SandboxId,
    files: SandboxFiles,
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
}

impl std::fmt::Debug for SandboxFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxFiles")
            .field("dir", &self.dir)
            .finish()
    }
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
        RuntimeError::GuestExited {
            id: self.id.to_string(),
            how: exit.to_string(),
            console: console_tail(&self.files, TAIL_LINES),
        }
        .into()
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
        match client::connect_vsock_unix(&self.files.vsock(), self.agent_port, CONNECT_DEADLINE)
            .await
        {
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
        let r = match std::fs::remove_dir_all(&self.files.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
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
        &self.shared.files.dir
    }

    /// The VMM's vsock Unix socket (host side of virtio-vsock; speak `CONNECT <port>\n` first).
    pub fn vsock_path(&self) -> PathBuf {
        self.shared.files.vsock()
    }

    /// The pid of the `sandbox-vmm` process.
    pub fn vmm_pid(&self) -> u32 {
        self.shared.proc.pid()
    }

    /// The last `lines` lines of the guest console (capped log in the sandbox directory).
    pub fn console_tail(&self, lines: usize) -> String {
        tail_lines(&self.shared.files.console(), lines)
    }

    /// A new raw connection to the agent, after `CONNECT <port>` but before the protocol
    /// handshake (for protocol tests).
    ///
    /// # Errors
    /// `AgentUnreachable` when the socket or the port does not answer.
    pub async fn raw_agent_stream(&self) -> sandbox_core::Result<UnixStream> {
        self.shared.check_running()?;
        raw_connect(&self.vsock_path(), self.shared.agent_port).await
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
            let run = c.exec_to_channel(&req, tx);
            let r = match host_deadline {
                Some(d) => tokio::time::timeout(d, run).await.ok(),
                None => Some(run.await),
            };
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
                        &shared.files.vsock(),
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
                    path: shared.files.dir.clone(),
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
    use super::*;

    fn resolved(dir: &Path) -> Resolved {
        Resolved {
            vmm: dir.join("sandbox-vmm"),
            kernel: dir.join("vmlinux"),
            rootfs: dir.join("rootfs.ext4"),
            state_dir: dir.join("state"),
            create_deadline: Duration::from_secs(5),
            destroy_grace: Duration::from_secs(1),
            console_cap_bytes: 4096,
            max_sandboxes: 2,
            agent_port: 1024,
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
    fn vm_config_uses_the_spec_and_the_sandbox_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = resolved(dir.path());
        let spec = SandboxSpec::builder("/k/vmlinux", "/k/rootfs.ext4")
            .vcpus(2)
            .memory_mib(512)
            .cmdline_param("quiet")
            .build()
            .expect("spec");
        let files = SandboxFiles {
            dir: dir.path().join("sbx-00"),
        };
        let vm = vm_config(&cfg, &spec, &files, DiskConfig::new(files.rootfs(), false));
        let json = serde_json::to_value(&vm).expect("json");
        assert_eq!(json["kernel"], "/k/vmlinux");
        assert_eq!(
            (json["vcpus"].as_u64(), json["memory_mib"].as_u64()),
            (Some(2), Some(512))
        );
        assert_eq!(json["cmdline_extra"], "root=/dev/vda rw quiet");
        assert_eq!(json["disks"][0]["read_only"], false);
        assert_eq!(
            json["vsock"]["uds_path"].as_str().map(PathBuf::from),
            Some(files.vsock())
        );
        assert_eq!(json["console"]["cap_bytes"], 4096);
        let ro = vm_config(&cfg, &spec, &files, DiskConfig::new("/k/rootfs.ext4", true));
        assert_eq!(ro.cmdline_extra, "root=/dev/vda ro quiet");
    }

    #[test]
    fn a_failed_prepare_removes_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = resolved(dir.path());
        std::fs::create_dir(&cfg.state_dir).expect("mkdir");
        // The rootfs does not exist: the copy fails after the directory and lock were made.
        let spec = SandboxSpec::builder(dir.path().join("vmlinux"), dir.path().join("missing"))
            .build()
            .expect("spec");
        let files = SandboxFiles {
            dir: cfg.state_dir.join("sbx-01"),
        };
        let err = prepare(&cfg, &spec, &files).err().expect("no rootfs");
        assert!(
            matches!(
                err,
                RuntimeError::Io {
                    action: "copy the rootfs to",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!files.dir.exists());
    }

    #[test]
    fn tail_lines_returns_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).expect("write");
        assert_eq!(tail_lines(&p, 2), "line 98\nline 99");
        assert_eq!(tail_lines(&dir.path().join("none"), 2), "");
    }

    #[test]
    fn new_reports_a_missing_kvm_device_as_host_setup() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["sandbox-vmm", "vmlinux", "rootfs.ext4"] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        let config = KvmRuntimeConfig::builder()
            .vmm(dir.path().join("sandbox-vmm"))
            .kernel(dir.path().join("vmlinux"))
            .rootfs(dir.path().join("rootfs.ext4"))
            .state_dir(dir.path().join("state"))
            .kvm_device(dir.path().join("no-kvm"))
            .build()
            .expect("config");
        let err = KvmRuntime::new(config).expect_err("no kvm");
        assert!(matches!(err, RuntimeError::Kvm(_)), "{err}");
        assert!(err.to_string().contains("modprobe"), "{err}");
        assert_eq!(sandbox_core::Error::from(err).kind(), ErrorKind::HostSetup);
    }
}
