//! Reading a frame: what the programs know of a packet before any map is consulted.
//!
//! [`classify_frame`] turns an Ethernet frame into a [`Packet`] of either family (or says it
//! is ARP, another ethertype, or malformed). It reads through the [`Frame`] trait, which the
//! eBPF programs implement over the skb (`bpf_skb_load_bytes`) and the host over a byte
//! slice, so the fuzzer can hold the kernel's verdicts to the host's on the same bytes.
//!
//! Nothing here trusts the packet: every length is checked against the frame and the IP
//! header's own lengths, and a transport header that cannot be read is reported as such
//! ([`Kind::Truncated`]), to be dropped at an isolated endpoint.
//!
//! IPv6: the extension-header chain is walked for at most [`MAX_EXT_HEADERS`] headers; a
//! longer chain, a hop-by-hop header anywhere but first, a routing header with segments left
//! (the destination is not the final one), a fragment header whose fragmentable part starts
//! with another extension header, and IPv4-mapped addresses (which would read as IPv4 keys)
//! are malformed. Neighbour discovery and MLD with the hop limit only the link itself can give
//! (RFC 4861, 2710) are [`Kind::Neighbor`]: passed as ARP is.

use crate::{Addr, DIR_EGRESS, DIR_INGRESS, is_v4_mapped, v4_mapped};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
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

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_MLD_QUERY: u8 = 130;
const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_MLD_DONE: u8 = 132;
pub const ICMPV6_ROUTER_SOLICIT: u8 = 133;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
const ICMPV6_REDIRECT: u8 = 137;
const ICMPV6_MLD2_REPORT: u8 = 143;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;

/// Extension headers walked before the upper-layer header; a packet with more is malformed.
pub const MAX_EXT_HEADERS: usize = 8;
const IPV6_HLEN: usize = 40;

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

    /// An IPv4 address, mapped (see [`crate::Addr`]).
    fn addr4_at(&self, offset: usize) -> Option<Addr> {
        self.load::<[u8; 4]>(offset).map(v4_mapped)
    }

    fn addr6_at(&self, offset: usize) -> Option<Addr> {
        self.load::<Addr>(offset)
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

/// What the programs know of an IP packet after parsing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Addresses of either family, as the maps key them.
    pub src: Addr,
    pub dst: Addr,
    /// The upper-layer protocol (for IPv6, past the extension headers).
    pub protocol: u8,
    /// Ports (host order) for TCP, UDP and SCTP; for ICMP echo the identifier (as the source
    /// port of a request and the destination port of a reply, so a reply's reversed key is
    /// its request's); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// Whether the flow is IPv6.
    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        !is_v4_mapped(&self.src)
    }
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
    /// ICMP or ICMPv6 echo request.
    IcmpEchoRequest,
    IcmpEchoReply,
    /// An ICMP or ICMPv6 error quoting a packet of the flow in [`Packet::quoted`] (as it was
    /// sent).
    IcmpError,
    /// IPv6 neighbour discovery (router and neighbour solicitations and advertisements,
    /// redirects) with hop limit 255, or MLD with hop limit 1: messages of the link itself,
    /// as ARP is for IPv4.
    Neighbor,
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

/// Whether a packet is a fragment, and whether it is the first one, from its offset (in
/// 8-byte units) and more-fragments flag.
pub fn fragment_of(offset: u16, more: bool) -> FragmentKind {
    match (offset, more) {
        (0, false) => FragmentKind::Whole,
        (0, true) => FragmentKind::First,
        _ => FragmentKind::Later,
    }
}

/// Whether an IPv4 packet is a fragment, from its flags and fragment offset field.
pub fn fragment_kind(frag_off_field: u16) -> FragmentKind {
    fragment_of(frag_off_field & 0x1fff, frag_off_field & 0x2000 != 0)
}

