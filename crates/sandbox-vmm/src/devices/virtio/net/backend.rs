//! Frame backends for virtio-net: where the guest's Ethernet frames go on the host.
//!
//! A backend moves whole frames, each preceded by the 12-byte `struct virtio_net_hdr_v1`
//! (virtio 1.2 §5.1.6), one frame per `recv`/`send`: exactly what a tap opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12 does. [`FdBackend`] serves any
//! such fd; [`FdBackend::tap`] first checks that the fd really is a tap set up that way.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::VNET_HDR_LEN;

/// The frame source and sink behind a virtio-net device. Both calls are non-blocking.
pub trait NetBackend: Send {
    /// The fd that is readable when a frame can be received (polled level-triggered).
    fn raw_fd(&self) -> RawFd;
    /// Receives one frame (header included) into `buf`; returns its length. A frame longer
    /// than `buf` is truncated and its true length is lost, so `buf` should hold the largest
    /// frame the backend can produce.
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting; any other I/O error.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (header included).
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when the backend cannot take it now (the frame is dropped,
    /// as a NIC would); any other I/O error.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Errors of setting up a frame backend.
#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    /// The fd is not a tun/tap device fd.
    #[error("fd {fd} is not an attached tun/tap device.")]
    NotATap {
        /// The fd number.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tap was not opened with the flags virtio-net needs.
    #[error(
        "tap fd {fd} has flags {flags:#06x}; it must be opened with IFF_TAP | IFF_NO_PI | \
         IFF_VNET_HDR (0x5002)."
    )]
    TapFlags {
        /// The fd number.
        fd: RawFd,
        /// Its `ifr_flags`.
        flags: u16,
    },
    /// The tap's virtio-net header length is not 12 bytes.
    #[error("tap fd {fd} uses a {len}-byte virtio-net header; set it to 12 with TUNSETVNETHDRSZ.")]
    HeaderLength {
        /// The fd number.
        fd: RawFd,
        /// The tap's header length.
        len: usize,
    },
    /// The fd cannot be made non-blocking.
    #[error("cannot make fd {fd} non-blocking.")]
    NonBlocking {
        /// The fd number.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;

/// A frame-per-call fd: a tap, or a datagram/seqpacket socket in tests.
#[derive(Debug)]
pub struct FdBackend {
    fd: OwnedFd,
}

impl FdBackend {
    /// Wraps a tap fd after checking it: a tap (not tun), `IFF_NO_PI`, `IFF_VNET_HDR`, a 12-byte
    /// header. Makes the fd non-blocking.
    ///
    /// # Errors
    /// [`NetBackendError`] naming what is wrong and how to open the tap instead.
    pub fn tap(fd: OwnedFd) -> Result<Self, NetBackendError> {
        let raw = fd.as_raw_fd();
        let flags = crate::sys::tap_flags(fd.as_fd())
            .map_err(|source| NetBackendError::NotATap { fd: raw, source })?;
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if flags & want != want {
            return Err(NetBackendError::TapFlags { fd: raw, flags });
        }
        let len = crate::sys::tap_vnet_hdr_len(fd.as_fd())
            .map_err(|source| NetBackendError::NotATap { fd: raw, source })?;
        if len != VNET_HDR_LEN {
            return Err(NetBackendError::HeaderLength { fd: raw, len });
        }
        Self::frames(fd)
    }

    /// Wraps any fd that keeps frame boundaries (one frame per `read`/`write`), unchecked.
    /// Makes the fd non-blocking.
    ///
    /// # Errors
    /// [`NetBackendError::NonBlocking`].
    pub fn frames(fd: OwnedFd) -> Result<Self, NetBackendError> {
        let raw = fd.as_raw_fd();
        set_nonblocking(fd.as_fd())
            .map_err(|source| NetBackendError::NonBlocking { fd: raw, source })?;
        Ok(Self { fd })
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

impl NetBackend for FdBackend {
    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(&self.fd, buf).map_err(io::Error::from)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let n = nix::unistd::write(&self.fd, frame).map_err(io::Error::from)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short frame write",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_not_a_tap() {
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let err = FdBackend::tap(OwnedFd::from(a)).expect_err("not a tap");
        assert!(matches!(err, NetBackendError::NotATap { .. }), "{err:?}");
    }

    #[test]
    fn frames_keep_their_boundaries_and_recv_does_not_block() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("pair");
        let mut be = FdBackend::frames(OwnedFd::from(a)).expect("backend");
        let mut buf = [0u8; 64];
        let err = be.recv(&mut buf).expect_err("nothing yet");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        b.send(b"one").expect("send");
        b.send(b"three").expect("send");
        assert_eq!(be.recv(&mut buf).expect("recv"), 3);
        assert_eq!(be.recv(&mut buf).expect("recv"), 5);
        be.send(b"frame").expect("send");
        assert_eq!(b.recv(&mut buf).expect("recv"), 5);
    }
}
