//! The fuzz targets' corpus (`fuzz/corpus`, docs/fuzzing.md), replayed through the same
//! entry points as the fuzzers (`bm_server::fuzzing`), so that every input a fuzzer once
//! found (a crash that was fixed is added to the corpus) stays checked by `cargo test`,
//! without the fuzzing toolchain.
//!
//! The seeds are valid requests made here from the generated types: the test fails if the
//! committed corpus lacks one or holds an old version, and `BM_BLESS_FUZZ_SEEDS=1` writes
//! them.

use std::path::{Path, PathBuf};

use bm_proto::pbjson_types::FieldMask;
use bm_proto::v1 as pb;
use bm_server::fuzzing::{self, RPCS};
use prost::Message;

use crate::support::fake_machine;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// A valid request of each RPC, encoded, after the byte that picks its RPC.
fn request_seeds() -> Vec<(String, Vec<u8>)> {
    let machine = fake_machine("m-1", 1, &[("rack", "r1")]);
    let op = "op-01JD3F5Q2W8Y4ZP0N7R6T9V3KM".to_owned();
    let start = || {
        pb::RebootRequest {
            machine_id: "m-1".into(),
            request_id: "r-1".into(),
            note: "a note".into(),
        }
        .encode_to_vec()
    };
    RPCS.iter()
        .enumerate()
        .map(|(i, rpc)| {
            let body = match *rpc {
                "RegisterMachine" => pb::RegisterMachineRequest {
                    machine: Some(machine.clone()),
                }
                .encode_to_vec(),
                "ImportMachines" => pb::ImportMachinesRequest {
                    machines: vec![machine.clone(), fake_machine("m-2", 2, &[])],
                    source: "inventory.csv".into(),
                    validate_only: true,
                }
                .encode_to_vec(),
                "GetMachine" => pb::GetMachineRequest {
                    machine_id: "m-1".into(),
                }
                .encode_to_vec(),
                "ListMachines" => pb::ListMachinesRequest {
                    page_size: 10,
                    phase: pb::Phase::Ready.into(),
                    label_selector: "rack in (r1,r2),!decommission".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
                "UpdateMachine" => pb::UpdateMachineRequest {
                    machine: Some(machine.clone()),
                    update_mask: Some(FieldMask {
                        paths: vec!["spec.image".into(), "labels.rack".into()],
                    }),
                }
                .encode_to_vec(),
                "GetOperation" | "CancelOperation" | "StreamLogs" => pb::GetOperationRequest {
                    operation_id: op.clone(),
                }
                .encode_to_vec(),
                "ListOperations" => pb::ListOperationsRequest {
                    page_size: 5,
                    machine_id: "m-1".into(),
                    r#type: pb::OperationType::Reboot.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
                "WatchOperations" => pb::WatchOperationsRequest {
                    machine_id: "m-1".into(),
                    operation_id: op.clone(),
                    after_revision: Some(7),
                }
                .encode_to_vec(),
                "ListOperationTypes" => Vec::new(),
                // The operation RPCs share one request shape.
                _ => start(),
            };
            let mut bytes = vec![u8::try_from(i).expect("fewer than 256 RPCs")];
            bytes.extend(body);
            (format!("seed-{rpc}"), bytes)
        })
        .collect()
}

fn text_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let texts: &[&str] = match target {
        "label_selector" => &[
            "rack=r1",
            "rack in (r1,r2),!decommission",
            "zone!=a,env notin (dev, test),example.com/owner",
        ],
        "field_mask" => &[
            "spec",
            "spec.image\nlabels.rack",
            "labels\nspec.mac_addresses",
        ],
        // "m-1" after "v1", "machines", and the fingerprint of no filters, hex-encoded.
        "page_token" => &[
            "76311f6d616368696e65731f6d2d311f63626632396365343834323232333235",
            "m-1",
        ],
        other => panic!("no seeds for {other}"),
    };
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("seed-{i}"), t.as_bytes().to_vec()))
        .collect()
}

const TARGETS: [&str; 4] = ["requests", "label_selector", "field_mask", "page_token"];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    if target == "requests" {
        request_seeds()
    } else {
        text_seeds(target)
    }
}

/// Runs one input through a target as its fuzzer does; true if it was accepted.
fn run(target: &str, data: &[u8]) -> bool {
    let text = || std::str::from_utf8(data).ok();
    match target {
        "requests" => data
            .split_first()
            .is_some_and(|(rpc, bytes)| fuzzing::request(usize::from(*rpc), bytes).is_ok()),
        "label_selector" => text().is_some_and(|t| fuzzing::label_selector(t).is_ok()),
        "field_mask" => text().is_some_and(|t| fuzzing::field_mask(t).is_ok()),
        "page_token" => text().is_some_and(|t| fuzzing::page_token(t).is_ok()),
        other => panic!("no target {other}"),
    }
}

#[test]
fn the_seeds_are_valid_requests_and_in_the_committed_corpus() {
    let bless = std::env::var_os("BM_BLESS_FUZZ_SEEDS").is_some();
    for target in TARGETS {
        for (name, bytes) in seeds(target) {
            let path = corpus(target).join(&name);
            if bless {
                std::fs::create_dir_all(corpus(target)).expect("corpus directory");
                std::fs::write(&path, &bytes).expect("writing a seed");
            }
            assert_eq!(
                std::fs::read(&path).ok().as_deref(),
                Some(&bytes[..]),
                "{} is missing or old; run with BM_BLESS_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }
    // Each request seed gets through every check to the engine, so that the fuzzer starts
    // from inputs that go deep; the selector and mask seeds parse.
    for (target, accepted) in [
        ("requests", seeds("requests")),
        ("label_selector", seeds("label_selector")),
        ("field_mask", seeds("field_mask")),
        ("page_token", seeds("page_token")[..1].to_vec()),
    ] {
        for (name, bytes) in accepted {
            assert!(run(target, &bytes), "{target}/{name} was refused");
        }
    }
}

#[test]
fn every_input_of_the_corpus_passes_its_target() {
    for target in TARGETS {
        let dir = corpus(target);
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        assert!(!entries.is_empty(), "{} is empty", dir.display());
        for path in entries {
            let data = std::fs::read(&path).expect("reading an input");
            // A broken invariant panics, and names the input.
            let outcome = std::panic::catch_unwind(|| run(target, &data));
            assert!(outcome.is_ok(), "{} broke an invariant", path.display());
        }
    }
}
