//! Command and URL templates: `{name}` placeholders filled with a machine's fields, shell-quoted
//! for commands.
//!
//! A `{` followed by a lowercase name and `}` is a placeholder and must name a known variable
//! (a typo is a configuration error, found at start). `{{` and `}}` are literal braces. Any
//! other brace is literal, so shell and awk syntax (`${HOME}`, `'{print $1}'`) needs no escaping.

use std::fmt::Write as _;

/// A variable a template may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Var {
    MachineId,
    Image,
    TargetCluster,
    Mac,
    Macs,
    NetworkConfig,
    OperationId,
    SshHost,
    Token,
    ImageUrl,
    ImageChecksum,
}

impl Var {
    const ALL: [Var; 11] = [
        Var::MachineId,
        Var::Image,
        Var::TargetCluster,
        Var::Mac,
        Var::Macs,
        Var::NetworkConfig,
        Var::OperationId,
        Var::SshHost,
        Var::Token,
        Var::ImageUrl,
        Var::ImageChecksum,
    ];

    fn name(self) -> &'static str {
        match self {
            Var::MachineId => "machine_id",
            Var::Image => "image",
            Var::TargetCluster => "target_cluster",
            Var::Mac => "mac",
            Var::Macs => "macs",
            Var::NetworkConfig => "network_config",
            Var::OperationId => "operation_id",
            Var::SshHost => "ssh_host",
            Var::Token => "token",
            Var::ImageUrl => "image_url",
            Var::ImageChecksum => "image_checksum",
        }
    }

    fn from_name(name: &str) -> Option<Var> {
        Var::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The variables of every template (all but the token).
    pub(crate) const COMMON: [Var; 8] = [
        Var::MachineId,
        Var::Image,
        Var::TargetCluster,
        Var::Mac,
        Var::Macs,
        Var::NetworkConfig,
        Var::OperationId,
        Var::SshHost,
    ];
}

/// The values of the variables for one action.
#[derive(Clone, Debug, Default)]
pub(crate) struct Values {
    pub(crate) machine_id: String,
    pub(crate) image: String,
    pub(crate) target_cluster: String,
    /// The first MAC address of the machine record, or empty.
    pub(crate) mac: String,
    /// All MAC addresses, space-separated.
    pub(crate) macs: String,
    pub(crate) network_config: String,
    pub(crate) operation_id: String,
    pub(crate) ssh_host: String,
    /// Only for join-cluster; never shown.
    pub(crate) token: Option<String>,
    /// Only for repave with `[redfish.images]`: where the image is, and its SHA-256.
    pub(crate) image_url: String,
    pub(crate) image_checksum: String,
}

