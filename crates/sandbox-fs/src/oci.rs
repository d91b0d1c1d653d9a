//! Importing container images: an OCI image layout directory, or a `docker save` tarball, made
//! into a bootable ext4 base image in the [`ImageStore`].
//!
//! 1. The source is read: a directory as it is; a tarball (plain or gzip) is first unpacked
//!    into a scratch directory under the store's `tmp/` (`archive`).
//! 2. If it has an `oci-layout` file it is read as an OCI image layout (image-spec
//!    `image-layout.md`): `index.json` → (nested indexes) → the manifest for linux/amd64 (a
//!    lone manifest without a platform is taken as it is) → config and layers, every blob
//!    checked against its digest and size before use. Otherwise `manifest.json` (the
//!    `docker save` format, exactly one image) names the config and the layer files; the
//!    config is checked against the digest in its name, layers named `blobs/sha256/<hex>`
//!    against theirs.
//! 3. The config must say `linux`/`amd64`, and have one `rootfs.diff_ids` entry per layer:
//!    each layer's uncompressed tar must hash to its diff id (the only check of old-format
//!    `<id>/layer.tar` files).
//! 4. Layers are applied bottom-up into a staging tree (`layer`; gzip or plain tar; zstd is
//!    refused with [`OciError::UnsupportedCompression`]).
//! 5. The agent binary becomes `/sbin/init` (mode 0755, resolved through the image's own
//!    symlinks the way the guest will, so merged-/usr images get `/usr/sbin/init`), and
//!    missing mount points (`/proc /sys /dev /tmp /run /root`) are made.
//! 6. The tree becomes ext4 with [`ImageStore::import_dir`], and the staging files are
//!    removed, on success and on failure.

mod archive;
mod layer;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::store::{hash_sparse, validate_size, ImageDigest, ImageRef, ImageStore, StoreError};
use archive::Source;
use layer::{make_writable, resolve_in_root, Applier};

/// Largest JSON document read (index, manifest, config): 4 MiB.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Deepest chain of nested indexes followed.
const MAX_INDEX_DEPTH: usize = 4;
/// A `docker save` tarball may unpack to at most this many times the image size (its layers
/// are usually compressed, or hold files that later layers replace).
const ARCHIVE_SIZE_FACTOR: u64 = 4;
/// A layer's uncompressed tar may be at most this many times the image size (plus 1 MiB):
/// its file data cannot exceed the image size, and headers of at most `size / 1024` entries
/// add less than that again.
const LAYER_SIZE_FACTOR: u64 = 2;
/// The platform we run.
const OS: &str = "linux";
const ARCH: &str = "amd64";

