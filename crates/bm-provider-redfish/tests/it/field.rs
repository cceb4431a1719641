//! The quirks of real BMCs that the emulator does not have (from field notes on real
//! hardware), against a scripted BMC: opaque ids and trailing slashes, reset types only in an
//! ActionInfo, virtual media under the manager with a vendor action name, messy NIC lists.

use std::collections::HashMap;
use std::time::Duration;

use bm_provider::{
    ErrorKind, Health, Observation, ObserveContext, PowerAction, PowerState, Provider,
};
use bm_provider_redfish::{BootConfig, BootMethod, PowerConfig, RedfishConfig, RedfishProvider};
use serde_json::{Value, json};

use crate::support::{Harness, ScriptedBmc, machine};

const SYS: &str = "/redfish/v1/Systems/437XR1138R2/";
const CD: &str = "/redfish/v1/Managers/BMC/VirtualMedia/CD1/";
const INSERT: &str = "/redfish/v1/Managers/BMC/VirtualMedia/CD1/Actions/VM.InsertMedia/";

fn resources() -> HashMap<String, Value> {
    let mut r = HashMap::new();
    let mut put = |p: &str, v: Value| r.insert(p.to_owned(), v);
    put(
        "/redfish/v1/",
        json!({"Systems": {"@odata.id": "/redfish/v1/Systems/"}}),
    );
    put(
        "/redfish/v1/Systems/",
        json!({"Members": [{"@odata.id": SYS}]}),
    );
    put(
        SYS,
        json!({
            "@odata.id": SYS,
            "@odata.type": "#ComputerSystem.v1_20_0.ComputerSystem",
            "PowerState": "Off",
            "Boot": {"BootSourceOverrideTarget": "None", "BootSourceOverrideEnabled": "Disabled"},
            "EthernetInterfaces": {"@odata.id": "/redfish/v1/Systems/437XR1138R2/EthernetInterfaces/"},
            "Links": {"ManagedBy": [{"@odata.id": "/redfish/v1/Managers/BMC/"}]},
            "Actions": {"#ComputerSystem.Reset": {
                "target": "/redfish/v1/Systems/437XR1138R2/Actions/ComputerSystem.Reset/",
                "@Redfish.ActionInfo": "/redfish/v1/Systems/437XR1138R2/ResetActionInfo/"
            }}
        }),
    );
    put(
        "/redfish/v1/Systems/437XR1138R2/ResetActionInfo/",
        json!({
            "Parameters": [{"Name": "ResetType", "AllowableValues": ["ForceOn", "ForceOff", "GracefulRestart"]}]
        }),
    );
    put(
        "/redfish/v1/Managers/BMC/",
        json!({
            "VirtualMedia": {"@odata.id": "/redfish/v1/Managers/BMC/VirtualMedia/"}
        }),
    );
    put(
        "/redfish/v1/Managers/BMC/VirtualMedia/",
        json!({"Members": [
            {"@odata.id": "/redfish/v1/Managers/BMC/VirtualMedia/Floppy1/"},
            {"@odata.id": CD}
        ]}),
    );
    put(
        "/redfish/v1/Managers/BMC/VirtualMedia/Floppy1/",
        json!({"MediaTypes": ["Floppy", "USBStick"]}),
    );
    put(
        CD,
        json!({
            "MediaTypes": ["CD", "DVD"], "Image": "http://old/old.iso", "Inserted": true,
            "Actions": {
                "#VirtualMedia.InsertMedia": {"target": INSERT},
                "#VirtualMedia.EjectMedia": {"target": "/redfish/v1/Managers/BMC/VirtualMedia/CD1/Actions/VM.EjectMedia/"}
            }
        }),
    );
    let nics = "/redfish/v1/Systems/437XR1138R2/EthernetInterfaces/";
    put(
        nics,
        json!({"Members": [
            {"@odata.id": format!("{nics}1/")}, {"@odata.id": format!("{nics}1.100/")},
            {"@odata.id": format!("{nics}2/")}, {"@odata.id": format!("{nics}ToManager/")},
            {"@odata.id": format!("{nics}gone/")}
        ]}),
    );
    put(
        &format!("{nics}1/"),
        json!({"MACAddress": "AA:BB:CC:00:00:01", "PermanentMACAddress": "aa:bb:cc:00:00:01"}),
    );
    put(
        &format!("{nics}1.100/"),
        json!({"MACAddress": "aa:bb:cc:00:00:01", "EthernetInterfaceType": "Virtual"}),
    );
    put(
        &format!("{nics}2/"),
        json!({"MACAddress": "Not Available", "PermanentMACAddress": "AA-BB-CC-00-00-02"}),
    );
    put(
        &format!("{nics}ToManager/"),
        json!({"MACAddress": "aa:bb:cc:00:00:99", "EthernetInterfaceType": "Virtual"}),
    );
    r
}

