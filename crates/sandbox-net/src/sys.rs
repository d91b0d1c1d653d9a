//! The crate's only unsafe code: the tap ioctls (`TUNSETIFF`, `TUNSETVNETHDRSZ`), which no
//! safe wrapper in our dependencies offers.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `struct virtio_net_hdr_v1` (virtio 1.x, §5.1.6), the header the VMM's virtio-net
/// device exchanges with the tap in front of every frame.
pub(crate) const VNET_HDR_LEN: libc::c_int = 12;

/// Opens `/dev/net/tun` and attaches a tap named `name` in the calling thread's netns (created
/// if absent), with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header. The fd is
/// `O_CLOEXEC | O_NONBLOCK`. The tap is not persistent: it disappears when the last fd to it
/// closes.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "tap name must be 1..=15 bytes without NUL",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);

    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and plain
    // structs) for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // The name stays NUL-terminated: it is shorter than IFNAMSIZ and the rest is zero.
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `fd` is an open tun control fd owned by this function; TUNSETIFF reads (and
    // writes back the name into) one `struct ifreq`, and `req` is a live, exclusive, properly
    // sized `ifreq` for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len: libc::c_int = VNET_HDR_LEN;
    // SAFETY: `fd` is now an attached tap fd; TUNSETVNETHDRSZ reads one `int` through the
    // pointer, and `len` lives on the stack for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rejects_bad_names_before_any_syscall() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            let e = super::open_tap(name).expect_err("bad name");
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