/// Errors from importing a container image. Layer indexes count from 0 = the bottom layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// A store error: bad size, mkfs failure, I/O in the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source has neither `oci-layout` nor `manifest.json`.
    #[error("{path} is neither an OCI image layout (oci-layout, index.json) nor a docker save archive (manifest.json).")]
    NotAnImage {
        /// The source.
        path: PathBuf,
    },
    /// The agent binary is missing.
    #[error("The agent binary {path} is not a file; build it (docs/agent.md) and pass its path.")]
    AgentMissing {
        /// The path given.
        path: PathBuf,
    },
    /// A file the image's metadata names is not in it.
    #[error("The image has no file {name}.")]
    MissingFile {
        /// The file, relative to the layout / archive root.
        name: String,
    },
    /// A blob's bytes do not hash to its digest.
    #[error("{name} hashes to {actual}, not {expected}.")]
    DigestMismatch {
        /// The blob or file.
        name: String,
        /// The digest it should have.
        expected: ImageDigest,
        /// What it hashes to.
        actual: ImageDigest,
    },
    /// A blob's size differs from its descriptor's.
    #[error("{name} is {actual} bytes, its descriptor says {expected}.")]
    SizeMismatch {
        /// The blob.
        name: String,
        /// The descriptor's size.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// A layer's uncompressed tar does not hash to its diff id in the config.
    #[error("Layer {layer} uncompressed hashes to {actual}, the config says {expected}.")]
    DiffIdMismatch {
        /// The layer.
        layer: usize,
        /// The config's diff id.
        expected: ImageDigest,
        /// What it hashes to.
        actual: ImageDigest,
    },
    /// The config's diff id count differs from the manifest's layer count.
    #[error("The manifest has {layers} layers, the config {diff_ids} diff ids.")]
    LayerCount {
        /// Layers in the manifest.
        layers: usize,
        /// Diff ids in the config.
        diff_ids: usize,
    },
    /// A digest uses an algorithm other than sha256, or is malformed.
    #[error("Unsupported or malformed digest {digest:?} (only sha256:<64 hex digits>).")]
    UnsupportedDigest {
        /// The digest string.
        digest: String,
    },
    /// A layer is compressed with something other than gzip.
    #[error("Layer {layer} is {compression}-compressed; only gzip and plain tar layers are supported (re-export the image with gzip layers).")]
    UnsupportedCompression {
        /// The layer.
        layer: usize,
        /// The compression found.
        compression: &'static str,
    },
    /// A JSON document is malformed or too big.
    #[error("{name} is not a valid document of its kind (or larger than 4 MiB).")]
    BadJson {
        /// The file.
        name: String,
        /// The parse error, if it was one.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// `manifest.json` describes more or fewer than one image.
    #[error("manifest.json describes {count} images; save exactly one (docker save <image>).")]
    AmbiguousManifest {
        /// How many.
        count: usize,
    },
    /// The index has no linux/amd64 manifest.
    #[error("The image index has no linux/amd64 manifest (platforms: {found:?}).")]
    NoPlatform {
        /// The platforms it has, `os/architecture`.
        found: Vec<String>,
    },
    /// The image config is for another platform.
    #[error("The image is for {os}/{architecture}; sandboxes run linux/amd64.")]
    WrongPlatform {
        /// The config's os.
        os: String,
        /// The config's architecture.
        architecture: String,
    },
    /// A layer entry's name has a `..` component (or a NUL byte).
    #[error("Layer {layer} entry {entry:?} climbs out of the root with '..'.")]
    EntryEscapes {
        /// The layer.
        layer: usize,
        /// The entry's name as in the tar.
        entry: String,
    },
    /// A layer entry lies under a symlink; writing it would follow the symlink on the host.
    #[error(
        "Layer {layer} entry {entry:?} lies under a symlink; refusing to follow it on the host."
    )]
    SymlinkInPath {
        /// The layer.
        layer: usize,
        /// The entry's name as in the tar.
        entry: String,
    },
    /// A layer entry lies under something that is not a directory.
    #[error("Layer {layer} entry {entry:?} lies under a non-directory.")]
    NotADirectoryInPath {
        /// The layer.
        layer: usize,
        /// The entry's name as in the tar.
        entry: String,
    },
    /// A hard link's target is outside the tree, missing, reached through a symlink, or a
    /// directory.
    #[error(
        "Layer {layer} hard link {entry:?} -> {target:?} does not name a file inside the image."
    )]
    BadHardLink {
        /// The layer.
        layer: usize,
        /// The link's name.
        entry: String,
        /// Its target.
        target: String,
    },
    /// An entry name in a `docker save` tarball, or a file named by its manifest, climbs out
    /// of it with `..`.
    #[error("Archive entry {entry:?} climbs out of the archive with '..'.")]
    ArchiveEscapes {
        /// The name.
        entry: String,
    },
    /// The image's files are bigger than the image size asked for.
    #[error("The image's files exceed {max_bytes} bytes; ask for a bigger image.")]
    TooLarge {
        /// The limit.
        max_bytes: u64,
    },
    /// The layers hold more entries than an image of this size can (one per KiB of image).
    #[error("The layers hold more than {max_entries} entries; ask for a bigger image.")]
    TooManyEntries {
        /// The limit.
        max_entries: u64,
    },
    /// `/sbin/init` cannot be written (it is a directory, or `/sbin` is a file).
    #[error("Cannot install the agent as /sbin/init in the image.")]
    BadInit {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a layer failed (malformed tar, gzip error, disk full...).
    #[error("Layer {layer} entry {entry:?} could not be applied.")]
    Layer {
        /// The layer.
        layer: usize,
        /// The entry's name, empty if the tar itself is malformed.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the `docker save` tarball failed.
    #[error("Archive entry {entry:?} could not be unpacked.")]
    Archive {
        /// The entry's name, empty if the tar itself is malformed.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Other I/O.
    #[error("I/O error on {path}.")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What [`ImageStore::import_oci`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OciImport {
    /// The image in the store.
    pub image: ImageRef,
    /// The manifest's digest (OCI layout), or the config's (the docker image id) for a
    /// `manifest.json` archive.
    pub source_digest: String,
    /// Layers applied.
    pub layers: usize,
    /// Entries written (files, directories, links, FIFOs).
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Character and block device entries skipped: the guest's `/dev` is a devtmpfs.
    pub skipped_devices: u64,
    /// Other entries skipped (sockets, unknown types, pax global headers, aufs bookkeeping).
    pub skipped_other: u64,
    /// Whether the image has `/bin/sh` (resolved through its symlinks): most uses need it.
    pub has_bin_sh: bool,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct OciLayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    _version: String,
}

/// A layer to apply.
#[derive(Debug)]
struct LayerFile {
    /// Path relative to the source root.
    name: String,
    /// The blob's digest and size, when the format names them.
    blob: Option<(ImageDigest, Option<u64>)>,
    media_type: String,
}

/// What to apply, found from the image's metadata.
#[derive(Debug)]
struct Plan {
    source_digest: String,
    diff_ids: Vec<ImageDigest>,
    layers: Vec<LayerFile>,
}

fn parse_digest(s: &str) -> Result<ImageDigest, OciError> {
    s.parse().map_err(|_| OciError::UnsupportedDigest {
        digest: s.to_string(),
    })
}

fn blob_name(digest: &ImageDigest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Checks a whole file against a digest and, if given, a size.
fn verify_file(
    file: &File,
    name: &str,
    digest: &ImageDigest,
    size: Option<u64>,
) -> Result<(), OciError> {
    let io = |source| OciError::Io {
        path: PathBuf::from(name),
        source,
    };
    let len = file.metadata().map_err(io)?.len();
    if let Some(expected) = size {
        if expected != len {
            return Err(OciError::SizeMismatch {
                name: name.to_string(),
                expected,
                actual: len,
            });
        }
    }
    let (actual, _) = hash_sparse(file).map_err(io)?;
    if actual != *digest {
        return Err(OciError::DigestMismatch {
            name: name.to_string(),
            expected: *digest,
            actual,
        });
    }
    Ok(())
}

/// Reads a JSON file of at most [`MAX_JSON_BYTES`], checked against `digest` (and `size`) if
/// given.
fn read_json<T: DeserializeOwned>(
    source: &Source,
    name: &str,
    check: Option<(&ImageDigest, Option<u64>)>,
) -> Result<T, OciError> {
    let bad = |source| OciError::BadJson {
        name: name.to_string(),
        source,
    };
    if check
        .and_then(|(_, s)| s)
        .is_some_and(|s| s > MAX_JSON_BYTES)
    {
        return Err(bad(None));
    }
    let file = source.open(name)?;
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| OciError::Io {
            path: PathBuf::from(name),
            source,
        })?;
    if bytes.len() as u64 > MAX_JSON_BYTES {
        return Err(bad(None));
    }
    if let Some((digest, size)) = check {
        if let Some(expected) = size.filter(|&s| s != bytes.len() as u64) {
            return Err(OciError::SizeMismatch {
                name: name.to_string(),
                expected,
                actual: bytes.len() as u64,
            });
        }
        let actual = ImageDigest::from_bytes(Sha256::digest(&bytes).into());
        if actual != *digest {
            return Err(OciError::DigestMismatch {
                name: name.to_string(),
                expected: *digest,
                actual,
            });
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(Some(e)))
}

fn read_blob_json<T: DeserializeOwned>(source: &Source, d: &Descriptor) -> Result<T, OciError> {
    let digest = parse_digest(&d.digest)?;
    read_json(source, &blob_name(&digest), Some((&digest, Some(d.size))))
}

fn is_ours(p: &Platform) -> bool {
    p.os == OS && p.architecture == ARCH
}

/// Finds the linux/amd64 image manifest under an index's descriptors.
fn select_manifest(
    source: &Source,
    manifests: &[Descriptor],
    depth: usize,
    found: &mut Vec<String>,
) -> Result<Option<(String, Manifest)>, OciError> {
    if depth > MAX_INDEX_DEPTH {
        return Ok(None);
    }
    // Descriptors that say they are ours first; then those that do not say.
    let ours = manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(is_ours));
    let unsaid = manifests.iter().filter(|d| d.platform.is_none());
    for d in ours.chain(unsaid) {
        let value: serde_json::Value = read_blob_json(source, d)?;
        if value.get("manifests").is_some() {
            let index: Index = serde_json::from_value(value).map_err(|e| OciError::BadJson {
                name: d.digest.clone(),
                source: Some(e),
            })?;
            if let Some(m) = select_manifest(source, &index.manifests, depth + 1, found)? {
                return Ok(Some(m));
            }
        } else if value.get("layers").is_some() {
            let m: Manifest = serde_json::from_value(value).map_err(|e| OciError::BadJson {
                name: d.digest.clone(),
                source: Some(e),
            })?;
            return Ok(Some((d.digest.clone(), m)));
        }
    }
    found.extend(
        manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture)),
    );
    Ok(None)
}

