//! What KVM cells report to the rest of the hypervisor: console lines and stops, queued
//! for whoever runs the main loop, with an eventfd to wake a `poll(2)`.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a KVM cell stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaltReason {
    /// Stopped on request (`cell stop`, restart, hypervisor shutdown).
    Requested,
    /// An illegal access; the `FATAL:` report.
    Fatal(String),
    /// The cell wrote this `cell_state` (2 shut down, 3 failed, 4 wrong comm revision).
    CellState(u32),
    /// The vCPU could not run on (e.g. a triple fault or a failed `KVM_RUN`); a report.
    VcpuFailed(String),
}

impl std::fmt::Display for HaltReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaltReason::Requested => f.write_str("stopped on request"),
            HaltReason::Fatal(report) => f.write_str(report),
            HaltReason::CellState(s) => write!(
                f,
                "cell_state {s} ({})",
                super::layout::describe_cell_state(*s)
            ),
            HaltReason::VcpuFailed(report) => f.write_str(report),
        }
    }
}

/// One thing a KVM cell reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmEvent {
    /// A line the cell wrote to its 8250 console (without the newline).
    Console {
        /// Cell name.
        cell: String,
        /// The line.
        line: String,
    },
    /// The cell's vCPU started.
    Started {
        /// Cell name.
        cell: String,
    },
    /// The cell stopped; its link states are 0 and its peers were notified.
    Halted {
        /// Cell name.
        cell: String,
        /// Why.
        reason: HaltReason,
    },
}

/// A queue of [`KvmEvent`]s shared by the cells' threads and one consumer.
#[derive(Debug)]
pub struct EventQueue {
    queue: Mutex<VecDeque<KvmEvent>>,
    ready: Condvar,
    wake: EventFd,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Appends an event and wakes the consumer.
    pub fn push(&self, event: KvmEvent) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(event);
        self.ready.notify_all();
        // A full counter already means "readable"; nothing else can fail here.
        let _ = self.wake.write(1);
    }

    /// Takes every queued event (and clears the eventfd).
    pub fn take(&self) -> Vec<KvmEvent> {
        let _ = self.wake.read();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect()
    }

    /// Waits up to `timeout` for the first event that `want` accepts and removes it from the
    /// queue (the others stay); `None` on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut want: impl FnMut(&KvmEvent) -> bool,
    ) -> Option<KvmEvent> {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(at) = queue.iter().position(&mut want) {
                return queue.remove(at);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            queue = self
                .ready
                .wait_timeout(queue, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Readable while events are queued (for `poll(2)`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd lives as long as `self`, which the borrow is tied to.
        unsafe { BorrowedFd::borrow_raw(self.wake.as_raw_fd()) }
    }
}
