//! The backend conformance suite against `KvmSandbox`: real guests booted by our VMM, the agent
//! as PID 1, host ↔ agent over virtio-vsock. Needs a `/dev/kvm` that boots Linux and the
//! artifacts in `SANDBOX_KERNEL`/`SANDBOX_ROOTFS`/`SANDBOX_VMM`: run it with `cargo xtask test`.
//!
//! One named test per check (`harness = false`; `sandbox_core::conformance::Suite`), run one at a
//! time in order: the shared-sandbox checks share one VM, then the TTL and drop checks boot their
//! own, and the last test compares the host inventory (our VMM processes, files under the state
//! directory, this process's open fds) with the one taken before the first.

#![cfg_attr(not(sandbox_kvm), allow(dead_code, unused_imports))]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sandbox_core::conformance::{self, Harness, RawStream, Suite, Trial};
use sandbox_core::{ErrorKind, ExecRequest, RootMode, Runtime, Sandbox, SandboxSpec, SandboxState};
use sandbox_kvm::runtime::jail::{JailConfig, VmmUser};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

/// The handshake deadline of the runtime whose agent never answers: `create` must fail with
/// `AgentUnreachable` once it passes (the suite allows half of it again plus 10 s for the
/// teardown). The check waits this long, so it is not larger than a slow boot needs.
const UNREACHABLE_DEADLINE: Duration = Duration::from_secs(30);

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!(
            "{var} is not set: KVM-tier tests get the guest artifacts and sandbox-vmm from \
             `cargo xtask test`"
        ),
    }
}

struct KvmHarness {
    /// The runtime's state directory, removed when the suite drops the harness at the end.
    _state: tempfile::TempDir,
    runtime: KvmRuntime,
    /// Same artifacts, but it dials a vsock port nothing listens on: the agent never answers.
    mute: KvmRuntime,
    state_dir: PathBuf,
}

impl KvmHarness {
    fn new() -> Self {
        let state = tempfile::Builder::new()
            .prefix("sbx-conformance-")
            .tempdir()
            .expect("state dir in TMPDIR");
        let state_dir = state.path().to_path_buf();
        let base = || {
            KvmRuntimeConfig::builder()
                .vmm(env_path("SANDBOX_VMM"))
                .kernel(env_path("SANDBOX_KERNEL"))
                .rootfs(env_path("SANDBOX_ROOTFS"))
                .state_dir(&state_dir)
        };
        // Generous: nested test hosts on a busy machine sometimes stall for minutes.
        let runtime = KvmRuntime::new(
            base()
                .create_deadline(Duration::from_secs(600))
                .build()
                .expect("config"),
        )
        .expect("KvmRuntime::new");
        let mute = KvmRuntime::new(
            base()
                .agent_port(sandbox_core::AGENT_VSOCK_PORT + 1)
                .create_deadline(UNREACHABLE_DEADLINE)
                .build()
                .expect("config"),
        )
        .expect("KvmRuntime::new");
        KvmHarness {
            _state: state,
            runtime,
            mute,
            state_dir,
        }
    }
}

/// Every file and directory under `dir`, recursively.
fn walk(dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(format!("file:{}", e.path().display()));
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        }
    }
    Ok(())
}

/// Our `sandbox-vmm` processes: children of this process, and any process whose command line
/// mentions the state directory (an orphan would).
fn vmm_processes(state_dir: &Path) -> std::io::Result<BTreeSet<String>> {
    let me = std::process::id().to_string();
    let needle = state_dir.to_string_lossy().into_owned();
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let comm = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default();
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if (ppid == me && comm == "sandbox-vmm")
            || String::from_utf8_lossy(&cmdline).contains(&needle)
        {
            out.insert(format!("process:{name}:{comm}"));
        }
    }
    Ok(out)
}

/// This process's open fds and what they point at (without the fd `read_dir` itself opens).
fn open_fds() -> std::io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue; // the directory fd of this very listing, closed by now
        };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with("/proc/") {
            continue;
        }
        out.insert(format!("fd:{}:{target}", e.file_name().to_string_lossy()));
    }
    Ok(out)
}

