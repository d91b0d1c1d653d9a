//! Soak: many create → exec → destroy cycles, some with a `kill -9` of the VMM or of the calling
//! process at a random point, and the host inventory checked after every cycle.
//!
//! Run it with `cargo xtask soak` (docs/SPEC.md has the latest results), or copy it to soak your
//! own deployment. Each cycle is one of:
//!
//! - `clean`: create, exec, write and read back a file, destroy;
//! - `kill-vmm`: create, then `SIGKILL` the sandbox's `sandbox-vmm` before or after an exec; the
//!   next call must fail with `GuestExited` (or `InvalidState`), and `destroy()` must still succeed;
//! - `kill-caller`: a child process of this program creates a sandbox and runs commands in a loop;
//!   it gets `SIGKILL` at a random moment (during `create` or after); its VMM must die with it
//!   (parent-death signal), and a new `KvmRuntime` on the same state directory must remove what
//!   it left.
//!
//! After each cycle: no `sandbox-vmm` process of ours is alive, the state directory is empty, and
//! this process has the same open fds as before the first cycle. Any difference is a leak: it is
//! printed, counted, and the program exits non-zero at the end.
//!
//! Usage: `soak [--cycles N] [--minutes M] [--seed S] [--results FILE]` (default results file:
//! `$SANDBOX_SCRATCH/soak.md` when set); the guest artifacts and `sandbox-vmm` come from
//! `SANDBOX_KERNEL`, `SANDBOX_ROOTFS` and `SANDBOX_VMM`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandbox_core::{ErrorKind, ExecRequest, FileOptions, Sandbox};
use sandbox_kvm::runtime::{KvmRuntime, KvmRuntimeConfig};

/// The step the current cycle is at, reported when a cycle overruns [`CYCLE_LIMIT`].
static STEP: std::sync::Mutex<&str> = std::sync::Mutex::new("start");

fn step(s: &'static str) {
    *STEP.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

fn current_step() -> &'static str {
    *STEP.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long one cycle may take before it is recorded as hung (and the soak goes on).
const CYCLE_LIMIT: Duration = Duration::from_secs(240);

/// A small deterministic generator (xorshift64*): the seed is printed, so a run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Debug, Default)]
struct Tally {
    clean: u32,
    kill_vmm: u32,
    kill_caller: u32,
    kill_caller_during_create: u32,
    leaks: Vec<String>,
    errors: Vec<String>,
    cycle_ms: Vec<u128>,
}

fn runtime(state: &Path) -> Result<KvmRuntime> {
    let config = KvmRuntimeConfig::builder()
        .state_dir(state)
        .create_deadline(Duration::from_secs(300))
        .build()?;
    Ok(KvmRuntime::new(config)?)
}

/// Our `sandbox-vmm` processes: any process whose command line mentions the state directory.
fn vmm_processes(state: &Path) -> BTreeSet<String> {
    let needle = state.to_string_lossy().into_owned();
    let mut out = BTreeSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("sandbox-vmm") && cmdline.contains(&needle) {
            out.insert(format!("process {name}: {}", cmdline.trim()));
        }
    }
    out
}

