//! The reference decision: what the compiled ruleset does to one new connection.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::addr::{normalize_ip, ReservedKind};
use crate::config::DefaultAction;
use crate::name::{normalize_name, NameError};
use crate::policy::{Destination, NameVerdict, Policy};

/// The transport protocol of a connection. `Icmp` is ICMP over IPv4 and ICMPv6 over IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP / ICMPv6 (no port).
    Icmp,
}

impl Protocol {
    /// The nftables `inet_proto` name for this protocol on IPv4 (`v4`) or IPv6.
    pub fn nft_name(self, v4: bool) -> &'static str {
        match (self, v4) {
            (Self::Tcp, _) => "tcp",
            (Self::Udp, _) => "udp",
            (Self::Icmp, true) => "icmp",
            (Self::Icmp, false) => "ipv6-icmp",
        }
    }
}

/// Allowed, refused, or answered by the sandbox's resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The connection goes out (NATed to the uplink).
    Allow,
    /// The connection is refused (TCP reset or ICMP admin-prohibited) and a deny event is due.
    Deny,
    /// TCP/UDP port 53 to any address is redirected to the sandbox's DNS resolver, which
    /// then applies [`Policy::decide_name`].
    Resolver,
}

/// Why a decision was taken. Rule indices are 0-based positions in the `allow`/`deny` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Allowed by this allow rule (a `cidr` rule, or a `domain` rule through a pin).
    AllowRule(usize),
    /// Refused by this deny rule.
    DenyRule(usize),
    /// No rule matched; the default action applied. `Default(Learn)` is an allowed connection
    /// that `deny` would have refused: the thing a [`crate::LearnLog`] records.
    Default(DefaultAction),
    /// The address is always denied (or reserved and not named by an allow rule).
    Reserved(ReservedKind),
    /// The sandbox's gateway, reachable only for DNS.
    Gateway,
    /// Port 53: handled by the resolver.
    Dns,
    /// The query name is not a valid DNS name (resolver only).
    InvalidName,
    /// The guest used a source address that is not its own (packet level only).
    Spoofed,
    /// An IPv6 destination while the sandbox has no IPv6 address.
    Ipv6Disabled,
}

/// The result of [`Oracle::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    /// What happens.
    pub verdict: Verdict,
    /// Why.
    pub reason: Reason,
}

/// The addresses the resolver pinned: which (normalised) names each address was an answer
/// for, with the element timeout in seconds to carry over a policy swap.
///
/// Only the caller knows time: drop expired pins before calling [`Oracle::decide`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    map: BTreeMap<IpAddr, BTreeMap<String, u32>>,
}

/// The element timeout the resolver uses when none is given: 5 minutes (notes D.10 clamp
/// TTLs into 5 min..1 h).
pub const DEFAULT_PIN_TIMEOUT_SECS: u32 = 300;

impl Pins {
    /// No pins.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `ip` was an answer for `name`, with [`DEFAULT_PIN_TIMEOUT_SECS`].
    ///
    /// # Errors
    /// [`NameError`] when `name` is not a valid name.
    pub fn insert(&mut self, name: &str, ip: IpAddr) -> Result<(), NameError> {
        self.insert_with_timeout(name, ip, DEFAULT_PIN_TIMEOUT_SECS)
    }

    /// Records that `ip` was an answer for `name`, to expire after `timeout_secs`.
    ///
    /// # Errors
    /// [`NameError`] when `name` is not a valid name.
    pub fn insert_with_timeout(
        &mut self,
        name: &str,
        ip: IpAddr,
        timeout_secs: u32,
    ) -> Result<(), NameError> {
        let name = normalize_name(name)?;
        self.map
            .entry(normalize_ip(ip))
            .or_default()
            .insert(name, timeout_secs);
        Ok(())
    }

    /// Forgets every pin of `ip`.
    pub fn remove_addr(&mut self, ip: IpAddr) {
        self.map.remove(&normalize_ip(ip));
    }

    /// The names `ip` was pinned for, with their timeouts.
    pub fn names(&self, ip: IpAddr) -> impl Iterator<Item = (&str, u32)> {
        self.map
            .get(&normalize_ip(ip))
            .into_iter()
            .flat_map(|m| m.iter().map(|(n, t)| (n.as_str(), *t)))
    }

