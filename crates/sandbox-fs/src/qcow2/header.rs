//! A strict parser for qcow2 headers and tables, run before imago sees a file.
//!
//! An overlay is written by a VMM that a guest may control, so reopening one parses hostile
//! input. This module reads only what it needs, with checked arithmetic, and refuses anything
//! our overlays never contain. Section names refer to QEMU's `docs/interop/qcow2.txt`.
//!
//! What imago 0.2.6 checks by itself (`src/qcow2/metadata.rs`, `Header::load`): the magic, the
//! version, `cluster_bits` (512 B to 2 MiB clusters), the header length, table alignment, the
//! refcount order, the backing file name's length and place. What it does not check, and this
//! module does: the encryption method, `l1_size` and `refcount_table_clusters` against the file
//! size (imago allocates `8 * l1_size` bytes and the whole refcount table on open), tables and
//! entries pointing into the header cluster or past the end of the file, snapshots, compressed
//! clusters, and the backing file's name and format.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `QFI\xfb` ("Header").
pub const MAGIC: u32 = 0x5146_49fb;
/// The fixed part of a version 3 header in bytes ("Header", bytes 0-103).
pub const V3_HEADER_LEN: usize = 104;
/// The smallest and largest `cluster_bits` we accept: 512 B to 2 MiB clusters, as QEMU.
pub const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// The largest L1 table in bytes (QEMU's `QCOW_MAX_L1_SIZE`).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table in bytes (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual disk size in bytes we open: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// The longest backing file name in bytes (QEMU's limit, "Header": `backing_file_size`).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bit 2, "External data file" ("Header": `incompatible_features`).
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
/// Header extension types ("Header extensions").
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FDE: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1/L2/refcount-table entry bits ("Cluster mapping", "Host cluster management").
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00; // bits 9-55
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff; // bits 0-8 and 56-62
const L2_COMPRESSED: u64 = 1 << 62;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe; // bits 1-8 and 56-61 of a standard descriptor
const REFTABLE_RESERVED: u64 = 0x0000_0000_0000_01ff; // bits 0-8

/// The bytes read per table chunk when scanning tables.
const SCAN_CHUNK: usize = 64 * 1024;

/// Which qcow2 structure an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// The L1 table ("Cluster mapping").
    L1,
    /// An L2 table ("Cluster mapping").
    L2,
    /// The refcount table ("Host cluster management").
    RefcountTable,
    /// A refcount block ("Host cluster management").
    RefcountBlock,
    /// A data cluster an L2 entry points to.
    DataCluster,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Table::L1 => "L1 table",
            Table::L2 => "L2 table",
            Table::RefcountTable => "refcount table",
            Table::RefcountBlock => "refcount block",
            Table::DataCluster => "data cluster",
        })
    }
}

