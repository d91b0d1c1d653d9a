//! The declarative egress policy. **Not implemented yet.**
//!
//! This crate will parse, validate and evaluate egress policies (CIDRs, ports, domain names),
//! compile them to an nftables ruleset (IPv4 and IPv6, default deny), and pin the addresses of
//! allowed domain names through a per-sandbox DNS resolver. Nothing in it works today; today a
//! sandbox has no network device at all.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
