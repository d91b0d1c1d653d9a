//! KVM tier, as root: an egress policy enforced on the host, probed from inside a real guest
//! (docs/policy.md). The tests build an "internet" netns (TEST-NET-2) with web servers, a UDP
//! sink and DNS servers that log every query they receive, then run sandboxes under policies
//! and probe them from the guest (python3, which the guest rootfs has; no extra packages):
//!
//! - `an_egress_policy_holds_from_inside_a_guest`: `allow *.wild.test:8080/tcp`; a resolved
//!   name connects; the same address before any resolution does not; a denied name is refused
//!   without any query reaching the upstream; the metadata address fails fast; deny events
//!   arrive; a live policy swap closes the allowed name.
//! - `the_bypass_matrix_from_inside_a_guest`: deliverable 7 of the policy issue from the guest
//!   (see the test's comments for each probe and the deny event it must cause).
//! - `learn_mode_from_inside_a_guest`: a learn-mode sandbox fetches an allowed name and a bare
//!   address; the suggested policy names them and, enforced, still lets them through.
//!
//! The tests share addresses on the host (the veth's 198.51.100.1), so they run one at a time.
#![cfg(all(sandbox_kvm, sandbox_privileged))]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_core::{ExecRequest, FileOptions, NetworkSpec, PolicyDocument, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};
use sandbox_policy::{DefaultAction, DenyEvent, Protocol, Reason, ReservedKind};

/// The tests share the host's end of the "internet" veth; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// A DNS server for the test (`dns.py LOG ADDRESS`): answers A queries for `h<i>.wild.test`
/// with 203.0.113.(1 + i mod 250) (a distinct address per name, served through a local route),
/// for other names under `wild.test` with 198.51.100.2, NXDOMAIN for anything else, and
/// appends every query name it receives to `LOG`.
const DNS_SERVER: &str = r#"
import socket, struct, sys
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], 53))
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
    addr = "198.51.100.2"
    first = labels[0] if labels else ""
    if len(labels) == 3 and first[:1] == "h" and first[1:].isdigit():
        addr = "203.0.113.%d" % (1 + int(first[1:]) % 250)
    flags = 0x8180 if ok else 0x8183
    head = q[:2] + struct.pack(">HHHHH", flags, 1, 1 if ok else 0, 0, 0)
    answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(addr) if ok else b""
    s.sendto(head + question + answer, peer)
"#;

/// A UDP sink (`sink.py LOG PORT`): appends `<source address> <payload>` of every datagram.
const UDP_SINK: &str = r#"
import socket, sys
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    d, peer = s.recvfrom(2048)
    log.write("%s %s\n" % (peer[0], d.decode("ascii", "replace")))
"#;

/// The "internet": a netns on 198.51.100.2/24 behind a veth from the root netns (host end
/// 198.51.100.1), with:
/// - web servers on every address on 8080, 8081 and 80 (198.51.100.2; 169.254.169.254, the
///   metadata address; 192.168.77.1, a private address; 203.0.113.0/24 through a local route),
///   each routed from the root netns through the veth, so only the policy can stop the guest;
/// - the logging DNS server on 198.51.100.2:53 (the runtime's upstream) and a second one on
///   198.51.100.3:53 ("another resolver" that the guest must never reach);
/// - a UDP sink on 8080 that logs what arrives;
/// - in the root netns, a web server on 198.51.100.1:8081 (the host itself).
struct Internet {
    name: String,
    host_if: String,
    children: Vec<std::process::Child>,
    dns_log: PathBuf,
    other_dns_log: PathBuf,
    udp_log: PathBuf,
    _www: tempfile::TempDir,
}

