//! `cargo xtask run`: runs an example or any program of the caller's where KVM boots Linux.
//!
//! A program that creates sandboxes needs `sandbox-vmm`, the guest artifacts and a `/dev/kvm`
//! that boots Linux. On a machine whose `/dev/kvm` cannot (nested micro-VMs, docs/testing.md),
//! this runs the program inside the nested test host instead, with the same environment:
//!
//! 1. Guest artifacts ([`guest::ensure_artifacts`]) and `sandbox-vmm` (cargo build).
//! 2. With `--example NAME`, the example from `examples/` (cargo build); otherwise the program
//!    named after `--`, resolved on `PATH` or as a path.
//! 3. Where: directly if the cached `/dev/kvm` probe of `cargo xtask test` says it boots Linux,
//!    else in the test host. The program gets `SANDBOX_VMM`, `SANDBOX_KERNEL` and
//!    `SANDBOX_ROOTFS`, which `KvmRuntimeConfig::default()` reads, and its exit status becomes
//!    this command's.
//!
//! Inside the test host this machine's filesystem is visible read-only at the same paths;
//! `/tmp` is a writable tmpfs (it starts empty) and the program runs in the caller's working
//! directory.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::test::KvmRunner;
use crate::testhost::{self, Flow};
use crate::{guest, util};

/// Where and how long a program may run (`cargo xtask run` and `cargo xtask demo`).
#[derive(Debug, Clone, clap::Args)]
pub struct RunnerArgs {
    /// Where to run: `auto` uses the cached /dev/kvm probe of `cargo xtask test` (direct if it
    /// boots Linux; the nested test host otherwise).
    #[arg(long, value_enum, default_value_t = KvmRunner::Auto)]
    pub runner: KvmRunner,
    /// Time limit in seconds for the run (test host boot included).
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    pub timeout: u64,
    /// vCPUs of the nested test host.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub testhost_cpus: u32,
    /// Memory of the nested test host in MiB (sandboxes' rootfs copies live in its tmpfs).
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    pub testhost_mem: u64,
}

/// `cargo xtask run` options.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Build and run this example of `examples/` (e.g. `quickstart`).
    #[arg(long, value_name = "NAME")]
    pub example: Option<String>,
    #[command(flatten)]
    pub runner: RunnerArgs,
    /// The program and its arguments (after `--`); with `--example`, the example's arguments.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `cargo xtask run`.
pub fn run(args: RunArgs) -> Result<()> {
    let root = util::workspace_root();
    let (program, argv) = match &args.example {
        Some(name) => (build_example(&root, name)?, args.command.clone()),
        None => {
            let Some((first, rest)) = args.command.split_first() else {
                bail!(
                    "nothing to run: give `--example NAME` or a program after `--`, e.g. \
                     `cargo xtask run -- ./target/debug/my-agent-platform --flag`"
                );
            };
            (resolve_program(first)?, rest.to_vec())
        }
    };
    let scratch = execute("run", &program, &argv, &args.runner)?;
    let _ = fs::remove_dir_all(scratch);
    Ok(())
}

/// Builds `examples/<name>.rs` (package `sandbox-examples`) and returns the binary.
pub fn build_example(root: &Path, name: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(&cargo)
            .args(["build", "-p", "sandbox-examples", "--example", name])
            .current_dir(root),
    )
    .with_context(|| format!("building the example {name:?} (see examples/Cargo.toml)"))?;
    let exe = target_dir(root).join("debug/examples").join(name);
    if !exe.is_file() {
        bail!("the build did not produce {}", exe.display());
    }
    Ok(exe)
}

