//! KVM cells boot by Jailhouse's x86 inmate protocol and reach exactly the emulated devices:
//! console, command line, communication region, PM timer, `cell_state`, the `xgetbv` fix-up,
//! and a `FATAL:` stop for anything else.

mod kvm_common;

use hypervisor::kvm::{HaltReason, KvmCell, KvmCellConfig, KvmCellPhase};
use kvm_common::*;

#[test]
fn boots_in_real_mode_with_console_cmdline_comm_region_and_pm_timer() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    mov $hello, %si
    call puts
    # the communication region: "JHCOMM", revision 2, cell_state 0
    cmpl $0x4f43484a, %es:0x10
    jne bad
    cmpw $0x4d4d, %es:0x14
    jne bad
    cmpw $2, %es:0x16
    jne bad
    cmpl $0, %es:0x18
    jne bad
    cmpl $0x3f8, %es:0x28
    jne bad
    # the command line, as written at 0x1000
    mov $0x1000, %si
    call puts
    call putnl
    # the PM timer port from the region; wait until 1 ms (3580 ticks) passed
    mov %es:0x50, %dx
    inl %dx, %eax
    mov %eax, %ebx
6:  inl %dx, %eax
    sub %ebx, %eax
    and $0xffffff, %eax
    cmp $3580, %eax
    jb 6b
    mov $timer_ok, %si
    call puts
    mov $2, %eax
    call stop
bad:
    mov $bad_msg, %si
    call puts
    mov $3, %eax
    call stop
hello: .asciz "hello from real mode\n"
timer_ok: .asciz "timer ok\n"
bad_msg: .asciz "bad comm region\n"
"#;
    let events = events();
    let mut config = KvmCellConfig::new("boot", assemble(body));
    config.cmdline = "target=1 greeting=hi".into();
    config.cpu = Some(0);
    let mut cell = KvmCell::new(config, events.clone()).unwrap();
    cell.start().unwrap();
    expect_line(&events, "boot", "hello from real mode");
    expect_line(&events, "boot", "target=1 greeting=hi");
    expect_line(&events, "boot", "timer ok");
    assert_eq!(expect_halt(&events, "boot"), HaltReason::CellState(2));
    assert_eq!(cell.phase(), KvmCellPhase::Halted(HaltReason::CellState(2)));
    assert!(cell.exits().pio > 20, "{:?}", cell.exits());
    cell.stop();
    assert_eq!(
        cell.phase(),
        KvmCellPhase::Halted(HaltReason::CellState(2)),
        "a stop after the halt keeps the reason"
    );
}

#[test]
fn an_unknown_port_stops_the_cell_with_a_fatal_report() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    mov $0x5a, %al
    outb %al, $0x80
    jmp fault
    .org 0x500
fault:
    outb %al, $0x42
    mov $after, %si
    call puts
after: .asciz "still running\n"
"#;
    let events = events();
    let mut cell = KvmCell::new(
        KvmCellConfig::new("bad-port", assemble(body)),
        events.clone(),
    )
    .unwrap();
    cell.start().unwrap();
    let reason = expect_halt(&events, "bad-port");
    // KVM completes an emulated write before it exits (RIP after the 2-byte `out`); VMX's
    // fast PIO path exits at the instruction.
    let report = |rip: u64| {
        HaltReason::Fatal(format!(
            "FATAL: cell \"bad-port\": illegal port write at 0x42, size 1, value 0x5a, RIP \
             {rip:#x}: no device at this port"
        ))
    };
    assert!(
        reason == report(0x500) || reason == report(0x502),
        "{reason:?}"
    );
    assert!(console_lines(&events, "bad-port").is_empty());
}

#[test]
fn wrong_size_pm_timer_read_is_illegal_and_names_its_rip() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    mov $0x608, %dx
    inl %dx, %eax
fault:
    inw %dx, %ax
"#;
    let events = events();
    let mut cell = KvmCell::new(KvmCellConfig::new("pmt", assemble(body)), events.clone()).unwrap();
    cell.start().unwrap();
    let rip = symbol(body, "fault");
    match expect_halt(&events, "pmt") {
        HaltReason::Fatal(report) => assert_eq!(
            report,
            format!(
                "FATAL: cell \"pmt\": illegal port read at 0x608, size 2, RIP {rip:#x}: the PM \
                 timer takes 32-bit reads only"
            )
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn xgetbv_returns_xcr0_on_every_host() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    mov %cr4, %eax
    or $0x40000, %eax
    mov %eax, %cr4
    xor %ecx, %ecx
    xgetbv
    call puthex
    call putnl
    mov $2, %eax
    call stop
"#;
    let events = events();
    let mut cell =
        KvmCell::new(KvmCellConfig::new("xgetbv", assemble(body)), events.clone()).unwrap();
    cell.start().unwrap();
    assert_eq!(expect_halt(&events, "xgetbv"), HaltReason::CellState(2));
    let lines = console_lines(&events, "xgetbv");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let xcr0 = u32::from_str_radix(&lines[0], 16).unwrap();
    assert_eq!(xcr0 & 1, 1, "x87 state is always in XCR0: {xcr0:#x}");
}

#[test]
fn stop_and_restart_a_cell_that_spins_with_interrupts_off() {
    if skip_without_kvm() {
        return;
    }
    let body = r#"
main:
    call setup
    mov $up, %si
    call puts
    cli
7:  hlt
    jmp 7b
up: .asciz "up\n"
"#;
    let events = events();
    let mut cell =
        KvmCell::new(KvmCellConfig::new("spin", assemble(body)), events.clone()).unwrap();
    cell.start().unwrap();
    expect_line(&events, "spin", "up");
    assert_eq!(cell.phase(), KvmCellPhase::Running);
    cell.restart().unwrap();
    assert_eq!(expect_halt(&events, "spin"), HaltReason::Requested);
    expect_line(&events, "spin", "up");
    cell.stop();
    assert_eq!(expect_halt(&events, "spin"), HaltReason::Requested);
    assert_eq!(cell.phase(), KvmCellPhase::Halted(HaltReason::Requested));
}

/// A guest that reports through `cell_state` (e.g. a panicking inmate writes 3, one that
/// finds a wrong comm revision writes 4) is stopped and reported with that state.
fn cell_state_report(state: u32) -> HaltReason {
    let body = format!(
        r#"
main:
    call setup
    mov $msg, %si
    call puts
    mov ${state}, %eax
    call stop
msg: .asciz "giving up\n"
"#
    );
    let events = events();
    let name = format!("state-{state}");
    let mut cell = KvmCell::new(
        KvmCellConfig::new(name.clone(), assemble(&body)),
        events.clone(),
    )
    .unwrap();
    cell.start().unwrap();
    expect_line(&events, &name, "giving up");
    let reason = expect_halt(&events, &name);
    assert_eq!(cell.phase(), KvmCellPhase::Halted(reason.clone()));
    reason
}

#[test]
fn a_failed_cell_is_reported_with_its_cell_state() {
    if skip_without_kvm() {
        return;
    }
    let reason = cell_state_report(3);
    assert_eq!(reason, HaltReason::CellState(3));
    assert_eq!(reason.to_string(), "cell_state 3 (failed)");
}

#[test]
fn a_wrong_comm_revision_is_reported_with_its_cell_state() {
    if skip_without_kvm() {
        return;
    }
    let reason = cell_state_report(4);
    assert_eq!(reason, HaltReason::CellState(4));
    assert_eq!(
        reason.to_string(),
        "cell_state 4 (failed: wrong communication region revision)"
    );
}
