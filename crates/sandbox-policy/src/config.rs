//! The file format: the serde model that TOML, JSON and YAML all read, and line lookup.

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// What happens to traffic that no rule allows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Refuse it (the default).
    #[default]
    Deny,
    /// Let it through (reserved addresses and `deny` rules still apply).
    Allow,
    /// Let it through like `allow`, and record what `deny` would have refused.
    Learn,
}

/// Which transport protocols a rule covers. ICMP means ICMP and ICMPv6.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolConfig {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// ICMP/ICMPv6 only (no `ports`).
    Icmp,
    /// TCP, UDP and ICMP (the default); with `ports`, TCP and UDP on those ports.
    #[default]
    Any,
}

/// One `ports` entry: a number (`443`) or an inclusive range string (`"8000-8099"`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortConfig {
    /// A single port.
    Number(i64),
    /// `"a-b"` or `"a"`.
    Text(String),
}

/// One rule as written. Exactly one of `domain` and `cidr` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RuleConfig {
    /// `name` (exactly that name) or `*.suffix` (any name strictly below `suffix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `address/prefix` or a bare address, IPv4 or IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Destination ports; absent means every port (and, for `any`, ICMP too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortConfig>>,
    /// `tcp`, `udp`, `icmp` or `any` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolConfig>,
}

/// A whole policy file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// What happens to traffic no rule allows; `deny` when absent.
    #[serde(default)]
    pub default: DefaultAction,
    /// Allow rules, in file order (index 0 first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<RuleConfig>,
    /// Deny rules, in file order; a deny rule wins over every allow rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<RuleConfig>,
}

/// A policy file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// TOML 1.0/1.1.
    Toml,
    /// JSON.
    Json,
    /// YAML 1.2 (the subset serde_yaml reads).
    Yaml,
}

impl Format {
    /// The format for a file extension (`toml`, `json`, `yaml`/`yml`, any case).
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "toml" => Some(Self::Toml),
            "json" => Some(Self::Json),
            "yaml" | "yml" => Some(Self::Yaml),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Toml => "TOML",
            Self::Json => "JSON",
            Self::Yaml => "YAML",
        })
    }
}

/// A syntax or shape error from the format's parser, with its 1-based position when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// The parser's message.
    pub message: String,
}

/// Deserialises `text` in `format` into the model.
pub(crate) fn read(text: &str, format: Format) -> Result<PolicyConfig, SyntaxError> {
    match format {
        Format::Toml => toml::from_str(text).map_err(|e| toml_error(text, &e)),
        Format::Json => serde_json::from_str(text).map_err(|e| json_error(&e)),
        Format::Yaml => serde_yaml::from_str(text).map_err(|e| yaml_error(&e)),
    }
}

fn toml_error(text: &str, e: &toml::de::Error) -> SyntaxError {
    let (line, column) = match e.span() {
        Some(span) => {
            let (l, c) = line_col(text, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    SyntaxError {
        line,
        column,
        message: e.message().trim().to_owned(),
    }
}

fn json_error(e: &serde_json::Error) -> SyntaxError {
    let known = e.line() > 0;
    SyntaxError {
        line: known.then_some(e.line()),
        column: known.then_some(e.column()),
        message: e.to_string(),
    }
}

fn yaml_error(e: &serde_yaml::Error) -> SyntaxError {
    let loc = e.location();
    SyntaxError {
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        message: e.to_string(),
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The 1-based line of rule `index` in list `list` (`"allow"`/`"deny"`) and, when `field` is
/// given and present, of that field's value.
///
/// It deserialises the text once more, skipping everything up to the target and failing on
/// purpose there: each format's error then carries the position of the target.
pub(crate) fn locate(
    text: &str,
    format: Format,
    list: &str,
    index: usize,
    field: Option<&str>,
) -> Option<usize> {
    let seed = Locate { list, index, field };
    let err = match format {
        Format::Toml => {
            let de = toml::de::Deserializer::parse(text).ok()?;
            toml_error(text, &seed.deserialize(de).err()?)
        }
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            json_error(&seed.deserialize(&mut de).err()?)
        }
        Format::Yaml => {
            let de = serde_yaml::Deserializer::from_str(text);
            yaml_error(&seed.deserialize(de).err()?)
        }
    };
    err.line
}

const HERE: &str = "sandbox-policy locator";

struct Locate<'a> {
    list: &'a str,
    index: usize,
    field: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a policy table")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == self.list {
                map.next_value_seed(LocateSeq {
                    index: self.index,
                    field: self.field,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct LocateSeq<'a> {
    index: usize,
    field: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for LocateSeq<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for LocateSeq<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list of rules")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(LocateRule { field: self.field })?;
        Ok(())
    }
}

struct LocateRule<'a> {
    field: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for LocateRule<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.field {
            Some(_) => d.deserialize_map(self),
            None => d.deserialize_any(Here),
        }
    }
}

impl<'de> Visitor<'de> for LocateRule<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a rule")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if Some(key.as_str()) == self.field {
                map.next_value_seed(HereSeed)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Err(de::Error::custom(HERE))
    }
}

struct HereSeed;

impl<'de> DeserializeSeed<'de> for HereSeed {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Here)
    }
}

/// Refuses every value, so the error is raised where the value starts.
struct Here;

impl Visitor<'_> for Here {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(HERE)
    }
}