/// Resets land at once; virtual media actions change the CD resource; a boot override is
/// stored.
fn behave(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
    if method == "PATCH"
        && path == SYS
        && let Some(boot) = body.get("Boot").and_then(Value::as_object)
    {
        let stored = &mut res.get_mut(SYS).unwrap()["Boot"];
        for (k, v) in boot {
            stored[k] = v.clone();
        }
    }
    if method == "POST" && path.ends_with("ComputerSystem.Reset/") {
        let to = match body["ResetType"].as_str() {
            Some("ForceOn") => "On",
            Some("ForceOff") => "Off",
            _ => return,
        };
        res.get_mut(SYS).unwrap()["PowerState"] = json!(to);
    }
    if method == "POST" && path.ends_with("VM.InsertMedia/") {
        let cd = res.get_mut(CD).unwrap();
        cd["Image"] = body["Image"].clone();
        cd["Inserted"] = json!(true);
    }
    if method == "POST" && path.ends_with("VM.EjectMedia/") {
        let cd = res.get_mut(CD).unwrap();
        cd["Image"] = json!(null);
        cd["Inserted"] = json!(false);
    }
}

/// Fast polling; a deadline no busy machine reaches with a BMC that applies resets at once.
fn config() -> RedfishConfig {
    RedfishConfig {
        power: PowerConfig {
            poll_interval: Duration::from_millis(50),
            deadline: Duration::from_secs(60),
            ..PowerConfig::default()
        },
        ..crate::support::lab()
    }
}

fn provider() -> RedfishProvider {
    RedfishProvider::new(config()).unwrap()
}

/// Netboot from the deploy ISO as virtual media.
fn virtual_media(config: RedfishConfig) -> RedfishProvider {
    RedfishProvider::new(RedfishConfig {
        boot: BootConfig {
            method: BootMethod::VirtualMedia,
            iso_url: Some("http://images/deploy.iso".into()),
            mode: None,
        },
        ..config
    })
    .unwrap()
}

/// The POSTs and PATCHes the BMC received for its virtual media.
fn media_writes(bmc: &ScriptedBmc) -> Vec<String> {
    bmc.writes()
        .into_iter()
        .filter(|(_, p, _)| p.starts_with("/redfish/v1/Managers/BMC/VirtualMedia/"))
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect()
}

#[tokio::test]
async fn reset_types_from_action_info_and_targets_verbatim() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = provider();
    // The only system, found through the service root.
    let h = Harness::new(machine(&bmc.base(), "", &[]));
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    p.power(h.ctx(), PowerAction::Cycle).await.unwrap();
    let resets: Vec<(String, Value)> = bmc
        .writes()
        .into_iter()
        .map(|(_, path, body)| (path, body["ResetType"].clone()))
        .collect();
    let target = "/redfish/v1/Systems/437XR1138R2/Actions/ComputerSystem.Reset/".to_owned();
    assert_eq!(
        resets,
        [
            (target.clone(), json!("ForceOn")),
            (target.clone(), json!("ForceOff")),
            (target, json!("ForceOn")),
        ]
    );
}

/// Records what the provider tells a request observer.
#[derive(Debug, Default)]
struct Requests(std::sync::Mutex<Vec<(String, String, Option<u16>)>>);

impl bm_provider::RequestObserver for Requests {
    fn request(&self, provider: &str, host: &str, _took: Duration, status: Option<u16>) {
        crate::support::lock(&self.0).push((provider.to_owned(), host.to_owned(), status));
    }
}

