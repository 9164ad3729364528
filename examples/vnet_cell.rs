//! A smoltcp cell on a vnet link: the bare-metal-style network stack (vnet's `ShmNic` over
//! shmring over ivshmem-dev's driver) answering ICMP echo, TCP echo (7), a TCP sink (9, with
//! a CRC answer), a TCP source (19) and an HTTP status page (80). Runs as a process cell of
//! the hosted hypervisor (through `linux_uio_client`'s endpoint).
//!
//! ```text
//! # started by `hypervisor run configs/vnet.toml`, or by hand:
//! vnet_cell --socket /run/ivshmem-stack/vnet.sock --cell rtos-net --link net0 --ip 10.0.0.2/24
//! ```

use anyhow::{Context, Result};
use clap::Parser;
use ivshmem_stack::hypervisor_args::HypervisorArgs;
use ivshmem_stack::main_error::MainError;
use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::process;
use ivshmem_stack::vnet_cell::services::{self, ServiceConfig};
use vnet::ivnet::{Interrupts, IvnetConfig};
use vnet::smoltcp::time::Duration;
use vnet::smoltcp::wire::Ipv4Cidr;
use vnet::LinkConfig;

/// A smoltcp cell with echo, sink, source and HTTP services.
#[derive(Debug, Parser)]
#[command(name = "vnet_cell")]
struct Args {
    /// The link to use (default: the cell's only link).
    #[arg(long)]
    link: Option<String>,
    /// The cell's address and prefix.
    #[arg(long, default_value = "10.0.0.2/24")]
    ip: String,
    /// Device MTU: the Ethernet frame size including the 14-byte header (IP MTU + 14).
    /// Default: 65536 for shmring, 16398 (Linux's default MTU 16384 + 14) for ivshmem-net.
    #[arg(long)]
    mtu: Option<usize>,
    /// Wire format of the link (the same on both cells of the link).
    #[arg(long, value_enum, default_value_t)]
    format: process::Format,
    /// TCP socket buffer size in bytes (receive and send, per socket).
    #[arg(long, default_value_t = 256 * 1024)]
    tcp_buffer: usize,
    /// Connections each service serves at once (more are refused with a RST).
    #[arg(long, default_value_t = services::DEFAULT_SOCKETS_PER_PORT)]
    sockets_per_port: usize,
    /// Seconds a connection may stay half-open (SYN-RECEIVED) before it is dropped.
    #[arg(long, default_value_t = 5)]
    handshake_timeout: u64,
    /// Seconds a connection may move no data before it is reset.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds between TCP keep-alive probes on a quiet connection (0: off).
    #[arg(long, default_value_t = 20)]
    keep_alive: u64,
    #[command(flatten)]
    hypervisor: HypervisorArgs,
}

fn main() -> Result<(), MainError> {
    hypervisor::cli::init_tracing();
    let args = Args::parse();
    let address: Ipv4Cidr = args.ip.parse().map_err(|()| {
        anyhow::anyhow!(
            "--ip {}: expected an IPv4 address with a prefix, like 10.0.0.2/24",
            args.ip
        )
    })?;
    let at = process::Attach {
        socket_and_cell: Some(args.hypervisor.socket_and_cell()?),
        link: args.link.as_deref(),
    };
    let mut services = ServiceConfig::new(address);
    services.tcp_buffer = args.tcp_buffer;
    services.sockets_per_port = args.sockets_per_port;
    services.handshake_timeout = Duration::from_secs(args.handshake_timeout);
    services.idle_timeout = Duration::from_secs(args.idle_timeout);
    services.keep_alive = (args.keep_alive > 0).then(|| Duration::from_secs(args.keep_alive));
    match args.format {
        process::Format::Shmring => {
            let config = LinkConfig {
                mtu: args.mtu.unwrap_or(vnet::nic::DEFAULT_MTU),
                ..LinkConfig::default()
            };
            let p = process::attach(at, config)?;
            ivshmem_stack::outln!(
                "vnet_cell: link `{}` (shmring), {address}, MTU {}",
                p.name,
                config.mtu
            );
            let mut cell = Cell::new(p.link, p.irq, &services, CellConfig::default());
            cell.run(None).context("cell loop")?;
        }
        process::Format::IvshmemNet => {
            let config = IvnetConfig {
                max_frame: args.mtu.unwrap_or(vnet::ivnet::wire::DEFAULT_MAX_FRAME),
                // INTx unless the link has 2 or more MSI-X vectors (then `attach_ivnet` puts
                // data on vector 1; the cell loop sleeps on every vector's fd).
                interrupts: Interrupts::Intx,
            };
            let p = process::attach_ivnet(at, config)?;
            ivshmem_stack::outln!(
                "vnet_cell: link `{}` (ivshmem-net), {address}, MTU {}",
                p.name,
                config.max_frame
            );
            let mut cell = Cell::new(p.link, p.irq, &services, CellConfig::default());
            cell.run(None).context("cell loop")?;
        }
    }
    Ok(())
}
