//! Map keys and values shared by the eBPF programs (`npm-ebpf`) and the agent (`npm-agent`),
//! and the per-packet logic itself: [`packet`] reads a frame, [`decide`] judges it against the
//! maps and keeps connection tracking ([`conntrack`]). Both are written against traits
//! ([`packet::Frame`], [`decide::Maps`]) so that they run in the kernel (over the skb and BPF
//! maps) and on the host (over byte slices and plain collections, in tests and fuzzing).
//!
//! Everything stored in a map is `#[repr(C)]` plain old data so both sides agree on the layout
//! byte for byte. With the `user` feature the types also implement [`aya::Pod`].
//!
//! Addresses of both families are one type, [`Addr`]: the sixteen bytes of an IPv6 address,
//! an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`), in network order. So one set of maps
//! and one decision serve both families (map keys are compared bytewise, and LPM tries need
//! network order); an IPv4 prefix of length `n` is the mapped prefix of length `96 + n`. A
//! real IPv6 packet never carries a mapped address ([`packet`] refuses it), so the two
//! families cannot be confused.
#![no_std]

pub mod conntrack;
pub mod decide;
pub mod events;
pub mod packet;

pub use conntrack::{CtKey, CtValue};
pub use decide::{Hook, Maps, Verdict, decide};
pub use events::{DropEvent, RateLimit, drop_event, rate_admit};
pub use packet::{Flow, Frame, Packet, classify_frame};

// ---- addresses ----

/// An address of either family, as the maps key it (see the crate's documentation).
pub type Addr = [u8; 16];

/// The unspecified address: no address.
pub const ADDR_NONE: Addr = [0; 16];

/// An IPv4 address as the maps key it: mapped into IPv6.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Whether an address is an IPv4 one (mapped).
#[inline(always)]
pub fn is_v4_mapped(a: &Addr) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// The IPv4 address of a mapped one.
#[inline(always)]
pub fn v4_of(a: &Addr) -> Option<[u8; 4]> {
    is_v4_mapped(a).then_some([a[12], a[13], a[14], a[15]])
}

/// What an IPv4 prefix length adds up to in the CIDR trie (its mapped form).
pub const V4_PREFIX_OFFSET: u32 = 96;

// ---- map and program names (the agent pins maps under these names) ----

pub const MAP_ENDPOINTS: &str = "NPM_ENDPOINTS";
pub const MAP_IFACES: &str = "NPM_IFACES";
pub const MAP_IDENTITIES: &str = "NPM_IDENTITIES";
pub const MAP_CIDRS: &str = "NPM_CIDRS";
pub const MAP_POLICY: &str = "NPM_POLICY";
pub const MAP_NODE_IPS: &str = "NPM_NODE_IPS";
pub const MAP_CT: &str = "NPM_CT";
pub const MAP_FRAGS: &str = "NPM_FRAGS";
pub const MAP_COUNTERS: &str = "NPM_COUNTERS";
pub const MAP_CONFIG: &str = "NPM_CONFIG";
pub const MAP_EVENTS: &str = "NPM_EVENTS";
pub const MAP_EVENT_RATE: &str = "NPM_EVENT_RATE";

/// Every map, for pinning, reconciliation and cleanup.
pub const ALL_MAPS: [&str; 12] = [
    MAP_ENDPOINTS,
    MAP_IFACES,
    MAP_IDENTITIES,
    MAP_CIDRS,
    MAP_POLICY,
    MAP_NODE_IPS,
    MAP_CT,
    MAP_FRAGS,
    MAP_COUNTERS,
    MAP_CONFIG,
    MAP_EVENTS,
    MAP_EVENT_RATE,
];

/// The program on the host side's tc ingress: packets leaving the pod (its egress).
pub const PROG_FROM_POD: &str = "npm_from_pod";
/// The program on the host side's tc egress: packets entering the pod (its ingress).
pub const PROG_TO_POD: &str = "npm_to_pod";

// ---- map sizes ----

pub const MAX_ENDPOINTS: u32 = 4096;
pub const MAX_IFACES: u32 = 4096;
pub const MAX_IDENTITIES: u32 = 262_144;
pub const MAX_CIDRS: u32 = 65_536;
pub const MAX_POLICY: u32 = 1_048_576;
pub const MAX_NODE_IPS: u32 = 64;
pub const MAX_CT: u32 = 262_144;
pub const MAX_FRAGS: u32 = 8192;
/// Bytes of the drop-event ring buffer (a power of two pages): 2,900 events of 80 bytes
/// and their headers, far more than the rate limiter lets through between two reads.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