/// A parsed IP packet.
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
    /// The identification that ties fragments together (IPv4's 16 bits, IPv6's 32).
    pub ip_id: u32,
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
    /// IPv4 or IPv6, read into [`Parsed::packet`].
    Ip,
    /// An IP header that is truncated or inconsistent, or an IPv6 packet this reader refuses
    /// (see the module's documentation).
    #[default]
    Malformed,
    Arp,
    /// Every other ethertype.
    Other,
}

/// A frame, read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub frame: FrameKind,
    /// The packet of an IP frame (all zero otherwise).
    pub packet: Packet,
}

impl Parsed {
    pub fn ip(packet: Packet) -> Self {
        Parsed { frame: FrameKind::Ip, packet }
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
    src: Addr,
    dst: Addr,
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
        src: f.addr4_at(off + 12)?,
        dst: f.addr4_at(off + 16)?,
    };
    (vihl >> 4 == 4 && h.ihl >= 20).then_some(h)
}

/// The fixed fields of an IPv6 header at `off`.
struct Ipv6Header {
    payload_len: usize,
    next: u8,
    hop_limit: u8,
    src: Addr,
    dst: Addr,
}

#[inline(always)]
fn ipv6_header<F: Frame + ?Sized>(f: &F, off: usize) -> Option<Ipv6Header> {
    let v = f.u8_at(off)?;
    let h = Ipv6Header {
        payload_len: f.be16_at(off + 4)? as usize,
        next: f.u8_at(off + 6)?,
        hop_limit: f.u8_at(off + 7)?,
        src: f.addr6_at(off + 8)?,
        dst: f.addr6_at(off + 24)?,
    };
    (v >> 4 == 6).then_some(h)
}

/// Reads a frame.
#[inline(always)]
pub fn classify_frame<F: Frame + ?Sized>(f: &F) -> Parsed {
    match f.be16_at(12) {
        Some(ETH_P_IP) => classify_ipv4(f),
        Some(ETH_P_IPV6) => classify_ipv6(f),
        Some(ETH_P_ARP) => Parsed::other(FrameKind::Arp),
        Some(_) => Parsed::other(FrameKind::Other),
        None => Parsed::other(FrameKind::Malformed),
    }
}

#[inline(always)]
fn classify_ipv4<F: Frame + ?Sized>(f: &F) -> Parsed {
    let Some(h) = ipv4_header(f, ETH_HLEN) else {
        return Parsed::other(FrameKind::Malformed);
    };
    if h.total_len < h.ihl || f.frame_len() < ETH_HLEN + h.total_len {
        return Parsed::other(FrameKind::Malformed);
    }
    let flow = Flow { src: h.src, dst: h.dst, protocol: h.protocol, sport: 0, dport: 0 };
    let fragment = fragment_kind(h.frag);
    let mut packet = Packet { flow, fragment, ip_id: h.id as u32, ..Packet::default() };
    if fragment != FragmentKind::Later {
        // What the datagram holds past its IP header (the frame may carry padding beyond it).
        transport(f, ETH_HLEN + h.ihl, h.total_len - h.ihl, 0, &mut packet);
    }
    // (A later fragment has no transport header: its ports are those of the first fragment.)
    Parsed::ip(packet)
}