impl Values {
    fn get(&self, var: Var) -> &str {
        match var {
            Var::MachineId => &self.machine_id,
            Var::Image => &self.image,
            Var::TargetCluster => &self.target_cluster,
            Var::Mac => &self.mac,
            Var::Macs => &self.macs,
            Var::NetworkConfig => &self.network_config,
            Var::OperationId => &self.operation_id,
            Var::SshHost => &self.ssh_host,
            Var::Token => self.token.as_deref().unwrap_or(""),
            Var::ImageUrl => &self.image_url,
            Var::ImageChecksum => &self.image_checksum,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(Var),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
}

impl Template {
    /// Parses `source`, allowing only the variables in `allowed`.
    ///
    /// # Errors
    ///
    /// A message naming the unknown or disallowed variable.
    pub(crate) fn parse(source: &str, allowed: &[Var]) -> Result<Self, String> {
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            lit.push_str(&rest[..i]);
            let tail = &rest[i..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                lit.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if let Some(after) = tail.strip_prefix('{')
                && let Some(end) = after.find('}')
                && !after[..end].is_empty()
                && after[..end]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                let name = &after[..end];
                let var = Var::from_name(name).ok_or_else(|| {
                    format!(
                        "unknown variable {{{name}}}; known: {} (write {{{{ for a literal brace)",
                        allowed
                            .iter()
                            .map(|v| format!("{{{}}}", v.name()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                if !allowed.contains(&var) {
                    return Err(format!("the variable {{{name}}} is not available here"));
                }
                if !lit.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut lit)));
                }
                segments.push(Segment::Var(var));
                rest = &after[end + 1..];
                continue;
            }
            // Any other brace is literal.
            lit.push_str(&tail[..1]);
            rest = &tail[1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(Template { segments })
    }

    /// The command to run: every value shell-quoted as one word.
    pub(crate) fn render_shell(&self, values: &Values) -> String {
        self.render(|var, out| out.push_str(&shell_quote(values.get(var))))
    }

    /// The command as it may be shown in logs: the token redacted and the network
    /// configuration summarised.
    pub(crate) fn render_display(&self, values: &Values) -> String {
        self.render(|var, out| match var {
            Var::Token => out.push_str("<redacted>"),
            Var::NetworkConfig => {
                let _ = write!(
                    out,
                    "<network config, {} bytes>",
                    values.network_config.len()
                );
            }
            _ => out.push_str(&shell_quote(values.get(var))),
        })
    }

    /// The values inserted as they are (for URLs).
    pub(crate) fn render_raw(&self, values: &Values) -> String {
        self.render(|var, out| out.push_str(values.get(var)))
    }

    fn render(&self, mut var: impl FnMut(Var, &mut String)) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Var(v) => var(*v, &mut out),
            }
        }
        out
    }
}

/// Quotes `s` as one word for a POSIX shell: unchanged if it only has characters no shell
/// treats specially, else in single quotes (a `'` inside becomes `'\''`).
pub(crate) fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'@' | b'+' | b',' | b'%' | b'=')
        })
        // `=` first would make a word look like an assignment in some positions; `-` first
        // is fine for the shell (the command decides).
        && !s.starts_with('=');
    if plain {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values {
            machine_id: "node-1".into(),
            image: "ubuntu 24.04; rm -rf /".into(),
            target_cluster: "prod-east".into(),
            mac: "52:54:00:00:00:01".into(),
            macs: "52:54:00:00:00:01 52:54:00:00:00:02".into(),
            network_config: "it's\nyaml: {a: b}\n".into(),
            operation_id: "op-01J".into(),
            ssh_host: "10.0.0.1".into(),
            token: Some("abcdef.0123456789abcdef".into()),
            image_url: "http://10.0.0.1/ubuntu.img".into(),
            image_checksum: "ab".repeat(32),
        }
    }

    fn check(template: &str, expect: Result<&str, &str>) {
        let all = Var::ALL;
        match (Template::parse(template, &all), expect) {
            (Ok(t), Ok(want)) => assert_eq!(t.render_shell(&values()), want, "{template}"),
            (Err(e), Err(want)) => assert!(e.contains(want), "{template}: {e}"),
            (got, want) => panic!("{template}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn substitutes_and_quotes() {
        check("deploy {image}", Ok("deploy 'ubuntu 24.04; rm -rf /'"));
        check("join {target_cluster}", Ok("join prod-east"));
        check("x --mac={mac}", Ok("x --mac=52:54:00:00:00:01"));
        check("x {macs}", Ok("x '52:54:00:00:00:01 52:54:00:00:00:02'"));
        check(
            "apply {network_config}",
            Ok("apply 'it'\\''s\nyaml: {a: b}\n'"),
        );
        check("{machine_id}{machine_id}", Ok("node-1node-1"));
        check("", Ok(""));
    }

    #[test]
    fn braces() {
        check("echo {{machine_id}}", Ok("echo {machine_id}"));
        check(
            "awk '{print $1}' {machine_id}",
            Ok("awk '{print $1}' node-1"),
        );
        check("echo ${HOME} }", Ok("echo ${HOME} }"));
        check("echo {} {", Ok("echo {} {"));
        check("echo {imgae}", Err("unknown variable {imgae}"));
        check("echo ${foo}", Err("unknown variable {foo}"));
    }

    #[test]
    fn disallowed_variables() {
        let e = Template::parse("kubeadm join --token {token}", &Var::COMMON).unwrap_err();
        assert!(e.contains("{token} is not available"), "{e}");
    }

    #[test]
    fn display_hides_secrets() {
        let t = Template::parse("join --token {token} --net {network_config}", &Var::ALL).unwrap();
        let shown = t.render_display(&values());
        assert_eq!(
            shown,
            "join --token <redacted> --net <network config, 18 bytes>"
        );
    }

    #[test]
    fn shell_quoting() {
        let cases = [
            ("plain-word_1.2/x:y@z", "plain-word_1.2/x:y@z"),
            ("", "''"),
            ("a b", "'a b'"),
            ("it's", "'it'\\''s'"),
            ("$(reboot)", "'$(reboot)'"),
            ("`id`", "'`id`'"),
            ("a\nb", "'a\nb'"),
            ("*", "'*'"),
            ("~root", "'~root'"),
            ("=x", "'=x'"),
        ];
        for (input, want) in cases {
            assert_eq!(shell_quote(input), want, "{input:?}");
        }
    }

    #[test]
    fn quoted_values_survive_a_real_shell() {
        // The quoting is only right if /bin/sh gives back the exact value.
        for value in [
            "it's", "a b", "$(id)", "`id`", "\\", "'", "''", "\"", "x\ny", "*", "é",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(value)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), value, "{value:?}");
        }
    }
}
