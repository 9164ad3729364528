//! The Linux side of the ivshmem demo: the Rust counterpart of Jailhouse's user-space
//! `tools/demos/ivshmem-demo`, printing the same fields so its output reads like the original
//! next to the demo inmates (`inmates/ivshmem-demo`, or Jailhouse's own).
//!
//! - Opens the link (a UIO device with `--uio`, else the hosted hypervisor's control socket
//!   as a process cell), prints `ID` and `Maximum peers`, and checks the target.
//! - Sets `STATE` = ID + 1, clears `rw[ID]` and the first word of its output section, enables
//!   interrupts and prints the shared memory.
//! - On each interrupt: counts it (the total, like the UIO interrupt count), stores the count
//!   in `rw[ID]` and ten times it in its output section, prints `Interrupt #N` and the shared
//!   memory, and re-arms (`INT_CONTROL` = 1, which [`Endpoint`]'s interrupt take does in
//!   one-shot mode, as the original does after each `read()`).
//! - Every second rings vector ID + 1 (MSI-X, as the original with `msi_irqs`; `--vector`
//!   overrides) on the target: `--target`, or (ID + 1) mod MAX_PEERS.
//!
//! ```text
//! # as peer 0 of configs/ivshmem-demo.toml (started by `hypervisor run`), or by hand:
//! ivshmem_demo --socket /run/ivshmem-stack/ivshmem-demo.sock --cell linux -t 1
//! # on a Jailhouse root cell with uio_ivshmem:
//! ivshmem_demo --uio uio_ivshmem -t 1
//! ```

use std::ptr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;
use ivshmem_dev::Section;
use ivshmem_stack::hypervisor_args::HypervisorArgs;
use ivshmem_stack::main_error::MainError;
use linux_uio_client::Endpoint;

/// Jailhouse's ivshmem demo, Linux side.
#[derive(Debug, Parser)]
#[command(name = "ivshmem_demo")]
struct Args {
    /// The peer to ring (default: (ID + 1) mod MAX_PEERS).
    #[arg(short, long)]
    target: Option<u16>,
    /// The vector to ring (default: ID + 1, the MSI-X choice of the original).
    #[arg(long)]
    vector: Option<u16>,
    /// Open this UIO device (sysfs name, e.g. `uio_ivshmem`) instead of the hosted hypervisor
    /// (`--socket`/`--cell` are then not used; they are not refused, as their environment
    /// variables may be set).
    #[arg(long, conflicts_with = "link", value_parser = ivshmem_stack::hypervisor_args::uio_device_name)]
    uio: Option<String>,
    /// The link to use (default: the cell's only link).
    #[arg(long)]
    link: Option<String>,
    #[command(flatten)]
    hypervisor: HypervisorArgs,
    /// Stop ringing after this many doorbells (interrupts are still served); default: ring
    /// forever.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many interrupts (default: run until killed).
    #[arg(long)]
    exit_after: Option<u64>,
}

/// Reads the u32 at byte `offset` of `section`, if it lies inside.
fn read_word(section: Option<Section>, offset: usize) -> Option<u32> {
    let section = section?;
    (offset + 4 <= section.len()).then(|| {
        // SAFETY: inside the mapped section (length checked), 4-byte aligned (sections are
        // page-aligned, offsets multiples of 4). Peer-written memory: one volatile read, the
        // value is only printed.
        unsafe { ptr::read_volatile(section.as_ptr().add(offset).cast::<u32>()) }
    })
}

/// Writes the u32 at byte `offset` of a writable `section`, if it lies inside.
fn write_word(section: Option<Section>, offset: usize, value: u32) {
    if let Some(section) = section.filter(|s| s.is_writable() && offset + 4 <= s.len()) {
        // SAFETY: inside the mapped, writable section (checked), 4-byte aligned.
        unsafe { ptr::write_volatile(section.as_ptr().add(offset).cast::<u32>(), value) }
    }
}

struct Demo {
    endpoint: Endpoint,
}

impl Demo {
    /// The word at `offset` of the input sections, which the original maps as one region
    /// (every peer's output section in ID order).
    fn input_word(&self, offset: usize) -> Option<u32> {
        let ivshmem = self.endpoint.ivshmem();
        let size = ivshmem.own_output().len();
        if size == 0 {
            return None;
        }
        let peer = u16::try_from(offset / size).ok()?;
        let section = if peer == ivshmem.id() {
            Some(ivshmem.own_output())
        } else {
            ivshmem.peer_output(peer)
        };
        read_word(section, offset % size)
    }

    fn print_shmem(&self) {
        let ivshmem = self.endpoint.ivshmem();
        for peer in 0..3 {
            if let Some(state) = ivshmem.peer_state(peer) {
                ivshmem_stack::outln!("state[{peer}] = {state}");
            }
        }
        for i in 0..3 {
            if let Some(value) = read_word(ivshmem.rw(), 4 * i) {
                ivshmem_stack::outln!("rw[{i}] = {value}");
            }
        }
        for offset in [0usize, 0x2000, 0x4000] {
            if let Some(value) = self.input_word(offset) {
                ivshmem_stack::outln!("in@{offset:#06x} = {value}");
            }
        }
    }

    fn publish(&self, count: u32) {
        let ivshmem = self.endpoint.ivshmem();
        write_word(ivshmem.rw(), 4 * usize::from(ivshmem.id()), count);
        write_word(Some(ivshmem.own_output()), 0, count.wrapping_mul(10));
    }
}

pub fn main() -> Result<(), MainError> {
    let args = Args::parse();
    let endpoint = match &args.uio {
        Some(name) => {
            Endpoint::open_uio(name).with_context(|| format!("opening UIO device {name}"))?
        }
        None => args.hypervisor.attach(args.link.as_deref())?,
    };
    let demo = Demo { endpoint };
    let ivshmem = demo.endpoint.ivshmem();
    let id = ivshmem.id();
    let max_peers = ivshmem.max_peers();
    ivshmem_stack::outln!("ID = {id}");
    ivshmem_stack::outln!("Maximum peers = {max_peers}");
    let target = args.target.unwrap_or((id + 1) % max_peers);
    if target >= max_peers || target == id {
        return Err(anyhow!("invalid peer number {target} (ID {id}, {max_peers} peers)").into());
    }
    let int_no = args.vector.unwrap_or(id + 1);

    ivshmem.set_state(u32::from(id) + 1);
    demo.publish(0);
    ivshmem.rearm();
    demo.print_shmem();

    let mut demo = demo;
    let mut int_count: u32 = 0;
    let mut sent: u64 = 0;
    let mut next_doorbell = Some(Instant::now() + Duration::from_secs(1));
    loop {
        let (ivshmem, interrupt) = demo.endpoint.parts_mut();
        match interrupt.wait_until(next_doorbell)? {
            Some(merged) => {
                int_count = int_count.wrapping_add(merged as u32);
                demo.publish(int_count);
                ivshmem_stack::outln!("\nInterrupt #{int_count}");
                demo.print_shmem();
                if args.exit_after.is_some_and(|n| u64::from(int_count) >= n) {
                    return Ok(());
                }
            }
            None => {
                ivshmem_stack::outln!("\nSending interrupt {int_no} to peer {target}");
                ivshmem.ring(target, int_no);
                sent += 1;
                next_doorbell = if args.count.is_some_and(|n| sent >= n) {
                    ivshmem_stack::outln!("Sent {sent} interrupts, done");
                    None
                } else {
                    next_doorbell.map(|at| at + Duration::from_secs(1))
                };
            }
        }
    }
}
