//! The telemetry pipe's consumer: a tokio program that receives samples from the producer
//! cell, shows a live summary about once a second (rate, producer->consumer latency
//! p50/p99/p99.9, gaps, peer state), optionally writes every sample as CSV or JSON lines, and
//! follows the producer through departures and restarts.
//!
//! ```text
//! # started by `hypervisor run configs/telemetry.toml`, or by hand:
//! telemetry_consumer --socket /run/user/1000/ivshmem-stack/telemetry.sock --cell linux-consumer \
//!     --link telemetry --count 1000000 --csv samples.csv
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use ivshmem_stack::hypervisor_args::HypervisorArgs;
use ivshmem_stack::main_error::MainError;
use linux_uio_client::channel::ChannelError;
use linux_uio_client::{Channel, ChannelOptions, WaitMode};
use telemetry::process::monotonic_ns;
use telemetry::{Sample, SampleCheck};

/// Receives telemetry samples and summarises them.
#[derive(Debug, Parser)]
#[command(name = "telemetry_consumer")]
struct Args {
    /// The link to receive on (default: the cell's only link).
    #[arg(long)]
    link: Option<String>,
    /// Exit with a final summary after this many samples.
    #[arg(long)]
    count: Option<u64>,
    /// Write every sample to this CSV file.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write every sample to this file as JSON lines.
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// Polling mode: poll the ring for this many microseconds after the last sample before
    /// sleeping on the interrupt (default: interrupts only).
    #[arg(long, value_name = "US", conflicts_with = "hybrid")]
    poll_us: Option<u64>,
    /// Hybrid waiting: poll for 100 us after the last sample (a few wake-up costs), then
    /// sleep on the interrupt; same as `--poll-us 100`.
    #[arg(long)]
    hybrid: bool,
    /// The producer's name in messages (default: its cell name, which the hosted hypervisor
    /// tells each cell; `producer` on other backends).
    #[arg(long)]
    peer_name: Option<String>,
    #[command(flatten)]
    hypervisor: HypervisorArgs,
}

/// Where samples are written.
enum Sink {
    Csv(BufWriter<File>),
    Jsonl(BufWriter<File>),
}

impl Sink {
    fn write(&mut self, s: &Sample, latency_ns: u64) -> std::io::Result<()> {
        match self {
            Sink::Csv(w) => {
                write!(w, "{},{},{}", s.seq, s.timestamp_ns, latency_ns)?;
                for v in s.channels {
                    write!(w, ",{v}")?;
                }
                writeln!(w)
            }
            Sink::Jsonl(w) => {
                let channels = s.channels.map(f64::from);
                let line = serde_json::json!({
                    "seq": s.seq,
                    "timestamp_ns": s.timestamp_ns,
                    "latency_ns": latency_ns,
                    "channels": channels,
                });
                writeln!(w, "{line}")
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Csv(w) | Sink::Jsonl(w) => w.flush(),
        }
    }
}

fn open_sinks(args: &Args) -> Result<Vec<Sink>> {
    let mut sinks = Vec::new();
    if let Some(path) = &args.csv {
        let mut w = BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        write!(w, "seq,timestamp_ns,latency_ns")?;
        for i in 0..telemetry::CHANNELS {
            write!(w, ",ch{i}")?;
        }
        writeln!(w)?;
        sinks.push(Sink::Csv(w));
    }
    if let Some(path) = &args.jsonl {
        let w = BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        sinks.push(Sink::Jsonl(w));
    }
    Ok(sinks)
}

/// Latency and rate over one window and over the whole run.
struct Summary {
    window: Histogram<u64>,
    total: Histogram<u64>,
    window_start: Instant,
    window_count: u64,
    start: Instant,
}

impl Summary {
    fn new() -> Self {
        // 1 ns .. 60 s at 3 significant digits; longer latencies are clamped to 60 s.
        let hist =
            || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Self {
            window: hist(),
            total: hist(),
            window_start: Instant::now(),
            window_count: 0,
            start: Instant::now(),
        }
    }

    fn record(&mut self, latency_ns: u64) {
        let v = latency_ns.max(1);
        self.window.saturating_record(v);
        self.total.saturating_record(v);
        self.window_count += 1;
    }

