//! One KVM cell: a VM with an in-kernel irqchip and one vCPU thread, its emulated devices,
//! and its life cycle (start, stop on request, stop on an illegal access or a `cell_state`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, kvm_run, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};

use super::devices::{Bdf, PciConfigAddress, PmTimer, Uart, PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA};
use super::events::{EventQueue, HaltReason, KvmEvent};
use super::fault::{AddressSpace, IllegalAccess};
use super::layout::{self, comm};
use super::links::{Attachment, CellIrq, KvmLinkConfig};
use super::memory::{GuestMemory, GuestRegion, RegionKind};
use super::KvmError;
use crate::device::AccessKind;

/// `IA32_APIC_BASE`.
const MSR_IA32_APIC_BASE: u32 = 0x1B;
/// APIC base: boot processor.
const APIC_BASE_BSP: u64 = 1 << 8;
/// APIC base: x2APIC mode.
const APIC_BASE_EXTD: u64 = 1 << 10;
/// APIC base: enabled.
const APIC_BASE_EN: u64 = 1 << 11;
/// The local APIC's address.
const APIC_DEFAULT_BASE: u64 = 0xFEE0_0000;
/// CPUID.1:ECX x2APIC bit.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
/// Port 0x80 (POST codes): writes are ignored.
const POST_PORT: u16 = 0x80;
/// How often the service thread looks at the communication region's `cell_state` (a cell
/// that stops with `cli; hlt` never leaves `KVM_RUN`, so there is no exit to wait for).
const CELL_STATE_POLL: Duration = Duration::from_millis(20);
/// `CR0.PG`.
const CR0_PG: u64 = 1 << 31;
/// `EFER.LMA`.
const EFER_LMA: u64 = 1 << 10;
/// The `xgetbv` instruction.
const XGETBV: [u8; 3] = [0x0F, 0x01, 0xD0];

/// One memory region of a cell beyond low RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegionConfig {
    /// Guest-physical address (at or above [`layout::EXTRA_MEMORY_START`], page-aligned).
    pub address: u64,
    /// Size in bytes (a page multiple).
    pub size: u64,
}

/// Everything a KVM cell is built from.
#[derive(Debug, Clone)]
pub struct KvmCellConfig {
    /// Cell name (for reports and the console prefix).
    pub name: String,
    /// The host CPU its vCPU thread is pinned to (`None`: not pinned).
    pub cpu: Option<usize>,
    /// The flat image, loaded at 0.
    pub image: Vec<u8>,
    /// The command line written at 0x1000 (at most 255 bytes).
    pub cmdline: String,
    /// RAM from 0 (a page multiple, at most 1 MiB).
    pub low_memory: u64,
    /// Further RAM regions.
    pub regions: Vec<MemoryRegionConfig>,
    /// The ACPI PM timer port announced in the communication region.
    pub pm_timer_port: u16,
    /// The links the cell is a peer of.
    pub links: Vec<KvmLinkConfig>,
}

impl KvmCellConfig {
    /// A cell with 1 MiB of low RAM, no extra regions, no links, the default PM timer port,
    /// an empty command line and no pinning.
    pub fn new(name: impl Into<String>, image: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            cpu: None,
            image,
            cmdline: String::new(),
            low_memory: layout::MAX_LOW_MEMORY,
            regions: Vec::new(),
            pm_timer_port: layout::DEFAULT_PM_TIMER_PORT,
            links: Vec::new(),
        }
    }

    fn check(&self) -> Result<(), KvmError> {
        let bad = |what: String| Err(KvmError::Config(format!("cell `{}`: {what}", self.name)));
        if self.low_memory == 0 || self.low_memory > layout::MAX_LOW_MEMORY {
            return bad(format!(
                "low memory {:#x} must be 4 KiB .. 1 MiB (the communication region is at {:#x})",
                self.low_memory,
                layout::COMM_REGION_ADDRESS
            ));
        }
        if self.image.is_empty() || self.image.len() as u64 > self.low_memory {
            return bad(format!(
                "the image ({} bytes) must fit in low memory ({:#x} bytes)",
                self.image.len(),
                self.low_memory
            ));
        }
        if self.cmdline.len() > layout::CMDLINE_MAX || self.cmdline.contains('\0') {
            return bad(format!(
                "the command line must be at most {} bytes without NUL",
                layout::CMDLINE_MAX
            ));
        }
        if !self.cmdline.is_empty()
            && layout::CMDLINE_ADDRESS + layout::CMDLINE_MAX as u64 + 1 > self.low_memory
        {
            return bad("a command line needs low memory up to 0x1100".into());
        }
        for r in &self.regions {
            if r.address < layout::EXTRA_MEMORY_START || r.address % layout::GUEST_PAGE != 0 {
                return bad(format!(
                    "memory region at {:#x} must be page-aligned and at or above {:#x}",
                    r.address,
                    layout::EXTRA_MEMORY_START
                ));
            }
        }
        Ok(())
    }
}

