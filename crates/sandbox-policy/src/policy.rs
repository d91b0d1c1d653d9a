//! The validated policy: rules, validation errors and warnings, and name decisions.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::addr::{self, Cidr, CidrError, Interval, IntervalSet, ReservedKind};
use crate::config::{
    self, DefaultAction, Format, PolicyConfig, PortConfig, ProtocolConfig, RuleConfig, SyntaxError,
};
use crate::decide::{Protocol, Reason};
use crate::name::{normalize_name, DomainMatcher, DomainPattern, NameError};

/// Which list a rule is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleList {
    /// `[[allow]]`.
    Allow,
    /// `[[deny]]`.
    Deny,
}

impl RuleList {
    fn key(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl std::fmt::Display for RuleList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// What is wrong with one rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// Neither `domain` nor `cidr` is set.
    #[error("the rule names no destination; set `domain` or `cidr`")]
    NoDestination,
    /// Both `domain` and `cidr` are set.
    #[error("the rule sets both `domain` and `cidr`; split it into two rules")]
    TwoDestinations,
    /// `domain` is not a valid name or pattern.
    #[error("`domain = \"{value}\"` is invalid: {source}")]
    Domain {
        /// The value as written.
        value: String,
        /// Why (part of this error's text, so not also its `source()`).
        source: NameError,
    },
    /// `cidr` is not a valid block.
    #[error("`cidr = \"{value}\"` is invalid: {source}")]
    Cidr {
        /// The value as written.
        value: String,
        /// Why (part of this error's text, so not also its `source()`).
        source: CidrError,
    },
    /// A `ports` entry is not a port (1..=65535) or an ascending range `"a-b"`.
    #[error("port `{value}` is not a port 1-65535 or an ascending range like \"8000-8099\"")]
    Port {
        /// The entry as written.
        value: String,
    },
    /// `ports = []` would match nothing.
    #[error("`ports` is empty; remove it to mean every port")]
    EmptyPorts,
    /// ICMP has no ports.
    #[error("`protocol = \"icmp\"` takes no `ports`")]
    IcmpPorts,
    /// An allow rule that only names metadata addresses, which stay denied.
    #[error("{cidr} holds only cloud metadata addresses, which stay denied; remove the rule")]
    MetadataOnly {
        /// The block.
        cidr: Cidr,
    },
}

impl RuleError {
    /// The rule field the error is about, used to find its line.
    fn field(&self) -> Option<&'static str> {
        match self {
            Self::NoDestination | Self::TwoDestinations => None,
            Self::Domain { .. } => Some("domain"),
            Self::Cidr { .. } | Self::MetadataOnly { .. } => Some("cidr"),
            Self::Port { .. } | Self::EmptyPorts | Self::IcmpPorts => Some("ports"),
        }
    }
}

/// Why a policy text or model was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The text is not valid TOML/JSON/YAML or does not have the policy's shape (unknown key,
    /// wrong type, unknown `default`).
    #[error("{format} policy, line {}: {}", fmt_line(.error.line), .error.message)]
    Syntax {
        /// The format that was read.
        format: Format,
        /// Position and message from the parser.
        error: SyntaxError,
    },
    /// One rule is invalid. The text numbers rules from 1 (`allow rule 1 (line 3): ...`) and
    /// says what is wrong.
    #[error("{list} rule {} (line {}): {error}", .index + 1, fmt_line(*.line))]
    Rule {
        /// The rule's list.
        list: RuleList,
        /// 0-based index in that list.
        index: usize,
        /// 1-based line of the offending field, or of the rule (`None` for a model not read
        /// from text).
        line: Option<usize>,
        /// What is wrong (part of this error's text, so not also its `source()`).
        error: RuleError,
    },
}

fn fmt_line(line: Option<usize>) -> String {
    line.map_or_else(|| "?".to_owned(), |l| l.to_string())
}

