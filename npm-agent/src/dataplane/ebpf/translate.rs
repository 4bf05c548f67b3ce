//! From plan diffs to BPF map operations: the eBPF dataplane's encoding of the plan, pure and
//! host-testable.
//!
//! Encoding (see `npm_common`):
//! - endpoints: pod address -> isolation flags;
//! - identities: pod address -> identity (the plan's numbers);
//! - CIDR trie: every prefix that an ipBlock of a local endpoint names (its cidr and each
//!   except) -> its own prefix id. A longest-prefix match gives the most specific named
//!   prefix holding an address, so a block admits the address exactly when it admits that
//!   prefix: the prefix lies inside the block's cidr and inside none of its excepts;
//! - policy trie: (endpoint, direction, peer id, protocol, port) with wildcards as shorter
//!   prefixes; a port range becomes aligned power-of-two blocks. A CIDR allow entry becomes
//!   one key per named prefix it admits; a peer-set entry one key per member identity (the
//!   per-packet lookup stays one identity lookup and one trie lookup however many sets
//!   there are). Keys are counted, since several entries may need the same key.
//!
//! Order: each plan change becomes operations that keep its make-before-break meaning. A
//! newly named prefix first gets the entries of every allow that admits it, then enters the
//! trie; a prefix no longer named leaves the trie before its entries go.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use npm_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointInfo, PEER_ANY, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PREFIX_ID_BASE, PolicyKeyData, policy_key, port_blocks,
};

use crate::model::{CidrBlock, Direction, ObjectKey};
use crate::plan::{Allow, Change, PeerMatch, PlanDiff, PortMatch, SetId};

/// One write to a BPF map (or to the attachments), in the order to perform them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    Attach { ip: Ipv4Addr, pod: ObjectKey },
    Detach { ip: Ipv4Addr },
    EndpointSet { ip: Ipv4Addr, info: EndpointInfo },
    EndpointDel { ip: Ipv4Addr },
    IdentitySet { ip: Ipv4Addr, id: u32 },
    IdentityDel { ip: Ipv4Addr },
    CidrSet { net: Ipv4Net, id: u32 },
    CidrDel { net: Ipv4Net },
    PolicyAdd { prefix_len: u32, key: PolicyKeyData },
    PolicyDel { prefix_len: u32, key: PolicyKeyData },
    NodeIpAdd { ip: Ipv4Addr },
    NodeIpDel { ip: Ipv4Addr },
}

pub fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

#[derive(Default)]
struct Endpoint {
    pod: Option<ObjectKey>,
    flags: u32,
    allows: [HashSet<Allow>; 2],
}

struct Prefix {
    id: u32,
    /// CIDR allows naming this prefix (as cidr or except).
    refs: u32,
}

/// A CIDR allow of one endpoint direction: what a named prefix's entries are made for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CidrAllow {
    ip: Ipv4Addr,
    dir: Direction,
    block: CidrBlock,
    ports: PortMatch,
}

/// A peer set: its members, and the entries naming it (endpoint, direction, ports).
#[derive(Default)]
struct PeerSetState {
    members: BTreeSet<u32>,
    users: HashSet<(Ipv4Addr, Direction, PortMatch)>,
}

/// The encoder's memory of what is in the maps.
#[derive(Default)]
pub struct Translator {
    sets: HashMap<SetId, PeerSetState>,
    endpoints: HashMap<Ipv4Addr, Endpoint>,
    prefixes: BTreeMap<Ipv4Net, Prefix>,
    next_prefix: u32,
    policy: HashMap<(u32, PolicyKeyData), u32>,
    cidr_allows: HashSet<CidrAllow>,
    identities: HashMap<Ipv4Addr, u32>,
    /// Plan entries the encoding cannot express (IPv6), counted for the logs.
    pub skipped_ipv6: u64,
}

