//! Compiling a policy to one nftables `inet` table (libnftables JSON via the `nftables` crate).
//!
//! The table lives in the sandbox's netns. See `docs/policy.md` for the chain layout; in short:
//! `prerouting` redirects DNS to the gateway resolver, `input` admits only DNS to the gateway,
//! `forward` (policy drop) runs spoof check → reserved → deny → allow → pinned → default, and
//! `postrouting` masquerades. Each denial jumps to a `deny_<class>` chain that logs to the
//! NFLOG group (rate-limited) with the prefix [`LogClass::prefix`] and rejects.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use nftables::expr::{
    Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix, Range,
    SetItem, CT,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetFlag,
    SetType, SetTypeValue, Table,
};
use nftables::stmt::{JumpTarget, Limit, Log, Match, NATFamily, Operator, Reject, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde::{Deserialize, Serialize};

use crate::addr::{Cidr, Interval, IntervalSet};
use crate::config::{DefaultAction, ProtocolConfig};
use crate::decide::{NetParams, Pins, Protocol, Reason};
use crate::policy::{Destination, PolicyWarning, Service};
use crate::Policy;

/// Deny log entries per second per class, and their burst (NFLOG is guest-driven).
pub const LOG_RATE_PER_SECOND: u32 = 20;
/// Burst of [`LOG_RATE_PER_SECOND`].
pub const LOG_BURST: u32 = 40;

/// What a log entry from the sandbox's NFLOG group means, from its prefix. The reader then
/// calls [`crate::Oracle::decide`] on the packet's fields for the exact rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogClass {
    /// Source address not the guest's (or IPv6 without an IPv6 address).
    Spoof,
    /// Reserved, metadata or host address.
    Reserved,
    /// A deny `cidr` rule.
    Rule,
    /// No rule allowed it, default deny.
    Default,
    /// The gateway on a port other than 53.
    Gateway,
    /// Learn mode: allowed, but deny would have refused it.
    Learn,
}

impl LogClass {
    const ALL: [LogClass; 6] = [
        Self::Spoof,
        Self::Reserved,
        Self::Rule,
        Self::Default,
        Self::Gateway,
        Self::Learn,
    ];

    /// The NFLOG prefix, for example `"sbx-reserved "`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Spoof => "sbx-spoof ",
            Self::Reserved => "sbx-reserved ",
            Self::Rule => "sbx-rule ",
            Self::Default => "sbx-default ",
            Self::Gateway => "sbx-gateway ",
            Self::Learn => "sbx-learn ",
        }
    }

    /// The class of an NFLOG prefix (trailing spaces and NULs ignored).
    pub fn from_prefix(prefix: &str) -> Option<Self> {
        let p = prefix.trim_end_matches(['\0', ' ']);
        Self::ALL.into_iter().find(|c| c.prefix().trim_end() == p)
    }

    /// The reason this class stands for when it names one without the packet's details
    /// (`Reserved` and `Rule` need [`crate::Oracle::decide`] for the kind or rule index).
    pub fn reason(self) -> Option<Reason> {
        match self {
            Self::Spoof => Some(Reason::Spoofed),
            Self::Default => Some(Reason::Default(DefaultAction::Deny)),
            Self::Gateway => Some(Reason::Gateway),
            Self::Learn => Some(Reason::Default(DefaultAction::Learn)),
            Self::Reserved | Self::Rule => None,
        }
    }

    /// The regular chain of this class in the compiled table (`deny_<class>`, or `learn`):
    /// what an enforcement layer jumps to when it adds a rule of its own.
    pub fn chain(self) -> &'static str {
        match self {
            Self::Spoof => "deny_spoof",
            Self::Reserved => "deny_reserved",
            Self::Rule => "deny_rule",
            Self::Default => "deny_default",
            Self::Gateway => "deny_gateway",
            Self::Learn => "learn",
        }
    }
}

/// The addresses of one DNS answer split by whether they were pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinBatch {
    /// The batch adding the pinned elements; `None` when nothing is pinned.
    pub batch: Option<Nftables<'static>>,
    /// Addresses pinned (normalised).
    pub pinned: Vec<IpAddr>,
    /// Addresses not pinned because they are reserved, metadata or host addresses (DNS
    /// rebinding protection); the resolver should drop them from the answer.
    pub refused: Vec<IpAddr>,
}

/// A policy compiled for one sandbox network.
#[derive(Debug, Clone)]
pub struct Ruleset {
    policy: Policy,
    net: NetParams,
    /// Distinct services of allow `domain` rules; class `k` has sets `svc_k`, `pinned4_k`,
    /// `pinned6_k`.
    classes: Vec<Service>,
    /// For each allow rule, its class (domain rules only).
    class_of_rule: Vec<Option<usize>>,
    objects: Vec<NfObject<'static>>,
    warnings: Vec<PolicyWarning>,
}

impl Ruleset {
    /// Compiles `policy` for the network `net`.
    pub fn compile(policy: &Policy, net: &NetParams) -> Self {
        let mut classes: Vec<Service> = Vec::new();
        let mut class_of_rule = Vec::new();
        for r in policy.allow_rules() {
            class_of_rule.push(match &r.destination {
                Destination::Domain(_) => {
                    Some(match classes.iter().position(|s| *s == r.service) {
                        Some(k) => k,
                        None => {
                            classes.push(r.service.clone());
                            classes.len() - 1
                        }
                    })
                }
                Destination::Cidr(_) => None,
            });
        }
        let mut rs = Self {
            policy: policy.clone(),
            net: net.clone(),
            classes,
            class_of_rule,
            objects: Vec::new(),
            warnings: policy.host_warnings(&net.host_addrs),
        };
        rs.objects = rs.build();
        rs
    }

    /// The policy this was compiled from.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The network parameters this was compiled for.
    pub fn net(&self) -> &NetParams {
        &self.net
    }

    /// Warnings about the policy on this host (allow rules covering host addresses).
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// The number of pin classes (distinct services of allow `domain` rules).
    pub fn pin_classes(&self) -> usize {
        self.classes.len()
    }

