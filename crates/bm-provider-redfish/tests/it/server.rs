//! A full REIMAGE and REBOOT through the public gRPC API of a real `bm-server` process whose
//! machine uses the `redfish` provider: power and boot on the emulated BMC, the in-band steps
//! over SSH to a real sshd. Every API response and the server's log are then searched for
//! the configured secrets.

use std::fmt::Debug;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use bm_proto::v1::machine_service_client::MachineServiceClient;
use bm_proto::v1::operation_service_client::OperationServiceClient;

use crate::support::{EmuOpts, Emulator, Sshd, temp_dir};

/// The `bm-server` binary, built on first use (a test of this package does not build
/// another package's binaries).
fn server_binary() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "bm-server", "--bin", "bm-server"])
        .output()
        .expect("running cargo build");
    assert!(
        out.status.success(),
        "building bm-server: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(Path::parent)
        .unwrap()
        .join("bm-server")
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, config: &Path) -> Server {
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut child = Command::new(server_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "debug",
            // About the provider, not about who may call (bm-server's tests cover that).
            "--insecure",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .arg("--provider-config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("starting bm-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("bm-server listening on ")
        .unwrap_or_else(|| {
            panic!(
                "bm-server did not start: {line:?}\n{}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            )
        })
        .to_owned();
    Server { child, addr }
}

/// Everything the API answered, as text, to be searched for secrets.
#[derive(Default)]
struct Transcript(Vec<String>);

impl Transcript {
    fn keep<T: Debug>(&mut self, what: T) -> T {
        self.0.push(format!("{what:?}"));
        what
    }
}

async fn wait_end(
    ops: &mut OperationServiceClient<tonic::transport::Channel>,
    id: &str,
    seen: &mut Transcript,
) -> pb::Operation {
    let mut stream = ops
        .watch_operations(pb::WatchOperationsRequest {
            operation_id: id.into(),
            machine_id: String::new(),
            after_revision: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(m) = stream.message().await.unwrap() {
            seen.keep(m);
        }
    })
    .await
    .expect("operation did not end within 120 s");
    seen.keep(
        ops.get_operation(pb::GetOperationRequest {
            operation_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner(),
    )
}

async fn logs(
    ops: &mut OperationServiceClient<tonic::transport::Channel>,
    id: &str,
    seen: &mut Transcript,
) -> Vec<pb::LogLine> {
    let mut stream = ops
        .stream_logs(pb::StreamLogsRequest {
            operation_id: id.into(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        out.extend(seen.keep(batch).lines);
    }
    out
}

const BMC_USER: &str = "bmc-admin-e2e";
const BMC_PASSWORD: &str = "s3cret-e2e-Qx7w";
const JOIN_TOKEN: &str = "abcdef.0123456789abcdef";

/// Each secret of the run in every form it could be leaked in: the BMC password plain, in
/// base64 and as an HTTP Basic credential; the join token; the SSH private key whole, in
/// base64, and each line of its body.
fn secrets(ssh_key: &str) -> Vec<String> {
    let mut all = vec![
        BMC_PASSWORD.to_owned(),
        STANDARD.encode(BMC_PASSWORD),
        STANDARD.encode(format!("{BMC_USER}:{BMC_PASSWORD}")),
        JOIN_TOKEN.to_owned(),
        STANDARD.encode(JOIN_TOKEN),
        STANDARD.encode(ssh_key),
    ];
    all.extend(
        ssh_key
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_owned),
    );
    assert!(all.len() > 6, "the SSH key has no body: {ssh_key:?}");
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reimage_and_reboot_through_the_api_of_a_real_server() {
    let emu = Emulator::start(EmuOpts {
        auth: Some((BMC_USER, BMC_PASSWORD)),
        ..EmuOpts::default()
    })
    .await;
    let mut seen = Transcript::default();
    let sshd = Sshd::start();
    let dir = temp_dir("server-");
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, sshd.known_hosts_line(&sshd.host_public)).unwrap();
    let config = dir.path().join("providers.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redfish]
request_timeout = "10s"
credential_hosts = ["127.0.0.1"]

[redfish.credentials]
username = "{bmc_user}"
password = "{bmc_password}"

# The emulator speaks plain HTTP.
[redfish.bmc."127.0.0.1:{emu_port}"]
allow_plaintext = true

[redfish.power]
poll_interval = "200ms"
max_poll_interval = "1s"
deadline = "60s"

[redfish.ssh]
user = "{user}"
private_key_file = "{key}"
known_hosts_file = "{known_hosts}"

[redfish.commands]
repave = "echo writing {{image}} to /dev/sda; echo image written"
# Prints the token without spelling it: the command itself is logged.
mint_join_token = "printf '%s.%s\\n' {token_id} {token_secret}"
join_cluster = "echo joining {{target_cluster}}"
verify_in_cluster = "echo node {{machine_id}} is Ready"
drain = false
uncordon = false
"#,
            bmc_user = BMC_USER,
            bmc_password = BMC_PASSWORD,
            emu_port = emu.port,
            token_id = JOIN_TOKEN.split_once('.').unwrap().0,
            token_secret = JOIN_TOKEN.split_once('.').unwrap().1,
            user = sshd.user,
            key = sshd.client_key.display(),
            known_hosts = known_hosts.display(),
        ),
    )
    .unwrap();
    let server = start_server(dir.path(), &config);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut machines = MachineServiceClient::new(channel.clone());
    let mut ops = OperationServiceClient::new(channel);

    let node = |id: &str, bmc_endpoint: String| pb::Machine {
        id: id.into(),
        spec: Some(pb::MachineSpec {
            provider: "redfish".into(),
            mac_addresses: vec!["52:54:00:00:00:01".into()],
            ssh_endpoint: sshd.endpoint(),
            bmc_endpoint,
            image: "ubuntu-24.04".into(),
            target_cluster: "prod-east".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    seen.keep(
        machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(node("node-1", emu.endpoint(1))),
            })
            .await
            .expect("registering a redfish machine"),
    );
    // BMC addresses the configuration does not list are refused, with the setting to change.
    let refusals = [
        (
            "redfish+https://10.0.0.5/redfish/v1/Systems/1".to_owned(),
            "redfish.credential_hosts does not list it",
        ),
        (
            // The emulator's host, another port, plain HTTP.
            format!("redfish+http://127.0.0.1:{}/", u32::from(emu.port) + 1),
            "set allow_plaintext = true in",
        ),
    ];
    for (endpoint, want) in &refusals {
        let refused = seen.keep(
            machines
                .register_machine(pb::RegisterMachineRequest {
                    machine: Some(node("node-3", endpoint.clone())),
                })
                .await
                .unwrap_err(),
        );
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(want), "{refused:?}");
        let refused = seen.keep(
            machines
                .update_machine(pb::UpdateMachineRequest {
                    machine: Some(node("node-1", endpoint.clone())),
                    update_mask: Some(FieldMask {
                        paths: vec!["spec.bmc_endpoint".into()],
                    }),
                })
                .await
                .unwrap_err(),
        );
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains(want), "{refused:?}");
    }
    // A machine without a BMC endpoint is refused by the provider at registration.
    let refused = seen.keep(
        machines
            .register_machine(pb::RegisterMachineRequest {
                machine: Some(pb::Machine {
                    id: "node-2".into(),
                    spec: Some(pb::MachineSpec {
                        provider: "redfish".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let enter = seen.keep(
        machines
            .enter_maintenance(pb::EnterMaintenanceRequest {
                machine_id: "node-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        wait_end(&mut ops, &enter.id, &mut seen).await.phase(),
        pb::OperationPhase::Succeeded
    );

    let reimage = seen.keep(
        machines
            .reimage(pb::ReimageRequest {
                machine_id: "node-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let done = wait_end(&mut ops, &reimage.id, &mut seen).await;
    assert_eq!(done.phase(), pb::OperationPhase::Succeeded, "{done:?}");
    let lines = logs(&mut ops, &reimage.id, &mut seen).await;
    let has = |stage: &str, text: &str| {
        lines
            .iter()
            .any(|l| l.stage == stage && l.message.contains(text))
    };
    assert!(
        has("repave-image", "writing ubuntu-24.04 to /dev/sda"),
        "{lines:#?}"
    );
    assert!(has("join-cluster", "joining prod-east"), "{lines:#?}");
    assert!(
        has("verify-in-cluster", "node node-1 is Ready"),
        "{lines:#?}"
    );
    // The BMC saw the one-time PXE override and the power cycle.
    let system = emu
        .get(
            &crate::support::Emulator::system_path(1),
            Some((BMC_USER, BMC_PASSWORD)),
        )
        .await;
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "Pxe");
    assert_eq!(system["PowerState"], "On");
    let m = seen.keep(
        machines
            .get_machine(pb::GetMachineRequest {
                machine_id: "node-1".into(),
            })
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(m.effective_state(), pb::EffectiveState::MaintenanceIdle);
    assert!(
        m.status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.r#type == "Provisioned" && c.status)
    );

    let reboot = seen.keep(
        machines
            .reboot(pb::RebootRequest {
                machine_id: "node-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let done = wait_end(&mut ops, &reboot.id, &mut seen).await;
    assert_eq!(done.phase(), pb::OperationPhase::Succeeded, "{done:?}");
    let lines = logs(&mut ops, &reboot.id, &mut seen).await;
    assert!(!lines.is_empty(), "the reboot logged nothing");

    // The listings too, then no secret anywhere: not in an API response, not in the
    // server's log (at debug level).
    seen.keep(
        machines
            .list_machines(pb::ListMachinesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    seen.keep(
        ops.list_operations(pb::ListOperationsRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    let api = seen.0.join("\n");
    assert!(
        api.contains("writing ubuntu-24.04 to /dev/sda"),
        "the transcript is not what the run answered"
    );
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("node-1"),
        "the server logged nothing about the run:\n{log}"
    );
    let key = std::fs::read_to_string(&sshd.client_key).unwrap();
    for secret in secrets(&key) {
        assert!(
            !api.contains(&secret),
            "an API response holds the secret {secret:?}:\n{api}"
        );
        assert!(
            !log.contains(&secret),
            "the server log holds the secret {secret:?}:\n{log}"
        );
    }
}
