//! Functional run of `ivbench telemetry --quick --json --plot DIR`: the suite measures every
//! (pipe, metric) row (ivshmem in polling, hybrid and interrupt mode, in one process and
//! across processes through the hosted hypervisor, Unix socket, TCP loopback; p50, p99
//! latency and the flat-out rate; the in-process ivshmem consumers' CPU use on the idle link)
//! and each run checked every sample arrived in order and untorn (the binary fails otherwise,
//! also when the forked producer cell did not exit cleanly), and it writes the charts. Nothing
//! is timed or compared against a threshold.

use std::process::Command;

#[test]
fn telemetry_suite_measures_every_pipe_and_metric() {
    let plots =
        std::env::temp_dir().join(format!("ivbench-telemetry-plots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&plots);
    let out = Command::new(env!("CARGO_BIN_EXE_ivbench"))
        .args(["telemetry", "--quick", "--json", "--plot"])
        .arg(&plots)
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
        "ivshmem-hybrid",
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
    // CPU use on the idle link: measured for the in-process ivshmem consumers only.
    for case in ["ivshmem-poll", "ivshmem-hybrid", "ivshmem-irq"] {
        let row = rows
            .iter()
            .find(|r| r["case"] == case && r["metric"] == "idle_cpu_pct")
            .unwrap_or_else(|| panic!("missing ({case}, idle_cpu_pct) in {rows:?}"));
        assert_eq!(row["unit"], "%");
        let value = row["value"].as_f64().unwrap();
        assert!((0.0..=100.0 * 1.1).contains(&value), "{case}: {value} %");
    }
    assert_eq!(rows.len(), 7 * 3 + 3, "{rows:?}");
    for chart in [
        "telemetry-p50_ns.svg",
        "telemetry-p99_ns.svg",
        "telemetry-max_rate_per_s.svg",
        "telemetry-idle_cpu_pct.svg",
        "telemetry-latency-cdf.svg",
    ] {
        let svg = std::fs::read_to_string(plots.join(chart))
            .unwrap_or_else(|e| panic!("chart {chart}: {e}"));
        assert!(
            svg.starts_with("<svg") && svg.contains("ivshmem-hybrid"),
            "{chart}"
        );
    }
    let _ = std::fs::remove_dir_all(&plots);
}
