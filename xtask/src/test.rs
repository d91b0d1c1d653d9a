//! `cargo xtask test`: every test tier this machine can run, and a summary of what ran.
//!
//! Tiers (docs/testing.md has the how-to):
//! 1. **plain**: `cargo test --workspace` on the host.
//! 2. **privileged** (`--cfg sandbox_privileged`, root only): built into `target/privileged`.
//! 3. **kvm** (`--cfg sandbox_kvm`, plus `sandbox_privileged` as root): built into `target/kvm`,
//!    run with the guest artifacts in `SANDBOX_KERNEL`/`SANDBOX_ROOTFS` (and `SANDBOX_VMM` once
//!    the `sandbox-vmm` binary exists), either directly, if a probe shows that this machine's
//!    `/dev/kvm` boots Linux, or else inside the nested test host ([`crate::testhost`]).
//!
//! A tier runs only the tests that exist *because of* its cfg: the runner lists the tests of each
//! binary with and without the cfg (`--list`) and runs the difference with `--exact`, so plain tests
//! do not run again under emulation. The closing line is `N passed, N failed` over all tiers; the
//! exit code is non-zero if anything failed, timed out or could not be built.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::testhost::{self, Flow};
use crate::{guest, util};

/// Where the KVM tier runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvmRunner {
    /// Probe (cached) whether this machine's /dev/kvm boots Linux; run directly if it does, else in
    /// the nested test host.
    Auto,
    /// Run directly on this machine's /dev/kvm.
    Direct,
    /// Run in the nested test host (QEMU/TCG with emulated SVM).
    Testhost,
}

/// `cargo xtask test` options.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Run only the KVM tier (the plain tests are still built: they tell which tests are KVM-only).
    #[arg(long, conflicts_with = "no_kvm")]
    kvm_only: bool,
    /// Skip the KVM tier.
    #[arg(long)]
    no_kvm: bool,
    /// Skip the privileged tier.
    #[arg(long)]
    no_privileged: bool,
    /// Where the KVM tier runs.
    #[arg(long, value_enum, default_value_t = KvmRunner::Auto)]
    kvm_runner: KvmRunner,
    /// Probe /dev/kvm again instead of using the cached result.
    #[arg(long)]
    reprobe: bool,
    /// Test only these packages (default: the whole workspace).
    #[arg(short, long = "package", value_name = "PACKAGE")]
    package: Vec<String>,
    /// Run only tests whose name contains this string (as libtest's filter).
    #[arg(long, value_name = "SUBSTRING")]
    filter: Option<String>,
    /// Time limit in seconds for the plain and the privileged tier, each (builds included).
    #[arg(long, default_value_t = 2400, value_name = "SECS")]
    tier_timeout: u64,
    /// Time limit in seconds for running the KVM tier (test host boot included).
    #[arg(long, default_value_t = 1800, value_name = "SECS")]
    kvm_timeout: u64,
    /// vCPUs of the nested test host.
    #[arg(long, default_value_t = 2, value_name = "N")]
    testhost_cpus: u32,
    /// Memory of the nested test host in MiB (the tests copy guest images into its tmpfs).
    #[arg(long, default_value_t = 8192, value_name = "MIB")]
    testhost_mem: u64,
    /// Extra arguments for every test binary, e.g. `-- --nocapture`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<String>,
}

