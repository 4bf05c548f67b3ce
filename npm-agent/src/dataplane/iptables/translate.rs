//! From plan diffs to `ipset restore` and `iptables-restore --noflush` batches: the iptables
//! dataplane's encoding of the plan, pure and host-testable.
//!
//! # Encoding
//! - Each local endpoint direction that is isolated belongs to one *policy group*: the
//!   endpoints of one namespace whose direction has exactly the same allow entries. A group
//!   is what Azure NPM calls a policy: it has a chain `AZURE-NPM-{INGRESS,EGRESS}-<hash>`
//!   named from the hash of its readable name `<namespace>/plan-<digest of its rules>`, a set
//!   of the endpoints it applies to (`podselector-<group>`, hash:net) that the jump from
//!   `AZURE-NPM-INGRESS` (dst) or `AZURE-NPM-EGRESS` (src) matches, allow rules, and a last
//!   rule that sets the drop mark.
//! - Allow entries become rules, one per (ports, peer kind): a peer set is a list:set named
//!   after its selector (`selector-ns:x pods:app=web`) whose members are identity sets, and
//!   changes in place as identities join and leave it; every single identity admitted on the
//!   same ports is matched through one set (`identity-<id>` hash:net of the identity's pod
//!   addresses, or, for several, a `nestedlabel-…` list:set of those sets); each CIDR block is
//!   its own `cidr-<block>` hash:net set (maxelem 4294967295) with the excepts as `nomatch`
//!   entries (0.0.0.0/0 as two /1, which hash:net can hold); "anyone" needs no set.
//! - A group's content never changes: an endpoint whose entries change moves to another
//!   group (created first), so a rule set is written once and removed once, and sets of
//!   pods change in place.
//!
//! # Order (make-before-break)
//! Every diff becomes up to five batches, applied in order, each one process:
//! 1. `ipset`: create new sets, add members (new identity members, endpoints joining groups);
//! 2. `iptables`: new group chains with their rules, then their jumps (`-I … 1`), and the
//!    AZURE-NPM jumps when the first group appears;
//! 3. `ipset`: remove members (endpoints leaving groups, addresses leaving identities);
//! 4. `iptables`: remove the jumps and chains of groups left without endpoints;
//! 5. `ipset`: destroy sets no rule references.
//!
//! An endpoint moving between groups is in both sets for a moment, which admits the union of
//! the old and the new entries; an endpoint becoming isolated gets its entries and isolation
//! at once; an address changing identity is in both identity sets for a moment (as the
//! plan's diffs allow). Nothing is admitted that neither the old nor the new plan admits.
//!
//! A reconcile (start-up, or after a failed batch) compares the whole plan with what the
//! kernel holds ([`KernelState`]) and writes every chain in one `iptables-restore`
//! transaction (atomic), after adding what is missing to the sets and before removing what is
//! extra; stale chains go next, stale sets last. Sets are never reused with other members
//! than the kernel has (a restarted agent may number identities differently): such a set
//! gets another name (`identity-7~1`), so no rule already in the kernel changes meaning.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::names::{self, ACCEPT, AZURE_NPM, EGRESS, FORWARD_JUMP, INGRESS, INGRESS_ALLOW_MARK, quote_comment};
use super::state::{KernelSet, KernelState, jumps_to_azure_npm};
use crate::model::{CidrBlock, Direction, ObjectKey};
use crate::compile::PeerSelector;
use crate::plan::{Allow, Change, IdentityId, PeerMatch, Plan, PlanDiff, PortMatch, SetId};

/// Which program a batch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `ipset restore` (one command per line, `-exist`).
    Ipset,
    /// `iptables-restore --noflush` (a `*filter` … `COMMIT` transaction).
    Iptables,
}

/// One process's worth of work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// What it does, for logs and errors.
    pub step: &'static str,
    pub tool: Tool,
    pub script: String,
    /// Commands in the script (not counting `*filter`, chain declarations, `COMMIT`).
    pub commands: usize,
}

/// The steps of a diff, in order.
pub const STEP_ADD_SETS: &str = "create sets and add members";
pub const STEP_ADD_RULES: &str = "add rules";
pub const STEP_DEL_MEMBERS: &str = "remove set members";
pub const STEP_DEL_RULES: &str = "remove rules";
pub const STEP_DEL_SETS: &str = "destroy sets";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    HashNet,
    ListSet,
}