    /// Every (address, name, timeout) in address then name order.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &str, u32)> {
        self.map
            .iter()
            .flat_map(|(ip, m)| m.iter().map(move |(n, t)| (*ip, n.as_str(), *t)))
    }

    /// Number of (address, name) pairs.
    pub fn len(&self) -> usize {
        self.map.values().map(BTreeMap::len).sum()
    }

    /// Whether there are no pins.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The sandbox's network parameters: what the compiler and the oracle need besides the
/// policy. The host's addresses are input here; this crate never looks them up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NetParams {
    /// nftables table name (family `inet`), for example `sandbox`.
    pub table: String,
    /// The tap (or test veth) the guest's packets arrive on.
    pub tap: String,
    /// The guest's IPv4 address.
    pub guest4: Ipv4Addr,
    /// The gateway's IPv4 address (the resolver listens on port 53 there).
    pub gateway4: Ipv4Addr,
    /// The guest's IPv6 address; `None` drops all IPv6 from the guest.
    pub guest6: Option<Ipv6Addr>,
    /// The gateway's IPv6 address (needed when `guest6` is set).
    pub gateway6: Option<Ipv6Addr>,
    /// Every address of the host (root netns); always denied.
    pub host_addrs: Vec<IpAddr>,
    /// NFLOG group of deny (and learn) log entries.
    pub log_group: u16,
}

impl NetParams {
    /// IPv4-only parameters with the table name `sandbox`, no host addresses and log group 0.
    pub fn new(tap: impl Into<String>, guest4: Ipv4Addr, gateway4: Ipv4Addr) -> Self {
        Self {
            table: "sandbox".to_owned(),
            tap: tap.into(),
            guest4,
            gateway4,
            guest6: None,
            gateway6: None,
            host_addrs: Vec::new(),
            log_group: 0,
        }
    }

    /// Sets the IPv6 guest and gateway addresses.
    pub fn with_ipv6(mut self, guest6: Ipv6Addr, gateway6: Ipv6Addr) -> Self {
        self.guest6 = Some(guest6);
        self.gateway6 = Some(gateway6);
        self
    }

    /// Sets the host's addresses (normalised).
    pub fn with_host_addrs(mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.host_addrs = addrs.into_iter().map(normalize_ip).collect();
        self.host_addrs.sort();
        self.host_addrs.dedup();
        self
    }

    /// Sets the NFLOG group.
    pub fn with_log_group(mut self, group: u16) -> Self {
        self.log_group = group;
        self
    }

    /// Sets the table name.
    pub fn with_table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    pub(crate) fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => a == self.gateway4,
            IpAddr::V6(a) => Some(a) == self.gateway6,
        }
    }

    pub(crate) fn is_host(&self, ip: IpAddr) -> bool {
        self.host_addrs.contains(&ip)
    }
}

/// The reference model of one sandbox's egress: a policy, its network and the current pins.
/// Every enforcement test compares the kernel's behaviour with [`Oracle::decide`].
#[derive(Debug, Clone, Copy)]
pub struct Oracle<'a> {
    policy: &'a Policy,
    net: &'a NetParams,
    pins: &'a Pins,
}

impl<'a> Oracle<'a> {
    /// Bundles the inputs.
    pub fn new(policy: &'a Policy, net: &'a NetParams, pins: &'a Pins) -> Self {
        Self { policy, net, pins }
    }

