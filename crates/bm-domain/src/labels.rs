//! Labels on machines (Kubernetes syntax) and the selectors that filter on them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DomainError;

/// Validated labels: at most [`Labels::MAX_LABELS`] pairs in Kubernetes label syntax.
///
/// A key is an optional DNS-subdomain prefix and `/`, then a name of 1 to 63 characters
/// (letters, digits, `-`, `_`, `.`, beginning and ending with a letter or digit). A value is
/// empty or follows the same rule as a name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// The most labels a machine may carry.
    pub const MAX_LABELS: usize = 64;

    /// Validates every key and value.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] for the first bad key or value, or too many labels.
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, DomainError> {
        if map.len() > Self::MAX_LABELS {
            return Err(DomainError::invalid(
                "labels",
                &format!("{} labels", map.len()),
                format!("at most {} labels are allowed", Self::MAX_LABELS),
            ));
        }
        for (k, v) in &map {
            validate_key(k)?;
            validate_value(v)?;
        }
        Ok(Labels(map))
    }

    /// Builds labels from pairs.
    ///
    /// # Errors
    ///
    /// As [`Labels::new`].
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, DomainError> {
        Labels::new(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// The value of a label.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The labels, ordered by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels as a map.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Checks one label key (e.g. the `<key>` of an update mask's `labels.<key>`).
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] saying what a key must look like.
    pub fn validate_key(key: &str) -> Result<(), DomainError> {
        validate_key(key)
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = DomainError;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Labels::new(map)
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> Self {
        labels.0
    }
}

fn is_name(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !s.is_empty()
        && s.len() <= 63
        && alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            let alnum =
                |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            !part.is_empty()
                && part.len() <= 63
                && alnum(part.chars().next())
                && alnum(part.chars().last())
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

fn validate_key(key: &str) -> Result<(), DomainError> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Err(DomainError::invalid(
            "label key",
            key,
            "the prefix before '/' must be a lowercase DNS subdomain such as example.com",
        ));
    }
    if !is_name(name) {
        return Err(DomainError::invalid(
            "label key",
            key,
            "the name must be 1-63 characters of letters, digits, '-', '_' and '.', beginning and ending with a letter or digit",
        ));
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), DomainError> {
    if value.is_empty() || is_name(value) {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "label value",
            value,
            "must be empty or 1-63 characters of letters, digits, '-', '_' and '.', beginning and ending with a letter or digit",
        ))
    }
}

/// One requirement of a [`LabelSelector`].
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::Exists(k) => labels.get(k).is_some(),
            Requirement::NotExists(k) => labels.get(k).is_none(),
            Requirement::Equals(k, v) => labels.get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
        }
    }
}

/// A Kubernetes-style label selector: requirements separated by commas, all of which must
/// hold.
///
/// `rack=r12`, `rack==r12`, `rack!=r12`, `rack in (r12,r13)`, `rack notin (r12)`, `gpu`
/// (the key exists), `!gpu` (it does not). The empty selector matches everything.
///
/// A selector is bounded, since its cost is paid for every machine it is matched against:
/// at most [`LabelSelector::MAX_BYTES`] bytes, [`LabelSelector::MAX_REQUIREMENTS`]
/// requirements and [`LabelSelector::MAX_SET_VALUES`] values in one `in` or `notin` set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    source: String,
}

impl LabelSelector {
    /// The longest selector, in bytes.
    pub const MAX_BYTES: usize = 8 * 1024;
    /// The most requirements in one selector.
    pub const MAX_REQUIREMENTS: usize = 32;
    /// The most values in one `in` or `notin` set.
    pub const MAX_SET_VALUES: usize = 256;

    /// True when every requirement holds for `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// True for the empty selector, which matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The selector that matches what both `self` and `other` match (their requirements
    /// together). It is not checked against the bounds: both parts were, when parsed.
    #[must_use]
    pub fn and(&self, other: &LabelSelector) -> LabelSelector {
        let source = match (self.source.trim(), other.source.trim()) {
            ("", b) => b.to_owned(),
            (a, "") => a.to_owned(),
            (a, b) => format!("{a},{b}"),
        };
        let mut requirements = self.requirements.clone();
        requirements.extend(other.requirements.iter().cloned());
        LabelSelector {
            requirements,
            source,
        }
    }
}

/// What a selector's requirement demands of one key, for a store that looks matches up in
/// an index of labels rather than reading every machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyConstraint<'a> {
    /// The key must be present with one of these values (`k=v`, `k in (v1,v2)`).
    OneOf(&'a str, &'a [String]),
    /// The key must be present, with any value (`k`).
    Present(&'a str),
}