#[async_trait]
impl Harness for KvmHarness {
    fn runtime(&self) -> &dyn Runtime {
        &self.runtime
    }

    fn spec(&self) -> SandboxSpec {
        self.runtime
            .spec_builder()
            .memory_mib(256)
            .env("SANDBOX_TEST", "1")
            .build()
            .expect("valid spec")
    }

    async fn raw_agent_stream(
        &self,
        sandbox: &dyn Sandbox,
    ) -> sandbox_core::Result<Box<dyn RawStream>> {
        Ok(Box::new(self.runtime.raw_agent_stream(sandbox.id()).await?))
    }

    async fn create_unreachable(&self) -> sandbox_core::Result<Box<dyn Sandbox>> {
        // A read-only root: nothing to copy, so the deadline is spent on the boot.
        let spec = self
            .mute
            .spec_builder()
            .memory_mib(128)
            .root(RootMode::ReadOnly)
            .build()
            .expect("valid spec");
        self.mute.create(spec).await
    }

    fn unreachable_deadline(&self) -> Duration {
        UNREACHABLE_DEADLINE
    }

    async fn inventory(&self) -> sandbox_core::Result<BTreeSet<String>> {
        let mut inv = vmm_processes(&self.state_dir)?;
        walk(&self.state_dir, &mut inv)?;
        // The sandboxes' cgroups (docs/jail.md).
        if let Ok(entries) = std::fs::read_dir(sandbox_kvm::runtime::jail::DEFAULT_CGROUP_ROOT) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().contains("-sbx-") {
                    inv.insert(format!("cgroup:{}", e.path().display()));
                }
            }
        }
        inv.extend(open_fds()?);
        Ok(inv)
    }
}

/// Polls `cond` every 100 ms for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

fn pid_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still be ours to reap (a bug).
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The TTL is enforced by the host: the VMM is killed and the directory removed, whatever the
/// guest does.
async fn ttl_kills_the_vmm_and_removes_its_files(h: &KvmHarness) {
    let sb = h
        .runtime
        .create_sandbox(
            h.runtime
                .spec_builder()
                .memory_mib(128)
                .ttl(Duration::from_secs(3))
                .build()
                .expect("spec"),
        )
        .await
        .expect("create with a TTL");
    let (pid, dir) = (sb.vmm_pid(), sb.dir().to_path_buf());
    assert!(pid_alive(pid) && dir.is_dir());
    assert!(
        eventually(Duration::from_secs(30), || !pid_alive(pid) && !dir.exists()).await,
        "the TTL did not kill VMM {pid} and remove {}",
        dir.display()
    );
    assert_eq!(sb.state(), SandboxState::Failed);
    let err = sb
        .exec(ExecRequest::new(["true"]))
        .await
        .expect_err("exec after the TTL");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidState | ErrorKind::GuestExited),
        "{err}"
    );
    sb.destroy().await.expect("destroy after the TTL");
    assert_eq!(sb.state(), SandboxState::Destroyed);
}

/// Dropping a sandbox without destroy() still kills the VMM and removes its files.
async fn drop_without_destroy_cleans_up(h: &KvmHarness) {
    let sb = h.runtime.create_sandbox(h.spec()).await.expect("create");
    let out = sb.exec(ExecRequest::shell("echo up")).await.expect("exec");
    assert_eq!(out.stdout_str(), "up\n");
    let (pid, dir) = (sb.vmm_pid(), sb.dir().to_path_buf());
    drop(sb);
    assert!(!pid_alive(pid), "Drop left VMM {pid} running");
    assert!(!dir.exists(), "Drop left {}", dir.display());
    assert_eq!(h.runtime.live_sandboxes(), 0);
}

