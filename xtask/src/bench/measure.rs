//! One boot, measured: spawn a VMM, read its console as it is produced, and at the init's marker
//! line sample its memory (`/proc/<pid>/smaps`, `/proc/<pid>/status`) and, where debugfs shows
//! them, its KVM exit counters; then time how long it takes to exit after the guest powers off.
//!
//! This runs wherever `/dev/kvm` boots Linux: directly on such a machine, or inside the nested
//! test host (`cargo xtask bench boot --inner`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The line the guest's test init prints once user space is up (docs/guest.md).
pub const READY_MARKER: &str = "sandbox-init: ready";

/// The line the guest's test init prints first: the kernel has handed over to user space.
pub const INIT_START_MARKER: &str = "sandbox-init: start";

/// The log line (stderr, INFO from `sandbox_vmm::vmm::handle`) our VMM writes as it releases the
/// vCPUs: its own start-up is over.
pub const OURS_RUNNING_LOG: &str = "VM running";

/// Our VMM's log filter for a measured boot: warnings, plus the INFO line above (two short lines
/// per boot; the default filter, `warn`, would hide it).
const OURS_RUST_LOG: &str = "warn,sandbox_vmm::vmm::handle=info";

/// Most console bytes kept per run (stdout and stderr each), for the per-run log.
const CONSOLE_KEEP: usize = 256 * 1024;

/// Most time a VMM gets to exit after the marker. A clean power-off takes about a second even
/// under nesting; a guest whose power-off did not take falls back to a reset that, on QEMU microvm
/// (no i8042), spins on the keyboard controller's port for minutes under nesting.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the exit is polled after the marker: the exit time's resolution.
const EXIT_POLL: Duration = Duration::from_millis(2);

/// Slack above the configured guest RAM size that a guest-RAM mapping may have (alignment,
/// guard pages merged into the mapping), KiB.
const GUEST_RAM_SLACK_KIB: u64 = 4 * 1024;

/// The two VMMs under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vmm {
    /// Our `sandbox-vmm`.
    Ours,
    /// QEMU `-M microvm`.
    Qemu,
}

impl Vmm {
    /// Short name used in file names and JSON.
    pub fn key(self) -> &'static str {
        match self {
            Vmm::Ours => "sandbox-vmm",
            Vmm::Qemu => "qemu-microvm",
        }
    }
}

/// What both VMMs boot, identically.
#[derive(Debug, Clone)]
pub struct BootSetup {
    /// `vmlinux` (ELF with a PVH note; QEMU direct-boots it through PVH).
    pub kernel: PathBuf,
    /// Raw ext4 root file system, attached read-only to both VMMs.
    pub rootfs: PathBuf,
    /// Our VMM binary (release build).
    pub vmm: PathBuf,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// Where each run's config and logs go.
    pub work: PathBuf,
    /// How long one run may take to reach the marker and to exit, each.
    pub timeout: Duration,
}

/// The kernel command line both VMMs give the guest. Our VMM starts every command line with
/// `sandbox_vmm::vmm::BASE_CMDLINE`, these exact words (a test checks); QEMU gets them verbatim
/// (microvm describes its virtio-mmio devices in the ACPI DSDT, as our VMM does), so both guests
/// skip the PCI probe.
pub const CMDLINE_BASE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";
/// What follows [`CMDLINE_BASE`] for both: read-only root (both VMMs boot the same file, so it
/// must not change between runs), the test init, and `quiet` (console output is not measured).
pub const CMDLINE_EXTRA: &str = "root=/dev/vda ro init=/sbin/sandbox-test-init quiet";