fn plan_oci(source: &Source) -> Result<Plan, OciError> {
    let _: OciLayoutFile = read_json(source, "oci-layout", None)?;
    let index: Index = read_json(source, "index.json", None)?;
    let mut found = Vec::new();
    let (manifest_digest, manifest) = select_manifest(source, &index.manifests, 0, &mut found)?
        .ok_or(OciError::NoPlatform { found })?;
    let config: ImageConfig = read_blob_json(source, &manifest.config)?;
    let layers = manifest
        .layers
        .iter()
        .map(|d| {
            let digest = parse_digest(&d.digest)?;
            Ok(LayerFile {
                name: blob_name(&digest),
                blob: Some((digest, Some(d.size))),
                media_type: d.media_type.clone(),
            })
        })
        .collect::<Result<Vec<_>, OciError>>()?;
    finish_plan(manifest_digest, config, layers)
}

/// The digest a `docker save` file name carries: `blobs/sha256/<hex>` or `<hex>.json`.
fn digest_in_name(name: &str) -> Option<ImageDigest> {
    let base = name.rsplit('/').next()?;
    if let Some(hex) = name.strip_prefix("blobs/sha256/") {
        return ImageDigest::from_hex(hex);
    }
    ImageDigest::from_hex(base.strip_suffix(".json")?)
}

fn plan_docker(source: &Source) -> Result<Plan, OciError> {
    let entries: Vec<DockerEntry> = read_json(source, "manifest.json", None)?;
    let [entry] = entries.as_slice() else {
        return Err(OciError::AmbiguousManifest {
            count: entries.len(),
        });
    };
    let config_digest =
        digest_in_name(&entry.config).ok_or_else(|| OciError::UnsupportedDigest {
            digest: entry.config.clone(),
        })?;
    let config: ImageConfig = read_json(source, &entry.config, Some((&config_digest, None)))?;
    let layers = entry
        .layers
        .iter()
        .map(|name| LayerFile {
            name: name.clone(),
            blob: name
                .strip_prefix("blobs/sha256/")
                .and_then(ImageDigest::from_hex)
                .map(|d| (d, None)),
            media_type: String::new(),
        })
        .collect();
    finish_plan(config_digest.to_string(), config, layers)
}

fn finish_plan(
    source_digest: String,
    config: ImageConfig,
    layers: Vec<LayerFile>,
) -> Result<Plan, OciError> {
    if config.os != OS || config.architecture != ARCH {
        return Err(OciError::WrongPlatform {
            os: config.os,
            architecture: config.architecture,
        });
    }
    if config.rootfs.diff_ids.len() != layers.len() {
        return Err(OciError::LayerCount {
            layers: layers.len(),
            diff_ids: config.rootfs.diff_ids.len(),
        });
    }
    let diff_ids = config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| parse_digest(d))
        .collect::<Result<_, _>>()?;
    Ok(Plan {
        source_digest,
        diff_ids,
        layers,
    })
}

/// Hashes what is read through it.
/// Hashes what is read through it, and fails once more than `limit` bytes came through: the
/// tar crate reads GNU long names and PAX headers whole into memory, so this also bounds that.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    read: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.limit {
            self.exceeded = true;
            return Err(io::Error::other("the layer is larger than the limit"));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Applies layer `index` of the plan.
