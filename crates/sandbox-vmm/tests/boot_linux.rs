//! KVM tier: boot the guest kernel and rootfs from `cargo xtask guest` to user space.
//!
//! Needs env `SANDBOX_KERNEL` and `SANDBOX_ROOTFS` (set by `cargo xtask test`, which runs this
//! tier inside a nested test host on machines whose /dev/kvm cannot boot Linux). The rootfs is a
//! read-only cache entry: tests that only boot attach it read-only (the test init needs no
//! writable root), and the one test that writes boots its own copy in `TMPDIR` (a 1 GiB copy is
//! slow under nested emulation, so there is only one).
#![cfg(sandbox_kvm)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sandbox_vmm::devices::console::ConsoleRing;
use sandbox_vmm::vmm::{build, DiskConfig, ExitReason, VmConfig, VmResources};

/// The console line every boot test waits for (docs/guest.md).
const READY: &str = "sandbox-init: ready";
/// Upper bound on a boot plus a command; boots take seconds even under nested TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Guest RAM, MiB: small, so that several test VMs fit in the test host.
const MEMORY_MIB: u32 = 128;

/// One VM at a time: the test host has two cores, and parallel boots only slow each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn env_path(name: &str) -> PathBuf {
    let value = std::env::var_os(name).unwrap_or_else(|| {
        panic!("{name} is not set: run the KVM tier with `cargo xtask test`, which builds the guest artifacts")
    });
    PathBuf::from(value)
}

/// A writable copy of the rootfs in a fresh temp dir.
fn rootfs_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir in TMPDIR");
    let copy = dir.path().join("rootfs.ext4");
    std::fs::copy(env_path("SANDBOX_ROOTFS"), &copy).expect("copy the rootfs to TMPDIR");
    (dir, copy)
}

struct Run {
    reason: ExitReason,
    console: Vec<String>,
}

impl Run {
    /// Console lines with the tty's `\r\n` trimmed.
    fn lines(&self) -> Vec<&str> {
        self.console.iter().map(|l| l.trim_end()).collect()
    }

    /// The command's exit code from `sandbox-init: exit=<code>`.
    fn command_exit(&self) -> Option<i32> {
        self.lines()
            .iter()
            .find_map(|l| l.strip_prefix("sandbox-init: exit="))
            .and_then(|c| c.trim().parse().ok())
    }
}

/// Boots `rootfs` with `vcpus`, extra kernel arguments `extra`, waits for the ready marker and
/// then for the VM to end by itself.
fn boot(rootfs: &Path, read_only: bool, vcpus: u8, extra: &str) -> Run {
    let _one_at_a_time = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let log_dir = tempfile::tempdir().expect("temp dir");
    let mode = if read_only { "ro" } else { "rw" };
    let config = VmConfig::new(env_path("SANDBOX_KERNEL"))
        .vcpus(vcpus)
        .memory_mib(MEMORY_MIB)
        .disk(DiskConfig::new(rootfs, read_only))
        .cmdline_extra(format!(
            "root=/dev/vda {mode} init=/sbin/sandbox-test-init {extra}"
        ))
        .console_file(log_dir.path().join("console.log"), 1 << 20);
    let ring = ConsoleRing::new(1 << 20);
    let resources = VmResources::try_from(config)
        .expect("valid config")
        .with_console_ring(ring.clone());
    let mut vm = build(resources).expect("build the VM");
    vm.start().expect("start the VM");
    let ready = ring.wait_for_line(READY, BOOT_TIMEOUT);
    let reason = vm.wait_timeout(BOOT_TIMEOUT).unwrap_or_else(|| vm.stop());
    let console = ring.lines();
    assert!(
        ready.is_some(),
        "no `{READY}` on the console; VM ended with {reason}; console:\n{}",
        console.concat()
    );
    Run { reason, console }
}