/// A program named on the command line: a path (absolute or relative to the working
/// directory) or a name on `PATH`, made absolute.
fn resolve_program(name: &str) -> Result<PathBuf> {
    let as_path = Path::new(name);
    let found = if name.contains('/') {
        Some(as_path.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
    };
    let found = found
        .filter(|p| p.is_file())
        .with_context(|| format!("no program {name:?} (neither a file nor on PATH)"))?;
    fs::canonicalize(&found).with_context(|| format!("resolving {}", found.display()))
}

/// Builds `sandbox-vmm` and the guest artifacts, then runs `program argv...` with the
/// environment a `KvmRuntimeConfig::default()` reads, directly or in the nested test host.
/// `label` names the caller in messages (`run`, `demo`, `soak`).
///
/// The program also gets `SANDBOX_SCRATCH`, a directory it may write that this machine can read
/// afterwards (the test host's only writable share); it is returned, and the caller removes it.
pub fn execute(label: &str, program: &Path, argv: &[String], opts: &RunnerArgs) -> Result<PathBuf> {
    let started = Instant::now();
    let root = util::workspace_root();

    let t = Instant::now();
    let artifacts = guest::ensure_artifacts().context("building the guest artifacts")?;
    println!(
        "xtask {label}: guest artifacts ready ({} ms): kernel {}, rootfs {}",
        t.elapsed().as_millis(),
        artifacts.kernel.display(),
        artifacts.rootfs.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    util::run(
        Command::new(&cargo)
            .args(["build", "-p", "sandbox-vmm", "--bin", "sandbox-vmm"])
            .current_dir(&root),
    )?;
    let target = target_dir(&root);
    let vmm = target.join("debug/sandbox-vmm");
    if !vmm.is_file() {
        bail!("the build did not produce {}", vmm.display());
    }

    let scratch = target
        .join("testhost")
        .join(format!("{label}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let scratch = scratch.canonicalize()?;
    // The caller's own SANDBOX_* variables win over what was built here (said, not silent).
    let user = |var: &str, built: PathBuf| match std::env::var_os(var) {
        Some(v) if !v.is_empty() => {
            println!(
                "xtask {label}: {var}={} from the environment (instead of {})",
                v.to_string_lossy(),
                built.display()
            );
            PathBuf::from(v)
        }
        _ => built,
    };
    let mut env = vec![
        (
            "SANDBOX_KERNEL",
            user("SANDBOX_KERNEL", artifacts.kernel.clone()),
        ),
        (
            "SANDBOX_ROOTFS",
            user("SANDBOX_ROOTFS", artifacts.rootfs.clone()),
        ),
        ("SANDBOX_VMM", user("SANDBOX_VMM", vmm.clone())),
        ("SANDBOX_SCRATCH", scratch.clone()),
    ];
    for var in ["SANDBOX_STATE_DIR", "SANDBOX_IMAGE_STORE"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            println!(
                "xtask {label}: {var}={} from the environment",
                v.to_string_lossy()
            );
            env.push((var, PathBuf::from(v)));
        }
    }
    let (direct, why) = match opts.runner {
        KvmRunner::Direct => (true, "--runner direct".to_string()),
        KvmRunner::Testhost => (false, "--runner testhost".to_string()),
        KvmRunner::Auto => crate::test::probe_kvm(&artifacts, false)?,
    };
    let timeout = Duration::from_secs(opts.timeout);
    let cwd = std::env::current_dir().context("reading the working directory")?;

    if direct {
        println!("xtask {label}: running directly on this machine's /dev/kvm ({why})\n");
        let mut cmd = Command::new(program);
        cmd.args(argv).current_dir(&cwd);
        cmd.envs(env.iter().map(|(k, v)| (k, v.as_os_str())));
        let out = testhost::stream(&mut cmd, Some(timeout), &mut |l| {
            println!("{l}");
            Flow::Continue
        })?;
        println!(
            "\nxtask {label}: finished in {} ms (total, builds included)",
            started.elapsed().as_millis()
        );
        if out.timed_out {
            bail!(
                "{} did not finish within {} s",
                program.display(),
                timeout.as_secs()
            );
        }
        if !out.status.success() {
            bail!("{} failed: {}", program.display(), out.status);
        }
        return Ok(scratch);
    }

    println!("xtask {label}: running inside the nested test host ({why})");
    // The test host's root is this machine's, read-only; its only writable places are tmpfs
    // (and the scratch share). Unless the caller chose, state and images go to tmpfs there
    // (the runtime warns that overlays then live in memory: the test host has no disk).
    for (var, dir) in [
        ("SANDBOX_STATE_DIR", "/run/sandbox-sdk"),
        ("SANDBOX_IMAGE_STORE", "/tmp/sandbox-sdk-images"),
    ] {
        if !env.iter().any(|(k, _)| *k == var) {
            env.push((var, PathBuf::from(dir)));
        }
    }
    let host = testhost::ensure()?;
    let script = script(label, program, argv, &cwd, &env, &scratch);
    let mut keep = vec![
        root.clone(),
        target.clone(),
        util::cache_dir(),
        artifacts.kernel.clone(),
        artifacts.rootfs.clone(),
        cwd.clone(),
    ];
    keep.push(program.to_path_buf());
    let config = testhost::RunConfig {
        cpus: opts.testhost_cpus,
        mem_mib: opts.testhost_mem,
        timeout,
        keep,
    };
    let log = scratch.join("console.log");
    println!(
        "xtask {label}: booting the test host ({}, {}, {} vCPUs, {} MiB, TCG; console log {})\n",
        host.kernel_package,
        host.qemu,
        config.cpus,
        config.mem_mib,
        log.display()
    );
    let outcome = testhost::run(&host, &scratch, &script, &config, &log, &mut |l| {
        println!("{l}");
    })?;
    println!(
        "\nxtask {label}: test host ran {} ms (QEMU start to `testhost: ready`: {}, by this \
         machine's clock; the `ready after` line above is the test host kernel's own clock); \
         total {} ms",
        outcome.elapsed.as_millis(),
        outcome
            .ready_after
            .map(|d| format!("{} ms", d.as_millis()))
            .unwrap_or_else(|| "never".into()),
        started.elapsed().as_millis()
    );
    testhost::check_outcome(&outcome, &config, &log)
        .with_context(|| format!("{} failed in the test host", program.display()))?;
    Ok(scratch)
}

/// The script the test host runs: the program with the artifacts' paths, its status saved.
fn script(
    label: &str,
    program: &Path,
    argv: &[String],
    cwd: &Path,
    env: &[(&str, PathBuf)],
    scratch: &Path,
) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut s = format!("#!/bin/sh\n# Written by `cargo xtask {label}` (xtask/src/run.rs).\n");
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let _ = writeln!(s, "export PATH={}", q(&path));
    s.push_str("export TMPDIR=/tmp HOME=/root\n");
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", q(&v.to_string_lossy()));
    }
    let mut cmd = q(&program.to_string_lossy());
    for a in argv {
        cmd.push(' ');
        cmd.push_str(&q(a));
    }
    let _ = writeln!(s, "cd {} && {cmd}", q(&cwd.to_string_lossy()));
    let _ = writeln!(
        s,
        "rc=$?\necho \"$rc\" > {}\nexit \"$rc\"",
        q(&scratch.join("status").to_string_lossy())
    );
    s
}

fn target_dir(root: &Path) -> PathBuf {
    let t = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if t.is_absolute() {
        t
    } else {
        root.join(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_runs_the_program_in_the_working_directory_with_the_artifacts() {
        let s = script(
            "run",
            Path::new("/w/target/debug/examples/quickstart"),
            &["it's".into(), "b".into()],
            Path::new("/w"),
            &[("SANDBOX_VMM", PathBuf::from("/w/target/debug/sandbox-vmm"))],
            Path::new("/w/target/testhost/run-1"),
        );
        assert!(
            s.contains("export SANDBOX_VMM='/w/target/debug/sandbox-vmm'\n"),
            "{s}"
        );
        assert!(
            s.contains("cd '/w' && '/w/target/debug/examples/quickstart' 'it'\\''s' 'b'\n"),
            "{s}"
        );
        assert!(s.ends_with("echo \"$rc\" > '/w/target/testhost/run-1/status'\nexit \"$rc\"\n"));
    }

    #[test]
    fn programs_resolve_on_path_or_as_paths() {
        assert!(resolve_program("sh").expect("sh is on PATH").is_absolute());
        assert!(resolve_program("no-such-program-here").is_err());
        assert!(resolve_program("./no/such/file").is_err());
    }
}
