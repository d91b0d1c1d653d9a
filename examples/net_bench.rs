//! What a sandbox network costs (docs/bench.md, `cargo xtask bench net`; the latest results are
//! in docs/SPEC.md), each next to the same thing without a VM, in one run:
//!
//! 1. Throughput, guest → a TCP sink in an "internet" netns (a veth from the root netns, TEST-NET-2
//!    as in `crates/sandbox-kvm/tests/network.rs`): a python3 sender in the guest writes N MiB,
//!    half-closes and waits for the sink's byte count; MiB/s from the sender's clock. The same
//!    sender and sink between the root netns and the "internet" netns (veth, no VM).
//! 2. Exposed-port round trip: 8 bytes out, 8 bytes back to an echo server in the guest through
//!    `KvmSandbox::expose`, on a new connection each time (what an HTTP/1.0 preview does) and on
//!    one open connection; the same against the echo server in the "internet" netns.
//! 3. The create time a network adds: `create()` → first `exec(true)` answered without a network,
//!    with one (egress allowed) and with one (egress denied); the kinds alternate, rotated every
//!    round; one warm-up round is not counted.
//! 4. An egress policy's cost, side by side in one run: a sandbox under a policy
//!    (`*.bench.test` and the echo server's address on its port) against one with egress
//!    allowed and no policy. In the guest, a python3 client times N TCP connects to the echo
//!    server (the handshake: the policy's table sees the first packet), and N "resolve a fresh
//!    name, then connect" loops (a raw DNS query to the "internet" netns's DNS server, which
//!    the policy redirects through the host resolver and its pin batch, then a connect to the
//!    answered address). And, measured by the host resolver, the time from an upstream answer's
//!    arrival to the kernel's acknowledgement of its pin batch (`egress_pin_latencies`).
//!
//! Usage: `net_bench [--mib N] [--transfers N] [--requests N] [--rounds N] [--results FILE]`
//! (defaults 32, 3, 50, 5; results file `$SANDBOX_SCRATCH/net.md` when that is set). Needs root
//! (netns, veth), python3 on the host and in the guest, and `SANDBOX_KERNEL`, `SANDBOX_ROOTFS`,
//! `SANDBOX_VMM`; run it with `cargo xtask bench net` (or `cargo xtask run --example net_bench`).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sandbox_core::{ExecRequest, FileOptions, NetworkSpec, PolicyDocument, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig, KvmSandbox};

/// Guest memory of every sandbox, MiB.
const MEMORY_MIB: u32 = 256;
/// The "internet" netns's address (TEST-NET-2) and the root netns's end of its veth.
const INET_ADDR: &str = "198.51.100.2";
const INET_HOST_ADDR: &str = "198.51.100.1/24";
const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 9100;
/// Unmeasured round trips before the measured ones.
const WARMUPS: usize = 5;
const DNS_PORT: u16 = 53;

/// The policy of part 4: names under `bench.test` and the echo server's own address, on the
/// echo port only.
fn bench_policy() -> String {
    format!(
        "default = \"deny\"\n\
         [[allow]]\ndomain = \"*.bench.test\"\nports = [{ECHO_PORT}]\nprotocol = \"tcp\"\n\
         [[allow]]\ncidr = \"{INET_ADDR}/32\"\nports = [{ECHO_PORT}]\nprotocol = \"tcp\"\n"
    )
}

/// The "internet" DNS server: `n<i>.bench.test` (A) → 198.51.100.(128 + i mod 120), a
/// distinct address per name up to 120 names (served through a local route), so every answer
/// needs a fresh pin; anything else NXDOMAIN.
const DNS_PY: &str = r#"import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, peer = s.recvfrom(512)
    if len(q) < 12: continue
    i, labels = 12, []
    while i < len(q) and q[i] != 0:
        n = q[i]; labels.append(q[i + 1:i + 1 + n].decode("ascii", "replace")); i += 1 + n
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0] if i + 3 <= len(q) else 0
    ok = len(labels) == 3 and labels[1:] == ["bench", "test"] and labels[0][:1] == "n"         and labels[0][1:].isdigit() and qtype == 1
    head = q[:2] + struct.pack(">HHHHH", 0x8180 if ok else 0x8183, 1, 1 if ok else 0, 0, 0)
    ans = b""
    if ok:
        addr = "198.51.100.%d" % (128 + int(labels[0][1:]) % 120)
        ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(addr)
    s.sendto(head + q[12:i + 5] + ans, peer)
