//! A full REIMAGE and REBOOT through the public gRPC API of a real `bm-server` process whose
//! machine uses the `redfish` provider: power and boot on the emulated BMC, the in-band steps
//! over SSH to a real sshd.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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

async fn wait_end(
    ops: &mut OperationServiceClient<tonic::transport::Channel>,
    id: &str,
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
        while stream.message().await.unwrap().is_some() {}
    })
    .await
    .expect("operation did not end within 120 s");
    ops.get_operation(pb::GetOperationRequest {
        operation_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn logs(
    ops: &mut OperationServiceClient<tonic::transport::Channel>,
    id: &str,
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
        out.extend(batch.lines);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reimage_and_reboot_through_the_api_of_a_real_server() {
    let emu = Emulator::start(EmuOpts {
        auth: Some(("admin", "s3cret")),
        ..EmuOpts::default()
    })
    .await;
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

[redfish.credentials]
username = "admin"
password = "s3cret"

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
mint_join_token = "echo abcdef.0123456789abcdef"
join_cluster = "echo joining {{target_cluster}}"
verify_in_cluster = "echo node {{machine_id}} is Ready"
drain = false
uncordon = false
"#,
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

    machines
        .register_machine(pb::RegisterMachineRequest {
            machine: Some(pb::Machine {
                id: "node-1".into(),
                spec: Some(pb::MachineSpec {
                    provider: "redfish".into(),
                    mac_addresses: vec!["52:54:00:00:00:01".into()],
                    ssh_endpoint: sshd.endpoint(),
                    bmc_endpoint: emu.endpoint(1),
                    image: "ubuntu-24.04".into(),
                    target_cluster: "prod-east".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("registering a redfish machine");
    // A machine without a BMC endpoint is refused by the provider at registration.
    let refused = machines
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
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    let enter = machines
        .enter_maintenance(pb::EnterMaintenanceRequest {
            machine_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        wait_end(&mut ops, &enter.id).await.phase(),
        pb::OperationPhase::Succeeded
    );

    let reimage = machines
        .reimage(pb::ReimageRequest {
            machine_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = wait_end(&mut ops, &reimage.id).await;
    assert_eq!(done.phase(), pb::OperationPhase::Succeeded, "{done:?}");
    let lines = logs(&mut ops, &reimage.id).await;
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
            Some(("admin", "s3cret")),
        )
        .await;
    assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "Pxe");
    assert_eq!(system["PowerState"], "On");
    let m = machines
        .get_machine(pb::GetMachineRequest {
            machine_id: "node-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.effective_state(), pb::EffectiveState::MaintenanceIdle);
    assert!(
        m.status
            .unwrap()
            .conditions
            .iter()
            .any(|c| c.r#type == "Provisioned" && c.status)
    );

    let reboot = machines
        .reboot(pb::RebootRequest {
            machine_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = wait_end(&mut ops, &reboot.id).await;
    assert_eq!(done.phase(), pb::OperationPhase::Succeeded, "{done:?}");
    let lines = logs(&mut ops, &reboot.id).await;
    assert!(!lines.is_empty(), "the reboot logged nothing");
    // The credentials never reach the machine record or the logs.
    let all: String = lines.iter().map(|l| l.message.as_str()).collect();
    assert!(!all.contains("s3cret"));
}
