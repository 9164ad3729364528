//! Malformed configurations: each must be refused with the location of the problem, what is
//! wrong and a fix, and every problem in a file must be reported, not only the first.

use hypervisor::config::{
    ConfigErrors, InterruptMode, Problem, ProblemKind, Severity, SystemConfig,
};

/// A valid two-cell system, the base most cases modify.
const GOOD: &str = r#"
[system]
name = "sys"

[[cells]]
name = "a"
cpus = [0]
command = "/bin/true"

[[cells]]
name = "b"
cpus = [1]
command = "/bin/true"

[[links]]
name = "l"
peers = ["a", "b"]
protocol = "telemetry"
output_size = "4K"
"#;

/// Parses and validates; the configuration must be refused.
fn refused(text: &str) -> ConfigErrors {
    match SystemConfig::from_toml_str(text).and_then(|config| config.validate()) {
        Ok(valid) => panic!("configuration was accepted: {valid:?}\n{text}"),
        Err(errors) => errors,
    }
}

/// Asserts there is an error of `kind` at exactly `location` whose message contains every
/// word of `message` and that has a fix; returns it.
fn expect<'a>(
    errors: &'a ConfigErrors,
    kind: ProblemKind,
    location: &str,
    message: &[&str],
) -> &'a Problem {
    let problem = errors
        .find(kind, location)
        .unwrap_or_else(|| panic!("no {kind:?} at `{location}` in:\n{errors}"));
    assert_eq!(problem.severity, Severity::Error, "{problem}");
    for word in message {
        assert!(
            problem.message.contains(word),
            "message of {kind:?} at {location} lacks {word:?}: {}",
            problem.message
        );
    }
    assert!(!problem.fix.is_empty(), "no fix for {problem}");
    problem
}

#[test]
fn toml_syntax_error_names_line_and_column() {
    let errors = refused("[system]\nname = \"sys\"\n[[cells]]\nname = = \"a\"\n");
    assert_eq!(errors.problems.len(), 1);
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::Syntax);
    assert_eq!(problem.location, "cells[0] (line 4, column 8)");
    assert!(!problem.message.is_empty());
}

#[test]
fn unknown_field_names_the_key_its_table_and_line() {
    let text = GOOD.replace("cpus = [1]", "cpu = [1]");
    let errors = refused(&text);
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::UnknownField);
    assert!(problem.message.contains("unknown field `cpu`"), "{problem}");
    assert!(
        problem.message.contains("`cpus`"),
        "should list the accepted keys: {problem}"
    );
    // The second [[cells]] table, on line 12 of GOOD.
    assert_eq!(problem.location, "cells[1] (line 12, column 1)");
}

#[test]
fn wrong_value_type_names_its_line() {
    let errors = refused(&GOOD.replace("cpus = [0]", "cpus = \"0\""));
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::InvalidValue);
    assert!(
        problem
            .location
            .starts_with("cells[0] .cpus (line 7, column 8)"),
        "{problem}"
    );
    assert!(problem.message.contains("invalid type"), "{problem}");
}

/// A negative size is refused with the form a size takes as the fix, at its key.
#[test]
fn negative_size_names_its_key_and_the_expected_form() {
    let errors = refused(&GOOD.replace("output_size = \"4K\"", "output_size = -5"));
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::InvalidValue);
    assert!(
        problem.location.starts_with("links[0] .output_size (line"),
        "{problem}"
    );
    assert!(problem.fix.contains("\"4K\""), "{problem}");
}

#[test]
fn every_missing_field_is_reported_with_its_location() {
    let text = r#"
[system]

[[cells]]
name = "a"

[[cells]]
name = "b"
cpus = [1]
command = "/bin/true"

[[links]]
name = "l"
peers = ["a", "b"]
"#;
    let errors = refused(text);
    expect(
        &errors,
        ProblemKind::MissingField,
        "system .name",
        &["`name`"],
    );
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"cells[0] "a" .cpus"#,
        &["`cpus`"],
    );
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"cells[0] "a" .command"#,
        &["`command`"],
    );
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"links[0] "l" .protocol"#,
        &["`protocol`"],
    );
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"links[0] "l" .output_size"#,
        &["`output_size`"],
    );
    assert_eq!(errors.error_count(), 5, "{errors}");
}

