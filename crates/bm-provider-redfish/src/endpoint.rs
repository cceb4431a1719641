//! The two addresses in a machine's spec: its BMC endpoint (`redfish+https://...`) and its
//! SSH endpoint (`[user@]host[:port]`).

use bm_domain::{BmcScheme, DomainError, SshEndpoint};
use reqwest::Url;

/// How the machine's ComputerSystem is found on its BMC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SystemSelector {
    /// The `@odata.id` of the system, e.g. `/redfish/v1/Systems/1`, used verbatim.
    Path(String),
    /// The system whose `UUID` is this (compared without regard to case).
    Uuid(String),
    /// The only system of the BMC.
    Only,
}

/// A parsed `spec.bmc_endpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BmcEndpoint {
    /// `https://host:port/`, the origin every path is joined to.
    pub(crate) base: Url,
    /// `host` or `host:port` as written, the key of per-BMC settings and the BMC's name in
    /// messages.
    pub(crate) host_port: String,
    /// `host` alone.
    pub(crate) host: String,
    /// How to find the system.
    pub(crate) system: SystemSelector,
}

const EXAMPLE: &str = "redfish+https://10.0.0.5/redfish/v1/Systems/1";

/// Parses `redfish+https://host[:port][/path][?uuid=...]` (or `redfish+http://` for labs).
///
/// The domain's parser checks the URL first (the one that validated the machine record);
/// this adds what only the provider knows. The path is the `@odata.id` of the system; an
/// empty path, `/redfish/v1` or `/redfish/v1/Systems` means the only system of the BMC;
/// `?uuid=` picks a system by UUID.
pub(crate) fn parse_bmc_endpoint(s: &str) -> Result<BmcEndpoint, String> {
    if s.is_empty() {
        return Err(format!(
            "the machine has no BMC endpoint; the redfish provider needs one such as {EXAMPLE}"
        ));
    }
    let checked: bm_domain::BmcEndpoint = s.parse().map_err(|e: DomainError| e.to_string())?;
    let scheme = match checked.scheme {
        BmcScheme::RedfishHttps => "https",
        BmcScheme::RedfishHttp => "http",
    };
    let rest = &s[checked.scheme.as_str().len() + "://".len()..];
    let url = Url::parse(&format!("{scheme}://{rest}"))
        .map_err(|e| format!("BMC endpoint {s:?} is not a valid URL: {e}"))?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("BMC endpoint {s:?} has no host"))?
        .to_owned();
    let host_port = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let mut uuid = None;
    for (k, v) in url.query_pairs() {
        match &*k {
            "uuid" if !v.is_empty() => uuid = Some(v.into_owned()),
            _ => {
                return Err(format!(
                    "BMC endpoint {s:?}: unknown query parameter {k:?} (only ?uuid=<system UUID> is understood)"
                ));
            }
        }
    }
    let path = url.path();
    let system = if let Some(uuid) = uuid {
        SystemSelector::Uuid(uuid)
    } else if matches!(
        path.trim_end_matches('/'),
        "" | "/redfish" | "/redfish/v1" | "/redfish/v1/Systems"
    ) {
        SystemSelector::Only
    } else {
        SystemSelector::Path(path.to_owned())
    };
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    Ok(BmcEndpoint {
        base,
        host_port,
        host,
        system,
    })
}

/// A parsed `spec.ssh_endpoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SshTarget {
    /// The user, if the endpoint names one.
    pub(crate) user: Option<String>,
    /// Host name or address (an IPv6 address without brackets).
    pub(crate) host: String,
    /// The port (22 by default).
    pub(crate) port: u16,
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The SSH port when the endpoint names none.
const DEFAULT_SSH_PORT: u16 = 22;

/// Parses `[user@]host[:port]` with the domain's parser (the one that validated the machine
/// record) and applies the default port.
pub(crate) fn parse_ssh_endpoint(s: &str) -> Result<SshTarget, String> {
    let ep: SshEndpoint = s.parse().map_err(|e: DomainError| e.to_string())?;
    Ok(SshTarget {
        user: ep.user,
        host: ep.host,
        port: ep.port.unwrap_or(DEFAULT_SSH_PORT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bmc(s: &str) -> Result<(String, String, SystemSelector), String> {
        parse_bmc_endpoint(s).map(|e| (e.base.to_string(), e.host_port, e.system))
    }

    #[test]
    fn bmc_endpoints() {
        let path = |p: &str| SystemSelector::Path(p.into());
        assert_eq!(
            bmc("redfish+https://10.0.0.5/redfish/v1/Systems/1").unwrap(),
            (
                "https://10.0.0.5/".into(),
                "10.0.0.5".into(),
                path("/redfish/v1/Systems/1")
            )
        );
        assert_eq!(
            bmc("redfish+http://127.0.0.1:8000/redfish/v1/Systems/abc/").unwrap(),
            (
                "http://127.0.0.1:8000/".into(),
                "127.0.0.1:8000".into(),
                path("/redfish/v1/Systems/abc/")
            )
        );
        for only in [
            "redfish+https://bmc",
            "redfish+https://bmc/",
            "redfish+https://bmc/redfish/v1/",
            "redfish+https://bmc/redfish/v1/Systems",
        ] {
            assert_eq!(bmc(only).unwrap().2, SystemSelector::Only, "{only}");
        }
        assert_eq!(
            bmc("redfish+https://bmc/?uuid=0000-AB").unwrap().2,
            SystemSelector::Uuid("0000-AB".into())
        );
        assert_eq!(
            bmc("redfish+https://[fd00::5]:8443/x").unwrap().1,
            "[fd00::5]:8443"
        );
        let err = |s: &str, want: &str| {
            let e = bmc(s).unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        };
        err("", "has no BMC endpoint");
        // The domain's parser speaks first: what it refuses never registers.
        err("https://10.0.0.5/", "the scheme must be redfish+https://");
        err("ipmi://10.0.0.5", "unknown scheme \"ipmi\"");
        err("redfish+https://", "no host");
        err("redfish+https://u:p@bmc/", "credentials");
        err("redfish+https://bmc:99999/", "from 1 to 65535");
        err("redfish+https://bmc/#x", "fragment");
        err("redfish+https://bmc/?system=1", "unknown query parameter");
    }

    #[test]
    fn ssh_endpoints() {
        let ok = |s: &str, user: Option<&str>, host: &str, port: u16| {
            assert_eq!(
                parse_ssh_endpoint(s).unwrap(),
                SshTarget {
                    user: user.map(str::to_owned),
                    host: host.into(),
                    port
                },
                "{s}"
            );
        };
        ok("10.0.0.1", None, "10.0.0.1", 22);
        ok("root@10.0.0.1:2222", Some("root"), "10.0.0.1", 2222);
        ok("deploy@node-1.lab", Some("deploy"), "node-1.lab", 22);
        ok("[fe80::1]:2222", None, "fe80::1", 2222);
        ok("u@[fe80::1]", Some("u"), "fe80::1", 22);
        for bad in [
            "",
            "@h",
            "u:p@h",
            "h:0",
            "h:ssh",
            "[::1",
            "[::1]x",
            "a b",
            "[fe80::1]junk",
            "h/x",
        ] {
            assert!(parse_ssh_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_ssh_endpoint("[::1]:22").unwrap().to_string(),
            "[::1]:22"
        );
    }
}
