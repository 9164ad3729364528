//! Fuzz target: the NIC's receive path against a hostile peer, the scenario of
//! `tests/support/nic_rx.rs` (the same code the bounded `nic_rx_fuzz` proptest runs in CI),
//! driven by fuzz input. Any panic or violated property is a crash.
//!
//! Run from `vnet/fuzz`: `cargo +nightly fuzz run nic_rx -- -max_total_time=60`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/support/nic_rx.rs"]
mod nic_rx;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = nic_rx::run(data) {
        panic!("hostile peer broke the NIC's receive path: {violation}");
    }
});
