//! From plan diffs to BPF map operations: the eBPF dataplane's encoding of the plan, pure and
//! host-testable.
//!
//! Encoding (see `npm_common`):
//! - endpoints: pod address -> isolation flags and, per isolated direction, a profile;
//! - profiles: the entries of one endpoint direction, shared by every endpoint direction with
//!   equal entries (replicas, as a rule). Endpoint changes are gathered per run of endpoint
//!   changes in the diff and then applied per endpoint direction: the profile of its new
//!   entries is found (by a digest of the entries, then compared), or built in full, or
//!   (when all its users move to the same new entries and no profile has them) edited in
//!   place by the entries that changed, additions first; then the endpoint's
//!   value is written once (isolation and profile together); then what is no longer used
//!   goes. So an endpoint moves between entries atomically, and replicas cost one copy;
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
//! Order: each plan change becomes operations that keep its make-before-break meaning. A
//! newly named prefix first gets the entries of every allow that admits it, then enters the
//! trie; a prefix no longer named leaves the trie before its entries go.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use npm_common::{
    DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointInfo, PEER_ANY,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO, PREFIX_ID_BASE,
    PolicyKeyData, policy_key, port_blocks,
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
struct EndpointDir {
    isolated: bool,
    allows: HashSet<Allow>,
    /// The sum of the entries' hashes (see [`ContentKey`]), kept as entries come and go.
    digest: u64,
    /// Entries added and removed since the last flush (net): what an in-place edit of the
    /// profile writes, without comparing whole entry sets.
    added: HashSet<Allow>,
    removed: HashSet<Allow>,
    /// The profile the maps hold for this direction (0: none, not isolated).
    profile: u32,
}

impl EndpointDir {
    fn key(&self, dir: Direction) -> Option<ContentKey> {
        self.isolated.then_some(ContentKey { dir, len: self.allows.len(), digest: self.digest })
    }

    /// Adds (or removes) an entry, keeping the digest and the net change since the last
    /// flush; false when the entry was already there (or not there).
    fn change(&mut self, allow: &Allow, add: bool, hasher: &std::hash::RandomState) -> bool {
        let changed =
            if add { self.allows.insert(allow.clone()) } else { self.allows.remove(allow) };
        if changed {
            let h = hasher.hash_one(allow);
            self.digest =
                if add { self.digest.wrapping_add(h) } else { self.digest.wrapping_sub(h) };
            let (to, from) = if add {
                (&mut self.added, &mut self.removed)
            } else {
                (&mut self.removed, &mut self.added)
            };
            if !from.remove(allow) {
                to.insert(allow.clone());
            }
        }
        changed
    }
}

#[derive(Default)]
struct Endpoint {
    pod: Option<ObjectKey>,
    dirs: [EndpointDir; 2],
}

impl Endpoint {
    fn info(&self) -> EndpointInfo {
        let mut flags = 0;
        if self.dirs[0].profile != 0 {
            flags |= EP_INGRESS_ISOLATED;
        }
        if self.dirs[1].profile != 0 {
            flags |= EP_EGRESS_ISOLATED;
        }
        EndpointInfo { flags, profiles: [self.dirs[0].profile, self.dirs[1].profile], ifindex: 0 }
    }
}

/// A cheap name for a direction's entries: profiles with the same key are candidates, and
/// a candidate's entries are compared before an endpoint joins it. The digest is the
/// wrapping sum of each entry's keyed hash, so it is kept in O(1) per entry change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ContentKey {
    dir: Direction,
    len: usize,
    digest: u64,
}

struct Profile {
    key: ContentKey,
    allows: HashSet<Allow>,
    /// Endpoint directions naming it.
    users: u32,
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
}

/// A peer set: its members, and the entries naming it (profile, direction, ports).
#[derive(Default)]
struct PeerSetState {
    members: BTreeSet<u32>,
    users: HashSet<(u32, Direction, PortMatch)>,
}