impl Internet {
    fn new() -> Self {
        // Unique per instance: a deleted netns's veth goes away asynchronously, so the next
        // test's names must not depend on it being gone.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pinet-{}-{n}", std::process::id());
        let host_if = format!("vp{}x{n}", std::process::id() % 100_000);
        sh(&format!(
            "ip netns add {name} && ip link add {host_if} type veth peer name eth0 netns {name} && \
             ip addr add 198.51.100.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {name} addr add 198.51.100.2/24 dev eth0 && \
             ip -n {name} addr add 198.51.100.3/32 dev eth0 && \
             ip -n {name} addr add 169.254.169.254/32 dev eth0 && \
             ip -n {name} addr add 192.168.77.1/32 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up && ip -n {name} route add default via 198.51.100.1 && \
             ip -n {name} route add local 203.0.113.0/24 dev lo"
        ));
        // Routes from the root netns (they go with the veth); an existing one is fine.
        for net in ["169.254.169.254/32", "192.168.77.1/32", "203.0.113.0/24"] {
            let _ = Command::new("ip")
                .args(["route", "add", net, "via", "198.51.100.2", "dev", &host_if])
                .status();
        }
        let www = tempfile::tempdir().expect("www");
        std::fs::write(www.path().join("index.html"), "allowed page\n").expect("page");
        std::fs::write(www.path().join("dns.py"), DNS_SERVER).expect("dns server");
        std::fs::write(www.path().join("sink.py"), UDP_SINK).expect("udp sink");
        let log = |file: &str| {
            let p = www.path().join(file);
            std::fs::write(&p, "").expect("log");
            p
        };
        let (dns_log, other_dns_log, udp_log) =
            (log("queries.log"), log("other.log"), log("udp.log"));
        let spawn = |netns: Option<&str>, args: &[&str]| {
            let mut c = match netns {
                Some(n) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", n]).args(args);
                    c
                }
                None => {
                    let mut c = Command::new(args[0]);
                    c.args(&args[1..]);
                    c
                }
            };
            c.current_dir(www.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn a server")
        };
        let path = |p: &PathBuf| p.to_str().expect("utf-8").to_string();
        let dns_path = path(&www.path().join("dns.py"));
        let sink_path = path(&www.path().join("sink.py"));
        let inet = Some(name.as_str());
        let mut children = Vec::new();
        for port in ["8080", "8081", "80"] {
            children.push(spawn(
                inet,
                &["python3", "-m", "http.server", port, "--bind", "0.0.0.0"],
            ));
        }
        children.push(spawn(
            inet,
            &["python3", &dns_path, &path(&dns_log), "198.51.100.2"],
        ));
        children.push(spawn(
            inet,
            &["python3", &dns_path, &path(&other_dns_log), "198.51.100.3"],
        ));
        children.push(spawn(
            inet,
            &["python3", &sink_path, &path(&udp_log), "8080"],
        ));
        children.push(spawn(
            None,
            &[
                "python3",
                "-m",
                "http.server",
                "8081",
                "--bind",
                "198.51.100.1",
            ],
        ));
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = "import socket; [socket.create_connection(a, 1) for a in \
                     [('198.51.100.2', 8080), ('198.51.100.2', 8081), ('169.254.169.254', 80), \
                     ('192.168.77.1', 80), ('203.0.113.9', 8080), ('198.51.100.1', 8081)]]";
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
            host_if,
            children,
            dns_log,
            other_dns_log,
            udp_log,
            _www: www,
        }
    }

    /// Every query name the upstream received, one per line.
    fn queries(&self) -> String {
        std::fs::read_to_string(&self.dns_log).unwrap_or_default()
    }

    /// How many queries for exactly `name` the upstream received.
    fn asked(&self, name: &str) -> usize {
        self.queries().lines().filter(|l| *l == name).count()
    }

    /// Every query name the other resolver received.
    fn other_queries(&self) -> String {
        std::fs::read_to_string(&self.other_dns_log).unwrap_or_default()
    }

    /// Whether a datagram with `tag` reached the UDP sink.
    fn udp_saw(&self, tag: &str) -> bool {
        std::fs::read_to_string(&self.udp_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.ends_with(tag))
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The host end first: deleting it removes both ends (and their routes) before the
        // next test adds 198.51.100.1 again; the netns's own teardown is asynchronous.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
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
    let _serial = SERIAL.lock().await;
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
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            seen.push(e);
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

/// The guest-side probe (`probe.py COMMAND ARGS`), one line of output per run:
/// - `tcp HOST PORT`: `ok <ms>` or `fail <error> errno=<n> <ms>` (a v4-mapped IPv6 literal
///   goes out as IPv4 from an AF_INET6 socket);
/// - `udp HOST PORT TAG`: sends `TAG`, prints `sent`;
/// - `dns SERVER NAME udp|tcp`: a raw A query; `rcode=<n> addrs=<a,b>` or `error ...`;
/// - `spoof SRC DST PORT TAG`: a UDP datagram with source address SRC through a raw socket;
/// - `gateway`: the default gateway, from /proc/net/route;
/// - `loops N PORT`: N times resolve `h<i>.wild.test` (getaddrinfo) and connect at once;
///   `failures=<k> n=<N> secs=<s> first=[...]`;
/// - `prober SECS ALLOWED DENIED`: for SECS seconds, connect to every `host:port` of the
///   comma-separated lists; `probes=<n> breaches=<list|none> allowed_fail=<k>`.
const PROBE: &str = r#"
import socket, struct, sys, time
def ms(t): return "%.0f" % ((time.monotonic() - t) * 1000)
def tcp(host, port, timeout=5):
    t = time.monotonic()
    try:
        c = socket.create_connection((host, int(port)), timeout); c.close()
        return "ok " + ms(t)
    except OSError as e:
        return "fail %s errno=%s %s" % (type(e).__name__, e.errno, ms(t))
def recvn(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k: raise OSError("short read")
        b += k
    return b
def skip_name(r, i):
    while True:
        n = r[i]
        if n == 0: return i + 1
        if n & 0xc0 == 0xc0: return i + 2
        i += 1 + n
def dns(server, name, proto):
    q = struct.pack(">HHHHHH", 4242, 0x0100, 1, 0, 0, 0)
    for l in name.split("."): q += bytes([len(l)]) + l.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    try:
        if proto == "tcp":
            s = socket.create_connection((server, 53), 5); s.settimeout(5)
            s.sendall(struct.pack(">H", len(q)) + q)
            r = recvn(s, struct.unpack(">H", recvn(s, 2))[0])
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
            s.sendto(q, (server, 53)); r = s.recv(1500)
        s.close()
    except OSError as e:
        return "error %s" % e
    i = skip_name(r, 12) + 4
    addrs = []
    for _ in range(struct.unpack(">H", r[6:8])[0]):
        i = skip_name(r, i)
        ty, cl, ttl, rdl = struct.unpack(">HHIH", r[i:i + 10]); i += 10
        if ty == 1 and rdl == 4: addrs.append(socket.inet_ntoa(r[i:i + 4]))
        i += rdl
    return "rcode=%d addrs=%s" % (r[3] & 15, ",".join(addrs))
def spoof(src, dst, port, tag):
    payload = tag.encode()
    udp = struct.pack(">HHHH", 40000, int(port), 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (dst, 0))
    return "sent"
def gateway():
    for l in open("/proc/net/route").read().splitlines()[1:]:
        f = l.split()
        if f[1] == "00000000":
            return socket.inet_ntoa(struct.pack("<L", int(f[2], 16)))
    return "none"
def loops(n, port):
    fails, t = [], time.monotonic()
    for i in range(int(n)):
        try:
            a = socket.getaddrinfo("h%d.wild.test" % i, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4]
            c = socket.create_connection(a, 5); c.close()
        except OSError as e:
            fails.append("%d:%s" % (i, e))
    return "failures=%d n=%s secs=%.1f first=%s" % (len(fails), n, time.monotonic() - t, fails[:3])
def prober(secs, allowed, denied):
    end, probes, breaches, afail, first = time.monotonic() + float(secs), 0, [], 0, []
    t0 = time.monotonic()
    split = lambda hp: (hp.rsplit(":", 1)[0], int(hp.rsplit(":", 1)[1]))
    while time.monotonic() < end:
        for hp in denied.split(","):
            probes += 1
            try:
                c = socket.create_connection(split(hp), 1); c.close(); breaches.append(hp)
            except OSError: pass
        for hp in allowed.split(","):
            try:
                t = time.monotonic(); c = socket.create_connection(split(hp), 5); c.close()
            except OSError as e:
                afail += 1
                if len(first) < 5: first.append("%s@%.1fs+%.2fs:%s" % (hp, t - t0, time.monotonic() - t, e))
    return "probes=%d breaches=%s allowed_fail=%d first=%s" % (probes, ",".join(breaches) or "none", afail, first)
cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "tcp": print(tcp(*args))
elif cmd == "udp":
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(args[2].encode(), (args[0], int(args[1]))); print("sent")
elif cmd == "dns": print(dns(*args))
elif cmd == "spoof": print(spoof(*args))
elif cmd == "gateway": print(gateway())
elif cmd == "loops": print(loops(*args))
elif cmd == "prober": print(prober(*args))
else: print("unknown command")
"#;

/// A runtime for these tests: the guest artifacts from the environment, the "internet"'s DNS
/// server as the policy resolver's upstream.
fn runtime(state: &std::path::Path) -> KvmRuntime {
    KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state)
            .create_deadline(Duration::from_secs(600))
            .policy(
                sandbox_net::PolicyOptions::default()
                    .with_upstream("198.51.100.2:53".parse().expect("addr")),
            )
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new")
}

/// Creates a sandbox under `policy` with [`PROBE`] at /tmp/probe.py.
async fn sandbox_under(rt: &KvmRuntime, policy: &str) -> KvmSandbox {
    let spec = rt
        .spec_builder()
        .memory_mib(256)
        .root(RootMode::Writable)
        .network(NetworkSpec::with_policy(PolicyDocument::toml(policy)))
        .build()
        .expect("spec");
    let sb = rt
        .create_sandbox(spec)
        .await
        .expect("create under a policy");
    sb.write_file("/tmp/probe.py", PROBE.as_bytes(), &FileOptions::new())
        .await
        .expect("write the probe");
    sb
}

/// Runs `probe.py ARGS` in the guest; its output line.
async fn probe(sb: &KvmSandbox, args: &str) -> String {
    // The longest probe (the prober) runs 50 s; a probe still running after 300 s means the
    // guest is stuck: fail with its console rather than wait out the test host's limit.
    let exec = sb.exec(
        ExecRequest::shell(format!("python3 /tmp/probe.py {args}"))
            .timeout(Duration::from_secs(300)),
    );
    let out = match tokio::time::timeout(Duration::from_secs(330), exec).await {
        Ok(Ok(out)) if !out.status.timed_out => out,
        other => panic!(
            "probe `{args}` did not finish ({}); guest console (last 60 lines):\n{}",
            match other {
                Ok(Ok(_)) => "timed out in the guest".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => "no answer from the guest agent".to_string(),
            },
            sb.console_tail(60)
        ),
    };
    format!("{}{}", out.stdout_str(), out.stderr_str())
        .trim()
        .to_string()
}

/// The deny-event stream with what has been read so far.
struct Events {
    rx: tokio::sync::mpsc::Receiver<DenyEvent>,
    seen: Vec<DenyEvent>,
}

impl Events {
    /// Waits (up to 30 s) for an event matching `f`; panics naming `what` and every event seen.
    async fn expect(&mut self, what: &str, f: impl Fn(&DenyEvent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.seen.iter().any(&f) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(e)) => self.seen.push(e),
                _ => panic!("no deny event for {what}; got {:#?}", self.seen),
            }
        }
    }

    /// [`Self::expect`] for a packet denial.
    async fn packet(&mut self, proto: Protocol, dst: &str, port: u16, reason: Reason) {
        let dst: std::net::IpAddr = dst.parse().expect("ip");
        self.expect(&format!("{proto:?} {dst}:{port} {reason:?}"), |e| {
            e.protocol == proto && e.destination == dst && e.port == port && e.reason == reason
        })
        .await;
    }

    /// [`Self::expect`] for a DNS refusal of `name` asked of `dst` over `proto`.
    async fn refused(&mut self, name: &str, proto: Protocol, dst: &str) {
        let dst: std::net::IpAddr = dst.parse().expect("ip");
        self.expect(&format!("{name} asked of {dst} over {proto:?}"), |e| {
            e.name.as_deref() == Some(name)
                && e.protocol == proto
                && e.destination == dst
                && e.port == 53
        })
        .await;
    }
}