/// Counts of the vCPU's exits to user space (for tests and benchmarks).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port I/O exits.
    pub pio: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Every other exit (interrupted runs included).
    pub other: AtomicU64,
}

/// A snapshot of [`ExitCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub pio: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Every other exit.
    pub other: u64,
}

impl ExitCounts {
    /// All exits.
    pub fn total(&self) -> u64 {
        self.pio + self.mmio + self.other
    }
}

/// Where a KVM cell is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmCellPhase {
    /// Not started yet.
    Created,
    /// The vCPU runs.
    Running,
    /// The vCPU is parked (or the VM is gone); why.
    Halted(HaltReason),
}

impl std::fmt::Display for KvmCellPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmCellPhase::Created => f.write_str("not started"),
            KvmCellPhase::Running => f.write_str("running"),
            KvmCellPhase::Halted(HaltReason::Requested) => f.write_str("stopped"),
            KvmCellPhase::Halted(HaltReason::Fatal(_)) => f.write_str("stopped: illegal access"),
            KvmCellPhase::Halted(HaltReason::CellState(s)) => write!(
                f,
                "stopped: cell_state {s} ({})",
                layout::describe_cell_state(*s)
            ),
            KvmCellPhase::Halted(HaltReason::VcpuFailed(_)) => f.write_str("stopped: vCPU failed"),
        }
    }
}

/// Emulated port devices of one cell.
struct PortDevices {
    pm_timer: PmTimer,
    uart: Uart,
    pci_address: PciConfigAddress,
}

/// The state shared by a running cell's threads.
pub(crate) struct Shared {
    name: String,
    irq: Arc<CellIrq>,
    memory: GuestMemory,
    pm_timer_port: u16,
    devices: Mutex<PortDevices>,
    links: Vec<Attachment>,
    events: Arc<EventQueue>,
    exits: ExitCounters,
    /// Set once the cell must stop; checked before every `KVM_RUN`.
    stopping: AtomicBool,
    /// Why it stops (the first reason wins).
    cause: Mutex<Option<HaltReason>>,
    /// The phase, and a condition variable for those who wait for a change.
    phase: Mutex<KvmCellPhase>,
    phase_changed: Condvar,
    /// How to kick the vCPU out of `KVM_RUN`, while its thread runs.
    kick: Mutex<Option<Kick>>,
}

/// The vCPU thread's `kvm_run` page and pthread, for [`Shared::kick`].
struct Kick {
    run: *mut kvm_run,
    thread: libc::pthread_t,
}

// SAFETY: `run` points into the vCPU's `kvm_run` mapping; it is only dereferenced under the
// `kick` mutex, which the vCPU thread clears before the mapping goes away.
unsafe impl Send for Kick {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Asks the cell to stop for `reason` (the first reason is kept) and kicks the vCPU.
    fn request_stop(&self, reason: HaltReason) {
        lock(&self.cause).get_or_insert(reason);
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(kick) = lock(&self.kick).as_ref() {
            // SAFETY: the vCPU thread keeps its kvm_run mapping alive while `kick` is set
            // (it clears it under this mutex before dropping the vCPU). KVM reads
            // `immediate_exit` on entry to KVM_RUN: set before the signal, it closes the
            // window between the thread's check of `stopping` and the ioctl.
            unsafe {
                std::ptr::addr_of_mut!((*kick.run).immediate_exit).write_volatile(1);
            }
            // SAFETY: the thread is alive (it clears `kick` before it ends); the signal has
            // a no-op handler installed (`install_kick_handler`), it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(kick.thread, kick_signal()) };
        }
        let _ = self.irq.wake.write(1);
    }

