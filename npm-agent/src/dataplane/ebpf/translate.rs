//! From plan diffs to BPF map operations: the eBPF dataplane's encoding of the plan, pure and
//! host-testable.
//!
//! Encoding (see `npm_common`):
//! - endpoints: pod address -> isolation flags and, per isolated direction, a profile;
//! - profiles: the plan's profiles, by their numbers: the entries shared by every endpoint
//!   direction the same policies select. An endpoint's value (isolation and profile
//!   together) is written once per change of its profile, so an endpoint moves between
//!   entries atomically, and replicas cost one copy;
//! - identities: pod address -> identity (the plan's numbers);
//! - CIDR trie: every prefix that an ipBlock of a local endpoint names (its cidr and each
//!   except) -> its own prefix id. A longest-prefix match gives the most specific named
//!   prefix holding an address, so a block admits the address exactly when it admits that
//!   prefix: the prefix lies inside the block's cidr and inside none of its excepts;
//! - policy trie: (profile, direction, peer id, protocol, port) with wildcards as shorter
//!   prefixes; a port range becomes aligned power-of-two blocks. A CIDR allow entry becomes
//!   one key per named prefix it admits; a peer-set entry one key per member identity (the
//!   per-packet lookup stays one identity lookup and one trie lookup however many sets
//!   there are). Keys are counted, since several entries may need the same key.
//!
//!   The value of a key says what its entries decide: whether a NetworkPolicy admits, and
//!   the first Admin and Baseline rules (ClusterNetworkPolicy), as verdict codes ordered as
//!   the plan's [`Precedence`] (priority, a slot for policies of equal priority in name
//!   order, rule, action). A longest-prefix match returns one key, so each key's value
//!   folds in those of the shorter keys of its (profile, direction, peer) that cover it.
//!
//! Order: each plan change becomes operations that keep its make-before-break meaning. A
//! newly named prefix first gets the entries of every allow that admits it, then enters the
//! trie; a prefix no longer named leaves the trie before its entries go.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use npm_common::{
    ACTION_ACCEPT, ACTION_DENY, ACTION_PASS, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED,
    EP_INGRESS_ISOLATED, EndpointInfo, PEER_ANY, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
    POLICY_PREFIX_PROTO, PREFIX_ID_BASE, PolicyKeyData, PolicyValue, policy_key, policy_key_prefix,
    port_blocks, verdict_code,
};

use crate::model::cluster_policy::Action;
use crate::model::{CidrBlock, Direction, ObjectKey};
use crate::plan::{Allow, Change, PeerMatch, PlanDiff, PortMatch, Precedence, SetId, Verdict};

/// One write to a BPF map (or to the attachments), in the order to perform them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    Attach {
        ip: IpAddr,
        pod: ObjectKey,
    },
    Detach {
        ip: IpAddr,
    },
    EndpointSet {
        ip: IpAddr,
        info: EndpointInfo,
    },
    EndpointDel {
        ip: IpAddr,
    },
    IdentitySet {
        ip: IpAddr,
        id: u32,
    },
    IdentityDel {
        ip: IpAddr,
    },
    CidrSet {
        net: IpNet,
        id: u32,
    },
    CidrDel {
        net: IpNet,
    },
    /// Writes the key (new, or with a new value).
    PolicyAdd {
        prefix_len: u32,
        key: PolicyKeyData,
        value: PolicyValue,
    },
    PolicyDel {
        prefix_len: u32,
        key: PolicyKeyData,
    },
    NodeIpAdd {
        ip: IpAddr,
    },
    NodeIpDel {
        ip: IpAddr,
    },
}

