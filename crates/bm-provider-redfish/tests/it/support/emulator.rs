//! Our launcher of a real Redfish peer: OpenStack's sushy-tools emulator (`sushy-emulator`,
//! a Flask app) from PyPI, with its fake systems driver, so that no libvirt is needed.
//!
//! - Its venv lives under the target dir (`tmp/redfish-emulator/venv`) and is made once, with
//!   the pinned set of `sushy-requirements.txt` installed as listed (`--no-deps`) and checked
//!   with `pip check`. A file lock keeps parallel test binaries (and threads) from building it
//!   at once; a copy of the requirements in the venv makes a changed file rebuild it.
//! - Each [`Emulator`] has its own directory (config, SQLite state, downloaded images, TLS
//!   files) and listens on 127.0.0.1 on a port the system picks: the config asks for port 0
//!   and the emulator prints the port it got, so no two tests race for one. It is ready once
//!   its service root answers, and it is killed with its process group when dropped.
//!
//! What the tests rely on (sushy-tools 2.2.0): system `i` (1-based) has the UUID
//! `00000000-0000-4000-8000-{i:012x}`, the name `node-i` and, for its NIC `k`, the MAC
//! `52:54:00:{k:02x}:{i >> 8:02x}:{i & 255:02x}`; a reset lands after a random 1-11 s drawn
//! with `random.randint` in the fake driver, which [`EmuOpts::power_delay`] replaces in the
//! emulator's process to make the delay fixed; basic auth reads an htpasswd file of bcrypt
//! hashes; TLS is TLS 1.2 only.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::{lock, temp_dir, tools};

/// The emulator and its dependencies, pinned.
const REQUIREMENTS: &str = include_str!("sushy-requirements.txt");

/// Runs `sushy-emulator` with its own arguments; with `BM_EMU_POWER_DELAY=N` a reset lands
/// after exactly N s instead of a random 1-11 s.
const LAUNCHER: &str = r#"
import os, sys, types
delay = os.environ.get("BM_EMU_POWER_DELAY")
if delay is not None:
    from sushy_tools.emulator.resources.systems import fakedriver
    fakedriver.random = types.SimpleNamespace(randint=lambda low, high: int(delay))
from sushy_tools.emulator.main import main
sys.argv[0] = "sushy-emulator"
sys.exit(main())
"#;

/// How long a first start may take to print its port (a cold Python start on a busy
/// machine), and then to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

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

/// A running emulator; killed on drop.
pub(crate) struct Emulator {
    /// `http://127.0.0.1:PORT` or `https://...`.
    pub(crate) url: String,
    pub(crate) port: u16,
    /// The self-signed certificate, with TLS.
    pub(crate) ca: Option<PathBuf>,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Removed after the process is gone (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl Emulator {
    pub(crate) async fn start(opts: EmuOpts) -> Emulator {
        let venv = match tokio::task::spawn_blocking(venv).await {
            Ok(v) => v,
            // Keeps the one-line message of a missing package as it is.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let dir = temp_dir("emu-");
        let run = dir.path();
        for d in ["state", "tmp"] {
            fs::create_dir(run.join(d)).unwrap();
        }
        let mut conf = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = 0\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_STATE_DIR = {}\n",
            py_str(&run.join("state"))
        );
        if let Some((user, password)) = opts.auth {
            let file = run.join("htpasswd");
            write_htpasswd(&venv, user, password, &file);
            writeln!(conf, "SUSHY_EMULATOR_AUTH_FILE = {}", py_str(&file)).unwrap();
        }
        let ca = opts.tls.then(|| {
            let (crt, key) = (run.join("tls.crt"), run.join("tls.key"));
            write_certificate(&crt, &key);
            writeln!(conf, "SUSHY_EMULATOR_SSL_CERT = {}", py_str(&crt)).unwrap();
            writeln!(conf, "SUSHY_EMULATOR_SSL_KEY = {}", py_str(&key)).unwrap();
            crt
        });
        conf.push_str("SUSHY_EMULATOR_FAKE_SYSTEMS = [\n");
        for i in 1..=opts.systems {
            let nics: Vec<String> = (0..opts.nics)
                .map(|k| {
                    format!(
                        "{{'mac': '52:54:00:{k:02x}:{:02x}:{:02x}'}}",
                        i >> 8,
                        i & 255
                    )
                })
                .collect();
            writeln!(
                conf,
                "    {{'uuid': '{}', 'name': 'node-{i}', 'power_state': 'Off', 'external_notifier': False, 'nics': [{}]}},",
                uuid(i),
                nics.join(", ")
            )
            .unwrap();
        }
        conf.push_str("]\n");
        fs::write(run.join("emulator.conf"), conf).unwrap();

        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.arg("-c")
            .arg(LAUNCHER)
            .arg("--config")
            .arg(run.join("emulator.conf"))
            .args(["--fake", "--interface", "127.0.0.1"])
            // Downloaded virtual media images go here, not into the system's temp dir.
            .env("TMPDIR", run.join("tmp"))
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("BM_EMU_POWER_DELAY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, killed as a whole on drop.
            .process_group(0);
        if let Some(d) = opts.power_delay {
            cmd.env("BM_EMU_POWER_DELAY", d.to_string());
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the Redfish emulator: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut lines) = mpsc::unbounded_channel();
        pump(child.stdout.take().unwrap(), tx.clone(), log.clone());
        pump(child.stderr.take().unwrap(), tx, log.clone());
        let mut emu = Emulator {
            url: String::new(),
            port: 0,
            ca,
            child,
            log,
            _dir: dir,
        };

        // The port it got: Werkzeug prints " * Running on http://127.0.0.1:PORT".
        let port = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.recv().await {
                if let Some(port) = listening_port(&line) {
                    return Some(port);
                }
            }
            None
        })
        .await;
        emu.port = match port {
            Ok(Some(port)) => port,
            Ok(None) => panic!("the Redfish emulator exited at start:\n{}", emu.log()),
            Err(_) => panic!(
                "the Redfish emulator printed no port within {START_TIMEOUT:?}:\n{}",
                emu.log()
            ),
        };
        let scheme = if emu.ca.is_some() { "https" } else { "http" };
        emu.url = format!("{scheme}://127.0.0.1:{}", emu.port);
        emu.wait_ready().await;
        emu
    }

    /// Polls the service root until it answers: the emulator serves once it does.
    async fn wait_ready(&mut self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let last = match client.get(format!("{}/redfish/v1/", self.url)).send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the Redfish emulator exited ({status}):\n{}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Redfish emulator at {} did not answer within {START_TIMEOUT:?} ({last}):\n{}",
                self.url,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An HTTP client that trusts the emulator's certificate.
    fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder();
        if let Some(ca) = &self.ca {
            let pem = fs::read(ca).unwrap();
            b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap());
        }
        b.build().unwrap()
    }

