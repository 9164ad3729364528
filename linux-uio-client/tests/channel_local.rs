//! The tokio layer over an in-process link ([`LocalLink`]: heap sections, real eventfds as
//! interrupts, the device's one-shot and state-change semantics).
//!
//! Every wait is on the channel itself; `tokio::time::timeout` only guards against a hang.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytemuck::{Pod, Zeroable};
use linux_uio_client::channel::ChannelError;
use linux_uio_client::{Channel, ChannelOptions, Endpoint, LocalLink, WaitMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GUARD: Duration = Duration::from_secs(30);

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
struct Rec {
    seq: u64,
    value: u64,
}

fn rec(seq: u64) -> Rec {
    Rec {
        seq,
        value: seq.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    }
}

fn channel(
    link: &Arc<LocalLink>,
    id: u16,
    peer_name: &str,
    wait: WaitMode,
    cap: Option<usize>,
) -> Channel {
    let endpoint = Endpoint::attach_local(link, id).expect("attach");
    Channel::new(
        endpoint,
        ChannelOptions {
            peer_name: Some(peer_name.to_string()),
            max_capacity: cap,
            wait,
            ..ChannelOptions::default()
        },
    )
    .expect("channel")
}

async fn guard<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("hung: no wake-up arrived")
}

async fn both_up(a: &mut Channel, b: &mut Channel) {
    guard(async { tokio::try_join!(a.wait_up(), b.wait_up()).expect("link up") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_stream_in_order_over_eventfd_interrupts() {
    let link = LocalLink::new("t", 2, 16 * 1024).unwrap();
    let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, Some(1024));
    let mut rx = channel(&link, 1, "producer", WaitMode::Interrupt, None);
    const N: u64 = 20_000;
    let producer = tokio::spawn(async move {
        for seq in 0..N {
            tx.send_record(&rec(seq)).await.expect("send");
        }
        tx
    });
    let mut records = rx.records::<Rec>();
    for seq in 0..N {
        let got = guard(records.next())
            .await
            .expect("stream ended")
            .expect("record");
        assert_eq!(got, rec(seq));
    }
    let tx = guard(producer).await.unwrap();
    // A ring of 1 KiB holds ~40 records: the producer must have waited for space, i.e. the
    // consumer's releases woke it through the handshake, and the consumer slept on its
    // interrupt at least once.
    assert!(rx.stats().interrupts > 0, "{:?}", rx.stats());
    assert!(
        rx.stats().doorbells > 0,
        "consumer never woke the producer: {:?}",
        rx.stats()
    );
    drop(tx);
}

#[tokio::test(flavor = "current_thread")]
async fn back_pressured_send_wakes_when_the_peer_consumes() {
    let link = LocalLink::new("bp", 2, 8192).unwrap();
    let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, Some(256));
    let mut rx = channel(&link, 1, "producer", WaitMode::Interrupt, None);
    both_up(&mut tx, &mut rx).await;

    // Fill the ring: sends complete at once until it is full.
    let mut sent = 0u64;
    loop {
        let record = rec(sent);
        let mut send = pin!(tx.send_record(&record));
        let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(r) => {
                r.expect("send");
                sent += 1;
                assert!(sent < 1000, "a 256-byte ring never filled");
            }
            Poll::Pending => break,
        }
    }
    assert!(sent > 0);
    // The next send is pending (back-pressure); it must complete after the consumer takes
    // one record, woken through the consumer's doorbell.
    let waiting = tokio::spawn(async move {
        tx.send_record(&rec(sent)).await.expect("send after space");
        tx
    });
    let first = guard(rx.recv_record::<Rec>()).await.unwrap();
    assert_eq!(first, rec(0));
    let tx = guard(waiting).await.unwrap();
    assert!(
        rx.stats().doorbells >= 1,
        "the consumer must ring the waiting producer"
    );
    // Everything arrives, in order, the blocked record last.
    for seq in 1..=sent {
        assert_eq!(guard(rx.recv_record::<Rec>()).await.unwrap(), rec(seq));
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_read_write_roundtrip_of_4_mib() {
    let link = LocalLink::new("io", 2, 64 * 1024).unwrap();
    let a = channel(&link, 0, "a", WaitMode::Interrupt, Some(16 * 1024));
    let b = channel(&link, 1, "b", WaitMode::Interrupt, Some(16 * 1024));
    const LEN: usize = 4 << 20;
    let data: Vec<u8> = (0..LEN as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sum = crc32fast::hash(&data);

    // b echoes everything back, split into halves on one task pair.
    let (mut b_rd, mut b_wr) = tokio::io::split(b);
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 3000];
        let mut total = 0;
        while total < LEN {
            let n = b_rd.read(&mut buf).await.expect("echo read");
            assert!(n > 0);
            b_wr.write_all(&buf[..n]).await.expect("echo write");
            total += n;
        }
        (b_rd, b_wr)
    });
    let (mut a_rd, mut a_wr) = tokio::io::split(a);
    let writer = tokio::spawn(async move {
        // Odd chunk sizes: frames of every length, some larger than the reader's buffer.
        for chunk in data.chunks(7777) {
            a_wr.write_all(chunk).await.expect("write");
        }
        a_wr.flush().await.unwrap();
        a_wr
    });
    let mut back = vec![0u8; LEN];
    guard(a_rd.read_exact(&mut back)).await.expect("read back");
    assert_eq!(crc32fast::hash(&back), sum, "echoed bytes differ");
    let _a_wr = guard(writer).await.unwrap();
    let _b = guard(echo).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_mode_receives_without_doorbells() {
    let link = LocalLink::new("poll", 2, 16 * 1024).unwrap();
    let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, Some(4096));
    // A consumer that never stops polling never asks for a doorbell.
    let mut rx = channel(
        &link,
        1,
        "producer",
        WaitMode::Poll {
            spin: Duration::from_secs(3600),
        },
        None,
    );
    both_up(&mut tx, &mut rx).await;
    let irqs_before = rx.stats().interrupts;
    const N: u64 = 5000;
    let producer = tokio::spawn(async move {
        for seq in 0..N {
            tx.send_record(&rec(seq)).await.expect("send");
        }
        tx
    });
    for seq in 0..N {
        assert_eq!(guard(rx.recv_record::<Rec>()).await.unwrap(), rec(seq));
    }
    let tx = guard(producer).await.unwrap();
    assert_eq!(
        tx.stats().doorbells,
        0,
        "a polling consumer must not be rung"
    );
    assert_eq!(
        rx.stats().interrupts,
        irqs_before,
        "the consumer only polled"
    );

    // With a short spin it falls back to interrupts and still gets everything.
    let mut tx = tx;
    rx.set_wait_mode(WaitMode::Poll {
        spin: Duration::from_micros(50),
    });
    let producer = tokio::spawn(async move {
        for seq in N..N + 200 {
            tx.send_record(&rec(seq)).await.expect("send");
            tokio::task::yield_now().await;
        }
        tx
    });
    for seq in N..N + 200 {
        assert_eq!(guard(rx.recv_record::<Rec>()).await.unwrap(), rec(seq));
    }
    drop(guard(producer).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_death_ends_the_stream_naming_the_peer_and_reattach_resumes() {
    let link = LocalLink::new("tele", 2, 16 * 1024).unwrap();
    let mut rx = channel(&link, 1, "producer", WaitMode::Interrupt, None);
    let mut states = rx.peer_states();
    assert_eq!(states.next().await.unwrap().state, 0, "no producer yet");

    for round in 0..2u64 {
        let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, None);
        let base = round * 1000;
        let producer = tokio::spawn(async move {
            for seq in base..base + 100 {
                tx.send_record(&rec(seq)).await.expect("send");
            }
            // The producer dies right after its last send: nothing it published is lost.
            drop(tx);
        });
        let mut records = rx.records::<Rec>();
        for seq in base..base + 100 {
            let got = guard(records.next())
                .await
                .expect("ended early")
                .expect("record");
            assert_eq!(got, rec(seq));
        }
        guard(producer).await.unwrap();
        let err = guard(records.next())
            .await
            .expect("an error, not the end")
            .unwrap_err();
        assert!(matches!(err, ChannelError::PeerGone { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("peer 0 (`producer`)") && text.contains("link `tele`"),
            "{text}"
        );
        assert!(
            records.next().await.is_none(),
            "the stream ends after the departure"
        );
        assert_eq!(rx.stats().departures, round + 1);
    }
    // The peer-state stream saw the producer come and go.
    let mut seen = Vec::new();
    while let Some(s) = std::future::poll_fn(|cx| {
        use futures_core::Stream;
        match std::pin::Pin::new(&mut states).poll_next(cx) {
            Poll::Ready(v) => Poll::Ready(v),
            Poll::Pending => Poll::Ready(None),
        }
    })
    .await
    {
        seen.push(s.state);
    }
    assert_eq!(seen.last(), Some(&0), "last seen: producer gone ({seen:?})");
}

#[tokio::test(flavor = "current_thread")]
async fn interrupt_await_rearms_one_shot_and_frames_stream() {
    let link = LocalLink::new("irq", 2, 16 * 1024).unwrap();
    let mut a = channel(&link, 0, "b", WaitMode::Interrupt, None);
    let mut b = channel(&link, 1, "a", WaitMode::Interrupt, None);
    both_up(&mut a, &mut b).await;

    // Five doorbells while `a` is not waiting merge into one interrupt (with any state-change
    // interrupt still pending from the set-up).
    for _ in 0..5 {
        b.device().ring_peer(0);
    }
    let n = guard(a.interrupt()).await.unwrap();
    assert!(n >= 5, "merged count {n}");
    assert!(
        a.device().interrupts_enabled(),
        "one-shot delivery must be re-armed before interrupt() returns"
    );
    // Re-armed: the next doorbells interrupt again, and only they are counted.
    for _ in 0..3 {
        b.device().ring_peer(0);
    }
    assert_eq!(guard(a.interrupt()).await.unwrap(), 3);

    // Byte frames of every size class, including empty, arrive intact and in order.
    let sizes = [0usize, 1, 7, 8, 100, 1000, 4000];
    for (i, &len) in sizes.iter().enumerate() {
        let frame: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        guard(b.send(&frame)).await.unwrap();
    }
    let mut frames = a.frames();
    for (i, &len) in sizes.iter().enumerate() {
        let got = guard(frames.next()).await.unwrap().unwrap();
        let want: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
        assert_eq!(got, want, "frame {i}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn first_write_before_link_up_sends_a_full_size_chunk_once_up() {
    let link = LocalLink::new("w", 2, 64 * 1024).unwrap();
    let mut a = channel(&link, 0, "reader", WaitMode::Interrupt, Some(16 * 1024));
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut write = pin!(a.write(&data));
    // No peer yet: the write waits for the link instead of cutting to a guessed limit.
    let pending = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx).is_pending()));
    assert!(pending.await, "wrote before the link was up");
    let mut b = channel(&link, 1, "writer", WaitMode::Interrupt, None);
    let (written, up) = guard(async { tokio::join!(write, b.wait_up()) }).await;
    up.expect("b up");
    let written = written.expect("write");
    assert_eq!(
        written,
        data.len(),
        "one full-size chunk (the ring takes 5000 bytes), not the minimum ring's limit"
    );
    let frame = guard(b.recv_frame()).await.expect("frame");
    assert_eq!(frame, data);
}

/// Counts the wake-ups of a hand-polled future.
#[derive(Default)]
struct WakeFlag(std::sync::atomic::AtomicBool);

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn hybrid_waiting_spins_a_bounded_time_then_sleeps_on_the_doorbell() {
    let link = LocalLink::new("hybrid", 2, 16 * 1024).unwrap();
    let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, Some(4096));
    let mut rx = channel(&link, 1, "producer", WaitMode::hybrid(), None);
    both_up(&mut tx, &mut rx).await;
    let (irqs, doorbells) = (rx.stats().interrupts, tx.stats().doorbells);
    let flag = Arc::new(WakeFlag::default());
    let waker = std::task::Waker::from(Arc::clone(&flag));
    let mut cx = std::task::Context::from_waker(&waker);
    let started = std::time::Instant::now();
    let polls;
    {
        let mut recv = pin!(rx.recv_record::<Rec>());
        // Spinning, the receive wakes itself at once to be polled again; asleep on the
        // doorbell, it does not. Poll it by hand until it stops waking itself.
        let mut n = 0u64;
        loop {
            flag.0.store(false, std::sync::atomic::Ordering::SeqCst);
            assert!(recv.as_mut().poll(&mut cx).is_pending(), "nothing was sent");
            n += 1;
            if !flag.0.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            assert!(
                started.elapsed() < GUARD,
                "hybrid waiting never stopped spinning"
            );
        }
        polls = n;
        let spun = started.elapsed();
        println!("spun {polls} polls in {spun:?} before sleeping");
        assert!(
            spun >= WaitMode::HYBRID_SPIN,
            "slept after {spun:?}, before its spin"
        );
        // Asleep: the sender sees the announcement and rings the doorbell, which wakes it.
        tx.send_record(&rec(7)).await.unwrap();
        assert_eq!(
            tx.stats().doorbells,
            doorbells + 1,
            "the sleeper asked for a doorbell"
        );
        assert_eq!(guard(recv).await.unwrap(), rec(7));
    }
    assert!(polls > 1, "it spun before sleeping");
    assert!(rx.stats().interrupts > irqs, "the doorbell woke it");
}

/// A writer that takes at most `max` bytes per call and can be told to fail.
struct Trickle {
    got: Vec<u8>,
    max: usize,
    fail_after: Option<usize>,
    stall: bool,
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.fail_after.is_some_and(|n| self.got.len() >= n) {
            return Poll::Ready(Err(std::io::Error::other("disk full")));
        }
        // Every other call is Pending first, so the receive really awaits mid-frame.
        self.stall = !self.stall;
        if self.stall {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = buf.len().min(self.max);
        self.got.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_frame_into_writes_each_frame_whole_and_keeps_it_on_a_write_error() {
    let link = LocalLink::new("into", 2, 128 * 1024).unwrap();
    let mut tx = channel(&link, 0, "consumer", WaitMode::Interrupt, None);
    let mut rx = channel(&link, 1, "producer", WaitMode::Interrupt, None);
    both_up(&mut tx, &mut rx).await;
    let frames: Vec<Vec<u8>> = [0usize, 1, 7, 4096, 16 * 1024 + 3, 30_000]
        .iter()
        .map(|&len| (0..len).map(|i| (i * 31 + len) as u8).collect())
        .collect();
    let sent = frames.clone();
    let producer = tokio::spawn(async move {
        for f in &sent {
            tx.send(f).await.expect("send");
        }
        tx
    });
    // On another task: the future is Send (it holds the peeked frame across awaits).
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        for _ in 0..6 {
            let mut w = Trickle {
                got: Vec::new(),
                max: 1000,
                fail_after: None,
                stall: false,
            };
            let n = rx.recv_frame_into(&mut w).await.expect("recv into");
            assert_eq!(n, w.got.len());
            got.push(w.got);
        }
        (rx, got)
    });
    let (mut rx, got) = guard(receiver).await.unwrap();
    assert_eq!(got, frames);
    let mut tx = guard(producer).await.unwrap();

    // A failing writer: the error names the peer, the frame stays for the next receive.
    let frame: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    guard(tx.send(&frame)).await.unwrap();
    let mut w = Trickle {
        got: Vec::new(),
        max: 4096,
        fail_after: Some(5000),
        stall: false,
    };
    let err = guard(rx.recv_frame_into(&mut w)).await.unwrap_err();
    assert!(matches!(err, ChannelError::Write { .. }), "{err}");
    assert!(err.to_string().contains("producer"), "{err}");
    assert!(w.got.len() >= 5000 && w.got.len() < frame.len());
    assert_eq!(guard(rx.recv_frame()).await.unwrap(), frame, "not consumed");
}
