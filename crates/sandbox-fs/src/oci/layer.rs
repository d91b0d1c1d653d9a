//! Applying image layers (tar streams) to a staging tree, as the OCI image spec's
//! "Applying Changesets" describes (image-spec `layer.md`), without ever following a symlink on
//! the host.
//!
//! Rules, per entry:
//! - The name is normalised by [`normalize_entry_path`]: a leading `/` is stripped (docker
//!   does the same), `.` components and repeated slashes are dropped, and a `..` component is
//!   refused ([`OciError::EntryEscapes`]).
//! - Every parent component must be a real directory in the tree (missing ones are created,
//!   mode 0755); a symlink there is refused ([`OciError::SymlinkInPath`]), since following it
//!   on the host could leave the tree. Only this module writes the staging tree, one entry at a
//!   time, so a component checked with `symlink_metadata` cannot change before it is used.
//! - Whatever is at the final name is replaced (unlinked, or removed recursively if a directory
//!   is replaced by a non-directory); a directory over a directory is merged.
//! - `.wh.<name>` deletes `<name>` from the lower layers; `.wh..wh..opq` deletes every lower
//!   entry of its directory. Entries of the same layer are kept whatever their order in the
//!   tar. Other `.wh..wh.*` names (aufs bookkeeping) are ignored.
//! - Symlinks are created with their target as given (the guest resolves them). Hard links
//!   must name an existing non-directory in the tree, reached without symlinks.
//! - Character and block devices are skipped and counted (no host device nodes are made);
//!   FIFOs are made. Extended attributes are not restored.
//! - Owners (numeric uid/gid) are applied when running as root; otherwise files belong to the
//!   importing user. Permission bits, setuid/setgid/sticky included, and mtimes are applied;
//!   directories get theirs at the end, so a read-only directory can still be filled.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::stat::{utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, mkfifo, Gid, Uid};
use tar::EntryType;

use super::OciError;

/// Marks an opaque directory (image-spec `layer.md`, "Opaque Whiteout").
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout file.
const WHITEOUT: &[u8] = b".wh.";
/// One tar entry allowed per this many bytes of image (mkfs makes one inode per 8 KiB, so
/// this leaves room for entries that later ones replace).
const BYTES_PER_ENTRY: u64 = 1024;
/// Most symlinks followed when resolving a path the way the guest would.
const MAX_SYMLINK_HOPS: usize = 40;

/// Why an entry name was refused by [`normalize_entry_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathIssue {
    /// A `..` component.
    ParentDir,
    /// A NUL byte.
    Nul,
}

/// Turns a tar entry name into a path relative to the tree root: leading `/` stripped, `.`
/// and empty components dropped, `..` refused. The empty path is the root itself.
pub(crate) fn normalize_entry_path(name: &[u8]) -> Result<PathBuf, PathIssue> {
    if name.contains(&0) {
        return Err(PathIssue::Nul);
    }
    let mut out = PathBuf::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(PathIssue::ParentDir),
            p => out.push(OsStr::from_bytes(p)),
        }
    }
    Ok(out)
}

/// What was done, for the import report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ApplyStats {
    /// Entries written (files, directories, links, FIFOs).
    pub entries: u64,
    /// Bytes of regular-file data written.
    pub bytes: u64,
    /// Character and block devices skipped.
    pub skipped_devices: u64,
    /// Other entries skipped (sockets, unknown types, pax global headers).
    pub skipped_other: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
}

/// The metadata a directory gets once every layer is in.
#[derive(Debug, Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: u64,
}

/// Applies layers, in order, to a staging tree.
#[derive(Debug)]
pub(crate) struct Applier {
    root: PathBuf,
    max_bytes: u64,
    as_root: bool,
    /// Directory metadata applied by [`Applier::finish`], keyed by relative path. Path order
    /// keeps a subtree contiguous, so a removal drops its part with one range.
    dirs: BTreeMap<PathBuf, DirMeta>,
    /// Tar entries seen, over all layers.
    processed: u64,
    pub stats: ApplyStats,
}

