//! KVM tier: the reference boot. QEMU `-M microvm -enable-kvm` boots the guest artifacts that
//! `cargo xtask guest` builds (`SANDBOX_KERNEL`, `SANDBOX_ROOTFS`) to the test init's marker, and
//! QEMU exits when the init halts the VM.
//!
//! This proves the artifacts and the harness before our VMM exists, and it is the yardstick our
//! VMM is measured against later (docs/bench.md): same kernel, same rootfs, same marker. The test
//! kills QEMU on every path (a guard), and every wait has a deadline, so a hung guest fails the test
//! instead of hanging the run.
#![cfg(sandbox_kvm)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The line the test init prints once userspace is up (docs/guest.md).
const READY_MARKER: &str = "sandbox-init: ready";
/// Hang guard for reaching the marker: generous, because the KVM tier may run under nested
/// emulation (the test host), where a boot takes seconds to tens of seconds.
const READY_DEADLINE: Duration = Duration::from_secs(300);
/// Hang guard for QEMU to exit once the test init has halted the VM.
const EXIT_DEADLINE: Duration = Duration::from_secs(120);

/// A path from the environment `cargo xtask test` sets up for the KVM tier.
fn env_path(name: &str) -> PathBuf {
    match std::env::var_os(name) {
        Some(p) => PathBuf::from(p),
        None => panic!("{name} is not set: run the KVM tier with `cargo xtask test`"),
    }
}

/// Kills and reaps QEMU when dropped, whatever path the test takes out.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the per-test scratch directory when dropped.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends each console line (stdout and stderr alike) into `tx` from a detached thread.
fn forward_lines(pipe: impl Read + Send + 'static, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if tx.send(line).is_err() {
                return;
            }
            buf.clear();
        }
    });
}

/// Waits for QEMU to exit, up to `deadline`.
fn wait_exit(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for QEMU: {e}"),
        }
    }
    None
}

#[test]
fn qemu_microvm_boots_the_guest_artifacts_to_the_test_init() {
    let kernel = env_path("SANDBOX_KERNEL");
    let rootfs = env_path("SANDBOX_ROOTFS");

    // The cached rootfs is read-only; the guest mounts its copy read-write.
    let scratch =
        ScratchDir(std::env::temp_dir().join(format!("qemu-reference-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).expect("create the scratch directory in TMPDIR");
    let disk = scratch.0.join("rootfs.ext4");
    let copy_started = Instant::now();
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(&rootfs)
        .arg(&disk)
        .status()
        .expect("run cp");
    assert!(
        copied.success(),
        "copying {} failed: {copied}",
        rootfs.display()
    );
    eprintln!(
        "qemu_reference: copied the rootfs in {:.1} s",
        copy_started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        // Without ACPI, QEMU appends `virtio_mmio.device=...` for each virtio-mmio device to the
        // kernel command line (as our VMM does); with ACPI it would describe them in the DSDT.
        .args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-smp", "1", "-m", "256"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&kernel)
        .args([
            "-append",
            // No ACPI means no power-off: the test init reboots instead (sandbox_halt=reboot), by
            // triple fault (reboot=t), and -no-reboot turns that into QEMU's exit.
            "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw init=/sbin/sandbox-test-init \
             sandbox_halt=reboot",
        ])
        .arg("-drive")
        .arg(drive_arg(&disk))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 (installed by `cargo xtask test`)");
    let mut qemu = Qemu(child);
    let (tx, rx) = mpsc::channel();
    forward_lines(qemu.0.stdout.take().expect("stdout is piped"), tx.clone());
    forward_lines(qemu.0.stderr.take().expect("stderr is piped"), tx);

    // Collect the console until the marker shows up; keep it for the failure message.
    let mut console = Vec::new();
    let mut ready_after = None;
    let until = Instant::now() + READY_DEADLINE;
    while ready_after.is_none() {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(READY_MARKER) {
                    ready_after = Some(started.elapsed());
                }
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            // QEMU closed its output: it exited before the marker.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let Some(ready_after) = ready_after else {
        let status = qemu.0.try_wait().ok().flatten();
        panic!(
            "no `{READY_MARKER}` within {} s (QEMU status: {status:?}); console:\n{}",
            READY_DEADLINE.as_secs(),
            console.join("\n")
        );
    };
    eprintln!(
        "qemu_reference: `{READY_MARKER}` after {:.2} s",
        ready_after.as_secs_f64()
    );

    // The test init halts the VM right after the marker (no sandbox_run= given); QEMU must exit.
    let status = wait_exit(&mut qemu.0, EXIT_DEADLINE);
    console.extend(rx.try_iter());
    let Some(status) = status else {
        panic!(
            "QEMU did not exit within {} s after the marker; console:\n{}",
            EXIT_DEADLINE.as_secs(),
            console.join("\n")
        );
    };
    assert!(
        status.success(),
        "QEMU exited with {status}; console:\n{}",
        console.join("\n")
    );
    eprintln!(
        "qemu_reference: QEMU exited after {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

/// The `-drive` option for a raw, writable root disk at `path`.
fn drive_arg(path: &Path) -> String {
    // QEMU splits options on commas; a comma in the path is written twice.
    let path = path.to_string_lossy().replace(',', ",,");
    format!("id=root,file={path},format=raw,if=none,cache=unsafe")
}
