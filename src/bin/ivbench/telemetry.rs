//! Suite `telemetry`: the telemetry pipe (40-byte [`Sample`]s, producer -> tokio consumer)
//! over an ivshmem link in polling and in interrupt mode, beside the same pipe over a Unix
//! domain socket and over TCP loopback, all measured in one run on the same two pinned CPUs.
//!
//! Cases (`ivshmem-poll`, `ivshmem-irq`, `uds`, `tcp`), each with three metrics:
//! - `p50_ns`, `p99_ns`: one-way latency (consumer's `CLOCK_MONOTONIC` at receipt minus the
//!   sample's timestamp) at a paced rate of [`PACED_RATE`] samples/s, far below saturation;
//! - `max_rate_per_s`: samples per second, first to last receipt, with the producer flat out
//!   (batches of [`BATCH`] samples per publish / per `write`).
//!
//! The ivshmem cases use an in-process [`LocalLink`] (heap sections, real eventfds as
//! interrupts) between two threads: the producer is the bare-metal-style
//! [`ProducerCell`], the consumer a tokio [`Channel`] on a current-thread runtime. The socket
//! cases use the same consumer shape (tokio stream, buffered `read_exact` of one sample) and a
//! blocking std producer with the same pacing and batching. Every run checks that every sample
//! arrived, in order and untorn.

use std::io::Write as _;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ivshmem_stack::bench::report::{Comparison, Entry};
use ivshmem_stack::bench::{pin, Measurement, Metric, Settings, SuiteReport};
use linux_uio_client::telemetry::{
    monotonic_ns, ProcessPlatform, ProducerCell, ProducerConfig, Sample, SampleCheck,
};
use linux_uio_client::{Channel, ChannelOptions, Endpoint, LocalLink, WaitMode};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// Samples per second for the latency runs.
pub const PACED_RATE: u64 = 20_000;
/// Samples per publish (ring) or per `write` (sockets) when flat out.
pub const BATCH: usize = 32;
/// Output section size of the link (the ring gets the largest power of two that fits).
const OUTPUT_SIZE: usize = 256 * 1024;

/// The four pipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipe {
    IvshmemPoll,
    IvshmemIrq,
    Uds,
    Tcp,
}

impl Pipe {
    const ALL: [Pipe; 4] = [Pipe::IvshmemPoll, Pipe::IvshmemIrq, Pipe::Uds, Pipe::Tcp];

    fn case(self) -> &'static str {
        match self {
            Pipe::IvshmemPoll => "ivshmem-poll",
            Pipe::IvshmemIrq => "ivshmem-irq",
            Pipe::Uds => "uds",
            Pipe::Tcp => "tcp",
        }
    }
}

/// How the producer sends.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// `count` samples at `rate` per second, each published on its own.
    Paced { rate: u64, count: u64 },
    /// `count` samples as fast as possible.
    FlatOut { count: u64 },
}

impl Load {
    fn count(self) -> u64 {
        match self {
            Load::Paced { count, .. } | Load::FlatOut { count } => count,
        }
    }
}

/// What the consumer saw in one run.
#[derive(Debug)]
struct RunResult {
    latencies_ns: Vec<u64>,
    first_ns: u64,
    last_ns: u64,
}

impl RunResult {
    fn percentile(&mut self, q: f64) -> f64 {
        self.latencies_ns.sort_unstable();
        let n = self.latencies_ns.len();
        if n == 0 {
            return f64::NAN;
        }
        let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
        self.latencies_ns[i] as f64
    }

    fn rate(&self) -> f64 {
        let n = self.latencies_ns.len() as f64;
        let secs = (self.last_ns.saturating_sub(self.first_ns)) as f64 / 1e9;
        if secs <= 0.0 {
            return f64::NAN;
        }
        (n - 1.0) / secs
    }
}

/// The consumer side common to every pipe: checks and timestamps `count` samples.
struct Receiver {
    check: SampleCheck,
    result: RunResult,
}

impl Receiver {
    fn new(count: u64) -> Self {
        Self {
            check: SampleCheck::default(),
            result: RunResult {
                latencies_ns: Vec::with_capacity(count as usize),
                first_ns: 0,
                last_ns: 0,
            },
        }
    }