    fn set_phase(&self, phase: KvmCellPhase) {
        *lock(&self.phase) = phase;
        self.phase_changed.notify_all();
    }

    fn console_line(&self, line: String) {
        tracing::debug!(cell = %self.name, "console: {line}");
        self.events.push(KvmEvent::Console {
            cell: self.name.clone(),
            line,
        });
    }

    fn cell_state(&self) -> u32 {
        self.memory
            .read_u32(layout::COMM_REGION_ADDRESS + comm::CELL_STATE as u64)
            .unwrap_or(0)
    }

    /// The end of a run: flushes the console, takes the cell off its links (states 0,
    /// peers notified), records the phase and reports it.
    fn finish(&self, reason: HaltReason) {
        if let Some(line) = lock(&self.devices).uart.flush() {
            self.console_line(line);
        }
        for link in &self.links {
            link.detach(&self.irq);
        }
        match &reason {
            HaltReason::Requested => tracing::info!(cell = %self.name, "stopped"),
            HaltReason::Fatal(report) | HaltReason::VcpuFailed(report) => {
                tracing::error!("{report}")
            }
            HaltReason::CellState(s) => tracing::warn!(
                cell = %self.name,
                "cell_state {s}: {}",
                layout::describe_cell_state(*s)
            ),
        }
        self.set_phase(KvmCellPhase::Halted(reason.clone()));
        self.events.push(KvmEvent::Halted {
            cell: self.name.clone(),
            reason,
        });
        let _ = self.irq.wake.write(1);
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler of the signal that interrupts `KVM_RUN` (once per process).
fn install_kick_handler() -> Result<(), KvmError> {
    static ONCE: Once = Once::new();
    static mut RESULT: Option<i32> = None;
    ONCE.call_once(|| {
        let r = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick);
        // SAFETY: written once inside call_once, read only after it completed.
        unsafe { RESULT = r.err().map(|e| e.errno()) };
    });
    // SAFETY: call_once has completed; no writer remains.
    match unsafe { RESULT } {
        None => Ok(()),
        Some(errno) => Err(KvmError::Os {
            call: "sigaction (vCPU kick signal)",
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Whether `/dev/kvm` can be used here; the reason if not (for skipping tests).
pub fn kvm_available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::ReadonlyMem, "KVM_CAP_READONLY_MEM"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("/dev/kvm lacks {name}"));
        }
    }
    Ok(())
}

/// A KVM cell. Dropping it stops it.
pub struct KvmCell {
    config: KvmCellConfig,
    events: Arc<EventQueue>,
    run: Option<Running>,
    phase: KvmCellPhase,
}

struct Running {
    shared: Arc<Shared>,
    vcpu: Option<JoinHandle<()>>,
    service: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KvmCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmCell")
            .field("name", &self.config.name)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl KvmCell {
    /// A cell that reports on `events`; not started.
    pub fn new(config: KvmCellConfig, events: Arc<EventQueue>) -> Result<Self, KvmError> {
        config.check()?;
        Ok(Self {
            config,
            events,
            run: None,
            phase: KvmCellPhase::Created,
        })
    }

    /// The cell's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The configuration (the image may be replaced before a restart with
    /// [`KvmCell::set_image`]).
    pub fn config(&self) -> &KvmCellConfig {
        &self.config
    }

    /// Replaces the image used by the next start.
    pub fn set_image(&mut self, image: Vec<u8>) -> Result<(), KvmError> {
        let old = std::mem::replace(&mut self.config.image, image);
        if let Err(e) = self.config.check() {
            self.config.image = old;
            return Err(e);
        }
        Ok(())
    }

    /// Where the cell is in its life.
    pub fn phase(&self) -> KvmCellPhase {
        match &self.run {
            Some(run) => lock(&run.shared.phase).clone(),
            None => self.phase.clone(),
        }
    }

    /// The vCPU's exits to user space in the current (or last) run.
    pub fn exits(&self) -> ExitCounts {
        self.run.as_ref().map_or(ExitCounts::default(), |r| {
            let e = &r.shared.exits;
            ExitCounts {
                pio: e.pio.load(Ordering::Relaxed),
                mmio: e.mmio.load(Ordering::Relaxed),
                other: e.other.load(Ordering::Relaxed),
            }
        })
    }

    /// Waits up to `timeout` until the cell is no longer running; returns the phase.
    pub fn wait_halted(&self, timeout: Duration) -> KvmCellPhase {
        let Some(run) = &self.run else {
            return self.phase.clone();
        };
        let guard = lock(&run.shared.phase);
        let (guard, _) = run
            .shared
            .phase_changed
            .wait_timeout_while(guard, timeout, |p| *p == KvmCellPhase::Running)
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    /// Builds a fresh VM, loads the image, attaches the links and starts the vCPU. A running
    /// cell is stopped first.
    pub fn start(&mut self) -> Result<(), KvmError> {
        self.stop();
        install_kick_handler()?;
        let (shared, vcpu) = build(&self.config, self.events.clone())?;
        let shared = Arc::new(shared);
        for link in &shared.links {
            link.attach(&shared.irq);
        }
        shared.set_phase(KvmCellPhase::Running);
        let cpu = self.config.cpu;
        let s = shared.clone();
        let vcpu_thread = std::thread::Builder::new()
            .name(format!("vcpu-{}", self.config.name))
            .spawn(move || vcpu_main(s, vcpu, cpu));
        let vcpu_thread = match vcpu_thread {
            Ok(t) => t,
            Err(source) => {
                shared.finish(HaltReason::VcpuFailed(format!(
                    "cell \"{}\": cannot start the vCPU thread: {source}",
                    self.config.name
                )));
                return Err(KvmError::Os {
                    call: "spawning the vCPU thread",
                    source,
                });
            }
        };
        let s = shared.clone();
        let service = std::thread::Builder::new()
            .name(format!("irq-{}", self.config.name))
            .spawn(move || service_main(s));
        let service = match service {
            Ok(t) => Some(t),
            Err(source) => {
                shared.request_stop(HaltReason::VcpuFailed(format!(
                    "cell \"{}\": cannot start the service thread: {source}",
                    self.config.name
                )));
                let _ = vcpu_thread.join();
                return Err(KvmError::Os {
                    call: "spawning the service thread",
                    source,
                });
            }
        };
        self.events.push(KvmEvent::Started {
            cell: self.config.name.clone(),
        });
        tracing::info!(cell = %self.config.name, cpu = ?cpu, "KVM cell started");
        self.run = Some(Running {
            shared,
            vcpu: Some(vcpu_thread),
            service,
        });
        Ok(())
    }

    /// Stops the cell (if it runs), parks its vCPU for good and frees the VM. A cell that
    /// already halted keeps its reason.
    pub fn stop(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        run.shared.request_stop(HaltReason::Requested);
        if let Some(t) = run.vcpu.take() {
            let _ = t.join();
        }
        if let Some(t) = run.service.take() {
            let _ = t.join();
        }
        self.phase = lock(&run.shared.phase).clone();
    }

    /// Stops and starts the cell again (fresh VM, image reloaded, links re-attached).
    pub fn restart(&mut self) -> Result<(), KvmError> {
        self.stop();
        self.start()
    }
}

impl Drop for KvmCell {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates the VM, its memory, the vCPU in its boot state.
fn build(config: &KvmCellConfig, events: Arc<EventQueue>) -> Result<(Shared, VcpuFd), KvmError> {
    let kvm_err = |call| move |source| KvmError::Kvm { call, source };
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;

    let mut memory = GuestMemory::new();
    memory.add(GuestRegion::ram(0, config.low_memory)?)?;
    memory.add(GuestRegion::ram(
        layout::COMM_REGION_ADDRESS,
        layout::COMM_REGION_SIZE,
    )?)?;
    for r in &config.regions {
        memory.add(GuestRegion::ram(r.address, r.size)?)?;
    }
    let links: Vec<Attachment> = config
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| Attachment::new(l.clone(), i))
        .collect::<Result<_, _>>()?;
    for link in &links {
        link.map_memory(&mut memory)?;
    }
    memory.register(&vm)?;

    memory.write(layout::IMAGE_ADDRESS, &config.image)?;
    if !config.cmdline.is_empty() {
        let mut cmdline = config.cmdline.as_bytes().to_vec();
        cmdline.push(0);
        memory.write(layout::CMDLINE_ADDRESS, &cmdline)?;
    }

    let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    boot_state(&kvm, &vcpu)?;
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    memory.write(
        layout::COMM_REGION_ADDRESS,
        &ivshmem_dev::comm::initial(config.pm_timer_port, 1, tsc_khz, clock_epoch(&vcpu)),
    )?;

    Ok((
        Shared {
            name: config.name.clone(),
            irq: Arc::new(CellIrq::new(vm)?),
            memory,
            pm_timer_port: config.pm_timer_port,
            devices: Mutex::new(PortDevices {
                pm_timer: PmTimer::new(),
                uart: Uart::new(),
                pci_address: PciConfigAddress::default(),
            }),
            links,
            events,
            exits: ExitCounters::default(),
            stopping: AtomicBool::new(false),
            cause: Mutex::new(None),
            phase: Mutex::new(KvmCellPhase::Created),
            phase_changed: Condvar::new(),
            kick: Mutex::new(None),
        },
        vcpu,
    ))
}

/// `IA32_TSC`.
const MSR_IA32_TSC: u32 = 0x10;

/// The clock epoch of `ivshmem_dev::comm` (its module docs): the guest's TSC (`KVM_GET_MSRS`)
/// and the host's `CLOCK_MONOTONIC`, the latter taken as the midpoint of two readings around
/// the ioctl, so the pair is off by at most half the ioctl's duration (a few µs). `None` when
/// KVM does not report the TSC.
fn clock_epoch(vcpu: &VcpuFd) -> Option<(u64, u64)> {
    let monotonic_ns = || {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
        Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
    };
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    let before = monotonic_ns()?;
    let read = vcpu.get_msrs(&mut msrs).ok()?;
    let after = monotonic_ns()?;
    (read == 1).then(|| (msrs.as_slice()[0].data, before + (after - before) / 2))
}

/// The CPU state at entry (`kvm-cells.md`): real mode at 0:0, x2APIC on.
fn boot_state(kvm: &Kvm, vcpu: &VcpuFd) -> Result<(), KvmError> {
    let kvm_err = |call| move |source| KvmError::Kvm { call, source };
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= CPUID_1_ECX_X2APIC;
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.base = 0;
        seg.selector = 0;
        seg.limit = 0xFFFF;
        seg.present = 1;
        seg.s = 1;
        seg.dpl = 0;
        seg.db = 0;
        seg.l = 0;
        seg.g = 0;
    }
    sregs.cs.type_ = 0xB; // code, execute/read, accessed
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.type_ = 0x3; // data, read/write, accessed
    }
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xFFFF;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xFFFF;
    sregs.cr0 = 0x6000_0010; // CD | NW | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let regs = kvm_bindings::kvm_regs {
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APIC_BASE,
        data: APIC_DEFAULT_BASE | APIC_BASE_EN | APIC_BASE_EXTD | APIC_BASE_BSP,
        ..Default::default()
    }])
    .map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != 1 {
        return Err(KvmError::Config(
            "KVM_SET_MSRS refused IA32_APIC_BASE (x2APIC)".into(),
        ));
    }
    Ok(())
}