/// Why a qcow2 file was refused. Offsets and lengths are in bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file is shorter than a structure it must contain.
    #[error("the image is truncated: {needed} bytes needed, {len} present.")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: u64,
    },
    /// Not a qcow2 file.
    #[error("not a qcow2 image (magic {found:#x}).")]
    Magic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// Only version 3 is opened (overlays are created as version 3).
    #[error("qcow2 version {version} is not supported; only version 3 is.")]
    Version {
        /// The header's version.
        version: u32,
    },
    /// `cluster_bits` is outside 9..=21.
    #[error("cluster_bits {bits} is outside 9..=21.")]
    ClusterBits {
        /// The header's `cluster_bits`.
        bits: u32,
    },
    /// The image is encrypted (`crypt_method` or a full disk encryption header extension).
    #[error("encrypted qcow2 images are not supported.")]
    Encrypted,
    /// The image uses an external data file (feature bit or data file name extension).
    #[error("qcow2 images with an external data file are not supported.")]
    ExternalDataFile,
    /// Incompatible feature bits are set (dirty, corrupt, compression type, extended L2, or
    /// unknown ones).
    #[error("unsupported incompatible feature bits {bits:#x}.")]
    IncompatibleFeatures {
        /// The bits that are set.
        bits: u64,
    },
    /// `refcount_order` is above 6.
    #[error("refcount_order {order} is above 6.")]
    RefcountOrder {
        /// The header's `refcount_order`.
        order: u32,
    },
    /// `header_length` is below 104, above the cluster size, or not a multiple of 8.
    #[error("header_length {length} is invalid.")]
    HeaderLength {
        /// The header's `header_length`.
        length: u32,
    },
    /// The image has internal snapshots (we never create them).
    #[error("qcow2 images with internal snapshots are not supported ({count} found).")]
    Snapshots {
        /// `nb_snapshots`.
        count: u32,
    },
    /// The virtual size is above [`MAX_VIRTUAL_SIZE`].
    #[error("the virtual size {size} is above the limit.")]
    VirtualSize {
        /// The header's `size`.
        size: u64,
    },
    /// `l1_size` is too small for the virtual size.
    #[error("the L1 table has {entries} entries, the virtual size needs {needed}.")]
    L1TooSmall {
        /// `l1_size`.
        entries: u32,
        /// Entries the virtual size needs.
        needed: u64,
    },
    /// The L1 or refcount table is larger than QEMU allows (or empty, for the refcount table).
    #[error("the {table} size {bytes} is invalid.")]
    TableSize {
        /// Which table.
        table: Table,
        /// Its size in bytes.
        bytes: u64,
    },
    /// A table or cluster offset is not a multiple of the cluster size.
    #[error("a {table} offset {offset:#x} is not cluster-aligned.")]
    Unaligned {
        /// What the offset points to.
        table: Table,
        /// The offset.
        offset: u64,
    },
    /// A table or cluster lies in the header cluster.
    #[error("a {table} at {offset:#x} lies in the header cluster.")]
    InHeader {
        /// What the offset points to.
        table: Table,
        /// The offset.
        offset: u64,
    },
    /// A table or cluster lies past the end of the file.
    #[error("a {table} at {offset:#x} lies past the end of the file ({file_len} bytes).")]
    PastEnd {
        /// What the offset points to.
        table: Table,
        /// The offset.
        offset: u64,
        /// The file length.
        file_len: u64,
    },
    /// Two metadata structures overlap, or a data cluster overlaps the L1 or refcount table.
    #[error("a {table} at {offset:#x} overlaps the L1 or refcount table.")]
    Overlap {
        /// What the offset points to.
        table: Table,
        /// The offset.
        offset: u64,
    },
    /// A table entry has reserved bits set.
    #[error("a {table} entry {entry:#x} has reserved bits set.")]
    ReservedBits {
        /// Which table.
        table: Table,
        /// The raw entry.
        entry: u64,
    },
    /// An L2 entry describes a compressed cluster (we never write them).
    #[error("compressed clusters are not supported (guest offset {guest_offset:#x}).")]
    Compressed {
        /// The guest offset of the cluster.
        guest_offset: u64,
    },
    /// More L2 tables are referenced than the file can hold: some are shared.
    #[error("{count} L2 tables are referenced, more than a {file_len}-byte file holds.")]
    TooManyL2Tables {
        /// Allocated L1 entries.
        count: u64,
        /// The file length.
        file_len: u64,
    },
    /// The header extension area is malformed.
    #[error("the header extension at {offset:#x} is malformed.")]
    Extension {
        /// Offset of the extension.
        offset: u64,
    },
    /// A header extension that may appear once appears twice.
    #[error("the header extension {ext_type:#x} appears twice.")]
    DuplicateExtension {
        /// The extension type.
        ext_type: u32,
    },
    /// The backing file name is malformed or is not a plain file name (a `/`, `.`, `..`).
    #[error("the backing file name is invalid: {reason}.")]
    BackingName {
        /// What is wrong.
        reason: &'static str,
    },
    /// The backing file name is not the expected base's file name.
    #[error("the backing file name {found:?} is not the expected {expected:?}.")]
    BackingMismatch {
        /// The name in the header, if any.
        found: Option<String>,
        /// The expected name.
        expected: String,
    },
    /// The backing format is missing or not `raw`.
    #[error("the backing file format {found:?} is not \"raw\".")]
    BackingFormat {
        /// The format in the header, if any.
        found: Option<String>,
    },
    /// Reading a table failed.
    #[error("cannot read the qcow2 tables.")]
    Io(#[source] io::Error),
}

/// A local result.
pub type Result<T> = std::result::Result<T, HeaderError>;