    fn take(&mut self, sample: &Sample) {
        let now = monotonic_ns();
        if self.check.received == 0 {
            self.result.first_ns = now;
        }
        self.result.last_ns = now;
        self.check.check(sample);
        self.result
            .latencies_ns
            .push(now.saturating_sub(sample.timestamp_ns));
    }

    fn finish(self, count: u64) -> Result<RunResult> {
        ensure!(
            self.check.received == count && self.check.is_clean(),
            "the pipe lost, reordered or tore samples: {:?}",
            self.check
        );
        Ok(self.result)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// One run over an ivshmem link (in-process, eventfd interrupts).
fn run_ivshmem(cpus: [usize; 2], load: Load, wait: WaitMode) -> Result<RunResult> {
    let link = LocalLink::new("telemetry-bench", 2, OUTPUT_SIZE)?;
    let consumer_link = link.clone();
    let count = load.count();
    pin::run_pinned_pair(
        cpus,
        move |_abort: &AtomicBool| {
            let rt = runtime()?;
            rt.block_on(async move {
                let endpoint = Endpoint::attach_local(&consumer_link, 1)?;
                let mut channel = Channel::new(
                    endpoint,
                    ChannelOptions {
                        wait,
                        ..ChannelOptions::default()
                    },
                )?;
                let mut rx = Receiver::new(count);
                let mut records = channel.records::<Sample>();
                while rx.check.received < count {
                    match records.next().await {
                        Some(Ok(sample)) => rx.take(&sample),
                        Some(Err(e)) => return Err(e).context("ivshmem consumer"),
                        None => bail!("the record stream ended early"),
                    }
                }
                rx.finish(count)
            })
        },
        move |_abort: &AtomicBool| {
            let endpoint = Endpoint::attach_local(&link, 0)?;
            let (dev, interrupt) = endpoint.into_parts();
            let mut platform = ProcessPlatform::new(interrupt);
            let (rate, batch) = match load {
                Load::Paced { rate, .. } => (Some(rate), 1),
                Load::FlatOut { .. } => (None, BATCH),
            };
            let mut cell = ProducerCell::new(
                &dev,
                ProducerConfig {
                    peer: 1,
                    rate_per_s: rate,
                    count: Some(count),
                    batch,
                    max_capacity: None,
                },
            );
            let stats = cell.run(&mut platform);
            if let Some(e) = platform.error() {
                bail!("producer interrupt wait: {e}");
            }
            stats.map_err(|e| anyhow::anyhow!("producer cell: {e}"))?;
            // Stay attached until the consumer has everything: leaving now is fine for the
            // ring (published samples stay readable) but the consumer stops at `count` anyway.
            Ok(())
        },
    )
}

/// The blocking socket producer: same pacing and batching as the ring producer.
fn produce_to(mut out: impl std::io::Write, load: Load) -> Result<()> {
    let count = load.count();
    let start = monotonic_ns();
    let mut buf = Vec::with_capacity(BATCH * Sample::SIZE);
    let mut seq = 0u64;
    while seq < count {
        match load {
            Load::Paced { rate, .. } => {
                let due = start + (seq as u128 * 1_000_000_000 / rate as u128) as u64;
                let now = monotonic_ns();
                if now < due {
                    // Pacing the producer, not synchronising with the consumer.
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                let sample = Sample::new(seq, monotonic_ns());
                out.write_all(bytemuck::bytes_of(&sample))?;
                seq += 1;
            }
            Load::FlatOut { .. } => {
                buf.clear();
                let end = (seq + BATCH as u64).min(count);
                for s in seq..end {
                    buf.extend_from_slice(bytemuck::bytes_of(&Sample::new(s, monotonic_ns())));
                }
                out.write_all(&buf)?;
                seq = end;
            }
        }
    }
    out.flush()?;
    Ok(())
}

async fn consume_from(stream: impl AsyncRead + Unpin, count: u64) -> Result<RunResult> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut rx = Receiver::new(count);
    let mut bytes = [0u8; Sample::SIZE];
    while rx.check.received < count {
        reader
            .read_exact(&mut bytes)
            .await
            .context("socket consumer")?;
        rx.take(&bytemuck::pod_read_unaligned::<Sample>(&bytes));
    }
    rx.finish(count)
}

fn run_uds(cpus: [usize; 2], load: Load) -> Result<RunResult> {
    let (producer, consumer) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    let count = load.count();
    pin::run_pinned_pair(
        cpus,
        move |_abort: &AtomicBool| {
            runtime()?.block_on(async move {
                consumer.set_nonblocking(true)?;
                let stream = tokio::net::UnixStream::from_std(consumer)?;
                consume_from(stream, count).await
            })
        },
        move |_abort: &AtomicBool| produce_to(producer, load),
    )
}

fn run_tcp(cpus: [usize; 2], load: Load) -> Result<RunResult> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let producer = std::net::TcpStream::connect(listener.local_addr()?).context("connect")?;
    let (consumer, _) = listener.accept().context("accept")?;
    producer.set_nodelay(true)?;
    consumer.set_nodelay(true)?;
    let count = load.count();
    pin::run_pinned_pair(
        cpus,
        move |_abort: &AtomicBool| {
            runtime()?.block_on(async move {
                consumer.set_nonblocking(true)?;
                let stream = tokio::net::TcpStream::from_std(consumer)?;
                consume_from(stream, count).await
            })
        },
        move |_abort: &AtomicBool| produce_to(producer, load),
    )
}

fn run_pipe(pipe: Pipe, cpus: [usize; 2], load: Load) -> Result<RunResult> {
    match pipe {
        // Polls far longer than the gap between samples: it never sleeps during a run.
        Pipe::IvshmemPoll => run_ivshmem(
            cpus,
            load,
            WaitMode::Poll {
                spin: Duration::from_millis(100),
            },
        ),
        Pipe::IvshmemIrq => run_ivshmem(cpus, load, WaitMode::Interrupt),
        Pipe::Uds => run_uds(cpus, load),
        Pipe::Tcp => run_tcp(cpus, load),
    }
}

/// Samples per run: the settings' run time at the paced rate (at least 200), and for the flat
/// out runs the settings' minimum iterations scaled so a run lasts about the run time at a
/// few million samples per second.
fn counts(settings: &Settings) -> (u64, u64) {
    let secs = settings.run_time.as_secs_f64();
    let paced = ((secs * PACED_RATE as f64) as u64).max(200.max(settings.min_iters));
    let flat = ((secs * 2_000_000.0) as u64).max(settings.min_iters);
    (paced, flat)
}

/// Runs the suite.
pub fn run(settings: &Settings) -> Result<SuiteReport> {
    let mut report = SuiteReport::new("telemetry");
    let (paced, flat) = counts(settings);
    for pipe in Pipe::ALL {
        let case = pipe.case();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut rate = Vec::new();
        for run in 0..settings.runs.max(1) {
            settings.say(format_args!(
                "telemetry {case}: run {}/{}: {paced} samples at {PACED_RATE}/s, {flat} flat out",
                run + 1,
                settings.runs
            ));
            let mut latency = run_pipe(
                pipe,
                settings.cpus,
                Load::Paced {
                    rate: PACED_RATE,
                    count: paced,
                },
            )
            .with_context(|| format!("{case}: paced run"))?;
            p50.push(latency.percentile(0.50));
            p99.push(latency.percentile(0.99));
            let throughput = run_pipe(pipe, settings.cpus, Load::FlatOut { count: flat })
                .with_context(|| format!("{case}: flat-out run"))?;
            rate.push(throughput.rate());
        }
        for (metric, samples, iters) in [
            (Metric::P50Ns, p50, paced),
            (Metric::P99Ns, p99, paced),
            (Metric::MaxRatePerS, rate, flat),
        ] {
            report.entries.push(Entry::Measured(Measurement {
                case,
                metric,
                samples,
                iters,
            }));
        }
    }
    for baseline in ["uds", "tcp"] {
        for (case, metric) in [
            ("ivshmem-poll", Metric::P50Ns),
            ("ivshmem-irq", Metric::P50Ns),
            ("ivshmem-irq", Metric::MaxRatePerS),
        ] {
            report.comparisons.push(Comparison {
                case,
                baseline,
                metric,
                target: None,
            });
        }
    }
    report.notes.push(format!(
        "40-byte samples producer -> tokio consumer; latency = receipt - sample timestamp (CLOCK_MONOTONIC) at {PACED_RATE}/s; max rate flat out, batches of {BATCH}"
    ));
    report.notes.push(
        "ivshmem: in-process link (heap sections, eventfd interrupts), bare-metal-style producer cell, tokio Channel consumer; uds/tcp: blocking writer, tokio BufReader reader"
            .into(),
    );
    let _ = std::io::stderr().flush();
    Ok(report)
}
