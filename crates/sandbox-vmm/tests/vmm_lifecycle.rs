//! KVM tier: the VMM's own boot path, threads and exit reasons, with hand-made 64-bit "kernels"
//! of a few instructions (the step between the 20-byte real-mode guest and Linux).
//!
//! Each guest is an ELF64 with one PT_LOAD at 16 MiB, entered in long mode exactly like a
//! vmlinux, so these tests cover the GDT, page tables, long-mode registers, the bus, the serial
//! console, the ACPI/i8042 power devices and the vCPU state machine.
#![cfg(sandbox_kvm)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sandbox_vmm::devices::console::ConsoleRing;
use sandbox_vmm::vmm::{
    build, DiskConfig, ExitReason, VmConfig, VmHandle, VmResources, VmState, VsockDeviceConfig,
};

/// Guest-physical load address and entry point.
const ENTRY: u64 = 0x100_0000;
/// Bound on every wait; a healthy run takes milliseconds.
const WAIT: Duration = Duration::from_secs(120);

/// `mov dx, 0x3f8; mov al, 'o'; out dx, al; mov al, 'k'; out dx, al; mov al, '\n'; out dx, al`.
const PRINT_OK: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'o', 0xee, 0xb0, b'k', 0xee, 0xb0, 0x0a, 0xee,
];
/// ACPI S5: `mov dx, 0x600; mov al, (5 << 2) | 0x20; out dx, al; hlt; jmp $-1`.
const POWEROFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4, 0xeb, 0xfd];
/// i8042 reset: `mov al, 0xfe; out 0x64, al; hlt; jmp $-1`.
const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];
/// `ud2` with a null IDT: #UD → #DF → triple fault.
const UD2: &[u8] = &[0x0f, 0x0b];
/// `jmp $`: runs until the host stops it.
const SPIN: &[u8] = &[0xeb, 0xfe];

/// An ELF64 x86_64 executable whose single PT_LOAD puts `code` at [`ENTRY`].
fn elf(code: &[u8]) -> Vec<u8> {
    const CODE_OFFSET: usize = 0x1000;
    let mut img = Vec::new();
    img.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    img.extend_from_slice(&[0; 8]);
    img.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    img.extend_from_slice(&1u32.to_le_bytes());
    img.extend_from_slice(&ENTRY.to_le_bytes());
    img.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    img.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    img.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        img.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    img.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    img.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        CODE_OFFSET as u64,
        ENTRY,
        ENTRY,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    img.resize(CODE_OFFSET, 0);
    img.extend_from_slice(code);
    img
}

fn write_kernel(dir: &Path, code: &[&[u8]]) -> PathBuf {
    let path = dir.join("kernel.elf");
    std::fs::write(&path, elf(&code.concat())).expect("write the test kernel");
    path
}

fn boot(code: &[&[u8]], vcpus: u8) -> (VmHandle, ConsoleRing, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = write_kernel(dir.path(), code);
    let config = VmConfig::new(kernel)
        .vcpus(vcpus)
        .memory_mib(64)
        .console_file(dir.path().join("console.log"), 4096);
    let ring = ConsoleRing::new(4096);
    let resources = VmResources::try_from(config)
        .expect("valid config")
        .with_console_ring(ring.clone());
    let mut vm = build(resources).expect("build the VM");
    assert_eq!(vm.state(), VmState::Paused);
    vm.start().expect("start");
    (vm, ring, dir)
}

#[test]
fn poweroff_ends_the_vm_with_console_output() {
    let (mut vm, ring, dir) = boot(&[PRINT_OK, POWEROFF], 1);
    assert_eq!(vm.wait_timeout(WAIT), Some(ExitReason::Poweroff));
    assert_eq!(ring.lines(), vec!["ok\n".to_string()]);
    let log = std::fs::read_to_string(dir.path().join("console.log")).expect("console log");
    assert_eq!(log, "ok\n");
    assert_eq!(vm.state(), VmState::Finished);
}

#[test]
fn poweroff_with_two_vcpus() {
    let (mut vm, _ring, _dir) = boot(&[POWEROFF], 2);
    assert_eq!(vm.wait_timeout(WAIT), Some(ExitReason::Poweroff));
}

#[test]
fn i8042_reset_ends_the_vm_as_reset() {
    let (mut vm, _ring, _dir) = boot(&[I8042_RESET], 1);
    assert_eq!(vm.wait_timeout(WAIT), Some(ExitReason::Reset));
}

#[test]
fn triple_fault_is_reported() {
    let (mut vm, _ring, _dir) = boot(&[UD2], 1);
    assert_eq!(
        vm.wait_timeout(WAIT),
        Some(ExitReason::TripleFault { vcpu: 0 })
    );
}

#[test]
fn pause_resume_and_stop_a_spinning_guest() {
    let (mut vm, _ring, _dir) = boot(&[SPIN], 2);
    vm.pause().expect("pause");
    assert_eq!(vm.state(), VmState::Paused);
    assert!(vm.pause().is_err(), "pausing twice is refused");
    vm.start().expect("resume");
    assert_eq!(vm.state(), VmState::Running);
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert_eq!(vm.state(), VmState::Finished);
    assert!(vm.start().is_err(), "a finished VM cannot start");
}

