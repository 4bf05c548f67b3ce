//! Connection tracking, as the kernel's conntrack does it, reduced to what policy needs.
//!
//! An entry is a flow allowed at one endpoint's interface in one direction: its key holds the
//! ifindex, so only packets crossing that interface can match it, and a packet leaving a pod
//! has had its source checked before any entry is read or written. A reply matches the
//! reversed key in the other direction at the same interface.
//!
//! Lifecycle (so that a revoked flow cannot be reopened from a remembered tuple, and what
//! passes after a policy change equals what the iptables dataplane, on the kernel's
//! conntrack, lets pass):
//! - a TCP SYN without ACK never matches an entry: it is always decided by policy, and when
//!   allowed starts the entry anew;
//! - FIN (either way) shortens an entry's life to [`TCP_CLOSING_NS`], RST to [`TCP_RESET_NS`];
//! - an entry not refreshed by a packet for its timeout is dead: the programs ignore and
//!   delete it when they meet it, and the agent sweeps the rest ([`expired`]).
//!
//! Timeouts follow the kernel's defaults (`nf_conntrack_*_timeout*`).

use crate::Addr;
use crate::packet::{
    Flow, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Kind, Packet,
    TCP_FIN, TCP_RST, other_direction,
};

const SEC: u64 = 1_000_000_000;

/// TCP before a reply is seen (`tcp_timeout_syn_sent`).
pub const TCP_UNREPLIED_NS: u64 = 120 * SEC;
/// TCP once answered (`tcp_timeout_established`, five days).
pub const TCP_ESTABLISHED_NS: u64 = 432_000 * SEC;
/// TCP after a FIN (`tcp_timeout_fin_wait`, `tcp_timeout_time_wait`).
pub const TCP_CLOSING_NS: u64 = 120 * SEC;
/// TCP after a RST (`tcp_timeout_close`).
pub const TCP_RESET_NS: u64 = 10 * SEC;
/// UDP before a reply (`udp_timeout`).
pub const UDP_UNREPLIED_NS: u64 = 30 * SEC;
/// UDP once answered (`udp_timeout_stream`).
pub const UDP_REPLIED_NS: u64 = 120 * SEC;
/// ICMP echo (`icmp_timeout`).
pub const ICMP_NS: u64 = 30 * SEC;
/// SCTP once answered (`sctp_timeout_established`); before, as UDP.
pub const SCTP_REPLIED_NS: u64 = 210 * SEC;
/// Any other protocol (`generic_timeout`).
pub const GENERIC_NS: u64 = 600 * SEC;
/// A live entry's timestamp is rewritten at most this often (one write per flow and second,
/// not per packet), unless its state changes.
pub const REFRESH_NS: u64 = SEC;

/// `CtValue::state` bits.
pub const CT_REPLIED: u32 = 1 << 0;
pub const CT_FIN: u32 = 1 << 1;
pub const CT_RST: u32 = 1 << 2;

/// A flow as seen at one endpoint interface in one direction: `src`/`dst` are the packet's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtKey {
    /// The host side of the endpoint's veth.
    pub ifindex: u32,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// The direction (at the endpoint) in which the flow was allowed.
    pub dir: u8,
    pub pad: [u8; 2],
}

/// The keys of a flow's tables (conntrack knows packets; packets know nothing of it).
impl Flow {
    /// The connection-tracking key of this packet at interface `ifindex`, direction `dir`.
    pub fn ct_key(&self, ifindex: u32, dir: u8) -> CtKey {
        CtKey {
            ifindex,
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            protocol: self.protocol,
            dir,
            pad: [0; 2],
        }
    }

    /// The key the flow this packet replies to was tracked under: the reversed tuple, at the
    /// same interface, in the other direction.
    pub fn reply_key(&self, ifindex: u32, dir: u8) -> CtKey {
        CtKey {
            ifindex,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            dir: other_direction(dir),
            pad: [0; 2],
        }
    }

    pub fn frag_key(&self, ifindex: u32, id: u32, dir: u8) -> FragKey {
        FragKey {
            ifindex,
            src: self.src,
            dst: self.dst,
            id,
            protocol: self.protocol,
            dir,
            pad: [0; 2],
        }
    }

