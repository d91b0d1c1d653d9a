//! KVM tier, step one: a hand-assembled real-mode guest of a few bytes writes to the
//! serial port and halts, and we check the exits KVM reports.
//!
//! This is the smallest proof that the test harness hands the KVM tier a working `/dev/kvm`, and
//! that kvm-ioctls + vm-memory are wired the way the VMM will use them. It does not need Linux to
//! boot, but it is gated as KVM tier so that it runs where the rest of that tier runs (inside the
//! nested test host on machines whose `/dev/kvm` cannot boot Linux; see docs/testing.md).
#![cfg(sandbox_kvm)]

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest-physical address the code is loaded at and where the vCPU starts (CS base 0, IP here).
const CODE_GPA: u64 = 0x1000;
/// Guest RAM, bytes: one region from 0, enough for the code page.
const MEM_SIZE: usize = 0x10000;
/// COM1 data register, the port the 16550 console lives on.
const COM1: u16 = 0x3f8;

/// 16-bit real-mode code, 7 bytes. It takes its inputs from registers, so the test also proves
/// that `set_regs` reaches the guest:
///
/// ```text
/// 00 D8       add al, bl      ; al = 0x02 + 0x31 = '3'
/// EE          out dx, al      ; dx = 0x3f8 (set by the test)
/// B0 0A       mov al, 0x0a    ; '\n'
/// EE          out dx, al
/// F4          hlt
/// ```
const CODE: [u8; 7] = [0x00, 0xd8, 0xee, 0xb0, 0x0a, 0xee, 0xf4];

#[test]
fn real_mode_guest_writes_to_com1_then_halts() {
    // Declared before the VM so that it is dropped after it: KVM keeps using the mapping until the
    // VM fd is closed.
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("allocate guest RAM");
    mem.write_slice(&CODE, GuestAddress(CODE_GPA))
        .expect("code fits in guest RAM");
    let host_addr = mem
        .get_host_address(GuestAddress(0))
        .expect("region at guest address 0 is mapped");

    let kvm = Kvm::new().expect("open /dev/kvm (the KVM tier runs under `cargo xtask test`)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");

    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host_addr as u64,
        flags: 0,
    };
    // SAFETY: `host_addr` is the start of a live, page-aligned mapping of `MEM_SIZE` bytes owned
    // by `mem`; `mem` is declared before `vm` and so outlives it, and no other slot overlaps.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_GPA;
    regs.rax = 0x02;
    regs.rbx = 0x31;
    regs.rdx = u64::from(COM1);
    regs.rflags = 0x2; // Bit 1 is reserved and must be set.
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    // Record every exit up to the halt; the guest has exactly three, so a bounded loop suffices
    // and a misbehaving guest fails the test instead of spinning.
    let mut exits = Vec::new();
    for _ in 0..16 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => exits.push(format!("out {port:#x} {data:?}")),
            VcpuExit::Hlt => {
                exits.push("hlt".to_owned());
                break;
            }
            other => exits.push(format!("unexpected {other:?}")),
        }
    }
    assert_eq!(
        exits,
        [
            format!("out {COM1:#x} [{}]", b'3'),
            format!("out {COM1:#x} [{}]", b'\n'),
            "hlt".to_owned(),
        ]
    );

    // The vCPU stopped right after the one-byte `hlt`, at the end of the code.
    let regs = vcpu.get_regs().expect("KVM_GET_REGS");
    assert_eq!(regs.rip, CODE_GPA + CODE.len() as u64);
    assert_eq!(regs.rax & 0xff, 0x0a);
}

/// A line that is never looked at: the string-I/O guest runs with interrupts off.
struct NoIrq;

impl sandbox_vmm::devices::IrqTrigger for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 16-bit real-mode code, 13 bytes, for the string port I/O path of our own vCPU loop:
///
/// ```text
/// F3 6E       rep outsb       ; ds:si = "hello\n", cx = 6, dx = 0x3f8 (set by the test)
/// BA FD 03    mov dx, 0x3fd   ; the UART's line status register
/// B9 04 00    mov cx, 4
/// F3 6C       rep insb        ; four LSR bytes to es:di (set by the test)
/// F4          hlt
/// ```
const STRING_IO_CODE: [u8; 13] = [
    0xf3, 0x6e, 0xba, 0xfd, 0x03, 0xb9, 0x04, 0x00, 0xf3, 0x6c, 0xf4, 0x90, 0x90,
];
/// Where the message for `rep outsb` sits.
const MSG_GPA: u64 = 0x1100;
/// Where `rep insb` stores its bytes.
const IN_GPA: u64 = 0x1200;

