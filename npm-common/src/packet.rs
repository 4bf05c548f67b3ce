//! Reading a frame: what the programs know of a packet before any map is consulted.
//!
//! [`classify_frame`] turns an Ethernet frame into a [`Packet`] (or says it is ARP, another
//! ethertype, or malformed IPv4). It reads through the [`Frame`] trait, which the eBPF
//! programs implement over the skb (`bpf_skb_load_bytes`) and the host over a byte slice, so
//! the fuzzer can hold the kernel's verdicts to the host's on the same bytes.
//!
//! Nothing here trusts the packet: every length is checked against the frame and the IPv4
//! header's own lengths, and a transport header that cannot be read is reported as such
//! ([`Kind::Truncated`]), to be dropped at an isolated endpoint.

use crate::{DIR_EGRESS, DIR_INGRESS};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

/// Bytes of a frame, read at offsets (link-layer header included).
pub trait Frame {
    /// The frame's length.
    fn frame_len(&self) -> usize;
    /// `size_of::<T>()` bytes at `offset`, as they are in the frame; `None` past its end.
    fn load<T: bytemuck::Pod>(&self, offset: usize) -> Option<T>;

    fn u8_at(&self, offset: usize) -> Option<u8> {
        self.load::<u8>(offset)
    }

    /// A big-endian (network order) 16-bit field, in host order.
    fn be16_at(&self, offset: usize) -> Option<u16> {
        self.load::<[u8; 2]>(offset).map(u16::from_be_bytes)
    }

    fn addr_at(&self, offset: usize) -> Option<[u8; 4]> {
        self.load::<[u8; 4]>(offset)
    }
}

impl Frame for [u8] {
    fn frame_len(&self) -> usize {
        self.len()
    }

    fn load<T: bytemuck::Pod>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        self.get(offset..end).map(bytemuck::pod_read_unaligned)
    }
}

/// What the programs know of an IPv4 packet after parsing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    /// Ports (host order) for TCP, UDP and SCTP; for ICMP echo the identifier (as the source
    /// port of a request and the destination port of a reply, so a reply's reversed key is
    /// its request's); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
}

pub fn other_direction(dir: u8) -> u8 {
    if dir == DIR_INGRESS { DIR_EGRESS } else { DIR_INGRESS }
}

/// What the transport header says, as far as policy and connection tracking care.
///
/// (Enums here carry no data, and parsed values are plain structs with every field set: the
/// BPF verifier refuses programs that copy the undefined payload of an enum variant.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// TCP with flags that a valid segment can carry (the kernel's `tcp_valid_flags`), in
    /// [`Packet::tcp_flags`].
    Tcp,
    /// TCP with flags no valid segment carries (SYN+FIN, SYN+RST, no flags, FIN+PSH+URG…):
    /// conntrack calls it INVALID. Judged by policy, never tracked.
    TcpInvalid,
    /// TCP, UDP or SCTP whose ports (or TCP flags) cannot be read.
    Truncated,
    IcmpEchoRequest,
    IcmpEchoReply,
    /// An ICMP error quoting a packet of the flow in [`Packet::quoted`] (as it was sent).
    IcmpError,
    /// UDP, SCTP, other ICMP messages, other protocols.
    #[default]
    Other,
}

/// Whether a datagram is whole, the first fragment, or a later one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FragmentKind {
    #[default]
    Whole,
    First,
    Later,
}

/// Whether a packet is an IPv4 fragment, and whether it is the first one.
pub fn fragment_kind(frag_off_field: u16) -> FragmentKind {
    let more = frag_off_field & 0x2000 != 0;
    let offset = frag_off_field & 0x1fff;
    match (offset, more) {
        (0, false) => FragmentKind::Whole,
        (0, true) => FragmentKind::First,
        _ => FragmentKind::Later,
    }
}

