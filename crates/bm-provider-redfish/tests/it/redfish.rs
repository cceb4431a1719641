//! The Redfish side against a real emulator: power with read-back, boot override, virtual
//! media, NICs, system selection, basic auth and TLS.

use std::time::{Duration, Instant};

use bm_provider::{ErrorKind, PowerAction, PowerState, Provider, ProviderError};
use bm_provider_redfish::{
    BmcConfig, BootConfig, BootMethod, CycleMethod, PowerConfig, RedfishConfig, RedfishProvider,
    Secret, TlsConfig,
};

use crate::support::{EmuOpts, Emulator, Harness, HttpStub, machine, uuid};

/// Fast polling for an emulator whose resets land within about a second.
fn fast() -> RedfishConfig {
    RedfishConfig {
        power: PowerConfig {
            poll_interval: Duration::from_millis(200),
            max_poll_interval: Duration::from_millis(500),
            deadline: Duration::from_secs(30),
            reissue_after: Duration::from_secs(15),
            ..PowerConfig::default()
        },
        ..crate::support::lab()
    }
}

fn provider(config: RedfishConfig) -> RedfishProvider {
    RedfishProvider::new(config).unwrap_or_else(|e| panic!("config refused: {e}"))
}

async fn power_of(emu: &Emulator, system: u32) -> String {
    let sys = emu.get(&Emulator::system_path(system), None).await;
    sys["PowerState"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_on_off_and_cycle_are_confirmed_by_read_back() {
    let emu = Emulator::start(EmuOpts::default()).await;
    let p = provider(fast());
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));

    assert_eq!(p.power_state(h.ctx()).await.unwrap(), PowerState::Off);
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    // Done means the BMC shows it, not merely that it accepted the reset.
    assert_eq!(power_of(&emu, 1).await, "On");
    assert_eq!(p.power_state(h.ctx()).await.unwrap(), PowerState::On);
    assert!(h.logged("[bmc] Reset On"), "{:#?}", h.lines());

    // Idempotent: nothing is sent when the state is already right.
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    assert!(h.logged("already On"), "{:#?}", h.lines());

    p.power(h.ctx(), PowerAction::Off).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "Off");
    assert!(h.logged("[bmc] Reset ForceOff"), "{:#?}", h.lines());

    // A cycle of a machine that is off powers it on.
    p.power(h.ctx(), PowerAction::Cycle).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "On");
    assert!(h.logged("instead of a cycle"), "{:#?}", h.lines());

    // A cycle of a machine that is on: off, confirmed, then on, confirmed.
    let before = h.lines().len();
    p.power(h.ctx(), PowerAction::Cycle).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "On");
    let cycle: Vec<String> = h.lines()[before..].to_vec();
    let pos = |s: &str| {
        cycle
            .iter()
            .position(|l| l.contains(s))
            .unwrap_or_else(|| panic!("no {s:?} in {cycle:#?}"))
    };
    assert!(pos("Reset ForceOff") < pos("PowerState Off after"));
    assert!(pos("PowerState Off after") < pos("Reset On"));
    assert!(pos("Reset On") < pos("PowerState On after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_with_the_stock_random_delay() {
    // Resets land 1-11 s late: only the polling makes this pass.
    let emu = Emulator::start(EmuOpts {
        power_delay: None,
        ..EmuOpts::default()
    })
    .await;
    let mut config = fast();
    config.power.max_poll_interval = Duration::from_secs(1);
    config.power.cycle = CycleMethod::Restart;
    let p = provider(config);
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "On");
    // A warm restart: the emulator shows Off at once and On after the delay.
    p.power(h.ctx(), PowerAction::Cycle).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "On");
    assert!(h.logged("Reset ForceRestart"), "{:#?}", h.lines());
    assert!(h.logged("PowerState On after"), "{:#?}", h.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_power_polling_at_once() {
    let emu = Emulator::start(EmuOpts {
        power_delay: Some(120),
        ..EmuOpts::default()
    })
    .await;
    // Polls a minute apart: the poll after the reset is a minute away when the cancel comes.
    let mut config = fast();
    config.power = PowerConfig {
        poll_interval: Duration::from_secs(60),
        max_poll_interval: Duration::from_secs(60),
        deadline: Duration::from_secs(600),
        reissue_after: Duration::from_secs(600),
        ..PowerConfig::default()
    };
    let p = std::sync::Arc::new(provider(config));
    let (h, mut lines) = Harness::with_stream(machine(&emu.endpoint(1), "", &[]));
    let h = std::sync::Arc::new(h);
    let task = {
        let (p, h) = (p.clone(), h.clone());
        tokio::spawn(async move { p.power(h.ctx(), PowerAction::On).await })
    };
    while let Some((_, line)) = lines.recv().await {
        if line == "Reset On" {
            break;
        }
    }
    let canceled_at = Instant::now();
    h.cancel.cancel();
    let e = task.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Canceled);
    // Not at the next poll (60 s) nor at the deadline: far from both, and far above what a
    // busy machine needs to return (the trait's 100 ms is not what a shared CI machine can
    // promise).
    let took = canceled_at.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_boot_override_once() {
    let emu = Emulator::start(EmuOpts::default()).await;
    let p = provider(fast());
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    let sys = emu.get(&Emulator::system_path(1), None).await;
    assert_eq!(sys["Boot"]["BootSourceOverrideTarget"], "Pxe");
    // The emulator ignores BootSourceOverrideEnabled; the provider says so.
    assert!(
        h.logged("BootSourceOverrideEnabled Continuous"),
        "{:#?}",
        h.lines()
    );
    // Again: still fine.
    p.set_netboot(h.ctx()).await.unwrap();
}

/// Netboot from an ISO as virtual media.
fn virtual_media(iso_url: String) -> RedfishProvider {
    let mut config = fast();
    config.boot = BootConfig {
        method: BootMethod::VirtualMedia,
        iso_url: Some(iso_url),
        mode: None,
    };
    provider(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_media_insert_replace_and_boot_from_cd() {
    let emu = Emulator::start(EmuOpts::default()).await;
    let image: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let images = HttpStub::start(200, image).await;
    let p = virtual_media(images.url("/deploy/{machine_id}/{image}.iso"));
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    let cd_path = format!("{}/VirtualMedia/Cd", Emulator::system_path(1));

    // set_netboot inserts the deploy ISO and boots from CD once.
    p.set_netboot(h.ctx()).await.unwrap();
    let cd = emu.get(&cd_path, None).await;
    let first = images.url("/deploy/node-1/ubuntu-24.04.iso");
    assert_eq!(cd["Image"], first);
    assert_eq!(cd["Inserted"], true);
    let sys = emu.get(&Emulator::system_path(1), None).await;
    assert_eq!(sys["Boot"]["BootSourceOverrideTarget"], "Cd");
    let reqs = images.requests();
    assert!(
        reqs.iter()
            .any(|r| r.method == "GET" && r.path == "/deploy/node-1/ubuntu-24.04.iso"),
        "{reqs:?}"
    );

    // Again: the same image is not downloaded twice.
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(images.requests().len(), reqs.len());
    assert!(h.logged("already holds"), "{:#?}", h.lines());

    // Another image (the machine's spec changed) replaces it, ejecting the first.
    let mut upgraded = machine(&emu.endpoint(1), "", &[]);
    upgraded.spec.image = "ubuntu-26.04".into();
    let h = Harness::new(upgraded);
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(
        emu.get(&cd_path, None).await["Image"],
        images.url("/deploy/node-1/ubuntu-26.04.iso")
    );
    assert!(h.logged("ejecting"), "{:#?}", h.lines());

    // An image the BMC cannot download: the BMC's own message, permanent.
    let missing = HttpStub::start(404, b"no such image".to_vec()).await;
    let e = virtual_media(missing.url("/gone.iso"))
        .set_netboot(h.ctx())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("HTTP 400"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pxe_boot_compares_the_record_with_the_nics() {
    let emu = Emulator::start(EmuOpts {
        systems: 2,
        nics: 3,
        ..EmuOpts::default()
    })
    .await;
    let p = provider(fast());
    let h = Harness::new(machine(
        &emu.endpoint(2),
        "",
        &["52:54:00:01:00:02", "52:54:00:09:09:09"],
    ));
    p.set_netboot(h.ctx()).await.unwrap();
    assert!(
        h.logged(
            "NICs: 52:54:00:00:00:02, 52:54:00:01:00:02, 52:54:00:02:00:02; the record lists 52:54:00:09:09:09 which the hardware does not have"
        ),
        "{:#?}",
        h.lines()
    );
    let h = Harness::new(machine(&emu.endpoint(2), "", &["52:54:00:02:00:02"]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert!(h.logged("(the record matches)"), "{:#?}", h.lines());
}

/// The first NIC of the system a BMC endpoint selects, as a PXE boot reports it.
async fn first_nic(p: &RedfishProvider, bmc: &str) -> Result<String, ProviderError> {
    let h = Harness::new(machine(bmc, "", &["02:00:00:00:00:01"]));
    p.set_netboot(h.ctx()).await?;
    let line = h
        .lines()
        .into_iter()
        .find_map(|l| l.split_once("NICs: ").map(|(_, nics)| nics.to_owned()))
        .unwrap_or_else(|| panic!("no NICs line: {:#?}", h.lines()));
    Ok(line[..17].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_is_found_by_path_uuid_or_as_the_only_one() {
    let emu = Emulator::start(EmuOpts {
        systems: 3,
        ..EmuOpts::default()
    })
    .await;
    let p = provider(fast());
    let mac_of = |i: u32| format!("52:54:00:00:00:{i:02x}");
    let first_mac = |bmc: String| {
        let p = &p;
        async move { first_nic(p, &bmc).await }
    };
    // By path, verbatim.
    assert_eq!(first_mac(emu.endpoint(3)).await.unwrap(), mac_of(3));
    // By UUID.
    let by_uuid = format!(
        "{}/redfish/v1/Systems?uuid={}",
        emu.bmc_base(),
        uuid(2).to_uppercase()
    );
    assert_eq!(first_mac(by_uuid).await.unwrap(), mac_of(2));
    // By name: the emulator redirects (307) to the UUID path.
    let by_name = format!("{}/redfish/v1/Systems/node-1", emu.bmc_base());
    assert_eq!(first_mac(by_name).await.unwrap(), mac_of(1));
    // A trailing slash the BMC does not use.
    assert_eq!(
        first_mac(format!("{}/", emu.endpoint(2))).await.unwrap(),
        mac_of(2)
    );
    // Several systems and none named: a permanent error listing them.
    let e = first_mac(emu.bmc_base()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert!(e.to_string().contains("has 3 systems"), "{e}");
    // A wrong path.
    let e = first_mac(format!("{}/redfish/v1/Systems/nope", emu.bmc_base()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent);
    assert!(e.to_string().contains("wrong system path"), "{e}");
    assert!(e.to_string().contains(&uuid(3)), "{e}");
    // An unknown UUID.
    let e = first_mac(format!("{}/?uuid=nope", emu.bmc_base()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no system with UUID nope"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_system_needs_no_path() {
    let emu = Emulator::start(EmuOpts::default()).await;
    let p = provider(fast());
    let h = Harness::new(machine(&emu.bmc_base(), "", &[]));
    assert_eq!(p.power_state(h.ctx()).await.unwrap(), PowerState::Off);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_good_and_bad_passwords() {
    const PASSWORD: &str = "correct horse";
    let emu = Emulator::start(EmuOpts {
        auth: Some(("admin", PASSWORD)),
        ..EmuOpts::default()
    })
    .await;
    let with = |password: Option<&str>| {
        let mut c = fast();
        c.credentials = password.map(|pw| bm_provider_redfish::Credentials {
            username: "admin".into(),
            password: Some(Secret::new(pw)),
            password_file: None,
        });
        provider(c)
    };
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    let good = with(Some(PASSWORD));
    good.power(h.ctx(), PowerAction::On).await.unwrap();
    assert_eq!(good.power_state(h.ctx()).await.unwrap(), PowerState::On);

    for bad in [with(Some("wrong")), with(None)] {
        let e = bad.power_state(h.ctx()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
        let want = format!("bad credentials for BMC 127.0.0.1:{}", emu.port);
        assert!(e.to_string().contains(&want), "{e}");
    }
    assert!(
        !h.lines().iter().any(|l| l.contains(PASSWORD)),
        "a log line holds the password: {:#?}",
        h.lines()
    );

    // Per-BMC credentials win over the default ones.
    let mut c = fast();
    c.credentials = Some(bm_provider_redfish::Credentials {
        username: "admin".into(),
        password: Some(Secret::new("wrong")),
        password_file: None,
    });
    let pw_file = crate::support::temp_dir("pw-");
    std::fs::write(pw_file.path().join("pw"), format!("{PASSWORD}\n")).unwrap();
    c.bmc.insert(
        format!("127.0.0.1:{}", emu.port),
        BmcConfig {
            username: Some("admin".into()),
            password_file: Some(pw_file.path().join("pw")),
            ..BmcConfig::default()
        },
    );
    assert_eq!(
        provider(c).power_state(h.ctx()).await.unwrap(),
        PowerState::On
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_with_the_ca_file_and_refused_without() {
    let emu = Emulator::start(EmuOpts {
        tls: true,
        ..EmuOpts::default()
    })
    .await;
    let ca = emu.ca.clone().expect("the TLS emulator has a CA file");
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    assert!(h.machine.spec.bmc_endpoint.starts_with("redfish+https://"));

    let mut with_ca = fast();
    with_ca.tls = TlsConfig { ca_file: Some(ca) };
    let p = provider(with_ca);
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    assert_eq!(p.power_state(h.ctx()).await.unwrap(), PowerState::On);

    // The system trust store does not know the emulator's self-signed certificate.
    let e = provider(fast()).power_state(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("not trusted"), "{e}");

    // A lab BMC may skip verification, explicitly and per BMC.
    let mut insecure = fast();
    insecure.bmc.insert(
        format!("127.0.0.1:{}", emu.port),
        BmcConfig {
            insecure_skip_verify: Some(true),
            ..BmcConfig::default()
        },
    );
    assert_eq!(
        provider(insecure).power_state(h.ctx()).await.unwrap(),
        PowerState::On
    );
}

#[tokio::test]
async fn a_bmc_that_does_not_answer_is_unreachable() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = provider(fast());
    let h = Harness::new(machine(
        &format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/1"),
        "",
        &[],
    ));
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("cannot connect to BMC 127.0.0.1:{port}")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_reset_in_flight_is_waited_for() {
    // Someone else powered the machine on a moment ago; the change has not landed yet.
    let emu = Emulator::start(EmuOpts {
        power_delay: Some(2),
        ..EmuOpts::default()
    })
    .await;
    emu.reset(1, "On").await;
    let p = provider(fast());
    let h = Harness::new(machine(&emu.endpoint(1), "", &[]));
    // Our On is accepted (the state is still Off) and confirmed once the BMC shows On.
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    assert_eq!(power_of(&emu, 1).await, "On");
}