pub fn dir_byte(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

#[derive(Default)]
struct Endpoint {
    /// The profile of each direction (0: none, nothing judges it).
    profiles: [u32; 2],
}

/// A plan profile, as far as its keys are concerned.
struct Profile {
    dir: Direction,
    /// Whether NetworkPolicies isolate its users (their flag in the endpoint map).
    isolating: bool,
    allows: HashSet<Allow>,
}

/// A policy-trie key's own entries, counted (several plan entries may need one key), and
/// the value last written for it.
#[derive(Default)]
struct KeyEntries {
    /// NetworkPolicy entries.
    allow: u32,
    /// Entries of ClusterNetworkPolicy rules, by verdict.
    tiered: BTreeMap<Verdict, u32>,
    written: Option<PolicyValue>,
}

impl KeyEntries {
    fn is_empty(&self) -> bool {
        self.allow == 0 && self.tiered.is_empty()
    }
}

/// (profile, direction, peer): the bytes a key's wildcards never cut.
type Group = [u8; 9];

fn group_of(key: &PolicyKeyData) -> Group {
    let mut g = [0; 9];
    g.copy_from_slice(&key[..9]);
    g
}

/// The prefix lengths a key of the trie can have, shortest first.
fn key_lengths() -> impl Iterator<Item = u32> {
    std::iter::once(POLICY_PREFIX_ANY_PROTO).chain(POLICY_PREFIX_PROTO..=POLICY_PREFIX_FULL)
}

struct Prefix {
    id: u32,
    /// CIDR allows naming this prefix (as cidr or except).
    refs: u32,
}

/// A CIDR allow of one profile: what a named prefix's entries are made for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CidrAllow {
    profile: u32,
    dir: Direction,
    block: CidrBlock,
    ports: PortMatch,
    verdict: Verdict,
}

/// An entry naming a peer set: (profile, direction, ports, verdict).
type SetUser = (u32, Direction, PortMatch, Verdict);

/// A peer set: its members, and the entries naming it (profile, direction, ports).
#[derive(Default)]
struct PeerSetState {
    members: BTreeSet<u32>,
    users: HashSet<SetUser>,
}

/// The encoder's memory of what is in the maps.
#[derive(Default)]
pub struct MapTranslator {
    sets: HashMap<SetId, PeerSetState>,
    endpoints: HashMap<IpAddr, Endpoint>,
    profiles: HashMap<u32, Profile>,
    prefixes: BTreeMap<IpNet, Prefix>,
    next_prefix: u32,
    /// The policy trie's keys, ordered so that a (profile, direction, peer) is a range.
    policy: BTreeMap<(PolicyKeyData, u32), KeyEntries>,
    /// Groups with tiered entries (their keys' values fold shorter keys in), and how many.
    tiered_groups: HashMap<Group, u32>,
    /// The ClusterNetworkPolicies named by entries, per (Admin tier, priority), in name order
    /// (a policy's place is its slot in the verdict codes), counted.
    slots: BTreeMap<(bool, u32), BTreeMap<std::sync::Arc<str>, u32>>,
    /// CIDR allows by their block's network: the allows that may admit a prefix are those
    /// of its supernets, at most 33 lookups rather than a scan of every allow.
    cidr_allows: HashMap<IpNet, HashSet<CidrAllow>>,
    identities: HashMap<IpAddr, u32>,
}

/// Sizes of what the maps hold, as the translator knows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub endpoints: usize,
    pub profiles: usize,
    pub identities: usize,
    pub cidr_prefixes: usize,
    pub policy_entries: usize,
}

