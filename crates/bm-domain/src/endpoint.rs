//! The two addresses of a machine's spec, parsed strictly: its SSH endpoint
//! (`[user@]host[:port]`) and its BMC endpoint (`redfish+https://host[:port]/path`).
//!
//! These are the one parsers of the two fields: the spec is validated with them at
//! registration, import and update, and providers read the fields with them, so that a machine
//! that registers is one a provider can reach, and a value that could be read as something
//! else (an option of a command, a second host, credentials) never gets into the inventory.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::DomainError;
use crate::machine::validate_token;

/// The longest accepted host name, in bytes (RFC 1123, without a trailing dot).
const MAX_HOST_NAME: usize = 253;
/// The longest accepted label of a host name, in bytes.
const MAX_LABEL: usize = 63;
/// The longest accepted user name, in bytes (what `useradd` accepts).
const MAX_USER: usize = 32;

const HOST_RULE: &str = "the host must be an IPv4 address, an IPv6 address in brackets, or a host name of dot-separated labels of letters, digits and '-' (RFC 1123: 1-63 characters each, not starting or ending with '-')";
const PORT_RULE: &str = "the port must be a number from 1 to 65535";

/// Checks a host as written between `@`/`//` and `:port`: an IPv6 address in brackets, an
/// IPv4 address, or an RFC 1123 host name. Returns the host without brackets.
fn parse_host(s: &str) -> Result<&str, &'static str> {
    if let Some(inner) = s.strip_prefix('[') {
        return match inner.strip_suffix(']') {
            Some(addr) if addr.parse::<Ipv6Addr>().is_ok() => Ok(addr),
            _ => Err("an IPv6 address must be a valid address in brackets, e.g. [fd00::5]"),
        };
    }
    if s.is_empty() {
        return Err("the host is missing");
    }
    if s.starts_with('-') {
        // It would be read as an option by the tools that get it (ssh, curl, ...).
        return Err("the host must not start with '-'");
    }
    if s.contains(':') {
        return Err("an IPv6 address must be written in brackets, e.g. [fd00::5]");
    }
    let name = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = name.split('.').collect();
    // A last label that is a number makes the host an IPv4 address (RFC 1123 2.1; URL
    // parsers read it so too): it must then be a valid one.
    let last = labels.last().copied().unwrap_or_default();
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .or_else(|| last.strip_prefix("0X"))
                .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())));
    if numeric {
        return match s.parse::<Ipv4Addr>() {
            Ok(_) => Ok(s),
            Err(_) => Err("the host is not a valid IPv4 address (four numbers from 0 to 255)"),
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= MAX_LABEL
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() <= MAX_HOST_NAME && labels.iter().all(|l| label_ok(l)) {
        Ok(s)
    } else {
        Err(HOST_RULE)
    }
}

fn parse_port(p: &str) -> Result<u16, &'static str> {
    // Digits only: `u16::from_str` would also take "+22".
    let digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match p.parse::<u16>() {
        Ok(port @ 1..) if digits => Ok(port),
        _ => Err(PORT_RULE),
    }
}

/// `host[:port]` or `[address][:port]` into the host (checked, without brackets) and the
/// port (if any).
fn parse_host_port(s: &str) -> Result<(&str, Option<u16>), &'static str> {
    let (host, port) = if s.starts_with('[') {
        match s.find(']') {
            Some(i) => {
                let (host, tail) = s.split_at(i + 1);
                match tail {
                    "" => (host, None),
                    // Anything after the ']' but ":port" is a typo, not something to ignore.
                    _ => match tail.strip_prefix(':') {
                        Some(port) => (host, Some(port)),
                        None => {
                            return Err("an IPv6 address must be written as [addr] or [addr]:port");
                        }
                    },
                }
            }
            None => return Err("an IPv6 address must be written as [addr] or [addr]:port"),
        }
    } else {
        match s.split_once(':') {
            Some((host, port)) if !port.contains(':') => (host, Some(port)),
            Some(_) => return Err("an IPv6 address must be written in brackets, e.g. [fd00::5]"),
            None => (s, None),
        }
    };
    let host = parse_host(host)?;
    let port = port.map(parse_port).transpose()?;
    Ok((host, port))
}

/// Writes a host, in brackets if it is an IPv6 address.
fn write_host(f: &mut fmt::Formatter<'_>, host: &str) -> fmt::Result {
    if host.contains(':') {
        write!(f, "[{host}]")
    } else {
        f.write_str(host)
    }
}

