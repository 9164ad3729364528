//! Two [`IvnetLink`]s over one in-memory shared region (state table and two output sections
//! of Jailhouse's 0x7F000 bytes), each with a smoltcp interface: bring-up through the state
//! machine, doorbells on the data vector only when asked, TCP both ways with a checksum over
//! every byte, a restart of one side (carrier down and up), and a hostile write that stops
//! the victim's link with a named fault until both sides come back.

mod support;

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;

use ivshmem_dev::{regs, Ivshmem, RegisterAccess, Section, Sections};
use ivshmem_link::state::LinkState;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};
use vnet::ivnet::{Interrupts, IvnetConfig, IvnetLink, PeerFault};
use vnet::LinkEvent;

const SECTION: usize = 0x7F000;
const TABLE: usize = 4096;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// State table + output section 0 + output section 1, page aligned.
struct Memory {
    pages: Vec<Page>,
}

impl Memory {
    fn new() -> Rc<RefCell<Memory>> {
        let n = (TABLE + 2 * SECTION) / 4096;
        Rc::new(RefCell::new(Memory {
            pages: (0..n).map(|_| Page([0; 4096])).collect(),
        }))
    }
    fn base(&mut self) -> *mut u8 {
        self.pages.as_mut_ptr().cast()
    }
}

/// Registers of peer `id`: `STATE` writes go to the shared state table; doorbells are
/// recorded by vector.
#[derive(Debug)]
struct Registers {
    id: u32,
    table: *mut u32,
    state: Cell<u32>,
    doorbells: Rc<[Cell<u32>; 2]>,
}

impl RegisterAccess for Registers {
    fn read32(&self, offset: u32) -> u32 {
        match offset {
            regs::ID => self.id,
            regs::MAX_PEERS => 2,
            regs::STATE => self.state.get(),
            _ => 0,
        }
    }
    fn write32(&self, offset: u32, value: u32) {
        match offset {
            regs::STATE => {
                self.state.set(value);
                // SAFETY: entry `id` of the 4 KiB state table inside `Memory`.
                unsafe { self.table.add(self.id as usize).write_volatile(value) };
            }
            regs::DOORBELL => {
                assert_eq!(value >> 16, 1 - self.id, "doorbell targets the peer");
                let vector = (value & 0xFFFF) as usize;
                self.doorbells[vector].set(self.doorbells[vector].get() + 1);
            }
            _ => {}
        }
    }
}

struct Side {
    link: IvnetLink<Registers>,
    iface: Interface,
    sockets: SocketSet<'static>,
    doorbells: Rc<[Cell<u32>; 2]>,
}

fn device(mem: &Rc<RefCell<Memory>>, id: u16) -> (Ivshmem<Registers>, Rc<[Cell<u32>; 2]>) {
    let base = mem.borrow_mut().base();
    let doorbells = Rc::new([Cell::new(0), Cell::new(0)]);
    let regs = Registers {
        id: id.into(),
        table: base.cast(),
        state: Cell::new(0),
        doorbells: doorbells.clone(),
    };
    // SAFETY: every range lies inside `Memory`, which the test keeps alive (an `Rc` held
    // until after the links are dropped).
    let sections = unsafe {
        let mut s = Sections::new(Section::new(NonNull::new(base).unwrap(), 8, false));
        for peer in 0..2u16 {
            let p = base.add(TABLE + usize::from(peer) * SECTION);
            s.outputs[usize::from(peer)] =
                Some(Section::new(NonNull::new(p).unwrap(), SECTION, peer == id));
        }
        s
    };
    (Ivshmem::new(regs, sections).unwrap(), doorbells)
}

fn side(mem: &Rc<RefCell<Memory>>, id: u16, config: IvnetConfig) -> Side {
    let (dev, doorbells) = device(mem, id);
    let mut link = IvnetLink::new(dev, config).unwrap();
    let mac = EthernetAddress([2, 0, 0, 0, 0, 1 + id as u8]);
    let mut iface = Interface::new(Config::new(mac.into()), &mut link, Instant::ZERO);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(
            Ipv4Address::new(10, 0, 9, 1 + id as u8).into(),
            24,
        ))
        .unwrap()
    });
    Side {
        link,
        iface,
        sockets: SocketSet::new(Vec::new()),
        doorbells,
    }
}

/// Runs both state machines until neither changes.
fn settle(a: &mut Side, b: &mut Side) {
    for _ in 0..8 {
        let ea = a.link.poll_link();
        let eb = b.link.poll_link();
        if ea == LinkEvent::None && eb == LinkEvent::None {
            let (sa, sb) = (a.link.state(), b.link.state());
            a.link.poll_link();
            b.link.poll_link();
            if (sa, sb) == (a.link.state(), b.link.state()) {
                return;
            }
        }
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    )
}

fn byte(i: usize) -> u8 {
    (i.wrapping_mul(7) ^ (i >> 9)) as u8
}