    /// The batch that installs this policy, or atomically replaces whatever table of the same
    /// name is there: `add table` (so the next command cannot fail), `delete table`, then the
    /// whole table, then the pins of `carry` that this policy still allows (with their
    /// timeouts). nftables applies a batch as one transaction, so packets see either the old
    /// table or the new one, never a mix or an empty table. Connections already established
    /// keep their conntrack entries and are accepted by the new table.
    pub fn batch(&self, carry: &Pins) -> Nftables<'static> {
        let mut objects = self.objects.clone();
        for (ip, name, timeout) in carry.iter() {
            if let Some(b) = self.pin_objects(name, &[ip], timeout).batch {
                objects.extend(b.objects.into_owned());
            }
        }
        Nftables {
            objects: Cow::Owned(objects),
        }
    }

    /// The batch that replaces the running table compiled as `previous` (same
    /// [`NetParams`]) with this policy **without deleting the table**: `flush table` (every
    /// rule), `flush set` of each of `previous`'s sets, `delete set` of its pin classes this
    /// policy does not have, then this policy's sets (new ones are created, existing ones
    /// kept), chains (kept: same types, hooks and priorities), rules and elements, and the
    /// pins of `carry` this policy allows.
    ///
    /// Like [`Ruleset::batch`] it is one transaction, so packets see one policy or the other;
    /// unlike it, the base chains stay registered throughout. Deleting and re-adding a table
    /// unregisters its `nat` hooks for a moment inside the commit, and a connection whose
    /// first packet falls in that moment gets no NAT binding (no masquerade) and fails:
    /// never more than either policy allows, but less. Use this for every swap after the
    /// first install.
    pub fn swap_batch(&self, previous: &Ruleset, carry: &Pins) -> Nftables<'static> {
        let mut objects = vec![
            add(NfListObject::Table(self.table())),
            NfObject::CmdObject(NfCmd::Flush(FlushObject::Table(self.table()))),
        ];
        let mine = self.set_names();
        for name in previous.set_names() {
            let set = Box::new(Set {
                family: NfFamily::INet,
                table: Cow::Owned(self.net.table.clone()),
                name: Cow::Owned(name.clone()),
                ..Set::default()
            });
            objects.push(NfObject::CmdObject(if mine.contains(&name) {
                NfCmd::Flush(FlushObject::Set(set))
            } else {
                NfCmd::Delete(NfListObject::Set(set))
            }));
        }
        // Skip the install prologue (add table, delete table, add table).
        objects.extend(self.objects.iter().skip(3).cloned());
        for (ip, name, timeout) in carry.iter() {
            if let Some(b) = self.pin_objects(name, &[ip], timeout).batch {
                objects.extend(b.objects.into_owned());
            }
        }
        Nftables {
            objects: Cow::Owned(objects),
        }
    }

    /// Names of the sets this ruleset creates.
    fn set_names(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter_map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(NfListObject::Set(s))) => {
                    Some(s.name.clone().into_owned())
                }
                _ => None,
            })
            .collect()
    }

    /// [`Ruleset::batch`] as the JSON text `nft -j -f -` reads.
    pub fn to_json(&self, carry: &Pins) -> String {
        // Serialising these plain data types to a String cannot fail.
        serde_json::to_string(&self.batch(carry)).expect("nftables schema serialises")
    }

    /// The batch that pins the answers `addrs` of the allowed name `name`, with an element
    /// timeout of `timeout_secs`. The resolver runs it **before** sending the answer.
    ///
    /// Addresses go into `pinned4_k`/`pinned6_k` for every class `k` of the allow `domain`
    /// rules matching `name`. Nothing is pinned for a refused name, and reserved, metadata
    /// and host addresses are never pinned (they are listed in [`PinBatch::refused`]).
    pub fn pin_batch(&self, name: &str, addrs: &[IpAddr], timeout_secs: u32) -> PinBatch {
        match crate::name::normalize_name(name) {
            Ok(n) => self.pin_objects(&n, addrs, timeout_secs),
            Err(_) => PinBatch {
                batch: None,
                pinned: Vec::new(),
                refused: Vec::new(),
            },
        }
    }

    fn pin_objects(&self, name: &str, addrs: &[IpAddr], timeout_secs: u32) -> PinBatch {
        let classes: BTreeSet<usize> = self
            .policy
            .pinning_rules(name)
            .into_iter()
            .filter_map(|i| self.class_of_rule.get(i).copied().flatten())
            .collect();
        let mut pinned = Vec::new();
        let mut refused = Vec::new();
        let mut by_set: BTreeMap<String, Vec<Expression<'static>>> = BTreeMap::new();
        for ip in addrs.iter().map(|a| crate::addr::normalize_ip(*a)) {
            let blocked = self.policy.is_reserved(ip)
                || self.net.is_host(ip)
                || self.net.is_gateway(ip)
                || (ip.is_ipv6() && self.net.guest6.is_none());
            if blocked || classes.is_empty() {
                if blocked {
                    refused.push(ip);
                }
                continue;
            }
            pinned.push(ip);
            for k in &classes {
                let set = if ip.is_ipv4() {
                    format!("pinned4_{k}")
                } else {
                    format!("pinned6_{k}")
                };
                by_set
                    .entry(set)
                    .or_default()
                    .push(Expression::Named(NamedExpression::Elem(Elem {
                        val: Box::new(s(ip.to_string())),
                        timeout: Some(timeout_secs),
                        expires: None,
                        comment: None,
                        counter: None,
                    })));
            }
        }
        let objects: Vec<NfObject<'static>> = by_set
            .into_iter()
            .map(|(set, elem)| {
                add(NfListObject::Element(Element {
                    family: NfFamily::INet,
                    table: Cow::Owned(self.net.table.clone()),
                    name: Cow::Owned(set),
                    elem: Cow::Owned(elem),
                }))
            })
            .collect();
        PinBatch {
            batch: (!objects.is_empty()).then(|| Nftables {
                objects: Cow::Owned(objects),
            }),
            pinned,
            refused,
        }
    }

    fn build(&self) -> Vec<NfObject<'static>> {
        let net = &self.net;
        let table = net.table.clone();
        let v6 = net.guest6.is_some();
        let mut o: Vec<NfObject<'static>> = vec![
            add(NfListObject::Table(self.table())),
            NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(self.table()))),
            add(NfListObject::Table(self.table())),
        ];

        // Sets.
        let host = IntervalSet::from_intervals(net.host_addrs.iter().map(|a| Interval::single(*a)));
        let reserved = IntervalSet::from_intervals(
            self.policy
                .closed()
                .intervals()
                .iter()
                .chain(host.intervals())
                .copied(),
        );
        for fam4 in [true, false] {
            let f = if fam4 { "4" } else { "6" };
            let addr_t = if fam4 {
                SetType::Ipv4Addr
            } else {
                SetType::Ipv6Addr
            };
            let reserved_elems: Vec<Expression<'static>> = reserved
                .intervals()
                .iter()
                .filter(|i| i.v4 == fam4)
                .map(interval_expr)
                .collect();
            o.push(self.set(
                &format!("reserved{f}"),
                vec![addr_t],
                SetFlag::Interval,
                reserved_elems,
            ));
            let named_elems: Vec<Expression<'static>> = self
                .policy
                .holes()
                .subtract(&host)
                .intervals()
                .iter()
                .filter(|i| i.v4 == fam4)
                .map(interval_expr)
                .collect();
            o.push(self.set(
                &format!("named{f}"),
                vec![addr_t],
                SetFlag::Interval,
                named_elems,
            ));
            let (deny_addr, deny_boxes) = self.cidr_rules(self.policy.deny_rules(), fam4, true);
            o.push(self.set(
                &format!("deny_addr{f}"),
                vec![addr_t],
                SetFlag::Interval,
                deny_addr,
            ));
            let concat = vec![addr_t, SetType::InetProto, SetType::InetService];
            o.push(self.set(
                &format!("deny{f}"),
                concat.clone(),
                SetFlag::Interval,
                deny_boxes,
            ));
            let allow = self.policy.allow_rules();
            let (named, wide): (Vec<_>, Vec<_>) =
                (0..allow.len()).partition(|&i| self.policy.names_reserved(i));
            let pick = |idx: Vec<usize>| {
                idx.into_iter()
                    .map(|i| allow[i].clone())
                    .collect::<Vec<_>>()
            };
            let (_, named_boxes) = self.cidr_rules(&pick(named), fam4, false);
            o.push(self.set(
                &format!("allow_named{f}"),
                concat.clone(),
                SetFlag::Interval,
                named_boxes,
            ));
            let (_, allow_boxes) = self.cidr_rules(&pick(wide), fam4, false);
            o.push(self.set(&format!("allow{f}"), concat, SetFlag::Interval, allow_boxes));
        }
        for (k, svc) in self.classes.iter().enumerate() {
            o.push(self.set(
                &format!("svc_{k}"),
                vec![SetType::InetProto, SetType::InetService],
                SetFlag::Interval,
                service_elems(svc),
            ));
            for (f, t) in [("4", SetType::Ipv4Addr), ("6", SetType::Ipv6Addr)] {
                o.push(self.set(
                    &format!("pinned{f}_{k}"),
                    vec![t],
                    SetFlag::Timeout,
                    Vec::new(),
                ));
            }
        }

        // Chains.
        let base = |name: &str, ty: NfChainType, hook: NfHook, prio: i32, policy: NfChainPolicy| {
            add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: Cow::Owned(table.clone()),
                name: Cow::Owned(name.to_owned()),
                _type: Some(ty),
                hook: Some(hook),
                prio: Some(prio),
                policy: Some(policy),
                ..Chain::default()
            }))
        };
        o.push(base(
            "prerouting",
            NfChainType::NAT,
            NfHook::Prerouting,
            -100,
            NfChainPolicy::Accept,
        ));
        o.push(base(
            "input",
            NfChainType::Filter,
            NfHook::Input,
            0,
            NfChainPolicy::Drop,
        ));
        o.push(base(
            "forward",
            NfChainType::Filter,
            NfHook::Forward,
            0,
            NfChainPolicy::Drop,
        ));
        o.push(base(
            "postrouting",
            NfChainType::NAT,
            NfHook::Postrouting,
            100,
            NfChainPolicy::Accept,
        ));
        let regular = |name: &str| {
            add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: Cow::Owned(table.clone()),
                name: Cow::Owned(name.to_owned()),
                ..Chain::default()
            }))
        };
        o.push(regular("reject"));
        for c in LogClass::ALL {
            o.push(regular(c.chain()));
        }

        // prerouting: every DNS query from the guest goes to the gateway's resolver.
        let dns = || {
            vec![
                eq(meta(MetaKey::Iifname), s(net.tap.clone())),
                eq(meta(MetaKey::L4proto), anon_set(&["tcp", "udp"])),
                eq(payload("th", "dport"), Expression::Number(53)),
            ]
        };
        let mut r = vec![eq(meta(MetaKey::Nfproto), s("ipv4"))];
        r.extend(dns());
        r.push(Statement::DNAT(Some(NAT {
            addr: Some(s(net.gateway4.to_string())),
            family: Some(NATFamily::IP),
            port: Some(Expression::Number(53)),
            flags: None,
        })));
        o.push(self.rule("prerouting", r));
        if let Some(gw6) = net.gateway6.filter(|_| v6) {
            let mut r = vec![eq(meta(MetaKey::Nfproto), s("ipv6"))];
            r.extend(dns());
            r.push(Statement::DNAT(Some(NAT {
                addr: Some(s(gw6.to_string())),
                family: Some(NATFamily::IP6),
                port: Some(Expression::Number(53)),
                flags: None,
            })));
            o.push(self.rule("prerouting", r));
        }

        // input: only DNS to the gateway (and IPv6 neighbour discovery) from the guest.
        o.push(self.rule(
            "input",
            vec![ct_state(&["established", "related"]), accept()],
        ));
        o.push(self.rule("input", vec![ct_state(&["invalid"]), drop()]));
        o.push(self.rule("input", vec![eq(meta(MetaKey::Iifname), s("lo")), accept()]));
        let mut r = dns();
        r.insert(1, eq(payload("ip", "daddr"), s(net.gateway4.to_string())));
        r.push(accept());
        o.push(self.rule("input", r));
        if let Some(gw6) = net.gateway6.filter(|_| v6) {
            let mut r = dns();
            r.insert(1, eq(payload("ip6", "daddr"), s(gw6.to_string())));
            r.push(accept());
            o.push(self.rule("input", r));
            o.push(self.rule(
                "input",
                vec![
                    eq(meta(MetaKey::Iifname), s(net.tap.clone())),
                    eq(
                        payload("icmpv6", "type"),
                        anon_set(&[
                            "nd-router-solicit",
                            "nd-neighbor-solicit",
                            "nd-neighbor-advert",
                        ]),
                    ),
                    accept(),
                ],
            ));
        }
        o.push(self.rule(
            "input",
            vec![
                eq(meta(MetaKey::Iifname), s(net.tap.clone())),
                goto(LogClass::Gateway.chain()),
            ],
        ));

        // forward.
        o.push(self.rule(
            "forward",
            vec![ct_state(&["established", "related"]), accept()],
        ));
        o.push(self.rule("forward", vec![ct_state(&["invalid"]), drop()]));
        o.push(self.rule(
            "forward",
            vec![neq(meta(MetaKey::Iifname), s(net.tap.clone())), drop()],
        ));
        o.push(self.rule(
            "forward",
            vec![
                neq(payload("ip", "saddr"), s(net.guest4.to_string())),
                goto(LogClass::Spoof.chain()),
            ],
        ));
        match net.guest6 {
            Some(g6) => o.push(self.rule(
                "forward",
                vec![
                    neq(payload("ip6", "saddr"), s(g6.to_string())),
                    goto(LogClass::Spoof.chain()),
                ],
            )),
            None => o.push(self.rule(
                "forward",
                vec![
                    eq(meta(MetaKey::Nfproto), s("ipv6")),
                    goto(LogClass::Spoof.chain()),
                ],
            )),
        }
        let tuple = |ip: &'static str| {
            Expression::Named(NamedExpression::Concat(vec![
                payload(ip, "daddr"),
                meta(MetaKey::L4proto),
                payload("th", "dport"),
            ]))
        };
        let fams: &[(&str, &str)] = if v6 {
            &[("ip", "4"), ("ip6", "6")]
        } else {
            &[("ip", "4")]
        };
        for (ip, f) in fams {
            o.push(self.rule(
                "forward",
                vec![
                    eq(payload(ip, "daddr"), set_ref(&format!("reserved{f}"))),
                    goto(LogClass::Reserved.chain()),
                ],
            ));
        }
        for (ip, f) in fams {
            o.push(self.rule(
                "forward",
                vec![
                    eq(payload(ip, "daddr"), set_ref(&format!("deny_addr{f}"))),
                    goto(LogClass::Rule.chain()),
                ],
            ));
            o.push(self.rule(
                "forward",
                vec![
                    eq(tuple(ip), set_ref(&format!("deny{f}"))),
                    goto(LogClass::Rule.chain()),
                ],
            ));
        }
        for (ip, f) in fams {
            o.push(self.rule(
                "forward",
                vec![eq(tuple(ip), set_ref(&format!("allow_named{f}"))), accept()],
            ));
        }
        for (ip, f) in fams {
            o.push(self.rule(
                "forward",
                vec![
                    eq(payload(ip, "daddr"), set_ref(&format!("named{f}"))),
                    goto(LogClass::Reserved.chain()),
                ],
            ));
        }
        for (ip, f) in fams {
            o.push(self.rule(
                "forward",
                vec![eq(tuple(ip), set_ref(&format!("allow{f}"))), accept()],
            ));
        }
        for k in 0..self.classes.len() {
            for (ip, f) in fams {
                o.push(self.rule(
                    "forward",
                    vec![
                        eq(payload(ip, "daddr"), set_ref(&format!("pinned{f}_{k}"))),
                        eq(
                            Expression::Named(NamedExpression::Concat(vec![
                                meta(MetaKey::L4proto),
                                payload("th", "dport"),
                            ])),
                            set_ref(&format!("svc_{k}")),
                        ),
                        accept(),
                    ],
                ));
            }
        }
        o.push(self.rule(
            "forward",
            vec![match self.policy.default_action() {
                DefaultAction::Deny => goto(LogClass::Default.chain()),
                DefaultAction::Allow => accept(),
                DefaultAction::Learn => goto(LogClass::Learn.chain()),
            }],
        ));

        // postrouting: the guest's traffic leaves with the netns's uplink address.
        o.push(self.rule(
            "postrouting",
            vec![
                neq(meta(MetaKey::Oifname), s(net.tap.clone())),
                eq(payload("ip", "saddr"), s(net.guest4.to_string())),
                Statement::Masquerade(None),
            ],
        ));
        if let Some(g6) = net.guest6 {
            o.push(self.rule(
                "postrouting",
                vec![
                    neq(meta(MetaKey::Oifname), s(net.tap.clone())),
                    eq(payload("ip6", "saddr"), s(g6.to_string())),
                    Statement::Masquerade(None),
                ],
            ));
        }

        // Deny chains: log (rate-limited) then reject; learn: log then accept.
        for c in LogClass::ALL {
            o.push(self.rule(
                c.chain(),
                vec![
                    Statement::Limit(Limit {
                        rate: LOG_RATE_PER_SECOND,
                        rate_unit: None,
                        per: Some(Cow::Borrowed("second")),
                        burst: Some(LOG_BURST),
                        burst_unit: None,
                        inv: None,
                    }),
                    Statement::Log(Some(Log {
                        prefix: Some(Cow::Borrowed(c.prefix())),
                        group: Some(u32::from(net.log_group)),
                        ..Log::new(None)
                    })),
                ],
            ));
            o.push(self.rule(
                c.chain(),
                vec![if c == LogClass::Learn {
                    accept()
                } else {
                    goto("reject")
                }],
            ));
        }
        o.push(self.rule(
            "reject",
            vec![
                eq(meta(MetaKey::L4proto), s("tcp")),
                Statement::Reject(Some(Reject::new(
                    Some(nftables::stmt::RejectType::TCPReset),
                    None,
                ))),
            ],
        ));
        o.push(self.rule(
            "reject",
            vec![Statement::Reject(Some(Reject::new(
                Some(nftables::stmt::RejectType::ICMPX),
                Some(RejectCode::AdminProhibited),
            )))],
        ));
        o
    }

    /// Elements for the `cidr` rules of one family: address-only elements (protocol `any`
    /// without ports, only collected when `addr_only`) and disjoint `addr . proto . port`
    /// boxes for the rest.
    fn cidr_rules(
        &self,
        rules: &[crate::policy::Rule],
        fam4: bool,
        addr_only: bool,
    ) -> (Vec<Expression<'static>>, Vec<Expression<'static>>) {
        let mut whole: Vec<Interval> = Vec::new();
        let mut boxes: BTreeMap<Protocol, Vec<PortBox>> = BTreeMap::new();
        for r in rules {
            let Destination::Cidr(c) = &r.destination else {
                continue;
            };
            if c.is_ipv4() != fam4 {
                continue;
            }
            if addr_only && r.service.protocol == ProtocolConfig::Any && r.service.ports.is_none() {
                whole.push(c.interval());
                continue;
            }
            for p in r.service.protocols() {
                boxes
                    .entry(p)
                    .or_default()
                    .push((c.interval(), ports_of(&r.service, p)));
            }
        }
        let whole_set = IntervalSet::from_intervals(whole);
        let addr_elems = whole_set.intervals().iter().map(interval_expr).collect();
        let mut elems = Vec::new();
        for (proto, items) in boxes {
            for (iv, ports) in disjoint_boxes(&items, fam4) {
                for (lo, hi) in ports {
                    elems.push(Expression::Named(NamedExpression::Concat(vec![
                        interval_expr(&iv),
                        s(proto.nft_name(fam4)),
                        port_expr(lo, hi),
                    ])));
                }
            }
        }
        (addr_elems, elems)
    }

    fn table(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.net.table.clone()),
            handle: None,
        }
    }

    fn set(
        &self,
        name: &str,
        key: Vec<SetType>,
        flag: SetFlag,
        elems: Vec<Expression<'static>>,
    ) -> NfObject<'static> {
        add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: Cow::Owned(self.net.table.clone()),
            name: Cow::Owned(name.to_owned()),
            set_type: if key.len() == 1 {
                SetTypeValue::Single(key[0])
            } else {
                SetTypeValue::Concatenated(Cow::Owned(key))
            },
            flags: Some([flag].into_iter().collect()),
            elem: (!elems.is_empty()).then_some(Cow::Owned(elems)),
            ..Set::default()
        })))
    }

    fn rule(&self, chain: &str, expr: Vec<Statement<'static>>) -> NfObject<'static> {
        add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Owned(self.net.table.clone()),
            chain: Cow::Owned(chain.to_owned()),
            expr: Cow::Owned(expr),
            ..Rule::default()
        }))
    }
}

