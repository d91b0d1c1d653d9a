//! nftables: the base ruleset of a sandbox netns, the shared table of the host netns, and
//! applying a JSON ruleset atomically (`nft -j -f -`, one kernel transaction) inside a netns.
//!
//! Rulesets are `nftables` crate documents ([`Nftables`]); the base ones are written as JSON
//! and parsed into that schema, so they are checked by the same types a policy compiler uses.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nftables::schema::Nftables;
use serde_json::json;

use crate::names::{EGRESS_CHAIN, GUEST_LINK, SANDBOX_TABLE, SANDBOX_UPLINK};
use crate::netns::in_netns;
use crate::{Egress, NetError, Result};

/// Runs `nft -j -f -` with `ruleset` on the calling thread (so in its netns). One transaction:
/// all of it applies or none.
pub(crate) fn run_nft(ruleset: &Nftables<'_>) -> Result<()> {
    let payload = serde_json::to_vec(ruleset).map_err(NetError::NftEncode)?;
    let mut child = Command::new("nft")
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetError::NftMissing
            } else {
                NetError::Io {
                    what: "run nft",
                    source,
                }
            }
        })?;
    let wrote = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(&payload))
        .unwrap_or(Ok(()));
    let out = child.wait_with_output().map_err(|source| NetError::Io {
        what: "wait for nft",
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::NftFailed {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    wrote.map_err(|source| NetError::Io {
        what: "write the ruleset to nft",
        source,
    })
}

/// Applies `ruleset` atomically inside netns `netns` (`None`: the process's netns).
pub(crate) async fn apply_in(netns: Option<PathBuf>, ruleset: Nftables<'static>) -> Result<()> {
    in_netns(netns, move || run_nft(&ruleset)).await
}

fn parse(v: serde_json::Value) -> Nftables<'static> {
    serde_json::from_value(v)
        .expect("the built-in rulesets match the nftables schema (unit-tested)")
}

fn iif(name: &str) -> serde_json::Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}})
}
fn oif(name: &str) -> serde_json::Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": name}})
}
fn ct_state(states: &[&str]) -> serde_json::Value {
    json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": states}})
}
fn reject() -> serde_json::Value {
    json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
}

/// Inputs of [`sandbox_ruleset`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct SandboxRules {
    pub(crate) guest: Ipv4Addr,
    pub(crate) gateway: Ipv4Addr,
    pub(crate) pool: (Ipv4Addr, u8),
    pub(crate) egress: Egress,
}

/// The base table `inet sandbox` of a sandbox netns (replaced whole, atomically):
///
/// - `input` (policy drop): established/related; `lo`; from the guest only UDP/TCP 53 to the
///   gateway; every other guest packet is rejected (admin-prohibited), so tools fail fast.
///   Nothing from the uplink side gets in.
/// - `forward` (policy drop): established/related accept, invalid drop; from the guest:
///   a source other than the guest's address is dropped (anti-spoofing), IPv6 is dropped,
///   the veth pool (other sandboxes) is rejected, then `jump egress`, then reject.
/// - `egress` (regular chain): `accept` with [`Egress::Allow`], empty with [`Egress::Deny`].
///   An egress policy (`Network::apply_policy`) replaces the whole table with its compiled
///   one (same name, one transaction), which keeps these guarantees and adds its own.
/// - `postrouting` (nat): masquerade out of `uplink0`.
pub(crate) fn sandbox_ruleset(r: &SandboxRules) -> Nftables<'static> {
    let t = SANDBOX_TABLE;
    let chain = |name: &str, kind: Option<(&str, &str, i32, &str)>| match kind {
        Some((ty, hook, prio, policy)) => json!({"add": {"chain": {
            "family": "inet", "table": t, "name": name,
            "type": ty, "hook": hook, "prio": prio, "policy": policy}}}),
        None => json!({"add": {"chain": {"family": "inet", "table": t, "name": name}}}),
    };
    let rule = |chain: &str, expr: Vec<serde_json::Value>| json!({"add": {"rule": {"family": "inet", "table": t, "chain": chain, "expr": expr}}});
    let dns = |proto: &str| {
        rule(
            "input",
            vec![
                iif(GUEST_LINK),
                json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": r.gateway.to_string()}}),
                json!({"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}}, "right": 53}}),
                json!({"accept": null}),
            ],
        )
    };
    let mut cmds = vec![
        json!({"add": {"table": {"family": "inet", "name": t}}}),
        json!({"delete": {"table": {"family": "inet", "name": t}}}),
        json!({"add": {"table": {"family": "inet", "name": t}}}),
        chain("input", Some(("filter", "input", 0, "drop"))),
        chain("forward", Some(("filter", "forward", 0, "drop"))),
        chain(EGRESS_CHAIN, None),
        chain("postrouting", Some(("nat", "postrouting", 100, "accept"))),
        rule(
            "input",
            vec![
                ct_state(&["established", "related"]),
                json!({"accept": null}),
            ],
        ),
        rule("input", vec![iif("lo"), json!({"accept": null})]),
        dns("udp"),
        dns("tcp"),
        rule("input", vec![iif(GUEST_LINK), reject()]),
        rule(
            "forward",
            vec![
                ct_state(&["established", "related"]),
                json!({"accept": null}),
            ],
        ),
        rule(
            "forward",
            vec![ct_state(&["invalid"]), json!({"drop": null})],
        ),
        rule(
            "forward",
            vec![
                iif(GUEST_LINK),
                json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}),
                json!({"drop": null}),
            ],
        ),
        rule(
            "forward",
            vec![
                iif(GUEST_LINK),
                json!({"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": r.guest.to_string()}}),
                json!({"drop": null}),
            ],
        ),
        rule(
            "forward",
            vec![
                iif(GUEST_LINK),
                json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                    "right": {"prefix": {"addr": r.pool.0.to_string(), "len": r.pool.1}}}}),
                reject(),
            ],
        ),
        rule(
            "forward",
            vec![
                iif(GUEST_LINK),
                oif(SANDBOX_UPLINK),
                json!({"jump": {"target": EGRESS_CHAIN}}),
            ],
        ),
        rule("forward", vec![iif(GUEST_LINK), reject()]),
        rule(
            "postrouting",
            vec![oif(SANDBOX_UPLINK), json!({"masquerade": null})],
        ),
    ];
    if r.egress == Egress::Allow {
        cmds.push(rule(EGRESS_CHAIN, vec![json!({"accept": null})]));
    }
    parse(json!({ "nftables": cmds }))
}

