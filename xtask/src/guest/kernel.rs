//! The guest kernel: Debian's `linux-source-6.1` built with `resources/guest/microvm.config`.
//!
//! Recipe: extract the source tarball, `make allnoconfig`, merge the fragment
//! (`scripts/kconfig/merge_config.sh -m`), `make olddefconfig`, check that every option of the
//! fragment survived (Kconfig silently drops options whose dependencies are unmet), then
//! `make vmlinux`. The entry keeps `vmlinux` and the resolved `config`; the build tree is deleted.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{cache, resource};
use crate::util;

/// Bump when the recipe below changes in a way that changes the output.
const RECIPE_VERSION: &str = "kernel-recipe-1";
/// The Debian package whose tarball we build.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where that package puts the tarball.
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// What building a kernel needs on a Debian host.
const BUILD_DEPS: &[&str] = &[
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "cpio",
];
/// The config fragment, under `resources/guest/`.
const FRAGMENT: &str = "microvm.config";
const KIND: &str = "kernel";
const ARTIFACT: &str = "vmlinux";

/// Returns the cached `vmlinux`, building it first if it is missing, stale or `force`d.
pub fn ensure(force: bool) -> Result<PathBuf> {
    let _lock = cache::lock(KIND)?;
    let mut packages = vec![SOURCE_PACKAGE];
    packages.extend_from_slice(BUILD_DEPS);
    util::apt_install(&packages)?;
    let version =
        util::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let fragment_path = resource(FRAGMENT);
    let fragment =
        fs::read(&fragment_path).with_context(|| format!("reading {}", fragment_path.display()))?;
    let key = util::hash_parts([
        b"sandbox-guest-kernel".as_slice(),
        RECIPE_VERSION.as_bytes(),
        version.as_bytes(),
        &fragment,
    ]);
    if !force {
        if let Some(hit) = cache::lookup(KIND, &key, ARTIFACT)? {
            eprintln!("xtask: kernel: cached {}", hit.path.display());
            return Ok(hit.path);
        }
    }
    eprintln!(
        "xtask: kernel: building {SOURCE_PACKAGE} {version} with {} (takes minutes)",
        fragment_path.display()
    );
    let inputs = json!({
        "recipe": RECIPE_VERSION,
        "source_package": SOURCE_PACKAGE,
        "source_version": version,
        "fragment_sha256": util::sha256_file(&fragment_path)?,
    });
    build(&key, &fragment_path, inputs)
}

fn build(key: &str, fragment_path: &Path, inputs: serde_json::Value) -> Result<PathBuf> {
    let staging = cache::staging(KIND, key)?;
    let src = staging.join("src");
    fs::create_dir_all(&src)?;
    let log = |step: &str| cache::log_path(&format!("kernel-{}-{step}.log", cache::short(key)));

    util::run_logged(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(&src)
            .arg("--strip-components=1"),
        "kernel: extracting source",
        &log("extract"),
    )?;
    util::run_logged(
        make(&src).arg("allnoconfig"),
        "kernel: make allnoconfig",
        &log("config"),
    )?;
    util::run_logged(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&src)
            .args(["-m", ".config"])
            .arg(fragment_path),
        "kernel: merging microvm.config",
        &log("merge"),
    )?;
    util::run_logged(
        make(&src).arg("olddefconfig"),
        "kernel: make olddefconfig",
        &log("olddefconfig"),
    )?;
    let fragment = fs::read_to_string(fragment_path)?;
    let resolved = fs::read_to_string(src.join(".config"))?;
    let dropped = check_config(&fragment, &resolved)?;
    if !dropped.is_empty() {
        bail!(
            "Kconfig did not keep these options of {} (unmet dependencies or typos):\n  {}",
            fragment_path.display(),
            dropped.join("\n  ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    util::run_logged(
        make(&src).arg(format!("-j{jobs}")).arg("vmlinux"),
        &format!("kernel: make -j{jobs} vmlinux"),
        &log("make"),
    )?;
    check_pvh_note(&src.join("vmlinux"))?;

    fs::rename(src.join("vmlinux"), staging.join(ARTIFACT))?;
    fs::rename(src.join(".config"), staging.join("config"))?;
    fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    let hit = cache::commit(&staging, KIND, key, ARTIFACT, inputs)?;
    eprintln!("xtask: kernel: built {}", hit.path.display());
    Ok(hit.path)
}

/// `make` in the kernel tree, with the build stamps pinned so that the output depends on the
/// inputs only.
fn make(src: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(src)
        .env("KBUILD_BUILD_TIMESTAMP", "2024-01-01 00:00:00 UTC")
        .env("KBUILD_BUILD_USER", "sandbox")
        .env("KBUILD_BUILD_HOST", "xtask")
        .env("KBUILD_BUILD_VERSION", "1");
    cmd
}

/// Parses `CONFIG_X=value` and `# CONFIG_X is not set` lines; `n` stands for "not set".
fn parse_config(text: &str) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") && !name.contains(' ') {
                    map.insert(name.to_string(), "n".to_string());
                }
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((name, value)) if name.starts_with("CONFIG_") => {
                map.insert(name.to_string(), value.to_string());
            }
            _ => bail!("config line {}: cannot parse {line:?}", i + 1),
        }
    }
    Ok(map)
}

