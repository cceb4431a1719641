//! Identifiers: machines (chosen by the operator), operations (ULIDs), request ids (chosen by
//! the client for idempotency).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::DomainError;

/// The id of a machine, chosen by whoever registers it (an inventory tag, a hostname).
///
/// 1 to 63 characters: lowercase ASCII letters, digits, `-`, `.` and `_`, starting and
/// ending with a letter or digit. Lowercase only, so that `Node-1` and `node-1` can never
/// name two machines.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MachineId(String);

impl MachineId {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 63;

    /// Validates and wraps a machine id.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] naming the offending character or the length.
    pub fn new(id: impl Into<String>) -> Result<Self, DomainError> {
        let id = id.into();
        let bad = |reason: String| Err(DomainError::invalid("machine id", &id, reason));
        if id.is_empty() {
            return bad("must not be empty".into());
        }
        if id.len() > Self::MAX_LEN {
            return bad(format!("must be at most {} characters", Self::MAX_LEN));
        }
        if let Some(c) = id.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'))
        }) {
            let hint = if c.is_ascii_uppercase() {
                " (machine ids are lowercase)"
            } else {
                ""
            };
            return bad(format!(
                "character {c:?} is not allowed; use lowercase letters, digits, '-', '.' and '_'{hint}"
            ));
        }
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !alnum(id.chars().next()) || !alnum(id.chars().last()) {
            return bad("must start and end with a letter or digit".into());
        }
        Ok(MachineId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for MachineId {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MachineId::new(s)
    }
}

impl TryFrom<String> for MachineId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        MachineId::new(s)
    }
}

impl From<MachineId> for String {
    fn from(id: MachineId) -> String {
        id.0
    }
}

/// The id of an operation: a ULID, so ids sort by creation time, written `op-<ULID>`.
///
/// Parsing accepts the ULID with or without the `op-` prefix, in either case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OperationId(Ulid);

impl OperationId {
    const PREFIX: &'static str = "op-";

    /// An id from its parts: milliseconds since the Unix epoch and 80 random bits (the
    /// caller owns the clock and the randomness).
    pub fn from_parts(unix_millis: u64, random: u128) -> Self {
        OperationId(Ulid::from_parts(unix_millis, random))
    }

    /// Wraps a ULID.
    pub fn from_ulid(ulid: Ulid) -> Self {
        OperationId(ulid)
    }

    /// The ULID inside.
    pub fn ulid(self) -> Ulid {
        self.0
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.0)
    }
}

impl FromStr for OperationId {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        prefixed_ulid(s, Self::PREFIX, "operation id").map(OperationId)
    }
}

/// The ULID of an id written `<prefix><ULID>` (an operation's `op-`, a rollout's `ro-`):
/// the prefix in either case, or none; `what` names the id in the error.
pub(crate) fn prefixed_ulid(
    s: &str,
    prefix: &str,
    what: &'static str,
) -> Result<Ulid, DomainError> {
    let body = s
        .strip_prefix(prefix)
        .or_else(|| s.strip_prefix(prefix.to_uppercase().as_str()))
        .unwrap_or(s);
    // 26 base-32 digits hold 130 bits; a ULID has 128, so the first digit is 0-7. The ulid
    // crate drops the extra bits, which would make `op-8ZZZ...` name `op-0ZZZ...`.
    if body.len() == 26 && body.as_bytes()[0] > b'7' {
        return Err(DomainError::invalid(
            what,
            s,
            "is out of range: a ULID begins with a digit from 0 to 7",
        ));
    }
    Ulid::from_string(body).map_err(|_| {
        DomainError::invalid(
            what,
            s,
            format!(
                "expected {prefix} followed by a 26-character ULID, e.g. {prefix}01JD3F5Q2W8Y4ZP0N7R6T9V3KM"
            ),
        )
    })
}

impl TryFrom<String> for OperationId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<OperationId> for String {
    fn from(id: OperationId) -> String {
        id.to_string()
    }
}

/// A client-chosen key that makes an operation request idempotent, scoped to one machine.
///
/// 1 to 128 characters: ASCII letters, digits and `-`, `_`, `.`, `:` (a UUID or a ULID fits).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    /// The longest accepted request id.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps a request id.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] if it is empty, too long or has a character outside the set.
    pub fn new(id: impl Into<String>) -> Result<Self, DomainError> {
        let id = id.into();
        if id.is_empty() {
            return Err(DomainError::invalid("request id", &id, "must not be empty"));
        }
        if id.len() > Self::MAX_LEN {
            return Err(DomainError::invalid(
                "request id",
                &id,
                format!("must be at most {} characters", Self::MAX_LEN),
            ));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
        {
            return Err(DomainError::invalid(
                "request id",
                &id,
                format!(
                    "character {c:?} is not allowed; use letters, digits, '-', '_', '.' and ':'"
                ),
            ));
        }
        Ok(RequestId(id))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A request id the domain derives itself, known to be valid (a rollout's).
    pub(crate) fn derived(id: String) -> Self {
        debug_assert!(RequestId::new(id.clone()).is_ok(), "{id}");
        RequestId(id)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RequestId {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestId::new(s)
    }
}

impl TryFrom<String> for RequestId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RequestId::new(s)
    }
}

impl From<RequestId> for String {
    fn from(id: RequestId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_machine(input: &str, ok: bool) {
        let got = MachineId::new(input);
        assert_eq!(got.is_ok(), ok, "{input:?} -> {got:?}");
    }

    #[test]
    fn machine_ids() {
        for good in ["machine-1", "a", "r740.rack-12_u3", "0", &"a".repeat(63)] {
            check_machine(good, true);
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Machine-1",
            "a b",
            "a/b",
            "é",
            &"a".repeat(64),
        ] {
            check_machine(bad, false);
        }
        let err = MachineId::new("Machine-1").unwrap_err().to_string();
        assert!(err.contains("lowercase"), "{err}");
    }

    #[test]
    fn operation_ids_round_trip_with_or_without_prefix() {
        let id = OperationId::from_parts(1_795_437_965_123, 42);
        let s = id.to_string();
        assert!(s.starts_with("op-") && s.len() == 29, "{s}");
        assert_eq!(s.parse::<OperationId>().unwrap(), id);
        assert_eq!(s[3..].parse::<OperationId>().unwrap(), id);
        assert_eq!(s.to_lowercase().parse::<OperationId>().unwrap(), id);
        let err = "op-nope".parse::<OperationId>().unwrap_err().to_string();
        assert!(err.contains("ULID"), "{err}");
    }

    #[test]
    fn out_of_range_ulids_are_refused_not_wrapped() {
        let max = "op-7ZZZZZZZZZZZZZZZZZZZZZZZZZ"
            .parse::<OperationId>()
            .unwrap();
        assert_eq!(max.ulid(), Ulid(u128::MAX));
        for bad in [
            "op-8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "op-80000000000000000000000000",
            "ZZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "op-zzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            let err = bad.parse::<OperationId>().unwrap_err().to_string();
            assert!(err.contains("out of range"), "{bad}: {err}");
        }
    }

    #[test]
    fn operation_ids_sort_by_time() {
        let a = OperationId::from_parts(1, u128::MAX >> 48);
        let b = OperationId::from_parts(2, 0);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn request_ids() {
        for good in [
            "demo-idempotent-123",
            "0b6f3c2e-1d7a-4c1e-9f51-2f6f1b9e4a10",
            "a:b.c_d",
        ] {
            assert!(RequestId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "a/b", &"r".repeat(129)] {
            assert!(RequestId::new(bad).is_err(), "{bad}");
        }
    }
}