/// Everything of ours on the host: VMM processes, entries under the state directory, our fds.
fn inventory(state: &Path) -> BTreeSet<String> {
    let mut inv = vmm_processes(state);
    if let Ok(entries) = std::fs::read_dir(state) {
        for e in entries.flatten() {
            inv.insert(format!("file {}", e.path().display()));
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for e in fds.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy().into_owned();
                if !t.starts_with("/proc/") {
                    inv.insert(format!("fd {}: {t}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    inv
}

/// Polls `cond` every 100 ms for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cond()
}

fn sigkill(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
}

async fn clean_cycle(rt: &KvmRuntime, i: u32) -> Result<()> {
    step("clean: create");
    let sb = rt
        .create_sandbox(rt.spec_builder().memory_mib(128).build()?)
        .await?;
    step("clean: exec");
    let out = sb
        .exec(ExecRequest::shell(format!("echo cycle-{i}")))
        .await?;
    if out.stdout_str() != format!("cycle-{i}\n") {
        bail!("exec gave {:?}", out.stdout_str());
    }
    let data = format!("soak {i}\n").into_bytes();
    step("clean: write_file and read_file");
    sb.write_file("/tmp/soak.txt", &data, &FileOptions::new())
        .await?;
    if sb.read_file("/tmp/soak.txt", &FileOptions::new()).await? != data {
        bail!("read_file gave other bytes than write_file wrote");
    }
    step("clean: destroy");
    sb.destroy().await?;
    Ok(())
}

async fn kill_vmm_cycle(rt: &KvmRuntime, rng: &mut Rng) -> Result<()> {
    step("kill-vmm: create");
    let sb = rt
        .create_sandbox(rt.spec_builder().memory_mib(128).build()?)
        .await?;
    if rng.below(2) == 0 {
        step("kill-vmm: exec before the kill");
        sb.exec(ExecRequest::shell("echo before")).await?;
    }
    sigkill(sb.vmm_pid());
    step("kill-vmm: exec after the kill");
    match sb.exec(ExecRequest::shell("echo after")).await {
        Ok(out) => bail!(
            "exec after SIGKILL of the VMM succeeded: {:?}",
            out.stdout_str()
        ),
        Err(e) if matches!(e.kind(), ErrorKind::GuestExited | ErrorKind::InvalidState) => {}
        Err(e) => bail!(
            "exec after SIGKILL of the VMM gave kind {:?}: {e}",
            e.kind()
        ),
    }
    step("kill-vmm: destroy");
    sb.destroy().await?;
    Ok(())
}

/// Returns whether the child was killed before it reported a created sandbox.
async fn kill_caller_cycle(state: &Path, rng: &mut Rng) -> Result<bool> {
    step("kill-caller: start the child");
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg("--child")
        .arg(state)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the child caller")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("piped stdout")?;
    // Kill during create (after a random delay of up to 3 s) or once the sandbox runs commands.
    let during_create = rng.below(3) == 0;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if line.starts_with("ready") {
                let _ = tx.send(());
            }
        }
    });
    if during_create {
        step("kill-caller: wait, then kill during create");
        tokio::time::sleep(Duration::from_millis(rng.below(3000))).await;
    } else {
        step("kill-caller: wait for the child's sandbox");
        let waited =
            tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(300))).await?;
        if waited.is_err() {
            sigkill(pid);
            let _ = child.wait();
            bail!("the child caller never created its sandbox");
        }
        tokio::time::sleep(Duration::from_millis(rng.below(2000))).await;
    }
    step("kill-caller: kill and reap the child");
    sigkill(pid);
    child.wait()?;
    step("kill-caller: wait for its VMM to die");
    if !eventually(Duration::from_secs(20), || vmm_processes(state).is_empty()).await {
        bail!(
            "the VMM outlived its killed caller: {:?}",
            vmm_processes(state)
        );
    }
    // A new runtime on the same state directory removes what the dead caller left.
    step("kill-caller: reconcile with a new runtime");
    drop(runtime(state)?);
    Ok(during_create)
}

/// The child caller: create a sandbox, say so, run commands until killed.
async fn child(state: PathBuf) -> Result<()> {
    let rt = runtime(&state)?;
    let sb = rt
        .create_sandbox(rt.spec_builder().memory_mib(128).build()?)
        .await?;
    println!("ready {}", sb.vmm_pid());
    std::io::stdout().flush()?;
    loop {
        sb.exec(ExecRequest::shell("true")).await?;
    }
}