/// Something legal but probably not what the author meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PolicyWarning {
    /// The rule's list.
    pub list: RuleList,
    /// 0-based index in that list.
    pub index: usize,
    /// 1-based line of the rule, when read from text.
    pub line: Option<usize>,
    /// What is odd.
    pub kind: WarningKind,
}

/// The kinds of [`PolicyWarning`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WarningKind {
    /// An allow rule covers a cloud metadata address; that address stays denied.
    CoversMetadata,
    /// An allow rule covers an address of the host; that address stays denied.
    CoversHost,
}

/// An inclusive port range, `start <= end`, both in 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port.
    pub end: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    fn parse(p: &PortConfig) -> Result<Self, RuleError> {
        let bad = || RuleError::Port {
            value: match p {
                PortConfig::Number(n) => n.to_string(),
                PortConfig::Text(t) => t.clone(),
            },
        };
        let one = |s: &str| -> Result<u16, RuleError> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)
        };
        let (start, end) = match p {
            PortConfig::Number(n) => {
                let v = u16::try_from(*n).ok().filter(|p| *p > 0).ok_or_else(bad)?;
                (v, v)
            }
            PortConfig::Text(t) => match t.split_once('-') {
                Some((a, b)) => (one(a)?, one(b)?),
                None => {
                    let v = one(t)?;
                    (v, v)
                }
            },
        };
        if start > end {
            return Err(bad());
        }
        Ok(Self { start, end })
    }

    fn to_config(self) -> PortConfig {
        if self.start == self.end {
            PortConfig::Number(i64::from(self.start))
        } else {
            PortConfig::Text(format!("{}-{}", self.start, self.end))
        }
    }
}

/// A rule's destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// A name or wildcard, matched against DNS query names and, through pins, addresses.
    Domain(DomainPattern),
    /// An address block.
    Cidr(Cidr),
}

/// The transport side of a rule: protocols and ports (what nftables calls a service).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Service {
    /// Protocol selector.
    pub protocol: ProtocolConfig,
    /// Sorted, merged port ranges; `None` means every port (and ICMP when the protocol allows).
    pub ports: Option<Vec<PortRange>>,
}

impl Service {
    /// Whether a packet of `protocol` to `port` is covered (`port` is ignored for ICMP, and a
    /// service with `ports` never covers ICMP).
    pub fn matches(&self, protocol: Protocol, port: u16) -> bool {
        let proto_ok = match self.protocol {
            ProtocolConfig::Any => true,
            ProtocolConfig::Tcp => protocol == Protocol::Tcp,
            ProtocolConfig::Udp => protocol == Protocol::Udp,
            ProtocolConfig::Icmp => protocol == Protocol::Icmp,
        };
        proto_ok
            && match (&self.ports, protocol) {
                (None, _) => true,
                (Some(_), Protocol::Icmp) => false,
                (Some(ranges), _) => ranges.iter().any(|r| r.contains(port)),
            }
    }

    /// The transport protocols this service can match.
    pub fn protocols(&self) -> Vec<Protocol> {
        match (self.protocol, self.ports.is_some()) {
            (ProtocolConfig::Tcp, _) => vec![Protocol::Tcp],
            (ProtocolConfig::Udp, _) => vec![Protocol::Udp],
            (ProtocolConfig::Icmp, _) => vec![Protocol::Icmp],
            (ProtocolConfig::Any, true) => vec![Protocol::Tcp, Protocol::Udp],
            (ProtocolConfig::Any, false) => vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp],
        }
    }
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// What it matches.
    pub destination: Destination,
    /// Protocols and ports.
    pub service: Service,
}