    /// What the emulator printed so far, for failure messages.
    pub(crate) fn log(&self) -> String {
        lock(&self.log).join("\n")
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
        let mut req = self.client().get(format!("{}{path}", self.url));
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
        let resp = self
            .client()
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
    fn drop(&mut self) {
        // The group's id is the leader's pid (`process_group(0)`).
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The UUID of emulator system `i`.
pub(crate) fn uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// The port in Werkzeug's " * Running on http://127.0.0.1:PORT" line.
fn listening_port(line: &str) -> Option<u16> {
    let url = line.split("Running on ").nth(1)?;
    let port = url.rsplit(':').next()?;
    let digits: String = port.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A path as a Python string literal (a JSON string is one).
fn py_str(p: &Path) -> String {
    serde_json::to_string(p.to_str().expect("a UTF-8 path")).unwrap()
}

/// Forwards a stream's lines to `tx` and keeps them in `log`, until it closes; draining it
/// also keeps the emulator from blocking on a full pipe.
fn pump(
    out: impl Read + Send + 'static,
    tx: mpsc::UnboundedSender<String>,
    log: Arc<Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            lock(&log).push(line.clone());
            let _ = tx.send(line);
        }
    });
}

/// The venv with the emulator, made on first use (see the module documentation).
fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("redfish-emulator");
    fs::create_dir_all(&root).unwrap();
    let guard = File::create(root.join("venv.lock")).unwrap();
    guard
        .lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", root.display()));
    let venv = root.join("venv");
    let stamp = venv.join("bm-requirements.txt");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS) {
        return venv;
    }
    let python = tools::find("python3", "python3-venv");
    let has_venv = Command::new(&python)
        .args(["-c", "import venv, ensurepip"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_venv {
        tools::missing("python3's venv module (ensurepip)", "python3-venv");
    }
    let _ = fs::remove_dir_all(&venv);
    run(
        Command::new(&python).arg("-m").arg("venv").arg(&venv),
        "creating the Redfish emulator's venv",
    );
    let requirements = root.join("requirements.txt");
    fs::write(&requirements, REQUIREMENTS).unwrap();
    let pip = || {
        let mut c = Command::new(venv.join("bin/python"));
        c.args(["-m", "pip", "--disable-pip-version-check"]);
        c
    };
    run(
        pip()
            .args(["install", "--quiet", "--no-deps", "-r"])
            .arg(&requirements),
        "installing sushy-tools from PyPI",
    );
    run(pip().arg("check"), "checking the emulator's packages");
    fs::write(&stamp, REQUIREMENTS).unwrap();
    venv
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An htpasswd file for one user, with a bcrypt hash from the venv's `bcrypt` (a dependency
/// of the emulator).
fn write_htpasswd(venv: &Path, user: &str, password: &str, file: &Path) {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import bcrypt, os, sys; sys.stdout.write(os.environ['U'] + ':' + bcrypt.hashpw(os.environ['P'].encode(), bcrypt.gensalt(rounds=5)).decode() + '\\n')",
        ])
        .env("U", user)
        .env("P", password)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bcrypt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(file, out.stdout).unwrap();
}

/// A self-signed certificate for 127.0.0.1 and localhost that is not a CA (rustls refuses a
/// CA certificate as a server's), and its key.
fn write_certificate(crt: &Path, key: &Path) {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    fs::write(crt, certified.cert.pem()).unwrap();
    fs::write(key, certified.signing_key.serialize_pem()).unwrap();
}