#[test]
fn missing_system_table() {
    let text = GOOD.replace("[system]\nname = \"sys\"\n", "");
    let errors = refused(&text);
    expect(&errors, ProblemKind::MissingField, "system", &["`system`"]);
}

#[test]
fn no_cells() {
    let errors = refused("[system]\nname = \"empty\"\n");
    let problem = expect(&errors, ProblemKind::NoCells, "cells", &["no cells"]);
    assert!(problem.fix.contains("[[cells]]"), "{problem}");
}

#[test]
fn duplicate_cell_name() {
    let errors = refused(&GOOD.replace("name = \"b\"", "name = \"a\""));
    expect(
        &errors,
        ProblemKind::DuplicateCellName,
        r#"cells[1] "a" .name"#,
        &["\"a\"", "cells[0]"],
    );
}

#[test]
fn empty_and_invalid_cell_names() {
    let errors = refused(
        &GOOD
            .replace("name = \"a\"", "name = \"\"")
            .replace("name = \"b\"", "name = \"bad/name\""),
    );
    expect(
        &errors,
        ProblemKind::InvalidName,
        "cells[0] .name",
        &["empty"],
    );
    let problem = expect(
        &errors,
        ProblemKind::InvalidName,
        r#"cells[1] "bad/name" .name"#,
        &["\"bad/name\""],
    );
    assert!(problem.fix.contains("letters, digits"), "{problem}");
    // The link now names cells that do not exist; those are reported too.
    expect(
        &errors,
        ProblemKind::UnknownCell,
        r#"links[0] "l" .peers[0]"#,
        &["\"a\""],
    );
    expect(
        &errors,
        ProblemKind::UnknownCell,
        r#"links[0] "l" .peers[1]"#,
        &["\"b\""],
    );
}

#[test]
fn empty_cpu_list() {
    let errors = refused(&GOOD.replace("cpus = [1]", "cpus = []"));
    expect(
        &errors,
        ProblemKind::EmptyCpus,
        r#"cells[1] "b" .cpus"#,
        &["empty"],
    );
}

#[test]
fn cpu_listed_twice_in_one_cell() {
    let errors = refused(&GOOD.replace("cpus = [1]", "cpus = [1, 2, 1]"));
    expect(
        &errors,
        ProblemKind::DuplicateCpu,
        r#"cells[1] "b" .cpus"#,
        &["CPU 1", "more than once"],
    );
    assert_eq!(errors.error_count(), 1, "{errors}");
}

