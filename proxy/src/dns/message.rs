//! What to do with one DNS message from a workload, and how to turn the resolver's answer into the
//! workload's: pure functions over bytes (no sockets, no clocks), so they are unit-tested and fuzzed.
//!
//! Nothing the workload wrote is forwarded as it wrote it. A query for an allowed name is rebuilt from
//! its parsed question (a fresh id, one question, our own EDNS record, no options), so the only thing
//! that reaches the resolver is the name the policy allowed, its type and two flags. Answers are rebuilt
//! too, and sized to what the client can take.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use strait_policy::hostname::HostName;

/// Largest UDP answer we send or ask for: the DNS flag day 2020 figure, which avoids IP fragmentation.
pub const UDP_PAYLOAD: u16 = 1232;
/// Answers without EDNS fit the classic limit (RFC 1035 §4.2.1).
const CLASSIC_UDP: usize = 512;
/// TTL of answers for mesh names: short, because the directory changes under them.
pub const MESH_TTL: u32 = 5;

/// How the message arrived, which bounds the answer's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What the proxy knows when it plans an answer.
pub struct Scope<'a> {
    /// The zone of mesh names (`<service account>.<namespace>.<zone>`).
    pub zone: &'a HostName,
    /// Addresses of a mesh name given relative to the zone (`vfx.movie`); `None`: no such workload.
    pub mesh: &'a dyn Fn(&str) -> Option<Vec<IpAddr>>,
    /// Whether the asking workload may have this name resolved by the resolver.
    pub allowed: &'a dyn Fn(&HostName) -> bool,
}

/// Why a query got the answer it got (for metrics and the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A mesh name, answered from the directory.
    Mesh,
    /// Under the mesh zone but no such workload.
    MeshUnknown,
    /// Not a name any egress entry of the workload allows: REFUSED.
    NotAllowed(String),
    /// Parsed but not a query we serve (several questions, a zone transfer, another class…).
    Unsupported(&'static str),
}

/// The plan for one message.
pub enum Plan {
    /// Answer at once with these bytes.
    Reply { bytes: Vec<u8>, outcome: Outcome },
    /// Ask the resolver; [`finish`] turns its answer into the client's.
    Forward(Box<Pending>),
    /// Not a DNS query: nothing is sent back (raw bytes to port 53 go nowhere).
    Drop,
}

/// A forwarded query: what goes to the resolver and what the client's answer needs.
#[derive(Debug)]
pub struct Pending {
    pub name: HostName,
    /// The query for the resolver, already encoded.
    pub upstream: Vec<u8>,
    upstream_id: u16,
    question: Query,
    client: Message,
    max_len: usize,
}

impl Pending {
    /// The answer when no resolver gave a usable one: SERVFAIL.
    pub fn failure(&self) -> Vec<u8> {
        local_answer(&self.client, ResponseCode::ServFail, &[], self.max_len)
    }
}

