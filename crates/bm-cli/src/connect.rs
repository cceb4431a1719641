//! The connection to bm-server: one HTTP/2 channel (TLS when asked) shared by the two
//! service clients, with the bearer token on every call.
//!
//! Where the settings come from, first match wins: flags (and their environment
//! variables), the context of the configuration file (`config.rs`), and for the token on a
//! loopback server the local admin token the server wrote into its data directory
//! (`$BM_DATA_DIR/admin-token`, else `./bm-data/admin-token`), so that the quick start
//! needs no flag.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use bm_proto::v1::rollout_service_client::RolloutServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{self, Config};
use crate::flags::Cli;

/// The largest response bmctl accepts: a page of machines with large network configs
/// exceeds tonic's default of 4 MiB.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The server when neither a flag nor a context names one.
const DEFAULT_SERVER: &str = "localhost:50051";

/// The channel with the credentials on every call.
pub(crate) type Transport = InterceptedService<Channel, Credentials>;

/// The clients of the three services, over one channel.
pub(crate) struct Clients {
    pub(crate) machines: MachineServiceClient<Transport>,
    pub(crate) operations: OperationServiceClient<Transport>,
    pub(crate) rollouts: RolloutServiceClient<Transport>,
}

/// Puts the bearer token, if any, on every call.
#[derive(Clone, Debug, Default)]
pub(crate) struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        Ok(req)
    }
}

/// What to connect to and how, after flags, context and defaults.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) server: String,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) token: Option<String>,
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Ok(t.trim().to_owned())
}

/// True for a server on this host.
fn is_local(server: &str) -> bool {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1")
}

impl Settings {
    /// The settings of `cli`, its context and the defaults.
    pub(crate) fn resolve(cli: &Cli) -> anyhow::Result<Settings> {
        let config = match config::path() {
            Some(p) => Config::load(&p)?,
            None => Config::default(),
        };
        let ctx = config
            .context(cli.context.as_deref())?
            .cloned()
            .unwrap_or_default();
        let server = cli
            .server
            .clone()
            .or(ctx.server)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read_token(f)?),
            (None, None) => match (ctx.token, ctx.token_file) {
                (Some(t), _) => Some(t),
                (None, Some(f)) => Some(read_token(&f)?),
                (None, None) if is_local(&server) => local_admin_token(),
                (None, None) => None,
            },
        };
        Ok(Settings {
            server,
            ca: cli.ca.clone().or(ctx.ca),
            cert: cli.cert.clone().or(ctx.cert),
            key: cli.key.clone().or(ctx.key),
            token,
        })
    }
}

/// The admin token a server on this host wrote into its data directory, if readable.
fn local_admin_token() -> Option<String> {
    let dir =
        std::env::var_os("BM_DATA_DIR").map_or_else(|| PathBuf::from("bm-data"), PathBuf::from);
    read_token(&dir.join("admin-token")).ok()
}

/// Connects as `settings` say. A server that cannot be reached is an UNAVAILABLE status
/// that says what to check.
pub(crate) async fn connect(settings: &Settings) -> anyhow::Result<Clients> {
    let server = &settings.server;
    let tls = settings.ca.is_some() || settings.cert.is_some() || server.starts_with("https://");
    let uri = match server.split_once("://") {
        Some(_) => server.clone(),
        None if tls => format!("https://{server}"),
        None => format!("http://{server}"),
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--server {server:?} is not a valid address"))?
        .connect_timeout(Duration::from_secs(5))
        // A follow on a dead network notices within half a minute.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if tls {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &settings.ca {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading --ca {}", ca.display()))?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        } else {
            config = config.with_enabled_roots();
        }
        match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("reading --cert {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("reading --key {}", key.display()))?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => anyhow::bail!("--cert and --key go together"),
        }
        endpoint = endpoint.tls_config(config).context("setting up TLS")?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        let mut cause = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let hint = if tls && (cause.contains("InvalidContentType") || cause.contains("corrupt message") || cause.contains("record overflow")) {
            " (the server does not speak TLS: connect with http:// and without --ca, or start bm-server with --tls-cert and --tls-key)"
        } else if tls {
            " (is bm-server running with TLS? check --ca and the server's certificate name)"
        } else {
            " (is bm-server running? set --server or BM_SERVER)"
        };
        tonic::Status::unavailable(format!("cannot reach the server at {uri}: {cause}{hint}"))
    })?;
    let credentials = Credentials {
        authorization: match &settings.token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the token has characters a header cannot carry")?,
            ),
            None => None,
        },
    };
    Ok(Clients {
        machines: MachineServiceClient::with_interceptor(channel.clone(), credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE),
        operations: OperationServiceClient::with_interceptor(channel.clone(), credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE),
        rollouts: RolloutServiceClient::with_interceptor(channel, credentials)
            .max_decoding_message_size(MAX_MESSAGE),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_servers_are_the_loopback_ones() {
        for s in [
            "localhost:50051",
            "127.0.0.1:1",
            "http://localhost:5",
            "https://[::1]:5",
        ] {
            assert!(is_local(s), "{s}");
        }
        for s in ["bm.example.net:50051", "https://10.0.0.1:5"] {
            assert!(!is_local(s), "{s}");
        }
    }
}