#[tokio::test]
async fn every_request_to_a_bmc_is_told_to_the_observer_with_its_host_and_status() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let requests = std::sync::Arc::new(Requests::default());
    let p = provider().with_request_observer(requests.clone());
    let h = Harness::new(machine(&bmc.base(), "", &[]));
    p.power(h.ctx(), PowerAction::On).await.unwrap();
    // A refused write: the observer hears its status too.
    bmc.refuse_on("PATCH", SYS, 400);
    let _ = p.set_netboot(h.ctx()).await;
    let seen = crate::support::lock(&requests.0).clone();
    let host = bmc
        .base()
        .trim_start_matches("redfish+")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    assert!(!seen.is_empty());
    for (provider, h, _) in &seen {
        assert_eq!(
            (provider.as_str(), h.as_str()),
            ("redfish", host.as_str()),
            "{seen:?}"
        );
    }
    let statuses: Vec<Option<u16>> = seen.iter().map(|(.., s)| *s).collect();
    // The service root, the systems, the system, the reset, the reads back of its state.
    assert!(
        statuses.iter().filter(|s| **s == Some(200)).count() >= 3,
        "{statuses:?}"
    );
    assert!(statuses.contains(&Some(400)), "{statuses:?}");
}

#[tokio::test]
async fn a_reset_the_bmc_never_applies_ends_in_a_transient_error() {
    let bmc = ScriptedBmc::start(
        resources(),
        Box::new(|_: &str, _: &str, _: &Value, _: &mut HashMap<String, Value>| {}),
    )
    .await;
    let mut config = config();
    config.power.deadline = Duration::from_secs(2);
    let p = RedfishProvider::new(config).unwrap();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = p.power(h.ctx(), PowerAction::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(
        e.to_string()
            .contains("did not reach PowerState On within 2s"),
        "{e}"
    );
}

#[tokio::test]
async fn virtual_media_under_the_manager_with_vendor_actions() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = virtual_media(config());
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(
        media_writes(&bmc),
        [
            "POST /redfish/v1/Managers/BMC/VirtualMedia/CD1/Actions/VM.EjectMedia/".to_owned(),
            format!("POST {INSERT}"),
        ]
    );
    assert_eq!(bmc.resource(CD)["Image"], "http://images/deploy.iso");
    assert_eq!(bmc.resource(SYS)["Boot"]["BootSourceOverrideTarget"], "Cd");
}

/// A PATCH of the CD device sets its image; the rest as [`behave`].
fn patch_media(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
    if method == "PATCH" && path == CD {
        let cd = res.get_mut(CD).unwrap();
        cd["Image"] = body["Image"].clone();
        cd["Inserted"] = body["Inserted"].clone();
    } else {
        behave(method, path, body, res);
    }
}

#[tokio::test]
async fn a_virtual_media_insert_by_patch_gets_the_insert_timeout() {
    // An empty CD without actions: the insert is a PATCH of the device, which this BMC
    // answers only once it has the image, after more than the request timeout.
    let mut res = resources();
    res.insert(
        CD.to_owned(),
        json!({"MediaTypes": ["CD", "DVD"], "Image": null, "Inserted": false}),
    );
    // The other requests get 3 s, far more than a request over loopback needs even on a busy
    // machine; the insert takes 4 s and gets its own 60 s.
    let bmc = ScriptedBmc::start_slow(res, Box::new(patch_media), CD, Duration::from_secs(4)).await;
    let p = virtual_media(RedfishConfig {
        request_timeout: Duration::from_secs(3),
        insert_media_timeout: Duration::from_secs(60),
        ..crate::support::lab()
    });
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(media_writes(&bmc), [format!("PATCH {CD}")]);
    assert_eq!(bmc.resource(CD)["Image"], "http://images/deploy.iso");
}

#[tokio::test]
async fn messy_nic_lists_are_normalised() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = provider();
    let h = Harness::new(machine(
        &format!("{}{SYS}", bmc.base()),
        "",
        &["aa:bb:cc:00:00:02"],
    ));
    // A PXE boot compares the record with the NICs first.
    p.set_netboot(h.ctx()).await.unwrap();
    assert!(
        h.logged("NICs: aa:bb:cc:00:00:01, aa:bb:cc:00:00:02 (the record matches)"),
        "{:#?}",
        h.lines()
    );
}

