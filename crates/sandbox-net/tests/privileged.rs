//! Privileged tier: the whole data path on the host, in namespaces the test creates.
//!
//! Topology per test (`<b>` is a per-test prefix, so tests run in parallel):
//!
//! ```text
//! guest netns <b>g*  --veth-->  sandbox netns <b>s-<id>  --veth vt*-->  uplink netns <b>up
//!   172.30.0.2/30                 tap0 172.30.0.1/30                      (plays the host)
//!                                 uplink0 10.200.0.x/31                   up0 198.51.100.1/24
//!                                                                         2001:db8::1/64
//!                                                                            |
//!                                                                   internet netns <b>in
//!                                                          in0 198.51.100.2/24, 2001:db8::2/64
//!                                                          lo 203.0.113.10/32, echo on :8080
//! ```
//!
//! Nothing here touches the root netns's routes, rules, sysctls or nft tables.
#![cfg(sandbox_privileged)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandbox_net::{
    Egress, GuestLink, HostNetns, NamePrefixes, NetConfig, NetError, Network, SandboxNetConfig,
    SetupStep,
};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("run ip netns exec");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside netns `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// An echo server inside a netns: greets with `peer=<client ip>`, then echoes lines. Stops
/// (and closes its socket, so the netns can die) when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(ns: &str, addr: &str) -> Server {
        let addr: SocketAddr = addr.parse().expect("address");
        let listener = in_ns(ns, || TcpListener::bind(addr).expect("bind"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        std::thread::spawn(move || echo(conn, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = conn.try_clone().expect("clone");
    let _ = writeln!(w, "peer={}", peer.ip().to_canonical());
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(w, "{line}").is_err() {
            return;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns`, says `ping`, returns the greeting's peer if the echo comes back.
fn probe(ns: &str, addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr.parse().expect("address");
    in_ns(ns, || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(1000))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut greeting = String::new();
        r.read_line(&mut greeting).map_err(|e| e.to_string())?;
        writeln!(w, "ping").map_err(|e| e.to_string())?;
        let mut back = String::new();
        r.read_line(&mut back).map_err(|e| e.to_string())?;
        if back.trim() != "ping" {
            return Err(format!("echo returned {back:?}"));
        }
        Ok(greeting.trim().trim_start_matches("peer=").to_string())
    })
}

/// Sends one UDP datagram from `ns` (from `src`, port 0) to `dst`, where `server` waits;
/// returns the source the server saw, if the datagram arrived within 1 s.
fn udp_arrives(ns: &str, src: &str, server: &std::net::UdpSocket, dst: &str) -> Option<IpAddr> {
    let src: SocketAddr = src.parse().expect("address");
    let dst: SocketAddr = dst.parse().expect("address");
    in_ns(ns, || {
        let s = std::net::UdpSocket::bind(src).expect("bind");
        s.send_to(b"x", dst).expect("send");
    });
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    server.recv_from(&mut buf).ok().map(|(_, peer)| peer.ip())
}

fn reaches(ns: &str, addr: &str) -> bool {
    probe(ns, addr).is_ok()
}