/// The name of the entry being applied, for errors.
fn display(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Applier {
    /// An applier writing into the existing empty directory `root`, refusing to write more
    /// than `max_bytes` of file data in total.
    pub fn new(root: &Path, max_bytes: u64) -> Self {
        Self {
            root: root.to_path_buf(),
            max_bytes,
            as_root: nix::unistd::geteuid().is_root(),
            dirs: BTreeMap::new(),
            processed: 0,
            stats: ApplyStats::default(),
        }
    }

    /// Applies one uncompressed layer tar, read to its end-of-archive marker.
    ///
    /// # Errors
    /// [`OciError::EntryEscapes`], [`OciError::SymlinkInPath`], [`OciError::BadHardLink`],
    /// [`OciError::NotADirectoryInPath`], [`OciError::TooLarge`], [`OciError::Layer`] for a
    /// malformed tar or a failed write.
    pub fn apply_layer<R: Read>(
        &mut self,
        layer: usize,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), OciError> {
        let mut created: HashSet<PathBuf> = HashSet::new();
        let entries = archive.entries().map_err(|source| OciError::Layer {
            layer,
            entry: String::new(),
            source,
        })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| OciError::Layer {
                layer,
                entry: String::new(),
                source,
            })?;
            self.processed += 1;
            if self.processed > self.max_bytes / BYTES_PER_ENTRY {
                return Err(OciError::TooManyEntries {
                    max_entries: self.max_bytes / BYTES_PER_ENTRY,
                });
            }
            let name = entry.path_bytes().into_owned();
            let io = |source: io::Error| OciError::Layer {
                layer,
                entry: display(&name),
                source,
            };
            let rel = normalize_entry_path(&name).map_err(|_| OciError::EntryEscapes {
                layer,
                entry: display(&name),
            })?;
            let kind = entry.header().entry_type();
            if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
                self.stats.skipped_other += 1;
                continue;
            }
            let Some(file_name) = rel.file_name().map(|n| n.as_bytes().to_vec()) else {
                // The root directory itself: it stays 0755 root:root.
                continue;
            };
            if file_name == OPAQUE {
                let dir = rel.parent().unwrap_or(Path::new(""));
                self.opaque(layer, &name, dir, &created)?;
                continue;
            }
            if let Some(target) = file_name.strip_prefix(WHITEOUT) {
                if target.starts_with(WHITEOUT) {
                    // `.wh..wh.plnk` and friends: aufs bookkeeping, not content.
                    self.stats.skipped_other += 1;
                    continue;
                }
                if target.is_empty() || target == b"." || target == b".." {
                    return Err(OciError::EntryEscapes {
                        layer,
                        entry: display(&name),
                    });
                }
                let victim = rel.with_file_name(OsStr::from_bytes(target));
                self.whiteout(layer, &name, &victim, &created)?;
                continue;
            }

            if matches!(kind, EntryType::Char | EntryType::Block) {
                self.stats.skipped_devices += 1;
                continue;
            }
            if !matches!(
                kind,
                EntryType::Regular
                    | EntryType::Continuous
                    | EntryType::GNUSparse
                    | EntryType::Directory
                    | EntryType::Symlink
                    | EntryType::Link
                    | EntryType::Fifo
            ) {
                self.stats.skipped_other += 1;
                continue;
            }

            self.parents(layer, &name, &rel, true)?;
            let path = self.root.join(&rel);
            let header = entry.header();
            let mode = header.mode().map_err(io)? & 0o7777;
            let uid = header.uid().map_err(io)?;
            let gid = header.gid().map_err(io)?;
            let mtime = header.mtime().map_err(io)?;
            let existing = match fs::symlink_metadata(&path) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(e)),
            };
            if kind == EntryType::Directory {
                match existing {
                    Some(m) if m.is_dir() => {}
                    Some(_) => {
                        self.remove(&rel).map_err(io)?;
                        fs::create_dir(&path).map_err(io)?;
                    }
                    None => fs::create_dir(&path).map_err(io)?,
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(io)?;
                self.chown(&path, uid, gid).map_err(io)?;
                self.dirs.insert(rel.clone(), DirMeta { mode, mtime });
                mark_created(&mut created, &rel);
                self.stats.entries += 1;
                continue;
            }
            if existing.is_some() {
                self.remove(&rel).map_err(io)?;
            }
            match kind {
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| {
                            io(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "symlink without a target",
                            ))
                        })?
                        .into_owned();
                    std::os::unix::fs::symlink(OsString::from_vec(target), &path).map_err(io)?;
                    self.chown(&path, uid, gid).map_err(io)?;
                    set_mtime(&path, mtime).map_err(io)?;
                }
                EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let bad = || OciError::BadHardLink {
                        layer,
                        entry: display(&name),
                        target: display(&target),
                    };
                    let target_rel = normalize_entry_path(&target).map_err(|_| bad())?;
                    if target_rel.as_os_str().is_empty()
                        || !self.parents(layer, &name, &target_rel, false)?
                    {
                        return Err(bad());
                    }
                    let target_path = self.root.join(&target_rel);
                    match fs::symlink_metadata(&target_path) {
                        Ok(m) if !m.is_dir() => {}
                        _ => return Err(bad()),
                    }
                    // link(2) does not follow a symlink target: the link is to the symlink.
                    fs::hard_link(&target_path, &path).map_err(io)?;
                }
                EntryType::Fifo => {
                    mkfifo(&path, Mode::from_bits_truncate(0o600)).map_err(|e| io(e.into()))?;
                    self.chown(&path, uid, gid).map_err(io)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io)?;
                    set_mtime(&path, mtime).map_err(io)?;
                }
                _ => {
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&path)
                        .map_err(io)?;
                    let budget = self.max_bytes.saturating_sub(self.stats.bytes);
                    let n = io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut file)
                        .map_err(io)?;
                    if n > budget {
                        return Err(OciError::TooLarge {
                            max_bytes: self.max_bytes,
                        });
                    }
                    self.stats.bytes += n;
                    // chown before chmod: chown clears setuid/setgid bits.
                    self.chown(&path, uid, gid).map_err(io)?;
                    file.set_permissions(fs::Permissions::from_mode(mode))
                        .map_err(io)?;
                    file.set_modified(mtime_of(mtime)).map_err(io)?;
                }
            }
            mark_created(&mut created, &rel);
            self.stats.entries += 1;
        }
        Ok(())
    }

    /// Checks (and with `create`, makes) the parent directories of `rel`. Returns `false` if
    /// one is missing and `create` is off.
    fn parents(
        &mut self,
        layer: usize,
        name: &[u8],
        rel: &Path,
        create: bool,
    ) -> Result<bool, OciError> {
        let mut cur = self.root.clone();
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        for comp in parent.components() {
            cur.push(comp.as_os_str());
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(OciError::SymlinkInPath {
                        layer,
                        entry: display(name),
                    })
                }
                Ok(_) => {
                    return Err(OciError::NotADirectoryInPath {
                        layer,
                        entry: display(name),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&cur).map_err(|source| OciError::Layer {
                        layer,
                        entry: display(name),
                        source,
                    })?;
                    fs::set_permissions(&cur, fs::Permissions::from_mode(0o755)).map_err(
                        |source| OciError::Layer {
                            layer,
                            entry: display(name),
                            source,
                        },
                    )?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(source) => {
                    return Err(OciError::Layer {
                        layer,
                        entry: display(name),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// `.wh.<name>`: removes `victim` unless this layer made it.
    fn whiteout(
        &mut self,
        layer: usize,
        name: &[u8],
        victim: &Path,
        created: &HashSet<PathBuf>,
    ) -> Result<(), OciError> {
        if created.contains(victim) || !self.parents(layer, name, victim, false)? {
            return Ok(());
        }
        self.stats.whiteouts += 1;
        match self.remove(victim) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OciError::Layer {
                layer,
                entry: display(name),
                source,
            }),
        }
    }

    /// `.wh..wh..opq` in `dir`: removes every child of `dir` that this layer did not make.
    fn opaque(
        &mut self,
        layer: usize,
        name: &[u8],
        dir: &Path,
        created: &HashSet<PathBuf>,
    ) -> Result<(), OciError> {
        let io = |source| OciError::Layer {
            layer,
            entry: display(name),
            source,
        };
        // The marker is a child of `dir`, so `dir` is checked like any parent.
        self.parents(layer, name, &dir.join("x"), true)?;
        let full = self.root.join(dir);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(OciError::SymlinkInPath {
                    layer,
                    entry: display(name),
                })
            }
            Ok(_) => {
                return Err(OciError::NotADirectoryInPath {
                    layer,
                    entry: display(name),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&full).map_err(io)?;
                fs::set_permissions(&full, fs::Permissions::from_mode(0o755)).map_err(io)?;
                return Ok(());
            }
            Err(e) => return Err(io(e)),
        }
        self.stats.whiteouts += 1;
        // Like containerd: walk the directory, keep what this layer wrote (descending into
        // directories it wrote into, to drop their lower contents), remove everything else.
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let mut victims = Vec::new();
            for child in fs::read_dir(self.root.join(&d)).map_err(io)? {
                let child = child.map_err(io)?;
                let rel = d.join(child.file_name());
                if !created.contains(&rel) {
                    victims.push(rel);
                } else if child.file_type().map_err(io)?.is_dir() {
                    stack.push(rel);
                }
            }
            for v in victims {
                self.remove(&v).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Removes whatever is at `rel` (a directory recursively; a symlink itself, never its
    /// target) and forgets the metadata of the directories under it.
    fn remove(&mut self, rel: &Path) -> io::Result<()> {
        let path = self.root.join(rel);
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            // remove_dir_all does not follow symlinks inside the tree (std's documented
            // behaviour since 1.58.1, CVE-2022-21658).
            make_writable(&path)?;
            fs::remove_dir_all(&path)?;
            let under: Vec<PathBuf> = self
                .dirs
                .range(rel.to_path_buf()..)
                .take_while(|(k, _)| k.starts_with(rel))
                .map(|(k, _)| k.clone())
                .collect();
            for k in under {
                self.dirs.remove(&k);
            }
        } else {
            fs::remove_file(&path)?;
        }
        Ok(())
    }

    fn chown(&self, path: &Path, uid: u64, gid: u64) -> io::Result<()> {
        if !self.as_root {
            return Ok(());
        }
        let uid = u32::try_from(uid).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let gid = u32::try_from(gid).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        fchownat(
            AT_FDCWD,
            path,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)
    }

    /// Gives every directory from the layers its final mode and mtime, deepest first (changing
    /// a child's metadata does not touch its parent's mtime). Call after the last change to
    /// the tree.
    pub fn finish(&mut self) -> io::Result<()> {
        for (rel, meta) in self.dirs.iter().rev() {
            let path = self.root.join(rel);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode))?;
            set_mtime(&path, meta.mtime)?;
        }
        Ok(())
    }
}

/// Records that this layer wrote `rel`, and therefore into each of its ancestors.
fn mark_created(created: &mut HashSet<PathBuf>, rel: &Path) {
    for a in rel.ancestors() {
        // Once a path is marked, its ancestors are too.
        if a.as_os_str().is_empty() || !created.insert(a.to_path_buf()) {
            break;
        }
    }
}

/// Lets a directory tree made by a non-root import be deleted: directories from a layer may
/// be read-only once [`Applier::finish`] ran, and only root ignores that.
pub(crate) fn make_writable(path: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    for child in fs::read_dir(path)? {
        make_writable(&child?.path())?;
    }
    Ok(())
}

fn mtime_of(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(i64::MAX as u64 / 2))
}

/// Sets a path's mtime (and atime) without following a symlink.
fn set_mtime(path: &Path, secs: u64) -> io::Result<()> {
    let t = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX / 2), 0);
    utimensat(AT_FDCWD, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}