    /// Decides a new connection from the guest to `destination`:`port` over `protocol`.
    /// `name` is the name the guest resolved to get `destination`, if any; it only picks which
    /// rule is reported (the kernel sees addresses, not names).
    ///
    /// Order (first match wins), the same as the compiled `prerouting`/`input`/`forward`
    /// chains:
    /// 1. IPv4-mapped IPv6 destinations are their IPv4 address; any other IPv6 destination is
    ///    denied when the sandbox has no IPv6 address ([`Reason::Ipv6Disabled`]);
    /// 2. TCP/UDP port 53 → [`Verdict::Resolver`] (every address, redirected);
    /// 3. the gateway → deny ([`Reason::Gateway`]);
    /// 4. metadata, host addresses, reserved ranges not named by an allow `cidr` rule → deny;
    /// 5. a deny `cidr` rule → deny;
    /// 6. a reserved address that an allow rule named (a `cidr` rule inside one reserved
    ///    block): allowed by such a rule, else denied whatever the default. Wider rules
    ///    (`0.0.0.0/0`) and pins never reach reserved addresses (the resolver does not pin
    ///    them);
    /// 7. an allow `cidr` rule → allow;
    /// 8. a pin (`destination` was a DNS answer for a name that is allowed now) and an allow
    ///    `domain` rule matching that name and this protocol/port → allow;
    /// 9. the default: deny, allow, or allow recorded as `Default(Learn)`.
    pub fn decide(
        &self,
        destination: IpAddr,
        port: u16,
        protocol: Protocol,
        name: Option<&str>,
    ) -> Decision {
        let dst = normalize_ip(destination);
        let deny = |reason| Decision {
            verdict: Verdict::Deny,
            reason,
        };
        let allow = |reason| Decision {
            verdict: Verdict::Allow,
            reason,
        };
        if dst.is_ipv6() && self.net.guest6.is_none() {
            return deny(Reason::Ipv6Disabled);
        }
        if port == 53 && matches!(protocol, Protocol::Tcp | Protocol::Udp) {
            return Decision {
                verdict: Verdict::Resolver,
                reason: Reason::Dns,
            };
        }
        if self.net.is_gateway(dst) {
            return deny(Reason::Gateway);
        }
        match self.policy.reserved_kind(dst) {
            Some(ReservedKind::Metadata) => return deny(Reason::Reserved(ReservedKind::Metadata)),
            _ if self.net.is_host(dst) => return deny(Reason::Reserved(ReservedKind::Host)),
            Some(kind) => return deny(Reason::Reserved(kind)),
            None => {}
        }
        let covers = |r: &crate::policy::Rule| {
            matches!(&r.destination, Destination::Cidr(c) if c.contains(dst))
                && r.service.matches(protocol, port)
        };
        if let Some(i) = self.policy.deny_rules().iter().position(covers) {
            return deny(Reason::DenyRule(i));
        }
        if self.policy.is_reserved(dst) {
            // Named reserved addresses: only the rules naming them allow traffic there.
            let named = (0..self.policy.allow_rules().len())
                .find(|&i| self.policy.names_reserved(i) && covers(&self.policy.allow_rules()[i]));
            return match named {
                Some(i) => allow(Reason::AllowRule(i)),
                None => deny(Reason::Reserved(ReservedKind::Range)),
            };
        }
        if let Some(i) = self.policy.allow_rules().iter().position(covers) {
            return allow(Reason::AllowRule(i));
        }
        {
            let wanted = name.and_then(|n| normalize_name(n).ok());
            let mut best: Option<(bool, usize)> = None;
            for (pinned, _) in self.pins.names(dst) {
                if self.policy.decide_normalized_name(pinned).verdict != NameVerdict::Allowed {
                    continue;
                }
                let first = self
                    .policy
                    .pinning_rules(pinned)
                    .into_iter()
                    .find(|&i| self.policy.allow_rules()[i].service.matches(protocol, port));
                if let Some(i) = first {
                    // Prefer the rule reached through the name the guest used.
                    let key = (wanted.as_deref() != Some(pinned), i);
                    if best.is_none_or(|b| key < b) {
                        best = Some(key);
                    }
                }
            }
            if let Some((_, i)) = best {
                return allow(Reason::AllowRule(i));
            }
        }
        match self.policy.default_action() {
            DefaultAction::Deny => deny(Reason::Default(DefaultAction::Deny)),
            d => allow(Reason::Default(d)),
        }
    }

    /// [`Policy::decide_name`] (the resolver's decision), for symmetry.
    pub fn decide_name(&self, qname: &str) -> crate::policy::NameDecision {
        self.policy.decide_name(qname)
    }