    pub fn frag_value(&self) -> FragValue {
        FragValue { sport: self.sport, dport: self.dport }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtValue {
    /// When a packet last refreshed the entry (`CLOCK_BOOTTIME`, ns).
    pub last_seen: u64,
    /// `CT_*` bits.
    pub state: u32,
    pub pad: u32,
}

impl CtValue {
    /// The entry of a flow whose first packet (`packet`) was just allowed.
    pub fn new(packet: &Packet, now: u64) -> Self {
        Self { last_seen: now, state: flags_of(packet), pad: 0 }
    }

    /// How long the entry lives without a packet.
    pub fn timeout(&self, protocol: u8) -> u64 {
        let replied = self.state & CT_REPLIED != 0;
        match protocol {
            IPPROTO_TCP if self.state & CT_RST != 0 => TCP_RESET_NS,
            IPPROTO_TCP if self.state & CT_FIN != 0 => TCP_CLOSING_NS,
            IPPROTO_TCP if replied => TCP_ESTABLISHED_NS,
            IPPROTO_TCP => TCP_UNREPLIED_NS,
            IPPROTO_UDP if replied => UDP_REPLIED_NS,
            IPPROTO_UDP => UDP_UNREPLIED_NS,
            IPPROTO_SCTP if replied => SCTP_REPLIED_NS,
            IPPROTO_SCTP => UDP_UNREPLIED_NS,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => ICMP_NS,
            _ => GENERIC_NS,
        }
    }

    /// Whether the entry is still alive at `now`.
    pub fn live(&self, protocol: u8, now: u64) -> bool {
        now.saturating_sub(self.last_seen) <= self.timeout(protocol)
    }

    /// The entry after `packet` matched it (as a reply when `reply`); `None` when nothing
    /// worth a write changed.
    pub fn refreshed(&self, packet: &Packet, reply: bool, now: u64) -> Option<Self> {
        let mut state = self.state | flags_of(packet);
        if reply {
            state |= CT_REPLIED;
        }
        let stale = now.saturating_sub(self.last_seen) >= REFRESH_NS;
        (state != self.state || stale).then_some(Self { last_seen: now, state, pad: 0 })
    }
}

fn flags_of(packet: &Packet) -> u32 {
    match packet.kind {
        Kind::Tcp if packet.tcp_flags & TCP_RST != 0 => CT_RST,
        Kind::Tcp if packet.tcp_flags & TCP_FIN != 0 => CT_FIN,
        _ => 0,
    }
}

/// Whether an allowed packet that matched no entry starts one: not a lone RST (which ends
/// nothing that exists), nor what conntrack would not track (invalid TCP, ICMP errors and
/// replies, unreadable headers).
pub fn starts_flow(packet: &Packet) -> bool {
    match packet.kind {
        Kind::Tcp => packet.tcp_flags & TCP_RST == 0,
        Kind::IcmpEchoRequest => true,
        // Other ICMP messages have no replies to let through.
        Kind::Other => !matches!(packet.flow.protocol, IPPROTO_ICMP | IPPROTO_ICMPV6),
        Kind::TcpInvalid
        | Kind::Truncated
        | Kind::IcmpEchoReply
        | Kind::IcmpError
        | Kind::Neighbor => false,
    }
}

/// Whether the agent's sweep should delete an entry at `now`.
pub fn expired(key: &CtKey, value: &CtValue, now: u64) -> bool {
    !value.live(key.protocol, now)
}

/// The first fragment of an IPv4 or IPv6 datagram, remembered so later fragments (which
/// carry no ports) are decided as their datagram was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragKey {
    pub ifindex: u32,
    pub src: Addr,
    pub dst: Addr,
    /// The identification: IPv4's 16 bits, or the IPv6 fragment header's 32.
    pub id: u32,
    pub protocol: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Flow, FragmentKind, TCP_ACK, TCP_SYN};

