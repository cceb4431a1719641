//! The boot service (`--boot-listen`) against the real server process: what a machine that
//! network-boots is told, when, the check-in that ends reboot-to-netboot, and the files.

use std::time::Duration;

use bm_proto::v1 as pb;
use reqwest::StatusCode;

use crate::support::{Server, fake_machine};

/// Starts a server with the boot service on a free port, serving `dir`'s files; returns it
/// with the boot service's base URL.
async fn start(extra: &[&str]) -> (Server, String, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("vmlinuz"),
        b"0123456789 the deploy kernel",
    )
    .unwrap();
    std::fs::write(files.path().join("initrd.img"), b"the deploy initrd").unwrap();
    let dir = files.path().to_str().unwrap().to_owned();
    let mut args = vec![
        "--fake-timing",
        "instant",
        "--boot-listen",
        "127.0.0.1:0",
        "--boot-dir",
        &dir,
        "--boot-kernel-args",
        "console=ttyS0",
    ];
    args.extend_from_slice(extra);
    let server = Server::start_with(&args);
    let addr = server.logged_address("boot service listening on ").await;
    (server, format!("http://{addr}"), files)
}

async fn ipxe(base: &str, mac: &str) -> (StatusCode, String) {
    let r = reqwest::get(format!("{base}/boot/ipxe?mac={mac}"))
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn check_in(base: &str, token: &str) -> (StatusCode, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/boot/checkin"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

fn token_of(script: &str) -> String {
    let at = script.find("bm.token=").expect("a token") + "bm.token=".len();
    script[at..].split_whitespace().next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reimage_netboots_only_in_its_netboot_stage_and_ends_it_on_the_check_in() {
    let (server, base, _files) = start(&[]).await;
    let mut c = server.clients().await;
    let m = c.register(fake_machine("m-1", 1, &[])).await;
    let mac = m.spec.unwrap().mac_addresses[0].clone();

    // Nothing runs: the local disk, whatever the firmware does.
    let (status, idle) = ipxe(&base, &mac).await;
    assert_eq!(status, StatusCode::OK);
    assert!(idle.starts_with("#!ipxe\n"), "{idle}");
    assert!(idle.contains("sanboot") && idle.contains("exit"), "{idle}");
    assert!(!idle.contains("kernel"), "{idle}");
    // A MAC nobody has: the local disk too.
    let (_, unknown) = ipxe(&base, "02:de:ad:be:ef:00").await;
    assert!(unknown.contains("no machine has the MAC"), "{unknown}");
    // Not a MAC: a clear 400.
    let (status, bad) = ipxe(&base, "nonsense").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad.contains("not a MAC address"), "{bad}");

    c.enter_maintenance("m-1").await;
    let op = c.reimage("m-1", "r-1").await.unwrap();
    c.wait_stage(&op.id, "reboot-to-netboot").await;
    let (_, deploy) = ipxe(&base, &mac).await;
    assert!(deploy.starts_with("#!ipxe\n"), "{deploy}");
    for want in [
        &format!("kernel {base}/boot/files/vmlinuz initrd=initrd.img"),
        "bm.machine=m-1",
        &format!("bm.operation={}", op.id),
        &format!("bm.callback={base}/boot/checkin"),
        "console=ttyS0",
        &format!("initrd {base}/boot/files/initrd.img"),
        "\nboot\n",
    ] {
        assert!(deploy.contains(want), "{want:?} missing from\n{deploy}");
    }
    let token = token_of(&deploy);
    // The firmware asks again (a retry): the same ticket.
    assert_eq!(token_of(&ipxe(&base, &mac).await.1), token);

    // The stage waits for the check-in: the operation is still there.
    assert_eq!(c.operation(&op.id).await.current_stage, "reboot-to-netboot");
    let (status, refused) = check_in(&base, "not-a-token").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    let (status, ok) = check_in(&base, &token).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
    assert!(ok.contains("machine=m-1"), "{ok}");
    let (status, again) = check_in(&base, &token).await;
    assert_eq!(status, StatusCode::GONE, "single use: {again}");

    let done = c.wait_end(&op.id).await;
    assert_eq!(done.phase(), pb::OperationPhase::Succeeded, "{done:?}");
    // The operation is over: the local disk again.
    let (_, after) = ipxe(&base, &mac).await;
    assert!(!after.contains("kernel"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_boots_the_deploy_environment_fails_reboot_to_netboot() {
    let (server, _base, _files) = start(&["--netboot-checkin-timeout", "300ms"]).await;
    let mut c = server.clients().await;
    c.register(fake_machine("m-1", 1, &[])).await;
    c.enter_maintenance("m-1").await;
    let op = c.reimage("m-1", "r-1").await.unwrap();
    let done = c.wait_end(&op.id).await;
    assert_eq!(done.phase(), pb::OperationPhase::Failed, "{done:?}");
    let stage = done
        .stages
        .iter()
        .find(|s| s.name == "reboot-to-netboot")
        .expect("the stage ran");
    assert!(
        stage
            .last_error
            .contains("did not boot the deploy environment within"),
        "{stage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_range_requests() {
    let (_server, base, _files) = start(&[]).await;
    let client = reqwest::Client::new();
    let whole = client
        .get(format!("{base}/boot/files/vmlinuz"))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(
        whole.bytes().await.unwrap().as_ref(),
        b"0123456789 the deploy kernel"
    );
    let part = client
        .get(format!("{base}/boot/files/vmlinuz"))
        .header("Range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap().as_ref(), b"2345");
    let missing = client
        .get(format!("{base}/boot/files/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // Nothing outside the directory.
    let escape = client
        .get(format!("{base}/boot/files/..%2F..%2Fetc%2Fpasswd"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_ne!(escape.status(), StatusCode::OK);
}