impl Rule {
    fn from_config(c: &RuleConfig, list: RuleList) -> Result<Self, RuleError> {
        let destination = match (&c.domain, &c.cidr) {
            (None, None) => return Err(RuleError::NoDestination),
            (Some(_), Some(_)) => return Err(RuleError::TwoDestinations),
            (Some(d), None) => Destination::Domain(DomainPattern::parse(d).map_err(|source| {
                RuleError::Domain {
                    value: d.clone(),
                    source,
                }
            })?),
            (None, Some(s)) => {
                let cidr = Cidr::parse(s).map_err(|source| RuleError::Cidr {
                    value: s.clone(),
                    source,
                })?;
                if list == RuleList::Allow {
                    let iv = cidr.interval();
                    let only_metadata = addr::metadata_blocks()
                        .iter()
                        .any(|m| m.interval().covers(&iv));
                    if only_metadata {
                        return Err(RuleError::MetadataOnly { cidr });
                    }
                }
                Destination::Cidr(cidr)
            }
        };
        let protocol = c.protocol.unwrap_or_default();
        let ports = match &c.ports {
            None => None,
            Some(list) if list.is_empty() => return Err(RuleError::EmptyPorts),
            Some(_) if protocol == ProtocolConfig::Icmp => return Err(RuleError::IcmpPorts),
            Some(list) => {
                let mut v = list
                    .iter()
                    .map(PortRange::parse)
                    .collect::<Result<Vec<_>, _>>()?;
                v.sort();
                let mut merged: Vec<PortRange> = Vec::with_capacity(v.len());
                for r in v {
                    match merged.last_mut() {
                        Some(last) if u32::from(r.start) <= u32::from(last.end) + 1 => {
                            last.end = last.end.max(r.end);
                        }
                        _ => merged.push(r),
                    }
                }
                Some(merged)
            }
        };
        Ok(Self {
            destination,
            service: Service { protocol, ports },
        })
    }

    /// Whether this is a `domain` rule matching the normalised `name`.
    pub fn destination_matches_name(&self, name: &str) -> bool {
        matches!(&self.destination, Destination::Domain(d) if d.matches(name))
    }

    /// The rule in file form (normalised).
    pub fn to_config(&self) -> RuleConfig {
        let (domain, cidr) = match &self.destination {
            Destination::Domain(d) => (Some(d.to_string()), None),
            Destination::Cidr(c) => (None, Some(c.to_string())),
        };
        RuleConfig {
            domain,
            cidr,
            ports: self
                .service
                .ports
                .as_ref()
                .map(|v| v.iter().map(|r| r.to_config()).collect()),
            protocol: match self.service.protocol {
                ProtocolConfig::Any => None,
                p => Some(p),
            },
        }
    }
}

/// Whether the resolver answers a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameVerdict {
    /// Forward the query upstream and pin the answers.
    Allowed,
    /// Answer REFUSED without asking upstream.
    Refused,
}

/// The result of [`Policy::decide_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NameDecision {
    /// Allowed or refused.
    pub verdict: NameVerdict,
    /// The deciding rule: the first matching deny rule, else the first matching allow rule,
    /// else the default ([`Reason::Default`]), or [`Reason::InvalidName`].
    pub reason: Reason,
}

/// A validated, normalised egress policy.
///
/// Build it with [`Policy::parse`] (text) or [`Policy::try_from`] (a [`PolicyConfig`]).
#[derive(Debug, Clone)]
pub struct Policy {
    default: DefaultAction,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    allow_names: DomainMatcher,
    deny_names: DomainMatcher,
    /// Reserved addresses an allow `cidr` rule names explicitly (minus metadata).
    holes: IntervalSet,
    /// For each allow rule: whether it is a `cidr` rule inside one reserved block (it names
    /// reserved addresses, and only such rules allow traffic to them).
    names_reserved: Vec<bool>,
    /// Reserved ranges minus `holes`, plus metadata.
    closed: IntervalSet,
    reserved: IntervalSet,
    metadata: IntervalSet,
    warnings: Vec<PolicyWarning>,
    /// The text the policy was read from, to find rule lines on demand.
    source: Option<(std::sync::Arc<str>, Format)>,
}

/// Warnings get their line filled in up to this many (each lookup re-reads the text once).
const MAX_LOCATED_WARNINGS: usize = 32;

