//! The KVM cells of a configured system, as `hypervisor run` supervises them.

use std::path::PathBuf;
use std::sync::Arc;

use super::{
    Bdf, EventQueue, HaltReason, KvmCell, KvmCellConfig, KvmError, KvmEvent, KvmLinkConfig,
    LinkSizes, LinkWiring, MemoryRegionConfig,
};
use crate::config::{CellKind, ValidConfig};
use crate::device::InterruptMode;
use crate::status::CellExit;
use ivshmem_dev::hosted::CellPhase;

/// One KVM cell of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmCellPlan {
    /// Cell name.
    pub name: String,
    /// The CPU its vCPU is pinned to.
    pub cpu: Option<usize>,
    /// The flat image (read at every start).
    pub image: PathBuf,
    /// The command line.
    pub cmdline: String,
    /// Guest RAM: up to 1 MiB from 0, the rest above the communication region.
    pub memory: u64,
}

/// How one link appears in KVM cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmLinkPlan {
    /// Interrupt mode of the device.
    pub interrupts: InterruptMode,
    /// PCI function.
    pub bdf: Bdf,
    /// Guest-physical address of the link memory.
    pub address: u64,
}

/// The KVM side of a system: empty for a system of process cells only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmSystem {
    /// The KVM cells.
    pub cells: Vec<KvmCellPlan>,
    /// One entry per link of the system (in its order).
    pub links: Vec<KvmLinkPlan>,
}

impl KvmSystem {
    /// Checks that every image can be read (before anything is started): read, not only
    /// opened, since a directory opens too.
    pub fn check_images(&self) -> Result<(), KvmError> {
        for plan in &self.cells {
            std::fs::read(&plan.image).map_err(|source| {
                KvmError::Config(format!(
                    "cell `{}`: cannot read image {}: {source}",
                    plan.name,
                    plan.image.display()
                ))
            })?;
        }
        Ok(())
    }

    /// The KVM cells and link placements of a validated configuration.
    pub fn from_config(config: &ValidConfig) -> Self {
        Self {
            cells: config
                .cells
                .iter()
                .filter(|c| c.kind == CellKind::Kvm)
                .map(|c| KvmCellPlan {
                    name: c.name.clone(),
                    cpu: c.cpus.first().copied(),
                    image: c.image.clone().unwrap_or_default(),
                    cmdline: c.cmdline.clone(),
                    memory: c.memory.unwrap_or(super::layout::MAX_LOW_MEMORY),
                })
                .collect(),
            links: config
                .links
                .iter()
                .map(|l| KvmLinkPlan {
                    interrupts: l.interrupts,
                    bdf: l.bdf,
                    address: l.address,
                })
                .collect(),
        }
    }
}

/// What the supervisor should show after KVM events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmNotice {
    /// A console line of a cell.
    Console {
        /// Cell name.
        cell: String,
        /// The line.
        line: String,
    },
    /// An event line, and the cell's new phase for the status.
    Phase {
        /// Cell name.
        cell: String,
        /// What happened.
        text: String,
        /// The status phase.
        phase: CellPhase,
        /// The status exit.
        exit: Option<CellExit>,
    },
}

/// The running KVM cells of a system.
#[derive(Debug)]
pub struct KvmCells {
    plans: Vec<KvmCellPlan>,
    cells: Vec<KvmCell>,
    events: Arc<EventQueue>,
}

impl KvmCells {
    /// Builds (without starting) the cells of `kvm` on `wirings` (one per link of `links`,
    /// whose peers name the cells).
    pub fn new(
        kvm: &KvmSystem,
        links: &[(String, Vec<String>)],
        wirings: &[Arc<LinkWiring>],
    ) -> Result<Self, KvmError> {
        let events = Arc::new(EventQueue::new().map_err(|source| KvmError::Os {
            call: "eventfd",
            source,
        })?);
        let mut cells = Vec::new();
        for plan in &kvm.cells {
            let mut config = KvmCellConfig::new(plan.name.clone(), vec![0]);
            config.cpu = plan.cpu;
            config.cmdline = plan.cmdline.clone();
            let low = plan.memory.min(super::layout::MAX_LOW_MEMORY);
            config.low_memory = low;
            if plan.memory > low {
                config.regions.push(MemoryRegionConfig {
                    address: super::layout::EXTRA_MEMORY_START,
                    size: plan.memory - low,
                });
            }
            for (li, (_, peers)) in links.iter().enumerate() {
                if let Some(peer) = peers.iter().position(|p| *p == plan.name) {
                    let place = kvm.links.get(li).ok_or_else(|| {
                        KvmError::Config(format!("no KVM placement for link {li}"))
                    })?;
                    config.links.push(KvmLinkConfig {
                        wiring: wirings[li].clone(),
                        peer: peer as u16,
                        bdf: place.bdf,
                        address: place.address,
                    });
                }
            }
            cells.push(KvmCell::new(config, events.clone())?);
        }
        Ok(Self {
            plans: kvm.cells.clone(),
            cells,
            events,
        })
    }

