//! The store keeps domain values as JSON: every value survives a round trip.

use bm_domain::{Machine, Operation};
use proptest::prelude::*;

proptest! {
    #[test]
    fn machines_round_trip(m in super::strategies::machine()) {
        let json = serde_json::to_string(&m).unwrap();
        let back: Machine = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn operations_round_trip(op in super::strategies::operation()) {
        let json = serde_json::to_string(&op).unwrap();
        let back: Operation = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, op);
    }
}

#[test]
fn invalid_stored_values_are_refused_not_trusted() {
    assert!(serde_json::from_str::<bm_domain::MachineId>(r#""Machine 1""#).is_err());
    assert!(serde_json::from_str::<bm_domain::MacAddress>(r#""02:00:00:00:00""#).is_err());
    assert!(serde_json::from_str::<bm_domain::OperationId>(r#""op-nope""#).is_err());
    let dup = r#"[{"type":"RMA","status":true,"reason":"","message":"","last_transition_time":0},
                  {"type":"RMA","status":false,"reason":"","message":"","last_transition_time":0}]"#;
    assert!(serde_json::from_str::<bm_domain::Conditions>(dup).is_err());
}
