//! The per-packet decision, independent of where the maps live.
//!
//! The eBPF programs implement [`Maps`] over BPF maps; the agent's host model implements it
//! over plain collections, and tests and the fuzzer run both on the same packets. The cost is
//! a fixed number of lookups, whatever the number of policies: the interface, the endpoint
//! (and, entering a pod, the source's endpoint), two connection-tracking keys, the node
//! addresses, the peer's identity and CIDR prefix, and at most three policy-trie lookups.
//!
//! The order is the security argument:
//! 1. The pod is the one whose interface the packet crosses ([`Hook::ifindex`]), never one
//!    named by the packet's addresses.
//! 2. A packet leaving a pod must carry the pod's address; a packet entering a pod with a
//!    local pod's address as its source must have come in through that pod's interface.
//!    Otherwise it is dropped as [`Reason::Spoofed`] before anything is read from or written
//!    to connection tracking.
//! 3. Only then does connection tracking let later packets, replies and ICMP errors of
//!    tracked flows through; a TCP SYN is always judged by policy.
//! 4. Policy judges the rest; an allowed packet that starts a flow is tracked.

use crate::conntrack::{CtKey, CtValue, FragKey, FragValue, starts_flow};
use crate::packet::{Flow, FragmentKind, FrameKind, Kind, Packet, Parsed, other_direction};
use crate::{
    DIR_EGRESS, EndpointInfo, IfaceInfo, PEER_ANY, POLICY_PREFIX_FULL, PolicyKeyData, PolicyValue,
    Reason, policy_key,
};

/// The lookups and writes a decision needs.
pub trait Maps {
    /// The pod an interface belongs to.
    fn iface(&self, ifindex: u32) -> Option<IfaceInfo>;
    fn endpoint(&self, ip: [u8; 4]) -> Option<EndpointInfo>;
    fn is_node_ip(&self, ip: [u8; 4]) -> bool;
    /// The pod identity of an address.
    fn identity(&self, ip: [u8; 4]) -> Option<u32>;
    /// The id of the longest listed CIDR prefix holding the address.
    fn prefix_id(&self, ip: [u8; 4]) -> Option<u32>;
    /// The value of the longest entry of the policy trie that matches the key.
    fn policy_lookup(&self, prefix_len: u32, key: &PolicyKeyData) -> Option<PolicyValue>;
    fn ct_get(&self, key: &CtKey) -> Option<CtValue>;
    fn ct_put(&self, key: &CtKey, value: &CtValue);
    fn ct_delete(&self, key: &CtKey);
    fn frag_get(&self, key: &FragKey) -> Option<FragValue>;
    fn frag_put(&self, key: &FragKey, value: &FragValue);
}

/// Where and when a packet is seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// `DIR_EGRESS` on the host side's tc ingress (the pod sends), `DIR_INGRESS` on its tc
    /// egress (the pod receives).
    pub dir: u8,
    /// The host side of the pod's veth.
    pub ifindex: u32,
    /// The interface the packet entered the node through (`skb->ingress_ifindex`; 0 when
    /// the node itself sent it).
    pub ingress_ifindex: u32,
    /// `CLOCK_BOOTTIME`, ns.
    pub now: u64,
}

/// The outcome: the reason says whether it is allowed; the flow is there when the packet was
/// IPv4 (for drop logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub flow: Option<Flow>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.reason.allowed()
    }

    const fn of(reason: Reason, flow: Option<Flow>) -> Self {
        Self { reason, flow }
    }
}

