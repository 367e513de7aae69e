//! Any bytes from a peer, in any fragmentation: the replication link's authentication handshake
//! consumes at most its fixed size, fails or waits, never panics, and never completes without a
//! valid proof (`auth::fuzz_one` checks those invariants).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    nvmetro_bdev::mirror::auth::fuzz_one(input);
});
