//! What a writable sandbox costs to create (docs/bench.md, `cargo xtask bench create`; the latest
//! results are in docs/SPEC.md):
//!
//! 1. `create()` → first `exec(true)` answered, with the root disk as a qcow2 overlay over the base
//!    (`DiskMode::Overlay`, the default) against a private copy of it (`DiskMode::Copy`), and with
//!    the overlay over the same base grown to a larger virtual size (sparse): writable root,
//!    128 MiB guest, destroyed after each; the three kinds alternate, rotated every round; one
//!    warm-up round is not counted.
//! 2. `sandbox_fs::create_overlay` alone (no VM) over a 64 MiB and an 8 GiB sparse base, and the
//!    overlay files' sizes: neither grows with the base.
//! 3. A warm exec round trip (`true` in one live sandbox) against a local fork+exec of `/bin/true`.
//!
//! Usage: `create_bench [--rounds N] [--execs N] [--big-base-mib MIB] [--results FILE]` (defaults
//! 5, 50, 4096; results file `$SANDBOX_SCRATCH/create.md` when that is set). The guest artifacts
//! and `sandbox-vmm` come from `SANDBOX_KERNEL`, `SANDBOX_ROOTFS` and `SANDBOX_VMM`; run it with
//! `cargo xtask run --example create_bench` or `cargo xtask bench create`.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandbox_core::{ExecRequest, RootMode, Sandbox};
use sandbox_kvm::runtime::{DiskMode, KvmRuntime, KvmRuntimeConfig};

/// Guest memory of every sandbox, MiB.
const MEMORY_MIB: u32 = 128;
/// `create_overlay` calls per base size.
const OVERLAY_CREATES: usize = 20;
/// Unmeasured exec round trips before the measured ones.
const EXEC_WARMUPS: usize = 5;
const MIB: u64 = 1 << 20;

struct Args {
    rounds: usize,
    execs: usize,
    big_base_mib: u64,
    results: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        rounds: 5,
        execs: 50,
        big_base_mib: 4096,
        results: std::env::var_os("SANDBOX_SCRATCH").map(|d| PathBuf::from(d).join("create.md")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--execs" => args.execs = value()?.parse().context("--execs")?,
            "--big-base-mib" => args.big_base_mib = value()?.parse().context("--big-base-mib")?,
            "--results" => args.results = Some(value()?.into()),
            _ => bail!(
                "unknown argument {flag:?}; usage: create_bench [--rounds N] [--execs N] \
                 [--big-base-mib MIB] [--results FILE]"
            ),
        }
    }
    if args.rounds == 0 || args.execs == 0 {
        bail!("--rounds and --execs must be at least 1");
    }
    Ok(args)
}

/// Milliseconds, for the tables.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sorted samples: median (the upper one of an even count), p90, min, max.
struct Stats {
    sorted: Vec<Duration>,
}

impl Stats {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Self { sorted: v }
    }
    fn at(&self, q: f64) -> Duration {
        let last = self.sorted.len().saturating_sub(1);
        let i = ((last as f64) * q).round() as usize;
        self.sorted.get(i.min(last)).copied().unwrap_or_default()
    }
    fn median(&self) -> Duration {
        self.sorted
            .get(self.sorted.len() / 2)
            .copied()
            .unwrap_or_default()
    }
    fn min(&self) -> Duration {
        self.sorted.first().copied().unwrap_or_default()
    }
    fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }
}

/// One kind of create measured in the alternating rounds.
struct Kind {
    label: String,
    runtime: KvmRuntime,
    /// `create()` alone.
    create: Vec<Duration>,
    /// `create()` → the first `exec(true)` answered.
    total: Vec<Duration>,
}

/// Creates a writable sandbox, runs `true` once, destroys it; returns (create, create → exec).
async fn create_and_exec(rt: &KvmRuntime) -> Result<(Duration, Duration)> {
    let spec = rt
        .spec_builder()
        .memory_mib(MEMORY_MIB)
        .root(RootMode::Writable)
        .build()?;
    let t = Instant::now();
    let sb = rt.create_sandbox(spec).await?;
    let created = t.elapsed();
    let out = sb.exec(ExecRequest::new(["true"])).await;
    let total = t.elapsed();
    sb.destroy().await?;
    let out = out?;
    if !out.status.success() {
        bail!("`true` in the guest ended with {:?}", out.status);
    }
    Ok((created, total))
}

/// A sparse copy of `src` at `dst`, grown to `size` bytes if given, mode 0444 (a base image).
fn sparse_copy(src: &Path, dst: &Path, size: Option<u64>) -> Result<()> {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .context("running cp")?;
    if !st.success() {
        bail!("cp {} {} failed: {st}", src.display(), dst.display());
    }
    if let Some(size) = size {
        let f = fs::OpenOptions::new().write(true).open(dst)?;
        if f.metadata()?.len() < size {
            f.set_len(size)?;
        }
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(0o444))?;
    Ok(())
}

