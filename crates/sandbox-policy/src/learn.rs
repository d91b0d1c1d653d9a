//! Learn mode: record what a `deny` policy would have refused and suggest a policy.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::addr::{normalize_ip, Cidr};
use crate::config::{DefaultAction, PolicyConfig, PortConfig, ProtocolConfig, RuleConfig};
use crate::decide::{Decision, Protocol, Reason};
use crate::name::normalize_name;
use crate::policy::NameDecision;
use crate::Policy;

/// One connection that learn mode let through and deny mode would have refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LearnedFlow {
    /// The name the guest resolved to reach `destination`, if known (normalised).
    pub name: Option<String>,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination (normalised).
    pub destination: IpAddr,
    /// Destination port (0 for ICMP).
    pub port: u16,
}

/// A deduplicated, bounded record of the traffic a learn-mode sandbox would have had refused.
///
/// Feed it every decision (the NFLOG reader's `sbx-learn` entries and the resolver's name
/// decisions); it keeps only those whose reason is `Default(Learn)`. Guest-driven, so it holds
/// at most `capacity` flows and `capacity` names and counts what it dropped.
#[derive(Debug, Clone)]
pub struct LearnLog {
    capacity: usize,
    flows: BTreeSet<LearnedFlow>,
    names: BTreeSet<String>,
    dropped: u64,
}

