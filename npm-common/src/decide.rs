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
use crate::packet::{
    Flow, FragmentKind, FrameKind, Kind, Packet, Parsed, is_link_scope, other_direction,
};
use crate::{
    Addr, DIR_EGRESS, DIR_INGRESS, EndpointInfo, IfaceInfo, PEER_ANY, POLICY_PREFIX_FULL,
    PolicyKeyData, PolicyValue, Reason, policy_key,
};

/// The lookups and writes a decision needs.
pub trait Maps {
    /// The pod an interface belongs to (a reference: the programs read it in the map rather
    /// than copy it to their small stack).
    fn iface(&self, ifindex: u32) -> Option<&IfaceInfo>;
    fn endpoint(&self, ip: Addr) -> Option<EndpointInfo>;
    fn is_node_ip(&self, ip: Addr) -> bool;
    /// The pod identity of an address.
    fn identity(&self, ip: Addr) -> Option<u32>;
    /// The id of the longest listed CIDR prefix holding the address.
    fn prefix_id(&self, ip: Addr) -> Option<u32>;
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

/// The outcome: the reason says whether it is allowed; the flow is the packet's when it was
/// read as IP (for drop logs), all zero otherwise.
///
/// (A plain struct, not an `Option<Flow>`: the programs copy verdicts between functions, and
/// the verifier refuses copying the undefined payload of a `None`.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub flow: Flow,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.reason.allowed()
    }

    /// The packet's flow, if it was read as IP.
    pub fn flow(&self) -> Option<Flow> {
        (self.flow != Flow::default()).then_some(self.flow)
    }

    const fn of(reason: Reason, flow: Flow) -> Self {
        Self { reason, flow }
    }

    const fn bare(reason: Reason) -> Self {
        Self { reason, flow: Flow { src: [0; 16], dst: [0; 16], protocol: 0, sport: 0, dport: 0 } }
    }
}

/// Decides a frame that [`crate::classify_frame`] read.
///
/// (In the programs the steps after the source check are functions of their own, marked
/// `inline(never)` for BPF: each holds its connection-tracking or policy keys in its own
/// frame, which keeps every call chain within the 512 bytes of stack BPF allows.)
#[inline(always)]
pub fn decide<M: Maps>(m: &M, hook: &Hook, parsed: &Parsed) -> Verdict {
    let dir = hook.dir;
    let iface = m.iface(hook.ifindex);
    let p = match parsed.frame {
        // An interface the agent has not described: nothing it sends can be verified.
        _ if dir == DIR_EGRESS && iface.is_none() => return Verdict::bare(Reason::Spoofed),
        FrameKind::Ip => &parsed.packet,
        FrameKind::Malformed => return Verdict::bare(Reason::Malformed),
        FrameKind::Arp => return Verdict::bare(Reason::Unmanaged),
        FrameKind::Other => {
            // Neither IP nor ARP: nothing a policy can judge, so where one judges, refused.
            let isolated = iface
                .and_then(|i| m.endpoint(i.endpoint_addr(false)))
                .is_some_and(|e| e.enforced(dir));
            return Verdict::bare(if isolated { Reason::Unsupported } else { Reason::Unmanaged });
        }
    };
    let mut flow = p.flow;
    // Messages of the link (neighbour discovery, MLD) pass as ARP does: entering a pod, the
    // hop limit proves the node sent them; leaving it, only towards addresses a router does
    // not forward to.
    if p.kind == Kind::Neighbor && (dir == DIR_INGRESS || is_link_scope(&flow.dst)) {
        return Verdict::of(Reason::Unmanaged, flow);
    }
    let v6 = flow.is_v6();
    let endpoint_ip = if dir == DIR_EGRESS {
        // The pod's own address of the packet's family, and nothing else (a pod without an
        // IPv6 address sends no IPv6 but the link's messages above).
        if !iface.is_some_and(|i| i.is_own(v6, &flow.src)) {
            return Verdict::of(Reason::Spoofed, flow);
        }
        flow.src
    } else {
        if let Some(src) = m.endpoint(flow.src)
            && src.ifindex != 0
            && src.ifindex != hook.ingress_ifindex
        {
            return Verdict::of(Reason::Spoofed, flow);
        }
        match iface {
            Some(i) => i.endpoint_addr(v6),
            None => flow.dst,
        }
    };
    let Some(ep) = m.endpoint(endpoint_ip) else {
        return Verdict::of(Reason::Unmanaged, flow);
    };
    // (Odd packets are refused wherever a policy judges, even one that does not isolate.)
    let isolated = ep.enforced(dir);

    if p.has_ports() && !fragment_ports(m, hook, p, isolated, &mut flow) {
        return Verdict::of(Reason::Fragment, flow);
    }
    match p.kind {
        // No ports to judge: only an endpoint without policy in this direction takes it.
        Kind::Truncated => {
            return Verdict::of(
                if isolated { Reason::Malformed } else { Reason::NotIsolated },
                flow,
            );
        }
        // An error about a tracked flow passes; about any other, policy judges it.
        Kind::IcmpError if related(m, hook, &p.quoted) => {
            return Verdict::of(Reason::Related, flow);
        }
        // What conntrack calls INVALID is judged by policy and never tracked.
        Kind::IcmpError | Kind::TcpInvalid => {
            return Verdict::of(judge(m, &ep, dir, &flow), flow);
        }
        _ => {}
    }
    if !p.is_syn() {
        match tracked(m, hook, &flow, p) {
            TRACKED_ESTABLISHED => return Verdict::of(Reason::Established, flow),
            TRACKED_REPLY => return Verdict::of(Reason::Reply, flow),
            _ => {}
        }
    }
    // New flows are tracked even when not isolated: their replies must pass if the endpoint
    // becomes isolated in the other direction while the flow lives.
    let reason = judge(m, &ep, dir, &flow);
    if reason.allowed() && starts_flow(p) {
        m.ct_put(&flow.ct_key(hook.ifindex, dir), &CtValue::new(p, hook.now));
    }
    Verdict::of(reason, flow)
}

