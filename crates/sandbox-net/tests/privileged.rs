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

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;

use sandbox_net::{
    Egress, HostNetns, NamePrefixes, NetConfig, NetError, Network, SandboxNetConfig, SetupStep,
};

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