impl SetKind {
    pub fn type_name(self) -> &'static str {
        match self {
            SetKind::HashNet => "hash:net",
            SetKind::ListSet => "list:set",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Role {
    Identity(IdentityId),
    /// Members are the identity sets (kernel names).
    Nested(Vec<String>),
    /// A plan's peer set: members are its identities' sets, and change in place.
    Selector(SetId),
    Cidr,
    /// The endpoints of a group.
    Endpoints,
}

#[derive(Clone, Debug)]
struct SetState {
    /// The name asked for (an alternate may have been given, see `readable`).
    base: String,
    /// The readable name the kernel name is the hash of.
    readable: String,
    kind: SetKind,
    role: Role,
    members: BTreeSet<String>,
    /// Rules (of groups) and nested sets referencing the set; the group owning an
    /// endpoint set counts once.
    refs: u32,
    /// Extra create options (maxelem).
    options: &'static str,
}

#[derive(Clone, Debug)]
struct Group {
    dir: Direction,
    ns: String,
    chain: String,
    endpoint_set: String,
    /// The rules, as `iptables-save` prints them after `-A CHAIN `; joined, the content.
    rules: Vec<String>,
    content: String,
    jump: String,
    /// Sets the rules reference (each once).
    refs: Vec<String>,
    members: BTreeSet<Ipv4Addr>,
}

#[derive(Clone, Debug, Default)]
struct DirPlan {
    isolated: bool,
    allow: HashSet<Allow>,
}

#[derive(Clone, Debug)]
struct Endpoint {
    pod: ObjectKey,
    dirs: [DirPlan; 2],
}

/// A set a group's rules need, with what to create it from.
#[derive(Clone, Debug)]
struct SetReq {
    name: String,
    /// The readable name asked for (the set's may be an alternate).
    base: String,
    kind: SetKind,
    role: Role,
    members: BTreeSet<String>,
    options: &'static str,
}

/// What an endpoint direction's group would be.
struct Spec {
    ns: String,
    rules: Vec<String>,
    content: String,
    /// Sets to ensure, in creation order (hash sets before the lists holding them).
    sets: Vec<SetReq>,
    /// Sets the rules reference directly.
    refs: Vec<String>,
}

#[derive(Default)]
struct Phases {
    create_sets: Vec<String>,
    create_lists: Vec<String>,
    add_members: Vec<String>,
    new_chains: Vec<String>,
    add_rules: Vec<String>,
    add_jumps: Vec<String>,
    del_members: Vec<String>,
    del_rules: Vec<String>,
    del_chains: Vec<String>,
    destroy_lists: Vec<String>,
    destroy_sets: Vec<String>,
}

/// The encoder's memory: the plan (IPv4 part) and what it has told the kernel to hold.
#[derive(Clone, Debug, Default)]
pub struct Translator {
    endpoints: HashMap<Ipv4Addr, Endpoint>,
    identities: HashMap<Ipv4Addr, IdentityId>,
    members: HashMap<IdentityId, BTreeSet<Ipv4Addr>>,
    sets: HashMap<String, SetState>,
    /// Kernel set name → readable name, for every set (and name given out).
    names: HashMap<String, String>,
    /// Requested readable name → kernel set name.
    by_readable: HashMap<String, String>,
    identity_sets: HashMap<IdentityId, String>,
    /// The plan's peer sets.
    peer_sets: HashMap<SetId, (PeerSelector, BTreeSet<IdentityId>)>,
    /// Kernel names of the peer sets some rule references.
    selector_sets: HashMap<SetId, String>,
    groups: HashMap<String, Group>,
    chains: HashMap<String, String>,
    endpoint_group: HashMap<(Ipv4Addr, Direction), String>,
    /// Whether AZURE-NPM holds its three jumps (Azure NPM leaves it empty without policies).
    active: bool,
    /// Whether the base chains exist.
    base: bool,
    /// During a reconcile: what the kernel holds, so that no set is reused with other members.
    kernel: Option<KernelState>,
    /// Plan entries the encoding cannot express (IPv6), counted for the logs.
    pub skipped_ipv6: u64,
}

/// A policy group, for explaining the layout.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub direction: Direction,
    pub namespace: String,
    pub chain: String,
    pub endpoints: Vec<Ipv4Addr>,
    /// Its chain's rules (the allow rules and the drop-mark rule).
    pub rules: usize,
}

/// Sizes of what the translator has told the kernel to hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub endpoints: usize,
    pub groups: usize,
    pub sets: usize,
    pub set_members: usize,
    pub rules: usize,
}

fn di(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

fn create_line(h: &str, kind: SetKind, options: &str, members: usize) -> String {
    match kind {
        SetKind::HashNet => format!("create {h} hash:net family inet{options}"),
        // (Kernels before 4.x hold at most `size` members; a nested set never grows, a
        // selector's set says how far it may.)
        SetKind::ListSet if !options.is_empty() => format!("create {h} list:set{options}"),
        SetKind::ListSet => format!("create {h} list:set size {}", members.max(8)),
    }
}

/// How many identities a selector's list:set may hold on kernels that enforce `size`.
const SELECTOR_SET_SIZE: &str = " size 65536";

fn alternate(base: &str, k: usize) -> String {
    if k == 0 { base.to_string() } else { format!("{base}~{k}") }
}

/// A hash:net member as `ipset save` prints it.
fn net_member(net: Ipv4Net, nomatch: bool) -> String {
    let mut s = if net.prefix_len() == 32 { net.addr().to_string() } else { net.to_string() };
    if nomatch {
        s.push_str(" nomatch");
    }
    s
}

/// The entries of a CIDR block's set.
fn cidr_members(net: Ipv4Net, except: &[Ipv4Net]) -> BTreeSet<String> {
    let mut m = BTreeSet::new();
    if net.prefix_len() == 0 {
        // hash:net cannot hold /0.
        m.insert("0.0.0.0/1".to_string());
        m.insert("128.0.0.0/1".to_string());
    } else {
        m.insert(net_member(net, false));
    }
    for e in except {
        if e.prefix_len() == 0 {
            // Everything is excepted: nothing matches.
            m.clear();
            return m;
        }
        m.insert(net_member(*e, true));
    }
    m
}

/// `-p` … `--dport` and the comment's `-ON-…-TO-PORT-…` of a port match.
fn ports_spec(pm: &PortMatch) -> (String, String) {
    match *pm {
        PortMatch::Any => (String::new(), String::new()),
        PortMatch::Protocol(p) => {
            let l = p.as_str().to_lowercase();
            (format!("-p {l} "), format!("-ON-{}", p.as_str()))
        }
        PortMatch::Range { protocol, first, last } => {
            let l = protocol.as_str().to_lowercase();
            if first == last {
                (format!("-p {l} -m {l} --dport {first} "), format!("-ON-{}-TO-PORT-{first}", protocol.as_str()))
            } else {
                (format!("-p {l} -m {l} --dport {first}:{last} "), format!("-ON-{}-TO-PORT-{first}:{last}", protocol.as_str()))
            }
        }
    }
}

fn allow_target(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => INGRESS_ALLOW_MARK,
        Direction::Egress => ACCEPT,
    }
}

