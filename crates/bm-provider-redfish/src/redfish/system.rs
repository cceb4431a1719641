//! What the provider does on a BMC: find the machine's ComputerSystem, power it, set a
//! one-time boot override, insert and eject virtual media, list its MAC addresses.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bm_domain::{MacAddress, MachineId};
use bm_provider::{BootWitness, Health, LogSink, Observation, ProviderError};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::power::{Allowed, Evidence, PowerOps, Reading};
use super::{Bmc, Resource, nic};
use crate::config::BootMode;
use crate::endpoint::SystemSelector;

/// The log tag of BMC actions.
pub(crate) const TAG: &str = "bmc";

/// The most pages of a collection that are followed.
const MAX_PAGES: usize = 32;

/// The `@odata.id`s of a collection's members, following `Members@odata.nextLink`.
pub(crate) async fn members(
    bmc: &Bmc,
    cancel: &CancellationToken,
    path: &str,
) -> Result<Vec<String>, ProviderError> {
    let mut out = Vec::new();
    let mut next = Some(path.to_owned());
    for _ in 0..MAX_PAGES {
        let Some(page) = next.take() else { break };
        let res = bmc.get(cancel, &page).await?;
        out.extend(
            res.body
                .get("Members")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("@odata.id").and_then(Value::as_str))
                .map(str::to_owned),
        );
        next = res.str("Members@odata.nextLink").map(str::to_owned);
    }
    Ok(out)
}

/// The `@odata.id` of the Systems collection, from the service root.
async fn systems_collection(
    bmc: &Bmc,
    cancel: &CancellationToken,
) -> Result<String, ProviderError> {
    let root = bmc.get(cancel, "/redfish/v1/").await?;
    Ok(root
        .link("Systems")
        .unwrap_or("/redfish/v1/Systems")
        .to_owned())
}

