//! Shared helpers of the KVM tests: skipping without `/dev/kvm`, and tiny real-mode guests
//! assembled with GNU `as` at test time.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use hypervisor::kvm::{kvm_available, test_guests, EventQueue, HaltReason, KvmEvent};

/// How long a test waits for a guest event before failing (guest ring-0 code is emulated
/// instruction by instruction on PVM hosts, and exits cost tens of microseconds).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `true` (with the reason printed) when KVM cannot be used here.
pub fn skip_without_kvm() -> bool {
    match kvm_available() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping: KVM is not usable here: {why}");
            true
        }
    }
}

/// Assembles `body` after the prelude of [`hypervisor::kvm::test_guests`].
pub fn assemble(body: &str) -> Vec<u8> {
    test_guests::assemble(body).unwrap().image
}

/// The address of `label` in the guest assembled from `body`.
pub fn symbol(body: &str, label: &str) -> u64 {
    test_guests::assemble(body)
        .unwrap()
        .symbol(label)
        .unwrap_or_else(|| panic!("no symbol {label}"))
}

/// A fresh event queue.
pub fn events() -> Arc<EventQueue> {
    Arc::new(EventQueue::new().unwrap())
}

/// Waits for the console line `want` of `cell`.
pub fn expect_line(events: &EventQueue, cell: &str, want: &str) {
    let got = events.wait_for(
        TIMEOUT,
        |e| matches!(e, KvmEvent::Console { cell: c, line } if c == cell && line == want),
    );
    assert!(
        got.is_some(),
        "cell {cell} did not print {want:?}; queued: {:?}",
        events.take()
    );
}

/// Waits for `cell` to halt and returns why.
pub fn expect_halt(events: &EventQueue, cell: &str) -> HaltReason {
    match events.wait_for(
        TIMEOUT,
        |e| matches!(e, KvmEvent::Halted { cell: c, .. } if c == cell),
    ) {
        Some(KvmEvent::Halted { reason, .. }) => reason,
        _ => panic!("cell {cell} did not halt; queued: {:?}", events.take()),
    }
}

/// The console lines of `cell` still queued.
pub fn console_lines(events: &EventQueue, cell: &str) -> Vec<String> {
    events
        .take()
        .into_iter()
        .filter_map(|e| match e {
            KvmEvent::Console { cell: c, line } if c == cell => Some(line),
            _ => None,
        })
        .collect()
}