fn drop_rule(dir: Direction) -> String {
    let mark = match dir {
        Direction::Ingress => names::INGRESS_DROP_MARK_HEX,
        Direction::Egress => names::EGRESS_DROP_MARK_HEX,
    };
    format!("-m comment --comment DROP-ALL -j MARK --set-xmark {mark}")
}

/// The base chains' rules (AZURE-NPM's only when active), group jumps excluded.
fn base_rules(active: bool) -> Vec<(&'static str, String)> {
    let mut r = Vec::new();
    if active {
        for t in [INGRESS, EGRESS, ACCEPT] {
            r.push((AZURE_NPM, format!("-j {t}")));
        }
    }
    r.push((INGRESS, ingress_tail()));
    let allow = names::INGRESS_ALLOW_MARK_HEX;
    r.push((
        INGRESS_ALLOW_MARK,
        format!("-m comment --comment {} -j MARK --set-xmark {allow}", quote_comment(&format!("SET-INGRESS-ALLOW-MARK-{allow}"))),
    ));
    r.push((INGRESS_ALLOW_MARK, format!("-j {EGRESS}")));
    for t in egress_tail() {
        r.push((EGRESS, t));
    }
    r.push((ACCEPT, "-j ACCEPT".to_string()));
    r
}

fn ingress_tail() -> String {
    let m = names::INGRESS_DROP_MARK_HEX;
    format!("-m mark --mark {m} -m comment --comment {} -j DROP", quote_comment(&format!("DROP-ON-INGRESS-DROP-MARK-{m}")))
}

fn egress_tail() -> [String; 2] {
    let d = names::EGRESS_DROP_MARK_HEX;
    let a = names::INGRESS_ALLOW_MARK_HEX;
    [
        format!("-m mark --mark {d} -m comment --comment {} -j DROP", quote_comment(&format!("DROP-ON-EGRESS-DROP-MARK-{d}"))),
        format!("-m mark --mark {a} -m comment --comment {} -j {ACCEPT}", quote_comment(&format!("ACCEPT-ON-INGRESS-ALLOW-MARK-{a}"))),
    ]
}

