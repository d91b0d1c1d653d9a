//! The guest artifact cache: `<cache>/guest/<kind>-<key16>/{<artifact>, manifest.json, ...}`.
//!
//! An entry is built in a staging directory under `<cache>/guest/tmp-<group>/` and renamed into place in
//! one step, so a reader never sees a half-written entry. Its manifest records the full input key
//! and the artifact's SHA-256; an entry is reused only if both still match.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde_json::{json, Value};

use crate::util;

const MANIFEST: &str = "manifest.json";

/// `<cache>/guest`.
pub fn root() -> PathBuf {
    util::cache_dir().join("guest")
}

/// Where build logs go: `<cache>/guest/logs/`. They outlive failed builds.
pub fn log_path(name: &str) -> PathBuf {
    root().join("logs").join(name)
}

/// The first 16 hex digits of a key: enough to tell entries apart in a directory name.
pub fn short(key: &str) -> &str {
    &key[..16.min(key.len())]
}

/// The final directory of the entry `kind` with input key `key`.
pub fn entry_dir(kind: &str, key: &str) -> PathBuf {
    root().join(format!("{kind}-{}", short(key)))
}

/// The lock group of an entry kind: `kernel`, or `rootfs` for both rootfs levels.
fn group(kind: &str) -> &str {
    kind.split('-').next().unwrap_or(kind)
}

/// The staging area of a lock group: `<cache>/guest/tmp-<group>/`.
fn staging_root(group: &str) -> PathBuf {
    root().join(format!("tmp-{group}"))
}

/// Takes the exclusive lock of one artifact group (`kernel` or `rootfs`), waiting for another
/// xtask if needed, and clears the group's staging area, which a killed build may have left
/// behind: while we hold the lock, nobody else builds there. Kernel and rootfs builds have
/// separate locks so that they can run side by side.
pub fn lock(group: &str) -> Result<Flock<File>> {
    let dir = root();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".lock-{group}"));
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            eprintln!(
                "xtask: waiting for another xtask that holds {}",
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .with_context(|| format!("locking {}", path.display()))?
        }
    };
    let staging = staging_root(group);
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    Ok(lock)
}

/// A verified cache entry.
#[derive(Debug, Clone)]
pub struct Cached {
    /// The artifact file.
    pub path: PathBuf,
    /// Its hex SHA-256, as recorded and re-checked.
    pub sha256: String,
}

/// Returns the entry's artifact if the entry exists, was made from `key`, and the artifact still
/// hashes to the manifest's SHA-256. A mismatch is reported and treated as a miss.
pub fn lookup(kind: &str, key: &str, artifact: &str) -> Result<Option<Cached>> {
    let dir = entry_dir(kind, key);
    let manifest_path = dir.join(MANIFEST);
    let Ok(text) = fs::read_to_string(&manifest_path) else {
        return Ok(None);
    };
    let manifest: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "xtask: {}: unreadable manifest ({e}); rebuilding",
                dir.display()
            );
            return Ok(None);
        }
    };
    if manifest["key"].as_str() != Some(key) {
        eprintln!(
            "xtask: {}: made from other inputs; rebuilding",
            dir.display()
        );
        return Ok(None);
    }
    let Some(want) = manifest["sha256"].as_str() else {
        eprintln!(
            "xtask: {}: manifest has no sha256; rebuilding",
            dir.display()
        );
        return Ok(None);
    };
    let path = dir.join(artifact);
    let have = match util::sha256_file(&path) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("xtask: {}: {e:#}; rebuilding", path.display());
            return Ok(None);
        }
    };
    if have != want {
        eprintln!(
            "xtask: {}: sha256 {have} does not match the manifest's {want}; rebuilding",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(Cached { path, sha256: have }))
}

/// A fresh, empty staging directory for building the entry `kind`/`key`; the caller holds the
/// kind's group lock.
pub fn staging(kind: &str, key: &str) -> Result<PathBuf> {
    let dir =
        staging_root(group(kind)).join(format!("{kind}-{}-{}", short(key), std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Turns a finished staging directory into the entry `kind`/`key`: hashes `artifact`, makes it
/// read-only, writes the manifest (with `inputs` for humans), and renames the directory into place,
/// replacing a stale entry.
pub fn commit(
    staging: &Path,
    kind: &str,
    key: &str,
    artifact: &str,
    inputs: Value,
) -> Result<Cached> {
    let staged = staging.join(artifact);
    let sha256 = util::sha256_file(&staged)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o444))
        .with_context(|| format!("making {} read-only", staged.display()))?;
    let manifest = json!({
        "kind": kind,
        "key": key,
        "artifact": artifact,
        "sha256": sha256,
        "size_bytes": fs::metadata(&staged)?.len(),
        "inputs": inputs,
    });
    let manifest_path = staging.join(MANIFEST);
    fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)? + "\n",
    )
    .with_context(|| format!("writing {}", manifest_path.display()))?;

    let dir = entry_dir(kind, key);
    if dir.exists() {
        // A stale or corrupt entry: move it aside first (rename cannot replace a non-empty
        // directory), then drop it.
        let old = staging.with_extension("old");
        fs::rename(&dir, &old).with_context(|| format!("moving aside {}", dir.display()))?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    fs::rename(staging, &dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    let path = dir.join(artifact);
    if !path.is_file() {
        bail!("{} is missing right after commit", path.display());
    }
    prune(kind, &dir);
    Ok(Cached { path, sha256 })
}

/// How many entries of one kind to keep (the newest, including the one just built): enough for a
/// few checkouts at different commits to share the cache (and for a path handed out a moment ago
/// to stay valid while a newer entry is built) without letting the cache grow forever.
const KEEP_PER_KIND: usize = 3;

/// Deletes all but the newest [`KEEP_PER_KIND`] entries of `kind`, never `keep`. Failures are
/// reported, not fatal: pruning is housekeeping.
fn prune(kind: &str, keep: &Path) {
    let Ok(entries) = fs::read_dir(root()) else {
        return;
    };
    let prefix = format!("{kind}-");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            // `rootfs-` must not match `rootfs-base-...`: the rest is exactly the 16-digit key.
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
            })
        })
        .filter_map(|e| {
            let modified = e.metadata().and_then(|m| m.modified()).ok()?;
            Some((modified, e.path()))
        })
        .collect();
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in found.into_iter().skip(KEEP_PER_KIND) {
        if path == keep {
            continue;
        }
        eprintln!("xtask: pruning old cache entry {}", path.display());
        if let Err(e) = fs::remove_dir_all(&path) {
            eprintln!("xtask: cannot remove {}: {e}", path.display());
        }
    }
}
