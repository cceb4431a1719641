//! The quirks of real BMCs that the emulator does not have (see
//! shared/tools/REDFISH-FIELD-NOTES.md), against a scripted BMC: opaque ids and trailing
//! slashes, reset types only in an ActionInfo, virtual media under the manager with a
//! vendor action name, messy NIC lists.

use std::collections::HashMap;
use std::time::Duration;

use bm_provider::{ErrorKind, PowerAction, Provider};
use bm_provider_redfish::{PowerConfig, RedfishConfig, RedfishProvider};
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

/// Resets land at once; virtual media actions change the CD resource.
fn behave(method: &str, path: &str, body: &Value, res: &mut HashMap<String, Value>) {
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

fn provider() -> RedfishProvider {
    RedfishProvider::new(RedfishConfig {
        power: PowerConfig {
            poll_interval: Duration::from_millis(50),
            deadline: Duration::from_secs(2),
            ..PowerConfig::default()
        },
        ..RedfishConfig::default()
    })
    .unwrap()
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

#[tokio::test]
async fn a_reset_the_bmc_never_applies_ends_in_a_transient_error() {
    let bmc = ScriptedBmc::start(
        resources(),
        Box::new(|_: &str, _: &str, _: &Value, _: &mut HashMap<String, Value>| {}),
    )
    .await;
    let p = provider();
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
    let p = provider();
    let h = Harness::new(machine(&format!("{}{SYS}", bmc.base()), "", &[]));
    p.insert_virtual_media(h.ctx(), "http://images/deploy.iso")
        .await
        .unwrap();
    let writes: Vec<String> = bmc
        .writes()
        .into_iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    assert_eq!(
        writes,
        [
            "POST /redfish/v1/Managers/BMC/VirtualMedia/CD1/Actions/VM.EjectMedia/".to_owned(),
            format!("POST {INSERT}"),
        ]
    );
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
    let check = p.check_macs(h.ctx()).await.unwrap();
    let macs: Vec<String> = check.on_hardware.iter().map(ToString::to_string).collect();
    assert_eq!(macs, ["aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"]);
    assert!(check.record_matches());
}
