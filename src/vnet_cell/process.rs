//! A vnet link of a process cell of the hosted hypervisor: attach through
//! [`linux_uio_client::Endpoint`] and take the device over with a [`VnetLink`] (shmring
//! format) or an [`IvnetLink`] (Linux's `ivshmem-net` format), as [`Format`] says (what both
//! `examples/vnet_cell.rs` and `examples/vnet_tap.rs` start with).

use std::path::Path;

use linux_uio_client::{Endpoint, EndpointError, EndpointInterrupt, EndpointRegisters};

use vnet::ivnet::{Interrupts, IvnetConfig, IvnetError, IvnetLink};
use vnet::link::{LinkConfig, LinkError, VnetLink};

/// The wire format of a vnet link (both announce protocol 0001h; the configuration says
/// which one a link speaks, through the `protocol` key and the cells' `--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// This project's frames over `shmring` rings.
    #[default]
    Shmring,
    /// Linux's `ivshmem-net` (virtqueues in the output sections): talks to a real Linux
    /// `ivshmem-net` netdev.
    IvshmemNet,
}

/// Where the hypervisor is and which link to use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attach<'a> {
    /// The hypervisor's control socket and this cell's name (`None`: from the environment
    /// `hypervisor run` gives its cells, `IVSHMEM_SOCKET` and `IVSHMEM_CELL`).
    pub socket_and_cell: Option<(&'a Path, &'a str)>,
    /// The link's name (`None`: the cell's only link).
    pub link: Option<&'a str>,
}

/// Why [`attach`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Attaching to the hypervisor or opening the link failed.
    #[error("attaching to the hypervisor: {0}")]
    Endpoint(#[from] EndpointError),
    /// The link is not usable as a vnet link.
    #[error("link `{name}`: {source}")]
    Link {
        /// The link's name.
        name: String,
        /// Why.
        source: LinkError,
    },
    /// The link is not usable as an `ivshmem-net` link.
    #[error("link `{name}` (ivshmem-net): {source}")]
    Ivnet {
        /// The link's name.
        name: String,
        /// Why.
        source: IvnetError,
    },
}

/// A process cell's vnet link, ready for a [`super::cell::Cell`] or a TAP bridge
/// ([`vnet::bridge::Bridge`], [`vnet::ivnet::bridge::IvnetBridge`]).
#[derive(Debug)]
pub struct ProcessLink<L = VnetLink<EndpointRegisters>> {
    /// The link's name.
    pub name: String,
    /// The link (state machine not started: the first `poll_link` starts it).
    pub link: L,
    /// Its interrupt.
    pub irq: EndpointInterrupt,
}

fn endpoint(at: Attach<'_>) -> Result<Endpoint, AttachError> {
    Ok(match at.socket_and_cell {
        Some((socket, cell)) => Endpoint::attach_hosted(socket, cell, at.link),
        None => Endpoint::attach_from_env(at.link),
    }?)
}

/// Attaches to the hypervisor as `at` says and makes a [`VnetLink`] with `config`.
pub fn attach(at: Attach<'_>, config: LinkConfig) -> Result<ProcessLink, AttachError> {
    let endpoint = endpoint(at)?;
    let name = endpoint.name().to_string();
    let (dev, irq) = endpoint.into_parts();
    match VnetLink::new(dev, config) {
        Ok(link) => Ok(ProcessLink { name, link, irq }),
        Err(source) => Err(AttachError::Link { name, source }),
    }
}

/// Attaches to the hypervisor as `at` says and makes an [`IvnetLink`] with `config`; on a
/// link with 2 or more MSI-X vectors the link rings data on vector 1
/// ([`Interrupts::MsiX`], the format's MSI-X layout, which a KVM-cell peer expects), whatever
/// `config.interrupts` says.
pub fn attach_ivnet(
    at: Attach<'_>,
    mut config: IvnetConfig,
) -> Result<ProcessLink<IvnetLink<EndpointRegisters>>, AttachError> {
    let endpoint = endpoint(at)?;
    let name = endpoint.name().to_string();
    let (dev, irq) = endpoint.into_parts();
    if irq.vector_fds().len() >= 2 {
        config.interrupts = Interrupts::MsiX;
    }
    match IvnetLink::new(dev, config) {
        Ok(link) => Ok(ProcessLink { name, link, irq }),
        Err(source) => Err(AttachError::Ivnet { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_without_a_hypervisor_is_an_endpoint_error() {
        let dir = std::env::temp_dir().join(format!("vnet-process-{}", std::process::id()));
        let socket = dir.join("no-hypervisor.sock");
        let at = Attach {
            socket_and_cell: Some((&socket, "cell")),
            link: Some("net0"),
        };
        let err = attach(at, LinkConfig::default()).unwrap_err();
        assert!(matches!(err, AttachError::Endpoint(_)), "{err:?}");
        assert!(
            err.to_string().starts_with("attaching to the hypervisor: "),
            "{err}"
        );
    }
}