/// A parsed IPv4 packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// Addresses, protocol and ports (a later fragment's ports are 0 until its first
    /// fragment's are looked up).
    pub flow: Flow,
    pub kind: Kind,
    /// The TCP flags of a [`Kind::Tcp`] segment.
    pub tcp_flags: u8,
    /// The flow an [`Kind::IcmpError`] quotes.
    pub quoted: Flow,
    pub fragment: FragmentKind,
    /// The IPv4 identification, which ties fragments together.
    pub ip_id: u16,
}

impl Packet {
    pub fn has_ports(&self) -> bool {
        matches!(self.flow.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    }

    /// A TCP segment that opens a connection (SYN without ACK): always decided by policy.
    pub fn is_syn(&self) -> bool {
        self.kind == Kind::Tcp && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// What a frame is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FrameKind {
    /// IPv4, read into [`Parsed::packet`].
    Ipv4,
    /// An IPv4 header that is truncated or inconsistent (the stack would drop it too).
    #[default]
    Malformed,
    Arp,
    /// IPv6 and every other ethertype (not enforced by this version).
    Other,
}

/// A frame, read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub frame: FrameKind,
    /// The packet of an IPv4 frame (all zero otherwise).
    pub packet: Packet,
}

impl Parsed {
    pub fn ipv4(packet: Packet) -> Self {
        Parsed { frame: FrameKind::Ipv4, packet }
    }

    fn other(frame: FrameKind) -> Self {
        Parsed { frame, packet: Packet::default() }
    }
}

/// The kernel's table of valid TCP flag combinations (`tcp_valid_flags`, ECE, CWR and PSH
/// ignored).
pub fn tcp_flags_valid(flags: u8) -> bool {
    let f = flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG);
    matches!(
        f,
        TCP_SYN
            | 0x22 // SYN|URG
            | 0x12 // SYN|ACK
            | TCP_RST
            | 0x14 // RST|ACK
            | 0x11 // FIN|ACK
            | 0x31 // FIN|ACK|URG
            | TCP_ACK
            | 0x30 // ACK|URG
    )
}

/// The fixed fields of an IPv4 header at `off`.
struct Ipv4Header {
    ihl: usize,
    total_len: usize,
    frag: u16,
    id: u16,
    protocol: u8,
    src: [u8; 4],
    dst: [u8; 4],
}

#[inline(always)]
fn ipv4_header<F: Frame + ?Sized>(f: &F, off: usize) -> Option<Ipv4Header> {
    let vihl = f.u8_at(off)?;
    let h = Ipv4Header {
        ihl: ((vihl & 0x0f) as usize) * 4,
        total_len: f.be16_at(off + 2)? as usize,
        id: f.be16_at(off + 4)?,
        frag: f.be16_at(off + 6)?,
        protocol: f.u8_at(off + 9)?,
        src: f.addr_at(off + 12)?,
        dst: f.addr_at(off + 16)?,
    };
    (vihl >> 4 == 4 && h.ihl >= 20).then_some(h)
}

/// Reads a frame.
#[inline(always)]
pub fn classify_frame<F: Frame + ?Sized>(f: &F) -> Parsed {
    match f.be16_at(12) {
        Some(ETH_P_IP) => {}
        Some(ETH_P_ARP) => return Parsed::other(FrameKind::Arp),
        Some(_) => return Parsed::other(FrameKind::Other),
        None => return Parsed::other(FrameKind::Malformed),
    }
    let Some(h) = ipv4_header(f, ETH_HLEN) else {
        return Parsed::other(FrameKind::Malformed);
    };
    if h.total_len < h.ihl || f.frame_len() < ETH_HLEN + h.total_len {
        return Parsed::other(FrameKind::Malformed);
    }
    let mut flow = Flow { src: h.src, dst: h.dst, protocol: h.protocol, sport: 0, dport: 0 };
    let fragment = fragment_kind(h.frag);
    let mut packet = Packet { flow, fragment, ip_id: h.id, ..Packet::default() };
    if fragment == FragmentKind::Later {
        // No transport header: the ports are those of the first fragment.
        return Parsed::ipv4(packet);
    }
    let l4 = ETH_HLEN + h.ihl;
    // What the datagram holds past its IP header (the frame may carry padding beyond it).
    let l4_len = h.total_len - h.ihl;
    packet.kind = match h.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports = if l4_len >= 4 { f.be16_at(l4).zip(f.be16_at(l4 + 2)) } else { None };
            match ports {
                None => Kind::Truncated,
                Some((sport, dport)) => {
                    flow.sport = sport;
                    flow.dport = dport;
                    if h.protocol != IPPROTO_TCP {
                        Kind::Other
                    } else {
                        match f.u8_at(l4 + 13).filter(|_| l4_len >= 14) {
                            None => Kind::Truncated,
                            Some(flags) if tcp_flags_valid(flags) => {
                                packet.tcp_flags = flags;
                                Kind::Tcp
                            }
                            Some(_) => Kind::TcpInvalid,
                        }
                    }
                }
            }
        }
        IPPROTO_ICMP => icmp(f, l4, l4_len, &mut flow, &mut packet.quoted),
        _ => Kind::Other,
    };
    packet.flow = flow;
    Parsed::ipv4(packet)
}