fn fails(out: &str, what: &str) {
    assert!(out.starts_with("fail"), "{what} was reached: {out}");
}

/// The matrix's policy (deliverable 7, on the guest's ports): names under `wild.test` on TCP
/// 8080, and `198.51.100.0/25` (which holds the host's own 198.51.100.1) on TCP 8081.
const MATRIX: &str = r#"
default = "deny"
[[allow]]
domain = "*.wild.test"
ports = [8080]
protocol = "tcp"
[[allow]]
cidr = "198.51.100.0/25"
ports = [8081]
protocol = "tcp"
"#;

/// [`MATRIX`] plus a rule that changes nothing the probes see, for swaps.
const MATRIX_B: &str = r#"
default = "deny"
[[allow]]
domain = "*.wild.test"
ports = [8080]
protocol = "tcp"
[[allow]]
cidr = "198.51.100.0/25"
ports = [8081]
protocol = "tcp"
[[allow]]
domain = "*.other.test"
ports = [443]
protocol = "tcp"
"#;

/// Resolve-then-connect loops from the guest. Fewer than the host tier's 1,000: in the nested
/// test host (KVM inside QEMU/TCG) every fresh address costs an `nft` process for its pin batch
/// and every loop a guest DNS round trip, about 0.3–1 s together; 250 names cover every
/// address the test zone hands out (203.0.113.1–250), each pinned before its answer.
const LOOPS: usize = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bypass_matrix_from_inside_a_guest() {
    let _serial = SERIAL.lock().await;
    let netns_before = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    let internet = Internet::new();
    let state = tempfile::Builder::new()
        .prefix("sbx-policy-")
        .tempdir()
        .expect("state");
    let rt = runtime(state.path());
    let sb = sandbox_under(&rt, MATRIX).await;
    let mut ev = Events {
        rx: sb.egress_events().expect("a deny-event stream"),
        seen: Vec::new(),
    };
    let deny = Reason::Default(DefaultAction::Deny);

    // Must pass: resolve then connect (getaddrinfo, then the answered address); the CIDR rule.
    let out = probe(&sb, "dns 198.51.100.2 a.wild.test udp").await;
    assert_eq!(out, "rcode=0 addrs=198.51.100.2", "{out}");
    let out = probe(&sb, "tcp a.wild.test 8080").await;
    assert!(out.starts_with("ok"), "{out}");
    let out = probe(&sb, "tcp 198.51.100.2 8081").await;
    assert!(out.starts_with("ok"), "the CIDR rule: {out}");

    // The address of an allowed name before resolving it (h6.wild.test → 203.0.113.7).
    fails(
        &probe(&sb, "tcp 203.0.113.7 8080").await,
        "an unresolved address",
    );
    ev.packet(Protocol::Tcp, "203.0.113.7", 8080, deny).await;
    // A resolved name on another port (a server listens there).
    fails(
        &probe(&sb, "tcp 198.51.100.2 80").await,
        "port 80 of a pinned address",
    );
    ev.packet(Protocol::Tcp, "198.51.100.2", 80, deny).await;
    // UDP to the allowed TCP port of the pinned address: never arrives.
    assert_eq!(probe(&sb, "udp 198.51.100.2 8080 udp-8080").await, "sent");
    ev.packet(Protocol::Udp, "198.51.100.2", 8080, deny).await;
    assert!(!internet.udp_saw("udp-8080"), "UDP 8080 arrived");

    // The apex is not under the wildcard: REFUSED, never asked upstream.
    let out = probe(&sb, "dns 198.51.100.2 wild.test udp").await;
    assert_eq!(out, "rcode=5 addrs=", "{out}");
    ev.refused("wild.test", Protocol::Udp, "198.51.100.2").await;
    // denied.test by name (the guest's resolver), to another resolver's address (redirected
    // to ours: the other resolver never sees a query), and over TCP to ours.
    let out = sb
        .exec(ExecRequest::shell(
            "getent hosts denied.test || echo unresolved",
        ))
        .await
        .expect("exec");
    assert!(out.stdout_str().contains("unresolved"), "{out:?}");
    let out = probe(&sb, "dns 198.51.100.3 denied.test udp").await;
    assert_eq!(out, "rcode=5 addrs=", "{out}");
    ev.refused("denied.test", Protocol::Udp, "198.51.100.3")
        .await;
    let gw = probe(&sb, "gateway").await;
    assert!(gw.parse::<std::net::Ipv4Addr>().is_ok(), "gateway: {gw}");
    let out = probe(&sb, &format!("dns {gw} denied.test tcp")).await;
    assert_eq!(out, "rcode=5 addrs=", "DNS over TCP: {out}");
    ev.refused("denied.test", Protocol::Tcp, &gw).await;
    // An allowed name asked of the other resolver is answered by ours, never by it.
    let out = probe(&sb, "dns 198.51.100.3 b.wild.test udp").await;
    assert_eq!(out, "rcode=0 addrs=198.51.100.2", "{out}");
    assert_eq!(internet.asked("denied.test"), 0, "{}", internet.queries());
    assert_eq!(internet.asked("wild.test"), 0, "{}", internet.queries());
    assert_eq!(internet.asked("b.wild.test"), 1, "{}", internet.queries());
    assert_eq!(
        internet.other_queries(),
        "",
        "the other resolver was reached"
    );

    // Metadata, also as an IPv4-mapped IPv6 literal; a private address; the host's addresses
    // (198.51.100.1 inside the allowed /25 on the allowed port; the gateway).
    fails(&probe(&sb, "tcp 169.254.169.254 80").await, "metadata");
    let metadata = Reason::Reserved(ReservedKind::Metadata);
    ev.packet(Protocol::Tcp, "169.254.169.254", 80, metadata)
        .await;
    let out = probe(&sb, "tcp ::ffff:169.254.169.254 8080").await;
    fails(&out, "::ffff:169.254.169.254");
    if out.contains("errno=97") {
        // EAFNOSUPPORT: a guest kernel without IPv6 cannot even try.
        eprintln!("the guest has no IPv6 sockets: {out}");
    } else {
        ev.packet(Protocol::Tcp, "169.254.169.254", 8080, metadata)
            .await;
    }
    fails(
        &probe(&sb, "tcp 192.168.77.1 80").await,
        "a private address",
    );
    ev.expect("192.168.77.1", |e| {
        e.destination == std::net::IpAddr::from([192, 168, 77, 1])
            && matches!(e.reason, Reason::Reserved(_))
    })
    .await;
    fails(&probe(&sb, "tcp 198.51.100.1 8081").await, "the host");
    ev.packet(
        Protocol::Tcp,
        "198.51.100.1",
        8081,
        Reason::Reserved(ReservedKind::Host),
    )
    .await;
    fails(&probe(&sb, &format!("tcp {gw} 22")).await, "the gateway");
    ev.packet(Protocol::Tcp, &gw, 22, Reason::Gateway).await;
    // IPv6: the guest has no IPv6 path; it fails at once, before any packet (no event).
    for a in ["2001:db8::2 8080", "64:ff9b::a9fe:a9fe 80"] {
        fails(&probe(&sb, &format!("tcp {a}")).await, a);
    }
    // A spoofed source address (a raw socket): dropped and reported.
    assert_eq!(
        probe(&sb, "spoof 10.99.0.1 198.51.100.2 8080 spoofed-8080").await,
        "sent"
    );
    ev.packet(Protocol::Udp, "198.51.100.2", 8080, Reason::Spoofed)
        .await;
    assert!(
        !internet.udp_saw("spoofed-8080"),
        "the spoofed datagram arrived"
    );

    // Resolve-then-connect at once, LOOPS times, each name a fresh address.
    let out = probe(&sb, &format!("loops {LOOPS} 8080")).await;
    assert!(out.starts_with("failures=0 "), "{out}");
    eprintln!("policy matrix: {out}; {:?}", sb.egress_stats());
    let stats = sb.egress_stats().expect("stats");
    assert_eq!(stats.upstream_failures, 0, "{stats:?}");

    // A policy swap during traffic: 20 swaps while the guest probes five denied destinations
    // and two allowed ones; no denied connection gets through, no allowed one fails.
    // Refresh a.wild.test's pin (the loops took minutes): the allowed probe needs it. The pin
    // lasts the answer's TTL (60 s), so the prober stops before (50 s); the 20 swaps take about
    // 1-3 s each under nested emulation and must all happen while it runs (one CI run with
    // 300 ms between swaps and a 45 s prober ended its swaps 0.7 s too late).
    let out = probe(&sb, "dns 198.51.100.2 a.wild.test udp").await;
    assert_eq!(out, "rcode=0 addrs=198.51.100.2", "{out}");
    let prober = probe(
        &sb,
        "prober 50 198.51.100.2:8080,198.51.100.2:8081 \
         203.0.113.251:8080,169.254.169.254:80,198.51.100.2:80,192.168.77.1:80,198.51.100.1:8081",
    );
    let swaps = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        for i in 0..20 {
            let doc = PolicyDocument::toml(if i % 2 == 0 { MATRIX_B } else { MATRIX });
            let t = Instant::now();
            sb.replace_egress_policy(&doc).await.expect("swap");
            eprintln!(
                "swap {i}: {:.1}s after the first, took {} ms",
                (t - t0).as_secs_f64() + 5.0,
                t.elapsed().as_millis()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instant::now()
    };
    let (out, swapped_at) = tokio::join!(
        async {
            let out = prober.await;
            (out, Instant::now())
        },
        swaps
    );
    let (out, probed_until) = out;
    assert!(
        swapped_at < probed_until,
        "the swaps outlasted the prober (slow host?): {out}"
    );
    // No denied probe ever gets through. Allowed ones may be refused for a moment during a
    // swap (docs/policy.md, "Known limits": seen for a pinned address in the nested test host,
    // about one swap in four; never for a CIDR rule's address, never in the host tier), so
    // they are counted and printed, and more than one per swap fails the test.
    assert!(
        out.contains("breaches=none ") && !out.starts_with("probes=0 "),
        "{out}"
    );
    let allowed_fail: u32 = out
        .split("allowed_fail=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the prober's allowed_fail count");
    eprintln!("policy matrix: swaps during traffic: {out}");
    assert!(allowed_fail <= 20, "{out}");
    ev.packet(Protocol::Tcp, "203.0.113.251", 8080, deny).await;

    sb.destroy().await.expect("destroy");
    drop(rt);
    drop(internet);
    let netns_after = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    assert_eq!(netns_after, netns_before, "a sandbox netns was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learn_mode_from_inside_a_guest() {
    let _serial = SERIAL.lock().await;
    let netns_before = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    let internet = Internet::new();
    let state = tempfile::Builder::new()
        .prefix("sbx-policy-")
        .tempdir()
        .expect("state");
    let rt = runtime(state.path());
    let sb = sandbox_under(&rt, "default = \"learn\"\n").await;

    // An allowed name (through the guest's own resolver) and a bare address both pass.
    let out = sb
        .exec(ExecRequest::shell(fetch(
            "http://a.wild.test:8080/index.html",
        )))
        .await
        .expect("exec");
    assert!(out.stdout_str().starts_with("ok allowed page"), "{out:?}");
    // An address no name answered with (an address a name resolved to would be recorded
    // under that name: the packet alone cannot tell).
    let out = probe(&sb, "tcp 203.0.113.9 8080").await;
    assert!(out.starts_with("ok"), "{out}");
    assert!(internet.asked("a.wild.test") >= 1, "{}", internet.queries());

    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = sb.learned_egress().expect("a sandbox with a policy");
        if log.flows().count() >= 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut flows: Vec<String> = log
        .flows()
        .map(|f| {
            format!(
                "{} {:?} {}:{}",
                f.name.as_deref().unwrap_or("-"),
                f.protocol,
                f.destination,
                f.port
            )
        })
        .collect();
    flows.sort();
    assert_eq!(
        flows,
        [
            "- Tcp 203.0.113.9:8080",
            "a.wild.test Tcp 198.51.100.2:8080"
        ],
        "the record: {flows:?}"
    );
    let text = sb.learned_policy().expect("a suggestion");
    assert!(
        text.contains("domain = \"a.wild.test\"\nports = [8080]\nprotocol = \"tcp\""),
        "{text}"
    );
    assert!(
        text.contains("cidr = \"203.0.113.9/32\"\nports = [8080]"),
        "{text}"
    );
    let suggested = sandbox_policy::Policy::from_toml(&text).expect("the suggestion parses");
    assert_eq!(suggested.default_action(), DefaultAction::Deny);

    // Enforced, the suggestion allows what was used and refuses the rest.
    sb.replace_egress_policy(&PolicyDocument::toml(&text))
        .await
        .expect("enforce the suggestion");
    let mut ev = Events {
        rx: sb.egress_events().expect("a deny-event stream"),
        seen: Vec::new(),
    };
    let out = sb
        .exec(ExecRequest::shell(fetch(
            "http://a.wild.test:8080/index.html",
        )))
        .await
        .expect("exec");
    assert!(out.stdout_str().starts_with("ok allowed page"), "{out:?}");
    let out = probe(&sb, "tcp 203.0.113.9 8080").await;
    assert!(out.starts_with("ok"), "the learned address: {out}");
    fails(
        &probe(&sb, "tcp 198.51.100.2 80").await,
        "an unlearned port",
    );
    ev.packet(
        Protocol::Tcp,
        "198.51.100.2",
        80,
        Reason::Default(DefaultAction::Deny),
    )
    .await;
    let out = probe(&sb, "dns 198.51.100.2 b.wild.test udp").await;
    assert_eq!(out, "rcode=5 addrs=", "an unlearned name: {out}");

    sb.destroy().await.expect("destroy");
    drop(rt);
    drop(internet);
    let netns_after = sh("ip netns list 2>/dev/null | grep '^sbxnet-' || true");
    assert_eq!(netns_after, netns_before, "a sandbox netns was left behind");
}
