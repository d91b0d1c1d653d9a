//! The DNS side of enforcement, without sockets: screening a guest's query against the policy,
//! the upstream request, and the filtered answer (RFC 1035 §4 wire format through
//! hickory-proto).
//!
//! Screening order: unparsable or oversize → dropped (or FORMERR when the id is readable);
//! not a standard query with exactly one question → FORMERR/NOTIMP; class not `IN`, or type
//! `ANY`, `AXFR`, `IXFR` → REFUSED; a name [`Policy::decide_name`] refuses → REFUSED with a
//! deny event and no upstream query; `HTTPS`/`SVCB` → an empty NOERROR (their address hints
//! would bypass pinning; clients fall back to A/AAAA); anything else is forwarded.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use sandbox_policy::{NameVerdict, Policy, Reason};

/// Largest query accepted, in bytes (a question is at most ~270 bytes, EDNS options included).
pub(crate) const MAX_QUERY_LEN: usize = 512;
/// Largest UDP answer sent to the guest when it advertises EDNS (the DNS flag day 2020 size);
/// without EDNS the limit is 512. Bigger answers go out truncated (TC) and the guest retries
/// over TCP.
pub(crate) const MAX_UDP_ANSWER: u16 = 1232;
/// Largest upstream answer read, in bytes.
pub(crate) const MAX_UPSTREAM_LEN: usize = 65_535;

/// What to do with one guest query.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this answer now; `denied` is the (name, reason) for a deny event.
    Reply {
        msg: Message,
        denied: Option<(Option<String>, Reason)>,
    },
    /// Ask upstream, then answer with [`answer`].
    Forward {
        request: Message,
        query: Query,
        qname: String,
    },
    /// Not worth an answer (unreadable, or a response sent to us).
    Drop,
}

fn reply_to(request: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(request.id(), request.op_code(), code);
    m.set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .add_queries(request.queries().iter().cloned());
    if request.extensions().is_some() {
        m.set_edns(edns());
    }
    m
}

fn edns() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(MAX_UDP_ANSWER);
    e
}

/// Decides what to do with the query `bytes` under `policy`.
pub(crate) fn screen(bytes: &[u8], policy: &Policy) -> Step {
    if bytes.len() > MAX_QUERY_LEN {
        return match bytes.get(..2) {
            Some(id) => Step::Reply {
                msg: Message::error_msg(
                    u16::from_be_bytes([id[0], id[1]]),
                    OpCode::Query,
                    ResponseCode::FormErr,
                ),
                denied: None,
            },
            None => Step::Drop,
        };
    }
    let request = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => {
            // A header we can read gets FORMERR; less than that is dropped.
            return match bytes.get(..12) {
                Some(h) if h[2] & 0x80 == 0 => Step::Reply {
                    msg: Message::error_msg(
                        u16::from_be_bytes([h[0], h[1]]),
                        OpCode::Query,
                        ResponseCode::FormErr,
                    ),
                    denied: None,
                },
                _ => Step::Drop,
            };
        }
    };
    if request.message_type() != MessageType::Query {
        return Step::Drop;
    }
    if request.op_code() != OpCode::Query {
        return Step::Reply {
            msg: reply_to(&request, ResponseCode::NotImp),
            denied: None,
        };
    }
    let [query] = request.queries() else {
        return Step::Reply {
            msg: reply_to(&request, ResponseCode::FormErr),
            denied: None,
        };
    };
    let query = query.clone();
    let qname = query.name().to_ascii();
    if query.query_class() != DNSClass::IN
        || matches!(
            query.query_type(),
            RecordType::ANY | RecordType::AXFR | RecordType::IXFR
        )
    {
        return Step::Reply {
            msg: reply_to(&request, ResponseCode::Refused),
            denied: Some((Some(qname), Reason::Dns)),
        };
    }
    let d = policy.decide_name(&qname);
    if d.verdict == NameVerdict::Refused {
        return Step::Reply {
            msg: reply_to(&request, ResponseCode::Refused),
            denied: Some((Some(qname), d.reason)),
        };
    }
    if matches!(query.query_type(), RecordType::HTTPS | RecordType::SVCB) {
        return Step::Reply {
            msg: reply_to(&request, ResponseCode::NoError),
            denied: None,
        };
    }
    Step::Forward {
        request,
        query,
        qname,
    }
}

/// The upstream request for `query`: id `id`, recursion desired, EDNS with
/// [`MAX_UDP_ANSWER`].
pub(crate) fn upstream_request(query: &Query, id: u16) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(query.clone())
        .set_edns(edns());
    m
}

/// Whether `reply` answers the upstream request `id` for `query` (RFC 5452 §9.1: id and
/// question must match).
pub(crate) fn matches_request(reply: &Message, id: u16, query: &Query) -> bool {
    reply.id() == id
        && reply.message_type() == MessageType::Response
        && reply.queries().len() == 1
        && reply.queries()[0].query_type() == query.query_type()
        && reply.queries()[0].query_class() == query.query_class()
        && reply.queries()[0]
            .name()
            .to_ascii()
            .eq_ignore_ascii_case(&query.name().to_ascii())
}