/// An ICMP message at `l4`: echo (the identifier stands for ports) or an error quoting a
/// packet (its IPv4 header and the first 8 bytes of its payload, which hold the ports).
#[inline(always)]
fn icmp<F: Frame + ?Sized>(
    f: &F,
    l4: usize,
    l4_len: usize,
    flow: &mut Flow,
    quoted: &mut Flow,
) -> Kind {
    let Some(ty) = f.u8_at(l4).filter(|_| l4_len >= 8) else {
        return Kind::Other;
    };
    match ty {
        ICMP_ECHO | ICMP_ECHO_REPLY => {
            let Some(id) = f.be16_at(l4 + 4) else {
                return Kind::Other;
            };
            if ty == ICMP_ECHO {
                flow.sport = id;
                Kind::IcmpEchoRequest
            } else {
                flow.dport = id;
                Kind::IcmpEchoReply
            }
        }
        ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_REDIRECT | ICMP_TIME_EXCEEDED
        | ICMP_PARAMETER_PROB => {
            let inner = l4 + 8;
            let Some(h) = ipv4_header(f, inner) else {
                return Kind::Other;
            };
            // The quoted packet must fit in the message as the outer header sizes it.
            if l4_len < 8 + h.ihl + 8 {
                return Kind::Other;
            }
            *quoted = Flow { src: h.src, dst: h.dst, protocol: h.protocol, sport: 0, dport: 0 };
            let at = inner + h.ihl;
            match h.protocol {
                IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
                    let (Some(sport), Some(dport)) = (f.be16_at(at), f.be16_at(at + 2)) else {
                        return Kind::Other;
                    };
                    quoted.sport = sport;
                    quoted.dport = dport;
                }
                // An error about an echo request: its identifier, as the request's key has it.
                IPPROTO_ICMP if f.u8_at(at) == Some(ICMP_ECHO) => {
                    quoted.sport = f.be16_at(at + 4).unwrap_or(0)
                }
                _ => {}
            }
            Kind::IcmpError
        }
        _ => Kind::Other,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;

    fn ipv4(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p.extend_from_slice(&ip);
        p.extend_from_slice(l4);
        p
    }

    fn tcp_flags(flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&1234u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        ipv4(IPPROTO_TCP, &t)
    }

    fn packet(frame: &[u8]) -> Packet {
        let parsed = classify_frame(frame);
        assert_eq!(parsed.frame, FrameKind::Ipv4, "not a packet: {parsed:?}");
        parsed.packet
    }

    #[test]
    fn tcp_flags_as_the_kernel_judges_them() {
        for (flags, valid) in [
            (TCP_SYN, true),
            (TCP_SYN | TCP_ACK, true),
            (TCP_ACK | TCP_PSH, true),
            (TCP_FIN | TCP_ACK, true),
            (TCP_RST, true),
            (TCP_SYN | TCP_FIN, false),
            (TCP_SYN | TCP_RST, false),
            (TCP_FIN | TCP_PSH | TCP_URG, false),
            (0, false),
            (TCP_FIN, false),
        ] {
            assert_eq!(tcp_flags_valid(flags), valid, "flags {flags:#x}");
            let p = packet(&tcp_flags(flags));
            assert_eq!(p.kind, if valid { Kind::Tcp } else { Kind::TcpInvalid });
            assert_eq!(p.tcp_flags, if valid { flags } else { 0 });
            assert_eq!((p.flow.sport, p.flow.dport), (1234, 80));
        }
        assert!(packet(&tcp_flags(TCP_SYN)).is_syn());
        assert!(!packet(&tcp_flags(TCP_SYN | TCP_ACK)).is_syn());
    }

    #[test]
    fn truncated_transport_headers() {
        // Two bytes of TCP: no destination port.
        let mut f = tcp_flags(TCP_SYN);
        f.truncate(ETH_HLEN + 22);
        f[16..18].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(packet(&f).kind, Kind::Truncated);
        // Ports but no flags.
        let mut f = tcp_flags(TCP_SYN);
        f[16..18].copy_from_slice(&30u16.to_be_bytes());
        assert_eq!(
            packet(&f).kind,
            Kind::Truncated,
            "the datagram's length counts, not the frame's"
        );
    }

    #[test]
    fn malformed_headers() {
        let good = tcp_flags(TCP_SYN);
        for (at, byte) in [(ETH_HLEN, 0x55u8), (ETH_HLEN, 0x44), (ETH_HLEN, 0x4f)] {
            let mut f = good.clone();
            f[at] = byte;
            assert_eq!(classify_frame(&f[..]).frame, FrameKind::Malformed);
        }
        let mut f = good.clone();
        f[16..18].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(
            classify_frame(&f[..]).frame,
            FrameKind::Malformed,
            "total length past the frame"
        );
        assert_eq!(classify_frame(&good[..10]).frame, FrameKind::Malformed);
    }

    #[test]
    fn icmp_errors_quote_their_flow() {
        // Port unreachable about UDP 10.0.0.2:5353 -> 10.0.0.1:9.
        let mut quoted = ipv4(IPPROTO_UDP, &[0x14, 0xe9, 0, 9, 0, 8, 0, 0])[ETH_HLEN..].to_vec();
        quoted[12..16].copy_from_slice(&[10, 0, 0, 2]);
        quoted[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let mut msg = vec![3, 3, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&quoted);
        let p = packet(&ipv4(IPPROTO_ICMP, &msg));
        assert_eq!(p.kind, Kind::IcmpError);
        assert_eq!(
            p.quoted,
            Flow {
                src: [10, 0, 0, 2],
                dst: [10, 0, 0, 1],
                protocol: IPPROTO_UDP,
                sport: 5353,
                dport: 9
            }
        );
        // Cut inside the quoted ports: not an error the programs can attribute.
        let short = &msg[..8 + 20 + 2];
        assert_eq!(packet(&ipv4(IPPROTO_ICMP, short)).kind, Kind::Other);
    }

    #[test]
    fn echo_identifiers_pair_requests_and_replies() {
        let req = packet(&ipv4(IPPROTO_ICMP, &[8, 0, 0, 0, 0, 7, 0, 1]));
        assert_eq!(req.kind, Kind::IcmpEchoRequest);
        let rep = packet(&ipv4(IPPROTO_ICMP, &[0, 0, 0, 0, 0, 7, 0, 1]));
        assert_eq!(rep.kind, Kind::IcmpEchoReply);
        // A reply travels the other way: its ports are the request's, reversed.
        assert_eq!((rep.flow.sport, rep.flow.dport), (req.flow.dport, req.flow.sport));
    }

    #[test]
    fn later_fragments_carry_no_ports() {
        let mut f = ipv4(IPPROTO_UDP, &[0xaa; 16]);
        f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&3u16.to_be_bytes());
        let p = packet(&f);
        assert_eq!(p.fragment, FragmentKind::Later);
        assert_eq!((p.flow.sport, p.flow.dport), (0, 0));
    }
}
