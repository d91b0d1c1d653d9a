//! Privileged tier: the egress policy enforced on the host (`Network::apply_policy`), attacked
//! from a "guest" netns. Topology as in `privileged.rs`, plus, in the "internet" netns: a test
//! DNS server on `198.51.100.2:53` (UDP and TCP) that records every query it receives, TCP
//! servers on ports 80, 443 and 8080 of every address of `203.0.113.0/24` and
//! `192.0.2.0/24` (local routes), `198.51.100.7` and `169.254.169.254` (so a denied
//! connection fails because of the policy, not for want of a server), and a UDP sink on 443.
//!
//! Policy: allow `*.wild.test` on TCP 443 and `198.51.100.0/25` on TCP 8080.
#![cfg(sandbox_privileged)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use sandbox_net::{PolicyHandle, PolicyOptions};
use sandbox_policy::{DefaultAction, DenyEvent, Policy, Protocol, Reason, ReservedKind};

const POLICY: &str = r#"
default = "deny"
[[allow]]
domain = "*.wild.test"
ports = [443]
protocol = "tcp"
[[allow]]
cidr = "198.51.100.0/25"
ports = [8080]
protocol = "tcp"
"#;

/// The same as [`POLICY`] with one more rule, for swaps.
const POLICY_B: &str = r#"
default = "deny"
[[allow]]
domain = "*.wild.test"
ports = [443]
protocol = "tcp"
[[allow]]
cidr = "198.51.100.0/25"
ports = [8080]
protocol = "tcp"
[[allow]]
cidr = "192.0.2.0/24"
ports = [9000]
protocol = "tcp"
"#;

const UPSTREAM: &str = "198.51.100.2:53";
const GATEWAY_DNS: &str = "172.30.0.1:53";

/// The test zone: `a.wild.test` and `wild.test` → 203.0.113.10 (and AAAA 2001:db8::10);
/// `h<i>.wild.test` → a distinct address per `i` (mod 508) in 203.0.113.0/24 or 192.0.2.0/24;
/// `meta.wild.test` → 169.254.169.254 and 203.0.113.10 (DNS rebinding); `denied.test` →
/// 203.0.113.66.
fn zone(name: &str, ty: RecordType) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let v4: Option<Vec<IpAddr>> = match name.as_str() {
        "a.wild.test" | "wild.test" | "big.wild.test" => Some(vec![[203, 0, 113, 10].into()]),
        "meta.wild.test" => Some(vec![[169, 254, 169, 254].into(), [203, 0, 113, 10].into()]),
        "denied.test" => Some(vec![[203, 0, 113, 66].into()]),
        n => n
            .strip_prefix('h')
            .and_then(|r| r.strip_suffix(".wild.test"))
            .and_then(|i| i.parse::<usize>().ok())
            .map(|i| vec![loop_addr(i)]),
    };
    match ty {
        RecordType::A => v4.unwrap_or_default(),
        RecordType::AAAA if v4.is_some() => vec!["2001:db8::10".parse().expect("ip")],
        _ => Vec::new(),
    }
}

fn loop_addr(i: usize) -> IpAddr {
    let k = i % 508;
    // k < 508, so both values fit a byte.
    if k < 254 {
        IpAddr::from([203, 0, 113, (k + 1) as u8])
    } else {
        IpAddr::from([192, 0, 2, (k - 254 + 1) as u8])
    }
}