#[inline(always)]
fn classify_ipv6<F: Frame + ?Sized>(f: &F) -> Parsed {
    let malformed = Parsed::other(FrameKind::Malformed);
    let Some(h) = ipv6_header(f, ETH_HLEN) else {
        return malformed;
    };
    let end = ETH_HLEN + IPV6_HLEN + h.payload_len;
    if f.frame_len() < end || is_v4_mapped(&h.src) || is_v4_mapped(&h.dst) {
        return malformed;
    }
    let mut packet = Packet::default();
    let mut next = h.next;
    let mut at = ETH_HLEN + IPV6_HLEN;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        let len = match next {
            NEXTHDR_HOP if walked > 0 => return malformed,
            NEXTHDR_HOP | NEXTHDR_DEST | NEXTHDR_ROUTING | NEXTHDR_MOBILITY | NEXTHDR_HIP
            | NEXTHDR_SHIM6 => {
                let Some(n) = f.u8_at(at + 1) else { return malformed };
                // A routing header with segments left: the packet is not at its destination.
                if next == NEXTHDR_ROUTING && f.u8_at(at + 3) != Some(0) {
                    return malformed;
                }
                (n as usize + 1) * 8
            }
            NEXTHDR_AUTH => {
                let Some(n) = f.u8_at(at + 1) else { return malformed };
                (n as usize + 2) * 4
            }
            NEXTHDR_FRAGMENT => {
                let (Some(field), Some(id)) = (f.be16_at(at + 2), f.load::<[u8; 4]>(at + 4)) else {
                    return malformed;
                };
                packet.fragment = fragment_of(field >> 3, field & 1 != 0);
                packet.ip_id = u32::from_be_bytes(id);
                8
            }
            _ => break,
        };
        let Some(n) = f.u8_at(at) else { return malformed };
        // Fragments must carry the upper layer right away: its protocol ties them together.
        if next == NEXTHDR_FRAGMENT && packet.fragment != FragmentKind::Whole && is_ext_header(n) {
            return malformed;
        }
        next = n;
        at += len;
        if at > end {
            return malformed;
        }
        walked += 1;
        if packet.fragment == FragmentKind::Later {
            break;
        }
    }
    if is_ext_header(next) && packet.fragment != FragmentKind::Later {
        return malformed;
    }
    packet.flow = Flow { src: h.src, dst: h.dst, protocol: next, sport: 0, dport: 0 };
    if packet.fragment != FragmentKind::Later {
        transport(f, at, end - at, h.hop_limit, &mut packet);
    }
    Parsed::ip(packet)
}

#[inline(always)]
fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        NEXTHDR_HOP
            | NEXTHDR_DEST
            | NEXTHDR_ROUTING
            | NEXTHDR_FRAGMENT
            | NEXTHDR_AUTH
            | NEXTHDR_MOBILITY
            | NEXTHDR_HIP
            | NEXTHDR_SHIM6
    )
}

/// Reads the transport header at `l4` (`l4_len` bytes of the datagram are left) into the
/// packet's ports and kind. `hop_limit` is IPv6's (0 for IPv4).
#[inline(always)]
fn transport<F: Frame + ?Sized>(f: &F, l4: usize, l4_len: usize, hop_limit: u8, p: &mut Packet) {
    let protocol = p.flow.protocol;
    p.kind = match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let ports = if l4_len >= 4 { f.be16_at(l4).zip(f.be16_at(l4 + 2)) } else { None };
            match ports {
                None => Kind::Truncated,
                Some((sport, dport)) => {
                    p.flow.sport = sport;
                    p.flow.dport = dport;
                    if protocol != IPPROTO_TCP {
                        Kind::Other
                    } else {
                        match f.u8_at(l4 + 13).filter(|_| l4_len >= 14) {
                            None => Kind::Truncated,
                            Some(flags) if tcp_flags_valid(flags) => {
                                p.tcp_flags = flags;
                                Kind::Tcp
                            }
                            Some(_) => Kind::TcpInvalid,
                        }
                    }
                }
            }
        }
        IPPROTO_ICMP if !p.flow.is_v6() => icmp(f, l4, l4_len, &mut p.flow, &mut p.quoted),
        IPPROTO_ICMPV6 if p.flow.is_v6() => {
            icmpv6(f, l4, l4_len, hop_limit, &mut p.flow, &mut p.quoted)
        }
        _ => Kind::Other,
    };
}