/// Marker the guest's test init prints once userspace is up (docs/guest.md).
const READY_MARKER: &str = "sandbox-init: ready";
/// How long the /dev/kvm probe may take to see the marker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// How one tier went.
#[derive(Debug)]
enum Outcome {
    Ran { detail: String, ok: bool },
    Skipped(String),
    Failed(String),
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    passed: u64,
    failed: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

/// The time limit of one test host boot, which runs one test binary (the conformance test, the
/// longest, takes about 450 s there).
const PER_BINARY_TIMEOUT: Duration = Duration::from_secs(900);

/// The line a tier script prints before it runs a test binary.
const RUNNING_MARKER: &str = "xtask test: running ";
/// Adds up libtest's `test result:` lines of a tier's output. Nothing is retried: a test binary
/// runs once, and what it reports counts.
#[derive(Debug, Default)]
struct Tally {
    total: Counts,
}

impl Tally {
    fn line(&mut self, l: &str) {
        if let Some(c) = parse_test_result(l) {
            self.total.add(c);
        }
    }
}

/// Everything the run reports at the end.
#[derive(Debug, Default)]
struct Report {
    tiers: Vec<(&'static str, Outcome)>,
    counts: Counts,
    timings: Vec<(String, Duration)>,
}

impl Report {
    fn time<T>(&mut self, step: impl Into<String>, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let value = f();
        self.timings.push((step.into(), started.elapsed()));
        value
    }
}

/// One test executable from `cargo test --no-run`.
#[derive(Debug, Clone)]
struct TestExe {
    /// Package id + target kind + target name: the same in every target dir.
    key: String,
    /// Short name for messages, e.g. `sandbox-kvm/tiny_guest`.
    name: String,
    exe: PathBuf,
    /// The package's directory: cargo runs tests there, and so do we.
    package_dir: PathBuf,
}

/// `cargo xtask test`.
pub fn run(args: TestArgs) -> Result<()> {
    let started = Instant::now();
    let root = util::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    let mut report = Report::default();
    let is_root = effective_uid()? == 0;

    // 1. Plain tier.
    if args.kvm_only {
        report
            .tiers
            .push(("plain", Outcome::Skipped("--kvm-only".into())));
    } else {
        let outcome = report.time("plain tier (cargo test --workspace)", || {
            plain_tier(&args, &root)
        });
        let outcome = match outcome {
            Ok((counts, ok)) => {
                report.counts.add(counts);
                Outcome::Ran {
                    detail: counts_text(counts),
                    ok,
                }
            }
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        report.tiers.push(("plain", outcome));
    }

    // The lists of plain tests, to subtract from the other tiers'.
    let need_baseline = !(args.no_kvm && (args.no_privileged || args.kvm_only || !is_root));
    let baseline = if need_baseline {
        report.time("build plain test binaries (--no-run)", || {
            build_tests(&args, &root, None, &[])
        })
    } else {
        Ok(Vec::new())
    };

    // 2. Privileged tier.
    let mut privileged_exes: Option<Result<Vec<TestExe>>> = None;
    if is_root && (!args.no_kvm || (!args.no_privileged && !args.kvm_only)) {
        privileged_exes = Some(report.time("build privileged test binaries", || {
            build_tests(
                &args,
                &root,
                Some(&target.join("privileged")),
                &["sandbox_privileged"],
            )
        }));
    }
    let privileged = if args.no_privileged || args.kvm_only {
        let why = if args.kvm_only {
            "--kvm-only"
        } else {
            "--no-privileged"
        };
        Outcome::Skipped(why.into())
    } else if !is_root {
        Outcome::Skipped(
            "not running as root (the privileged tier needs root for netns and nftables)".into(),
        )
    } else {
        let result = (|| -> Result<(Counts, bool, usize)> {
            let base = baseline.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let exes = privileged_exes
                .as_ref()
                .expect("built above when root and the tier is not skipped")
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let selected = tier_tests(base, exes, args.filter.as_deref())?;
            let n = selected.iter().map(|(_, t)| t.len()).sum();
            if n == 0 {
                return Ok((Counts::default(), true, 0));
            }
            let scratch = run_dir(&target.join("privileged"))?;
            let script = script(&selected, &args.test_args, &scratch, &[], &scratch);
            let (counts, ok) = report.time("privileged tier run", || {
                run_script_here(&script, &scratch, Duration::from_secs(args.tier_timeout))
            })?;
            Ok((counts, ok, n))
        })();
        match result {
            Ok((_, _, 0)) => Outcome::Ran {
                detail: "no tests exist only under --cfg sandbox_privileged".into(),
                ok: true,
            },
            Ok((counts, ok, _)) => {
                report.counts.add(counts);
                Outcome::Ran {
                    detail: counts_text(counts),
                    ok,
                }
            }
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    };
    report.tiers.push(("privileged", privileged));

    // 3. KVM tier.
    let kvm = if args.no_kvm {
        Outcome::Skipped("--no-kvm".into())
    } else {
        match kvm_tier(
            &args,
            &root,
            &target,
            is_root,
            &baseline,
            &privileged_exes,
            &mut report,
        ) {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    };
    report.tiers.push(("kvm", kvm));

    // Summary.
    let mut failed_tiers = 0;
    println!();
    println!("xtask test: tiers");
    for (name, outcome) in &report.tiers {
        let line = match outcome {
            Outcome::Ran { detail, ok: true } => format!("ran: {detail}"),
            Outcome::Ran { detail, ok: false } => {
                failed_tiers += 1;
                format!("FAILED: {detail}")
            }
            Outcome::Skipped(why) => format!("skipped: {why}"),
            Outcome::Failed(why) => {
                failed_tiers += 1;
                format!("FAILED: {why}")
            }
        };
        println!("  {name:<11} {line}");
    }
    println!("xtask test: step times");
    for (step, took) in &report.timings {
        println!("  {:>7.1} s  {step}", took.as_secs_f64());
    }
    println!("  {:>7.1} s  total", started.elapsed().as_secs_f64());
    // A tier that failed without a libtest failure (a build error, a crash, a timeout) still
    // counts as a failure in the closing line, so that the line never reads `0 failed` when the
    // exit code says otherwise.
    let mut counts = report.counts;
    if failed_tiers > 0 && counts.failed == 0 {
        counts.failed = failed_tiers;
    }
    println!("{} passed, {} failed", counts.passed, counts.failed);
    if failed_tiers > 0 || counts.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn counts_text(c: Counts) -> String {
    format!("{} passed, {} failed", c.passed, c.failed)
}

/// The plain tier: `cargo test` as a user would type it, streamed and counted.
fn plain_tier(args: &TestArgs, root: &Path) -> Result<(Counts, bool)> {
    let mut cmd = Command::new(cargo());
    cmd.arg("test").arg("--no-fail-fast").current_dir(root);
    package_args(&mut cmd, &args.package);
    let mut rest: Vec<String> = args.filter.iter().cloned().collect();
    rest.extend(args.test_args.iter().cloned());
    if !rest.is_empty() {
        cmd.arg("--").args(&rest);
    }
    println!("xtask test: plain tier: {}", show(&cmd));
    let mut counts = Counts::default();
    let out = testhost::stream(
        &mut cmd,
        Some(Duration::from_secs(args.tier_timeout)),
        &mut |l| {
            println!("{l}");
            if let Some(c) = parse_test_result(l) {
                counts.add(c);
            }
            Flow::Continue
        },
    )?;
    if out.timed_out {
        bail!("cargo test did not finish within {} s", args.tier_timeout);
    }
    Ok((counts, out.status.success()))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn package_args(cmd: &mut Command, packages: &[String]) {
    if packages.is_empty() {
        cmd.arg("--workspace");
    } else {
        for p in packages {
            cmd.arg("-p").arg(p);
        }
    }
}

fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(s, "{}={} ", k.to_string_lossy(), v.to_string_lossy());
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// RUSTFLAGS for a tier: the caller's, plus `--cfg <cfg>` for each cfg.
fn rustflags(cfgs: &[&str]) -> String {
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    for cfg in cfgs {
        if !flags.is_empty() {
            flags.push(' ');
        }
        flags.push_str("--cfg ");
        flags.push_str(cfg);
    }
    flags
}

/// Builds the test binaries (`cargo test --no-run`) with `cfgs` into `target_dir` (None: the
/// default target dir) and returns them.
fn build_tests(
    args: &TestArgs,
    root: &Path,
    target_dir: Option<&Path>,
    cfgs: &[&str],
) -> Result<Vec<TestExe>> {
    let mut cmd = Command::new(cargo());
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(root);
    package_args(&mut cmd, &args.package);
    if let Some(dir) = target_dir {
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    if !cfgs.is_empty() {
        cmd.env("RUSTFLAGS", rustflags(cfgs));
    }
    println!("xtask test: building: {}", show(&cmd));
    let artifacts = cargo_artifacts(&mut cmd, Duration::from_secs(args.tier_timeout))?;
    Ok(artifacts
        .into_iter()
        .filter(|a| a.test)
        .map(|a| a.exe)
        .collect())
}

#[derive(Debug)]
struct Artifact {
    exe: TestExe,
    /// Built with the test harness (a test binary), as opposed to a plain `bin`.
    test: bool,
    kind: Vec<String>,
}

/// Runs a cargo command with `--message-format=json*` and returns the executables it built.
fn cargo_artifacts(cmd: &mut Command, timeout: Duration) -> Result<Vec<Artifact>> {
    let mut found = Vec::new();
    let mut parse_error = None;
    let out = testhost::stream(cmd, Some(timeout), &mut |line| {
        if !line.starts_with('{') {
            eprintln!("{line}");
            return Flow::Continue;
        }
        match parse_artifact(line) {
            Ok(Some(a)) => found.push(a),
            Ok(None) => {}
            Err(e) => parse_error = Some(e),
        }
        Flow::Continue
    })?;
    if out.timed_out {
        bail!(
            "{} did not finish within {} s",
            show(cmd),
            timeout.as_secs()
        );
    }
    if !out.status.success() {
        bail!("{} failed: {}", show(cmd), out.status);
    }
    if let Some(e) = parse_error {
        return Err(e);
    }
    Ok(found)
}

fn parse_artifact(line: &str) -> Result<Option<Artifact>> {
    let v: serde_json::Value =
        serde_json::from_str(line).context("parsing cargo's JSON message")?;
    if v["reason"] != "compiler-artifact" {
        return Ok(None);
    }
    let Some(exe) = v["executable"].as_str() else {
        return Ok(None);
    };
    let target = &v["target"];
    let kind: Vec<String> = target["kind"]
        .as_array()
        .map(|k| {
            k.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let name = target["name"].as_str().unwrap_or_default().to_string();
    let package_id = v["package_id"].as_str().unwrap_or_default();
    let manifest = v["manifest_path"]
        .as_str()
        .context("artifact without manifest_path")?;
    let package_dir = Path::new(manifest)
        .parent()
        .context("manifest path has a parent")?
        .to_path_buf();
    let package_name = package_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Some(Artifact {
        exe: TestExe {
            key: format!("{package_id} {} {name}", kind.join(",")),
            name: format!("{package_name}/{name}"),
            exe: PathBuf::from(exe),
            package_dir,
        },
        test: v["profile"]["test"].as_bool().unwrap_or(false),
        kind,
    }))
}

/// The tests a test binary has (`--list --format terse`).
fn list_tests(exe: &TestExe) -> Result<BTreeSet<String>> {
    let out = util::output(
        Command::new(&exe.exe)
            .args(["--list", "--format", "terse"])
            .current_dir(&exe.package_dir),
    )
    .with_context(|| format!("listing the tests of {}", exe.name))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// For each binary of a tier, the tests it has that its baseline build lacks (those that exist
/// because of the tier's cfg), filtered by `filter`.
fn tier_tests(
    baseline: &[TestExe],
    tier: &[TestExe],
    filter: Option<&str>,
) -> Result<Vec<(TestExe, Vec<String>)>> {
    let mut selected = Vec::new();
    for exe in tier {
        let base = match baseline.iter().find(|b| b.key == exe.key) {
            Some(b) => list_tests(b)?,
            None => BTreeSet::new(),
        };
        let tests: Vec<String> = list_tests(exe)?
            .into_iter()
            .filter(|t| !base.contains(t))
            .filter(|t| filter.is_none_or(|f| t.contains(f)))
            .collect();
        if !tests.is_empty() {
            selected.push((exe.clone(), tests));
        }
    }
    Ok(selected)
}

/// Single-quotes `s` for /bin/sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script that runs the selected tests, one binary after another, and exits non-zero if any
/// failed. `tmpdir` is the tests' `TMPDIR`; `status_dir` gets the exit status in `status`.
fn script(
    selected: &[(TestExe, Vec<String>)],
    test_args: &[String],
    tmpdir: &Path,
    env: &[(&str, String)],
    status_dir: &Path,
) -> String {
    let mut s = String::from("#!/bin/sh\n# Written by `cargo xtask test` (xtask/src/test.rs).\n");
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let _ = writeln!(s, "export PATH={}", sh_quote(&path));
    let _ = writeln!(s, "export TMPDIR={}", sh_quote(&tmpdir.to_string_lossy()));
    s.push_str("export RUST_BACKTRACE=1\n");
    for (k, v) in env {
        let _ = writeln!(s, "export {k}={}", sh_quote(v));
    }
    s.push_str("rc=0\n");
    for (exe, tests) in selected {
        let _ = writeln!(
            s,
            "echo {}",
            sh_quote(&format!(
                "{RUNNING_MARKER}{} ({} tests)",
                exe.name,
                tests.len()
            ))
        );
        let dir = sh_quote(&exe.package_dir.to_string_lossy());
        let mut run = format!(
            "(cd {dir} && CARGO_MANIFEST_DIR={dir} exec {} --exact",
            sh_quote(&exe.exe.to_string_lossy())
        );
        for t in tests.iter().chain(test_args) {
            run.push(' ');
            run.push_str(&sh_quote(t));
        }
        run.push(')');
        let _ = writeln!(s, "{run} || rc=1");
    }
    let _ = writeln!(
        s,
        "echo \"$rc\" > {}\nexit \"$rc\"",
        sh_quote(&status_dir.join("status").to_string_lossy())
    );
    s
}

/// Runs a tier script on this machine, streaming and counting its output.
fn run_script_here(script: &str, scratch: &Path, timeout: Duration) -> Result<(Counts, bool)> {
    let path = scratch.join("run.sh");
    fs::write(&path, script)?;
    let mut tally = Tally::default();
    let out = testhost::stream(Command::new("sh").arg(&path), Some(timeout), &mut |l| {
        println!("{l}");
        tally.line(l);
        Flow::Continue
    })?;
    let counts = tally.total;
    if out.timed_out {
        bail!(
            "the tests did not finish within {} s and were killed",
            timeout.as_secs()
        );
    }
    Ok((counts, out.status.success()))
}

/// A fresh per-run directory `<parent>/run-<pid>`, so that concurrent runs (several developers
/// on one machine) never share scratch space; the directories of runs whose process is gone are
/// removed first.
fn run_dir(parent: &Path) -> Result<PathBuf> {
    run_dir_named(parent, "")
}

/// Like [`run_dir`], `<parent>/run-<pid><suffix>`: one per test binary of a run, so that each
/// keeps its console log.
fn run_dir_named(parent: &Path, suffix: &str) -> Result<PathBuf> {
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    for entry in fs::read_dir(parent)?.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
            continue;
        };
        let pid = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = parent.join(format!("run-{}{suffix}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

#[allow(clippy::too_many_arguments)]
fn kvm_tier(
    args: &TestArgs,
    root: &Path,
    target: &Path,
    is_root: bool,
    baseline: &Result<Vec<TestExe>>,
    privileged_exes: &Option<Result<Vec<TestExe>>>,
    report: &mut Report,
) -> Result<Outcome> {
    // As root the KVM build also has sandbox_privileged (tests that need both a VM and netns),
    // so its baseline is the privileged build.
    let (cfgs, base): (&[&str], _) = if is_root {
        let exes = privileged_exes
            .as_ref()
            .expect("the privileged build runs whenever root and the KVM tier is on");
        (&["sandbox_kvm", "sandbox_privileged"], exes)
    } else {
        (&["sandbox_kvm"], baseline)
    };
    let base = base.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;

    let artifacts = match (
        std::env::var_os("SANDBOX_KERNEL"),
        std::env::var_os("SANDBOX_ROOTFS"),
    ) {
        // A caller that brings its own guest (e.g. a kernel under test) skips the build.
        (Some(kernel), Some(rootfs)) => {
            let artifacts = guest::GuestArtifacts {
                kernel: fs::canonicalize(&kernel)
                    .with_context(|| format!("SANDBOX_KERNEL={}", kernel.to_string_lossy()))?,
                rootfs: fs::canonicalize(&rootfs)
                    .with_context(|| format!("SANDBOX_ROOTFS={}", rootfs.to_string_lossy()))?,
            };
            println!(
                "xtask test: using the guest artifacts from the environment: \
                 SANDBOX_KERNEL={} SANDBOX_ROOTFS={}",
                artifacts.kernel.display(),
                artifacts.rootfs.display()
            );
            artifacts
        }
        _ => report
            .time(
                "guest artifacts (cargo xtask guest)",
                guest::ensure_artifacts,
            )
            .context("building the guest artifacts for the KVM tier")?,
    };
    let kvm_target = target.join("kvm");
    let exes = report.time("build KVM-tier test binaries", || {
        build_tests(args, root, Some(&kvm_target), cfgs)
    })?;
    let vmm = report.time("build sandbox-vmm", || {
        build_vmm(args, root, &kvm_target, cfgs)
    })?;
    let selected = tier_tests(base, &exes, args.filter.as_deref())?;
    let n: usize = selected.iter().map(|(_, t)| t.len()).sum();
    if n == 0 {
        return Ok(Outcome::Ran {
            detail: match &args.filter {
                Some(f) => format!("no KVM-tier test matches {f:?}"),
                None => "no tests exist only under --cfg sandbox_kvm".into(),
            },
            ok: true,
        });
    }
    println!(
        "xtask test: KVM tier: {n} tests in {} binaries",
        selected.len()
    );

    let mut env = vec![
        (
            "SANDBOX_KERNEL",
            artifacts.kernel.to_string_lossy().into_owned(),
        ),
        (
            "SANDBOX_ROOTFS",
            artifacts.rootfs.to_string_lossy().into_owned(),
        ),
    ];
    match &vmm {
        Some(path) => env.push(("SANDBOX_VMM", path.to_string_lossy().into_owned())),
        None => {
            println!("xtask test: no sandbox-vmm binary in the workspace yet; SANDBOX_VMM unset")
        }
    }

    let (direct, why) = match args.kvm_runner {
        KvmRunner::Direct => (true, "--kvm-runner direct".to_string()),
        KvmRunner::Testhost => (false, "--kvm-runner testhost".to_string()),
        KvmRunner::Auto => report.time("probe /dev/kvm", || probe_kvm(&artifacts, args.reprobe))?,
    };
    let timeout = Duration::from_secs(args.kvm_timeout);
    if direct {
        println!("xtask test: KVM tier runs directly on this machine's /dev/kvm: {why}");
        let scratch = run_dir(&kvm_target)?;
        let tmp = scratch.join("tmp");
        fs::create_dir_all(&tmp)?;
        let script = script(&selected, &args.test_args, &tmp, &env, &scratch);
        let (counts, ok) = report.time("KVM tier run (direct)", || {
            run_script_here(&script, &scratch, timeout)
        })?;
        report.counts.add(counts);
        return Ok(Outcome::Ran {
            detail: format!("{} (directly: {why})", counts_text(counts)),
            ok,
        });
    }

    println!("xtask test: KVM tier runs in the nested test host: {why}");
    let host = report.time("test host kernel + initramfs", testhost::ensure)?;
    // One VM at a time inside the test host: its two TCG vCPUs carry every nested vCPU thread.
    let mut test_args = args.test_args.clone();
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        test_args.push("--test-threads=1".into());
    }
    // One test host per test binary, each with its own time limit, so every binary starts on a
    // fresh test host (no emulator state carried over from another binary's VMs) and a test host
    // that does not finish costs one binary's run. Nothing is retried.
    let per_boot = timeout.min(PER_BINARY_TIMEOUT);
    let mut total = Counts::default();
    let mut all_ok = true;
    let mut failures = Vec::new();
    let mut lockups = Vec::new();
    let started = Instant::now();
    for (exe, tests) in &selected {
        let one = [(exe.clone(), tests.clone())];
        let suffix = format!("-{}", exe.name.replace('/', "-"));
        let scratch = run_dir_named(&target.join("testhost"), &suffix)?;
        let script = script(&one, &test_args, Path::new("/tmp"), &env, &scratch);
        let config = testhost::RunConfig {
            cpus: args.testhost_cpus,
            mem_mib: args.testhost_mem,
            timeout: per_boot,
            keep: vec![
                root.to_path_buf(),
                target.to_path_buf(),
                util::cache_dir(),
                artifacts.kernel.clone(),
                artifacts.rootfs.clone(),
            ],
        };
        let log = scratch.join("console.log");
        println!(
            "xtask test: booting the test host for {} ({}, {}, {} vCPUs, {} MiB, TCG, up to {} s; \
             console log {})",
            exe.name,
            host.kernel_package,
            host.qemu,
            config.cpus,
            config.mem_mib,
            per_boot.as_secs(),
            log.display()
        );
        let mut tally = Tally::default();
        let mut stalls = 0;
        let outcome = testhost::run(&host, &scratch, &script, &config, &log, &mut |l| {
            println!("{l}");
            tally.line(l);
            if l.contains("soft lockup") {
                stalls += 1;
            }
        })?;
        total.add(tally.total);
        if stalls > 0 {
            lockups.push(format!("{} ({stalls})", exe.name));
        }
        if let Err(e) = testhost::check_outcome(&outcome, &config, &log) {
            all_ok = false;
            failures.push(format!("{}: {e:#}", exe.name));
        }
    }
    if !lockups.is_empty() {
        println!(
            "xtask test: WARNING: the test host's kernel reported soft lockups (an emulation \
             stall, docs/testing.md) while running: {}",
            lockups.join(", ")
        );
    }
    report.timings.push((
        "KVM tier runs in the test host (one boot per test binary)".into(),
        started.elapsed(),
    ));
    report.counts.add(total);
    let mut detail = format!("{} (in the nested test host: {why})", counts_text(total));
    if !failures.is_empty() {
        detail.push_str("; ");
        detail.push_str(&failures.join("; "));
    }
    Ok(Outcome::Ran { detail, ok: all_ok })
}

/// Builds the `sandbox-vmm` binary into the KVM target dir, if the workspace has it.
fn build_vmm(
    args: &TestArgs,
    root: &Path,
    target_dir: &Path,
    cfgs: &[&str],
) -> Result<Option<PathBuf>> {
    let meta = util::output(
        Command::new(cargo())
            .args(["metadata", "--format-version=1", "--no-deps"])
            .current_dir(root),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("parsing cargo metadata")?;
    let has_vmm = meta["packages"].as_array().into_iter().flatten().any(|p| {
        p["targets"].as_array().into_iter().flatten().any(|t| {
            t["name"] == "sandbox-vmm"
                && t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
    });
    if !has_vmm {
        return Ok(None);
    }
    let mut cmd = Command::new(cargo());
    cmd.args([
        "build",
        "--bin",
        "sandbox-vmm",
        "--message-format=json-render-diagnostics",
    ])
    .current_dir(root)
    .env("CARGO_TARGET_DIR", target_dir)
    .env("RUSTFLAGS", rustflags(cfgs));
    println!("xtask test: building: {}", show(&cmd));
    let artifacts = cargo_artifacts(&mut cmd, Duration::from_secs(args.tier_timeout))?;
    Ok(artifacts
        .into_iter()
        .find(|a| a.kind.iter().any(|k| k == "bin") && a.exe.name.ends_with("/sandbox-vmm"))
        .map(|a| a.exe.exe))
}

/// Decides whether this machine's `/dev/kvm` boots Linux: boots the guest artifacts with QEMU
/// `-M microvm -enable-kvm` and waits for the test init's marker. The answer is cached, keyed by
/// the host kernel release, the CPU model and flags and the guest kernel.
pub(crate) fn probe_kvm(
    artifacts: &guest::GuestArtifacts,
    reprobe: bool,
) -> Result<(bool, String)> {
    if !Path::new("/dev/kvm").exists() {
        return Ok((false, "this machine has no /dev/kvm".into()));
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu: Vec<&str> = cpuinfo
        .lines()
        .filter(|l| l.starts_with("model name") || l.starts_with("flags"))
        .take(2)
        .collect();
    let key = util::hash_parts([
        release.trim().as_bytes(),
        cpu.join("\n").as_bytes(),
        util::hash_file(&artifacts.kernel)?.as_bytes(),
    ]);
    let dir = util::cache_dir().join("kvm-probe");
    fs::create_dir_all(&dir)?;
    let cached = dir.join(&key[..16]);
    if !reprobe {
        if let Ok(text) = fs::read_to_string(&cached) {
            let (verdict, reason) = text.split_once('\n').unwrap_or((text.as_str(), ""));
            return Ok((
                verdict == "boots",
                format!("{} (cached probe {})", reason.trim(), cached.display()),
            ));
        }
    }

    println!(
        "xtask test: probing whether /dev/kvm boots Linux (QEMU -M microvm -enable-kvm, up to {} s)",
        PROBE_TIMEOUT.as_secs()
    );
    let log_path = dir.join(format!("{}.log", &key[..16]));
    let mut log = fs::File::create(&log_path)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // The same machine as the reference boot test (crates/sandbox-vmm/tests/qemu_reference.rs):
    // no ACPI, so QEMU puts the virtio-mmio disk on the kernel command line, and the test init
    // halts by rebooting (triple fault), which -no-reboot turns into an exit.
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-smp", "1", "-m", "256"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&artifacts.kernel)
        .args([
            "-append",
            "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw init=/sbin/sandbox-test-init \
             sandbox_halt=reboot",
        ])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            artifacts.rootfs.to_string_lossy().replace(',', ",,")
        ))
        .args(["-device", "virtio-blk-device,drive=root"]);
    testhost::ensure_qemu()?;
    let mut verdict: Option<(bool, String)> = None;
    let mut last = String::new();
    let out = testhost::stream(&mut cmd, Some(PROBE_TIMEOUT), &mut |line| {
        use std::io::Write;
        let _ = writeln!(log, "{line}");
        if line.contains(READY_MARKER) {
            verdict = Some((true, "/dev/kvm booted the guest kernel to its init".into()));
            return Flow::Stop;
        }
        if line.contains("KVM internal error") || line.contains("emulation failure") {
            verdict = Some((
                false,
                format!("/dev/kvm cannot boot Linux ({})", line.trim()),
            ));
            return Flow::Stop;
        }
        if !line.trim().is_empty() {
            last = line.trim().chars().take(200).collect();
        }
        Flow::Continue
    })?;
    let (boots, reason) = verdict.unwrap_or_else(|| {
        if out.timed_out {
            (
                false,
                format!(
                    "/dev/kvm did not boot Linux to its init within {} s",
                    PROBE_TIMEOUT.as_secs()
                ),
            )
        } else {
            (
                false,
                format!(
                    "QEMU with /dev/kvm exited ({}) before the init started: {last}",
                    out.status
                ),
            )
        }
    });
    let reason = format!("{reason}; probe log {}", log_path.display());
    fs::write(
        &cached,
        format!("{}\n{reason}\n", if boots { "boots" } else { "fails" }),
    )?;
    Ok((boots, reason))
}

/// Counts from a libtest summary line (`test result: ok. 3 passed; 0 failed; ...`), ANSI colours
/// allowed.
fn parse_test_result(line: &str) -> Option<Counts> {
    let plain = strip_ansi(line);
    let rest = plain.trim_start().strip_prefix("test result:")?;
    let mut counts = Counts::default();
    let mut seen = false;
    for part in rest.split(';') {
        let mut words = part.split_whitespace().rev();
        let (Some(what), Some(n)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        match what {
            "passed" => {
                counts.passed = n;
                seen = true;
            }
            "failed" => counts.failed = n,
            _ => {}
        }
    }
    seen.then_some(counts)
}

/// `s` without ANSI CSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The effective uid, from /proc (xtask has no libc dependency).
fn effective_uid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .context("no effective uid in /proc/self/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_summaries_with_and_without_colour() {
        let c = parse_test_result(
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.28s",
        )
        .expect("a summary line");
        assert_eq!((c.passed, c.failed), (12, 0));
        let c = parse_test_result(
            "test result: \u{1b}[31mFAILED\u{1b}[0m. 4 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        )
        .expect("a coloured summary line");
        assert_eq!((c.passed, c.failed), (4, 2));
        assert!(parse_test_result("test foo ... ok").is_none());
        assert!(parse_test_result("running 3 tests").is_none());
    }

    #[test]
    fn every_summary_counts_once() {
        let mut t = Tally::default();
        for l in [
            "xtask test: running a (2 tests)",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "xtask test: running b (1 tests)",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            t.line(l);
        }
        assert_eq!((t.total.passed, t.total.failed), (3, 1));
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn script_runs_exact_tests_and_records_status() {
        let exe = TestExe {
            key: "k".into(),
            name: "sandbox-kvm/tiny_guest".into(),
            exe: "/t/kvm/debug/deps/tiny_guest-1".into(),
            package_dir: "/w/crates/sandbox-kvm".into(),
        };
        let s = script(
            &[(exe, vec!["a::b".into(), "c".into()])],
            &["--nocapture".into()],
            Path::new("/tmp"),
            &[("SANDBOX_KERNEL", "/k".into())],
            Path::new("/scratch"),
        );
        assert!(s.contains("export TMPDIR='/tmp'\n"), "{s}");
        assert!(s.contains("export SANDBOX_KERNEL='/k'\n"), "{s}");
        let run = "(cd '/w/crates/sandbox-kvm' && CARGO_MANIFEST_DIR='/w/crates/sandbox-kvm' exec \
                   '/t/kvm/debug/deps/tiny_guest-1' --exact 'a::b' 'c' '--nocapture')";
        assert!(s.contains(&format!("\n{run} || rc=1\n")), "{s}");
        assert!(!s.contains("retry"), "{s}");
        assert!(
            s.ends_with("echo \"$rc\" > '/scratch/status'\nexit \"$rc\"\n"),
            "{s}"
        );
    }

    #[test]
    fn artifact_messages_give_test_executables() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/crates/sandbox-kvm#0.1.0","manifest_path":"/w/crates/sandbox-kvm/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"tiny_guest","src_path":"/w/crates/sandbox-kvm/tests/tiny_guest.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/tiny_guest-abc","fresh":true}"#;
        let a = parse_artifact(line)
            .expect("valid JSON")
            .expect("an executable artifact");
        assert!(a.test);
        assert_eq!(a.exe.name, "sandbox-kvm/tiny_guest");
        assert_eq!(
            a.exe.exe,
            PathBuf::from("/w/target/debug/deps/tiny_guest-abc")
        );
        assert_eq!(a.exe.package_dir, PathBuf::from("/w/crates/sandbox-kvm"));
        let lib = r#"{"reason":"compiler-artifact","package_id":"x","manifest_path":"/w/Cargo.toml","target":{"kind":["lib"],"name":"x"},"profile":{"test":false},"executable":null}"#;
        assert!(parse_artifact(lib).expect("valid JSON").is_none());
    }
}
