//! Functional run of the `ivbench` suites with tiny iteration counts: every required
//! (suite, case, metric) row is present with a positive value, the JSON lines carry exactly the
//! five fields, and the ivshmem doorbell case is measured (hosted process cells), never invented.
//! Nothing here is timed or compared against a threshold.

use std::sync::{Mutex, MutexGuard};

use ivshmem_stack::bench::report::{Entry, Verdict};
use ivshmem_stack::bench::{doorbell, pin, ring, scale, Settings, SuiteReport};

/// The cases busy-poll on two pinned CPUs: run them one test at a time so two tests never
/// spin against each other on the same cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static CORES: Mutex<()> = Mutex::new(());
    CORES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tiny() -> Settings {
    let cpus = pin::default_cpus().expect("these tests need 2 CPUs");
    Settings::tiny(cpus, 200)
}

fn assert_rows(report: &SuiteReport, required: &[(&str, &str)]) {
    for &(case, metric) in required {
        let entry = report
            .entries
            .iter()
            .find(|e| e.case() == case && e.metric().name() == metric)
            .unwrap_or_else(|| panic!("missing row ({}, {case}, {metric})", report.suite));
        let Entry::Measured(m) = entry else {
            panic!("({}, {case}, {metric}) was not measured", report.suite);
        };
        assert_eq!(m.samples.len(), 1);
        assert!(
            m.median().is_finite() && m.median() > 0.0,
            "({}, {case}, {metric}) = {}",
            report.suite,
            m.median()
        );
    }
    let lines = report.json_lines();
    assert_eq!(
        lines.len(),
        required.len(),
        "one JSON line per measured row"
    );
    for line in lines {
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 5, "{line}");
        assert_eq!(object["suite"], report.suite);
        assert!(object["value"].as_f64().unwrap() > 0.0, "{line}");
        for key in ["case", "metric", "unit"] {
            assert!(object[key].is_string(), "{line}");
        }
    }
}

#[test]
fn ring_suite_reports_every_required_row() {
    let _cores = one_at_a_time();
    let report = ring::run(&tiny()).expect("ring suite");
    assert_eq!(report.suite, "ring");
    let mut required = vec![
        ("floor", "rtt_ns"),
        ("floor-56", "rtt_ns"),
        ("shmring", "rtt_ns"),
        ("shmring-latency-56", "rtt_ns"),
        ("shmring-latency-64", "rtt_ns"),
        ("rtrb", "rtt_ns"),
        ("crossbeam", "rtt_ns"),
        ("shmring-xproc", "rtt_ns"),
        ("shmring-64", "msg_per_s"),
        ("shmring-batch-64", "msg_per_s"),
        ("rtrb-64", "msg_per_s"),
        ("crossbeam-64", "msg_per_s"),
        ("mpsc-64", "msg_per_s"),
        ("shmring-1k", "msg_per_s"),
        ("shmring-batch-1k", "msg_per_s"),
        ("rtrb-1k", "msg_per_s"),
        ("crossbeam-1k", "msg_per_s"),
        ("mpsc-1k", "msg_per_s"),
        ("shmring-grant-64k", "bytes_per_s"),
        ("shmring-view-64k", "bytes_per_s"),
        ("memcpy-64k", "bytes_per_s"),
    ];
    // The iceoryx2 peers exist only in builds with the feature (off by default: CI minutes).
    if cfg!(feature = "iceoryx2") {
        required.extend([("iceoryx2", "rtt_ns"), ("iceoryx2-xproc", "rtt_ns")]);
    }
    assert_rows(&report, &required);
    // Every ratio has both sides measured, so each one gets a value and a verdict.
    for ratio in report.ratios() {
        assert!(ratio.value.is_some(), "{:?}", ratio.comparison);
        assert_ne!(ratio.verdict, Verdict::NotAvailable);
    }
}

#[test]
fn doorbell_suite_reports_every_transport_and_no_fake_ivshmem() {
    let _cores = one_at_a_time();
    let report = doorbell::run(&tiny()).expect("doorbell suite");
    assert_rows(
        &report,
        &[
            ("eventfd", "rtt_ns"),
            ("uds", "rtt_ns"),
            ("pipe", "rtt_ns"),
            ("tcp", "rtt_ns"),
            // Measured for real: two hosted process cells ringing each other.
            ("ivshmem", "rtt_ns"),
        ],
    );
    let ratio = report
        .ratios()
        .into_iter()
        .find(|r| r.comparison.case == "ivshmem")
        .expect("ivshmem ratio");
    assert_ne!(ratio.verdict, Verdict::NotAvailable);
}

