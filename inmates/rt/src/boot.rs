//! The boot stub: real mode at address 0 → protected mode → long mode → [`crate::start`].
//!
//! Entry state (kvm-cells.md, Jailhouse's x86 inmate protocol): real mode, `CS = 0, IP = 0`,
//! paging off, interrupts off, data segments based at 0. The stub
//! 1. loads the boot GDT (it lies below 64 KiB, so a 16-bit `lgdt` reaches it) and jumps to
//!    32-bit protected mode;
//! 2. enables PAE, points CR3 at the identity page tables (first 4 GiB in 2 MiB pages, built
//!    by the assembler into `.data`, so no loop runs at boot; every level has the user bit,
//!    so [`crate::user`] can run the main loop at ring 3 on the same map), sets `EFER.LME`, turns on
//!    paging (and caching: CR0.CD/NW are set at entry) and jumps to 64-bit code;
//! 3. loads the data segments, sets the stack, clears `.bss` and calls the Rust start.
//!
//! No SSE is ever enabled (CR4.OSFXSR stays 0): the inmates are soft-float.

use core::arch::global_asm;

/// Selector of the 32-bit code segment.
pub const CODE32_SELECTOR: u16 = 0x08;
/// Selector of the flat data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the 64-bit code segment (used by the IDT's gates; `interrupts` repeats it).
pub const CODE64_SELECTOR: u16 = 0x18;

global_asm!(
    r#"
    .section .boot, "ax"
    .code16
    .global __inmate_entry
__inmate_entry:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    lgdt [boot_gdt_ptr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    /* ljmp 0x08:boot32 with a 32-bit offset */
    .byte 0x66, 0xea
    .long boot32
    .word 0x08

    .code32
boot32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, offset boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                /* PAE */
    mov cr4, eax
    mov ecx, 0xc0000080         /* IA32_EFER */
    rdmsr
    or eax, 0x100               /* LME */
    wrmsr
    mov eax, cr0
    and eax, 0x9fffffff         /* clear CD, NW */
    or eax, 0x80010001          /* PG, WP, PE */
    mov cr0, eax
    /* ljmp 0x18:boot64 */
    .byte 0xea
    .long boot64
    .word 0x18

    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

    .section .text.boot64, "ax"
    .code64
boot64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + __stack_top]
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    cld
    rep stosb
    call {start}
2:
    cli
    hlt
    jmp 2b

    .section .data.pagetables, "aw"
    .balign 4096
    .global __inmate_pml4
boot_pml4:
__inmate_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
    .global __inmate_pdpt
boot_pdpt:
__inmate_pdpt:
    .quad boot_pd + 0x0007
    .quad boot_pd + 0x1007
    .quad boot_pd + 0x2007
    .quad boot_pd + 0x3007
    .fill 508, 8, 0
boot_pd:
    .set boot_pde, 0
    .rept 2048
    .quad (boot_pde << 21) + 0x87   /* present, writable, user, 2 MiB page */
    .set boot_pde, boot_pde + 1
    .endr

    .text
"#,
    start = sym crate::start::__inmate_start,
);