/// The A and AAAA addresses of `reply`'s answer section and the smallest TTL among them.
pub(crate) fn addresses(reply: &Message) -> (Vec<IpAddr>, Option<u32>) {
    let mut addrs = Vec::new();
    let mut ttl: Option<u32> = None;
    for r in reply.answers() {
        let ip = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
        ttl = Some(ttl.map_or(r.ttl(), |t| t.min(r.ttl())));
    }
    (addrs, ttl)
}

/// The guest's answer from the upstream `reply`: the guest's id and question, the upstream
/// response code, and in the answer section only CNAME records, A/AAAA records whose address
/// `keep` accepts, and records of the queried type (never HTTPS/SVCB); TTLs capped at
/// `ttl_cap` seconds (the pin timeout, so a guest cache never outlives a pin). The authority
/// section keeps only SOA (negative caching); the additional section is dropped.
pub(crate) fn answer(
    request: &Message,
    reply: &Message,
    keep: &dyn Fn(IpAddr) -> bool,
    ttl_cap: u32,
) -> Message {
    let mut m = reply_to(request, reply.response_code());
    let qtype = request.query().map(|q| q.query_type());
    let cap = |r: &Record| {
        let mut r = r.clone();
        let t = r.ttl().min(ttl_cap);
        r.set_ttl(t);
        r
    };
    for r in reply.answers() {
        let ok = match r.data() {
            RData::A(a) => keep(IpAddr::V4(a.0)),
            RData::AAAA(a) => keep(IpAddr::V6(a.0)),
            RData::CNAME(_) => true,
            RData::HTTPS(_) | RData::SVCB(_) => false,
            _ => Some(r.record_type()) == qtype,
        };
        if ok {
            m.add_answer(cap(r));
        }
    }
    for r in reply.name_servers() {
        if r.record_type() == RecordType::SOA {
            m.add_name_server(cap(r));
        }
    }
    m
}

