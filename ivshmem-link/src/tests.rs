//! Tests of the link over an in-memory two-peer "machine": heap memory for the state table
//! and both output sections, registers whose `STATE` writes land in the state table (what the
//! hypervisor does) and whose doorbells are counted. Small sections, so Miri runs them too.

use core::cell::Cell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};
use std::alloc::Layout;
use std::vec::Vec;

use ivshmem_dev::{regs, Ivshmem, RegisterAccess, Section, Sections};
use shmring::duplex::CONSUMER_SLOT;

use super::*;

const PAGE: usize = 4096;
const OUT: usize = 8 * 1024;

struct Machine {
    mem: NonNull<u8>,
    layout: Layout,
    rung: [Cell<u32>; 2],
}

impl Machine {
    fn new() -> Self {
        let layout = Layout::from_size_align(PAGE + 2 * OUT, PAGE).unwrap();
        // SAFETY: non-zero size.
        let mem = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        Machine {
            mem,
            layout,
            rung: [Cell::new(0), Cell::new(0)],
        }
    }

    fn output(&self, peer: u16) -> NonNull<u8> {
        // SAFETY: inside the allocation.
        unsafe { self.mem.byte_add(PAGE + usize::from(peer) * OUT) }
    }

    /// Peer `id`'s driver; its own output section starts `skew` bytes into its slot.
    fn device_skewed(&self, id: u16, skew: usize) -> Ivshmem<Regs<'_>> {
        // SAFETY: every range lies inside the allocation, which outlives the drivers (each
        // test declares the machine first); peer `id` writes only its own section.
        let sections = unsafe {
            let mut s = Sections::new(Section::new(self.mem, 8, false));
            for peer in 0..2u16 {
                let (at, len) = if peer == id {
                    (self.output(peer).byte_add(skew), OUT - skew)
                } else {
                    (self.output(peer), OUT)
                };
                s.outputs[usize::from(peer)] = Some(Section::new(at, len, peer == id));
            }
            s
        };
        Ivshmem::new(Regs { m: self, id }, sections).unwrap()
    }

    fn device(&self, id: u16) -> Ivshmem<Regs<'_>> {
        self.device_skewed(id, 0)
    }

    fn link(&self, id: u16) -> Link<Regs<'_>> {
        Link::new(self.device(id), 1 - id, LinkConfig::default()).unwrap()
    }

    fn entry(&self, peer: u16) -> *mut u32 {
        // SAFETY: entry `peer` of the two-entry state table at the start of the allocation.
        unsafe { self.mem.cast::<u32>().as_ptr().add(usize::from(peer)) }
    }

    fn state(&self, peer: u16) -> u32 {
        // SAFETY: see `entry`.
        unsafe { self.entry(peer).read_volatile() }
    }

    /// What the hypervisor does when a peer writes STATE, dies or restarts.
    fn set_state(&self, peer: u16, value: u32) {
        // SAFETY: see `entry`.
        unsafe { self.entry(peer).write_volatile(value) }
    }

    /// Scribbles over peer `peer`'s published producer index (a hostile or broken peer).
    fn corrupt_producer_index(&self, peer: u16, value: u64) {
        let at = CONSUMER_SLOT + shmring::layout::P_INDEX;
        // SAFETY: the producer index is a 64-bit counter inside peer `peer`'s section,
        // 8-byte aligned (page-aligned section, 64-aligned parts); shmring reads it atomically.
        unsafe { AtomicU64::from_ptr(self.output(peer).byte_add(at).cast().as_ptr()) }
            .store(value, Ordering::Release);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.mem.as_ptr(), self.layout) }
    }
}

struct Regs<'m> {
    m: &'m Machine,
    id: u16,
}

impl RegisterAccess for Regs<'_> {
    fn read32(&self, offset: u32) -> u32 {
        match offset {
            regs::ID => self.id.into(),
            regs::MAX_PEERS => 2,
            regs::STATE => self.m.state(self.id),
            _ => 0,
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        match offset {
            regs::STATE => self.m.set_state(self.id, value),
            regs::DOORBELL => {
                let target = usize::from(ivshmem_dev::Doorbell::decode(value).peer);
                self.m.rung[target].set(self.m.rung[target].get() + 1);
            }
            _ => {}
        }
    }
}

/// Both sides take turns polling until neither changes anything.
fn settle(a: &mut Link<Regs<'_>>, b: &mut Link<Regs<'_>>, drain: Drain) {
    for _ in 0..4 {
        a.poll(0, drain);
        b.poll(0, drain);
    }
}