/// A parsed [`crate::MachineSpec::ssh_endpoint`]: `[user@]host[:port]`, an IPv6 address
/// written `[addr]` or `[addr]:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshEndpoint {
    /// The user, if the endpoint names one.
    pub user: Option<String>,
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port, if the endpoint names one (providers apply their default, usually 22).
    pub port: Option<u16>,
}

impl SshEndpoint {
    /// The longest accepted endpoint, in bytes.
    pub const MAX_LEN: usize = 300;
}

/// Checks the user of an SSH endpoint: a plain user name that no tool takes for an option.
fn check_user(user: &str) -> Result<(), &'static str> {
    if user.contains(':') {
        return Err("the user before '@' must be a plain user name (no password)");
    }
    let ok = !user.is_empty()
        && user.len() <= MAX_USER
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(
            "the user before '@' must be a plain user name: 1-32 letters, digits, '.', '_' or '-', not starting with '-'",
        )
    }
}

impl FromStr for SshEndpoint {
    type Err = DomainError;

    /// Parses `[user@]host[:port]`.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] saying what is wrong: an empty endpoint, whitespace or
    /// control characters, more than one '@', a user that is not a plain user name (a
    /// password, or a leading '-'), a host that is not an IPv4 address, a bracketed IPv6
    /// address or an RFC 1123 host name, anything after an IPv6 address but `:port`, a port
    /// that is not a number from 1 to 65535.
    fn from_str(s: &str) -> Result<Self, DomainError> {
        validate_token("SSH endpoint", s, Self::MAX_LEN)?;
        let bad = |reason: &str| DomainError::invalid("SSH endpoint", s, reason);
        if s.is_empty() {
            return Err(bad("is empty: expected [user@]host[:port]"));
        }
        let (user, host_port) = match s.split_once('@') {
            Some((_, rest)) if rest.contains('@') => {
                return Err(bad("expected [user@]host[:port] with at most one '@'"));
            }
            Some((user, rest)) => {
                check_user(user).map_err(bad)?;
                (Some(user), rest)
            }
            None => (None, s),
        };
        let (host, port) = parse_host_port(host_port)
            .map_err(|e| bad(&format!("expected [user@]host[:port]: {e}")))?;
        Ok(SshEndpoint {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for SshEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(user) = &self.user {
            write!(f, "{user}@")?;
        }
        // Brackets keep the port apart from an IPv6 address's own colons.
        write_host(f, &self.host)?;
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// How a BMC is spoken to: the scheme of a [`BmcEndpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BmcScheme {
    /// `redfish+https`: Redfish over HTTPS.
    RedfishHttps,
    /// `redfish+http`: Redfish over plain HTTP (labs and emulators).
    RedfishHttp,
}

impl BmcScheme {
    /// Every scheme a provider accepts. A provider that speaks another protocol adds its
    /// scheme here, so that its machines can register.
    pub const ALL: [BmcScheme; 2] = [BmcScheme::RedfishHttps, BmcScheme::RedfishHttp];

    /// The scheme as written in the URL, e.g. `redfish+https`.
    pub fn as_str(self) -> &'static str {
        match self {
            BmcScheme::RedfishHttps => "redfish+https",
            BmcScheme::RedfishHttp => "redfish+http",
        }
    }
}

/// A parsed [`crate::MachineSpec::bmc_endpoint`]:
/// `scheme://host[:port][/path][?query]`, e.g. `redfish+https://10.0.0.5/redfish/v1/Systems/1`.
///
/// The URL never carries credentials (they live in the server's provider configuration) and
/// has no `#fragment`; what the path and the query select is the provider's business.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BmcEndpoint {
    /// The protocol.
    pub scheme: BmcScheme,
    /// The host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// The port, if the URL names one.
    pub port: Option<u16>,
    /// The path as written, from its '/' (empty if the URL has none).
    pub path: String,
    /// The query as written, without its '?', if the URL has one.
    pub query: Option<String>,
}

impl BmcEndpoint {
    /// The longest accepted endpoint, in bytes.
    pub const MAX_LEN: usize = 1024;
}

impl FromStr for BmcEndpoint {
    type Err = DomainError;

