//! The image store: read-only, content-addressed base images and the tags that name them.
//!
//! Layout under the store directory (see `docs/images.md`):
//!
//! | path | what |
//! |---|---|
//! | `images/sha256-<hex>.img` | a raw ext4 image, mode 0444, named by the SHA-256 of its bytes |
//! | `tags/<name>` | one line, `sha256:<hex>`: the image the tag names |
//! | `tmp/` | imports in progress (temporary files and OCI staging trees) |
//!
//! Every insert is written to a temporary file under `tmp/`, synced, hashed and only then renamed
//! into `images/`, so an image path that exists always holds the whole image. Two processes
//! inserting the same bytes at once both succeed and leave one file. Nothing in the store is ever
//! modified in place: an image is added, or removed.

mod copy;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use tempfile::NamedTempFile;

use copy::copy_sparse;
pub(crate) use copy::hash_sparse;

/// Smallest image size accepted by the builders (`import_dir`, `import_oci`): 1 MiB.
pub const MIN_IMAGE_BYTES: u64 = 1 << 20;
/// Largest image size accepted by the builders: 1 TiB (the file is sparse; the number must
/// still be sane).
pub const MAX_IMAGE_BYTES: u64 = 1 << 40;
/// Longest tag name, in bytes.
pub const MAX_TAG_LEN: usize = 128;
/// Temporary entries in `tmp/` older than this are removed by [`ImageStore::open`]: they were
/// left by an import that was killed.
pub const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// The ext4 superblock starts 1024 bytes into the device; its magic is at offset 0x38 in it.
const EXT4_MAGIC_OFFSET: u64 = 1024 + 0x38;
/// `EXT2_SUPER_MAGIC`, shared by ext2/3/4, little endian on disk.
const EXT4_MAGIC: [u8; 2] = [0x53, 0xef];
/// A tag file is one digest line; anything longer is not ours.
const MAX_TAG_FILE_BYTES: u64 = 256;
/// The most of mkfs's stderr kept in an error.
const MAX_TOOL_OUTPUT: usize = 4096;

/// Errors from the image store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A reference is neither `sha256:<64 lowercase hex digits>` nor a valid tag name.
    #[error("{reference:?} is not an image digest (sha256:<64 lowercase hex digits>).")]
    InvalidDigest {
        /// What was given.
        reference: String,
    },
    /// A tag name breaks the rule `[a-z0-9][a-z0-9._-]{0,127}`.
    #[error("{name:?} is not a valid tag name: use 1 to 128 of a-z 0-9 . _ - starting with a letter or digit.")]
    InvalidTag {
        /// What was given.
        name: String,
    },
    /// No image with this digest, or no tag with this name, is in the store.
    #[error("No image {reference} in the store.")]
    NotFound {
        /// The digest or tag that was looked up.
        reference: String,
    },
    /// A tag file does not hold a digest (someone edited the store by hand).
    #[error("Tag file {path} does not hold an image digest.")]
    BadTagFile {
        /// The tag file.
        path: PathBuf,
    },
    /// `remove` was asked to delete an image that tags still name; untag it first.
    #[error("Image {digest} is still tagged {tags:?}; remove the tags first.")]
    Tagged {
        /// The image.
        digest: ImageDigest,
        /// The tags naming it.
        tags: Vec<String>,
    },
    /// An image's bytes no longer hash to its name.
    #[error("Image {digest} is corrupt: its bytes hash to {actual}.")]
    Corrupt {
        /// The image's name.
        digest: ImageDigest,
        /// What its bytes hash to now.
        actual: ImageDigest,
    },
    /// An image size is outside [`MIN_IMAGE_BYTES`]..=[`MAX_IMAGE_BYTES`] or not a multiple of
    /// 4096.
    #[error("Image size {size_bytes} bytes is not a multiple of 4096 in 1 MiB..=1 TiB.")]
    InvalidSize {
        /// What was given.
        size_bytes: u64,
    },
    /// `import_raw` was given a file without an ext2/3/4 superblock.
    #[error("{path} is not an ext4 image (no ext2/3/4 superblock magic at byte 1080).")]
    NotExt4 {
        /// The file.
        path: PathBuf,
    },
    /// `import_dir` was given something that is not a directory.
    #[error("{path} is not a directory.")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// A host tool is missing.
    #[error(
        "{tool} was not found in PATH, /usr/sbin or /sbin; install the Debian package {package}."
    )]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// `mkfs.ext4` failed; the most common cause is a size too small for the tree.
    #[error("mkfs.ext4 failed ({status}) building an image of {size_bytes} bytes (too small for the tree?): {stderr}")]
    Mkfs {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The image size asked for.
        size_bytes: u64,
        /// Its stderr (at most 4 KiB).
        stderr: String,
    },
    /// An I/O error on a store path.
    #[error("I/O error on {path}.")]
    Io {
        /// The path being worked on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A local result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The SHA-256 of an image's raw bytes; written `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    /// Wraps 32 hash bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses exactly 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ImageDigest {
    type Err = StoreError;

    /// Parses `sha256:<64 lowercase hex digits>`.
    fn from_str(s: &str) -> Result<Self> {
        s.strip_prefix("sha256:")
            .and_then(Self::from_hex)
            .ok_or_else(|| StoreError::InvalidDigest {
                reference: s.to_string(),
            })
    }
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Its name: the SHA-256 of its bytes.
    pub digest: ImageDigest,
    /// The read-only image file (`<store>/images/sha256-<hex>.img`); hand it to an overlay as
    /// its backing file, never open it for writing.
    pub path: PathBuf,
    /// Its size in bytes (the disk size; the file is sparse).
    pub size_bytes: u64,
}