/// Finds the machine's ComputerSystem and returns it (its `path` is the one to use from then
/// on).
pub(crate) async fn find_system(
    bmc: &Bmc,
    cancel: &CancellationToken,
    selector: &SystemSelector,
) -> Result<Resource, ProviderError> {
    match selector {
        SystemSelector::Path(path) => {
            if let Some(res) = bmc.get_opt(cancel, path).await? {
                return check_is_system(bmc, res);
            }
            // The path may differ from the BMC's own only by a trailing slash.
            let collection = systems_collection(bmc, cancel).await?;
            let all = members(bmc, cancel, &collection).await?;
            let want = path.trim_end_matches('/');
            if let Some(found) = all.iter().find(|m| m.trim_end_matches('/') == want) {
                return check_is_system(bmc, bmc.get(cancel, found).await?);
            }
            Err(ProviderError::permanent(format!(
                "wrong system path: BMC {} has no system {path}; its systems are {}",
                bmc.name(),
                list(&all)
            )))
        }
        SystemSelector::Uuid(uuid) => {
            let collection = systems_collection(bmc, cancel).await?;
            let mut seen = Vec::new();
            for m in members(bmc, cancel, &collection).await? {
                let res = bmc.get(cancel, &m).await?;
                let their = res.str("UUID").unwrap_or_default().trim().to_owned();
                if !their.is_empty() && their.eq_ignore_ascii_case(uuid) {
                    return check_is_system(bmc, res);
                }
                seen.push(if their.is_empty() {
                    format!("{m} (no UUID)")
                } else {
                    format!("{m} ({their})")
                });
            }
            Err(ProviderError::permanent(format!(
                "BMC {} has no system with UUID {uuid}; its systems have {}",
                bmc.name(),
                list(&seen)
            )))
        }
        SystemSelector::Only => {
            let collection = systems_collection(bmc, cancel).await?;
            let all = members(bmc, cancel, &collection).await?;
            match all.as_slice() {
                [one] => check_is_system(bmc, bmc.get(cancel, one).await?),
                [] => Err(ProviderError::permanent(format!(
                    "BMC {} lists no systems",
                    bmc.name()
                ))),
                many => Err(ProviderError::permanent(format!(
                    "BMC {} has {} systems ({}): name one in the BMC endpoint, by path (redfish+{}://{}{}) or by UUID (?uuid=...)",
                    bmc.name(),
                    many.len(),
                    list(many),
                    bmc.scheme(),
                    bmc.name(),
                    many[0]
                ))),
            }
        }
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// Checks the resource is a ComputerSystem: its `@odata.type` says so, or (without one)
/// it has a `PowerState` and is not under Managers or Chassis, which carry `PowerState`
/// too (Dell names both its system and its chassis `System.Embedded.1`).
fn check_is_system(bmc: &Bmc, res: Resource) -> Result<Resource, ProviderError> {
    let kind = res.str("@odata.type").map(|t| {
        t.trim_start_matches('#')
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned()
    });
    let is_system = match kind.as_deref() {
        Some(k) => k == "ComputerSystem",
        None => {
            res.body.get("PowerState").is_some()
                && !res.path.contains("/Managers/")
                && !res.path.contains("/Chassis/")
        }
    };
    if is_system {
        return Ok(res);
    }
    let what = kind.unwrap_or_else(|| "some other resource".to_owned());
    Err(ProviderError::permanent(format!(
        "wrong system path: {} on BMC {} is a {what}, not a ComputerSystem: give the path of the system under /redfish/v1/Systems in the BMC endpoint",
        res.path,
        bmc.name()
    )))
}

/// The reset action of a system: its target and the allowed `ResetType`s (inline, or from
/// its `@Redfish.ActionInfo`).
pub(crate) async fn reset_action(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    system: &Resource,
) -> Result<(String, Allowed), ProviderError> {
    let action = system
        .body
        .get("Actions")
        .and_then(|a| a.get("#ComputerSystem.Reset"))
        .ok_or_else(|| {
            ProviderError::permanent(format!(
                "BMC {} advertises no ComputerSystem.Reset action for {}",
                bmc.name(),
                system.path
            ))
        })?;
    let target = action
        .get("target")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ProviderError::permanent(format!(
                "BMC {}: the ComputerSystem.Reset action of {} has no target",
                bmc.name(),
                system.path
            ))
        })?
        .to_owned();
    if let Some(values) = action.get("ResetType@Redfish.AllowableValues") {
        return Ok((target, Allowed(Some(strings(values)))));
    }
    if let Some(info) = action.get("@Redfish.ActionInfo").and_then(Value::as_str) {
        match bmc.get(cancel, info).await {
            Ok(res) => {
                let values = res
                    .body
                    .get("Parameters")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|p| p.get("Name").and_then(Value::as_str) == Some("ResetType"))
                    .and_then(|p| p.get("AllowableValues"));
                return Ok((target, Allowed(values.map(strings))));
            }
            Err(e) if e.kind() == bm_provider::ErrorKind::Canceled => return Err(e),
            Err(e) => log.line(
                TAG,
                format!("cannot read the reset ActionInfo ({e}); trying the standard reset types"),
            ),
        }
    }
    Ok((target, Allowed(None)))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// Reads the machine's boot id over SSH: `None` when it cannot (no SSH, not up).
pub(crate) type BootIdReader<'a> =
    dyn Fn() -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> + Send + Sync + 'a;

/// [`PowerOps`] on one system of a BMC.
pub(crate) struct SystemPower<'a> {
    pub(crate) bmc: &'a Bmc,
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) log: &'a LogSink,
    pub(crate) system_path: &'a str,
    pub(crate) reset_target: &'a str,
    /// Reads the boot id over SSH, if the machine can be reached that way.
    pub(crate) boot_id: Option<&'a BootIdReader<'a>>,
    /// Learns of the deploy environment's check-in, with the machine it is for.
    pub(crate) witness: Option<(&'a dyn BootWitness, &'a MachineId)>,
}

/// The BMC's record of the last reset and boot: `LastResetTime` and `BootProgress`
/// (`LastState`, `LastStateTime`, `OemLastState`), as one string; `None` when it keeps none.
pub(crate) fn reset_marker(system: &Value) -> Option<String> {
    let progress = system.get("BootProgress");
    let parts: Vec<String> = [
        system.get("LastResetTime"),
        progress.and_then(|p| p.get("LastStateTime")),
        progress.and_then(|p| p.get("LastState")),
        progress.and_then(|p| p.get("OemLastState")),
    ]
    .into_iter()
    .map(|v| v.and_then(Value::as_str).unwrap_or_default().to_owned())
    .collect();
    if parts.iter().all(String::is_empty) {
        None
    } else {
        Some(parts.join(" "))
    }
}

