//! iceoryx2 publish-subscribe as a round-trip peer, configured like iceoryx2's own
//! publish-subscribe benchmark: two services (a2b, b2a) of `ipc::Service`, one publisher and one
//! subscriber each, history 0, subscriber buffer 1, safe overflow, busy-waiting receivers.
//! The payload is a `[u8; N]` written into a loaned sample (iceoryx2's zero-copy path: the
//! sample is written in place in shared memory and the receiver reads it there).

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use iceoryx2::node::Node;
use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;

use super::rtt::Side;

/// The two service names of one round-trip run, unique per process and run (so parallel runs
/// and stale services of a crashed run never meet).
pub(crate) fn service_names() -> (String, String) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let base = format!("ivbench-ring-{}-{run}", std::process::id());
    (format!("{base}-a2b"), format!("{base}-b2a"))
}

/// One side's iceoryx2 ends (and the node that owns them; dropped last).
pub(crate) struct IceoryxSide<const N: usize> {
    publisher: Publisher<ipc::Service, [u8; N], ()>,
    subscriber: Subscriber<ipc::Service, [u8; N], ()>,
    _node: Node<ipc::Service>,
}

impl<const N: usize> IceoryxSide<N> {
    /// Creates a node, opens (or creates) both services and this side's ports: publishing on
    /// `send_on`, subscribed to `receive_on`.
    pub(crate) fn new(send_on: &str, receive_on: &str) -> Result<Self> {
        set_log_level(LogLevel::Error);
        let node = NodeBuilder::new()
            .create::<ipc::Service>()
            .map_err(|e| anyhow!("iceoryx2 node: {e:?}"))?;
        let open = |name: &str| {
            let service_name =
                ServiceName::new(name).map_err(|e| anyhow!("iceoryx2 service name: {e:?}"))?;
            node.service_builder(&service_name)
                .publish_subscribe::<[u8; N]>()
                .max_publishers(1)
                .max_subscribers(1)
                .history_size(0)
                .subscriber_max_buffer_size(1)
                .enable_safe_overflow(true)
                .open_or_create()
                .map_err(|e| anyhow!("iceoryx2 service {name}: {e:?}"))
        };
        let out = open(send_on)?;
        let back = open(receive_on)?;
        let publisher = out
            .publisher_builder()
            .create()
            .map_err(|e| anyhow!("iceoryx2 publisher: {e:?}"))?;
        let subscriber = back
            .subscriber_builder()
            .create()
            .map_err(|e| anyhow!("iceoryx2 subscriber: {e:?}"))?;
        Ok(IceoryxSide {
            publisher,
            subscriber,
            _node: node,
        })
    }
}

impl<const N: usize> Side<N> for IceoryxSide<N> {
    #[inline(always)]
    fn try_send(&mut self, msg: &[u8; N]) -> Result<bool> {
        let sample = self
            .publisher
            .loan_uninit()
            .map_err(|e| anyhow!("iceoryx2 loan: {e:?}"))?;
        sample
            .write_payload(*msg)
            .send()
            .map_err(|e| anyhow!("iceoryx2 send: {e:?}"))?;
        Ok(true)
    }

    #[inline(always)]
    fn try_recv(&mut self, msg: &mut [u8; N]) -> Result<bool> {
        match self
            .subscriber
            .receive()
            .map_err(|e| anyhow!("iceoryx2 receive: {e:?}"))?
        {
            Some(sample) => {
                *msg = *sample.payload();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// `iters` round trips of an `N`-byte message between two threads of this process over
/// iceoryx2 (each thread with its own node and ports, as in iceoryx2's benchmark).
pub fn iceoryx2_rtt<const N: usize>(cpus: [usize; 2], iters: u64) -> Result<std::time::Duration> {
    let (a2b, b2a) = service_names();
    super::rtt::ping_pong::<N, _, _>(
        cpus,
        iters,
        || IceoryxSide::<N>::new(&a2b, &b2a).context("pinger's iceoryx2 ends"),
        || IceoryxSide::<N>::new(&b2a, &a2b).context("ponger's iceoryx2 ends"),
    )
}
