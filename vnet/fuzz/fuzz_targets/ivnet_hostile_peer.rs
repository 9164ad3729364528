//! Fuzz target: the `ivshmem-net` hostile-peer scenario of `tests/support/ivnet.rs` (the same
//! code the `ivnet_hostile` proptest runs), driven by fuzz input: a script of victim
//! operations, honest peer operations and arbitrary writes into the peer's section. Any panic
//! or violated property (unexpected error, frame longer than the buffer, guard bytes
//! overwritten, a fault with an honest peer) is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/ivnet.rs"]
mod ivnet;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = ivnet::run(data) {
        panic!("hostile peer broke the victim: {violation}");
    }
});