/// Plans the answer to `bytes`, a message a workload sent to port 53. `upstream_id` is the id the
/// forwarded query will carry (random, chosen by the caller).
pub fn plan(bytes: &[u8], transport: Transport, scope: &Scope<'_>, upstream_id: u16) -> Plan {
    let Ok(msg) = Message::from_vec(bytes) else {
        return Plan::Drop;
    };
    if msg.message_type() != MessageType::Query {
        return Plan::Drop;
    }
    let max_len = match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => msg.extensions().as_ref().map_or(CLASSIC_UDP, |e| {
            usize::from(e.max_payload().clamp(CLASSIC_UDP as u16, UDP_PAYLOAD))
        }),
    };
    let reply = |rcode: ResponseCode, outcome: Outcome| Plan::Reply {
        bytes: local_answer(&msg, rcode, &[], max_len),
        outcome,
    };
    if msg.op_code() != OpCode::Query {
        return reply(ResponseCode::NotImp, Outcome::Unsupported("not a QUERY"));
    }
    let [question] = msg.queries() else {
        return reply(
            ResponseCode::FormErr,
            Outcome::Unsupported("not exactly one question"),
        );
    };
    if !msg.answers().is_empty() || !msg.name_servers().is_empty() {
        return reply(
            ResponseCode::FormErr,
            Outcome::Unsupported("records in a query"),
        );
    }
    if question.query_class() != DNSClass::IN {
        return reply(
            ResponseCode::Refused,
            Outcome::Unsupported("a class other than IN"),
        );
    }
    if matches!(
        question.query_type(),
        RecordType::AXFR | RecordType::IXFR | RecordType::OPT
    ) {
        return reply(
            ResponseCode::Refused,
            Outcome::Unsupported("a zone transfer"),
        );
    }
    let Some(name) = host_name(question.name()) else {
        return reply(
            ResponseCode::Refused,
            Outcome::NotAllowed(question.name().to_ascii()),
        );
    };
    if name.is_in(scope.zone) {
        let addrs = match name.relative_to(scope.zone) {
            // The zone's own name exists and has no address records.
            None => Some(Vec::new()),
            Some(relative) => (scope.mesh)(relative),
        };
        return match addrs {
            None => reply(ResponseCode::NXDomain, Outcome::MeshUnknown),
            Some(addrs) => {
                let records = mesh_records(question, &addrs);
                Plan::Reply {
                    bytes: local_answer(&msg, ResponseCode::NoError, &records, max_len),
                    outcome: Outcome::Mesh,
                }
            }
        };
    }
    if !(scope.allowed)(&name) {
        return reply(ResponseCode::Refused, Outcome::NotAllowed(name.to_string()));
    }
    let Ok(canonical) = Name::from_ascii(format!("{name}.")) else {
        return reply(ResponseCode::Refused, Outcome::NotAllowed(name.to_string()));
    };
    let asked = Query::query(canonical, question.query_type());
    let mut up = Message::new();
    up.set_id(upstream_id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_checking_disabled(msg.checking_disabled())
        .add_query(asked.clone());
    up.set_edns(our_edns(dnssec_ok(&msg)));
    match up.to_vec() {
        Ok(upstream) => Plan::Forward(Box::new(Pending {
            name,
            upstream,
            upstream_id,
            question: asked,
            client: msg,
            max_len,
        })),
        Err(_) => reply(ResponseCode::ServFail, Outcome::Unsupported("unencodable")),
    }
}

/// The canonical form of a queried name, or `None` when it is not a host name (binary labels, spaces,
/// the root…): such names are never forwarded.
fn host_name(name: &Name) -> Option<HostName> {
    let mut text = String::new();
    for label in name.iter() {
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(std::str::from_utf8(label).ok()?);
    }
    HostName::parse(&text).ok()
}

fn mesh_records(question: &Query, addrs: &[IpAddr]) -> Vec<Record> {
    addrs
        .iter()
        .filter_map(|ip| match (question.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(A(*v4))),
            (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|data| Record::from_rdata(question.name().clone(), MESH_TTL, data))
        .collect()
}

/// An answer made here: the client's id, question and flags, `rcode`, `answers`.
fn local_answer(
    query: &Message,
    rcode: ResponseCode,
    answers: &[Record],
    max_len: usize,
) -> Vec<u8> {
    let mut m = Message::error_msg(query.id(), query.op_code(), rcode);
    m.set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(rcode == ResponseCode::NoError || rcode == ResponseCode::NXDomain)
        .add_queries(query.queries().iter().take(1).cloned())
        .add_answers(answers.iter().cloned());
    if query.extensions().is_some() {
        m.set_edns(our_edns(false));
    }
    encode_within(&m, max_len)
}

/// The only EDNS record we send, upstream or to clients: version 0, our UDP size, no options.
fn our_edns(dnssec_ok: bool) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD)
        .set_version(0)
        .set_dnssec_ok(dnssec_ok);
    edns
}

fn dnssec_ok(m: &Message) -> bool {
    m.extensions().as_ref().is_some_and(|e| e.flags().dnssec_ok)
}