#[test]
fn cpus_overlapping_between_cells() {
    let errors = refused(&GOOD.replace("cpus = [1]", "cpus = [1, 0]"));
    let problem = expect(
        &errors,
        ProblemKind::OverlappingCpus,
        r#"cells[1] "b" .cpus"#,
        &["CPU 0", r#"cells[0] "a""#],
    );
    assert!(problem.fix.contains("allow_shared_cpus"), "{problem}");
}

#[test]
fn shared_cpus_are_a_warning_when_allowed() {
    let text = GOOD
        .replace("cpus = [1]", "cpus = [0]")
        .replace("name = \"sys\"", "name = \"sys\"\nallow_shared_cpus = true");
    let valid = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(valid.warnings.len(), 1);
    assert_eq!(valid.warnings[0].kind, ProblemKind::SharedCpus);
    assert_eq!(valid.warnings[0].location, r#"cells[1] "b" .cpus"#);
}

#[test]
fn cpu_beyond_the_machine_is_a_separate_check() {
    let text = GOOD.replace("cpus = [1]", "cpus = [1, 5, 7]");
    let config = SystemConfig::from_toml_str(&text).unwrap();
    // Machine-independent validation accepts it...
    config.validate().unwrap();
    // ...the check for a 2-CPU machine does not.
    let problems = config.check_cpus_exist(2);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].kind, ProblemKind::CpuOutOfRange);
    assert_eq!(problems[0].location, r#"cells[1] "b" .cpus"#);
    assert!(
        problems[0].message.contains("CPUs 5, 7 do not exist"),
        "{}",
        problems[0]
    );
    assert!(
        problems[0].message.contains("has 2 CPUs (0-1)"),
        "{}",
        problems[0]
    );
    // On an 8-CPU machine everything exists.
    assert!(config.check_cpus_exist(8).is_empty());
    assert!(config.validate_for_machine(8).is_ok());
    // validate_for_machine reports it together with the other problems.
    let text = text.replace("protocol = \"telemetry\"", "protocol = 70000");
    let errors = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate_for_machine(2)
        .unwrap_err();
    expect(
        &errors,
        ProblemKind::CpuOutOfRange,
        r#"cells[1] "b" .cpus"#,
        &["5, 7"],
    );
    expect(
        &errors,
        ProblemKind::InvalidProtocol,
        r#"links[0] "l" .protocol"#,
        &["70000", "out of range"],
    );
}

#[test]
fn process_cell_without_command() {
    let errors = refused(&GOOD.replacen("command = \"/bin/true\"\n", "", 1));
    let problem = expect(
        &errors,
        ProblemKind::MissingField,
        r#"cells[0] "a" .command"#,
        &["`command`"],
    );
    assert!(problem.fix.contains("process cell"), "{problem}");
}

#[test]
fn kvm_cell_without_memory_and_image() {
    let errors = refused(&GOOD.replacen("command = \"/bin/true\"", "kind = \"kvm\"", 1));
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"cells[0] "a" .memory"#,
        &["`memory`"],
    );
    expect(
        &errors,
        ProblemKind::MissingField,
        r#"cells[0] "a" .image"#,
        &["`image`"],
    );
    assert_eq!(errors.error_count(), 2, "{errors}");
}

#[test]
fn kvm_cell_with_bad_memory_and_process_keys() {
    let text = GOOD.replacen(
        "command = \"/bin/true\"",
        "kind = \"kvm\"\nmemory = 1000000\nimage = \"x.bin\"\nargs = [\"-v\"]",
        1,
    );
    let errors = refused(&text);
    expect(
        &errors,
        ProblemKind::InvalidSize,
        r#"cells[0] "a" .memory"#,
        &["1000000 bytes", "not a multiple of the page size"],
    );
    expect(
        &errors,
        ProblemKind::FieldNotForKind,
        r#"cells[0] "a" .args"#,
        &["only for process cells"],
    );
}

#[test]
fn unknown_cell_kind() {
    let errors = refused(&GOOD.replacen("cpus = [0]", "cpus = [0]\nkind = \"vm\"", 1));
    expect(
        &errors,
        ProblemKind::InvalidValue,
        r#"cells[0] "a" .kind"#,
        &["\"vm\""],
    );
}

