//! The MAC addresses of a system's EthernetInterfaces, normalised for comparison with the
//! machine record.
//!
//! Real NIC lists are messy: VLAN entries repeat a physical MAC, virtual and host-interface
//! entries are not NICs of the machine, values come in upper or lower case or as
//! placeholders such as `"Not Available"`. Only syntactically valid unicast addresses of
//! present, non-virtual interfaces are kept, once each, in the BMC's order.

use bm_domain::MacAddress;
use serde_json::Value;

/// The MAC addresses of one EthernetInterface resource: `MACAddress` and, if it differs,
/// `PermanentMACAddress`. None for a virtual or absent interface.
pub(crate) fn interface_macs(nic: &Value) -> Vec<MacAddress> {
    let str_at = |k: &str| nic.get(k).and_then(Value::as_str);
    if str_at("EthernetInterfaceType") == Some("Virtual") {
        return Vec::new();
    }
    let state = nic
        .get("Status")
        .and_then(|s| s.get("State"))
        .and_then(Value::as_str);
    if state == Some("Absent") {
        return Vec::new();
    }
    normalize_macs([str_at("MACAddress"), str_at("PermanentMACAddress")])
}

/// Parses, lower-cases and de-duplicates MAC addresses, skipping empty values, placeholders
/// and addresses no NIC has (all-zero, multicast, broadcast).
pub(crate) fn normalize_macs<'a>(
    values: impl IntoIterator<Item = Option<&'a str>>,
) -> Vec<MacAddress> {
    let mut out: Vec<MacAddress> = Vec::new();
    for v in values.into_iter().flatten() {
        if let Ok(mac) = v.trim().parse::<MacAddress>()
            && !out.contains(&mac)
        {
            out.push(mac);
        }
    }
    out
}

/// How the MAC addresses of a machine record compare with those its BMC reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MacCheck {
    /// Every MAC address the BMC reports for the system, normalised.
    pub(crate) on_hardware: Vec<MacAddress>,
    /// Addresses in the machine record that the hardware does not have (a typo, or the
    /// record describes another machine).
    pub(crate) missing_on_hardware: Vec<MacAddress>,
    /// Addresses of the hardware that the record does not list (often fine: BMC-shared or
    /// unused ports).
    pub(crate) not_in_record: Vec<MacAddress>,
}

impl MacCheck {
    /// Compares a record's addresses with the hardware's.
    pub(crate) fn compare(record: &[MacAddress], on_hardware: Vec<MacAddress>) -> Self {
        let missing_on_hardware = record
            .iter()
            .filter(|m| !on_hardware.contains(m))
            .copied()
            .collect();
        let not_in_record = on_hardware
            .iter()
            .filter(|m| !record.contains(m))
            .copied()
            .collect();
        MacCheck {
            on_hardware,
            missing_on_hardware,
            not_in_record,
        }
    }

    /// True when every address of the record is on the hardware.
    pub(crate) fn record_matches(&self) -> bool {
        self.missing_on_hardware.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn macs(v: &[MacAddress]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn normalises_and_deduplicates() {
        let got = normalize_macs([
            Some("52:54:00:AB:CD:EF"),
            Some("52-54-00-ab-cd-ef"),
            Some("Not Available"),
            Some(""),
            None,
            Some("00:00:00:00:00:00"),
            Some("FF:FF:FF:FF:FF:FF"),
            Some(" 5254.00ab.cd01 "),
            Some("52:54:00:ab:cd:ef"),
        ]);
        assert_eq!(macs(&got), ["52:54:00:ab:cd:ef", "52:54:00:ab:cd:01"]);
    }

    #[test]
    fn interfaces() {
        let physical = json!({
            "MACAddress": "AA:BB:CC:00:00:01",
            "PermanentMACAddress": "aa:bb:cc:00:00:02",
            "Status": {"State": "Enabled"}
        });
        assert_eq!(
            macs(&interface_macs(&physical)),
            ["aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"]
        );
        let vlan = json!({"MACAddress": "AA:BB:CC:00:00:01", "EthernetInterfaceType": "Virtual"});
        assert!(interface_macs(&vlan).is_empty());
        let absent = json!({"MACAddress": "AA:BB:CC:00:00:03", "Status": {"State": "Absent"}});
        assert!(interface_macs(&absent).is_empty());
        let placeholder = json!({"MACAddress": "Not Available", "PermanentMACAddress": null});
        assert!(interface_macs(&placeholder).is_empty());
    }

    #[test]
    fn compares_with_the_record() {
        let a: MacAddress = "52:54:00:00:00:01".parse().unwrap();
        let b: MacAddress = "52:54:00:00:00:02".parse().unwrap();
        let c: MacAddress = "52:54:00:00:00:03".parse().unwrap();
        let check = MacCheck::compare(&[a, c], vec![a, b]);
        assert_eq!(check.missing_on_hardware, [c]);
        assert_eq!(check.not_in_record, [b]);
        assert!(!check.record_matches());
        assert!(MacCheck::compare(&[a], vec![a, b]).record_matches());
    }
}
