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
/// Upper bound on a boot to the ready line, and again on the command after it: a boot takes
/// seconds even under nested TCG (about 10 s on a loaded 2-core machine). Both together stay well
/// inside the test host's 900 s for the whole binary, so a guest that hangs fails its own test,
/// with its console, and the other tests still run.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
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

/// What every thread of process `pid` is doing, from `/proc`: name, `wchan`, the syscall it is
/// in (`syscall`: number and arguments) and its kernel stack (root only). For the message of a
/// test that found something hung.
fn thread_dump(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(process {pid} is gone)");
    };
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let mut out = String::new();
    for task in tasks.filter_map(Result::ok) {
        let dir = task.path();
        out.push_str(&format!(
            "--- thread {} {:?}: wchan {:?}, syscall {:?}\n{}",
            task.file_name().to_string_lossy(),
            read(dir.join("comm")).trim(),
            read(dir.join("wchan")).trim(),
            read(dir.join("syscall")).trim(),
            read(dir.join("stack")),
        ));
    }
    out
}

/// Ends this test process with a dump of its threads and the console if it is still running
/// `limit` after it was armed: a hang inside the VMM (not in the guest, which the timeouts
/// cover) must show where it is, not just run into the test host's time limit.
struct Watchdog(std::sync::mpsc::Sender<()>);

impl Watchdog {
    fn arm(limit: Duration, what: &'static str, ring: Option<ConsoleRing>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "boot_linux: {what} still running after {} s: threads of this test \
                     process:\n{}\nconsole:\n{}",
                    limit.as_secs(),
                    thread_dump(std::process::id()),
                    ring.map(|r| r.lines().concat()).unwrap_or_default()
                );
                std::process::abort();
            }
        });
        Watchdog(tx)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A writable copy of the rootfs in a fresh temp dir.
fn rootfs_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir in TMPDIR");
    let copy = dir.path().join("rootfs.ext4");
    // 1 GiB over the test host's 9p share: 15-30 s.
    let _watchdog = Watchdog::arm(Duration::from_secs(300), "a rootfs copy", None);
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
    boot_disk(DiskConfig::new(rootfs, read_only), vcpus, extra)
}

