//! Tiny real-mode guests for tests and benchmarks of KVM cells, assembled at run time with
//! GNU `as` and `ld` (binutils must be installed): a fixed prelude of console and PCI
//! routines, and [`IVSHMEM_GUEST`], an ivshmem echo/ringer/fault program.
//!
//! These are not inmates (those live in `inmates/`, built for `x86_64-unknown-none`); they
//! exist so the VMM can be tested instruction by instruction without a toolchain for
//! bare-metal Rust, and so that exit counts are exact.

use std::path::PathBuf;
use std::process::Command;

/// Routines every guest gets. `_start` jumps to `main` (which the body defines) over the
/// real-mode IVT (0..0x400, free for `ivt_set`). `setup`: DS = 0, ES = 0xFFFF (ES:0x10 is the
/// communication region), SS:SP = 0:0x8000. `puts` (%si), `puthex` (%eax), `putnl`, `stop`
/// (%eax to cell_state, then `cli; hlt` for good), `cfgrd`/`cfgwr` (PCI config dword %bl of
/// 00:0e.0; value in %eax / %ecx).
pub const PRELUDE: &str = r#"
    .code16
    .text
    .globl _start
_start:
    jmp main
    .org 0x400
setup:
    cld
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0xffff, %ax
    mov %ax, %es
    pop %ax
    mov $0x8000, %sp
    jmp *%ax
puts:
    push %ax
    push %dx
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  pop %dx
    pop %ax
    ret
puthex:
    push %eax
    push %ebx
    push %cx
    push %dx
    mov %eax, %ebx
    mov $8, %cx
    mov $0x3f8, %dx
3:  rol $4, %ebx
    mov %bl, %al
    and $0xf, %al
    add $'0', %al
    cmp $'9', %al
    jbe 4f
    add $39, %al
4:  outb %al, %dx
    loop 3b
    pop %dx
    pop %cx
    pop %ebx
    pop %eax
    ret
putnl:
    push %ax
    push %dx
    mov $0x3f8, %dx
    mov $'\n', %al
    outb %al, %dx
    pop %dx
    pop %ax
    ret
stop:
    mov %eax, %es:0x18
5:  cli
    hlt
    jmp 5b
cfgrd:
    push %dx
    mov $0x80007000, %eax
    mov %bl, %al
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    inl %dx, %eax
    pop %dx
    ret
cfgwr:
    push %eax
    push %dx
    mov $0x80007000, %eax
    mov %bl, %al
    mov $0xcf8, %dx
    outl %eax, %dx
    mov $0xcfc, %dx
    mov %ecx, %eax
    outl %eax, %dx
    pop %dx
    pop %eax
    ret
"#;

/// Guest-physical address [`IVSHMEM_GUEST`] expects the link memory at (real-mode
/// reachable: low memory must end at or below it).
pub const LINK_ADDRESS: u64 = 0x8_0000;
/// Where [`IVSHMEM_GUEST`] puts BAR0.
pub const BAR0_ADDRESS: u64 = 0xA_0000;
/// Where [`IVSHMEM_GUEST`] puts BAR1.
pub const BAR1_ADDRESS: u64 = 0xA_1000;
/// Low memory for [`IVSHMEM_GUEST`] cells.
pub const LOW_MEMORY: u64 = LINK_ADDRESS;
/// The MMIO accesses [`IVSHMEM_GUEST`]'s set-up makes (4 MSI-X entry dwords, INT_CONTROL,
/// STATE): after set-up, only doorbells that leave the kernel would add MMIO exits.
pub const IVSHMEM_SETUP_MMIO: u64 = 6;

