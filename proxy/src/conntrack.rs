//! One conntrack query over ctnetlink: the client's address before NAT, for a connection the proxy
//! accepted after an nftables `redirect`. Only asked when the socket lookup by the address the proxy sees
//! finds nothing (NAT changed the source port; see [`crate::sockets::client_uid`]), so it is off the fast
//! path. Messages are built and parsed as bytes: a request is ~80 bytes of nested attributes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::sockets::netlink_roundtrip;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
/// Attribute type bits (without the nested / byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one attribute; `body` builds its payload (nested attributes or a value).
fn attr(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    out.resize(start + align4(len as usize), 0);
}

/// The CT_GET request for the `protocol` (TCP or UDP) flow whose reply tuple is `from` → `to`.
fn request(protocol: u8, from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let family = if from.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut m = vec![0u8; NLMSG_HDRLEN];
    // nfgenmsg: family, version 0, resource id 0.
    m.extend_from_slice(&[family as u8, 0, 0, 0]);
    attr(&mut m, CTA_TUPLE_REPLY | NLA_F_NESTED, |t| {
        attr(t, CTA_TUPLE_IP | NLA_F_NESTED, |ip| {
            match (from.ip(), to.ip()) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    attr(ip, CTA_IP_V4_SRC, |v| v.extend_from_slice(&a.octets()));
                    attr(ip, CTA_IP_V4_DST, |v| v.extend_from_slice(&b.octets()));
                }
                (a, b) => {
                    let v6 = |x: IpAddr| match x {
                        IpAddr::V6(v) => v.octets(),
                        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                    };
                    attr(ip, CTA_IP_V6_SRC, |v| v.extend_from_slice(&v6(a)));
                    attr(ip, CTA_IP_V6_DST, |v| v.extend_from_slice(&v6(b)));
                }
            }
        });
        attr(t, CTA_TUPLE_PROTO | NLA_F_NESTED, |p| {
            attr(p, CTA_PROTO_NUM, |v| v.push(protocol));
            attr(p, CTA_PROTO_SRC_PORT, |v| {
                v.extend_from_slice(&from.port().to_be_bytes())
            });
            attr(p, CTA_PROTO_DST_PORT, |v| {
                v.extend_from_slice(&to.port().to_be_bytes())
            });
        });
    });
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

/// The attributes in `data`: (type without flags, payload). Stops at the first malformed one.
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, payload))
    })
}

fn find(data: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(data).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// The original direction's (source, destination) in a ctnetlink answer: the client's address before
/// NAT and where it sent to.
pub fn parse_original_tuple(answer: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let len = (u32::from_ne_bytes(answer.get(0..4)?.try_into().ok()?) as usize).min(answer.len());
    let body = answer.get(NLMSG_HDRLEN + NFGENMSG_LEN..len)?;
    let orig = find(body, CTA_TUPLE_ORIG)?;
    let ip = find(orig, CTA_TUPLE_IP)?;
    let (src, dst) = if let (Some(s), Some(d)) = (find(ip, CTA_IP_V4_SRC), find(ip, CTA_IP_V4_DST))
    {
        (
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(s).ok()?)),
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?)),
        )
    } else {
        (
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(find(ip, CTA_IP_V6_SRC)?).ok()?,
            )),
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(find(ip, CTA_IP_V6_DST)?).ok()?,
            )),
        )
    };
    let proto = find(orig, CTA_TUPLE_PROTO)?;
    let port = |kind| Some(u16::from_be_bytes(find(proto, kind)?.try_into().ok()?));
    Some((
        SocketAddr::new(src, port(CTA_PROTO_SRC_PORT)?),
        SocketAddr::new(dst, port(CTA_PROTO_DST_PORT)?),
    ))
}

/// The original (source, destination) of the `protocol` flow the proxy sees as `peer` → `local`;
/// `None` when conntrack has no such flow.
pub fn original_tuple(
    protocol: u8,
    local: SocketAddr,
    peer: SocketAddr,
) -> io::Result<Option<(SocketAddr, SocketAddr)>> {
    // The reply direction runs from the redirect target (the proxy) to the (translated) client.
    let req = request(protocol, local, peer);
    let mut buf = [0u8; 4096];
    match netlink_roundtrip(NETLINK_NETFILTER, &req, &mut buf)? {
        None => Ok(None),
        Some(n) => parse_original_tuple(&buf[..n])
            .map(Some)
            .ok_or_else(|| io::Error::other("conntrack answer without an original tuple")),
    }
}

