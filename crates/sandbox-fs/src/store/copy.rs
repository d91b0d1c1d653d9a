//! Sparse-aware copying and hashing of image files.
//!
//! Both walk the file's data extents with `lseek(SEEK_DATA/SEEK_HOLE)` (lseek(2)); a hole is
//! hashed as zeroes without being read. The copy also skips 4 KiB blocks that are all zeroes
//! inside data extents, so a fully written image becomes sparse too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use sha2::{Digest as _, Sha256};

use super::ImageDigest;

/// The unit of hole detection: a page, and the usual file system block.
const BLOCK: usize = 4096;
/// How much is read per loop turn.
const CHUNK: usize = 256 * 1024;
static ZEROES: [u8; CHUNK] = [0u8; CHUNK];

/// The next data extent `[start, end)` at or after `pos`, or `None` past the last one. A file
/// system without `SEEK_DATA` support is treated as all data.
fn next_data(file: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let to_off =
        |v: u64| i64::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let start = match lseek(file, to_off(pos)?, Whence::SeekData) {
        Ok(o) => u64::try_from(o).unwrap_or(len),
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    if start >= len {
        return Ok(None);
    }
    let end = match lseek(file, to_off(start)?, Whence::SeekHole) {
        Ok(o) => u64::try_from(o).unwrap_or(len).min(len),
        Err(Errno::ENXIO) => len,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, end.max(start))))
}

fn hash_zeroes(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = usize::try_from(n).map_or(CHUNK, |n| n.min(CHUNK));
        h.update(&ZEROES[..k]);
        n -= k as u64;
    }
}

/// Walks `src`'s bytes in order: holes as zero runs, data in chunks of at most [`CHUNK`]
/// bytes. Returns the digest of all bytes and the length.
fn walk(
    src: &File,
    mut on_data: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<(ImageDigest, u64)> {
    let len = src.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let Some((start, end)) = next_data(src, pos, len)? else {
            break;
        };
        hash_zeroes(&mut h, start - pos);
        let mut at = start;
        while at < end {
            let n = usize::try_from(end - at).map_or(CHUNK, |n| n.min(CHUNK));
            let chunk = &mut buf[..n];
            // A short read means the file shrank under us: read_exact_at fails with
            // UnexpectedEof, and the import fails rather than store a torn image.
            src.read_exact_at(chunk, at)?;
            h.update(&*chunk);
            on_data(at, chunk)?;
            at += n as u64;
        }
        pos = end;
    }
    hash_zeroes(&mut h, len - pos.min(len));
    Ok((ImageDigest::from_bytes(h.finalize().into()), len))
}

/// The SHA-256 of a file's bytes, reading only its data extents.
pub(crate) fn hash_sparse(file: &File) -> io::Result<(ImageDigest, u64)> {
    walk(file, |_, _| Ok(()))
}

/// Copies `src` into the empty file `dst`, leaving holes for `src`'s holes and for every
/// 4 KiB-aligned block of zeroes, and returns the digest of `src`'s bytes and its length.
pub(crate) fn copy_sparse(src: &File, dst: &File) -> io::Result<(ImageDigest, u64)> {
    let (digest, len) = walk(src, |at, chunk| {
        // Extents usually start on block boundaries; if one does not, the pieces are
        // unaligned, which only costs holes, never bytes: a skipped piece is all zeroes.
        let mut off = 0usize;
        while off < chunk.len() {
            let end = (off + BLOCK).min(chunk.len());
            let block = &chunk[off..end];
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, at + off as u64)?;
            }
            off = end;
        }
        Ok(())
    })?;
    dst.set_len(len)?;
    Ok((digest, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copy_turns_zero_blocks_into_holes_and_hashes_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = dir.path().join("src");
        let mut bytes = vec![0u8; 3 << 20];
        bytes[5] = 1;
        bytes[(2 << 20) + 4097] = 2;
        let last = bytes.len() - 1;
        bytes[last] = 3;
        std::fs::write(&src_path, &bytes).expect("write");
        let src = File::open(&src_path).expect("open");
        let dst_path = dir.path().join("dst");
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .expect("create");
        let (digest, len) = copy_sparse(&src, &dst).expect("copy");
        assert_eq!(len, bytes.len() as u64);
        assert_eq!(
            digest,
            ImageDigest::from_bytes(Sha256::digest(&bytes).into())
        );
        assert_eq!(std::fs::read(&dst_path).expect("read"), bytes);
        // Three 4 KiB blocks of data, in 512-byte units.
        let blocks = dst.metadata().expect("stat").blocks();
        assert!(blocks <= 3 * 8 + 8, "{blocks} blocks allocated");
        assert_eq!(hash_sparse(&dst).expect("hash"), (digest, len));
    }

    #[test]
    fn trailing_and_leading_holes_hash_as_zeroes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let f = File::create(&path).expect("create");
        f.set_len(1 << 20).expect("set_len");
        f.write_all_at(b"abc", 600_000).expect("write");
        let mut want = vec![0u8; 1 << 20];
        want[600_000..600_003].copy_from_slice(b"abc");
        let (d, len) = hash_sparse(&File::open(&path).expect("open")).expect("hash");
        assert_eq!(len, 1 << 20);
        assert_eq!(d, ImageDigest::from_bytes(Sha256::digest(&want).into()));
        let empty = dir.path().join("empty");
        File::create(&empty).expect("create");
        let (d, len) = hash_sparse(&File::open(&empty).expect("open")).expect("hash");
        assert_eq!(len, 0);
        assert_eq!(d, ImageDigest::from_bytes(Sha256::digest(b"").into()));
    }
}