/// A `create()` dropped mid-boot (its future cancelled) leaves nothing once the runtime's cleanup
/// thread has run: the live count drops to zero last, after kill and removal. The inventory check
/// that ends the suite covers processes, files and fds.
async fn cancelled_creates_leave_nothing(h: &KvmHarness) {
    for ms in [50, 300, 1500] {
        let r = tokio::time::timeout(
            Duration::from_millis(ms),
            h.runtime.create_sandbox(h.spec()),
        )
        .await;
        if let Ok(Ok(sb)) = r {
            // Booted faster than the bound: nothing was cancelled; destroy it.
            sb.destroy().await.expect("destroy");
        }
        assert!(
            eventually(Duration::from_secs(30), || h.runtime.live_sandboxes() == 0).await,
            "a create() cancelled after {ms} ms was not cleaned up"
        );
    }
}

/// The VMM runs jailed (docs/jail.md): no new privileges, no capabilities, its own namespaces
/// where we may create them, and a cgroup with the sandbox's limits where cgroup v2 exists; the
/// cgroup is gone after destroy.
async fn vmm_runs_jailed(h: &KvmHarness) {
    let sb = h.runtime.create_sandbox(h.spec()).await.expect("create");
    let pid = sb.vmm_pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("VMM status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).ok();
    let root = nix_is_root();
    for n in ["net", "mnt", "uts", "ipc"] {
        if root {
            assert_ne!(
                ns(&pid.to_string(), n),
                ns("self", n),
                "{n} namespace shared"
            );
        }
    }
    let cgroup = sb.cgroup_dir().map(Path::to_path_buf);
    if cgroup_v2() {
        let dir = cgroup.clone().expect("a cgroup where cgroup v2 exists");
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("cgroup.procs");
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "VMM {pid} not in {}: {procs}",
            dir.display()
        );
        let max: u64 = std::fs::read_to_string(dir.join("memory.max"))
            .expect("memory.max")
            .trim()
            .parse()
            .expect("a number");
        assert!((256 << 20..=512 << 20).contains(&max), "memory.max {max}");
        let pids = std::fs::read_to_string(dir.join("pids.max")).expect("pids.max");
        assert_ne!(pids.trim(), "max");
        println!(
            "vmm_runs_jailed: VMM {pid} in {} (memory.max {max}, pids.max {})",
            dir.display(),
            pids.trim()
        );
    } else {
        println!("vmm_runs_jailed: no cgroup v2 on this host; cgroup checks skipped");
    }
    // Every VMM thread runs under its seccomp filter, without new privileges.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("VMM tasks");
    let mut threads = 0;
    for task in tasks.filter_map(Result::ok) {
        let status = std::fs::read_to_string(task.path().join("status")).expect("task status");
        let get = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let name = get("Name:");
        assert_eq!(get("Seccomp:"), "2", "thread {name} has no seccomp filter");
        assert_eq!(get("NoNewPrivs:"), "1", "thread {name}");
        threads += 1;
    }
    assert!(threads >= 3, "main, device and vCPU threads: {threads}");
    // Its fds: stdio, and exactly the files its config names (the rest are what it made
    // itself: KVM, eventfd, epoll and timer anon inodes, and sockets: the vsock listener
    // and its connections).
    let dir = sb
        .vsock_path()
        .parent()
        .expect("the sandbox directory")
        .to_path_buf();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let allowed: BTreeSet<PathBuf> = [
        PathBuf::from("/dev/null"),
        PathBuf::from("/dev/kvm"),
        // A sandbox with a network holds its tap (this spec has none).
        PathBuf::from("/dev/net/tun"),
        canon(&env_path("SANDBOX_ROOTFS")),
    ]
    .into_iter()
    .chain(
        [
            "vmm.log",
            "console.log",
            "disk.qcow2",
            "rootfs.ext4",
            "disk-full.count",
        ]
        .iter()
        .map(|n| canon(&dir.join(n))),
    )
    .collect();
    let mut files = BTreeSet::new();
    let mut sockets = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("VMM fds")
        .filter_map(Result::ok)
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let text = target.to_string_lossy().into_owned();
        if text.starts_with("socket:") {
            sockets += 1;
        } else if text.starts_with('/') {
            assert!(
                allowed.contains(&target),
                "VMM holds an undeclared file: {text}"
            );
            files.insert(target);
        } else {
            assert!(text.starts_with("anon_inode:"), "VMM holds {text}");
        }
    }
    // /dev/kvm is allowed but not required: the VMM may close the system fd once the VM fd
    // (an anon inode) exists, which is what it does.
    assert!(
        files.contains(Path::new("/dev/null")),
        "no /dev/null: {files:?}"
    );
    for must in ["vmm.log", "console.log"] {
        assert!(
            files.contains(&canon(&dir.join(must))),
            "no {must}: {files:?}"
        );
    }
    assert!(sockets >= 1, "no vsock listener");
    // Its root: an empty directory with only the binary, its libraries and vm.json, when the
    // private root is in effect (root with namespaces).
    if root {
        let vroot = PathBuf::from(format!("/proc/{pid}/root"));
        assert!(
            vroot.join("vm.json").exists(),
            "no /vm.json in the VMM's root"
        );
        for host in ["etc/passwd", "proc/self", "console.log", "vsock.sock"] {
            assert!(
                !vroot.join(host).exists(),
                "the VMM sees /{host} in its root"
            );
        }
        // Every file in it is vm.json, the binary (at its canonical host path, so the
        // directories above it exist, e.g. `tmp/` for a checkout under /tmp) or a shared
        // library; nothing else of the host.
        let vmm = std::fs::canonicalize(env_path("SANDBOX_VMM")).expect("canonical vmm");
        let mut stack = vec![vroot.clone()];
        let mut seen = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read the VMM's root") {
                let e = e.expect("entry");
                let path = e.path();
                let inside = Path::new("/").join(path.strip_prefix(&vroot).expect("under root"));
                let kind = e.file_type().expect("file type");
                seen += 1;
                assert!(seen < 10_000, "the VMM's root is not small");
                if kind.is_dir() {
                    stack.push(path);
                } else {
                    let name = inside.to_string_lossy();
                    assert!(
                        inside == Path::new("/vm.json") || inside == vmm || name.contains(".so"),
                        "the VMM sees {name} in its root"
                    );
                }
            }
        }
        let top: Vec<String> = std::fs::read_dir(&vroot)
            .expect("VMM root")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        println!("vmm_runs_jailed: the VMM's root holds {top:?}; fds {files:?}");
    }
    let out = sb
        .exec(ExecRequest::shell("echo jailed"))
        .await
        .expect("exec");
    assert_eq!(out.stdout_str(), "jailed\n");
    sb.destroy().await.expect("destroy");
    if let Some(dir) = cgroup {
        assert!(!dir.exists(), "destroy left {}", dir.display());
    }
}

