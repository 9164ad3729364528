//! Property test: random operation sequences on a small ring, checked step by step against a
//! `VecDeque` model (contents, order, kinds, exact `Full`/`TooLarge`, free space, visibility
//! before/after flush, and the doorbell decisions of both handshakes).

use std::collections::VecDeque;

use proptest::prelude::*;
use shmring::layout::{frame_size, max_frame_len};
use shmring::{channel, Consumer, Error, Producer};

#[derive(Debug, Clone)]
enum Op {
    Send { len: usize, kind: u16 },
    GrantCommit { len: usize, commit: Option<usize> },
    GrantDrop { len: usize },
    Flush,
    Recv { buf: usize },
    PeekRelease,
    PeekDrop,
    ConsFlush,
    PrepareSleep,
    WaitForSpace { len: usize },
}

fn op(max: usize) -> impl Strategy<Value = Op> {
    let len = 0..=max + 2;
    prop_oneof![
        4 => (len.clone(), any::<u16>()).prop_map(|(len, kind)| Op::Send { len, kind }),
        3 => (len.clone(), proptest::option::of(0..=max + 2))
            .prop_map(|(len, commit)| Op::GrantCommit { len, commit }),
        1 => len.clone().prop_map(|len| Op::GrantDrop { len }),
        2 => Just(Op::Flush),
        4 => (0..=max + 2).prop_map(|buf| Op::Recv { buf }),
        3 => Just(Op::PeekRelease),
        1 => Just(Op::PeekDrop),
        2 => Just(Op::ConsFlush),
        1 => Just(Op::PrepareSleep),
        1 => len.prop_map(|len| Op::WaitForSpace { len }),
    ]
}

#[derive(Debug)]
struct ModelFrame {
    data: Vec<u8>,
    kind: u16,
    /// Position after the padding that precedes it (if any).
    start: u64,
    end: u64,
}

struct Model {
    cap: u64,
    write: u64,
    published: u64,
    read: u64,
    cons_published: u64,
    frames: VecDeque<ModelFrame>,
    consumer_sleeping: bool,
    space_target: Option<u64>,
    counter: u8,
}

impl Model {
    fn placement(&self, len: usize) -> (u64, u64) {
        let total = frame_size(len) as u64;
        let contiguous = self.cap - (self.write % self.cap);
        let pad = if total > contiguous { contiguous } else { 0 };
        (pad, total)
    }

    fn fits(&self, len: usize) -> Result<(u64, u64), Error> {
        let (pad, total) = self.placement(len);
        let free = self.cap - (self.write - self.cons_published);
        if pad + total > free {
            Err(Error::Full {
                free: free as usize,
                needed: (pad + total) as usize,
            })
        } else {
            Ok((pad, total))
        }
    }

    fn payload(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.counter = self.counter.wrapping_add(1);
                self.counter
            })
            .collect()
    }

    fn push(&mut self, data: Vec<u8>, kind: u16, pad: u64) {
        let start = self.write + pad;
        let end = start + frame_size(data.len()) as u64;
        self.write = end;
        self.frames.push_back(ModelFrame {
            data,
            kind,
            start,
            end,
        });
    }

    fn expect_prod_notify(&mut self) -> bool {
        if self.write == self.published {
            return false;
        }
        self.published = self.write;
        std::mem::take(&mut self.consumer_sleeping)
    }

    fn expect_cons_notify(&mut self) -> bool {
        let (old, new) = (self.cons_published, self.read);
        self.cons_published = new;
        matches!(self.space_target, Some(t) if old < t && t <= new)
    }

    fn visible_front(&self) -> Option<&ModelFrame> {
        self.frames.front().filter(|f| f.end <= self.published)
    }
}