/// The client's address before NAT for the TCP connection the proxy sees as `peer` → `local`.
pub fn original_source(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<SocketAddr>> {
    Ok(original_tuple(libc::IPPROTO_TCP as u8, local, peer)?.map(|(src, _)| src))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as the kernel shapes it: header, nfgenmsg, then the original tuple among others.
    fn answer(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let mut m = request(6, dst, src);
        // Turn the request's reply tuple into an original tuple src → dst, and add a status attribute.
        m.truncate(NLMSG_HDRLEN + NFGENMSG_LEN);
        attr(&mut m, 3, |v| v.extend_from_slice(&8u32.to_be_bytes()));
        attr(&mut m, CTA_TUPLE_ORIG | NLA_F_NESTED, |t| {
            attr(t, CTA_TUPLE_IP | NLA_F_NESTED, |ip| {
                match (src.ip(), dst.ip()) {
                    (IpAddr::V4(a), IpAddr::V4(b)) => {
                        attr(ip, CTA_IP_V4_SRC, |v| v.extend_from_slice(&a.octets()));
                        attr(ip, CTA_IP_V4_DST, |v| v.extend_from_slice(&b.octets()));
                    }
                    (IpAddr::V6(a), IpAddr::V6(b)) => {
                        attr(ip, CTA_IP_V6_SRC, |v| v.extend_from_slice(&a.octets()));
                        attr(ip, CTA_IP_V6_DST, |v| v.extend_from_slice(&b.octets()));
                    }
                    _ => unreachable!(),
                }
            });
            attr(t, CTA_TUPLE_PROTO | NLA_F_NESTED, |p| {
                attr(p, CTA_PROTO_NUM, |v| v.push(6));
                attr(p, CTA_PROTO_SRC_PORT, |v| {
                    v.extend_from_slice(&src.port().to_be_bytes())
                });
                attr(p, CTA_PROTO_DST_PORT, |v| {
                    v.extend_from_slice(&dst.port().to_be_bytes())
                });
            });
        });
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn the_request_is_aligned_and_names_the_reply_tuple() {
        let r = request(
            17,
            "127.0.0.1:15001".parse().unwrap(),
            "10.0.0.2:5005".parse().unwrap(),
        );
        assert_eq!(r.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        let body = &r[NLMSG_HDRLEN + NFGENMSG_LEN..];
        let reply = find(body, CTA_TUPLE_REPLY).unwrap();
        let proto = find(reply, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(
            find(proto, CTA_PROTO_SRC_PORT).unwrap(),
            15001u16.to_be_bytes()
        );
        assert_eq!(
            find(proto, CTA_PROTO_DST_PORT).unwrap(),
            5005u16.to_be_bytes()
        );
        assert_eq!(find(proto, CTA_PROTO_NUM).unwrap(), [17]);
        let ip = find(reply, CTA_TUPLE_IP).unwrap();
        assert_eq!(find(ip, CTA_IP_V4_DST).unwrap(), [10, 0, 0, 2]);
    }

    #[test]
    fn the_original_tuple_is_read_back_over_ipv4_and_ipv6() {
        for (src, dst) in [
            ("10.0.0.2:41234", "10.0.0.3:5002"),
            ("[fd00::2]:41234", "[fd00::3]:5002"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            assert_eq!(parse_original_tuple(&answer(src, dst)), Some((src, dst)));
        }
    }

    #[test]
    fn truncated_or_garbled_answers_are_none_not_a_panic() {
        let a = answer(
            "10.0.0.2:41234".parse().unwrap(),
            "10.0.0.3:5002".parse().unwrap(),
        );
        for cut in 0..a.len() {
            let mut b = a[..cut].to_vec();
            if b.len() >= 4 {
                b[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            assert_eq!(parse_original_tuple(&b), None, "cut at {cut}");
        }
        let mut bad = a.clone();
        // An attribute length pointing past the end.
        bad[NLMSG_HDRLEN + NFGENMSG_LEN] = 0xff;
        assert_eq!(parse_original_tuple(&bad), None);
    }
}
