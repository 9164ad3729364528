//! `ivbench`: side-by-side benchmarks of the ivshmem-stack, every comparison measured in one run
//! on one machine.
//!
//! ```text
//! cargo run --release --bin ivbench -- ring [--quick] [--json] [--cpus 0,1]
//! cargo run --release --bin ivbench -- doorbell --quick
//! cargo run --release --bin ivbench -- all
//! cargo run --release --bin ivbench -- telemetry --plot docs/plots
//! ```
//!
//! The suites live in the library (`ivshmem_stack::bench`); to add one (telemetry, vnet), add
//! its module there and one arm to [`SuiteName`] and [`run_suite`].

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use ivshmem_stack::bench::machine::Machine;
use ivshmem_stack::bench::report::{render_table, Header};
use ivshmem_stack::bench::{doorbell, kvm, pin, plot, ring, scale, Settings, SuiteReport};

mod telemetry;
mod vnet;

/// Side-by-side benchmarks: shmring against the hardware floor and other queues, doorbells
/// against eventfd and Unix sockets.
#[derive(Debug, Parser)]
#[command(name = "ivbench", version)]
struct Cli {
    /// Which suite to run.
    suite: SuiteName,
    /// Short runs (3 x ~100 ms per case; the ring suite finishes in about 10 s).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object per line (suite, case, metric, value, unit) instead of the table.
    #[arg(long)]
    json: bool,
    /// The two CPUs to pin to: measuring side first, peer second (default: the first two
    /// CPUs this process may use).
    #[arg(long, value_name = "A,B", value_parser = parse_cpus)]
    cpus: Option<[usize; 2]>,
    /// Also write SVG charts into DIR (created if missing): bars of every metric with ratios,
    /// latency CDFs where a suite keeps per-sample latencies.
    #[arg(long, value_name = "DIR")]
    plot: Option<std::path::PathBuf>,
}

/// The suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SuiteName {
    /// In-process rings: floor, shmring RTT, streaming vs rtrb/crossbeam/mpsc, grant vs memcpy.
    Ring,
    /// Cross-process wake-ups: eventfd, Unix socket, ivshmem doorbell.
    Doorbell,
    /// The telemetry pipe: ivshmem (polling, interrupts) vs Unix socket vs TCP loopback.
    Telemetry,
    /// The virtual network: smoltcp over shmring vs smoltcp Loopback, TAP bridge vs veth.
    Vnet,
    /// KVM cells: doorbell round trips KVM<->KVM, KVM<->process, process<->process, eventfd;
    /// the cost of one MMIO exit; telemetry from a KVM producer vs a process producer.
    Kvm,
    /// How costs grow: STATE fan-out to 2..16 peers, doorbells beside busy links, attaching to
    /// 1..64 links, the hypervisor's memory and fds, streaming over many links.
    Scale,
    /// Every suite, one after the other.
    All,
}

fn parse_cpus(text: &str) -> Result<[usize; 2], String> {
    pin::parse_cpu_pair(text).map_err(|e| format!("{e:#}"))
}

fn run_suite(name: SuiteName, settings: &Settings) -> Result<Vec<SuiteReport>> {
    Ok(match name {
        SuiteName::Ring => vec![ring::run(settings).context("suite ring")?],
        SuiteName::Doorbell => vec![doorbell::run(settings).context("suite doorbell")?],
        SuiteName::Telemetry => vec![telemetry::run(settings).context("suite telemetry")?],
        SuiteName::Vnet => vec![vnet::run(settings).context("suite vnet")?],
        SuiteName::Kvm => vec![kvm::run(settings).context("suite kvm")?],
        SuiteName::Scale => vec![scale::run(settings).context("suite scale")?],
        SuiteName::All => {
            let mut reports = run_suite(SuiteName::Ring, settings)?;
            reports.extend(run_suite(SuiteName::Doorbell, settings)?);
            reports.extend(run_suite(SuiteName::Telemetry, settings)?);
            reports.extend(run_suite(SuiteName::Vnet, settings)?);
            reports.extend(run_suite(SuiteName::Kvm, settings)?);
            reports.extend(run_suite(SuiteName::Scale, settings)?);
            reports
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole context chain on one line, without a backtrace.
            eprintln!("ivbench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let cpus = match cli.cpus {
        Some(cpus) => cpus,
        None => pin::default_cpus()?,
    };
    pin::check_cpus(cpus)?;
    let settings = if cli.quick {
        Settings::quick(cpus)
    } else {
        Settings::full(cpus)
    };
    let machine = Machine::detect();
    settings.say(format_args!("machine: {machine}"));
    settings.say(format_args!(
        "CPUs {} and {}, {} runs of ~{} ms per case (median reported){}",
        cpus[0],
        cpus[1],
        settings.runs,
        settings.run_time.as_millis(),
        if cfg!(debug_assertions) {
            "; WARNING: debug build, use --release for real figures"
        } else {
            ""
        }
    ));
    let reports = run_suite(cli.suite, &settings)?;
    if let Some(dir) = &cli.plot {
        let written = plot::write_plots(dir, &reports)
            .with_context(|| format!("writing the charts into {}", dir.display()))?;
        for path in written {
            settings.say(format_args!("chart: {}", path.display()));
        }
    }
    let mut out = std::io::stdout().lock();
    if cli.json {
        for report in &reports {
            for line in report.json_lines() {
                writeln!(out, "{line}")?;
            }
        }
    } else {
        let header = Header {
            machine,
            cpus,
            runs: settings.runs,
            run_time: settings.run_time,
        };
        write!(out, "{}", render_table(&header, &reports))?;
    }
    Ok(())
}