/// [`boot`] with any disk as the root.
fn boot_disk(disk: DiskConfig, vcpus: u8, extra: &str) -> Run {
    let read_only = disk.read_only;
    let _one_at_a_time = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let log_dir = tempfile::tempdir().expect("temp dir");
    let mode = if read_only { "ro" } else { "rw" };
    let config = VmConfig::new(env_path("SANDBOX_KERNEL"))
        .vcpus(vcpus)
        .memory_mib(MEMORY_MIB)
        .disk(disk)
        .cmdline_extra(format!(
            "root=/dev/vda {mode} init=/sbin/sandbox-test-init {extra}"
        ))
        .console_file(log_dir.path().join("console.log"), 1 << 20);
    let ring = ConsoleRing::new(1 << 20);
    let resources = VmResources::try_from(config)
        .expect("valid config")
        .with_console_ring(ring.clone());
    // Both waits below, plus a minute for building and stopping the VM.
    let _watchdog = Watchdog::arm(
        2 * BOOT_TIMEOUT + Duration::from_secs(60),
        "a boot",
        Some(ring.clone()),
    );
    let mut vm = build(resources).expect("build the VM");
    vm.start().expect("start the VM");
    let started = std::time::Instant::now();
    let ready = ring.wait_for_line(READY, BOOT_TIMEOUT);
    let ready_after = started.elapsed();
    // Without the ready line the VM has had its time: do not wait for it again.
    let wait = if ready.is_some() {
        BOOT_TIMEOUT
    } else {
        Duration::ZERO
    };
    let ended = vm.wait_timeout(wait);
    let hung = ended.is_none();
    let reason = ended.unwrap_or_else(|| vm.stop());
    let console = ring.lines();
    assert!(
        ready.is_some(),
        "no `{READY}` on the console within {} s; VM ended with {reason}; console:\n{}",
        BOOT_TIMEOUT.as_secs(),
        console.concat()
    );
    assert!(
        !hung,
        "the VM was ready after {} ms but did not end within {} s (stopped); console:\n{}",
        ready_after.as_millis(),
        BOOT_TIMEOUT.as_secs(),
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
    // Each virtio-mmio window is declared once (DSDT): a second registration from the command
    // line would be refused with an error line that costs port exits at every boot.
    assert!(
        !run.console.concat().contains("virtio-mmio"),
        "console:\n{}",
        run.console.concat()
    );
}

#[test]
fn with_acpi_off_the_disk_comes_from_the_command_line() {
    // No DSDT: the devices are declared as `virtio_mmio.device=` words instead. Without ACPI
    // there is no S5 power-off, so the test init's reboot fallback ends the VM.
    let run = boot(
        &rootfs_ro(),
        true,
        1,
        r#"acpi=off sandbox_halt=reboot sandbox_run="test -b /dev/vda && echo vda-ok""#,
    );
    assert!(
        run.lines().contains(&"vda-ok"),
        "console:\n{}",
        run.console.concat()
    );
    assert_eq!(run.command_exit(), Some(0));
    assert_eq!(
        run.reason,
        ExitReason::Reset,
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
    let limit = std::time::Instant::now() + 2 * BOOT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sandbox-vmm") {
            break status;
        }
        if std::time::Instant::now() > limit {
            let dump = thread_dump(child.id());
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            panic!(
                "sandbox-vmm did not exit within {} s (killed); its threads:\n{dump}\nconsole:\n{log}",
                (2 * BOOT_TIMEOUT).as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(&console).expect("console log");
    assert!(log.contains(READY), "console:\n{log}");
    assert_eq!(
        status.code(),
        Some(3),
        "reset is exit status 3; console:\n{log}"
    );
}

/// A qcow2 overlay of the cached rootfs in a fresh temp dir, as big as the base.
fn overlay() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir in TMPDIR");
    let path = dir.path().join("disk.qcow2");
    let base = rootfs_ro();
    let size = std::fs::metadata(&base).expect("base").len();
    sandbox_fs::create_overlay(&path, &base, size).expect("create the overlay");
    // qemu-img finds the backing file by the name in the header, next to the overlay; the VMM
    // is given the base's path instead and never looks there.
    let name = base.file_name().expect("the base has a file name");
    std::os::unix::fs::symlink(&base, dir.path().join(name)).expect("symlink for qemu-img");
    (dir, path)
}

/// Size and modification time: the base must never change.
fn fingerprint(path: &Path) -> (u64, std::time::SystemTime) {
    let m = std::fs::metadata(path).expect("metadata");
    (m.len(), m.modified().expect("mtime"))
}

/// Bytes the overlay file holds on the host (its allocated blocks).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("metadata").blocks() * 512
}

/// `qemu-img check` of an overlay must be clean (exit 0), when qemu-img is installed.
fn qemu_img_check(overlay: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(overlay)
        .output();
    match out {
        Ok(out) => assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => panic!("qemu-img (apt package qemu-utils) must be installed: {err}"),
    }
}

#[test]
fn an_overlay_keeps_writes_across_boots_and_the_base_never_changes() {
    let base = rootfs_ro();
    let before = fingerprint(&base);
    let (_dir, disk) = overlay();
    let (_other_dir, other) = overlay();
    let first = boot_disk(
        DiskConfig::qcow2_overlay(&disk, &base, None),
        1,
        r#"sandbox_run="echo persisted-43 > /root/marker && sync""#,
    );
    assert_eq!(
        first.command_exit(),
        Some(0),
        "console:\n{}",
        first.console.concat()
    );
    assert_eq!(first.reason, ExitReason::Poweroff);
    let second = boot_disk(
        DiskConfig::qcow2_overlay(&disk, &base, None),
        1,
        r#"sandbox_run="cat /root/marker""#,
    );
    assert!(
        second.lines().contains(&"persisted-43"),
        "the write is gone after a reboot; console:\n{}",
        second.console.concat()
    );
    // A second overlay of the same base does not see the first one's writes.
    let neighbour = boot_disk(
        DiskConfig::qcow2_overlay(&other, &base, None),
        1,
        r#"sandbox_run="test ! -e /root/marker""#,
    );
    assert_eq!(
        neighbour.command_exit(),
        Some(0),
        "a sibling overlay sees the marker; console:\n{}",
        neighbour.console.concat()
    );
    assert_eq!(fingerprint(&base), before, "the base image changed");
    qemu_img_check(&disk);
}

#[test]
fn the_host_bytes_cap_gives_the_guest_an_io_error_and_the_vm_goes_on() {
    let base = rootfs_ro();
    let (dir, disk) = overlay();
    let count = dir.path().join("full.count");
    let cap = 16u64 << 20;
    // dd must fail part-way (EIO from the device); the shell goes on, writes a small file that
    // still fits, and the VM powers off normally.
    let run = boot_disk(
        DiskConfig::qcow2_overlay(&disk, &base, Some(cap)).with_full_report(&count),
        1,
        r#"sandbox_run="dd if=/dev/zero of=/root/big bs=1M count=64 oflag=direct; echo dd-status=$?; rm -f /root/big; echo still-here""#,
    );
    let lines = run.lines();
    let dd = lines
        .iter()
        .find_map(|l| l.strip_prefix("dd-status="))
        .unwrap_or_else(|| panic!("no dd status; console:\n{}", run.console.concat()));
    assert_ne!(
        dd.trim(),
        "0",
        "dd must fail at the cap; console:\n{}",
        run.console.concat()
    );
    assert!(
        lines.contains(&"still-here"),
        "console:\n{}",
        run.console.concat()
    );
    assert_eq!(
        run.reason,
        ExitReason::Poweroff,
        "console:\n{}",
        run.console.concat()
    );
    let len = std::fs::metadata(&disk).expect("overlay").len();
    assert!(
        len <= cap + (256 << 10),
        "the overlay grew to {len} bytes past its cap of {cap}"
    );
    let refused = u64::from_le_bytes(
        std::fs::read(&count).expect("the count file")[..8]
            .try_into()
            .expect("8 bytes"),
    );
    assert!(refused > 0, "the VMM counted no refused write");
    qemu_img_check(&disk);
}

#[test]
fn fstrim_in_the_guest_gives_space_back_to_the_host() {
    let base = rootfs_ro();
    let (_dir, disk) = overlay();
    let write = boot_disk(
        DiskConfig::qcow2_overlay(&disk, &base, None),
        1,
        r#"sandbox_run="dd if=/dev/urandom of=/root/blob bs=1M count=32 && sync""#,
    );
    assert_eq!(
        write.command_exit(),
        Some(0),
        "console:\n{}",
        write.console.concat()
    );
    let full = allocated(&disk);
    let trim = boot_disk(
        DiskConfig::qcow2_overlay(&disk, &base, None),
        1,
        r#"sandbox_run="rm /root/blob && sync && fstrim -v /""#,
    );
    assert_eq!(
        trim.command_exit(),
        Some(0),
        "console:\n{}",
        trim.console.concat()
    );
    let after = allocated(&disk);
    assert!(
        after + (16 << 20) < full,
        "fstrim gave back too little: {full} -> {after} bytes allocated; console:\n{}",
        trim.console.concat()
    );
    qemu_img_check(&disk);
}