impl MapTranslator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn encoded(&self) -> Encoded {
        Encoded {
            endpoints: self.endpoints.len(),
            profiles: self.profiles.len(),
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
            policy: self.policy.keys().map(|(key, len)| (*len, *key)).collect(),
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
            // A quarantined endpoint's entries already admit nothing.
            Change::SetConflict { .. } | Change::RemoveConflict { .. } => {}
            Change::AddNodeIp { ip } => ops.push(MapOp::NodeIpAdd { ip: *ip }),
            Change::RemoveNodeIp { ip } => ops.push(MapOp::NodeIpDel { ip: *ip }),
            Change::AddEndpoint { ip, pod } | Change::RetargetEndpoint { ip, pod } => {
                let ip = *ip;
                self.endpoints.entry(ip).or_default();
                ops.push(MapOp::EndpointSet { ip, info: self.info(ip) });
                ops.push(MapOp::Attach { ip, pod: pod.clone() });
            }
            Change::RemoveEndpoint { ip } => {
                let ip = *ip;
                if self.endpoints.remove(&ip).is_some() {
                    ops.push(MapOp::Detach { ip });
                    ops.push(MapOp::EndpointDel { ip });
                }
            }
            Change::SetProfile { ip, direction, profile } => {
                let ip = *ip;
                let Some(ep) = self.endpoints.get_mut(&ip) else {
                    return;
                };
                ep.profiles[*direction as usize] = profile.unwrap_or(0);
                ops.push(MapOp::EndpointSet { ip, info: self.info(ip) });
            }
            Change::AddProfile { profile, direction, isolating } => {
                let new =
                    Profile { dir: *direction, isolating: *isolating, allows: HashSet::new() };
                self.profiles.insert(*profile, new);
            }
            Change::RemoveProfile { profile } => {
                if let Some(prof) = self.profiles.remove(profile) {
                    for a in &prof.allows {
                        self.remove_allow(*profile, prof.dir, a, ops);
                    }
                }
            }
            Change::AddAllow { profile, allow } => {
                let Some(prof) = self.profiles.get_mut(profile) else { return };
                let d = prof.dir;
                if prof.allows.insert(allow.clone()) {
                    self.add_allow(*profile, d, allow, ops);
                }
            }
            Change::RemoveAllow { profile, allow } => {
                let Some(prof) = self.profiles.get_mut(profile) else { return };
                let d = prof.dir;
                if prof.allows.remove(allow) {
                    self.remove_allow(*profile, d, allow, ops);
                }
            }
            Change::SetIdentity { ip, identity } => {
                self.identities.insert(*ip, *identity);
                ops.push(MapOp::IdentitySet { ip: *ip, id: *identity });
            }
            Change::RemoveIdentity { ip } => {
                if self.identities.remove(ip).is_some() {
                    ops.push(MapOp::IdentityDel { ip: *ip });
                }
            }
            Change::AddSet { set, .. } => {
                self.sets.entry(*set).or_default();
            }
            Change::RemoveSet { set } => {
                // Entries naming it are gone by now; drop their keys should any be left.
                if let Some(s) = self.sets.remove(set) {
                    for (prof, d, ports, verdict) in s.users {
                        for m in &s.members {
                            self.policy_keys(prof, d, *m, ports, &verdict, false, ops);
                        }
                    }
                }
            }
            Change::AddMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else {
                    return;
                };
                if s.members.insert(*identity) {
                    let users: Vec<_> = s.users.iter().cloned().collect();
                    for (prof, d, ports, verdict) in users {
                        self.policy_keys(prof, d, *identity, ports, &verdict, true, ops);
                    }
                }
            }
            Change::RemoveMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else {
                    return;
                };
                if s.members.remove(identity) {
                    let users: Vec<_> = s.users.iter().cloned().collect();
                    for (prof, d, ports, verdict) in users {
                        self.policy_keys(prof, d, *identity, ports, &verdict, false, ops);
                    }
                }
            }
        }
    }

    /// Adds (or removes) the keys of a peer-set entry: one per member.
    fn set_entry(
        &mut self,
        prof: u32,
        d: Direction,
        set: SetId,
        allow: &Allow,
        add: bool,
        ops: &mut Vec<MapOp>,
    ) {
        let s = self.sets.entry(set).or_default();
        let user = (prof, d, allow.ports, allow.verdict.clone());
        let changed = if add { s.users.insert(user) } else { s.users.remove(&user) };
        if !changed {
            return;
        }
        let members: Vec<u32> = s.members.iter().copied().collect();
        for m in members {
            self.policy_keys(prof, d, m, allow.ports, &allow.verdict, add, ops);
        }
    }

    fn add_allow(&mut self, prof: u32, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => {
                self.policy_keys(prof, d, PEER_ANY, allow.ports, &allow.verdict, true, ops)
            }
            PeerMatch::Identity(id) => {
                self.policy_keys(prof, d, *id, allow.ports, &allow.verdict, true, ops)
            }
            PeerMatch::Set(s) => self.set_entry(prof, d, *s, allow, true, ops),
            PeerMatch::Cidr(block) => {
                let (net, excepts) = block_nets(block);
                for p in std::iter::once(net).chain(excepts) {
                    self.name_prefix(p, ops);
                }
                let ids: Vec<u32> = self.admitted(block).collect();
                for id in ids {
                    self.policy_keys(prof, d, id, allow.ports, &allow.verdict, true, ops);
                }
                self.cidr_allows.entry(net.trunc()).or_default().insert(CidrAllow {
                    profile: prof,
                    dir: d,
                    block: block.clone(),
                    ports: allow.ports,
                    verdict: allow.verdict.clone(),
                });
            }
        }
    }

    fn remove_allow(&mut self, prof: u32, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => {
                self.policy_keys(prof, d, PEER_ANY, allow.ports, &allow.verdict, false, ops)
            }
            PeerMatch::Identity(id) => {
                self.policy_keys(prof, d, *id, allow.ports, &allow.verdict, false, ops)
            }
            PeerMatch::Set(s) => self.set_entry(prof, d, *s, allow, false, ops),
            PeerMatch::Cidr(block) => {
                let (net, excepts) = block_nets(block);
                if let Some(allows) = self.cidr_allows.get_mut(&net.trunc()) {
                    allows.remove(&CidrAllow {
                        profile: prof,
                        dir: d,
                        block: block.clone(),
                        ports: allow.ports,
                        verdict: allow.verdict.clone(),
                    });
                    if allows.is_empty() {
                        self.cidr_allows.remove(&net.trunc());
                    }
                }
                let ids: Vec<u32> = self.admitted(block).collect();
                for id in ids {
                    self.policy_keys(prof, d, id, allow.ports, &allow.verdict, false, ops);
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
        let n = block.net;
        let lo = IpNet::new(n.network(), 0).expect("prefix 0 is valid");
        let hi = IpNet::new(n.broadcast(), n.max_prefix_len()).expect("a full prefix is valid");
        self.prefixes.range(lo..=hi).filter(move |(p, _)| admits(block, **p)).map(|(_, e)| e.id)
    }

    /// The CIDR allows whose block admits every address of `p`.
    fn cidr_allows_admitting(&self, p: IpNet) -> Vec<CidrAllow> {
        (0..=p.prefix_len())
            .filter_map(|len| IpNet::new(p.network(), len).ok().map(|n| n.trunc()))
            .filter_map(|net| self.cidr_allows.get(&net))
            .flatten()
            .filter(|a| admits(&a.block, p))
            .cloned()
            .collect()
    }

    fn name_prefix(&mut self, p: IpNet, ops: &mut Vec<MapOp>) {
        if let Some(e) = self.prefixes.get_mut(&p) {
            e.refs += 1;
            return;
        }
        let id = PREFIX_ID_BASE + self.next_prefix;
        self.next_prefix += 1;
        // Entries first: addresses that move to this prefix keep what admits them.
        let users: Vec<CidrAllow> = self.cidr_allows_admitting(p);
        for a in users {
            self.policy_keys(a.profile, a.dir, id, a.ports, &a.verdict, true, ops);
        }
        self.prefixes.insert(p, Prefix { id, refs: 1 });
        ops.push(MapOp::CidrSet { net: p, id });
    }

    fn unname_prefix(&mut self, p: IpNet, ops: &mut Vec<MapOp>) {
        let Some(e) = self.prefixes.get_mut(&p) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let id = e.id;
        // Out of the trie first: its addresses fall back to the next shorter prefix.
        self.prefixes.remove(&p);
        ops.push(MapOp::CidrDel { net: p });
        let users: Vec<CidrAllow> = self.cidr_allows_admitting(p);
        for a in users {
            self.policy_keys(a.profile, a.dir, id, a.ports, &a.verdict, false, ops);
        }
    }

    /// Adds (or removes) the policy-trie keys of one (profile, direction, peer, ports) entry
    /// with `verdict`.
    #[allow(clippy::too_many_arguments)]
    fn policy_keys(
        &mut self,
        ep: u32,
        d: Direction,
        peer: u32,
        ports: PortMatch,
        verdict: &Verdict,
        add: bool,
        ops: &mut Vec<MapOp>,
    ) {
        let dir = dir_byte(d);
        let mut keys: Vec<(u32, PolicyKeyData)> = Vec::new();
        match ports {
            PortMatch::Any => keys.push((POLICY_PREFIX_ANY_PROTO, policy_key(ep, dir, peer, 0, 0))),
            PortMatch::Protocol(p) => {
                keys.push((POLICY_PREFIX_PROTO, policy_key(ep, dir, peer, p.number(), 0)))
            }
            PortMatch::Range { protocol, first, last } => {
                port_blocks(first, last, |start, bits| {
                    keys.push((
                        POLICY_PREFIX_FULL - bits,
                        policy_key(ep, dir, peer, protocol.number(), start),
                    ))
                });
            }
        }
        let tiered = *verdict != Verdict::Allow;
        // A policy takes its slot before its first entry is written and gives it back after
        // its last is gone, so no key ever holds an entry coded with another policy's slot.
        if tiered && add {
            self.slot_refs(verdict, add, ops);
        }
        for (prefix_len, key) in keys {
            let group = group_of(&key);
            let e = self.policy.entry((key, prefix_len)).or_default();
            match (tiered, add) {
                (false, true) => e.allow += 1,
                (false, false) => e.allow = e.allow.saturating_sub(1),
                (true, true) => *e.tiered.entry(verdict.clone()).or_insert(0) += 1,
                (true, false) => {
                    if let Some(n) = e.tiered.get_mut(verdict) {
                        *n -= 1;
                        if *n == 0 {
                            e.tiered.remove(verdict);
                        }
                    }
                }
            }
            if tiered {
                let n = self.tiered_groups.entry(group).or_insert(0);
                if add {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.tiered_groups.remove(&group);
                    }
                }
            }
            if self.policy[&(key, prefix_len)].is_empty() {
                self.policy.remove(&(key, prefix_len));
                ops.push(MapOp::PolicyDel { prefix_len, key });
            }
            // The key and the longer keys it covers hold its entries in their values.
            if tiered || self.tiered_groups.contains_key(&group) {
                self.refresh_under(key, prefix_len, ops);
            } else {
                self.refresh(key, prefix_len, ops);
            }
        }
        if tiered && !add {
            self.slot_refs(verdict, add, ops);
        }
    }

    /// A tiered entry's policy takes (or gives back) its slot among the policies of equal
    /// priority; when another policy's slot moves, every tiered key is written anew.
    fn slot_refs(&mut self, verdict: &Verdict, add: bool, ops: &mut Vec<MapOp>) {
        let Some(p) = verdict.precedence() else { return };
        let bucket_key = (matches!(verdict, Verdict::Admin(_)), p.priority);
        let bucket = self.slots.entry(bucket_key).or_default();
        let before: Vec<std::sync::Arc<str>> = bucket.keys().cloned().collect();
        if add {
            *bucket.entry(p.policy.clone()).or_insert(0) += 1;
        } else if let Some(n) = bucket.get_mut(&p.policy) {
            *n -= 1;
            if *n == 0 {
                bucket.remove(&p.policy);
            }
        }
        let moved = before.iter().enumerate().any(|(i, name)| {
            **name != *p.policy && bucket.keys().position(|n| n == name).is_some_and(|j| j != i)
        });
        if bucket.is_empty() {
            self.slots.remove(&bucket_key);
        }
        if moved {
            // The codes of the policies that move all rise (a policy joined before them) or
            // all fall (one left), keeping their order. Keys are rewritten from the side the
            // codes move away from: rising, the latest-decided first; falling, the
            // earliest-decided first. Then whatever keys a packet looks up, the one that
            // decides is either already rewritten with every key it outranks (the new
            // verdict) or not yet, like every key that outranks it (the old verdict).
            let admin = bucket_key.0;
            let mut keys: Vec<(u32, PolicyKeyData, u32)> = self
                .policy
                .iter()
                .filter(|((k, _), _)| self.tiered_groups.contains_key(&group_of(k)))
                .map(|(&(k, len), e)| {
                    let v = e.written.unwrap_or(PolicyValue::NONE);
                    (if admin { v.admin } else { v.baseline }, k, len)
                })
                .collect();
            keys.sort_unstable();
            if add {
                keys.reverse();
            }
            for (_, key, len) in keys {
                self.refresh(key, len, ops);
            }
        }
    }

    /// A verdict's code (see `npm_common::verdict_code`).
    fn code(&self, p: &Precedence, admin: bool) -> u32 {
        let slot = self
            .slots
            .get(&(admin, p.priority))
            .and_then(|b| b.keys().position(|n| *n == p.policy))
            .unwrap_or(0) as u32;
        let action = match p.action {
            Action::Accept => ACTION_ACCEPT,
            Action::Deny => ACTION_DENY,
            Action::Pass => ACTION_PASS,
        };
        verdict_code(p.priority, slot, p.rule, action)
    }

    /// What one key's own entries say.
    fn own_value(&self, e: &KeyEntries) -> PolicyValue {
        let mut v = if e.allow > 0 { PolicyValue::ALLOW } else { PolicyValue::NONE };
        for verdict in e.tiered.keys() {
            v = v.fold(match verdict {
                Verdict::Allow => PolicyValue::ALLOW,
                Verdict::Admin(p) => PolicyValue { admin: self.code(p, true), ..PolicyValue::NONE },
                Verdict::Baseline(p) => {
                    PolicyValue { baseline: self.code(p, false), ..PolicyValue::NONE }
                }
            });
        }
        v
    }

    /// Writes a key's value when it changed: its own entries, folded with the shorter keys of
    /// its group that cover it (only tiered groups have values other than "admit").
    fn refresh(&mut self, key: PolicyKeyData, prefix_len: u32, ops: &mut Vec<MapOp>) {
        let Some(e) = self.policy.get(&(key, prefix_len)) else { return };
        let mut value = self.own_value(e);
        if self.tiered_groups.contains_key(&group_of(&key)) {
            for len in key_lengths().take_while(|l| *l < prefix_len) {
                if let Some(shorter) = self.policy.get(&(policy_key_prefix(&key, len), len)) {
                    value = value.fold(self.own_value(shorter));
                }
            }
        }
        let e = self.policy.get_mut(&(key, prefix_len)).expect("key exists");
        if e.written != Some(value) {
            e.written = Some(value);
            ops.push(MapOp::PolicyAdd { prefix_len, key, value });
        }
    }

    /// Refreshes a key and every longer key of its group that it covers.
    fn refresh_under(&mut self, key: PolicyKeyData, prefix_len: u32, ops: &mut Vec<MapOp>) {
        let lo = policy_key_prefix(&key, prefix_len);
        let mut hi = lo;
        for (i, b) in hi.iter_mut().enumerate() {
            let bit = i as u32 * 8;
            if bit + 8 <= prefix_len {
                continue;
            }
            *b |= if bit >= prefix_len { 0xff } else { 0xffu8 >> (prefix_len - bit) };
        }
        let covered: Vec<(PolicyKeyData, u32)> = self
            .policy
            .range((lo, 0)..=(hi, u32::MAX))
            .map(|(k, _)| *k)
            .filter(|(k, len)| *len >= prefix_len && policy_key_prefix(k, prefix_len) == lo)
            .collect();
        for (k, len) in covered {
            self.refresh(k, len, ops);
        }
    }

    /// An endpoint's value: its profiles, and which directions NetworkPolicies isolate.
    fn info(&self, ip: IpAddr) -> EndpointInfo {
        let profiles = self.endpoints.get(&ip).map_or([0, 0], |e| e.profiles);
        let isolating = |p: u32| p != 0 && self.profiles.get(&p).is_none_or(|p| p.isolating);
        let mut flags = 0;
        if isolating(profiles[0]) {
            flags |= EP_INGRESS_ISOLATED;
        }
        if isolating(profiles[1]) {
            flags |= EP_EGRESS_ISOLATED;
        }
        EndpointInfo { flags, profiles, ifindex: 0 }
    }
}