/// The fields of a validated header. Offsets and sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// `cluster_bits`.
    pub cluster_bits: u32,
    /// The virtual disk size.
    pub virtual_size: u64,
    /// The L1 table's offset.
    pub l1_offset: u64,
    /// The L1 table's entry count.
    pub l1_entries: u32,
    /// The refcount table's offset.
    pub reftable_offset: u64,
    /// The refcount table's length in clusters.
    pub reftable_clusters: u32,
    /// `refcount_order` (the refcount width is `1 << refcount_order` bits).
    pub refcount_order: u32,
    /// The backing file name, if any.
    pub backing_name: Option<String>,
    /// The backing file format (header extension `0xe2792aca`), if any.
    pub backing_format: Option<String>,
}

impl HeaderInfo {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
}

fn be32(buf: &[u8], at: usize) -> Result<u32> {
    let bytes =
        at.checked_add(4)
            .and_then(|end| buf.get(at..end))
            .ok_or(HeaderError::Truncated {
                needed: at as u64 + 4,
                len: buf.len() as u64,
            })?;
    let mut b = [0u8; 4];
    b.copy_from_slice(bytes);
    Ok(u32::from_be_bytes(b))
}

fn be64(buf: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from(be32(buf, at)?) << 32 | u64::from(be32(buf, at + 4)?))
}

/// Reads `cluster_bits` from the first bytes of a file, so the caller knows how much of the
/// header cluster to read for [`parse_header`].
///
/// # Errors
/// [`HeaderError::Truncated`], [`HeaderError::Magic`], [`HeaderError::ClusterBits`].
pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
    let magic = be32(buf, 0)?;
    if magic != MAGIC {
        return Err(HeaderError::Magic { found: magic });
    }
    let bits = be32(buf, 20)?;
    if !CLUSTER_BITS.contains(&bits) {
        return Err(HeaderError::ClusterBits { bits });
    }
    Ok(bits)
}

/// Parses and checks a version 3 header ("Header", "Header extensions").
///
/// `buf` holds the file's first bytes: at least the header cluster, or the whole file if it is
/// shorter. `file_len` is the file's length. Allocates nothing but the backing name and format
/// (at most 1023 bytes each, bounded by the header cluster); loops advance at least 8 bytes.
///
/// # Errors
/// The first problem found, as a [`HeaderError`].
pub fn parse_header(buf: &[u8], file_len: u64) -> Result<HeaderInfo> {
    let cluster_bits = peek_cluster_bits(buf)?;
    let version = be32(buf, 4)?;
    if version != 3 {
        return Err(HeaderError::Version { version });
    }
    let cluster_size = 1u64 << cluster_bits;
    // The header cluster must be present in the file, and we only look inside it.
    let in_cluster = usize::try_from(cluster_size.min(file_len))
        .map_err(|_| HeaderError::ClusterBits { bits: cluster_bits })?;
    if (in_cluster as u64) < cluster_size || buf.len() < in_cluster {
        return Err(HeaderError::Truncated {
            needed: cluster_size,
            len: file_len.min(buf.len() as u64),
        });
    }
    let buf = &buf[..in_cluster];

    if be32(buf, 32)? != 0 {
        return Err(HeaderError::Encrypted);
    }
    let incompatible = be64(buf, 72)?;
    if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
        return Err(HeaderError::ExternalDataFile);
    }
    if incompatible != 0 {
        return Err(HeaderError::IncompatibleFeatures { bits: incompatible });
    }
    let refcount_order = be32(buf, 96)?;
    if refcount_order > 6 {
        return Err(HeaderError::RefcountOrder {
            order: refcount_order,
        });
    }
    let header_length = be32(buf, 100)?;
    if (header_length as usize) < V3_HEADER_LEN
        || u64::from(header_length) > cluster_size
        || header_length % 8 != 0
    {
        return Err(HeaderError::HeaderLength {
            length: header_length,
        });
    }
    let snapshots = be32(buf, 60)?;
    if snapshots != 0 {
        return Err(HeaderError::Snapshots { count: snapshots });
    }

    let virtual_size = be64(buf, 24)?;
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(HeaderError::VirtualSize { size: virtual_size });
    }

    // "Cluster mapping": one L1 entry covers cluster_size / 8 clusters.
    let l1_entries = be32(buf, 36)?;
    let l1_offset = be64(buf, 40)?;
    let per_l1 = cluster_size * (cluster_size / 8);
    let needed = virtual_size.div_ceil(per_l1);
    if u64::from(l1_entries) < needed {
        return Err(HeaderError::L1TooSmall {
            entries: l1_entries,
            needed,
        });
    }
    let l1_bytes = u64::from(l1_entries) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(HeaderError::TableSize {
            table: Table::L1,
            bytes: l1_bytes,
        });
    }
    if l1_entries > 0 {
        check_range(Table::L1, l1_offset, l1_bytes, cluster_size, file_len)?;
    }

    let reftable_offset = be64(buf, 48)?;
    let reftable_clusters = be32(buf, 56)?;
    let reftable_bytes = u64::from(reftable_clusters) * cluster_size;
    if reftable_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
        return Err(HeaderError::TableSize {
            table: Table::RefcountTable,
            bytes: reftable_bytes,
        });
    }
    check_range(
        Table::RefcountTable,
        reftable_offset,
        reftable_bytes,
        cluster_size,
        file_len,
    )?;
    if l1_entries > 0 && overlaps(l1_offset, l1_bytes, reftable_offset, reftable_bytes) {
        return Err(HeaderError::Overlap {
            table: Table::L1,
            offset: l1_offset,
        });
    }

    let backing_name = parse_backing_name(buf)?;
    let backing_format = parse_extensions(buf, header_length)?;

    Ok(HeaderInfo {
        cluster_bits,
        virtual_size,
        l1_offset,
        l1_entries,
        reftable_offset,
        reftable_clusters,
        refcount_order,
        backing_name,
        backing_format,
    })
}