/// `rep outsb`/`rep insb` through `sandbox_vmm::vcpu::Vcpu` and the PIO bus: every byte reaches
/// the serial device in order (KVM may hand over several items in one `KVM_EXIT_IO`), and an IN
/// with a count fills exactly that many bytes.
#[test]
fn string_port_io_reaches_the_serial_device_byte_by_byte() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use sandbox_vmm::bus::{Bus, BusRange};
    use sandbox_vmm::devices::console::ConsoleRing;
    use sandbox_vmm::devices::serial::SerialDevice;
    use sandbox_vmm::vcpu::{Vcpu, VcpuCommand};
    use sandbox_vmm::vmm::{ExitReason, ExitState};

    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("allocate guest RAM");
    mem.write_slice(&STRING_IO_CODE, GuestAddress(CODE_GPA))
        .expect("code fits");
    mem.write_slice(b"hello\n", GuestAddress(MSG_GPA))
        .expect("message fits");
    mem.write_slice(&[0xaa; 5], GuestAddress(IN_GPA))
        .expect("sentinel fits");
    let host_addr = mem
        .get_host_address(GuestAddress(0))
        .expect("region at guest address 0 is mapped");

    let kvm = Kvm::new().expect("open /dev/kvm (the KVM tier runs under `cargo xtask test`)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host_addr as u64,
        flags: 0,
    };
    // SAFETY: `host_addr` is the start of a live, page-aligned mapping of `MEM_SIZE` bytes owned
    // by `mem` (and shared by the clone the vCPU holds); `mem` is declared before `vm` and so
    // outlives it, and no other slot overlaps.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = fd.get_sregs().expect("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).expect("KVM_SET_SREGS");
    let mut regs = fd.get_regs().expect("KVM_GET_REGS");
    regs.rip = CODE_GPA;
    regs.rsi = MSG_GPA;
    regs.rdi = IN_GPA;
    regs.rcx = 6;
    regs.rdx = u64::from(COM1);
    regs.rflags = 0x2; // Interrupts off, direction flag clear.
    fd.set_regs(&regs).expect("KVM_SET_REGS");

    let ring = ConsoleRing::new(1 << 12);
    let serial = SerialDevice::new(Arc::new(NoIrq), Box::new(ring.clone()));
    let mut pio = Bus::new("pio");
    pio.insert(
        BusRange::new(u64::from(COM1), SerialDevice::PORTS).expect("range"),
        Arc::new(Mutex::new(serial)),
    )
    .expect("insert COM1");
    let exit = Arc::new(ExitState::default());
    let vcpu = Vcpu::new(
        0,
        fd,
        Arc::new(pio),
        Arc::new(Bus::new("mmio")),
        exit.clone(),
        mem.clone(),
    );
    let mut handle = vcpu.spawn().expect("vCPU thread");
    handle.send(VcpuCommand::Resume);
    // Our loop reports the final `hlt` (interrupts off) as an internal error: the guest is done.
    let reason = exit.wait(Some(Duration::from_secs(30)));
    handle.stop_and_join();
    assert!(
        matches!(reason, Some(ExitReason::InternalError(ref info)) if info.description.contains("KVM_EXIT_HLT")),
        "{reason:?}"
    );
    assert_eq!(ring.lines(), vec!["hello\n".to_string()]);
    let mut got = [0u8; 5];
    mem.read_slice(&mut got, GuestAddress(IN_GPA))
        .expect("read back");
    // Four LSR reads (transmitter empty, bit 5), then the untouched sentinel.
    for (i, b) in got[..4].iter().enumerate() {
        assert!(*b != 0xff && b & 0x20 != 0, "byte {i}: {b:#x}");
    }
    assert_eq!(got[4], 0xaa);
    drop(vm);
}