// ---- directions, as the pod sees them ----

/// Traffic entering the pod (host-side tc egress).
pub const DIR_INGRESS: u8 = 0;
/// Traffic leaving the pod (host-side tc ingress).
pub const DIR_EGRESS: u8 = 1;

// ---- endpoints ----

/// `EndpointInfo::flags`: the endpoint is isolated for ingress.
pub const EP_INGRESS_ISOLATED: u32 = 1 << 0;
/// `EndpointInfo::flags`: the endpoint is isolated for egress.
pub const EP_EGRESS_ISOLATED: u32 = 1 << 1;

/// Value of the endpoint map, keyed by each of the pod's addresses (the values of a
/// dual-stack pod's two addresses are equal).
///
/// An isolated direction names a *profile*: the policy-trie entries it is allowed by.
/// Endpoints whose entries are equal (replicas of one Deployment, as a rule) share one
/// profile, so the trie holds each distinct set of entries once, not once per pod; and an
/// endpoint moves to other entries atomically, by one write of this value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EndpointInfo {
    pub flags: u32,
    /// Profile of each direction, indexed by `DIR_INGRESS` / `DIR_EGRESS`.
    pub profiles: [u32; 2],
    /// The host side of the pod's veth, once the programs are attached to it (0 before):
    /// a packet whose source is this pod must have come in through it.
    pub ifindex: u32,
}

impl EndpointInfo {
    /// Whether NetworkPolicies isolate this direction: what no entry admits is refused.
    pub fn isolated(&self, dir: u8) -> bool {
        let bit = if dir == DIR_INGRESS { EP_INGRESS_ISOLATED } else { EP_EGRESS_ISOLATED };
        self.flags & bit != 0
    }

    /// Whether any policy judges this direction (it has a profile): isolated, or selected by
    /// a ClusterNetworkPolicy whose entries may deny. Odd packets (unreadable ports, stray
    /// fragments, other ethertypes) are refused where this holds.
    pub fn enforced(&self, dir: u8) -> bool {
        self.profile(dir) != 0
    }

    /// The profile whose entries admit this direction's traffic.
    pub fn profile(&self, dir: u8) -> u32 {
        if dir == DIR_INGRESS { self.profiles[0] } else { self.profiles[1] }
    }
}

/// Value of the interface map, keyed by the ifindex of the host side of a local pod's veth:
/// whose interface it is. The programs know the pod from the interface a packet crosses,
/// never from the addresses the packet claims.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct IfaceInfo {
    /// The pod's IPv4 address (mapped): the only IPv4 source its packets may carry.
    pub ip4: Addr,
    /// The pod's IPv6 address: the only IPv6 source its packets may carry.
    pub ip6: Addr,
    /// `IFACE_HAS_V4` / `IFACE_HAS_V6`: which of the two the pod has.
    pub families: u32,
}

/// `IfaceInfo::families`: the pod has an IPv4 address.
pub const IFACE_HAS_V4: u32 = 1 << 0;
/// `IfaceInfo::families`: the pod has an IPv6 address.
pub const IFACE_HAS_V6: u32 = 1 << 1;

impl IfaceInfo {
    /// The pod's address of a family (`v6`), if it has one.
    #[inline(always)]
    pub fn own(&self, v6: bool) -> Option<Addr> {
        if v6 {
            (self.families & IFACE_HAS_V6 != 0).then_some(self.ip6)
        } else {
            (self.families & IFACE_HAS_V4 != 0).then_some(self.ip4)
        }
    }

    /// Whether `a` is the pod's own address of a family (`v6`).
    #[inline(always)]
    pub fn is_own(&self, v6: bool, a: &Addr) -> bool {
        let (bit, own) = if v6 { (IFACE_HAS_V6, &self.ip6) } else { (IFACE_HAS_V4, &self.ip4) };
        self.families & bit != 0 && own == a
    }

    /// The address whose endpoint judges a packet of a family at this interface: the pod's
    /// own of that family, or else its other one (the endpoints of a pod's addresses hold the
    /// same profiles), so a pod without an IPv6 address is still isolated against IPv6;
    /// [`ADDR_NONE`] for an interface of no pod.
    ///
    /// (Plain values rather than `Option`s here and in the decision: the programs pass them
    /// between functions, and the verifier refuses copying the undefined payload of a `None`.)
    #[inline(always)]
    pub fn endpoint_addr(&self, v6: bool) -> Addr {
        let (first, second) = if v6 {
            ((IFACE_HAS_V6, self.ip6), (IFACE_HAS_V4, self.ip4))
        } else {
            ((IFACE_HAS_V4, self.ip4), (IFACE_HAS_V6, self.ip6))
        };
        if self.families & first.0 != 0 {
            first.1
        } else if self.families & second.0 != 0 {
            second.1
        } else {
            ADDR_NONE
        }
    }