/// A BMC that counts how many requests it has in flight at once. It holds every request
/// until two were in flight together (so a limit of 2 is reached whatever the machine's
/// speed), then answers each after `delay`, which gives a third request the time to arrive
/// if the limit let it through.
async fn slow_counting_bmc(
    delay: Duration,
) -> (
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let max2 = max.clone();
    // Becomes true once two requests were in flight together.
    let (two_tx, two_rx) = tokio::sync::watch::channel(false);
    let two_tx = Arc::new(two_tx);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (in_flight, max) = (in_flight.clone(), max2.clone());
            let (two_tx, mut two_rx) = (two_tx.clone(), two_rx.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                // One request per connection; its head fits the buffer.
                let Ok(n) = sock.read(&mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(now, Ordering::SeqCst);
                if now >= 2 {
                    two_tx.send_replace(true);
                }
                // A limit of 1 would never let a second one in: give up after a while, and
                // the count says so.
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), two_rx.wait_for(|t| *t)).await;
                tokio::time::sleep(delay).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let body = json!({"@odata.id": path, "Id": "1", "PowerState": "On"}).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, max, task)
}

/// BMCs are small computers: requests to one are limited to `max_concurrent_requests`, however
/// many machines it serves and however many operations run.
#[tokio::test]
async fn requests_to_one_bmc_are_limited() {
    let (port, max, task) = slow_counting_bmc(Duration::from_millis(150)).await;
    let p = std::sync::Arc::new(
        RedfishProvider::new(RedfishConfig {
            max_concurrent_requests: 2,
            ..crate::support::lab()
        })
        .unwrap(),
    );
    let calls: Vec<_> = (1..=6)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                let h = Harness::new(machine(
                    &format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/{i}"),
                    "",
                    &[],
                ));
                p.power_state(h.ctx()).await
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap(), bm_provider::PowerState::On);
    }
    task.abort();
    let seen = max.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        seen, 2,
        "at most 2 requests in flight to the BMC at once, and the limit was reached"
    );
}

/// Dell and HPE report `On` through a warm reset: the restart is proven by the BMC's
/// `LastResetTime`, and a reset that changes nothing is not a reboot.
#[tokio::test]
async fn a_warm_reset_is_proven_by_last_reset_time() {
    fn warm(reboots: bool) -> Box<crate::support::OnWrite> {
        Box::new(move |method, path, body, res| {
            if method == "POST"
                && path.ends_with("ComputerSystem.Reset/")
                && body["ResetType"] == "GracefulRestart"
                && reboots
            {
                res.get_mut(SYS).unwrap()["LastResetTime"] = json!("2026-12-01T06:00:00Z");
            }
        })
    }
    let mut res = resources();
    res.get_mut(SYS).unwrap()["PowerState"] = json!("On");
    res.get_mut(SYS).unwrap()["LastResetTime"] = json!("2026-11-30T22:00:00Z");
    let mut config = config();
    config.power.cycle = bm_provider_redfish::CycleMethod::Restart;
    config.power.reissue_after = Duration::from_millis(200);
    config.power.deadline = Duration::from_secs(2);
    let bmc = ScriptedBmc::start(res.clone(), warm(true)).await;
    let p = RedfishProvider::new(config.clone()).unwrap();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.power(h.ctx(), PowerAction::Cycle).await.unwrap();
    assert!(
        h.logged("reboot confirmed after GracefulRestart: the BMC's reset record changed"),
        "{:#?}",
        h.lines()
    );
    // The BMC accepts the reset and does nothing.
    let bmc = ScriptedBmc::start(res.clone(), warm(false)).await;
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = p.power(h.ctx(), PowerAction::Cycle).await.unwrap_err();
    assert!(e.to_string().starts_with("reboot unverified"), "{e}");
    assert!(h.logged("reboot unverified"), "{:#?}", h.lines());
    // No reset record, no SSH: nothing can prove it.
    res.get_mut(SYS)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("LastResetTime");
    let bmc = ScriptedBmc::start(res, warm(true)).await;
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = p.power(h.ctx(), PowerAction::Cycle).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
}

