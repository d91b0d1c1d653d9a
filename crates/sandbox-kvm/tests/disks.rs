//! KVM tier: copy-on-write root disks through the runtime (docs/disks.md, docs/images.md). Two
//! sandboxes from one base do not see each other's writes; the spec's disk size reaches the
//! guest; the spec's cap gives the guest an I/O error, is counted in `disk_usage`, and the sandbox
//! keeps answering; a base imported into the image store and named by tag boots; and after
//! `kill -9` of a VMM in the middle of writes, `qemu-img check` finds no corruption.
#![cfg(sandbox_kvm)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sandbox_core::{ExecRequest, RootMode, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

fn env_path(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("{var} is not set: the KVM tier gets it from `cargo xtask test`"),
    }
}

fn runtime(state: &Path, store: &Path) -> KvmRuntime {
    KvmRuntime::new(
        KvmRuntimeConfig::builder()
            .vmm(env_path("SANDBOX_VMM"))
            .kernel(env_path("SANDBOX_KERNEL"))
            .rootfs(env_path("SANDBOX_ROOTFS"))
            .state_dir(state)
            .image_store(store)
            .create_deadline(Duration::from_secs(600))
            .build()
            .expect("config"),
    )
    .expect("KvmRuntime::new")
}

async fn sh(sb: &impl Sandbox, cmd: &str) -> (Option<i32>, String) {
    let out = sb.exec(ExecRequest::shell(cmd)).await.expect("exec");
    (
        out.status.code,
        format!("{}{}", out.stdout_str(), out.stderr_str()),
    )
}

/// `qemu-img check` of `overlay` over `base`, given explicitly (the header only names the
/// base's file). Returns the exit status: 0 clean, 3 leaked clusters only, 2 corruption.
fn qemu_img_check(overlay: &Path, base: &Path) -> (i32, String) {
    let opts = format!(
        "driver=qcow2,file.filename={},backing.driver=raw,backing.file.filename={}",
        overlay.display(),
        base.display()
    );
    let out = Command::new("qemu-img")
        .args(["check", "--image-opts", &opts])
        .output()
        .expect("qemu-img (apt package qemu-utils) must be installed");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlays_through_the_runtime() {
    let state = tempfile::Builder::new()
        .prefix("sbx-disks-")
        .tempdir()
        .expect("state");
    let store = tempfile::tempdir().expect("store");
    let rt = runtime(state.path(), store.path());
    let started = std::time::Instant::now();
    let step = |what: &str| println!("disks: {what} at {:.1} s", started.elapsed().as_secs_f64());
    let writable = || rt.spec_builder().memory_mib(256).root(RootMode::Writable);

    // Two sandboxes from one base: neither sees the other's writes.
    let a = rt
        .create_sandbox(writable().build().expect("spec"))
        .await
        .expect("create a");
    let b = rt
        .create_sandbox(writable().build().expect("spec"))
        .await
        .expect("create b");
    assert_eq!(sh(&a, "echo from-a > /root/mine && sync").await.0, Some(0));
    assert_eq!(sh(&b, "echo from-b > /root/mine && sync").await.0, Some(0));
    assert_eq!(sh(&a, "cat /root/mine").await.1.trim(), "from-a");
    assert_eq!(sh(&b, "cat /root/mine").await.1.trim(), "from-b");
    a.destroy().await.expect("destroy");
    b.destroy().await.expect("destroy");

    step("two sandboxes from one base done");
    // The disk size and the cap from the spec.
    let sb = rt
        .create_sandbox(
            writable()
                .disk_size_mib(2048)
                .disk_cap_mib(16)
                .build()
                .expect("spec"),
        )
        .await
        .expect("create with a size and a cap");
    let (_, sectors) = sh(&sb, "cat /sys/block/vda/size").await;
    assert_eq!(
        sectors.trim(),
        (2048u64 * 2048).to_string(),
        "the guest's disk size"
    );
    let before = sb.disk_usage().expect("usage").expect("an overlay");
    assert_eq!(before.cap_bytes, Some(16 << 20));
    assert_eq!(before.refused_writes, 0);
    let (code, out) = sh(
        &sb,
        "dd if=/dev/urandom of=/root/big bs=1M count=64 oflag=direct",
    )
    .await;
    assert_ne!(code, Some(0), "dd must fail at the cap: {out}");
    let after = sb.disk_usage().expect("usage").expect("an overlay");
    assert!(after.refused_writes > 0, "{after:?}");
    assert!(after.file_bytes <= (16 << 20) + (256 << 10), "{after:?}");
    // After refused writes ext4 may have remounted itself read-only (errors=remount-ro, when
    // a journal write was among the refused ones), so `rm` may fail: what matters is that the
    // guest still answers.
    let (code, out) = sh(&sb, "rm -f /root/big 2>/dev/null; echo still-answering").await;
    assert_eq!((code, out.trim()), (Some(0), "still-answering"));
    sb.destroy().await.expect("destroy");

    step("size and cap done");
    // A base from the image store, named by tag.
    let images = sandbox_fs::ImageStore::open(store.path()).expect("store");
    let image = images
        .import_raw(&env_path("SANDBOX_ROOTFS"))
        .expect("import the rootfs");
    images.tag("test-base", &image.digest).expect("tag");
    step("rootfs imported into the store");
    let sb = rt
        .create_sandbox(writable().image("test-base").build().expect("spec"))
        .await
        .expect("create from the store");
    let (code, out) = sh(&sb, "grep -c . /etc/os-release").await;
    assert_eq!(code, Some(0), "{out}");
    sb.destroy().await.expect("destroy");
    let err = rt
        .create_sandbox(writable().image("no-such-tag").build().expect("spec"))
        .await
        .expect_err("an unknown tag");
    assert_eq!(err.kind(), sandbox_core::ErrorKind::InvalidSpec, "{err}");

    step("store image done");
    // kill -9 in the middle of writes: no corruption (leaked clusters at most, docs/disks.md).
    let sb = rt
        .create_sandbox(writable().build().expect("spec"))
        .await
        .expect("create");
    let overlay = sb.dir().join("disk.qcow2");
    let writer = sb.exec(ExecRequest::shell(
        "for i in $(seq 200); do dd if=/dev/urandom of=/root/f$i bs=256k count=4 2>/dev/null; done",
    ));
    let pid = sb.vmm_pid();
    let killer = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
    };
    let (_, ()) = tokio::join!(writer, killer);
    let (status, report) = qemu_img_check(&overlay, &env_path("SANDBOX_ROOTFS"));
    assert!(
        status == 0 || status == 3,
        "qemu-img check after kill -9: {status}\n{report}"
    );
    assert!(
        report.contains("No errors were found") || !report.contains("ERROR"),
        "{report}"
    );
    sb.destroy().await.expect("destroy after kill -9");
    step("kill -9 done");
}