/// The cached rootfs, attached read-only.
fn rootfs_ro() -> PathBuf {
    env_path("SANDBOX_ROOTFS")
}

#[test]
fn boots_to_init_with_one_vcpu_and_powers_off() {
    let run = boot(&rootfs_ro(), true, 1, "");
    assert_eq!(
        run.reason,
        ExitReason::Poweroff,
        "console:\n{}",
        run.console.concat()
    );
}

#[test]
fn boots_with_two_vcpus_and_linux_sees_both() {
    let run = boot(&rootfs_ro(), true, 2, r#"sandbox_run="echo cpus=$(nproc)""#);
    assert!(
        run.lines().contains(&"cpus=2"),
        "console:\n{}",
        run.console.concat()
    );
    assert_eq!(run.command_exit(), Some(0));
    assert_eq!(run.reason, ExitReason::Poweroff);
}

#[test]
fn guest_reboot_ends_the_vm_as_reset() {
    let run = boot(&rootfs_ro(), true, 1, "sandbox_halt=reboot");
    assert_eq!(
        run.reason,
        ExitReason::Reset,
        "console:\n{}",
        run.console.concat()
    );
}

#[test]
fn read_write_rootfs_keeps_a_file_across_boots() {
    let (_dir, rootfs) = rootfs_copy();
    let first = boot(
        &rootfs,
        false,
        1,
        r#"sandbox_run="echo persisted-42 > /root/marker""#,
    );
    assert_eq!(
        first.command_exit(),
        Some(0),
        "console:\n{}",
        first.console.concat()
    );
    assert_eq!(first.reason, ExitReason::Poweroff);
    let second = boot(&rootfs, false, 1, r#"sandbox_run="cat /root/marker""#);
    assert!(
        second.lines().contains(&"persisted-42"),
        "console:\n{}",
        second.console.concat()
    );
    assert_eq!(second.command_exit(), Some(0));
}

#[test]
fn read_only_rootfs_refuses_writes() {
    let rootfs = rootfs_ro();
    let modified = || {
        std::fs::metadata(&rootfs)
            .and_then(|m| m.modified())
            .expect("image metadata")
    };
    let before = modified();
    // The disk is read-only at the device (VIRTIO_BLK_F_RO, and the VMM opens the image
    // read-only), whatever the guest tries: a write through the file system and a raw write to the
    // block device both fail.
    let run = boot(
        &rootfs,
        true,
        1,
        r#"sandbox_run="echo x > /root/nope || dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct""#,
    );
    assert!(
        matches!(run.command_exit(), Some(code) if code != 0),
        "console:\n{}",
        run.console.concat()
    );
    assert_eq!(run.reason, ExitReason::Poweroff);
    assert_eq!(modified(), before, "the read-only image was written");
}

#[test]
fn sandbox_vmm_binary_boots_the_guest_from_a_json_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rootfs = rootfs_ro();
    let _one_at_a_time = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let console = dir.path().join("console.log");
    let config = serde_json::json!({
        "kernel": env_path("SANDBOX_KERNEL"),
        "cmdline_extra": "root=/dev/vda ro init=/sbin/sandbox-test-init sandbox_halt=reboot",
        "vcpus": 1,
        "memory_mib": MEMORY_MIB,
        "disks": [{ "path": rootfs, "read_only": true }],
        "console": { "path": console, "cap_bytes": 1 << 20 },
    });
    let vmm = std::env::var_os("SANDBOX_VMM").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_sandbox-vmm")),
        PathBuf::from,
    );
    let mut child = Command::new(vmm)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sandbox-vmm");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(config.to_string().as_bytes())
            .expect("write the config");
    }
    let status = child.wait().expect("wait for sandbox-vmm");
    let log = std::fs::read_to_string(&console).expect("console log");
    assert!(log.contains(READY), "console:\n{log}");
    assert_eq!(
        status.code(),
        Some(3),
        "reset is exit status 3; console:\n{log}"
    );
}