    /// The interface with `addr` (either family) added.
    pub fn with(mut self, addr: Addr) -> Self {
        if is_v4_mapped(&addr) {
            self.ip4 = addr;
            self.families |= IFACE_HAS_V4;
        } else {
            self.ip6 = addr;
            self.families |= IFACE_HAS_V6;
        }
        self
    }

    /// The interface with `addr` (either family) removed.
    pub fn without(mut self, addr: Addr) -> Self {
        if is_v4_mapped(&addr) {
            if self.ip4 == addr {
                self.ip4 = ADDR_NONE;
                self.families &= !IFACE_HAS_V4;
            }
        } else if self.ip6 == addr {
            self.ip6 = ADDR_NONE;
            self.families &= !IFACE_HAS_V6;
        }
        self
    }
}

// ---- identities ----

/// The peer id of a policy entry that admits any address.
pub const PEER_ANY: u32 = 0;
/// Peer ids at or above this stand for a CIDR prefix of the CIDR trie; below it, for a pod
/// identity of the identity map.
pub const PREFIX_ID_BASE: u32 = 0x8000_0000;

// ---- the policy trie ----

/// Bytes of a policy key: profile (4, big-endian), direction (1), peer id (4, big-endian),
/// protocol (1), port (2, big-endian). Wildcards are trailing bits cut off by the prefix
/// length: "any protocol" stops after the peer, "every port of a protocol" after the protocol,
/// and a port range is a set of aligned power-of-two port blocks.
pub type PolicyKeyData = [u8; 12];

/// Prefix length of a key matching any protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length of a key matching every port of one protocol.
pub const POLICY_PREFIX_PROTO: u32 = 80;
/// Prefix length of a key matching one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

pub fn policy_key(profile: u32, dir: u8, peer: u32, protocol: u8, port: u16) -> PolicyKeyData {
    let endpoint = profile.to_be_bytes();
    let p = peer.to_be_bytes();
    let port = port.to_be_bytes();
    [
        endpoint[0],
        endpoint[1],
        endpoint[2],
        endpoint[3],
        dir,
        p[0],
        p[1],
        p[2],
        p[3],
        protocol,
        port[0],
        port[1],
    ]
}

/// Value of the policy trie: what the entries of a key decide, folded with those of every
/// shorter key of the same (profile, direction, peer), so that the longest match alone
/// holds all that covers the packet. Tiers are resolved by the compiler into verdict
/// codes ([`verdict_code`]): the lowest code of a tier is its first matching rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PolicyValue {
    /// The first matching Admin-tier rule's code, or [`VERDICT_NONE`].
    pub admin: u32,
    /// The first matching Baseline-tier rule's code, or [`VERDICT_NONE`].
    pub baseline: u32,
    /// 1 when a NetworkPolicy admits.
    pub allow: u32,
}

/// No rule of the tier matches.
pub const VERDICT_NONE: u32 = u32::MAX;
/// A verdict code's action (its two low bits).
pub const ACTION_ACCEPT: u32 = 0;
pub const ACTION_DENY: u32 = 1;
pub const ACTION_PASS: u32 = 2;

impl PolicyValue {
    /// Nothing matches.
    pub const NONE: Self = Self { admin: VERDICT_NONE, baseline: VERDICT_NONE, allow: 0 };
    /// A NetworkPolicy admits, nothing else.
    pub const ALLOW: Self = Self { admin: VERDICT_NONE, baseline: VERDICT_NONE, allow: 1 };

    /// Both together: each tier's first rule, and whether anything admits.
    #[inline(always)]
    pub fn fold(self, other: Self) -> Self {
        Self {
            admin: if other.admin < self.admin { other.admin } else { self.admin },
            baseline: if other.baseline < self.baseline { other.baseline } else { self.baseline },
            allow: self.allow | other.allow,
        }
    }

