//! Reading the sandbox table's `log group N` entries through an NFLOG netlink socket
//! (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_ULOG`) opened inside the sandbox netns.
//!
//! The kernel side is `net/netfilter/nfnetlink_log.c`; the message layout is
//! `include/uapi/linux/netfilter/nfnetlink_log.h`: a `nlmsghdr`, a 4-byte `nfgenmsg`
//! (family, version, resource id = the group, big-endian), then netlink attributes. We bind the
//! group (`NFULNL_CFG_CMD_BIND`), ask for the first [`COPY_RANGE`] bytes of each packet
//! (`NFULNL_COPY_PACKET`), and read `NFULA_PREFIX` and `NFULA_PAYLOAD` (the packet from its
//! network header). Everything is parsed with bounds checks: a message is kernel-made, but
//! the packet bytes in it are the guest's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sandbox_policy::Protocol;

/// Bytes of each logged packet the kernel copies to us: enough for an IPv6 header and the
/// ports.
pub(crate) const COPY_RANGE: u32 = 96;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One logged packet, as far as the policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoggedPacket {
    /// The log prefix (`sbx-default ` …), without trailing NULs.
    pub(crate) prefix: String,
    /// Source address.
    pub(crate) source: IpAddr,
    /// Destination address.
    pub(crate) destination: IpAddr,
    /// Transport protocol; `None` for protocols the policy does not model.
    pub(crate) protocol: Option<Protocol>,
    /// Destination port (0 for ICMP, or when the copy ended before the ports).
    pub(crate) port: u16,
}

/// The config request binding `group` in copy-packet mode, as one netlink message. The
/// kernel's batching is turned off (queue threshold 1, flush timeout 0.1 s): without it, an
/// entry may wait up to a second for others to fill the buffer.
pub(crate) fn bind_request(group: u16, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    push_attr(&mut attrs, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]);
    let mut mode = Vec::with_capacity(6);
    mode.extend_from_slice(&COPY_RANGE.to_be_bytes());
    mode.push(NFULNL_COPY_PACKET);
    mode.push(0);
    push_attr(&mut attrs, NFULA_CFG_MODE, &mode);
    push_attr(&mut attrs, NFULA_CFG_TIMEOUT, &10u32.to_be_bytes());
    push_attr(&mut attrs, NFULA_CFG_QTHRESH, &1u32.to_be_bytes());
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    // `len` is a few dozen bytes.
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_UNSPEC as u8);
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(&attrs);
    m
}

pub(crate) fn push_attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    // Attribute payloads here are at most a few dozen bytes.
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (align4(len) - len), 0);
}

pub(crate) fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// What one received datagram held.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    /// Logged packets.
    pub(crate) packets: Vec<LoggedPacket>,
    /// Errors the kernel reported (negative errno values); 0 (an ACK) is not listed.
    pub(crate) errors: Vec<i32>,
    /// Messages that could not be parsed (skipped).
    pub(crate) malformed: usize,
}

/// Parses one datagram of netlink messages. Never panics; stops at the first message whose
/// length does not fit.
pub(crate) fn parse_datagram(buf: &[u8]) -> Batch {
    let mut out = Batch::default();
    let mut at = 0usize;
    // Each turn consumes at least NLMSG_HDRLEN bytes, so this ends.
    while buf.len().saturating_sub(at) >= NLMSG_HDRLEN {
        let (Some(len), Some(ty)) = (u32_at(buf, at), u16_at(buf, at + 4)) else {
            break;
        };
        let len = len as usize;
        let Some(end) = at
            .checked_add(len)
            .filter(|&e| len >= NLMSG_HDRLEN && e <= buf.len())
        else {
            out.malformed += 1;
            break;
        };
        let body = &buf[at + NLMSG_HDRLEN..end];
        match ty {
            NLMSG_ERROR => match body
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            {
                Some(0) => {}
                Some(e) => out.errors.push(e),
                None => out.malformed += 1,
            },
            NLMSG_DONE => {}
            t if t == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET => match parse_packet(body) {
                Some(p) => out.packets.push(p),
                None => out.malformed += 1,
            },
            _ => {}
        }
        at = at.saturating_add(align4(len));
    }
    out
}