/// The answer from [`zone`]; over UDP, `big.wild.test` is answered truncated (TC, no records),
/// so the resolver must ask again over TCP.
fn zone_answer(req: &Message, udp: bool) -> Message {
    let mut m = Message::error_msg(req.id(), OpCode::Query, ResponseCode::NoError);
    m.add_queries(req.queries().iter().cloned());
    m.set_recursion_available(true);
    if udp
        && req
            .query()
            .is_some_and(|q| q.name().to_ascii() == "big.wild.test.")
    {
        m.set_truncated(true);
        return m;
    }
    if let Some(q) = req.query() {
        for ip in zone(&q.name().to_ascii(), q.query_type()) {
            let rdata = match ip {
                IpAddr::V4(a) => RData::A(A(a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(a)),
            };
            m.add_answer(Record::from_rdata(q.name().clone(), 30, rdata));
        }
    }
    m
}

/// A DNS server inside a netns that answers from [`zone`] and records every query name.
struct DnsServer {
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    fn start(ns: &str, addr: &str) -> DnsServer {
        let addr: SocketAddr = addr.parse().expect("address");
        let (udp, tcp) = in_ns(ns, || {
            (
                UdpSocket::bind(addr).expect("bind dns udp"),
                std::net::TcpListener::bind(addr).expect("bind dns tcp"),
            )
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let record = |seen: &Arc<Mutex<Vec<String>>>, req: &Message| {
            if let Some(q) = req.query() {
                seen.lock().expect("lock").push(q.name().to_ascii());
            }
        };
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let (s1, f1) = (seen.clone(), stop.clone());
        let t1 = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !f1.load(Ordering::Relaxed) {
                let Ok((n, peer)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                record(&s1, &req);
                let out = zone_answer(&req, true).to_vec().expect("encode");
                let _ = udp.send_to(&out, peer);
            }
        });
        tcp.set_nonblocking(true).expect("nonblocking");
        let (s2, f2) = (seen.clone(), stop.clone());
        let t2 = std::thread::spawn(move || {
            while !f2.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = tcp.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if c.read_exact(&mut body).is_err() {
                    continue;
                }
                let Ok(req) = Message::from_vec(&body) else {
                    continue;
                };
                record(&s2, &req);
                let out = zone_answer(&req, false).to_vec().expect("encode");
                let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&out);
                let _ = c.write_all(&framed);
            }
        });
        DnsServer {
            seen,
            stop,
            threads: vec![t1, t2],
        }
    }

    fn saw(&self, name: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
            .count()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One DNS query from the calling thread's netns: response code and A/AAAA addresses.
fn query(
    server: &str,
    name: &str,
    ty: RecordType,
    tcp: bool,
) -> Result<(ResponseCode, Vec<IpAddr>), String> {
    let server: SocketAddr = server.parse().expect("address");
    let mut m = Message::new();
    m.set_id(4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), ty));
    let req = m.to_vec().expect("encode");
    let e = |e: std::io::Error| e.to_string();
    let bytes = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2)).map_err(e)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(e)?;
        let mut framed = (req.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&req);
        s.write_all(&framed).map_err(e)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).map_err(e)?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut body).map_err(e)?;
        body
    } else {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(e)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(e)?;
        s.send_to(&req, server).map_err(e)?;
        let mut buf = [0u8; 1500];
        let (n, from) = s.recv_from(&mut buf).map_err(e)?;
        if from != server {
            return Err(format!("answer from {from}, asked {server}"));
        }
        buf[..n].to_vec()
    };
    let r = Message::from_vec(&bytes).map_err(|e| e.to_string())?;
    if r.id() != 4242 {
        return Err("wrong id".into());
    }
    let addrs = r
        .answers()
        .iter()
        .filter_map(|rec| match rec.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Ok((r.response_code(), addrs))
}

/// Connects from the calling thread's netns and reads the server's greeting.
fn connect(addr: SocketAddr) -> Result<(), String> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut greeting = String::new();
    BufReader::new(s)
        .read_line(&mut greeting)
        .map_err(|e| e.to_string())?;
    if greeting.starts_with("peer=") {
        Ok(())
    } else {
        Err(format!("greeting {greeting:?}"))
    }
}

/// Connects from `ns`; asserts it fails, and fast (a reset or an ICMP error, not a hang).
fn refused_fast(ns: &str, addr: &str) {
    let a: SocketAddr = addr.parse().expect("address");
    let t = Instant::now();
    let r = in_ns(ns, || connect(a));
    let took = t.elapsed();
    assert!(r.is_err(), "{addr} must be refused");
    assert!(
        took < Duration::from_millis(1000),
        "{addr} took {took:?}: {r:?}"
    );
}

struct World {
    lab: Lab,
    guest: String,
    net: sandbox_net::Network,
    handle: PolicyHandle,
    dns: DnsServer,
    _servers: Vec<Server>,
    slot_host: Ipv4Addr,
}