impl PowerOps for SystemPower<'_> {
    async fn read(&self) -> Result<Reading, ProviderError> {
        let res = self.bmc.get(self.cancel, self.system_path).await?;
        Ok(Reading::parse(res.str("PowerState")))
    }

    async fn reset(&self, reset_type: &str) -> Result<(), ProviderError> {
        self.bmc
            .write(
                self.cancel,
                Method::POST,
                self.reset_target,
                &json!({ "ResetType": reset_type }),
                None,
                None,
            )
            .await
            .map(drop)
    }

    fn log(&self, line: &str) {
        self.log.line(TAG, line);
    }

    fn bmc(&self) -> &str {
        self.bmc.name()
    }

    async fn evidence(
        &self,
        since: Option<SystemTime>,
        boot_id: bool,
    ) -> Result<Evidence, ProviderError> {
        let res = self.bmc.get(self.cancel, self.system_path).await?;
        let bmc = reset_marker(&res.body);
        let boot_id = match self.boot_id {
            Some(read) if boot_id && bmc.is_none() => read().await,
            _ => None,
        };
        let checked_in = match (since, self.witness) {
            (Some(since), Some((w, machine))) => w.checked_in_since(machine, since).await,
            _ => false,
        };
        Ok(Evidence {
            bmc,
            boot_id,
            checked_in,
        })
    }

    fn awaits_check_in(&self) -> bool {
        self.witness.is_some()
    }
}

/// Makes the next boot (only the next) boot from `target` (`Pxe` or `Cd`), in the firmware
/// boot `mode` if one is asked, and checks the BMC took it. A mode the BMC cannot set is a
/// permanent error.
pub(crate) async fn boot_once(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    system: &Resource,
    target: &str,
    mode: Option<BootMode>,
) -> Result<(), ProviderError> {
    let boot = system.body.get("Boot").ok_or_else(|| {
        ProviderError::permanent(format!(
            "BMC {} offers no boot override for {} (no Boot property)",
            bmc.name(),
            system.path
        ))
    })?;
    if let Some(values) = boot.get("BootSourceOverrideTarget@Redfish.AllowableValues") {
        let values = strings(values);
        if !values.iter().any(|v| v == target) {
            return Err(ProviderError::permanent(format!(
                "BMC {} does not offer a {target} boot override for {} (it offers {})",
                bmc.name(),
                system.path,
                list(&values)
            )));
        }
    }
    let mode = mode.map(BootMode::redfish_value);
    if let Some(mode) = mode {
        if boot.get("BootSourceOverrideMode").is_none() {
            return Err(ProviderError::permanent(format!(
                "BMC {} cannot set the boot mode of {} (it reports no BootSourceOverrideMode): set {mode} in the machine's firmware setup and unset boot.mode (or its boot-mode label)",
                bmc.name(),
                system.path
            )));
        }
        if let Some(values) = boot.get("BootSourceOverrideMode@Redfish.AllowableValues") {
            let values = strings(values);
            if !values.iter().any(|v| v == mode) {
                return Err(ProviderError::permanent(format!(
                    "BMC {} does not offer boot mode {mode} for {} (it offers {})",
                    bmc.name(),
                    system.path,
                    list(&values)
                )));
            }
        }
    }
    if boot_setting(boot, "BootSourceOverrideTarget") == Some(target)
        && boot_setting(boot, "BootSourceOverrideEnabled") == Some("Once")
        && mode.is_none_or(|m| boot_setting(boot, "BootSourceOverrideMode") == Some(m))
    {
        log.line(TAG, format!("boot override is already {target} (once)"));
        return Ok(());
    }
    let mut patch =
        json!({"BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": "Once"});
    if let Some(mode) = mode {
        patch["BootSourceOverrideMode"] = json!(mode);
        log.line(TAG, format!("boot override: {target}, once, {mode}"));
    } else {
        log.line(TAG, format!("boot override: {target}, once"));
    }
    patch_boot(bmc, cancel, log, system, patch).await??;
    let after = bmc.get(cancel, &system.path).await?;
    let boot = after.body.get("Boot").cloned().unwrap_or_default();
    if let Some(mode) = mode {
        let got = boot_setting(&boot, "BootSourceOverrideMode");
        if got != Some(mode) {
            return Err(ProviderError::permanent(format!(
                "BMC {} accepted boot mode {mode} but reports BootSourceOverrideMode {}: it cannot switch it; set {mode} in the machine's firmware setup",
                bmc.name(),
                got.unwrap_or("missing")
            )));
        }
    }
    let got_target = boot_setting(&boot, "BootSourceOverrideTarget");
    if got_target != Some(target) {
        return Err(ProviderError::transient(format!(
            "BMC {} accepted the boot override but reports BootSourceOverrideTarget {}",
            bmc.name(),
            got_target.unwrap_or("missing")
        )));
    }
    match boot_setting(&boot, "BootSourceOverrideEnabled") {
        Some("Once") => {}
        Some("Disabled") => {
            return Err(ProviderError::transient(format!(
                "BMC {} accepted the boot override but reports it Disabled",
                bmc.name()
            )));
        }
        other => log.line(
            TAG,
            format!(
                "warning: BMC reports BootSourceOverrideEnabled {} although Once was asked (some BMCs ignore it); the override may outlive the next boot",
                other.unwrap_or("missing")
            ),
        ),
    }
    Ok(())
}