impl LabelSelector {
    /// The requirements that a matching label set must *have* a label for (`k`, `k=v`,
    /// `k in (...)`), in the order written; the negative ones (`!k`, `k!=v`,
    /// `k notin (...)`) are left out. Every label set the selector matches meets each of
    /// these, so a store may take its candidates from any one of them and then apply
    /// [`LabelSelector::matches`].
    pub fn positive_requirements(&self) -> impl Iterator<Item = KeyConstraint<'_>> {
        self.requirements.iter().filter_map(|r| match r {
            Requirement::Exists(k) => Some(KeyConstraint::Present(k)),
            Requirement::Equals(k, v) => Some(KeyConstraint::OneOf(k, std::slice::from_ref(v))),
            Requirement::In(k, vs) => Some(KeyConstraint::OneOf(k, vs)),
            Requirement::NotExists(_) | Requirement::NotEquals(..) | Requirement::NotIn(..) => None,
        })
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for LabelSelector {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| DomainError::invalid("label selector", s, reason);
        // Checked before anything else looks at the text.
        if s.len() > Self::MAX_BYTES {
            return Err(bad(&format!(
                "is {} bytes long; a selector may be at most {} bytes",
                s.len(),
                Self::MAX_BYTES
            )));
        }
        let mut requirements = Vec::new();
        let mut rest = s.trim();
        if rest.ends_with(',') {
            return Err(bad("trailing comma"));
        }
        while !rest.is_empty() {
            // A requirement ends at a comma outside parentheses.
            let mut depth = 0i32;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let req = rest[..end].trim();
            rest = rest.get(end + 1..).unwrap_or("").trim();
            if req.is_empty() {
                return Err(bad("empty requirement between commas"));
            }
            if requirements.len() == Self::MAX_REQUIREMENTS {
                return Err(bad(&format!(
                    "has more than {} requirements; a selector may have at most {}",
                    Self::MAX_REQUIREMENTS,
                    Self::MAX_REQUIREMENTS
                )));
            }
            requirements.push(parse_requirement(req).map_err(|reason| bad(&reason))?);
        }
        Ok(LabelSelector {
            requirements,
            source: s.trim().to_owned(),
        })
    }
}

