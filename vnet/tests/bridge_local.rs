//! The bridge without root: its port is a Unix datagram socket (one datagram = one frame)
//! and its link an in-process `LocalLink`; the other peer is a raw `VnetLink` the test drives.
//! Shows back-pressure: with the receiving peer not reading, the bridge fills the ring, waits
//! for space (the producer's wait-for-space notification) instead of dropping, and every
//! frame arrives, in order, once the peer reads.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use linux_uio_client::{Endpoint, LocalLink};
use vnet::bridge::{Bridge, BridgeConfig, Interrupt};
use vnet::{LinkConfig, VnetLink};

const FRAMES: u64 = 3000;
const FRAME_LEN: usize = 1000;

fn frame(seq: u64) -> Vec<u8> {
    let mut f = vec![(seq % 253) as u8; FRAME_LEN];
    f[..8].copy_from_slice(&seq.to_le_bytes());
    f
}

fn wait(irq: &impl Interrupt) {
    let mut pfd = libc::pollfd {
        fd: irq.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; 10 s is a safety net, not synchronisation.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(rc, 1, "no interrupt within 10 s");
}

#[test]
fn bridge_waits_for_ring_space_and_loses_nothing() {
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (bridge_end, writer_end) = UnixDatagram::pair().unwrap();
    bridge_end.set_nonblocking(true).unwrap();
    // SAFETY: plain syscall, checked.
    let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) });

    let bridge = {
        let link = Arc::clone(&link);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut b = Bridge::new(l, irq, bridge_end, BridgeConfig::default());
            b.run(Some(stop.as_fd())).unwrap();
            b.stats()
        })
    };

    // The receiving peer comes up.
    let (dev, mut irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let mut peer = VnetLink::new(dev, LinkConfig::default()).unwrap();
    peer.poll_link();
    while !peer.carrier() {
        wait(&irq);
        Interrupt::take(&mut irq).unwrap();
        peer.poll_link();
    }

    // Frames pour into the port, far more than the ring holds.
    let writer = std::thread::spawn(move || {
        for seq in 0..FRAMES {
            writer_end.send(&frame(seq)).unwrap();
        }
    });

    // Not reading: wait until the ring is nearly full (woken by the bridge's doorbells).
    let capacity = peer.nic().duplex_mut().unwrap().rx.capacity();
    loop {
        let rx = &mut peer.nic().duplex_mut().unwrap().rx;
        if rx.available() + 2 * (FRAME_LEN + 16) > capacity {
            break;
        }
        if rx.prepare_sleep().unwrap() {
            wait(&irq);
            Interrupt::take(&mut irq).unwrap();
        }
    }

    // Now read everything, releasing in batches (each flush may ring the waiting bridge).
    let mut next = 0u64;
    let mut buf = vec![0u8; 2048];
    while next < FRAMES {
        let mut got = 0;
        {
            let rx = &mut peer.nic().duplex_mut().unwrap().rx;
            while let Some(f) = rx.peek().unwrap() {
                assert_eq!(f.len(), FRAME_LEN);
                buf[..FRAME_LEN].copy_from_slice(&f);
                f.release();
                assert_eq!(&buf[..FRAME_LEN], &frame(next)[..], "frame {next}");
                next += 1;
                got += 1;
            }
        }
        peer.flush();
        if got == 0 && next < FRAMES {
            let may_sleep = peer.nic().duplex_mut().unwrap().rx.prepare_sleep().unwrap();
            if may_sleep {
                wait(&irq);
                Interrupt::take(&mut irq).unwrap();
            }
        }
    }
    writer.join().unwrap();

    let one = 1u64;
    // SAFETY: 8-byte write to an eventfd.
    assert_eq!(
        unsafe { libc::write(stop.as_raw_fd(), (&one as *const u64).cast(), 8) },
        8
    );
    let stats = bridge.join().unwrap();
    assert_eq!(stats.from_port_frames, FRAMES);
    assert!(
        stats.ring_full_waits >= 1,
        "the ring never filled: {stats:?}"
    );
    assert!(stats.sleeps >= 1);
}