#[test]
fn binary_exit_codes_say_why() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (code, expected) in [
        (&[POWEROFF][..], 0),
        (&[I8042_RESET][..], 3),
        (&[UD2][..], 4),
    ] {
        let kernel = write_kernel(dir.path(), code);
        let config = serde_json::json!({
            "kernel": kernel,
            "memory_mib": 64,
            "console": { "path": dir.path().join("console.log"), "cap_bytes": 4096 },
        });
        let config_path = dir.path().join("vm.json");
        std::fs::write(&config_path, config.to_string()).expect("write config");
        let status = Command::new(env!("CARGO_BIN_EXE_sandbox-vmm"))
            .arg("--config")
            .arg(&config_path)
            .status()
            .expect("run sandbox-vmm");
        assert_eq!(status.code(), Some(expected));
    }
    // A bad config is a VMM error (1).
    std::fs::write(dir.path().join("bad.json"), r#"{"kernel": "/nonexistent"}"#).expect("write");
    let status = Command::new(env!("CARGO_BIN_EXE_sandbox-vmm"))
        .arg(dir.path().join("bad.json"))
        .status()
        .expect("run sandbox-vmm");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn virtio_disk_and_vsock_attach_and_release_their_resources() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = write_kernel(dir.path(), &[POWEROFF]);
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write the disk image");
    let uds = dir.path().join("vm.vsock");
    let config = VmConfig::new(kernel)
        .memory_mib(64)
        .disk(DiskConfig::new(&disk, false))
        .disk(DiskConfig::new(&disk, true))
        .vsock(VsockDeviceConfig::new(3, &uds))
        .console_file(dir.path().join("console.log"), 4096);
    let mut vm = build(VmResources::try_from(config).expect("valid config")).expect("build the VM");
    assert!(uds.exists(), "the vsock listener is bound at build time");
    vm.start().expect("start");
    assert_eq!(vm.wait_timeout(WAIT), Some(ExitReason::Poweroff));
    drop(vm);
    assert!(!uds.exists(), "the vsock socket is removed with the VM");
}

/// The jailed VMM's form of a config: every file an inherited fd (`{"fd": N}`), none opened by
/// path. The VM builds, boots and powers off; the vsock listener is accepted on and its socket
/// file left alone (whoever made it removes it); a qcow2 overlay and its base work from fds.
#[test]
fn every_file_given_as_an_fd_builds_and_runs() {
    use sandbox_vmm::vmm::FileSource;
    use std::os::fd::IntoRawFd;
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = write_kernel(dir.path(), &[PRINT_OK, POWEROFF]);
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw image");
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("base image");
    let overlay = dir.path().join("disk.qcow2");
    sandbox_fs::create_overlay(&overlay, &base, 1 << 20).expect("overlay");
    let uds = dir.path().join("vm.vsock");
    let listener = std::os::unix::net::UnixListener::bind(&uds).expect("bind");
    let rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open rw")
    };
    let ro = |p: &Path| std::fs::File::open(p).expect("open ro");
    // The VM takes ownership of each fd (and closes it when dropped).
    let fd = |f: std::fs::File| FileSource::fd(f.into_raw_fd());
    let console_path = dir.path().join("console.log");
    let config = VmConfig::new(fd(ro(&kernel)))
        .kvm(fd(rw(Path::new("/dev/kvm"))))
        .memory_mib(64)
        .disk(DiskConfig::new(fd(rw(&raw)), false))
        .disk(DiskConfig::new(fd(ro(&raw)), true))
        .disk(
            DiskConfig::qcow2_overlay(fd(rw(&overlay)), fd(ro(&base)), Some(1 << 20))
                .with_full_report(fd(
                    std::fs::File::create(dir.path().join("full")).expect("full")
                )),
        )
        .vsock(VsockDeviceConfig::new(
            3,
            FileSource::fd(listener.into_raw_fd()),
        ))
        .console_file(
            fd(std::fs::File::create(&console_path).expect("console")),
            4096,
        );
    let text = serde_json::to_string(&config).expect("json");
    assert!(
        !text.contains(&*dir.path().to_string_lossy()),
        "a path in {text}"
    );
    let mut vm = build(VmResources::try_from(config).expect("valid config")).expect("build the VM");
    vm.start().expect("start");
    assert_eq!(vm.wait_timeout(WAIT), Some(ExitReason::Poweroff));
    drop(vm);
    assert_eq!(
        std::fs::read_to_string(&console_path).expect("console"),
        "ok\n"
    );
    assert!(
        uds.exists(),
        "an inherited listener's socket file is not the VMM's to remove"
    );
    assert_eq!(
        std::fs::read(dir.path().join("full")).expect("full report"),
        0u64.to_le_bytes()
    );
}
