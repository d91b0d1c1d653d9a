//! The address a guest sent a DNS query to, before the sandbox table's DNAT rewrote it to the
//! resolver: one conntrack lookup (`IPCTNL_MSG_CT_GET` by the reply tuple) over a
//! `NETLINK_NETFILTER` socket opened inside the sandbox netns.
//!
//! The kernel side is `net/netfilter/nf_conntrack_netlink.c`; the layout is
//! `include/uapi/linux/netfilter/nfnetlink_conntrack.h`: a `nlmsghdr`, a 4-byte `nfgenmsg`
//! (family `AF_INET`), then the nested `CTA_TUPLE_REPLY` (`CTA_TUPLE_IP` with
//! `CTA_IP_V4_SRC`/`DST`, `CTA_TUPLE_PROTO` with `CTA_PROTO_NUM` and the ports, big-endian).
//! The answer is an `IPCTNL_MSG_CT_NEW` whose `CTA_TUPLE_ORIG` holds what the guest sent.
//! nfnetlink answers within the `send` call, so the socket is non-blocking and a missing
//! answer is just "unknown" (the caller falls back to the resolver's own address).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::nflog::{align4, push_attr, u16_at, u32_at};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// IP protocol numbers of the two DNS transports.
pub(crate) const IPPROTO_TCP: u8 = 6;
/// See [`IPPROTO_TCP`].
pub(crate) const IPPROTO_UDP: u8 = 17;

/// The reply tuple of a redirected query: from `resolver` (the gateway's port 53) back to the
/// guest's `client` address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyTuple {
    pub(crate) proto: u8,
    pub(crate) resolver: SocketAddrV4,
    pub(crate) client: SocketAddrV4,
}

fn nested(ty: u16, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + inner.len());
    push_attr(&mut out, ty | NLA_F_NESTED, inner);
    out
}

/// The `IPCTNL_MSG_CT_GET` request for the connection with reply tuple `t`.
pub(crate) fn get_request(t: &ReplyTuple, seq: u32) -> Vec<u8> {
    let mut ip = Vec::new();
    push_attr(&mut ip, CTA_IP_V4_SRC, &t.resolver.ip().octets());
    push_attr(&mut ip, CTA_IP_V4_DST, &t.client.ip().octets());
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[t.proto]);
    push_attr(
        &mut proto,
        CTA_PROTO_SRC_PORT,
        &t.resolver.port().to_be_bytes(),
    );
    push_attr(
        &mut proto,
        CTA_PROTO_DST_PORT,
        &t.client.port().to_be_bytes(),
    );
    let mut tuple = nested(CTA_TUPLE_IP, &ip);
    tuple.extend_from_slice(&nested(CTA_TUPLE_PROTO, &proto));
    let attrs = nested(CTA_TUPLE_REPLY, &tuple);
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    // `len` is under a hundred bytes.
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_INET as u8);
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&attrs);
    m
}

/// The attributes in `b` as (type without flags, value), bounds-checked; stops at the first
/// malformed one.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if b.len().saturating_sub(at) < 4 {
            return None;
        }
        let len = usize::from(u16_at(b, at)?);
        let ty = u16_at(b, at + 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let value = b.get(at + 4..at.checked_add(len)?)?;
        at = at.checked_add(align4(len))?;
        Some((ty, value))
    })
}

fn find(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// What the kernel answered to request `seq`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The original direction's destination (what the guest asked).
    Original(SocketAddrV4),
    /// An error (negative errno; `-ENOENT` when there is no such connection).
    Error(i32),
    /// Nothing for `seq`, or unparsable.
    None,
}

/// Parses one received datagram for the answer to `seq`. Never panics.
pub(crate) fn parse_answer(buf: &[u8], seq: u32) -> Answer {
    let mut at = 0usize;
    // Each turn consumes at least NLMSG_HDRLEN bytes, so this ends.
    while buf.len().saturating_sub(at) >= NLMSG_HDRLEN {
        let (Some(len), Some(ty), Some(s)) =
            (u32_at(buf, at), u16_at(buf, at + 4), u32_at(buf, at + 8))
        else {
            break;
        };
        let len = len as usize;
        let Some(end) = at
            .checked_add(len)
            .filter(|&e| len >= NLMSG_HDRLEN && e <= buf.len())
        else {
            break;
        };
        let body = &buf[at + NLMSG_HDRLEN..end];
        if s == seq {
            if ty == NLMSG_ERROR {
                return match body.get(..4) {
                    Some(b) => Answer::Error(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                    None => Answer::None,
                };
            }
            if ty == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
                let orig = body
                    .get(NFGENMSG_LEN..)
                    .and_then(|a| find(a, CTA_TUPLE_ORIG));
                let ip = orig
                    .and_then(|o| find(o, CTA_TUPLE_IP))
                    .and_then(|i| find(i, CTA_IP_V4_DST))
                    .and_then(|v| <[u8; 4]>::try_from(v).ok());
                let port = orig
                    .and_then(|o| find(o, CTA_TUPLE_PROTO))
                    .and_then(|p| find(p, CTA_PROTO_DST_PORT))
                    .and_then(|v| <[u8; 2]>::try_from(v).ok());
                return match (ip, port) {
                    (Some(ip), Some(port)) => Answer::Original(SocketAddrV4::new(
                        Ipv4Addr::from(ip),
                        u16::from_be_bytes(port),
                    )),
                    _ => Answer::None,
                };
            }
        }
        at = at.saturating_add(align4(len));
    }
    Answer::None
}

/// A conntrack lookup socket of one sandbox netns.
#[derive(Debug)]
pub(crate) struct Conntrack {
    sock: netlink_sys::Socket,
    seq: AtomicU32,
}