/// Where this runs, for the report: the nested test host is recognised by its kernel command line
/// (`cargo xtask` passes `sandbox_scratch=` to it).
fn machine_note() -> String {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let place = if cmdline.contains("sandbox_scratch=") {
        "in the nested test host (KVM inside QEMU/TCG with emulated SVM; times are many times \
         those on bare metal)"
    } else {
        "directly on this machine's /dev/kvm"
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{place}: Linux {}, {cpu} ({} CPUs), load average {} at the start",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.join(" ")
    )
}

/// `create_overlay` over `base` `n` times; the times and the last overlay's (length, allocated
/// bytes).
fn overlay_creates(dir: &Path, base: &Path, n: usize) -> Result<(Stats, u64, u64)> {
    let size = fs::metadata(base)?.len();
    let mut times = Vec::with_capacity(n);
    let (mut len, mut allocated) = (0, 0);
    for i in 0..n {
        let at = dir.join(format!("overlay-{i}.qcow2"));
        let t = Instant::now();
        sandbox_fs::create_overlay(&at, base, size)
            .with_context(|| format!("overlay over {}", base.display()))?;
        times.push(t.elapsed());
        let m = fs::metadata(&at)?;
        (len, allocated) = (m.len(), m.blocks() * 512);
        fs::remove_file(&at)?;
    }
    Ok((Stats::new(times), len, allocated))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let machine = machine_note();
    println!("create_bench: {machine}");
    let rootfs = std::env::var_os("SANDBOX_ROOTFS")
        .map(PathBuf::from)
        .context("SANDBOX_ROOTFS is not set (run it with `cargo xtask bench create`)")?;
    let work = tempfile::Builder::new().prefix("sbx-create-").tempdir()?;
    let state = work.path().join("state");
    let bases = work.path().join("bases");
    fs::create_dir_all(&state)?;
    fs::create_dir_all(&bases)?;

    // Local bases, so that neither mode reads its base over the test host's 9p share.
    let t = Instant::now();
    let base = bases.join("rootfs.ext4");
    sparse_copy(&rootfs, &base, None)?;
    let base_len = fs::metadata(&base)?.len();
    let big_len = args
        .big_base_mib
        .checked_mul(MIB)
        .context("--big-base-mib is too large")?;
    if big_len <= base_len {
        bail!(
            "--big-base-mib {} is not larger than the rootfs ({} MiB)",
            args.big_base_mib,
            base_len / MIB
        );
    }
    let big = bases.join("rootfs-big.ext4");
    sparse_copy(&rootfs, &big, Some(big_len))?;
    let base_data = fs::metadata(&base)?.blocks() * 512;
    println!(
        "create_bench: bases copied to {} in {:.1} s ({} MiB, {} MiB of data)",
        bases.display(),
        t.elapsed().as_secs_f64(),
        base_len / MIB,
        base_data / MIB
    );

    let runtime = |mode: DiskMode, base: &Path| -> Result<KvmRuntime> {
        Ok(KvmRuntime::new(
            KvmRuntimeConfig::builder()
                .state_dir(&state)
                .rootfs(base)
                .create_deadline(Duration::from_secs(300))
                .disk_mode(mode)
                .build()?,
        )?)
    };
    let mut kinds = [
        (DiskMode::Overlay, &base, "overlay"),
        (DiskMode::Copy, &base, "copy"),
        (DiskMode::Overlay, &big, "overlay, grown base"),
    ]
    .into_iter()
    .map(|(mode, b, what)| {
        Ok(Kind {
            label: format!("{what} ({} MiB base)", fs::metadata(b)?.len() / MIB),
            runtime: runtime(mode, b)?,
            create: Vec::new(),
            total: Vec::new(),
        })
    })
    .collect::<Result<Vec<_>>>()?;

    // 1. Alternating rounds; round 0 warms the page cache and is not counted.
    for round in 0..=args.rounds {
        let n = kinds.len();
        for k in 0..n {
            let kind = &mut kinds[(round + k) % n];
            let (created, total) = create_and_exec(&kind.runtime)
                .await
                .with_context(|| format!("round {round}, {}", kind.label))?;
            println!(
                "create_bench: round {round}{} {:<30} create {:>8.1} ms, create → exec {:>8.1} ms",
                if round == 0 { " (warm-up)" } else { "" },
                kind.label,
                ms(created),
                ms(total)
            );
            if round > 0 {
                kind.create.push(created);
                kind.total.push(total);
            }
        }
    }

    // 2. create_overlay alone, next to the bases (the same file system as the state directory).
    let small = bases.join("sparse-64m.img");
    let huge = bases.join("sparse-8g.img");
    for (p, len) in [(&small, 64 * MIB), (&huge, 8192 * MIB)] {
        File::create(p)?.set_len(len)?;
    }
    let overlays = [
        ("64 MiB", overlay_creates(&bases, &small, OVERLAY_CREATES)?),
        ("8 GiB", overlay_creates(&bases, &huge, OVERLAY_CREATES)?),
    ];

    // 3. Warm exec round trips in one sandbox, then the same count of local fork+exec.
    let rt = &kinds[0].runtime;
    let spec = rt
        .spec_builder()
        .memory_mib(MEMORY_MIB)
        .root(RootMode::Writable)
        .build()?;
    let sb = rt.create_sandbox(spec).await?;
    let mut guest = Vec::with_capacity(args.execs);
    let result: Result<()> = async {
        for i in 0..EXEC_WARMUPS + args.execs {
            let t = Instant::now();
            let out = sb.exec(ExecRequest::new(["true"])).await?;
            let took = t.elapsed();
            if !out.status.success() {
                bail!("`true` in the guest ended with {:?}", out.status);
            }
            if i >= EXEC_WARMUPS {
                guest.push(took);
            }
        }
        Ok(())
    }
    .await;
    sb.destroy().await?;
    result?;
    let mut local = Vec::with_capacity(args.execs);
    for i in 0..EXEC_WARMUPS + args.execs {
        let t = Instant::now();
        let st = Command::new("/bin/true").status()?;
        let took = t.elapsed();
        if !st.success() {
            bail!("/bin/true failed: {st}");
        }
        if i >= EXEC_WARMUPS {
            local.push(took);
        }
    }
    let (guest, local) = (Stats::new(guest), Stats::new(local));

    // The report.
    let mut md = String::new();
    let vmm = std::env::var("SANDBOX_VMM").unwrap_or_default();
    let build = |debug: bool| if debug { "debug" } else { "release" };
    let _ = writeln!(
        md,
        "Where: {machine}. Builds: this program {}, sandbox-vmm {}.\n",
        build(cfg!(debug_assertions)),
        if vmm.contains("/debug/") {
            "debug"
        } else if vmm.contains("/release/") {
            "release"
        } else {
            "of unknown profile"
        }
    );
    let _ = writeln!(
        md,
        "**create → first exec** (writable root, {MEMORY_MIB} MiB guest, 1 vCPU; `create()` \
         until the sandbox answers, then `exec(true)` until its exit status arrives; {} rounds \
         after 1 warm-up, the kinds alternating; bases are sparse copies of the guest rootfs \
         ({} MiB of data) in the run's temporary directory):\n",
        args.rounds,
        base_data / MIB
    );
    md.push_str(
        "| root disk | create → first exec, median | min – max | create() alone, median |\n",
    );
    md.push_str("|---|---:|---:|---:|\n");
    for k in &kinds {
        let (total, create) = (Stats::new(k.total.clone()), Stats::new(k.create.clone()));
        let _ = writeln!(
            md,
            "| {} | {:.0} ms | {:.0} – {:.0} ms | {:.0} ms |",
            k.label,
            ms(total.median()),
            ms(total.min()),
            ms(total.max()),
            ms(create.median())
        );
    }
    let med = |k: &Kind| ms(Stats::new(k.total.clone()).median());
    let _ = writeln!(
        md,
        "\nRatios of the medians: overlay / copy = {:.2}; overlay over the {} MiB base / over the \
         {} MiB base = {:.2}.\n",
        med(&kinds[0]) / med(&kinds[1]),
        big_len / MIB,
        base_len / MIB,
        med(&kinds[2]) / med(&kinds[0])
    );
    let _ = writeln!(
        md,
        "**`sandbox_fs::create_overlay` alone** (no VM; {OVERLAY_CREATES} calls per base, each \
         overlay removed after; the bases are sparse files):\n"
    );
    md.push_str("| base | median | min – max | overlay file: length | allocated |\n");
    md.push_str("|---|---:|---:|---:|---:|\n");
    for (what, (s, len, allocated)) in &overlays {
        let _ = writeln!(
            md,
            "| {what} | {:.2} ms | {:.2} – {:.2} ms | {} KiB | {} KiB |",
            ms(s.median()),
            ms(s.min()),
            ms(s.max()),
            len / 1024,
            allocated / 1024
        );
    }
    let _ = writeln!(
        md,
        "\n**Warm exec round trip** ({} calls after {EXEC_WARMUPS} warm-ups, one live sandbox, \
         `exec(true)` until its exit status arrives) against a local fork+exec of `/bin/true` \
         (`std::process::Command::status`, same count, same machine):\n",
        args.execs
    );
    md.push_str("| | median | p90 | min – max |\n|---|---:|---:|---:|\n");
    for (what, s) in [
        ("`exec(true)` in the sandbox", &guest),
        ("local `/bin/true`", &local),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {:.2} ms | {:.2} ms | {:.2} – {:.2} ms |",
            ms(s.median()),
            ms(s.at(0.9)),
            ms(s.min()),
            ms(s.max())
        );
    }
    let _ = writeln!(
        md,
        "\nRatio of the medians: sandbox / local = {:.1}.",
        ms(guest.median()) / ms(local.median())
    );
    println!("\n{md}");
    if let Some(path) = &args.results {
        fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("create_bench: summary written to {}", path.display());
    }
    Ok(())
}
