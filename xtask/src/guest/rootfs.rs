//! The guest root file system: a raw ext4 image of a Debian bookworm minbase.
//!
//! Two cache levels, because debootstrap is the slow part and the init files change often:
//! 1. `rootfs-base-<key16>/base.ext4`: `debootstrap --variant=minbase` into a tree, a few
//!    settings (hostname, resolv.conf placeholder...), timestamps pinned, then
//!    `mkfs.ext4 -d tree`. Keyed by suite, mirror, package list, size and recipe version.
//! 2. `rootfs-<key16>/rootfs.ext4`: a sparse copy of the base with our init files written in by
//!    `debugfs -w`, then checked with `e2fsck -fn`. Keyed by the base's key and the injected
//!    files' paths, modes and SHA-256s.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{agent_binary, cache, resource};
use crate::util;

/// Default image size in MiB: room for python3, git and an agent's scratch work.
pub const DEFAULT_SIZE_MIB: u32 = 1024;
/// Bump when the base recipe changes in a way that changes the output.
const BASE_RECIPE_VERSION: &str = "rootfs-base-recipe-2";
/// Bump when the injection recipe changes in a way that changes the output.
const IMAGE_RECIPE_VERSION: &str = "rootfs-image-recipe-3";
/// The Debian release the guest runs.
const DEFAULT_SUITE: &str = "bookworm";
/// What every image has, beyond minbase (which already has coreutils and bash, listed anyway so
/// that the promise is written down in one place).
const BASE_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "python3",
    "sqlite3",
    "git",
    "ca-certificates",
];
/// The host tools this recipe runs.
const HOST_PACKAGES: &[&str] = &["debootstrap", "debian-archive-keyring", "e2fsprogs"];
/// Every timestamp in the image, for reproducibility: 2024-01-01T00:00:00Z.
const EPOCH: u64 = 1_704_067_200;
/// [`EPOCH`] as debugfs `set_inode_field` parses times (YYYYMMDDHHMMSS, UTC); a bare number is
/// read as a date, not as seconds.
const EPOCH_DEBUGFS: &str = "20240101000000";
/// The guest's host name.
const HOSTNAME: &str = "sandbox";
/// The ext4 volume label.
const LABEL: &str = "sandbox-root";
/// One inode per 8 KiB (mke2fs's default is 16 KiB): source trees and package caches are many
/// small files.
const BYTES_PER_INODE: u32 = 8192;
/// Smallest image we accept; minbase + python3 + git is about 400 MiB.
const MIN_SIZE_MIB: u32 = 512;
/// Largest image we accept (the file is sparse, but the number should stay sane).
const MAX_SIZE_MIB: u32 = 64 * 1024;

/// What to put in the rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsConfig {
    /// File system capacity in MiB (the image file is sparse).
    pub size_mib: u32,
    /// Debian packages on top of [`BASE_PACKAGES`].
    pub extra_packages: Vec<String>,
    /// Debian suite (release code name).
    pub suite: String,
}

impl Default for RootfsConfig {
    fn default() -> Self {
        Self {
            size_mib: DEFAULT_SIZE_MIB,
            extra_packages: Vec::new(),
            suite: DEFAULT_SUITE.to_string(),
        }
    }
}