/// One measured boot.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Spawning the VMM process to the marker line arriving on its stdout, ms.
    pub marker_ms: Option<f64>,
    /// Spawning the VMM process to the end of its own start-up, ms: for ours the
    /// [`OURS_RUNNING_LOG`] line (the vCPUs are released), for QEMU its first console line (its
    /// firmware's banner, so this includes the firmware's first steps).
    pub guest_start_ms: Option<f64>,
    /// Spawning the VMM process to [`INIT_START_MARKER`], ms: the guest kernel's boot has ended.
    pub init_start_ms: Option<f64>,
    /// The marker to the VMM process's exit (the test init powers off right after it), ms.
    pub exit_after_marker_ms: Option<f64>,
    /// Exit code of the VMM process (None: killed by a signal or still running at the timeout).
    pub exit_code: Option<i32>,
    /// Memory at the marker.
    pub memory: Option<Memory>,
    /// KVM statistics of the VM at the marker (debugfs `kvm/<pid>-<fd>/`), if readable.
    pub kvm_stats: BTreeMap<String, u64>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// Resident memory of the VMM process, KiB, from `/proc/<pid>/smaps` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Sum of `Rss` over every mapping except the guest-RAM mapping(s).
    pub rss_excl_guest_kib: u64,
    /// Sum of `Pss` over the same mappings (shared library pages divided among their users).
    pub pss_excl_guest_kib: u64,
    /// Sum of `Rss` over all mappings.
    pub rss_total_kib: u64,
    /// `Rss` of the guest-RAM mapping(s): guest pages touched so far.
    pub guest_rss_kib: u64,
    /// Sizes of the mappings taken as guest RAM, KiB.
    pub guest_mappings_kib: Vec<u64>,
    /// The part of `guest_rss_kib` on transparent huge pages (2 MiB each).
    pub guest_anon_huge_kib: u64,
    /// Start address of each guest-RAM mapping modulo 2 MiB. KVM maps guest memory into the
    /// nested page tables with 2 MiB pages only where the host address and the guest-physical
    /// address agree modulo 2 MiB (and the host page is huge); otherwise every 4 KiB page the
    /// guest touches costs a nested page fault (`pf_taken`).
    pub guest_offsets_2m: Vec<u64>,
    /// `VmHWM` (peak resident set, guest RAM included).
    pub hwm_kib: u64,
}

/// Boots `which` once and measures it. Errors are for the harness (a spawn failure); a guest that
/// does not reach the marker gives a [`Sample`] with `error` set.
pub fn boot_once(setup: &BootSetup, which: Vmm, label: &str) -> Result<Sample> {
    let mut cmd = command(setup, which, label)?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let mut guard = KillOnDrop(Some(&mut child));
    let child = guard.0.as_mut().expect("set just above");
    let pid = child.id();

    let (tx, rx) = mpsc::channel::<(Instant, bool, String)>();
    let stdout = child.stdout.take().expect("stdout was set to piped");
    let stderr = child.stderr.take().expect("stderr was set to piped");
    forward_lines(Box::new(stdout), false, tx.clone());
    forward_lines(Box::new(stderr), true, tx);

    let mut console = Console::default();
    let mut sample = Sample::default();
    let deadline = started + setup.timeout;
    let mut marker_at = None;
    while marker_at.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, is_err, line)) => {
                let since_spawn = || Some(ms(at.duration_since(started)));
                let guest_started = match which {
                    Vmm::Ours => is_err && line.contains(OURS_RUNNING_LOG),
                    Vmm::Qemu => !is_err,
                };
                if guest_started && sample.guest_start_ms.is_none() {
                    sample.guest_start_ms = since_spawn();
                }
                if !is_err && line.contains(INIT_START_MARKER) && sample.init_start_ms.is_none() {
                    sample.init_start_ms = since_spawn();
                }
                if !is_err && line.contains(READY_MARKER) {
                    marker_at = Some(at);
                    // Sample now: the guest is already on its way to power-off.
                    sample.memory = match read_memory(pid, u64::from(setup.memory_mib) * 1024) {
                        Ok(m) => Some(m),
                        Err(e) => {
                            sample.error = Some(format!("reading memory: {e:#}"));
                            None
                        }
                    };
                    sample.kvm_stats = read_kvm_stats(pid);
                }
                console.push(is_err, &line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sample.error = Some(format!(
                    "no `{READY_MARKER}` within {} s",
                    setup.timeout.as_secs()
                ));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                sample.exit_code = status.and_then(|s| s.code());
                sample.error = Some(format!("exited ({status:?}) before `{READY_MARKER}`"));
                break;
            }
        }
    }
    if let Some(at) = marker_at {
        sample.marker_ms = Some(ms(at.duration_since(started)));
        let exit_limit = setup.timeout.min(EXIT_TIMEOUT);
        let exit_deadline = Instant::now() + exit_limit;
        loop {
            while let Ok((_, is_err, line)) = rx.try_recv() {
                console.push(is_err, &line);
            }
            if let Some(status) = child.try_wait()? {
                sample.exit_after_marker_ms = Some(ms(at.elapsed()));
                sample.exit_code = status.code();
                break;
            }
            if Instant::now() >= exit_deadline {
                sample.error = Some(format!(
                    "did not exit within {} s after the marker",
                    exit_limit.as_secs()
                ));
                break;
            }
            std::thread::sleep(EXIT_POLL);
        }
        if sample.error.is_none() && sample.exit_code != Some(0) {
            sample.error = Some(format!(
                "exited with {:?} after the marker (expected 0: guest power-off)",
                sample.exit_code
            ));
        }
    }
    drop(guard);
    while let Ok((_, is_err, line)) = rx.recv_timeout(Duration::from_millis(100)) {
        console.push(is_err, &line);
    }
    let log = setup.work.join(format!("{label}.log"));
    fs::write(&log, console.text()).with_context(|| format!("writing {}", log.display()))?;
    Ok(sample)
}