    /// No KVM cells.
    pub fn none() -> Result<Self, KvmError> {
        Self::new(&KvmSystem::default(), &[], &[])
    }

    /// The event queue's fd (readable while events wait).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.fd()
    }

    /// Whether `cell` is one of these KVM cells.
    pub fn contains(&self, cell: &str) -> bool {
        self.cells.iter().any(|c| c.name() == cell)
    }

    /// (Re)starts `cell` with its image read afresh.
    pub fn start(&mut self, cell: &str) -> Result<(), KvmError> {
        let i = self
            .cells
            .iter()
            .position(|c| c.name() == cell)
            .ok_or_else(|| KvmError::Config(format!("`{cell}` is not a KVM cell")))?;
        let image = std::fs::read(&self.plans[i].image).map_err(|source| {
            KvmError::Config(format!(
                "cell `{cell}`: cannot read image {}: {source}",
                self.plans[i].image.display()
            ))
        })?;
        self.cells[i].set_image(image)?;
        self.cells[i].restart()
    }

    /// Starts every cell.
    pub fn start_all(&mut self) -> Result<(), KvmError> {
        let names: Vec<String> = self.plans.iter().map(|p| p.name.clone()).collect();
        names.iter().try_for_each(|n| self.start(n))
    }

    /// Stops `cell` (its vCPU parked, its states 0).
    pub fn stop(&mut self, cell: &str) -> Result<(), KvmError> {
        let c = self
            .cells
            .iter_mut()
            .find(|c| c.name() == cell)
            .ok_or_else(|| KvmError::Config(format!("`{cell}` is not a KVM cell")))?;
        c.stop();
        Ok(())
    }

    /// Whether `cell` is one of these KVM cells and runs (not stopped on request, by an
    /// illegal access or by its `cell_state`).
    pub fn is_running(&self, cell: &str) -> bool {
        self.cells
            .iter()
            .any(|c| c.name() == cell && c.phase() == super::KvmCellPhase::Running)
    }

    /// Whether a KVM cell runs.
    pub fn any_running(&self) -> bool {
        self.cells
            .iter()
            .any(|c| c.phase() == super::KvmCellPhase::Running)
    }

    /// Stops every cell.
    pub fn stop_all(&mut self) {
        for c in &mut self.cells {
            c.stop();
        }
    }

    /// The events since the last call, as notices for the supervisor.
    pub fn take(&self) -> Vec<KvmNotice> {
        self.events
            .take()
            .into_iter()
            .map(|e| match e {
                KvmEvent::Console { cell, line } => KvmNotice::Console { cell, line },
                KvmEvent::Started { cell } => {
                    let cpu = match self
                        .plans
                        .iter()
                        .find(|p| p.name == cell)
                        .and_then(|p| p.cpu)
                    {
                        Some(cpu) => format!("vCPU pinned to CPU {cpu}"),
                        None => "vCPU not pinned".to_string(),
                    };
                    KvmNotice::Phase {
                        text: format!("cell {cell}: KVM cell started ({cpu})"),
                        cell,
                        phase: CellPhase::Running,
                        exit: None,
                    }
                }
                KvmEvent::Halted { cell, reason } => {
                    let exit = match &reason {
                        HaltReason::Requested => CellExit::Stopped,
                        HaltReason::Fatal(_) | HaltReason::VcpuFailed(_) => CellExit::Fatal,
                        HaltReason::CellState(s) => CellExit::CellState(*s as i32),
                    };
                    let text = match &reason {
                        HaltReason::Fatal(report) | HaltReason::VcpuFailed(report) => {
                            format!("{report}; cell {cell} stopped, its states are 0")
                        }
                        other => format!("cell {cell}: {other}; its states are 0"),
                    };
                    KvmNotice::Phase {
                        cell,
                        text,
                        phase: CellPhase::Stopped,
                        exit: Some(exit),
                    }
                }
            })
            .collect()
    }
}

/// Creates the shared link of every link in `links` for a system with KVM cells
/// (`(name, peers, protocol, sizes)`), with the interrupt mode of `kvm`.
pub fn create_wirings(
    links: &[(String, Vec<String>, u16, LinkSizes)],
    kvm: &KvmSystem,
) -> Result<Vec<Arc<LinkWiring>>, KvmError> {
    links
        .iter()
        .enumerate()
        .map(|(i, (name, peers, protocol, sizes))| {
            let interrupts = kvm
                .links
                .get(i)
                .map_or(InterruptMode::Intx, |l| l.interrupts);
            LinkWiring::create(name, peers.len() as u16, *protocol, *sizes, interrupts)
        })
        .collect()
}