/// An ivshmem guest for a link at [`LINK_ADDRESS`] with 4 KiB state table, no R/W section
/// and 4 KiB output sections, its function at 00:0e.0. The command line is three
/// characters: mode, own peer ID, target peer ID (digits), and an optional `o` for one-shot
/// mode (the handler then re-arms with `INT_CONTROL` = 1, one MMIO exit per interrupt).
///
/// Set-up: BAR0, BAR1, command = memory | bus master, MSI-X entry 0 → vector 0x40 on APIC 0,
/// MSI-X enabled, x2APIC software-enabled, `INT_CONTROL` = 1, `sti`, then `STATE` = 1. The
/// interrupt handler counts into its own output section's first dword, in mode `e` rings the
/// target back, and EOIs through x2APIC MSR 0x80B. Modes:
/// - `e`: echo; halts in a loop forever.
/// - `r`: ringer; waits for the target's state 1, prints `go`, then `rounds` times: rings
///   the target and waits until its own count says the answer came; prints `done` and the
///   PM-timer ticks of the loop (8 hex digits, 24-bit, 3,579,545 Hz), stops with cell_state 2.
/// - `m`: prints `go`, reads BAR0's ID register `rounds` times (each an MMIO exit), prints
///   `done` and the ticks like `r`, stops with cell_state 2.
/// - `w`: waits for interrupts like `e` but does not answer.
/// - `1`: writes the state table; `2`: writes the target's output section; `3`: a
///   misaligned BAR0 store; `4`: an unknown port (each after set-up, each illegal).
pub const IVSHMEM_GUEST: &str = r#"
main:
    call setup
    movzbl 0x1001, %eax
    sub $'0', %eax
    mov %eax, self
    shl $12, %eax
    add $0x1000, %eax
    mov %eax, myout
    movzbl 0x1002, %eax
    sub $'0', %eax
    mov %eax, target
    shl $16, %eax
    mov %eax, bell
    mov target, %eax
    shl $12, %eax
    add $0x1000, %eax
    mov %eax, theirout
    # BARs and command
    mov $0x10, %bl
    mov $0xa0000, %ecx
    call cfgwr
    mov $0x14, %bl
    mov $0xa1000, %ecx
    call cfgwr
    mov $0x04, %bl
    mov $6, %ecx
    call cfgwr
    mov $0xa000, %ax
    mov %ax, %fs
    mov $0x8000, %ax
    mov %ax, %gs
    # MSI-X entry 0: 0xfee00000, vector 0x40, unmasked; then enable MSI-X
    movl $0xfee00000, %fs:0x1000
    movl $0, %fs:0x1004
    movl $0x40, %fs:0x1008
    movl $0, %fs:0x100c
    mov $0x60, %bl
    mov $0x80000000, %ecx
    call cfgwr
    # IVT entry of vector 0x40, x2APIC on (SPIV)
    movw $isr, 0x100
    movw $0, 0x102
    mov $0x80f, %ecx
    mov $0x1ff, %eax
    xor %edx, %edx
    wrmsr
    # one-shot mode if the command line's 4th character is 'o'
    cmpb $'o', 0x1003
    jne 11f
    mov $0x40, %bl
    mov $0x01000000, %ecx
    call cfgwr
11: movl $1, %fs:0x08
    sti
    movl $1, %fs:0x10
    movb 0x1000, %al
    cmp $'r', %al
    je ringer
    cmp $'m', %al
    je mmio
    cmp $'1', %al
    je f1
    cmp $'2', %al
    je f2
    cmp $'3', %al
    je f3
    cmp $'4', %al
    je f4
idle:
    hlt
    jmp idle
f1: movl $5, %gs:0
    jmp idle
f2: mov theirout, %ebx
    movl $5, %gs:(%ebx)
    jmp idle
f3: movl $1, %fs:0x12
    jmp idle
f4: outb %al, $0x42
    jmp idle
ringer:
    mov target, %ebx
6:  cmpl $1, %gs:(,%ebx,4)
    jne 6b
    mov $go, %si
    call puts
    call now
    mov %eax, t0
    xor %esi, %esi
    mov bell, %edx
    mov myout, %edi
7:  inc %esi
    mov %edx, %fs:0x0c
8:  cmp %esi, %gs:(%edi)
    jne 8b
    cmp rounds, %esi
    jb 7b