/// Disables the system's boot override (`BootSourceOverrideEnabled: Disabled`) unless it is
/// already, and checks the BMC took it. A BMC that refuses to disable it (HTTP 4xx: some want
/// a target with every boot PATCH, sushy-tools' libvirt driver has no "disabled" at all) or
/// reports it still enabled gets the override pointed at the disk (`Hdd`) instead, which
/// disarms the network boot just as well: the next boot is from disk.
pub(crate) async fn disable_boot_override(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    system: &Resource,
) -> Result<(), ProviderError> {
    let boot = |r: &Resource, key: &str| {
        r.body
            .get("Boot")
            .and_then(|b| boot_setting(b, key))
            .map(str::to_owned)
    };
    let enabled = |r: &Resource| boot(r, "BootSourceOverrideEnabled");
    match enabled(system).as_deref() {
        None => {
            log.line(TAG, "no boot override to disarm (no Boot property)");
            return Ok(());
        }
        Some("Disabled") => {
            log.line(TAG, "boot override is already disabled");
            return Ok(());
        }
        Some(_) if boot(system, "BootSourceOverrideTarget").as_deref() == Some("Hdd") => {
            log.line(TAG, "boot override already points at the disk");
            return Ok(());
        }
        Some(other) => log.line(
            TAG,
            format!("disarming the boot override (it was {other}): next boot from disk"),
        ),
    }
    let refused = patch_boot(
        bmc,
        cancel,
        log,
        system,
        json!({"BootSourceOverrideEnabled": "Disabled"}),
    )
    .await?
    .err()
    .map(|e| e.to_string());
    let after = bmc.get(cancel, &system.path).await?;
    let still = match (refused, enabled(&after).as_deref()) {
        (None, Some("Disabled") | None) => {
            log.line(TAG, "boot override disabled");
            return Ok(());
        }
        (Some(why), _) => why,
        (None, Some(other)) => format!("it still reports the override {other}"),
    };
    log.line(
        TAG,
        format!("the BMC does not disable its boot override ({still}); pointing it at the disk (Hdd) instead"),
    );
    patch_boot(
        bmc,
        cancel,
        log,
        &after,
        json!({"BootSourceOverrideTarget": "Hdd", "BootSourceOverrideEnabled": "Once"}),
    )
    .await??;
    let after = bmc.get(cancel, &system.path).await?;
    match boot(&after, "BootSourceOverrideTarget").as_deref() {
        Some("Hdd") => {
            log.line(TAG, "boot override points at the disk");
            Ok(())
        }
        other => Err(ProviderError::transient(format!(
            "BMC {} could not disable its boot override ({still}) and reports target {} after it was set to Hdd",
            bmc.name(),
            other.unwrap_or("missing")
        ))),
    }
}

/// A string setting of a system's `Boot` object, e.g. `BootSourceOverrideTarget`.
fn boot_setting<'a>(boot: &'a Value, key: &str) -> Option<&'a str> {
    boot.get(key).and_then(Value::as_str)
}