/// What one exit asks the loop to do.
enum Next {
    Continue,
    Illegal(IllegalAccess),
    Fail(String),
    Xgetbv,
}

fn vcpu_main(shared: Arc<Shared>, mut vcpu: VcpuFd, cpu: Option<usize>) {
    *lock(&shared.kick) = Some(Kick {
        run: vcpu.get_kvm_run() as *mut kvm_run,
        // SAFETY: pthread_self has no preconditions.
        thread: unsafe { libc::pthread_self() },
    });
    let reason = match pin(cpu) {
        Ok(()) => run_loop(&shared, &mut vcpu),
        Err(e) => HaltReason::VcpuFailed(format!(
            "cell \"{}\": cannot pin the vCPU thread to CPU {cpu:?}: {e}",
            shared.name
        )),
    };
    *lock(&shared.kick) = None;
    // The first cause wins (a stop request that raced with a fault keeps the request).
    let reason = lock(&shared.cause).get_or_insert(reason).clone();
    shared.stopping.store(true, Ordering::SeqCst);
    shared.finish(reason);
}

fn pin(cpu: Option<usize>) -> nix::Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

fn run_loop(shared: &Shared, vcpu: &mut VcpuFd) -> HaltReason {
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return lock(&shared.cause).clone().unwrap_or(HaltReason::Requested);
        }
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(shared, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                shared.exits.other.fetch_add(1, Ordering::Relaxed);
                vcpu.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fail(format!("KVM_RUN failed: {e}")),
        };
        match next {
            Next::Continue => {}
            Next::Xgetbv => {
                if let Err(why) = emulate_xgetbv(shared, vcpu) {
                    return fail(shared, vcpu, &format!("KVM internal error ({why})"));
                }
            }
            Next::Illegal(access) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                return HaltReason::Fatal(access.fatal_report(&shared.name, rip));
            }
            Next::Fail(what) => return fail(shared, vcpu, &what),
        }
    }
}