fn send(link: &mut Link<Regs<'_>>, seq: u32) {
    let notify = link
        .rings_mut()
        .expect("attached")
        .tx
        .try_send(&seq.to_le_bytes())
        .unwrap();
    link.notify(notify);
}

fn recv(link: &mut Link<Regs<'_>>) -> Option<u32> {
    let mut buf = [0u8; 4];
    let rings = link.rings_mut()?;
    let got = rings.rx.try_recv(&mut buf).unwrap()?;
    assert_eq!(got.len, 4);
    let notify = rings.rx.flush();
    link.notify(notify);
    Some(u32::from_le_bytes(buf))
}

#[test]
fn the_link_follows_the_state_table() {
    use LinkState::*;
    let m = Machine::new();
    let mut a = m.link(0);
    // Peer absent: RESET → INIT, nothing set up.
    let s = a.poll(0, Drain::Discard);
    assert_eq!((a.state(), m.state(0)), (Init, 1));
    assert_eq!(
        (s.event, s.departed, s.fault),
        (LinkEvent::None, None, None)
    );
    assert!(!a.is_up());
    // Peer INIT: set up own rings, READY.
    m.set_state(1, Init.as_u32());
    a.poll(0, Drain::Discard);
    assert_eq!((a.state(), m.state(0)), (Ready, 2));
    assert!(!a.is_up());
    // Peer READY but its parts are not initialised: refused as not ready, stays READY.
    m.set_state(1, Ready.as_u32());
    let s = a.poll(0, Drain::Discard);
    assert_eq!(a.state(), Ready);
    assert_eq!(
        s.fault,
        Some(LinkFault::Attach {
            peer: 1,
            error: shmring::Error::PeerNotReady
        })
    );
    assert_eq!(a.stats().attach_failures, 1);
    // The fake peer vanishes: a tears down (its parts stay initialised) and waits in INIT.
    m.set_state(1, Reset.as_u32());
    let s = a.poll(0, Drain::Discard);
    assert_eq!((s.departed, s.reset), (Some(0), true));
    assert_eq!(a.state(), Init);
    // The real peer starts: INIT, then READY (own rings set up) against a in INIT.
    let mut b = m.link(1);
    b.poll(0, Drain::Discard);
    assert_eq!(b.state(), Ready);
    // a: INIT → READY → attach → RUN in one poll; no carrier while b is READY.
    let s = a.poll(7, Drain::Discard);
    assert_eq!(a.state(), Run);
    assert!(a.is_up());
    assert_eq!(s.event, LinkEvent::None);
    b.poll(0, Drain::Discard);
    assert_eq!(b.state(), Run);
    let s = a.poll(9, Drain::Discard);
    assert_eq!(s.event, LinkEvent::Up);
    assert_eq!(a.up_since(), Some(9));
    assert!(a.carrier());
    // Garbage from the peer is "not there": a tears down.
    m.set_state(1, 0xdead_beef);
    let s = a.poll(10, Drain::Discard);
    assert_eq!(s.event, LinkEvent::Down);
    assert_eq!(s.departed, Some(0xdead_beef));
    assert!(s.reset);
    assert_eq!(a.state(), Init);
    assert_eq!(a.up_since(), None);
    assert_eq!(a.stats().departures, 2);
    assert_eq!((a.stats().ups, a.stats().downs), (1, 1));
}

#[test]
fn new_checks_the_sections() {
    let m = Machine::new();
    let bad_peer = Link::new(m.device(0), 0, LinkConfig::default()).unwrap_err();
    assert_eq!(
        bad_peer,
        LinkError::BadPeer {
            peer: 0,
            own: 0,
            max_peers: 2
        }
    );
    assert!(Link::new(m.device(0), 2, LinkConfig::default()).is_err());
    let err = Link::new(m.device_skewed(0, 8), 1, LinkConfig::default()).unwrap_err();
    assert!(
        matches!(err, LinkError::MisalignedOwnOutput { align: 64, addr } if addr % 64 == 8),
        "{err:?}"
    );
    let big = LinkConfig {
        min_capacity: 2 * OUT,
        ..LinkConfig::default()
    };
    assert_eq!(
        Link::new(m.device(0), 1, big).unwrap_err(),
        LinkError::SectionTooSmall {
            len: OUT,
            min: 2 * OUT
        }
    );
    assert!(Link::new(m.device_skewed(0, 64), 1, LinkConfig::default()).is_ok());
}