    /// The policy.
    pub fn policy(&self) -> &'a Policy {
        self.policy
    }

    /// The network parameters.
    pub fn net(&self) -> &'a NetParams {
        self.net
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{metadata_blocks, reserved_blocks};
    use crate::policy::Rule;
    use crate::test_utils::{self, ip, net46};
    use proptest::prelude::*;

    fn policy(text: &str) -> Policy {
        Policy::from_toml(text).expect("valid policy")
    }

    #[test]
    fn example_policy_decisions() {
        let p = policy(crate::nft::tests::EXAMPLE);
        let net = net46();
        let mut pins = Pins::new();
        pins.insert("raw.githubusercontent.com", ip("203.0.113.20"))
            .expect("name");
        pins.insert("uploads.example.com", ip("203.0.113.30"))
            .expect("name");
        let o = Oracle::new(&p, &net, &pins);
        let d = |a: &str, port, proto| o.decide(ip(a), port, proto, None);
        assert_eq!(
            d("203.0.113.20", 443, Protocol::Tcp).reason,
            Reason::AllowRule(1)
        );
        assert_eq!(
            d("203.0.113.20", 443, Protocol::Udp).reason,
            Reason::AllowRule(1)
        );
        assert_eq!(
            d("203.0.113.20", 80, Protocol::Tcp).reason,
            Reason::Default(DefaultAction::Deny)
        );
        assert_eq!(d("203.0.113.20", 0, Protocol::Icmp).verdict, Verdict::Deny);
        // A pin under a refused name does not count.
        assert_eq!(d("203.0.113.30", 443, Protocol::Tcp).verdict, Verdict::Deny);
        assert_eq!(
            d("198.51.100.9", 8099, Protocol::Tcp).reason,
            Reason::AllowRule(2)
        );
        assert_eq!(
            d("198.51.100.9", 8099, Protocol::Udp).verdict,
            Verdict::Deny
        );
        assert_eq!(
            d("198.51.100.9", 53, Protocol::Udp).verdict,
            Verdict::Resolver
        );
        assert_eq!(d("172.30.0.1", 22, Protocol::Tcp).reason, Reason::Gateway);
        assert_eq!(
            d("192.0.2.10", 443, Protocol::Tcp).reason,
            Reason::Reserved(ReservedKind::Host)
        );
        assert_eq!(
            d("fd00:ec2::254", 80, Protocol::Tcp).reason,
            Reason::Reserved(ReservedKind::Metadata)
        );
        assert_eq!(
            d("10.0.0.1", 443, Protocol::Tcp).reason,
            Reason::Reserved(ReservedKind::Range)
        );
        let v4only = NetParams::new("tap0", ip("172.30.0.2").to_v4(), ip("172.30.0.1").to_v4());
        let o4 = Oracle::new(&p, &v4only, &pins);
        assert_eq!(
            o4.decide(ip("2001:db8::1"), 53, Protocol::Udp, None).reason,
            Reason::Ipv6Disabled
        );
    }

    use crate::test_utils::Fam;

    #[test]
    fn named_reserved_block_opens_only_itself_and_never_metadata() {
        let p = policy(
            "[[allow]]\ncidr = \"10.1.0.0/16\"\n[[allow]]\ncidr = \"169.254.0.0/16\"\n[[allow]]\ncidr = \"0.0.0.0/0\"\n",
        );
        let net = net46();
        let pins = Pins::new();
        let o = Oracle::new(&p, &net, &pins);
        assert_eq!(
            o.decide(ip("10.1.2.3"), 5432, Protocol::Tcp, None).reason,
            Reason::AllowRule(0)
        );
        assert_eq!(
            o.decide(ip("10.2.0.1"), 5432, Protocol::Tcp, None).verdict,
            Verdict::Deny
        );
        assert_eq!(
            o.decide(ip("169.254.1.1"), 80, Protocol::Tcp, None).reason,
            Reason::AllowRule(1)
        );
        assert_eq!(
            o.decide(ip("169.254.169.254"), 80, Protocol::Tcp, None)
                .reason,
            Reason::Reserved(ReservedKind::Metadata)
        );
        assert_eq!(
            o.decide(ip("8.8.8.8"), 80, Protocol::Tcp, None).reason,
            Reason::AllowRule(2)
        );
    }

    #[test]
    fn pins_prefer_the_name_used_and_skip_reserved() {
        let p = policy(
            "[[allow]]\ndomain = \"a.test\"\nports = [443]\n[[allow]]\ndomain = \"b.test\"\n",
        );
        let net = net46();
        let mut pins = Pins::new();
        pins.insert("a.test", ip("203.0.113.1")).expect("name");
        pins.insert("b.test", ip("203.0.113.1")).expect("name");
        pins.insert("a.test", ip("10.0.0.1")).expect("name");
        let o = Oracle::new(&p, &net, &pins);
        assert_eq!(
            o.decide(ip("203.0.113.1"), 443, Protocol::Tcp, Some("b.test"))
                .reason,
            Reason::AllowRule(1)
        );
        assert_eq!(
            o.decide(ip("203.0.113.1"), 443, Protocol::Tcp, None).reason,
            Reason::AllowRule(0)
        );
        // Same address, another name's rule: the kernel cannot tell names apart (documented).
        assert_eq!(
            o.decide(ip("203.0.113.1"), 22, Protocol::Tcp, Some("a.test"))
                .reason,
            Reason::AllowRule(1)
        );
        assert_eq!(
            o.decide(ip("10.0.0.1"), 443, Protocol::Tcp, Some("a.test"))
                .verdict,
            Verdict::Deny
        );
    }

    fn cidr_rule_covers(r: &Rule, dst: IpAddr, proto: Protocol, port: u16) -> bool {
        matches!(&r.destination, Destination::Cidr(c) if c.contains(dst))
            && r.service.matches(proto, port)
    }

    proptest! {
        #[test]
        fn deny_wins(cfg in test_utils::policy_config(), pins in test_utils::pins(),
                     dst in test_utils::destination(), port in test_utils::port(),
                     proto in test_utils::protocol()) {
            let p = Policy::try_from(cfg).expect("generated policies are valid");
            let net = net46();
            let d = Oracle::new(&p, &net, &pins).decide(dst, port, proto, None);
            if d.verdict == Verdict::Allow {
                prop_assert!(!p.deny_rules().iter().any(|r| cidr_rule_covers(r, dst, proto, port)));
                if let Reason::AllowRule(i) = d.reason {
                    if let Destination::Domain(_) = p.allow_rules()[i].destination {
                        // Reached through a pin whose name no deny rule names.
                        let ok = pins.names(dst).any(|(n, _)| {
                            p.decide_name(n).verdict == NameVerdict::Allowed
                                && p.allow_rules()[i].destination_matches_name(n)
                        });
                        prop_assert!(ok);
                    }
                }
            }
        }

        #[test]
        fn reserved_never_allowed_unless_named(cfg in test_utils::policy_config(),
                     pins in test_utils::pins(), dst in test_utils::destination(),
                     port in test_utils::port(), proto in test_utils::protocol()) {
            let p = Policy::try_from(cfg).expect("generated policies are valid");
            let net = net46();
            let d = Oracle::new(&p, &net, &pins).decide(dst, port, proto, None);
            let dst = normalize_ip(dst);
            let never = metadata_blocks().iter().any(|m| m.contains(dst)) || net.host_addrs.contains(&dst);
            if never {
                prop_assert_ne!(d.verdict, Verdict::Allow);
            }
            let blocks = reserved_blocks();
            if d.verdict == Verdict::Allow && blocks.iter().any(|b| b.contains(dst)) {
                let Reason::AllowRule(i) = d.reason else {
                    return Err(TestCaseError::fail(format!("reserved {dst} allowed by {:?}", d.reason)));
                };
                let r = &p.allow_rules()[i];
                let Destination::Cidr(c) = &r.destination else {
                    return Err(TestCaseError::fail("reserved address allowed through a pin"));
                };
                prop_assert!(blocks.iter().any(|b| b.interval().covers(&c.interval())));
            }
        }

        #[test]
        fn ipv4_mapped_is_ipv4(cfg in test_utils::policy_config(), pins in test_utils::pins(),
                     v4 in any::<u32>(), pick in proptest::sample::select(test_utils::DESTS),
                     use_pool in any::<bool>(), port in test_utils::port(),
                     proto in test_utils::protocol()) {
            let p = Policy::try_from(cfg).expect("generated policies are valid");
            let net = net46();
            let v4 = match (use_pool, ip(pick)) {
                (true, IpAddr::V4(a)) => a,
                _ => std::net::Ipv4Addr::from(v4),
            };
            let o = Oracle::new(&p, &net, &pins);
            prop_assert_eq!(
                o.decide(IpAddr::V6(v4.to_ipv6_mapped()), port, proto, None),
                o.decide(IpAddr::V4(v4), port, proto, None)
            );
        }

        #[test]
        fn wildcard_matches_deeper_names_only(labels in proptest::collection::vec("[a-z0-9]{1,8}", 1..4),
                     suffix in proptest::collection::vec("[a-z]{1,8}", 1..3)) {
            let suffix = suffix.join(".");
            let p = policy(&format!("[[allow]]\ndomain = \"*.{suffix}\"\n"));
            let deeper = format!("{}.{suffix}", labels.join("."));
            prop_assert_eq!(p.decide_name(&deeper).verdict, NameVerdict::Allowed);
            prop_assert_eq!(p.decide_name(&suffix).verdict, NameVerdict::Refused);
            let sibling = format!("{}{suffix}", labels[0]);
            prop_assert_eq!(p.decide_name(&sibling).verdict, NameVerdict::Refused);
        }
    }
}