fn fail(shared: &Shared, vcpu: &VcpuFd, what: &str) -> HaltReason {
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
    HaltReason::VcpuFailed(format!(
        "FATAL: cell \"{}\": {what}, RIP {rip:#x}",
        shared.name
    ))
}

fn handle_exit(shared: &Shared, exit: VcpuExit<'_>) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            shared.exits.pio.fetch_add(1, Ordering::Relaxed);
            match pio_write(shared, port, data) {
                Ok(()) => Next::Continue,
                Err(a) => Next::Illegal(a),
            }
        }
        VcpuExit::IoIn(port, data) => {
            shared.exits.pio.fetch_add(1, Ordering::Relaxed);
            match pio_read(shared, port, data.len() as u8) {
                Ok(value) => {
                    let n = data.len();
                    data.copy_from_slice(&value.to_le_bytes()[..n]);
                    Next::Continue
                }
                Err(a) => Next::Illegal(a),
            }
        }
        VcpuExit::MmioRead(address, data) => {
            shared.exits.mmio.fetch_add(1, Ordering::Relaxed);
            match mmio_read(shared, address, data.len() as u8) {
                Ok(value) => {
                    let n = data.len().min(8);
                    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
                    Next::Continue
                }
                Err(a) => Next::Illegal(a),
            }
        }
        VcpuExit::MmioWrite(address, data) => {
            shared.exits.mmio.fetch_add(1, Ordering::Relaxed);
            let mut bytes = [0u8; 8];
            let n = data.len().min(8);
            bytes[..n].copy_from_slice(&data[..n]);
            match mmio_write(shared, address, data.len() as u8, u64::from_le_bytes(bytes)) {
                Ok(()) => Next::Continue,
                Err(a) => Next::Illegal(a),
            }
        }
        other => {
            shared.exits.other.fetch_add(1, Ordering::Relaxed);
            match other {
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Next::Continue,
                VcpuExit::InternalError => Next::Xgetbv,
                VcpuExit::Shutdown => Next::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
                VcpuExit::FailEntry(reason, _) => {
                    Next::Fail(format!("VM entry failed (reason {reason:#x})"))
                }
                VcpuExit::SystemEvent(kind, _) => {
                    Next::Fail(format!("system event {kind} (reset or shutdown request)"))
                }
                other => Next::Fail(format!("unexpected exit {other:?}")),
            }
        }
    }
}