#[test]
fn link_naming_an_unknown_cell() {
    let errors = refused(&GOOD.replace(r#"peers = ["a", "b"]"#, r#"peers = ["a", "b", "c"]"#));
    let problem = expect(
        &errors,
        ProblemKind::UnknownCell,
        r#"links[0] "l" .peers[2]"#,
        &["no cell called \"c\""],
    );
    assert!(
        problem.fix.contains("a, b"),
        "fix should list the cells: {problem}"
    );
}

#[test]
fn duplicate_peer_in_a_link() {
    let errors = refused(&GOOD.replace(r#"peers = ["a", "b"]"#, r#"peers = ["a", "b", "a"]"#));
    expect(
        &errors,
        ProblemKind::DuplicatePeer,
        r#"links[0] "l" .peers[2]"#,
        &["\"a\"", "already peer 0"],
    );
}

#[test]
fn fewer_than_two_peers() {
    let errors = refused(&GOOD.replace(r#"peers = ["a", "b"]"#, r#"peers = ["a"]"#));
    expect(
        &errors,
        ProblemKind::TooFewPeers,
        r#"links[0] "l" .peers"#,
        &["at least 2", "has 1"],
    );
}

#[test]
fn more_peers_than_the_device_supports() {
    let mut text = String::from("[system]\nname = \"big\"\n");
    for i in 0..17 {
        text += &format!("[[cells]]\nname = \"c{i}\"\ncpus = [{i}]\ncommand = \"x\"\n");
    }
    let peers: Vec<String> = (0..17).map(|i| format!("\"c{i}\"")).collect();
    text += &format!(
        "[[links]]\nname = \"all\"\npeers = [{}]\nprotocol = 0x4000\noutput_size = \"4K\"\n",
        peers.join(", ")
    );
    let errors = refused(&text);
    expect(
        &errors,
        ProblemKind::TooManyPeers,
        r#"links[0] "all" .peers"#,
        &["at most 16", "has 17"],
    );
}

#[test]
fn zero_and_too_small_state_table() {
    let errors = refused(&GOOD.replace("output_size", "state_table_size = 0\noutput_size"));
    expect(
        &errors,
        ProblemKind::InvalidSize,
        r#"links[0] "l" .state_table_size"#,
        &["is 0", "4 bytes per peer"],
    );

    let errors = refused(&GOOD.replace("output_size", "state_table_size = 4\noutput_size"));
    let location = r#"links[0] "l" .state_table_size"#;
    expect(
        &errors,
        ProblemKind::InvalidSize,
        location,
        &["cannot hold 4 bytes for each of the 2 peers"],
    );
    // One error per key: the fix ("4K") mends the alignment too.
    let at_key = errors.problems.iter().filter(|p| p.location == location);
    assert_eq!(at_key.count(), 1, "{errors}");

    // `1 byte`, not `1 bytes`.
    let errors = refused(&GOOD.replace("output_size", "state_table_size = \"1\"\noutput_size"));
    let problem = expect(&errors, ProblemKind::InvalidSize, location, &["(1 byte)"]);
    assert!(!problem.message.contains("1 bytes"), "{problem}");
    assert_eq!(errors.problems.len(), 1, "{errors}");
}

#[test]
fn unaligned_section_sizes() {
    let text = GOOD.replace(
        "output_size = \"4K\"",
        "output_size = 5000\nrw_size = \"6K\"",
    );
    let errors = refused(&text);
    let output = expect(
        &errors,
        ProblemKind::InvalidSize,
        r#"links[0] "l" .output_size"#,
        &["0x1388", "not a multiple of the page size"],
    );
    assert!(
        output.fix.contains("0x2000"),
        "fix should suggest the rounded size: {output}"
    );
    expect(
        &errors,
        ProblemKind::InvalidSize,
        r#"links[0] "l" .rw_size"#,
        &["0x1800"],
    );
}

#[test]
fn output_size_zero_only_with_an_rw_section() {
    let errors = refused(&GOOD.replace("output_size = \"4K\"", "output_size = 0"));
    expect(
        &errors,
        ProblemKind::InvalidSize,
        r#"links[0] "l" .output_size"#,
        &["both 0"],
    );
    // With an R/W section, output size 0 (no output sections) is allowed by the spec.
    let text = GOOD.replace("output_size = \"4K\"", "output_size = 0\nrw_size = \"8K\"");
    let valid = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate()
        .unwrap();
    let layout = &valid.links[0].layout;
    assert_eq!(layout.rw().size, 0x2000);
    assert_eq!(layout.output(1).unwrap().size, 0);
    assert_eq!(layout.total_size(), 0x3000);
}

#[test]
fn unparsable_size_string() {
    let errors = refused(&GOOD.replace("output_size = \"4K\"", "output_size = \"4KB\""));
    expect(
        &errors,
        ProblemKind::InvalidValue,
        r#"links[0] "l" .output_size"#,
        &["ambiguous"],
    );
}

#[test]
fn msix_takes_1_to_16_vectors_and_intx_exactly_one() {
    let with = |keys: &str| GOOD.replace("output_size", &format!("{keys}\noutput_size"));
    for (keys, expected) in [
        (
            "interrupts = \"msix\"\nvectors = 16",
            InterruptMode::Msix { vectors: 16 },
        ),
        ("interrupts = \"MSI-X\"", InterruptMode::Msix { vectors: 1 }),
        ("interrupts = \"intx\"\nvectors = 1", InterruptMode::Intx),
        ("", InterruptMode::Intx),
    ] {
        let config = SystemConfig::from_toml_str(&with(keys)).unwrap();
        let valid = config.validate().unwrap();
        assert_eq!(valid.links[0].interrupts, expected, "{keys}");
    }
    for n in [0, 17, -1, 65_536] {
        let errors = refused(&with(&format!("interrupts = \"msix\"\nvectors = {n}")));
        let problem = expect(
            &errors,
            ProblemKind::InvalidVectors,
            r#"links[0] "l" .vectors"#,
            &[&format!("{n} vectors"), "1 to 16"],
        );
        assert!(problem.fix.contains("vectors = 1 up to 16"), "{problem}");
        assert_eq!(errors.error_count(), 1, "{errors}");
    }
    let errors = refused(&with("vectors = 4"));
    let problem = expect(
        &errors,
        ProblemKind::InvalidVectors,
        r#"links[0] "l" .vectors"#,
        &["INTx has exactly one vector"],
    );
    assert!(problem.fix.contains("msix"), "{problem}");
    let errors = refused(&with("interrupts = \"edge\""));
    let problem = expect(
        &errors,
        ProblemKind::UnsupportedInterrupts,
        r#"links[0] "l" .interrupts"#,
        &["unknown interrupt kind \"edge\""],
    );
    assert!(
        problem.fix.contains("msix") && problem.fix.contains("intx"),
        "{problem}"
    );
    // A link with a KVM cell defaults to MSI-X, what Jailhouse offers on x86.
    let kvm = GOOD.replacen(
        "command = \"/bin/true\"",
        "kind = \"kvm\"\nmemory = \"1M\"\nimage = \"inmate.bin\"",
        1,
    );
    let valid = SystemConfig::from_toml_str(&kvm)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(
        valid.links[0].interrupts,
        InterruptMode::Msix { vectors: 1 }
    );
}

#[test]
fn protocol_out_of_range_or_unknown_name() {
    let errors = refused(&GOOD.replace("protocol = \"telemetry\"", "protocol = 0x10000"));
    expect(
        &errors,
        ProblemKind::InvalidProtocol,
        r#"links[0] "l" .protocol"#,
        &["65536", "out of range"],
    );
    let errors = refused(&GOOD.replace("protocol = \"telemetry\"", "protocol = \"ethernt\""));
    let problem = expect(
        &errors,
        ProblemKind::InvalidProtocol,
        r#"links[0] "l" .protocol"#,
        &["unknown protocol name \"ethernt\""],
    );
    assert!(
        problem.fix.contains("ethernet"),
        "fix should list the names: {problem}"
    );
}

#[test]
fn duplicate_link_name() {
    let text = format!("{GOOD}\n[[links]]\nname = \"l\"\npeers = [\"b\", \"a\"]\nprotocol = 1\noutput_size = \"4K\"\n");
    let errors = refused(&text);
    expect(
        &errors,
        ProblemKind::DuplicateLinkName,
        r#"links[1] "l" .name"#,
        &["\"l\"", "links[0]"],
    );
}

#[test]
fn cell_on_no_link_is_a_warning() {
    let text = format!("{GOOD}\n[[cells]]\nname = \"lonely\"\ncpus = [2]\ncommand = \"x\"\n");
    let valid = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(valid.warnings.len(), 1);
    let warning = &valid.warnings[0];
    assert_eq!(warning.severity, Severity::Warning);
    assert_eq!(warning.kind, ProblemKind::CellWithoutLink);
    assert_eq!(warning.location, r#"cells[2] "lonely""#);
    // Warnings also travel with errors.
    let errors = refused(&text.replace("protocol = \"telemetry\"", "protocol = -1"));
    assert_eq!(errors.warnings().count(), 1, "{errors}");
    assert_eq!(errors.error_count(), 1, "{errors}");
}

#[test]
fn control_socket_path_too_long() {
    let long = format!("/tmp/{}.sock", "s".repeat(120));
    let errors = refused(&GOOD.replace(
        "name = \"sys\"",
        &format!("name = \"sys\"\ncontrol_socket = \"{long}\""),
    ));
    expect(
        &errors,
        ProblemKind::InvalidSocketPath,
        "system .control_socket",
        &["at most 107"],
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let text = r#"
[system]
name = "many problems"

[[cells]]
name = "a"
cpus = []
command = "x"

[[cells]]
name = "a"
cpus = [3, 3]

[[links]]
name = "l"
peers = ["a", "zz"]
protocol = "nope"
output_size = 100
interrupts = "msi"
"#;
    let errors = refused(text);
    let expected = [
        (ProblemKind::InvalidName, "system .name"),
        (ProblemKind::EmptyCpus, r#"cells[0] "a" .cpus"#),
        (ProblemKind::DuplicateCellName, r#"cells[1] "a" .name"#),
        (ProblemKind::DuplicateCpu, r#"cells[1] "a" .cpus"#),
        (ProblemKind::MissingField, r#"cells[1] "a" .command"#),
        (ProblemKind::UnknownCell, r#"links[0] "l" .peers[1]"#),
        (ProblemKind::InvalidProtocol, r#"links[0] "l" .protocol"#),
        (ProblemKind::InvalidSize, r#"links[0] "l" .output_size"#),
        (
            ProblemKind::UnsupportedInterrupts,
            r#"links[0] "l" .interrupts"#,
        ),
    ];
    for (kind, location) in expected {
        assert!(
            errors.find(kind, location).is_some(),
            "missing {kind:?} at {location}:\n{errors}"
        );
    }
    assert_eq!(errors.error_count(), expected.len(), "{errors}");
    // The rendered report lists every one of them with its fix.
    let report = errors.to_string();
    assert!(
        report.starts_with("the configuration has 9 errors and 0 warnings"),
        "{report}"
    );
    assert_eq!(report.matches("\nerror: ").count(), 9, "{report}");
    assert_eq!(report.matches("\n  fix: ").count(), 9, "{report}");
}

#[test]
fn misspelt_table_is_an_unknown_field_at_its_header() {
    let errors = refused(&GOOD.replace("[system]", "[sytem]"));
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::UnknownField);
    assert!(
        problem.message.contains("unknown field `sytem`"),
        "{problem}"
    );
    assert_eq!(problem.location, "line 2, column 2");
}

#[test]
fn negative_cpu_number() {
    let errors = refused(&GOOD.replace("cpus = [1]", "cpus = [-1]"));
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::InvalidValue);
    assert!(
        problem
            .location
            .starts_with("cells[1] .cpus (line 12, column"),
        "{problem}"
    );
    assert!(problem.message.contains("-1"), "{problem}");
}

#[test]
fn reserved_protocol_is_a_warning() {
    let text = GOOD.replace("protocol = \"telemetry\"", "protocol = \"0x0002\"");
    let valid = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(valid.links[0].protocol, 2);
    assert_eq!(valid.warnings.len(), 1);
    assert_eq!(valid.warnings[0].kind, ProblemKind::ReservedProtocol);
    assert_eq!(valid.warnings[0].location, r#"links[0] "l" .protocol"#);
}

/// Issue 14 item 10: an absurd peer list gets one error (the limit), not one per peer.
#[test]
fn a_huge_peer_list_reports_the_limit_alone() {
    let peers: Vec<String> = (0..65_537)
        .map(|i| format!("\"p{}\"", i % 65_536))
        .collect();
    let text = GOOD.replace(
        r#"peers = ["a", "b"]"#,
        &format!("peers = [{}]", peers.join(", ")),
    );
    let errors = refused(&text);
    expect(
        &errors,
        ProblemKind::TooManyPeers,
        r#"links[0] "l" .peers"#,
        &["at most 16", "has 65537"],
    );
    let on_peers: Vec<&Problem> = errors
        .problems
        .iter()
        .filter(|p| p.location.starts_with(r#"links[0] "l" .peers"#))
        .collect();
    assert_eq!(on_peers.len(), 1, "one problem for the peer list: {errors}");
    assert!(
        errors.problems.len() < 10,
        "{} problems",
        errors.problems.len()
    );
}

/// Issue 14 item 9: the example in the fix for an unaligned size is itself a multiple of the
/// page size.
#[test]
fn the_fix_for_an_unaligned_size_is_itself_aligned() {
    // Near 2^64 the example must also fit the layout: see
    // `suggested_page_multiple_validates_itself`.
    for (size, want) in [("5000", 0x2000u64), ("0x10000001", 0x1000_1000)] {
        let text = GOOD.replace("output_size = \"4K\"", &format!("output_size = \"{size}\""));
        let errors = refused(&text);
        let problem = expect(
            &errors,
            ProblemKind::InvalidSize,
            r#"links[0] "l" .output_size"#,
            &["not a multiple of the page size"],
        );
        let example = problem
            .fix
            .rsplit("e.g. 0x")
            .next()
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or_else(|| panic!("no example in {:?}", problem.fix));
        assert_eq!(example, want, "{problem}");
        assert_eq!(example % 4096, 0, "{problem}");
    }
}

/// Issue 14 item 16: a misspelt table header is located at the top level, not inside the
/// table before it.
#[test]
fn a_misspelt_table_header_is_located_at_the_top_level() {
    let text = GOOD.replace("[[cells]]\nname = \"b\"", "[[cell]]\nname = \"b\"");
    let errors = refused(&text);
    let problem = errors
        .problems
        .iter()
        .find(|p| p.kind == ProblemKind::UnknownField)
        .unwrap_or_else(|| panic!("{errors}"));
    assert!(
        problem.location == "top level (line 10, column 3)",
        "{problem}"
    );
    assert!(problem.message.contains("`cell`"), "{problem}");
}

/// Issue 14 item 16: a file that is not text is called that, with a fix that fits.
#[test]
fn a_binary_file_is_not_taken_for_a_permission_problem() {
    let path = std::env::temp_dir().join(format!("binary-config-{}.toml", std::process::id()));
    std::fs::write(&path, [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0x00, 0x80]).unwrap();
    let errors = SystemConfig::load(&path).unwrap_err();
    let _ = std::fs::remove_file(&path);
    let problem = &errors.problems[0];
    assert_eq!(problem.kind, ProblemKind::Io);
    assert!(problem.message.contains("not text"), "{problem}");
    assert!(!problem.fix.contains("permissions"), "{problem}");
}

/// The rounded size a page-multiple error suggests validates itself: near 2^63 and 2^64 the
/// suggestion was a size that overflowed the layout (`0x8000000000000000`), and a size near
/// the address space's end panicked with an add overflow.
#[test]
fn suggested_page_multiple_validates_itself() {
    let location = r#"links[0] "l" .output_size"#;
    for size in [
        "9223372036854775807",
        "18446744073709551615",
        "0x7ffffffffffff000",
        "4097",
    ] {
        let text = GOOD.replace("output_size = \"4K\"", &format!("output_size = {size}"));
        let errors = refused(&text);
        let problem = errors
            .problems
            .iter()
            .find(|p| p.location == location)
            .unwrap_or_else(|| panic!("no error at {location} for {size}:\n{errors}"));
        let suggested = match problem.fix.split_once("e.g. ") {
            Some((_, rest)) if rest.starts_with("0x") => rest.to_owned(),
            _ => "\"64K\"".to_owned(),
        };
        let fixed = GOOD.replace(
            "output_size = \"4K\"",
            &format!("output_size = {suggested}"),
        );
        SystemConfig::from_toml_str(&fixed)
            .and_then(|config| config.validate())
            .unwrap_or_else(|errors| {
                panic!("{size}: the suggested {suggested} is refused too:\n{errors}")
            });
    }
}