/// Whether a block admits every address of a named prefix (see the module docs).
/// (A prefix of the other family is in no block: `contains` is false across families.)
fn admits(block: &CidrBlock, p: IpNet) -> bool {
    let (net, excepts) = block_nets(block);
    net.contains(&p) && !excepts.iter().any(|e| e.contains(&p))
}

/// A block's cidr and excepts, as prefixes to name in the CIDR trie (an except of the other
/// family, which validation refuses, is left out: it excepts nothing of the cidr).
///
/// IPv4 addresses are keyed inside `::ffff:0:0/96` (see `npm_common::Addr`), so an IPv6
/// block holding that prefix (`::/0`, say) would hold every IPv4 address in the trie. Such a
/// block also names `0.0.0.0/0`, which it does not admit: IPv4 addresses then find that
/// prefix (or a longer IPv4 one) first, and only IPv4 blocks admit those.
fn block_nets(block: &CidrBlock) -> (IpNet, Vec<IpNet>) {
    let same = |e: &&IpNet| e.max_prefix_len() == block.net.max_prefix_len();
    let mut excepts: Vec<IpNet> = block.except.iter().filter(same).copied().collect();
    let mapped: IpNet = "::ffff:0:0/96".parse().expect("a valid prefix");
    if block.net.contains(&mapped) {
        excepts.push("0.0.0.0/0".parse().expect("a valid prefix"));
    }
    (block.net, excepts)
}

/// The keys the maps should hold.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub endpoints: HashSet<IpAddr>,
    pub identities: HashSet<IpAddr>,
    pub cidrs: HashSet<IpNet>,
    pub policy: HashSet<(u32, PolicyKeyData)>,
}
