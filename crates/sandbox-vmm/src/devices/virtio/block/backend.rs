//! Block backends: where virtio-blk sectors live on the host.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Storage behind a virtio-blk device. Offsets and lengths are in bytes; the device only issues
/// accesses that lie entirely below [`BlockBackend::size`] and are multiples of 512 bytes.
///
/// Implemented by [`RawFile`] here and by copy-on-write overlays elsewhere (sandbox-fs).
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
    fn missing_image_names_the_path() {
        let err = RawFile::open(Path::new("/nonexistent/disk.img"), true).expect_err("missing");
        assert!(
            matches!(err, BackendError::Open { ref path, .. } if path == Path::new("/nonexistent/disk.img"))
        );
    }
}