/// PATCHes `Boot` of the system with `patch`, waiting for the BMC's task if it starts one;
/// `Ok(Err(..))` when the BMC refused the PATCH's content (see [`Bmc::write_or_refused`]).
async fn patch_boot(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    system: &Resource,
    patch: Value,
) -> Result<Result<(), ProviderError>, ProviderError> {
    let written = bmc
        .write_or_refused(
            cancel,
            Method::PATCH,
            &system.path,
            &json!({ "Boot": patch }),
            system.etag.as_deref(),
            None,
        )
        .await?;
    match written {
        Ok(Some(task)) => {
            wait_task(bmc, cancel, log, &task, Instant::now() + BOOT_TASK_DEADLINE).await?;
            Ok(Ok(()))
        }
        Ok(None) => Ok(Ok(())),
        Err(refused) => Ok(Err(refused)),
    }
}

/// Finds the system's CD/DVD virtual media device: under the system first, then under each
/// of its managers.
pub(crate) async fn find_cd(
    bmc: &Bmc,
    cancel: &CancellationToken,
    system: &Resource,
) -> Result<Resource, ProviderError> {
    let mut collections: Vec<String> = Vec::new();
    if let Some(l) = system.link("VirtualMedia") {
        collections.push(l.to_owned());
    }
    let managers: Vec<String> = system
        .body
        .get("Links")
        .and_then(|l| l.get("ManagedBy"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("@odata.id").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    let mut looked = Vec::new();
    let mut by_name: Option<Resource> = None;
    let mut next_manager = managers.iter();
    loop {
        let Some(collection) = collections.pop() else {
            // Nothing left: read the next manager's VirtualMedia link.
            let Some(manager) = next_manager.next() else {
                break;
            };
            if let Some(m) = bmc.get_opt(cancel, manager).await?
                && let Some(l) = m.link("VirtualMedia")
                && !looked.iter().any(|x: &String| x == l)
            {
                collections.push(l.to_owned());
            }
            continue;
        };
        if looked.contains(&collection) {
            continue;
        }
        looked.push(collection.clone());
        let Some(coll) = bmc.get_opt(cancel, &collection).await? else {
            continue;
        };
        let ids: Vec<String> = coll
            .body
            .get("Members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m.get("@odata.id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        for id in ids {
            let Some(dev) = bmc.get_opt(cancel, &id).await? else {
                continue;
            };
            let types = dev.body.get("MediaTypes").map(strings).unwrap_or_default();
            if types.iter().any(|t| t == "CD" || t == "DVD") {
                return Ok(dev);
            }
            if types.is_empty() && named_like_a_cd(&dev) && by_name.is_none() {
                by_name = Some(dev);
            }
        }
    }
    // Some BMCs (AMI) list no MediaTypes: a device named like a CD drive will do.
    if let Some(dev) = by_name {
        return Ok(dev);
    }
    Err(ProviderError::permanent(format!(
        "BMC {} offers no CD/DVD virtual media for {} (looked in {})",
        bmc.name(),
        system.path,
        list(&looked)
    )))
}

/// Whether a device without `MediaTypes` is a CD/DVD drive by its `Id`, `Name` or path
/// (`CD1`, `Virtual CD`, `.../VirtualMedia/Cd`, `DVD`).
fn named_like_a_cd(dev: &Resource) -> bool {
    let last = dev
        .path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    [dev.str("Id"), dev.str("Name"), Some(last)]
        .into_iter()
        .flatten()
        .map(str::to_ascii_lowercase)
        .any(|n| {
            n.starts_with("cd") || n.starts_with("dvd") || n.contains(" cd") || n.contains("dvd")
        })
}

/// The target of the device's action whose name ends with `suffix` (`InsertMedia`,
/// `EjectMedia`), whatever its prefix.
fn media_action<'a>(dev: &'a Resource, suffix: &str) -> Option<&'a str> {
    dev.body
        .get("Actions")
        .and_then(Value::as_object)?
        .iter()
        .find(|(k, _)| k.ends_with(suffix))
        .and_then(|(_, v)| v.get("target"))
        .and_then(Value::as_str)
}

/// How a media change is sent: a POST to the device's action whose name ends with
/// `suffix` if it has one, else a PATCH of the device itself (with its ETag).
fn media_request<'a>(dev: &'a Resource, suffix: &str) -> (Method, &'a str, Option<&'a str>) {
    match media_action(dev, suffix) {
        Some(target) => (Method::POST, target, None),
        None => (Method::PATCH, dev.path.as_str(), dev.etag.as_deref()),
    }
}