fn pio_read(shared: &Shared, port: u16, size: u8) -> Result<u32, IllegalAccess> {
    let illegal = || {
        IllegalAccess::unassigned(
            AddressSpace::Port,
            AccessKind::Read,
            port.into(),
            size,
            None,
        )
    };
    let devices = lock(&shared.devices);
    if port == shared.pm_timer_port {
        return if size == 4 {
            Ok(devices.pm_timer.read())
        } else {
            Err(illegal().because("the PM timer takes 32-bit reads only"))
        };
    }
    if (layout::UART_BASE..layout::UART_BASE + layout::UART_PORTS).contains(&port) {
        return if size == 1 {
            Ok(u32::from(devices.uart.read(port - layout::UART_BASE)))
        } else {
            Err(illegal().because("the 8250 takes 1-byte accesses only"))
        };
    }
    if port == PCI_CONFIG_ADDRESS {
        return if size == 4 {
            Ok(devices.pci_address.0)
        } else {
            Err(illegal().because("the PCI config address takes 32-bit accesses only"))
        };
    }
    if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&port) {
        let Some((bdf, register)) = devices.pci_address.target(port) else {
            return Ok(all_ones(size));
        };
        drop(devices);
        return config_read(shared, bdf, register, size)
            .map_err(|detail| illegal().because(detail));
    }
    Err(illegal())
}