impl RootfsConfig {
    /// The sorted, deduplicated package list, after checking every name is a Debian package name
    /// (they end up in a debootstrap argument).
    fn packages(&self) -> Result<Vec<String>> {
        let mut all: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
        for p in &self.extra_packages {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            if !is_package_name(p) {
                bail!("{p:?} is not a Debian package name");
            }
            all.push(p.to_string());
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

/// Debian policy §5.6.7: lower-case letters, digits, `+`, `-`, `.`; at least two characters,
/// starting with a letter or digit.
fn is_package_name(name: &str) -> bool {
    name.len() >= 2
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// A file written into the image.
#[derive(Debug)]
struct Injected {
    /// Absolute path in the guest, under `/usr/sbin` (bookworm is merged-/usr: `/sbin` links
    /// there).
    guest_path: &'static str,
    /// The file on the host.
    host_path: PathBuf,
    /// Permission bits.
    mode: u32,
}

/// The init files, as docs/guest.md lists them: the test init always, and `/sbin/init` = the
/// agent if it has been built, else the test init.
fn injected_files() -> Vec<Injected> {
    let test_init = resource("sandbox-test-init");
    let init = agent_binary().unwrap_or_else(|| test_init.clone());
    vec![
        Injected {
            guest_path: "/usr/sbin/sandbox-test-init",
            host_path: test_init,
            mode: 0o755,
        },
        Injected {
            guest_path: "/usr/sbin/init",
            host_path: init,
            mode: 0o755,
        },
    ]
}

/// Returns the cached final image, building the base and/or the image first if missing, stale
/// or `force`d.
pub fn ensure(cfg: &RootfsConfig, force: bool) -> Result<PathBuf> {
    let _lock = cache::lock("rootfs")?;
    if !(MIN_SIZE_MIB..=MAX_SIZE_MIB).contains(&cfg.size_mib) {
        bail!(
            "rootfs size {} MiB is outside {MIN_SIZE_MIB}..={MAX_SIZE_MIB} MiB",
            cfg.size_mib
        );
    }
    let packages = cfg.packages()?;
    util::apt_install(HOST_PACKAGES)?;
    let mirror = host_mirror(&cfg.suite)?;

    let base_key = util::hash_parts([
        "sandbox-guest-rootfs-base",
        BASE_RECIPE_VERSION,
        &cfg.suite,
        &mirror,
        &packages.join(","),
        &cfg.size_mib.to_string(),
    ]);
    // The image is keyed by the base's key rather than its content hash, so that reusing a valid
    // image costs one SHA-256 pass over one image, not two; the base is looked at only when the
    // image has to be (re)built.
    let files = injected_files();
    let mut parts = vec![
        "sandbox-guest-rootfs".to_string(),
        IMAGE_RECIPE_VERSION.to_string(),
        base_key.clone(),
    ];
    let mut file_inputs = Vec::new();
    for f in &files {
        let sha = util::sha256_file(&f.host_path)?;
        parts.extend([
            f.guest_path.to_string(),
            format!("{:o}", f.mode),
            sha.clone(),
        ]);
        file_inputs.push(json!({
            "guest_path": f.guest_path,
            "host_path": f.host_path,
            "mode": format!("{:o}", f.mode),
            "sha256": sha,
        }));
    }
    let key = util::hash_parts(&parts);
    if !force {
        if let Some(hit) = cache::lookup("rootfs", &key, "rootfs.ext4")? {
            eprintln!("xtask: rootfs: cached {}", hit.path.display());
            return Ok(hit.path);
        }
    }

    let base = match (force, cache::lookup("rootfs-base", &base_key, "base.ext4")?) {
        (false, Some(hit)) => {
            eprintln!("xtask: rootfs: cached base {}", hit.path.display());
            hit
        }
        _ => build_base(cfg, &packages, &mirror, &base_key)?,
    };
    let inputs = json!({
        "recipe": IMAGE_RECIPE_VERSION,
        "base": base.path,
        "base_key": base_key,
        "base_sha256": base.sha256,
        "files": file_inputs,
    });
    build_image(&base.path, &files, &key, inputs)
}

/// Stage 1: debootstrap a tree, settle it, and make the base ext4 image from it.
fn build_base(
    cfg: &RootfsConfig,
    packages: &[String],
    mirror: &str,
    key: &str,
) -> Result<cache::Cached> {
    eprintln!(
        "xtask: rootfs: debootstrap {} from {mirror} with {} (takes minutes)",
        cfg.suite,
        packages.join(" ")
    );
    let staging = cache::staging("rootfs-base", key)?;
    let tree = staging.join("tree");
    let log =
        |step: &str| cache::log_path(&format!("rootfs-base-{}-{step}.log", cache::short(key)));
    util::run_logged(
        Command::new("debootstrap")
            .args(["--variant=minbase", "--merged-usr", "--components=main"])
            .arg(format!("--include={}", packages.join(",")))
            .arg(&cfg.suite)
            .arg(&tree)
            .arg(mirror),
        "rootfs: debootstrap",
        &log("debootstrap"),
    )?;
    settle_tree(&tree).context("configuring the debootstrap tree")?;
    util::run_logged(
        Command::new("find")
            .arg(&tree)
            .args(["-exec", "touch", "--no-dereference"])
            .arg(format!("--date=@{EPOCH}"))
            .args(["{}", "+"]),
        "rootfs: pinning timestamps",
        &log("touch"),
    )?;

    let image = staging.join("base.ext4");
    let file = fs::File::create(&image).with_context(|| format!("creating {}", image.display()))?;
    file.set_len(u64::from(cfg.size_mib) * 1024 * 1024)?;
    drop(file);
    let uuid = uuid_from_key(key);
    util::run_logged(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-i", &BYTES_PER_INODE.to_string()])
            .args(["-L", LABEL, "-U", &uuid])
            .arg("-E")
            .arg(format!("root_owner=0:0,hash_seed={uuid}"))
            .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string())
            .arg("-d")
            .arg(&tree)
            .arg(&image),
        "rootfs: mkfs.ext4 -d",
        &log("mkfs"),
    )?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    let inputs = json!({
        "recipe": BASE_RECIPE_VERSION,
        "suite": cfg.suite,
        "mirror": mirror,
        "packages": packages,
        "size_mib": cfg.size_mib,
    });
    let hit = cache::commit(&staging, "rootfs-base", key, "base.ext4", inputs)?;
    eprintln!("xtask: rootfs: built base {}", hit.path.display());
    Ok(hit)
}

/// Host name, resolver placeholder, root's home, an empty machine id, no package caches.
fn settle_tree(tree: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = tree.join(rel);
        // resolv.conf may be a dangling symlink; replace whatever is there.
        if path.symlink_metadata().is_ok() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("etc/hostname", &format!("{HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!("127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    )?;
    write(
        "etc/resolv.conf",
        "# Placeholder: the sandbox agent writes the resolver for the sandbox's network here.\n",
    )?;
    write(
        "etc/fstab",
        "# The kernel mounts the root file system (root=/dev/vda rw); init mounts the rest.\n",
    )?;
    // An empty machine-id keeps images identical; nothing in minbase needs a real one.
    write("etc/machine-id", "")?;
    let root_home = tree.join("root");
    fs::create_dir_all(&root_home)?;
    fs::set_permissions(&root_home, fs::Permissions::from_mode(0o700))?;
    // Package caches and logs are dead weight in a throwaway guest.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists", "var/log"] {
        let dir = tree.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let e = e?;
            let path = e.path();
            if e.file_type()?.is_dir() {
                if path.file_name().is_some_and(|n| n == "partial") {
                    continue;
                }
                fs::remove_dir_all(&path)?;
            } else if path.file_name().is_some_and(|n| n != "lock") {
                fs::remove_file(&path)?;
            }
        }
    }
    for file in [
        "var/cache/ldconfig/aux-cache",
        "var/cache/debconf/templates.dat-old",
    ] {
        let _ = fs::remove_file(tree.join(file));
    }
    Ok(())
}

/// Stage 2: copy the base, write the init files in with debugfs, check the file system.
fn build_image(
    base: &Path,
    files: &[Injected],
    key: &str,
    inputs: serde_json::Value,
) -> Result<PathBuf> {
    let staging = cache::staging("rootfs", key)?;
    let image = staging.join("rootfs.ext4");
    let log = |step: &str| cache::log_path(&format!("rootfs-{}-{step}.log", cache::short(key)));
    util::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(base)
            .arg(&image),
    )?;
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644))?;

    let mut script = String::new();
    for f in files {
        let (dir, name) = f
            .guest_path
            .rsplit_once('/')
            .expect("guest paths are absolute");
        let host = f
            .host_path
            .to_str()
            .filter(|s| !s.contains(['"', '\n']))
            .with_context(|| format!("{} cannot be quoted for debugfs", f.host_path.display()))?;
        // `rm` of a missing file only prints an error; debugfs goes on with the script.
        script.push_str(&format!(
            "cd {dir}\nrm {name}\nwrite \"{host}\" {name}\n\
             sif {name} mode 0{:o}\nsif {name} uid 0\nsif {name} gid 0\n\
             sif {name} atime {EPOCH_DEBUGFS}\nsif {name} mtime {EPOCH_DEBUGFS}\n\
             sif {name} ctime {EPOCH_DEBUGFS}\n",
            0o100000 | f.mode
        ));
    }
    let script_path = staging.join("inject.debugfs");
    fs::write(&script_path, &script)?;
    util::run_logged(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script_path)
            .arg(&image)
            .env("E2FSPROGS_FAKE_TIME", EPOCH.to_string()),
        "rootfs: debugfs -w (init files)",
        &log("debugfs"),
    )?;
    // debugfs exits 0 even when a command fails, so read every file back, through /sbin (the
    // merged-/usr symlink) as the kernel will.
    for f in files {
        let want = fs::read(&f.host_path)?;
        let via_sbin = f.guest_path.replacen("/usr/sbin/", "/sbin/", 1);
        let got = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {via_sbin}"))
            .arg(&image)
            .output()
            .context("starting debugfs")?;
        if got.stdout != want {
            bail!(
                "{via_sbin} in {} does not match {} after debugfs (see {})",
                image.display(),
                f.host_path.display(),
                log("debugfs").display()
            );
        }
    }
    util::run_logged(
        Command::new("e2fsck").args(["-f", "-n"]).arg(&image),
        "rootfs: e2fsck -fn",
        &log("e2fsck"),
    )?;
    fs::remove_file(&script_path)?;
    let hit = cache::commit(&staging, "rootfs", key, "rootfs.ext4", inputs)?;
    eprintln!("xtask: rootfs: built {}", hit.path.display());
    Ok(hit.path)
}