finish:
    call now
    sub t0, %eax
    and $0xffffff, %eax
    mov %eax, %ebx
    mov $done, %si
    call puts
    mov %ebx, %eax
    call puthex
    call putnl
    mov $2, %eax
    call stop
mmio:
    mov $go, %si
    call puts
    call now
    mov %eax, t0
    xor %esi, %esi
10: mov %fs:0, %eax
    inc %esi
    cmp rounds, %esi
    jb 10b
    jmp finish
now:
    push %dx
    mov %es:0x50, %dx
    inl %dx, %eax
    pop %dx
    ret
isr:
    pushal
    incl count
    mov count, %eax
    mov myout, %ebx
    mov %eax, %gs:(%ebx)
    # one-shot: re-arm first, so that the answer's answer finds interrupts enabled
    cmpb $'o', 0x1003
    jne 9f
    movl $1, %fs:0x08
9:  cmpb $'e', 0x1000
    jne 12f
    mov bell, %eax
    mov %eax, %fs:0x0c
12: xor %eax, %eax
    xor %edx, %edx
    mov $0x80b, %ecx
    wrmsr
    popal
    iret
go: .asciz "go\n"
done: .asciz "done\n"
    .align 4
rounds: .long 64
t0: .long 0
count: .long 0
self: .long 0
target: .long 0
bell: .long 0
myout: .long 0
theirout: .long 0
"#;

/// Why a guest could not be assembled.
#[derive(Debug, thiserror::Error)]
#[error("assembling a test guest with {tool}: {detail}")]
pub struct AssembleError {
    /// `as`, `ld` or `nm`.
    pub tool: &'static str,
    /// What went wrong.
    pub detail: String,
}

/// An assembled guest: the flat image (linked at 0) and its symbols.
#[derive(Debug, Clone)]
pub struct Guest {
    /// The image.
    pub image: Vec<u8>,
    symbols: Vec<(String, u64)>,
}

impl Guest {
    /// The address of `label`.
    pub fn symbol(&self, label: &str) -> Option<u64> {
        self.symbols
            .iter()
            .find(|(name, _)| name == label)
            .map(|(_, a)| *a)
    }

    /// Overwrites the dword at `label` (e.g. `rounds`).
    pub fn patch_u32(&mut self, label: &str, value: u32) -> Option<()> {
        let at = usize::try_from(self.symbol(label)?).ok()?;
        self.image
            .get_mut(at..at + 4)?
            .copy_from_slice(&value.to_le_bytes());
        Some(())
    }
}

/// Assembles [`PRELUDE`] + `body` (16-bit AT&T syntax, defining `main`).
pub fn assemble(body: &str) -> Result<Guest, AssembleError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvm-guest-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| AssembleError {
        tool: "as",
        detail: format!("{}: {e}", dir.display()),
    })?;
    let result = assemble_in(&dir, body);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn assemble_in(dir: &std::path::Path, body: &str) -> Result<Guest, AssembleError> {
    let src = dir.join("guest.s");
    let obj = dir.join("guest.o");
    let bin = dir.join("guest.bin");
    std::fs::write(&src, format!("{PRELUDE}\n{body}\n")).map_err(|e| AssembleError {
        tool: "as",
        detail: e.to_string(),
    })?;
    run(
        "as",
        Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src),
    )?;
    run(
        "ld",
        Command::new("ld")
            .args(["-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o"])
            .arg(&bin)
            .arg(&obj),
    )?;
    let nm = run("nm", Command::new("nm").arg(&obj))?;
    let symbols = nm
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
            let _kind = parts.next()?;
            Some((parts.next()?.to_string(), addr))
        })
        .collect();
    let image = std::fs::read(PathBuf::from(&bin)).map_err(|e| AssembleError {
        tool: "ld",
        detail: e.to_string(),
    })?;
    Ok(Guest { image, symbols })
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<String, AssembleError> {
    let out = cmd.output().map_err(|e| AssembleError {
        tool,
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(AssembleError {
            tool,
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