fn pio_write(shared: &Shared, port: u16, data: &[u8]) -> Result<(), IllegalAccess> {
    let size = data.len() as u8;
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    let value = u32::from_le_bytes(bytes);
    let illegal = || {
        IllegalAccess::unassigned(
            AddressSpace::Port,
            AccessKind::Write,
            port.into(),
            size,
            Some(value.into()),
        )
    };
    let mut devices = lock(&shared.devices);
    if port == POST_PORT {
        return Ok(());
    }
    if (layout::UART_BASE..layout::UART_BASE + layout::UART_PORTS).contains(&port) {
        if size != 1 {
            return Err(illegal().because("the 8250 takes 1-byte accesses only"));
        }
        if let Some(line) = devices.uart.write(port - layout::UART_BASE, value as u8) {
            drop(devices);
            shared.console_line(line);
        }
        return Ok(());
    }
    if port == PCI_CONFIG_ADDRESS {
        if size != 4 {
            return Err(illegal().because("the PCI config address takes 32-bit accesses only"));
        }
        devices.pci_address = PciConfigAddress(value);
        return Ok(());
    }
    if (PCI_CONFIG_DATA..PCI_CONFIG_DATA + 4).contains(&port) {
        let Some((bdf, register)) = devices.pci_address.target(port) else {
            return Ok(());
        };
        drop(devices);
        return config_write(shared, bdf, register, size, value)
            .map_err(|detail| illegal().because(detail));
    }
    if port == shared.pm_timer_port {
        return Err(illegal().because("the PM timer is read-only"));
    }
    Err(illegal())
}

fn all_ones(size: u8) -> u32 {
    if size >= 4 {
        u32::MAX
    } else {
        (1u32 << (8 * u32::from(size))) - 1
    }
}

/// Config space is emulated up to here; beyond, like for unassigned functions, reads are
/// all ones and writes are ignored (`kvm-cells.md`).
const CONFIG_EMULATED: u16 = 0x80;

fn config_read(shared: &Shared, bdf: Bdf, register: u16, size: u8) -> Result<u32, String> {
    match shared.links.iter().find(|l| l.bdf() == bdf) {
        Some(link) if register < CONFIG_EMULATED => {
            link.config_read(register, size).map_err(|e| e.to_string())
        }
        _ => Ok(all_ones(size)),
    }
}

fn config_write(
    shared: &Shared,
    bdf: Bdf,
    register: u16,
    size: u8,
    value: u32,
) -> Result<(), String> {
    match shared.links.iter().find(|l| l.bdf() == bdf) {
        Some(link) if register < CONFIG_EMULATED => link
            .config_write(&shared.irq, register, size, value)
            .map_err(|e| e.to_string()),
        _ => Ok(()),
    }
}

fn mmio_read(shared: &Shared, address: u64, size: u8) -> Result<u64, IllegalAccess> {
    let illegal =
        || IllegalAccess::unassigned(AddressSpace::Mmio, AccessKind::Read, address, size, None);
    for link in &shared.links {
        if let Some(result) = link.mmio_read(address, size) {
            return result.map_err(|e| illegal().because(e.to_string()));
        }
    }
    Err(illegal())
}