async fn world(tag: &str, opts: PolicyOptions) -> World {
    let lab = Lab::new(tag);
    lab.world();
    let inet = lab.name("in");
    ip(&["-n", &inet, "addr", "add", "198.51.100.7/32", "dev", "lo"]);
    ip(&[
        "-n",
        &inet,
        "addr",
        "add",
        "169.254.169.254/32",
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &inet,
        "route",
        "add",
        "local",
        "203.0.113.0/24",
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &inet,
        "route",
        "add",
        "local",
        "192.0.2.0/24",
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &inet,
        "route",
        "add",
        "local",
        "192.168.1.0/24",
        "dev",
        "lo",
    ]);
    let up = lab.name("up");
    ip(&[
        "-n",
        &up,
        "route",
        "add",
        "192.168.1.0/24",
        "via",
        "198.51.100.2",
    ]);
    ip(&[
        "-n",
        &up,
        "route",
        "add",
        "169.254.169.254/32",
        "via",
        "198.51.100.2",
    ]);
    let servers = vec![
        Server::start(&inet, "0.0.0.0:443"),
        Server::start(&inet, "0.0.0.0:80"),
        Server::start(&inet, "0.0.0.0:8080"),
        Server::start(&inet, "0.0.0.0:9000"),
        Server::start(&up, "0.0.0.0:8080"),
    ];
    let dns = DnsServer::start(&inet, UPSTREAM);
    let net = lab.network();
    net.install_host().await.expect("host table");
    let (guest, cfg) = lab.guest("g");
    let sbx = net.create("p", &cfg).await.expect("create");
    lab.configure_guest(&guest);
    let policy = Policy::from_toml(POLICY).expect("valid policy");
    let handle = net
        .apply_policy(
            "p",
            &policy,
            match opts.upstream {
                Some(_) => opts,
                None => opts.with_upstream(UPSTREAM.parse().expect("addr")),
            },
        )
        .await
        .expect("apply policy");
    World {
        lab,
        guest,
        net,
        handle,
        dns,
        _servers: servers,
        slot_host: sbx.slot.host,
    }
}

/// Collects events until `quiet` passes with none.
async fn drain(rx: &mut tokio::sync::mpsc::Receiver<DenyEvent>, quiet: Duration) -> Vec<DenyEvent> {
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push(e);
    }
    out
}

fn has(events: &[DenyEvent], f: impl Fn(&DenyEvent) -> bool, what: &str) {
    assert!(
        events.iter().any(f),
        "no deny event for {what}; got {events:#?}"
    );
}