/// The ports of a quoted packet's transport header at `at`, or an echo request's identifier.
#[inline(always)]
fn quoted_ports<F: Frame + ?Sized>(f: &F, at: usize, quoted: &mut Flow) -> bool {
    match quoted.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let (Some(sport), Some(dport)) = (f.be16_at(at), f.be16_at(at + 2)) else {
                return false;
            };
            quoted.sport = sport;
            quoted.dport = dport;
        }
        // An error about an echo request: its identifier, as the request's key has it.
        IPPROTO_ICMP if f.u8_at(at) == Some(ICMP_ECHO) => {
            quoted.sport = f.be16_at(at + 4).unwrap_or(0)
        }
        IPPROTO_ICMPV6 if f.u8_at(at) == Some(ICMPV6_ECHO_REQUEST) => {
            quoted.sport = f.be16_at(at + 4).unwrap_or(0)
        }
        _ => {}
    }
    true
}

/// An echo request or reply (ICMP or ICMPv6) at `l4`: its identifier stands for ports, as the
/// source port of a request and the destination port of a reply.
#[inline(always)]
fn echo<F: Frame + ?Sized>(f: &F, l4: usize, request: bool, flow: &mut Flow) -> Kind {
    let Some(id) = f.be16_at(l4 + 4) else {
        return Kind::Other;
    };
    if request {
        flow.sport = id;
        Kind::IcmpEchoRequest
    } else {
        flow.dport = id;
        Kind::IcmpEchoReply
    }
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
        ICMP_ECHO | ICMP_ECHO_REPLY => echo(f, l4, ty == ICMP_ECHO, flow),
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
            if !quoted_ports(f, inner + h.ihl, quoted) {
                return Kind::Other;
            }
            Kind::IcmpError
        }
        _ => Kind::Other,
    }
}

/// An ICMPv6 message at `l4`: echo, an error quoting a packet (its IPv6 header and the first
/// bytes of its payload; a quoted packet with extension headers is not attributed), or a
/// message of the link (neighbour discovery, MLD) when its hop limit says it did not cross a
/// router.
#[inline(always)]
fn icmpv6<F: Frame + ?Sized>(
    f: &F,
    l4: usize,
    l4_len: usize,
    hop_limit: u8,
    flow: &mut Flow,
    quoted: &mut Flow,
) -> Kind {
    let Some(ty) = f.u8_at(l4).filter(|_| l4_len >= 8) else {
        return Kind::Other;
    };
    match ty {
        ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY => echo(f, l4, ty == ICMPV6_ECHO_REQUEST, flow),
        ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB => {
            let inner = l4 + 8;
            let Some(h) = ipv6_header(f, inner) else {
                return Kind::Other;
            };
            if l4_len < 8 + IPV6_HLEN + 8 || is_v4_mapped(&h.src) || is_v4_mapped(&h.dst) {
                return Kind::Other;
            }
            *quoted = Flow { src: h.src, dst: h.dst, protocol: h.next, sport: 0, dport: 0 };
            if !quoted_ports(f, inner + IPV6_HLEN, quoted) {
                return Kind::Other;
            }
            Kind::IcmpError
        }
        ICMPV6_ROUTER_SOLICIT..=ICMPV6_REDIRECT if hop_limit == 255 => Kind::Neighbor,
        ICMPV6_MLD_QUERY | ICMPV6_MLD_REPORT | ICMPV6_MLD_DONE | ICMPV6_MLD2_REPORT
            if hop_limit == 1 =>
        {
            Kind::Neighbor
        }
        _ => Kind::Other,
    }
}

