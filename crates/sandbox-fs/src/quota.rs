//! The host-space cap of a qcow2 overlay, and its counter.
//!
//! The cap bounds the overlay file's length in bytes (its apparent size, `st_size`), which also
//! bounds the host blocks it holds. A guest write that would place data past the cap, in a file
//! not already that long, fails with [`io::ErrorKind::StorageFull`] (`ENOSPC`); the guest sees
//! VIRTIO_BLK_S_IOERR. Space the guest frees (discard, write-zeroes with unmap) is reused by
//! later allocations before the file grows, so a guest that deletes files can write again.
//!
//! Why the check sits on the data mapping and not in an imago `Storage` wrapper: a wrapper sees
//! every write to the file and cannot tell guest data from qcow2 metadata. Refusing a metadata
//! write (a new L2 table, a refcount block written back at flush time) would leave allocated but
//! unreferenced clusters and a flush that fails forever. The overlay code asks imago where the
//! data of a write will go (`prepare_data_mapping`), refuses before writing it, and lets the
//! metadata of that one allocation through. So the file never grows past
//! `cap` plus [`QUOTA_SLACK_CLUSTERS`] clusters: one cluster of copy-on-write data that imago writes
//! while preparing the mapping (freed again when we refuse), one L2 table and one refcount block.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many clusters past the cap the overlay file may reach: one copy-on-write data cluster,
/// one L2 table, one refcount block, and one spare for the refcount table's growth.
pub const QUOTA_SLACK_CLUSTERS: u64 = 4;

/// Reads how often a disk refused a write for lack of space, from any thread.
///
/// Cloned from [`crate::Qcow2Disk::quota_handle`] before the disk moves to the device thread.
#[derive(Debug, Clone, Default)]
pub struct QuotaHandle {
    hits: Arc<AtomicU64>,
}

impl QuotaHandle {
    /// Requests refused with `StorageFull` so far: the cap was reached, or the host file system
    /// returned `ENOSPC`.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// The cap and the counter, owned by one disk.
#[derive(Debug, Default)]
pub(crate) struct Quota {
    cap: Option<u64>,
    /// The file's length when it was opened: data already there may be rewritten in place
    /// even when the file is longer than the cap.
    open_len: u64,
    handle: QuotaHandle,
}

impl Quota {
    /// `open_len`: the file's length when it was opened.
    pub(crate) fn new(cap: Option<u64>, open_len: u64) -> Self {
        Self {
            cap,
            open_len,
            handle: QuotaHandle::default(),
        }
    }

    pub(crate) fn cap(&self) -> Option<u64> {
        self.cap
    }

    pub(crate) fn handle(&self) -> QuotaHandle {
        self.handle.clone()
    }

    /// How many bytes of a write at guest `offset` to map at once. Near the cap, one cluster at a
    /// time, so that a refused mapping has written at most one cluster of copy-on-write data.
    pub(crate) fn chunk_len(&self, file_len: u64, len: u64, offset: u64, cluster_size: u64) -> u64 {
        let Some(cap) = self.cap else { return len };
        let slack = QUOTA_SLACK_CLUSTERS.saturating_mul(cluster_size);
        if file_len.saturating_add(len).saturating_add(slack) <= cap {
            return len;
        }
        let to_boundary = cluster_size - offset % cluster_size;
        len.min(to_boundary)
    }

    /// Whether data mapped to `[host_offset, host_offset + len)` lies past the cap (or past the
    /// file's length at open, when that was longer). Not the file's current length: clusters a
    /// refused copy-on-write left past the cap are free space past the cap, and letting data into
    /// them because the file is now that long would ratchet the file up one cluster per refusal.
    pub(crate) fn refuses(&self, host_offset: u64, len: u64) -> bool {
        let Some(cap) = self.cap else { return false };
        match host_offset.checked_add(len) {
            Some(end) => end > cap.max(self.open_len),
            None => true,
        }
    }

    /// Counts `err` if it means "no space", and passes it on.
    pub(crate) fn count(&self, err: io::Error) -> io::Error {
        if err.kind() == io::ErrorKind::StorageFull {
            self.handle.hits.fetch_add(1, Ordering::Relaxed);
        }
        err
    }
}

/// The error a refused write returns.
pub(crate) fn storage_full() -> io::Error {
    io::Error::new(
        io::ErrorKind::StorageFull,
        "the disk's host space cap is reached",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_shrink_to_one_cluster_near_the_cap() {
        let q = Quota::new(Some(1 << 20), 0);
        assert_eq!(q.chunk_len(0, 4096, 0, 65536), 4096, "far from the cap");
        assert_eq!(q.chunk_len(900 << 10, 1 << 20, 1000, 65536), 65536 - 1000);
        assert_eq!(
            Quota::new(None, 0).chunk_len(u64::MAX, 1 << 30, 5, 65536),
            1 << 30
        );
    }

    #[test]
    fn refuses_only_data_past_the_cap() {
        let q = Quota::new(Some(1 << 20), 0);
        assert!(!q.refuses(0, 65536));
        assert!(!q.refuses((1 << 20) - 65536, 65536), "up to the cap");
        assert!(q.refuses(1 << 20, 65536), "past the cap");
        let longer = Quota::new(Some(1 << 20), 2 << 20);
        assert!(
            !longer.refuses(1 << 20, 65536),
            "clusters a file opened longer than the cap holds may be rewritten"
        );
        assert!(longer.refuses(2 << 20, 65536));
        assert!(q.refuses(u64::MAX, 2), "overflow is refused");
        assert!(!Quota::new(None, 0).refuses(u64::MAX - 1, 1));
    }

    #[test]
    fn counts_storage_full_only() {
        let q = Quota::new(Some(1), 0);
        let h = q.handle();
        let _ = q.count(storage_full());
        let _ = q.count(io::Error::from_raw_os_error(libc::ENOSPC));
        let _ = q.count(io::Error::from(io::ErrorKind::InvalidInput));
        assert_eq!(h.hits(), 2);
    }
}