/// Issue 13: disarming after a failed reimage reads back Disabled and ejects the deploy ISO.
#[tokio::test]
async fn disarm_disables_the_override_and_ejects_the_iso() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = virtual_media(config());
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(
        bmc.resource(SYS)["Boot"]["BootSourceOverrideEnabled"],
        "Once"
    );
    p.disarm_netboot(h.ctx()).await.unwrap();
    assert_eq!(
        bmc.resource(SYS)["Boot"]["BootSourceOverrideEnabled"],
        "Disabled"
    );
    assert_eq!(bmc.resource(CD)["Inserted"], false);
    // Again: nothing armed, nothing written.
    let writes = bmc.writes().len();
    p.disarm_netboot(h.ctx()).await.unwrap();
    assert_eq!(bmc.writes().len(), writes);
    assert!(
        h.logged("boot override is already disabled"),
        "{:#?}",
        h.lines()
    );
}

/// Issue 14: a BMC without a "disabled" boot override. sushy-tools' libvirt driver answers
/// 400 to a Boot PATCH without a target and turns every override into Continuous; others
/// accept Disabled and keep the override. Disarming points the override at the disk instead,
/// and says so; an override already at the disk is left alone.
#[tokio::test]
async fn disarm_points_the_override_at_the_disk_when_the_bmc_cannot_disable_it() {
    // Like sushy-tools: overrides are always Continuous, Disabled is ignored.
    let continuous = |method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>| {
        if method == "PATCH"
            && path == SYS
            && let Some(target) = body["Boot"].get("BootSourceOverrideTarget")
        {
            let stored = &mut res.get_mut(SYS).unwrap()["Boot"];
            stored["BootSourceOverrideTarget"] = target.clone();
            stored["BootSourceOverrideEnabled"] = json!("Continuous");
        }
    };
    for refuses in [true, false] {
        let bmc = ScriptedBmc::start(resources(), Box::new(continuous)).await;
        let p = provider();
        let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
        p.set_netboot(h.ctx()).await.unwrap();
        assert_eq!(bmc.resource(SYS)["Boot"]["BootSourceOverrideTarget"], "Pxe");
        if refuses {
            bmc.refuse_on("PATCH", SYS, 400);
        }
        p.disarm_netboot(h.ctx()).await.unwrap();
        let boot = &bmc.resource(SYS)["Boot"];
        assert_eq!(boot["BootSourceOverrideTarget"], "Hdd", "refuses={refuses}");
        assert!(
            h.logged("pointing it at the disk (Hdd) instead"),
            "{:#?}",
            h.lines()
        );
        let hdd = bmc
            .writes()
            .into_iter()
            .rfind(|(m, path, _)| m == "PATCH" && path == SYS)
            .unwrap()
            .2;
        assert_eq!(
            hdd,
            json!({"Boot": {"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Once"}})
        );
        let writes = bmc.writes().len();
        p.disarm_netboot(h.ctx()).await.unwrap();
        assert_eq!(bmc.writes().len(), writes, "disarmed twice");
    }
    // A refusal that is not about the request's form (here: a missing privilege) is an
    // error, not a reason to point the override elsewhere.
    let bmc = ScriptedBmc::start(resources(), Box::new(continuous)).await;
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    bmc.refuse_on("PATCH", SYS, 403);
    let e = p.disarm_netboot(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert_eq!(bmc.resource(SYS)["Boot"]["BootSourceOverrideTarget"], "Pxe");
}

/// Issue 13: a BMC that is rebooting itself answers 503 with `Retry-After`: unavailable
/// (retried for minutes by the engine), after the wait it asked for; 405 fails at once.
#[tokio::test]
async fn a_busy_bmc_is_unavailable_and_says_when_to_retry() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    bmc.answer_next(503, "Retry-After: 120\r\n");
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
    assert!(e.to_string().contains("unavailable for now"), "{e}");
    // It is back.
    p.power_state(h.ctx()).await.unwrap();
    bmc.answer_next(405, "");
    let e = p.power(h.ctx(), PowerAction::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
}

/// A task monitor at `task` (created by the scripted write as `{"TaskState": "Running",
/// "polls": 0}`) that completes at its second read, when `apply` carries the request out.
fn task_completes_on_second_read(
    task: &'static str,
    apply: fn(&mut HashMap<String, Value>),
) -> Box<crate::support::OnGet> {
    Box::new(move |path, res| {
        if path != task {
            return;
        }
        let polls = res[task]["polls"].as_u64().unwrap() + 1;
        res.get_mut(task).unwrap()["polls"] = json!(polls);
        if polls >= 2 {
            res.get_mut(task).unwrap()["TaskState"] = json!("Completed");
            apply(res);
        }
    })
}

/// Issue 13: a BMC that mounts asynchronously answers the insert with 202 and a task
/// monitor, and shows the image only once the task completed: followed and polled.
#[tokio::test]
async fn an_asynchronous_mount_is_followed_to_its_end() {
    const TASK: &str = "/redfish/v1/TaskService/Tasks/7/";
    // The insert starts a mount that ends after the task was read twice.
    fn mounting(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
        if method == "POST" && path == INSERT {
            let cd = res.get_mut(CD).unwrap();
            cd["Image"] = json!("None");
            cd["Inserted"] = json!(false);
            res.insert("pending".into(), body["Image"].clone());
            res.insert(TASK.into(), json!({"TaskState": "Running", "polls": 0}));
        } else {
            behave(method, path, body, res);
        }
    }
    let bmc = ScriptedBmc::start(resources(), Box::new(mounting)).await;
    bmc.on_get(task_completes_on_second_read(TASK, |res| {
        let image = res["pending"].clone();
        let cd = res.get_mut(CD).unwrap();
        cd["Image"] = image;
        cd["Inserted"] = json!(true);
    }));
    bmc.answer_on("POST", INSERT, 202, &format!("Location: {TASK}\r\n"));
    let p = virtual_media(config());
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert!(
        h.logged(&format!("following task {TASK}")),
        "{:#?}",
        h.lines()
    );
    assert_eq!(bmc.resource(TASK)["polls"], 2);
    assert_eq!(bmc.resource(CD)["Image"], "http://images/deploy.iso");
}

/// A BMC that applies a boot override asynchronously (202 and a task monitor; the override
/// shows once the task completed): setting and disarming it follow the task before they
/// read it back, rather than failing on the old value.
#[tokio::test]
async fn an_asynchronous_boot_override_is_followed_to_its_end() {
    const TASK: &str = "/redfish/v1/TaskService/Tasks/9/";
    // A PATCH of the override is stored as pending; the task applies it on its second read.
    fn later(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
        if method == "PATCH" && path == SYS {
            res.insert("pending".into(), body["Boot"].clone());
            res.insert(TASK.into(), json!({"TaskState": "Running", "polls": 0}));
        } else {
            behave(method, path, body, res);
        }
    }
    let bmc = ScriptedBmc::start(resources(), Box::new(later)).await;
    bmc.on_get(task_completes_on_second_read(TASK, |res| {
        let pending = res["pending"].as_object().cloned().unwrap_or_default();
        let boot = &mut res.get_mut(SYS).unwrap()["Boot"];
        for (k, v) in pending {
            boot[k] = v;
        }
    }));
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    for (what, enabled) in [("set", "Once"), ("disarm", "Disabled")] {
        bmc.answer_on("PATCH", SYS, 202, &format!("Location: {TASK}\r\n"));
        if what == "set" {
            p.set_netboot(h.ctx()).await.unwrap();
        } else {
            p.disarm_netboot(h.ctx()).await.unwrap();
        }
        assert_eq!(bmc.resource(TASK)["polls"], 2, "{what}");
        assert_eq!(
            bmc.resource(SYS)["Boot"]["BootSourceOverrideEnabled"],
            enabled,
            "{what}"
        );
    }
    assert!(
        h.logged(&format!("following task {TASK}")),
        "{:#?}",
        h.lines()
    );
}

/// Issue 13: media that never shows up: the error says how the device was last seen.
#[tokio::test]
async fn a_mount_that_never_shows_says_what_was_seen() {
    fn never(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
        if method == "POST" && path == INSERT {
            return;
        }
        behave(method, path, body, res);
    }
    let bmc = ScriptedBmc::start(resources(), Box::new(never)).await;
    let p = virtual_media(RedfishConfig {
        insert_media_timeout: Duration::from_secs(1),
        ..config()
    });
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = p.set_netboot(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(
        e.to_string()
            .contains("did not show Image http://images/deploy.iso in time; last seen: Image none, Inserted false"),
        "{e}"
    );
}

/// Issue 13: AMI shapes: a CD device without `MediaTypes` is found by its id, and
/// `Image: "None"` is an empty drive (nothing to eject).
#[tokio::test]
async fn ami_virtual_media_without_media_types() {
    let mut res = resources();
    res.insert(
        CD.to_owned(),
        json!({
            "Id": "CD1", "Name": "Virtual CD", "Image": "None", "Inserted": false,
            "Actions": {
                "#VirtualMedia.InsertMedia": {"target": INSERT},
                "#VirtualMedia.EjectMedia": {"target": "/redfish/v1/Managers/BMC/VirtualMedia/CD1/Actions/VM.EjectMedia/"}
            }
        }),
    );
    res.insert(
        "/redfish/v1/Managers/BMC/VirtualMedia/Floppy1/".into(),
        json!({"Id": "Floppy1", "Name": "Virtual Floppy"}),
    );
    let bmc = ScriptedBmc::start(res, Box::new(behave)).await;
    let p = virtual_media(config());
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(media_writes(&bmc), [format!("POST {INSERT}")]);
    assert_eq!(bmc.resource(CD)["Image"], "http://images/deploy.iso");
}

/// Issue 13 item 7: Dell names both its system and its chassis `System.Embedded.1`: a
/// Chassis path (which carries PowerState too) is refused at discovery, saying so.
#[tokio::test]
async fn a_chassis_path_is_not_taken_for_the_system() {
    const CHASSIS: &str = "/redfish/v1/Chassis/System.Embedded.1";
    let mut res = resources();
    res.insert(
        CHASSIS.into(),
        json!({"@odata.type": "#Chassis.v1_14_0.Chassis", "PowerState": "On"}),
    );
    let bmc = ScriptedBmc::start(res, Box::new(behave)).await;
    let p = provider();
    let h = Harness::new(machine(&format!("{}{CHASSIS}", bmc.base()), "", &[]));
    let e = p.power(h.ctx(), PowerAction::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(
        e.to_string()
            .contains("is a Chassis, not a ComputerSystem: give the path of the system under /redfish/v1/Systems"),
        "{e}"
    );
}

/// Issue 13 item 9: a system that omits PowerState while it boots is unavailable for now
/// (the engine retries it for minutes), not a permanent failure.
#[tokio::test]
async fn a_missing_power_state_is_unavailable_for_now() {
    let mut res = resources();
    res.get_mut(SYS).unwrap()["PowerState"] = Value::Null;
    let bmc = ScriptedBmc::start(res, Box::new(behave)).await;
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = p.power(h.ctx(), PowerAction::On).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(bmc.writes().is_empty());
}

/// A TCP server that writes `banner` to every connection and closes it.
async fn banner_server(banner: &'static [u8]) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = sock.write_all(banner).await;
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, task)
}

/// Issue 13 item 8: https to a plain-HTTP port and a port that does not speak HTTP are
/// permanent errors that name the likely cause.
#[tokio::test]
async fn wrong_ports_say_what_to_fix() {
    let p = provider();
    let (port, plain) = banner_server(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    let h = Harness::new(machine(
        &format!("redfish+https://127.0.0.1:{port}/redfish/v1/Systems/1"),
        "",
        &[],
    ));
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("does not speak TLS on port"), "{e}");
    plain.abort();
    let (port, ssh) = banner_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
    let h = Harness::new(machine(
        &format!("redfish+http://127.0.0.1:{port}/redfish/v1/Systems/1"),
        "",
        &[],
    ));
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("does not answer HTTP"), "{e}");
    ssh.abort();
}

/// Issue 13 item 8: `?uuid=` on systems without a UUID lists them by path.
#[tokio::test]
async fn uuid_selection_names_systems_without_uuid() {
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let p = provider();
    let h = Harness::new(machine(&format!("{}/?uuid=1234", bmc.base()), "", &[]));
    let e = p.power_state(h.ctx()).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("its systems have {SYS} (no UUID)")),
        "{e}"
    );
}