/// Whether an IPv6 address is link-local unicast (`fe80::/10`) or multicast (`ff00::/8`):
/// an address no router forwards a neighbour-discovery message to.
#[inline(always)]
pub fn is_link_scope(a: &Addr) -> bool {
    a[0] == 0xff || (a[0] == 0xfe && a[1] & 0xc0 == 0x80)
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
        assert_eq!(parsed.frame, FrameKind::Ip, "not a packet: {parsed:?}");
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
                src: v4_mapped([10, 0, 0, 2]),
                dst: v4_mapped([10, 0, 0, 1]),
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

    const A6: Addr = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const B6: Addr = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0x11];

    /// An IPv6 frame: `next` is the first next-header value, `payload` what follows the
    /// fixed header (extension headers included).
    fn ipv6(next: u8, hop: u8, src: Addr, dst: Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        ip[6] = next;
        ip[7] = hop;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
        p.extend_from_slice(&ip);
        p.extend_from_slice(payload);
        p
    }

    fn tcp_segment(flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&1234u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// An extension header of `len8` 8-byte units after the first, naming `next`.
    fn ext(next: u8, len8: u8) -> Vec<u8> {
        let mut h = vec![0u8; (len8 as usize + 1) * 8];
        h[0] = next;
        h[1] = len8;
        h
    }

    #[test]
    fn ipv6_packets_are_read_past_their_extension_headers() {
        let p = packet(&ipv6(IPPROTO_TCP, 64, A6, B6, &tcp_segment(TCP_SYN)));
        assert_eq!(
            p.flow,
            Flow { src: A6, dst: B6, protocol: IPPROTO_TCP, sport: 1234, dport: 80 }
        );
        assert!(p.flow.is_v6() && p.is_syn());
        // Hop-by-hop, destination options, then TCP.
        let mut payload = ext(NEXTHDR_DEST, 0);
        payload.extend(ext(IPPROTO_TCP, 1));
        payload.extend(tcp_segment(TCP_SYN));
        let p = packet(&ipv6(NEXTHDR_HOP, 64, A6, B6, &payload));
        assert_eq!((p.flow.protocol, p.flow.dport, p.kind), (IPPROTO_TCP, 80, Kind::Tcp));
        // Too long a chain is malformed, not passed as something else.
        let mut payload = Vec::new();
        for _ in 0..MAX_EXT_HEADERS {
            payload.extend(ext(NEXTHDR_DEST, 0));
        }
        payload.extend(tcp_segment(TCP_SYN));
        assert_eq!(
            classify_frame(&ipv6(NEXTHDR_DEST, 64, A6, B6, &payload)[..]).frame,
            FrameKind::Malformed
        );
        // A hop-by-hop header after the first, a routing header with segments left.
        let mut payload = ext(NEXTHDR_HOP, 0);
        payload.extend(ext(IPPROTO_TCP, 0));
        payload.extend(tcp_segment(TCP_SYN));
        assert_eq!(
            classify_frame(&ipv6(NEXTHDR_DEST, 64, A6, B6, &payload)[..]).frame,
            FrameKind::Malformed
        );
        let mut payload = ext(IPPROTO_TCP, 2);
        payload[3] = 1;
        payload.extend(tcp_segment(TCP_SYN));
        assert_eq!(
            classify_frame(&ipv6(NEXTHDR_ROUTING, 64, A6, B6, &payload)[..]).frame,
            FrameKind::Malformed
        );
        // A header running past the payload.
        let payload = ext(IPPROTO_TCP, 9);
        let mut f = ipv6(NEXTHDR_DEST, 64, A6, B6, &payload[..16]);
        f.extend_from_slice(&[0; 64]); // padding past the payload length does not count
        assert_eq!(classify_frame(&f[..]).frame, FrameKind::Malformed);
        // IPv4-mapped addresses would read as IPv4 keys.
        let mapped = v4_mapped([10, 0, 0, 1]);
        assert_eq!(
            classify_frame(&ipv6(IPPROTO_TCP, 64, mapped, B6, &tcp_segment(TCP_SYN))[..]).frame,
            FrameKind::Malformed
        );
        // Truncated TCP.
        let p = packet(&ipv6(IPPROTO_TCP, 64, A6, B6, &tcp_segment(TCP_SYN)[..3]));
        assert_eq!(p.kind, Kind::Truncated);
    }

    #[test]
    fn ipv6_fragments() {
        let frag = |offset: u16, more: bool, next: u8| {
            let mut h = vec![next, 0, 0, 0, 0, 0, 0x12, 0x34];
            h[2..4].copy_from_slice(&((offset << 3) | more as u16).to_be_bytes());
            h
        };
        let mut payload = frag(0, true, IPPROTO_UDP);
        payload.extend([0, 7, 0, 53, 0, 8, 0, 0]);
        let p = packet(&ipv6(NEXTHDR_FRAGMENT, 64, A6, B6, &payload));
        assert_eq!((p.fragment, p.ip_id, p.flow.dport), (FragmentKind::First, 0x1234, 53));
        let mut payload = frag(3, false, IPPROTO_UDP);
        payload.extend([0xaa; 16]);
        let p = packet(&ipv6(NEXTHDR_FRAGMENT, 64, A6, B6, &payload));
        assert_eq!((p.fragment, p.flow.protocol, p.flow.dport), (FragmentKind::Later, 17, 0));
        // An atomic fragment is whole.
        let mut payload = frag(0, false, IPPROTO_UDP);
        payload.extend([0, 7, 0, 53, 0, 8, 0, 0]);
        assert_eq!(
            packet(&ipv6(NEXTHDR_FRAGMENT, 64, A6, B6, &payload)).fragment,
            FragmentKind::Whole
        );
        // The fragmentable part must start with the upper layer.
        let mut payload = frag(0, true, NEXTHDR_DEST);
        payload.extend(ext(IPPROTO_UDP, 0));
        payload.extend([0, 7, 0, 53, 0, 8, 0, 0]);
        assert_eq!(
            classify_frame(&ipv6(NEXTHDR_FRAGMENT, 64, A6, B6, &payload)[..]).frame,
            FrameKind::Malformed
        );
    }

    #[test]
    fn icmpv6_echo_errors_and_the_link() {
        let req = packet(&ipv6(IPPROTO_ICMPV6, 64, A6, B6, &[128, 0, 0, 0, 0, 7, 0, 1]));
        assert_eq!((req.kind, req.flow.sport), (Kind::IcmpEchoRequest, 7));
        let rep = packet(&ipv6(IPPROTO_ICMPV6, 64, B6, A6, &[129, 0, 0, 0, 0, 7, 0, 1]));
        assert_eq!((rep.kind, rep.flow.dport), (Kind::IcmpEchoReply, 7));
        // Port unreachable about UDP B6:5353 -> A6:9.
        let quoted = ipv6(IPPROTO_UDP, 64, B6, A6, &[0x14, 0xe9, 0, 9, 0, 8, 0, 0]);
        let mut msg = vec![1, 4, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(&quoted[ETH_HLEN..]);
        let p = packet(&ipv6(IPPROTO_ICMPV6, 64, A6, B6, &msg));
        assert_eq!(p.kind, Kind::IcmpError);
        assert_eq!(
            p.quoted,
            Flow { src: B6, dst: A6, protocol: IPPROTO_UDP, sport: 5353, dport: 9 }
        );
        // Neighbour solicitation: of the link only with hop limit 255.
        let ns = [135, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(packet(&ipv6(IPPROTO_ICMPV6, 255, A6, B6, &ns)).kind, Kind::Neighbor);
        assert_eq!(packet(&ipv6(IPPROTO_ICMPV6, 254, A6, B6, &ns)).kind, Kind::Other);
        let mld = [143, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(packet(&ipv6(IPPROTO_ICMPV6, 1, A6, B6, &mld)).kind, Kind::Neighbor);
        assert_eq!(packet(&ipv6(IPPROTO_ICMPV6, 2, A6, B6, &mld)).kind, Kind::Other);
        // ICMP (v4) numbers mean nothing in IPv6.
        assert_eq!(
            packet(&ipv6(IPPROTO_ICMP, 64, A6, B6, &[8, 0, 0, 0, 0, 7, 0, 1])).kind,
            Kind::Other
        );
        let mut ll = [0u8; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        assert!(is_link_scope(&ll) && !is_link_scope(&A6));
    }
}