fn apply_one(
    source: &Source,
    applier: &mut Applier,
    index: usize,
    layer: &LayerFile,
    diff_id: &ImageDigest,
    max_bytes: u64,
) -> Result<(), OciError> {
    if layer.media_type.contains("zstd") {
        return Err(OciError::UnsupportedCompression {
            layer: index,
            compression: "zstd",
        });
    }
    let mut file = source.open(&layer.name)?;
    if let Some((digest, size)) = &layer.blob {
        verify_file(&file, &layer.name, digest, *size)?;
    }
    let io = |source| OciError::Layer {
        layer: index,
        entry: String::new(),
        source,
    };
    file.rewind().map_err(io)?;
    let mut reader = BufReader::new(file);
    let head = reader.fill_buf().map_err(io)?;
    let stream: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(OciError::UnsupportedCompression {
            layer: index,
            compression: "zstd",
        });
    } else {
        Box::new(reader)
    };
    let limit = max_bytes
        .saturating_mul(LAYER_SIZE_FACTOR)
        .saturating_add(1 << 20);
    let mut archive = tar::Archive::new(HashingReader {
        inner: stream,
        hash: Sha256::new(),
        read: 0,
        limit,
        exceeded: false,
    });
    let applied = applier.apply_layer(index, &mut archive);
    let mut rest = archive.into_inner();
    if rest.exceeded {
        return Err(OciError::TooLarge { max_bytes });
    }
    applied?;
    // The diff id covers the whole uncompressed stream, padding after the end marker included.
    let drained = io::copy(&mut rest, &mut io::sink());
    if rest.exceeded {
        return Err(OciError::TooLarge { max_bytes });
    }
    drained.map_err(io)?;
    let actual = ImageDigest::from_bytes(rest.hash.finalize().into());
    if actual != *diff_id {
        return Err(OciError::DiffIdMismatch {
            layer: index,
            expected: *diff_id,
            actual,
        });
    }
    Ok(())
}

/// Copies the agent in as `/sbin/init` (resolved the way the guest will) with mode 0755.
fn install_agent(rootfs: &Path, agent: &Path) -> Result<(), OciError> {
    let bad = |source| OciError::BadInit { source };
    let sbin = resolve_in_root(rootfs, Path::new("/sbin")).map_err(bad)?;
    fs::create_dir_all(&sbin).map_err(bad)?;
    let init = sbin.join("init");
    match fs::symlink_metadata(&init) {
        Ok(m) if m.is_dir() => {
            return Err(bad(io::Error::new(
                io::ErrorKind::IsADirectory,
                "/sbin/init is a directory",
            )))
        }
        Ok(_) => fs::remove_file(&init).map_err(bad)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(e)),
    }
    let mut from = File::open(agent).map_err(|source| OciError::Io {
        path: agent.to_path_buf(),
        source,
    })?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&init)
        .map_err(bad)?;
    io::copy(&mut from, &mut to).map_err(bad)?;
    if nix::unistd::geteuid().is_root() {
        nix::unistd::fchown(&to, Some(0.into()), Some(0.into())).map_err(|e| bad(e.into()))?;
    }
    to.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(bad)?;
    Ok(())
}

/// Makes the agent's mount points and root's home if the image lacks them.
fn add_mount_points(rootfs: &Path) -> Result<(), OciError> {
    for (name, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("run", 0o755),
        ("root", 0o700),
    ] {
        let path = rootfs.join(name);
        let io = |source| OciError::Io {
            path: path.clone(),
            source,
        };
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path).map_err(io)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
            Ok(_) => {}
        }
    }
    Ok(())
}

impl ImageStore {
    /// Imports a container image (an OCI image layout directory, or a `docker save` tarball,
    /// plain or gzip) as an ext4 image of `size_bytes`, with `agent` (the static
    /// `sandbox-agent` binary) as its `/sbin/init`. See the module doc for the steps and
    /// `docs/images.md` for what is refused. Staging files go under the store's `tmp/` and
    /// are removed whatever happens.
    ///
    /// # Errors
    /// Every [`OciError`] variant; store failures (size, mkfs) as [`OciError::Store`].
    pub fn import_oci(
        &self,
        path: &Path,
        agent: &Path,
        size_bytes: u64,
    ) -> Result<OciImport, OciError> {
        validate_size(size_bytes)?;
        if !fs::metadata(agent).is_ok_and(|m| m.is_file()) {
            return Err(OciError::AgentMissing {
                path: agent.to_path_buf(),
            });
        }
        let tmp = self.tmp_dir();
        let staging = tempfile::Builder::new()
            .prefix("oci-")
            .tempdir_in(&tmp)
            .map_err(|source| OciError::Io { path: tmp, source })?;
        let result = self.import_oci_in(staging.path(), path, agent, size_bytes);
        // A non-root import may have left read-only directories that would stop the removal.
        let _ = make_writable(staging.path());
        drop(staging);
        result
    }