/// `m` encoded, or its truncated form (header, question, TC) when it does not fit `max_len`.
fn encode_within(m: &Message, max_len: usize) -> Vec<u8> {
    match m.to_vec() {
        Ok(b) if b.len() <= max_len => b,
        _ => m.truncate().to_vec().unwrap_or_default(),
    }
}

/// The client's answer, and the addresses (with TTLs in seconds) it gives for the asked name.
pub type Answered = (Vec<u8>, Vec<(IpAddr, u32)>);

/// Why the resolver's answer was not passed on (the client gets SERVFAIL).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("not a DNS message")]
    Malformed,
    #[error("an answer to another query (id or question differs)")]
    Mismatch,
}

/// The client's answer built from the resolver's `answer` to `pending`, and the addresses it names for
/// the asked name with their TTLs (A/AAAA records of the name or of the CNAME chain it starts).
pub fn finish(pending: &Pending, answer: &[u8]) -> Result<Answered, AnswerError> {
    let up = Message::from_vec(answer).map_err(|_| AnswerError::Malformed)?;
    let same_question = match up.queries() {
        [q] => {
            q.query_type() == pending.question.query_type()
                && q.query_class() == pending.question.query_class()
                && q.name().to_lowercase() == pending.question.name().to_lowercase()
        }
        _ => false,
    };
    if up.id() != pending.upstream_id
        || up.message_type() != MessageType::Response
        || !same_question
    {
        return Err(AnswerError::Mismatch);
    }
    let client = &pending.client;
    let mut m = Message::error_msg(client.id(), OpCode::Query, up.response_code());
    m.set_recursion_desired(client.recursion_desired())
        .set_recursion_available(up.recursion_available())
        .set_authentic_data(up.authentic_data())
        .set_checking_disabled(client.checking_disabled())
        .set_truncated(up.truncated())
        .add_queries(client.queries().iter().take(1).cloned())
        .add_answers(up.answers().iter().cloned())
        .add_name_servers(up.name_servers().iter().cloned())
        .add_additionals(up.additionals().iter().cloned());
    if client.extensions().is_some() {
        m.set_edns(our_edns(dnssec_ok(&up)));
    }
    Ok((
        encode_within(&m, pending.max_len),
        chain_addresses(pending.question.name(), up.answers()),
    ))
}