"#;

/// The guest's client of part 4: `conn.py connect|resolve HOST PORT N WARMUPS`; prints the
/// measured times in ms, comma-separated. `connect`: a TCP connect to HOST:PORT, closed.
/// `resolve`: an A query for a fresh `n<i>.bench.test` sent to HOST:53, then a connect to the
/// answered address on PORT.
const CONN_PY: &str = r#"import socket, struct, sys, time
mode, host, port, n, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def query(name):
    q = struct.pack(">HHHHHH", 4242, 0x0100, 1, 0, 0, 0)
    for l in name.split("."): q += bytes([len(l)]) + l.encode()
    q += b"\x00" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(q, (host, 53)); r = s.recv(512); s.close()
    assert r[:2] == q[:2] and struct.unpack(">H", r[6:8])[0] >= 1, r
    return socket.inet_ntoa(r[-4:])
out = []
for i in range(warm + n):
    t = time.monotonic()
    dst = host if mode == "connect" else query("n%d.bench.test" % i)
    c = socket.create_connection((dst, port), 10)
    took = (time.monotonic() - t) * 1000
    c.close()
    if i >= warm: out.append("%.3f" % took)
print(",".join(out))
"#;

/// The TCP sink: per connection, reads to EOF, answers the byte count, closes.
const SINK_PY: &str = r#"import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
buf = bytearray(1 << 20)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        k = c.recv_into(buf)
        if not k: break
        n += k
    c.sendall(str(n).encode()); c.close()
"#;

/// The sender: `send.py HOST PORT MIB`; prints the seconds from connect to the sink's answer.
const SEND_PY: &str = r#"import socket, sys, time
host, port, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = b"\0" * (1 << 20)
s = socket.create_connection((host, port), 10)
t = time.monotonic()
for _ in range(mib): s.sendall(buf)
s.shutdown(socket.SHUT_WR)
got = int(s.recv(64))
took = time.monotonic() - t
assert got == mib << 20, (got, mib)
print(took)
"#;

/// The echo server: per connection, sends back what it reads until EOF.
const ECHO_PY: &str = r#"import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(64)
        if not d: break
        c.sendall(d)
    c.close()
"#;

struct Args {
    mib: u32,
    transfers: usize,
    requests: usize,
    rounds: usize,
    results: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        mib: 32,
        transfers: 3,
        requests: 50,
        rounds: 5,
        results: std::env::var_os("SANDBOX_SCRATCH").map(|d| PathBuf::from(d).join("net.md")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--mib" => args.mib = value()?.parse().context("--mib")?,
            "--transfers" => args.transfers = value()?.parse().context("--transfers")?,
            "--requests" => args.requests = value()?.parse().context("--requests")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--results" => args.results = Some(value()?.into()),
            _ => bail!(
                "unknown argument {flag:?}; usage: net_bench [--mib N] [--transfers N] \
                 [--requests N] [--rounds N] [--results FILE]"
            ),
        }
    }
    if args.mib == 0 || args.transfers == 0 || args.requests == 0 || args.rounds == 0 {
        bail!("--mib, --transfers, --requests and --rounds must be at least 1");
    }
    Ok(args)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sorted samples: median (the upper one of an even count), p90, min, max.
struct Stats {
    sorted: Vec<f64>,
}

