//! Criterion benches of shmring's per-operation costs (single thread) and a two-thread stream.
//!
//! `cargo bench --bench ring` (add `-- --quick` for a short check). Side-by-side comparisons
//! with other queues and the hardware floor are `ivbench`'s job, not these benches'.

use std::hint::black_box;
use std::time::Duration;

use bytemuck::{Pod, Zeroable};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ivshmem_stack::bench::pin;
use ivshmem_stack::bench::ring::{stream, Queue};
use shmring::{TypedConsumer, TypedProducer};

/// Ring capacity for the single-thread benches.
const CAPACITY: usize = 256 * 1024;

/// A 48-byte telemetry-like record.
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct Record {
    seq: u64,
    timestamp_ns: u64,
    values: [u32; 8],
}

const _: () = assert!(std::mem::size_of::<Record>() == 48);

/// try_send of one frame followed by try_recv of it (copy in, publish, copy out, publish).
fn send_recv(c: &mut Criterion) {
    let mut group = c.benchmark_group("try_send+try_recv");
    for size in [64usize, 1024] {
        let (mut tx, mut rx) = shmring::channel(CAPACITY).expect("ring");
        let frame = vec![0x5Au8; size];
        let mut buf = vec![0u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| {
                let _ = tx.try_send(black_box(&frame)).expect("room");
                let received = rx.try_recv(&mut buf).expect("frame").expect("present");
                black_box(received.len)
            })
        });
    }
    group.finish();
}

/// grant + commit + flush of 64 KiB, without and with filling the grant; the consumer's
/// peek + release + flush that makes room again is inside the loop too.
fn grant_64k(c: &mut Criterion) {
    const LEN: usize = 64 * 1024;
    let mut group = c.benchmark_group("grant+commit+flush 64KiB");
    let source = vec![0xA5u8; LEN];
    for fill in [false, true] {
        let (mut tx, mut rx) = shmring::channel(CAPACITY).expect("ring");
        let name = if fill {
            // Only the filled variant moves 64 KiB, so only it reports a byte rate.
            group.throughput(Throughput::Bytes(LEN as u64));
            "filled (copy_from_slice)"
        } else {
            "ring ops only (one byte written)"
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut grant = tx.grant(LEN).expect("room");
                if fill {
                    grant.copy_from_slice(&source);
                } else {
                    grant[0] = 1;
                }
                grant.commit();
                let _ = tx.flush();
                let frame = rx.peek().expect("frame").expect("present");
                black_box(frame.payload().read_u8(0).expect("in bounds"));
                frame.release();
                let _ = rx.flush();
            })
        });
    }
    group.finish();
}

/// Reading a published 64 KiB frame through the sound view (single thread, ring hot in cache):
/// the RFC 1071 sum over it, copy-out + sum in one pass, against a plain 64 KiB memcpy.
fn view_64k(c: &mut Criterion) {
    const LEN: usize = 64 * 1024;
    let mut group = c.benchmark_group("peek 64KiB through the view");
    group.throughput(Throughput::Bytes(LEN as u64));
    let (mut tx, mut rx) = shmring::channel(CAPACITY).expect("ring");
    let _ = tx.try_send(&vec![0xA5u8; LEN]).expect("room");
    let mut dst = vec![0u8; LEN];
    group.bench_function("ones_complement_sum", |b| {
        b.iter(|| {
            let frame = rx.peek().expect("frame").expect("present");
            black_box(frame.payload().ones_complement_sum())
        })
    });
    group.bench_function("copy_to_with_sum", |b| {
        b.iter(|| {
            let frame = rx.peek().expect("frame").expect("present");
            black_box(frame.payload().copy_to_with_sum(&mut dst))
        })
    });
    group.bench_function("copy_to", |b| {
        b.iter(|| {
            let frame = rx.peek().expect("frame").expect("present");
            black_box(frame.payload().copy_to(&mut dst))
        })
    });
    let source = vec![0xA5u8; LEN];
    group.bench_function("memcpy (baseline)", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&source));
            black_box(&mut dst);
        })
    });
    group.finish();
}

/// Typed send + recv of a 48-byte Pod record.
fn typed_record(c: &mut Criterion) {
    let (tx, rx) = shmring::channel(CAPACITY).expect("ring");
    let mut tx = TypedProducer::<Record>::new(tx).expect("fits");
    let mut rx = TypedConsumer::<Record>::new(rx);
    let mut record = Record {
        seq: 0,
        timestamp_ns: 1,
        values: [7; 8],
    };
    c.bench_function("typed send+recv 48B record", |b| {
        b.iter(|| {
            record.seq += 1;
            let _ = tx.try_send(black_box(&record)).expect("room");
            let got = rx.try_recv().expect("record").expect("present").value;
            assert_eq!(got.seq, record.seq);
        })
    });
}

/// Two pinned threads streaming sequence-checked 64-byte messages through shmring.
fn two_thread_stream(c: &mut Criterion) {
    let Ok(cpus) = pin::default_cpus() else {
        eprintln!("two-thread bench skipped: fewer than 2 CPUs");
        return;
    };
    let mut group = c.benchmark_group("two-thread stream");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("shmring 64B msg", |b| {
        b.iter_custom(|iters| stream::<64>(Queue::Shmring, cpus, iters).expect("stream"))
    });
    group.finish();
}

criterion_group!(
    benches,
    send_recv,
    grant_64k,
    view_64k,
    typed_record,
    two_thread_stream
);
criterion_main!(benches);
