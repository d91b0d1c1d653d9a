//! Shared fixtures of the privileged tier: the namespaces of one test ("guest", "uplink"
//! playing the host, "internet"), echo servers and probes. See `privileged.rs` for the
//! topology.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sandbox_net::{GuestLink, HostNetns, NamePrefixes, NetConfig, Network, SandboxNetConfig};

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(ns: &str, args: &[&str]) -> String {
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
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &str, addr: &str) -> Server {
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

pub fn echo(conn: TcpStream, peer: SocketAddr) {
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
pub fn probe(ns: &str, addr: &str) -> Result<String, String> {
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
pub fn udp_arrives(ns: &str, src: &str, server: &std::net::UdpSocket, dst: &str) -> Option<IpAddr> {
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

pub fn reaches(ns: &str, addr: &str) -> bool {
    probe(ns, addr).is_ok()
}

/// Probes until it works or 5 s pass (IPv6 on a fresh link needs a moment before it answers).
pub fn eventually_reaches(ns: &str, addr: &str) -> bool {
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
pub struct Lab {
    pub base: String,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        let lab = Lab {
            base: format!("snt{}{tag}", std::process::id() % 100_000),
        };
        lab.sweep();
        lab
    }

    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    pub fn sandbox_prefix(&self) -> String {
        self.name("s-")
    }

    /// The uplink ("host") and internet netns.
    pub fn world(&self) {
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

    pub fn network(&self) -> Network {
        let names = NamePrefixes::new(&self.sandbox_prefix(), "vt", "sbx_test");
        Network::new(
            NetConfig::default()
                .with_names(names)
                .with_host_netns(HostNetns::Named(self.name("up"))),
        )
        .expect("valid config")
    }

    /// A guest netns; the sandbox's veth end lands there as `eth0`.
    pub fn guest(&self, suffix: &str) -> (String, SandboxNetConfig) {
        let ns = self.name(suffix);
        ip(&["netns", "add", &ns]);
        let cfg = SandboxNetConfig::default().with_guest_link(GuestLink::Veth {
            netns: ns.clone(),
            ifname: "eth0".into(),
        });
        (ns, cfg)
    }

    /// Addresses the guest end as the kernel's `ip=` parameter would.
    pub fn configure_guest(&self, ns: &str) {
        ip(&["-n", ns, "addr", "add", "172.30.0.2/30", "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", "172.30.0.1"]);
    }

    /// Asserts no sandbox netns, no sandbox link and no table but the host's are left.
    pub fn assert_clean(&self) {
        if let Err(e) = self.leftovers() {
            panic!("{e}");
        }
    }

    pub fn leftovers(&self) -> Result<(), String> {
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

    pub fn sweep(&self) {
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
pub fn assert_guest_link_gone(ns: &str) {
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

pub fn sysctl(ns: &str, key: &str) -> String {
    in_ns(ns, || {
        std::fs::read_to_string(format!("/proc/sys/{key}"))
            .expect("read sysctl")
            .trim()
            .to_string()
    })
}
