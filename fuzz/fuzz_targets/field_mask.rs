//! The field mask of UpdateMachine: one path a line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bm_server::fuzzing::field_mask(text);
    }
});
