//! File operations: paths, options, listings and their caps.
//!
//! Paths are guest paths. Without a confined root they must be absolute and symlinks are followed
//! as usual. With [`FileOptions::root`], the path is resolved *beneath* that directory: a leading
//! `/` is ignored, and neither `..` nor any symlink (absolute, relative or `/proc` magic link) may
//! lead out of it; such attempts fail with [`ErrorKind::PermissionDenied`](crate::ErrorKind).

use serde::{Deserialize, Serialize};

/// Largest file `read_file`/`write_file` move (64 MiB). Larger reads and writes are refused with
/// [`ErrorKind::TooLarge`](crate::ErrorKind) before any data moves.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Size of one file data frame (256 KiB); files travel as a sequence of these.
pub const FILE_CHUNK_BYTES: usize = 256 * 1024;
/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most entries one `list` returns; beyond this `Listing::truncated` is set.
pub const MAX_LIST_ENTRIES: usize = 2048;

/// Result of path validation.
pub type Result<T> = std::result::Result<T, FileError>;

/// Why a file request was refused before being sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The path is empty, too long or contains NUL.
    #[error("The path must be 1 to 4096 bytes without NUL.")]
    BadPath,
    /// Without a confined root, paths must be absolute.
    #[error("The path must be absolute when no confined root is given.")]
    NotAbsolute,
    /// The confined root itself is not an absolute path.
    #[error("The confined root must be an absolute path.")]
    BadRoot,
    /// The data is larger than [`MAX_FILE_BYTES`].
    #[error("The file is {got} bytes, over the {max}-byte cap.")]
    TooLarge {
        /// Size in bytes.
        got: u64,
        /// [`MAX_FILE_BYTES`].
        max: u64,
    },
}

impl From<FileError> for crate::Error {
    fn from(e: FileError) -> Self {
        let kind = match e {
            FileError::TooLarge { .. } => crate::ErrorKind::TooLarge,
            _ => crate::ErrorKind::InvalidRequest,
        };
        // The specific reason is the message (the kind already says "invalid request").
        crate::Error::new(kind, e.to_string())
    }
}

/// Options for file operations. `FileOptions::default()` means: absolute path, no confinement,
/// mode 0644, no parent creation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FileOptions {
    /// Resolve the path beneath this absolute guest directory and never leave it.
    pub root: Option<String>,
    /// Permission bits for files `write_file` creates (default 0o644); existing files keep theirs.
    pub mode: Option<u32>,
    /// `write_file` creates missing parent directories (mode 0755).
    pub create_parents: bool,
}

impl FileOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }
    /// Confines the operation beneath `root`.
    pub fn confined_to(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }
    /// Permission bits for created files.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode & 0o7777);
        self
    }
    /// Create missing parent directories on write.
    pub fn create_parents(mut self, yes: bool) -> Self {
        self.create_parents = yes;
        self
    }
}

/// Checks a path and its options before sending.
///
/// # Errors
/// A [`FileError`] naming the problem.
pub fn validate_path(path: &str, opts: &FileOptions) -> Result<()> {
    if path.is_empty() || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(FileError::BadPath);
    }
    match &opts.root {
        None if !path.starts_with('/') => Err(FileError::NotAbsolute),
        Some(r) if !r.starts_with('/') || r.len() > MAX_PATH_BYTES || r.contains('\0') => {
            Err(FileError::BadRoot)
        }
        _ => Ok(()),
    }
}

/// What a directory entry is (as `lstat` sees it: symlinks are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else (device, fifo, socket).
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DirEntry {
    /// File name (non-UTF-8 bytes replaced by U+FFFD).
    pub name: String,
    /// Kind, without following symlinks.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl DirEntry {
    /// An entry.
    pub fn new(name: impl Into<String>, kind: FileKind, size: u64, mode: u32) -> Self {
        DirEntry {
            name: name.into(),
            kind,
            size,
            mode,
        }
    }
}

/// A directory listing, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Listing {
    /// Entries, without `.` and `..`.
    pub entries: Vec<DirEntry>,
    /// More than [`MAX_LIST_ENTRIES`] entries existed; the rest were dropped.
    pub truncated: bool,
}

impl Listing {
    /// A listing.
    pub fn new(entries: Vec<DirEntry>, truncated: bool) -> Self {
        Listing { entries, truncated }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        let free = FileOptions::new();
        let conf = FileOptions::new().confined_to("/work");
        assert_eq!(validate_path("/etc/hosts", &free), Ok(()));
        assert_eq!(
            validate_path("etc/hosts", &free),
            Err(FileError::NotAbsolute)
        );
        assert_eq!(validate_path("etc/hosts", &conf), Ok(()));
        assert_eq!(validate_path("/etc/hosts", &conf), Ok(()));
        assert_eq!(validate_path("", &free), Err(FileError::BadPath));
        assert_eq!(validate_path("/a\0b", &free), Err(FileError::BadPath));
        assert_eq!(
            validate_path(&"/a".repeat(3000), &free),
            Err(FileError::BadPath)
        );
        assert_eq!(
            validate_path("x", &FileOptions::new().confined_to("work")),
            Err(FileError::BadRoot)
        );
    }
}