fn run(cap: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut tx, mut rx): (Producer, Consumer) = channel(cap).unwrap();
    let max = max_frame_len(cap);
    let mut m = Model {
        cap: cap as u64,
        write: 0,
        published: 0,
        read: 0,
        cons_published: 0,
        frames: VecDeque::new(),
        consumer_sleeping: false,
        space_target: None,
        counter: 0,
    };
    let mut buf = vec![0u8; max + 8];
    for op in ops {
        match op {
            Op::Send { len, kind } => {
                let data = m.payload(len);
                let got = tx.try_send_kind(kind, &data);
                if len > max {
                    prop_assert_eq!(got, Err(Error::TooLarge { len, max }));
                    continue;
                }
                match m.fits(len) {
                    Err(e) => prop_assert_eq!(got, Err(e)),
                    Ok((pad, _)) => {
                        m.push(data, kind, pad);
                        let expect = m.expect_prod_notify();
                        prop_assert_eq!(got.map(|n| n.needed()), Ok(expect));
                    }
                }
            }
            Op::GrantCommit { len, commit } => {
                let data = m.payload(len);
                match tx.grant(len) {
                    Err(e) => {
                        if len > max {
                            prop_assert_eq!(e, Error::TooLarge { len, max });
                        } else {
                            prop_assert_eq!(Err(e), m.fits(len).map(|_| ()));
                        }
                    }
                    Ok(mut g) => {
                        prop_assert!(len <= max);
                        let (pad, _) = m
                            .fits(len)
                            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                        prop_assert_eq!(g.len(), len);
                        g.copy_from_slice(&data);
                        match commit {
                            Some(n) if n <= len => {
                                g.commit_len(n);
                                m.push(data[..n].to_vec(), 0, pad);
                            }
                            _ => {
                                g.commit();
                                m.push(data, 0, pad);
                            }
                        }
                    }
                }
            }
            Op::GrantDrop { len } => {
                let r = tx.grant(len).map(|_| ());
                if len > max {
                    prop_assert_eq!(r, Err(Error::TooLarge { len, max }));
                } else {
                    prop_assert_eq!(r, m.fits(len).map(|_| ()));
                }
            }
            Op::Flush => {
                let expect = m.expect_prod_notify();
                prop_assert_eq!(tx.flush().needed(), expect);
            }
            Op::Recv { buf: size } => {
                let got = rx.try_recv(&mut buf[..size]);
                match m.visible_front() {
                    None => prop_assert_eq!(got, Ok(None)),
                    Some(f) if f.data.len() > size => {
                        let needed = f.data.len();
                        m.read = m.read.max(f.start);
                        prop_assert_eq!(got, Err(Error::BufferTooSmall { needed }));
                    }
                    Some(_) => {
                        let f = m.frames.pop_front().unwrap();
                        m.read = f.end;
                        let expect = m.expect_cons_notify();
                        let r = got
                            .map_err(|e| TestCaseError::fail(format!("{e}")))?
                            .unwrap();
                        prop_assert_eq!(&buf[..r.len], &f.data[..]);
                        prop_assert_eq!(r.notify.needed(), expect);
                    }
                }
            }
            Op::PeekRelease | Op::PeekDrop => {
                let release = matches!(op, Op::PeekRelease);
                let got = rx.peek().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                match (got, m.visible_front()) {
                    (None, None) => {}
                    (Some(frame), Some(f)) => {
                        prop_assert_eq!(frame.to_vec(), f.data.clone());
                        prop_assert_eq!(frame.kind(), f.kind);
                        m.read = m.read.max(f.start);
                        if release {
                            frame.release();
                            m.read = m.frames.pop_front().unwrap().end;
                        }
                    }
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "peek returned {:?}, model {want:?}",
                            got.map(|f| f.to_vec())
                        )))
                    }
                }
            }
            Op::ConsFlush => {
                let expect = m.expect_cons_notify();
                prop_assert_eq!(rx.flush().needed(), expect);
            }
            Op::PrepareSleep => {
                let expect = m.expect_cons_notify();
                prop_assert_eq!(rx.flush().needed(), expect);
                let empty = m.published == m.read;
                prop_assert_eq!(rx.prepare_sleep(), Ok(empty));
                m.consumer_sleeping = empty;
            }
            Op::WaitForSpace { len } => {
                let expect = m.expect_prod_notify();
                prop_assert_eq!(tx.flush().needed(), expect);
                let got = tx.prepare_wait_for_space(len);
                if len > max {
                    prop_assert_eq!(got, Err(Error::TooLarge { len, max }));
                } else if m.fits(len).is_ok() {
                    prop_assert_eq!(got, Ok(false));
                } else {
                    prop_assert_eq!(got, Ok(true));
                    let (pad, total) = m.placement(len);
                    m.space_target = Some(m.write + pad + total - m.cap);
                }
            }
        }
        // Free space accounting after every step.
        prop_assert_eq!(tx.free_space() as u64, m.cap - (m.write - m.cons_published));
        prop_assert_eq!(tx.pending() as u64, m.write - m.published);
        prop_assert_eq!(rx.available() as u64, m.published - m.read);
    }
    // Drain: everything published and flushed arrives, in order.
    let _ = tx.flush();
    while let Some(f) = m.frames.pop_front() {
        let r = rx.try_recv(&mut buf).unwrap().unwrap();
        prop_assert_eq!(&buf[..r.len], &f.data[..]);
    }
    prop_assert_eq!(rx.try_recv(&mut buf), Ok(None));
    Ok(())
}

fn config() -> ProptestConfig {
    let default_cases = if cfg!(miri) { 8 } else { 96 };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut config = ProptestConfig::with_cases(cases.unwrap_or(default_cases));
    if cfg!(miri) {
        config.failure_persistence = None;
    }
    config
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ring_matches_model(
        cap in prop_oneof![Just(64usize), Just(128), Just(256)],
        ops in proptest::collection::vec(op(120), if cfg!(miri) { 1..64 } else { 1..2000 }),
    ) {
        let max = max_frame_len(cap);
        // Scale lengths to this capacity so every size class (0..=max+2) is exercised.
        let ops = ops.into_iter().map(|op| match op {
            Op::Send { len, kind } => Op::Send { len: len % (max + 3), kind },
            Op::GrantCommit { len, commit } =>
                Op::GrantCommit { len: len % (max + 3), commit: commit.map(|c| c % (max + 3)) },
            Op::GrantDrop { len } => Op::GrantDrop { len: len % (max + 3) },
            Op::Recv { buf } => Op::Recv { buf: buf % (max + 3) },
            Op::WaitForSpace { len } => Op::WaitForSpace { len: len % (max + 3) },
            other => other,
        }).collect();
        run(cap, ops)?;
    }
}