fn mmio_write(shared: &Shared, address: u64, size: u8, value: u64) -> Result<(), IllegalAccess> {
    let illegal = || {
        IllegalAccess::unassigned(
            AddressSpace::Mmio,
            AccessKind::Write,
            address,
            size,
            Some(value),
        )
    };
    for link in &shared.links {
        if let Some(result) = link.mmio_write(&shared.irq, address, size, value) {
            return result.map_err(|e| illegal().because(e.to_string()));
        }
    }
    if let Some(region) = shared.memory.region_at(address) {
        if region.read_only() {
            let what = match region.kind() {
                RegionKind::Link { name } => format!("write to read-only memory ({name})"),
                RegionKind::Ram => "write to read-only memory".to_string(),
            };
            return Err(illegal().because(what));
        }
    }
    Err(illegal())
}

/// The `xgetbv` fix-up for PVM (`kvm-cells.md`): ring-0 `xgetbv` ends in
/// `KVM_EXIT_INTERNAL_ERROR`; if the bytes at RIP are `0F 01 D0` and ECX is 0, EDX:EAX get
/// XCR0 and RIP moves past the instruction. Anything else is an error.
fn emulate_xgetbv(shared: &Shared, vcpu: &mut VcpuFd) -> Result<(), String> {
    let internal = {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the union.
        let i = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
        (i.suberror, i.ndata)
    };
    let mut regs = vcpu
        .get_regs()
        .map_err(|e| format!("KVM_GET_REGS failed: {e}"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let gpa = translate(&shared.memory, &sregs, linear).ok_or_else(|| {
        format!(
            "suberror {}, cannot translate RIP {:#x}",
            internal.0, regs.rip
        )
    })?;
    let mut bytes = [0u8; 3];
    shared
        .memory
        .read(gpa, &mut bytes)
        .ok_or_else(|| format!("suberror {}, RIP outside guest memory", internal.0))?;
    if bytes != XGETBV {
        return Err(format!(
            "suberror {}, instruction bytes {:02x?} are not xgetbv",
            internal.0, bytes
        ));
    }
    if regs.rcx as u32 != 0 {
        return Err(format!("xgetbv of XCR{} is not emulated", regs.rcx as u32));
    }
    let xcr0 = vcpu
        .get_xcrs()
        .ok()
        .and_then(|x| {
            x.xcrs[..x.nr_xcrs as usize]
                .iter()
                .find(|r| r.xcr == 0)
                .map(|r| r.value)
        })
        .unwrap_or(0x3);
    regs.rax = xcr0 & 0xFFFF_FFFF;
    regs.rdx = xcr0 >> 32;
    regs.rip += XGETBV.len() as u64;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))
}

/// Guest-linear to guest-physical: identity without paging; a 4-level walk in long mode.
/// Other paging modes are not translated.
fn translate(memory: &GuestMemory, sregs: &kvm_bindings::kvm_sregs, linear: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(linear & 0xFFFF_FFFF);
    }
    if sregs.efer & EFER_LMA == 0 {
        return None;
    }
    const PRESENT: u64 = 1;
    const LARGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    let mut table = sregs.cr3 & ADDR;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1FF;
        let mut entry = [0u8; 8];
        memory.read(table + index * 8, &mut entry)?;
        let entry = u64::from_le_bytes(entry);
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 0 || (level <= 2 && entry & LARGE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDR;
    }
    None
}

/// The service thread: relays interrupts that must pass the device model in user space,
/// and watches `cell_state`.
fn service_main(shared: Arc<Shared>) {
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let relays: Vec<_> = shared.links.iter().flat_map(|l| l.relays()).collect();
        let mut fds: Vec<libc::pollfd> = std::iter::once(shared.irq.wake.as_raw_fd())
            .chain(relays.iter().map(|r| r.fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                CELL_STATE_POLL.as_millis() as i32,
            )
        };
        if n > 0 {
            if fds[0].revents != 0 {
                let _ = shared.irq.wake.read();
            }
            for (relay, p) in relays.iter().zip(&fds[1..]) {
                if p.revents != 0 {
                    relay.fire(&shared.irq);
                }
            }
        }
        let state = shared.cell_state();
        if ivshmem_dev::comm::CellState::from_raw(state).is_some_and(|s| s.is_stopped()) {
            shared.request_stop(HaltReason::CellState(state));
        }
    }
}