/// The addresses the answer gives for `name`: its A/AAAA records and those of the names its CNAME
/// chain leads to. Records about other names (an answer can carry anything) are ignored.
fn chain_addresses(name: &Name, answers: &[Record]) -> Vec<(IpAddr, u32)> {
    let mut names = vec![name.to_lowercase()];
    // Each round adds the targets of CNAMEs owned by a name already in the chain; a round that adds
    // nothing ends it, and an answer's records bound the rounds.
    for _ in 0..answers.len() {
        let before = names.len();
        for r in answers {
            if let RData::CNAME(target) = r.data() {
                let target = target.0.to_lowercase();
                if names.contains(&r.name().to_lowercase()) && !names.contains(&target) {
                    names.push(target);
                }
            }
        }
        if names.len() == before {
            break;
        }
    }
    let mut out: Vec<(IpAddr, u32)> = answers
        .iter()
        .filter(|r| names.contains(&r.name().to_lowercase()))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::CNAME;

    fn zone() -> HostName {
        HostName::parse("strait.internal").unwrap()
    }

    fn query(name: &str, kind: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn run(bytes: &[u8], transport: Transport) -> Plan {
        let zone = zone();
        let mesh = |rel: &str| {
            (rel == "vfx.movie")
                .then(|| vec!["10.77.0.3".parse().unwrap(), "fd77::3".parse().unwrap()])
        };
        let allowed = |n: &HostName| {
            n.as_str() == "allowed.example" || n.as_str().ends_with(".partner.example")
        };
        let scope = Scope {
            zone: &zone,
            mesh: &mesh,
            allowed: &allowed,
        };
        plan(bytes, transport, &scope, 0xbeef)
    }

    fn reply(p: Plan) -> (Message, Outcome) {
        match p {
            Plan::Reply { bytes, outcome } => (Message::from_vec(&bytes).unwrap(), outcome),
            Plan::Forward(f) => panic!("forwarded {}", f.name),
            Plan::Drop => panic!("dropped"),
        }
    }

    #[test]
    fn mesh_names_are_answered_from_the_directory() {
        let (m, o) = reply(run(
            &query("VFX.movie.strait.internal.", RecordType::A, false),
            Transport::Udp,
        ));
        assert_eq!(o, Outcome::Mesh);
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.authoritative());
        assert_eq!(m.answers().len(), 1);
        assert_eq!(
            m.answers()[0].data(),
            &RData::A(A("10.77.0.3".parse().unwrap()))
        );
        let (m, _) = reply(run(
            &query("vfx.movie.strait.internal.", RecordType::AAAA, true),
            Transport::Udp,
        ));
        assert_eq!(
            m.answers()[0].data(),
            &RData::AAAA(AAAA("fd77::3".parse().unwrap()))
        );
        assert!(m.extensions().is_some());
        let (m, _) = reply(run(
            &query("vfx.movie.strait.internal.", RecordType::MX, false),
            Transport::Udp,
        ));
        assert_eq!(
            (m.response_code(), m.answers().len()),
            (ResponseCode::NoError, 0)
        );
        let (m, o) = reply(run(
            &query("nobody.movie.strait.internal.", RecordType::A, false),
            Transport::Udp,
        ));
        assert_eq!(
            (m.response_code(), o),
            (ResponseCode::NXDomain, Outcome::MeshUnknown)
        );
    }

    #[test]
    fn unlisted_names_are_refused_and_never_forwarded() {
        let (m, o) = reply(run(
            &query("secret-data.attacker.example.", RecordType::A, false),
            Transport::Udp,
        ));
        assert_eq!(m.response_code(), ResponseCode::Refused);
        assert_eq!(
            o,
            Outcome::NotAllowed("secret-data.attacker.example".into())
        );
        // A name that only looks like an allowed one.
        let (m, _) = reply(run(
            &query("allowed.example.attacker.example.", RecordType::A, false),
            Transport::Udp,
        ));
        assert_eq!(m.response_code(), ResponseCode::Refused);
        // A label no host name has (a space) is never forwarded either.
        let mut raw = Message::new();
        raw.add_query(Query::query(
            Name::from_labels(vec![
                b"a b".to_vec(),
                b"partner".to_vec(),
                b"example".to_vec(),
            ])
            .unwrap(),
            RecordType::A,
        ));
        let (m, _) = reply(run(&raw.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.response_code(), ResponseCode::Refused);
        // Zone transfers and other classes are not served.
        let (m, _) = reply(run(
            &query("x.partner.example.", RecordType::AXFR, false),
            Transport::Tcp,
        ));
        assert_eq!(m.response_code(), ResponseCode::Refused);
    }

    #[test]
    fn what_is_not_a_query_gets_nothing_or_an_error() {
        assert!(matches!(run(b"DNS-QUERY\n", Transport::Udp), Plan::Drop));
        assert!(matches!(run(&[], Transport::Udp), Plan::Drop));
        // A response sent to us is not answered.
        let mut r = Message::from_vec(&query("allowed.example.", RecordType::A, false)).unwrap();
        r.set_message_type(MessageType::Response);
        assert!(matches!(
            run(&r.to_vec().unwrap(), Transport::Udp),
            Plan::Drop
        ));
        // Two questions: FORMERR.
        let mut two = Message::from_vec(&query("allowed.example.", RecordType::A, false)).unwrap();
        two.add_query(Query::query(
            Name::from_ascii("x.partner.example.").unwrap(),
            RecordType::A,
        ));
        let (m, _) = reply(run(&two.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        // Another opcode: NOTIMP.
        let mut upd = Message::from_vec(&query("allowed.example.", RecordType::A, false)).unwrap();
        upd.set_op_code(OpCode::Update);
        let (m, _) = reply(run(&upd.to_vec().unwrap(), Transport::Udp));
        assert_eq!(m.response_code(), ResponseCode::NotImp);
    }

    #[test]
    fn allowed_names_are_forwarded_as_a_fresh_query() {
        let mut q = Message::from_vec(&query("Allowed.Example.", RecordType::A, true)).unwrap();
        // Whatever else the client put in does not travel: an extra record, an EDNS option's payload.
        q.add_additional(Record::from_rdata(
            Name::from_ascii("smuggled.example.").unwrap(),
            1,
            RData::A(A("192.0.2.66".parse().unwrap())),
        ));
        let Plan::Forward(p) = run(&q.to_vec().unwrap(), Transport::Udp) else {
            panic!("not forwarded");
        };
        assert_eq!(p.name.as_str(), "allowed.example");
        let up = Message::from_vec(&p.upstream).unwrap();
        assert_eq!(up.id(), 0xbeef);
        assert_eq!(up.queries().len(), 1);
        assert_eq!(up.queries()[0].name().to_ascii(), "allowed.example.");
        assert!(up.additionals().is_empty());
        assert!(!p.upstream.windows(8).any(|w| w == b"smuggled"));

        // The resolver's answer: a CNAME chain to the address, plus a record about another name.
        let mut a = up.clone();
        a.set_message_type(MessageType::Response)
            .set_recursion_available(true);
        let name = |s: &str| Name::from_ascii(s).unwrap();
        a.add_answer(Record::from_rdata(
            name("allowed.example."),
            60,
            RData::CNAME(CNAME(name("lb.cdn.example."))),
        ));
        a.add_answer(Record::from_rdata(
            name("lb.cdn.example."),
            30,
            RData::A(A("198.51.100.7".parse().unwrap())),
        ));
        a.add_answer(Record::from_rdata(
            name("other.example."),
            30,
            RData::A(A("203.0.113.9".parse().unwrap())),
        ));
        let (bytes, addrs) = finish(&p, &a.to_vec().unwrap()).unwrap();
        assert_eq!(addrs, vec![("198.51.100.7".parse().unwrap(), 30)]);
        let c = Message::from_vec(&bytes).unwrap();
        assert_eq!(c.id(), 0x1234);
        assert_eq!(
            c.queries()[0].name().to_ascii(),
            "Allowed.Example.",
            "the client's own question"
        );
        assert_eq!(c.answers().len(), 3);

        // An answer with another id or to another question is refused.
        let mut wrong = a.clone();
        wrong.set_id(1);
        assert_eq!(
            finish(&p, &wrong.to_vec().unwrap()),
            Err(AnswerError::Mismatch)
        );
        let mut other = a.clone();
        other.queries_mut()[0].set_name(name("x.partner.example."));
        assert_eq!(
            finish(&p, &other.to_vec().unwrap()),
            Err(AnswerError::Mismatch)
        );
        assert_eq!(finish(&p, b"junk"), Err(AnswerError::Malformed));
        assert_eq!(
            Message::from_vec(&p.failure()).unwrap().response_code(),
            ResponseCode::ServFail
        );
    }

    #[test]
    fn answers_too_large_for_the_client_are_truncated() {
        let Plan::Forward(p) = run(
            &query("x.partner.example.", RecordType::A, false),
            Transport::Udp,
        ) else {
            panic!("not forwarded");
        };
        let mut a = Message::from_vec(&p.upstream).unwrap();
        a.set_message_type(MessageType::Response);
        for i in 0..100u32 {
            a.add_answer(Record::from_rdata(
                Name::from_ascii("x.partner.example.").unwrap(),
                60,
                RData::A(A(std::net::Ipv4Addr::from(0x0a00_0000 + i))),
            ));
        }
        let (bytes, addrs) = finish(&p, &a.to_vec().unwrap()).unwrap();
        assert!(bytes.len() <= 512);
        let c = Message::from_vec(&bytes).unwrap();
        assert!(c.truncated(), "the client retries over TCP");
        assert_eq!(addrs.len(), 100);
    }
}