fn base_of(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => INGRESS,
        Direction::Egress => EGRESS,
    }
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn encoded(&self) -> Encoded {
        Encoded {
            endpoints: self.endpoints.len(),
            groups: self.groups.len(),
            sets: self.sets.len(),
            set_members: self.sets.values().map(|s| s.members.len()).sum(),
            rules: self.groups.values().map(|g| g.rules.len() + 1).sum(),
        }
    }

    /// Translates one diff into batches, in order (empty ones left out).
    pub fn translate(&mut self, diff: &PlanDiff) -> Vec<Batch> {
        let mut touched: BTreeSet<(Ipv4Addr, Direction)> = BTreeSet::new();
        let mut old_identity: BTreeMap<Ipv4Addr, Option<IdentityId>> = BTreeMap::new();
        let mut member_changes: BTreeMap<(SetId, IdentityId), bool> = BTreeMap::new();
        for c in &diff.changes {
            match c {
                Change::AddSet { set, selector } => {
                    self.peer_sets.insert(*set, (selector.clone(), BTreeSet::new()));
                }
                Change::RemoveSet { set } => {
                    self.peer_sets.remove(set);
                }
                Change::AddMember { set, identity } => {
                    if let Some((_, m)) = self.peer_sets.get_mut(set) {
                        m.insert(*identity);
                        member_changes.insert((*set, *identity), true);
                    }
                }
                Change::RemoveMember { set, identity } => {
                    if let Some((_, m)) = self.peer_sets.get_mut(set) {
                        m.remove(identity);
                        member_changes.insert((*set, *identity), false);
                    }
                }
                _ => self.change(c, &mut touched, &mut old_identity),
            }
        }
        let mut ph = Phases::default();
        if !self.base {
            self.base = true;
            for c in names::BASE_CHAINS {
                ph.new_chains.push(format!(":{c} - [0:0]"));
            }
            for (chain, rule) in base_rules(false) {
                ph.add_rules.push(format!("-A {chain} {rule}"));
            }
            ph.add_jumps.push(format!("-I FORWARD 1 {FORWARD_JUMP}"));
        }
        // Addresses changing identity: into the new identity's set now, out of the old one
        // after the groups have moved.
        for (ip, old) in old_identity {
            let new = self.identities.get(&ip).copied();
            if old == new {
                continue;
            }
            let member = ip.to_string();
            if let Some(n) = new {
                self.members.entry(n).or_default().insert(ip);
                if let Some(h) = self.identity_sets.get(&n).cloned()
                    && self.sets.get_mut(&h).is_some_and(|s| s.members.insert(member.clone()))
                {
                    ph.add_members.push(format!("add {h} {member}"));
                }
            }
            if let Some(o) = old {
                if let Some(m) = self.members.get_mut(&o) {
                    m.remove(&ip);
                    if m.is_empty() {
                        self.members.remove(&o);
                    }
                }
                if let Some(h) = self.identity_sets.get(&o).cloned()
                    && self.sets.get_mut(&h).is_some_and(|s| s.members.remove(&member))
                {
                    ph.del_members.push(format!("del {h} {member}"));
                }
            }
        }
        // Peer sets in the kernel change in place: identities join (their set created as
        // needed) with the other additions, and leave with the other removals.
        // Joins first: an identity set leaving one list and joining another must not be
        // released in between.
        let (joins, leaves): (Vec<_>, Vec<_>) = member_changes.into_iter().partition(|(_, join)| *join);
        for ((sid, id), join) in joins.into_iter().chain(leaves) {
            let Some(h) = self.selector_sets.get(&sid).cloned() else { continue };
            if join {
                let req = self.identity_set(id);
                let member = req.name.clone();
                self.ensure_set(req, &mut ph);
                if self.sets.get_mut(&h).expect("selector set").members.insert(member.clone()) {
                    self.sets.get_mut(&member).expect("identity set").refs += 1;
                    ph.add_members.push(format!("add {h} {member}"));
                }
            } else if let Some(member) = self.identity_sets.get(&id).cloned()
                && self.sets.get_mut(&h).expect("selector set").members.remove(&member)
            {
                ph.del_members.push(format!("del {h} {member}"));
                self.release(&member, &mut ph);
            }
        }
        for (ip, dir) in touched {
            self.assign(ip, dir, &mut ph);
        }
        self.collect(&mut ph);
        self.batches(ph)
    }

    fn change(&mut self, c: &Change, touched: &mut BTreeSet<(Ipv4Addr, Direction)>, old_identity: &mut BTreeMap<Ipv4Addr, Option<IdentityId>>) {
        match c {
            Change::AddNodeIp { .. } | Change::RemoveNodeIp { .. } => {}
            Change::AddIdentityKey { .. }
            | Change::RemoveIdentityKey { .. }
            | Change::SetNamespaceLabels { .. }
            | Change::RemoveNamespace { .. }
            | Change::SetPolicy { .. }
            | Change::RemovePolicy { .. } => {}
            // (handled by `translate`)
            Change::AddSet { .. } | Change::RemoveSet { .. } | Change::AddMember { .. } | Change::RemoveMember { .. } => {}
            Change::AddEndpoint { ip, pod } | Change::RetargetEndpoint { ip, pod } => {
                let Some(ip) = v4(*ip) else {
                    self.skipped_ipv6 += 1;
                    return;
                };
                match self.endpoints.get_mut(&ip) {
                    Some(ep) => ep.pod = pod.clone(),
                    None => {
                        self.endpoints.insert(ip, Endpoint { pod: pod.clone(), dirs: Default::default() });
                    }
                }
                touched.extend(Direction::BOTH.map(|d| (ip, d)));
            }
            Change::RemoveEndpoint { ip } => {
                let Some(ip) = v4(*ip) else { return };
                self.endpoints.remove(&ip);
                touched.extend(Direction::BOTH.map(|d| (ip, d)));
            }
            Change::SetIsolation { ip, direction, isolated } => {
                let Some(ip) = v4(*ip) else { return };
                if let Some(ep) = self.endpoints.get_mut(&ip) {
                    ep.dirs[di(*direction)].isolated = *isolated;
                    touched.insert((ip, *direction));
                }
            }
            Change::AddAllow { ip, direction, allow } => {
                let Some(ip) = v4(*ip) else { return };
                if let Some(ep) = self.endpoints.get_mut(&ip) {
                    ep.dirs[di(*direction)].allow.insert(allow.clone());
                    touched.insert((ip, *direction));
                }
            }
            Change::RemoveAllow { ip, direction, allow } => {
                let Some(ip) = v4(*ip) else { return };
                if let Some(ep) = self.endpoints.get_mut(&ip) {
                    ep.dirs[di(*direction)].allow.remove(allow);
                    touched.insert((ip, *direction));
                }
            }
            Change::SetIdentity { ip, identity } => {
                let Some(ip) = v4(*ip) else {
                    self.skipped_ipv6 += 1;
                    return;
                };
                let old = self.identities.insert(ip, *identity);
                old_identity.entry(ip).or_insert(old);
            }
            Change::RemoveIdentity { ip } => {
                let Some(ip) = v4(*ip) else { return };
                let old = self.identities.remove(&ip);
                old_identity.entry(ip).or_insert(old);
            }
        }
    }

    /// Puts one endpoint direction in the group its entries call for (or in none).
    fn assign(&mut self, ip: Ipv4Addr, dir: Direction, ph: &mut Phases) {
        let new = self.spec(ip, dir).map(|spec| self.ensure_group(dir, spec, ph));
        let old = self.endpoint_group.get(&(ip, dir)).cloned();
        if new == old {
            return;
        }
        let member = ip.to_string();
        if let Some(g) = &new {
            let group = self.groups.get_mut(g).expect("ensured group");
            group.members.insert(ip);
            let set = group.endpoint_set.clone();
            self.sets.get_mut(&set).expect("endpoint set").members.insert(member.clone());
            ph.add_members.push(format!("add {set} {member}"));
            self.endpoint_group.insert((ip, dir), g.clone());
        } else {
            self.endpoint_group.remove(&(ip, dir));
        }
        if let Some(g) = &old {
            let group = self.groups.get_mut(g).expect("old group");
            group.members.remove(&ip);
            let set = group.endpoint_set.clone();
            self.sets.get_mut(&set).expect("endpoint set").members.remove(&member);
            ph.del_members.push(format!("del {set} {member}"));
        }
    }

    /// Claims the kernel name of a set: the hash of `base`, or of an alternate when that
    /// hash is taken by another set or, during a reconcile, is a kernel set that `ok` refuses.
    fn claim(&mut self, base: &str, ok: impl Fn(&KernelSet) -> bool) -> String {
        if let Some(h) = self.by_readable.get(base) {
            return h.clone();
        }
        for k in 0.. {
            let readable = alternate(base, k);
            let h = names::hashed_set_name(&readable);
            if self.names.contains_key(&h) {
                continue;
            }
            if let Some(ks) = self.kernel.as_ref().and_then(|kern| kern.sets.get(&h))
                && !ok(ks)
            {
                continue;
            }
            self.names.insert(h.clone(), readable);
            self.by_readable.insert(base.to_string(), h.clone());
            return h;
        }
        unreachable!()
    }

    fn identity_set(&mut self, id: IdentityId) -> SetReq {
        let members: BTreeSet<String> = self.members.get(&id).into_iter().flatten().map(|ip| ip.to_string()).collect();
        let base = format!("identity-{id}");
        let name = match self.identity_sets.get(&id) {
            Some(h) => h.clone(),
            None => {
                let want = members.clone();
                self.claim(&base, |ks| ks.kind == "hash:net" && ks.members == want)
            }
        };
        SetReq { name, base, kind: SetKind::HashNet, role: Role::Identity(id), members, options: "" }
    }

    fn cidr_set(&mut self, net: Ipv4Net, except: &[Ipv4Net]) -> SetReq {
        let mut base = format!("cidr-{net}");
        if !except.is_empty() {
            let list: Vec<String> = except.iter().map(|e| e.to_string()).collect();
            let joined = list.join(",");
            if joined.len() <= 120 {
                let _ = write!(base, "-except-{joined}");
            } else {
                let _ = write!(base, "-except-{}-nets-{:016x}", list.len(), names::fnv1a64(&joined));
            }
        }
        let name = self.claim(&base, |ks| ks.kind == "hash:net");
        SetReq { name, base, kind: SetKind::HashNet, role: Role::Cidr, members: cidr_members(net, except), options: " maxelem 4294967295" }
    }

    /// The list:set of a plan's peer set, with its identities' sets (to ensure first).
    fn selector_set(&mut self, sid: SetId) -> (SetReq, Vec<SetReq>) {
        let (selector, ids) = self.peer_sets.get(&sid).cloned().unwrap_or_else(|| (PeerSelector::everything(), BTreeSet::new()));
        let id_sets: Vec<SetReq> = ids.iter().map(|id| self.identity_set(*id)).collect();
        let members: BTreeSet<String> = id_sets.iter().map(|s| s.name.clone()).collect();
        let base = format!("selector-{selector}");
        let name = match self.selector_sets.get(&sid) {
            Some(h) => h.clone(),
            None => {
                let want = members.clone();
                self.claim(&base, |ks| ks.kind == "list:set" && ks.members == want)
            }
        };
        let req = SetReq { name, base, kind: SetKind::ListSet, role: Role::Selector(sid), members, options: SELECTOR_SET_SIZE };
        (req, id_sets)
    }

    fn nested_set(&mut self, members: &[String]) -> SetReq {
        let readable: Vec<&str> = members.iter().map(|h| self.names.get(h).map(String::as_str).unwrap_or(h)).collect();
        let joined = readable.join(",");
        let base = if joined.len() <= 120 {
            format!("nestedlabel-{joined}")
        } else {
            format!("nestedlabel-{}-sets-{:016x}", members.len(), names::fnv1a64(&members.join(",")))
        };
        let name = self.claim(&base, |ks| ks.kind == "list:set");
        SetReq { name, base, kind: SetKind::ListSet, role: Role::Nested(members.to_vec()), members: members.iter().cloned().collect(), options: "" }
    }

    fn readable(&self, h: &str) -> String {
        self.names.get(h).cloned().unwrap_or_else(|| h.to_string())
    }

    /// The group an endpoint direction's entries call for, or `None` when it is not isolated.
    fn spec(&mut self, ip: Ipv4Addr, dir: Direction) -> Option<Spec> {
        let ep = self.endpoints.get(&ip)?;
        let dp = &ep.dirs[di(dir)];
        if !dp.isolated {
            return None;
        }
        let ns = ep.pod.namespace.clone();
        let allows: Vec<Allow> = dp.allow.iter().cloned().collect();
        #[derive(Default)]
        struct Peers {
            any: bool,
            sets: BTreeSet<SetId>,
            ids: BTreeSet<IdentityId>,
            cidrs: BTreeSet<(Ipv4Net, Vec<Ipv4Net>)>,
        }
        let mut by_port: BTreeMap<PortMatch, Peers> = BTreeMap::new();
        let mut v6 = 0;
        for a in &allows {
            let p = by_port.entry(a.ports).or_default();
            match &a.peer {
                PeerMatch::Any => p.any = true,
                PeerMatch::Identity(id) => {
                    p.ids.insert(*id);
                }
                PeerMatch::Set(s) => {
                    p.sets.insert(*s);
                }
                PeerMatch::Cidr(CidrBlock { net: IpNet::V4(net), except }) => {
                    let ex: Vec<Ipv4Net> = except.iter().filter_map(|e| if let IpNet::V4(e) = e { Some(*e) } else { None }).collect();
                    p.cidrs.insert((*net, ex));
                }
                PeerMatch::Cidr(_) => v6 += 1,
            }
        }
        self.skipped_ipv6 += v6;
        let (word, peer_dir) = match dir {
            Direction::Ingress => ("FROM", "src"),
            Direction::Egress => ("TO", "dst"),
        };
        let target = allow_target(dir);
        let mut rules = Vec::new();
        let mut sets: Vec<SetReq> = Vec::new();
        let mut lists: Vec<SetReq> = Vec::new();
        let mut refs: Vec<String> = Vec::new();
        for (pm, peers) in by_port {
            let (spec, comment) = ports_spec(&pm);
            if peers.any {
                rules.push(format!("{spec}-m comment --comment {} -j {target}", quote_comment(&format!("ALLOW-ALL{comment}"))));
                continue;
            }
            let mut matched: Vec<String> = Vec::new();
            for sid in &peers.sets {
                let (list, id_sets) = self.selector_set(*sid);
                matched.push(list.name.clone());
                sets.extend(id_sets);
                lists.push(list);
            }
            if !peers.ids.is_empty() {
                let ids: Vec<SetReq> = peers.ids.iter().map(|id| self.identity_set(*id)).collect();
                let h = if ids.len() == 1 {
                    ids[0].name.clone()
                } else {
                    let names: Vec<String> = ids.iter().map(|s| s.name.clone()).collect();
                    let nested = self.nested_set(&names);
                    let h = nested.name.clone();
                    lists.push(nested);
                    h
                };
                sets.extend(ids);
                matched.push(h);
            }
            for (net, except) in &peers.cidrs {
                let s = self.cidr_set(*net, except);
                matched.push(s.name.clone());
                sets.push(s);
            }
            for h in matched {
                let c = format!("ALLOW-{word}-{}{comment}", self.readable(&h));
                rules.push(format!("{spec}-m set --match-set {h} {peer_dir} -m comment --comment {} -j {target}", quote_comment(&c)));
                if !refs.contains(&h) {
                    refs.push(h);
                }
            }
        }
        rules.push(drop_rule(dir));
        sets.extend(lists);
        let content = rules.join("\n");
        Some(Spec { ns, rules, content, sets, refs })
    }

    /// The group with `spec`'s rules, created (sets, chain, jump) when it does not exist.
    fn ensure_group(&mut self, dir: Direction, spec: Spec, ph: &mut Phases) -> String {
        let base = format!("{}/plan-{:016x}", spec.ns, names::fnv1a64(&format!("{dir}\n{}", spec.content)));
        let mut name = String::new();
        for k in 0.. {
            let cand = alternate(&base, k);
            match self.groups.get(&cand) {
                Some(g) if g.dir == dir && g.content == spec.content => return cand,
                Some(_) => continue,
                None => {
                    let chain = names::policy_chain(dir == Direction::Ingress, &cand);
                    if self.chains.contains_key(&chain) {
                        continue;
                    }
                    name = cand;
                    break;
                }
            }
        }
        for req in spec.sets {
            self.ensure_set(req, ph);
        }
        for h in &spec.refs {
            self.sets.get_mut(h).expect("ensured set").refs += 1;
        }
        let ep_base = format!("podselector-{name}");
        let ep_set = self.claim(&ep_base, |ks| ks.kind == "hash:net");
        self.ensure_set(
            SetReq { name: ep_set.clone(), base: ep_base, kind: SetKind::HashNet, role: Role::Endpoints, members: BTreeSet::new(), options: "" },
            ph,
        );
        self.sets.get_mut(&ep_set).expect("endpoint set").refs += 1;
        let chain = names::policy_chain(dir == Direction::Ingress, &name);
        let (word, match_dir) = match dir {
            Direction::Ingress => ("TO", "dst"),
            Direction::Egress => ("FROM", "src"),
        };
        let comment = format!(
            "{}-POLICY-{name}-{word}-{}-IN-ns-{}",
            if dir == Direction::Ingress { "INGRESS" } else { "EGRESS" },
            self.readable(&ep_set),
            spec.ns
        );
        let jump = format!("-m set --match-set {ep_set} {match_dir} -m comment --comment {} -j {chain}", quote_comment(&comment));
        ph.new_chains.push(format!(":{chain} - [0:0]"));
        for r in &spec.rules {
            ph.add_rules.push(format!("-A {chain} {r}"));
        }
        ph.add_jumps.push(format!("-I {} 1 {jump}", base_of(dir)));
        if !self.active {
            self.active = true;
            ph.add_jumps.push(format!("-F {AZURE_NPM}"));
            for t in [INGRESS, EGRESS, ACCEPT] {
                ph.add_jumps.push(format!("-A {AZURE_NPM} -j {t}"));
            }
        }
        self.chains.insert(chain.clone(), name.clone());
        self.groups.insert(
            name.clone(),
            Group {
                dir,
                ns: spec.ns,
                chain,
                endpoint_set: ep_set,
                rules: spec.rules,
                content: spec.content,
                jump,
                refs: spec.refs,
                members: BTreeSet::new(),
            },
        );
        name
    }

    fn ensure_set(&mut self, req: SetReq, ph: &mut Phases) {
        if self.sets.contains_key(&req.name) {
            return;
        }
        let h = req.name.clone();
        let readable = self.readable(&h);
        let out = match req.kind {
            SetKind::HashNet => &mut ph.create_sets,
            SetKind::ListSet => &mut ph.create_lists,
        };
        out.push(create_line(&h, req.kind, req.options, req.members.len()));
        for m in &req.members {
            out.push(format!("add {h} {m}"));
        }
        if let Role::Nested(members) = &req.role {
            for m in members {
                self.sets.get_mut(m).expect("nested member exists").refs += 1;
            }
        }
        if let Role::Selector(sid) = req.role {
            for m in &req.members {
                self.sets.get_mut(m).expect("selector member exists").refs += 1;
            }
            self.selector_sets.insert(sid, h.clone());
        }
        if let Role::Identity(id) = req.role {
            self.identity_sets.insert(id, h.clone());
        }
        self.sets.insert(h, SetState { base: req.base, readable, kind: req.kind, role: req.role, members: req.members, refs: 0, options: req.options });
    }

    /// Removes groups left without endpoints and sets left without references.
    fn collect(&mut self, ph: &mut Phases) {
        let mut empty: Vec<String> = self.groups.iter().filter(|(_, g)| g.members.is_empty()).map(|(n, _)| n.clone()).collect();
        empty.sort();
        for name in empty {
            let g = self.groups.remove(&name).expect("group");
            self.chains.remove(&g.chain);
            ph.del_rules.push(format!("-D {} {}", base_of(g.dir), g.jump));
            ph.del_rules.push(format!("-F {}", g.chain));
            ph.del_chains.push(format!("-X {}", g.chain));
            for h in g.refs.iter().chain(std::iter::once(&g.endpoint_set)) {
                self.release(h, ph);
            }
        }
        // Members need not leave sets that are destroyed anyway.
        if !ph.destroy_sets.is_empty() {
            let gone: HashSet<&str> = ph.destroy_sets.iter().map(|l| &l["destroy ".len()..]).collect();
            ph.del_members.retain(|l| !l.split(' ').nth(1).is_some_and(|set| gone.contains(set)));
        }
        if self.active && self.groups.is_empty() {
            self.active = false;
            ph.del_rules.insert(0, format!("-F {AZURE_NPM}"));
        }
    }

    fn release(&mut self, h: &str, ph: &mut Phases) {
        let s = self.sets.get_mut(h).expect("released set exists");
        s.refs -= 1;
        if s.refs > 0 {
            return;
        }
        let s = self.sets.remove(h).expect("set");
        self.names.remove(h);
        self.by_readable.remove(&s.base);
        match s.kind {
            SetKind::ListSet => ph.destroy_lists.push(format!("destroy {h}")),
            SetKind::HashNet => ph.destroy_sets.push(format!("destroy {h}")),
        }
        match s.role {
            Role::Nested(members) => {
                for m in members {
                    self.release(&m, ph);
                }
            }
            Role::Selector(sid) => {
                self.selector_sets.remove(&sid);
                for m in s.members {
                    self.release(&m, ph);
                }
            }
            Role::Identity(id) => {
                self.identity_sets.remove(&id);
            }
            Role::Cidr | Role::Endpoints => {}
        }
    }

    fn batches(&self, ph: Phases) -> Vec<Batch> {
        let mut out = Vec::new();
        let ipset = |step, lines: Vec<&Vec<String>>, out: &mut Vec<Batch>| {
            let n: usize = lines.iter().map(|l| l.len()).sum();
            if n > 0 {
                let mut script = String::new();
                for l in lines.into_iter().flatten() {
                    script.push_str(l);
                    script.push('\n');
                }
                out.push(Batch { step, tool: Tool::Ipset, script, commands: n });
            }
        };
        let iptables = |step, decl: &Vec<String>, lines: Vec<&Vec<String>>, out: &mut Vec<Batch>| {
            let n: usize = lines.iter().map(|l| l.len()).sum();
            if n > 0 || !decl.is_empty() {
                let mut script = String::from("*filter\n");
                for l in decl.iter().chain(lines.into_iter().flatten()) {
                    script.push_str(l);
                    script.push('\n');
                }
                script.push_str("COMMIT\n");
                out.push(Batch { step, tool: Tool::Iptables, script, commands: n });
            }
        };
        ipset(STEP_ADD_SETS, vec![&ph.create_sets, &ph.create_lists, &ph.add_members], &mut out);
        iptables(STEP_ADD_RULES, &ph.new_chains, vec![&ph.add_rules, &ph.add_jumps], &mut out);
        ipset(STEP_DEL_MEMBERS, vec![&ph.del_members], &mut out);
        iptables(STEP_DEL_RULES, &Vec::new(), vec![&ph.del_rules, &ph.del_chains], &mut out);
        ipset(STEP_DEL_SETS, vec![&ph.destroy_lists, &ph.destroy_sets], &mut out);
        out
    }

    /// Makes the translator hold exactly `plan` and returns the batches that move the kernel
    /// from `kernel` to it (see the module docs).
    pub fn reconcile(&mut self, plan: &Plan, kernel: &KernelState) -> Vec<Batch> {
        let mut t = Translator { kernel: Some(kernel.clone()), base: true, skipped_ipv6: self.skipped_ipv6, ..Translator::default() };
        for (sid, s) in &plan.sets {
            t.peer_sets.insert(*sid, (s.selector.clone(), s.members.clone()));
        }
        for (ip, id) in &plan.identities {
            match v4(*ip) {
                Some(v) => {
                    t.identities.insert(v, *id);
                    t.members.entry(*id).or_default().insert(v);
                }
                None => t.skipped_ipv6 += 1,
            }
        }
        let mut keys = Vec::new();
        for (ip, ep) in &plan.endpoints {
            let Some(v) = v4(*ip) else {
                t.skipped_ipv6 += 1;
                continue;
            };
            let mut e = Endpoint { pod: ep.pod.clone(), dirs: Default::default() };
            for d in Direction::BOTH {
                let src = ep.direction(d);
                e.dirs[di(d)] = DirPlan { isolated: src.isolated, allow: src.allow.clone() };
                keys.push((v, d));
            }
            t.endpoints.insert(v, e);
        }
        keys.sort();
        let mut ph = Phases::default();
        for (ip, d) in keys {
            t.assign(ip, d, &mut ph);
        }
        t.active = !t.groups.is_empty();
        t.kernel = None;
        let batches = t.reconcile_batches(kernel);
        *self = t;
        batches
    }

    fn sorted_sets(&self) -> Vec<(&String, &SetState)> {
        let mut sets: Vec<_> = self.sets.iter().collect();
        sets.sort_by(|a, b| (a.1.kind, a.0).cmp(&(b.1.kind, b.0)));
        sets
    }

    /// Every chain the layout should hold, with its rules, in `iptables-save` order of rules.
    pub fn desired_chains(&self) -> BTreeMap<String, Vec<String>> {
        let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in names::BASE_CHAINS {
            chains.insert(c.to_string(), Vec::new());
        }
        let mut jumps: [Vec<&String>; 2] = [Vec::new(), Vec::new()];
        for g in self.groups.values() {
            jumps[di(g.dir)].push(&g.jump);
            chains.insert(g.chain.clone(), g.rules.clone());
        }
        for j in &mut jumps {
            j.sort();
        }
        if self.active {
            for t in [INGRESS, EGRESS, ACCEPT] {
                chains.get_mut(AZURE_NPM).expect("base").push(format!("-j {t}"));
            }
        }
        let ing = chains.get_mut(INGRESS).expect("base");
        ing.extend(jumps[0].iter().map(|j| j.to_string()));
        ing.push(ingress_tail());
        for (chain, rule) in base_rules(false) {
            if chain == INGRESS_ALLOW_MARK || chain == ACCEPT {
                chains.get_mut(chain).expect("base").push(rule);
            }
        }
        let eg = chains.get_mut(EGRESS).expect("base");
        eg.extend(jumps[1].iter().map(|j| j.to_string()));
        eg.extend(egress_tail());
        chains
    }

    /// Every set the layout should hold: kernel name → (readable name, type, members).
    pub fn desired_sets(&self) -> BTreeMap<String, (String, &'static str, BTreeSet<String>)> {
        self.sets.iter().map(|(h, s)| (h.clone(), (s.readable.clone(), s.kind.type_name(), s.members.clone()))).collect()
    }

    fn reconcile_batches(&self, kernel: &KernelState) -> Vec<Batch> {
        let mut ph = Phases::default();
        // 1. Sets: create what is missing, add missing members.
        for (h, s) in self.sorted_sets() {
            let out = match s.kind {
                SetKind::HashNet => &mut ph.create_sets,
                SetKind::ListSet => &mut ph.create_lists,
            };
            match kernel.sets.get(h) {
                None => {
                    out.push(create_line(h, s.kind, s.options, s.members.len()));
                    out.extend(s.members.iter().map(|m| format!("add {h} {m}")));
                }
                Some(ks) => {
                    // (same type: `claim` gave another name otherwise)
                    out.extend(s.members.difference(&ks.members).map(|m| format!("add {h} {m}")));
                    ph.del_members.extend(ks.members.difference(&s.members).map(|m| format!("del {h} {}", m.trim_end_matches(" nomatch"))));
                }
            }
        }
        // 2. Every chain, in one transaction.
        let chains = self.desired_chains();
        for c in chains.keys() {
            ph.new_chains.push(format!(":{c} - [0:0]"));
        }
        for (c, rules) in &chains {
            ph.add_rules.extend(rules.iter().map(|r| format!("-A {c} {r}")));
        }
        let jumps: Vec<&String> = kernel.forward.iter().filter(|r| jumps_to_azure_npm(r)).collect();
        let in_place = jumps.len() == 1 && kernel.forward.first().map(String::as_str) == Some(FORWARD_JUMP);
        if !in_place {
            for j in jumps {
                ph.add_jumps.push(format!("-D FORWARD {j}"));
            }
            ph.add_jumps.push(format!("-I FORWARD 1 {FORWARD_JUMP}"));
        }
        // 4. Stale chains (flushed first: they may jump to each other).
        let stale: Vec<&String> = kernel.chains.keys().filter(|c| !chains.contains_key(*c)).collect();
        for c in &stale {
            ph.del_rules.push(format!("-F {c}"));
        }
        for c in &stale {
            ph.del_chains.push(format!("-X {c}"));
        }
        // 5. Stale sets, lists first (they reference the others).
        for (h, ks) in &kernel.sets {
            if !self.sets.contains_key(h) {
                if ks.kind == "list:set" {
                    ph.destroy_lists.push(format!("destroy {h}"));
                } else {
                    ph.destroy_sets.push(format!("destroy {h}"));
                }
            }
        }
        self.batches(ph)
    }

    /// The policy groups: (readable name, direction, namespace, chain, endpoints, rules).
    pub fn groups(&self) -> Vec<GroupInfo> {
        let mut v: Vec<GroupInfo> = self
            .groups
            .iter()
            .map(|(n, g)| GroupInfo {
                name: n.clone(),
                direction: g.dir,
                namespace: g.ns.clone(),
                chain: g.chain.clone(),
                endpoints: g.members.iter().copied().collect(),
                rules: g.rules.len() + 1,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The kernel name and readable name of every set, for explaining rules.
    pub fn set_names(&self) -> BTreeMap<String, String> {
        self.sets.iter().map(|(h, s)| (h.clone(), s.readable.clone())).collect()
    }
}

/// The script that removes everything of the layout found in `kernel` (for `cleanup` and
/// switching dataplanes): FORWARD's jumps, then every chain, in one transaction; and the
/// sets, lists first.
pub fn cleanup_batches(kernel: &KernelState) -> Vec<Batch> {
    let mut out = Vec::new();
    let jumps: Vec<&String> = kernel.forward.iter().filter(|r| jumps_to_azure_npm(r)).collect();
    if !jumps.is_empty() || !kernel.chains.is_empty() {
        let mut s = String::from("*filter\n");
        for j in &jumps {
            let _ = writeln!(s, "-D FORWARD {j}");
        }
        for c in kernel.chains.keys() {
            let _ = writeln!(s, "-F {c}");
        }
        for c in kernel.chains.keys() {
            let _ = writeln!(s, "-X {c}");
        }
        s.push_str("COMMIT\n");
        out.push(Batch { step: "remove chains", tool: Tool::Iptables, script: s, commands: jumps.len() + 2 * kernel.chains.len() });
    }
    if !kernel.sets.is_empty() {
        let mut s = String::new();
        let lists = kernel.sets.iter().filter(|(_, k)| k.kind == "list:set");
        let others = kernel.sets.iter().filter(|(_, k)| k.kind != "list:set");
        for (h, _) in lists.chain(others) {
            let _ = writeln!(s, "destroy {h}");
        }
        out.push(Batch { step: STEP_DEL_SETS, tool: Tool::Ipset, script: s, commands: kernel.sets.len() });
    }
    out
}
