//! The machine record: what the operator declares (spec, labels) and what the control plane
//! knows (status).

use serde::{Deserialize, Serialize};

use crate::{
    Actor, BmcEndpoint, ConditionType, Conditions, DomainError, EffectiveState, Labels, MacAddress,
    MachineId, OperationId, Phase, SshEndpoint, Timestamp, effective_state,
};

/// What the operator declares about a machine: how to reach it and what it should run.
///
/// Operations converge the hardware towards the spec: a reimage writes `image`, a network
/// reconfiguration applies `network_config`. The spec cannot change while an operation is
/// active, so an operation always works from one spec from start to end.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// The provider that drives this machine's hardware, e.g. `fake` or `redfish`.
    pub provider: String,
    /// The MAC addresses of its NICs, without duplicates.
    pub mac_addresses: Vec<MacAddress>,
    /// `[user@]host[:port]` of the machine's SSH daemon (deploy ramdisk or installed OS);
    /// empty for none. Checked with [`SshEndpoint`]'s parser.
    pub ssh_endpoint: String,
    /// URL of its BMC, e.g. `redfish+https://10.0.0.5/redfish/v1/Systems/1`; never
    /// credentials, which live in the server's provider configuration; empty for none.
    /// Checked with [`BmcEndpoint`]'s parser.
    pub bmc_endpoint: String,
    /// The OS image that a reimage writes, e.g. `ubuntu-24.04` or an image URL.
    pub image: String,
    /// The cluster the machine joins after a reimage.
    pub target_cluster: String,
    /// A provider-specific network configuration document (e.g. netplan YAML) applied by a
    /// network reconfiguration; empty means the provider's default.
    pub network_config: String,
}

impl MachineSpec {
    /// The longest accepted network configuration document, in bytes.
    pub const MAX_NETWORK_CONFIG: usize = 64 * 1024;
    /// The most NICs a machine may list.
    pub const MAX_MACS: usize = 64;

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] naming the first bad field and what would be accepted.
    pub fn validate(&self) -> Result<(), DomainError> {
        validate_provider(&self.provider)?;
        if self.mac_addresses.len() > Self::MAX_MACS {
            return Err(DomainError::invalid(
                "MAC addresses",
                &format!("{} addresses", self.mac_addresses.len()),
                format!("at most {} are allowed", Self::MAX_MACS),
            ));
        }
        for (i, mac) in self.mac_addresses.iter().enumerate() {
            if self.mac_addresses[..i].contains(mac) {
                return Err(DomainError::invalid(
                    "MAC address",
                    &mac.to_string(),
                    "is listed twice",
                ));
            }
        }
        validate_ssh_endpoint(&self.ssh_endpoint)?;
        validate_bmc_endpoint(&self.bmc_endpoint)?;
        validate_token("image", &self.image, 1024)?;
        validate_token("target cluster", &self.target_cluster, 253)?;
        if self.network_config.len() > Self::MAX_NETWORK_CONFIG {
            return Err(DomainError::invalid(
                "network config",
                &format!("{} bytes", self.network_config.len()),
                format!("must be at most {} bytes", Self::MAX_NETWORK_CONFIG),
            ));
        }
        Ok(())
    }
}

fn validate_provider(p: &str) -> Result<(), DomainError> {
    let ok = !p.is_empty()
        && p.len() <= 63
        && p.starts_with(|c: char| c.is_ascii_lowercase())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "provider",
            p,
            "must name a provider: 1-63 lowercase letters, digits and '-', e.g. fake or redfish",
        ))
    }
}