fn ev(events: &[DenyEvent], proto: Protocol, dst: &str, port: u16, reason: Reason) {
    let dst: IpAddr = dst.parse().expect("ip");
    has(
        events,
        |e| e.protocol == proto && e.destination == dst && e.port == port && e.reason == reason,
        &format!("{proto:?} {dst}:{port} {reason:?}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_matrix() {
    let w = world("bm", PolicyOptions::default()).await;
    let g = w.guest.clone();
    let mut rx = w.handle.events().expect("first call gets the receiver");
    assert!(w.handle.events().is_none());
    let deny = Reason::Default(DefaultAction::Deny);
    assert!(
        w.handle
            .net_params()
            .host_addrs
            .contains(&"198.51.100.1".parse().expect("ip")),
        "the host's addresses are read: {:?}",
        w.handle.net_params().host_addrs
    );

    // Control: without the sandbox in the way (from the uplink netns), every server a probe
    // below is refused by answers, so each refusal is the policy's doing.
    let up = w.lab.name("up");
    for a in [
        "203.0.113.10:443",
        "203.0.113.10:80",
        "203.0.113.200:443",
        "192.0.2.9:443",
        "198.51.100.7:80",
        "169.254.169.254:80",
        "192.168.1.1:443",
    ] {
        let sa: SocketAddr = a.parse().expect("addr");
        assert_eq!(in_ns(&up, || connect(sa)), Ok(()), "control {a}");
    }
    assert_eq!(
        in_ns(&up, || query(
            UPSTREAM,
            "denied.test.",
            RecordType::A,
            false
        ))
        .expect("the test server answers")
        .0,
        ResponseCode::NoError
    );
    assert_eq!(w.dns.saw("denied.test"), 1);

    // The pinned address on 443 without resolving first.
    refused_fast(&g, "203.0.113.10:443");
    // Resolve, then connect: allowed.
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::A, false)
    })
    .expect("a.wild.test answers");
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(addrs, vec![IpAddr::from([203, 0, 113, 10])]);
    assert_eq!(
        in_ns(&g, || connect("203.0.113.10:443".parse().expect("addr"))),
        Ok(())
    );
    // IPv6 is off: AAAA answers are stripped (nothing to pin).
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::AAAA, false)
    })
    .expect("AAAA answers");
    assert_eq!((code, addrs), (ResponseCode::NoError, vec![]));
    // A truncated upstream answer is asked again over TCP.
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "big.wild.test.", RecordType::A, false)
    })
    .expect("big.wild.test answers");
    assert_eq!(
        (code, addrs),
        (ResponseCode::NoError, vec![IpAddr::from([203, 0, 113, 10])])
    );
    assert_eq!(w.dns.saw("big.wild.test"), 2, "UDP, then TCP");
    // Other port, other protocol on the pinned address.
    refused_fast(&g, "203.0.113.10:80");
    let udp_sink = in_ns(&w.lab.name("in"), || {
        UdpSocket::bind("0.0.0.0:443").expect("bind")
    });
    assert_eq!(
        udp_arrives(&g, "0.0.0.0:0", &udp_sink, "203.0.113.10:443"),
        None
    );
    // The CIDR rule.
    assert_eq!(
        in_ns(&g, || connect("198.51.100.7:8080".parse().expect("addr"))),
        Ok(())
    );
    refused_fast(&g, "198.51.100.7:80");
    // The apex is not under the wildcard.
    let (code, _) = in_ns(&g, || {
        query(GATEWAY_DNS, "wild.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(code, ResponseCode::Refused);
    // denied.test: REFUSED by name, to another resolver's address (redirected to ours), over TCP.
    for (server, tcp) in [
        (GATEWAY_DNS, false),
        (UPSTREAM, false),
        ("192.0.2.53:53", false),
        ("8.8.8.8:53", false),
        (GATEWAY_DNS, true),
        (UPSTREAM, true),
    ] {
        let (code, addrs) = in_ns(&g, || query(server, "denied.test.", RecordType::A, tcp))
            .unwrap_or_else(|e| panic!("denied.test via {server} tcp={tcp}: {e}"));
        assert_eq!(
            (code, addrs),
            (ResponseCode::Refused, vec![]),
            "via {server} tcp={tcp}"
        );
    }
    assert_eq!(
        w.dns.saw("denied.test"),
        1,
        "no query for a refused name went upstream (the 1 is the control's)"
    );
    assert_eq!(w.dns.saw("wild.test"), 0);
    assert!(w.dns.saw("a.wild.test") >= 1);
    // ANY is refused.
    let (code, _) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::ANY, false)
    })
    .expect("answer");
    assert_eq!(code, ResponseCode::Refused);
    // DNS rebinding: the metadata address is stripped from an allowed name's answer.
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "meta.wild.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(
        (code, addrs),
        (ResponseCode::NoError, vec![IpAddr::from([203, 0, 113, 10])])
    );
    assert!(w.handle.stats().stripped >= 1);
    // Metadata, also IPv4-mapped; a private address; the host's addresses; the gateway.
    refused_fast(&g, "169.254.169.254:80");
    refused_fast(&g, "[::ffff:169.254.169.254]:80");
    refused_fast(&g, "192.168.1.1:443");
    refused_fast(&g, "198.51.100.1:8080");
    let host_end = format!("{}:8080", w.slot_host);
    refused_fast(&g, &host_end);
    refused_fast(&g, "172.30.0.1:22");
    // IPv6: the guest has no IPv6 path at all; it fails at once.
    for a in [
        "[2001:db8::2]:443",
        "[64:ff9b::a9fe:a9fe]:80",
        "[2001:db8::10]:443",
    ] {
        refused_fast(&g, a);
    }
    // A spoofed source: dropped and reported.
    ip(&["-n", &g, "addr", "add", "10.99.0.1/32", "dev", "lo"]);
    let sink = in_ns(&w.lab.name("in"), || {
        UdpSocket::bind("198.51.100.7:8080").expect("bind")
    });
    assert_eq!(
        udp_arrives(&g, "10.99.0.1:0", &sink, "198.51.100.7:8080"),
        None
    );

    let events = drain(&mut rx, Duration::from_millis(1500)).await;
    ev(&events, Protocol::Tcp, "203.0.113.10", 443, deny);
    ev(&events, Protocol::Tcp, "203.0.113.10", 80, deny);
    ev(&events, Protocol::Udp, "203.0.113.10", 443, deny);
    ev(&events, Protocol::Tcp, "198.51.100.7", 80, deny);
    ev(
        &events,
        Protocol::Tcp,
        "169.254.169.254",
        80,
        Reason::Reserved(ReservedKind::Metadata),
    );
    has(
        &events,
        |e| {
            e.destination == IpAddr::from([192, 168, 1, 1])
                && matches!(e.reason, Reason::Reserved(_))
        },
        "192.168.1.1",
    );
    ev(
        &events,
        Protocol::Tcp,
        "198.51.100.1",
        8080,
        Reason::Reserved(ReservedKind::Host),
    );
    has(
        &events,
        |e| e.destination == IpAddr::V4(w.slot_host) && matches!(e.reason, Reason::Reserved(_)),
        "the veth host end",
    );
    ev(&events, Protocol::Tcp, "172.30.0.1", 22, Reason::Gateway);
    ev(
        &events,
        Protocol::Udp,
        "198.51.100.7",
        8080,
        Reason::Spoofed,
    );
    let named = |n: &str| {
        events
            .iter()
            .filter(|e| e.name.as_deref() == Some(n) && e.port == 53)
            .count()
    };
    assert_eq!(named("denied.test"), 6, "{events:#?}");
    // Each refusal names the address the guest sent the query to (conntrack's original
    // destination, before the redirect), the name and the deciding rule.
    for (proto, dst) in [
        (Protocol::Udp, "172.30.0.1"),
        (Protocol::Udp, "198.51.100.2"),
        (Protocol::Udp, "192.0.2.53"),
        (Protocol::Udp, "8.8.8.8"),
        (Protocol::Tcp, "172.30.0.1"),
        (Protocol::Tcp, "198.51.100.2"),
    ] {
        let dst: IpAddr = dst.parse().expect("ip");
        has(
            &events,
            |e| {
                e.protocol == proto
                    && e.destination == dst
                    && e.port == 53
                    && e.name.as_deref() == Some("denied.test")
                    && e.reason == deny
            },
            &format!("denied.test asked of {dst} over {proto:?}"),
        );
    }
    assert!(named("wild.test") >= 1);
    has(
        &events,
        |e| e.protocol == Protocol::Tcp && e.name.as_deref() == Some("denied.test"),
        "denied.test over TCP",
    );
    has(&events, |e| e.reason == Reason::Dns, "ANY");
    assert!(
        events
            .iter()
            .all(|e| e.sandbox == "p" && e.time_unix_ms > 0),
        "events name the sandbox and a time"
    );
    let s = w.handle.stats();
    assert!(s.logged_packets >= 9, "{s:?}");
    assert_eq!(s.events_dropped, 0, "{s:?}");

    // Teardown stops the resolver and leaves nothing; its sockets do not pin the netns.
    w.net.teardown("p").await.expect("teardown");
    assert_guest_link_gone(&g);
    assert!(
        matches!(
            w.handle
                .replace(&Policy::from_toml(POLICY).expect("valid"))
                .await,
            Err(sandbox_net::NetError::NotFound { .. })
        ),
        "a handle outliving its sandbox is inert"
    );
    drop(w.handle);
    w.lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_then_connect_a_thousand_times() {
    let w = world("rc", PolicyOptions::default()).await;
    let started = Instant::now();
    let failures = in_ns(&w.guest, || {
        let mut failures = Vec::new();
        for i in 0..1000 {
            let name = format!("h{i}.wild.test.");
            let r = query(GATEWAY_DNS, &name, RecordType::A, false).and_then(|(code, addrs)| {
                let ip = *addrs.first().ok_or(format!("{code:?}, no address"))?;
                connect(SocketAddr::new(ip, 443))
            });
            if let Err(e) = r {
                failures.push((i, e));
            }
        }
        failures
    });
    let took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} failures: {failures:?}",
        failures.len()
    );
    let s = w.handle.stats();
    assert!(
        s.pin_batches >= 508,
        "every fresh address was pinned: {s:?}"
    );
    assert_eq!(s.upstream_failures, 0);
    eprintln!("1000 resolve+connect loops in {took:?}; {s:?}");
    w.net.teardown("p").await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_swap_during_traffic() {
    let w = world("sw", PolicyOptions::default()).await;
    let g = w.guest.clone();
    let mut rx = w.handle.events().expect("receiver");
    // A pin made before the swaps survives them (both policies allow the name).
    let (_, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(addrs, vec![IpAddr::from([203, 0, 113, 10])]);

    let stop = Arc::new(AtomicBool::new(false));
    let breaches = Arc::new(Mutex::new(Vec::new()));
    let allowed_fail = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let prober = {
        let (stop, breaches, allowed_fail, probes, g) = (
            stop.clone(),
            breaches.clone(),
            allowed_fail.clone(),
            probes.clone(),
            g.clone(),
        );
        std::thread::spawn(move || {
            in_ns(&g, || {
                let denied: Vec<SocketAddr> = [
                    "198.51.100.7:80",
                    "203.0.113.200:443",
                    "169.254.169.254:80",
                    "203.0.113.10:80",
                    "192.0.2.9:443",
                ]
                .iter()
                .map(|a| a.parse().expect("addr"))
                .collect();
                let allowed: Vec<SocketAddr> = ["198.51.100.7:8080", "203.0.113.10:443"]
                    .iter()
                    .map(|a| a.parse().expect("addr"))
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    for a in &denied {
                        probes.fetch_add(1, Ordering::Relaxed);
                        if TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok() {
                            breaches.lock().expect("lock").push(*a);
                        }
                    }
                    for a in &allowed {
                        if connect(*a).is_err() {
                            allowed_fail.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
    };
    let a = Policy::from_toml(POLICY).expect("valid");
    let b = Policy::from_toml(POLICY_B).expect("valid");
    for i in 0..30 {
        let p = if i % 2 == 0 { &b } else { &a };
        w.handle.replace(p).await.expect("replace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 30 swaps end on A: B's extra rule is closed again.
    stop.store(true, Ordering::Relaxed);
    prober.join().expect("prober");
    assert!(probes.load(Ordering::Relaxed) > 50, "the prober ran");
    assert_eq!(*breaches.lock().expect("lock"), Vec::<SocketAddr>::new());
    assert_eq!(
        allowed_fail.load(Ordering::Relaxed),
        0,
        "allowed traffic kept flowing"
    );
    refused_fast(&g, "192.0.2.9:9000");
    w.handle.replace(&b).await.expect("replace");
    assert_eq!(
        in_ns(&g, || connect("192.0.2.9:9000".parse().expect("addr"))),
        Ok(())
    );
    let pins = w.handle.pins().await;
    assert!(
        pins.names(IpAddr::from([203, 0, 113, 10]))
            .any(|(n, _)| n == "a.wild.test"),
        "the pin was carried: {pins:?}"
    );
    // Applying again for the same sandbox replaces, with the same enforcement.
    let again = w
        .net
        .apply_policy("p", &a, PolicyOptions::default())
        .await
        .expect("apply again");
    assert!(again.events().is_none(), "one receiver per sandbox");
    refused_fast(&g, "192.0.2.9:9000");
    // The denied probes were reported, within the rate limit.
    let events = drain(&mut rx, Duration::from_millis(500)).await;
    ev(
        &events,
        Protocol::Tcp,
        "198.51.100.7",
        80,
        Reason::Default(DefaultAction::Deny),
    );
    let s = again.stats();
    assert!(
        events.len() as u64 == s.events_sent && s.events_sent <= 100 + 50 * 10,
        "bounded by the rate: {} events, {s:?}",
        events.len()
    );
    w.net.teardown("p").await.expect("teardown");
    assert_guest_link_gone(&g);
    w.lab.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_concurrency_is_bounded() {
    // An upstream that never answers (no host has that address), one query at a time.
    let opts = PolicyOptions::default()
        .with_upstream("198.51.100.99:53".parse().expect("addr"))
        .with_upstream_timeout(Duration::from_millis(1500))
        .with_max_in_flight(1);
    let w = world("cb", opts).await;
    let answers = in_ns(&w.guest, || {
        let gw: SocketAddr = GATEWAY_DNS.parse().expect("addr");
        let socks: Vec<UdpSocket> = (0..4)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                let mut m = Message::new();
                m.set_id(i)
                    .set_message_type(MessageType::Query)
                    .set_op_code(OpCode::Query)
                    .set_recursion_desired(true)
                    .add_query(Query::query(
                        Name::from_ascii(format!("c{i}.wild.test.")).expect("name"),
                        RecordType::A,
                    ));
                s.send_to(&m.to_vec().expect("encode"), gw).expect("send");
                s
            })
            .collect();
        socks
            .iter()
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                let mut buf = [0u8; 512];
                s.recv(&mut buf)
                    .ok()
                    .and_then(|n| Message::from_vec(&buf[..n]).ok())
                    .map(|m| m.response_code())
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(answers[0], Some(ResponseCode::ServFail), "{answers:?}");
    assert!(answers[1..].iter().all(Option::is_none), "{answers:?}");
    let s = w.handle.stats();
    assert_eq!((s.busy, s.upstream_failures), (3, 1), "{s:?}");
    w.net.teardown("p").await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_expire_and_refresh() {
    // 6 s pins: a second answer past half of that refreshes the pin (delete + add).
    let w = world("px", PolicyOptions::default().with_pin_secs(6, 6)).await;
    let g = w.guest.clone();
    let mut rx = w.handle.events().expect("receiver");
    let target: SocketAddr = "203.0.113.10:443".parse().expect("addr");
    let resolve = |g: &str| {
        in_ns(g, || {
            query(GATEWAY_DNS, "a.wild.test.", RecordType::A, false)
        })
        .expect("answer")
    };
    let t0 = Instant::now();
    assert_eq!(resolve(&g).1, vec![target.ip()]);
    let batches = w.handle.stats().pin_batches;
    // A second answer while the pin is fresh changes nothing in the kernel.
    assert_eq!(resolve(&g).1, vec![target.ip()]);
    assert_eq!(w.handle.stats().pin_batches, batches);
    tokio::time::sleep_until((t0 + Duration::from_millis(3500)).into()).await;
    assert_eq!(resolve(&g).1, vec![target.ip()]);
    assert_eq!(w.handle.stats().pin_batches, batches + 1, "refreshed");
    // Past the first pin's expiry, inside the refreshed one's.
    tokio::time::sleep_until((t0 + Duration::from_millis(7000)).into()).await;
    assert_eq!(in_ns(&g, || connect(target)), Ok(()));
    // Past the refreshed expiry: denied again until the next answer.
    tokio::time::sleep_until((t0 + Duration::from_millis(10_500)).into()).await;
    refused_fast(&g, "203.0.113.10:443");
    assert!(w.handle.pins().await.is_empty());
    let events = drain(&mut rx, Duration::from_millis(500)).await;
    ev(
        &events,
        Protocol::Tcp,
        "203.0.113.10",
        443,
        Reason::Default(DefaultAction::Deny),
    );
    w.net.teardown("p").await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learn_mode_suggests_a_policy_that_allows_exactly_what_was_seen() {
    let w = world("ln", PolicyOptions::default()).await;
    let g = w.guest.clone();
    let mut rx = w.handle.events().expect("receiver");
    let learn = Policy::from_toml("default = \"learn\"\n[[deny]]\ndomain = \"denied.test\"\n")
        .expect("valid");
    w.handle.replace(&learn).await.expect("to learn mode");
    assert!(w.handle.learned().flows().next().is_none());

    // A name, then its address; a bare address; a name resolved but never used.
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::A, false)
    })
    .expect("a.wild.test answers");
    assert_eq!(
        (code, addrs),
        (ResponseCode::NoError, vec![IpAddr::from([203, 0, 113, 10])])
    );
    assert_eq!(
        in_ns(&g, || connect("203.0.113.10:443".parse().expect("addr"))),
        Ok(()),
        "learn mode lets a resolved name through"
    );
    assert_eq!(
        in_ns(&g, || connect("198.51.100.7:80".parse().expect("addr"))),
        Ok(()),
        "learn mode lets a bare address through"
    );
    let (code, _) = in_ns(&g, || {
        query(GATEWAY_DNS, "h5.wild.test.", RecordType::A, false)
    })
    .expect("h5.wild.test answers");
    assert_eq!(code, ResponseCode::NoError);
    // Learn mode is not a hole: a deny rule, the metadata address and the host still fail.
    let (code, _) = in_ns(&g, || {
        query(GATEWAY_DNS, "denied.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(code, ResponseCode::Refused);
    refused_fast(&g, "169.254.169.254:80");
    refused_fast(&g, "198.51.100.1:8080");
    assert_eq!(w.dns.saw("denied.test"), 0);

    // The NFLOG entries arrive asynchronously.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = w.handle.learned();
        if log.flows().count() >= 2 || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let flows: Vec<_> = log
        .flows()
        .map(|f| (f.name.clone(), f.protocol, f.destination, f.port))
        .collect();
    assert_eq!(
        flows,
        vec![
            (None, Protocol::Tcp, IpAddr::from([198, 51, 100, 7]), 80),
            (
                Some("a.wild.test".to_string()),
                Protocol::Tcp,
                IpAddr::from([203, 0, 113, 10]),
                443
            ),
        ],
        "exactly the connections seen, the resolved one under its name"
    );
    let names: Vec<&str> = log.names().collect();
    assert_eq!(names, vec!["a.wild.test", "h5.wild.test"]);
    assert_eq!(log.dropped(), 0);
    let events = drain(&mut rx, Duration::from_millis(500)).await;
    ev(
        &events,
        Protocol::Tcp,
        "169.254.169.254",
        80,
        Reason::Reserved(ReservedKind::Metadata),
    );
    assert!(
        events
            .iter()
            .all(|e| e.reason != Reason::Default(DefaultAction::Learn)),
        "learned flows are not deny events: {events:#?}"
    );

    // The suggestion, parsed back and enforced.
    let text = w.handle.suggested_policy();
    assert!(text.contains("#   h5.wild.test\n"), "{text}");
    let suggested = Policy::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(suggested.default_action(), DefaultAction::Deny);
    w.handle
        .replace(&suggested)
        .await
        .expect("enforce the suggestion");
    // Allowed: the name (resolved again: pins are made by the enforcing policy) on its port,
    // and the bare address on its port.
    let (code, addrs) = in_ns(&g, || {
        query(GATEWAY_DNS, "a.wild.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(
        (code, addrs),
        (ResponseCode::NoError, vec![IpAddr::from([203, 0, 113, 10])])
    );
    assert_eq!(
        in_ns(&g, || connect("203.0.113.10:443".parse().expect("addr"))),
        Ok(())
    );
    assert_eq!(
        in_ns(&g, || connect("198.51.100.7:80".parse().expect("addr"))),
        Ok(())
    );
    // Denied: other ports, other addresses, the unused name.
    refused_fast(&g, "203.0.113.10:80");
    refused_fast(&g, "198.51.100.7:8080");
    refused_fast(&g, "203.0.113.200:443");
    let (code, _) = in_ns(&g, || {
        query(GATEWAY_DNS, "h5.wild.test.", RecordType::A, false)
    })
    .expect("answer");
    assert_eq!(code, ResponseCode::Refused);
    let events = drain(&mut rx, Duration::from_millis(1000)).await;
    let deny = Reason::Default(DefaultAction::Deny);
    ev(&events, Protocol::Tcp, "203.0.113.10", 80, deny);
    ev(&events, Protocol::Tcp, "198.51.100.7", 8080, deny);
    ev(&events, Protocol::Tcp, "203.0.113.200", 443, deny);
    has(
        &events,
        |e| e.name.as_deref() == Some("h5.wild.test") && e.reason == deny,
        "h5.wild.test refused",
    );

    w.net.teardown("p").await.expect("teardown");
    assert_guest_link_gone(&g);
    drop(w.handle);
    w.lab.assert_clean();
}
