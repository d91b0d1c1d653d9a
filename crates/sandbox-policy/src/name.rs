//! Domain names: normalisation, patterns (`pypi.org`, `*.example.com`) and the matcher.
//!
//! A name is normalised once, on the way in: surrounding whitespace and one trailing dot are
//! removed, Unicode labels become IDNA A-labels (UTS #46, which also lowercases), and the result
//! must be a plain DNS name: labels of 1..=63 bytes from `[a-z0-9_-]`, no label starting or
//! ending with `-`, at most 253 bytes in all. An IP address literal is not a name.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Why a string is not a domain name or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty (or only a dot).
    #[error("the name is empty")]
    Empty,
    /// IDNA (UTS #46) processing refused the name.
    #[error("the name is not a valid internationalised domain name")]
    Idna,
    /// The name is longer than 253 bytes after IDNA conversion.
    #[error("the name is {len} bytes long; at most 253 are allowed")]
    TooLong {
        /// Length in bytes of the A-label form.
        len: usize,
    },
    /// One label is empty or longer than 63 bytes.
    #[error("{}", label_length(label))]
    LabelLength {
        /// The offending label.
        label: String,
    },
    /// One label holds a character outside `[a-z0-9_-]` or starts/ends with `-`.
    #[error("label `{label}` may hold only letters, digits, `_` and inner `-`")]
    LabelChars {
        /// The offending label.
        label: String,
    },
    /// The string is an IP address; use a `cidr` rule for addresses.
    #[error("`{0}` is an IP address, not a name; write it as `cidr = \"{0}\"`")]
    Address(String),
    /// `*` appears other than as the whole leftmost label of `*.suffix`.
    #[error("`*` is allowed only as the whole leftmost label, as in `*.example.com`")]
    Wildcard,
}

fn label_length(label: &str) -> String {
    if label.is_empty() {
        "the name has an empty label (two dots in a row, or a leading dot)".to_owned()
    } else {
        format!(
            "label `{label}` is {} bytes long; at most 63 are allowed",
            label.len()
        )
    }
}

/// Normalises a DNS name (see the module documentation). Returns the A-label form.
///
/// # Errors
/// [`NameError`] when the result is not a valid name.
pub fn normalize_name(raw: &str) -> Result<String, NameError> {
    let trimmed = raw.trim();
    let trimmed = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if trimmed.is_empty() {
        return Err(NameError::Empty);
    }
    if trimmed.contains('*') {
        return Err(NameError::Wildcard);
    }
    if trimmed.parse::<IpAddr>().is_ok() {
        return Err(NameError::Address(trimmed.to_owned()));
    }
    let ascii = idna::domain_to_ascii(trimmed).map_err(|_| NameError::Idna)?;
    if ascii.is_empty() {
        return Err(NameError::Empty);
    }
    if ascii.len() > 253 {
        return Err(NameError::TooLong { len: ascii.len() });
    }
    for label in ascii.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(NameError::LabelLength {
                label: label.to_owned(),
            });
        }
        let chars_ok = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !chars_ok || label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::LabelChars {
                label: label.to_owned(),
            });
        }
    }
    Ok(ascii)
}

/// A normalised domain pattern of a rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DomainPattern {
    /// Exactly this name (`pypi.org`).
    Exact(String),
    /// Any name strictly below this suffix (`*.example.com` holds `example.com`): matches
    /// `a.example.com` and `a.b.example.com`, never the apex `example.com`.
    Wildcard(String),
}