/// Decides a frame that [`crate::classify_frame`] read.
#[inline(always)]
pub fn decide<M: Maps>(m: &M, hook: &Hook, parsed: &Parsed) -> Verdict {
    let dir = hook.dir;
    let iface = m.iface(hook.ifindex);
    let mut p = match parsed.frame {
        // An interface the agent has not described: nothing it sends can be verified.
        _ if dir == DIR_EGRESS && iface.is_none() => return Verdict::of(Reason::Spoofed, None),
        FrameKind::Ipv4 => parsed.packet,
        FrameKind::Malformed => return Verdict::of(Reason::Malformed, None),
        FrameKind::Arp => return Verdict::of(Reason::Unmanaged, None),
        FrameKind::Other => {
            // IPv6 and the rest: not enforced yet, so an isolated endpoint refuses them.
            let isolated = iface.and_then(|i| m.endpoint(i.ip4)).is_some_and(|e| e.enforced(dir));
            return Verdict::of(
                if isolated { Reason::Unsupported } else { Reason::Unmanaged },
                None,
            );
        }
    };
    let flow = p.flow;
    let endpoint_ip = if dir == DIR_EGRESS {
        let own = iface.map(|i| i.ip4).unwrap_or_default();
        if flow.src != own {
            return Verdict::of(Reason::Spoofed, Some(flow));
        }
        own
    } else {
        if let Some(src) = m.endpoint(flow.src)
            && src.ifindex != 0
            && src.ifindex != hook.ingress_ifindex
        {
            return Verdict::of(Reason::Spoofed, Some(flow));
        }
        iface.map_or(flow.dst, |i| i.ip4)
    };
    let Some(ep) = m.endpoint(endpoint_ip) else {
        return Verdict::of(Reason::Unmanaged, Some(flow));
    };
    // (Odd packets are refused wherever a policy judges, even one that does not isolate.)
    let isolated = ep.enforced(dir);
    let peer = if dir == DIR_EGRESS { flow.dst } else { flow.src };

    if p.has_ports() {
        let frag_key = flow.frag_key(hook.ifindex, p.ip_id, dir);
        match p.fragment {
            // Later fragments carry no ports: use those of the first fragment.
            FragmentKind::Later => match m.frag_get(&frag_key) {
                Some(v) => {
                    p.flow.sport = v.sport;
                    p.flow.dport = v.dport;
                }
                None if isolated => return Verdict::of(Reason::Fragment, Some(flow)),
                None => {}
            },
            FragmentKind::First if p.kind != Kind::Truncated => {
                m.frag_put(&frag_key, &p.flow.frag_value())
            }
            _ => {}
        }
    }
    let flow = p.flow;
    match p.kind {
        // No ports to judge: only an endpoint without policy in this direction takes it.
        Kind::Truncated => {
            return Verdict::of(
                if isolated { Reason::Malformed } else { Reason::NotIsolated },
                Some(flow),
            );
        }
        Kind::IcmpError => {
            // The quoted packet went the other way through this interface.
            let (quoted, back) = (p.quoted, other_direction(dir));
            if ct_live(m, &quoted.ct_key(hook.ifindex, back), hook.now)
                || ct_live(m, &quoted.reply_key(hook.ifindex, back), hook.now)
            {
                return Verdict::of(Reason::Related, Some(flow));
            }
            return Verdict::of(judge(m, &ep, dir, peer, &flow), Some(flow));
        }
        // What conntrack calls INVALID is judged by policy and never tracked.
        Kind::TcpInvalid => return Verdict::of(judge(m, &ep, dir, peer, &flow), Some(flow)),
        _ => {}
    }
    let key = flow.ct_key(hook.ifindex, dir);
    if !p.is_syn() {
        if follow(m, &key, &p, false, hook.now) {
            return Verdict::of(Reason::Established, Some(flow));
        }
        if follow(m, &flow.reply_key(hook.ifindex, dir), &p, true, hook.now) {
            return Verdict::of(Reason::Reply, Some(flow));
        }
    }
    // New flows are tracked even when not isolated: their replies must pass if the endpoint
    // becomes isolated in the other direction while the flow lives.
    let reason = judge(m, &ep, dir, peer, &flow);
    if reason.allowed() && starts_flow(&p) {
        m.ct_put(&key, &CtValue::new(&p, hook.now));
    }
    Verdict::of(reason, Some(flow))
}

/// Whether a live entry is under `key` (deleting a dead one met on the way).
#[inline(always)]
fn ct_live<M: Maps>(m: &M, key: &CtKey, now: u64) -> bool {
    match m.ct_get(key) {
        Some(v) if v.live(key.protocol, now) => true,
        Some(_) => {
            m.ct_delete(key);
            false
        }
        None => false,
    }
}

/// Whether `p` belongs to the live flow under `key`; refreshes the entry when it does.
#[inline(always)]
fn follow<M: Maps>(m: &M, key: &CtKey, p: &Packet, reply: bool, now: u64) -> bool {
    let Some(v) = m.ct_get(key) else { return false };
    if !v.live(key.protocol, now) {
        m.ct_delete(key);
        return false;
    }
    if let Some(new) = v.refreshed(p, reply, now) {
        m.ct_put(key, &new);
    }
    true
}