/// Resolves `guest_path` inside `root` the way the guest kernel will once `root` is `/`:
/// symlinks are followed (absolute targets from `root`, at most 40 of them), `..` stops at
/// `root`. Returns the host path, every existing component of which is a real directory or
/// the final non-directory; missing trailing components are returned unresolved.
pub(crate) fn resolve_in_root(root: &Path, guest_path: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = guest_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&comp);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push(OsString::from("..")),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(comp),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalisation_examples() {
        let n = |s: &str| normalize_entry_path(s.as_bytes());
        assert_eq!(n("./etc/passwd"), Ok(PathBuf::from("etc/passwd")));
        assert_eq!(n("/etc//x/./y/"), Ok(PathBuf::from("etc/x/y")));
        assert_eq!(n("./"), Ok(PathBuf::new()));
        assert_eq!(n("../escape"), Err(PathIssue::ParentDir));
        assert_eq!(n("a/../../b"), Err(PathIssue::ParentDir));
        assert_eq!(n("a/..b/c.."), Ok(PathBuf::from("a/..b/c..")));
        assert_eq!(normalize_entry_path(b"a\0b"), Err(PathIssue::Nul));
    }

    #[test]
    fn resolve_in_root_follows_guest_symlinks_and_stays_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/sbin")).expect("mkdir");
        std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).expect("symlink");
        std::os::unix::fs::symlink("/usr", root.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../../..", root.join("up")).expect("symlink");
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        let r = |p: &str| resolve_in_root(&root, Path::new(p));
        assert_eq!(r("/sbin").expect("ok"), root.join("usr/sbin"));
        assert_eq!(r("/abs/sbin/init").expect("ok"), root.join("usr/sbin/init"));
        assert_eq!(r("/up/etc").expect("ok"), root.join("etc"));
        assert!(r("/loop/x").is_err());
    }

    /// A path component without `/` or NUL that is not `.` or `..`.
    fn component() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(1u8..=255, 1..12).prop_filter("no separators or dots", |c| {
            !c.contains(&b'/') && c != b"." && c != b".."
        })
    }

    proptest! {
        #[test]
        fn normalised_paths_are_relative_and_clean(name in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = normalize_entry_path(&name) {
                prop_assert!(p.is_relative());
                for c in p.components() {
                    prop_assert!(matches!(c, Component::Normal(_)), "{:?}", p);
                }
                prop_assert!(Path::new("/root").join(&p).starts_with("/root"));
                // Idempotent.
                prop_assert_eq!(normalize_entry_path(p.as_os_str().as_bytes()), Ok(p.clone()));
            } else {
                let has_dotdot = name.split(|&b| b == b'/').any(|c| c == b"..");
                prop_assert!(has_dotdot || name.contains(&0));
            }
        }

        #[test]
        fn clean_components_survive_with_any_decoration(
            comps in proptest::collection::vec(component(), 1..6),
            leading in "/{0,2}",
            dots in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let mut name = leading.into_bytes();
            for (i, c) in comps.iter().enumerate() {
                if dots[i] {
                    name.extend_from_slice(b"./");
                }
                name.extend_from_slice(c);
                name.push(b'/');
            }
            let want: PathBuf = comps.iter().map(|c| OsStr::from_bytes(c)).collect();
            prop_assert_eq!(normalize_entry_path(&name), Ok(want));
        }

        #[test]
        fn any_parent_component_is_refused(
            before in proptest::collection::vec(component(), 0..4),
            after in proptest::collection::vec(component(), 0..4),
        ) {
            let mut parts: Vec<&[u8]> = before.iter().map(Vec::as_slice).collect();
            parts.push(b"..");
            parts.extend(after.iter().map(Vec::as_slice));
            prop_assert_eq!(normalize_entry_path(&parts.join(&b'/')), Err(PathIssue::ParentDir));
        }
    }
}
