//! KVM tier, as root: `kill -9` of the *process* holding a networked sandbox (the runtime dies
//! with no chance to clean up; its VMM follows through the parent-death signal), then a new
//! runtime on the same state directory reconciles: the sandbox directory, its cgroup, the
//! `sbxnet-*` netns and the host veth end are gone, and the host's inventory is what it was
//! before (docs/network.md, "Reconciliation").
//!
//! The holder is this test binary re-executed with `SANDBOX_NETKILL_STATE` set and `--exact`
//! [`child_holds_a_networked_sandbox`]; it is a file of its own so that no other test in the
//! same binary changes the inventory while it runs. Run by `cargo xtask test` (the nested test
//! host); never by hand on a developer's host (it changes the root netns).
#![cfg(all(sandbox_kvm, sandbox_privileged))]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandbox_core::{NetworkSpec, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

/// Set in the child: the state directory to create its sandbox in.
const CHILD_ENV: &str = "SANDBOX_NETKILL_STATE";
const CGROUP_ROOT: &str = "/sys/fs/cgroup/sandbox-sdk";

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("{var} is not set: the KVM tier gets it from `cargo xtask test`"),
    }
}

fn runtime(state: &Path) -> KvmRuntime {
    KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state)
            .create_deadline(Duration::from_secs(600))
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new")
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a sandbox network and its runtime may leave on the host.
#[derive(Debug, PartialEq, Eq)]
struct Inventory {
    /// `sbxnet-*` netns names.
    netns: BTreeSet<String>,
    /// Host veth ends of sandbox networks (`v` + 13 hex digits).
    links: BTreeSet<String>,
    /// Entries of the state directory.
    state: BTreeSet<String>,
    /// Cgroups under the runtime's cgroup root.
    cgroups: BTreeSet<String>,
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn inventory(state: &Path) -> Inventory {
    let netns = sh("ip netns list 2>/dev/null || true")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("sbxnet-"))
        .map(str::to_string)
        .collect();
    let links = sh("ip -o link show")
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .map(|n| n.split('@').next().unwrap_or_default().to_string())
        .filter(|n| {
            n.len() >= 14 && n.starts_with('v') && n[1..14].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect();
    let cgroups = names(Path::new(CGROUP_ROOT))
        .into_iter()
        .filter(|n| std::path::Path::new(CGROUP_ROOT).join(n).is_dir())
        .collect();
    Inventory {
        netns,
        links,
        state: names(state),
        cgroups,
    }
}

/// A progress line on stderr that libtest does not capture (a hang shows where it stopped).
fn progress(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "network_kill: {what}");
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state is `Z`.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
                .is_some_and(|c| c != 'Z' && c != 'X')
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_runtime_process_then_reconciliation_restores_the_inventory() {
    let state = tempfile::Builder::new()
        .prefix("sbx-netkill-")
        .tempdir()
        .expect("state dir");
    // A runtime once, so that the state directory's own files exist in "before" too.
    drop(runtime(state.path()));
    progress("first runtime dropped");
    let before = inventory(state.path());

    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_holds_a_networked_sandbox",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the test binary");
    let stdout = child.stdout.take().expect("stdout");
    // Read the child's lines on a thread so that a hung child fails the test at the deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    progress("child spawned");
    // Well inside the test host's 900 s limit, so that a hung child fails here with a message.
    let deadline = Instant::now() + Duration::from_secs(420);
    let (id, vmm_pid) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                panic!("the child did not report ready: {e}");
            }
        };
        progress(&format!("child: {line}"));
        // libtest prints `test <name> ... ` before the test's own output, on the same line.
        if let Some((_, rest)) = line.split_once("netkill-ready ") {
            let mut it = rest.split_whitespace();
            let id = it.next().expect("id").to_string();
            let pid: u32 = it.next().expect("pid").parse().expect("pid number");
            break (id, pid);
        }
    };

    // The sandbox and its network exist while the child holds them.
    let during = inventory(state.path());
    assert!(during.state.contains(&id), "{during:?}");
    assert_eq!(during.netns.len(), before.netns.len() + 1, "{during:?}");
    assert_eq!(during.links.len(), before.links.len() + 1, "{during:?}");
    assert!(alive(vmm_pid), "the VMM {vmm_pid} is not running");

    // kill -9 of the holder: no destroy, no drop. The VMM dies with it (PR_SET_PDEATHSIG).
    progress("killing the child");
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    let t = Instant::now();
    while alive(vmm_pid) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the VMM {vmm_pid} outlived its runtime by 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing cleaned up yet: the leftovers reconciliation is for.
    let orphaned = inventory(state.path());
    assert!(orphaned.state.contains(&id), "{orphaned:?}");
    assert_eq!(orphaned.netns, during.netns, "{orphaned:?}");

    // A new runtime on the same state directory cleans up what the dead one left.
    progress("VMM gone; starting a new runtime");
    let rt = runtime(state.path());
    progress("new runtime up");
    let after = inventory(state.path());
    drop(rt);
    assert!(
        !after.cgroups.iter().any(|c| c.ends_with(&id)),
        "the cgroup of {id} is left: {after:?}"
    );
    assert_eq!(after, before, "reconciliation left things behind");
}

/// The child half of the test above (does nothing unless spawned by it): creates a networked
/// sandbox, says so, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_holds_a_networked_sandbox() {
    let Some(state) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    progress("child: starting its runtime");
    let rt = runtime(Path::new(&state));
    progress("child: creating a networked sandbox");
    let spec = rt
        .spec_builder()
        .memory_mib(128)
        .root(RootMode::Writable)
        .network(NetworkSpec::allow_egress())
        .build()
        .expect("spec");
    let sb = rt.create_sandbox(spec).await.expect("create");
    progress("child: created");
    let _ = sb.expose(8000).await.expect("expose");
    println!("netkill-ready {} {}", sb.id(), sb.vmm_pid());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tokio::time::sleep(Duration::from_secs(1800)).await;
    panic!("the parent did not kill this process");
}
