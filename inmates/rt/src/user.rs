//! Ring 3 for an inmate's main loop: [`enter`] returns to its caller at CPL3, and everything
//! the runtime does from then on still works, because the privileged instructions it uses trap
//! (#GP) into a ring-0 handler that performs them: **trap and emulate**, the inmate's own code
//! unchanged.
//!
//! Why: on this project's PVM-backed `/dev/kvm` guest ring-0 code is emulated (~0.7 µs per
//! instruction) while ring-3 code runs natively; a main loop that only touches memory (rings
//! in the link's sections, the TSC) runs about a thousand times faster at ring 3. On real
//! hardware or Jailhouse both placements run natively and ring 3 only adds a trap per
//! privileged instruction.
//!
//! What [`enter`] sets up (once):
//! - a GDT with user code/data segments (DPL 3) and a TSS whose `RSP0` is a dedicated kernel
//!   stack, so interrupts and exceptions taken at CPL3 run their (unchanged) ring-0 handlers
//!   on it and `iretq` back;
//! - the boot stub's identity map already has the user bit on every level (it grants ring 3
//!   the whole low 4 GiB: the image, its stack, the comm region, the link's sections and the
//!   BARs; SMEP/SMAP stay off). This is a speed device, not isolation: ring 3 is the same
//!   trusted inmate;
//! - `IOPL` 0, so `in`/`out`, `cli`/`sti`, `hlt`, `rdmsr`/`wrmsr` at CPL3 raise #GP, which
//!   [`emulate`] decodes and performs at ring 0 (`sti; hlt` as one atomic step, so the
//!   runtime's "check, then halt" waits lose no interrupt). PVM also refuses `out` and `hlt`
//!   at CPL3 and makes `int n` #UD, so an int/syscall gate would buy nothing here.
//!
//! A port access the VMM refuses (an illegal access) is performed by the emulator, so the
//! hypervisor's `FATAL:` report names the emulator's RIP, not the ring-3 instruction's.
//!
//! Costs at ring 3: every emulated instruction is an exception plus a few hundred emulated
//! ring-0 instructions (tens to hundreds of µs under PVM), so console output and PM-timer
//! reads are slower than at ring 0; memory, MMIO (the doorbell: a VM exit either way) and
//! `rdtsc` are not affected. Keep port I/O out of the hot loop.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::interrupts::{Frame, TablePointer};
use crate::port;

/// User data selector (RPL 3).
pub const USER_DATA_SELECTOR: u16 = 0x20 | 3;
/// User 64-bit code selector (RPL 3).
pub const USER_CODE_SELECTOR: u16 = 0x28 | 3;
/// TSS selector.
const TSS_SELECTOR: u16 = 0x30;
/// RFLAGS.IF.
const IF: u64 = 1 << 9;

#[repr(C, align(16))]
struct Gdt(UnsafeCell<[u64; 8]>);
// SAFETY: written once by `enter` before it is loaded, on the one CPU.
unsafe impl Sync for Gdt {}
static GDT: Gdt = Gdt(UnsafeCell::new([0; 8]));

/// The 64-bit TSS (only `RSP0` and the I/O map base are used).
#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct TssCell(UnsafeCell<Tss>);
// SAFETY: written once by `enter` before `ltr`, then only read by the CPU.
unsafe impl Sync for TssCell {}
static TSS: TssCell = TssCell(UnsafeCell::new(Tss {
    _reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    // Past the TSS's limit: no I/O permission bitmap, every port traps at CPL3.
    iomap_base: core::mem::size_of::<Tss>() as u16,
}));

/// The stack interrupts and exceptions taken at CPL3 run on.
#[repr(C, align(16))]
struct KernelStack(UnsafeCell<[u8; 16 * 1024]>);
// SAFETY: only the CPU uses it (as RSP0), never Rust code by reference.
unsafe impl Sync for KernelStack {}
static KERNEL_STACK: KernelStack = KernelStack(UnsafeCell::new([0; 16 * 1024]));

static ENTERED: AtomicBool = AtomicBool::new(false);

/// Whether [`enter`] has moved the inmate to ring 3.
pub fn entered() -> bool {
    ENTERED.load(Ordering::Relaxed)
}

