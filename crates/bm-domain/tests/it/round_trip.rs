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

/// The names the store's columns use (`as_str`, parsed back with `FromStr`) are the names of
/// the JSON documents, for every value.
#[test]
fn enum_names_agree_with_their_json_and_parse_back() {
    use bm_domain::{EventKind, OperationPhase, OperationType};
    fn check<T>(all: &[T], name: fn(&T) -> &'static str)
    where
        T: serde::Serialize + std::str::FromStr + PartialEq + std::fmt::Debug,
        T::Err: std::fmt::Debug,
    {
        for v in all {
            assert_eq!(
                serde_json::to_string(v).unwrap(),
                format!("\"{}\"", name(v))
            );
            assert_eq!(&name(v).parse::<T>().unwrap(), v);
        }
        assert!("NOT_A_NAME".parse::<T>().is_err());
    }
    check(&EventKind::ALL, |k| k.as_str());
    check(&OperationPhase::ALL, |p| p.as_str());
    check(&OperationType::ALL, |t| t.as_str());
}
