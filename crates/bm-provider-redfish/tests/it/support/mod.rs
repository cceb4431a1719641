//! Test fixtures: a real Redfish emulator (sushy-tools, through the shared
//! `redfish-emulator` script) and a real OpenSSH server, each started by the test that uses it
//! and stopped when its guard is dropped; a tiny HTTP server; machines and action contexts
//! with a log that can be inspected and awaited.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bm_domain::{Labels, MacAddress, Machine, MachineId, MachineSpec, OperationId, Timestamp};
use bm_provider::{ActionContext, LogSink};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
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

// ---------------------------------------------------------------------------------------
// The Redfish emulator.

/// Options of one emulator instance.
#[derive(Clone, Debug)]
pub(crate) struct EmuOpts {
    pub(crate) systems: u32,
    pub(crate) nics: u32,
    /// `Some(n)`: resets land after a fixed n s; `None`: the stock random 1-11 s.
    pub(crate) power_delay: Option<u32>,
    pub(crate) auth: Option<(&'static str, &'static str)>,
    pub(crate) tls: bool,
}

impl Default for EmuOpts {
    fn default() -> Self {
        EmuOpts {
            systems: 1,
            nics: 1,
            power_delay: Some(1),
            auth: None,
            tls: false,
        }
    }
}

/// A running emulator; stopped on drop.
pub(crate) struct Emulator {
    /// `http://127.0.0.1:PORT` or `https://...`.
    pub(crate) url: String,
    pub(crate) port: u16,
    /// The self-signed certificate, with TLS.
    pub(crate) ca: Option<PathBuf>,
    dir: tempfile::TempDir,
}

/// The emulator script: `$REDFISH_EMULATOR`, or the team's `shared/tools` beside the
/// checkout.
fn emulator_script() -> PathBuf {
    let script = std::env::var_os("REDFISH_EMULATOR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/redfish-emulator"),
        PathBuf::from,
    );
    assert!(
        script.is_file(),
        "the Redfish emulator script is missing: expected {} (the shared/ folder beside the checkout, or set REDFISH_EMULATOR)",
        script.display()
    );
    script
}

/// The venv is shared by every emulator of this test binary and kept between runs.
fn emulator_venv() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("bm-provider-redfish-emu-venv")
}

fn emu_command(dir: &Path) -> Command {
    let mut cmd = Command::new(emulator_script());
    for (k, _) in std::env::vars() {
        if k.starts_with("REDFISH_EMU_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("REDFISH_EMU_DIR", dir)
        .env("REDFISH_EMU_VENV", emulator_venv())
        .stdin(Stdio::null());
    cmd
}

/// Creates the venv once per test binary: parallel first starts would race on it.
fn install_emulator_once() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut done = lock(&INSTALLED);
    if *done {
        return;
    }
    let dir = temp_dir("emu-install-");
    let out = emu_command(dir.path())
        .arg("install")
        .output()
        .expect("cannot run the redfish-emulator script");
    assert!(
        out.status.success(),
        "redfish-emulator install failed (it needs python3 with venv and PyPI): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *done = true;
}

impl Emulator {
    pub(crate) fn start(opts: EmuOpts) -> Emulator {
        install_emulator_once();
        let dir = temp_dir("emu-");
        let mut cmd = emu_command(dir.path());
        cmd.arg("start")
            .arg(opts.systems.to_string())
            .env("REDFISH_EMU_PORT", "auto")
            .env("REDFISH_EMU_NICS", opts.nics.to_string())
            .env("REDFISH_EMU_POWER", "Off");
        if let Some(d) = opts.power_delay {
            cmd.env("REDFISH_EMU_POWER_DELAY", d.to_string());
        }
        if let Some((user, pw)) = opts.auth {
            cmd.env("REDFISH_EMU_USER", user)
                .env("REDFISH_EMU_PASSWORD", pw);
        }
        if opts.tls {
            cmd.env("REDFISH_EMU_TLS", "1");
        }
        let out = cmd
            .output()
            .expect("cannot run the redfish-emulator script");
        assert!(
            out.status.success(),
            "redfish-emulator start failed ({:?}): {}",
            opts,
            String::from_utf8_lossy(&out.stderr)
        );
        let env: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("redfish-emulator start printed no {k}: {env:?}"))
        };
        Emulator {
            url: get("REDFISH_EMU_URL"),
            port: get("REDFISH_EMU_PORT").parse().unwrap(),
            ca: env.get("REDFISH_EMU_CA").map(PathBuf::from),
            dir,
        }
    }

    /// The `@odata.id` of system `i` (1-based).
    pub(crate) fn system_path(i: u32) -> String {
        format!("/redfish/v1/Systems/{}", uuid(i))
    }

    /// The BMC endpoint of system `i`, as a machine record holds it.
    pub(crate) fn endpoint(&self, i: u32) -> String {
        format!("{}{}", self.bmc_base(), Self::system_path(i))
    }

    /// `redfish+http(s)://127.0.0.1:PORT`.
    pub(crate) fn bmc_base(&self) -> String {
        format!("redfish+{}", self.url)
    }

    /// GETs a resource directly (not through the provider), to check what the BMC shows.
    pub(crate) async fn get(&self, path: &str, auth: Option<(&str, &str)>) -> Value {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).unwrap();
            b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap());
        }
        let mut req = b.build().unwrap().get(format!("{}{path}", self.url));
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
    }

    /// POSTs a reset directly.
    pub(crate) async fn reset(&self, system: u32, reset_type: &str) {
        let path = format!("{}/Actions/ComputerSystem.Reset", Self::system_path(system));
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "ResetType": reset_type }).to_string())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "POST {path}: {}", resp.status());
    }
}

