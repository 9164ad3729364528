//! Fuzz target: the hostile-peer scenario of `tests/support/hostile.rs` (the same code the
//! `hostile` proptest runs), driven by fuzz input. The first byte picks the capacity, the
//! victim side (consumer or producer) and the consumer's mode (index or latency mode); the rest is the script of victim operations, honest peer
//! operations and arbitrary writes into the peer's part. Any panic or violated property
//! (unexpected error, slice outside the data area, guard bytes overwritten) is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/hostile.rs"]
mod hostile;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = hostile::run(data) {
        panic!("hostile peer broke the victim: {violation}");
    }
});