/// Gives a later fragment the ports of its first fragment, and remembers a first fragment's;
/// false for a later fragment whose first was not seen, at an endpoint a policy judges.
#[cfg_attr(target_arch = "bpf", inline(never))]
fn fragment_ports<M: Maps>(
    m: &M,
    hook: &Hook,
    p: &Packet,
    isolated: bool,
    flow: &mut Flow,
) -> bool {
    let key = flow.frag_key(hook.ifindex, p.ip_id, hook.dir);
    match p.fragment {
        // Later fragments carry no ports: use those of the first fragment.
        FragmentKind::Later => match m.frag_get(&key) {
            Some(v) => {
                flow.sport = v.sport;
                flow.dport = v.dport;
            }
            None if isolated => return false,
            None => {}
        },
        FragmentKind::First if p.kind != Kind::Truncated => m.frag_put(&key, &flow.frag_value()),
        _ => {}
    }
    true
}

/// Whether the flow an ICMP error quotes is tracked: it went the other way through this
/// interface.
#[cfg_attr(target_arch = "bpf", inline(never))]
fn related<M: Maps>(m: &M, hook: &Hook, quoted: &Flow) -> bool {
    let back = other_direction(hook.dir);
    ct_live(m, &quoted.ct_key(hook.ifindex, back), hook.now)
        || ct_live(m, &quoted.reply_key(hook.ifindex, back), hook.now)
}

const TRACKED_NOT: u8 = 0;
const TRACKED_ESTABLISHED: u8 = 1;
const TRACKED_REPLY: u8 = 2;

