//! Issue 15: configurations far larger than any real system are validated (or refused) by
//! linear steps. Nothing here is timed: with the old quadratic scans (cells x peers, a scan of
//! every link per cell, list scans of CPUs) these systems took minutes in a debug build; their
//! cost is measured by `ivbench scale` (case `validate-64k`).

use hypervisor::config::{CellTable, LinkTable, ProblemKind, SizeSpec, SystemConfig, SystemTable};

/// `cells` process cells `c0, c1, …` (cell i owns CPU i) and `cells / 2` links `l0, l1, …`,
/// link i joining cells 2i and 2i+1.
fn big_system(cells: usize) -> SystemConfig {
    SystemConfig {
        system: Some(SystemTable {
            name: Some("big".into()),
            control_socket: Some("/tmp/ivshmem-stack-config-scale.sock".into()),
            allow_shared_cpus: false,
        }),
        cells: (0..cells)
            .map(|i| CellTable {
                name: Some(format!("c{i}")),
                cpus: Some(vec![i]),
                command: Some("/bin/true".into()),
                ..CellTable::default()
            })
            .collect(),
        links: (0..cells / 2)
            .map(|i| LinkTable {
                name: Some(format!("l{i}")),
                peers: Some(vec![format!("c{}", 2 * i), format!("c{}", 2 * i + 1)]),
                protocol: Some(hypervisor::config::ProtocolSpec::Number(0x4001)),
                output_size: Some(SizeSpec::Text("4K".into())),
                ..LinkTable::default()
            })
            .collect(),
    }
}

#[test]
fn a_system_of_65536_cells_and_32768_links_validates() {
    let config = big_system(65_536);
    let valid = config.validate().expect("a valid system");
    assert_eq!(valid.cells.len(), 65_536);
    assert_eq!(valid.links.len(), 32_768);
    assert!(valid.warnings.is_empty(), "{:?}", &valid.warnings[..1]);
    // Peer indexes and each cell's memberships are resolved by name lookups.
    let last = &valid.links[32_767];
    assert_eq!(last.peer_cells, vec![65_534, 65_535]);
    let cell = &valid.cells[65_535];
    assert_eq!(cell.links.len(), 1);
    assert_eq!((cell.links[0].link, cell.links[0].peer_id), (32_767, 1));
}

#[test]
fn a_huge_system_with_mistakes_reports_each_once_with_a_short_fix() {
    let mut config = big_system(65_537);
    // The last cell reuses the first one's name, a link names a cell that does not exist, and
    // one more cell is on no link.
    config.cells[65_536].name = Some("c0".into());
    config.cells.push(CellTable {
        name: Some("lonely".into()),
        cpus: Some(vec![70_000]),
        command: Some("/bin/true".into()),
        ..CellTable::default()
    });
    config.links[100].peers = Some(vec!["c200".into(), "nobody".into()]);
    let errors = config.validate().expect_err("refused");
    let duplicate: Vec<_> = errors
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::DuplicateCellName)
        .collect();
    assert_eq!(duplicate.len(), 1, "{errors}");
    assert!(
        duplicate[0].message.contains("cells[0]"),
        "{}",
        duplicate[0]
    );
    let unknown = errors
        .find(ProblemKind::UnknownCell, r#"links[100] "l100" .peers[1]"#)
        .unwrap_or_else(|| panic!("no unknown-cell error in {errors}"));
    // The fix names a few cells and how many more there are, not all 65,538.
    assert!(unknown.fix.contains("more)"), "{}", unknown.fix);
    assert!(unknown.fix.len() < 400, "{} bytes", unknown.fix.len());
    // c201 lost its link; "lonely" never had one: warnings by name, found by a set lookup.
    let without_link: Vec<&str> = errors
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::CellWithoutLink)
        .map(|p| p.location.as_str())
        .collect();
    assert_eq!(
        without_link,
        [r#"cells[201] "c201""#, r#"cells[65537] "lonely""#],
        "{errors}"
    );
}

#[test]
fn a_cell_listing_100000_cpus_with_one_twice_gets_one_error() {
    let mut config = big_system(2);
    let mut cpus: Vec<usize> = (10..100_010).collect();
    cpus.push(5_000);
    config.cells[0].cpus = Some(cpus);
    let errors = config.validate().expect_err("refused");
    let twice: Vec<_> = errors
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::DuplicateCpu)
        .collect();
    assert_eq!(twice.len(), 1, "{errors}");
    assert!(twice[0].message.contains("CPU 5000"), "{}", twice[0]);
}

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