/// Probes until it works or 5 s pass (IPv6 on a fresh link needs a moment before it answers).
fn eventually_reaches(ns: &str, addr: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if reaches(ns, addr) {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The namespaces of one test; deletes every netns with its prefix when dropped.
struct Lab {
    base: String,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let lab = Lab {
            base: format!("snt{}{tag}", std::process::id() % 100_000),
        };
        lab.sweep();
        lab
    }

    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    fn sandbox_prefix(&self) -> String {
        self.name("s-")
    }

    /// The uplink ("host") and internet netns.
    fn world(&self) {
        let (up, inet) = (self.name("up"), self.name("in"));
        ip(&["netns", "add", &up]);
        ip(&["netns", "add", &inet]);
        ip(&[
            "-n", &up, "link", "add", "up0", "type", "veth", "peer", "name", "in0", "netns", &inet,
        ]);
        for (ns, dev, v4, v6) in [
            (&up, "up0", "198.51.100.1/24", "2001:db8::1/64"),
            (&inet, "in0", "198.51.100.2/24", "2001:db8::2/64"),
        ] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev]);
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &inet, "addr", "add", "203.0.113.10/32", "dev", "lo"]);
        ip(&["-n", &up, "route", "add", "default", "via", "198.51.100.2"]);
        ip(&[
            "-n",
            &up,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8::2",
        ]);
    }

    fn network(&self) -> Network {
        let names = NamePrefixes::new(&self.sandbox_prefix(), "vt", "sbx_test");
        Network::new(
            NetConfig::default()
                .with_names(names)
                .with_host_netns(HostNetns::Named(self.name("up"))),
        )
        .expect("valid config")
    }

    /// A guest netns; the sandbox's veth end lands there as `eth0`.
    fn guest(&self, suffix: &str) -> (String, SandboxNetConfig) {
        let ns = self.name(suffix);
        ip(&["netns", "add", &ns]);
        let cfg = SandboxNetConfig::default().with_guest_link(GuestLink::Veth {
            netns: ns.clone(),
            ifname: "eth0".into(),
        });
        (ns, cfg)
    }

    /// Addresses the guest end as the kernel's `ip=` parameter would.
    fn configure_guest(&self, ns: &str) {
        ip(&["-n", ns, "addr", "add", "172.30.0.2/30", "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", "172.30.0.1"]);
    }

    /// Asserts no sandbox netns, no sandbox link and no table but the host's are left.
    fn assert_clean(&self) {
        if let Err(e) = self.leftovers() {
            panic!("{e}");
        }
    }

    fn leftovers(&self) -> Result<(), String> {
        let left: Vec<_> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&self.sandbox_prefix()))
                    .collect()
            })
            .unwrap_or_default();
        if !left.is_empty() {
            return Err(format!("netns left: {left:?}"));
        }
        let links = sh_out(&self.name("up"), &["ip", "-o", "link", "show"]);
        if links.lines().any(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|n| n.trim().starts_with("vt"))
        }) {
            return Err(format!("links left:\n{links}"));
        }
        let tables = sh_out(&self.name("up"), &["nft", "list", "tables"]);
        if !tables
            .lines()
            .all(|l| l.trim().is_empty() || l.trim() == "table inet sbx_test")
        {
            return Err(format!("tables left:\n{tables}"));
        }
        Ok(())
    }

    fn sweep(&self) {
        if let Ok(dir) = std::fs::read_dir("/run/netns") {
            for e in dir.flatten() {
                if let Ok(name) = e.file_name().into_string() {
                    if name.starts_with(&self.base) {
                        let _ = Command::new("ip").args(["netns", "del", &name]).status();
                    }
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sweep();
    }
}

/// Waits up to 5 s for `eth0` to leave guest netns `ns`. The guest end's peer lives in the
/// sandbox netns, so this proves the sandbox netns really died: no socket or task of ours (a
/// netlink connection, an exposed port's upstream) still pins it.
fn assert_guest_link_gone(ns: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let links = sh_out(ns, &["ip", "-o", "link", "show"]);
        if !links.contains("eth0") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox netns is still alive:\n{links}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sysctl(ns: &str, key: &str) -> String {
    in_ns(ns, || {
        std::fs::read_to_string(format!("/proc/sys/{key}"))
            .expect("read sysctl")
            .trim()
            .to_string()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachability_and_isolation() {
    let lab = Lab::new("ri");
    lab.world();
    let net = lab.network();
    net.install_host().await.expect("host table");
    let (up, inet) = (lab.name("up"), lab.name("in"));
    let _internet = Server::start(&inet, "[::]:8080");
    let _host_service = Server::start(&up, "0.0.0.0:9090");

    let (ga, ca) = lab.guest("ga");
    let a = net
        .create("a", &ca.with_egress(Egress::Allow))
        .await
        .expect("create a");
    lab.configure_guest(&ga);
    let (gb, cb) = lab.guest("gb");
    let b = net
        .create("b", &cb.with_egress(Egress::Allow))
        .await
        .expect("create b");
    lab.configure_guest(&gb);
    let (gc, cc) = lab.guest("gc");
    let _c = net
        .create("c", &cc)
        .await
        .expect("create c (egress denied)");
    lab.configure_guest(&gc);
    assert!(a
        .kernel_ip_param()
        .starts_with("ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off"));
    assert_ne!(a.slot, b.slot);

    // Sanity: the services answer where nothing filters.
    assert_eq!(
        probe(&inet, "198.51.100.1:9090").as_deref(),
        Ok("198.51.100.2")
    );
    assert!(
        eventually_reaches(&up, "[2001:db8::2]:8080"),
        "the v6 internet works"
    );

    // Egress with masquerade: the server sees the uplink's address.
    assert_eq!(
        probe(&ga, "198.51.100.2:8080").as_deref(),
        Ok("198.51.100.1")
    );
    assert_eq!(
        probe(&ga, "203.0.113.10:8080").as_deref(),
        Ok("198.51.100.1")
    );
    assert_eq!(
        probe(&gb, "198.51.100.2:8080").as_deref(),
        Ok("198.51.100.1")
    );
    // Anti-spoofing: a datagram from another source address never leaves the sandbox (without
    // the rule, masquerade would rewrite its source and deliver it).
    let udp = in_ns(&inet, || {
        std::net::UdpSocket::bind("0.0.0.0:5353").expect("bind udp")
    });
    assert_eq!(
        udp_arrives(&ga, "0.0.0.0:0", &udp, "198.51.100.2:5353"),
        Some(IpAddr::from([198, 51, 100, 1]))
    );
    ip(&["-n", &ga, "addr", "add", "10.99.0.1/32", "dev", "lo"]);
    assert_eq!(
        udp_arrives(&ga, "10.99.0.1:0", &udp, "198.51.100.2:5353"),
        None
    );
    drop(udp);
    // Egress denied by default.
    assert!(!reaches(&gc, "198.51.100.2:8080"));
    // No IPv6 path, even with a guest that configures one.
    ip(&[
        "-n",
        &ga,
        "-6",
        "addr",
        "add",
        "2001:db8:1::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(!reaches(&ga, "[2001:db8::2]:8080"));
    for key in ["all", "default", "tap0", "uplink0"] {
        assert_eq!(
            sysctl(&a.names.netns, &format!("net/ipv6/conf/{key}/disable_ipv6")),
            "1",
            "{key}"
        );
    }
    let hl = &a.names.host_link;
    assert_eq!(
        sysctl(&up, &format!("net/ipv6/conf/{hl}/disable_ipv6")),
        "1"
    );
    assert_eq!(sysctl(&up, &format!("net/ipv6/conf/{hl}/accept_ra")), "0");

    // The host (uplink) is unreachable: its outside address and the veth ends.
    assert!(!reaches(&ga, "198.51.100.1:9090"));
    assert!(!reaches(&ga, &format!("{}:9090", a.slot.host)));
    assert!(!reaches(&ga, &format!("{}:9090", b.slot.host)));

    // The other sandbox is unreachable: its netns and its guest.
    let _b_netns = Server::start(&b.names.netns, "0.0.0.0:7070");
    let _b_guest = Server::start(&gb, "0.0.0.0:7070");
    assert!(
        reaches(&b.names.netns, "127.0.0.1:7070"),
        "sanity: B's service runs"
    );
    assert!(!reaches(&ga, &format!("{}:7070", b.slot.sandbox)));
    assert!(
        !reaches(&up, &format!("{}:7070", b.slot.sandbox)),
        "not even from the host"
    );

    // The gateway: port 53 only.
    let _dns = Server::start(&a.names.netns, "172.30.0.1:53");
    let _other = Server::start(&a.names.netns, "0.0.0.0:2222");
    assert_eq!(probe(&ga, "172.30.0.1:53").as_deref(), Ok("172.30.0.2"));
    assert!(!reaches(&ga, "172.30.0.1:2222"));
    assert!(!reaches(&ga, &format!("{}:2222", a.slot.sandbox)));
    assert!(
        reaches(&a.names.netns, "127.0.0.1:2222"),
        "sanity: the port is open"
    );

    drop((_b_netns, _b_guest, _dns, _other));
    for id in ["a", "b", "c"] {
        net.teardown(id).await.expect("teardown");
        net.teardown(id).await.expect("teardown is idempotent");
    }
    lab.assert_clean();
    for g in [&ga, &gb, &gc] {
        assert_guest_link_gone(g);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_each_step_leaves_nothing() {
    let lab = Lab::new("fa");
    lab.world();
    let net = lab.network();
    net.install_host().await.expect("host table");
    for step in SetupStep::ALL {
        let spec = SandboxNetConfig::default().with_fail_at(step);
        match net.create("f", &spec).await {
            Err(NetError::Injected { step: s }) => assert_eq!(s, step),
            other => panic!("step {step:?}: {other:?}"),
        }
        lab.assert_clean();
    }
    // Nothing leaked in the pool either: the first slot is free again.
    let mut ok = net
        .create("f", &SandboxNetConfig::default())
        .await
        .expect("create");
    assert_eq!(ok.slot.index, 0);
    assert!(ok.take_tap().is_some());
    net.teardown("f").await.expect("teardown");
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_destroy_cycles_leave_nothing() {
    let lab = Lab::new("cy");
    lab.world();
    let net = lab.network();
    net.install_host().await.expect("host table");
    let (mut create, mut teardown) = (Duration::ZERO, Duration::ZERO);
    for i in 0..64 {
        let id = format!("cycle{i}");
        let t = std::time::Instant::now();
        let mut s = net
            .create(&id, &SandboxNetConfig::default())
            .await
            .expect("create");
        create += t.elapsed();
        assert!(s.take_tap().is_some(), "a tap fd for the VMM");
        let t = std::time::Instant::now();
        net.teardown(&id).await.expect("teardown");
        teardown += t.elapsed();
    }
    eprintln!(
        "64 cycles: create {:?} each, teardown {:?} each (mean)",
        create / 64,
        teardown / 64
    );
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_removes_dead_owners_and_adopts_live_ones() {
    let lab = Lab::new("rc");
    lab.world();
    let first = lab.network();
    first.install_host().await.expect("host table");
    let live = first
        .create("live", &SandboxNetConfig::default())
        .await
        .expect("live");
    let dead = first
        .create("dead", &SandboxNetConfig::default())
        .await
        .expect("dead");
    // A link left by a setup that died before its netns existed.
    ip(&[
        "-n",
        &lab.name("up"),
        "link",
        "add",
        "vt0000abcd",
        "type",
        "veth",
        "peer",
        "name",
        "vt0000abcdp",
    ]);
    drop(first); // the "runtime" restarts

    let second = lab.network();
    let report = second
        .reconcile(&|id| id == "live")
        .await
        .expect("reconcile");
    assert_eq!(report.removed, vec!["dead".to_string()]);
    assert_eq!(report.adopted, vec!["live".to_string()]);
    assert!(
        report.removed_links.contains(&"vt0000abcd".to_string()),
        "{report:?}"
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!std::path::Path::new(&format!("/run/netns/{}", dead.names.netns)).exists());
    assert!(std::path::Path::new(&format!("/run/netns/{}", live.names.netns)).exists());
    let links = sh_out(&lab.name("up"), &["ip", "-o", "link", "show"]);
    assert!(!links.contains(&dead.names.host_link), "{links}");
    assert!(links.contains(&live.names.host_link), "{links}");
    // The adopted slot is not handed out again.
    let next = second
        .create("next", &SandboxNetConfig::default())
        .await
        .expect("next");
    assert_ne!(next.slot.index, live.slot.index);

    second.teardown("next").await.expect("teardown");
    second.teardown("live").await.expect("teardown");
    lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expose_forwards_tcp_with_a_bound() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};
    let lab = Lab::new("ex");
    lab.world();
    let names = NamePrefixes::new(&lab.sandbox_prefix(), "vt", "sbx_test");
    let net = Network::new(
        NetConfig::default()
            .with_names(names)
            .with_host_netns(HostNetns::Named(lab.name("up")))
            .with_expose_max_connections(1),
    )
    .expect("config");
    net.install_host().await.expect("host table");
    let (g, c) = lab.guest("g");
    net.create("e", &c).await.expect("create");
    lab.configure_guest(&g);
    let _echo = Server::start(&g, "0.0.0.0:7");

    let addr = net.expose("e", 7).await.expect("expose");
    assert_eq!(addr.ip(), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(net.expose("e", 7).await.expect("again"), addr, "idempotent");

    let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (r, mut w) = first.split();
    let mut r = TokioBufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.expect("greeting");
    assert_eq!(
        line.trim(),
        "peer=172.30.0.1",
        "the upstream comes from the sandbox netns"
    );
    w.write_all(b"hello\n").await.expect("write");
    line.clear();
    r.read_line(&mut line).await.expect("echo");
    assert_eq!(line, "hello\n");

    // The bound: a second client waits until the first leaves.
    let mut second = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect (backlog)");
    let mut buf = [0u8; 64];
    use tokio::io::AsyncReadExt;
    let waited = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(waited.is_err(), "second connection served beyond the bound");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("served once the first left")
        .expect("read");
    assert!(buf[..n].starts_with(b"peer="));
    drop(second);

    assert!(net.unexpose("e", 7));
    assert!(!net.unexpose("e", 7));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );

    let again = net.expose("e", 7).await.expect("expose again");
    net.teardown("e").await.expect("teardown");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        tokio::net::TcpStream::connect(again).await.is_err(),
        "teardown closes exposures"
    );
    assert!(matches!(
        net.expose("e", 7).await,
        Err(NetError::NotFound { .. })
    ));
    drop(_echo);
    lab.assert_clean();
    assert_guest_link_gone(&g);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_create_half_way_leaves_nothing() {
    let lab = Lab::new("dr");
    lab.world();
    let net = lab.network();
    net.install_host().await.expect("host table");
    let mut finished = 0;
    for ms in [0u64, 1, 2, 4, 8, 12, 16, 24, 32, 48] {
        let spec = SandboxNetConfig::default();
        let create = net.create("d", &spec);
        if tokio::time::timeout(Duration::from_millis(ms), create)
            .await
            .is_ok()
        {
            finished += 1;
            net.teardown("d").await.expect("teardown");
        }
        // The cleanup runs on a spawned task: wait for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let clean = lab.leftovers().is_ok();
            if clean
                && net
                    .create("probe", &SandboxNetConfig::default())
                    .await
                    .map(|s| s.slot.index)
                    .ok()
                    == Some(0)
            {
                net.teardown("probe").await.expect("teardown");
                break;
            }
            let _ = net.teardown("probe").await;
            assert!(
                std::time::Instant::now() < deadline,
                "a dropped create left objects ({ms} ms)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    lab.assert_clean();
    eprintln!("{finished} of 10 creates finished before their deadline");
}