/// Whether the packet belongs to a tracked flow: a later packet of one allowed this way, or
/// a reply to one allowed the other way.
#[cfg_attr(target_arch = "bpf", inline(never))]
fn tracked<M: Maps>(m: &M, hook: &Hook, flow: &Flow, p: &Packet) -> u8 {
    if follow(m, &flow.ct_key(hook.ifindex, hook.dir), p, false, hook.now) {
        return TRACKED_ESTABLISHED;
    }
    if follow(m, &flow.reply_key(hook.ifindex, hook.dir), p, true, hook.now) {
        return TRACKED_REPLY;
    }
    TRACKED_NOT
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
#[cfg_attr(target_arch = "bpf", inline(never))]
fn judge<M: Maps>(m: &M, ep: &EndpointInfo, dir: u8, flow: &Flow) -> Reason {
    let peer = if dir == DIR_EGRESS { flow.dst } else { flow.src };
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
fn matching<M: Maps>(m: &M, profile: u32, dir: u8, peer: Addr, flow: &Flow) -> PolicyValue {
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
    use crate::packet::IPPROTO_ICMPV6;
    use crate::packet::{
        ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    };
    use crate::{EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, classify_frame, v4_mapped};

    /// The maps as plain collections: `policy` holds exact (profile, dir, peer) triples that
    /// admit any protocol and port.
    #[derive(Default)]
    struct Model {
        ifaces: HashMap<u32, IfaceInfo>,
        endpoints: HashMap<Addr, EndpointInfo>,
        identities: HashMap<Addr, u32>,
        policy: HashSet<(u32, u8, u32)>,
        ct: RefCell<HashMap<CtKey, CtValue>>,
        frags: RefCell<HashMap<FragKey, FragValue>>,
    }

    impl Maps for Model {
        fn iface(&self, ifindex: u32) -> Option<&IfaceInfo> {
            self.ifaces.get(&ifindex)
        }
        fn endpoint(&self, ip: Addr) -> Option<EndpointInfo> {
            self.endpoints.get(&ip).copied()
        }
        fn is_node_ip(&self, _: Addr) -> bool {
            false
        }
        fn identity(&self, ip: Addr) -> Option<u32> {
            self.identities.get(&ip).copied()
        }
        fn prefix_id(&self, _: Addr) -> Option<u32> {
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
    // IPv6: e and c are dual stack, a is IPv4 only.
    const E6: Addr = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
    const C6: Addr = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3];
    const LL_A: Addr = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xa];

    fn model() -> Model {
        let mut m = Model::default();
        m.ifaces.insert(A_IF, IfaceInfo::default().with(v4_mapped(A)));
        m.ifaces.insert(E_IF, IfaceInfo::default().with(v4_mapped(E)).with(E6));
        let a = EndpointInfo { flags: EP_EGRESS_ISOLATED, profiles: [0, 1], ifindex: A_IF };
        m.endpoints.insert(v4_mapped(A), a);
        let e = EndpointInfo { flags: EP_INGRESS_ISOLATED, profiles: [2, 0], ifindex: E_IF };
        m.endpoints.insert(v4_mapped(E), e);
        m.endpoints.insert(E6, e);
        m.identities.insert(v4_mapped(C), 3);
        m.identities.insert(C6, 3);
        m.identities.insert(v4_mapped(A), 1);
        m.identities.insert(v4_mapped(E), 5);
        m.identities.insert(E6, 5);
        m.policy.insert((2, DIR_INGRESS, 3));
        m
    }

    /// An IPv6 frame with a TCP or UDP header, or `l4` as given for other protocols.
    fn frame6(
        src: Addr,
        dst: Addr,
        proto: u8,
        hop: u8,
        sport: u16,
        dport: u16,
        flags: u8,
    ) -> Vec<u8> {
        let v4 = frame([0; 4], [0; 4], proto, sport, dport, flags);
        let l4 = &v4[ETH_HLEN + 20..];
        let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        ip[6] = proto;
        ip[7] = hop;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&dst);
        p.extend_from_slice(&ip);
        p.extend_from_slice(l4);
        p
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
        let mut other = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x88, 0xb5];
        other.extend_from_slice(&[0x60; 48]);
        assert_eq!(
            deliver(&m, E_IF, UPLINK, &other, 0),
            Reason::Unsupported,
            "e is ingress-isolated"
        );
        assert_eq!(send(&m, E_IF, &other, 0), Reason::Unmanaged, "e's egress is not isolated");
        assert_eq!(send(&m, A_IF, &other, 0), Reason::Unsupported, "a's egress is");
        let mut arp = vec![0xff; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(send(&m, A_IF, &arp, 0), Reason::Unmanaged);
    }

    #[test]
    fn ipv6_is_judged_as_ipv4_is() {
        let mut m = model();
        // c's IPv6 address is admitted by e, over IPv6 as over IPv4, and tracked.
        let syn = frame6(C6, E6, IPPROTO_TCP, 64, 5000, 80, TCP_SYN);
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 0), Reason::Policy);
        let reply = frame6(E6, C6, IPPROTO_TCP, 64, 80, 5000, TCP_SYN | TCP_ACK);
        assert_eq!(send(&m, E_IF, &reply, 1), Reason::Reply);
        m.policy.clear();
        let ack = frame6(C6, E6, IPPROTO_TCP, 64, 5000, 80, TCP_ACK);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ack, 2), Reason::Established);
        assert_eq!(deliver(&m, E_IF, UPLINK, &syn, 3), Reason::Denied);
        // An address no identity holds (a link-local one) is judged, not passed.
        m.policy.insert((2, DIR_INGRESS, 3));
        let ll = frame6(LL_A, E6, IPPROTO_UDP, 64, 1, 53, 0);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ll, 4), Reason::Denied);
        // An IPv4 identity does not answer for an IPv6 address: the families are apart.
        assert!(!m.identities.contains_key(&C6.map(|b| b ^ 1)));
    }

    #[test]
    fn ipv6_sources_are_checked() {
        let m = model();
        // a has no IPv6 address: it sends none (its link-local one included).
        let forged = frame6(C6, E6, IPPROTO_TCP, 64, 1, 80, TCP_SYN);
        assert_eq!(send(&m, A_IF, &forged, 0), Reason::Spoofed);
        let ll = frame6(LL_A, E6, IPPROTO_TCP, 64, 1, 80, TCP_SYN);
        assert_eq!(send(&m, A_IF, &ll, 0), Reason::Spoofed);
        // e may send from E6 only.
        assert_eq!(
            send(&m, E_IF, &frame6(E6, C6, IPPROTO_UDP, 64, 1, 9, 0), 0),
            Reason::NotIsolated
        );
        assert_eq!(send(&m, E_IF, &frame6(C6, C6, IPPROTO_UDP, 64, 1, 9, 0), 0), Reason::Spoofed);
        // E6 arriving at a through the uplink is not e's.
        let mut m = m;
        m.endpoints.get_mut(&v4_mapped(A)).unwrap().flags |= EP_INGRESS_ISOLATED;
        m.endpoints.get_mut(&v4_mapped(A)).unwrap().profiles[0] = 7;
        let to_a = frame6(E6, LL_A, IPPROTO_TCP, 64, 80, 1, TCP_SYN);
        assert_eq!(deliver(&m, A_IF, UPLINK, &to_a, 0), Reason::Spoofed);
        // And from e's own interface it is judged by a's (IPv4) endpoint: isolated, denied.
        assert_eq!(deliver(&m, A_IF, E_IF, &to_a, 0), Reason::Denied);
    }

    #[test]
    fn neighbour_discovery_passes_only_on_the_link() {
        let m = model();
        let ns = |src: Addr, dst: Addr, hop: u8| {
            let mut f = frame6(src, dst, IPPROTO_ICMPV6, hop, 0, 0, 0);
            f[ETH_HLEN + 40] = 135;
            f
        };
        let mut all_nodes = [0u8; 16];
        all_nodes[0] = 0xff;
        all_nodes[1] = 0x02;
        all_nodes[15] = 1;
        // a (no IPv6, egress isolated) resolves its gateway: passes, as ARP does.
        assert_eq!(send(&m, A_IF, &ns(LL_A, all_nodes, 255), 0), Reason::Unmanaged);
        // Shaped as neighbour discovery but sent to a routable address: a's egress denies it.
        assert_eq!(send(&m, A_IF, &ns(v4_mapped(A).map(|_| 0xfd), C6, 255), 0), Reason::Spoofed);
        // The node's solicitation reaches e; one a router forwarded (hop limit 254) is judged.
        assert_eq!(deliver(&m, E_IF, UPLINK, &ns(LL_A, E6, 255), 0), Reason::Unmanaged);
        assert_eq!(deliver(&m, E_IF, UPLINK, &ns(LL_A, E6, 254), 0), Reason::Denied);
    }
}