    fn import_oci_in(
        &self,
        staging: &Path,
        path: &Path,
        agent: &Path,
        size_bytes: u64,
    ) -> Result<OciImport, OciError> {
        let io_at = |p: &Path| {
            let p = p.to_path_buf();
            move |source| OciError::Io { path: p, source }
        };
        let meta = fs::metadata(path).map_err(io_at(path))?;
        let source = if meta.is_dir() {
            Source::dir(path)
        } else {
            let scratch = staging.join("archive");
            fs::create_dir(&scratch).map_err(io_at(&scratch))?;
            archive::unpack(
                path,
                &scratch,
                size_bytes.saturating_mul(ARCHIVE_SIZE_FACTOR),
            )?
        };
        let plan = if source.has("oci-layout") {
            plan_oci(&source)?
        } else if source.has("manifest.json") {
            plan_docker(&source)?
        } else {
            return Err(OciError::NotAnImage {
                path: path.to_path_buf(),
            });
        };

        let rootfs = staging.join("rootfs");
        fs::create_dir(&rootfs).map_err(io_at(&rootfs))?;
        fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755)).map_err(io_at(&rootfs))?;
        let mut applier = Applier::new(&rootfs, size_bytes);
        for (i, (layer, diff_id)) in plan.layers.iter().zip(&plan.diff_ids).enumerate() {
            apply_one(&source, &mut applier, i, layer, diff_id, size_bytes)?;
        }
        install_agent(&rootfs, agent)?;
        add_mount_points(&rootfs)?;
        applier.finish().map_err(io_at(&rootfs))?;
        let has_bin_sh = resolve_in_root(&rootfs, Path::new("/bin/sh"))
            .and_then(fs::symlink_metadata)
            .is_ok_and(|m| m.is_file());
        let image = self.import_dir(&rootfs, size_bytes)?;
        let s = &applier.stats;
        Ok(OciImport {
            image,
            source_digest: plan.source_digest,
            layers: plan.layers.len(),
            entries: s.entries,
            bytes: s.bytes,
            whiteouts: s.whiteouts,
            skipped_devices: s.skipped_devices,
            skipped_other: s.skipped_other,
            has_bin_sh,
        })
    }
}

#[cfg(test)]
mod test_utils {
    use std::io::Write;
    use std::path::Path;

    use sha2::{Digest as _, Sha256};
    use tar::{EntryType, Header};

    use crate::store::ImageDigest;

    /// One tar entry for a test layer; names and link targets are written verbatim.
    #[derive(Debug, Clone)]
    pub enum E {
        File(&'static str, &'static str),
        FileOwned(&'static str, &'static str, u32, u64, u64),
        Dir(&'static str),
        DirMode(&'static str, u32),
        Symlink(&'static str, String),
        HardLink(&'static str, &'static str),
        CharDev(&'static str),
    }

    pub fn sha(bytes: &[u8]) -> ImageDigest {
        ImageDigest::from_bytes(Sha256::digest(bytes).into())
    }

    /// A plain tar with `entries`, names written raw (no tar-crate path checks).
    pub fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = Header::new_gnu();
            let (name, kind, data, mode, uid): (&str, EntryType, &[u8], u32, u64) = match e {
                E::File(n, d) => (n, EntryType::Regular, d.as_bytes(), 0o644, 0),
                E::FileOwned(n, d, m, u, _) => (n, EntryType::Regular, d.as_bytes(), *m, *u),
                E::Dir(n) => (n, EntryType::Directory, b"", 0o755, 0),
                E::DirMode(n, m) => (n, EntryType::Directory, b"", *m, 0),
                E::Symlink(n, t) => {
                    h.set_link_name_literal(t.as_bytes()).expect("link name");
                    (n, EntryType::Symlink, b"", 0o777, 0)
                }
                E::HardLink(n, t) => {
                    h.set_link_name_literal(t.as_bytes()).expect("link name");
                    (n, EntryType::Link, b"", 0o644, 0)
                }
                E::CharDev(n) => {
                    h.set_device_major(1).expect("major");
                    h.set_device_minor(3).expect("minor");
                    (n, EntryType::Char, b"", 0o666, 0)
                }
            };
            let gid = match e {
                E::FileOwned(_, _, _, _, g) => *g,
                _ => uid,
            };
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    pub fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        g.write_all(bytes).expect("gzip");
        g.finish().expect("gzip")
    }

    /// A layer blob: the bytes as stored, and its media type.
    pub struct Blob {
        pub stored: Vec<u8>,
        pub media_type: &'static str,
        pub diff_id: ImageDigest,
    }

    pub fn plain(tar: Vec<u8>) -> Blob {
        Blob {
            diff_id: sha(&tar),
            stored: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }

    pub fn gzipped(tar: Vec<u8>) -> Blob {
        Blob {
            diff_id: sha(&tar),
            stored: gzip(&tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        }
    }

    pub fn config(arch: &str, diff_ids: &[ImageDigest]) -> Vec<u8> {
        let ids: Vec<String> = diff_ids.iter().map(ToString::to_string).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ids},
            "config": {"Cmd": ["/bin/sh"]},
        }))
        .expect("json")
    }

    fn put_blob(dir: &Path, bytes: &[u8]) -> ImageDigest {
        let d = sha(bytes);
        let p = dir.join("blobs/sha256");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join(d.hex()), bytes).expect("write blob");
        d
    }