/// A runtime of its own on a fresh state directory with `jail`.
fn runtime_with(jail: JailConfig, prefix: &str) -> (KvmRuntime, tempfile::TempDir) {
    let state = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("state dir");
    let runtime = KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state.path())
            .create_deadline(Duration::from_secs(600))
            .jail(jail)
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new");
    (runtime, state)
}

/// With `JailConfig::user` set, the VMM runs as that uid/gid with no supplementary groups, and
/// the guest still boots and runs commands (its files are inherited fds).
async fn vmm_runs_as_the_configured_user(_h: &KvmHarness) {
    if !nix_is_root() {
        println!("vmm_runs_as_the_configured_user: not root; skipped");
        return;
    }
    let mut jail = JailConfig::default();
    jail.user = Some(VmmUser {
        uid: 65534,
        gid: 65534,
    });
    let (runtime, _state) = runtime_with(jail, "sbx-user-");
    let spec = runtime
        .spec_builder()
        .memory_mib(128)
        .build()
        .expect("spec");
    let sb = runtime
        .create_sandbox(spec)
        .await
        .expect("create as uid 65534");
    let status = std::fs::read_to_string(format!("/proc/{}/status", sb.vmm_pid())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Groups:"), "", "{status}");
    let out = sb
        .exec(ExecRequest::shell("echo unprivileged"))
        .await
        .expect("exec");
    assert_eq!(out.stdout_str(), "unprivileged\n");
    sb.destroy().await.expect("destroy");
}

/// A guest command that exhausts guest RAM is ended by the guest kernel's OOM killer, and the
/// exec result says so (`signal` 9, `oom_killed`); the sandbox keeps running. The VMM stays
/// within its cgroup (guest RAM plus the overhead). The hog's memory is shared anonymous memory
/// (Python's `mmap` default), which the kernel's OOM reaper cannot take back before the hog
/// exits: the agent paging its own code back in during that window once left the kernel nothing
/// to kill, and it panicked (seen in CI); the agent therefore locks its code in RAM, which this
/// checks too.
async fn a_guest_out_of_memory_is_reported_in_the_exec_result(h: &KvmHarness) {
    let sb = h.runtime.create_sandbox(h.spec()).await.expect("create");
    // The agent's code is locked in RAM (docs/agent.md): more than 1 MiB of it.
    let out = sb
        .exec(ExecRequest::shell("sed -n 's/^VmLck: *//p' /proc/1/status"))
        .await
        .expect("exec");
    let locked_kib: u64 = out
        .stdout_str()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or_else(|_| panic!("VmLck of PID 1: {:?}", out.stdout_str()));
    assert!(locked_kib > 1024, "PID 1 locks {locked_kib} kB");
    // The hog as the command's own process (`exec`), and as a shell's child (exit 137).
    let hog = "python3 -c 'import mmap\nchunks=[]\nwhile True:\n m=mmap.mmap(-1,1<<20)\n \
               [m.__setitem__(i,1) for i in range(0,1<<20,4096)]\n chunks.append(m)'";
    let out = sb
        .exec(ExecRequest::shell(format!("exec {hog}")))
        .await
        .expect("exec");
    assert_eq!(out.status.signal, Some(9), "{:?}", out.status);
    assert!(out.status.oom_killed, "{:?}", out.status);
    let out = sb
        .exec(ExecRequest::shell(format!("{hog}; exit $?")))
        .await
        .expect("exec");
    assert_eq!(out.status.code, Some(137), "{:?}", out.status);
    assert!(out.status.oom_killed, "{:?}", out.status);
    assert!(!out.status.timed_out);
    // A plain exit is not an OOM kill; the sandbox still works.
    let after = sb
        .exec(ExecRequest::shell("echo alive"))
        .await
        .expect("exec after the OOM kill");
    assert_eq!(after.stdout_str(), "alive\n");
    assert!(!after.status.oom_killed);
    sb.destroy().await.expect("destroy");
}

/// A fork bomb is contained: commands run in the guest's workload cgroup, whose `pids.max`
/// stops the bomb short of the guest's task limit (the agent keeps room for its threads), the
/// exec's timeout kills the whole process group, and afterwards the sandbox answers with no
/// process of the bomb left.
async fn a_fork_bomb_is_contained(h: &KvmHarness) {
    let sb = h.runtime.create_sandbox(h.spec()).await.expect("create");
    // Empty if the agent did not set the cgroup up: Linux lists cgroup v2 in /proc/<pid>/cgroup
    // only once something mounted it (two CI runs caught an agent that then skipped the setup).
    let out = sb
        .exec(ExecRequest::shell("cat /proc/self/cgroup"))
        .await
        .expect("exec");
    assert_eq!(out.stdout_str(), "0::/workload\n", "{out:?}");
    // The bomb in the background, the command's own process waiting (`exec`, no fork needed).
    let out = sb
        .exec(
            ExecRequest::shell("b() { b | b & }; b & exec sleep 600")
                .timeout(Duration::from_secs(15)),
        )
        .await
        .expect("exec of the fork bomb");
    assert!(out.status.timed_out, "{:?}", out.status);
    // SIGKILL reached every process of the group; they may take a moment to exit.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = sb
            .exec(ExecRequest::shell(
                "read n < /sys/fs/cgroup/workload/pids.current; echo $n",
            ))
            .await
            .expect("exec after the fork bomb");
        // The shell reading the count is the one task expected.
        if left.stdout_str() == "1\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bomb's tasks are still there: {:?}",
            left.stdout_str()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sb.destroy().await.expect("destroy");
}

/// A VMM whose cgroup allows no memory beyond guest RAM (`memory_overhead_mib` 0) and whose
/// guest touches all of its RAM is ended by the cgroup's OOM killer: the exec fails with kind
/// `GuestExited` and a message that says the VMM ran out of memory, not "connection closed".
async fn a_vmm_out_of_memory_is_reported_as_such(_h: &KvmHarness) {
    if !cgroup_v2() || !nix_is_root() {
        println!("a_vmm_out_of_memory_is_reported_as_such: no cgroup v2 or not root; skipped");
        return;
    }
    let mut jail = JailConfig::default();
    jail.memory_overhead_mib = 0;
    let (runtime, _state) = runtime_with(jail, "sbx-oom-");
    let spec = runtime
        .spec_builder()
        .memory_mib(128)
        .build()
        .expect("spec");
    let sb = runtime.create_sandbox(spec).await.expect("create");
    // Touches guest RAM a page at a time, 1 MiB per step, until something gives: the VMM's
    // RSS (guest pages touched plus its own heap) passes memory.max = guest RAM before the
    // guest itself runs out.
    let hog = "python3 -c 'import mmap\nchunks=[]\nwhile True:\n m=mmap.mmap(-1,1<<20)\n \
               [m.__setitem__(i,1) for i in range(0,1<<20,4096)]\n chunks.append(m)'";
    let err = sb
        .exec(ExecRequest::shell(hog))
        .await
        .expect_err("the VMM must be OOM-killed");
    assert_eq!(err.kind(), ErrorKind::GuestExited, "{err}");
    let text = err.to_string();
    assert!(text.contains("ran out of memory"), "{text}");
    sb.destroy().await.expect("destroy");
}

/// A state directory on a tmpfs holds each sandbox's overlay in memory charged to its VMM's
/// cgroup: a guest that writes more than the jail's overhead gets its VMM OOM-killed, and the
/// error names the cause (files in memory) and the fix (a state directory on a disk).
async fn disk_writes_in_a_tmpfs_state_dir_are_named_in_the_oom_error(_h: &KvmHarness) {
    let (runtime, state) = runtime_with(JailConfig::default(), "sbx-tmpfs-");
    let tmpfs = nix::sys::statfs::statfs(state.path())
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if !cgroup_v2() || !nix_is_root() || !tmpfs {
        println!(
            "disk_writes_in_a_tmpfs_state_dir_are_named_in_the_oom_error: needs root, cgroup v2 \
             and a tmpfs TMPDIR (the nested test host has all three); skipped"
        );
        return;
    }
    let spec = runtime
        .spec_builder()
        .memory_mib(128)
        .build()
        .expect("spec");
    let sb = runtime.create_sandbox(spec).await.expect("create");
    // 300 MiB through the guest's page cache to its disk: more than the 64 MiB overhead.
    let err = sb
        .exec(ExecRequest::shell(
            "dd if=/dev/zero of=/fill bs=1M count=300 2>&1; sync",
        ))
        .await
        .expect_err("the VMM must be OOM-killed");
    assert_eq!(err.kind(), ErrorKind::GuestExited, "{err}");
    let text = err.to_string();
    assert!(text.contains("ran out of memory"), "{text}");
    assert!(text.contains("files in memory"), "{text}");
    assert!(text.contains("SANDBOX_STATE_DIR"), "{text}");
    sb.destroy().await.expect("destroy");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A VMM killed with SIGKILL under a live sandbox: the next exec (on a pooled connection or a new
/// one) fails with `GuestExited`, never a bare connection error (found by `cargo xtask soak`),
/// and `destroy` still succeeds.
async fn exec_after_the_vmm_was_killed_is_guest_exited(h: &KvmHarness) {
    let sb = h.runtime.create_sandbox(h.spec()).await.expect("create");
    // Leaves a pooled connection behind.
    sb.exec(ExecRequest::shell("true")).await.expect("exec");
    let pid = sb.vmm_pid();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    for _ in 0..2 {
        let err = sb
            .exec(ExecRequest::shell("echo after"))
            .await
            .expect_err("exec after SIGKILL of the VMM");
        assert!(
            matches!(err.kind(), ErrorKind::GuestExited | ErrorKind::InvalidState),
            "exec after SIGKILL of the VMM gave {:?}: {err}",
            err.kind()
        );
    }
    assert_eq!(sb.state(), SandboxState::Failed);
    sb.destroy().await.expect("destroy after the VMM died");
}

/// A VMM whose device thread makes a system call its seccomp filter forbids (the config's
/// test hook) ends at once, and create says why: kind `GuestExited`, the call's number and
/// the thread kind in the message, and nothing left behind.
async fn a_seccomp_violation_ends_the_vmm_and_is_reported(_h: &KvmHarness) {
    let state = tempfile::Builder::new()
        .prefix("sbx-seccomp-")
        .tempdir()
        .expect("state dir");
    let mut jail = JailConfig::default();
    jail.debug_forbidden_syscall = true;
    let runtime = KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state.path())
            .create_deadline(Duration::from_secs(600))
            .jail(jail)
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new");
    let spec = runtime
        .spec_builder()
        .memory_mib(128)
        .root(RootMode::ReadOnly)
        .build()
        .expect("spec");
    let err = runtime
        .create_sandbox(spec)
        .await
        .expect_err("the VMM must die on its forbidden call");
    assert_eq!(err.kind(), ErrorKind::GuestExited, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("forbidden system call") && text.contains("devices thread"),
        "{text}"
    );
    let left: Vec<_> = std::fs::read_dir(state.path())
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("sbx-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The KVM backend's own trials, after the suite's checks.
#[cfg(sandbox_kvm)]
fn extra(suite: &Suite<KvmHarness>) -> Vec<Trial> {
    vec![
        suite.trial("ttl_kills_the_vmm_and_removes_its_files", |h| async move {
            ttl_kills_the_vmm_and_removes_its_files(&h).await
        }),
        suite.trial("drop_without_destroy_cleans_up", |h| async move {
            drop_without_destroy_cleans_up(&h).await
        }),
        suite.trial("cancelled_creates_leave_nothing", |h| async move {
            cancelled_creates_leave_nothing(&h).await
        }),
        suite.trial(
            "vmm_runs_jailed",
            |h| async move { vmm_runs_jailed(&h).await },
        ),
        suite.trial("vmm_runs_as_the_configured_user", |h| async move {
            vmm_runs_as_the_configured_user(&h).await
        }),
        suite.trial(
            "a_guest_out_of_memory_is_reported_in_the_exec_result",
            |h| async move { a_guest_out_of_memory_is_reported_in_the_exec_result(&h).await },
        ),
        suite.trial(
            "a_fork_bomb_is_contained",
            |h| async move { a_fork_bomb_is_contained(&h).await },
        ),
        suite.trial("a_vmm_out_of_memory_is_reported_as_such", |h| async move {
            a_vmm_out_of_memory_is_reported_as_such(&h).await
        }),
        suite.trial(
            "disk_writes_in_a_tmpfs_state_dir_are_named_in_the_oom_error",
            |h| async move { disk_writes_in_a_tmpfs_state_dir_are_named_in_the_oom_error(&h).await },
        ),
        suite.trial(
            "exec_after_the_vmm_was_killed_is_guest_exited",
            |h| async move { exec_after_the_vmm_was_killed_is_guest_exited(&h).await },
        ),
        suite.trial(
            "a_seccomp_violation_ends_the_vmm_and_is_reported",
            |h| async move { a_seccomp_violation_ends_the_vmm_and_is_reported(&h).await },
        ),
    ]
}

fn main() {
    // Without `--cfg sandbox_kvm` the binary has no tests: they need a KVM that boots Linux.
    #[cfg(not(sandbox_kvm))]
    let conclusion = conformance::run_trials(Vec::new());
    #[cfg(not(sandbox_kvm))]
    conclusion.exit();

    #[cfg(sandbox_kvm)]
    conformance::main(KvmHarness::new, extra)
}
