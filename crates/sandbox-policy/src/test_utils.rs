//! Fixtures and proptest strategies shared by the unit tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use crate::config::{DefaultAction, PolicyConfig, PortConfig, ProtocolConfig, RuleConfig};
use crate::decide::{NetParams, Pins, Protocol};

pub(crate) const NAMES: &[&str] = &["a.test", "b.a.test", "c.b.a.test", "c.test", "x.other"];
const PATTERNS: &[&str] = &[
    "a.test", "b.a.test", "*.a.test", "*.test", "c.test", "*.other",
];
const CIDRS: &[&str] = &[
    "203.0.113.0/24",
    "203.0.113.0/28",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "169.254.0.0/16",
    "0.0.0.0/0",
    "198.51.100.7/32",
    "192.0.2.0/24",
    "2001:db8::/32",
    "2001:db8::/120",
    "fd00::/8",
    "::/0",
];
pub(crate) const DESTS: &[&str] = &[
    "203.0.113.5",
    "203.0.113.200",
    "10.1.2.3",
    "10.200.0.1",
    "169.254.169.254",
    "169.254.1.1",
    "198.51.100.7",
    "8.8.8.8",
    "192.0.2.10",
    "172.30.0.1",
    "127.0.0.1",
    "2001:db8::5",
    "2001:db8::1:5",
    "fd00::1",
    "fd00:ec2::254",
    "fdaa::1",
    "::1",
];
const PORTS: &[(u16, u16)] = &[(80, 80), (443, 443), (400, 500), (8000, 8099), (53, 53)];

/// The sandbox network of the tests: IPv4 and IPv6, host addresses 192.0.2.10 and
/// 2001:db8::10.
pub(crate) fn net46() -> NetParams {
    NetParams::new("tap0", ip("172.30.0.2").to_v4(), ip("172.30.0.1").to_v4())
        .with_ipv6(ip("fdaa::2").to_v6(), ip("fdaa::1").to_v6())
        .with_host_addrs([ip("192.0.2.10"), ip("2001:db8::10")])
        .with_log_group(7)
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

pub(crate) trait Fam {
    fn to_v4(self) -> Ipv4Addr;
    fn to_v6(self) -> Ipv6Addr;
}

impl Fam for IpAddr {
    fn to_v4(self) -> Ipv4Addr {
        match self {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => panic!("not IPv4"),
        }
    }
    fn to_v6(self) -> Ipv6Addr {
        match self {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => panic!("not IPv6"),
        }
    }
}

fn rule() -> impl Strategy<Value = RuleConfig> {
    let dest = prop_oneof![
        proptest::sample::select(PATTERNS).prop_map(|d| (Some(d.to_owned()), None)),
        proptest::sample::select(CIDRS).prop_map(|c| (None, Some(c.to_owned()))),
    ];
    let proto = proptest::sample::select(
        &[
            ProtocolConfig::Any,
            ProtocolConfig::Tcp,
            ProtocolConfig::Udp,
            ProtocolConfig::Icmp,
        ][..],
    );
    let ports = proptest::option::of(proptest::sample::subsequence(PORTS, 1..3));
    (dest, proto, ports).prop_map(|((domain, cidr), protocol, ports)| RuleConfig {
        domain,
        cidr,
        ports: if protocol == ProtocolConfig::Icmp {
            None
        } else {
            ports.map(|v| {
                v.into_iter()
                    .map(|(a, b)| {
                        if a == b {
                            PortConfig::Number(i64::from(a))
                        } else {
                            PortConfig::Text(format!("{a}-{b}"))
                        }
                    })
                    .collect()
            })
        },
        protocol: Some(protocol),
    })
}

/// Random valid policies over the fixed pools above.
pub(crate) fn policy_config() -> impl Strategy<Value = PolicyConfig> {
    (
        proptest::sample::select(
            &[
                DefaultAction::Deny,
                DefaultAction::Allow,
                DefaultAction::Learn,
            ][..],
        ),
        proptest::collection::vec(rule(), 0..6),
        proptest::collection::vec(rule(), 0..3),
    )
        .prop_map(|(default, allow, deny)| PolicyConfig {
            default,
            allow,
            deny,
        })
}

/// Random destinations: the pool, or any address.
pub(crate) fn destination() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        3 => proptest::sample::select(DESTS).prop_map(ip),
        1 => any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        1 => any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

pub(crate) fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        proptest::sample::select(&[53u16, 80, 443, 450, 8000, 8080, 8099][..]),
        any::<u16>(),
    ]
}

pub(crate) fn protocol() -> impl Strategy<Value = Protocol> {
    proptest::sample::select(&[Protocol::Tcp, Protocol::Udp, Protocol::Icmp][..])
}

/// Random pins of pool names to pool destinations.
pub(crate) fn pins() -> impl Strategy<Value = Pins> {
    proptest::collection::vec(
        (
            proptest::sample::select(NAMES),
            proptest::sample::select(DESTS),
        ),
        0..6,
    )
    .prop_map(|v| {
        let mut p = Pins::new();
        for (n, d) in v {
            p.insert(n, ip(d)).expect("pool names are valid");
        }
        p
    })
}
