//! KVM tier, as root: an egress policy enforced on the host, probed from inside a real guest
//! (docs/policy.md). The test builds an "internet" netns (TEST-NET-2) with a web server and a
//! DNS server that logs every query it receives, then runs a sandbox under the policy
//! `allow *.wild.test:8080/tcp` and checks, from the guest: a resolved name connects; the same
//! address before any resolution does not; a denied name is refused without any query reaching
//! the upstream; the metadata address fails fast; deny events arrive; a live policy swap closes
//! the allowed name; and nothing is left afterwards.
#![cfg(all(sandbox_kvm, sandbox_privileged))]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_core::{ExecRequest, NetworkSpec, PolicyDocument, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("{var} is not set: the KVM tier gets it from `cargo xtask test`"),
    }
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

/// A DNS server for the test: answers A queries for names under `wild.test` with 198.51.100.2,
/// NXDOMAIN for anything else, and appends every query name it receives to `log`.
const DNS_SERVER: &str = r#"
import socket, struct, sys
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.2", 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12:
        continue
    i, labels = 12, []
    while i < len(q) and q[i] != 0:
        n = q[i]; labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace")); i += 1 + n
    name = ".".join(labels).lower()
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
    log.write(name + "\n")
    question = q[12:i + 5]
    ok = name.endswith(".wild.test") and qtype == 1
    flags = 0x8180 if ok else 0x8183
    head = q[:2] + struct.pack(">HHHHH", flags, 1, 1 if ok else 0, 0, 0)
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("198.51.100.2") if ok else b""
    s.sendto(head + question + answer, peer)
"#;

/// The "internet": a netns on 198.51.100.2/24 behind a veth from the root netns, with a web
/// server on 8080, the logging DNS server on 53 and a web server on 169.254.169.254:80 (the
/// metadata address, reachable from the host side, so only the policy can stop the guest).
struct Internet {
    name: String,
    children: Vec<std::process::Child>,
    dns_log: PathBuf,
    _www: tempfile::TempDir,
}