/// The encoder's memory of what is in the maps.
#[derive(Default)]
pub struct MapTranslator {
    sets: HashMap<SetId, PeerSetState>,
    endpoints: HashMap<Ipv4Addr, Endpoint>,
    profiles: HashMap<u32, Profile>,
    by_content: HashMap<ContentKey, Vec<u32>>,
    /// Keys the entry hashes of the digests (per process: digests are never stored).
    hasher: std::hash::RandomState,
    next_profile: u32,
    /// Endpoint directions changed by the current run of endpoint changes.
    dirty: BTreeSet<(Ipv4Addr, Direction)>,
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
            policy: self.policy.keys().copied().collect(),
        }
    }

    /// Translates one diff into map operations, in order.
    pub fn translate(&mut self, diff: &PlanDiff) -> Vec<MapOp> {
        let mut ops = Vec::new();
        for c in &diff.changes {
            let endpoint_change = matches!(
                c,
                Change::SetIsolation { .. } | Change::AddAllow { .. } | Change::RemoveAllow { .. }
            );
            if !endpoint_change {
                self.flush(&mut ops);
            }
            self.change(c, &mut ops);
        }
        self.flush(&mut ops);
        ops
    }

    /// Moves every endpoint direction changed since the last flush to the profile of its
    /// entries (see the module docs): additions, then endpoint values, then removals.
    fn flush(&mut self, ops: &mut Vec<MapOp>) {
        if self.dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        // Removals run after the endpoint values are written (their state with them: a
        // prefix a removal un-names may be named again by an addition before it).
        let mut removals: Vec<(u32, Direction, Allow)> = Vec::new();
        // Profiles edited in place in this flush still hold entries that go with the removals:
        // no other endpoint joins them before.
        let mut in_flux: HashSet<u32> = HashSet::new();
        let mut release: Vec<u32> = Vec::new();
        let mut writes: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let items: Vec<(Ipv4Addr, Direction, u32, Option<ContentKey>)> = dirty
            .into_iter()
            .filter_map(|(ip, d)| {
                let dir = &self.endpoints.get(&ip)?.dirs[d as usize];
                Some((ip, d, dir.profile, dir.key(d)))
            })
            .collect();
        // A profile whose every user moves to the same new entries (a policy update reaching
        // all the pods of a deployment) is edited in place, as is one with a single user:
        // writing only the entries that change. Users of one profile had equal entries, so
        // they move alike exactly when their changes since are equal.
        let mut moves: HashMap<u32, (usize, u32, bool)> = HashMap::new();
        for (i, (ip, d, old, key)) in items.iter().enumerate() {
            if *old == 0 {
                continue;
            }
            let m = moves.entry(*old).or_insert((i, 0, true));
            m.1 += 1;
            if m.0 != i {
                let (fip, fd, _, fkey) = &items[m.0];
                let (first, this) = (
                    &self.endpoints[fip].dirs[*fd as usize],
                    &self.endpoints[ip].dirs[*d as usize],
                );
                m.2 &= *fkey == *key && first.added == this.added && first.removed == this.removed;
            }
        }
        for (ip, d, old, key) in items {
            let dir = &mut self.endpoints.get_mut(&ip).expect("endpoint").dirs[d as usize];
            let (added, removed) =
                (std::mem::take(&mut dir.added), std::mem::take(&mut dir.removed));
            let unchanged = added.is_empty() && removed.is_empty();
            let new =
                match key {
                    None => 0,
                    // The same entries, or a profile this flush already edited for the group.
                    Some(_) if old != 0 && (unchanged || in_flux.contains(&old)) => old,
                    Some(k) => {
                        let allows = &self.endpoints[&ip].dirs[d as usize].allows;
                        let joined =
                            self.by_content.get(&k).into_iter().flatten().copied().find(|p| {
                                !in_flux.contains(p) && self.profiles[p].allows == *allows
                            });
                        let whole_group = old != 0
                            && moves.get(&old).is_some_and(|(_, n, uniform)| {
                                *uniform && *n == self.profiles[&old].users
                            });
                        match joined {
                            Some(p) => p,
                            None if whole_group => {
                                // Edit in place: additions now, removals after the endpoint writes.
                                for a in &added {
                                    self.add_allow(old, d, a, ops);
                                }
                                removals.extend(removed.iter().map(|a| (old, d, a.clone())));
                                let prof = self.profiles.get_mut(&old).expect("profile");
                                prof.allows.retain(|a| !removed.contains(a));
                                prof.allows.extend(added);
                                let was = std::mem::replace(&mut prof.key, k);
                                self.unindex(was, old);
                                self.by_content.entry(k).or_default().push(old);
                                in_flux.insert(old);
                                old
                            }
                            None => {
                                self.next_profile += 1;
                                let p = self.next_profile;
                                let allows = self.endpoints[&ip].dirs[d as usize].allows.clone();
                                for a in &allows {
                                    self.add_allow(p, d, a, ops);
                                }
                                self.by_content.entry(k).or_default().push(p);
                                self.profiles.insert(p, Profile { key: k, allows, users: 0 });
                                p
                            }
                        }
                    }
                };
            if new == old {
                // (in place, or the same entries again)
                writes.insert(ip);
                continue;
            }
            if new != 0 {
                self.profiles.get_mut(&new).expect("profile").users += 1;
            }
            if old != 0 {
                release.push(old);
            }
            self.endpoints.get_mut(&ip).expect("endpoint").dirs[d as usize].profile = new;
            writes.insert(ip);
        }
        for ip in writes {
            ops.push(MapOp::EndpointSet { ip, info: self.endpoints[&ip].info() });
        }
        for (p, d, a) in removals {
            self.remove_allow(p, d, &a, ops);
        }
        for p in release {
            self.release_profile(p, ops);
        }
    }

    /// One endpoint direction stops naming `p`; its entries go with its last user.
    fn release_profile(&mut self, p: u32, ops: &mut Vec<MapOp>) {
        let prof = self.profiles.get_mut(&p).expect("released profile");
        prof.users -= 1;
        if prof.users > 0 {
            return;
        }
        let prof = self.profiles.remove(&p).expect("profile");
        self.unindex(prof.key, p);
        for a in &prof.allows {
            self.remove_allow(p, prof.key.dir, a, ops);
        }
    }

    /// Profile `p` no longer has the entries named `key`.
    fn unindex(&mut self, key: ContentKey, p: u32) {
        if let Some(ps) = self.by_content.get_mut(&key) {
            ps.retain(|q| *q != p);
            if ps.is_empty() {
                self.by_content.remove(&key);
            }
        }
    }

    fn change(&mut self, c: &Change, ops: &mut Vec<MapOp>) {
        match c {
            // A quarantined endpoint's entries already admit nothing.
            Change::SetConflict { .. } | Change::RemoveConflict { .. } => {}
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
                ops.push(MapOp::EndpointSet { ip, info: ep.info() });
                ops.push(MapOp::Attach { ip, pod: pod.clone() });
            }
            Change::RemoveEndpoint { ip } => {
                let Some(ip) = v4(*ip) else { return };
                let Some(ep) = self.endpoints.remove(&ip) else {
                    return;
                };
                ops.push(MapOp::Detach { ip });
                ops.push(MapOp::EndpointDel { ip });
                for dir in ep.dirs {
                    if dir.profile != 0 {
                        self.release_profile(dir.profile, ops);
                    }
                }
            }
            Change::SetIsolation { ip, direction, isolated } => {
                let Some(ip) = v4(*ip) else { return };
                let Some(ep) = self.endpoints.get_mut(&ip) else {
                    return;
                };
                ep.dirs[*direction as usize].isolated = *isolated;
                self.dirty.insert((ip, *direction));
            }
            Change::AddAllow { ip, direction, allow }
            | Change::RemoveAllow { ip, direction, allow } => {
                let Some(ip) = v4(*ip) else { return };
                let add = matches!(c, Change::AddAllow { .. });
                if let Some(ep) = self.endpoints.get_mut(&ip)
                    && ep.dirs[*direction as usize].change(allow, add, &self.hasher)
                {
                    self.dirty.insert((ip, *direction));
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
                if let Some(ip) = v4(*ip)
                    && self.identities.remove(&ip).is_some()
                {
                    ops.push(MapOp::IdentityDel { ip });
                }
            }
            Change::AddSet { set, .. } => {
                self.sets.entry(*set).or_default();
            }
            Change::RemoveSet { set } => {
                // Entries naming it are gone by now; drop their keys should any be left.
                if let Some(s) = self.sets.remove(set) {
                    for (prof, d, ports) in s.users {
                        for m in &s.members {
                            self.policy_keys(prof, d, *m, ports, false, ops);
                        }
                    }
                }
            }
            Change::AddMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else {
                    return;
                };
                if s.members.insert(*identity) {
                    let users: Vec<_> = s.users.iter().copied().collect();
                    for (prof, d, ports) in users {
                        self.policy_keys(prof, d, *identity, ports, true, ops);
                    }
                }
            }
            Change::RemoveMember { set, identity } => {
                let Some(s) = self.sets.get_mut(set) else {
                    return;
                };
                if s.members.remove(identity) {
                    let users: Vec<_> = s.users.iter().copied().collect();
                    for (prof, d, ports) in users {
                        self.policy_keys(prof, d, *identity, ports, false, ops);
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
        ports: PortMatch,
        add: bool,
        ops: &mut Vec<MapOp>,
    ) {
        let s = self.sets.entry(set).or_default();
        let changed =
            if add { s.users.insert((prof, d, ports)) } else { s.users.remove(&(prof, d, ports)) };
        if !changed {
            return;
        }
        let members: Vec<u32> = s.members.iter().copied().collect();
        for m in members {
            self.policy_keys(prof, d, m, ports, add, ops);
        }
    }

    fn add_allow(&mut self, prof: u32, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => self.policy_keys(prof, d, PEER_ANY, allow.ports, true, ops),
            PeerMatch::Identity(id) => self.policy_keys(prof, d, *id, allow.ports, true, ops),
            PeerMatch::Set(s) => self.set_entry(prof, d, *s, allow.ports, true, ops),
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
                    self.policy_keys(prof, d, id, allow.ports, true, ops);
                }
                self.cidr_allows.insert(CidrAllow {
                    profile: prof,
                    dir: d,
                    block: block.clone(),
                    ports: allow.ports,
                });
            }
        }
    }

    fn remove_allow(&mut self, prof: u32, d: Direction, allow: &Allow, ops: &mut Vec<MapOp>) {
        match &allow.peer {
            PeerMatch::Any => self.policy_keys(prof, d, PEER_ANY, allow.ports, false, ops),
            PeerMatch::Identity(id) => self.policy_keys(prof, d, *id, allow.ports, false, ops),
            PeerMatch::Set(s) => self.set_entry(prof, d, *s, allow.ports, false, ops),
            PeerMatch::Cidr(block) => {
                let Some((net, excepts)) = v4_block(block) else {
                    return;
                };
                self.cidr_allows.remove(&CidrAllow {
                    profile: prof,
                    dir: d,
                    block: block.clone(),
                    ports: allow.ports,
                });
                let ids: Vec<u32> = self.admitted(block).collect();
                for id in ids {
                    self.policy_keys(prof, d, id, allow.ports, false, ops);
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
        let users: Vec<CidrAllow> =
            self.cidr_allows.iter().filter(|a| admits(&a.block, p)).cloned().collect();
        for a in users {
            self.policy_keys(a.profile, a.dir, id, a.ports, true, ops);
        }
        self.prefixes.insert(p, Prefix { id, refs: 1 });
        ops.push(MapOp::CidrSet { net: p, id });
    }

    fn unname_prefix(&mut self, p: Ipv4Net, ops: &mut Vec<MapOp>) {
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
        let users: Vec<CidrAllow> =
            self.cidr_allows.iter().filter(|a| admits(&a.block, p)).cloned().collect();
        for a in users {
            self.policy_keys(a.profile, a.dir, id, a.ports, false, ops);
        }
    }

    /// Adds (or removes) the policy-trie keys of one (profile, direction, peer, ports).
    fn policy_keys(
        &mut self,
        ep: u32,
        d: Direction,
        peer: u32,
        ports: PortMatch,
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
    let Some((net, excepts)) = v4_block(block) else {
        return false;
    };
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
