//! The deny event the enforcement layer emits.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::decide::{Protocol, Reason};

/// One refused connection or DNS query of a sandbox.
///
/// Packet denials come from the NFLOG reader (the reason from [`crate::LogClass`] refined by
/// [`crate::Oracle::decide`]); DNS refusals come from the resolver, with `name` set, `port`
/// 53 and `destination` the address the guest sent the query to (the enforcement layer
/// documents how it knows it: `docs/policy.md`, "Deny events").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DenyEvent {
    /// The sandbox id.
    pub sandbox: String,
    /// When, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination address (normalised: IPv4-mapped addresses are IPv4).
    pub destination: IpAddr,
    /// Destination port (0 for ICMP).
    pub port: u16,
    /// The DNS name involved, when known.
    pub name: Option<String>,
    /// Why it was refused.
    pub reason: Reason,
}

impl DenyEvent {
    /// Builds an event, normalising `destination`.
    pub fn new(
        sandbox: impl Into<String>,
        time_unix_ms: u64,
        protocol: Protocol,
        destination: IpAddr,
        port: u16,
        name: Option<String>,
        reason: Reason,
    ) -> Self {
        Self {
            sandbox: sandbox.into(),
            time_unix_ms,
            protocol,
            destination: crate::addr::normalize_ip(destination),
            port,
            name,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::ReservedKind;

    #[test]
    fn serde_round_trip_and_shape() {
        let e = DenyEvent::new(
            "sbx-1",
            1_700_000_000_000,
            Protocol::Tcp,
            "::ffff:169.254.169.254".parse().expect("valid"),
            80,
            None,
            Reason::Reserved(ReservedKind::Metadata),
        );
        let j = serde_json::to_string(&e).expect("serialises");
        assert_eq!(
            j,
            r#"{"sandbox":"sbx-1","time_unix_ms":1700000000000,"protocol":"tcp","destination":"169.254.169.254","port":80,"name":null,"reason":{"reserved":"metadata"}}"#
        );
        let back: DenyEvent = serde_json::from_str(&j).expect("parses");
        assert_eq!(back, e);
    }
}