/// An address interval with its port ranges.
type PortBox = (Interval, Vec<(u16, u16)>);

/// Port ranges of `service` for `proto`: the given ranges, every port, or (ICMP) the whole
/// 16-bit field `th dport` reads there.
fn ports_of(service: &Service, proto: Protocol) -> Vec<(u16, u16)> {
    match (&service.ports, proto) {
        (Some(v), Protocol::Tcp | Protocol::Udp) => v.iter().map(|r| (r.start, r.end)).collect(),
        _ => vec![(0, u16::MAX)],
    }
}

fn service_elems(svc: &Service) -> Vec<Expression<'static>> {
    let mut out = Vec::new();
    for p in svc.protocols() {
        let names: &[&'static str] = match p {
            Protocol::Icmp => &["icmp", "ipv6-icmp"],
            Protocol::Tcp => &["tcp"],
            Protocol::Udp => &["udp"],
        };
        for name in names {
            for (lo, hi) in ports_of(svc, p) {
                out.push(Expression::Named(NamedExpression::Concat(vec![
                    s(*name),
                    port_expr(lo, hi),
                ])));
            }
        }
    }
    out
}

/// Splits possibly overlapping (address interval, port ranges) items into disjoint boxes:
/// pipapo interval sets refuse elements that partially overlap one already in the set.
fn disjoint_boxes(items: &[PortBox], fam4: bool) -> Vec<PortBox> {
    let top: u128 = if fam4 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    let mut points: BTreeSet<u128> = BTreeSet::new();
    for (iv, _) in items {
        points.insert(iv.lo);
        if iv.hi < top {
            points.insert(iv.hi + 1);
        }
    }
    let points: Vec<u128> = points.into_iter().collect();
    let mut out: Vec<PortBox> = Vec::new();
    for (i, &lo) in points.iter().enumerate() {
        let hi = points.get(i + 1).map_or(top, |n| n - 1);
        let seg = Interval { v4: fam4, lo, hi };
        let mut ports: Vec<(u16, u16)> = items
            .iter()
            .filter(|(iv, _)| iv.covers(&seg))
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        if ports.is_empty() {
            continue;
        }
        ports.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::new();
        for (a, b) in ports {
            match merged.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        match out.last_mut() {
            Some((prev, p)) if *p == merged && prev.hi.checked_add(1) == Some(lo) => prev.hi = hi,
            _ => out.push((seg, merged)),
        }
    }
    out
}

fn add(obj: NfListObject<'static>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(obj))
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn set_ref(name: &str) -> Expression<'static> {
    s(format!("@{name}"))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Owned(protocol.to_owned()),
            field: Cow::Owned(field.to_owned()),
        },
    )))
}

