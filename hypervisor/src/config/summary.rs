//! The readable summary `hypervisor check` prints for a valid configuration.

use std::fmt;

use super::validate::cpu_list;
use super::{describe_protocol, human_size, CellKind, Region, ValidConfig};

/// Displays a [`ValidConfig`]: cells with CPUs and kind, links with peers and IDs, protocol
/// and the offset and size of every section, then the warnings.
pub struct Summary<'a> {
    config: &'a ValidConfig,
}

impl<'a> Summary<'a> {
    pub(super) fn new(config: &'a ValidConfig) -> Self {
        Self { config }
    }
}

fn region(f: &mut fmt::Formatter<'_>, what: &str, region: Region, note: &str) -> fmt::Result {
    if region.size == 0 {
        writeln!(
            f,
            "      {what:<14} offset {:#010x}  size 0 (absent){note}",
            region.offset
        )
    } else {
        writeln!(
            f,
            "      {what:<14} offset {:#010x}  size {:#010x} ({}){note}",
            region.offset,
            region.size,
            human_size(region.size)
        )
    }
}

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.config;
        writeln!(
            f,
            "system \"{}\": configuration is valid ({} cell{}, {} link{}, {} warning{})",
            config.name,
            config.cells.len(),
            if config.cells.len() == 1 { "" } else { "s" },
            config.links.len(),
            if config.links.len() == 1 { "" } else { "s" },
            config.warnings.len(),
            if config.warnings.len() == 1 { "" } else { "s" },
        )?;
        writeln!(
            f,
            "control socket: {}{}",
            config.control_socket.display(),
            if config.control_socket_is_default {
                " (default)"
            } else {
                ""
            }
        )?;
        writeln!(f, "cells:")?;
        for cell in &config.cells {
            write!(
                f,
                "  {:<20} {:<8} cpus {:<8}",
                cell.name,
                cell.kind.as_str(),
                cpu_list(&cell.cpus)
            )?;
            match cell.kind {
                CellKind::Process => {
                    write!(f, " command: {}", cell.command.as_deref().unwrap_or(""))?;
                    for arg in &cell.args {
                        write!(f, " {arg}")?;
                    }
                }
                CellKind::Kvm => {
                    write!(
                        f,
                        " memory: {} image: {}",
                        human_size(cell.memory.unwrap_or(0)),
                        cell.image
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    )?;
                }
            }
            writeln!(f)?;
            for membership in &cell.links {
                writeln!(
                    f,
                    "      on link \"{}\" as peer {}",
                    config.links[membership.link].name, membership.peer_id
                )?;
            }
        }
        writeln!(f, "links:")?;
        for link in &config.links {
            writeln!(
                f,
                "  {}: protocol {}, interrupts {}, {} peers",
                link.name,
                describe_protocol(link.protocol),
                link.interrupts,
                link.peers.len()
            )?;
            let peers: Vec<String> = link
                .peers
                .iter()
                .enumerate()
                .map(|(id, peer)| format!("{id} = {peer}"))
                .collect();
            writeln!(f, "    peers (ID = cell): {}", peers.join(", "))?;
            writeln!(
                f,
                "    layout (total {:#x} bytes, {}):",
                link.layout.total_size(),
                human_size(link.layout.total_size())
            )?;
            region(f, "state table", link.layout.state_table(), "")?;
            region(f, "R/W section", link.layout.rw(), "")?;
            for (id, peer) in link.peers.iter().enumerate() {
                let Some(output) = link.layout.output(id as u16) else {
                    continue;
                };
                region(
                    f,
                    &format!("output {id}"),
                    output,
                    &format!("  written by {peer}"),
                )?;
            }
        }
        if !config.warnings.is_empty() {
            writeln!(f, "warnings:")?;
            for warning in &config.warnings {
                writeln!(f, "{warning}")?;
            }
        }
        Ok(())
    }
}
