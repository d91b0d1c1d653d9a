//! The declarative egress policy of a sandbox: parse, validate, decide, compile to nftables.
//!
//! This crate is pure: no I/O, no unsafe code. The enforcement layer (`sandbox-net`) installs
//! what it compiles, and its DNS resolver asks it which names to answer and which addresses to
//! pin. The format and the order of evaluation are in `docs/policy.md`.
//!
//! 1. **Parse** a TOML, JSON or YAML text with [`Policy::parse`] (or convert a
//!    [`PolicyConfig`] with `Policy::try_from`). Names are normalised (case, trailing dot, IDNA
//!    A-labels), blocks too (host bits, IPv4-mapped). Errors are typed ([`PolicyError`]) and
//!    carry the line of the offending field.
//! 2. **Decide names** for the resolver with [`Policy::decide_name`]: refused names are
//!    answered REFUSED without asking upstream.
//! 3. **Decide connections** with an [`Oracle`] (policy + [`NetParams`] + [`Pins`]):
//!    [`Oracle::decide`] is the reference the kernel's behaviour is tested against. Domain
//!    rules allow an address only through a pin: the address was a DNS answer for an allowed
//!    name.
//! 4. **Compile** with [`Ruleset::compile`]: [`Ruleset::batch`] is the nftables JSON batch that
//!    installs the sandbox's `inet` table (replacing any table of that name),
//!    [`Ruleset::swap_batch`] swaps a running one in place, atomically;
//!    [`Ruleset::pin_batch`] is what the resolver applies before it answers.
//! 5. **Report** refusals as [`DenyEvent`]s; in learn mode feed decisions to a [`LearnLog`]
//!    and turn it into a suggested policy with [`LearnLog::suggest_toml`].
//!
//! ```
//! use sandbox_policy::{NetParams, Oracle, Pins, Policy, Protocol, Reason, Verdict};
//!
//! let policy = Policy::from_toml(r#"
//! default = "deny"
//! [[allow]]
//! domain = "pypi.org"
//! ports = [443]
//! [[allow]]
//! domain = "*.githubusercontent.com"
//! ports = [443]
//! [[allow]]
//! cidr = "198.51.100.0/24"
//! ports = ["8000-8099"]
//! protocol = "tcp"
//! [[deny]]
//! domain = "uploads.example.com"
//! "#)?;
//!
//! // The resolver's view.
//! assert!(policy.decide_name("PyPI.org.").verdict == sandbox_policy::NameVerdict::Allowed);
//! assert!(policy.decide_name("githubusercontent.com").verdict
//!     == sandbox_policy::NameVerdict::Refused); // the apex is not under the wildcard
//!
//! // The packet filter's view: pypi.org resolved to 203.0.113.10, so that address is pinned.
//! let net = NetParams::new("tap0", "172.30.0.2".parse()?, "172.30.0.1".parse()?);
//! let mut pins = Pins::new();
//! pins.insert("pypi.org", "203.0.113.10".parse()?)?;
//! let oracle = Oracle::new(&policy, &net, &pins);
//!
//! let d = oracle.decide("203.0.113.10".parse()?, 443, Protocol::Tcp, Some("pypi.org"));
//! assert_eq!((d.verdict, d.reason), (Verdict::Allow, Reason::AllowRule(0)));
//! let d = oracle.decide("203.0.113.10".parse()?, 80, Protocol::Tcp, None);
//! assert_eq!(d.verdict, Verdict::Deny); // pinned for 443 only
//! let d = oracle.decide("198.51.100.7".parse()?, 8080, Protocol::Tcp, None);
//! assert_eq!(d.reason, Reason::AllowRule(2));
//! let d = oracle.decide("169.254.169.254".parse()?, 80, Protocol::Tcp, None);
//! assert_eq!(d.verdict, Verdict::Deny); // metadata, always
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod config;
pub mod decide;
pub mod event;
pub mod learn;
pub mod name;
pub mod nft;
pub mod policy;
#[cfg(test)]
mod test_utils;

pub use addr::{Cidr, ReservedKind};
pub use config::{DefaultAction, Format, PolicyConfig, ProtocolConfig, RuleConfig};
pub use decide::{Decision, NetParams, Oracle, Pins, Protocol, Reason, Verdict};
pub use event::DenyEvent;
pub use learn::{LearnLog, LearnedFlow};
pub use name::DomainPattern;
pub use nft::{LogClass, PinBatch, Ruleset};
pub use policy::{
    NameDecision, NameVerdict, Policy, PolicyError, PolicyWarning, RuleError, RuleList,
};