/// Policy's answer for a packet no tracked flow accounts for.
#[inline(always)]
fn judge<M: Maps>(m: &M, ep: &EndpointInfo, dir: u8, peer: [u8; 4], flow: &Flow) -> Reason {
    let profile = ep.profile(dir);
    if profile == 0 {
        return Reason::NotIsolated;
    }
    if m.is_node_ip(peer) {
        return Reason::Node;
    }
    match matching(m, profile, dir, peer, flow).decision(ep.isolated(dir)) {
        Some(true) => Reason::Policy,
        Some(false) => Reason::Denied,
        None => Reason::NotIsolated,
    }
}

/// What the profile's entries for the peer's identity, its prefix and anyone say: three
/// trie lookups, whatever the number of policies and tiers.
#[inline(always)]
fn matching<M: Maps>(m: &M, profile: u32, dir: u8, peer: [u8; 4], flow: &Flow) -> PolicyValue {
    // A rule's ports are the destination's, in both directions.
    let get = |peer_id: u32| {
        m.policy_lookup(
            POLICY_PREFIX_FULL,
            &policy_key(profile, dir, peer_id, flow.protocol, flow.dport),
        )
        .unwrap_or(PolicyValue::NONE)
    };
    let mut v = get(PEER_ANY);
    if let Some(id) = m.identity(peer) {
        v = v.fold(get(id));
    }
    if let Some(id) = m.prefix_id(peer) {
        v = v.fold(get(id));
    }
    v
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::cell::RefCell;
    use std::collections::{HashMap, HashSet};
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::conntrack::{TCP_ESTABLISHED_NS, UDP_UNREPLIED_NS};
    use crate::packet::{
        ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    };
    use crate::{DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, classify_frame};

    /// The maps as plain collections: `policy` holds exact (profile, dir, peer) triples that
    /// admit any protocol and port.
    #[derive(Default)]
    struct Model {
        ifaces: HashMap<u32, IfaceInfo>,
        endpoints: HashMap<[u8; 4], EndpointInfo>,
        identities: HashMap<[u8; 4], u32>,
        policy: HashSet<(u32, u8, u32)>,
        ct: RefCell<HashMap<CtKey, CtValue>>,
        frags: RefCell<HashMap<FragKey, FragValue>>,
    }

    impl Maps for Model {
        fn iface(&self, ifindex: u32) -> Option<IfaceInfo> {
            self.ifaces.get(&ifindex).copied()
        }
        fn endpoint(&self, ip: [u8; 4]) -> Option<EndpointInfo> {
            self.endpoints.get(&ip).copied()
        }
        fn is_node_ip(&self, _: [u8; 4]) -> bool {
            false
        }
        fn identity(&self, ip: [u8; 4]) -> Option<u32> {
            self.identities.get(&ip).copied()
        }
        fn prefix_id(&self, _: [u8; 4]) -> Option<u32> {
            None
        }
        fn policy_lookup(&self, _: u32, key: &PolicyKeyData) -> Option<PolicyValue> {
            let profile = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
            let peer = u32::from_be_bytes([key[5], key[6], key[7], key[8]]);
            self.policy.contains(&(profile, key[4], peer)).then_some(PolicyValue::ALLOW)
        }
        fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
            self.ct.borrow().get(key).copied()
        }
        fn ct_put(&self, key: &CtKey, value: &CtValue) {
            self.ct.borrow_mut().insert(*key, *value);
        }
        fn ct_delete(&self, key: &CtKey) {
            self.ct.borrow_mut().remove(key);
        }
        fn frag_get(&self, key: &FragKey) -> Option<FragValue> {
            self.frags.borrow().get(key).copied()
        }
        fn frag_put(&self, key: &FragKey, value: &FragValue) {
            self.frags.borrow_mut().insert(*key, *value);
        }
    }

    const A: [u8; 4] = [10, 0, 0, 1]; // local, veth 11, egress denied to everything
    const E: [u8; 4] = [10, 0, 0, 5]; // local, veth 15, admits only C
    const C: [u8; 4] = [10, 0, 1, 3]; // remote, identity 3
    const A_IF: u32 = 11;
    const E_IF: u32 = 15;
    const UPLINK: u32 = 2;

    fn model() -> Model {
        let mut m = Model::default();
        m.ifaces.insert(A_IF, IfaceInfo { ip4: A });
        m.ifaces.insert(E_IF, IfaceInfo { ip4: E });
        m.endpoints
            .insert(A, EndpointInfo { flags: EP_EGRESS_ISOLATED, profiles: [0, 1], ifindex: A_IF });
        m.endpoints.insert(
            E,
            EndpointInfo { flags: EP_INGRESS_ISOLATED, profiles: [2, 0], ifindex: E_IF },
        );
        m.identities.insert(C, 3);
        m.identities.insert(A, 1);
        m.identities.insert(E, 5);
        m.policy.insert((2, DIR_INGRESS, 3));
        m
    }

    fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let l4: Vec<u8> = match proto {
            IPPROTO_TCP => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&sport.to_be_bytes());
                t[2..4].copy_from_slice(&dport.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = flags;
                t
            }
            _ => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&sport.to_be_bytes());
                u[2..4].copy_from_slice(&dport.to_be_bytes());
                u
            }
        };
        let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        p.extend_from_slice(&ip);
        p.extend_from_slice(&l4);
        p
    }

    /// A packet leaving the pod of `ifindex`.
    fn send(m: &Model, ifindex: u32, f: &[u8], now: u64) -> Reason {
        let hook = Hook { dir: DIR_EGRESS, ifindex, ingress_ifindex: ifindex, now };
        decide(m, &hook, &classify_frame(f)).reason
    }

    /// A packet entering the pod of `ifindex`, having come in through `from`.
    fn deliver(m: &Model, ifindex: u32, from: u32, f: &[u8], now: u64) -> Reason {
        let hook = Hook { dir: DIR_INGRESS, ifindex, ingress_ifindex: from, now };
        decide(m, &hook, &classify_frame(f)).reason
    }

    #[test]
    fn a_forged_source_is_dropped_before_conntrack_sees_it() {
        let m = model();
        // a forges e's address towards itself, to plant e:80 -> a:4444 as a flow.
        let forged = frame(E, A, IPPROTO_TCP, 80, 4444, TCP_SYN);
        assert_eq!(send(&m, A_IF, &forged, 0), Reason::Spoofed);
        assert!(m.ct.borrow().is_empty(), "nothing recorded for a forged packet");
        // Then a connects from the planted tuple: its egress is denied, e admits only c.
        assert_eq!(send(&m, A_IF, &frame(A, E, IPPROTO_TCP, 4444, 80, TCP_SYN), 1), Reason::Denied);
        assert_eq!(
            deliver(&m, E_IF, A_IF, &frame(A, E, IPPROTO_TCP, 4444, 80, TCP_ACK), 2),
            Reason::Denied
        );
        // Any other address, too.
        assert_eq!(
            send(&m, A_IF, &frame([10, 9, 9, 9], C, IPPROTO_UDP, 1, 53, 0), 0),
            Reason::Spoofed
        );
        // An interface the agent has not described sends nothing.
        assert_eq!(send(&m, 99, &frame(A, C, IPPROTO_UDP, 1, 53, 0), 0), Reason::Spoofed);
    }

    #[test]
    fn a_local_address_must_come_through_its_own_interface() {
        let m = model();
        // c is admitted by e; a packet claiming a's address arriving from the uplink is not a's.
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &frame(A, E, IPPROTO_TCP, 1, 80, TCP_SYN), 0),
            Reason::Spoofed
        );
        assert_eq!(
            deliver(&m, E_IF, A_IF, &frame(A, E, IPPROTO_TCP, 1, 80, TCP_SYN), 0),
            Reason::Denied
        );
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &frame(C, E, IPPROTO_TCP, 1, 80, TCP_SYN), 0),
            Reason::Policy
        );
    }

    #[test]
    fn syn_is_always_judged_and_entries_expire() {
        let mut m = model();
        let (syn, ack) = (
            frame(C, E, IPPROTO_TCP, 5000, 80, TCP_SYN),
            frame(C, E, IPPROTO_TCP, 5000, 80, TCP_ACK),
        );
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 0), Reason::Policy);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 1), Reason::Established);
        let reply = frame(E, C, IPPROTO_TCP, 80, 5000, TCP_SYN | TCP_ACK);
        assert_eq!(send(&m, E_IF, &reply, 2), Reason::Reply);
        // The policy stops admitting c: the established flow goes on, a new SYN on the same
        // tuple does not.
        m.policy.clear();
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 3), Reason::Established);
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 4), Reason::Denied);
        // Idle past the timeout: dead, and deleted when met.
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 5 + TCP_ESTABLISHED_NS), Reason::Denied);
        assert!(m.ct.borrow().is_empty());
    }

    #[test]
    fn fin_and_rst_end_a_flow_after_a_linger() {
        let mut m = model();
        let syn = frame(C, E, IPPROTO_TCP, 5001, 80, TCP_SYN);
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 0), Reason::Policy);
        let rst = frame(E, C, IPPROTO_TCP, 80, 5001, TCP_RST | TCP_ACK);
        assert_eq!(send(&m, E_IF, &rst, 1), Reason::Reply);
        let late = frame(C, E, IPPROTO_TCP, 5001, 80, TCP_ACK);
        assert_eq!(deliver(&m, E_IF, UPLINK, &late, 2), Reason::Established);
        m.policy.clear();
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &late, 3 + 11 * 1_000_000_000),
            Reason::Denied,
            "gone 10 s after the RST"
        );
        // FIN: two minutes.
        m.policy.insert((2, DIR_INGRESS, 3));
        let syn = frame(C, E, IPPROTO_TCP, 5002, 80, TCP_SYN);
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 0), Reason::Policy);
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &frame(C, E, IPPROTO_TCP, 5002, 80, TCP_FIN | TCP_ACK), 1),
            Reason::Established
        );
        m.policy.clear();
        let ack = frame(C, E, IPPROTO_TCP, 5002, 80, TCP_ACK);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 100 * 1_000_000_000), Reason::Established);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 221 * 1_000_000_000), Reason::Denied);
    }

    #[test]
    fn udp_idles_out_and_invalid_tcp_is_never_tracked() {
        let mut m = model();
        let q = frame(C, E, IPPROTO_UDP, 7000, 53, 0);
        assert_eq!(deliver(&m, E_IF, UPLINK, &q, 0), Reason::Policy);
        m.policy.clear();
        assert_eq!(deliver(&m, E_IF, UPLINK, &q, UDP_UNREPLIED_NS), Reason::Established);
        assert_eq!(deliver(&m, E_IF, UPLINK, &q, 2 * UDP_UNREPLIED_NS + 1), Reason::Denied);
        m.policy.insert((2, DIR_INGRESS, 3));
        let xmas = frame(C, E, IPPROTO_TCP, 7001, 80, TCP_FIN | 0x08 | 0x20);
        assert_eq!(deliver(&m, E_IF, UPLINK, &xmas, 0), Reason::Policy);
        assert!(
            m.ct.borrow().keys().all(|k| k.protocol != IPPROTO_TCP),
            "invalid TCP is not tracked"
        );
        // From a peer no policy admits, invalid TCP is denied like any packet.
        assert_eq!(
            deliver(&m, E_IF, A_IF, &frame(A, E, IPPROTO_TCP, 1, 80, TCP_SYN | TCP_FIN), 0),
            Reason::Denied
        );
    }

    #[test]
    fn icmp_errors_pass_only_for_tracked_flows() {
        let m = model();
        // e is ingress-isolated; it sends to c (egress not isolated: tracked).
        assert_eq!(send(&m, E_IF, &frame(E, C, IPPROTO_UDP, 6000, 9, 0), 0), Reason::NotIsolated);
        let error = |sport: u16| {
            let quoted = frame(E, C, IPPROTO_UDP, sport, 9, 0)[ETH_HLEN..ETH_HLEN + 28].to_vec();
            let mut msg = vec![3, 3, 0, 0, 0, 0, 0, 0];
            msg.extend_from_slice(&quoted);
            let mut f = frame([10, 0, 2, 2], E, IPPROTO_ICMP, 0, 0, 0);
            f.truncate(ETH_HLEN + 20);
            f.extend_from_slice(&msg);
            f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
            f
        };
        assert_eq!(deliver(&m, E_IF, UPLINK, &error(6000), 1), Reason::Related);
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &error(6001), 1),
            Reason::Denied,
            "an error about no tracked flow"
        );
    }

    #[test]
    fn other_ethertypes_fail_closed_at_isolated_endpoints() {
        let m = model();
        let mut v6 = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        v6.extend_from_slice(&[0x60; 48]);
        assert_eq!(deliver(&m, E_IF, UPLINK, &v6, 0), Reason::Unsupported, "e is ingress-isolated");
        assert_eq!(send(&m, E_IF, &v6, 0), Reason::Unmanaged, "e's egress is not isolated");
        assert_eq!(send(&m, A_IF, &v6, 0), Reason::Unsupported, "a's egress is");
        let mut arp = vec![0xff; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(send(&m, A_IF, &arp, 0), Reason::Unmanaged);
    }
}