    /// Parses `scheme://host[:port][/path][?query]`.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] saying what is wrong: not a URL, a scheme no provider accepts
    /// (see [`BmcScheme::ALL`]), credentials in the URL, a host that is not an IPv4 address, a
    /// bracketed IPv6 address or an RFC 1123 host name, a port that is not a number from 1 to
    /// 65535, a `#fragment`, whitespace or control characters.
    fn from_str(s: &str) -> Result<Self, DomainError> {
        validate_token("BMC endpoint", s, Self::MAX_LEN)?;
        let bad = |reason: &str| DomainError::invalid("BMC endpoint", s, reason);
        let schemes = || {
            BmcScheme::ALL
                .iter()
                .map(|k| format!("{}://", k.as_str()))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(bad(
                "expected a URL such as redfish+https://10.0.0.5/redfish/v1/Systems/1",
            ));
        };
        let Some(scheme) = BmcScheme::ALL.into_iter().find(|k| k.as_str() == scheme) else {
            return Err(bad(&format!(
                "unknown scheme {scheme:?}: the scheme must be {} (lowercase)",
                schemes()
            )));
        };
        if rest.contains('#') {
            return Err(bad("must not have a #fragment"));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if authority.is_empty() {
            return Err(bad("the URL has no host"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials do not belong in the machine record: put them in the server's provider configuration",
            ));
        }
        let (host, port) = parse_host_port(authority).map_err(bad)?;
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (tail, None),
        };
        Ok(BmcEndpoint {
            scheme,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            query,
        })
    }
}

impl fmt::Display for BmcEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        write_host(f, &self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        f.write_str(&self.path)?;
        match &self.query {
            Some(q) => write!(f, "?{q}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(user: Option<&str>, host: &str, port: Option<u16>) -> SshEndpoint {
        SshEndpoint {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        }
    }

    /// Every case: what parses (and prints back as written), and what is refused with which
    /// words in the message.
    fn check<T>(text: &str, expect: Result<T, &str>)
    where
        T: FromStr<Err = DomainError> + fmt::Debug + fmt::Display + PartialEq,
    {
        match (text.parse::<T>(), expect) {
            (Ok(got), Ok(want)) => {
                assert_eq!(got, want, "{text}");
                assert_eq!(got.to_string(), text, "the display round-trips");
            }
            (Err(e), Err(want)) => {
                assert!(e.is_invalid_input(), "{text}: {e:?}");
                assert!(e.to_string().contains(want), "{text}: {e}\n want: {want}");
            }
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn ssh_endpoints_parse_strictly() {
        let cases: &[(&str, Result<SshEndpoint, &str>)] = &[
            ("10.0.0.1", Ok(ssh(None, "10.0.0.1", None))),
            (
                "root@10.0.0.1:2222",
                Ok(ssh(Some("root"), "10.0.0.1", Some(2222))),
            ),
            (
                "deploy@node-1.lab",
                Ok(ssh(Some("deploy"), "node-1.lab", None)),
            ),
            ("node-1.lab.", Ok(ssh(None, "node-1.lab.", None))),
            ("svc_deploy.2@h", Ok(ssh(Some("svc_deploy.2"), "h", None))),
            ("[fe80::1]:2222", Ok(ssh(None, "fe80::1", Some(2222)))),
            ("u@[fe80::1]", Ok(ssh(Some("u"), "fe80::1", None))),
            ("h:65535", Ok(ssh(None, "h", Some(65535)))),
            ("", Err("is empty")),
            ("@h", Err("plain user name")),
            ("u:p@h", Err("no password")),
            ("a@b@c", Err("at most one '@'")),
            ("-oProxyCommand=evil", Err("must not start with '-'")),
            ("-oProxyCommand=evil@h", Err("not starting with '-'")),
            ("u@-h", Err("must not start with '-'")),
            ("h:0", Err("port")),
            ("h:", Err("port")),
            ("h:+22", Err("port")),
            ("h:ssh", Err("port")),
            ("h:65536", Err("port")),
            ("h:99999", Err("port")),
            ("[::1", Err("[addr]:port")),
            ("[]:22", Err("valid address in brackets")),
            ("[zz]:22", Err("valid address in brackets")),
            ("[::1]x", Err("[addr]:port")),
            ("[fe80::1]junk", Err("[addr]:port")),
            ("fe80::1", Err("in brackets")),
            ("h/x", Err("RFC 1123")),
            ("a_b.lab", Err("RFC 1123")),
            ("bad-.lab", Err("RFC 1123")),
            ("a..b", Err("RFC 1123")),
            ("10.0.0.256", Err("not a valid IPv4 address")),
            ("10.0.0", Err("not a valid IPv4 address")),
            ("[fe80::1/64]:22", Err("valid address in brackets")),
            ("u@:22", Err("the host is missing")),
            ("a b", Err("whitespace")),
            ("a\tb", Err("whitespace")),
        ];
        for (text, want) in cases {
            check(text, want.clone());
        }
        let long_label = format!("{}.lab", "h".repeat(64));
        check::<SshEndpoint>(&long_label, Err("RFC 1123"));
        let long_user = format!("{}@h", "u".repeat(33));
        check::<SshEndpoint>(&long_user, Err("1-32 letters"));
        let long = format!("{}.lab", "h".repeat(SshEndpoint::MAX_LEN));
        check::<SshEndpoint>(&long, Err("at most 300 characters"));
    }

    fn bmc(
        scheme: BmcScheme,
        host: &str,
        port: Option<u16>,
        path: &str,
        query: Option<&str>,
    ) -> BmcEndpoint {
        BmcEndpoint {
            scheme,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            query: query.map(str::to_owned),
        }
    }

    #[test]
    fn bmc_endpoints_parse_strictly() {
        use BmcScheme::{RedfishHttp, RedfishHttps};
        let cases: &[(&str, Result<BmcEndpoint, &str>)] = &[
            (
                "redfish+https://10.0.0.5/redfish/v1/Systems/1",
                Ok(bmc(
                    RedfishHttps,
                    "10.0.0.5",
                    None,
                    "/redfish/v1/Systems/1",
                    None,
                )),
            ),
            (
                "redfish+http://127.0.0.1:8000",
                Ok(bmc(RedfishHttp, "127.0.0.1", Some(8000), "", None)),
            ),
            (
                "redfish+https://[fd00::5]:8443/x",
                Ok(bmc(RedfishHttps, "fd00::5", Some(8443), "/x", None)),
            ),
            (
                "redfish+https://bmc-r1.lab/?uuid=0000-AB",
                Ok(bmc(
                    RedfishHttps,
                    "bmc-r1.lab",
                    None,
                    "/",
                    Some("uuid=0000-AB"),
                )),
            ),
            (
                "redfish+https://bmc?uuid=1",
                Ok(bmc(RedfishHttps, "bmc", None, "", Some("uuid=1"))),
            ),
            ("10.0.1.1", Err("expected a URL")),
            (
                "https://10.0.1.1/",
                Err("the scheme must be redfish+https://"),
            ),
            ("ipmi://10.0.1.1", Err("unknown scheme \"ipmi\"")),
            ("HTTPS://h/", Err("scheme")),
            ("REDFISH+HTTPS://h/", Err("lowercase")),
            ("redfish+https://", Err("no host")),
            ("redfish+https:///redfish/v1", Err("no host")),
            ("redfish+https://admin:pw@10.0.1.1/", Err("credentials")),
            ("redfish+https://admin@10.0.1.1/", Err("credentials")),
            ("redfish+https://[::1", Err("[addr]:port")),
            ("redfish+https://[::1/x", Err("[addr]:port")),
            ("redfish+https://[::g]/", Err("valid address in brackets")),
            ("redfish+https://::1/", Err("in brackets")),
            ("redfish+https://h:99999/", Err("port")),
            ("redfish+https://h:0/", Err("port")),
            ("redfish+https://h:/", Err("port")),
            ("redfish+https://h:443x/", Err("port")),
            ("redfish+https://bmc_1.lab/", Err("RFC 1123")),
            ("redfish+https://-bmc/", Err("must not start with '-'")),
            (
                "redfish+https://10.0.0.300/",
                Err("not a valid IPv4 address"),
            ),
            ("redfish+https://0x7f/", Err("not a valid IPv4 address")),
            ("redfish+https://bmc/#x", Err("fragment")),
            ("redfish+https://bmc/ x", Err("whitespace")),
        ];
        for (text, want) in cases {
            check(text, want.clone());
        }
        let long = format!("redfish+https://bmc/{}", "x".repeat(BmcEndpoint::MAX_LEN));
        check::<BmcEndpoint>(&long, Err("at most 1024 characters"));
    }
}
