//! Issue 15: `hypervisor check` refuses systems beyond this machine's fd and mapping limits,
//! with the figures and a fix; the shipped large configurations are valid. (The validation of
//! huge systems is tested in the root package's `tests/scale_config.rs`.)

use hypervisor::config::ProblemKind;

/// `hypervisor check` refuses a system whose hypervisor would run out of fds, with the figure
/// and the `ulimit` that fixes it; with room to spare the same system is accepted.
#[test]
fn check_refuses_64_links_under_a_low_fd_limit() {
    use hypervisor::config::{load_and_validate, ProcessLimits};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/cell-64-links.toml");
    let valid = load_and_validate(path, None).expect("the shipped configuration is valid");
    // 64 links of 2 peers, INTx: 2 x 3 sections + 2 eventfds = 8 fds each.
    assert!((0..64).all(|link| valid.link_fds(link) == 8));
    let needed = valid.hypervisor_fds();
    assert_eq!(
        needed,
        hypervisor::config::HYPERVISOR_BASE_FDS + 64 * 8 + 2 * 2
    );
    let problems = valid.check_limits(ProcessLimits {
        fds_soft: 400,
        fds_hard: 4096,
        max_map_count: 65_530,
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].kind, ProblemKind::FdLimit);
    assert!(problems[0]
        .message
        .contains(&format!("about {needed} open fds")));
    assert!(problems[0].fix.contains(&format!("ulimit -n {needed}")));
    // Beyond the hard limit the fix is the hard limit.
    let problems = valid.check_limits(ProcessLimits {
        fds_soft: 400,
        fds_hard: 400,
        max_map_count: 65_530,
    });
    assert!(problems[0].fix.contains("hard limit"), "{}", problems[0]);
    // Each cell needs 1 fd per section and 2 eventfds per link: 5 x 64 + its own.
    let (cell_fds, maps) = valid.cell_needs(0);
    assert_eq!(
        (cell_fds, maps),
        (hypervisor::config::CELL_BASE_FDS + 64 * 5, 64 * 3)
    );
    let problems = valid.check_limits(ProcessLimits {
        fds_soft: 300,
        fds_hard: 4096,
        max_map_count: 100,
    });
    let kinds: Vec<&str> = problems.iter().map(|p| p.location.as_str()).collect();
    // Both cells need as much; the check names one.
    assert_eq!(
        kinds,
        ["links", r#"cells[1] "leaf""#, r#"cells[1] "leaf""#],
        "{problems:?}"
    );
    assert!(
        problems[2].message.contains("192 sections"),
        "{}",
        problems[2]
    );
    assert!(valid
        .check_limits(ProcessLimits {
            fds_soft: 1024,
            fds_hard: 1024,
            max_map_count: 65_530,
        })
        .is_empty());

    // The CLI applies this process's limits.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" check \"$1\"")
        .arg(env!("CARGO_BIN_EXE_hypervisor"))
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("RLIMIT_NOFILE"), "{stderr}");
    assert!(stderr.contains(&format!("ulimit -n {needed}")), "{stderr}");
}

/// The 16-peer configuration is valid and its link is as large as the device allows.
#[test]
fn the_16_peer_configuration_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/link-16-peers.toml");
    let valid = hypervisor::config::load_and_validate(path, None).unwrap();
    assert_eq!(valid.links[0].peers.len(), hypervisor::config::MAX_PEERS);
    // 2 fds for each of 18 sections (state table, R/W, 16 outputs) and 16 eventfds.
    assert_eq!(valid.link_fds(0), 2 * 18 + 16);
}
