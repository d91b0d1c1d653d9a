//! `cargo xtask bench boot`: our VMM against QEMU `-M microvm`, side by side in one run.
//!
//! 1. Build `sandbox-vmm` (release) and the guest artifacts; install QEMU (Debian's
//!    `qemu-system-x86`).
//! 2. Decide where the VMs run: directly, if this machine's `/dev/kvm` boots Linux (the cached
//!    probe of `cargo xtask test`, else a QEMU boot of our own), or else inside the nested test host
//!    ([`crate::testhost`]), which runs this same binary as `bench boot --inner <results.json>`.
//! 3. The runs ([`measure`]): copy kernel and rootfs to `TMPDIR` once, then boot each VMM in turn
//!    (warm-ups first, then alternating, the order flipped every round), timing spawn → the init's
//!    `sandbox-init: ready` line on the console pipe and sampling `/proc/<pid>/smaps` at that line.
//! 4. The report ([`report`]): raw runs into `target/bench/boot-<date>.json`, medians and the
//!    ours/QEMU ratios against the promise into `docs/SPEC.md`. Nothing asserts on time: the
//!    command fails only if the runs themselves fail.
//!
//! `cargo xtask bench create` (writable roots: overlay against copy) is in [`create`];
//! `cargo xtask bench net` (sandbox networks against no VM) in [`net`].

mod create;
mod example;
mod measure;
mod net;
mod report;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::testhost;
use crate::{guest, util};
use measure::{BootSetup, Vmm};
use report::{BootReport, Run};

/// Environment facts for the report, in order: (what, value).
type Environment = Vec<(String, String)>;

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCmd {
    /// Boot time and VMM memory: sandbox-vmm against QEMU -M microvm (docs/bench.md).
    Boot(BootArgs),
    /// Create time of a writable root: qcow2 overlay against a full copy, overlay creation
    /// alone, and the warm exec round trip (examples/create_bench.rs; docs/bench.md).
    Create(create::CreateArgs),
    /// Sandbox networks: guest throughput, exposed-port round trip and the create time a
    /// network adds, each against the same without a VM (examples/net_bench.rs; docs/bench.md).
    Net(net::NetArgs),
}

/// Where the VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runner {
    /// Directly if this machine's /dev/kvm boots Linux, else in the nested test host.
    Auto,
    /// On this machine's /dev/kvm.
    Direct,
    /// In the nested test host (QEMU/TCG with emulated SVM).
    Testhost,
}

/// `cargo xtask bench boot` options.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// Measured boots per VMM.
    #[arg(long, default_value_t = 10, value_name = "N")]
    runs: usize,
    /// Unmeasured warm-up boots per VMM first (page cache, lazily built state).
    #[arg(long, default_value_t = 1, value_name = "N")]
    warmup: usize,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    memory_mib: u32,
    /// Where the VMs run.
    #[arg(long, value_enum, default_value_t = Runner::Auto)]
    runner: Runner,
    /// Limit for one boot to reach the marker, and again for it to exit, seconds.
    #[arg(long, default_value_t = 180, value_name = "SECS")]
    run_timeout: u64,
    /// vCPUs of the nested test host.
    #[arg(long, default_value_t = 2, value_name = "N")]
    testhost_cpus: u32,
    /// Memory of the nested test host, MiB (holds a copy of the rootfs in its tmpfs).
    #[arg(long, default_value_t = 3072, value_name = "MIB")]
    testhost_mem: u64,
    /// Do not rewrite docs/SPEC.md (the results file is still written).
    #[arg(long)]
    no_spec: bool,
    /// Internal: measure here and write the results JSON to this path (what the test host runs).
    #[arg(long, hide = true, value_name = "PATH")]
    inner: Option<PathBuf>,
    /// Internal (with --inner): the guest kernel.
    #[arg(long, hide = true, requires = "inner")]
    kernel: Option<PathBuf>,
    /// Internal (with --inner): the guest rootfs.
    #[arg(long, hide = true, requires = "inner")]
    rootfs: Option<PathBuf>,
    /// Internal (with --inner): the sandbox-vmm binary.
    #[arg(long, hide = true, requires = "inner")]
    vmm: Option<PathBuf>,
}

/// `cargo xtask bench ...`.
pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(args) => match args.inner.clone() {
            Some(out) => inner(&args, &out),
            None => boot(&args),
        },
        BenchCmd::Create(args) => create::run(args),
        BenchCmd::Net(args) => net::run(args),
    }
}