#[test]
fn failed_ring_setup_never_announces_ready() {
    let m = Machine::new();
    // `new` refuses this section, so build the link around it by hand: the set-up in `poll`
    // is the last line of defence and must not publish READY on failure.
    let mut link = Link {
        phase: Phase::Idle,
        dev: m.device_skewed(0, 8),
        peer: 1,
        config: LinkConfig::default(),
        own: LinkState::Reset,
        carrier: false,
        up_since: None,
        violation: None,
        stats: LinkStats::default(),
        last_fault: None,
        leave_on_drop: true,
    };
    m.set_state(1, LinkState::Init.as_u32());
    let s = link.poll(0, Drain::Discard);
    assert_eq!(link.state(), LinkState::Init, "stays INIT");
    assert_eq!(m.state(0), 1, "READY was never written to STATE");
    assert_eq!(
        s.fault,
        Some(LinkFault::SetUp(shmring::Error::Misaligned { align: 64 }))
    );
    assert_eq!(link.stats().setup_failures, 1);
    // The peer goes READY: still no READY from us, one more counted failure.
    m.set_state(1, LinkState::Ready.as_u32());
    link.poll(0, Drain::Discard);
    assert_eq!((link.state(), m.state(0)), (LinkState::Init, 1));
    assert_eq!(link.stats().setup_failures, 2);
    assert!(!link.carrier());
}

#[test]
fn a_ring_below_the_minimum_is_refused() {
    let m = Machine::new();
    let mut a = Link::new(m.device(0), 1, LinkConfig::default()).unwrap();
    // b sends on a small ring; a insists on a larger one.
    let small = LinkConfig {
        max_capacity: Some(1024),
        ..LinkConfig::default()
    };
    let mut b = Link::new(m.device(1), 0, small).unwrap();
    let a_cfg = LinkConfig {
        min_capacity: 4096,
        ..LinkConfig::default()
    };
    a.config = a_cfg;
    settle(&mut a, &mut b, Drain::Discard);
    assert_eq!(a.state(), LinkState::Ready, "a refuses and stays READY");
    assert!(!a.is_up() && !a.carrier() && !b.carrier());
    assert_eq!(
        a.last_fault(),
        Some(LinkFault::RingTooSmall {
            peer: 1,
            capacity: 1024,
            min: 4096
        })
    );
    assert!(a.stats().attach_failures >= 1);
}

#[test]
fn frames_flow_and_doorbells_ring_only_when_asked() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::Discard);
    assert!(a.carrier() && b.carrier());
    // b announces sleep; a's next publish must ring b.
    assert!(b.rings_mut().unwrap().rx.prepare_sleep().unwrap());
    send(&mut a, 1);
    assert_eq!(m.rung[1].get(), 1);
    assert_eq!(a.stats().doorbells, 1);
    // b did not ask again: no further doorbell.
    send(&mut a, 2);
    assert_eq!(m.rung[1].get(), 1);
    assert_eq!(recv(&mut b), Some(1));
    assert_eq!(recv(&mut b), Some(2));
    assert_eq!(recv(&mut b), None);
    assert!(!a.flush(), "nothing pending");
}

/// The peer leaves with frames in flight: every frame it published is delivered exactly
/// once, then the link resets; frames the receiver acknowledged were all delivered.
#[test]
fn peer_gone_with_frames_in_flight() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::DeliverFirst);
    for seq in 0..10 {
        send(&mut b, seq);
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut a).unwrap());
    }
    // What a acknowledged (released and published) is what b's producer sees consumed.
    b.poll(0, Drain::DeliverFirst);
    drop(b);
    assert_eq!(m.state(1), 0, "b published RESET as it left");
    // a notices (interrupt), but keeps the rings until it has received everything.
    let s = a.poll(0, Drain::DeliverFirst);
    assert_eq!(s.event, LinkEvent::Down, "carrier off at once");
    assert_eq!(
        (s.departed, s.reset),
        (None, false),
        "no reset while frames wait"
    );
    assert_eq!(
        a.state(),
        LinkState::Run,
        "the peer must wait for our RESET"
    );
    let mut departed = None;
    while let Some(seq) = recv(&mut a) {
        got.push(seq);
        // The user polls between receives: the reset comes only once the ring is empty.
        let s = a.poll(0, Drain::DeliverFirst);
        if s.departed.is_some() {
            assert!(s.reset);
            assert!(departed.is_none(), "one departure");
            departed = Some((got.len(), s.departed));
        }
    }
    assert_eq!(departed, Some((10, Some(0))), "reset after the last frame");
    assert_eq!(
        got,
        (0..10).collect::<Vec<_>>(),
        "each frame exactly once, in order"
    );
    assert_eq!(a.state(), LinkState::Init);
    assert_eq!(recv(&mut a), None, "nothing delivered twice");
    assert_eq!(a.stats().departures, 1);
}