/// A UUID string made from the first 32 hex digits of a key, so that the image's UUID depends
/// on its inputs only.
fn uuid_from_key(key: &str) -> String {
    let k = &key[..32];
    format!(
        "{}-{}-{}-{}-{}",
        &k[0..8],
        &k[8..12],
        &k[12..16],
        &k[16..20],
        &k[20..32]
    )
}

/// The mirror apt on this host already uses for `suite`: the first `deb` source for exactly that
/// suite with `main`, from /etc/apt/sources.list, then /etc/apt/sources.list.d/*.list and
/// *.sources in name order.
fn host_mirror(suite: &str) -> Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    for path in &files {
        let Ok(text) = fs::read_to_string(path) else {
            continue;
        };
        let found = if path.extension().is_some_and(|e| e == "sources") {
            mirror_from_deb822(&text, suite)
        } else {
            mirror_from_list(&text, suite)
        };
        if let Some(m) = found {
            return Ok(m);
        }
    }
    bail!(
        "no apt source for Debian {suite} (main) in {}; configure one, e.g. in \
         /etc/apt/sources.list.d/debian.sources",
        files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Only these URI schemes can be handed to debootstrap.
fn usable_uri(uri: &str) -> bool {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|s| uri.starts_with(s))
}

/// One-line-style sources: `deb [options] URI SUITE COMPONENT...`.
fn mirror_from_list(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // Options: `[arch=amd64 signed-by=...]`, possibly spread over several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        if let [uri, s, components @ ..] = rest.as_slice() {
            if *s == suite && components.contains(&"main") && usable_uri(uri) {
                return Some(uri.trim_end_matches('/').to_string());
            }
        }
    }
    None
}

