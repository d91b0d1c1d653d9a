//! Names of every kernel object a sandbox owns, derived from the sandbox id alone.
//!
//! | Object | Name | Where |
//! |---|---|---|
//! | network namespace | `<netns prefix><id>` (default `sbx-<id>`) | `/run/netns/` |
//! | veth, host end | `<link prefix><8 hex>` (default `vsbx` + 8 hex) | host netns |
//! | veth, sandbox end | `<host end>p` until moved, then [`SANDBOX_UPLINK`] | sandbox netns |
//! | tap (or test veth) | [`GUEST_LINK`] | sandbox netns |
//! | nft table | `inet` [`SANDBOX_TABLE`] | sandbox netns |
//!
//! The 8 hex digits are the first 4 bytes of SHA-256 of the id, so a restarted runtime finds
//! the links of a sandbox from its id. Interface names fit the kernel's `IFNAMSIZ` (15 bytes plus
//! the NUL): the link prefix is at most 6 bytes, so the longest name (`<prefix><8 hex>p`) is 15.

use sha2::{Digest, Sha256};

/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`), in bytes.
pub const IFNAME_MAX: usize = 15;
/// Longest link prefix, in bytes: `IFNAME_MAX` minus 8 hex digits minus the peer's `p`.
pub const LINK_PREFIX_MAX: usize = 6;
/// Longest sandbox id, in bytes.
pub const ID_MAX: usize = 64;
/// Longest netns prefix, in bytes.
pub const NETNS_PREFIX_MAX: usize = 32;
/// Name of the tap (or of the test veth standing in for it) inside every sandbox netns.
pub const GUEST_LINK: &str = "tap0";
/// Name of the sandbox end of the veth pair once it sits in the sandbox netns.
pub const SANDBOX_UPLINK: &str = "uplink0";
/// Name of the `inet` nft table inside every sandbox netns.
pub const SANDBOX_TABLE: &str = "sandbox";
/// Name of the regular chain of the base table that holds the [`crate::Egress`] rule (an
/// egress policy replaces the whole table instead).
pub const EGRESS_CHAIN: &str = "egress";

/// Errors of naming.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The sandbox id is empty, too long, or has a byte outside `[A-Za-z0-9._-]`.
    #[error(
        "sandbox id is not usable in names (1..=64 bytes of [A-Za-z0-9._-], not starting with '.')"
    )]
    BadId {
        /// The id as given.
        id: String,
    },
    /// A configured prefix is empty, too long, or has a byte outside its charset.
    #[error("name prefix is not usable ({rule})")]
    BadPrefix {
        /// The prefix as given.
        prefix: String,
        /// What a valid prefix looks like.
        rule: &'static str,
    },
}

/// Prefixes all names are built from. Tests use unique ones so that they can run in parallel.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NamePrefixes {
    /// Prefix of netns names (`sbx-`): 1..=32 bytes of `[A-Za-z0-9._-]`, not starting with `.`.
    pub netns: String,
    /// Prefix of host-side link names (`vsbx`): 1..=6 bytes of `[a-z0-9]`.
    pub link: String,
    /// Name of the shared `inet` table in the host netns (`sandbox_sdk`): 1..=32 bytes of
    /// `[A-Za-z0-9_]`.
    pub host_table: String,
}

impl Default for NamePrefixes {
    fn default() -> Self {
        NamePrefixes {
            netns: "sbx-".into(),
            link: "vsbx".into(),
            host_table: "sandbox_sdk".into(),
        }
    }
}

impl NamePrefixes {
    /// Prefixes from their parts (see the fields for the rules; checked by [`Self::validate`]).
    pub fn new(netns: &str, link: &str, host_table: &str) -> Self {
        NamePrefixes {
            netns: netns.into(),
            link: link.into(),
            host_table: host_table.into(),
        }
    }

    /// Checks every prefix against the rules above.
    pub fn validate(&self) -> Result<(), NameError> {
        let bad = |prefix: &str, rule| NameError::BadPrefix {
            prefix: prefix.to_string(),
            rule,
        };
        if !is_file_name(&self.netns, NETNS_PREFIX_MAX) {
            return Err(bad(
                &self.netns,
                "netns: 1..=32 bytes of [A-Za-z0-9._-], not starting with '.'",
            ));
        }
        let l = &self.link;
        if l.is_empty()
            || l.len() > LINK_PREFIX_MAX
            || !l
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(bad(l, "link: 1..=6 bytes of [a-z0-9]"));
        }
        let t = &self.host_table;
        if t.is_empty()
            || t.len() > 32
            || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(t, "host table: 1..=32 bytes of [A-Za-z0-9_]"));
        }
        Ok(())
    }

    /// The names of sandbox `id`'s objects. The prefixes must be valid ([`Self::validate`]).
    pub fn derive(&self, id: &str) -> Result<Names, NameError> {
        if !is_file_name(id, ID_MAX) {
            return Err(NameError::BadId { id: id.to_string() });
        }
        let digest = Sha256::digest(id.as_bytes());
        let mut host_link = self.link.clone();
        for b in &digest[..4] {
            host_link.push_str(&format!("{b:02x}"));
        }
        let peer_link = format!("{host_link}p");
        Ok(Names {
            netns: format!("{}{id}", self.netns),
            host_link,
            peer_link,
        })
    }

    /// The sandbox id of netns `name`, if the name carries the netns prefix.
    pub fn id_of_netns<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.netns.as_str())
            .filter(|id| is_file_name(id, ID_MAX))
    }

    /// Whether `name` has the shape of a link this crate creates in the host netns.
    pub fn is_our_link(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(self.link.as_str()) else {
            return false;
        };
        let hex = rest.strip_suffix('p').unwrap_or(rest);
        hex.len() == 8
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }
}

/// The names of one sandbox's objects ([module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The netns, a file under `/run/netns`.
    pub netns: String,
    /// The veth end left in the host netns.
    pub host_link: String,
    /// The other veth end, under this name only between its creation and its move.
    pub peer_link: String,
}

fn is_file_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_names() {
        let n = NamePrefixes::default()
            .derive("sbx-0123456789abcdef")
            .expect("valid id");
        assert_eq!(n.netns, "sbx-sbx-0123456789abcdef");
        assert!(n.host_link.starts_with("vsbx") && n.host_link.len() == 12);
        assert_eq!(n.peer_link, format!("{}p", n.host_link));
        assert!(NamePrefixes::default().is_our_link(&n.host_link));
        assert!(NamePrefixes::default().is_our_link(&n.peer_link));
        assert!(!NamePrefixes::default().is_our_link("vsbx"));
        assert!(!NamePrefixes::default().is_our_link("vsbx0123456z"));
        assert!(!NamePrefixes::default().is_our_link("eth0"));
    }

    #[test]
    fn bad_ids_and_prefixes() {
        let p = NamePrefixes::default();
        for id in ["", ".x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(
                matches!(p.derive(id), Err(NameError::BadId { .. })),
                "{id:?}"
            );
        }
        for (netns, link, table) in [
            ("sbx-", "toolong", "t"),
            ("sbx-", "Vs", "t"),
            ("sbx-", "", "t"),
            ("a/", "vs", "t"),
            (".a", "vs", "t"),
            ("sbx-", "vs", "a-b"),
        ] {
            let q = NamePrefixes::new(netns, link, table);
            assert!(q.validate().is_err(), "{q:?}");
        }
        assert!(NamePrefixes::default().validate().is_ok());
    }

    proptest! {
        #[test]
        fn names_fit_the_kernel(id in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", link in "[a-z0-9]{1,6}") {
            let p = NamePrefixes { link, ..NamePrefixes::default() };
            prop_assert!(p.validate().is_ok());
            let n = p.derive(&id).expect("valid id");
            prop_assert!(n.host_link.len() <= IFNAME_MAX);
            prop_assert!(n.peer_link.len() <= IFNAME_MAX);
            prop_assert!(p.is_our_link(&n.host_link));
            prop_assert!(p.is_our_link(&n.peer_link));
            prop_assert_eq!(p.id_of_netns(&n.netns), Some(id.as_str()));
            // Deterministic: the same id gives the same names.
            prop_assert_eq!(p.derive(&id).expect("valid id"), n);
        }
    }
}
