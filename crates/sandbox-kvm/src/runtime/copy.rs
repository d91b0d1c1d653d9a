//! Each sandbox's private copy of the rootfs: a reflink where the file system can clone extents,
//! else a sparse-aware copy (data segments found with `SEEK_DATA`/`SEEK_HOLE`, all-zero blocks
//! inside them skipped), so a 1 GiB image with 400 MiB of data costs 400 MiB, also on tmpfs and
//! on file systems (9p) that report no holes.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::sys;

/// Bytes read per turn of the copy loop.
const CHUNK: usize = 1 << 20;
/// Granularity of hole detection: blocks of this many zero bytes are not written.
const BLOCK: usize = 4096;
/// One block of zeros to compare against.
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// How the copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: extents shared copy-on-write, O(1).
    Reflink,
    /// Byte copy of the data, holes kept.
    Sparse {
        /// Bytes actually written.
        written: u64,
    },
}

/// Copies `src` into `to`, a new empty file the caller created (and removes on failure).
/// `cancelled` is checked before each 1 MiB chunk: when set, the copy stops with `Interrupted`.
///
/// # Errors
/// I/O errors opening, reading or writing; `Interrupted` when cancelled.
pub fn copy_image(src: &Path, to: &File, cancelled: &AtomicBool) -> io::Result<CopyMethod> {
    copy_inner(src, to, true, cancelled)
}

fn copy_inner(
    src: &Path,
    to: &File,
    try_reflink: bool,
    cancelled: &AtomicBool,
) -> io::Result<CopyMethod> {
    let from = File::open(src)?;
    fill(from, to, try_reflink, cancelled)
}

fn fill(
    mut from: File,
    to: &File,
    try_reflink: bool,
    cancelled: &AtomicBool,
) -> io::Result<CopyMethod> {
    if try_reflink && sys::ficlone(to.as_fd(), from.as_fd()).is_ok() {
        return Ok(CopyMethod::Reflink);
    }
    let len = from.metadata()?.len();
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = match data_segment(&from, pos, len) {
            Some(seg) => seg,
            None => break,
        };
        from.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            if cancelled.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let want = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = read_full(&mut from, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            written += write_nonzero(to, &buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    // The tail may be a hole: the length comes from the source, not from the last write.
    to.set_len(len)?;
    to.sync_all()?;
    Ok(CopyMethod::Sparse { written })
}

/// The next data segment at or after `pos`: `[start, end)`. Without `SEEK_DATA` support the
/// whole rest is one segment.
fn data_segment(f: &File, pos: u64, len: u64) -> Option<(u64, u64)> {
    let off = i64::try_from(pos).ok()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    // SAFETY: `fd` is valid while `f` is borrowed; lseek only moves the file offset.
    let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data after `pos` (only a hole to the end).
        return if e.raw_os_error() == Some(libc::ENXIO) {
            None
        } else {
            Some((pos, len))
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    let start = u64::try_from(start).ok()?;
    let end = u64::try_from(end).unwrap_or(len).min(len);
    (start < end).then_some((start, end))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes the runs of non-zero [`BLOCK`]s of `data` at `offset`; returns the bytes written.
fn write_nonzero(to: &File, data: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let blocks = data.len().div_ceil(BLOCK);
    for b in 0..=blocks {
        let range = (b * BLOCK)..((b + 1) * BLOCK).min(data.len());
        // A slice comparison is a memcmp, fast even in debug builds (tests run those, sometimes
        // under full emulation in the nested test host).
        let zero = b == blocks || data[range.clone()] == ZEROS[..range.len()];
        match (zero, run_start) {
            (false, None) => run_start = Some(b * BLOCK),
            (true, Some(s)) => {
                let e = (b * BLOCK).min(data.len());
                to.write_all_at(&data[s..e], offset + s as u64)?;
                written += (e - s) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        let dst = dir.path().join("dst.img");
        let f = File::create(&src).expect("create");
        // 8 MiB file: data at 0, a zero run written as bytes at 1 MiB, data at 5 MiB + 3, hole tail.
        f.write_all_at(b"superblock", 0).expect("write");
        f.write_all_at(&vec![0u8; 1 << 20], 1 << 20).expect("zeros");
        f.write_all_at(&[0xAB; 10_000], (5 << 20) + 3)
            .expect("write");
        f.set_len(8 << 20).expect("len");
        drop(f);
        let to = File::create_new(&dst).expect("dst");
        let method = copy_inner(&src, &to, false, &AtomicBool::new(false)).expect("copy");
        let written = match method {
            CopyMethod::Sparse { written } => written,
            CopyMethod::Reflink => unreachable!("reflink was not tried"),
        };
        assert_eq!(std::fs::read(&src).ok(), std::fs::read(&dst).ok());
        // Two blocks of "superblock" page + three 4 KiB blocks holding the 0xAB bytes.
        assert!(written <= 5 * BLOCK as u64, "wrote {written} bytes");
        let meta = std::fs::metadata(&dst).expect("meta");
        assert_eq!(meta.len(), 8 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "the copy is sparse");
    }

    #[test]
    fn copy_image_copies_and_stops_when_cancelled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.img");
        let dst = dir.path().join("dst.img");
        std::fs::write(&src, b"rootfs bytes").expect("write");
        let to = File::create_new(&dst).expect("dst");
        let m = copy_image(&src, &to, &AtomicBool::new(false)).expect("copy");
        assert!(matches!(m, CopyMethod::Reflink | CopyMethod::Sparse { .. }));
        assert_eq!(std::fs::read(&dst).expect("read"), b"rootfs bytes");
        let to = File::create_new(dir.path().join("other.img")).expect("dst");
        let err = copy_inner(&src, &to, false, &AtomicBool::new(true)).expect_err("cancelled");
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn write_nonzero_counts_only_data_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = File::create(dir.path().join("x")).expect("create");
        let mut data = vec![0u8; 4 * BLOCK + 100];
        data[BLOCK + 1] = 1;
        data[4 * BLOCK + 99] = 2;
        assert_eq!(
            write_nonzero(&f, &data, 0).expect("write"),
            (BLOCK + 100) as u64
        );
    }
}