    /// What the matching entries decide for a direction NetworkPolicies isolate or not:
    /// `Some(true)` admitted by a rule, `Some(false)` refused, `None` left to the default
    /// (allowed: nothing isolates it). The Admin tier's first rule decides unless it
    /// passes; then the NetworkPolicies (final where they isolate); then the Baseline tier.
    #[inline(always)]
    pub fn decision(self, isolated: bool) -> Option<bool> {
        if self.admin != VERDICT_NONE {
            match self.admin & 3 {
                ACTION_ACCEPT => return Some(true),
                ACTION_DENY => return Some(false),
                _ => {}
            }
        }
        if self.allow != 0 {
            return Some(true);
        }
        if isolated {
            return Some(false);
        }
        if self.baseline != VERDICT_NONE {
            match self.baseline & 3 {
                ACTION_ACCEPT => return Some(true),
                ACTION_DENY => return Some(false),
                _ => {}
            }
        }
        None
    }
}

/// A ClusterNetworkPolicy rule's verdict code: lower first. `slot` orders the policies of
/// equal priority (by name); rules are in order within a policy. Priorities run to 1000 and
/// a direction has at most 25 rules (the CRD's limits); values beyond the fields saturate.
pub fn verdict_code(priority: u32, slot: u32, rule: u32, action: u32) -> u32 {
    let clamp = |v: u32, max: u32| if v > max { max } else { v };
    (clamp(priority, 1023) << 16) | (clamp(slot, 255) << 8) | (clamp(rule, 63) << 2) | (action & 3)
}

/// The key with every bit past `prefix_len` cleared: what the kernel's trie compares.
pub fn policy_key_prefix(key: &PolicyKeyData, prefix_len: u32) -> PolicyKeyData {
    let mut k = *key;
    let mut i = 0;
    while i < k.len() {
        let bit = i as u32 * 8;
        if bit >= prefix_len {
            k[i] = 0;
        } else if bit + 8 > prefix_len {
            k[i] &= 0xffu8 << (8 - (prefix_len - bit));
        }
        i += 1;
    }
    k
}

// ---- counters ----

/// Why a packet was passed or dropped: the index of a counter within its direction.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Allowed: the endpoint is not isolated in this direction.
    NotIsolated = 0,
    /// Allowed: a policy entry admits it.
    Policy = 1,
    /// Allowed: to or from the node's own addresses.
    Node = 2,
    /// Allowed: a later packet of a tracked flow.
    Established = 3,
    /// Allowed: a reply of a flow tracked in the other direction.
    Reply = 4,
    /// Passed: not a packet of a known endpoint, or ARP or IPv6 neighbour discovery, or (at an
    /// endpoint no policy judges in this direction) a frame of another ethertype.
    Unmanaged = 5,
    /// Dropped: no policy admits it.
    Denied = 6,
    /// Dropped: malformed or truncated IPv4 or IPv6 (truncated transport headers only at an
    /// isolated endpoint).
    Malformed = 7,
    /// Dropped: a later fragment whose first fragment was not seen, at an isolated endpoint.
    Fragment = 8,
    /// Allowed: an ICMP error about a tracked flow (as the kernel's conntrack says RELATED).
    Related = 9,
    /// Dropped: a packet leaving a pod with a source address that is not the pod's, or
    /// arriving with a local pod's address through another interface than that pod's.
    Spoofed = 10,
    /// Dropped: a frame of another ethertype than IPv4, IPv6 and ARP to or from an endpoint
    /// a policy judges in that direction: failing closed.
    Unsupported = 11,
}

pub const REASONS: u32 = 12;

impl Reason {
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::NotIsolated,
        Reason::Policy,
        Reason::Node,
        Reason::Established,
        Reason::Reply,
        Reason::Unmanaged,
        Reason::Denied,
        Reason::Malformed,
        Reason::Fragment,
        Reason::Related,
        Reason::Spoofed,
        Reason::Unsupported,
    ];

    pub fn allowed(self) -> bool {
        !matches!(
            self,
            Reason::Denied
                | Reason::Malformed
                | Reason::Fragment
                | Reason::Spoofed
                | Reason::Unsupported
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::NotIsolated => "not_isolated",
            Reason::Policy => "policy",
            Reason::Node => "node",
            Reason::Established => "established",
            Reason::Reply => "reply",
            Reason::Unmanaged => "unmanaged",
            Reason::Denied => "denied",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::Related => "related",
            Reason::Spoofed => "spoofed",
            Reason::Unsupported => "unsupported",
        }
    }
}

/// Index of a counter in the per-CPU counter array.
pub fn counter_index(dir: u8, reason: Reason) -> u32 {
    dir as u32 * REASONS + reason as u32
}