#[test]
fn discard_resets_at_once() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::Discard);
    send(&mut b, 1);
    drop(b);
    let s = a.poll(0, Drain::Discard);
    assert_eq!(s.departed, Some(0));
    assert!(!a.is_up());
}

/// The peer restarts (a new program on the same sections): the link comes back, the new
/// session starts from scratch, nothing of the old one is delivered again.
#[test]
fn reattach_after_a_peer_restart() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::DeliverFirst);
    for seq in 0..3 {
        send(&mut b, seq);
    }
    assert_eq!(recv(&mut a), Some(0));
    // b dies without a word: the hypervisor writes 0 for it; its successor starts.
    core::mem::forget(b);
    m.set_state(1, 0);
    let mut b2 = m.link(1);
    // b2 sees a in RUN and waits in RESET (a has not noticed yet).
    b2.poll(0, Drain::DeliverFirst);
    assert_eq!(b2.state(), LinkState::Reset);
    // a drains the old session's frames, then resets.
    assert_eq!(recv(&mut a), Some(1));
    assert_eq!(recv(&mut a), Some(2));
    settle(&mut a, &mut b2, Drain::DeliverFirst);
    assert!(a.carrier() && b2.carrier(), "up again");
    assert_eq!(recv(&mut a), None, "old frames are not delivered again");
    send(&mut b2, 100);
    send(&mut a, 200);
    assert_eq!(recv(&mut a), Some(100));
    assert_eq!(recv(&mut b2), Some(200));
    assert_eq!(a.stats().ups, 2);
    assert_eq!(a.stats().departures, 1);
}

/// A peer that breaks the ring protocol: the user reports it, the link resets with a typed
/// fault naming the peer and the violation, and comes back once the peer has reset too.
#[test]
fn corrupt_peer_resets_the_link() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::Discard);
    send(&mut b, 1);
    m.corrupt_producer_index(1, u64::MAX / 2);
    let mut buf = [0u8; 4];
    let err = a.rings_mut().unwrap().rx.try_recv(&mut buf).unwrap_err();
    assert!(matches!(err, shmring::Error::Corrupt { .. }), "{err:?}");
    a.report_violation(err);
    let s = a.poll(0, Drain::DeliverFirst);
    assert_eq!(
        s.fault,
        Some(LinkFault::PeerViolation {
            peer: 1,
            error: err
        })
    );
    assert!(s.reset);
    assert_eq!(s.event, LinkEvent::Down);
    assert_eq!(a.state(), LinkState::Reset, "RESET published");
    assert_eq!(m.state(0), 0);
    assert_eq!(a.stats().faults, 1);
    let text = std::format!("{}", s.fault.unwrap());
    assert!(
        text.contains("peer 1") && text.contains("corrupted"),
        "{text}"
    );
    // b sees a leave, resets its parts (fixing the garbage), and both come up again.
    settle(&mut a, &mut b, Drain::Discard);
    assert!(a.carrier() && b.carrier());
    send(&mut b, 7);
    assert_eq!(recv(&mut a), Some(7));
}

#[test]
fn leave_and_drop_publish_reset() {
    let m = Machine::new();
    let (mut a, mut b) = (m.link(0), m.link(1));
    settle(&mut a, &mut b, Drain::Discard);
    a.leave();
    assert_eq!((a.state(), m.state(0)), (LinkState::Reset, 0));
    assert!(!a.is_up() && !a.carrier());
    settle(&mut a, &mut b, Drain::Discard);
    assert!(a.carrier() && b.carrier(), "a comes back after leaving");
    drop(b);
    assert_eq!(m.state(1), 0);
    // A link handed over to another process drops without a word.
    a.poll(0, Drain::Discard);
    assert_eq!(m.state(0), LinkState::Init.as_u32());
    a.keep_state_on_drop();
    drop(a);
    assert_eq!(m.state(0), LinkState::Init.as_u32(), "STATE kept");
}
