//! Every request message: the first byte picks the RPC (`bm_server::fuzzing::RPCS`), the
//! rest is decoded as its request and goes through the server's conversions and checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((rpc, bytes)) = data.split_first() {
        let _ = bm_server::fuzzing::request(usize::from(*rpc), bytes);
    }
});