/// deb822-style sources: stanzas of `Field: value` lines separated by blank lines.
fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            stanzas.push(Vec::new());
            continue;
        }
        if line.trim_start().starts_with('#') {
            continue;
        }
        let stanza = stanzas
            .last_mut()
            .expect("there is always a current stanza");
        if line.starts_with([' ', '\t']) {
            // A continuation line belongs to the previous field.
            if let Some((_, v)) = stanza.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            stanza.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    for stanza in stanzas {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if field("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        let has = |name: &str, word: &str| {
            field(name).is_some_and(|v| v.split_whitespace().any(|w| w == word))
        };
        if !(has("types", "deb") && has("suites", suite) && has("components", "main")) {
            continue;
        }
        if let Some(uri) = field("uris").and_then(|v| v.split_whitespace().find(|u| usable_uri(u)))
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_stanza_for_the_suite() {
        let text = "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_from_deb822(text, "bookworm-security").as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(mirror_from_deb822(text, "trixie"), None);
    }

    #[test]
    fn deb822_skips_disabled_and_source_only_stanzas() {
        let text = "Types: deb-src\nURIs: http://a.example/debian\nSuites: bookworm\n\
                    Components: main\n\nEnabled: no\nTypes: deb\nURIs: http://b.example/debian\n\
                    Suites: bookworm\nComponents: main\n\nTypes: deb\n\
                    URIs: cdrom:/x http://c.example/debian\nSuites: bookworm\nComponents: main contrib\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://c.example/debian")
        );
    }

    #[test]
    fn one_line_sources_with_options_and_comments() {
        let text = "# deb http://old.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian/ bookworm main contrib # x\n";
        assert_eq!(
            mirror_from_list(text, "bookworm").as_deref(),
            Some("https://m.example/debian")
        );
        assert_eq!(
            mirror_from_list("deb http://m.example/d bookworm contrib\n", "bookworm"),
            None
        );
    }

    #[test]
    fn package_list_is_sorted_deduplicated_and_validated() {
        let cfg = RootfsConfig {
            extra_packages: vec!["git".into(), "curl".into(), " ".into()],
            ..RootfsConfig::default()
        };
        assert_eq!(
            cfg.packages().expect("valid names"),
            [
                "bash",
                "ca-certificates",
                "coreutils",
                "curl",
                "git",
                "python3",
                "sqlite3"
            ]
        );
        let bad = RootfsConfig {
            extra_packages: vec!["curl,--foo".into()],
            ..RootfsConfig::default()
        };
        assert!(
            matches!(bad.packages(), Err(e) if e.to_string().contains("not a Debian package name"))
        );
    }

    #[test]
    fn uuid_from_key_has_the_uuid_shape() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(uuid_from_key(key), "01234567-89ab-cdef-0123-456789abcdef");
    }
}
