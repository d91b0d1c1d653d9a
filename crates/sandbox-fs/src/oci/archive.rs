//! Where an image's files come from: an image directory on disk, or a `docker save` tarball
//! (plain or gzip) unpacked into a scratch directory first.
//!
//! The tarball's regular files are written under the scratch directory with normalised names
//! (`..` refused). Its symlinks and hard links are not made on disk: they are kept in a table
//! and resolved when a file is opened (old `docker save` links duplicate `layer.tar` files to
//! each other), so nothing read from the tarball can reach outside it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::layer::normalize_entry_path;
use super::OciError;

/// Most links followed to open one file.
const MAX_LINK_HOPS: usize = 16;

/// A readable image source.
#[derive(Debug)]
pub(crate) struct Source {
    root: PathBuf,
    /// Archive-relative link name → archive-relative target.
    links: HashMap<PathBuf, PathBuf>,
}

impl Source {
    /// A directory on disk (an OCI image layout, or an unpacked `docker save`).
    pub fn dir(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            links: HashMap::new(),
        }
    }

    /// Whether the source has a regular file at `rel`.
    pub fn has(&self, rel: &str) -> bool {
        self.open(rel).is_ok()
    }

    /// Opens the file at `rel` (a `/`-separated name from a manifest; `..` refused). The final
    /// component is opened with `O_NOFOLLOW`, and must be a regular file.
    pub fn open(&self, rel: &str) -> Result<File, OciError> {
        let missing = || OciError::MissingFile {
            name: rel.to_string(),
        };
        let mut path =
            normalize_entry_path(rel.as_bytes()).map_err(|_| OciError::ArchiveEscapes {
                entry: rel.to_string(),
            })?;
        let mut hops = 0;
        while let Some(target) = self.links.get(&path) {
            hops += 1;
            if hops > MAX_LINK_HOPS {
                return Err(missing());
            }
            path = target.clone();
        }
        let full = self.root.join(&path);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&full)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => missing(),
                _ => OciError::Io {
                    path: full.clone(),
                    source: e,
                },
            })?;
        let meta = file.metadata().map_err(|source| OciError::Io {
            path: full.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(missing());
        }
        Ok(file)
    }
}

/// Resolves a link target written in the archive entry `link` to an archive-relative path:
/// symlink targets are relative to the link's directory (absolute ones to the archive root),
/// hard link targets to the archive root. `None` if it climbs out of the archive.
fn link_target(link: &Path, target: &[u8], symlink: bool) -> Option<PathBuf> {
    let target = Path::new(OsStr::from_bytes(target));
    let mut out: Vec<&OsStr> = Vec::new();
    let base = if symlink && !target.is_absolute() {
        link.parent().unwrap_or(Path::new(""))
    } else {
        Path::new("")
    };
    for c in base.components().chain(target.components()) {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop()?;
            }
            _ => {}
        }
    }
    Some(out.iter().collect())
}

/// Unpacks the tarball at `tarball` (plain, or gzip by its magic bytes) into the empty
/// directory `into`, writing at most `max_bytes` of file data.
///
/// # Errors
/// [`OciError::ArchiveEscapes`] for a `..` name, [`OciError::TooLarge`],
/// [`OciError::Archive`] for a malformed tar or a failed write.
pub(crate) fn unpack(tarball: &Path, into: &Path, max_bytes: u64) -> Result<Source, OciError> {
    let file = File::open(tarball).map_err(|source| OciError::Io {
        path: tarball.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let gzip = reader
        .fill_buf()
        .map_err(|source| OciError::Io {
            path: tarball.to_path_buf(),
            source,
        })?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(reader);
    let mut links = HashMap::new();
    let mut written = 0u64;
    let err = |entry: &[u8]| {
        let entry = String::from_utf8_lossy(entry).into_owned();
        move |source: io::Error| OciError::Archive { entry, source }
    };
    for entry in archive.entries().map_err(err(b""))? {
        let mut entry = entry.map_err(err(b""))?;
        let name = entry.path_bytes().into_owned();
        let rel = normalize_entry_path(&name).map_err(|_| OciError::ArchiveEscapes {
            entry: String::from_utf8_lossy(&name).into_owned(),
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let path = into.join(&rel);
        match entry.header().entry_type() {
            EntryType::Directory => fs::create_dir_all(&path).map_err(err(&name))?,
            kind @ (EntryType::Symlink | EntryType::Link) => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let resolved =
                    link_target(&rel, &target, kind == EntryType::Symlink).ok_or_else(|| {
                        OciError::ArchiveEscapes {
                            entry: String::from_utf8_lossy(&name).into_owned(),
                        }
                    })?;
                links.insert(rel, resolved);
            }
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(err(&name))?;
                }
                links.remove(&rel);
                // A later entry of the same name wins, as with tar(1).
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(err(&name)(e)),
                }
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(err(&name))?;
                let budget = max_bytes.saturating_sub(written);
                let n = io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut out)
                    .map_err(err(&name))?;
                if n > budget {
                    return Err(OciError::TooLarge { max_bytes });
                }
                written += n;
            }
            _ => {}
        }
    }
    Ok(Source {
        root: into.to_path_buf(),
        links,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_resolve_inside_the_archive() {
        let t = |link: &str, target: &str, sym: bool| {
            link_target(Path::new(link), target.as_bytes(), sym)
        };
        assert_eq!(
            t("a/layer.tar", "../b/layer.tar", true),
            Some(PathBuf::from("b/layer.tar"))
        );
        assert_eq!(
            t("a/layer.tar", "/b/layer.tar", true),
            Some(PathBuf::from("b/layer.tar"))
        );
        assert_eq!(
            t("a/layer.tar", "b/layer.tar", false),
            Some(PathBuf::from("b/layer.tar"))
        );
        assert_eq!(t("a/layer.tar", "../../x", true), None);
        assert_eq!(t("x", "../y", false), None);
    }
}