/// Issue 13 item 5: the configured boot mode is set with the override (AMI and Intel stay
/// Legacy otherwise), a machine's label overrides it, and a BMC that cannot set it is refused.
#[tokio::test]
async fn the_boot_mode_is_set_or_refused() {
    let uefi = RedfishProvider::new(RedfishConfig {
        boot: BootConfig {
            mode: Some(bm_provider_redfish::BootMode::Uefi),
            ..BootConfig::default()
        },
        ..config()
    })
    .unwrap();
    let mut res = resources();
    res.get_mut(SYS).unwrap()["Boot"]["BootSourceOverrideMode"] = json!("Legacy");
    res.get_mut(SYS).unwrap()["Boot"]["BootSourceOverrideMode@Redfish.AllowableValues"] =
        json!(["Legacy", "UEFI"]);
    let bmc = ScriptedBmc::start(res.clone(), Box::new(behave)).await;
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    uefi.set_netboot(h.ctx()).await.unwrap();
    let boot = &bmc.resource(SYS)["Boot"];
    assert_eq!(
        (
            &boot["BootSourceOverrideTarget"],
            &boot["BootSourceOverrideMode"]
        ),
        (&json!("Pxe"), &json!("UEFI"))
    );
    // The machine's label chooses Legacy.
    let bmc = ScriptedBmc::start(res, Box::new(behave)).await;
    let mut m = machine(&format!("{}{SYS}", bmc.base()), "", &[]);
    m.labels =
        bm_domain::Labels::from_pairs([(bm_provider_redfish::LABEL_BOOT_MODE, "legacy")]).unwrap();
    let h = Harness::new(m);
    uefi.set_netboot(h.ctx()).await.unwrap();
    assert_eq!(
        bmc.resource(SYS)["Boot"]["BootSourceOverrideMode"],
        "Legacy"
    );
    // A BMC without BootSourceOverrideMode cannot set it: refused, nothing written.
    let bmc = ScriptedBmc::start(resources(), Box::new(behave)).await;
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let e = uefi.set_netboot(h.ctx()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Permanent, "{e}");
    assert!(e.to_string().contains("cannot set the boot mode"), "{e}");
    assert!(bmc.writes().is_empty());
}

