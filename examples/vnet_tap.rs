//! The Linux side of a vnet link: attaches as a process cell and bridges the link to a TAP
//! device, so the kernel's TCP/IP stack joins the virtual network.
//!
//! The TAP device is created with `TUNSETIFF` (root or `CAP_NET_ADMIN`); its address, MTU and
//! link state are set by running `ip`. Its carrier follows the link (`NO-CARRIER` while the
//! peer cell is away). Ctrl-C / SIGTERM stop it cleanly (the pcap file is flushed).
//!
//! ```text
//! # started by `hypervisor run configs/vnet.toml`, or by hand:
//! vnet_tap --socket /run/ivshmem-stack/vnet.sock --cell linux-net --link net0 \
//!     --tap ivnet0 --ip 10.0.0.1/24 --pcap vnet.pcap
//! ping 10.0.0.2; curl http://10.0.0.2/
//! ```

use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ivshmem_stack::hypervisor_args::HypervisorArgs;
use ivshmem_stack::main_error::MainError;
use ivshmem_stack::vnet_cell::process;
use vnet::bridge::{Bridge, BridgeConfig};
use vnet::ivnet::bridge::IvnetBridge;
use vnet::ivnet::{Interrupts, IvnetConfig};
use vnet::pcap::PcapWriter;
use vnet::tap::Tap;
use vnet::{LinkConfig, LinkEvent};

/// Bridges a vnet link to a Linux TAP device.
#[derive(Debug, Parser)]
#[command(name = "vnet_tap")]
struct Args {
    /// The link to use (default: the cell's only link).
    #[arg(long)]
    link: Option<String>,
    /// TAP interface name.
    #[arg(long, default_value = "ivnet0")]
    tap: String,
    /// Address and prefix for the TAP interface (none: leave it unconfigured).
    #[arg(long)]
    ip: Option<String>,
    /// Device MTU: the Ethernet frame size including the 14-byte header; the TAP interface
    /// gets the IP MTU (this minus 14). Default: 65536 for shmring, 16398 (Linux's default
    /// MTU 16384 + 14) for ivshmem-net.
    #[arg(long)]
    mtu: Option<usize>,
    /// Wire format of the link (the same on both cells of the link).
    #[arg(long, value_enum, default_value_t)]
    format: process::Format,
    /// Write every forwarded frame to this pcap file (tcpdump -r FILE). An existing capture
    /// is appended to (a restarted bridge keeps the earlier capture); a file that is not a
    /// pcap capture is refused.
    #[arg(long, value_name = "FILE")]
    pcap: Option<PathBuf>,
    /// Frames per direction per round.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[command(flatten)]
    hypervisor: HypervisorArgs,
}

/// A signalfd for SIGINT and SIGTERM (blocked for normal delivery).
fn stop_signals() -> Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set, then blocking it for this (only) thread and
    // creating a signalfd; results checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("blocking SIGINT/SIGTERM");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The bridge cell (also run by `tests/kvm_vnet.rs` as its TAP bridge role).
pub fn main() -> Result<(), MainError> {
    hypervisor::cli::init_tracing();
    let args = Args::parse();
    let mtu = args.mtu.unwrap_or(match args.format {
        process::Format::Shmring => vnet::nic::DEFAULT_MTU,
        process::Format::IvshmemNet => vnet::ivnet::wire::DEFAULT_MAX_FRAME,
    });
    vnet::nic::check_mtu(mtu)?;
    let stop = stop_signals()?;
    let at = process::Attach {
        socket_and_cell: Some(args.hypervisor.socket_and_cell()?),
        link: args.link.as_deref(),
    };
    let bridge_config = BridgeConfig {
        batch: args.batch,
        ..BridgeConfig::default()
    };
    let open_tap = |name: &str| -> Result<(Tap, String)> {
        let tap =
            Tap::open(&args.tap).with_context(|| format!("creating TAP device `{}`", args.tap))?;
        tap.configure(args.ip.as_deref(), mtu - vnet::nic::ETHERNET_HEADER_LEN)
            .with_context(|| format!("configuring `{}`", tap.name()))?;
        let tap_name = tap.name().to_string();
        ivshmem_stack::outln!(
            "vnet_tap: link `{name}` ({:?}) <-> {tap_name} ({}), MTU {mtu}",
            args.format,
            args.ip.as_deref().unwrap_or("no address"),
        );
        Ok((tap, tap_name))
    };
    let hook = |tap_name: String| -> Box<dyn FnMut(LinkEvent) + Send> {
        Box::new(move |event| {
            let text = match event {
                LinkEvent::Up => "up (peer cell running)",
                LinkEvent::Down => "down (peer cell gone)",
                LinkEvent::None => return,
            };
            ivshmem_stack::outln!("vnet_tap: {tap_name}: link {text}");
            let _ = std::io::stdout().flush();
        })
    };
    let s = match args.format {
        process::Format::Shmring => {
            let config = LinkConfig {
                mtu,
                ..LinkConfig::default()
            };
            let p = process::attach(at, config)?;
            let (tap, tap_name) = open_tap(&p.name)?;
            let mut bridge = Bridge::new(p.link, p.irq, tap, bridge_config);
            if let Some(path) = &args.pcap {
                // Appended to, not truncated: a restarted bridge keeps its earlier lives'
                // capture.
                let capture = vnet::pcap::open_append(path)?;
                if capture.earlier_records > 0 || capture.cut_bytes > 0 {
                    ivshmem_stack::outln!(
                        "vnet_tap: appending to {} ({} earlier records{})",
                        path.display(),
                        capture.earlier_records,
                        if capture.cut_bytes > 0 {
                            format!(
                                "; cut an incomplete last record of {} bytes",
                                capture.cut_bytes
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                let out: Box<dyn Write + Send> = Box::new(BufWriter::new(capture.file));
                bridge.set_pcap(PcapWriter::appending(out));
            }
            bridge.set_link_hook(hook(tap_name));
            bridge.run(Some(stop.as_fd())).context("bridge loop")?;
            bridge.stats()
        }
        process::Format::IvshmemNet => {
            if args.pcap.is_some() {
                return Err(anyhow::anyhow!(
                    "--pcap is not supported with --format ivshmem-net yet"
                )
                .into());
            }
            let config = IvnetConfig {
                max_frame: mtu,
                // INTx (vector 0 for data too); `attach_ivnet` rings data on vector 1 when
                // the link has MSI-X vectors (a KVM-cell peer), and the bridge wakes on all.
                interrupts: Interrupts::Intx,
            };
            let p = process::attach_ivnet(at, config)?;
            let (tap, tap_name) = open_tap(&p.name)?;
            let mut bridge = IvnetBridge::new(p.link, p.irq, tap, bridge_config);
            bridge.set_link_hook(hook(tap_name));
            bridge.run(Some(stop.as_fd())).context("bridge loop")?;
            bridge.stats()
        }
    };
    // The port is the TAP device: the line names every dropped frame (an over-MTU frame
    // from the TAP is otherwise lost without a trace).
    ivshmem_stack::outln!("vnet_tap: stopped (signal on fd {}); {s}", stop.as_raw_fd());
    Ok(())
}
