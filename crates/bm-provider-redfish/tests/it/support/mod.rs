//! Test fixtures: a real Redfish emulator (our launcher of sushy-tools, `emulator.rs`) and a
//! real OpenSSH server (`sshd.rs`), each started by the test that uses it and stopped when its
//! guard is dropped; a tiny HTTP server; a scripted BMC; machines and action contexts with a
//! log that can be inspected and awaited.

mod emulator;
mod sshd;
mod tools;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bm_domain::{Labels, MacAddress, Machine, MachineId, MachineSpec, OperationId, Timestamp};
use bm_provider::{ActionContext, LogSink};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary directory under the cargo target dir.
pub(crate) fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bm-provider-redfish");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", base.display()))
}

/// The configuration every test starts from: the emulators, stubs and scripted BMCs of these
/// tests listen on loopback and (except the TLS emulator) speak plain HTTP, which a
/// configuration must allow explicitly; the default credentials, where a test sets them, may
/// go to 127.0.0.1.
pub(crate) fn lab() -> bm_provider_redfish::RedfishConfig {
    bm_provider_redfish::RedfishConfig {
        credential_hosts: vec!["127.0.0.1".into()],
        bmc: [(
            "127.0.0.0/8".to_owned(),
            bm_provider_redfish::BmcConfig {
                allow_plaintext: Some(true),
                ..bm_provider_redfish::BmcConfig::default()
            },
        )]
        .into(),
        ..bm_provider_redfish::RedfishConfig::default()
    }
}

pub(crate) use emulator::{EmuOpts, Emulator, uuid};
pub(crate) use sshd::{Sshd, write_key};

// ---------------------------------------------------------------------------------------
// Machines and action contexts.

/// A machine for the tests.
pub(crate) fn machine(bmc: &str, ssh: &str, macs: &[&str]) -> Machine {
    Machine::register(
        MachineId::new("node-1").unwrap(),
        MachineSpec {
            provider: "redfish".into(),
            mac_addresses: macs
                .iter()
                .map(|m| m.parse::<MacAddress>().unwrap())
                .collect(),
            ssh_endpoint: ssh.into(),
            bmc_endpoint: bmc.into(),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod-east".into(),
            network_config: String::new(),
        },
        Labels::default(),
        Timestamp::EPOCH,
    )
    .unwrap_or_else(|e| panic!("invalid test machine: {e}"))
}

/// A machine, a cancellation token and a log that records every line.
pub(crate) struct Harness {
    pub(crate) machine: Machine,
    pub(crate) cancel: CancellationToken,
    pub(crate) log: LogSink,
    pub(crate) operation_id: OperationId,
    lines: Arc<Mutex<Vec<(String, String)>>>,
}

impl Harness {
    /// The harness and a receiver of the log lines as they are written.
    pub(crate) fn with_stream(
        machine: Machine,
    ) -> (Harness, mpsc::UnboundedReceiver<(String, String)>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::unbounded_channel();
        let l2 = lines.clone();
        let log = LogSink::new(move |tag, msg| {
            lock(&l2).push((tag.to_owned(), msg.to_owned()));
            let _ = tx.send((tag.to_owned(), msg.to_owned()));
        });
        (
            Harness {
                machine,
                cancel: CancellationToken::new(),
                log,
                operation_id: OperationId::from_parts(1_700_000_000_000, 42),
                lines,
            },
            rx,
        )
    }

    pub(crate) fn new(machine: Machine) -> Harness {
        Self::with_stream(machine).0
    }

    pub(crate) fn ctx(&self) -> ActionContext<'_> {
        ActionContext {
            machine: &self.machine,
            operation_id: self.operation_id,
            cancel: &self.cancel,
            log: &self.log,
        }
    }

    /// Every line so far, `[tag] message`.
    pub(crate) fn lines(&self) -> Vec<String> {
        lock(&self.lines)
            .iter()
            .map(|(t, m)| format!("[{t}] {m}"))
            .collect()
    }

    pub(crate) fn logged(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP server.

/// One request the stub received.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Vec<u8>,
}

