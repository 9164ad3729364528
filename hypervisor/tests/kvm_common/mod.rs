//! Shared helpers of the KVM tests: skipping without `/dev/kvm`, and tiny real-mode guests
//! assembled with GNU `as` at test time.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::kvm::{kvm_available, EventQueue, HaltReason, KvmEvent};

/// How long a test waits for a guest event before failing (guest ring-0 code is emulated
/// instruction by instruction on PVM hosts, and exits cost tens of microseconds).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `true` (with the reason printed) when KVM cannot be used here.
pub fn skip_without_kvm() -> bool {
    match kvm_available() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping: KVM is not usable here: {why}");
            true
        }
    }
}

/// Routines every test guest gets: entry (`jmp main`), `puts` (string at %si), `puthex`
/// (%eax as 8 hex digits), `putnl`, `stop` (writes %eax to cell_state and halts), and `%es`
/// pointing at the communication region (es:0x10 = 0x100000) once `setup` ran.
pub const PRELUDE: &str = r#"
    .code16
    .text
    .globl _start
_start:
    jmp main
setup:
    cld
    xor %ax, %ax
    mov %ax, %ds
    mov $0xffff, %ax
    mov %ax, %es
    ret
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
"#;

/// Assembles `PRELUDE` + `body` (16-bit AT&T syntax, must define `main`) into a flat image
/// linked at 0.
pub fn assemble(body: &str) -> Vec<u8> {
    let dir = tempdir();
    let src = dir.join("guest.s");
    let obj = dir.join("guest.o");
    let bin = dir.join("guest.bin");
    std::fs::write(&src, format!("{PRELUDE}\n{body}\n")).unwrap();
    run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o"])
        .arg(&bin)
        .arg(&obj));
    let image = std::fs::read(&bin).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    image
}

/// The address of `label` in an image assembled from `body` (via `nm`).
pub fn symbol(body: &str, label: &str) -> u64 {
    let dir = tempdir();
    let src = dir.join("guest.s");
    let obj = dir.join("guest.o");
    std::fs::write(&src, format!("{PRELUDE}\n{body}\n")).unwrap();
    run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
    let out = Command::new("nm").arg(&obj).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            let addr = parts.next()?;
            let _kind = parts.next()?;
            (parts.next()? == label).then(|| u64::from_str_radix(addr, 16).unwrap())
        })
        .unwrap_or_else(|| panic!("no symbol {label}"))
}

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kvm-guest-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh event queue.
pub fn events() -> Arc<EventQueue> {
    Arc::new(EventQueue::new().unwrap())
}

/// Waits for the console line `want` of `cell`.
pub fn expect_line(events: &EventQueue, cell: &str, want: &str) {
    let got = events.wait_for(
        TIMEOUT,
        |e| matches!(e, KvmEvent::Console { cell: c, line } if c == cell && line == want),
    );
    assert!(
        got.is_some(),
        "cell {cell} did not print {want:?}; queued: {:?}",
        events.take()
    );
}

/// Waits for `cell` to halt and returns why.
pub fn expect_halt(events: &EventQueue, cell: &str) -> HaltReason {
    match events.wait_for(
        TIMEOUT,
        |e| matches!(e, KvmEvent::Halted { cell: c, .. } if c == cell),
    ) {
        Some(KvmEvent::Halted { reason, .. }) => reason,
        _ => panic!("cell {cell} did not halt; queued: {:?}", events.take()),
    }
}

/// The console lines of `cell` still queued.
pub fn console_lines(events: &EventQueue, cell: &str) -> Vec<String> {
    events
        .take()
        .into_iter()
        .filter_map(|e| match e {
            KvmEvent::Console { cell: c, line } if c == cell => Some(line),
            _ => None,
        })
        .collect()
}