/// The command for one boot of `which`; our VMM's config file is written under `setup.work`.
fn command(setup: &BootSetup, which: Vmm, label: &str) -> Result<Command> {
    match which {
        Vmm::Ours => {
            let config = serde_json::json!({
                "kernel": setup.kernel,
                "cmdline_extra": CMDLINE_EXTRA,
                "vcpus": setup.vcpus,
                "memory_mib": setup.memory_mib,
                "disks": [{ "path": setup.rootfs, "read_only": true }],
            });
            let path = setup.work.join(format!("{label}.json"));
            fs::write(&path, serde_json::to_string_pretty(&config)?)
                .with_context(|| format!("writing {}", path.display()))?;
            let mut cmd = Command::new(&setup.vmm);
            cmd.arg("--config").arg(path).env("RUST_LOG", OURS_RUST_LOG);
            Ok(cmd)
        }
        Vmm::Qemu => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(qemu_args(setup));
            Ok(cmd)
        }
    }
}

/// QEMU's arguments: `-M microvm` with its defaults (ACPI on, so the guest can power off),
/// KVM, the host CPU, no default devices, the console on stdout, the same kernel via PVH and the
/// rootfs as a read-only virtio-blk-device.
pub fn qemu_args(setup: &BootSetup) -> Vec<String> {
    // QEMU splits option values on commas; a comma in a path is written twice.
    let rootfs = setup.rootfs.to_string_lossy().replace(',', ",,");
    vec![
        "-M".into(),
        "microvm".into(),
        "-enable-kvm".into(),
        "-cpu".into(),
        "host".into(),
        "-smp".into(),
        setup.vcpus.to_string(),
        "-m".into(),
        setup.memory_mib.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        setup.kernel.to_string_lossy().into_owned(),
        "-append".into(),
        format!("{CMDLINE_BASE} {CMDLINE_EXTRA}"),
        "-drive".into(),
        format!("id=root,file={rootfs},format=raw,if=none,readonly=on"),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Kills and reaps the child when dropped, on every path out of [`boot_once`].
struct KillOnDrop<'a>(Option<&'a mut Child>);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Sends each line of `pipe` with its arrival time into `tx`, from a detached thread (a VMM's
/// child could hold the pipe open after the VMM exits; that must not hang the bench).
fn forward_lines(
    pipe: Box<dyn Read + Send>,
    is_err: bool,
    tx: mpsc::Sender<(Instant, bool, String)>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let at = Instant::now();
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            if tx.send((at, is_err, line)).is_err() {
                return;
            }
            buf.clear();
        }
    });
}

/// The run's console (stdout) and diagnostics (stderr), bounded.
#[derive(Default)]
struct Console {
    out: String,
    err: String,
}

impl Console {
    fn push(&mut self, is_err: bool, line: &str) {
        let buf = if is_err { &mut self.err } else { &mut self.out };
        if buf.len() + line.len() < CONSOLE_KEEP {
            buf.push_str(line);
            buf.push('\n');
        }
    }

    fn text(&self) -> String {
        format!(
            "--- stdout (console) ---\n{}--- stderr ---\n{}",
            self.out, self.err
        )
    }
}

/// Reads `/proc/<pid>/smaps` and `VmHWM`, and splits resident memory into guest RAM and the rest.
fn read_memory(pid: u32, guest_ram_kib: u64) -> Result<Memory> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut memory = split_memory(&parse_smaps(&smaps), guest_ram_kib)?;
    memory.hwm_kib = status_kib(&status, "VmHWM").context("no VmHWM in /proc/<pid>/status")?;
    Ok(memory)
}

/// One mapping of `/proc/<pid>/smaps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Start address (host virtual).
    pub start: u64,
    /// The permission column, e.g. `rw-p`.
    pub perms: String,
    /// The header line's path column (empty for plain anonymous memory).
    pub path: String,
    /// The header's inode column.
    pub inode: u64,
    /// `Size`, KiB.
    pub size_kib: u64,
    /// `Rss`, KiB.
    pub rss_kib: u64,
    /// `Pss`, KiB.
    pub pss_kib: u64,
    /// `AnonHugePages`, KiB: the part of `Rss` backed by transparent huge pages.
    pub anon_huge_kib: u64,
}