/// Sends `total` bytes from `tx` to `rx` over TCP; returns the receiver's CRC-like sum and
/// the sender's, and the loop iterations used.
fn transfer(tx: &mut Side, rx: &mut Side, total: usize, now: &mut Instant) -> (u64, u64) {
    let listen: SocketHandle = rx.sockets.add(tcp_socket());
    let port = 7000 + (now.total_millis() % 1000) as u16;
    rx.sockets
        .get_mut::<tcp::Socket>(listen)
        .listen(port)
        .unwrap();
    let conn = tx.sockets.add(tcp_socket());
    let remote = IpAddress::Ipv4(Ipv4Address::new(10, 0, 9, 1 + rx.link.device().id() as u8));
    tx.sockets
        .get_mut::<tcp::Socket>(conn)
        .connect(tx.iface.context(), (remote, port), 40000 + port)
        .unwrap();
    let (mut sent, mut got) = (0usize, 0usize);
    let (mut sum_tx, mut sum_rx) = (0u64, 0u64);
    let mut rounds = 0u64;
    while got < total {
        rounds += 1;
        assert!(rounds < 2_000_000, "transfer stalled at {got} of {total}");
        *now += smoltcp::time::Duration::from_micros(200);
        for s in [&mut *tx, &mut *rx] {
            s.iface.poll(*now, &mut s.link, &mut s.sockets);
            s.link.flush();
        }
        let t = tx.sockets.get_mut::<tcp::Socket>(conn);
        if t.can_send() && sent < total {
            let n = t
                .send(|buf| {
                    let n = buf.len().min(total - sent);
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = byte(sent + i);
                        sum_tx = sum_tx.wrapping_mul(31).wrapping_add(*b as u64);
                    }
                    (n, n)
                })
                .unwrap();
            sent += n;
        }
        let r = rx.sockets.get_mut::<tcp::Socket>(listen);
        if r.can_recv() {
            r.recv(|buf| {
                for (i, b) in buf.iter().enumerate() {
                    assert_eq!(*b, byte(got + i), "byte {} corrupted", got + i);
                    sum_rx = sum_rx.wrapping_mul(31).wrapping_add(*b as u64);
                }
                got += buf.len();
                (buf.len(), ())
            })
            .unwrap();
        }
    }
    tx.sockets.remove(conn);
    rx.sockets.remove(listen);
    (sum_tx, sum_rx)
}

fn run_pair(config: IvnetConfig) {
    let mem = Memory::new();
    let mut a = side(&mem, 0, config);
    let mut b = side(&mem, 1, config);
    assert_eq!(a.link.geometry().qlen(), 2048);
    assert_eq!(
        a.link.capabilities().max_transmission_unit,
        config.max_frame
    );
    settle(&mut a, &mut b);
    assert!(a.link.carrier() && b.link.carrier());
    assert_eq!(
        (a.link.state(), b.link.state()),
        (LinkState::Run, LinkState::Run)
    );
    let mut now = Instant::from_millis(1);
    let (s, r) = transfer(&mut a, &mut b, 2 << 20, &mut now);
    assert_eq!(s, r);
    let (s, r) = transfer(&mut b, &mut a, 2 << 20, &mut now);
    assert_eq!(s, r);
    let vector = config.interrupts.data_vector() as usize;
    let other = 1 - vector;
    assert!(a.doorbells[vector].get() > 0 && b.doorbells[vector].get() > 0);
    assert_eq!(
        (a.doorbells[other].get(), b.doorbells[other].get()),
        (0, 0),
        "data on the data vector only"
    );
    // Nobody slept, so the event indices were published once at most: far fewer doorbells
    // than frames.
    let frames = a.link.queue_stats().tx_frames + b.link.queue_stats().tx_frames;
    let rung = u64::from(a.doorbells[vector].get() + b.doorbells[vector].get());
    assert!(rung * 10 < frames, "{rung} doorbells for {frames} frames");

    // B restarts: RESET, a fresh driver; A's carrier goes down and comes back.
    b.link.shut_down();
    assert_eq!(a.link.poll_link(), LinkEvent::Down);
    drop(b);
    let mut b = side(&mem, 1, config);
    settle(&mut a, &mut b);
    assert!(a.link.carrier() && b.link.carrier());
    assert_eq!(a.link.stats().ups, 2);
    let (s, r) = transfer(&mut a, &mut b, 256 << 10, &mut now);
    assert_eq!(s, r);

    // A hostile write into B's section (avail.idx far ahead): A stops with that fault.
    let g = a.link.geometry();
    {
        let base = mem.borrow_mut().base();
        // SAFETY: inside section 1 of `Memory`.
        unsafe {
            base.add(TABLE + SECTION + g.avail_idx())
                .cast::<u16>()
                .write_volatile(5000)
        };
    }
    let mut buf = [0u8; 16];
    let _ = a
        .link
        .receive(now)
        .map(|(rx, _)| smoltcp::phy::RxToken::consume(rx, |f| buf[..4].copy_from_slice(&f[..4])));
    assert_eq!(a.link.poll_link(), LinkEvent::Down);
    assert!(
        matches!(
            a.link.last_fault(),
            Some(PeerFault::AvailIndexRanAhead { idx: 5000, .. })
        ),
        "{:?}",
        a.link.last_fault()
    );
    assert_eq!(a.link.state(), LinkState::Reset);
    assert_eq!(a.link.stats().faults, 1);
    // B sees RESET, tears down and sets up afresh (clearing its section); both come back.
    settle(&mut a, &mut b);
    assert!(a.link.carrier() && b.link.carrier());
    let (s, r) = transfer(&mut b, &mut a, 256 << 10, &mut now);
    assert_eq!(s, r);
    drop((a, b));
}

#[test]
fn two_cells_talk_tcp_at_the_default_mtu_with_msix() {
    run_pair(IvnetConfig::default());
}

#[test]
fn two_cells_talk_tcp_at_mtu_1500_with_intx() {
    run_pair(IvnetConfig {
        max_frame: 1514,
        interrupts: Interrupts::Intx,
    });
}

#[test]
fn refuses_a_frame_size_the_data_area_cannot_carry() {
    let mem = Memory::new();
    let (dev, _) = device(&mem, 0);
    let err = IvnetLink::new(
        dev,
        IvnetConfig {
            max_frame: 200_000,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("200000"), "{err}");
}
