//! Per-sandbox network plumbing. **Not implemented yet.**
//!
//! This crate will create, for each sandbox, a network namespace holding a tap device
//! (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) handed to the VMM as a file descriptor, a veth pair to
//! the host, addresses, and NAT through nftables. Every resource will be named with the sandbox
//! id and reconciled at start-up. Nothing in it works today.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