impl Policy {
    /// Parses, validates and normalises a policy text.
    ///
    /// # Errors
    /// [`PolicyError::Syntax`] for text the format's parser refuses (with its line),
    /// [`PolicyError::Rule`] for the first invalid rule (with the line of the offending field).
    pub fn parse(text: &str, format: Format) -> Result<Self, PolicyError> {
        let cfg =
            config::read(text, format).map_err(|error| PolicyError::Syntax { format, error })?;
        match Self::try_from(cfg) {
            Ok(mut p) => {
                p.source = Some((std::sync::Arc::from(text), format));
                let lines: Vec<Option<usize>> = p
                    .warnings
                    .iter()
                    .take(MAX_LOCATED_WARNINGS)
                    .map(|w| p.rule_line(w.list, w.index))
                    .collect();
                for (w, line) in p.warnings.iter_mut().zip(lines) {
                    w.line = line;
                }
                Ok(p)
            }
            Err(PolicyError::Rule {
                list, index, error, ..
            }) => {
                let line = error
                    .field()
                    .and_then(|f| config::locate(text, format, list.key(), index, Some(f)))
                    .or_else(|| config::locate(text, format, list.key(), index, None));
                Err(PolicyError::Rule {
                    list,
                    index,
                    line,
                    error,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// [`Policy::parse`] for TOML.
    ///
    /// # Errors
    /// As [`Policy::parse`].
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text, Format::Toml)
    }

    /// The default action.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Allow rules in order.
    pub fn allow_rules(&self) -> &[Rule] {
        &self.allow
    }

    /// Deny rules in order.
    pub fn deny_rules(&self) -> &[Rule] {
        &self.deny
    }

    /// Rule `index` of `list`.
    pub fn rule(&self, list: RuleList, index: usize) -> Option<&Rule> {
        match list {
            RuleList::Allow => self.allow.get(index),
            RuleList::Deny => self.deny.get(index),
        }
    }

    /// The 1-based line where rule `index` of `list` starts in the text it was read from;
    /// `None` for a policy built from a model. Each call reads the text once more (O(size)).
    pub fn rule_line(&self, list: RuleList, index: usize) -> Option<usize> {
        let (text, format) = self.source.as_ref()?;
        self.rule(list, index)?;
        config::locate(text, *format, list.key(), index, None)
    }

    /// Warnings found while validating (host addresses are checked by
    /// [`Policy::host_warnings`]). The first 32 carry their line.
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// Warnings for allow rules that cover one of `host` (the host's own addresses, which stay
    /// denied). The first 32 carry their line.
    pub fn host_warnings(&self, host: &[IpAddr]) -> Vec<PolicyWarning> {
        let mut out = Vec::new();
        for (index, r) in self.allow.iter().enumerate() {
            if let Destination::Cidr(c) = &r.destination {
                if host.iter().any(|h| c.contains(*h)) {
                    let line = if out.len() < MAX_LOCATED_WARNINGS {
                        self.rule_line(RuleList::Allow, index)
                    } else {
                        None
                    };
                    out.push(PolicyWarning {
                        list: RuleList::Allow,
                        index,
                        line,
                        kind: WarningKind::CoversHost,
                    });
                }
            }
        }
        out
    }

    /// The policy in file form (normalised names and blocks, merged ports).
    pub fn to_config(&self) -> PolicyConfig {
        PolicyConfig {
            default: self.default,
            allow: self.allow.iter().map(Rule::to_config).collect(),
            deny: self.deny.iter().map(Rule::to_config).collect(),
        }
    }

    /// Whether the DNS resolver answers `qname` (any case, trailing dot allowed, Unicode or
    /// A-labels).
    ///
    /// Order: an invalid name is refused; a name matched by a deny `domain` rule is refused;
    /// in `deny` mode a name is allowed only when an allow `domain` rule matches it; in
    /// `allow` and `learn` mode every other name is allowed.
    pub fn decide_name(&self, qname: &str) -> NameDecision {
        let Ok(name) = normalize_name(qname) else {
            return NameDecision {
                verdict: NameVerdict::Refused,
                reason: Reason::InvalidName,
            };
        };
        self.decide_normalized_name(&name)
    }

    pub(crate) fn decide_normalized_name(&self, name: &str) -> NameDecision {
        if let Some(&i) = self.deny_names.matches(name).first() {
            return NameDecision {
                verdict: NameVerdict::Refused,
                reason: Reason::DenyRule(i),
            };
        }
        if let Some(&i) = self.allow_names.matches(name).first() {
            return NameDecision {
                verdict: NameVerdict::Allowed,
                reason: Reason::AllowRule(i),
            };
        }
        let verdict = match self.default {
            DefaultAction::Deny => NameVerdict::Refused,
            DefaultAction::Allow | DefaultAction::Learn => NameVerdict::Allowed,
        };
        NameDecision {
            verdict,
            reason: Reason::Default(self.default),
        }
    }

    /// Indices of the allow `domain` rules matching the normalised `name`, when the name is
    /// not denied: the rules whose services an address pinned for `name` gets.
    pub(crate) fn pinning_rules(&self, name: &str) -> Vec<usize> {
        if !self.deny_names.matches(name).is_empty() {
            return Vec::new();
        }
        self.allow_names.matches(name)
    }

    /// Whether `ip` (normalised) can never be allowed: metadata or reserved-and-not-named.
    /// Host addresses are not known here.
    pub(crate) fn reserved_kind(&self, ip: IpAddr) -> Option<ReservedKind> {
        if self.metadata.contains(ip) {
            Some(ReservedKind::Metadata)
        } else if self.closed.contains(ip) {
            Some(ReservedKind::Range)
        } else {
            None
        }
    }

    /// Whether `ip` is in any reserved range (named or not) or metadata; such an address is
    /// never pinned from a DNS answer (DNS rebinding protection).
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        self.reserved.contains(ip) || self.metadata.contains(ip)
    }

    /// Reserved ranges minus the holes named by allow rules, plus metadata: the
    /// `reserved4`/`reserved6` sets before host addresses are added.
    pub(crate) fn closed(&self) -> &IntervalSet {
        &self.closed
    }

    /// Whether allow rule `index` is a `cidr` rule lying inside one reserved block: it names
    /// those reserved addresses, and only such rules allow traffic to them.
    pub fn names_reserved(&self, index: usize) -> bool {
        self.names_reserved.get(index).copied().unwrap_or(false)
    }

    /// Reserved addresses named by allow `cidr` rules: only those rules' traffic reaches them
    /// (the `named4`/`named6` sets).
    pub(crate) fn holes(&self) -> &IntervalSet {
        &self.holes
    }
}

impl TryFrom<PolicyConfig> for Policy {
    type Error = PolicyError;

    fn try_from(cfg: PolicyConfig) -> Result<Self, PolicyError> {
        let mut lists: [Vec<Rule>; 2] = [Vec::new(), Vec::new()];
        for (slot, (list, rules)) in lists
            .iter_mut()
            .zip([(RuleList::Allow, &cfg.allow), (RuleList::Deny, &cfg.deny)])
        {
            for (index, rc) in rules.iter().enumerate() {
                let rule = Rule::from_config(rc, list).map_err(|error| PolicyError::Rule {
                    list,
                    index,
                    line: None,
                    error,
                })?;
                slot.push(rule);
            }
        }
        let [allow, deny] = lists;
        let mut allow_names = DomainMatcher::default();
        let mut deny_names = DomainMatcher::default();
        for (i, r) in allow.iter().enumerate() {
            if let Destination::Domain(d) = &r.destination {
                allow_names.insert(d, i);
            }
        }
        for (i, r) in deny.iter().enumerate() {
            if let Destination::Domain(d) = &r.destination {
                deny_names.insert(d, i);
            }
        }
        let blocks = addr::reserved_blocks();
        let reserved = IntervalSet::from_intervals(blocks.iter().map(Cidr::interval));
        let metadata =
            IntervalSet::from_intervals(addr::metadata_blocks().iter().map(Cidr::interval));
        let mut warnings = Vec::new();
        let mut hole_items: Vec<Interval> = Vec::new();
        let mut names_reserved = vec![false; allow.len()];
        for (index, r) in allow.iter().enumerate() {
            let Destination::Cidr(c) = &r.destination else {
                continue;
            };
            let iv = c.interval();
            if blocks.iter().any(|b| b.interval().covers(&iv)) {
                hole_items.push(iv);
                names_reserved[index] = true;
            }
            if metadata.intervals().iter().any(|m| m.overlaps(&iv)) {
                warnings.push(PolicyWarning {
                    list: RuleList::Allow,
                    index,
                    line: None,
                    kind: WarningKind::CoversMetadata,
                });
            }
        }
        let holes = IntervalSet::from_intervals(hole_items).subtract(&metadata);
        let closed = IntervalSet::from_intervals(
            reserved
                .subtract(&holes)
                .intervals()
                .iter()
                .chain(metadata.intervals())
                .copied(),
        );
        Ok(Self {
            default: cfg.default,
            allow,
            deny,
            allow_names,
            deny_names,
            holes,
            names_reserved,
            closed,
            reserved,
            metadata,
            warnings,
            source: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_err(text: &str, format: Format) -> (RuleList, usize, Option<usize>, RuleError) {
        match Policy::parse(text, format) {
            Err(PolicyError::Rule {
                list,
                index,
                line,
                error,
            }) => (list, index, line, error),
            other => panic!("expected a rule error, got {other:?}"),
        }
    }

    const HEAD: &str = "default = \"deny\"\n[[allow]]\ndomain = \"pypi.org\"\nports = [443]\n";

    #[test]
    fn each_rule_error_has_its_line_toml() {
        type Case = (&'static str, usize, fn(&RuleError) -> bool);
        let cases: &[Case] = &[
            ("[[allow]]\nports = [1]\n", 5, |e| {
                *e == RuleError::NoDestination
            }),
            (
                "[[allow]]\ndomain = \"a.b\"\ncidr = \"1.2.3.4\"\n",
                5,
                |e| *e == RuleError::TwoDestinations,
            ),
            ("[[allow]]\nports = [1]\ndomain = \"a..b\"\n", 7, |e| {
                matches!(e, RuleError::Domain { .. })
            }),
            ("[[allow]]\ndomain = \"a.*.b\"\n", 6, |e| {
                matches!(
                    e,
                    RuleError::Domain {
                        source: NameError::Wildcard,
                        ..
                    }
                )
            }),
            ("[[allow]]\n\ncidr = \"10.0.0.1/8\"\n", 7, |e| {
                matches!(
                    e,
                    RuleError::Cidr {
                        source: CidrError::HostBits { .. },
                        ..
                    }
                )
            }),
            ("[[allow]]\ncidr = \"1.2.3.4\"\nports = [0]\n", 7, |e| {
                matches!(e, RuleError::Port { .. })
            }),
            (
                "[[allow]]\ncidr = \"1.2.3.4\"\nports = [\"9-1\"]\n",
                7,
                |e| matches!(e, RuleError::Port { .. }),
            ),
            ("[[allow]]\ncidr = \"1.2.3.4\"\nports = [70000]\n", 7, |e| {
                matches!(e, RuleError::Port { .. })
            }),
            ("[[allow]]\ncidr = \"1.2.3.4\"\nports = []\n", 7, |e| {
                *e == RuleError::EmptyPorts
            }),
            (
                "[[allow]]\ncidr = \"1.2.3.4\"\nprotocol = \"icmp\"\nports = [1]\n",
                8,
                |e| *e == RuleError::IcmpPorts,
            ),
            ("[[allow]]\ncidr = \"169.254.169.254\"\n", 6, |e| {
                matches!(e, RuleError::MetadataOnly { .. })
            }),
        ];
        for (tail, line, pred) in cases {
            let text = format!("{HEAD}{tail}");
            let (list, index, got, err) = rule_err(&text, Format::Toml);
            assert_eq!((list, index), (RuleList::Allow, 1), "{tail}");
            assert!(pred(&err), "{tail}: {err:?}");
            assert_eq!(got, Some(*line), "{tail}: {err}");
        }
    }

    #[test]
    fn deny_rule_error_line_and_message() {
        let text = "[[deny]]\ndomain = \"ok.org\"\n\n[[deny]]\ncidr = \"nope\"\n";
        let err = Policy::from_toml(text).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "deny rule 2 (line 5): `cidr = \"nope\"` is invalid: expected an address or address/prefix, such as \
             198.51.100.0/24 or 2001:db8::/32"
        );
        let (list, index, line, _) = rule_err(text, Format::Toml);
        assert_eq!((list, index, line), (RuleList::Deny, 1, Some(5)));
    }

    #[test]
    fn rule_error_text_says_what_is_wrong() {
        let cases = [
            ("ports = [70000]", "allow rule 1 (line 3): port `70000` is not a port 1-65535"),
            ("domain = \"pypi..org\"", "allow rule 1 (line 3): `domain = \"pypi..org\"` is invalid: the name has an empty label"),
            ("cidr = \"169.254.169.254/32\"", "allow rule 1 (line 3): 169.254.169.254/32 holds only cloud metadata addresses"),
        ];
        for (field, want) in cases {
            let text = if field.starts_with("ports") {
                format!("default = \"deny\"\n[[allow]]\n{field}\ndomain = \"a.org\"\n")
            } else {
                format!("default = \"deny\"\n[[allow]]\n{field}\n")
            };
            let err = Policy::from_toml(&text).expect_err("invalid");
            assert!(err.to_string().starts_with(want), "{err}");
            assert!(
                std::error::Error::source(&err).is_none(),
                "the reason is in the text, not repeated as a source"
            );
        }
    }

    #[test]
    fn rule_error_lines_json_and_yaml() {
        let json = "{\n  \"allow\": [\n    {\"domain\": \"a.org\"},\n    {\n      \"cidr\": \"1.2.3.4\",\n      \"ports\": [\"x\"]\n    }\n  ]\n}\n";
        let (_, index, line, err) = rule_err(json, Format::Json);
        assert_eq!((index, line), (1, Some(6)), "{err}");
        let yaml =
            "default: deny\nallow:\n  - domain: a.org\n  - cidr: 1.2.3.4\n    ports: [\"x\"]\n";
        let (_, index, line, err) = rule_err(yaml, Format::Yaml);
        assert_eq!((index, line), (1, Some(5)), "{err}");
        let yaml = "allow:\n  - domain: a.org\n  - ports: [1]\n";
        let (_, index, line, err) = rule_err(yaml, Format::Yaml);
        assert_eq!((index, line, err), (1, Some(3), RuleError::NoDestination));
    }

    #[test]
    fn syntax_errors_have_lines() {
        let cases = [
            (
                "default = \"deny\"\n[[allow]]\nport = [443]\n",
                Format::Toml,
                3,
            ),
            ("default = \"maybe\"\n", Format::Toml, 1),
            ("default = \"deny\"\n[[allow]\n", Format::Toml, 2),
            (
                "{\n \"default\": \"deny\",\n \"allow\": [{\"domian\": \"x\"}]\n}",
                Format::Json,
                3,
            ),
            (
                "default: deny\nallow:\n  - domain: a\n    prots: 1\n",
                Format::Yaml,
                4,
            ),
        ];
        for (text, format, line) in cases {
            match Policy::parse(text, format) {
                Err(PolicyError::Syntax { error, .. }) => {
                    assert_eq!(error.line, Some(line), "{text}: {}", error.message)
                }
                other => panic!("{text}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn three_formats_read_the_same_model() {
        let toml = "default = \"learn\"\n[[allow]]\ndomain = \"Pypi.ORG.\"\nports = [443, \"8000-8099\"]\nprotocol = \"tcp\"\n[[deny]]\ncidr = \"::ffff:198.51.100.0/120\"\n";
        let json = r#"{"default":"learn","allow":[{"domain":"pypi.org","ports":[443,"8000-8099"],"protocol":"tcp"}],"deny":[{"cidr":"198.51.100.0/24"}]}"#;
        let yaml = "default: learn\nallow:\n  - domain: pypi.org\n    ports: [443, \"8000-8099\"]\n    protocol: tcp\ndeny:\n  - cidr: 198.51.100.0/24\n";
        let a = Policy::parse(toml, Format::Toml).expect("toml").to_config();
        let b = Policy::parse(json, Format::Json).expect("json").to_config();
        let c = Policy::parse(yaml, Format::Yaml).expect("yaml").to_config();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.allow[0].domain.as_deref(), Some("pypi.org"));
        assert_eq!(a.deny[0].cidr.as_deref(), Some("198.51.100.0/24"));
    }

    #[test]
    fn rule_lines_are_recorded_and_ports_merged() {
        let p =
            Policy::from_toml("\n[[allow]]\ndomain = \"a.org\"\nports = [\"10-20\", 15, 21, 5]\n")
                .expect("valid");
        let r = &p.allow_rules()[0];
        assert_eq!(p.rule_line(RuleList::Allow, 0), Some(2));
        assert_eq!(p.rule_line(RuleList::Allow, 1), None);
        assert_eq!(
            r.service.ports,
            Some(vec![
                PortRange { start: 5, end: 5 },
                PortRange { start: 10, end: 21 }
            ])
        );
    }

    #[test]
    fn metadata_warning_and_host_warning() {
        let p = Policy::from_toml("[[allow]]\ncidr = \"169.254.0.0/16\"\n").expect("valid");
        assert_eq!(p.warnings().len(), 1);
        assert_eq!(p.warnings()[0].kind, WarningKind::CoversMetadata);
        assert_eq!(p.warnings()[0].line, Some(1));
        let w = p.host_warnings(&["169.254.1.1".parse().expect("ip")]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].kind, WarningKind::CoversHost);
        assert_eq!(w[0].line, Some(1));
    }

    #[test]
    fn decide_name_order() {
        let p = Policy::from_toml(
            "[[allow]]\ndomain = \"*.example.com\"\n[[deny]]\ndomain = \"uploads.example.com\"\n",
        )
        .expect("valid");
        let d = |n: &str| p.decide_name(n);
        assert_eq!(d("a.example.com").reason, Reason::AllowRule(0));
        assert_eq!(d("A.Example.COM.").verdict, NameVerdict::Allowed);
        assert_eq!(d("uploads.example.com").reason, Reason::DenyRule(0));
        assert_eq!(
            d("example.com").reason,
            Reason::Default(DefaultAction::Deny)
        );
        assert_eq!(d("bad..name").reason, Reason::InvalidName);
        let learn = Policy::from_toml("default = \"learn\"\n[[deny]]\ndomain = \"x.org\"\n")
            .expect("valid");
        assert_eq!(learn.decide_name("y.org").verdict, NameVerdict::Allowed);
        assert_eq!(learn.decide_name("x.org").verdict, NameVerdict::Refused);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(text in "[\\[\\]a-z =\"*./0-9\n{}:,-]{0,200}") {
            for format in [Format::Toml, Format::Json, Format::Yaml] {
                let _ = Policy::parse(&text, format);
            }
        }

        #[test]
        fn normalised_config_reparses_to_itself(cfg in crate::test_utils::policy_config()) {
            let p = Policy::try_from(cfg).expect("valid");
            let text = toml::to_string(&p.to_config()).expect("serialises");
            let q = Policy::from_toml(&text).expect("reparses");
            proptest::prop_assert_eq!(p.to_config(), q.to_config());
        }
    }
}
