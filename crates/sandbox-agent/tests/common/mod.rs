//! A process backend for tests: each "sandbox" is the agent binary running as a normal process
//! on a Unix socket in a temporary directory. It implements `Runtime`/`Sandbox` with
//! `AgentClient`, the same way `KvmSandbox` does over vsock, so the conformance suite runs here.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use sandbox_core::client::AgentClient;
use sandbox_core::conformance::{Harness, RawStream};
use sandbox_core::{
    exec_channel, Error, ErrorKind, ExecRequest, ExecStream, FileOptions, Listing, Result, Runtime,
    Sandbox, SandboxId, SandboxSpec, SandboxState,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

pub const AGENT: &str = env!("CARGO_BIN_EXE_sandbox-agent");
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Starts the agent on `sock`, waits for the ready line.
pub async fn start_agent(sock: &Path) -> Child {
    start_agent_as(sock, false).await
}

/// Starts the agent on `sock`; with `pid1`, as PID 1 of new PID, mount, UTS and network
/// namespaces (needs root), so it runs its init duties without touching the host.
pub async fn start_agent_as(sock: &Path, pid1: bool) -> Child {
    let mut cmd = if pid1 {
        let mut c = Command::new("unshare");
        c.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--uts",
            "--net",
            "--propagation",
            "private",
            AGENT,
        ]);
        c
    } else {
        Command::new(AGENT)
    };
    let mut child = cmd
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the agent prints its ready line")
        .expect("stdout readable");
    assert_eq!(line.as_deref(), Some("sandbox-init: ready"));
    child
}

pub async fn connect(sock: &Path) -> Result<AgentClient<UnixStream>> {
    let s = UnixStream::connect(sock)
        .await
        .map_err(|e| Error::with_source(ErrorKind::AgentUnreachable, "connect failed", e))?;
    Ok(AgentClient::handshake(s, HANDSHAKE_DEADLINE).await?)
}

#[derive(Debug)]
pub struct LocalRuntime {
    pub base: tempfile::TempDir,
    /// Run each agent as PID 1 in its own namespaces.
    pub pid1: bool,
    counter: AtomicU64,
    sockets: Mutex<HashMap<SandboxId, PathBuf>>,
}

impl LocalRuntime {
    pub fn new() -> Self {
        Self::with_pid1(false)
    }

