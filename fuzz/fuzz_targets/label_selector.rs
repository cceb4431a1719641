//! The label selector parser of ListMachines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bm_server::fuzzing::label_selector(text);
    }
});
