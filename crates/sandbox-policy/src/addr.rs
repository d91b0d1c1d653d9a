//! Addresses: CIDR blocks, IPv4-mapped normalisation, the reserved ranges and interval sets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// Why a string is not a CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// Not `address` or `address/prefix`.
    #[error("expected an address or address/prefix, such as 198.51.100.0/24 or 2001:db8::/32")]
    Syntax,
    /// The prefix length is larger than the address (32 or 128 bits).
    #[error("prefix length {prefix} is longer than {max}")]
    Prefix {
        /// The given length.
        prefix: u32,
        /// 32 or 128.
        max: u8,
    },
    /// Bits after the prefix are set.
    #[error("bits after the prefix are set; did you mean {suggestion}?")]
    HostBits {
        /// The block with the host bits cleared.
        suggestion: Cidr,
    },
}

/// Maps an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) to its IPv4 address; a dual-stack
/// socket connecting to it sends IPv4 packets. Other addresses are returned unchanged.
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// An IPv4 or IPv6 block, normalised: host bits clear, IPv4-mapped IPv6 blocks (prefix ≥ 96)
/// turned into IPv4 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a block; `None` when `prefix` is too long or host bits are set.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let c = Self::truncated(addr, prefix)?;
        (c.addr == addr).then_some(c)
    }

    /// Builds a block, clearing host bits; `None` when `prefix` is too long.
    fn truncated(addr: IpAddr, prefix: u8) -> Option<Self> {
        let bits = family_bits(&addr);
        if prefix > bits {
            return None;
        }
        let (lo, _) = prefix_bounds(to_u128(addr), prefix, bits);
        Some(Self {
            addr: from_u128(lo, bits == 32),
            prefix,
        })
    }

    /// The block holding exactly `ip` (after IPv4-mapped normalisation).
    pub fn host(ip: IpAddr) -> Self {
        let ip = normalize_ip(ip);
        Self {
            addr: ip,
            prefix: family_bits(&ip),
        }
    }

    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address (a /32 or /128).
    ///
    /// # Errors
    /// [`CidrError`].
    pub fn parse(raw: &str) -> Result<Self, CidrError> {
        let raw = raw.trim();
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.trim().parse().map_err(|_| CidrError::Syntax)?;
                let p = p.trim();
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::Syntax);
                }
                let prefix: u32 = p.parse().map_err(|_| CidrError::Syntax)?;
                (addr, prefix)
            }
            None => {
                let addr: IpAddr = raw.parse().map_err(|_| CidrError::Syntax)?;
                (addr, u32::from(family_bits(&addr)))
            }
        };
        let max = family_bits(&addr);
        let prefix8 = u8::try_from(prefix)
            .ok()
            .filter(|p| *p <= max)
            .ok_or(CidrError::Prefix { prefix, max })?;
        let suggestion = Self::truncated(addr, prefix8).ok_or(CidrError::Prefix { prefix, max })?;
        if suggestion.addr != addr {
            return Err(CidrError::HostBits { suggestion });
        }
        // An IPv4-mapped block is the IPv4 block.
        if let IpAddr::V6(v6) = addr {
            if prefix8 >= 96 {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return Ok(Self {
                        addr: IpAddr::V4(v4),
                        prefix: prefix8 - 96,
                    });
                }
            }
        }
        Ok(suggestion)
    }

    /// The first address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 block.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The block as an inclusive interval of addresses of its family.
    pub fn interval(&self) -> Interval {
        let bits = family_bits(&self.addr);
        let (lo, hi) = prefix_bounds(to_u128(self.addr), self.prefix, bits);
        Interval {
            v4: bits == 32,
            lo,
            hi,
        }
    }

    /// Whether `ip` (normalised) lies in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.interval().contains(normalize_ip(ip))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        Self::parse(&s)
    }
}

/// An inclusive interval of addresses of one family, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    /// IPv4 (values < 2³²) or IPv6.
    pub v4: bool,
    /// First address.
    pub lo: u128,
    /// Last address.
    pub hi: u128,
}

impl Interval {
    /// The interval holding one address.
    pub fn single(ip: IpAddr) -> Self {
        let ip = normalize_ip(ip);
        let v = to_u128(ip);
        Self {
            v4: ip.is_ipv4(),
            lo: v,
            hi: v,
        }
    }