/// Whether the VMs run directly here, and why.
fn choose_runner(args: &BootArgs, artifacts: &guest::GuestArtifacts) -> Result<(bool, String)> {
    match args.runner {
        Runner::Direct => return Ok((true, "--runner direct".into())),
        Runner::Testhost => return Ok((false, "--runner testhost".into())),
        Runner::Auto => {}
    }
    // The same probe as `cargo xtask test` (one QEMU -enable-kvm boot, cached per host and kernel).
    crate::test::probe_kvm(artifacts, false)
}

fn target_dir() -> PathBuf {
    let root = util::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    if target.is_absolute() {
        target
    } else {
        root.join(target)
    }
}

fn bench_dir() -> PathBuf {
    target_dir().join("bench")
}

fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// Builds `sandbox-vmm` in release mode (`-j2`: the build machines are shared) and returns it.
fn build_vmm() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask bench: building sandbox-vmm (release)");
    util::run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "-j2",
                "-p",
                "sandbox-vmm",
                "--bin",
                "sandbox-vmm",
            ])
            .current_dir(util::workspace_root()),
    )?;
    let vmm = target_dir().join("release").join("sandbox-vmm");
    if !vmm.is_file() {
        bail!("the release build produced no {}", vmm.display());
    }
    Ok(vmm)
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn first_line(cmd: &mut Command) -> String {
    util::output(cmd)
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The outer command: build, decide where to run, run, report.
fn boot(args: &BootArgs) -> Result<()> {
    let started = Instant::now();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    testhost::ensure_qemu()?;
    let artifacts = match (
        std::env::var_os("SANDBOX_KERNEL"),
        std::env::var_os("SANDBOX_ROOTFS"),
    ) {
        (Some(kernel), Some(rootfs)) => guest::GuestArtifacts {
            kernel: fs::canonicalize(&kernel)
                .with_context(|| format!("SANDBOX_KERNEL={}", kernel.to_string_lossy()))?,
            rootfs: fs::canonicalize(&rootfs)
                .with_context(|| format!("SANDBOX_ROOTFS={}", rootfs.to_string_lossy()))?,
        },
        _ => guest::ensure_artifacts().context("building the guest artifacts")?,
    };
    let vmm = build_vmm()?;
    // Hashed now: the guest cache may prune an entry while the runs go on.
    let kernel_sha = util::sha256_file(&artifacts.kernel)?;
    let rootfs_sha = util::sha256_file(&artifacts.rootfs)?;
    let vmm_sha = util::sha256_file(&vmm)?;
    let vmm_commit = first_line(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(util::workspace_root()),
    );
    let (direct, why) = choose_runner(args, &artifacts)?;
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?
        .trim()
        .to_string();
    let bench = bench_dir();
    fs::create_dir_all(&bench)?;

    let mut env: Environment = Vec::new();
    env.push((
        "build machine".into(),
        format!(
            "Linux {}, {} ({} CPUs), load average {} at the start",
            kernel_release(),
            cpu_model(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            loadavg()
        ),
    ));
    let inner_env: Environment;
    let runs: Vec<Run>;
    if direct {
        println!("xtask bench: running directly on this machine's /dev/kvm: {why}");
        env.push(("where the VMs ran".into(), format!("directly ({why})")));
        let work = fresh_dir(&bench.join("boot-run"))?;
        let (r, e) = measure_all(
            args,
            &artifacts.kernel,
            &artifacts.rootfs,
            &vmm,
            &work,
            &mut |_, _| {},
        )?;
        runs = r;
        inner_env = e;
    } else {
        println!("xtask bench: running in the nested test host: {why}");
        let host = testhost::ensure()?;
        env.push((
            "where the VMs ran".into(),
            format!(
                "nested: KVM inside the test host (QEMU/TCG `-cpu EPYC,+svm,+npt`, {} vCPUs, \
                 {} MiB, kernel {}) on this machine ({why})",
                args.testhost_cpus, args.testhost_mem, host.kernel_package
            ),
        ));
        let scratch = fresh_dir(&bench.join("testhost-run"))?;
        let results = scratch.join("results.json");
        let exe = std::env::current_exe().context("finding the xtask binary")?;
        let mut script = String::from(
            "#!/bin/sh\n# Written by `cargo xtask bench boot` (xtask/src/bench.rs).\n",
        );
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let _ = writeln!(script, "export PATH={}", sh_quote(&path));
        script.push_str("export TMPDIR=/tmp\n");
        // KVM's per-VM exit counters live in debugfs.
        script.push_str("mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n");
        let mut line = format!("exec {} bench boot", sh_quote(&exe.to_string_lossy()));
        for (flag, value) in [
            ("--inner", results.to_string_lossy().into_owned()),
            ("--kernel", artifacts.kernel.to_string_lossy().into_owned()),
            ("--rootfs", artifacts.rootfs.to_string_lossy().into_owned()),
            ("--vmm", vmm.to_string_lossy().into_owned()),
            ("--runs", args.runs.to_string()),
            ("--warmup", args.warmup.to_string()),
            ("--vcpus", args.vcpus.to_string()),
            ("--memory-mib", args.memory_mib.to_string()),
            ("--run-timeout", args.run_timeout.to_string()),
        ] {
            let _ = write!(line, " {flag} {}", sh_quote(&value));
        }
        script.push_str(&line);
        script.push('\n');
        let boots = (args.runs + args.warmup) as u64 * 2;
        let config = testhost::RunConfig {
            cpus: args.testhost_cpus,
            mem_mib: args.testhost_mem,
            // Test host boot and guest copy, then about 60 s per boot: a normal one takes 3-15 s,
            // so a few that hit their own limits still fit; a wedged test host does not linger.
            timeout: Duration::from_secs(600 + boots * 60),
            keep: vec![
                util::workspace_root(),
                target_dir(),
                util::cache_dir(),
                artifacts.kernel.clone(),
                artifacts.rootfs.clone(),
                exe.clone(),
                vmm.clone(),
            ],
        };
        let log = scratch.join("console.log");
        println!(
            "xtask bench: booting the test host ({}, {} vCPUs, {} MiB; console log {})",
            host.kernel_package,
            config.cpus,
            config.mem_mib,
            log.display()
        );
        let outcome = testhost::run(&host, &scratch, &script, &config, &log, &mut |l| {
            if l.starts_with("xtask bench") || l.starts_with("testhost:") {
                println!("{l}");
            }
        })?;
        testhost::check_outcome(&outcome, &config, &log).with_context(|| {
            format!(
                "the benchmark in the test host did not finish; the runs it did are in {}",
                partial_path(&results).display()
            )
        })?;
        let text = fs::read_to_string(&results)
            .with_context(|| format!("reading the test host's results {}", results.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)?;
        runs = report::runs_from_json(&value)?;
        inner_env = value["environment"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
            .collect();
    }
    env.extend(inner_env);
    env.push((
        "guest kernel".into(),
        format!("{} (sha256 {})", artifacts.kernel.display(), kernel_sha),
    ));
    env.push((
        "guest rootfs".into(),
        format!("{} (sha256 {})", artifacts.rootfs.display(), rootfs_sha),
    ));
    env.push((
        "sandbox-vmm".into(),
        format!(
            "release build at commit {} (sha256 {})",
            vmm_commit, vmm_sha
        ),
    ));
    env.push((
        "settings".into(),
        format!(
            "{} vCPU, {} MiB, {} measured + {} warm-up boots per VMM, alternating",
            args.vcpus, args.memory_mib, args.runs, args.warmup
        ),
    ));

    let command = {
        let mut c = String::from("cargo xtask bench boot");
        if args.runs != 10 {
            let _ = write!(c, " --runs {}", args.runs);
        }
        if args.runner != Runner::Auto {
            let _ = write!(c, " --runner {:?}", args.runner);
        }
        c.to_lowercase()
    };
    let report = BootReport {
        date: date.clone(),
        environment: env,
        command,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        runs,
    };
    let results_file = bench.join(format!("boot-{}.json", date.replace(':', "")));
    fs::write(
        &results_file,
        serde_json::to_string_pretty(&report.to_json())? + "\n",
    )?;
    let rel = results_file
        .strip_prefix(util::workspace_root())
        .unwrap_or(&results_file)
        .display()
        .to_string();
    // Committed docs hold no path of one machine: the cache and the checkout become placeholders.
    let section = util::portable_paths(&report.spec_section(&rel));
    println!("\n{section}");
    if !args.no_spec {
        let spec_path = util::workspace_root().join("docs/SPEC.md");
        let spec =
            fs::read_to_string(&spec_path).unwrap_or_else(|_| report::SPEC_TEMPLATE.to_string());
        fs::write(&spec_path, report::update_spec(&spec, &section)?)?;
        println!("xtask bench: wrote {}", spec_path.display());
    }
    println!(
        "xtask bench: raw runs in {} ({:.0} s in all)",
        results_file.display(),
        started.elapsed().as_secs_f64()
    );
    let (ours, qemu) = (
        report::summarize(&report.runs, Vmm::Ours),
        report::summarize(&report.runs, Vmm::Qemu),
    );
    if ours.marker_ms.is_none() || qemu.marker_ms.is_none() {
        bail!("a VMM never reached the marker; see the per-run logs");
    }
    Ok(())
}

/// The inner command (in the test host, or called directly): measure and write the JSON.
fn inner(args: &BootArgs, out: &Path) -> Result<()> {
    let (Some(kernel), Some(rootfs), Some(vmm)) = (&args.kernel, &args.rootfs, &args.vmm) else {
        bail!("--inner needs --kernel, --rootfs and --vmm");
    };
    let work = out
        .parent()
        .context("the results path has a parent")?
        .join("boot-run");
    fresh_dir(&work)?;
    let write = |runs: &[Run], env: &Environment, path: &Path| -> Result<()> {
        let report = BootReport {
            date: String::new(),
            environment: env.clone(),
            command: String::new(),
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            runs: runs.to_vec(),
        };
        let mut value = report.to_json();
        // Ordered pairs, so that the outer report keeps the order.
        value["environment"] = serde_json::json!(env
            .iter()
            .map(|(k, v)| [k.clone(), v.clone()])
            .collect::<Vec<_>>());
        fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    };
    // After every run, so that a wedged test host still leaves the runs it did.
    let partial = partial_path(out);
    let (runs, env) = measure_all(args, kernel, rootfs, vmm, &work, &mut |runs, env| {
        if let Err(e) = write(runs, env, &partial) {
            eprintln!("xtask bench: {e:#}");
        }
    })?;
    write(&runs, &env, out)
}

/// Where the inner run keeps its results so far.
fn partial_path(out: &Path) -> PathBuf {
    out.with_extension("partial.json")
}

/// Copies the guest to `TMPDIR`, then boots both VMMs in turn; returns every run and what the
/// environment of the VMs was.
fn measure_all(
    args: &BootArgs,
    kernel: &Path,
    rootfs: &Path,
    vmm: &Path,
    work: &Path,
    after_each: &mut dyn FnMut(&[Run], &Environment),
) -> Result<(Vec<Run>, Environment)> {
    // Both VMMs read the same local copies: in the test host the originals sit on 9p, which would
    // put a slow, shared file server into every disk read.
    let tmp = std::env::temp_dir().join(format!("bench-boot-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let copy = |src: &Path, name: &str| -> Result<PathBuf> {
        let dst = tmp.join(name);
        util::run(Command::new("cp").arg("--sparse=always").arg(src).arg(&dst))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o444))?;
        Ok(dst)
    };
    let copied = Instant::now();
    let setup = BootSetup {
        kernel: copy(kernel, "vmlinux")?,
        rootfs: copy(rootfs, "rootfs.ext4")?,
        vmm: vmm.to_path_buf(),
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        work: work.to_path_buf(),
        timeout: Duration::from_secs(args.run_timeout),
    };
    println!(
        "xtask bench: guest copied to {} in {:.1} s",
        tmp.display(),
        copied.elapsed().as_secs_f64()
    );
    let env = vec![
        (
            "VM host".into(),
            format!(
                "Linux {}, {} ({} CPUs), load average {} at the start",
                kernel_release(),
                cpu_model(),
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                loadavg()
            ),
        ),
        (
            "QEMU".into(),
            first_line(Command::new("qemu-system-x86_64").arg("--version")),
        ),
    ];

    let mut runs = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..args.warmup {
            for which in [Vmm::Ours, Vmm::Qemu] {
                runs.push(one(&setup, which, i, true)?);
                after_each(&runs, &env);
            }
        }
        for i in 0..args.runs {
            // Alternate, and flip the order every round so neither VMM always goes first.
            let order = if i % 2 == 0 {
                [Vmm::Ours, Vmm::Qemu]
            } else {
                [Vmm::Qemu, Vmm::Ours]
            };
            for which in order {
                runs.push(one(&setup, which, i, false)?);
                after_each(&runs, &env);
            }
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result?;
    Ok((runs, env))
}

fn one(setup: &BootSetup, which: Vmm, index: usize, warmup: bool) -> Result<Run> {
    let label = format!(
        "{}-{}{index}",
        which.key(),
        if warmup { "warmup" } else { "" }
    );
    let started = Instant::now();
    let sample = measure::boot_once(setup, which, &label)?;
    let took = started.elapsed().as_secs_f64();
    let mem = sample.memory.as_ref().map_or("-".into(), |m| {
        format!("{:.1} MiB", m.rss_excl_guest_kib as f64 / 1024.0)
    });
    println!(
        "xtask bench: {label:<24} marker {:>8} ms  exit +{:>6} ms  rss-excl-guest {mem:>10}  exits {:>7}  ({took:.1} s){}",
        sample.marker_ms.map_or("-".into(), |v| format!("{v:.0}")),
        sample.exit_after_marker_ms.map_or("-".into(), |v| format!("{v:.0}")),
        sample.kvm_stats.get("exits").map_or("-".into(), |v| v.to_string()),
        sample.error.as_ref().map_or(String::new(), |e| format!("  FAILED: {e}"))
    );
    Ok(Run {
        vmm: which,
        index,
        warmup,
        sample,
    })
}
