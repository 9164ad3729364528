//! Issue 15: configurations far larger than any real system are validated (or refused) by
//! linear steps. Nothing here is timed: with the old quadratic scans (cells x peers, a scan of
//! every link per cell, list scans of CPUs) these systems took minutes in a debug build; their
//! cost is measured by `ivbench scale` (case `validate-64k`).

use hypervisor::config::{CellTable, ProblemKind};
use ivshmem_stack::bench::scale::big_config as big_system;

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