impl LearnLog {
    /// An empty log holding at most `capacity` flows and `capacity` names.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            flows: BTreeSet::new(),
            names: BTreeSet::new(),
            dropped: 0,
        }
    }

    /// Records a connection if `decision` is a learn-mode allow. Returns whether it was
    /// recorded (false for duplicates, other decisions, an invalid name, or a full log).
    pub fn observe(
        &mut self,
        decision: &Decision,
        destination: IpAddr,
        port: u16,
        protocol: Protocol,
        name: Option<&str>,
    ) -> bool {
        if decision.reason != Reason::Default(DefaultAction::Learn) {
            return false;
        }
        let name = match name.map(normalize_name) {
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => return false,
            None => None,
        };
        let flow = LearnedFlow {
            name,
            protocol,
            destination: normalize_ip(destination),
            port: if protocol == Protocol::Icmp { 0 } else { port },
        };
        if self.flows.contains(&flow) {
            return false;
        }
        if self.flows.len() >= self.capacity {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        self.flows.insert(flow)
    }

    /// Records a DNS name if `decision` is a learn-mode allow.
    pub fn observe_name(&mut self, decision: &NameDecision, qname: &str) -> bool {
        if decision.reason != Reason::Default(DefaultAction::Learn) {
            return false;
        }
        let Ok(name) = normalize_name(qname) else {
            return false;
        };
        if self.names.contains(&name) {
            return false;
        }
        if self.names.len() >= self.capacity {
            self.dropped = self.dropped.saturating_add(1);
            return false;
        }
        self.names.insert(name)
    }

    /// The recorded flows, sorted.
    pub fn flows(&self) -> impl Iterator<Item = &LearnedFlow> {
        self.flows.iter()
    }

    /// The recorded names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// How many observations were dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The suggested policy as a model: `default = "deny"`, the rules of `base`, then one
    /// allow rule per (name, protocol) of the recorded flows with a name (`domain`, the ports
    /// seen) and per (address, protocol) of those without (`cidr` /32 or /128).
    pub fn suggest_config(&self, base: &Policy) -> PolicyConfig {
        let mut cfg = base.to_config();
        cfg.default = DefaultAction::Deny;
        let mut by_name: BTreeMap<(String, Protocol), BTreeSet<u16>> = BTreeMap::new();
        let mut by_addr: BTreeMap<(IpAddr, Protocol), BTreeSet<u16>> = BTreeMap::new();
        for f in &self.flows {
            match &f.name {
                Some(n) => by_name
                    .entry((n.clone(), f.protocol))
                    .or_default()
                    .insert(f.port),
                None => by_addr
                    .entry((f.destination, f.protocol))
                    .or_default()
                    .insert(f.port),
            };
        }
        let rule = |domain: Option<String>,
                    cidr: Option<String>,
                    proto: Protocol,
                    ports: &BTreeSet<u16>| {
            let (protocol, ports) = match proto {
                Protocol::Tcp => (
                    ProtocolConfig::Tcp,
                    Some(
                        ports
                            .iter()
                            .map(|p| PortConfig::Number(i64::from(*p)))
                            .collect(),
                    ),
                ),
                Protocol::Udp => (
                    ProtocolConfig::Udp,
                    Some(
                        ports
                            .iter()
                            .map(|p| PortConfig::Number(i64::from(*p)))
                            .collect(),
                    ),
                ),
                Protocol::Icmp => (ProtocolConfig::Icmp, None),
            };
            RuleConfig {
                domain,
                cidr,
                ports,
                protocol: Some(protocol),
            }
        };
        for ((name, proto), ports) in &by_name {
            cfg.allow
                .push(rule(Some(name.clone()), None, *proto, ports));
        }
        for ((addr, proto), ports) in &by_addr {
            cfg.allow.push(rule(
                None,
                Some(Cidr::host(*addr).to_string()),
                *proto,
                ports,
            ));
        }
        cfg
    }

    /// [`LearnLog::suggest_config`] as TOML text, with a comment listing names that were
    /// resolved but never connected to (they are not allowed by the suggestion).
    pub fn suggest_toml(&self, base: &Policy) -> String {
        let cfg = self.suggest_config(base);
        let used: BTreeSet<&str> = self
            .flows
            .iter()
            .filter_map(|f| f.name.as_deref())
            .collect();
        let mut out = String::from("# Suggested by learn mode: allows exactly the traffic seen.\n");
        let unused: Vec<&str> = self.names().filter(|n| !used.contains(n)).collect();
        if !unused.is_empty() {
            out.push_str("# Resolved but never connected to (not allowed):\n");
            for n in unused {
                out.push_str("#   ");
                out.push_str(n);
                out.push('\n');
            }
        }
        if self.dropped > 0 {
            out.push_str(&format!(
                "# {} observations were dropped (log full).\n",
                self.dropped
            ));
        }
        // A model of strings, integers and enums always serialises to TOML.
        out.push_str(&toml::to_string(&cfg).expect("policy model serialises to TOML"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::{Oracle, Pins, Verdict};
    use crate::test_utils::{self, ip, net46};
    use proptest::prelude::*;

    #[test]
    fn suggestion_text() {
        let base = Policy::from_toml(
            "default = \"learn\"\n[[allow]]\ndomain = \"pypi.org\"\nports = [443]\n",
        )
        .expect("valid");
        let net = net46();
        let mut pins = Pins::new();
        pins.insert("files.example.net", ip("203.0.113.7"))
            .expect("name");
        let o = Oracle::new(&base, &net, &pins);
        let mut log = LearnLog::new(16);
        for (dst, port, proto, name) in [
            ("203.0.113.7", 443, Protocol::Tcp, Some("files.example.net")),
            (
                "203.0.113.7",
                443,
                Protocol::Tcp,
                Some("FILES.example.net."),
            ), // duplicate
            ("203.0.113.7", 80, Protocol::Tcp, Some("files.example.net")),
            ("198.51.100.9", 0, Protocol::Icmp, None),
            ("10.0.0.1", 443, Protocol::Tcp, None), // reserved: denied, not learned
        ] {
            let d = o.decide(ip(dst), port, proto, name);
            log.observe(&d, ip(dst), port, proto, name);
        }
        assert!(log.observe_name(
            &base.decide_name("never-used.example"),
            "never-used.example"
        ));
        assert!(!log.observe_name(&base.decide_name("pypi.org"), "pypi.org"));
        assert_eq!(log.flows().count(), 3);
        let text = log.suggest_toml(&base);
        assert_eq!(
            text,
            "# Suggested by learn mode: allows exactly the traffic seen.\n\
             # Resolved but never connected to (not allowed):\n\
             #   never-used.example\n\
             default = \"deny\"\n\n\
             [[allow]]\ndomain = \"pypi.org\"\nports = [443]\n\n\
             [[allow]]\ndomain = \"files.example.net\"\nports = [80, 443]\nprotocol = \"tcp\"\n\n\
             [[allow]]\ncidr = \"198.51.100.9/32\"\nprotocol = \"icmp\"\n"
        );
    }

    #[test]
    fn log_is_bounded() {
        let base = Policy::from_toml("default = \"learn\"\n").expect("valid");
        let net = net46();
        let pins = Pins::new();
        let o = Oracle::new(&base, &net, &pins);
        let mut log = LearnLog::new(2);
        for port in 1..=5u16 {
            let d = o.decide(ip("203.0.113.1"), port, Protocol::Tcp, None);
            log.observe(&d, ip("203.0.113.1"), port, Protocol::Tcp, None);
        }
        assert_eq!(log.flows().count(), 2);
        assert_eq!(log.dropped(), 3);
        assert!(log
            .suggest_toml(&base)
            .contains("# 3 observations were dropped"));
    }

    proptest! {
        /// The suggestion parses and allows exactly what the base policy allowed in deny mode
        /// plus the observed (name or address, protocol, port) traffic.
        #[test]
        fn suggestion_allows_exactly_the_observed_traffic(
            mut cfg in test_utils::policy_config(),
            pins in test_utils::pins(),
            picks in proptest::collection::vec((any::<proptest::sample::Index>(), any::<bool>(),
                test_utils::destination(), test_utils::port(), test_utils::protocol()), 0..12),
            probes in proptest::collection::vec((test_utils::destination(), test_utils::port(),
                test_utils::protocol()), 1..24),
        ) {
            cfg.default = DefaultAction::Learn;
            let learn = Policy::try_from(cfg.clone()).expect("valid");
            cfg.default = DefaultAction::Deny;
            let base_deny = Policy::try_from(cfg).expect("valid");
            let net = net46();
            // The resolver pins only names it answers.
            let mut live = Pins::new();
            for (addr, name, _) in pins.iter() {
                if learn.decide_name(name).verdict == crate::NameVerdict::Allowed {
                    live.insert(name, addr).expect("name");
                }
            }
            let entries: Vec<(IpAddr, String)> = live.iter().map(|(a, n, _)| (a, n.to_owned())).collect();
            let o = Oracle::new(&learn, &net, &live);
            let mut log = LearnLog::new(64);
            for (idx, via_name, dst, port, proto) in picks {
                let (dst, name) = match (via_name, entries.is_empty()) {
                    (true, false) => {
                        let (a, n) = &entries[idx.index(entries.len())];
                        (*a, Some(n.as_str()))
                    }
                    _ => (dst, None),
                };
                let d = o.decide(dst, port, proto, name);
                log.observe(&d, dst, port, proto, name);
            }
            let text = log.suggest_toml(&learn);
            let suggested = Policy::from_toml(&text).expect("the suggestion parses");
            let so = Oracle::new(&suggested, &net, &live);
            let bo = Oracle::new(&base_deny, &net, &live);
            let mut all_probes = probes;
            all_probes.extend(log.flows().map(|f| (f.destination, f.port, f.protocol)));
            for (dst, port, proto) in all_probes {
                let dst = crate::addr::normalize_ip(dst);
                let covered = log.flows().any(|f| {
                    f.protocol == proto
                        && (proto == Protocol::Icmp || f.port == port)
                        && match &f.name {
                            None => f.destination == dst,
                            Some(n) => !learn.is_reserved(dst)
                                && !net.host_addrs.contains(&dst)
                                && !net.is_gateway(dst)
                                && live.names(dst).any(|(m, _)| m == n),
                        }
                });
                let base = bo.decide(dst, port, proto, None);
                // A deny rule outranks every allow, learned ones included: an observed name
                // does not open an address the base policy denies by rule.
                let denied_by_rule = matches!(base.reason, crate::decide::Reason::DenyRule(_));
                let want = match base.verdict {
                    Verdict::Resolver => Verdict::Resolver,
                    Verdict::Allow => Verdict::Allow,
                    Verdict::Deny if covered && !denied_by_rule => Verdict::Allow,
                    Verdict::Deny => Verdict::Deny,
                };
                let got = so.decide(dst, port, proto, None);
                prop_assert_eq!(got.verdict, want, "{} {} {:?} {:?}\n{}", dst, port, proto, got, text);
            }
        }
    }
}
