//! Functional run of `ivbench telemetry --quick --json`: the suite measures every
//! (pipe, metric) row (ivshmem in polling and interrupt mode, in one process and across
//! processes through the hosted hypervisor, Unix socket, TCP loopback; p50, p99 latency and
//! the flat-out rate) and each run checked every sample arrived in order and untorn (the
//! binary fails otherwise, also when the forked producer cell did not exit cleanly). Nothing
//! is timed or compared against a threshold.

use std::process::Command;

#[test]
fn telemetry_suite_measures_every_pipe_and_metric() {
    let out = Command::new(env!("CARGO_BIN_EXE_ivbench"))
        .args(["telemetry", "--quick", "--json"])
        .output()
        .expect("running ivbench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ivbench failed: {stderr}");
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    for case in [
        "ivshmem-poll",
        "ivshmem-irq",
        "ivshmem-poll-xproc",
        "ivshmem-irq-xproc",
        "uds",
        "tcp",
    ] {
        for (metric, unit) in [
            ("p50_ns", "ns"),
            ("p99_ns", "ns"),
            ("max_rate_per_s", "1/s"),
        ] {
            let row = rows
                .iter()
                .find(|r| r["case"] == case && r["metric"] == metric)
                .unwrap_or_else(|| panic!("missing ({case}, {metric}) in {rows:?}"));
            assert_eq!(row["suite"], "telemetry");
            assert_eq!(row["unit"], unit);
            let value = row["value"].as_f64().unwrap();
            assert!(
                value.is_finite() && value > 0.0,
                "({case}, {metric}) = {value}"
            );
        }
    }
    assert_eq!(rows.len(), 18, "{rows:?}");
}
