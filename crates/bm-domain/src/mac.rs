//! MAC addresses of a machine's network interfaces.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DomainError;

/// A unicast IEEE 802 MAC address of a NIC, written `02:00:00:00:00:01`.
///
/// Parsing accepts `:` or `-` between octets (`02-00-00-00-00-01`) and the dotted Cisco form
/// (`0200.0000.0001`), in either case; the canonical form is lowercase with colons. The
/// all-zero address and group (multicast and broadcast) addresses are refused: no NIC has
/// one, so such a value in an inventory is a typo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddress([u8; 6]);

impl MacAddress {
    /// Validates the octets of a NIC address.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] for the all-zero address or a group address.
    pub fn from_octets(octets: [u8; 6]) -> Result<Self, DomainError> {
        let mac = MacAddress(octets);
        if octets == [0; 6] {
            return Err(DomainError::invalid(
                "MAC address",
                &mac.to_string(),
                "the all-zero address is not a NIC address",
            ));
        }
        if octets[0] & 1 == 1 {
            return Err(DomainError::invalid(
                "MAC address",
                &mac.to_string(),
                "is a group (multicast or broadcast) address: the first octet must be even",
            ));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddress {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            DomainError::invalid(
                "MAC address",
                s,
                "expected six hex octets such as 02:00:00:00:00:01",
            )
        };
        let hex: String = if s.len() == 17 {
            let sep = s.as_bytes()[2];
            if !matches!(sep, b':' | b'-') {
                return Err(bad());
            }
            let mut out = String::with_capacity(12);
            for (i, part) in s.split(sep as char).enumerate() {
                if i > 5 || part.len() != 2 {
                    return Err(bad());
                }
                out.push_str(part);
            }
            out
        } else if s.len() == 14 {
            let parts: Vec<&str> = s.split('.').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.len() != 4) {
                return Err(bad());
            }
            parts.concat()
        } else {
            return Err(bad());
        };
        // from_str_radix would accept a sign: check the digits first.
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut octets = [0u8; 6];
        for (i, octet) in octets.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *octet = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        MacAddress::from_octets(octets)
    }
}

impl TryFrom<String> for MacAddress {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddress> for String {
    fn from(mac: MacAddress) -> String {
        mac.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Result<&str, &str>) {
        match (input.parse::<MacAddress>(), expect) {
            (Ok(mac), Ok(want)) => assert_eq!(mac.to_string(), want, "{input}"),
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{input}: {e}"),
            (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_common_forms() {
        check("02:00:00:00:00:01", Ok("02:00:00:00:00:01"));
        check("52-54-00-AB-cd-EF", Ok("52:54:00:ab:cd:ef"));
        check("5254.00ab.cdef", Ok("52:54:00:ab:cd:ef"));
    }

    #[test]
    fn refuses_what_no_nic_has() {
        check("", Err("six hex octets"));
        check("02:00:00:00:00", Err("six hex octets"));
        check("02:00:00:00:00:0g", Err("six hex octets"));
        check("02:00-00:00:00:01", Err("six hex octets"));
        check("02:00:00:00:00:01:", Err("six hex octets"));
        check("+2:00:00:00:00:01", Err("six hex octets"));
        check("00:00:00:00:00:00", Err("all-zero"));
        check("ff:ff:ff:ff:ff:ff", Err("group"));
        check("01:00:5e:00:00:01", Err("group"));
    }
}
