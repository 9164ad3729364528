//! The NIC's receive path under a hostile peer (scenario in `support/nic_rx.rs`, shared with
//! the `nic_rx` cargo-fuzz target): never a panic (test builds have overflow checks on), no
//! fault on an honest ring, every published frame received or counted. Bounded: 256 scripts
//! by default (`PROPTEST_CASES` to change); long runs: `cargo +nightly fuzz run nic_rx` in
//! `vnet/fuzz`.

mod support;

use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    ProptestConfig::with_cases(cases.unwrap_or(256))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn nic_rx_survives_a_hostile_peer(script in proptest::collection::vec(any::<u8>(), 1..4000)) {
        if let Err(violation) = support::nic_rx::run(&script) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

/// The scenario reaches smoltcp, replies and reassembly (the proptest above is not vacuous).
#[test]
fn scenario_reaches_smoltcp_replies_and_fragments() {
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut total = support::nic_rx::Stats::default();
    for _ in 0..100 {
        let mut script = vec![0u8; 3000];
        rng.fill_bytes(&mut script);
        let stats = support::nic_rx::run(&script).expect("no violation");
        total.published += stats.published;
        total.received += stats.received;
        total.replies += stats.replies;
        total.fragments += stats.fragments;
    }
    assert!(total.received > 100, "{total:?}");
    assert!(total.replies > 0, "{total:?}");
    assert!(total.fragments > 0, "{total:?}");
}