/// `[offset, offset + len)` is cluster-aligned, after the header cluster and inside the file.
fn check_range(
    table: Table,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if offset < cluster_size {
        return Err(HeaderError::InHeader { table, offset });
    }
    if offset % cluster_size != 0 {
        return Err(HeaderError::Unaligned { table, offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(HeaderError::PastEnd {
            table,
            offset,
            file_len,
        }),
    }
}

fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    // Both ranges were checked to lie inside the file, so the sums do not overflow.
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// "Header": bytes 8-15 `backing_file_offset`, 16-19 `backing_file_size`.
fn parse_backing_name(buf: &[u8]) -> Result<Option<String>> {
    let offset = be64(buf, 8)?;
    if offset == 0 {
        return Ok(None);
    }
    let len = be32(buf, 16)?;
    if len == 0 || len > MAX_BACKING_NAME {
        return Err(HeaderError::BackingName {
            reason: "its length is 0 or above 1023 bytes",
        });
    }
    let bytes = usize::try_from(offset)
        .ok()
        .and_then(|start| Some(start..start.checked_add(len as usize)?))
        .and_then(|range| buf.get(range))
        .ok_or(HeaderError::BackingName {
            reason: "it lies outside the header cluster",
        })?;
    let name = std::str::from_utf8(bytes).map_err(|_| HeaderError::BackingName {
        reason: "it is not UTF-8",
    })?;
    check_backing_name(name)?;
    Ok(Some(name.to_owned()))
}

/// A backing name we accept is a plain file name: no `/`, not `.` or `..`, no NUL or `:`.
///
/// # Errors
/// [`HeaderError::BackingName`].
pub fn check_backing_name(name: &str) -> Result<()> {
    if name.contains('/') {
        return Err(HeaderError::BackingName {
            reason: "it contains a '/'",
        });
    }
    if name == "." || name == ".." {
        return Err(HeaderError::BackingName {
            reason: "it is '.' or '..'",
        });
    }
    if name.contains('\0') || name.contains(':') {
        // QEMU reads `proto:` prefixes (for example `json:`, `nbd:`) as protocols.
        return Err(HeaderError::BackingName {
            reason: "it contains a NUL or ':'",
        });
    }
    Ok(())
}

/// "Header extensions": returns the backing format, refuses encryption and data files.
fn parse_extensions(buf: &[u8], header_length: u32) -> Result<Option<String>> {
    let mut at = header_length as usize;
    let mut backing_format = None;
    // Each turn advances by at least 8 bytes inside a buffer of at most 2 MiB.
    loop {
        let ext_type = be32(buf, at).map_err(|_| HeaderError::Extension { offset: at as u64 })?;
        let len = be32(buf, at + 4).map_err(|_| HeaderError::Extension { offset: at as u64 })?;
        if ext_type == EXT_END {
            return Ok(backing_format);
        }
        let data_start = at + 8;
        let data = data_start
            .checked_add(len as usize)
            .and_then(|end| buf.get(data_start..end))
            .ok_or(HeaderError::Extension { offset: at as u64 })?;
        match ext_type {
            EXT_BACKING_FORMAT => {
                if backing_format.is_some() {
                    return Err(HeaderError::DuplicateExtension { ext_type });
                }
                let format = std::str::from_utf8(data).map_err(|_| HeaderError::BackingFormat {
                    found: Some(String::from_utf8_lossy(data).into_owned()),
                })?;
                backing_format = Some(format.to_owned());
            }
            EXT_FDE => return Err(HeaderError::Encrypted),
            EXT_DATA_FILE => return Err(HeaderError::ExternalDataFile),
            // The feature name table, bitmaps and unknown extensions are ignored, as the spec
            // allows.
            _ => {}
        }
        let padded = (len as usize).next_multiple_of(8);
        at = data_start
            .checked_add(padded)
            .ok_or(HeaderError::Extension { offset: at as u64 })?;
    }
}

/// Checks the backing file against what the caller expects: the name equals
/// `expected_name` exactly and the format is `raw`.
///
/// # Errors
/// [`HeaderError::BackingMismatch`], [`HeaderError::BackingFormat`].
pub fn check_backing(info: &HeaderInfo, expected_name: &str) -> Result<()> {
    if info.backing_name.as_deref() != Some(expected_name) {
        return Err(HeaderError::BackingMismatch {
            found: info.backing_name.clone(),
            expected: expected_name.to_owned(),
        });
    }
    check_backing_format(info)
}

/// Checks that the overlay has a backing file and that its format is `raw`, whatever its name.
///
/// # Errors
/// [`HeaderError::BackingMismatch`] (no backing file), [`HeaderError::BackingFormat`].
pub fn check_backing_format(info: &HeaderInfo) -> Result<()> {
    if info.backing_name.is_none() {
        return Err(HeaderError::BackingMismatch {
            found: None,
            expected: "a backing file".to_owned(),
        });
    }
    if info.backing_format.as_deref() != Some("raw") {
        return Err(HeaderError::BackingFormat {
            found: info.backing_format.clone(),
        });
    }
    Ok(())
}

/// Where table entries come from: a file, or a byte slice in tests.
pub trait TableSource {
    /// Fills `buf` from `offset`.
    ///
    /// # Errors
    /// Any I/O error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl TableSource for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl TableSource for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Calls `each` with every 8-byte big-endian entry of the table at `[offset, offset + bytes)`
/// and its index, reading [`SCAN_CHUNK`] bytes at a time into `chunk`.
fn for_each_entry<S: TableSource + ?Sized>(
    src: &S,
    chunk: &mut [u8],
    offset: u64,
    bytes: u64,
    mut each: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let mut done = 0u64;
    while done < bytes {
        let n = usize::try_from(bytes - done).map_or(chunk.len(), |left| left.min(chunk.len()));
        let part = &mut chunk[..n];
        src.read_exact_at(part, offset + done)
            .map_err(HeaderError::Io)?;
        for (i, entry) in part.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(entry);
            each(done / 8 + i as u64, u64::from_be_bytes(b))?;
        }
        done += n as u64;
    }
    Ok(())
}

/// Checks every refcount table, L1 and L2 entry ("Host cluster management", "Cluster mapping"):
/// reserved bits clear, offsets cluster-aligned, after the header cluster, inside the file, no
/// compressed clusters, no data cluster over the L1 or refcount table.
///
/// Reads at most the refcount table, the L1 table and one cluster per allocated L1 entry, and
/// refuses up front when the allocated L1 entries need more clusters than the file has (so
/// shared L2 tables cannot multiply the work). Uses one 64 KiB buffer.
///
/// # Errors
/// The first problem found, as a [`HeaderError`].
pub fn scan_tables<S: TableSource + ?Sized>(
    src: &S,
    info: &HeaderInfo,
    file_len: u64,
) -> Result<()> {
    let cs = info.cluster_size();
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let reftable_bytes = u64::from(info.reftable_clusters) * cs;
    let l1_bytes = u64::from(info.l1_entries) * 8;
    let meta_overlap = |offset: u64| {
        overlaps(offset, cs, info.reftable_offset, reftable_bytes)
            || (l1_bytes > 0 && overlaps(offset, cs, info.l1_offset, l1_bytes))
    };

    for_each_entry(
        src,
        &mut chunk,
        info.reftable_offset,
        reftable_bytes,
        |_, entry| {
            if entry & REFTABLE_RESERVED != 0 {
                return Err(HeaderError::ReservedBits {
                    table: Table::RefcountTable,
                    entry,
                });
            }
            if entry != 0 {
                check_range(Table::RefcountBlock, entry, cs, cs, file_len)?;
            }
            Ok(())
        },
    )?;

    let mut l2_offsets = 0u64;
    for_each_entry(src, &mut chunk, info.l1_offset, l1_bytes, |_, entry| {
        if entry & L1_RESERVED != 0 {
            return Err(HeaderError::ReservedBits {
                table: Table::L1,
                entry,
            });
        }
        let offset = entry & OFFSET_MASK;
        if offset != 0 {
            check_range(Table::L2, offset, cs, cs, file_len)?;
            if meta_overlap(offset) {
                return Err(HeaderError::Overlap {
                    table: Table::L2,
                    offset,
                });
            }
            l2_offsets += 1;
        }
        Ok(())
    })?;
    if l2_offsets.saturating_mul(cs) > file_len {
        return Err(HeaderError::TooManyL2Tables {
            count: l2_offsets,
            file_len,
        });
    }

    // Second pass over L1: scan each L2 table. The L1 table is at most 32 MiB, so re-reading it
    // costs less than keeping a list of L2 offsets.
    let mut l1_chunk = vec![0u8; SCAN_CHUNK];
    let l2_entries = cs / 8;
    for_each_entry(
        src,
        &mut l1_chunk,
        info.l1_offset,
        l1_bytes,
        |l1_index, entry| {
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                return Ok(());
            }
            for_each_entry(src, &mut chunk, l2_offset, cs, |l2_index, entry| {
                if entry & L2_COMPRESSED != 0 {
                    return Err(HeaderError::Compressed {
                        guest_offset: (l1_index * l2_entries + l2_index).saturating_mul(cs),
                    });
                }
                if entry & L2_RESERVED != 0 {
                    return Err(HeaderError::ReservedBits {
                        table: Table::L2,
                        entry,
                    });
                }
                let offset = entry & OFFSET_MASK;
                if offset != 0 {
                    // A data cluster must start inside the file; the file may end inside it (the
                    // rest reads as zeroes).
                    check_range(Table::DataCluster, offset, 1, cs, file_len)?;
                    if meta_overlap(offset) {
                        return Err(HeaderError::Overlap {
                            table: Table::DataCluster,
                            offset,
                        });
                    }
                }
                Ok(())
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    /// A small valid image with 512-byte clusters: header, refcount table, refcount block, L1,
    /// L2, one data cluster. The virtual size is 64 KiB (two L1 entries' worth).
    fn valid_image() -> Vec<u8> {
        let cs = 512usize;
        let mut b = vec![0u8; 6 * cs];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put64(&mut b, 8, 400); // backing name at 400
        put32(&mut b, 16, 8);
        b[400..408].copy_from_slice(b"base.raw");
        put32(&mut b, 20, 9);
        put64(&mut b, 24, 64 * 1024);
        put32(&mut b, 36, 2);
        put64(&mut b, 40, 3 * cs as u64);
        put64(&mut b, 48, cs as u64);
        put32(&mut b, 56, 1);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 104);
        // Backing format extension, then the end marker.
        put32(&mut b, 104, EXT_BACKING_FORMAT);
        put32(&mut b, 108, 3);
        b[112..115].copy_from_slice(b"raw");
        put64(&mut b, 120, 0);
        put64(&mut b, cs, 2 * cs as u64); // reftable[0] -> refblock
        put64(&mut b, 3 * cs, (1 << 63) | (4 * cs as u64)); // L1[0] -> L2
        put64(&mut b, 4 * cs, (1 << 63) | (5 * cs as u64)); // L2[0] -> data
        b
    }

    /// Counts the bytes the scan reads.
    struct Counting<'a> {
        bytes: &'a [u8],
        read: Cell<u64>,
    }

    impl TableSource for Counting<'_> {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.set(self.read.get() + buf.len() as u64);
            self.bytes.read_exact_at(buf, offset)
        }
    }

    fn parse_and_scan(b: &[u8]) -> Result<HeaderInfo> {
        let info = parse_header(b, b.len() as u64)?;
        scan_tables(b, &info, b.len() as u64)?;
        Ok(info)
    }

    #[test]
    fn the_valid_image_parses() {
        let info = parse_and_scan(&valid_image()).expect("valid");
        assert_eq!(info.cluster_size(), 512);
        assert_eq!(info.backing_name.as_deref(), Some("base.raw"));
        check_backing(&info, "base.raw").expect("expected backing");
        assert!(matches!(
            check_backing(&info, "other.raw"),
            Err(HeaderError::BackingMismatch { .. })
        ));
    }

    /// A patch to the valid image, and the error it must cause.
    type Case = (Box<dyn Fn(&mut Vec<u8>)>, fn(&HeaderError) -> bool);

    #[test]
    fn crafted_headers_get_typed_errors() {
        let cases: Vec<Case> = vec![
            (Box::new(|b| b.truncate(50)), |e| {
                matches!(e, HeaderError::Truncated { .. })
            }),
            (
                Box::new(|b| b[20..24].copy_from_slice(&8u32.to_be_bytes())),
                |e| matches!(e, HeaderError::ClusterBits { bits: 8 }),
            ),
            (
                Box::new(|b| b[20..24].copy_from_slice(&40u32.to_be_bytes())),
                |e| matches!(e, HeaderError::ClusterBits { bits: 40 }),
            ),
            (
                Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
                |e| {
                    matches!(
                        e,
                        HeaderError::TableSize {
                            table: Table::L1,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(|b| b[56..60].copy_from_slice(&9u32.to_be_bytes())),
                |e| {
                    matches!(
                        e,
                        HeaderError::PastEnd {
                            table: Table::RefcountTable,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(|b| b[100..104].copy_from_slice(&100u32.to_be_bytes())),
                |e| matches!(e, HeaderError::HeaderLength { length: 100 }),
            ),
            (
                Box::new(|b| b[96..100].copy_from_slice(&7u32.to_be_bytes())),
                |e| matches!(e, HeaderError::RefcountOrder { order: 7 }),
            ),
            (
                Box::new(|b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
                |e| matches!(e, HeaderError::VirtualSize { .. }),
            ),
            (
                Box::new(|b| b[400..408].copy_from_slice(b"../x/abc")),
                |e| matches!(e, HeaderError::BackingName { .. }),
            ),
            (
                Box::new(|b| b[16..20].copy_from_slice(&2000u32.to_be_bytes())),
                |e| matches!(e, HeaderError::BackingName { .. }),
            ),
            (
                Box::new(|b| b[1536..1544].copy_from_slice(&(1u64 << 63 | 2560 | 1).to_be_bytes())),
                |e| {
                    matches!(
                        e,
                        HeaderError::ReservedBits {
                            table: Table::L1,
                            ..
                        }
                    )
                },
            ),
            (
                Box::new(|b| b[2048..2056].copy_from_slice(&(1u64 << 63 | 1536).to_be_bytes())),
                |e| {
                    matches!(
                        e,
                        HeaderError::Overlap {
                            table: Table::DataCluster,
                            offset: 1536
                        }
                    )
                },
            ),
            (
                Box::new(|b| {
                    // 60 L1 entries share one L2 table: more L2 tables than the file holds.
                    b[36..40].copy_from_slice(&60u32.to_be_bytes());
                    for i in 0..60 {
                        let at = 1536 + 8 * i;
                        b[at..at + 8].copy_from_slice(&(1u64 << 63 | 2048).to_be_bytes());
                    }
                }),
                |e| matches!(e, HeaderError::TooManyL2Tables { count: 60, .. }),
            ),
        ];
        for (i, (patch, expected)) in cases.iter().enumerate() {
            let mut b = valid_image();
            patch(&mut b);
            let err = parse_and_scan(&b).expect_err("refused");
            assert!(expected(&err), "case {i}: {err:?}");
        }
    }

    proptest! {
        /// Random bytes never panic.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse_and_scan(&bytes);
        }

        /// A valid image with random bytes overwritten never panics, and the scan reads at most
        /// four times the file's length (refcount table, L1 twice, one cluster per L2 table).
        #[test]
        fn mutated_images_never_panic_and_bound_the_work(
            edits in proptest::collection::vec((0usize..3072, any::<u8>()), 1..24),
            cut in 0usize..3072,
        ) {
            let mut b = valid_image();
            for (at, v) in edits {
                b[at] = v;
            }
            if cut > 2600 {
                b.truncate(cut);
            }
            let len = b.len() as u64;
            if let Ok(info) = parse_header(&b, len) {
                let src = Counting { bytes: &b, read: Cell::new(0) };
                let _ = scan_tables(&src, &info, len);
                prop_assert!(src.read.get() <= 4 * len, "read {} of {}", src.read.get(), len);
            }
        }
    }
}