/// Parses `/proc/<pid>/smaps` (proc(5)): a header line per mapping
/// (`start-end perms offset dev inode [path]`) followed by `Key: value kB` lines.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if is_range(first) {
            let start = first
                .split_once('-')
                .and_then(|(a, _)| u64::from_str_radix(a, 16).ok())
                .unwrap_or(0);
            let perms = words.next().unwrap_or_default().to_string();
            let _offset = words.next();
            let _dev = words.next();
            let inode = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let path = words.collect::<Vec<_>>().join(" ");
            maps.push(Mapping {
                start,
                perms,
                path,
                inode,
                ..Mapping::default()
            });
            continue;
        }
        let Some(current) = maps.last_mut() else {
            continue;
        };
        let value = || words.clone().next().and_then(|w| w.parse::<u64>().ok());
        match first {
            "Size:" => current.size_kib = value().unwrap_or(0),
            "Rss:" => current.rss_kib = value().unwrap_or(0),
            "Pss:" => current.pss_kib = value().unwrap_or(0),
            "AnonHugePages:" => current.anon_huge_kib = value().unwrap_or(0),
            _ => {}
        }
    }
    maps
}

/// `7f00-7f10` style address ranges (the first word of a smaps header line).
fn is_range(word: &str) -> bool {
    match word.split_once('-') {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_hexdigit())
                && b.bytes().all(|c| c.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Whether a mapping is guest RAM: anonymous (no file, no `[heap]`/`[stack]`-style name), and
/// sized like the configured guest RAM (up to [`GUEST_RAM_SLACK_KIB`] more).
///
/// Both VMMs hold a 128 MiB guest in one anonymous mapping of exactly that size: ours through
/// vm-memory (one `mmap` per region; one region below the 3 GiB MMIO gap), QEMU through its RAM
/// block (`qemu_ram_mmap`; its guard page is a separate `PROT_NONE` mapping). Neither merges with a
/// neighbour: vm-memory maps with `MAP_NORESERVE`, QEMU madvises its RAM (`MADV_DONTDUMP`, ...), so
/// their VMA flags differ from ordinary heap mappings. QEMU's firmware ROMs (qboot, the PVH option
/// ROM) are small RAM blocks of their own and count as VMM memory.
fn is_guest_ram(m: &Mapping, guest_ram_kib: u64) -> bool {
    let anonymous = m.inode == 0 && (m.path.is_empty() || m.path.starts_with("[anon:"));
    // Read-write: excludes malloc arenas' PROT_NONE reservations, which can be as large.
    anonymous
        && m.perms.starts_with("rw")
        && m.size_kib >= guest_ram_kib
        && m.size_kib <= guest_ram_kib + GUEST_RAM_SLACK_KIB
}

/// Splits the mappings into guest RAM and VMM memory; fails if no mapping looks like guest RAM, or
/// if the guest-RAM mappings together are more than twice its size (the rule would be wrong).
pub fn split_memory(maps: &[Mapping], guest_ram_kib: u64) -> Result<Memory> {
    let mut m = Memory::default();
    for map in maps {
        m.rss_total_kib += map.rss_kib;
        if is_guest_ram(map, guest_ram_kib) {
            m.guest_rss_kib += map.rss_kib;
            m.guest_anon_huge_kib += map.anon_huge_kib;
            m.guest_offsets_2m.push(map.start % (2 << 20));
            m.guest_mappings_kib.push(map.size_kib);
        } else {
            m.rss_excl_guest_kib += map.rss_kib;
            m.pss_excl_guest_kib += map.pss_kib;
        }
    }
    let excluded: u64 = m.guest_mappings_kib.iter().sum();
    if m.guest_mappings_kib.is_empty() || excluded > 2 * guest_ram_kib {
        let mut biggest: Vec<&Mapping> = maps.iter().collect();
        biggest.sort_by_key(|m| std::cmp::Reverse(m.size_kib));
        let list: Vec<String> = biggest
            .iter()
            .take(5)
            .map(|m| format!("{} KiB {:?} (inode {})", m.size_kib, m.path, m.inode))
            .collect();
        bail!(
            "cannot tell the guest RAM mapping ({guest_ram_kib} KiB) apart; largest mappings: {}",
            list.join(", ")
        );
    }
    Ok(m)
}

/// A `Key:   1234 kB` value from `/proc/<pid>/status`.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The VM's KVM statistics from debugfs (`/sys/kernel/debug/kvm/<pid>-<vm fd>/<stat>`, each file a
/// number, summed over vCPUs), or nothing if debugfs is not mounted or not readable.
fn read_kvm_stats(pid: u32) -> BTreeMap<String, u64> {
    let mut stats = BTreeMap::new();
    let root = Path::new("/sys/kernel/debug/kvm");
    let Ok(entries) = fs::read_dir(root) else {
        return stats;
    };
    let prefix = format!("{pid}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let Ok(files) = fs::read_dir(entry.path()) else {
            continue;
        };
        for file in files.flatten() {
            if !file.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let stat = file.file_name().to_string_lossy().into_owned();
            if let Some(v) = fs::read_to_string(file.path())
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                *stats.entry(stat).or_default() += v;
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 fd:01 1234                       /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
55d0c1000000-55d0c1200000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                1500 kB
Pss:                1500 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Size:             131072 kB
KernelPageSize:        4 kB
Rss:               40000 kB
Pss:               40000 kB
AnonHugePages:     36864 kB
7f0008000000-7f0010000000 ---p 00000000 00:00 0 
Size:             131072 kB
Rss:                   0 kB
Pss:                   0 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Rss:                 100 kB
Pss:                 100 kB
";

    #[test]
    fn smaps_parse_gives_paths_and_sizes() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path, "/usr/bin/qemu-system-x86_64");
        assert_eq!(maps[0].inode, 1234);
        assert_eq!(
            (maps[0].start, maps[0].perms.as_str()),
            (0x55d0_c0a0_0000, "r-xp")
        );
        assert_eq!(
            (maps[0].size_kib, maps[0].rss_kib, maps[0].pss_kib),
            (1024, 800, 400)
        );
        assert_eq!(maps[1].path, "[heap]");
        assert_eq!((maps[2].path.as_str(), maps[2].size_kib), ("", 131_072));
    }

    #[test]
    fn guest_ram_is_the_anonymous_mapping_of_its_size() {
        let m = split_memory(&parse_smaps(SMAPS), 128 * 1024).expect("guest RAM found");
        assert_eq!(m.guest_mappings_kib, vec![131_072]);
        assert_eq!(m.guest_rss_kib, 40_000);
        assert_eq!(m.guest_anon_huge_kib, 36_864);
        assert_eq!(m.guest_offsets_2m, vec![0]);
        assert_eq!(m.rss_excl_guest_kib, 800 + 1500 + 100);
        assert_eq!(m.pss_excl_guest_kib, 400 + 1500 + 100);
        assert_eq!(m.rss_total_kib, 800 + 1500 + 40_000 + 100);
    }

    #[test]
    fn no_guest_sized_mapping_is_an_error() {
        let err = split_memory(&parse_smaps(SMAPS), 256 * 1024).expect_err("no 256 MiB mapping");
        assert!(err.to_string().contains("131072 KiB"), "{err}");
    }

    #[test]
    fn status_values_parse() {
        let status = "Name:\tqemu\nVmPeak:\t  300000 kB\nVmHWM:\t   61234 kB\nVmRSS:\t 60000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(61_234));
        assert_eq!(status_kib(status, "VmRSS"), Some(60_000));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn qemu_gets_the_same_command_line_and_a_read_only_disk() {
        let setup = BootSetup {
            kernel: "/k/vmlinux".into(),
            rootfs: "/r/a,b.ext4".into(),
            vmm: "/v".into(),
            vcpus: 1,
            memory_mib: 128,
            work: "/w".into(),
            timeout: Duration::from_secs(1),
        };
        let args = qemu_args(&setup);
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).expect("flag present");
            args[i + 1].clone()
        };
        assert_eq!(
            after("-append"),
            "console=ttyS0 reboot=k panic=-1 pci=off root=/dev/vda ro init=/sbin/sandbox-test-init quiet"
        );
        assert_eq!(
            after("-drive"),
            "id=root,file=/r/a,,b.ext4,format=raw,if=none,readonly=on"
        );
        assert_eq!((after("-smp"), after("-m")), ("1".into(), "128".into()));
        assert_eq!(after("-M"), "microvm");
    }

    #[test]
    fn the_base_command_line_is_the_vmm_s() {
        let config = std::fs::read_to_string(
            crate::util::workspace_root().join("crates/sandbox-vmm/src/vmm/config.rs"),
        )
        .expect("read the VMM's config.rs");
        assert!(
            config.contains(&format!(
                "pub const BASE_CMDLINE: &str = \"{CMDLINE_BASE}\";"
            )),
            "CMDLINE_BASE must equal sandbox_vmm::vmm::BASE_CMDLINE"
        );
    }
}