/// Free-form single-token fields: printable, no whitespace, bounded.
pub(crate) fn validate_token(field: &'static str, v: &str, max: usize) -> Result<(), DomainError> {
    if v.len() > max {
        return Err(DomainError::invalid(
            field,
            v,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(DomainError::invalid(
            field,
            v,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

/// Empty means "no endpoint", which only providers that need one refuse.
fn validate_ssh_endpoint(v: &str) -> Result<(), DomainError> {
    if v.is_empty() {
        return Ok(());
    }
    v.parse::<SshEndpoint>().map(drop)
}

fn validate_bmc_endpoint(v: &str) -> Result<(), DomainError> {
    if v.is_empty() {
        return Ok(());
    }
    v.parse::<BmcEndpoint>().map(drop)
}

/// A change to a machine's spec and labels, applied to the record as it is when the change is
/// written (so that two changes of different fields both land). Fields left `None` keep
/// their value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MachinePatch {
    /// New provider.
    pub provider: Option<String>,
    /// New MAC addresses (the whole list).
    pub mac_addresses: Option<Vec<MacAddress>>,
    /// New SSH endpoint.
    pub ssh_endpoint: Option<String>,
    /// New BMC endpoint.
    pub bmc_endpoint: Option<String>,
    /// New image.
    pub image: Option<String>,
    /// New target cluster.
    pub target_cluster: Option<String>,
    /// New network configuration.
    pub network_config: Option<String>,
    /// Every label replaced by these.
    pub labels: Option<Labels>,
    /// Labels set (after `labels`).
    pub set_labels: std::collections::BTreeMap<String, String>,
    /// Labels removed (after `set_labels`).
    pub remove_labels: Vec<String>,
    /// Who makes the change; it becomes the machine's `updated_by`.
    pub actor: Actor,
}

impl MachinePatch {
    /// Whether the patch changes any spec field.
    pub fn touches_spec(&self) -> bool {
        self.provider.is_some()
            || self.mac_addresses.is_some()
            || self.ssh_endpoint.is_some()
            || self.bmc_endpoint.is_some()
            || self.image.is_some()
            || self.target_cluster.is_some()
            || self.network_config.is_some()
    }

    /// Whether the patch changes the labels.
    pub fn touches_labels(&self) -> bool {
        self.labels.is_some() || !self.set_labels.is_empty() || !self.remove_labels.is_empty()
    }

    /// The spec and labels `current` would have with the patch applied (`None` where the
    /// patch leaves them alone).
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] if the result is not a valid spec or label set.
    pub fn apply(
        &self,
        current: &Machine,
    ) -> Result<(Option<MachineSpec>, Option<Labels>), DomainError> {
        let spec = if self.touches_spec() {
            let mut s = current.spec.clone();
            let set = |field: &mut String, v: &Option<String>| {
                if let Some(v) = v {
                    field.clone_from(v);
                }
            };
            set(&mut s.provider, &self.provider);
            set(&mut s.ssh_endpoint, &self.ssh_endpoint);
            set(&mut s.bmc_endpoint, &self.bmc_endpoint);
            set(&mut s.image, &self.image);
            set(&mut s.target_cluster, &self.target_cluster);
            set(&mut s.network_config, &self.network_config);
            if let Some(macs) = &self.mac_addresses {
                s.mac_addresses.clone_from(macs);
            }
            s.validate()?;
            Some(s)
        } else {
            None
        };
        let labels = if self.touches_labels() {
            let mut map = self
                .labels
                .as_ref()
                .unwrap_or(&current.labels)
                .as_map()
                .clone();
            for (k, v) in &self.set_labels {
                map.insert(k.clone(), v.clone());
            }
            for k in &self.remove_labels {
                map.remove(k);
            }
            Some(Labels::new(map)?)
        } else {
            None
        };
        Ok((spec, labels))
    }
}

/// What the control plane knows about a machine. Owned by the backend: clients never write
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// The operator's intent, changed only by operations.
    pub phase: Phase,
    /// Facts about the machine.
    pub conditions: Conditions,
    /// The operation pending or running on the machine, if any (at most one).
    pub active_operation_id: Option<OperationId>,
    /// When the machine entered its current effective state (kept by the rules that change
    /// it: registration, an operation's admission and end, the status poll). Absent on
    /// records from before it was kept, until the state next changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_since: Option<Timestamp>,
}

impl Default for MachineStatus {
    fn default() -> Self {
        MachineStatus {
            phase: Phase::FactoryReady,
            conditions: Conditions::new(),
            active_operation_id: None,
            state_since: None,
        }
    }
}

/// A physical machine in the inventory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Its id.
    pub id: MachineId,
    /// What the operator declares.
    pub spec: MachineSpec,
    /// Free-form labels for selection.
    pub labels: Labels,
    /// What the control plane knows.
    pub status: MachineStatus,
    /// When it was registered.
    pub created_at: Timestamp,
    /// When its record last changed.
    pub updated_at: Timestamp,
    /// Who last registered or changed it through the API. Records from before the audit
    /// trail read as unknown.
    #[serde(default, skip_serializing_if = "Actor::is_unknown")]
    pub updated_by: Actor,
}

impl Machine {
    /// A newly registered machine: FACTORY_READY, no conditions, nothing running.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] if the spec is invalid.
    pub fn register(
        id: MachineId,
        spec: MachineSpec,
        labels: Labels,
        now: Timestamp,
    ) -> Result<Self, DomainError> {
        spec.validate()?;
        Ok(Machine {
            id,
            spec,
            labels,
            status: MachineStatus {
                state_since: Some(now),
                ..MachineStatus::default()
            },
            created_at: now,
            updated_at: now,
            updated_by: Actor::default(),
        })
    }

    /// Applies an update of the operator-owned fields. The spec cannot change while an
    /// operation is active; labels always can.
    ///
    /// # Errors
    ///
    /// [`DomainError::Invalid`] for an invalid spec, [`DomainError::SpecLocked`] for a spec
    /// change during an operation. Nothing is changed on error.
    pub fn update(
        &mut self,
        spec: Option<MachineSpec>,
        labels: Option<Labels>,
        now: Timestamp,
    ) -> Result<(), DomainError> {
        if let Some(spec) = &spec {
            spec.validate()?;
            if let Some(active) = self.status.active_operation_id
                && *spec != self.spec
            {
                return Err(DomainError::SpecLocked {
                    machine_id: self.id.clone(),
                    active,
                });
            }
        }
        let changed = spec.as_ref().is_some_and(|s| *s != self.spec)
            || labels.as_ref().is_some_and(|l| *l != self.labels);
        if let Some(spec) = spec {
            self.spec = spec;
        }
        if let Some(labels) = labels {
            self.labels = labels;
        }
        if changed {
            self.updated_at = now;
        }
        Ok(())
    }

    /// The effective state, computed from phase, conditions and the active operation.
    pub fn effective_state(&self) -> EffectiveState {
        effective_state(
            self.status.phase,
            &self.status.conditions,
            self.status.active_operation_id.is_some(),
        )
    }

    /// Records that the effective state changed at `now` if it is no longer `before` (the
    /// state before a rule changed the machine).
    pub fn track_state(&mut self, before: EffectiveState, now: Timestamp) {
        if self.effective_state() != before {
            self.status.state_since = Some(now);
        }
    }

    /// Since when the machine has been BLOCKED or in ATTENTION, as its conditions record it:
    /// BLOCKED since the first of the blocking conditions that hold became true, ATTENTION
    /// since NeedsIntervention did. `None` in the other states, which no condition marks
    /// (BUSY starts with the active operation).
    pub fn held_since(&self) -> Option<Timestamp> {
        let since = |t: &ConditionType| {
            self.status
                .conditions
                .get(t)
                .filter(|c| c.status)
                .map(|c| c.last_transition_time)
        };
        match self.effective_state() {
            EffectiveState::Blocked => ConditionType::BLOCKING.iter().filter_map(since).min(),
            EffectiveState::Attention => since(&ConditionType::NeedsIntervention),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            provider: "fake".into(),
            mac_addresses: vec!["02:00:00:00:00:01".parse().unwrap()],
            ssh_endpoint: "root@10.0.0.1:22".into(),
            bmc_endpoint: "redfish+https://10.0.1.1/redfish/v1/Systems/1".into(),
            image: "ubuntu-24.04".into(),
            target_cluster: "prod-east".into(),
            network_config: String::new(),
        }
    }

    fn check(edit: impl FnOnce(&mut MachineSpec), expect: Result<(), &str>) {
        let mut s = spec();
        edit(&mut s);
        match (s.validate(), expect) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e}"),
            (got, want) => panic!("{s:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn held_since_is_when_the_state_began_by_its_conditions() {
        let t = |s: i64| Timestamp::from_unix_micros(s * 1_000_000);
        let mut m = Machine::register(
            MachineId::new("m-1").unwrap(),
            spec(),
            Labels::default(),
            t(0),
        )
        .unwrap();
        assert_eq!(m.held_since(), None);
        let c = &mut m.status.conditions;
        c.set(ConditionType::NeedsIntervention, true, "Failed", "", t(10));
        assert_eq!(m.held_since(), Some(t(10)));
        // Blocked wins over attention, since the first blocking condition.
        let c = &mut m.status.conditions;
        c.set(ConditionType::Retired, true, "Retired", "", t(30));
        c.set(ConditionType::Rma, true, "Rma", "", t(20));
        assert_eq!(m.effective_state(), EffectiveState::Blocked);
        assert_eq!(m.held_since(), Some(t(20)));
        let c = &mut m.status.conditions;
        c.set(ConditionType::Rma, false, "Readmitted", "", t(40));
        c.set(ConditionType::Retired, false, "Readmitted", "", t(40));
        c.set(
            ConditionType::NeedsIntervention,
            false,
            "Cleared",
            "",
            t(40),
        );
        assert_eq!(m.held_since(), None);
    }

    #[test]
    fn spec_validation() {
        check(|_| {}, Ok(()));
        check(|s| s.ssh_endpoint = String::new(), Ok(()));
        check(|s| s.ssh_endpoint = "[fe80::1]:2222".into(), Ok(()));
        check(|s| s.ssh_endpoint = "node-1.lab".into(), Ok(()));
        check(|s| s.bmc_endpoint = String::new(), Ok(()));
        check(|s| s.provider = String::new(), Err("provider"));
        check(|s| s.provider = "Fake".into(), Err("provider"));
        check(
            |s| s.mac_addresses.push(s.mac_addresses[0]),
            Err("listed twice"),
        );
        check(|s| s.ssh_endpoint = "root@host:0".into(), Err("port"));
        check(|s| s.ssh_endpoint = "root@host:ssh".into(), Err("port"));
        check(
            |s| s.ssh_endpoint = "root:pw@host".into(),
            Err("no password"),
        );
        check(|s| s.ssh_endpoint = "a b".into(), Err("whitespace"));
        // What a provider could not use is refused at registration, not at action time.
        check(
            |s| s.ssh_endpoint = "[fe80::1]junk".into(),
            Err("[addr]:port"),
        );
        check(|s| s.ssh_endpoint = "[fe80::1]:22x".into(), Err("port"));
        check(|s| s.ssh_endpoint = "root@host/x:22".into(), Err("host"));
        check(
            |s| s.bmc_endpoint = "10.0.1.1".into(),
            Err("expected a URL"),
        );
        check(
            |s| s.bmc_endpoint = "redfish+https://admin:pw@10.0.1.1/".into(),
            Err("credentials"),
        );
        check(|s| s.bmc_endpoint = "HTTPS://h/".into(), Err("scheme"));
        // The field is checked with its full parser (endpoint.rs has every case).
        for (ssh, want) in [
            ("a@b@c", "invalid SSH endpoint \"a@b@c\""),
            ("-oProxyCommand=evil", "must not start with '-'"),
        ] {
            check(|s| s.ssh_endpoint = ssh.into(), Err(want));
        }
        for (bmc, want) in [
            ("redfish+https://[::1", "invalid BMC endpoint"),
            ("redfish+https://bmc:99999/", "from 1 to 65535"),
            ("ipmi://10.0.1.1", "redfish+https://"),
        ] {
            check(|s| s.bmc_endpoint = bmc.into(), Err(want));
        }
        check(|s| s.image = "x".repeat(1025), Err("at most"));
        check(
            |s| s.network_config = "x".repeat(70_000),
            Err("network config"),
        );
    }

    #[test]
    fn spec_is_locked_during_an_operation_but_labels_are_not() {
        let mut m = Machine::register(
            MachineId::new("machine-1").unwrap(),
            spec(),
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap();
        m.status.active_operation_id = Some(OperationId::from_parts(1, 1));
        let mut new_spec = spec();
        new_spec.image = "ubuntu-26.04".into();
        let err = m
            .update(Some(new_spec), None, Timestamp::EPOCH)
            .unwrap_err();
        assert!(matches!(err, DomainError::SpecLocked { .. }), "{err}");
        assert_eq!(m.spec, spec());
        // The same spec (a full update that only changes labels) is fine.
        let labels = Labels::from_pairs([("rack", "r1")]).unwrap();
        let t = Timestamp::from_unix_micros(9);
        m.update(Some(spec()), Some(labels.clone()), t).unwrap();
        assert_eq!((m.labels.clone(), m.updated_at), (labels, t));
    }

    #[test]
    fn patches_change_only_what_they_name() {
        let m = Machine::register(
            MachineId::new("machine-1").unwrap(),
            spec(),
            Labels::from_pairs([("rack", "r1"), ("gpu", "")]).unwrap(),
            Timestamp::EPOCH,
        )
        .unwrap();
        let image = MachinePatch {
            image: Some("ubuntu-26.04".into()),
            ..MachinePatch::default()
        };
        let (s, l) = image.apply(&m).unwrap();
        assert_eq!(
            s.unwrap(),
            MachineSpec {
                image: "ubuntu-26.04".into(),
                ..spec()
            }
        );
        assert!(l.is_none());
        let labels = MachinePatch {
            set_labels: [("zone".to_owned(), "a".to_owned())].into(),
            remove_labels: vec!["gpu".into()],
            ..MachinePatch::default()
        };
        let (s, l) = labels.apply(&m).unwrap();
        assert!(s.is_none());
        assert_eq!(
            l.unwrap(),
            Labels::from_pairs([("rack", "r1"), ("zone", "a")]).unwrap()
        );
        let bad = MachinePatch {
            ssh_endpoint: Some("root@host:0".into()),
            ..MachinePatch::default()
        };
        assert!(bad.apply(&m).is_err());
        let bad_label = MachinePatch {
            set_labels: [("-x".to_owned(), String::new())].into(),
            ..MachinePatch::default()
        };
        assert!(bad_label.apply(&m).is_err());
    }

    #[test]
    fn registered_machines_are_new() {
        let m = Machine::register(
            MachineId::new("machine-1").unwrap(),
            spec(),
            Labels::default(),
            Timestamp::EPOCH,
        )
        .unwrap();
        assert_eq!(m.status.phase, Phase::FactoryReady);
        assert_eq!(m.effective_state(), EffectiveState::New);
    }
}