    /// Whether `ip` (already normalised) lies in the interval.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.v4 && (self.lo..=self.hi).contains(&to_u128(ip))
    }

    /// Whether `other` lies entirely inside this interval.
    pub fn covers(&self, other: &Interval) -> bool {
        self.v4 == other.v4 && self.lo <= other.lo && other.hi <= self.hi
    }

    /// Whether the two intervals share an address.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.v4 == other.v4 && self.lo <= other.hi && other.lo <= self.hi
    }

    /// The fewest CIDR blocks that cover exactly this interval, in address order.
    pub fn to_cidrs(&self) -> Vec<Cidr> {
        let bits: u8 = if self.v4 { 32 } else { 128 };
        let mut out = Vec::new();
        let mut lo = self.lo;
        loop {
            // The largest aligned block starting at `lo` that ends at or before `hi`.
            let span = self.hi - lo; // block size minus one that still fits
            let mut k: u32 = if lo == 0 {
                u32::from(bits)
            } else {
                lo.trailing_zeros().min(u32::from(bits))
            };
            while k > 0
                && (if k >= 128 {
                    span != u128::MAX
                } else {
                    (1u128 << k) - 1 > span
                })
            {
                k -= 1;
            }
            // `k <= bits <= 128`, so it fits in u8.
            let prefix = bits - u8::try_from(k).unwrap_or(bits);
            out.push(Cidr {
                addr: from_u128(lo, self.v4),
                prefix,
            });
            let last = if k >= 128 {
                u128::MAX
            } else {
                lo + ((1u128 << k) - 1)
            };
            if last >= self.hi {
                break;
            }
            lo = last + 1;
        }
        out
    }
}

/// A set of addresses as sorted, disjoint, non-adjacent intervals per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    items: Vec<Interval>,
}

impl IntervalSet {
    /// The union of `items`.
    pub fn from_intervals(items: impl IntoIterator<Item = Interval>) -> Self {
        let mut v: Vec<Interval> = items.into_iter().collect();
        v.sort();
        let mut out: Vec<Interval> = Vec::with_capacity(v.len());
        for i in v {
            match out.last_mut() {
                Some(last) if last.v4 == i.v4 && i.lo <= last.hi.saturating_add(1) => {
                    last.hi = last.hi.max(i.hi);
                }
                _ => out.push(i),
            }
        }
        Self { items: out }
    }

    /// This set minus `other`.
    pub fn subtract(&self, other: &IntervalSet) -> Self {
        let mut out = Vec::new();
        for a in &self.items {
            let mut pieces = vec![*a];
            for b in other.items.iter().filter(|b| b.overlaps(a)) {
                let mut next = Vec::new();
                for p in pieces {
                    if !p.overlaps(b) {
                        next.push(p);
                        continue;
                    }
                    if p.lo < b.lo {
                        next.push(Interval { hi: b.lo - 1, ..p });
                    }
                    if p.hi > b.hi {
                        next.push(Interval { lo: b.hi + 1, ..p });
                    }
                }
                pieces = next;
            }
            out.extend(pieces);
        }
        Self::from_intervals(out)
    }

    /// The intervals, IPv4 first, in address order.
    pub fn intervals(&self) -> &[Interval] {
        &self.items
    }

    /// Whether `ip` (normalised) is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = normalize_ip(ip);
        self.items.iter().any(|i| i.contains(ip))
    }
}

/// Why an address is in the always-denied set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservedKind {
    /// A cloud metadata address ([`METADATA`]); no rule can allow it.
    Metadata,
    /// An address of the host; no rule can allow it.
    Host,
    /// A private, loopback, link-local, multicast or otherwise special range
    /// ([`RESERVED_V4`], [`RESERVED_V6`]) that no allow rule names explicitly.
    Range,
}