/// The image a device shows, `None` when it shows none: AMI BMCs write `"None"` (or an
/// empty string) for an empty drive.
pub(crate) fn image(dev: &Resource) -> Option<&str> {
    dev.str("Image")
        .map(str::trim)
        .filter(|i| !i.is_empty() && !i.eq_ignore_ascii_case("none"))
}

fn inserted(dev: &Resource) -> bool {
    dev.body.get("Inserted").and_then(Value::as_bool) == Some(true) || image(dev).is_some()
}

/// How a device was last seen, for messages.
fn media_state(dev: &Resource) -> String {
    format!(
        "Image {}, Inserted {}",
        image(dev).unwrap_or("none"),
        dev.body
            .get("Inserted")
            .and_then(Value::as_bool)
            .map_or("missing".to_owned(), |b| b.to_string())
    )
}

/// The first wait between two reads of a device or task; it grows by half each time.
const MEDIA_POLL: Duration = Duration::from_millis(250);
/// The longest wait between two reads of a device or task.
const MEDIA_POLL_MAX: Duration = Duration::from_secs(5);
/// How long a boot override the BMC accepted with 202 may take to be applied.
const BOOT_TASK_DEADLINE: Duration = Duration::from_secs(60);

async fn pause(cancel: &CancellationToken, d: Duration) -> Result<(), ProviderError> {
    tokio::select! {
        () = tokio::time::sleep(d) => Ok(()),
        () = cancel.cancelled() => Err(ProviderError::canceled()),
    }
}

/// Follows the task monitor of a request the BMC accepted with 202 until the task ends or
/// `deadline`; an error names the task's state and messages.
pub(crate) async fn wait_task(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    monitor: &str,
    deadline: Instant,
) -> Result<(), ProviderError> {
    log.line(
        TAG,
        format!("BMC accepted the request: following task {monitor}"),
    );
    let mut interval = MEDIA_POLL;
    let mut last = "New".to_owned();
    loop {
        if let Some(task) = bmc.poll_task(cancel, monitor).await? {
            let state = task.get("TaskState").and_then(Value::as_str);
            match state {
                None | Some("Completed") => return Ok(()),
                Some("Exception" | "Killed" | "Cancelled" | "Interrupted") => {
                    let said = task
                        .get("Messages")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.get("Message").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(ProviderError::transient(format!(
                        "BMC {} task {monitor} ended {}{}",
                        bmc.name(),
                        state.unwrap_or_default(),
                        if said.is_empty() {
                            String::new()
                        } else {
                            format!(": {said}")
                        }
                    )));
                }
                Some(other) => last = other.to_owned(),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ProviderError::transient(format!(
                "BMC {} task {monitor} had not ended at the deadline (last state {last})",
                bmc.name()
            )));
        }
        pause(cancel, interval.min(deadline - now)).await?;
        interval = (interval * 3 / 2).min(MEDIA_POLL_MAX);
    }
}

/// Reads the device until `done` holds or `deadline`; the error says what it was waiting for
/// and how the device was last seen.
async fn wait_media(
    bmc: &Bmc,
    cancel: &CancellationToken,
    path: &str,
    deadline: Instant,
    want: &str,
    done: impl Fn(&Resource) -> bool,
) -> Result<Resource, ProviderError> {
    let mut interval = MEDIA_POLL;
    loop {
        let dev = bmc.get(cancel, path).await?;
        if done(&dev) {
            return Ok(dev);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ProviderError::transient(format!(
                "BMC {} accepted the request but {path} did not show {want} in time; last seen: {}",
                bmc.name(),
                media_state(&dev)
            )));
        }
        pause(cancel, interval.min(deadline - now)).await?;
        interval = (interval * 3 / 2).min(MEDIA_POLL_MAX);
    }
}