    pub fn with_pid1(pid1: bool) -> Self {
        // Under /tmp on purpose: a PID-1 agent mounts its own tmpfs there, so this also checks
        // that it binds its socket before mounting.
        let parent = std::env::temp_dir();
        LocalRuntime {
            pid1,
            base: tempfile::Builder::new()
                .prefix("sbx-local-")
                .tempdir_in(parent)
                .expect("tempdir"),
            counter: AtomicU64::new(0),
            sockets: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Runtime for LocalRuntime {
    async fn create(&self, spec: SandboxSpec) -> Result<Box<dyn Sandbox>> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let id = SandboxId::new(format!("local-{n}"));
        let dir = self.base.path().join(id.as_str());
        std::fs::create_dir(&dir)?;
        let sock = dir.join("agent.sock");
        let child = start_agent_as(&sock, self.pid1).await;
        let mut client = connect(&sock).await?;
        client.ping().await?;
        self.sockets
            .lock()
            .expect("lock")
            .insert(id.clone(), sock.clone());
        let state = SandboxState::Creating.transition(SandboxState::Running)?;
        Ok(Box::new(LocalSandbox {
            id,
            dir,
            sock,
            env: spec.env().clone(),
            child: tokio::sync::Mutex::new(Some(child)),
            state: Mutex::new(state),
        }))
    }
}

#[derive(Debug)]
pub struct LocalSandbox {
    id: SandboxId,
    dir: PathBuf,
    pub sock: PathBuf,
    env: std::collections::BTreeMap<String, String>,
    child: tokio::sync::Mutex<Option<Child>>,
    state: Mutex<SandboxState>,
}

impl LocalSandbox {
    fn check_running(&self) -> Result<()> {
        let s = *self.state.lock().expect("lock");
        if !s.can_exec() {
            return Err(Error::new(
                ErrorKind::InvalidState,
                format!("The sandbox is {s:?}."),
            ));
        }
        Ok(())
    }
    async fn client(&self) -> Result<AgentClient<UnixStream>> {
        self.check_running()?;
        connect(&self.sock).await
    }
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn id(&self) -> &SandboxId {
        &self.id
    }
    fn state(&self) -> SandboxState {
        *self.state.lock().expect("lock")
    }
    async fn exec_stream(&self, mut req: ExecRequest) -> Result<ExecStream> {
        req.validate()?;
        for (k, v) in &self.env {
            req.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut client = self.client().await?;
        let (tx, stream) = exec_channel(sandbox_core::exec::DEFAULT_EXEC_BUFFER);
        tokio::spawn(async move {
            let _ = client.exec_to_channel(&req, tx).await;
        });
        Ok(stream)
    }
    async fn write_file(&self, path: &str, data: &[u8], opts: &FileOptions) -> Result<()> {
        Ok(self.client().await?.write_file(path, data, opts).await?)
    }
    async fn read_file(&self, path: &str, opts: &FileOptions) -> Result<Vec<u8>> {
        Ok(self.client().await?.read_file(path, opts).await?)
    }
    async fn remove(&self, path: &str, opts: &FileOptions) -> Result<()> {
        Ok(self.client().await?.remove(path, opts).await?)
    }
    async fn list(&self, path: &str, opts: &FileOptions) -> Result<Listing> {
        Ok(self.client().await?.list(path, opts).await?)
    }
    async fn destroy(&self) -> Result<()> {
        {
            let mut s = self.state.lock().expect("lock");
            if *s == SandboxState::Destroyed {
                return Ok(());
            }
            *s = s.transition(SandboxState::Stopping)?;
        }
        if let Some(mut child) = self.child.lock().await.take() {
            // Ask nicely first (exercises PowerOff), then make sure.
            if let Ok(mut c) = connect(&self.sock).await {
                let _ = c.power_off().await;
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                child.kill().await?;
            }
        }
        std::fs::remove_dir_all(&self.dir)?;
        let mut s = self.state.lock().expect("lock");
        *s = s.transition(SandboxState::Destroyed)?;
        Ok(())
    }
}

/// The conformance harness for the process backend.
pub struct LocalHarness {
    pub runtime: LocalRuntime,
}

impl LocalHarness {
    pub fn new() -> Self {
        LocalHarness {
            runtime: LocalRuntime::new(),
        }
    }

    pub fn pid1() -> Self {
        LocalHarness {
            runtime: LocalRuntime::with_pid1(true),
        }
    }
}

#[async_trait]
impl Harness for LocalHarness {
    fn runtime(&self) -> &dyn Runtime {
        &self.runtime
    }
    fn spec(&self) -> SandboxSpec {
        SandboxSpec::builder("/unused/vmlinux", "/unused/rootfs.ext4")
            .env("SANDBOX_TEST", "1")
            .build()
            .expect("valid spec")
    }
    async fn raw_agent_stream(&self, sandbox: &dyn Sandbox) -> Result<Box<dyn RawStream>> {
        let sock = self
            .runtime
            .sockets
            .lock()
            .expect("lock")
            .get(sandbox.id())
            .cloned()
            .expect("known sandbox");
        Ok(Box::new(UnixStream::connect(sock).await?))
    }
    async fn create_unreachable(&self) -> Result<Box<dyn Sandbox>> {
        // A listener that accepts and never says a word, like a guest whose agent hangs.
        let sock = self.runtime.base.path().join("mute.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)?;
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let r = connect(&sock).await;
        holder.abort();
        let _ = std::fs::remove_file(&sock);
        r.map(|_| -> Box<dyn Sandbox> {
            unreachable!("a mute listener cannot complete a handshake")
        })
    }
    fn unreachable_deadline(&self) -> Duration {
        HANDSHAKE_DEADLINE
    }
    async fn inventory(&self) -> Result<BTreeSet<String>> {
        let base = self.runtime.base.path();
        let mut inv = BTreeSet::new();
        for e in std::fs::read_dir(base)? {
            inv.insert(format!("file:{}", e?.path().display()));
        }
        let needle = base.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc")? {
            let e = e?;
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(&needle) {
                    inv.insert(format!("process:{}", e.file_name().to_string_lossy()));
                }
            }
        }
        Ok(inv)
    }
}
