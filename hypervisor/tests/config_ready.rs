//! Every ready configuration in `configs/` validates, resolves as documented and explains
//! its keys.

use std::path::PathBuf;

use hypervisor::config::{load_and_validate, CellKind, InterruptMode, SystemConfig, ValidConfig};

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

fn config_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .expect("configs/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn load(name: &str) -> ValidConfig {
    load_and_validate(configs_dir().join(name), Some(2))
        .unwrap_or_else(|errors| panic!("{name}: {errors}"))
}

#[test]
fn every_ready_config_validates_on_a_two_cpu_machine() {
    let files = config_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["telemetry.toml", "vnet.toml", "three-cells.toml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    for file in &files {
        let config = SystemConfig::load(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        config
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        config
            .validate_for_machine(2)
            .unwrap_or_else(|e| panic!("{} on 2 CPUs: {e}", file.display()));
    }
}

#[test]
fn telemetry_is_a_one_to_one_telemetry_link() {
    let config = load("telemetry.toml");
    assert_eq!(config.name, "telemetry");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let names: Vec<&str> = config.cells.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["rtos-telemetry", "linux-consumer"]);
    assert!(config
        .cells
        .iter()
        .all(|c| c.kind == CellKind::Process && c.command.is_some()));
    let link = config.link("telemetry").unwrap();
    assert_eq!(link.protocol, 0x4001);
    assert_eq!(link.peers, ["rtos-telemetry", "linux-consumer"]);
    assert_eq!(link.peer_cells, [0, 1]);
    assert_eq!(link.interrupts, InterruptMode::Intx);
    assert_eq!(link.max_peers(), 2);
    assert_eq!(link.layout.state_table().offset, 0);
    assert_eq!(
        link.layout.output(0).unwrap().offset,
        link.state_table_size + link.rw_size
    );
    assert_eq!(
        link.layout.total_size(),
        link.state_table_size + link.rw_size + 2 * link.output_size
    );
    // Each cell knows its peer ID on the link.
    let producer = config.cell("rtos-telemetry").unwrap();
    assert_eq!(producer.links.len(), 1);
    assert_eq!(producer.links[0].peer_id, 0);
    assert_eq!(config.cell("linux-consumer").unwrap().links[0].peer_id, 1);
}

#[test]
fn vnet_is_an_ethernet_link_between_two_process_cells() {
    let config = load("vnet.toml");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.cells.len(), 2);
    assert_eq!(config.links.len(), 1);
    assert_eq!(config.links[0].protocol, 0x0001);
    assert_eq!(config.links[0].peers.len(), 2);
}

#[test]
fn three_cells_has_a_three_peer_link() {
    let config = load("three-cells.toml");
    let link = &config.links[0];
    assert_eq!(link.peers.len(), 3);
    assert_eq!(link.layout.output(2).unwrap().size, link.output_size);
    assert!(link.layout.output(3).is_none());
    for (id, &cell) in link.peer_cells.iter().enumerate() {
        assert_eq!(config.cells[cell].name, link.peers[id]);
        assert_eq!(usize::from(config.cells[cell].links[0].peer_id), id);
    }
}

/// The first use of every key in a ready config has a comment right above it (or on its line).
#[test]
fn ready_configs_explain_every_key() {
    for file in config_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let mut explained: Vec<String> = Vec::new();
        for (number, line) in lines.iter().enumerate() {
            if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
                continue;
            }
            let key = line.split('=').next().unwrap().trim().to_owned();
            if explained.contains(&key) {
                continue;
            }
            let commented = line.contains('#') || number > 0 && lines[number - 1].starts_with('#');
            assert!(
                commented,
                "{}:{}: first use of `{key}` has no comment",
                file.display(),
                number + 1
            );
            explained.push(key);
        }
    }
}

#[test]
fn control_socket_default_and_override() {
    use hypervisor::config::default_control_socket_for;
    use std::path::Path;
    let xdg = Some(Path::new("/run/user/1000"));
    assert_eq!(
        default_control_socket_for("vnet", 0, xdg),
        Path::new("/run/ivshmem-stack/vnet.sock")
    );
    assert_eq!(
        default_control_socket_for("vnet", 1000, xdg),
        Path::new("/run/user/1000/ivshmem-stack/vnet.sock")
    );
    assert_eq!(
        default_control_socket_for("vnet", 1000, None),
        Path::new("/tmp/ivshmem-stack-1000/vnet.sock")
    );
    // The ready configs use the default; an explicit path replaces it.
    assert!(load("vnet.toml").control_socket_is_default);
    let text = std::fs::read_to_string(configs_dir().join("vnet.toml"))
        .unwrap()
        .replace("# control_socket = ", "control_socket = ");
    let valid = SystemConfig::from_toml_str(&text)
        .unwrap()
        .validate()
        .unwrap();
    assert!(!valid.control_socket_is_default);
    assert_eq!(valid.control_socket, Path::new("/tmp/vnet.sock"));
}

/// Issue 14 item 16: every command a ready configuration names exists: an absolute path on
/// this machine, or `target/release/examples/NAME` of an example the root package builds
/// (`examples/NAME.rs`).
#[test]
fn ready_configs_name_programs_that_exist_or_are_built_here() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for file in config_files() {
        let config = load(file.file_name().unwrap().to_str().unwrap());
        for cell in config.cells.iter().filter(|c| c.kind == CellKind::Process) {
            let command = cell.command.as_deref().unwrap();
            let exists = match command.strip_prefix("target/release/examples/") {
                Some(example) => examples.join(format!("{example}.rs")).is_file(),
                None => std::path::Path::new(command).is_file(),
            };
            assert!(
                exists,
                "{}: cell {}: command {command} is not built by this workspace",
                file.display(),
                cell.name
            );
        }
    }
}

/// A link's default PCI address for KVM peers is what `kvm/mod.rs`, `config.rs` and
/// `kvm-cells.md` say: 01:0e.0 for the first link, the next device for the next.
#[test]
fn a_links_default_pci_address_is_01_0e_0_as_documented() {
    let text = r#"
[system]
name = "bdf"
allow_shared_cpus = true

[[cells]]
name = "vm"
kind = "kvm"
cpus = [0]
memory = "1M"
image = "vm.bin"

[[cells]]
name = "p"
cpus = [0]
command = "/bin/true"

[[links]]
name = "first"
peers = ["vm", "p"]
protocol = 0x4000
output_size = "4K"

[[links]]
name = "second"
peers = ["vm", "p"]
protocol = 0x4000
output_size = "4K"
"#;
    let valid = SystemConfig::from_toml_str(text)
        .unwrap()
        .validate()
        .unwrap();
    let bdfs: Vec<String> = valid.links.iter().map(|l| l.bdf.to_string()).collect();
    assert_eq!(bdfs, ["01:0e.0", "01:0f.0"]);
}