/// The shared table `inet <table>` of the host netns (replaced whole, atomically):
///
/// - `input`: every packet from a sandbox link (`<link prefix>*`) is dropped: the host's own
///   addresses and services are unreachable from sandboxes;
/// - `forward`: sandbox link to sandbox link is dropped (sandboxes cannot reach each other),
///   and so is IPv6 from a sandbox link;
/// - `postrouting` (nat): traffic from the veth pool leaving through a non-sandbox link is
///   masqueraded to the host's outgoing address.
pub(crate) fn host_ruleset(
    table: &str,
    link_prefix: &str,
    pool: (Ipv4Addr, u8),
) -> Nftables<'static> {
    let any = format!("{link_prefix}*");
    let chain = |name: &str, ty: &str, hook: &str, prio: i32| {
        json!({"add": {"chain": {"family": "inet", "table": table, "name": name,
            "type": ty, "hook": hook, "prio": prio, "policy": "accept"}}})
    };
    let rule = |chain: &str, expr: Vec<serde_json::Value>| json!({"add": {"rule": {"family": "inet", "table": table, "chain": chain, "expr": expr}}});
    parse(json!({"nftables": [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},
        {"add": {"table": {"family": "inet", "name": table}}},
        chain("input", "filter", "input", 0),
        chain("forward", "filter", "forward", 0),
        chain("postrouting", "nat", "postrouting", 100),
        rule("input", vec![iif(&any), json!({"drop": null})]),
        rule("forward", vec![iif(&any), oif(&any), json!({"drop": null})]),
        rule("forward", vec![
            iif(&any),
            json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}),
            json!({"drop": null}),
        ]),
        rule("postrouting", vec![
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": pool.0.to_string(), "len": pool.1}}}}),
            json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": any}}),
            json!({"masquerade": null}),
        ]),
    ]}))
}

/// A document that deletes table `inet <table>` if present.
pub(crate) fn delete_table(table: &str) -> Nftables<'static> {
    parse(json!({"nftables": [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"delete": {"table": {"family": "inet", "name": table}}},
    ]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(egress: Egress) -> SandboxRules {
        SandboxRules {
            guest: [172, 30, 0, 2].into(),
            gateway: [172, 30, 0, 1].into(),
            pool: ([10, 200, 0, 0].into(), 16),
            egress,
        }
    }

    /// The documents survive the schema: nothing is lost between our JSON and what `nft` reads.
    #[test]
    fn rulesets_round_trip_through_the_schema() {
        for doc in [
            sandbox_ruleset(&rules(Egress::Deny)),
            sandbox_ruleset(&rules(Egress::Allow)),
            host_ruleset("sandbox_sdk", "vsbx", ([10, 200, 0, 0].into(), 16)),
            delete_table("x"),
        ] {
            let text = serde_json::to_string(&doc).expect("serialises");
            let again: Nftables<'_> = serde_json::from_str(&text).expect("parses");
            assert_eq!(again, doc);
        }
    }

    #[test]
    fn egress_chain_accepts_only_when_allowed() {
        let deny = serde_json::to_string(&sandbox_ruleset(&rules(Egress::Deny))).expect("json");
        let allow = serde_json::to_string(&sandbox_ruleset(&rules(Egress::Allow))).expect("json");
        let egress_accept = r#""chain":"egress","expr":[{"accept":null}]"#;
        assert!(!deny.contains(egress_accept), "{deny}");
        assert!(allow.contains(egress_accept), "{allow}");
        // The input chain opens port 53 on the gateway and nothing else.
        assert_eq!(deny.matches(r#""dport""#).count(), 2);
        assert!(deny.contains(r#""right":"172.30.0.1""#));
        assert!(deny.contains(r#""policy":"drop""#));
    }

    #[test]
    fn host_table_matches_the_link_prefix() {
        let doc = serde_json::to_string(&host_ruleset("t", "vq1", ([10, 9, 0, 0].into(), 24)))
            .expect("json");
        assert!(doc.contains(r#""right":"vq1*""#));
        assert!(doc.contains(r#""addr":"10.9.0.0","len":24"#));
    }
}
