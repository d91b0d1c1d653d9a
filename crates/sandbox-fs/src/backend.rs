//! Block backends: where a virtual disk's bytes live on the host.
//!
//! The VMM's virtio-blk device (virtio 1.2 §5.2) drives a [`BlockBackend`]; this crate provides
//! the raw implementation here and the copy-on-write ones beside it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes; the device only issues
/// accesses that lie entirely below [`BlockBackend::size`] and are multiples of 512 bytes.
///
/// Errors are plain [`io::Error`]s: the device turns every one into VIRTIO_BLK_S_IOERR for
/// the guest, and keeps running. A backend that refuses a write because a host-space cap is
/// reached returns an error of kind [`io::ErrorKind::StorageFull`] (`ENOSPC`).
pub trait BlockBackend: Send {
    /// The disk size in bytes. The guest sees `size / 512` sectors (a partial last sector is
    /// not exposed).
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    ///
    /// # Errors
    /// Any I/O error (the guest gets VIRTIO_BLK_S_IOERR).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// Any I/O error (the guest gets VIRTIO_BLK_S_IOERR).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (VIRTIO_BLK_T_FLUSH).
    ///
    /// # Errors
    /// Any I/O error (the guest gets VIRTIO_BLK_S_IOERR).
    fn flush(&mut self) -> io::Result<()>;

    /// The guest no longer needs `len` bytes at `offset` (VIRTIO_BLK_T_DISCARD): afterwards
    /// they read as unspecified data (zeroes, or the backing file's bytes), and the backend may
    /// give the host space back. The default keeps the data, which the spec allows.
    ///
    /// # Errors
    /// Any I/O error (the guest gets VIRTIO_BLK_S_IOERR).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes (VIRTIO_BLK_T_WRITE_ZEROES). With `unmap`,
    /// the backend may also give the host space back. The default writes zero-filled buffers.
    ///
    /// # Errors
    /// Any I/O error (the guest gets VIRTIO_BLK_S_IOERR).
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _ = unmap;
        write_zeroes_by_writing(self, offset, len)
    }
}

/// Writes `len` zero bytes at `offset` in 64 KiB pieces: the fallback for backends that cannot
/// deallocate.
///
/// # Errors
/// The first failing write's error.
pub fn write_zeroes_by_writing<B: BlockBackend + ?Sized>(
    backend: &mut B,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(ZEROES.len(), |left| left.min(ZEROES.len()));
        let at = offset
            .checked_add(done)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        backend.write_at(at, &ZEROES[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Errors of opening a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The image file cannot be opened.
    #[error("cannot open disk image {path}.")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image size cannot be read.
    #[error("cannot read the size of disk image {path}.")]
    Metadata {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A raw disk image file, accessed with `pread`/`pwrite` and made durable with `fsync`.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path` read-only, or read-write when `read_only` is false. The format is always
    /// raw; nothing is probed.
    ///
    /// # Errors
    /// [`BackendError::Open`] or [`BackendError::Metadata`], with the path.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BackendError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BackendError::Metadata {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Self { file, size })
    }

    /// A raw disk on a file already open (the jailed VMM's inherited fd); `label` names it in
    /// errors. Whether it is writable is how it was opened.
    ///
    /// # Errors
    /// [`BackendError::Metadata`].
    pub fn from_file(file: File, label: &Path) -> Result<Self, BackendError> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let err = |source| BackendError::Metadata {
            path: label.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(err)?;
        // A block device's size is where its end is, not its inode's length.
        let size = if meta.file_type().is_block_device() {
            (&file).seek(io::SeekFrom::End(0)).map_err(err)?
        } else {
            meta.len()
        };
        Ok(Self { file, size })
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Punches a hole: the range reads as zeroes and its blocks go back to the host file
    /// system. A file system without hole punching (`EOPNOTSUPP`) keeps the data.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self.punch_hole(offset, len) {
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        // A punched hole reads as zeroes, so it serves both cases; a raw file has no backing
        // file whose bytes could show through.
        match self.punch_hole(offset, len) {
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                write_zeroes_by_writing(self, offset, len)
            }
            other => other,
        }
    }
}

impl RawFile {
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        nix::fcntl::fallocate(
            &self.file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
        .map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_file_round_trip_and_read_only_open() {
        let mut tmp = tempfile::NamedTempFile::new().expect("temp file");
        tmp.write_all(&[0u8; 4096]).expect("fill");
        let mut rw = RawFile::open(tmp.path(), false).expect("open rw");
        assert_eq!(rw.size(), 4096);
        rw.write_at(512, b"hello").expect("write");
        rw.flush().expect("fsync");
        let mut ro = RawFile::open(tmp.path(), true).expect("open ro");
        let mut buf = [0u8; 5];
        ro.read_at(512, &mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        let err = ro.write_at(0, b"x").expect_err("the fd is read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zeroes_and_free_blocks() {
        let tmp = tempfile::NamedTempFile::new().expect("temp file");
        let mut rw = RawFile::open(tmp.path(), false).expect("open rw");
        // Grow the file to 1 MiB of real data first.
        tmp.as_file().set_len(1 << 20).expect("size");
        rw.size = 1 << 20;
        let ones = vec![0xa5u8; 1 << 20];
        rw.write_at(0, &ones).expect("fill");
        rw.flush().expect("fsync");
        let blocks_full =
            std::os::unix::fs::MetadataExt::blocks(&tmp.as_file().metadata().expect("meta"));
        rw.write_zeroes(0, 512 * 1024, true).expect("write zeroes");
        rw.discard(512 * 1024, 256 * 1024).expect("discard");
        let mut buf = vec![1u8; 512 * 1024];
        rw.read_at(0, &mut buf).expect("read");
        assert!(
            buf.iter().all(|&b| b == 0),
            "write_zeroes must read back as zeroes"
        );
        let mut tail = [0u8; 4];
        rw.read_at((1 << 20) - 4, &mut tail).expect("read tail");
        assert_eq!(tail, [0xa5; 4], "bytes outside the ranges are kept");
        let blocks_after =
            std::os::unix::fs::MetadataExt::blocks(&tmp.as_file().metadata().expect("meta"));
        assert!(
            blocks_after < blocks_full,
            "hole punching gives blocks back ({blocks_full} -> {blocks_after})"
        );
        assert_eq!(rw.size(), 1 << 20, "the size is kept");
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), true).expect_err("missing");
        assert!(
            matches!(err, BackendError::Open { ref path, .. } if path == Path::new("/nonexistent/disk.img"))
        );
    }
}