pub const COUNTERS: u32 = 2 * REASONS;

// ---- run-time configuration ----

/// Index in the config array: the cost of one drop event in ns of the rate limiter's credit
/// (10^9 / events a second per CPU); 0: no events. (Index 0 is unused: it was the aya-log
/// switch of earlier versions.)
pub const CONFIG_EVENT_COST_NS: u32 = 1;
/// Index in the config array: how many events a CPU may send at once after a quiet time.
pub const CONFIG_EVENT_BURST: u32 = 2;
pub const CONFIG_ENTRIES: u32 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `#[repr(C)]`, has no padding and accepts every bit pattern
    // (`bytemuck::Pod`, checked by the derive at compile time).
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::conntrack::CtKey {}
    unsafe impl aya::Pod for super::conntrack::CtValue {}
    unsafe impl aya::Pod for super::conntrack::FragKey {}
    unsafe impl aya::Pod for super::conntrack::FragValue {}
    unsafe impl aya::Pod for super::events::DropEvent {}
    unsafe impl aya::Pod for super::events::RateLimit {}
}

/// Splits the port range `first..=last` into aligned blocks `(start, free_bits)`: each block
/// holds the ports `start..start + 2^free_bits`, the shape an LPM key can express.
pub fn port_blocks(first: u16, last: u16, mut out: impl FnMut(u16, u32)) {
    let (mut lo, hi) = (first as u32, last as u32);
    while lo <= hi {
        // The largest aligned block starting at `lo` that does not pass `hi`.
        let mut bits = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out(lo as u16, bits);
        lo += 1 << bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<EndpointInfo>(), 16);
        assert_eq!(core::mem::size_of::<IfaceInfo>(), 36);
        assert_eq!(core::mem::size_of::<CtKey>(), 44);
        assert_eq!(core::mem::size_of::<CtValue>(), 16);
        assert_eq!(core::mem::size_of::<conntrack::FragKey>(), 44);
        assert_eq!(core::mem::size_of::<conntrack::FragValue>(), 4);
    }

    #[test]
    fn addresses_of_both_families() {
        let a = v4_mapped([10, 0, 0, 1]);
        assert!(is_v4_mapped(&a));
        assert_eq!(v4_of(&a), Some([10, 0, 0, 1]));
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[15] = 1;
        assert!(!is_v4_mapped(&b));
        assert_eq!(v4_of(&b), None);
        let i = IfaceInfo::default().with(a).with(b);
        assert_eq!((i.own(false), i.own(true)), (Some(a), Some(b)));
        assert!(i.is_own(false, &a) && i.is_own(true, &b) && !i.is_own(true, &a));
        let i = i.without(a);
        assert_eq!((i.own(false), i.endpoint_addr(false)), (None, b));
        assert!(!i.is_own(false, &ADDR_NONE), "no address is not the zero address");
        assert_eq!(i.without(b), IfaceInfo::default());
    }

    #[test]
    fn policy_key_layout() {
        let k = policy_key(u32::from_be_bytes([10, 0, 0, 1]), DIR_EGRESS, 0x0102_0304, 6, 8080);
        assert_eq!(k, [10, 0, 0, 1, 1, 1, 2, 3, 4, 6, 0x1f, 0x90]);
    }

    fn blocks(first: u16, last: u16) -> ([(u16, u32); 40], usize) {
        let mut v = [(0, 0); 40];
        let mut n = 0;
        port_blocks(first, last, |s, b| {
            v[n] = (s, b);
            n += 1;
        });
        (v, n)
    }

    #[test]
    fn port_blocks_cover_exactly() {
        for (first, last) in [
            (80, 80),
            (80, 81),
            (1, 65535),
            (1000, 2000),
            (0, 65535),
            (65535, 65535),
            (32768, 65535),
            (7, 9),
        ] {
            let (v, n) = blocks(first, last);
            let mut covered = 0u32;
            let mut next = first as u32;
            for &(s, b) in &v[..n] {
                assert_eq!(s as u32, next, "blocks are contiguous");
                assert_eq!(s as u32 % (1 << b), 0, "blocks are aligned");
                next += 1 << b;
                covered += 1 << b;
            }
            assert_eq!(covered, last as u32 - first as u32 + 1);
            assert!(n <= 32);
        }
        assert_eq!(blocks(0, 65535).1, 1);
        assert_eq!(blocks(80, 80).1, 1);
    }
}
