//! The nested test host: where the KVM tier runs when this machine's `/dev/kvm` cannot boot Linux.
//!
//! Our build machines are micro-VMs whose `/dev/kvm` comes from a nested module without SVM/VMX
//! (docs/testing.md, "Where the KVM tier runs"): a tiny real-mode guest runs, a Linux kernel dies. QEMU in TCG mode emulating an
//! EPYC with `+svm,+npt` does give a working KVM once Debian's `kvm-amd` is loaded inside it. So:
//!
//! 1. [`ensure`] fetches Debian's generic kernel package (the version `linux-image-amd64` depends
//!    on) with `apt-get download`, takes its `vmlinuz` and builds an initramfs (cpio newc) of
//!    busybox-static, the modules in [`MODULES`] with their dependencies from `modules.dep`, and
//!    `resources/testhost/init`. Cached under `<cache>/testhost/<hash of the inputs>/`.
//! 2. [`run`] writes the caller's script as `run.sh` into a per-run scratch directory and boots
//!    QEMU. The init loads the modules, mounts this machine's root read-only over virtio-9p, the
//!    scratch directory (writable, a second 9p share) at its own absolute path, tmpfs on `/tmp` and
//!    `/run`, chroots into the root and runs `run.sh`, so the test binaries see the same userland
//!    and paths as on the host. The console streams to the caller and a log file; the exit status
//!    comes back in `<scratch>/status`. An overall timeout kills QEMU: a hung guest is a failed run.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure as check, Context, Result};

use crate::util;

/// The test host's init script (PID 1 of the initramfs).
const INIT: &str = include_str!("../../resources/testhost/init");

/// Modules the test host loads, by name; their dependencies are added from `modules.dep` and all
/// are loaded dependencies first. Built-in ones (`modules.builtin`) are skipped.
///
/// virtio-pci and 9p carry the two shares; kvm-amd gives `/dev/kvm` (it pulls in kvm, irqbypass and
/// ccp); tun, veth, nf_tables and overlay are for the network and storage tiers; the nft_*
/// expressions, conntrack and NAT are what a sandbox's netns rules use (masquerade, DNS
/// redirection, reject, logged denials, rate limits), and conntrack's netlink interface tells a
/// DNS deny event which address the guest really asked.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm-amd",
    "tun",
    "veth",
    "nf_tables",
    "overlay",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_redir",
    "nft_reject_inet",
    "nft_fib_inet",
    "nft_log",
    "nfnetlink_log",
    "nft_limit",
];

/// Bumped whenever the way the initramfs is put together changes, so that cached ones are rebuilt.
const RECIPE_VERSION: &str = "3";

/// Debian packages the test host needs on the build machine.
const PACKAGES: &[&str] = &[
    // qemu-system-x86 comes from `ensure_qemu` (on bookworm from bookworm-backports).
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
];

/// A ready test host: the kernel and initramfs to boot.
#[derive(Debug, Clone)]
pub struct TestHost {
    /// Debian's generic kernel (`bzImage`), e.g. from `linux-image-6.1.0-57-amd64`.
    pub kernel: PathBuf,
    /// cpio newc archive: busybox-static, the modules, `/init`.
    pub initramfs: PathBuf,
    /// `<package> <version>`, for messages.
    pub kernel_package: String,
    /// The QEMU that runs it, e.g. `QEMU 10.0`, for messages.
    pub qemu: String,
}

/// How to run the test host.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// vCPUs (`-smp`).
    pub cpus: u32,
    /// Guest RAM in MiB. The KVM-tier tests copy a guest rootfs (about 1 GiB) into the test host's
    /// tmpfs, so this is several GiB; TCG allocates it lazily.
    pub mem_mib: u64,
    /// Wall-clock limit for the whole boot-run-poweroff; QEMU is killed when it passes.
    pub timeout: Duration,
    /// Paths the run reads from this machine (checkout, target dir, caches). The test host puts
    /// a tmpfs on `/tmp`; these stay visible even if they lie under `/tmp`.
    pub keep: Vec<PathBuf>,
}