impl DomainPattern {
    /// Parses and normalises `name` or `*.suffix`.
    ///
    /// # Errors
    /// [`NameError`] for an invalid name, or [`NameError::Wildcard`] for a misplaced `*`.
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let trimmed = raw.trim();
        match trimmed.strip_prefix("*.") {
            Some(suffix) => Ok(Self::Wildcard(normalize_name(suffix)?)),
            None => Ok(Self::Exact(normalize_name(trimmed)?)),
        }
    }

    /// Whether the normalised name `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == name,
            Self::Wildcard(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|head| !head.is_empty()),
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl From<DomainPattern> for String {
    fn from(p: DomainPattern) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for DomainPattern {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

/// Finds the rules whose domain pattern matches a name, in O(labels) map lookups.
///
/// Exact names sit in one map and wildcard suffixes in another; a lookup probes the name itself
/// in the first and each proper suffix (`b.c` and `c` for `a.b.c`) in the second.
#[derive(Debug, Clone, Default)]
pub struct DomainMatcher {
    exact: BTreeMap<String, Vec<usize>>,
    wildcard: BTreeMap<String, Vec<usize>>,
}

impl DomainMatcher {
    /// Adds rule `index` with `pattern`.
    pub fn insert(&mut self, pattern: &DomainPattern, index: usize) {
        let (map, key) = match pattern {
            DomainPattern::Exact(n) => (&mut self.exact, n),
            DomainPattern::Wildcard(s) => (&mut self.wildcard, s),
        };
        map.entry(key.clone()).or_default().push(index);
    }

    /// The indices (ascending, no duplicates) of every rule matching the normalised `name`.
    pub fn matches(&self, name: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.exact.get(name).cloned().unwrap_or_default();
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(idx) = self.wildcard.get(suffix) {
                out.extend_from_slice(idx);
            }
            rest = suffix;
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether no pattern was inserted.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_dot_and_idna() {
        assert_eq!(normalize_name("PyPI.org.").as_deref(), Ok("pypi.org"));
        assert_eq!(
            normalize_name("Bücher.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        assert_eq!(
            normalize_name("_dmarc.x.org").as_deref(),
            Ok("_dmarc.x.org")
        );
        assert_eq!(normalize_name(""), Err(NameError::Empty));
        assert_eq!(normalize_name("."), Err(NameError::Empty));
        assert!(normalize_name("a..b").is_err());
        assert!(matches!(
            normalize_name("-a.b"),
            Err(NameError::LabelChars { .. })
        ));
        assert!(matches!(
            normalize_name("1.2.3.4"),
            Err(NameError::Address(_))
        ));
        assert!(matches!(
            normalize_name(&"a".repeat(64)),
            Err(NameError::LabelLength { .. })
        ));
        let long = vec!["abcdefghi"; 30].join(".");
        assert!(matches!(
            normalize_name(&long),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn wildcard_matches_deeper_not_apex() {
        let p = DomainPattern::parse("*.Example.COM").expect("valid");
        assert_eq!(p, DomainPattern::Wildcard("example.com".into()));
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert_eq!(DomainPattern::parse("a.*.com"), Err(NameError::Wildcard));
        assert_eq!(DomainPattern::parse("*"), Err(NameError::Wildcard));
        assert_eq!(DomainPattern::parse("*x.com"), Err(NameError::Wildcard));
    }

    #[test]
    fn matcher_finds_exact_and_wildcards() {
        let mut m = DomainMatcher::default();
        m.insert(&DomainPattern::parse("a.example.com").expect("valid"), 0);
        m.insert(&DomainPattern::parse("*.example.com").expect("valid"), 1);
        m.insert(&DomainPattern::parse("*.com").expect("valid"), 2);
        assert_eq!(m.matches("a.example.com"), vec![0, 1, 2]);
        assert_eq!(m.matches("b.example.com"), vec![1, 2]);
        assert_eq!(m.matches("example.com"), vec![2]);
        assert_eq!(m.matches("com"), Vec::<usize>::new());
    }

    proptest::proptest! {
        #[test]
        fn normalisation_is_idempotent(raw in "[a-zA-Z0-9ßü_.-]{1,40}\\.?") {
            if let Ok(n) = normalize_name(&raw) {
                proptest::prop_assert_eq!(normalize_name(&n), Ok(n.clone()));
                proptest::prop_assert_eq!(normalize_name(&n.to_uppercase()), Ok(n.clone()));
                proptest::prop_assert_eq!(normalize_name(&format!("{n}.")), Ok(n));
            }
        }
    }
}