/// Issue 13, power and health sync: the status poll gets the power state and the health from
/// one GET of the system once its path is known; `HealthRollup` (the system with its
/// components) counts before `Health`; transitional or missing values are no reading.
#[tokio::test]
async fn the_status_poll_reads_power_and_health_in_one_get() {
    let mut r = resources();
    let sys = r.get_mut(SYS).unwrap();
    sys["PowerState"] = json!("On");
    sys["Status"] = json!({"State": "Enabled", "Health": "OK", "HealthRollup": "Warning"});
    let bmc = ScriptedBmc::start(r, Box::new(behave)).await;
    let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = gets.clone();
    bmc.on_get(Box::new(move |_, _| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    let ctx = ObserveContext {
        machine: &h.machine,
        cancel: &h.cancel,
    };
    let first = p.observe(ctx).await.unwrap();
    assert_eq!(
        first,
        Some(Observation::Answered {
            power: Some(PowerState::On),
            health: Some(Health::Warning),
            detail: "Health OK, HealthRollup Warning".into(),
        })
    );
    let before = gets.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(p.observe(ctx).await.unwrap(), first);
    assert_eq!(
        gets.load(std::sync::atomic::Ordering::SeqCst) - before,
        1,
        "one GET once the system's path is known"
    );
    bmc.on_get(Box::new(|path, res| {
        if path == SYS {
            let sys = res.get_mut(SYS).unwrap();
            sys["PowerState"] = json!("PoweringOn");
            sys["Status"] = json!({"State": "Starting", "Health": null});
        }
    }));
    let second = p.observe(ctx).await.unwrap();
    assert_eq!(
        second,
        Some(Observation::Answered {
            power: None,
            health: None,
            detail: "State Starting".into(),
        })
    );
    assert!(
        bmc.writes().is_empty(),
        "the poll only reads: {:?}",
        bmc.writes()
    );
}

/// Issue 13: a BMC that does not answer the poll is an error the poll records as not
/// Reachable, after one attempt.
#[tokio::test]
async fn the_status_poll_reports_a_bmc_that_does_not_answer() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = provider();
    let h = Harness::new(machine(
        &format!("redfish+http://127.0.0.1:{port}{SYS}"),
        "",
        &[],
    ));
    let ctx = ObserveContext {
        machine: &h.machine,
        cancel: &h.cancel,
    };
    let e = p.observe(ctx).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
}