impl Internet {
    fn new() -> Self {
        let name = format!("pinet-{}", std::process::id());
        let host_if = format!("vp{}", std::process::id() % 100_000);
        sh(&format!(
            "ip netns add {name} && ip link add {host_if} type veth peer name eth0 netns {name} && \
             ip addr add 198.51.100.1/24 dev {host_if} && ip link set {host_if} up && \
             ip route add 169.254.169.254/32 dev {host_if} via 198.51.100.2 2>/dev/null || true; \
             ip -n {name} addr add 198.51.100.2/24 dev eth0 && \
             ip -n {name} addr add 169.254.169.254/32 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up && ip -n {name} route add default via 198.51.100.1"
        ));
        let www = tempfile::tempdir().expect("www");
        std::fs::write(www.path().join("index.html"), "allowed page\n").expect("page");
        std::fs::write(www.path().join("dns.py"), DNS_SERVER).expect("dns server");
        let dns_log = www.path().join("queries.log");
        std::fs::write(&dns_log, "").expect("log");
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &name])
                .args(args)
                .current_dir(www.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn a server")
        };
        let dns_path = www.path().join("dns.py");
        let children = vec![
            spawn(&[
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "198.51.100.2",
            ]),
            spawn(&[
                "python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                "169.254.169.254",
            ]),
            spawn(&[
                "python3",
                dns_path.to_str().expect("utf-8"),
                dns_log.to_str().expect("utf-8"),
            ]),
        ];
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = "import socket; socket.create_connection(('198.51.100.2', 8080), 1); \
                     socket.create_connection(('169.254.169.254', 80), 1)";
        while !Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c", probe])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(Instant::now() < deadline, "the test servers did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Internet {
            name,
            children,
            dns_log,
            _www: www,
        }
    }

    fn queries(&self) -> String {
        std::fs::read_to_string(&self.dns_log).unwrap_or_default()
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

const POLICY: &str = r#"
default = "deny"
[[allow]]
domain = "*.wild.test"
ports = [8080]
protocol = "tcp"
"#;

const CLOSED: &str = r#"
default = "deny"
[[allow]]
domain = "*.other.test"
ports = [8080]
protocol = "tcp"
"#;

/// A guest-side probe: fetch `url` with a 10 s limit; prints `ok <body>` or `fail <error>` and
/// the seconds it took.
fn fetch(url: &str) -> String {
    format!(
        "python3 -c \"import time,urllib.request as u; t=time.time()\ntry:\n print('ok', u.urlopen('{url}', timeout=10).read().decode().strip(), end=' ')\nexcept Exception as e:\n print('fail', type(e).__name__, end=' ')\nprint(round(time.time()-t, 1))\""
    )
}

/// `getent hosts <name>` in the guest: prints the address, or nothing when refused.
fn resolve(name: &str) -> String {
    format!("getent hosts {name} || echo unresolved")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_policy_holds_from_inside_a_guest() {
    let netns_before = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    let internet = Internet::new();
    let state = tempfile::Builder::new()
        .prefix("sbx-policy-")
        .tempdir()
        .expect("state");
    let rt = KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state.path())
            .create_deadline(Duration::from_secs(600))
            .policy(
                sandbox_net::PolicyOptions::default()
                    .with_upstream("198.51.100.2:53".parse().expect("addr")),
            )
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new");
    let spec = rt
        .spec_builder()
        .memory_mib(256)
        .root(RootMode::Writable)
        .network(NetworkSpec::with_policy(PolicyDocument::toml(POLICY)))
        .build()
        .expect("spec");
    let sb = rt
        .create_sandbox(spec)
        .await
        .expect("create under a policy");
    let mut events = sb.egress_events().expect("a deny-event stream");
    let run = |cmd: String| {
        let sb = &sb;
        async move {
            let out = sb.exec(ExecRequest::shell(&cmd)).await.expect("exec");
            format!("{}{}", out.stdout_str(), out.stderr_str())
        }
    };

    // The allowed service's address before any name resolved to it: denied, fast.
    let out = run(fetch("http://198.51.100.2:8080/index.html")).await;
    assert!(
        out.starts_with("fail"),
        "an unresolved address was reached: {out}"
    );
    // A denied name: refused by our resolver, and the upstream never saw it.
    let out = run(resolve("denied.test")).await;
    assert!(out.contains("unresolved"), "{out}");
    assert!(
        !internet.queries().contains("denied.test"),
        "{}",
        internet.queries()
    );
    // The metadata address: denied, fast.
    let out = run(fetch("http://169.254.169.254/")).await;
    assert!(
        out.starts_with("fail"),
        "the metadata address was reached: {out}"
    );
    // A name the policy allows: resolved (through the upstream) and reached.
    let out = run(fetch("http://a.wild.test:8080/index.html")).await;
    assert!(out.starts_with("ok allowed page"), "{out}");
    assert!(
        internet.queries().contains("a.wild.test"),
        "{}",
        internet.queries()
    );
    // The same name on a port the policy does not allow.
    let out = run(fetch("http://a.wild.test:80/")).await;
    assert!(out.starts_with("fail"), "{out}");

    // Deny events: the denied name and the early connection at least.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(e)) => seen.push(e),
            _ => {}
        }
    }
    assert!(
        seen.iter()
            .any(|e| e.name.as_deref() == Some("denied.test")),
        "no deny event for denied.test: {seen:?}"
    );
    assert!(
        seen.iter().any(|e| e.name.is_none()),
        "no deny event for a connection: {seen:?}"
    );

    // A live swap: the allowed name is closed by the new policy.
    sb.replace_egress_policy(&PolicyDocument::toml(CLOSED))
        .await
        .expect("swap");
    let out = run(fetch("http://b.wild.test:8080/index.html")).await;
    assert!(
        out.starts_with("fail"),
        "the swapped-out policy still allows: {out}"
    );

    sb.destroy().await.expect("destroy");
    drop(rt);
    drop(internet);
    let netns_after = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    assert_eq!(netns_after, netns_before, "a sandbox netns was left behind");
}
