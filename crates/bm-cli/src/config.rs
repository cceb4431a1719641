//! bmctl's configuration file: named contexts (server, CA, client certificate, token), so
//! that an operator does not type them every time.
//!
//! The file is `$BMCTL_CONFIG`, else `$XDG_CONFIG_HOME/bmctl/config.toml`, else
//! `~/.config/bmctl/config.toml`:
//!
//! ```toml
//! current-context = "prod"
//!
//! [contexts.prod]
//! server = "https://bm.example.net:50051"
//! ca = "/etc/bm/ca.pem"
//! token-file = "/home/me/.bm-token"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The configuration file's content.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Config {
    /// The context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current_context: Option<String>,
    /// The contexts, by name.
    #[serde(default)]
    pub(crate) contexts: BTreeMap<String, Context>,
}

/// Where a server is and how to authenticate to it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) struct Context {
    /// host:port or a URL (https:// for TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) server: Option<String>,
    /// The CA certificate (PEM) that signed the server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ca: Option<PathBuf>,
    /// A client certificate (PEM), for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<PathBuf>,
    /// A file holding the bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token_file: Option<PathBuf>,
    /// The bearer token itself (prefer token-file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<String>,
}

/// The configuration file's path.
pub(crate) fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BMCTL_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::home_dir().map(|h| h.join(".config")))?;
    Some(base.join("bmctl").join("config.toml"))
}

impl Config {
    /// The file at `path`; an absent file is an empty configuration.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("{} is not a valid bmctl configuration", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the configuration to `path` (readable by its owner only: it may hold a token).
    pub(crate) fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string(self)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The context named `name`, or the current one; `None` when there is none.
    pub(crate) fn context(&self, name: Option<&str>) -> anyhow::Result<Option<&Context>> {
        let Some(name) = name.or(self.current_context.as_deref()) else {
            return Ok(None);
        };
        match self.contexts.get(name) {
            Some(c) => Ok(Some(c)),
            None => anyhow::bail!(
                "no context named {name:?} in the configuration; `bmctl config get-contexts` lists them"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_an_unknown_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("config.toml");
        assert!(Config::load(&path).unwrap().contexts.is_empty());
        let mut c = Config::default();
        c.contexts.insert(
            "prod".into(),
            Context {
                server: Some("https://bm:50051".into()),
                ca: Some("/ca.pem".into()),
                ..Context::default()
            },
        );
        c.current_context = Some("prod".into());
        c.save(&path).unwrap();
        let back = Config::load(&path).unwrap();
        assert_eq!(
            back.context(None).unwrap().unwrap().server.as_deref(),
            Some("https://bm:50051")
        );
        let e = back.context(Some("dev")).unwrap_err().to_string();
        assert!(e.contains("no context named \"dev\""), "{e}");
        std::fs::write(&path, "current-context = 3").unwrap();
        assert!(Config::load(&path).is_err());
    }
}