/// Encodes `msg` for the guest. Over UDP an answer bigger than the guest's limit (512, or its
/// EDNS size up to [`MAX_UDP_ANSWER`]) goes out truncated (TC set, no records).
pub(crate) fn encode(request: Option<&Message>, msg: &Message, udp: bool) -> Option<Vec<u8>> {
    let bytes = msg.to_vec().ok()?;
    if !udp {
        return Some(bytes);
    }
    let limit = request
        .and_then(|r| r.extensions().as_ref())
        .map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_ANSWER));
    if bytes.len() <= usize::from(limit) {
        Some(bytes)
    } else {
        msg.truncate().to_vec().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use hickory_proto::rr::Name;

    fn policy() -> Policy {
        Policy::from_toml(
            "[[allow]]\ndomain = \"*.wild.test\"\nports = [443]\nprotocol = \"tcp\"\n\
             [[allow]]\ncidr = \"198.51.100.0/25\"\nports = [8080]\nprotocol = \"tcp\"\n",
        )
        .expect("valid")
    }

    fn query(name: &str, ty: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(77)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).expect("name"), ty));
        m
    }

    fn bytes(m: &Message) -> Vec<u8> {
        m.to_vec().expect("encodes")
    }

    fn code(s: Step) -> (ResponseCode, Option<(Option<String>, Reason)>) {
        match s {
            Step::Reply { msg, denied } => {
                assert_eq!(msg.id(), 77);
                (msg.response_code(), denied)
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn screens_names_types_and_sizes() {
        let p = policy();
        assert!(matches!(
            screen(&bytes(&query("a.wild.test.", RecordType::A)), &p),
            Step::Forward { ref qname, .. } if qname == "a.wild.test."
        ));
        let (c, d) = code(screen(&bytes(&query("wild.test.", RecordType::A)), &p));
        assert_eq!(c, ResponseCode::Refused);
        assert_eq!(d.expect("deny event").0.as_deref(), Some("wild.test."));
        let (c, d) = code(screen(&bytes(&query("denied.test.", RecordType::AAAA)), &p));
        assert_eq!(
            (c, d.map(|x| x.1)),
            (
                ResponseCode::Refused,
                Some(Reason::Default(sandbox_policy::DefaultAction::Deny))
            )
        );
        for ty in [RecordType::ANY, RecordType::AXFR, RecordType::IXFR] {
            let (c, d) = code(screen(&bytes(&query("a.wild.test.", ty)), &p));
            assert_eq!(
                (c, d.map(|x| x.1)),
                (ResponseCode::Refused, Some(Reason::Dns))
            );
        }
        let (c, d) = code(screen(
            &bytes(&query("a.wild.test.", RecordType::HTTPS)),
            &p,
        ));
        assert_eq!((c, d), (ResponseCode::NoError, None));
        let mut big = bytes(&query("a.wild.test.", RecordType::A));
        big.resize(MAX_QUERY_LEN + 1, 0);
        assert_eq!(code(screen(&big, &p)).0, ResponseCode::FormErr);
        let mut two = query("a.wild.test.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("b.wild.test.").expect("name"),
            RecordType::A,
        ));
        assert_eq!(code(screen(&bytes(&two), &p)).0, ResponseCode::FormErr);
        assert!(matches!(screen(&[1, 2, 3], &p), Step::Drop));
        let mut resp = query("a.wild.test.", RecordType::A);
        resp.set_message_type(MessageType::Response);
        assert!(matches!(screen(&bytes(&resp), &p), Step::Drop));
    }

    #[test]
    fn answer_strips_refused_addresses_and_caps_ttls() {
        let req = query("a.wild.test.", RecordType::A);
        let name = Name::from_ascii("a.wild.test.").expect("name");
        let target = Name::from_ascii("cdn.example.").expect("name");
        let mut up = upstream_request(req.query().expect("q"), 9);
        up.set_message_type(MessageType::Response);
        up.add_answer(Record::from_rdata(
            name.clone(),
            7200,
            RData::CNAME(CNAME(target.clone())),
        ));
        up.add_answer(Record::from_rdata(
            target.clone(),
            60,
            RData::A(A("203.0.113.10".parse().expect("ip"))),
        ));
        up.add_answer(Record::from_rdata(
            target.clone(),
            60,
            RData::A(A("10.0.0.1".parse().expect("ip"))),
        ));
        up.add_answer(Record::from_rdata(
            target.clone(),
            60,
            RData::AAAA(AAAA("2001:db8::1".parse().expect("ip"))),
        ));
        up.add_answer(Record::from_rdata(
            target,
            60,
            RData::TXT(TXT::new(vec!["x".into()])),
        ));
        assert!(matches_request(&up, 9, req.query().expect("q")));
        assert!(!matches_request(&up, 10, req.query().expect("q")));
        let (addrs, ttl) = addresses(&up);
        assert_eq!(addrs.len(), 3);
        assert_eq!(ttl, Some(60));
        let keep = |ip: IpAddr| ip == "203.0.113.10".parse::<IpAddr>().expect("ip");
        let a = answer(&req, &up, &keep, 300);
        assert_eq!(a.id(), 77);
        let (got, _) = addresses(&a);
        assert_eq!(got, vec!["203.0.113.10".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            a.answers().len(),
            2,
            "CNAME + one A; TXT of another type dropped"
        );
        assert!(a.answers().iter().all(|r| r.ttl() <= 300));
        let enc = encode(Some(&req), &a, true).expect("encodes");
        assert!(enc.len() <= 512);
    }

    proptest::proptest! {
        /// Guest bytes never panic the screening, and whatever it answers fits the limits.
        #[test]
        fn screening_hostile_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700)) {
            match screen(&bytes, &policy()) {
                Step::Reply { msg, .. } => {
                    let enc = encode(Some(&msg), &msg, true);
                    proptest::prop_assert!(enc.is_none_or(|e| e.len() <= usize::from(MAX_UDP_ANSWER)));
                }
                Step::Forward { qname, .. } => {
                    proptest::prop_assert_eq!(
                        policy().decide_name(&qname).verdict,
                        NameVerdict::Allowed
                    );
                }
                Step::Drop => {}
            }
        }

        /// A mutated valid query is screened without panicking, and never forwarded for a
        /// name the policy refuses.
        #[test]
        fn screening_mutated_queries(flips in proptest::collection::vec((0usize..64, proptest::prelude::any::<u8>()), 0..6)) {
            let mut b = bytes(&query("x.wild.test.", RecordType::A));
            for (at, v) in flips {
                if let Some(x) = b.get_mut(at) {
                    *x ^= v;
                }
            }
            if let Step::Forward { qname, .. } = screen(&b, &policy()) {
                proptest::prop_assert_eq!(
                    policy().decide_name(&qname).verdict,
                    NameVerdict::Allowed
                );
            }
        }

        /// Hostile upstream bytes never panic the answer path.
        #[test]
        fn hostile_upstream_answers(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700)) {
            let req = query("a.wild.test.", RecordType::A);
            if let Ok(up) = Message::from_vec(&bytes) {
                let _ = matches_request(&up, 9, req.query().expect("q"));
                let _ = addresses(&up);
                let a = answer(&req, &up, &|_| true, 300);
                let _ = encode(Some(&req), &a, true);
            }
        }
    }

    #[test]
    fn big_udp_answers_are_truncated() {
        let req = query("a.wild.test.", RecordType::TXT);
        let mut up = upstream_request(req.query().expect("q"), 9);
        up.set_message_type(MessageType::Response);
        for i in 0..40 {
            up.add_answer(Record::from_rdata(
                Name::from_ascii("a.wild.test.").expect("name"),
                60,
                RData::TXT(TXT::new(vec![format!("{i:0>60}")])),
            ));
        }
        let a = answer(&req, &up, &|_| true, 300);
        let udp = Message::from_vec(&encode(Some(&req), &a, true).expect("enc")).expect("dec");
        assert!(udp.truncated());
        assert!(udp.answers().is_empty());
        let tcp = Message::from_vec(&encode(Some(&req), &a, false).expect("enc")).expect("dec");
        assert_eq!(tcp.answers().len(), 40);
    }
}