/// Sizes of what the maps hold, as the translator knows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub endpoints: usize,
    pub identities: usize,
    pub cidr_prefixes: usize,
    pub policy_entries: usize,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn encoded(&self) -> Encoded {
        Encoded {
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            cidr_prefixes: self.prefixes.len(),
            policy_entries: self.policy.len(),
        }
    }

    /// Every key the maps should hold now (for reconciling maps found pinned at start-up).
    pub fn desired(&self) -> Desired {
        Desired {
            endpoints: self.endpoints.keys().copied().collect(),
            identities: self.identities.keys().copied().collect(),
            cidrs: self.prefixes.keys().copied().collect(),
            policy: self.policy.keys().copied().collect(),
        }
    }

    /// Translates one diff into map operations, in order.
    pub fn translate(&mut self, diff: &PlanDiff) -> Vec<MapOp> {
        let mut ops = Vec::new();
        for c in &diff.changes {
            self.change(c, &mut ops);
        }
        ops
    }

    fn change(&mut self, c: &Change, ops: &mut Vec<MapOp>) {
        match c {
            Change::AddNodeIp { ip } => match v4(*ip) {
                Some(ip) => ops.push(MapOp::NodeIpAdd { ip }),
                None => self.skipped_ipv6 += 1,
            },
            Change::RemoveNodeIp { ip } => {
                if let Some(ip) = v4(*ip) {
                    ops.push(MapOp::NodeIpDel { ip });
                }
            }
            Change::AddEndpoint { ip, pod } | Change::RetargetEndpoint { ip, pod } => {
                let Some(ip) = v4(*ip) else {
                    self.skipped_ipv6 += 1;
                    return;
                };
                let ep = self.endpoints.entry(ip).or_default();
                ep.pod = Some(pod.clone());
                ops.push(MapOp::EndpointSet { ip, info: EndpointInfo { flags: ep.flags } });
                ops.push(MapOp::Attach { ip, pod: pod.clone() });
            }
            Change::RemoveEndpoint { ip } => {
                let Some(ip) = v4(*ip) else { return };
                let Some(ep) = self.endpoints.get(&ip) else { return };
                ops.push(MapOp::Detach { ip });
                ops.push(MapOp::EndpointDel { ip });
                let allows: Vec<(Direction, Allow)> = Direction::BOTH
                    .into_iter()
                    .flat_map(|d| ep.allows[d as usize].iter().map(move |a| (d, a.clone())))
                    .collect();
                for (d, a) in allows {
                    self.remove_allow(ip, d, &a, ops);
                }
                self.endpoints.remove(&ip);
            }
            Change::SetIsolation { ip, direction, isolated } => {
                let Some(ip) = v4(*ip) else { return };
                let Some(ep) = self.endpoints.get_mut(&ip) else { return };
                let bit = match direction {
                    Direction::Ingress => EP_INGRESS_ISOLATED,
                    Direction::Egress => EP_EGRESS_ISOLATED,
                };
                if *isolated {
                    ep.flags |= bit;
                } else {
                    ep.flags &= !bit;
                }
                ops.push(MapOp::EndpointSet { ip, info: EndpointInfo { flags: ep.flags } });
            }
            Change::AddAllow { ip, direction, allow } => {
                let Some(ip) = v4(*ip) else { return };
                if let Some(ep) = self.endpoints.get_mut(&ip) {
                    if ep.allows[*direction as usize].insert(allow.clone()) {
                        self.add_allow(ip, *direction, allow, ops);
                    }
                }
            }
            Change::RemoveAllow { ip, direction, allow } => {
                let Some(ip) = v4(*ip) else { return };
                if let Some(ep) = self.endpoints.get_mut(&ip) {
                    if ep.allows[*direction as usize].remove(allow) {
                        self.remove_allow(ip, *direction, allow, ops);
                    }
                }
            }
            Change::SetIdentity { ip, identity } => match v4(*ip) {
                Some(ip) => {
                    self.identities.insert(ip, *identity);
                    ops.push(MapOp::IdentitySet { ip, id: *identity });
                }
                None => self.skipped_ipv6 += 1,
            },
            Change::RemoveIdentity { ip } => {
                if let Some(ip) = v4(*ip) {
                    if self.identities.remove(&ip).is_some() {
                        ops.push(MapOp::IdentityDel { ip });
                    }
                }
            }
            Change::AddSet { set, .. } => {
                self.sets.entry(*set).or_default();
            }
            Change::RemoveSet { set } => {
                // Entries naming it are gone by now; drop their keys should any be left.
                if let Some(s) = self.sets.remove(set) {
                    for (ip, d, ports) in s.users {
                        for m in &s.members {
                            self.policy_keys(ip, d, *m, ports, false, ops);
                        }
                    }
                }
            }
            Change::AddMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else { return };
                if s.members.insert(*identity) {
                    let users: Vec<_> = s.users.iter().copied().collect();
                    for (ip, d, ports) in users {
                        self.policy_keys(ip, d, *identity, ports, true, ops);
                    }
                }
            }
            Change::RemoveMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else { return };
                if s.members.remove(identity) {
                    let users: Vec<_> = s.users.iter().copied().collect();
                    for (ip, d, ports) in users {
                        self.policy_keys(ip, d, *identity, ports, false, ops);
                    }
                }
            }
        }
    }

    /// Adds (or removes) the keys of a peer-set entry: one per member.
    fn set_entry(&mut self, ip: Ipv4Addr, d: Direction, set: SetId, ports: PortMatch, add: bool, ops: &mut Vec<MapOp>) {
        let s = self.sets.entry(set).or_default();
        let changed = if add { s.users.insert((ip, d, ports)) } else { s.users.remove(&(ip, d, ports)) };
        if !changed {
            return;
        }
        let members: Vec<u32> = s.members.iter().copied().collect();
        for m in members {
            self.policy_keys(ip, d, m, ports, add, ops);
        }
    }

    fn add_allow(&mut self, ip: Ipv4Addr, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => self.policy_keys(ip, d, PEER_ANY, allow.ports, true, ops),
            PeerMatch::Identity(id) => self.policy_keys(ip, d, *id, allow.ports, true, ops),
            PeerMatch::Set(s) => self.set_entry(ip, d, *s, allow.ports, true, ops),
            PeerMatch::Cidr(block) => {
                let Some((net, excepts)) = v4_block(block) else {
                    self.skipped_ipv6 += 1;
                    return;
                };
                for p in std::iter::once(net).chain(excepts) {
                    self.name_prefix(p, ops);
                }
                let ids: Vec<u32> = self.admitted(block).collect();
                for id in ids {
                    self.policy_keys(ip, d, id, allow.ports, true, ops);
                }
                self.cidr_allows.insert(CidrAllow { ip, dir: d, block: block.clone(), ports: allow.ports });
            }
        }
    }

    fn remove_allow(&mut self, ip: Ipv4Addr, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => self.policy_keys(ip, d, PEER_ANY, allow.ports, false, ops),
            PeerMatch::Identity(id) => self.policy_keys(ip, d, *id, allow.ports, false, ops),
            PeerMatch::Set(s) => self.set_entry(ip, d, *s, allow.ports, false, ops),
            PeerMatch::Cidr(block) => {
                let Some((net, excepts)) = v4_block(block) else { return };
                self.cidr_allows.remove(&CidrAllow { ip, dir: d, block: block.clone(), ports: allow.ports });
                let ids: Vec<u32> = self.admitted(block).collect();
                for id in ids {
                    self.policy_keys(ip, d, id, allow.ports, false, ops);
                }
                for p in std::iter::once(net).chain(excepts) {
                    self.unname_prefix(p, ops);
                }
            }
        }
    }

    /// Prefix ids of the named prefixes a block admits. Prefixes inside the block's cidr have
    /// their network address inside it: a range of the ordered map, not a scan of it.
    fn admitted<'a>(&'a self, block: &'a CidrBlock) -> impl Iterator<Item = u32> + 'a {
        let range = v4_block(block).map(|(n, _)| {
            let lo = Ipv4Net::new(n.network(), 0).expect("prefix 0 is valid");
            let hi = Ipv4Net::new(n.broadcast(), 32).expect("prefix 32 is valid");
            lo..=hi
        });
        range
            .into_iter()
            .flat_map(move |r| self.prefixes.range(r))
            .filter(move |(p, _)| admits(block, **p))
            .map(|(_, e)| e.id)
    }

    fn name_prefix(&mut self, p: Ipv4Net, ops: &mut Vec<MapOp>) {
        if let Some(e) = self.prefixes.get_mut(&p) {
            e.refs += 1;
            return;
        }
        let id = PREFIX_ID_BASE + self.next_prefix;
        self.next_prefix += 1;
        // Entries first: addresses that move to this prefix keep what admits them.
        let users: Vec<CidrAllow> = self.cidr_allows.iter().filter(|a| admits(&a.block, p)).cloned().collect();
        for a in users {
            self.policy_keys(a.ip, a.dir, id, a.ports, true, ops);
        }
        self.prefixes.insert(p, Prefix { id, refs: 1 });
        ops.push(MapOp::CidrSet { net: p, id });
    }

    fn unname_prefix(&mut self, p: Ipv4Net, ops: &mut Vec<MapOp>) {
        let Some(e) = self.prefixes.get_mut(&p) else { return };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let id = e.id;
        // Out of the trie first: its addresses fall back to the next shorter prefix.
        self.prefixes.remove(&p);
        ops.push(MapOp::CidrDel { net: p });
        let users: Vec<CidrAllow> = self.cidr_allows.iter().filter(|a| admits(&a.block, p)).cloned().collect();
        for a in users {
            self.policy_keys(a.ip, a.dir, id, a.ports, false, ops);
        }
    }

    /// Adds (or removes) the policy-trie keys of one (endpoint, direction, peer, ports).
    fn policy_keys(&mut self, ip: Ipv4Addr, d: Direction, peer: u32, ports: PortMatch, add: bool, ops: &mut Vec<MapOp>) {
        let ep = ip.octets();
        let dir = dir_byte(d);
        let mut keys: Vec<(u32, PolicyKeyData)> = Vec::new();
        match ports {
            PortMatch::Any => keys.push((POLICY_PREFIX_ANY_PROTO, policy_key(ep, dir, peer, 0, 0))),
            PortMatch::Protocol(p) => keys.push((POLICY_PREFIX_PROTO, policy_key(ep, dir, peer, p.number(), 0))),
            PortMatch::Range { protocol, first, last } => {
                port_blocks(first, last, |start, bits| {
                    keys.push((POLICY_PREFIX_FULL - bits, policy_key(ep, dir, peer, protocol.number(), start)))
                });
            }
        }
        for (prefix_len, key) in keys {
            let refs = self.policy.entry((prefix_len, key)).or_insert(0);
            if add {
                *refs += 1;
                if *refs == 1 {
                    ops.push(MapOp::PolicyAdd { prefix_len, key });
                }
            } else {
                *refs = refs.saturating_sub(1);
                if *refs == 0 {
                    self.policy.remove(&(prefix_len, key));
                    ops.push(MapOp::PolicyDel { prefix_len, key });
                }
            }
        }
    }
}

/// Whether a block admits every address of a named prefix (see the module docs).
fn admits(block: &CidrBlock, p: Ipv4Net) -> bool {
    let Some((net, excepts)) = v4_block(block) else { return false };
    net.contains(&p) && !excepts.iter().any(|e| e.contains(&p))
}

fn v4_block(block: &CidrBlock) -> Option<(Ipv4Net, Vec<Ipv4Net>)> {
    let net = match block.net {
        ipnet::IpNet::V4(n) => n,
        ipnet::IpNet::V6(_) => return None,
    };
    let excepts = block.except.iter().filter_map(|e| match e {
        ipnet::IpNet::V4(n) => Some(*n),
        ipnet::IpNet::V6(_) => None,
    });
    Some((net, excepts.collect()))
}

/// The keys the maps should hold.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub endpoints: HashSet<Ipv4Addr>,
    pub identities: HashSet<Ipv4Addr>,
    pub cidrs: HashSet<Ipv4Net>,
    pub policy: HashSet<(u32, PolicyKeyData)>,
}