fn parse_requirement(req: &str) -> Result<Requirement, String> {
    let key_ok = |k: &str| validate_key(k).map_err(|e| e.to_string());
    let value_ok = |v: &str| validate_value(v).map_err(|e| e.to_string());
    if let Some(key) = req.strip_prefix('!') {
        let key = key.trim();
        key_ok(key)?;
        return Ok(Requirement::NotExists(key.to_owned()));
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = req.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            key_ok(k)?;
            value_ok(v)?;
            return Ok(if negate {
                Requirement::NotEquals(k.to_owned(), v.to_owned())
            } else {
                Requirement::Equals(k.to_owned(), v.to_owned())
            });
        }
    }
    let mut words = req.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or("").trim();
    let Some(tail) = words.next().map(str::trim) else {
        key_ok(key)?;
        return Ok(Requirement::Exists(key.to_owned()));
    };
    key_ok(key)?;
    let (negate, list) = if let Some(l) = tail.strip_prefix("notin") {
        (true, l)
    } else if let Some(l) = tail.strip_prefix("in") {
        (false, l)
    } else {
        return Err(format!(
            "expected '=', '!=', 'in' or 'notin' after key {}",
            crate::snippet(key)
        ));
    };
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| "a set must be written in parentheses, e.g. rack in (r1,r2)".to_owned())?;
    let count = inner.split(',').count();
    if count > LabelSelector::MAX_SET_VALUES {
        return Err(format!(
            "the set of key {} has {count} values; a set may have at most {}",
            crate::snippet(key),
            LabelSelector::MAX_SET_VALUES
        ));
    }
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
    if values.iter().all(String::is_empty) {
        return Err("a set needs at least one value".to_owned());
    }
    for v in &values {
        value_ok(v)?;
    }
    let key = key.to_owned();
    Ok(if negate {
        Requirement::NotIn(key, values)
    } else {
        Requirement::In(key, values)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_requirements_are_those_a_match_must_have() {
        let s: LabelSelector = "rack in (r1,r2), !retired, zone=a, gpu, os!=x, t notin (y)"
            .parse()
            .unwrap();
        let r1r2 = ["r1".to_owned(), "r2".to_owned()];
        let a = ["a".to_owned()];
        assert_eq!(
            s.positive_requirements().collect::<Vec<_>>(),
            [
                KeyConstraint::OneOf("rack", &r1r2),
                KeyConstraint::OneOf("zone", &a),
                KeyConstraint::Present("gpu"),
            ]
        );
        let negative: LabelSelector = "!a, b!=c".parse().unwrap();
        assert_eq!(negative.positive_requirements().count(), 0);
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied()).unwrap()
    }

    #[test]
    fn and_matches_what_both_match() {
        let a: LabelSelector = "team=storage".parse().unwrap();
        let b: LabelSelector = "rack in (r1,r2)".parse().unwrap();
        let both = a.and(&b);
        assert_eq!(both.to_string(), "team=storage,rack in (r1,r2)");
        assert!(both.matches(&labels(&[("team", "storage"), ("rack", "r1")])));
        assert!(!both.matches(&labels(&[("team", "storage"), ("rack", "r3")])));
        assert!(!both.matches(&labels(&[("team", "web"), ("rack", "r1")])));
        let empty = LabelSelector::default();
        assert_eq!(empty.and(&a), a);
        assert_eq!(a.and(&empty), a);
    }

    #[test]
    fn keys_and_values() {
        for good in [
            "rack",
            "example.com/rack",
            "a.b-c_d",
            "bm.example.io/fail-action",
        ] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-rack",
            "rack-",
            "Example.com/rack",
            "a/b/c",
            "/rack",
            "rack/",
            &"k".repeat(64),
        ] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
        for good in ["", "r12", "A_b.c-9"] {
            assert!(validate_value(good).is_ok(), "{good}");
        }
        for bad in ["-x", "x y", "a/b", &"v".repeat(64)] {
            assert!(validate_value(bad).is_err(), "{bad}");
        }
        let too_many: BTreeMap<_, _> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(Labels::new(too_many).is_err());
    }

    fn check(selector: &str, on: &[(&str, &str)], expect: bool) {
        let sel: LabelSelector = selector
            .parse()
            .unwrap_or_else(|e| panic!("{selector}: {e}"));
        assert_eq!(sel.matches(&labels(on)), expect, "{selector} on {on:?}");
    }

    #[test]
    fn selectors_match() {
        let l = [("rack", "r12"), ("gpu", "")];
        check("", &l, true);
        check("rack=r12", &l, true);
        check("gpu=", &l, true);
        check("rack==r12", &l, true);
        check("rack=r13", &l, false);
        check("rack!=r13", &l, true);
        check("zone!=a", &l, true);
        check("gpu", &l, true);
        check("!gpu", &l, false);
        check("!zone", &l, true);
        check("rack in (r11, r12)", &l, true);
        check("rack notin (r11,r12)", &l, false);
        check("zone notin (a)", &l, true);
        check("rack in (r11,r12), gpu, !zone", &l, true);
        check("rack in (r11,r12),zone", &l, false);
    }

    #[test]
    fn bad_selectors_say_why() {
        for (bad, why) in [
            ("rack=a b", "label value"),
            ("-rack=r1", "label key"),
            ("rack in r1", "parentheses"),
            ("rack in ()", "at least one"),
            ("rack,,gpu", "empty requirement"),
            ("rack like r1", "'in' or 'notin'"),
            ("rack=r1,", "trailing comma"),
            (
                format!("rack={}", "r".repeat(10_000)).as_str(),
                "at most 8192 bytes",
            ),
            (vec!["gpu"; 33].join(",").as_str(), "at most 32"),
            (
                format!("rack in ({})", vec!["r1"; 257].join(",")).as_str(),
                "257 values; a set may have at most 256",
            ),
        ] {
            let err = bad
                .parse::<LabelSelector>()
                .map(|s| format!("{s:?}"))
                .expect_err(bad)
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.len() < 400, "the error echoes a bounded snippet: {err}");
        }
    }

    #[test]
    fn selectors_at_their_limits_are_accepted() {
        let reqs = (0..LabelSelector::MAX_REQUIREMENTS)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let values = (0..LabelSelector::MAX_SET_VALUES)
            .map(|i| format!("r{i}"))
            .collect::<Vec<_>>()
            .join(",");
        for ok in [reqs, format!("rack in ({values})")] {
            assert!(ok.len() <= LabelSelector::MAX_BYTES);
            ok.parse::<LabelSelector>()
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
