//! The endpoint's side of the control socket against a hostile hypervisor (issue 14, "a fuzz
//! target for each side"): random and mutated replies, decoded by
//! [`ivshmem_dev::hosted::decode_reply`] and handled by [`HostedEndpoint::attach`] over a real
//! `SOCK_SEQPACKET` connection. A bounded property test (runs in CI); `PROPTEST_CASES=100000`
//! makes it a longer fuzz run.
//!
//! Each message goes with 0..=5 fds (4 KiB memfds), so grants whose fd count happens to fit
//! reach the mapping and peer handling too.
//!
//! Invariant: no panic and no stall; a malformed or out-of-place reply ends the attach with a
//! typed [`HostedError`]; an attach that succeeds has consistent links.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ivshmem_dev::hosted::{
    decode_reply, AcceptedBody, LinkGrantBody, PeerBody, Reply, SetStateBody, WireName,
    MAX_MESSAGE_SIZE,
};
use linux_uio_client::hosted::{HostedEndpoint, HostedError};
use nix::sys::socket::{
    accept, bind, listen, sendmsg, socket, AddressFamily, Backlog, ControlMessage, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use proptest::prelude::*;

/// A well-formed attach conversation for a one-link, two-peer cell (without its fds).
fn valid_replies() -> Vec<Vec<u8>> {
    let name = WireName::new("l").unwrap();
    let grant = LinkGrantBody {
        name,
        link: 0,
        peer_id: 1,
        max_peers: 2,
        protocol: 0x4001,
        vectors: 1,
        state_table_size: 4096,
        rw_size: 4096,
        output_size: 4096,
        fd_count: 4,
        reserved2: 0,
    };
    let peer = |p: u16| PeerBody {
        cell: WireName::new(if p == 0 { "a" } else { "b" }).unwrap(),
        link: 0,
        peer: p,
        fd_count: 1,
    };
    [
        Reply::Accepted(AcceptedBody {
            link_count: 1,
            hypervisor_pid: 1,
        }),
        Reply::LinkGrant(grant),
        Reply::Peer(peer(0)),
        Reply::Peer(peer(1)),
        Reply::StateAck(SetStateBody { link: 0, value: 1 }),
    ]
    .iter()
    .map(|r| {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        let n = r.encode(&mut buf).unwrap();
        buf[..n].to_vec()
    })
    .collect()
}

/// One message: a valid reply mutated (bytes flipped, cut short or extended), or random bytes.
fn message() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        0..valid_replies().len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        prop::option::of(0usize..=MAX_MESSAGE_SIZE),
    )
        .prop_map(|(which, flips, cut)| {
            let mut m = valid_replies().swap_remove(which);
            for (at, byte) in flips {
                let i = at.index(m.len());
                m[i] ^= byte;
            }
            if let Some(len) = cut {
                m.resize(len.max(1), 0);
            }
            m
        });
    prop_oneof![
        3 => mutated,
        1 => prop::collection::vec(any::<u8>(), 1..=MAX_MESSAGE_SIZE),
    ]
}

/// A 4 KiB memfd (stands for a section or an eventfd: the endpoint cannot tell them apart).
fn memfd() -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"reply-fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, 4096).unwrap();
    fd
}

/// The valid conversation with its right fd counts (accept, grant with 4 sections, two peers
/// with one eventfd each), one message mutated and one fd count changed: most cases get past
/// the decoder into the grant handling.
fn conversation() -> impl Strategy<Value = Vec<(Vec<u8>, usize)>> {
    (
        0..4usize,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        0..4usize,
        0usize..=5,
    )
        .prop_map(|(which, flips, fd_at, fd_count)| {
            let mut msgs: Vec<(Vec<u8>, usize)> = valid_replies()
                .into_iter()
                .take(4)
                .zip([0, 4, 1, 1])
                .collect();
            let m = &mut msgs[which].0;
            for (at, byte) in flips {
                let i = at.index(m.len());
                m[i] ^= byte;
            }
            msgs[fd_at].1 = fd_count;
            msgs
        })
}

fn listener(path: &Path) -> OwnedFd {
    let _ = std::fs::remove_file(path);
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&fd, Backlog::new(4).unwrap()).unwrap();
    fd
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Decoding never panics; what decodes encodes back to the same reply.
    #[test]
    fn decoding_any_bytes_is_total(bytes in message()) {
        if let Ok(reply) = decode_reply(&bytes) {
            let mut buf = [0u8; MAX_MESSAGE_SIZE];
            let n = reply.encode(&mut buf).unwrap();
            prop_assert_eq!(decode_reply(&buf[..n]), Ok(reply));
        }
    }

    /// An attach answered by a hostile hypervisor ends in a typed error, without panic or
    /// stall (the fake hypervisor sends its replies, with no fds, then closes).
    #[test]
    fn attach_against_hostile_replies_fails_cleanly(replies in prop_oneof![
        prop::collection::vec((message(), 0usize..=5), 0..6),
        conversation(),
    ]) {
        let path: PathBuf = std::env::temp_dir()
            .join(format!("reply-fuzz-{}.sock", std::process::id()));
        let listening = listener(&path);
        let server = std::thread::spawn(move || {
            let conn = accept(&listening).unwrap();
            for (r, fd_count) in &replies {
                let fds: Vec<OwnedFd> = (0..*fd_count).map(|_| memfd()).collect();
                let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
                let cmsg = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
                // The endpoint may have given up already (EPIPE): that is fine.
                if sendmsg::<()>(
                    conn.as_raw_fd(),
                    &[IoSlice::new(r)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .is_err()
                {
                    break;
                }
            }
        });
        let result = HostedEndpoint::attach_with_timeout(&path, "b", Duration::from_millis(500));
        server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(endpoint) => {
                for link in endpoint.links() {
                    prop_assert!(link.peer_id() < link.max_peers());
                    prop_assert!(link.vectors() >= 1);
                    prop_assert!(link.peer_name(link.max_peers() - 1).is_some());
                }
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert!(
                    matches!(
                        e,
                        HostedError::Closed
                            | HostedError::Decode(_)
                            | HostedError::Protocol(_)
                            | HostedError::Refused { .. }
                            | HostedError::Io(_)
                            | HostedError::Timeout(_)
                    ),
                    "unexpected error kind: {e:?}"
                );
            }
        }
    }
}