fn anon_set(items: &[&str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.iter().map(|i| SetItem::Element(s(*i))).collect(),
    ))
}

fn cmp(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    cmp(left, right, Operator::EQ)
}

fn neq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    cmp(left, right, Operator::NEQ)
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    cmp(
        Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("state"),
            family: None,
            dir: None,
        })),
        Expression::List(states.iter().map(|x| s(*x)).collect()),
        Operator::IN,
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn goto(chain: &str) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: Cow::Owned(chain.to_owned()),
    })
}

fn interval_expr(iv: &Interval) -> Expression<'static> {
    let cidrs = iv.to_cidrs();
    match cidrs.as_slice() {
        [c] => cidr_expr(c),
        _ => Expression::Range(Box::new(Range {
            range: [
                s(crate::addr::from_u128(iv.lo, iv.v4).to_string()),
                s(crate::addr::from_u128(iv.hi, iv.v4).to_string()),
            ],
        })),
    }
}

fn cidr_expr(c: &Cidr) -> Expression<'static> {
    let full = if c.is_ipv4() { 32 } else { 128 };
    if c.prefix() == full {
        s(c.addr().to_string())
    } else {
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(s(c.addr().to_string())),
            len: u32::from(c.prefix()),
        }))
    }
}

fn port_expr(lo: u16, hi: u16) -> Expression<'static> {
    if lo == hi {
        Expression::Number(u32::from(lo))
    } else {
        Expression::Range(Box::new(Range {
            range: [
                Expression::Number(u32::from(lo)),
                Expression::Number(u32::from(hi)),
            ],
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decide::{Oracle, Verdict};
    use crate::test_utils::{self, ip, net46};
    use proptest::prelude::*;
    use serde_json::Value;

    pub(crate) const EXAMPLE: &str = r#"
default = "deny"
[[allow]]
domain = "pypi.org"
ports = [443]
[[allow]]
domain = "*.githubusercontent.com"
ports = [443]
[[allow]]
cidr = "198.51.100.0/24"
ports = ["8000-8099"]
protocol = "tcp"
[[deny]]
domain = "uploads.example.com"
"#;

    /// One element of a set, as (first, last) per concatenated field.
    type Key = Vec<(u128, u128)>;

    fn scalar(v: &Value) -> u128 {
        match v {
            Value::Number(n) => u128::from(n.as_u64().expect("small number")),
            Value::String(s) => match s.as_str() {
                "tcp" => 6,
                "udp" => 17,
                "icmp" => 1,
                "ipv6-icmp" => 58,
                a => crate::addr::to_u128(a.parse().expect("address")),
            },
            other => panic!("unexpected scalar {other}"),
        }
    }

    fn field(v: &Value) -> (u128, u128) {
        if let Some(p) = v.get("prefix") {
            let c = Cidr::new(
                p["addr"].as_str().expect("addr").parse().expect("ip"),
                u8::try_from(p["len"].as_u64().expect("len")).expect("len"),
            )
            .expect("clean prefix");
            let i = c.interval();
            return (i.lo, i.hi);
        }
        if let Some(r) = v.get("range") {
            return (scalar(&r[0]), scalar(&r[1]));
        }
        if let Some(e) = v.get("elem") {
            return field(&e["val"]);
        }
        let x = scalar(v);
        (x, x)
    }

    fn key(v: &Value) -> Key {
        match v.get("concat") {
            Some(Value::Array(parts)) => parts.iter().map(field).collect(),
            _ => vec![field(v)],
        }
    }

    /// Set name → elements, from the `add set` and `add element` commands of a batch.
    fn sets(batch: &Value) -> BTreeMap<String, Vec<Key>> {
        let mut out: BTreeMap<String, Vec<Key>> = BTreeMap::new();
        for cmd in batch["nftables"].as_array().expect("array") {
            let Some(add) = cmd.get("add") else { continue };
            let (obj, list) = if let Some(s) = add.get("set") {
                (s, "elem")
            } else if let Some(e) = add.get("element") {
                (e, "elem")
            } else {
                continue;
            };
            let entry = out
                .entry(obj["name"].as_str().expect("name").to_owned())
                .or_default();
            if let Some(Value::Array(elems)) = obj.get(list) {
                entry.extend(elems.iter().map(key));
            }
        }
        out
    }

    fn hit(sets: &BTreeMap<String, Vec<Key>>, name: &str, probe: &[u128]) -> bool {
        sets.get(name).expect("set exists").iter().any(|k| {
            k.len() == probe.len() && k.iter().zip(probe).all(|((lo, hi), v)| lo <= v && v <= hi)
        })
    }

    /// The forward/input/prerouting logic of the compiled table, evaluated over its sets.
    fn model(rs: &Ruleset, batch: &Value, dst: IpAddr, port: u16, proto: Protocol) -> Verdict {
        let s = sets(batch);
        let dst = crate::addr::normalize_ip(dst);
        let f = if dst.is_ipv4() { "4" } else { "6" };
        let a = crate::addr::to_u128(dst);
        let p = scalar(&Value::String(proto.nft_name(dst.is_ipv4()).to_owned()));
        let port = u128::from(port);
        let net = &rs.net;
        if dst.is_ipv6() && net.guest6.is_none() {
            return Verdict::Deny;
        }
        if proto != Protocol::Icmp && port == 53 {
            return Verdict::Resolver;
        }
        if net.is_gateway(dst) {
            return Verdict::Deny;
        }
        if hit(&s, &format!("reserved{f}"), &[a])
            || hit(&s, &format!("deny_addr{f}"), &[a])
            || hit(&s, &format!("deny{f}"), &[a, p, port])
        {
            return Verdict::Deny;
        }
        if hit(&s, &format!("allow_named{f}"), &[a, p, port]) {
            return Verdict::Allow;
        }
        if hit(&s, &format!("named{f}"), &[a]) {
            return Verdict::Deny;
        }
        if hit(&s, &format!("allow{f}"), &[a, p, port]) {
            return Verdict::Allow;
        }
        for k in 0..rs.pin_classes() {
            if hit(&s, &format!("pinned{f}_{k}"), &[a]) && hit(&s, &format!("svc_{k}"), &[p, port])
            {
                return Verdict::Allow;
            }
        }
        match rs.policy.default_action() {
            DefaultAction::Deny => Verdict::Deny,
            _ => Verdict::Allow,
        }
    }

    /// No two elements of an interval set overlap (the kernel refuses that).
    fn assert_disjoint(batch: &Value) {
        for (name, elems) in sets(batch) {
            if name.starts_with("pinned") {
                continue;
            }
            for (i, x) in elems.iter().enumerate() {
                for y in &elems[i + 1..] {
                    let overlap = x.len() == y.len()
                        && x.iter().zip(y).all(|((a, b), (c, d))| a <= d && c <= b);
                    assert!(!overlap, "{name}: {x:?} overlaps {y:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn compiled_sets_agree_with_the_oracle(cfg in test_utils::policy_config(),
                     pins in test_utils::pins(),
                     probes in proptest::collection::vec(
                         (test_utils::destination(), test_utils::port(), test_utils::protocol()), 1..24)) {
            let p = Policy::try_from(cfg).expect("generated policies are valid");
            let net = net46();
            let rs = Ruleset::compile(&p, &net);
            let batch: Value = serde_json::from_str(&rs.to_json(&pins)).expect("json");
            assert_disjoint(&batch);
            let o = Oracle::new(&p, &net, &pins);
            for (dst, port, proto) in probes {
                let want = o.decide(dst, port, proto, None);
                prop_assert_eq!(model(&rs, &batch, dst, port, proto), want.verdict,
                    "{} {} {:?}: oracle {:?}", dst, port, proto, want);
            }
        }
    }

    #[test]
    fn golden_example() {
        let p = Policy::from_toml(EXAMPLE).expect("valid");
        let rs = Ruleset::compile(&p, &net46());
        let mut pins = Pins::new();
        pins.insert("pypi.org", ip("203.0.113.10")).expect("name");
        pins.insert("uploads.example.com", ip("203.0.113.11"))
            .expect("name");
        let got: Value = serde_json::from_str(&rs.to_json(&pins)).expect("json");
        let want: Value = serde_json::from_str(include_str!("../testdata/example.nft.json"))
            .expect("golden json");
        if got != want {
            panic!(
                "compiled ruleset differs from testdata/example.nft.json; got:\n{}",
                serde_json::to_string_pretty(&got).expect("json")
            );
        }
    }

    #[test]
    fn golden_learn_v4_only() {
        let p = Policy::from_toml(
            "default = \"learn\"\n[[allow]]\ncidr = \"203.0.113.0/24\"\nports = [443]\nprotocol = \"tcp\"\n\
             [[allow]]\ncidr = \"203.0.113.0/25\"\nports = [\"400-500\"]\nprotocol = \"tcp\"\n\
             [[allow]]\ncidr = \"10.1.0.0/16\"\nprotocol = \"icmp\"\n\
             [[deny]]\ncidr = \"203.0.113.128/26\"\n",
        )
        .expect("valid");
        let net = NetParams::new(
            "tap0",
            "172.30.0.2".parse().expect("ip"),
            "172.30.0.1".parse().expect("ip"),
        );
        let rs = Ruleset::compile(&p, &net);
        let got: Value = serde_json::from_str(&rs.to_json(&Pins::new())).expect("json");
        let s = sets(&got);
        // Overlapping allow rules become disjoint boxes.
        let want_allow: Vec<Key> = vec![
            vec![(0xcb00_7100, 0xcb00_717f), (6, 6), (400, 500)],
            vec![(0xcb00_7180, 0xcb00_71ff), (6, 6), (443, 443)],
        ];
        assert_eq!(s["allow4"], want_allow);
        assert_eq!(s["deny_addr4"], vec![vec![(0xcb00_7180, 0xcb00_71bf)]]);
        assert_eq!(
            s["allow_named4"],
            vec![vec![(0x0a01_0000, 0x0a01_ffff), (1, 1), (0, 65535)]]
        );
        assert_eq!(s["named4"], vec![vec![(0x0a01_0000, 0x0a01_ffff)]]);
        let last_forward = got["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .rfind(|r| r["chain"] == "forward")
            .expect("forward rules")
            .clone();
        assert_eq!(
            last_forward["expr"],
            serde_json::json!([{"goto": {"target": "learn"}}])
        );
        // No IPv6: every IPv6 packet from the guest is refused as spoofed.
        assert!(got.to_string().contains(r#"{"match":{"left":{"meta":{"key":"nfproto"}},"op":"==","right":"ipv6"}},{"goto":{"target":"deny_spoof"}}"#));
    }

    #[test]
    fn pin_batch_pins_allowed_public_answers_only() {
        let p = Policy::from_toml(EXAMPLE).expect("valid");
        let rs = Ruleset::compile(&p, &net46());
        let answers = [
            ip("203.0.113.10"),
            ip("::ffff:10.0.0.1"),
            ip("2001:db8::10"),
            ip("2001:db8::7"),
        ];
        let b = rs.pin_batch("PyPI.org.", &answers, 600);
        assert_eq!(b.pinned, vec![ip("203.0.113.10"), ip("2001:db8::7")]);
        assert_eq!(b.refused, vec![ip("10.0.0.1"), ip("2001:db8::10")]);
        let json = serde_json::to_value(b.batch.expect("something pinned")).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"nftables": [
                {"add": {"element": {"family": "inet", "table": "sandbox", "name": "pinned4_0",
                    "elem": [{"elem": {"val": "203.0.113.10", "timeout": 600, "expires": null, "comment": null, "counter": null}}]}}},
                {"add": {"element": {"family": "inet", "table": "sandbox", "name": "pinned6_0",
                    "elem": [{"elem": {"val": "2001:db8::7", "timeout": 600, "expires": null, "comment": null, "counter": null}}]}}}
            ]})
        );
        assert!(rs
            .pin_batch("uploads.example.com", &answers, 600)
            .batch
            .is_none());
        assert!(rs.pin_batch("example.org", &answers, 600).batch.is_none());
    }

    #[test]
    fn swap_carries_only_pins_the_new_policy_allows() {
        let mut pins = Pins::new();
        pins.insert_with_timeout("pypi.org", ip("203.0.113.10"), 120)
            .expect("name");
        pins.insert_with_timeout("raw.githubusercontent.com", ip("203.0.113.20"), 90)
            .expect("name");
        let tighter = Policy::from_toml(
            "[[allow]]\ndomain = \"pypi.org\"\nports = [443]\nprotocol = \"tcp\"\n",
        )
        .expect("valid");
        let rs = Ruleset::compile(&tighter, &net46());
        let batch: Value = serde_json::from_str(&rs.to_json(&pins)).expect("json");
        let cmds = batch["nftables"].as_array().expect("array");
        // Atomic replace: add, delete, then the new table.
        assert_eq!(
            cmds[0],
            serde_json::json!({"add": {"table": {"family": "inet", "name": "sandbox"}}})
        );
        assert_eq!(
            cmds[1],
            serde_json::json!({"delete": {"table": {"family": "inet", "name": "sandbox"}}})
        );
        let s = sets(&batch);
        assert_eq!(s["pinned4_0"], vec![vec![(0xcb00_710a, 0xcb00_710a)]]);
        assert!(batch.to_string().contains(r#""timeout":120"#));
        assert!(!batch.to_string().contains("203.0.113.20"));
    }

    #[test]
    fn swap_batch_keeps_the_table_and_drops_extra_classes() {
        let wide = Policy::from_toml(
            "[[allow]]\ndomain = \"a.test\"\nports = [443]\n[[allow]]\ndomain = \"b.test\"\nports = [80]\n",
        )
        .expect("valid");
        let narrow =
            Policy::from_toml("[[allow]]\ndomain = \"a.test\"\nports = [443]\n").expect("valid");
        let (old, new) = (
            Ruleset::compile(&wide, &net46()),
            Ruleset::compile(&narrow, &net46()),
        );
        let mut pins = Pins::new();
        pins.insert_with_timeout("a.test", ip("203.0.113.10"), 60)
            .expect("name");
        let j = serde_json::to_value(new.swap_batch(&old, &pins)).expect("json");
        let cmds = j["nftables"].as_array().expect("array");
        assert!(!j.to_string().contains(r#"{"delete":{"table""#));
        assert_eq!(
            cmds[1],
            serde_json::json!({"flush": {"table": {"family": "inet", "name": "sandbox"}}})
        );
        let deleted: Vec<&str> = cmds
            .iter()
            .filter_map(|c| c.get("delete")?.get("set")?.get("name")?.as_str())
            .collect();
        assert_eq!(deleted, vec!["svc_1", "pinned4_1", "pinned6_1"]);
        assert!(cmds
            .iter()
            .any(|c| c["flush"]["set"]["name"] == "pinned4_0"));
        // The same sets as the install batch, and the carried pin.
        assert_eq!(
            sets(&j).keys().collect::<Vec<_>>().len(),
            new.set_names().len()
        );
        assert_eq!(
            sets(&j)["pinned4_0"],
            vec![vec![(0xcb00_710a, 0xcb00_710a)]]
        );
    }

    #[test]
    fn log_prefixes_round_trip() {
        for c in LogClass::ALL {
            assert_eq!(LogClass::from_prefix(c.prefix()), Some(c));
            assert_eq!(
                LogClass::from_prefix(&format!("{}\0", c.prefix().trim_end())),
                Some(c)
            );
        }
        assert_eq!(LogClass::from_prefix("other"), None);
    }

    /// Installs the example table twice (install, then swap) and a pin batch in a throwaway
    /// network namespace, and reads the pinned set back. Needs root and `nft`.
    #[cfg(sandbox_privileged)]
    #[test]
    fn kernel_accepts_install_swap_and_pins() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let p = Policy::from_toml(EXAMPLE).expect("valid");
        let rs = Ruleset::compile(&p, &net46());
        let overlapping = Policy::from_toml(
            "default = \"learn\"\n[[allow]]\ncidr = \"203.0.113.0/24\"\nports = [443]\n\
             [[allow]]\ncidr = \"203.0.113.0/25\"\nports = [\"400-500\"]\n\
             [[allow]]\ncidr = \"10.1.0.0/16\"\n[[allow]]\ndomain = \"a.test\"\nprotocol = \"icmp\"\n",
        )
        .expect("valid");
        let rs2 = Ruleset::compile(&overlapping, &net46());
        let pin = rs
            .pin_batch("pypi.org", &[ip("203.0.113.10")], 300)
            .batch
            .expect("pinned");
        let json = |b: &Nftables<'_>| serde_json::to_string(b).expect("json");
        let script = format!(
            "set -e\nnft -j -f /dev/stdin <<'A'\n{}\nA\nnft -j -f /dev/stdin <<'B'\n{}\nB\nnft -j -f /dev/stdin <<'C'\n{}\nC\nnft -j -f /dev/stdin <<'D'\n{}\nD\nnft -j -f /dev/stdin <<'E'\n{}\nE\nnft -j -f /dev/stdin <<'F'\n{}\nF\nnft -j list set inet sandbox pinned4_0\n",
            rs.to_json(&Pins::new()),
            rs2.to_json(&Pins::new()),
            rs.to_json(&Pins::new()),
            json(&rs2.swap_batch(&rs, &Pins::new())),
            json(&rs.swap_batch(&rs2, &Pins::new())),
            serde_json::to_string(&pin).expect("json"),
        );
        let mut child = Command::new("unshare")
            .args(["-n", "sh", "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare and nft are installed");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(listed.contains("203.0.113.10"), "{listed}");
    }
}
