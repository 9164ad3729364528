//! The telemetry pipe's producer cell: an RTOS-style program that streams fixed-size samples
//! to a Linux consumer over one ivshmem link.
//!
//! The cell logic is bare-metal style ([`telemetry::ProducerCell`]: only
//! `ivshmem-dev` and `shmring`, generic over the register access); this `main` only attaches
//! as a process cell of the hosted hypervisor and runs it.
//!
//! ```text
//! # started by `hypervisor run configs/telemetry.toml` (IVSHMEM_SOCKET/IVSHMEM_CELL set), or by hand:
//! telemetry_producer --socket /run/user/1000/ivshmem-stack/telemetry.sock --cell rtos-telemetry \
//!     --link telemetry --rate 10000/s --count 1000000
//! ```

use anyhow::{anyhow, Context};
use clap::Parser;
use ivshmem_stack::hypervisor_args::HypervisorArgs;
use ivshmem_stack::main_error::MainError;
use telemetry::process::ProcessPlatform;
use telemetry::{ProducerCell, ProducerConfig, Sample};

/// Streams telemetry samples to the other peer of an ivshmem link.
#[derive(Debug, Parser)]
#[command(name = "telemetry_producer")]
struct Args {
    /// The link to stream on (default: the cell's only link).
    #[arg(long)]
    link: Option<String>,
    /// Samples per second, e.g. `10000/s`, `10k/s` or `10000` (default: as fast as the ring
    /// takes them).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Stop after this many samples (default: run until killed).
    #[arg(long)]
    count: Option<u64>,
    /// Samples published per index store when running flat out.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[command(flatten)]
    hypervisor: HypervisorArgs,
}

/// Parses `N`, `N/s`, `Nk/s`, `NM/s`.
fn parse_rate(text: &str) -> Result<u64, String> {
    let number = text.trim().trim_end_matches("/s");
    let (digits, factor) = match number.chars().last() {
        Some('k' | 'K') => (&number[..number.len() - 1], 1_000),
        Some('M') => (&number[..number.len() - 1], 1_000_000),
        _ => (number, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a rate like 10000/s, 10k/s or 2M/s"))?;
    match n.checked_mul(factor) {
        Some(0) | None => Err(format!("rate `{text}` must be between 1/s and 2^64/s")),
        Some(rate) => Ok(rate),
    }
}

fn main() -> Result<(), MainError> {
    let args = Args::parse();
    let link = args.link.as_deref();
    let endpoint = args.hypervisor.attach(link)?;
    let Some(peer) = endpoint.the_peer() else {
        return Err(anyhow!(
            "link `{}` has more than two peers: the telemetry pipe is 1:1",
            endpoint.name()
        )
        .into());
    };
    // The hosted hypervisor names every peer (`rtos-telemetry` rather than `peer 0`);
    // other backends know only the IDs.
    let label = |id: u16, name: Option<&str>| match name {
        Some(name) => format!("`{name}` (peer {id})"),
        None => format!("peer {id}"),
    };
    eprintln!(
        "telemetry_producer: link `{}`, {} -> {}, {} samples of {} bytes at {}",
        endpoint.name(),
        label(endpoint.id(), endpoint.cell()),
        label(peer, endpoint.peer_name(peer)),
        args.count
            .map_or("unlimited".to_string(), |c| c.to_string()),
        Sample::SIZE,
        args.rate
            .map_or("full speed".to_string(), |r| format!("{r}/s")),
    );
    let (dev, interrupt) = endpoint.into_parts();
    let mut platform = ProcessPlatform::new(interrupt);
    let mut cell = ProducerCell::new(
        dev,
        ProducerConfig {
            peer,
            rate_per_s: args.rate,
            count: args.count,
            batch: args.batch,
            max_capacity: None,
        },
    )
    .context("taking over the link")?;
    let result = cell.run(&mut platform);
    if let Some(e) = platform.error() {
        return Err(anyhow!("waiting for interrupts: {e}").into());
    }
    let stats = result.context("producer")?;
    eprintln!(
        "telemetry_producer: sent {} samples; consumer departures {}, ring-full waits {}, doorbells {}",
        stats.sent, stats.departures, stats.full_waits, stats.doorbells
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10000/s"), Ok(10_000));
        assert_eq!(parse_rate("10k/s"), Ok(10_000));
        assert_eq!(parse_rate("2M/s"), Ok(2_000_000));
        assert_eq!(parse_rate("7"), Ok(7));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