    fn pkt(protocol: u8, kind: Kind) -> Packet {
        Packet {
            flow: Flow {
                src: crate::v4_mapped([1, 1, 1, 1]),
                dst: crate::v4_mapped([2, 2, 2, 2]),
                protocol,
                sport: 1,
                dport: 2,
            },
            kind,
            fragment: FragmentKind::Whole,
            ..Packet::default()
        }
    }

    fn tcp(flags: u8) -> Packet {
        Packet { tcp_flags: flags, ..pkt(IPPROTO_TCP, Kind::Tcp) }
    }

    #[test]
    fn tcp_lifecycle() {
        let syn = tcp(TCP_SYN);
        let v = CtValue::new(&syn, 0);
        assert_eq!(v.timeout(IPPROTO_TCP), TCP_UNREPLIED_NS);
        let v = v.refreshed(&tcp(TCP_SYN | TCP_ACK), true, 10).expect("replied");
        assert_eq!(v.timeout(IPPROTO_TCP), TCP_ESTABLISHED_NS);
        assert!(v.live(IPPROTO_TCP, 400_000 * SEC));
        // Nothing new within a second: no write.
        assert_eq!(v.refreshed(&tcp(TCP_ACK), false, 20), None);
        let v = v.refreshed(&tcp(TCP_FIN | TCP_ACK), false, 30).expect("fin");
        assert_eq!(v.timeout(IPPROTO_TCP), TCP_CLOSING_NS);
        assert!(!v.live(IPPROTO_TCP, 30 + TCP_CLOSING_NS + 1));
        let v = v.refreshed(&tcp(TCP_RST), true, 40).expect("rst");
        assert_eq!(v.timeout(IPPROTO_TCP), TCP_RESET_NS);
    }

    #[test]
    fn udp_and_others_expire_when_idle() {
        let v = CtValue::new(&pkt(IPPROTO_UDP, Kind::Other), 5);
        assert!(v.live(IPPROTO_UDP, 5 + UDP_UNREPLIED_NS));
        assert!(!v.live(IPPROTO_UDP, 6 + UDP_UNREPLIED_NS));
        let v = v.refreshed(&pkt(IPPROTO_UDP, Kind::Other), true, 5 + SEC).unwrap();
        assert!(v.live(IPPROTO_UDP, 5 + SEC + UDP_REPLIED_NS));
        assert_eq!(CtValue::default().timeout(47), GENERIC_NS);
        // A clock that went backwards (another CPU's older timestamp) keeps the entry alive.
        assert!(CtValue { last_seen: 100, ..Default::default() }.live(IPPROTO_UDP, 50));
    }

    #[test]
    fn a_reply_finds_its_request() {
        let req = Flow {
            src: crate::v4_mapped([1, 1, 1, 1]),
            dst: crate::v4_mapped([2, 2, 2, 2]),
            protocol: IPPROTO_UDP,
            sport: 7,
            dport: 53,
        };
        let rep = Flow { src: req.dst, dst: req.src, sport: req.dport, dport: req.sport, ..req };
        assert_eq!(rep.reply_key(3, crate::DIR_INGRESS), req.ct_key(3, crate::DIR_EGRESS));
        assert_ne!(
            rep.reply_key(4, crate::DIR_INGRESS),
            req.ct_key(3, crate::DIR_EGRESS),
            "another interface"
        );
    }

    #[test]
    fn what_starts_a_flow() {
        assert!(starts_flow(&tcp(TCP_SYN)));
        assert!(starts_flow(&tcp(TCP_ACK)));
        assert!(!starts_flow(&tcp(TCP_RST)));
        assert!(!starts_flow(&pkt(IPPROTO_TCP, Kind::TcpInvalid)));
        assert!(starts_flow(&pkt(IPPROTO_UDP, Kind::Other)));
        assert!(starts_flow(&pkt(IPPROTO_ICMP, Kind::IcmpEchoRequest)));
        assert!(!starts_flow(&pkt(IPPROTO_ICMP, Kind::IcmpEchoReply)));
        assert!(!starts_flow(&pkt(IPPROTO_ICMP, Kind::Other)));
        assert!(starts_flow(&pkt(47, Kind::Other)));
    }
}
