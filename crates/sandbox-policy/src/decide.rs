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
    /// 6. an allow `cidr` rule → allow;
    /// 7. a pin (`destination` was a DNS answer for a name that is allowed now) and an allow
    ///    `domain` rule matching that name and this protocol/port → allow. Pins never count
    ///    for a reserved address, named or not (the resolver does not pin those);
    /// 8. the default: deny, allow, or allow recorded as `Default(Learn)`.
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
        let cidr_match = |rules: &[crate::policy::Rule]| {
            rules.iter().position(|r| {
                matches!(&r.destination, Destination::Cidr(c) if c.contains(dst))
                    && r.service.matches(protocol, port)
            })
        };
        if let Some(i) = cidr_match(self.policy.deny_rules()) {
            return deny(Reason::DenyRule(i));
        }
        if let Some(i) = cidr_match(self.policy.allow_rules()) {
            return allow(Reason::AllowRule(i));
        }
        if !self.policy.is_reserved(dst) {
            let wanted = name.and_then(|n| normalize_name(n).ok());
            let mut best: Option<(bool, usize)> = None;
            for (pinned, _) in self.pins.names(dst) {
                if self.policy.decide_normalized_name(pinned).verdict != NameVerdict::Allowed {
                    continue;
                }
                let first = self.policy.pinning_rules(pinned).into_iter().find(|&i| {
                    self.policy.allow_rules()[i]
                        .service
                        .matches(protocol, port)
                });
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