/// What a test host run did.
#[derive(Debug)]
pub struct RunOutcome {
    /// `run.sh`'s exit status as the init reported it; `None` if it never did (timeout, crash).
    pub exit: Option<i32>,
    /// The overall timeout fired.
    pub timed_out: bool,
    /// Time from starting QEMU to the init's `testhost: ready` line.
    pub ready_after: Option<Duration>,
    /// Time from starting QEMU to its exit.
    pub elapsed: Duration,
}

/// Builds (or finds in the cache) the test host's kernel and initramfs; installs the Debian
/// packages it needs first.
pub fn ensure() -> Result<TestHost> {
    util::apt_install(PACKAGES)?;
    ensure_qemu()?;
    let (qemu_major, qemu_minor) = qemu_version()?;
    let (package, version) = kernel_package()?;
    let busybox = Path::new("/bin/busybox");
    let key = util::hash_parts([
        RECIPE_VERSION.as_bytes(),
        package.as_bytes(),
        version.as_bytes(),
        INIT.as_bytes(),
        MODULES.join(",").as_bytes(),
        util::hash_file(busybox)?.as_bytes(),
    ]);
    let dir = util::cache_dir().join("testhost").join(&key[..16]);
    let host = TestHost {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        kernel_package: format!("{package} {version}"),
        qemu: format!("QEMU {qemu_major}.{qemu_minor}"),
    };
    if host.kernel.is_file() && host.initramfs.is_file() {
        return Ok(host);
    }

    let started = Instant::now();
    eprintln!(
        "xtask: building the test host ({package} {version}) in {}",
        dir.display()
    );
    let work = util::cache_dir()
        .join("testhost")
        .join(format!("build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = build(&work, &package, &version, busybox, &dir);
    let _ = fs::remove_dir_all(&work);
    result?;
    eprintln!(
        "xtask: test host built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(host)
}

/// The oldest QEMU the test host runs on. QEMU 7.2 (Debian bookworm's) keeps a linked list of
/// translation blocks per guest page and walks it on every store to a page that held code; in
/// the test host that made single 4 KiB page clears take tens of seconds and 2 MiB clears
/// minutes (soft lockups, docs/testing.md "Emulation stalls"). QEMU 8.0 replaced those lists
/// with per-page interval trees (`accel/tcg/tb-maint.c`).
const MIN_QEMU_MAJOR: u32 = 8;

/// The installed `qemu-system-x86_64`'s version, e.g. `(10, 0)`.
pub fn qemu_version() -> Result<(u32, u32)> {
    let out = util::output(Command::new("qemu-system-x86_64").arg("--version"))?;
    parse_qemu_version(&out).with_context(|| {
        format!("cannot read a version from `qemu-system-x86_64 --version`: {out}")
    })
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Makes sure `qemu-system-x86_64` is installed and at least [`MIN_QEMU_MAJOR`].
///
/// On Debian bookworm (QEMU 7.2) it installs `qemu-system-x86` and `qemu-utils` from Debian's
/// `bookworm-backports` suite, adding that suite to apt's sources with the same archive URI the
/// machine already uses for bookworm (backports are pinned below the release by default, so
/// nothing else is upgraded). Both come from there together: a machine may already hold
/// backports' `qemu-utils`, which breaks bookworm's `qemu-system-common`, so installing
/// bookworm's `qemu-system-x86` beside it fails. Elsewhere a missing QEMU is installed with apt.
pub fn ensure_qemu() -> Result<()> {
    let installed = qemu_version().ok();
    if let Some((major, _)) = installed {
        if major >= MIN_QEMU_MAJOR {
            return Ok(());
        }
    }
    let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap_or("")
        .trim_matches('"');
    if codename != "bookworm" {
        if let Some((major, minor)) = installed {
            bail!(
                "QEMU {major}.{minor} is too old for the nested test host (it needs \
                 {MIN_QEMU_MAJOR}.0 or newer: older TCG stalls for minutes on stores to pages \
                 that held code, docs/testing.md); install a newer qemu-system-x86"
            );
        }
        util::apt_install(&["qemu-system-x86"])?;
        let (major, minor) = qemu_version()?;
        check!(
            major >= MIN_QEMU_MAJOR,
            "the installed qemu-system-x86 is {major}.{minor}; the nested test host needs \
             {MIN_QEMU_MAJOR}.0 or newer"
        );
        return Ok(());
    }
    match installed {
        Some((major, minor)) => eprintln!(
            "xtask: QEMU {major}.{minor} is too old for the test host; installing \
             qemu-system-x86 from bookworm-backports"
        ),
        None => eprintln!("xtask: installing qemu-system-x86 from bookworm-backports"),
    }
    let list = Path::new("/etc/apt/sources.list.d/sandbox-sdk-bookworm-backports.sources");
    if !list.exists() {
        let uri = debian_archive_uri().context(
            "finding the Debian archive URI in /etc/apt/sources.list{,.d} to add bookworm-backports",
        )?;
        fs::write(
            list,
            format!(
                "# Added by `cargo xtask` (xtask/src/testhost.rs): QEMU >= {MIN_QEMU_MAJOR} for the nested test host.\n\
                 Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("writing {}", list.display()))?;
    }
    util::run(Command::new("apt-get").args(["update", "-q"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(["-t", "bookworm-backports", "qemu-system-x86", "qemu-utils"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    let (major, minor) = qemu_version()?;
    check!(
        major >= MIN_QEMU_MAJOR,
        "qemu-system-x86 from bookworm-backports is {major}.{minor}, still older than {MIN_QEMU_MAJOR}.0"
    );
    eprintln!("xtask: QEMU {major}.{minor} installed");
    Ok(())
}

/// The URI of the Debian archive this machine's apt uses for its release (deb822 `.sources` or
/// one-line `sources.list` format), skipping the security archive.
fn debian_archive_uri() -> Result<String> {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d"] {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                    texts.push(fs::read_to_string(&p).unwrap_or_default());
                }
            }
        }
    }
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    texts
        .iter()
        .find_map(|t| archive_uri_in(t))
        .context("no apt source names the Debian archive for bookworm")
}

/// The archive URI of the first entry for suite `bookworm` in `text` (deb822 stanzas or
/// one-line entries).
fn archive_uri_in(text: &str) -> Option<String> {
    // deb822: stanzas separated by blank lines.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == "bookworm") {
                return uris.split_whitespace().next().map(str::to_string);
            }
        }
    }
    // One-line format: `deb [options] URI SUITE COMPONENTS...`.
    text.lines().find_map(|l| {
        // Drop an `[arch=... signed-by=...]` option block, which may contain spaces.
        let l = match (l.find('['), l.find(']')) {
            (Some(a), Some(b)) if a < b => format!("{}{}", &l[..a], &l[b + 1..]),
            _ => l.to_string(),
        };
        let mut words = l.split_whitespace();
        (words.next()? == "deb").then_some(())?;
        let uri = words.next()?.to_string();
        (words.next()? == "bookworm").then_some(uri)
    })
}

/// The kernel package `linux-image-amd64` depends on, and its candidate version.
fn kernel_package() -> Result<(String, String)> {
    let query = || -> Result<(String, String)> {
        let deps = util::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-"))
            .context("linux-image-amd64 depends on no linux-image-* package")?
            .to_string();
        let show =
            util::output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("apt-cache show {package} gives no version"))?;
        Ok((package, version))
    };
    match query() {
        Ok(found) => Ok(found),
        Err(_) => {
            // Fresh machines have no package lists yet.
            util::run(Command::new("apt-get").args(["update", "-q"]))?;
            query().context("finding Debian's generic kernel package (linux-image-amd64)")
        }
    }
}

/// Downloads and unpacks the kernel package in `work`, then writes `vmlinuz` and
/// `initramfs.cpio` into `dest` (atomically, via a rename of the whole directory).
fn build(work: &Path, package: &str, version: &str, busybox: &Path, dest: &Path) -> Result<()> {
    // `apt-get download` writes into the current directory; the .deb is kept for the next build.
    let debs = util::cache_dir().join("testhost").join("debs");
    fs::create_dir_all(&debs)?;
    let deb_name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let deb = debs.join(&deb_name);
    if !deb.is_file() {
        util::run(
            Command::new("apt-get")
                .args(["download", &format!("{package}={version}")])
                .current_dir(&debs),
        )?;
        check!(
            deb.is_file(),
            "apt-get download did not produce {}",
            deb.display()
        );
    }
    let root = work.join("pkg");
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let kver = package
        .strip_prefix("linux-image-")
        .context("kernel package name starts with linux-image-")?;
    let moddir = root.join("lib/modules").join(kver);
    // Debian ships no modules.dep; depmod makes it from the modules themselves.
    util::run(Command::new("depmod").arg("-b").arg(&root).arg(kver))?;

    let staging = work.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "host", "lib/modules", "tmp"] {
        fs::create_dir_all(staging.join(d))?;
    }
    fs::copy(busybox, staging.join("bin/busybox"))?;
    let init = staging.join("init");
    fs::write(&init, INIT)?;
    set_mode(&init, 0o755)?;

    let order = module_load_order(&moddir, MODULES)?;
    let mut names = Vec::new();
    for rel in &order {
        let src = moddir.join(rel);
        let file = src
            .file_name()
            .context("module path has a file name")?
            .to_string_lossy();
        let name = file
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .trim_end_matches(".gz")
            .to_string();
        let dst = staging.join("lib/modules").join(&name);
        // busybox insmod takes plain .ko files only.
        let decompress = if file.ends_with(".xz") {
            Some("xz")
        } else if file.ends_with(".zst") {
            Some("zstd")
        } else if file.ends_with(".gz") {
            Some("gzip")
        } else {
            None
        };
        match decompress {
            Some(tool) => {
                let out = Command::new(tool)
                    .arg("-dc")
                    .arg(&src)
                    .output()
                    .with_context(|| format!("running {tool}"))?;
                check!(out.status.success(), "{tool} -dc {} failed", src.display());
                fs::write(&dst, out.stdout)?;
            }
            None => {
                fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            }
        }
        names.push(name);
    }
    fs::write(staging.join("modules.order"), names.join("\n") + "\n")?;

    let out_dir = work.join("out");
    fs::create_dir_all(&out_dir)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{kver}"));
    fs::copy(&vmlinuz, out_dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    let cpio = out_dir.join("initramfs.cpio");
    // Sorted names make the archive reproducible for the same inputs.
    util::run(
        Command::new("sh")
            .arg("-c")
            .arg("find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 > \"$1\"")
            .arg("sh")
            .arg(&cpio)
            .current_dir(&staging),
    )?;
    fs::write(out_dir.join("modules.txt"), order.join("\n") + "\n")?;
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    // A concurrent run may have finished the same build first; its result is as good as ours.
    if dest.join("vmlinuz").is_file() && dest.join("initramfs.cpio").is_file() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dest);
    fs::rename(&out_dir, dest)
        .with_context(|| format!("moving the test host to {}", dest.display()))?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Module file names (relative to `moddir`) to load for `wanted`, dependencies first, each once.
///
/// Hard dependencies come from `modules.dep` (which lists a module's whole closure, the deepest
/// last); soft `pre:` dependencies from `modules.softdep` (e.g. libcrc32c needs the crc32c cipher,
/// which the kernel would otherwise try to load through a modprobe the initramfs lacks), resolved
/// through `modules.alias`, preferring the portable `*_generic` implementation.
fn module_load_order(moddir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let read = |name: &str| fs::read_to_string(moddir.join(name)).unwrap_or_default();
    let dep_text = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", moddir.display()))?;
    let builtin: BTreeSet<String> = read("modules.builtin").lines().map(module_name).collect();
    let mut deps = std::collections::BTreeMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let list: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(module), (module.to_string(), list));
    }
    let mut softdeps: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for line in read("modules.softdep").lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let mut pre = false;
        for w in words {
            match w {
                "pre:" => pre = true,
                "post:" => pre = false,
                name if pre => softdeps
                    .entry(module_name(module))
                    .or_default()
                    .push(name.to_string()),
                _ => {}
            }
        }
    }
    let alias_text = read("modules.alias");
    let resolve = |name: &str| -> Option<String> {
        let key = name.replace('-', "_");
        if deps.contains_key(&key) || builtin.contains(&key) {
            return Some(key);
        }
        let targets: Vec<String> = alias_text
            .lines()
            .filter_map(|l| l.strip_prefix("alias "))
            .filter_map(|l| l.split_once(' '))
            .filter(|(a, _)| *a == name)
            .map(|(_, m)| m.replace('-', "_"))
            .collect();
        targets
            .iter()
            .find(|m| m.ends_with("_generic"))
            .or(targets.first())
            .cloned()
    };

    let mut order: Vec<String> = Vec::new();
    let mut visiting = BTreeSet::new();
    #[allow(clippy::too_many_arguments)]
    fn add(
        key: &str,
        deps: &std::collections::BTreeMap<String, (String, Vec<String>)>,
        softdeps: &std::collections::BTreeMap<String, Vec<String>>,
        builtin: &BTreeSet<String>,
        resolve: &dyn Fn(&str) -> Option<String>,
        visiting: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if builtin.contains(key) || !visiting.insert(key.to_string()) {
            return Ok(());
        }
        let (path, list) = deps
            .get(key)
            .with_context(|| format!("module {key} is neither in modules.dep nor built in"))?;
        // Each module's soft pre-dependencies, then its hard ones (deepest first), then itself.
        let closure: Vec<&String> = list.iter().rev().chain(std::iter::once(path)).collect();
        for member in closure {
            let member_key = module_name(member);
            for soft in softdeps.get(&member_key).into_iter().flatten() {
                if let Some(soft_key) = resolve(soft) {
                    add(&soft_key, deps, softdeps, builtin, resolve, visiting, order)?;
                }
            }
            if !order.contains(member) {
                order.push(member.clone());
            }
        }
        Ok(())
    }
    for want in wanted {
        let key = want.replace('-', "_");
        add(
            &key,
            &deps,
            &softdeps,
            &builtin,
            &resolve,
            &mut visiting,
            &mut order,
        )?;
    }
    Ok(order)
}

