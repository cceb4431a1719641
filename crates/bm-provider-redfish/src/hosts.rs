//! Which BMC hosts a setting applies to: an IP network (CIDR or single address) or a host
//! name matched as written in `bmc_endpoint`.
//!
//! Names are never resolved: the decision must not depend on a DNS answer that whoever
//! controls the resolver could change between the check and the request. So a CIDR matches
//! only endpoints written with an IP address, and a name pattern only endpoints written with
//! a name.

use std::net::IpAddr;

use ipnet::IpNet;

/// A set of BMC hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// The IP-literal hosts in a network (a single address is a /32 or /128).
    Net(IpNet),
    /// Host names matching a pattern (lower case) where `*` stands for any run of
    /// characters other than `.`.
    Name(String),
}

impl HostPattern {
    /// Parses `10.0.0.0/8`, `10.0.1.5`, `fd00::/64`, `[fd00::5]`, `bmc-*.dc1.example` or
    /// `bmc1.lab`.
    pub(crate) fn parse(s: &str) -> Result<HostPattern, String> {
        let t = s.trim();
        let unbracketed = t
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(t);
        if t.contains('/') {
            return t
                .parse::<IpNet>()
                .map(|n| HostPattern::Net(n.trunc()))
                .map_err(|_| {
                    format!("{s:?} is not a CIDR such as \"10.0.0.0/8\" or \"fd00::/64\"")
                });
        }
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(HostPattern::Net(IpNet::from(ip)));
        }
        let name = t.to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*' || b == b'_')
        };
        if name.is_empty() || !name.split('.').all(label_ok) || name.contains(':') {
            return Err(format!(
                "{s:?} is not a CIDR, an IP address or a host name (pattern) such as \"bmc-*.dc1.example\""
            ));
        }
        Ok(HostPattern::Name(name))
    }

    /// Whether `host` (as in a parsed BMC URL: `10.0.1.5`, `[fd00::5]`, `bmc1.lab`) is in the
    /// set.
    pub(crate) fn matches(&self, host: &str) -> bool {
        let unbracketed = host
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(host);
        match (self, unbracketed.parse::<IpAddr>()) {
            (HostPattern::Net(net), Ok(ip)) => net.contains(&ip),
            (HostPattern::Name(p), Err(_)) => {
                glob(p.as_bytes(), host.to_ascii_lowercase().as_bytes())
            }
            _ => false,
        }
    }

    /// How specific the set is, to pick the narrowest of several that match: the prefix
    /// length of a network, the number of literal characters of a name pattern.
    pub(crate) fn specificity(&self) -> usize {
        match self {
            HostPattern::Net(n) => usize::from(n.prefix_len()),
            HostPattern::Name(p) => p.bytes().filter(|&b| b != b'*').count(),
        }
    }
}

/// `*` matches any run of bytes other than `.`.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob(rest, &name[i..]) {
                    return true;
                }
                if i == name.len() || name[i] == b'.' {
                    return false;
                }
                i += 1;
            }
        }
        Some((&c, rest)) => name.first() == Some(&c) && glob(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_ip_literals_and_names_match_names_as_written() {
        let cases = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.0/8", "bmc.lab", false),
            ("10.0.1.5", "10.0.1.5", true),
            ("10.0.1.5", "10.0.1.6", false),
            ("fd00::/64", "[fd00::5]", true),
            ("[fd00::5]", "[fd00::5]", true),
            ("fd00::/64", "[fd01::5]", false),
            ("127.0.0.0/8", "localhost", false),
            ("bmc-*.dc1.example", "bmc-r1.dc1.example", true),
            ("bmc-*.dc1.example", "BMC-R1.dc1.example", true),
            ("bmc-*.dc1.example", "bmc-.dc1.example", true),
            // `*` stays within one label.
            ("bmc-*.dc1.example", "bmc-r1.evil.dc1.example", false),
            ("bmc-*.dc1.example", "bmc-r1.dc1.example.evil", false),
            ("*.lab", "a.lab", true),
            ("*.lab", "a.b.lab", false),
            ("bmc1.lab", "bmc1.lab", true),
            ("bmc1.lab", "bmc1.lab2", false),
            // A name pattern never matches an address, even one it could spell.
            ("*.*.*.*", "10.0.0.1", false),
        ];
        for (pattern, host, want) in cases {
            let p = HostPattern::parse(pattern).unwrap();
            assert_eq!(p.matches(host), want, "{pattern} vs {host}");
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "bmc..lab",
            "a b",
            "h:443",
            "x/y",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn narrower_sets_are_more_specific() {
        let s = |p: &str| HostPattern::parse(p).unwrap().specificity();
        assert!(s("10.0.1.0/24") > s("10.0.0.0/8"));
        assert!(s("bmc-*.dc1.example") > s("*.dc1.example"));
    }
}