/// `cycle`, or a "hung" error naming the step it stood at after [`CYCLE_LIMIT`].
async fn limited<T>(cycle: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(CYCLE_LIMIT, cycle).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!(
            "HUNG: no end after {CYCLE_LIMIT:?}, at step {:?}",
            current_step()
        )),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let state = args.get(1).context("--child needs the state directory")?;
        return child(PathBuf::from(state)).await;
    }
    let mut cycles = 1000u32;
    let mut minutes = 20u64;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    // `cargo xtask soak` runs this through `cargo xtask run`, which provides a writable scratch
    // directory (also inside the nested test host) and reads the summary from there.
    let mut results: Option<PathBuf> =
        std::env::var_os("SANDBOX_SCRATCH").map(|d| PathBuf::from(d).join("soak.md"));
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--cycles" => cycles = value()?.parse()?,
            "--minutes" => minutes = value()?.parse()?,
            "--seed" => seed = value()?.parse::<u64>()? | 1,
            "--results" => results = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other:?}"),
        }
    }
    println!("soak: up to {cycles} cycles or {minutes} min, seed {seed}");
    let mut rng = Rng(seed);
    let state = tempfile::Builder::new().prefix("sbx-soak-").tempdir()?;
    let rt = runtime(state.path())?;
    let before = inventory(state.path());
    let budget = Duration::from_secs(minutes * 60);
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut i = 0;
    while i < cycles && started.elapsed() < budget {
        i += 1;
        let t = Instant::now();
        let kind = rng.below(4);
        step("start");
        let (name, result) = match kind {
            0 => ("kill-vmm", limited(kill_vmm_cycle(&rt, &mut rng)).await),
            1 => match limited(kill_caller_cycle(state.path(), &mut rng)).await {
                Ok(during) => {
                    if during {
                        tally.kill_caller_during_create += 1;
                    }
                    ("kill-caller", Ok(()))
                }
                Err(e) => ("kill-caller", Err(e)),
            },
            _ => ("clean", limited(clean_cycle(&rt, i)).await),
        };
        match name {
            "kill-vmm" => tally.kill_vmm += 1,
            "kill-caller" => tally.kill_caller += 1,
            _ => tally.clean += 1,
        }
        if let Err(e) = result {
            println!("soak: cycle {i} ({name}) FAILED: {e:#}");
            tally.errors.push(format!("cycle {i} ({name}): {e:#}"));
        }
        // Give teardown of a killed caller's leftovers a moment, then compare.
        let settled = eventually(Duration::from_secs(10), || {
            inventory(state.path()) == before
        })
        .await;
        if !settled {
            let after = inventory(state.path());
            let leaked: Vec<_> = after.difference(&before).cloned().collect();
            let lost: Vec<_> = before.difference(&after).cloned().collect();
            println!("soak: cycle {i} ({name}) LEAK: {leaked:?} (gone: {lost:?})");
            tally.leaks.push(format!("cycle {i} ({name}): {leaked:?}"));
        }
        let ms = t.elapsed().as_millis();
        tally.cycle_ms.push(ms);
        println!("soak: cycle {i} {name} {ms} ms");
    }
    drop(rt);
    let summary = summary(&tally, seed, started.elapsed());
    println!("{summary}");
    if let Some(path) = results {
        std::fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
    }
    if !tally.leaks.is_empty() || !tally.errors.is_empty() {
        bail!(
            "{} leaks and {} failed cycles",
            tally.leaks.len(),
            tally.errors.len()
        );
    }
    Ok(())
}

fn summary(t: &Tally, seed: u64, elapsed: Duration) -> String {
    let n = t.cycle_ms.len();
    let mut sorted = t.cycle_ms.clone();
    sorted.sort_unstable();
    let pct = |p: usize| {
        sorted
            .get((n.saturating_sub(1)) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    let mut s = format!(
        "- cycles: {n} in {:.1} min (seed {seed}): {} clean, {} kill -9 of the VMM, {} kill -9 of \
         the caller ({} of them during create)\n\
         - cycle time: median {} ms, p90 {} ms, max {} ms\n\
         - leaks (host inventory differing after a cycle): {}\n\
         - failed cycles: {}\n",
        elapsed.as_secs_f64() / 60.0,
        t.clean,
        t.kill_vmm,
        t.kill_caller,
        t.kill_caller_during_create,
        pct(50),
        pct(90),
        sorted.last().copied().unwrap_or(0),
        t.leaks.len(),
        t.errors.len(),
    );
    for l in t.leaks.iter().chain(&t.errors) {
        s.push_str(&format!("  - {l}\n"));
    }
    s
}
