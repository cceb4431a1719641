//! Starting and stopping real server processes, connecting clients, running bmctl.
//! (The API tests run the server in this process instead: `inproc.rs`.)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;
use tonic::transport::Channel;

/// The directory of the workspace's binaries (target/<profile>).
fn bin_dir() -> PathBuf {
    // target/<profile>/deps/it-<hash>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A binary of the workspace, built on first use if `cargo test` did not build it (a test
/// of one package does not build another package's binaries).
pub(crate) fn bin(package: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = bin_dir().join(name);
    if name == "bm-server" {
        return PathBuf::from(env!("CARGO_BIN_EXE_bm-server"));
    }
    BUILT.get_or_init(|| {
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("running cargo build");
        assert!(
            out.status.success(),
            "cargo build {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A running `bm-server` process.
pub(crate) struct Server {
    child: Option<Child>,
    /// The address it listens on; a restart keeps it, so that clients can reconnect.
    pub(crate) addr: String,
    pub(crate) dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Server {
    /// Starts a server with instant fake hardware on a new data directory.
    pub(crate) fn start() -> Server {
        Server::start_with(&["--fake-timing", "instant"])
    }

    /// Starts a server with `args`, without authentication (`--insecure`): these tests are
    /// about other things; `auth.rs` tests the default.
    pub(crate) fn start_with(args: &[&str]) -> Server {
        let mut all = vec!["--insecure"];
        all.extend_from_slice(args);
        Server::start_secure(&all)
    }

    /// Starts a server with `args` only: authentication as the server's defaults say.
    pub(crate) fn start_secure(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut s = Server {
            child: None,
            addr: String::new(),
            dir,
            _tmp: Some(tmp),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
        };
        s.spawn();
        s
    }

    /// Like [`Server::start_with`], with these environment variables too.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut s = Server {
            child: None,
            addr: String::new(),
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
            args: std::iter::once("--insecure")
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        s.spawn();
        s
    }

    /// Starts a server in `dir` (its data in `dir/data`, its log in `dir/server.log`), which
    /// the caller owns.
    pub(crate) fn start_in(dir: &Path, args: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            addr: String::new(),
            dir: dir.to_owned(),
            _tmp: None,
            // Without authentication, as `start_with`.
            args: std::iter::once("--insecure")
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            env: Vec::new(),
        };
        s.spawn();
        s
    }

    /// Starts the server process on this server's data directory.
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("server log");
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_owned()
        } else {
            self.addr.clone()
        };
        let mut child = Command::new(bin("bm-server", "bm-server"))
            .args(["--listen", &listen, "--data-dir"])
            .arg(self.dir.join("data"))
            .args(&self.args)
            .env("BM_LOG_LEVEL", "debug")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting bm-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the address");
        let Some(addr) = line.trim().strip_prefix("bm-server listening on ") else {
            // Not left running behind the failed test.
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected first line {line:?}; log:\n{}", self.log());
        };
        self.addr = addr.to_owned();
        self.child = Some(child);
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Waits until the server's log has `needle` `times` times (30 s at most).
    pub(crate) async fn wait_for_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "{needle:?} was not logged {times} times; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `needle` in the log and returns the `host:port` that follows it (up to a
    /// space, a quote or a slash): where a listener the server started is.
    pub(crate) async fn logged_address(&self, needle: &str) -> String {
        self.wait_for_log(needle, 1).await;
        let log = self.log();
        let at = log.find(needle).expect("logged") + needle.len();
        log[at..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '/')
            .collect()
    }

    pub(crate) fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// Sends SIGTERM and waits for the exit; returns the exit status and how long it took.
    pub(crate) fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let status = self.wait(Duration::from_secs(15));
        (status, started.elapsed())
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub(crate) fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping");
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("waiting") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "bm-server did not exit within {limit:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn clients(&self) -> Clients {
        connect(&self.addr).await
    }

    /// Runs bmctl against this server.
    pub(crate) fn bmctl(&self, args: &[&str]) -> Output {
        bmctl(&self.addr, args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A bmctl command for `args` against the server at `addr`, without colour or input.
pub(crate) fn bmctl_command(addr: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("bm-cli", "bmctl"));
    cmd.args(args)
        .env("BM_SERVER", addr)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

pub(crate) fn bmctl(addr: &str, args: &[&str]) -> Output {
    bmctl_command(addr, args).output().expect("running bmctl")
}

pub(crate) fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn err_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Clients of the server at `addr`, on one connection.
pub(crate) async fn connect(addr: &str) -> Clients {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connecting to bm-server");
    Clients {
        machines: MachineServiceClient::new(channel.clone()),
        operations: OperationServiceClient::new(channel.clone()),
        channel,
    }
}

pub(crate) struct Clients {
    pub(crate) machines: MachineServiceClient<Channel>,
    pub(crate) operations: OperationServiceClient<Channel>,
    pub(crate) channel: Channel,
}

pub(crate) fn fake_machine(id: &str, n: u32, labels: &[(&str, &str)]) -> pb::Machine {
    pb::Machine {
        id: id.into(),
        spec: Some(pb::MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec![format!("02:00:00:00:{:02x}:{:02x}", n >> 8, n & 0xff)],
            ssh_endpoint: format!("root@10.0.0.{}:22", n & 0xff),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod".into(),
            ..Default::default()
        }),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Default::default()
    }
}

impl Clients {
    pub(crate) async fn register(&mut self, m: pb::Machine) -> pb::Machine {
        self.machines
            .register_machine(pb::RegisterMachineRequest { machine: Some(m) })
            .await
            .expect("register")
            .into_inner()
    }

    pub(crate) async fn machine(&mut self, id: &str) -> pb::Machine {
        self.machines
            .get_machine(pb::GetMachineRequest {
                machine_id: id.into(),
            })
            .await
            .expect("get machine")
            .into_inner()
    }

    pub(crate) async fn enter_maintenance(&mut self, id: &str) -> pb::Operation {
        let op = self
            .machines
            .enter_maintenance(pb::EnterMaintenanceRequest {
                machine_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("enter maintenance")
            .into_inner();
        self.wait_end(&op.id).await
    }

    pub(crate) async fn reimage(
        &mut self,
        id: &str,
        request_id: &str,
    ) -> Result<pb::Operation, tonic::Status> {
        self.machines
            .reimage(pb::ReimageRequest {
                machine_id: id.into(),
                request_id: request_id.into(),
                note: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The events of one operation from the first; the stream ends with the operation.
    async fn watch_operation(&mut self, op: &str) -> tonic::Streaming<pb::WatchOperationsResponse> {
        self.operations
            .watch_operations(pb::WatchOperationsRequest {
                operation_id: op.into(),
                machine_id: String::new(),
                after_revision: Some(0),
            })
            .await
            .expect("watch")
            .into_inner()
    }

    /// Every event of an operation until its stream ends (it ends with the operation).
    pub(crate) async fn events(&mut self, op: &str) -> Vec<pb::OperationEvent> {
        let mut stream = self.watch_operation(op).await;
        let mut out = Vec::new();
        let collect = async {
            while let Some(batch) = stream.message().await.expect("watch message") {
                out.extend(batch.events);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .expect("operation did not end within 60 s");
        out
    }

    pub(crate) async fn wait_end(&mut self, op: &str) -> pb::Operation {
        self.events(op).await;
        self.operation(op).await
    }

    pub(crate) async fn operation(&mut self, op: &str) -> pb::Operation {
        self.operations
            .get_operation(pb::GetOperationRequest {
                operation_id: op.into(),
            })
            .await
            .expect("get operation")
            .into_inner()
    }

    /// Waits until the operation has started `stage` (any attempt).
    pub(crate) async fn wait_stage(&mut self, op: &str, stage: &str) {
        self.wait_attempt(op, stage, None).await;
    }

    /// Waits until the operation has started `stage`, at `attempt` if given.
    pub(crate) async fn wait_attempt(&mut self, op: &str, stage: &str, attempt: Option<i32>) {
        let mut stream = self.watch_operation(op).await;
        let wait = async {
            while let Some(batch) = stream.message().await.expect("watch message") {
                if batch.events.iter().any(|e| {
                    e.r#type == pb::EventType::StageStarted as i32
                        && e.stage == stage
                        && attempt.is_none_or(|a| a == e.attempt)
                }) {
                    return;
                }
            }
            panic!("operation {op} ended before {stage} started");
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("{stage} did not start within 60 s"));
    }
}

/// True if the condition is present and true.
pub(crate) fn condition(m: &pb::Machine, t: &str) -> bool {
    m.status
        .as_ref()
        .is_some_and(|s| s.conditions.iter().any(|c| c.r#type == t && c.status))
}

pub(crate) fn phase(m: &pb::Machine) -> pb::Phase {
    m.status
        .as_ref()
        .map_or(pb::Phase::Unspecified, |s| s.phase())
}