#[test]
fn scale_suite_reports_every_required_row() {
    let _cores = one_at_a_time();
    let report = scale::run(&tiny()).expect("scale suite");
    assert_eq!(report.suite, "scale");
    assert_rows(
        &report,
        &[
            ("fanout-2", "ns"),
            ("fanout-4", "ns"),
            ("fanout-8", "ns"),
            ("fanout-16", "ns"),
            ("doorbell-busy-0", "rtt_ns"),
            ("doorbell-busy-8", "rtt_ns"),
            ("doorbell-busy-32", "rtt_ns"),
            ("attach-1", "ns"),
            ("attach-8", "ns"),
            ("attach-32", "ns"),
            ("attach-64", "ns"),
            ("hv-rss-1", "bytes"),
            ("hv-fds-1", "count"),
            ("hv-rss-64", "bytes"),
            ("hv-fds-64", "count"),
            ("stream-1", "bytes_per_s"),
            ("stream-8", "bytes_per_s"),
            ("stream-64", "bytes_per_s"),
            ("validate-64k", "ns"),
        ],
    );
    // The hypervisor holds 8 fds per 2-peer INTx link (state table and two output sections,
    // each a read-write and a read-only fd, and one eventfd per peer): 64 links add 63 x 8.
    let fds = |case| {
        report
            .value(case, ivshmem_stack::bench::Metric::Count)
            .unwrap()
    };
    assert_eq!(fds("hv-fds-64") - fds("hv-fds-1"), 63.0 * 8.0);
    for ratio in report.ratios() {
        assert!(ratio.value.is_some(), "{:?}", ratio.comparison);
    }
}

#[test]
fn streaming_detects_nothing_lost_with_a_ring_that_wraps_many_times() {
    let _cores = one_at_a_time();
    // 5000 messages of 1 KiB through 64 KiB rings: every queue wraps ~80 times and every
    // sequence number is checked by the consumer.
    let cpus = pin::default_cpus().unwrap();
    for queue in [
        ring::Queue::Shmring,
        ring::Queue::Rtrb,
        ring::Queue::Crossbeam,
        ring::Queue::Mpsc,
    ] {
        ring::stream::<1024>(queue, cpus, 5000).unwrap_or_else(|e| panic!("{queue:?}: {e:#}"));
    }
    ring::grant_stream(cpus, 50).expect("grant stream");
}

#[test]
fn a_cpu_that_does_not_exist_is_a_clear_error() {
    let _cores = one_at_a_time();
    let err = doorbell::eventfd_rtt([0, 100_000], 10).unwrap_err();
    assert!(format!("{err:#}").contains("could not pin"), "{err:#}");
    let err = doorbell::uds_rtt([0, 100_000], 10).unwrap_err();
    assert!(format!("{err:#}").contains("could not pin"), "{err:#}");
    let err = ring::floor_rtt([0, 100_000], 10).unwrap_err();
    assert!(format!("{err:#}").contains("CPU 100000"), "{err:#}");
}

/// Whether the KVM rows can run: without `/dev/kvm` prints why the test is skipped and
/// returns false; otherwise builds the inmate images they boot (`scripts/build-inmates`).
fn kvm_with_inmates() -> bool {
    if let Err(why) = hypervisor::kvm::kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return false;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = std::process::Command::new(root.join("scripts/build-inmates"))
        .status()
        .expect("running scripts/build-inmates");
    assert!(built.success(), "scripts/build-inmates failed: {built}");
    true
}

/// `ivbench kvm`'s telemetry rows: a KVM producer and a process producer, both measured in one
/// run (skipped with a message without `/dev/kvm`).
#[test]
fn kvm_suite_measures_telemetry_from_a_kvm_and_a_process_producer() {
    if !kvm_with_inmates() {
        return;
    }
    let _cores = one_at_a_time();
    let mut report = SuiteReport::new(ivshmem_stack::bench::kvm::SUITE);
    report.entries = ivshmem_stack::bench::kvm::telemetry_rows(&tiny()).unwrap();
    let mut required = Vec::new();
    for case in ["telemetry-kvm", "telemetry-process"] {
        for metric in ["p50_ns", "p99_ns", "max_rate_per_s"] {
            required.push((case, metric));
        }
    }
    assert_rows(&report, &required);
}

/// `ivbench kvm`'s ping rows: Linux's ICMP echo to the network inmate and to the process cell,
/// both measured in one run (skipped with a message without root or `/dev/kvm`).
#[test]
fn kvm_suite_measures_ping_to_the_network_inmate_and_the_process_cell() {
    if !vnet::tap::is_root() {
        eprintln!("skipping: needs root (network namespaces, TAP devices)");
        return;
    }
    if !kvm_with_inmates() {
        return;
    }
    let _cores = one_at_a_time();
    let mut report = SuiteReport::new(ivshmem_stack::bench::kvm::SUITE);
    ivshmem_stack::bench::kvm::ping_rows(&tiny(), &mut report).unwrap();
    assert_rows(
        &report,
        &[("ping-kvm", "rtt_ns"), ("ping-process", "rtt_ns")],
    );
}