/// The fragment's options whose value in the resolved `.config` differs, as
/// `CONFIG_X: wanted W, got G` lines. An option absent from `.config` counts as `n`.
fn check_config(fragment: &str, resolved: &str) -> Result<Vec<String>> {
    let want = parse_config(fragment).context("parsing the fragment")?;
    let have = parse_config(resolved).context("parsing the resolved .config")?;
    Ok(want
        .iter()
        .filter_map(|(name, value)| {
            let got = have.get(name).map_or("n", String::as_str);
            (got != value).then(|| format!("{name}: wanted {value}, got {got}"))
        })
        .collect())
}

/// QEMU `-M microvm` and PVH-capable VMMs need the Xen `PHYS32_ENTRY` ELF note; fail early if the
/// config lost it rather than at the first boot.
fn check_pvh_note(vmlinux: &Path) -> Result<()> {
    let notes = util::output(Command::new("readelf").arg("--notes").arg(vmlinux))?;
    // readelf prints the Xen notes with owner "Xen"; type 0x12 is XEN_ELFNOTE_PHYS32_ENTRY,
    // shown as "Unknown note type: (0x00000012)" by binutils 2.40, by name by others.
    let has_entry = notes.lines().any(|l| {
        l.trim_start().starts_with("Xen")
            && (l.contains("0x00000012") || l.contains("PHYS32_ENTRY"))
    });
    if !has_entry {
        bail!(
            "{} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH=y?",
            vmlinux.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_config_reports_dropped_and_changed_options() {
        let fragment = "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=32\nCONFIG_D=y\n";
        let resolved = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=8\n# CONFIG_D is not set\n";
        assert_eq!(
            check_config(fragment, resolved).expect("both parse"),
            vec![
                "CONFIG_B: wanted n, got y".to_string(),
                "CONFIG_C: wanted 32, got 8".to_string(),
                "CONFIG_D: wanted y, got n".to_string(),
            ]
        );
    }

    #[test]
    fn absent_option_counts_as_not_set() {
        assert_eq!(
            check_config("# CONFIG_MODULES is not set\n", "CONFIG_X=y\n").expect("both parse"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn checked_in_fragment_parses_and_forbids_modules() {
        let text = fs::read_to_string(resource(FRAGMENT)).expect("the fragment is checked in");
        let map = parse_config(&text).expect("the fragment parses");
        assert_eq!(map.get("CONFIG_MODULES").map(String::as_str), Some("n"));
        assert_eq!(map.get("CONFIG_PVH").map(String::as_str), Some("y"));
    }
}
