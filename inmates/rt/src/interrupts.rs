//! The IDT, the interrupt entry stubs, and dispatch.
//!
//! All 256 vectors get a gate. Exceptions (vectors 0–31) are fatal: the runtime prints the
//! vector, error code and RIP and fails the cell (`cell_state` = 3). Vectors 32–254 go to the
//! handler installed with [`set_handler`] (one handler for all vectors, as Jailhouse's
//! `irq_init`), followed by an x2APIC EOI; [`crate::timer::TIMER_VECTOR`] is the runtime's
//! own. Vector 255 is the spurious vector (no EOI).
//!
//! A #GP raised at CPL3 by a privileged instruction (after [`crate::user::enter`]) is not
//! fatal: [`crate::user`] performs the instruction at ring 0 and the code resumes after it.
//! Interrupts and exceptions taken at CPL3 run on the TSS's `RSP0` stack.
//!
//! The stubs save only the caller-saved registers: the handler is an `extern "C"` Rust
//! function, and there is no FPU/SSE state to save in a soft-float inmate.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Selector of the boot GDT's 64-bit code segment (`boot::CODE64_SELECTOR`).
const CODE64_SELECTOR: u16 = 0x18;

/// The first vector free for device interrupts (Jailhouse's x86 `DEFAULT_IRQ_BASE`).
pub const FIRST_DEVICE_VECTOR: u8 = 32;
/// #GP.
const GENERAL_PROTECTION: u8 = 13;
/// The spurious-interrupt vector programmed into SPIV.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// What the stubs push, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// Saved r11.
    pub r11: u64,
    /// Saved r10.
    pub r10: u64,
    /// Saved r9.
    pub r9: u64,
    /// Saved r8.
    pub r8: u64,
    /// Saved rdi.
    pub rdi: u64,
    /// Saved rsi.
    pub rsi: u64,
    /// Saved rdx.
    pub rdx: u64,
    /// Saved rcx.
    pub rcx: u64,
    /// Saved rax.
    pub rax: u64,
    /// The vector.
    pub vector: u64,
    /// The CPU's error code (0 for vectors without one).
    pub error: u64,
    /// Interrupted RIP.
    pub rip: u64,
    /// Interrupted CS.
    pub cs: u64,
    /// Interrupted RFLAGS.
    pub rflags: u64,
    /// Interrupted RSP.
    pub rsp: u64,
    /// Interrupted SS.
    pub ss: u64,
}

// 256 stubs of 16 bytes each: [push 0 if the CPU pushes no error code] push vector; jmp common.
global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
    .balign 16
    .global __inmate_isr_stubs
__inmate_isr_stubs:
    .set isr_vector, 0
    .rept 256
    .balign 16
    .if (isr_vector == 8) || (isr_vector == 10) || (isr_vector == 11) || (isr_vector == 12) || (isr_vector == 13) || (isr_vector == 14) || (isr_vector == 17) || (isr_vector == 21) || (isr_vector == 29) || (isr_vector == 30)
    .else
    push 0
    .endif
    push isr_vector
    jmp isr_common
    .set isr_vector, isr_vector + 1
    .endr

isr_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, rsp
    cld
    call {dispatch}
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq
    .text
"#,
    dispatch = sym dispatch,
);

extern "C" {
    static __inmate_isr_stubs: u8;
}

/// Distance between two stubs.
const STUB_STRIDE: usize = 16;

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; 512]>);

// SAFETY: written only by `init`, on the one CPU, before interrupts are enabled.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; 512]));

/// The installed handler, as a `fn(u8)` address; 0 = none.
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// The operand of `lidt`/`lgdt`: a descriptor table's limit and base.
#[repr(C, packed)]
pub(crate) struct TablePointer {
    /// Size of the table in bytes, minus one.
    pub(crate) limit: u16,
    /// Its linear address.
    pub(crate) base: u64,
}

/// Fills the IDT with interrupt gates to the stubs and loads it.
pub fn init() {
    // Taking the address of the linker-placed stubs needs no unsafe.
    let stubs = core::ptr::addr_of!(__inmate_isr_stubs) as u64;
    let idt = IDT.0.get();
    for vector in 0..256usize {
        let target = stubs + (vector * STUB_STRIDE) as u64;
        let low = (target & 0xFFFF)
            | u64::from(CODE64_SELECTOR) << 16
            | 0x8E00 << 32 // present, DPL 0, 64-bit interrupt gate
            | (target >> 16 & 0xFFFF) << 48;
        let high = target >> 32;
        // SAFETY: `vector < 256`, inside the table; nothing reads the IDT yet (interrupts off).
        unsafe {
            (*idt)[2 * vector] = low;
            (*idt)[2 * vector + 1] = high;
        }
    }
    let pointer = TablePointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the IDT is static and fully initialised; every gate points at a stub.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

/// Installs the handler for device vectors (32–254); it runs with interrupts off and the
/// runtime sends the EOI after it returns.
pub fn set_handler(handler: fn(u8)) {
    // Release: a handler that runs after this store sees everything written before it.
    HANDLER.store(handler as usize, Ordering::Release);
}

extern "C" fn dispatch(frame: &mut Frame) {
    let vector = frame.vector as u8;
    if vector < FIRST_DEVICE_VECTOR {
        // A privileged instruction at CPL3 (`crate::user`): performed here, then resumed.
        if vector == GENERAL_PROTECTION && frame.cs & 3 == 3 && crate::user::emulate(frame) {
            return;
        }
        crate::fail_exception(frame);
    }
    if vector == SPURIOUS_VECTOR {
        return;
    }
    if vector == crate::timer::TIMER_VECTOR {
        crate::timer::fired();
        crate::x2apic::eoi();
        return;
    }
    // Acquire pairs with `set_handler`'s Release.
    let handler = HANDLER.load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: only `set_handler` stores non-zero values, and those are `fn(u8)` addresses.
        let handler: fn(u8) = unsafe { core::mem::transmute::<usize, fn(u8)>(handler) };
        handler(vector);
    }
    crate::x2apic::eoi();
}

/// Enables interrupts.
pub fn enable() {
    // SAFETY: the IDT is loaded before `main` runs; `sti` has no memory effects beyond
    // letting handlers run (hence no `nomem`).
    unsafe { asm!("sti", options(nostack)) }
}

/// Disables interrupts.
pub fn disable() {
    // SAFETY: `cli` only masks interrupts.
    unsafe { asm!("cli", options(nostack)) }
}

/// Whether interrupts are enabled (RFLAGS.IF).
pub fn enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(preserves_flags)) }
    flags & (1 << 9) != 0
}

/// Runs `f` with interrupts off, restoring the previous state.
pub fn without<T>(f: impl FnOnce() -> T) -> T {
    let was = enabled();
    if was {
        disable();
    }
    let value = f();
    if was {
        enable();
    }
    value
}

/// Enables interrupts and halts until one arrives (atomically: `sti; hlt` lets no interrupt
/// slip in between).
pub fn wait() {
    // SAFETY: as for `enable`; `hlt` returns after the next interrupt.
    unsafe { asm!("sti", "hlt", options(nostack)) }
}