/// An HTTP/1.1 server on 127.0.0.1 that answers every request with one status and body and
/// records the requests; stops when dropped.
pub(crate) struct HttpStub {
    pub(crate) port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpStub {
    pub(crate) async fn start(status: u16, body: Vec<u8>) -> HttpStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let body = Arc::new(body);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let reqs = reqs.clone();
                let body = body.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    lock(&reqs).push(req);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        HttpStub {
            port,
            requests,
            task,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        lock(&self.requests).clone()
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.lines();
    let mut first = lines.next()?.split_whitespace();
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------
// A scripted BMC with the quirks of real ones.

/// What the scripted BMC does to its resources when a GET of the path arrives.
pub(crate) type OnGet = dyn Fn(&str, &mut HashMap<String, Value>) + Send + Sync;

/// A canned answer: to the next request (`on` empty) or the next `METHOD path`; with
/// `apply`, a write still changes the resources and is recorded.
struct Canned {
    on: String,
    status: u16,
    extra: String,
    apply: bool,
}

/// What a write did to the scripted BMC's resources.
pub(crate) type OnWrite = dyn Fn(&str, &str, &Value, &mut HashMap<String, Value>) + Send + Sync;

/// A Redfish service from a table of JSON resources: GET answers the resource at the exact
/// path (404 otherwise), POST and PATCH answer 204, are recorded and may change resources
/// through `on_write(method, path, body, resources)`.
pub(crate) struct ScriptedBmc {
    pub(crate) port: u16,
    resources: Arc<Mutex<HashMap<String, Value>>>,
    /// Answers given before any other, in order: status and extra header lines (a BMC that
    /// is rebooting itself answers 503 for a while).
    canned: Arc<Mutex<std::collections::VecDeque<Canned>>>,
    /// Called before each GET is answered (a BMC whose state moves by itself).
    on_get: Arc<Mutex<Option<Box<OnGet>>>>,
    writes: Arc<Mutex<Vec<(String, String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedBmc {
    pub(crate) async fn start(
        resources: HashMap<String, Value>,
        on_write: Box<OnWrite>,
    ) -> ScriptedBmc {
        Self::start_slow(resources, on_write, "", Duration::ZERO).await
    }

    /// A BMC that takes `write_delay` to answer each POST and PATCH of a path under
    /// `slow_prefix` (as many do for a virtual media insert, which downloads the image
    /// first).
    pub(crate) async fn start_slow(
        resources: HashMap<String, Value>,
        on_write: Box<OnWrite>,
        slow_prefix: &str,
        write_delay: Duration,
    ) -> ScriptedBmc {
        let slow_prefix: Arc<str> = Arc::from(slow_prefix);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let resources = Arc::new(Mutex::new(resources));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let on_write: Arc<OnWrite> = Arc::from(on_write);
        let (res, wr) = (resources.clone(), writes.clone());
        let canned = Arc::new(Mutex::new(std::collections::VecDeque::<Canned>::new()));
        let canned2 = canned.clone();
        let on_get: Arc<Mutex<Option<Box<OnGet>>>> = Arc::new(Mutex::new(None));
        let on_get2 = on_get.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (res, wr, on_write) = (res.clone(), wr.clone(), on_write.clone());
                let slow_prefix = slow_prefix.clone();
                let canned = canned2.clone();
                let on_get = on_get2.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    let key = format!("{} {}", req.method, req.path);
                    let next = {
                        let mut c = lock(&canned);
                        let i = c.iter().position(|a| a.on.is_empty() || a.on == key);
                        i.and_then(|i| c.remove(i))
                    };
                    let mut extra = String::new();
                    let mut replace = None;
                    if let Some(a) = next {
                        if !a.apply || req.method == "GET" {
                            let head = format!(
                                "HTTP/1.1 {} X\r\nContent-Length: 0\r\n{}Connection: close\r\n\r\n",
                                a.status, a.extra
                            );
                            let _ = sock.write_all(head.as_bytes()).await;
                            let _ = sock.shutdown().await;
                            return;
                        }
                        extra = a.extra;
                        replace = Some(a.status);
                    }
                    if req.method == "GET"
                        && let Some(f) = lock(&on_get).as_ref()
                    {
                        f(&req.path, &mut lock(&res));
                    }
                    let (status, body) = if req.method == "GET" {
                        match lock(&res).get(&req.path) {
                            Some(v) => (200, v.to_string()),
                            None => (
                                404,
                                r#"{"error":{"message":"no such resource"}}"#.to_owned(),
                            ),
                        }
                    } else {
                        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                        if req.path.starts_with(&*slow_prefix) {
                            tokio::time::sleep(write_delay).await;
                        }
                        on_write(&req.method, &req.path, &body, &mut lock(&res));
                        lock(&wr).push((req.method.clone(), req.path.clone(), body));
                        (204, String::new())
                    };
                    let status = replace.unwrap_or(status);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        ScriptedBmc {
            port,
            resources,
            canned,
            on_get,
            writes,
            task,
        }
    }

    /// The next request gets `status` with the header lines `extra` (each ending in
    /// `\r\n`), before anything else queued so.
    pub(crate) fn answer_next(&self, status: u16, extra: &str) {
        lock(&self.canned).push_back(Canned {
            on: String::new(),
            status,
            extra: extra.to_owned(),
            apply: false,
        });
    }

    /// The next `method` of `path` is carried out (a write changes the resources) but
    /// answered with `status` and the header lines `extra`: a 202 with a task monitor.
    pub(crate) fn answer_on(&self, method: &str, path: &str, status: u16, extra: &str) {
        lock(&self.canned).push_back(Canned {
            on: format!("{method} {path}"),
            status,
            extra: extra.to_owned(),
            apply: true,
        });
    }

    /// The next `method` of `path` is refused with `status` (nothing changes).
    pub(crate) fn refuse_on(&self, method: &str, path: &str, status: u16) {
        lock(&self.canned).push_back(Canned {
            on: format!("{method} {path}"),
            status,
            extra: String::new(),
            apply: false,
        });
    }

    /// Calls `f(path, resources)` before answering each GET.
    pub(crate) fn on_get(&self, f: Box<OnGet>) {
        *lock(&self.on_get) = Some(f);
    }

    /// `redfish+http://127.0.0.1:PORT`.
    pub(crate) fn base(&self) -> String {
        format!("redfish+http://127.0.0.1:{}", self.port)
    }

    /// The POSTs and PATCHes so far: method, path, body.
    pub(crate) fn writes(&self) -> Vec<(String, String, Value)> {
        lock(&self.writes).clone()
    }

    pub(crate) fn resource(&self, path: &str) -> Value {
        lock(&self.resources)[path].clone()
    }
}

impl Drop for ScriptedBmc {
    fn drop(&mut self) {
        self.task.abort();
    }
}