    /// Writes an OCI image layout at `dir` whose index lists an arm64 manifest (missing
    /// blob) and then a nested index holding the amd64 manifest.
    pub fn oci_layout(dir: &Path, layers: &[Blob], arch: &str) {
        let diff_ids: Vec<ImageDigest> = layers.iter().map(|l| l.diff_id).collect();
        let cfg = config(arch, &diff_ids);
        let cfg_d = put_blob(dir, &cfg);
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|l| {
                let d = put_blob(dir, &l.stored);
                serde_json::json!({"mediaType": l.media_type, "digest": d.to_string(), "size": l.stored.len()})
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cfg_d.to_string(), "size": cfg.len()},
            "layers": layer_descs,
        }))
        .expect("json");
        let m_d = put_blob(dir, &manifest);
        let nested = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": format!("sha256:{}", "0".repeat(64)), "size": 10,
                 "platform": {"os": "unknown", "architecture": "unknown"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": m_d.to_string(), "size": manifest.len(),
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        }))
        .expect("json");
        let n_d = put_blob(dir, &nested);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": format!("sha256:{}", "1".repeat(64)), "size": 10,
                 "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": "application/vnd.oci.image.index.v1+json",
                 "digest": n_d.to_string(), "size": nested.len()},
            ],
        });
        std::fs::write(dir.join("index.json"), index.to_string()).expect("write");
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("write");
    }

    /// Writes an old-format `docker save` tarball: `<id>/layer.tar` files (the last one a
    /// symlink to the first if `dup_last`), `<config hex>.json`, `manifest.json`.
    pub fn docker_save(path: &Path, layers: &[Vec<u8>], diff_ids: &[ImageDigest], dup_last: bool) {
        let cfg = config("amd64", diff_ids);
        let cfg_name = format!("{}.json", sha(&cfg).hex());
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).expect("append");
        };
        let mut names = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            if !(dup_last && i + 1 == layers.len() && i > 0) {
                add(&name, l);
            }
            names.push(name);
        }
        add(&cfg_name, &cfg);
        let manifest = serde_json::json!([{
            "Config": cfg_name, "RepoTags": ["test:latest"], "Layers": names,
        }]);
        add("manifest.json", manifest.to_string().as_bytes());
        if dup_last && layers.len() > 1 {
            let mut h = Header::new_gnu();
            h.set_entry_type(EntryType::Symlink);
            h.set_size(0);
            b.append_link(
                &mut h,
                format!("layer{}/layer.tar", layers.len() - 1),
                "../layer0/layer.tar",
            )
            .expect("link");
        }
        std::fs::write(path, b.into_inner().expect("finish")).expect("write");
    }

    /// Packs a directory (an OCI layout) into a tarball, as newer `docker save` does.
    pub fn tar_dir(dir: &Path, out: &Path) {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", dir).expect("pack");
        std::fs::write(out, b.into_inner().expect("finish")).expect("write");
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;
    use crate::store::test_utils::debugfs;

    const AGENT: &str = "#!agent binary stand-in\n";

    struct Fixture {
        dir: tempfile::TempDir,
        store: ImageStore,
        agent: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ImageStore::open(dir.path().join("store")).expect("open");
        let agent = dir.path().join("agent");
        fs::write(&agent, AGENT).expect("write");
        Fixture { dir, store, agent }
    }

    impl Fixture {
        fn tmp_is_empty(&self) -> bool {
            fs::read_dir(self.store.tmp_dir())
                .expect("read tmp")
                .next()
                .is_none()
        }
    }

    fn base_layer() -> Vec<u8> {
        layer(&[
            E::Dir("./"),
            E::Dir("etc/"),
            E::File("etc/x", "one\n"),
            E::File("etc/gone", "bye\n"),
            E::HardLink("etc/xlink", "etc/x"),
            E::Dir("opq/"),
            E::File("opq/old", "old\n"),
            E::DirMode("tmp/", 0o1777),
            E::DirMode("ro/", 0o555),
            E::File("ro/f", "in a read-only dir\n"),
            E::File("opq/sub/deep", "deep\n"),
            E::Dir("usr/sbin/"),
            E::Symlink("sbin", "usr/sbin".into()),
            E::Symlink("usr/sbin/init", "/lib/systemd/systemd".into()),
            E::File("/bin/sh", "sh\n"),
            E::CharDev("dev/null"),
            E::FileOwned("usr/bin/su", "su\n", 0o4755, 0, 0),
            E::FileOwned("home/u/f", "mine\n", 0o600, 1000, 1001),
        ])
    }

    fn top_layer() -> Vec<u8> {
        layer(&[
            E::File("etc/.wh.gone", ""),
            E::File("opq/new", "new\n"),
            E::File("opq/.wh..wh..opq", ""),
            E::File("etc/x", "two\n"),
        ])
    }

    fn check_layered_image(image: &Path) {
        assert_eq!(debugfs(image, "cat /etc/x"), "two\n");
        assert_eq!(debugfs(image, "cat /etc/xlink"), "one\n");
        let etc = debugfs(image, "ls /etc");
        assert!(etc.contains("xlink") && !etc.contains("gone"), "{etc}");
        let opq = debugfs(image, "ls /opq");
        assert!(opq.contains("new"), "{opq}");
        assert!(!opq.contains("old") && !opq.contains("sub"), "{opq}");
        assert_eq!(debugfs(image, "cat /sbin/init"), AGENT);
        assert_eq!(debugfs(image, "cat /usr/sbin/init"), AGENT);
        let init = debugfs(image, "stat /usr/sbin/init");
        assert!(init.contains("Mode:  0755"), "{init}");
        // Owners from the tar headers are kept only when importing as root (CI does).
        let as_root = nix::unistd::geteuid().is_root();
        assert!(!as_root || init.contains("User:     0"), "{init}");
        let tmp = debugfs(image, "stat /tmp");
        assert!(tmp.contains("Mode:  01777"), "{tmp}");
        let ro = debugfs(image, "stat /ro");
        assert!(ro.contains("Mode:  0555"), "{ro}");
        assert_eq!(debugfs(image, "cat /ro/f"), "in a read-only dir\n");
        let su = debugfs(image, "stat /usr/bin/su");
        assert!(su.contains("Mode:  04755"), "{su}");
        let f = debugfs(image, "stat /home/u/f");
        assert!(
            !as_root || (f.contains("User:  1000") && f.contains("Group:  1001")),
            "{f}"
        );
        let root = debugfs(image, "ls -l /");
        for d in ["proc", "sys", "dev", "tmp", "run", "root"] {
            assert!(root.contains(&format!(" {d}")), "/{d} missing: {root}");
        }
        assert_eq!(
            debugfs(image, "ls /dev")
                .split_whitespace()
                .filter(|w| *w == "null")
                .count(),
            0
        );
    }

    #[test]
    fn oci_layout_dir_with_whiteouts_opaque_dirs_and_the_agent() {
        let fx = fixture();
        let layout = fx.dir.path().join("layout");
        oci_layout(
            &layout,
            &[gzipped(base_layer()), plain(top_layer())],
            "amd64",
        );
        let import = fx
            .store
            .import_oci(&layout, &fx.agent, 16 << 20)
            .expect("import");
        assert_eq!(import.layers, 2);
        assert_eq!(import.skipped_devices, 1);
        assert!(import.whiteouts >= 2);
        assert!(import.has_bin_sh);
        check_layered_image(&import.image.path);
        assert!(import.source_digest.starts_with("sha256:"));
        fx.store.verify(&import.image.digest).expect("verify");
        assert!(fx.tmp_is_empty());
    }

    #[test]
    fn docker_save_tarballs_old_format_and_oci_inside() {
        let fx = fixture();
        let (l1, l2) = (base_layer(), top_layer());
        let tarball = fx.dir.path().join("save.tar");
        docker_save(
            &tarball,
            &[l1.clone(), l2.clone()],
            &[sha(&l1), sha(&l2)],
            false,
        );
        let import = fx
            .store
            .import_oci(&tarball, &fx.agent, 16 << 20)
            .expect("old format");
        check_layered_image(&import.image.path);
        assert!(fx.tmp_is_empty());

        // Docker 25+: the OCI layout inside the tarball, gzip around the whole thing.
        let layout = fx.dir.path().join("layout");
        oci_layout(&layout, &[plain(l1.clone()), gzipped(l2)], "amd64");
        let packed = fx.dir.path().join("oci.tar");
        tar_dir(&layout, &packed);
        let gz = fx.dir.path().join("oci.tar.gz");
        fs::write(&gz, gzip(&fs::read(&packed).expect("read"))).expect("write");
        let import = fx
            .store
            .import_oci(&gz, &fx.agent, 16 << 20)
            .expect("oci in tar.gz");
        check_layered_image(&import.image.path);
        assert!(fx.tmp_is_empty());

        // A duplicate layer stored as a symlink to the first, as old docker save does.
        let dup = fx.dir.path().join("dup.tar");
        docker_save(&dup, &[l1.clone(), l1.clone()], &[sha(&l1), sha(&l1)], true);
        let import = fx
            .store
            .import_oci(&dup, &fx.agent, 16 << 20)
            .expect("dup layer");
        assert_eq!(debugfs(&import.image.path, "cat /etc/x"), "one\n");
    }

    #[test]
    fn long_name_bombs_and_entry_floods_are_bounded() {
        let fx = fixture();
        // A GNU long-name entry claiming 4 MiB: the tar crate would read it whole.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(4 << 20);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, io::repeat(b'a').take(4 << 20))
            .expect("append");
        let bomb = b.into_inner().expect("finish");
        let layout = fx.dir.path().join("bomb");
        oci_layout(&layout, &[gzipped(bomb)], "amd64");
        let err = fx
            .store
            .import_oci(&layout, &fx.agent, 1 << 20)
            .expect_err("bounded");
        assert!(matches!(err, OciError::TooLarge { .. }), "{err:?}");

        // 8 MiB of image allows 8192 entries.
        let names: Vec<&'static str> = (0..8200)
            .map(|i| &*Box::leak(format!("f{i}").into_boxed_str()))
            .collect();
        let entries: Vec<E> = names.iter().map(|n| E::File(n, "")).collect();
        let err = import_one_layer(&fx, &entries).expect_err("too many");
        assert!(
            matches!(err, OciError::TooManyEntries { max_entries: 8192 }),
            "{err:?}"
        );
        assert!(fx.tmp_is_empty());
    }

    fn import_one_layer(fx: &Fixture, entries: &[E]) -> Result<OciImport, OciError> {
        let layout = tempfile::tempdir_in(fx.dir.path()).expect("tempdir");
        oci_layout(layout.path(), &[plain(layer(entries))], "amd64");
        fx.store.import_oci(layout.path(), &fx.agent, 8 << 20)
    }

    #[test]
    fn parent_dir_entries_are_refused() {
        let fx = fixture();
        let err = import_one_layer(&fx, &[E::File("../escape", "x")]).expect_err("refused");
        assert!(
            matches!(&err, OciError::EntryEscapes { layer: 0, entry } if entry == "../escape"),
            "{err:?}"
        );
        let err = import_one_layer(&fx, &[E::File("a/../../escape", "x")]).expect_err("refused");
        assert!(matches!(err, OciError::EntryEscapes { .. }), "{err:?}");
        assert!(fx.tmp_is_empty());
        assert!(fx.store.list().expect("list").is_empty());
    }

    #[test]
    fn entries_through_symlinks_are_refused_and_write_nothing_outside() {
        let fx = fixture();
        let outside = fx.dir.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        // Absolute, and relative from <store>/tmp/oci-*/rootfs up to the fixture directory.
        for target in [
            outside.to_string_lossy().into_owned(),
            "../../../../outside".into(),
        ] {
            let err = import_one_layer(
                &fx,
                &[
                    E::Symlink("evil", target.clone()),
                    E::File("evil/pwned", "x"),
                ],
            )
            .expect_err("refused");
            assert!(
                matches!(&err, OciError::SymlinkInPath { entry, .. } if entry == "evil/pwned"),
                "{err:?}"
            );
        }
        // Whiteouts and opaque markers under a symlink are refused too.
        let err = import_one_layer(
            &fx,
            &[
                E::Symlink("evil", outside.to_string_lossy().into_owned()),
                E::File("evil/.wh..wh..opq", ""),
            ],
        )
        .expect_err("refused");
        assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err:?}");
        fs::write(outside.join("keep"), "k").expect("write");
        let err = import_one_layer(
            &fx,
            &[
                E::Symlink("evil", outside.to_string_lossy().into_owned()),
                E::File("evil/.wh.keep", ""),
            ],
        )
        .expect_err("refused");
        assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err:?}");
        assert_eq!(
            fs::read_dir(&outside).expect("read").count(),
            1,
            "something was written or removed outside the staging tree"
        );
        assert!(!fx.dir.path().join("pwned").exists());
        assert!(fx.tmp_is_empty());

        // A symlink as an entry of its own is fine, whatever it points at.
        let import = import_one_layer(&fx, &[E::Symlink("etc-link", "/etc/shadow".into())])
            .expect("a plain symlink is fine");
        let ls = debugfs(&import.image.path, "stat /etc-link");
        assert!(ls.contains("Fast link dest: \"/etc/shadow\""), "{ls}");
        assert!(!import.has_bin_sh);
    }

    #[test]
    fn hard_links_must_stay_inside() {
        let fx = fixture();
        for target in ["../outside", "/etc/passwd", "missing", ""] {
            let err = import_one_layer(&fx, &[E::File("a", "x"), E::HardLink("l", target)])
                .expect_err("refused");
            assert!(
                matches!(&err, OciError::BadHardLink { entry, .. } if entry == "l"),
                "{target}: {err:?}"
            );
        }
        let outside = fx.dir.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("secret"), "s").expect("write");
        let err = import_one_layer(
            &fx,
            &[
                E::Symlink("evil", outside.to_string_lossy().into_owned()),
                E::HardLink("l", "evil/secret"),
            ],
        )
        .expect_err("refused");
        assert!(matches!(err, OciError::SymlinkInPath { .. }), "{err:?}");
        // A hard link to a symlink links the symlink itself, not what it names.
        let import = import_one_layer(
            &fx,
            &[
                E::Symlink("s", outside.join("secret").to_string_lossy().into_owned()),
                E::HardLink("l", "s"),
            ],
        )
        .expect("link to a symlink");
        let st = debugfs(&import.image.path, "stat /l");
        assert!(st.contains("Type: symlink"), "{st}");
        assert!(fx.tmp_is_empty());
    }

    #[test]
    fn corrupt_blobs_and_bad_metadata_are_typed_errors() {
        let fx = fixture();
        let layout = fx.dir.path().join("layout");
        let blob = gzipped(base_layer());
        oci_layout(&layout, &[blob], "amd64");
        // Flip a byte in the layer blob.
        // gzip output is deterministic (no timestamp in the header), so this is the blob.
        let layer_blob = layout
            .join("blobs/sha256")
            .join(sha(&gzipped(base_layer()).stored).hex());
        let mut bytes = fs::read(&layer_blob).expect("read");
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        fs::set_permissions(&layer_blob, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(&layer_blob, &bytes).expect("write");
        let err = fx
            .store
            .import_oci(&layout, &fx.agent, 8 << 20)
            .expect_err("mismatch");
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err:?}");
        assert!(fx.tmp_is_empty());
        assert!(fx.store.list().expect("list").is_empty());

        // A config for another architecture.
        let arm = fx.dir.path().join("arm");
        oci_layout(&arm, &[plain(top_layer())], "arm64");
        let err = fx
            .store
            .import_oci(&arm, &fx.agent, 8 << 20)
            .expect_err("arm64");
        assert!(matches!(err, OciError::WrongPlatform { .. }), "{err:?}");

        // zstd layers.
        let z = fx.dir.path().join("zstd");
        let mut blob = plain(top_layer());
        blob.media_type = "application/vnd.oci.image.layer.v1.tar+zstd";
        oci_layout(&z, &[blob], "amd64");
        let err = fx
            .store
            .import_oci(&z, &fx.agent, 8 << 20)
            .expect_err("zstd");
        assert!(
            matches!(
                err,
                OciError::UnsupportedCompression {
                    layer: 0,
                    compression: "zstd"
                }
            ),
            "{err:?}"
        );

        // A diff id that does not match the layer (docker format: the only check there).
        let bad = fx.dir.path().join("bad-diff.tar");
        docker_save(&bad, &[top_layer()], &[sha(b"something else")], false);
        let err = fx
            .store
            .import_oci(&bad, &fx.agent, 8 << 20)
            .expect_err("diff id");
        assert!(
            matches!(err, OciError::DiffIdMismatch { layer: 0, .. }),
            "{err:?}"
        );

        // Not an image at all; no agent; too small.
        let empty = fx.dir.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        assert!(matches!(
            fx.store.import_oci(&empty, &fx.agent, 8 << 20),
            Err(OciError::NotAnImage { .. })
        ));
        assert!(matches!(
            fx.store
                .import_oci(&arm, &fx.dir.path().join("no-agent"), 8 << 20),
            Err(OciError::AgentMissing { .. })
        ));
        let big = fx.dir.path().join("big");
        let data: &'static str = Box::leak("z".repeat(2 << 20).into_boxed_str());
        oci_layout(&big, &[plain(layer(&[E::File("big", data)]))], "amd64");
        let err = fx
            .store
            .import_oci(&big, &fx.agent, 1 << 20)
            .expect_err("too big");
        assert!(matches!(err, OciError::TooLarge { .. }), "{err:?}");
        assert!(fx.tmp_is_empty());
    }
}
