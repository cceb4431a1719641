//! BMC credentials go only where the configuration says: a listener of the test's own, which
//! records every byte it receives, stands in for whoever would like the BMC password.
//!
//! Each case is checked twice: at registration (`validate`, which the server maps to
//! INVALID_ARGUMENT) and at request time, for a record stored before the configuration
//! changed or whose endpoint was changed behind the check. The control case shows that the
//! listener does catch the credentials when the configuration allows them to go to it.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bm_provider::{ErrorKind, Provider};
use bm_provider_redfish::{BmcConfig, Credentials, RedfishConfig, RedfishProvider, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Harness, lock, machine};

const USER: &str = "bmc-operator-7f3";
const PASSWORD: &str = "pw-Zq81-never-leaves";

/// A TCP listener that records every byte received, and answers each request with
/// `response` (or closes the connection once the request's header has arrived).
struct Recorder {
    port: u16,
    bytes: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(response: Option<String>) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let seen = bytes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Up to the end of an HTTP header, or the first record of a TLS client.
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                    lock(&seen).extend_from_slice(&buf[..n]);
                    // A TLS handshake record would wait for an answer: close at once.
                    if request[0] == 0x16 || request.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                if let Some(r) = &response {
                    let _ = conn.write_all(r.as_bytes()).await;
                }
            }
        });
        Recorder { port, bytes, task }
    }

    fn bytes(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The secrets in every form they could travel in: plain, and base64 as in a Basic header.
fn secret_forms() -> Vec<Vec<u8>> {
    vec![
        USER.into(),
        PASSWORD.into(),
        STANDARD.encode(format!("{USER}:{PASSWORD}")).into(),
        STANDARD.encode(PASSWORD).into(),
    ]
}

/// The first form of a secret found in `bytes`.
fn leaked(bytes: &[u8]) -> Option<String> {
    secret_forms()
        .into_iter()
        .find(|s| bytes.windows(s.len()).any(|w| w == s.as_slice()))
        .map(|s| String::from_utf8_lossy(&s).into_owned())
}

fn credentials() -> Credentials {
    Credentials {
        username: USER.into(),
        password: Some(Secret::new(PASSWORD)),
        password_file: None,
    }
}

fn with_credentials(user: &str, password: &str) -> BmcConfig {
    BmcConfig {
        username: Some(user.into()),
        password: Some(Secret::new(password)),
        ..BmcConfig::default()
    }
}

fn plaintext() -> BmcConfig {
    BmcConfig {
        allow_plaintext: Some(true),
        ..BmcConfig::default()
    }
}

fn provider(config: RedfishConfig) -> RedfishProvider {
    RedfishProvider::new(RedfishConfig {
        request_timeout: std::time::Duration::from_secs(10),
        ..config
    })
    .unwrap_or_else(|e| panic!("config refused: {e}"))
}

/// The endpoint is refused at registration with `want` in the message, and a record that
/// has it anyway gets nothing with a secret in it: the listener sees no byte at all when
/// `reached` is false.
async fn refused(p: &RedfishProvider, rec: &Recorder, endpoint: &str, want: &str, reached: bool) {
    let h = Harness::new(machine(endpoint, "", &[]));
    let e = p.validate(&h.machine).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(
        e.to_string().contains(want),
        "{endpoint}\n  got: {e}\n want: {want}"
    );
    assert!(e.to_string().contains("machine node-1"), "{e}");

    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Canceled, "{e}");
    let bytes = rec.bytes();
    if let Some(s) = leaked(&bytes) {
        panic!("{endpoint}: the listener received {s:?}");
    }
    if !reached {
        assert!(
            bytes.is_empty(),
            "{endpoint}: the listener was contacted: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        assert!(e.to_string().contains(want), "{endpoint}: {e}");
    }
}

#[tokio::test]
async fn an_endpoint_outside_credential_hosts_gets_nothing() {
    let rec = Recorder::start(None).await;
    let p = provider(RedfishConfig {
        credentials: Some(credentials()),
        credential_hosts: vec!["10.0.0.0/8".into(), "bmc-*.dc1.example".into()],
        // Plain HTTP is allowed on loopback: the allow-list alone must stop it.
        bmc: [("127.0.0.0/8".to_owned(), plaintext())].into(),
        ..RedfishConfig::default()
    });
    let ep = format!("redfish+http://127.0.0.1:{}/redfish/v1/Systems/1", rec.port);
    refused(
        &p,
        &rec,
        &ep,
        "redfish.credential_hosts does not list it",
        false,
    )
    .await;
    // A name is matched as written, not resolved: "localhost" is not 127.0.0.1.
    let p = provider(RedfishConfig {
        credentials: Some(credentials()),
        credential_hosts: vec!["127.0.0.1".into()],
        bmc: [(format!("localhost:{}", rec.port), plaintext())].into(),
        ..RedfishConfig::default()
    });
    let ep = format!("redfish+http://localhost:{}/", rec.port);
    refused(
        &p,
        &rec,
        &ep,
        "redfish.credential_hosts does not list it",
        false,
    )
    .await;
}

#[tokio::test]
async fn a_host_section_s_credentials_do_not_follow_a_changed_port() {
    let rec = Recorder::start(None).await;
    // The operator configured the BMC at 127.0.0.1 (its default port); the record's endpoint
    // is then changed to another port of that host.
    let p = provider(RedfishConfig {
        bmc: [
            ("127.0.0.1".to_owned(), with_credentials(USER, PASSWORD)),
            ("127.0.0.0/8".to_owned(), plaintext()),
        ]
        .into(),
        ..RedfishConfig::default()
    });
    let ep = format!("redfish+http://127.0.0.1:{}/redfish/v1/Systems/1", rec.port);
    refused(
        &p,
        &rec,
        &ep,
        &format!(
            "to use this port, add a [redfish.bmc.\"127.0.0.1:{}\"] section",
            rec.port
        ),
        false,
    )
    .await;
}

#[tokio::test]
async fn plain_http_needs_allow_plaintext() {
    let rec = Recorder::start(None).await;
    let p = provider(RedfishConfig {
        credentials: Some(credentials()),
        credential_hosts: vec!["127.0.0.0/8".into()],
        ..RedfishConfig::default()
    });
    // Once `redfish+https://HOST:PORT/`, now `redfish+http://`: never contacted.
    let ep = format!("redfish+http://127.0.0.1:{}/redfish/v1/Systems/1", rec.port);
    refused(&p, &rec, &ep, "set allow_plaintext = true in", false).await;
    // The same host and port over HTTPS is allowed: the listener gets a TLS handshake that
    // fails, and no credential.
    let ep = format!(
        "redfish+https://127.0.0.1:{}/redfish/v1/Systems/1",
        rec.port
    );
    let h = Harness::new(machine(&ep, "", &[]));
    p.validate(&h.machine).unwrap();
    p.power_state(h.ctx()).await.unwrap_err();
    let bytes = rec.bytes();
    assert_eq!(bytes.first(), Some(&0x16), "a TLS handshake record first");
    assert_eq!(leaked(&bytes), None);
}

#[tokio::test]
async fn a_redirect_to_another_origin_is_not_followed() {
    let rec = Recorder::start(None).await;
    let redirect = Recorder::start(Some(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{}/redfish/v1/Systems/1\r\nContent-Length: 0\r\n\r\n",
        rec.port
    )))
    .await;
    let p = provider(RedfishConfig {
        bmc: [(
            format!("127.0.0.1:{}", redirect.port),
            BmcConfig {
                allow_plaintext: Some(true),
                ..with_credentials(USER, PASSWORD)
            },
        )]
        .into(),
        ..RedfishConfig::default()
    });
    let h = Harness::new(machine(
        &format!(
            "redfish+http://127.0.0.1:{}/redfish/v1/Systems/1",
            redirect.port
        ),
        "",
        &[],
    ));
    p.validate(&h.machine).unwrap();
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert!(e.to_string().contains("307"), "{e}");
    // The BMC itself got its credentials; the target of its redirect got nothing.
    assert!(leaked(&redirect.bytes()).is_some());
    assert!(
        rec.bytes().is_empty(),
        "{:?}",
        String::from_utf8_lossy(&rec.bytes())
    );
}

/// The control: allowed to go there, the credentials do reach the listener, so the checks
/// above would see them.
#[tokio::test]
async fn the_listener_sees_credentials_that_are_allowed_to_reach_it() {
    let rec = Recorder::start(None).await;
    let p = provider(RedfishConfig {
        credentials: Some(credentials()),
        credential_hosts: vec!["127.0.0.1".into()],
        bmc: [(format!("127.0.0.1:{}", rec.port), plaintext())].into(),
        ..RedfishConfig::default()
    });
    let h = Harness::new(machine(
        &format!("redfish+http://127.0.0.1:{}/redfish/v1/Systems/1", rec.port),
        "",
        &[],
    ));
    p.validate(&h.machine).unwrap();
    p.power_state(h.ctx()).await.unwrap_err();
    let basic = STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert_eq!(leaked(&rec.bytes()), Some(basic));
}
