//! The per-packet decision, independent of where the maps live.
//!
//! The eBPF programs implement [`Maps`] over BPF maps; unit tests implement it over plain
//! collections. The cost is a fixed number of lookups, whatever the number of policies: the
//! endpoint, two connection-tracking keys, the node addresses, the peer's identity and CIDR
//! prefix, and at most three policy-trie lookups (identity, prefix, any).

use crate::{
    CtKey, DIR_EGRESS, DIR_INGRESS, EndpointInfo, FragKey, FragValue, PEER_ANY, POLICY_PREFIX_FULL,
    PolicyKeyData, Reason, policy_key,
};

/// The lookups a decision needs.
pub trait Maps {
    fn endpoint(&self, ip: [u8; 4]) -> Option<EndpointInfo>;
    fn ct_contains(&self, key: &CtKey) -> bool;
    fn is_node_ip(&self, ip: [u8; 4]) -> bool;
    /// The pod identity of an address.
    fn identity(&self, ip: [u8; 4]) -> Option<u32>;
    /// The id of the longest listed CIDR prefix holding the address.
    fn prefix_id(&self, ip: [u8; 4]) -> Option<u32>;
    /// Whether an entry of the policy trie matches the key (longest-prefix match).
    fn policy_matches(&self, prefix_len: u32, key: &PolicyKeyData) -> bool;
}

/// What the program knows of a packet after parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    /// Ports (host order) for TCP, UDP and SCTP; 0 for other protocols.
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn ct_key(&self, dir: u8) -> CtKey {
        CtKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            protocol: self.protocol,
            dir,
            pad: [0; 2],
        }
    }

    /// The key a reply to this flow would have had when its request was allowed.
    pub fn reply_key(&self, dir: u8) -> CtKey {
        let other = if dir == DIR_INGRESS { DIR_EGRESS } else { DIR_INGRESS };
        CtKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            protocol: self.protocol,
            dir: other,
            pad: [0; 2],
        }
    }

    pub fn frag_key(&self, id: u16, dir: u8) -> FragKey {
        FragKey { src: self.src, dst: self.dst, id, protocol: self.protocol, dir }
    }

    pub fn frag_value(&self) -> FragValue {
        FragValue { sport: self.sport, dport: self.dport }
    }
}

/// The outcome: the reason says whether it is allowed; `track` whether the flow should be
/// recorded in connection tracking (a new flow that was allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub track: bool,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.reason.allowed()
    }

    const fn of(reason: Reason, track: bool) -> Self {
        Self { reason, track }
    }
}

/// Decides a packet seen in direction `dir` (of the pod at the veth: for `DIR_EGRESS` the
/// endpoint is the source, for `DIR_INGRESS` the destination).
pub fn decide<M: Maps>(maps: &M, flow: &Flow, dir: u8) -> Decision {
    let (endpoint, peer) =
        if dir == DIR_EGRESS { (flow.src, flow.dst) } else { (flow.dst, flow.src) };
    let Some(ep) = maps.endpoint(endpoint) else {
        return Decision::of(Reason::Unmanaged, false);
    };
    // Connection tracking comes first so that flows allowed before an isolation change go on.
    if maps.ct_contains(&flow.ct_key(dir)) {
        return Decision::of(Reason::Established, false);
    }
    if maps.ct_contains(&flow.reply_key(dir)) {
        return Decision::of(Reason::Reply, false);
    }
    // New flows are tracked even when not isolated: their replies must pass if the endpoint
    // becomes isolated in the other direction while the flow lives.
    if !ep.isolated(dir) {
        return Decision::of(Reason::NotIsolated, true);
    }
    if maps.is_node_ip(peer) {
        return Decision::of(Reason::Node, true);
    }
    if admitted(maps, ep.profile(dir), dir, peer, flow) {
        return Decision::of(Reason::Policy, true);
    }
    Decision::of(Reason::Denied, false)
}

fn admitted<M: Maps>(maps: &M, profile: u32, dir: u8, peer: [u8; 4], flow: &Flow) -> bool {
    // A rule's ports are the destination's, in both directions.
    let check = |peer_id: u32| {
        maps.policy_matches(
            POLICY_PREFIX_FULL,
            &policy_key(profile, dir, peer_id, flow.protocol, flow.dport),
        )
    };
    if let Some(id) = maps.identity(peer)
        && check(id)
    {
        return true;
    }
    if let Some(id) = maps.prefix_id(peer)
        && check(id)
    {
        return true;
    }
    check(PEER_ANY)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentKind {
    Whole,
    First,
    Later,
}
