//! KVM tier, as root: sandbox networks end to end (docs/network.md). A guest without a network
//! has only `lo`; a guest with one fetches a page from a server in an "internet" netns this test
//! makes (TEST-NET-2, reached through the host's routing like the real outside world); a
//! guest's web server answers the host through an exposed port; and every netns, link and
//! table is gone afterwards, including after `kill -9` of the VMM.
//!
//! Run by `cargo xtask test` (in the nested test host where this machine's KVM cannot boot
//! Linux). Never run on a developer's host by hand: it changes the root netns (IPv4 forwarding
//! and a `sandbox_sdk_*` nft table, which the runtime installs for its sandboxes).
#![cfg(all(sandbox_kvm, sandbox_privileged))]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_core::{ExecRequest, NetworkSpec, RootMode, Sandbox, SandboxSpec};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("{var} is not set: the KVM tier gets it from `cargo xtask test`"),
    }
}

fn runtime(state: &std::path::Path) -> KvmRuntime {
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

fn spec(rt: &KvmRuntime, network: Option<NetworkSpec>) -> SandboxSpec {
    let mut b = rt.spec_builder().memory_mib(256).root(RootMode::Writable);
    if let Some(n) = network {
        b = b.network(n);
    }
    b.build().expect("spec")
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

/// What the runtime may leave on the host: netns names and host links of sandbox networks.
fn inventory() -> (String, Vec<String>) {
    let netns = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    let links: Vec<String> = sh("ip -o link show")
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        // Host veth ends are `v` + 5 hex digits of the state key + 8 hex digits.
        .filter(|n| {
            n.len() >= 14 && n.starts_with('v') && n[1..14].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect();
    (netns, links)
}

/// An "internet" netns: a veth pair from the root netns (198.51.100.1/24) to a netns holding
/// 198.51.100.2 with a small HTTP server on port 8080. Deleted on drop.
struct Internet {
    name: String,
    server: std::process::Child,
}

impl Internet {
    fn new() -> Self {
        let name = format!("inet-{}", std::process::id());
        let host_if = format!("vi{}", std::process::id() % 100_000);
        sh(&format!(
            "ip netns add {name} && ip link add {host_if} type veth peer name eth0 netns {name} && \
             ip addr add 198.51.100.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {name} addr add 198.51.100.2/24 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up && ip -n {name} route add default via 198.51.100.1"
        ));
        let dir = tempfile::tempdir().expect("www").keep();
        std::fs::write(dir.join("index.html"), "hello from the internet netns\n").expect("page");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "198.51.100.2",
            ])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("http server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "python3",
                "-c",
                "import socket; socket.create_connection(('198.51.100.2', 8080), 1)",
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "the test server did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Internet { name, server }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

const FETCH: &str = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://198.51.100.2:8080/index.html', timeout=20).read().decode())\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_networks_end_to_end() {
    let before = inventory();
    let state = tempfile::Builder::new()
        .prefix("sbx-net-")
        .tempdir()
        .expect("state dir");
    let rt = runtime(state.path());
    let internet = Internet::new();

    // 1. No network in the spec: no device, only `lo`.
    let plain = rt.create_sandbox(spec(&rt, None)).await.expect("create");
    let out = plain
        .exec(ExecRequest::shell("ls /sys/class/net"))
        .await
        .expect("exec");
    assert_eq!(
        out.stdout_str().split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{out:?}"
    );
    let out = plain.exec(ExecRequest::shell(FETCH)).await.expect("exec");
    assert_ne!(
        out.status.code,
        Some(0),
        "a guest without a network fetched a page: {out:?}"
    );
    plain.destroy().await.expect("destroy");

    // 2. A network with egress: the guest fetches the page; its address and resolver came from
    // the kernel command line.
    let sb = rt
        .create_sandbox(spec(&rt, Some(NetworkSpec::allow_egress())))
        .await
        .expect("create with a network");
    let out = sb
        .exec(ExecRequest::shell("cat /sys/class/net/eth0/address; ip -4 -o addr show eth0 2>/dev/null || cat /proc/net/fib_trie | head -5; cat /etc/resolv.conf"))
        .await
        .expect("exec");
    assert!(out.stdout_str().starts_with("02:53:42:00:00:02"), "{out:?}");
    assert!(
        out.stdout_str().contains("nameserver 172.30.0.1"),
        "{out:?}"
    );
    let out = sb.exec(ExecRequest::shell(FETCH)).await.expect("exec");
    assert_eq!(out.status.code, Some(0), "fetch failed: {out:?}");
    assert_eq!(out.stdout_str().trim(), "hello from the internet netns");

    // 3. An exposed port: a web server in the guest answers the host.
    let out = sb
        .exec(ExecRequest::shell(
            "mkdir -p /srv && echo preview-page > /srv/index.html && cd /srv && \
             (nohup python3 -m http.server 8000 >/dev/null 2>&1 &) ; \
             for i in $(seq 100); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8000), 1)\" 2>/dev/null && exit 0; sleep 0.2; done; exit 1",
        ))
        .await
        .expect("exec");
    assert_eq!(
        out.status.code,
        Some(0),
        "the guest server did not start: {out:?}"
    );
    let addr = sb.expose(8000).await.expect("expose");
    let page = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    })
    .await
    .expect("join");
    assert!(
        page.contains("200") && page.contains("preview-page"),
        "{page}"
    );
    assert!(sb.unexpose(8000));

    // 4. A network without egress: the same fetch fails, fast.
    let closed = rt
        .create_sandbox(spec(&rt, Some(NetworkSpec::deny_egress())))
        .await
        .expect("create without egress");
    let out = closed.exec(ExecRequest::shell(FETCH)).await.expect("exec");
    assert_ne!(out.status.code, Some(0), "egress is denied: {out:?}");
    closed.destroy().await.expect("destroy");

    // 5. kill -9 of a networked sandbox's VMM, then destroy: the network goes too.
    let pid = sb.vmm_pid();
    sh(&format!("kill -9 {pid}"));
    sb.destroy().await.expect("destroy after kill -9");

    drop(internet);
    drop(rt);
    assert_eq!(inventory(), before, "sandbox networks were left behind");
}
