//! `cargo xtask demo`: the main job, end to end (`examples/agent_task.rs`, docs/demo.md).
//!
//! 1. Guest artifacts: [`guest::ensure_artifacts`] (kernel, rootfs with the agent as
//!    `/sbin/init`), built if missing.
//! 2. Host tools the example uses on its side (`git`, `sqlite3`, `tar`), installed if missing.
//! 3. `sandbox-vmm` and the example, built with cargo.
//! 4. Where to run: directly if this machine's `/dev/kvm` boots Linux (the probe `cargo xtask
//!    test` caches), else inside the nested test host ([`crate::testhost`]), whose exit status
//!    becomes the demo's.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::test::KvmRunner;
use crate::testhost::{self, Flow};
use crate::{guest, util};

/// `cargo xtask demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo runs: `auto` uses the cached /dev/kvm probe of `cargo xtask test`
    /// (direct if it boots Linux; the nested test host otherwise or when there is no probe yet).
    #[arg(long, value_enum, default_value_t = KvmRunner::Auto)]
    runner: KvmRunner,
    /// Time limit in seconds for the run (test host boot included).
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    timeout: u64,
    /// vCPUs of the nested test host.
    #[arg(long, default_value_t = 2, value_name = "N")]
    testhost_cpus: u32,
    /// Memory of the nested test host in MiB (the sandbox's rootfs copy lives in its tmpfs).
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    testhost_mem: u64,
}

/// `cargo xtask demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let root = util::workspace_root();

    let t = Instant::now();
    let artifacts = guest::ensure_artifacts().context("building the guest artifacts")?;
    println!(
        "xtask demo: guest artifacts ready ({} ms): kernel {}, rootfs {}",
        t.elapsed().as_millis(),
        artifacts.kernel.display(),
        artifacts.rootfs.display()
    );

    let missing: Vec<&str> = [("git", "git"), ("sqlite3", "sqlite3"), ("tar", "tar")]
        .into_iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        util::apt_install(&missing)?;
    }

    let t = Instant::now();
    let target = target_dir(&root);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(&cargo)
            .args(["build", "-j2", "-p", "sandbox-kvm", "--bin", "sandbox-vmm"])
            .current_dir(&root),
    )?;
    util::run(
        Command::new(&cargo)
            .args([
                "build",
                "-j2",
                "-p",
                "sandbox-examples",
                "--example",
                "agent_task",
            ])
            .current_dir(&root),
    )?;
    let vmm = target.join("debug/sandbox-vmm");
    let example = target.join("debug/examples/agent_task");
    for p in [&vmm, &example] {
        if !p.is_file() {
            bail!("the build did not produce {}", p.display());
        }
    }
    println!(
        "xtask demo: built sandbox-vmm and the example ({} ms)",
        t.elapsed().as_millis()
    );

    let env = [
        ("SANDBOX_KERNEL", artifacts.kernel.clone()),
        ("SANDBOX_ROOTFS", artifacts.rootfs.clone()),
        ("SANDBOX_VMM", vmm.clone()),
    ];
    let (direct, why) = match args.runner {
        KvmRunner::Direct => (true, "--runner direct".to_string()),
        KvmRunner::Testhost => (false, "--runner testhost".to_string()),
        KvmRunner::Auto => crate::test::probe_kvm(&artifacts, false)?,
    };
    let timeout = Duration::from_secs(args.timeout);

    if direct {
        println!("xtask demo: running directly on this machine's /dev/kvm ({why})\n");
        let mut cmd = Command::new(&example);
        cmd.envs(env.iter().map(|(k, v)| (k, v.as_os_str())));
        let out = testhost::stream(&mut cmd, Some(timeout), &mut |l| {
            println!("{l}");
            Flow::Continue
        })?;
        println!(
            "\nxtask demo: finished in {} ms (total, builds included)",
            started.elapsed().as_millis()
        );
        if out.timed_out {
            bail!("the demo did not finish within {} s", timeout.as_secs());
        }
        if !out.status.success() {
            bail!("the demo failed: {}", out.status);
        }
        return Ok(());
    }

    println!("xtask demo: running inside the nested test host ({why})");
    let host = testhost::ensure()?;
    let scratch = target.join("testhost").join("demo");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let scratch = scratch.canonicalize()?;
    let script = script(&example, &env, &scratch);
    let config = testhost::RunConfig {
        cpus: args.testhost_cpus,
        mem_mib: args.testhost_mem,
        timeout,
        keep: vec![
            root.clone(),
            target.clone(),
            util::cache_dir(),
            artifacts.kernel.clone(),
            artifacts.rootfs.clone(),
        ],
    };
    let log = scratch.join("console.log");
    println!(
        "xtask demo: booting the test host ({}, {} vCPUs, {} MiB, TCG; console log {})\n",
        host.kernel_package,
        config.cpus,
        config.mem_mib,
        log.display()
    );
    let outcome = testhost::run(&host, &scratch, &script, &config, &log, &mut |l| {
        println!("{l}");
    })?;
    println!(
        "\nxtask demo: test host ran {} ms (boot to `testhost: ready`: {}); total {} ms",
        outcome.elapsed.as_millis(),
        outcome
            .ready_after
            .map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "never".into()),
        started.elapsed().as_millis()
    );
    testhost::check_outcome(&outcome, &config, &log).context("the demo failed")
}

/// The script the test host runs: the example with the artifacts' paths, its status saved.
fn script(example: &Path, env: &[(&str, PathBuf)], scratch: &Path) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = String::from("#!/bin/sh\n# Written by `cargo xtask demo` (xtask/src/demo.rs).\n");
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let _ = writeln!(s, "export PATH={}", q(&path));
    s.push_str("export TMPDIR=/tmp HOME=/root\n");
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", q(&v.to_string_lossy()));
    }
    let _ = writeln!(s, "cd /tmp && {}", q(&example.to_string_lossy()));
    let _ = writeln!(
        s,
        "rc=$?\necho \"$rc\" > {}\nexit \"$rc\"",
        q(&scratch.join("status").to_string_lossy())
    );
    s
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}