    fn line(hist: &Histogram<u64>, count: u64, secs: f64) -> String {
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "{:>10.0} samples/s  latency p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us",
            count as f64 / secs.max(1e-9),
            us(0.5),
            us(0.99),
            us(0.999),
        )
    }

    fn window_line(&mut self) -> String {
        let secs = self.window_start.elapsed().as_secs_f64();
        let line = Self::line(&self.window, self.window_count, secs);
        self.window.reset();
        self.window_count = 0;
        self.window_start = Instant::now();
        line
    }
}

fn state_name(state: u32) -> String {
    match state {
        0 => "gone (0)".into(),
        1 => "INIT".into(),
        2 => "READY".into(),
        3 => "RUN".into(),
        other => format!("invalid ({other})"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), MainError> {
    let args = Args::parse();
    let link = args.link.as_deref();
    let endpoint = args.hypervisor.attach(link)?;
    let wait = match (args.poll_us, args.hybrid) {
        (Some(us), _) => WaitMode::Poll {
            spin: Duration::from_micros(us),
        },
        (None, true) => WaitMode::hybrid(),
        (None, false) => WaitMode::Interrupt,
    };
    // The hosted hypervisor names every peer; UIO and in-process links do not.
    let peer_name = args
        .peer_name
        .clone()
        .or_else(|| {
            let peer = endpoint.the_peer()?;
            endpoint.peer_name(peer).map(str::to_owned)
        })
        .unwrap_or_else(|| "producer".to_owned());
    let mut channel = Channel::new(
        endpoint,
        ChannelOptions {
            peer_name: Some(peer_name),
            wait,
            ..ChannelOptions::default()
        },
    )?;
    ivshmem_stack::outln!(
        "telemetry_consumer: link `{}`, waiting for {}",
        channel.name(),
        channel.peer_label()
    );
    let mut sinks = open_sinks(&args)?;
    let mut states = channel.peer_states();
    let mut check = SampleCheck::default();
    let mut summary = Summary::new();
    let mut peer_state = 0u32;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let target = args.count.unwrap_or(u64::MAX);
    // `hypervisor run` stops its cells with SIGTERM: end with the final summary then too.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    'run: while check.received < target {
        let mut records = channel.records::<Sample>();
        loop {
            tokio::select! {
                biased;
                _ = tick.tick() => {
                    if summary.window_count > 0 || peer_state != 0 {
                        ivshmem_stack::outln!(
                            "{}  gaps {} (missing {})  peer {}",
                            summary.window_line(), check.gaps, check.missing, state_name(peer_state)
                        );
                    }
                }
                Some(state) = states.next() => {
                    if state.state != peer_state {
                        ivshmem_stack::outln!("peer state: {} -> {}", state_name(peer_state), state_name(state.state));
                    }
                    peer_state = state.state;
                }
                item = records.next() => match item {
                    Some(Ok(sample)) => {
                        let latency = monotonic_ns().saturating_sub(sample.timestamp_ns);
                        check.check(&sample);
                        summary.record(latency);
                        for sink in &mut sinks {
                            sink.write(&sample, latency)?;
                        }
                        if check.received >= target {
                            break 'run;
                        }
                    }
                    Some(Err(e @ ChannelError::PeerGone { .. })) => {
                        ivshmem_stack::outln!("{e}: {} samples so far; waiting for it to come back", check.received);
                        check.restart();
                        break;
                    }
                    Some(Err(e)) => return Err(anyhow::Error::new(e).context("receiving").into()),
                    None => break,
                },
                _ = tokio::signal::ctrl_c() => break 'run,
                _ = terminate.recv() => break 'run,
            }
        }
    }
    for sink in &mut sinks {
        sink.flush()?;
    }
    let secs = summary.start.elapsed().as_secs_f64();
    ivshmem_stack::outln!(
        "final: {} samples in {:.2} s  {}",
        check.received,
        secs,
        Summary::line(&summary.total, check.received, secs)
    );
    ivshmem_stack::outln!(
        "final: gaps {} (missing {}), out of order {}, torn {}, producer restarts {}, max latency {:.1} us",
        check.gaps,
        check.missing,
        check.out_of_order,
        check.torn,
        check.restarts,
        summary.total.max() as f64 / 1000.0
    );
    Ok(())
}