/// Checks a tag name against `[a-z0-9][a-z0-9._-]{0,127}`.
///
/// # Errors
/// [`StoreError::InvalidTag`].
pub fn validate_tag(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let first_ok = b
        .first()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c));
    if first_ok && rest_ok && b.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(StoreError::InvalidTag {
            name: name.to_string(),
        })
    }
}

/// Checks a size given to a builder.
///
/// # Errors
/// [`StoreError::InvalidSize`].
pub fn validate_size(size_bytes: u64) -> Result<()> {
    if (MIN_IMAGE_BYTES..=MAX_IMAGE_BYTES).contains(&size_bytes) && size_bytes % 4096 == 0 {
        Ok(())
    } else {
        Err(StoreError::InvalidSize { size_bytes })
    }
}

/// A directory of read-only base images. Cheap to clone; every method takes `&self` and is
/// safe to call from several threads and processes at once (see the module doc for what is
/// atomic).
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// Opens the store at `dir`, creating `dir`, `images/`, `tags/` and `tmp/` (mode 0700) as
    /// needed, and removes temporary entries older than [`STALE_TMP_AGE`] (left by killed
    /// imports) if it may.
    ///
    /// # Errors
    /// [`StoreError::Io`] if a directory cannot be created or read.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let store = Self { dir: dir.into() };
        for d in [store.images_dir(), store.tags_dir()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        // Imports may hold setuid files from an image in tmp/: keep other users out. (The mode
        // applies only when the directory is made, so a store someone else made can still be
        // opened to resolve images.)
        let tmp = store.tmp_dir();
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&tmp)
            .map_err(io_err(&tmp))?;
        match store.remove_stale_tmp(STALE_TMP_AGE) {
            Err(StoreError::Io { source, .. })
                if source.kind() == io::ErrorKind::PermissionDenied => {}
            r => {
                r?;
            }
        }
        Ok(store)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    fn tags_dir(&self) -> PathBuf {
        self.dir.join("tags")
    }

    /// Where imports stage their files: on the store's file system, so a rename commits them.
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The file an image with `digest` lives in (whether or not it exists).
    pub fn image_path(&self, digest: &ImageDigest) -> PathBuf {
        self.images_dir()
            .join(format!("sha256-{}.img", digest.hex()))
    }

    /// Removes entries of `tmp/` last modified more than `older_than` ago. An import running
    /// for longer than that would lose its staging files, so keep it generous.
    ///
    /// # Errors
    /// [`StoreError::Io`] if `tmp/` cannot be read or an entry cannot be removed.
    pub fn remove_stale_tmp(&self, older_than: Duration) -> Result<usize> {
        let tmp = self.tmp_dir();
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > older_than);
            if !old {
                continue;
            }
            let r = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match r {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(removed)
    }

    /// Looks up an image by `sha256:<hex>` or by tag name.
    ///
    /// # Errors
    /// [`StoreError::InvalidDigest`] / [`StoreError::InvalidTag`] for a malformed reference,
    /// [`StoreError::NotFound`] if it names nothing, [`StoreError::BadTagFile`] for a damaged
    /// tag.
    pub fn resolve(&self, reference: &str) -> Result<ImageRef> {
        let digest = if reference.starts_with("sha256:") {
            reference.parse()?
        } else {
            self.read_tag(reference)?
        };
        self.get(&digest)
    }

    /// The image with `digest`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], or [`StoreError::Io`] if it cannot be looked at.
    pub fn get(&self, digest: &ImageDigest) -> Result<ImageRef> {
        let path = self.image_path(digest);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(ImageRef {
                digest: *digest,
                path,
                size_bytes: meta.len(),
            }),
            Ok(_) => Err(StoreError::NotFound {
                reference: digest.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                reference: digest.to_string(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn read_tag(&self, name: &str) -> Result<ImageDigest> {
        validate_tag(name)?;
        let path = self.tags_dir().join(name);
        let mut text = String::new();
        match File::open(&path) {
            Ok(f) => {
                f.take(MAX_TAG_FILE_BYTES)
                    .read_to_string(&mut text)
                    .map_err(|_| StoreError::BadTagFile { path: path.clone() })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    reference: name.to_string(),
                })
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        text.trim()
            .parse()
            .map_err(|_| StoreError::BadTagFile { path })
    }

    /// Points tag `name` at the image `digest` (replacing what it named before, atomically).
    ///
    /// # Errors
    /// [`StoreError::InvalidTag`], [`StoreError::NotFound`] if the image is not in the store,
    /// [`StoreError::Io`].
    pub fn tag(&self, name: &str, digest: &ImageDigest) -> Result<()> {
        validate_tag(name)?;
        self.get(digest)?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("tag-")
            .tempfile_in(&tmp_dir)
            .map_err(io_err(&tmp_dir))?;
        let path = self.tags_dir().join(name);
        io::Write::write_all(&mut tmp, format!("{digest}\n").as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_err(tmp.path()))?;
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        sync_dir(&self.tags_dir())
    }

    /// Deletes tag `name`; the image stays.
    ///
    /// # Errors
    /// [`StoreError::InvalidTag`], [`StoreError::NotFound`], [`StoreError::Io`].
    pub fn untag(&self, name: &str) -> Result<()> {
        validate_tag(name)?;
        let path = self.tags_dir().join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                reference: name.to_string(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every tag and the digest it names, sorted by name. Damaged tag files are skipped.
    ///
    /// # Errors
    /// [`StoreError::Io`] if `tags/` cannot be read.
    pub fn tags(&self) -> Result<Vec<(String, ImageDigest)>> {
        let dir = self.tags_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if validate_tag(&name).is_err() {
                continue;
            }
            if let Ok(d) = self.read_tag(&name) {
                out.push((name, d));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every image in the store, sorted by digest.
    ///
    /// # Errors
    /// [`StoreError::Io`] if `images/` cannot be read.
    pub fn list(&self) -> Result<Vec<ImageRef>> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let name = entry.file_name();
            let Some(digest) = name
                .to_str()
                .and_then(|n| n.strip_prefix("sha256-"))
                .and_then(|n| n.strip_suffix(".img"))
                .and_then(ImageDigest::from_hex)
            else {
                continue;
            };
            match self.get(&digest) {
                Ok(r) => out.push(r),
                // Removed since read_dir saw it.
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|r| r.digest);
        Ok(out)
    }

    /// Re-hashes an image and checks the hash is still its name. Reads the whole file (holes
    /// are hashed as zeroes without being read): about a second per GiB of data.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`], [`StoreError::NotFound`], [`StoreError::Io`].
    pub fn verify(&self, digest: &ImageDigest) -> Result<ImageRef> {
        let image = self.get(digest)?;
        let file = File::open(&image.path).map_err(io_err(&image.path))?;
        let (actual, _) = hash_sparse(&file).map_err(io_err(&image.path))?;
        if actual == *digest {
            Ok(image)
        } else {
            Err(StoreError::Corrupt {
                digest: *digest,
                actual,
            })
        }
    }

    /// Deletes an image. Refused while a tag names it ([`StoreError::Tagged`]): tags are how
    /// the runtime finds the images it still needs. The store does not know which overlays use
    /// an image as their backing file; the caller must (an overlay whose base is gone cannot
    /// be opened, and a running VMM keeps reading its already-open file).
    ///
    /// # Errors
    /// [`StoreError::Tagged`], [`StoreError::NotFound`], [`StoreError::Io`].
    pub fn remove(&self, digest: &ImageDigest) -> Result<()> {
        let tags: Vec<String> = self
            .tags()?
            .into_iter()
            .filter(|(_, d)| d == digest)
            .map(|(n, _)| n)
            .collect();
        if !tags.is_empty() {
            return Err(StoreError::Tagged {
                digest: *digest,
                tags,
            });
        }
        let path = self.image_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.images_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                reference: digest.to_string(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Copies a raw ext4 image into the store. The copy is sparse: holes in `path` and 4 KiB
    /// blocks of zeroes stay unallocated. The file must carry an ext2/3/4 superblock (the guest
    /// mounts the whole disk as its root file system).
    ///
    /// # Errors
    /// [`StoreError::NotExt4`], [`StoreError::Io`].
    pub fn import_raw(&self, path: &Path) -> Result<ImageRef> {
        let src = File::open(path).map_err(io_err(path))?;
        let meta = src.metadata().map_err(io_err(path))?;
        if !meta.is_file() || !has_ext4_magic(&src) {
            return Err(StoreError::NotExt4 {
                path: path.to_path_buf(),
            });
        }
        let tmp = self.new_temp_file()?;
        let (digest, size) = copy_sparse(&src, tmp.as_file()).map_err(io_err(tmp.path()))?;
        self.commit(tmp, digest, size)
    }

    /// Builds an ext4 image of `size_bytes` from the tree at `dir` and inserts it:
    /// `mkfs.ext4 -q -F -m 0 -i 8192 -L sandbox-root -E root_owner=0:0 -d <dir>` on a sparse
    /// file. File owners, modes and times come from the tree (run as root for owners other than
    /// your own); the image's root directory is owned by 0:0. The tree is used as it is: it
    /// must already have the agent as `/sbin/init` (see `docs/images.md`).
    ///
    /// # Errors
    /// [`StoreError::InvalidSize`], [`StoreError::NotADirectory`],
    /// [`StoreError::MissingTool`], [`StoreError::Mkfs`] (often: the tree does not fit),
    /// [`StoreError::Io`].
    pub fn import_dir(&self, dir: &Path, size_bytes: u64) -> Result<ImageRef> {
        validate_size(size_bytes)?;
        if !fs::metadata(dir).map_err(io_err(dir))?.is_dir() {
            return Err(StoreError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
        let tmp = self.new_temp_file()?;
        tmp.as_file()
            .set_len(size_bytes)
            .map_err(io_err(tmp.path()))?;
        let out = Command::new(mkfs)
            .args(["-q", "-F", "-m", "0", "-i", "8192", "-L", "sandbox-root"])
            .args(["-E", "root_owner=0:0", "-d"])
            .arg(dir)
            .arg(tmp.path())
            .env("LC_ALL", "C")
            .output()
            .map_err(io_err(tmp.path()))?;
        if !out.status.success() {
            let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            truncate_utf8(&mut stderr, MAX_TOOL_OUTPUT);
            return Err(StoreError::Mkfs {
                status: out.status,
                size_bytes,
                stderr,
            });
        }
        let file = tmp.as_file();
        file.sync_all().map_err(io_err(tmp.path()))?;
        let (digest, size) = hash_sparse(file).map_err(io_err(tmp.path()))?;
        self.commit(tmp, digest, size)
    }

    fn new_temp_file(&self) -> Result<NamedTempFile> {
        let dir = self.tmp_dir();
        tempfile::Builder::new()
            .prefix("image-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))
    }

    /// Moves a finished temporary image into `images/`: sync, mode 0444, rename, sync the
    /// directory. If the image is already there the temporary file is just dropped.
    fn commit(&self, tmp: NamedTempFile, digest: ImageDigest, size: u64) -> Result<ImageRef> {
        let file = tmp.as_file();
        file.sync_all().map_err(io_err(tmp.path()))?;
        file.set_permissions(fs::Permissions::from_mode(0o444))
            .map_err(io_err(tmp.path()))?;
        let path = self.image_path(&digest);
        if let Ok(existing) = self.get(&digest) {
            return Ok(existing);
        }
        // A concurrent identical insert may rename first: rename replaces its file with the
        // same bytes, which readers cannot tell apart.
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        sync_dir(&self.images_dir())?;
        Ok(ImageRef {
            digest,
            path,
            size_bytes: size,
        })
    }
}

/// Whether `file` has the ext2/3/4 superblock magic.
fn has_ext4_magic(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 2];
    file.read_exact_at(&mut magic, EXT4_MAGIC_OFFSET).is_ok() && magic == EXT4_MAGIC
}

/// fsyncs a directory, so a rename in it survives a crash.
fn sync_dir(dir: &Path) -> Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Finds a program in `PATH`, then in `/usr/sbin` and `/sbin` (not in a normal user's `PATH`
/// on Debian, and where e2fsprogs puts its tools).
pub(crate) fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .ok_or(StoreError::MissingTool { tool, package })
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::path::Path;
    use std::process::Command;

    /// Runs `debugfs -R <request> <image>` and returns stdout; panics if debugfs fails to run.
    pub fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("/usr/sbin/debugfs")
            .arg("-R")
            .arg(request)
            .arg(image)
            .output()
            .expect("debugfs runs (e2fsprogs is installed)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Builds a small ext4 image at `path` holding `/hello` = "hi\n".
    pub fn small_ext4(path: &Path, size: u64) {
        let tree = tempfile::tempdir().expect("tempdir");
        std::fs::write(tree.path().join("hello"), "hi\n").expect("write");
        let f = std::fs::File::create(path).expect("create");
        f.set_len(size).expect("set_len");
        let st = Command::new("/usr/sbin/mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(tree.path())
            .arg(path)
            .status()
            .expect("mkfs.ext4 runs");
        assert!(st.success());
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest as _, Sha256};
    use std::os::unix::fs::MetadataExt;

    fn store() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path().join("store")).expect("open");
        (dir, store)
    }

    fn tmp_entries(store: &ImageStore) -> Vec<PathBuf> {
        fs::read_dir(store.tmp_dir())
            .expect("read tmp")
            .map(|e| e.expect("entry").path())
            .collect()
    }

    #[test]
    fn digest_round_trips_and_rejects_bad_text() {
        let d = ImageDigest::from_bytes([0xab; 32]);
        let s = d.to_string();
        assert_eq!(s, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(s.parse::<ImageDigest>().expect("parses"), d);
        for bad in [
            "sha256:",
            "sha256:AB",
            &format!("sha256:{}", "AB".repeat(32)),
            &format!("sha512:{}", "ab".repeat(32)),
            &format!("sha256:{}0", "ab".repeat(32)),
            &"ab".repeat(32),
        ] {
            assert!(
                matches!(
                    bad.parse::<ImageDigest>(),
                    Err(StoreError::InvalidDigest { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn import_raw_resolve_tag_verify_remove() {
        let (dir, store) = store();
        let src = dir.path().join("src.img");
        small_ext4(&src, 4 << 20);
        let image = store.import_raw(&src).expect("import");
        let bytes = fs::read(&src).expect("read");
        let want = ImageDigest::from_bytes(Sha256::digest(&bytes).into());
        assert_eq!(image.digest, want);
        assert_eq!(image.size_bytes, 4 << 20);
        assert_eq!(fs::read(&image.path).expect("read"), bytes);
        assert_eq!(
            image.path,
            store
                .dir()
                .join(format!("images/sha256-{}.img", want.hex()))
        );
        let mode = fs::metadata(&image.path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o444);
        assert_eq!(debugfs(&image.path, "cat /hello"), "hi\n");
        let tmp_mode = fs::metadata(store.tmp_dir()).expect("stat").mode();
        assert_eq!(tmp_mode & 0o7777, 0o700);

        assert_eq!(store.resolve(&want.to_string()).expect("by digest"), image);
        assert!(matches!(
            store.resolve("base"),
            Err(StoreError::NotFound { .. })
        ));
        store.tag("base", &want).expect("tag");
        assert_eq!(store.resolve("base").expect("by tag"), image);
        assert_eq!(
            store.tags().expect("tags"),
            vec![("base".to_string(), want)]
        );
        assert_eq!(store.list().expect("list"), vec![image.clone()]);
        assert!(matches!(
            store.resolve("Base"),
            Err(StoreError::InvalidTag { .. })
        ));
        let missing = ImageDigest::from_bytes([1; 32]);
        assert!(matches!(
            store.tag("other", &missing),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.verify(&want).expect("verify"), image);

        // Importing the same bytes again is a no-op with the same answer.
        assert_eq!(store.import_raw(&src).expect("again"), image);
        assert_eq!(store.list().expect("list").len(), 1);

        assert!(matches!(
            store.remove(&want),
            Err(StoreError::Tagged { ref tags, .. }) if tags == &["base".to_string()]
        ));
        store.untag("base").expect("untag");
        assert!(matches!(
            store.untag("base"),
            Err(StoreError::NotFound { .. })
        ));
        store.remove(&want).expect("remove");
        assert!(store.list().expect("list").is_empty());
        assert!(matches!(
            store.remove(&want),
            Err(StoreError::NotFound { .. })
        ));
        assert!(tmp_entries(&store).is_empty());
    }

    #[test]
    fn verify_detects_a_changed_image() {
        let (dir, store) = store();
        let src = dir.path().join("src.img");
        small_ext4(&src, 2 << 20);
        let image = store.import_raw(&src).expect("import");
        fs::set_permissions(&image.path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let f = OpenOptions::new()
            .write(true)
            .open(&image.path)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"x", 100).expect("write");
        assert!(matches!(
            store.verify(&image.digest),
            Err(StoreError::Corrupt { digest, actual }) if digest == image.digest && actual != digest
        ));
    }

    #[test]
    fn import_raw_refuses_non_ext4() {
        let (dir, store) = store();
        let src = dir.path().join("junk");
        fs::write(&src, vec![7u8; 8192]).expect("write");
        assert!(matches!(
            store.import_raw(&src),
            Err(StoreError::NotExt4 { .. })
        ));
        assert!(tmp_entries(&store).is_empty());
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn sparse_import_keeps_holes() {
        let (dir, store) = store();
        let src = dir.path().join("sparse.img");
        let size = 64u64 << 20;
        small_ext4(&src, size);
        // An explicitly written run of zeroes past the file system's metadata: still data in
        // the source, a hole in the copy.
        let f = OpenOptions::new().write(true).open(&src).expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 1 << 20], 60 << 20)
            .expect("write zeroes");
        f.sync_all().expect("sync");
        let src_blocks = fs::metadata(&src).expect("stat").blocks();
        let image = store.import_raw(&src).expect("import");
        let dst = fs::metadata(&image.path).expect("stat");
        assert_eq!(dst.len(), size);
        // st_blocks counts 512-byte units.
        assert!(
            dst.blocks() + 2048 <= src_blocks,
            "copy has {} blocks, source {src_blocks}: the zero megabyte was copied",
            dst.blocks()
        );
        assert!(dst.blocks() * 512 < size / 8, "{} blocks", dst.blocks());
        assert_eq!(
            fs::read(&image.path).expect("read"),
            fs::read(&src).expect("read")
        );
    }

    #[test]
    fn import_dir_builds_ext4_and_failure_leaves_nothing() {
        let (dir, store) = store();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc")).expect("mkdir");
        fs::write(tree.join("etc/x"), "hello image\n").expect("write");
        let image = store.import_dir(&tree, 8 << 20).expect("import");
        assert_eq!(debugfs(&image.path, "cat /etc/x"), "hello image\n");
        assert_eq!(image.size_bytes, 8 << 20);
        store.verify(&image.digest).expect("verify");

        // 2 MiB of random-ish data does not fit in a 1 MiB file system: mkfs fails.
        let mut big = Vec::with_capacity(2 << 20);
        let mut x = 1u32;
        for _ in 0..(2 << 20) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            big.push((x >> 16) as u8);
        }
        fs::write(tree.join("big"), &big).expect("write");
        let err = store.import_dir(&tree, 1 << 20).expect_err("too small");
        assert!(matches!(err, StoreError::Mkfs { .. }), "{err:?}");
        assert!(tmp_entries(&store).is_empty());
        assert_eq!(store.list().expect("list").len(), 1);

        for bad in [0, 4096, (1 << 20) + 1, MAX_IMAGE_BYTES + 4096] {
            assert!(matches!(
                store.import_dir(&tree, bad),
                Err(StoreError::InvalidSize { .. })
            ));
        }
        assert!(matches!(
            store.import_dir(&tree.join("etc/x"), 8 << 20),
            Err(StoreError::NotADirectory { .. })
        ));
    }

    #[test]
    fn concurrent_identical_inserts_leave_one_image() {
        let (dir, store) = store();
        let src = dir.path().join("src.img");
        small_ext4(&src, 4 << 20);
        let results: Vec<ImageRef> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| store.import_raw(&src).expect("import")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(store.list().expect("list").len(), 1);
        assert!(tmp_entries(&store).is_empty());
        store.verify(&results[0].digest).expect("verify");
    }

    #[test]
    fn stale_tmp_entries_are_removed_on_open() {
        let (dir, store) = store();
        let stale = store.tmp_dir().join("image-stale");
        fs::write(&stale, "x").expect("write");
        let fresh = store.tmp_dir().join("image-fresh");
        fs::write(&fresh, "x").expect("write");
        let old = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        File::options()
            .write(true)
            .open(&stale)
            .expect("open")
            .set_modified(old)
            .expect("set mtime");
        ImageStore::open(dir.path().join("store")).expect("reopen");
        assert!(!stale.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn a_damaged_tag_file_is_a_typed_error() {
        let (_dir, store) = store();
        fs::write(store.tags_dir().join("t"), "garbage").expect("write");
        assert!(matches!(
            store.resolve("t"),
            Err(StoreError::BadTagFile { .. })
        ));
        assert!(store.tags().expect("tags").is_empty());
    }

    proptest! {
        #[test]
        fn valid_tags_are_accepted(name in "[a-z0-9][a-z0-9._-]{0,127}") {
            prop_assert!(validate_tag(&name).is_ok());
        }

        #[test]
        fn tag_validator_matches_the_rule(name in "\\PC{0,140}") {
            let ok = validate_tag(&name).is_ok();
            let b = name.as_bytes();
            let rule = !b.is_empty()
                && b.len() <= 128
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && b.iter().all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
            prop_assert_eq!(ok, rule);
        }

        #[test]
        fn tags_with_bad_characters_are_refused(
            pre in "[a-z0-9]{0,10}",
            bad in "[/A-Z \\x00\\n:@+]",
            post in "[a-z0-9]{0,10}",
        ) {
            let name = format!("{pre}{bad}{post}");
            prop_assert!(
                matches!(validate_tag(&name), Err(StoreError::InvalidTag { .. })),
                "{:?} was accepted", name
            );
        }

        #[test]
        fn too_long_or_dot_first_tags_are_refused(n in 129usize..300, c in "[._-]") {
            prop_assert!(validate_tag(&"a".repeat(n)).is_err());
            let name = format!("{c}abc");
            prop_assert!(validate_tag(&name).is_err());
        }
    }
}