impl Conntrack {
    /// Opens the socket in the calling thread's netns and checks that lookups work (the first
    /// request loads `nf_conntrack_netlink` if it is a module; an absent tuple answers
    /// `ENOENT`). Blocking: call it on a netns thread.
    pub(crate) fn open() -> std::io::Result<Conntrack> {
        let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        s.bind_auto()?;
        let probe = ReplyTuple {
            proto: IPPROTO_UDP,
            resolver: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1),
            client: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 1),
        };
        s.send(&get_request(&probe, 1), 0)?;
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        s.recv(&mut buf, 0)?;
        match parse_answer(&buf, 1) {
            Answer::Error(e) if e == -libc::ENOENT => {}
            Answer::Error(e) => return Err(std::io::Error::from_raw_os_error(-e)),
            Answer::Original(_) => {}
            Answer::None => return Err(std::io::Error::other("no conntrack answer")),
        }
        s.set_non_blocking(true)?;
        Ok(Conntrack {
            sock: s,
            seq: AtomicU32::new(2),
        })
    }

    /// The original destination of the connection with reply tuple `t`, if the kernel knows
    /// it. Never blocks (see the module doc). Callers serialise their calls (the answers of
    /// concurrent ones could cross).
    pub(crate) fn original_destination(&self, t: &ReplyTuple) -> Option<SocketAddrV4> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let s = &self.sock;
        s.send(&get_request(t, seq), 0).ok()?;
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        // Stale answers (an earlier request whose answer was not read) are skipped; bounded.
        for _ in 0..4 {
            buf.clear();
            s.recv(&mut buf, 0).ok()?;
            match parse_answer(&buf, seq) {
                Answer::Original(a) => return Some(a),
                Answer::Error(_) => return None,
                Answer::None => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tuple() -> ReplyTuple {
        ReplyTuple {
            proto: IPPROTO_UDP,
            resolver: "172.30.0.1:53".parse().expect("addr"),
            client: "172.30.0.2:40000".parse().expect("addr"),
        }
    }

    /// An `IPCTNL_MSG_CT_NEW` answer with `seq` whose original tuple goes to `dst`.
    fn answer(seq: u32, dst: SocketAddrV4) -> Vec<u8> {
        let mut ip = Vec::new();
        push_attr(&mut ip, CTA_IP_V4_SRC, &[172, 30, 0, 2]);
        push_attr(&mut ip, CTA_IP_V4_DST, &dst.ip().octets());
        let mut proto = Vec::new();
        push_attr(&mut proto, CTA_PROTO_NUM, &[IPPROTO_UDP]);
        push_attr(&mut proto, CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes());
        push_attr(&mut proto, CTA_PROTO_DST_PORT, &dst.port().to_be_bytes());
        let mut t = nested(CTA_TUPLE_IP, &ip);
        t.extend_from_slice(&nested(CTA_TUPLE_PROTO, &proto));
        let mut attrs = nested(CTA_TUPLE_ORIG, &t);
        attrs.extend_from_slice(&nested(CTA_TUPLE_REPLY, &t));
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        m.extend_from_slice(&attrs);
        m
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m
    }

    #[test]
    fn request_layout() {
        let r = get_request(&tuple(), 7);
        assert_eq!(u32_at(&r, 0), Some(r.len() as u32));
        assert_eq!(u16_at(&r, 4), Some(0x0101), "CTNETLINK, CT_GET");
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(r[16], libc::AF_INET as u8);
        let reply = find(&r[20..], CTA_TUPLE_REPLY).expect("reply tuple");
        let ip = find(reply, CTA_TUPLE_IP).expect("ip");
        assert_eq!(find(ip, CTA_IP_V4_SRC), Some(&[172, 30, 0, 1][..]));
        assert_eq!(find(ip, CTA_IP_V4_DST), Some(&[172, 30, 0, 2][..]));
        let p = find(reply, CTA_TUPLE_PROTO).expect("proto");
        assert_eq!(find(p, CTA_PROTO_NUM), Some(&[17u8][..]));
        assert_eq!(find(p, CTA_PROTO_SRC_PORT), Some(&53u16.to_be_bytes()[..]));
        assert_eq!(
            find(p, CTA_PROTO_DST_PORT),
            Some(&40000u16.to_be_bytes()[..])
        );
        // Nested attributes carry NLA_F_NESTED.
        assert_eq!(u16_at(&r, 22), Some(CTA_TUPLE_REPLY | NLA_F_NESTED));
    }

    #[test]
    fn answers_and_errors() {
        let dst: SocketAddrV4 = "8.8.8.8:53".parse().expect("addr");
        assert_eq!(parse_answer(&answer(9, dst), 9), Answer::Original(dst));
        assert_eq!(parse_answer(&answer(8, dst), 9), Answer::None, "stale");
        assert_eq!(
            parse_answer(&error(9, libc::ENOENT), 9),
            Answer::Error(-libc::ENOENT)
        );
        let mut two = answer(8, "1.1.1.1:53".parse().expect("addr"));
        two.extend_from_slice(&answer(9, dst));
        assert_eq!(parse_answer(&two, 9), Answer::Original(dst));
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(d in proptest::collection::vec(any::<u8>(), 0..300), seq in 0u32..4) {
            let _ = parse_answer(&d, seq);
        }

        #[test]
        fn truncated_answers_never_panic(cut in 0usize..140) {
            let a = answer(3, "9.9.9.9:53".parse().expect("addr"));
            let _ = parse_answer(&a[..cut.min(a.len())], 3);
        }
    }
}