impl Stats {
    fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self { sorted: v }
    }
    fn at(&self, q: f64) -> f64 {
        let last = self.sorted.len().saturating_sub(1);
        let i = ((last as f64) * q).round() as usize;
        self.sorted.get(i.min(last)).copied().unwrap_or_default()
    }
    fn median(&self) -> f64 {
        self.sorted
            .get(self.sorted.len() / 2)
            .copied()
            .unwrap_or_default()
    }
    fn min(&self) -> f64 {
        self.sorted.first().copied().unwrap_or_default()
    }
    fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or_default()
    }
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The "internet" netns with a sink and an echo server on [`INET_ADDR`]; deleted on drop.
struct Internet {
    name: String,
    servers: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Internet {
    fn new() -> Result<Self> {
        let name = format!("inet-bench-{}", std::process::id());
        let host_if = format!("vb{}", std::process::id() % 100_000);
        sh(&format!(
            "ip netns add {name} && ip link add {host_if} type veth peer name eth0 netns {name} && \
             ip addr add {INET_HOST_ADDR} dev {host_if} && ip link set {host_if} up && \
             ip -n {name} addr add {INET_ADDR}/24 dev eth0 && ip -n {name} link set eth0 up && \
             ip -n {name} link set lo up && ip -n {name} route add default via 198.51.100.1 && \
             ip -n {name} route add local 198.51.100.128/25 dev lo"
        ))?;
        let dir = tempfile::Builder::new().prefix("sbx-netbench-").tempdir()?;
        let mut me = Internet {
            name,
            servers: Vec::new(),
            dir,
        };
        for (file, text) in [
            ("sink.py", SINK_PY),
            ("send.py", SEND_PY),
            ("echo.py", ECHO_PY),
            ("dns.py", DNS_PY),
        ] {
            fs::write(me.dir.path().join(file), text)?;
        }
        let dns = Command::new("ip")
            .args(["netns", "exec", &me.name, "python3"])
            .arg(me.dir.path().join("dns.py"))
            .arg(INET_ADDR)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the DNS server in the internet netns")?;
        me.servers.push(dns);
        for (file, port) in [("sink.py", SINK_PORT), ("echo.py", ECHO_PORT)] {
            let child = Command::new("ip")
                .args(["netns", "exec", &me.name, "python3"])
                .arg(me.dir.path().join(file))
                .arg(port.to_string())
                .stdout(Stdio::null())
                .spawn()
                .context("starting a server in the internet netns")?;
            me.servers.push(child);
            let addr: SocketAddr = format!("{INET_ADDR}:{port}").parse()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
                ensure!(Instant::now() < deadline, "{file} did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(me)
    }

    /// One transfer of `mib` MiB from the root netns to the sink; seconds by the sender.
    fn send_from_host(&self, mib: u32) -> Result<f64> {
        let out = Command::new("python3")
            .arg(self.dir.path().join("send.py"))
            .args([INET_ADDR, &SINK_PORT.to_string(), &mib.to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "send.py on the host: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `n` round trips of 8 bytes to `addr`: each on a new connection, or all on one; milliseconds.
fn round_trips(addr: SocketAddr, n: usize, new_connection: bool) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(n);
    let mut open: Option<TcpStream> = None;
    let connect = || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    };
    for i in 0..WARMUPS + n {
        let t = Instant::now();
        let mut fresh;
        let s = if new_connection {
            fresh = connect().with_context(|| format!("connect #{i} to {addr}"))?;
            &mut fresh
        } else {
            if open.is_none() {
                open = Some(connect()?);
            }
            open.as_mut().context("connection")?
        };
        s.write_all(b"ping1234")
            .with_context(|| format!("write #{i} to {addr}"))?;
        let mut back = [0u8; 8];
        s.read_exact(&mut back)
            .with_context(|| format!("read #{i} from {addr}"))?;
        let took = t.elapsed();
        ensure!(&back == b"ping1234", "the echo answered {back:?}");
        if i >= WARMUPS {
            times.push(ms(took));
        }
    }
    Ok(times)
}

/// Writes a script into the guest and starts it in the background on `port`, waiting until it
/// accepts connections.
async fn start_in_guest(sb: &KvmSandbox, file: &str, text: &str, port: u16) -> Result<()> {
    sb.write_file(
        &format!("/tmp/{file}"),
        text.as_bytes(),
        &FileOptions::new(),
    )
    .await?;
    let out = sb
        .exec(ExecRequest::shell(format!(
            "nohup python3 /tmp/{file} {port} >/tmp/{file}.log 2>&1 </dev/null &"
        )))
        .await?;
    ensure!(out.status.success(), "starting {file}: {out:?}");
    let probe =
        format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 1)\"");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !sb.exec(ExecRequest::shell(&probe)).await?.status.success() {
        ensure!(
            Instant::now() < deadline,
            "{file} did not start in the guest"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Creates a sandbox with `network`, runs `true` once, destroys it; create → exec answered.
async fn create_and_exec(rt: &KvmRuntime, network: Option<NetworkSpec>) -> Result<Duration> {
    let mut b = rt
        .spec_builder()
        .memory_mib(MEMORY_MIB)
        .root(RootMode::Writable);
    if let Some(n) = network {
        b = b.network(n);
    }
    let spec = b.build()?;
    let t = Instant::now();
    let sb = rt.create_sandbox(spec).await?;
    let out = sb.exec(ExecRequest::new(["true"])).await;
    let total = t.elapsed();
    sb.destroy().await?;
    ensure!(out?.status.success(), "`true` in the guest failed");
    Ok(total)
}

/// Part 4's samples, milliseconds: `[no policy, policy]` for connects and for resolve +
/// connect, and the host resolver's answer → pin-batch times.
struct PolicyCost {
    connect: [Vec<f64>; 2],
    resolve: [Vec<f64>; 2],
    pin: Vec<f64>,
}

impl PolicyCost {
    /// The report's part 4 (markdown).
    fn report(&self, requests: usize) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "\n**Egress policy against no policy** (one sandbox under a policy allowing \
             `*.bench.test` and the echo server's address on its port, one with egress allowed \
             and no policy, same run; {requests} measurements each after {WARMUPS} warm-ups, by \
             a python3 client in the guest):\n"
        );
        md.push_str(
            "| | no policy: median | policy: median | policy p90 | policy / no policy |\n\
             |---|---:|---:|---:|---:|\n",
        );
        for (what, v) in [
            ("TCP connect (handshake)", &self.connect),
            ("DNS query for a fresh name + connect", &self.resolve),
        ] {
            let (a, b) = (Stats::new(v[0].clone()), Stats::new(v[1].clone()));
            let _ = writeln!(
                md,
                "| {what} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} |",
                a.median(),
                b.median(),
                b.at(0.9),
                b.median() / a.median()
            );
        }
        let p = Stats::new(self.pin.clone());
        let _ = writeln!(
            md,
            "\nWithout a policy the query goes straight to the DNS server; with one it is \
             redirected to the host resolver, forwarded upstream, and answered only after its \
             address is in the pin set. **DNS answer → set entry** (host resolver: upstream \
             answer received → `nft` batch acknowledged; {} samples): median {:.2} ms, p90 \
             {:.2} ms, {:.2} – {:.2} ms.",
            p.sorted.len(),
            p.median(),
            p.at(0.9),
            p.min(),
            p.max()
        );
        md
    }
}

/// Runs `conn.py` in `sb`; the measured times.
async fn guest_times(sb: &KvmSandbox, mode: &str, host: &str, n: usize) -> Result<Vec<f64>> {
    let out = sb
        .exec(
            ExecRequest::shell(format!(
                "python3 /tmp/conn.py {mode} {host} {ECHO_PORT} {n} {WARMUPS}"
            ))
            .timeout(Duration::from_secs(1800)),
        )
        .await?;
    ensure!(out.status.success(), "conn.py {mode} in the guest: {out:?}");
    parse_times(&out.stdout_str())
}

/// `conn.py`'s output: comma-separated milliseconds.
fn parse_times(line: &str) -> Result<Vec<f64>> {
    line.trim()
        .split(',')
        .map(|t| t.parse::<f64>().with_context(|| format!("a time {t:?}")))
        .collect()
}

/// Part 4: a sandbox without a policy and one with, measured alternately.
async fn policy_cost(rt: &KvmRuntime, n: usize) -> Result<PolicyCost> {
    let spec = |net| {
        rt.spec_builder()
            .memory_mib(MEMORY_MIB)
            .root(RootMode::Writable)
            .network(net)
            .build()
    };
    let open = rt
        .create_sandbox(spec(NetworkSpec::allow_egress())?)
        .await?;
    let guarded = match rt
        .create_sandbox(spec(NetworkSpec::with_policy(PolicyDocument::toml(
            bench_policy(),
        )))?)
        .await
    {
        Ok(sb) => sb,
        Err(e) => {
            open.destroy().await?;
            return Err(e.into());
        }
    };
    let measured: Result<PolicyCost> = async {
        let both = [&open, &guarded];
        for sb in both {
            sb.write_file("/tmp/conn.py", CONN_PY.as_bytes(), &FileOptions::new())
                .await?;
        }
        let mut cost = PolicyCost {
            connect: [Vec::new(), Vec::new()],
            resolve: [Vec::new(), Vec::new()],
            pin: Vec::new(),
        };
        for (i, sb) in both.iter().enumerate() {
            cost.connect[i] = guest_times(sb, "connect", INET_ADDR, n).await?;
        }
        for (i, sb) in both.iter().enumerate().rev() {
            cost.resolve[i] = guest_times(sb, "resolve", INET_ADDR, n).await?;
        }
        cost.pin = guarded.egress_pin_latencies().into_iter().map(ms).collect();
        ensure!(!cost.pin.is_empty(), "the policy's resolver pinned nothing");
        println!(
            "net_bench: policy: {:?}",
            guarded.egress_stats().context("the sandbox has a policy")?
        );
        Ok(cost)
    }
    .await;
    open.destroy().await?;
    guarded.destroy().await?;
    measured
}

/// Where this runs, for the report (as in `create_bench`).
fn machine_note() -> String {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let place = if cmdline.contains("sandbox_scratch=") {
        "in the nested test host (KVM inside QEMU/TCG with emulated SVM; times are many times \
         those on bare metal)"
    } else {
        "directly on this machine's /dev/kvm"
    };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{place}: Linux {}, {} CPUs",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let machine = machine_note();
    println!("net_bench: {machine}");
    let work = tempfile::Builder::new().prefix("sbx-net-").tempdir()?;
    let rt = KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .state_dir(work.path())
            .create_deadline(Duration::from_secs(300))
            .policy(
                sandbox_net::PolicyOptions::default()
                    .with_upstream(SocketAddr::new(INET_ADDR.parse()?, DNS_PORT)),
            )
            .build()?,
    )?;
    let internet = Internet::new()?;

    // 1 + 2 in one sandbox with egress.
    let spec = rt
        .spec_builder()
        .memory_mib(MEMORY_MIB)
        .root(RootMode::Writable)
        .network(NetworkSpec::allow_egress())
        .build()?;
    let sb = rt.create_sandbox(spec).await?;
    let measured: Result<_> = async {
        sb.write_file("/tmp/send.py", SEND_PY.as_bytes(), &FileOptions::new())
            .await?;
        let (mut guest_tp, mut host_tp) = (Vec::new(), Vec::new());
        // One unmeasured transfer each way first, then alternating.
        for i in 0..=args.transfers {
            let out = sb
                .exec(
                    ExecRequest::shell(format!(
                        "python3 /tmp/send.py {INET_ADDR} {SINK_PORT} {}",
                        args.mib
                    ))
                    .timeout(Duration::from_secs(1800)),
                )
                .await?;
            ensure!(out.status.success(), "send.py in the guest: {out:?}");
            let g: f64 = out.stdout_str().trim().parse()?;
            let h = internet.send_from_host(args.mib)?;
            let (g, h) = (f64::from(args.mib) / g, f64::from(args.mib) / h);
            println!("net_bench: transfer {i}: guest {g:.1} MiB/s, host netns {h:.1} MiB/s");
            if i > 0 {
                guest_tp.push(g);
                host_tp.push(h);
            }
        }
        start_in_guest(&sb, "echo.py", ECHO_PY, ECHO_PORT).await?;
        let exposed = sb.expose(ECHO_PORT).await?;
        let inet: SocketAddr = format!("{INET_ADDR}:{ECHO_PORT}").parse()?;
        let n = args.requests;
        let rtts = tokio::task::spawn_blocking(move || -> Result<_> {
            Ok([
                round_trips(exposed, n, true)?,
                round_trips(inet, n, true)?,
                round_trips(exposed, n, false)?,
                round_trips(inet, n, false)?,
            ])
        })
        .await??;
        Ok((guest_tp, host_tp, rtts))
    }
    .await;
    sb.destroy().await?;
    let (guest_tp, host_tp, rtts) = measured?;

    // 4. Policy against no policy, the two sandboxes alternating per measurement.
    let policy = policy_cost(&rt, args.requests).await?;
    drop(internet);

    // 3. Alternating creates.
    let kinds: [(&str, Option<NetworkSpec>); 3] = [
        ("no network", None),
        ("network, egress allowed", Some(NetworkSpec::allow_egress())),
        ("network, egress denied", Some(NetworkSpec::deny_egress())),
    ];
    let mut creates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..=args.rounds {
        for k in 0..kinds.len() {
            let i = (round + k) % kinds.len();
            let took = create_and_exec(&rt, kinds[i].1.clone())
                .await
                .with_context(|| format!("round {round}, {}", kinds[i].0))?;
            println!(
                "net_bench: round {round}{} {:<26} create → exec {:>8.1} ms",
                if round == 0 { " (warm-up)" } else { "" },
                kinds[i].0,
                ms(took)
            );
            if round > 0 {
                creates[i].push(ms(took));
            }
        }
    }

    // The report.
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Where: {machine}. Builds: this program {}.\n",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let (g, h) = (Stats::new(guest_tp), Stats::new(host_tp));
    let _ = writeln!(
        md,
        "**Throughput, guest → a TCP sink in another netns** ({} MiB per transfer, {} transfers \
         after 1 warm-up, alternating; python3 sender and sink; MiB/s by the sender's clock from \
         connect to the sink's byte count):\n",
        args.mib, args.transfers
    );
    md.push_str("| path | median | min – max |\n|---|---:|---:|\n");
    for (what, s) in [
        ("guest (virtio-net, tap, sandbox netns, routed)", &g),
        ("root netns → netns (veth, no VM)", &h),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {:.1} MiB/s | {:.1} – {:.1} MiB/s |",
            s.median(),
            s.min(),
            s.max()
        );
    }
    let _ = writeln!(
        md,
        "\nRatio of the medians: guest / no VM = {:.3} (no VM is {:.0} times faster).\n",
        g.median() / h.median(),
        h.median() / g.median()
    );
    let _ = writeln!(
        md,
        "**Round trip, 8 bytes out and back** ({} after {WARMUPS} warm-ups; a python3 echo \
         server in the guest reached through `expose`, against the same server in a netns \
         reached over a veth):\n",
        args.requests
    );
    md.push_str("| | median | p90 | min – max |\n|---|---:|---:|---:|\n");
    let rows = [
        ("exposed port, new connection each", &rtts[0]),
        ("host netns, new connection each", &rtts[1]),
        ("exposed port, one open connection", &rtts[2]),
        ("host netns, one open connection", &rtts[3]),
    ];
    let stats: Vec<Stats> = rows.iter().map(|(_, v)| Stats::new(v.to_vec())).collect();
    for ((what, _), s) in rows.iter().zip(&stats) {
        let _ = writeln!(
            md,
            "| {what} | {:.2} ms | {:.2} ms | {:.2} – {:.2} ms |",
            s.median(),
            s.at(0.9),
            s.min(),
            s.max()
        );
    }
    let _ = writeln!(
        md,
        "\nRatios of the medians, exposed / host netns: new connection {:.1}, open connection \
         {:.1}.\n",
        stats[0].median() / stats[1].median(),
        stats[2].median() / stats[3].median()
    );
    let _ = writeln!(
        md,
        "**create → first exec with and without a network** (writable root, {MEMORY_MIB} MiB \
         guest; {} rounds after 1 warm-up, the kinds alternating):\n",
        args.rounds
    );
    md.push_str("| sandbox | median | min – max | extra over no network |\n|---|---:|---:|---:|\n");
    let c: Vec<Stats> = creates.into_iter().map(Stats::new).collect();
    for ((what, _), s) in kinds.iter().zip(&c) {
        let _ = writeln!(
            md,
            "| {what} | {:.0} ms | {:.0} – {:.0} ms | {:+.0} ms |",
            s.median(),
            s.min(),
            s.max(),
            s.median() - c[0].median()
        );
    }
    md.push_str(&policy.report(args.requests));
    println!("\n{md}");
    if let Some(path) = &args.results {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("net_bench: summary written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_rows_side_by_side_with_ratios() {
        let cost = PolicyCost {
            connect: [vec![1.0, 2.0, 3.0], vec![2.0, 4.0, 6.0]],
            resolve: [vec![10.0, 10.0], vec![15.0, 30.0]],
            pin: vec![1.5, 0.5, 2.5],
        };
        let md = cost.report(3);
        assert!(md.contains("3 measurements each after 5 warm-ups"), "{md}");
        assert!(
            md.contains("| TCP connect (handshake) | 2.00 ms | 4.00 ms | 6.00 ms | 2.00 |\n"),
            "{md}"
        );
        assert!(
            md.contains(
                "| DNS query for a fresh name + connect | 10.00 ms | 30.00 ms | 30.00 ms | 3.00 |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("3 samples): median 1.50 ms, p90 2.50 ms, 0.50 – 2.50 ms."),
            "{md}"
        );
    }

    #[test]
    fn guest_times_parse_and_reject_garbage() {
        assert_eq!(parse_times("1.250,0.5\n").expect("times"), vec![1.25, 0.5]);
        assert!(parse_times("1.0,oops").is_err());
        assert!(parse_times("").is_err());
    }

    #[test]
    fn the_bench_policy_is_valid() {
        let p = sandbox_policy::Policy::from_toml(&bench_policy()).expect("valid");
        assert_eq!(p.allow_rules().len(), 2);
        assert_eq!(
            p.decide_name("n7.bench.test").verdict,
            sandbox_policy::NameVerdict::Allowed
        );
        assert_eq!(
            p.decide_name("bench.test").verdict,
            sandbox_policy::NameVerdict::Refused
        );
    }
}