/// `kernel/arch/x86/kvm/kvm-amd.ko.xz` -> `kvm_amd` (the kernel treats `-` and `_` alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Boots the test host, runs `script` (a /bin/sh script, run as root in a chroot of this machine's
/// root with `TMPDIR`-able tmpfs on `/tmp`) and returns its exit status.
///
/// `scratch` is an empty per-run directory (writable, shared into the test host at the same path;
/// the script may leave files there); the console goes to `on_line` and to `log`.
pub fn run(
    host: &TestHost,
    scratch: &Path,
    script: &str,
    config: &RunConfig,
    log: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunOutcome> {
    let scratch = scratch
        .canonicalize()
        .with_context(|| format!("resolving {}", scratch.display()))?;
    let scratch_str = scratch.to_str().context("scratch path is UTF-8")?;
    check!(
        !scratch_str.contains(char::is_whitespace) && !scratch_str.contains(','),
        "the scratch path {scratch_str} must not contain spaces or commas (kernel command line, -virtfs)"
    );
    // Directories only (a file's parent), and none inside another: each becomes one bind mount.
    let mut dirs: Vec<PathBuf> = config
        .keep
        .iter()
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .map(|p| match p.is_dir() {
            true => p,
            false => p.parent().map(Path::to_path_buf).unwrap_or(p),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let outer: Vec<PathBuf> = dirs
        .iter()
        .filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o)))
        .cloned()
        .collect();
    let mut keep = Vec::new();
    for path in outer {
        let text = path.to_str().context("kept path is UTF-8")?.to_string();
        check!(
            !text.contains(char::is_whitespace) && !text.contains(','),
            "the path {text} must not contain spaces or commas (kernel command line)"
        );
        keep.push(text);
    }
    fs::write(scratch.join("run.sh"), script)?;
    let _ = fs::remove_file(scratch.join("status"));

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "EPYC,+svm,+npt"])
        .args(["-smp", &config.cpus.to_string()])
        .args(["-m", &config.mem_mib.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&host.kernel)
        .arg("-initrd")
        .arg(&host.initramfs)
        .args([
            "-append",
            &format!(
                "console=ttyS0 panic=-1 quiet sandbox_scratch={scratch_str} sandbox_keep={}",
                keep.join(",")
            ),
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .args([
            "-virtfs",
            &format!("local,path={scratch_str},mount_tag=scratch,security_model=none"),
        ]);

    let mut log_file =
        fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut ready_after = None;
    let mut reported_exit = None;
    let outcome = stream(&mut cmd, Some(config.timeout), &mut |line| {
        use std::io::Write;
        let _ = writeln!(log_file, "{line}");
        // QEMU lists every EPYC feature TCG cannot emulate; they are harmless and kept in the log.
        if line.contains("TCG doesn't support requested feature") {
            return Flow::Continue;
        }
        if ready_after.is_none() && line.starts_with("testhost: ready") {
            ready_after = Some(started.elapsed());
        }
        if let Some(code) = line.strip_prefix("testhost: exit=") {
            reported_exit = code.split_whitespace().next().and_then(|c| c.parse().ok());
        }
        on_line(line);
        Flow::Continue
    })?;
    let status_file = fs::read_to_string(scratch.join("status")).ok();
    let exit = status_file
        .and_then(|s| s.trim().parse().ok())
        .or(reported_exit);
    Ok(RunOutcome {
        exit,
        timed_out: outcome.timed_out,
        ready_after,
        elapsed: started.elapsed(),
    })
}

/// What [`stream`]'s line callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Kill the process now (the caller has seen what it needed).
    Stop,
}

/// How a [`stream`]ed process ended.
#[derive(Debug)]
pub struct Streamed {
    /// Its exit status (after a kill, the status of the killed process).
    pub status: ExitStatus,
    /// The timeout fired and the process was killed.
    pub timed_out: bool,
}

/// Runs `cmd` with stdin closed, handing each line of its stdout and stderr (ANSI codes kept,
/// `\r` dropped) to `on_line` as it arrives; kills it when `timeout` passes or `on_line` says
/// [`Flow::Stop`].
pub fn stream(
    cmd: &mut Command,
    timeout: Option<Duration>,
    on_line: &mut dyn FnMut(&str) -> Flow,
) -> Result<Streamed> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout was set to piped");
    let stderr = child.stderr.take().expect("stderr was set to piped");
    // Reader threads are detached: a grandchild that inherited a pipe may hold it open after the
    // child is gone, and that must not hang us.
    for pipe in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                if tx.send(line.trim_end_matches('\n').to_string()).is_err() {
                    return;
                }
                buf.clear();
            }
        });
    }
    drop(tx);

    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let mut stopped = false;
    loop {
        let wait = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left.min(Duration::from_millis(500)),
                None => {
                    timed_out = true;
                    break;
                }
            },
            None => Duration::from_millis(500),
        };
        match rx.recv_timeout(wait) {
            Ok(line) => {
                if on_line(&line) == Flow::Stop {
                    stopped = true;
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait()?.is_some() {
                    // Drain what is still buffered, briefly: the pipes may be held by others.
                    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                        if on_line(&line) == Flow::Stop {
                            break;
                        }
                    }
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out || stopped {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for the child")?;
    Ok(Streamed { status, timed_out })
}

/// Fails unless `outcome` says the script ran and exited 0; the message points at the log.
pub fn check_outcome(outcome: &RunOutcome, config: &RunConfig, log: &Path) -> Result<()> {
    if outcome.timed_out {
        bail!(
            "the test host did not finish within {} s and was killed; console log: {}",
            config.timeout.as_secs(),
            log.display()
        );
    }
    match outcome.exit {
        Some(0) => Ok(()),
        Some(code) => bail!(
            "the test host's run exited {code}; console log: {}",
            log.display()
        ),
        None => bail!(
            "the test host stopped without reporting an exit status; console log: {}",
            log.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"
            ),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("qemu: command not found"), None);
    }

    #[test]
    fn the_archive_uri_is_found_in_both_source_formats() {
        let deb822 =
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            archive_uri_in(deb822).as_deref(),
            Some("http://mirror.invalid/debian")
        );
        let security_first =
            "Types: deb\nURIs: http://s.invalid/debian-security\nSuites: bookworm-security\n\n\
                              Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm\n";
        assert_eq!(
            archive_uri_in(security_first).as_deref(),
            Some("http://m.invalid/debian")
        );
        let one_line =
            "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.invalid/debian bookworm main\n";
        assert_eq!(
            archive_uri_in(one_line).as_deref(),
            Some("http://m.invalid/debian")
        );
        assert_eq!(
            archive_uri_in("deb http://m.invalid/debian trixie main\n"),
            None
        );
    }

    #[test]
    fn module_names_normalise_dashes_and_compression() {
        assert_eq!(module_name("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(
            module_name("kernel/net/9p/9pnet_virtio.ko.zst"),
            "9pnet_virtio"
        );
    }

    #[test]
    fn load_order_puts_dependencies_first_and_skips_builtins() {
        let dir = std::env::temp_dir().join(format!("xtask-moddep-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        fs::write(
            dir.join("modules.dep"),
            "kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
             kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
             kernel/virt/lib/irqbypass.ko:\n\
             kernel/drivers/crypto/ccp/ccp.ko:\n\
             kernel/drivers/net/tun.ko:\n\
             kernel/lib/libcrc32c.ko:\n\
             kernel/crypto/crc32c_generic.ko:\n\
             kernel/arch/x86/crypto/crc32c-intel.ko:\n\
             kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko\n",
        )
        .expect("write modules.dep");
        fs::write(
            dir.join("modules.softdep"),
            "softdep libcrc32c pre: crc32c\n",
        )
        .expect("write modules.softdep");
        fs::write(
            dir.join("modules.alias"),
            "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n",
        )
        .expect("write modules.alias");
        fs::write(
            dir.join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .expect("write modules.builtin");
        let order = module_load_order(&dir, &["kvm-amd", "overlay", "tun", "kvm", "nf_tables"])
            .expect("all modules resolve");
        fs::remove_dir_all(&dir).expect("remove temp dir");
        assert_eq!(
            order,
            [
                "kernel/virt/lib/irqbypass.ko",
                "kernel/arch/x86/kvm/kvm.ko",
                "kernel/drivers/crypto/ccp/ccp.ko",
                "kernel/arch/x86/kvm/kvm-amd.ko",
                "kernel/drivers/net/tun.ko",
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_tables.ko",
            ]
        );
    }

    #[test]
    fn unknown_module_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xtask-moddep-missing-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        fs::write(dir.join("modules.dep"), "kernel/drivers/net/tun.ko:\n").expect("write");
        let result = module_load_order(&dir, &["no_such_module"]);
        fs::remove_dir_all(&dir).expect("remove temp dir");
        let err = result.expect_err("an unknown module cannot be resolved");
        assert!(err.to_string().contains("no_such_module"), "{err}");
    }
}