/// Inserts `image` into the CD device (ejecting other media first) and waits, up to
/// `timeout`, until the device shows it (following the task monitor if the BMC mounts
/// asynchronously).
pub(crate) async fn insert_media(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    dev: &Resource,
    image_url: &str,
    timeout: Duration,
) -> Result<(), ProviderError> {
    let deadline = Instant::now() + timeout;
    if inserted(dev) && image(dev) == Some(image_url) {
        log.line(
            TAG,
            format!("virtual media {} already holds {image_url}", dev.path),
        );
        return Ok(());
    }
    // Ejecting reads the device back: that reading has the current ETag.
    let dev = eject_media(bmc, cancel, log, dev, timeout).await?;
    let body = json!({"Image": image_url, "Inserted": true, "WriteProtected": true});
    log.line(
        TAG,
        format!("virtual media {}: inserting {image_url}", dev.path),
    );
    // Either way the BMC may fetch the image before it answers: the insert timeout.
    let (method, path, etag) = media_request(&dev, "InsertMedia");
    if let Some(task) = bmc
        .write(cancel, method, path, &body, etag, Some(timeout))
        .await?
    {
        wait_task(bmc, cancel, log, &task, deadline).await?;
    }
    wait_media(
        bmc,
        cancel,
        &dev.path,
        deadline,
        &format!("Image {image_url}"),
        |after| {
            let inserted_flag = after.body.get("Inserted").and_then(Value::as_bool);
            inserted_flag != Some(false)
                && image(after).is_none_or(|i| i == image_url)
                && (inserted_flag == Some(true) || image(after).is_some())
        },
    )
    .await?;
    log.line(TAG, format!("virtual media {} holds {image_url}", dev.path));
    Ok(())
}

/// Ejects whatever the device holds, waits (up to `timeout`) until it shows empty and
/// returns the device as read back.
pub(crate) async fn eject_media(
    bmc: &Bmc,
    cancel: &CancellationToken,
    log: &LogSink,
    dev: &Resource,
    timeout: Duration,
) -> Result<Resource, ProviderError> {
    let deadline = Instant::now() + timeout;
    if !inserted(dev) {
        log.line(TAG, format!("virtual media {} is empty", dev.path));
        return Ok(dev.clone());
    }
    log.line(
        TAG,
        format!(
            "virtual media {}: ejecting {}",
            dev.path,
            image(dev).unwrap_or("the media")
        ),
    );
    let (method, path, etag) = media_request(dev, "EjectMedia");
    let body = if method == Method::POST {
        json!({})
    } else {
        json!({"Image": null, "Inserted": false})
    };
    if let Some(task) = bmc.write(cancel, method, path, &body, etag, None).await? {
        wait_task(bmc, cancel, log, &task, deadline).await?;
    }
    wait_media(bmc, cancel, &dev.path, deadline, "no media", |after| {
        !inserted(after)
    })
    .await
}

/// The normalised MAC addresses of the system's EthernetInterfaces.
pub(crate) async fn macs(
    bmc: &Bmc,
    cancel: &CancellationToken,
    system: &Resource,
) -> Result<Vec<MacAddress>, ProviderError> {
    let collection = system.link("EthernetInterfaces").ok_or_else(|| {
        ProviderError::permanent(format!(
            "BMC {} lists no EthernetInterfaces for {}",
            bmc.name(),
            system.path
        ))
    })?;
    let mut out: Vec<MacAddress> = Vec::new();
    for m in members(bmc, cancel, collection).await? {
        let Some(res) = bmc.get_opt(cancel, &m).await? else {
            continue;
        };
        for mac in nic::interface_macs(&res.body) {
            if !out.contains(&mac) {
                out.push(mac);
            }
        }
    }
    Ok(out)
}

/// What the status poll records from a ComputerSystem: its `PowerState` (a transitional
/// or unknown one is no reading) and its health, `Status.HealthRollup` (the system with
/// its components) before `Status.Health`; a missing, null or unknown value is no reading.
pub(crate) fn observation(sys: &Resource) -> Observation {
    let power = Reading::parse(sys.str("PowerState")).state();
    let status = sys.body.get("Status");
    let word = |key: &str| status.and_then(|s| s.get(key)).and_then(Value::as_str);
    let health = [word("HealthRollup"), word("Health")]
        .into_iter()
        .flatten()
        .find_map(|w| match w {
            "OK" => Some(Health::Ok),
            "Warning" => Some(Health::Warning),
            "Critical" => Some(Health::Critical),
            _ => None,
        });
    let mut detail = Vec::new();
    if let (Some(h), Some(r)) = (word("Health"), word("HealthRollup"))
        && h != r
    {
        detail.push(format!("Health {h}, HealthRollup {r}"));
    }
    if let Some(state) = word("State").filter(|s| *s != "Enabled") {
        detail.push(format!("State {state}"));
    }
    Observation::Answered {
        power,
        health,
        detail: detail.join(", "),
    }
}