/// Reserved IPv4 ranges, denied unless an allow `cidr` rule lies inside one of them.
pub const RESERVED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Reserved IPv6 ranges, denied unless an allow `cidr` rule lies inside one of them.
/// (`::ffff:0:0/96` only matters on the wire: decisions see IPv4-mapped addresses as IPv4.)
pub const RESERVED_V6: &[&str] = &[
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b::/96",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Cloud metadata addresses, always denied: AWS/GCP/Azure/OpenStack (IPv4), AWS (IPv6),
/// Alibaba Cloud.
pub const METADATA: &[&str] = &["169.254.169.254", "fd00:ec2::254", "100.100.100.200"];

fn parse_list(list: &[&str]) -> Vec<Cidr> {
    list.iter()
        .map(|s| {
            // The lists above are constants checked by `reserved_lists_parse`.
            Cidr::parse(s).expect("reserved lists are valid CIDRs")
        })
        .collect()
}

/// The reserved ranges of both families as CIDR blocks (`RESERVED_V4` then `RESERVED_V6`).
pub fn reserved_blocks() -> Vec<Cidr> {
    // `::ffff:0:0/96` parses as the IPv4 block 0.0.0.0/0; keep it as IPv6 here.
    let mut v = parse_list(RESERVED_V4);
    for s in RESERVED_V6 {
        v.push(match *s {
            "::ffff:0:0/96" => Cidr {
                addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
                prefix: 96,
            },
            s => Cidr::parse(s).expect("reserved lists are valid CIDRs"),
        });
    }
    v
}

/// The metadata addresses as /32 and /128 blocks.
pub fn metadata_blocks() -> Vec<Cidr> {
    parse_list(METADATA)
}

fn family_bits(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn prefix_bounds(v: u128, prefix: u8, bits: u8) -> (u128, u128) {
    let host_bits = u32::from(bits - prefix);
    let mask: u128 = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (v & !mask, (v & !mask) | mask)
}

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub(crate) fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        // Callers pass IPv4 values < 2³²; truncation is the identity then.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_lists_parse() {
        assert_eq!(
            reserved_blocks().len(),
            RESERVED_V4.len() + RESERVED_V6.len()
        );
        assert_eq!(metadata_blocks().len(), METADATA.len());
    }

    #[test]
    fn parse_normalises() {
        let c = Cidr::parse("198.51.100.0/24").expect("valid");
        assert_eq!(c.to_string(), "198.51.100.0/24");
        assert_eq!(Cidr::parse("1.2.3.4").expect("valid").prefix(), 32);
        assert_eq!(
            Cidr::parse("::ffff:198.51.100.0/120").expect("valid"),
            c,
            "IPv4-mapped block is the IPv4 block"
        );
        assert_eq!(
            Cidr::parse("198.51.100.1/24"),
            Err(CidrError::HostBits { suggestion: c })
        );
        assert_eq!(
            Cidr::parse("1.2.3.0/33"),
            Err(CidrError::Prefix {
                prefix: 33,
                max: 32
            })
        );
        assert_eq!(Cidr::parse("nope"), Err(CidrError::Syntax));
        assert_eq!(Cidr::parse("1.2.3.0/"), Err(CidrError::Syntax));
        assert_eq!(Cidr::parse("1.2.3.0/+1"), Err(CidrError::Syntax));
        assert!(Cidr::parse("2001:db8::/32").is_ok());
    }

    #[test]
    fn mapped_address_is_ipv4() {
        let m: IpAddr = "::ffff:8.8.8.8".parse().expect("valid");
        assert_eq!(normalize_ip(m), "8.8.8.8".parse::<IpAddr>().expect("valid"));
    }

    #[test]
    fn interval_to_cidrs_is_minimal() {
        let i = Cidr::parse("10.0.0.0/8").expect("valid").interval();
        let hole = Cidr::parse("10.1.0.0/16").expect("valid").interval();
        let rest = IntervalSet::from_intervals([i]).subtract(&IntervalSet::from_intervals([hole]));
        let cidrs: Vec<String> = rest
            .intervals()
            .iter()
            .flat_map(|i| i.to_cidrs())
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            cidrs,
            [
                "10.0.0.0/16",
                "10.2.0.0/15",
                "10.4.0.0/14",
                "10.8.0.0/13",
                "10.16.0.0/12",
                "10.32.0.0/11",
                "10.64.0.0/10",
                "10.128.0.0/9"
            ]
        );
        let all6 = Interval {
            v4: false,
            lo: 0,
            hi: u128::MAX,
        };
        assert_eq!(all6.to_cidrs().len(), 1);
        assert_eq!(all6.to_cidrs()[0].to_string(), "::/0");
    }

    proptest::proptest! {
        #[test]
        fn cidrs_cover_the_interval_exactly(a in proptest::prelude::any::<u32>(), b in proptest::prelude::any::<u32>()) {
            let (lo, hi) = (u128::from(a.min(b)), u128::from(a.max(b)));
            let cidrs = Interval { v4: true, lo, hi }.to_cidrs();
            let mut next = lo;
            for c in &cidrs {
                let i = c.interval();
                proptest::prop_assert_eq!(i.lo, next);
                next = i.hi + 1;
            }
            proptest::prop_assert_eq!(next, hi + 1);
            proptest::prop_assert!(cidrs.len() <= 62);
        }

        #[test]
        fn cidr_display_parses_back(v in proptest::prelude::any::<u128>(), len in 0u8..=128) {
            let c = Cidr::truncated(IpAddr::V6(Ipv6Addr::from(v)), len).expect("len <= 128");
            let back = Cidr::parse(&c.to_string()).expect("display parses");
            // IPv4-mapped blocks come back as IPv4; everything else is identical.
            if back.is_ipv4() {
                proptest::prop_assert!(len >= 96);
            } else {
                proptest::prop_assert_eq!(back, c);
            }
        }
    }
}
