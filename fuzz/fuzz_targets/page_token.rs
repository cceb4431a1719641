//! The page tokens of ListMachines and ListOperations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bm_server::fuzzing::page_token(text);
    }
});