/// Moves the caller to ring 3: returns at CPL3 on the same stack, with the same RFLAGS.IF.
/// Call it at ring 0 (once; later calls do nothing), after the runtime's start (IDT loaded).
pub fn enter() {
    if ENTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    let tss = TSS.0.get();
    let stack_top = KERNEL_STACK.0.get() as u64 + 16 * 1024;
    // SAFETY: not loaded yet (ltr below); the one CPU is the only writer.
    unsafe { core::ptr::addr_of_mut!((*tss).rsp0).write_unaligned(stack_top) };
    let base = tss as u64;
    let limit = core::mem::size_of::<Tss>() as u64 - 1;
    let tss_low = (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | 0x89 << 40 // present, 64-bit TSS (available)
        | (limit >> 16 & 0xF) << 48
        | (base >> 24 & 0xFF) << 56;
    let gdt = GDT.0.get();
    // SAFETY: the GDT is not loaded yet; entries 0x08–0x18 repeat the boot GDT (so CS = 0x18
    // and the data selector 0x10 stay valid across the reload).
    unsafe {
        *gdt = [
            0,
            0x00cf_9a00_0000_ffff, // 0x08: 32-bit code
            0x00cf_9200_0000_ffff, // 0x10: data
            0x00af_9a00_0000_ffff, // 0x18: 64-bit code
            0x00cf_f200_0000_ffff, // 0x20: user data (DPL 3)
            0x00af_fa00_0000_ffff, // 0x28: user 64-bit code (DPL 3)
            tss_low,               // 0x30: TSS, low half
            base >> 32,            //       TSS, high half
        ];
    }
    let pointer = TablePointer {
        limit: (8 * 8 - 1) as u16,
        base: gdt as u64,
    };
    // SAFETY: the new GDT keeps the selectors in use (CS 0x18, SS/DS 0x10) identical and adds
    // a valid TSS; `iretq` then returns to label 2 at CPL3 with the same RSP and RFLAGS on the
    // user selectors, whose segments (flat, DPL 3) and pages (user bit set by the boot stub)
    // cover everything the caller touches. Interrupts taken at CPL3 switch to RSP0.
    unsafe {
        asm!(
            "lgdt [{pointer}]",
            "ltr {tss:x}",
            "mov {tmp}, rsp",
            "push {user_data}",
            "push {tmp}",
            "pushfq",
            "push {user_code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            pointer = in(reg) &pointer,
            tss = in(reg) TSS_SELECTOR,
            user_data = const USER_DATA_SELECTOR as u64,
            user_code = const USER_CODE_SELECTOR as u64,
            tmp = out(reg) _,
        );
        // Data segments: the user selector (DS/ES were nulled by `iretq`; null is valid in
        // 64-bit mode too, this only keeps them tidy).
        asm!("mov ds, {0:x}", "mov es, {0:x}", in(reg) USER_DATA_SELECTOR, options(nostack));
    }
}

/// Performs at ring 0 the privileged instruction at `frame.rip` that raised #GP at CPL3,
/// and steps over it. False if it is none this emulator knows (the caller then fails the
/// cell as for any exception).
pub(crate) fn emulate(frame: &mut Frame) -> bool {
    let rip = frame.rip as *const u8;
    // SAFETY: the faulting instruction lies in the inmate's identity-mapped image; reading up
    // to 3 bytes of it (prefix, opcode, operand) stays inside the mapped text.
    let byte = |i: usize| unsafe { rip.add(i).read_volatile() };
    let (wide16, at) = if byte(0) == 0x66 {
        (true, 1)
    } else {
        (false, 0)
    };
    let dx = frame.rdx as u16;
    let set_al = |f: &mut Frame, v: u8| f.rax = f.rax & !0xFF | u64::from(v);
    let set_ax = |f: &mut Frame, v: u16| f.rax = f.rax & !0xFFFF | u64::from(v);
    // SAFETY (every port and MSR access below): the inmate's own code asked for exactly this
    // access; performing it at ring 0 is what the instruction would have done at CPL0.
    let len = unsafe {
        match byte(at) {
            0xFA => {
                frame.rflags &= !IF;
                1
            }
            0xFB if byte(at + 1) == 0xF4 => {
                // `sti; hlt`: one atomic step, as on the CPU.
                asm!("sti", "hlt", "cli", options(nostack));
                frame.rflags |= IF;
                2
            }
            0xFB => {
                frame.rflags |= IF;
                1
            }
            0xF4 if frame.rflags & IF != 0 => {
                asm!("sti", "hlt", "cli", options(nostack));
                1
            }
            0xF4 => {
                asm!("hlt", options(nostack));
                1
            }
            0xEC => {
                set_al(frame, port::inb(dx));
                1
            }
            0xED if wide16 => {
                set_ax(frame, port::inw(dx));
                1
            }
            0xED => {
                frame.rax = u64::from(port::inl(dx));
                1
            }
            0xE4 => {
                set_al(frame, port::inb(u16::from(byte(at + 1))));
                2
            }
            0xE5 => {
                frame.rax = u64::from(port::inl(u16::from(byte(at + 1))));
                2
            }
            0xEE => {
                port::outb(dx, frame.rax as u8);
                1
            }
            0xEF if wide16 => {
                port::outw(dx, frame.rax as u16);
                1
            }
            0xEF => {
                port::outl(dx, frame.rax as u32);
                1
            }
            0xE6 => {
                port::outb(u16::from(byte(at + 1)), frame.rax as u8);
                2
            }
            0xE7 => {
                port::outl(u16::from(byte(at + 1)), frame.rax as u32);
                2
            }
            0x0F if byte(at + 1) == 0x30 => {
                let value = (frame.rdx & 0xFFFF_FFFF) << 32 | (frame.rax & 0xFFFF_FFFF);
                port::wrmsr(frame.rcx as u32, value);
                2
            }
            0x0F if byte(at + 1) == 0x32 => {
                let value = port::rdmsr(frame.rcx as u32);
                frame.rax = value & 0xFFFF_FFFF;
                frame.rdx = value >> 32;
                2
            }
            _ => return false,
        }
    };
    frame.rip += (at + len) as u64;
    true
}