impl Drop for Emulator {
    #[allow(
        clippy::print_stderr,
        reason = "a failed stop leaves an emulator running: say so, a panic in drop would abort"
    )]
    fn drop(&mut self) {
        let out = emu_command(self.dir.path())
            .arg("stop")
            .arg(self.port.to_string())
            .output();
        if let Ok(out) = out
            && !out.status.success()
        {
            eprintln!(
                "redfish-emulator stop {} failed: {}",
                self.port,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The UUID of emulator system `i`.
pub(crate) fn uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

// ---------------------------------------------------------------------------------------
// OpenSSH.

/// An Ed25519 key pair written in OpenSSH format; returns the private key.
pub(crate) fn write_key(path: &Path, seed_from: &str) -> PrivateKey {
    // A seed that differs per call: the path and the time.
    let mut seed = [0u8; 32];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        .to_le_bytes();
    for (i, b) in path
        .to_string_lossy()
        .bytes()
        .chain(seed_from.bytes())
        .chain(nanos)
        .enumerate()
    {
        seed[i % 32] = seed[i % 32].wrapping_mul(31).wrapping_add(b);
    }
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.write_openssh_file(path, LineEnding::LF).unwrap();
    set_mode(path, 0o600);
    key
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A real sshd on 127.0.0.1 with a throwaway host key, accepting one generated client key
/// for the current user; killed on drop.
pub(crate) struct Sshd {
    pub(crate) port: u16,
    pub(crate) user: String,
    /// The client's private key file.
    pub(crate) client_key: PathBuf,
    /// The host's public key, `ssh-ed25519 AAAA...`.
    pub(crate) host_public: String,
    pub(crate) dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    child: Child,
}

const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    pub(crate) fn start() -> Sshd {
        assert!(
            Path::new(SSHD).is_file(),
            "{SSHD} is missing: install OpenSSH's server (Debian: apt-get install -y openssh-server)"
        );
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        // sshd started as root insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let dir = temp_dir("sshd-");
        let d = dir.path();
        let host = write_key(&d.join("host_key"), "host");
        let client = write_key(&d.join("client_key"), "client");
        let host_public = host.public_key().to_openssh().unwrap();
        std::fs::write(
            d.join("authorized_keys"),
            format!("{}\n", client.public_key().to_openssh().unwrap()),
        )
        .unwrap();
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile {d}/sshd.pid\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\n\
                 AllowUsers {user}\n\
                 LogLevel VERBOSE\n",
                d = d.display()
            );
            std::fs::write(d.join("sshd_config"), config).unwrap();
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
            // Wait for "Server listening" on its log: an event, not a sleep.
            let stderr = child.stderr.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            let mut log = Vec::new();
            let ready = loop {
                match rx.recv_timeout(Duration::from_secs(10)) {
                    Ok(line) if line.contains("Server listening on") => break true,
                    Ok(line) => log.push(line),
                    Err(_) => break false,
                }
            };
            if ready {
                // Keep draining its log so that sshd never blocks on a full pipe.
                let kept = Arc::new(Mutex::new(log));
                let k2 = kept.clone();
                std::thread::spawn(move || {
                    for line in rx {
                        lock(&k2).push(line);
                    }
                });
                return Sshd {
                    log: kept,
                    port,
                    user,
                    client_key: d.join("client_key"),
                    host_public,
                    dir,
                    child,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let busy = log.iter().any(|l| l.contains("Address already in use"));
            assert!(
                busy && attempt < 4,
                "sshd did not start: {}",
                log.join("\n")
            );
        }
        unreachable!()
    }

    /// The server's log so far, for failure messages.
    pub(crate) fn log(&self) -> String {
        lock(&self.log).join("\n")
    }

    /// `user@127.0.0.1:port`.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }

    /// A known_hosts line for this server with `public` as its key.
    pub(crate) fn known_hosts_line(&self, public: &str) -> String {
        format!("[127.0.0.1]:{} {public}\n", self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

/// What a write did to the scripted BMC's resources.
pub(crate) type OnWrite = dyn Fn(&str, &str, &Value, &mut HashMap<String, Value>) + Send + Sync;

/// A Redfish service from a table of JSON resources: GET answers the resource at the exact
/// path (404 otherwise), POST and PATCH answer 204, are recorded and may change resources
/// through `on_write(method, path, body, resources)`.
pub(crate) struct ScriptedBmc {
    pub(crate) port: u16,
    resources: Arc<Mutex<HashMap<String, Value>>>,
    writes: Arc<Mutex<Vec<(String, String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedBmc {
    pub(crate) async fn start(
        resources: HashMap<String, Value>,
        on_write: Box<OnWrite>,
    ) -> ScriptedBmc {
        Self::start_slow(resources, on_write, Duration::ZERO).await
    }

    /// A BMC that takes `write_delay` to answer each POST and PATCH (as many do for a
    /// virtual media insert, which downloads the image first).
    pub(crate) async fn start_slow(
        resources: HashMap<String, Value>,
        on_write: Box<OnWrite>,
        write_delay: Duration,
    ) -> ScriptedBmc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let resources = Arc::new(Mutex::new(resources));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let on_write: Arc<OnWrite> = Arc::from(on_write);
        let (res, wr) = (resources.clone(), writes.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (res, wr, on_write) = (res.clone(), wr.clone(), on_write.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
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
                        tokio::time::sleep(write_delay).await;
                        on_write(&req.method, &req.path, &body, &mut lock(&res));
                        lock(&wr).push((req.method.clone(), req.path.clone(), body));
                        (204, String::new())
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
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
            writes,
            task,
        }
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