/// Parses the body of an `NFULNL_MSG_PACKET` (after the `nlmsghdr`).
fn parse_packet(body: &[u8]) -> Option<LoggedPacket> {
    let attrs = body.get(NFGENMSG_LEN..)?;
    let (mut prefix, mut payload) = (None, None);
    let mut at = 0usize;
    while attrs.len().saturating_sub(at) >= 4 {
        let len = usize::from(u16_at(attrs, at)?);
        let ty = u16_at(attrs, at + 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let value = attrs.get(at + 4..at.checked_add(len)?)?;
        match ty {
            NFULA_PREFIX => prefix = Some(value),
            NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        at = at.checked_add(align4(len))?;
    }
    let prefix = String::from_utf8_lossy(prefix?)
        .trim_end_matches('\0')
        .to_string();
    let (source, destination, protocol, port) = parse_ip(payload?)?;
    Some(LoggedPacket {
        prefix,
        source,
        destination,
        protocol,
        port,
    })
}

/// Source, destination, protocol and destination port of an IP packet (a prefix of it).
pub(crate) fn parse_ip(p: &[u8]) -> Option<(IpAddr, IpAddr, Option<Protocol>, u16)> {
    let version = p.first()? >> 4;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, usize) = match version {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let s: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let d: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            (
                Ipv4Addr::from(s).into(),
                Ipv4Addr::from(d).into(),
                *p.get(9)?,
                ihl,
            )
        }
        6 => {
            let s: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let d: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (
                Ipv6Addr::from(s).into(),
                Ipv6Addr::from(d).into(),
                *p.get(6)?,
                40,
            )
        }
        _ => return None,
    };
    let protocol = match proto {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        1 | 58 => Some(Protocol::Icmp),
        _ => None,
    };
    let port = match protocol {
        Some(Protocol::Tcp | Protocol::Udp) => p
            .get(l4 + 2..l4 + 4)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .unwrap_or(0),
        _ => 0,
    };
    Some((src, dst, protocol, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipv4_tcp(dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&[172, 30, 0, 2]);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn packet_msg(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        push_attr(&mut attrs, 1, &[0x08, 0x00, 2, 0]); // NFULA_PACKET_HDR (ignored)
        let mut pre = prefix.as_bytes().to_vec();
        pre.push(0);
        push_attr(&mut attrs, NFULA_PREFIX, &pre);
        // NFULA_PAYLOAD with a length > 6 bytes: build it by hand.
        let len = 4 + payload.len();
        attrs.extend_from_slice(&(len as u16).to_ne_bytes());
        attrs.extend_from_slice(&NFULA_PAYLOAD.to_ne_bytes());
        attrs.extend_from_slice(payload);
        attrs.resize(attrs.len() + (align4(len) - len), 0);
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&(NFNL_SUBSYS_ULOG << 8).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[2, 0, 0, 1]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn parses_a_logged_tcp_packet_and_an_ack() {
        let mut d = packet_msg("sbx-default ", &ipv4_tcp([203, 0, 113, 10], 443));
        // An ACK (error 0) and an error -ENOBUFS after it.
        for code in [0i32, -105] {
            let mut e = Vec::new();
            e.extend_from_slice(&36u32.to_ne_bytes());
            e.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            e.extend_from_slice(&[0; 10]);
            e.extend_from_slice(&code.to_ne_bytes());
            e.extend_from_slice(&[0; 16]);
            d.extend_from_slice(&e);
        }
        let b = parse_datagram(&d);
        assert_eq!(b.errors, vec![-105]);
        assert_eq!(b.malformed, 0);
        assert_eq!(
            b.packets,
            vec![LoggedPacket {
                prefix: "sbx-default ".into(),
                source: "172.30.0.2".parse().expect("ip"),
                destination: "203.0.113.10".parse().expect("ip"),
                protocol: Some(Protocol::Tcp),
                port: 443,
            }]
        );
        assert_eq!(
            sandbox_policy::LogClass::from_prefix(&b.packets[0].prefix),
            Some(sandbox_policy::LogClass::Default)
        );
    }

    #[test]
    fn short_copies_and_ipv6() {
        // The copy ended before the ports: port 0, not a failure.
        let short = &ipv4_tcp([1, 2, 3, 4], 80)[..20];
        assert_eq!(parse_ip(short).expect("header").3, 0);
        let mut v6 = vec![0u8; 44];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[24] = 0x20;
        v6[25] = 0x01;
        v6[42..44].copy_from_slice(&53u16.to_be_bytes());
        let (_, d, p, port) = parse_ip(&v6).expect("ipv6");
        assert_eq!(
            (d, p, port),
            ("2001::".parse().expect("ip"), Some(Protocol::Udp), 53)
        );
        assert!(parse_ip(&[0x45; 10]).is_none());
        assert!(parse_ip(&[0x41; 40]).is_none(), "IHL below 5");
    }

    #[test]
    fn bind_request_layout() {
        let m = bind_request(7, 1);
        assert_eq!(m.len(), 16 + 4 + 8 + 12 + 8 + 8);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some(0x0401));
        assert_eq!(&m[18..20], &7u16.to_be_bytes());
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(d in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_datagram(&d);
            let _ = parse_ip(&d);
        }

        #[test]
        fn truncated_messages_never_panic(cut in 0usize..120) {
            let m = packet_msg("sbx-reserved ", &ipv4_tcp([169, 254, 169, 254], 80));
            let b = parse_datagram(&m[..cut.min(m.len())]);
            prop_assert!(b.packets.len() <= 1);
        }
    }
}
