//! The plan: what every dataplane enforces, in dataplane-neutral form, and the diffs that
//! move a dataplane from one plan to the next.
//!
//! For each local endpoint (pod address) and direction the plan says whether the endpoint
//! is isolated and, if it is, which profile holds its (peer, ports) allow entries. A
//! profile is shared by every endpoint direction that the same policies select (the
//! replicas of a deployment, or every pod of a namespace under one default policy), so the
//! plan, its diffs and the dataplanes hold a policy's entries once per profile, not once
//! per pod: a new replica costs one change, however large its policies. Peers are peer sets (the
//! identities a selector matches, kept once per node as ipsets are), single identities
//! (groups of pods that no selector can tell apart), CIDR blocks, or anyone. Pod addresses
//! map to identities cluster-wide, since peers may live on any node.
//!
//! Entries name a peer set rather than its identities so that an endpoint's entries grow
//! with its rules, not with the pods its rules match: a new pod selected by policies that
//! admit thousands of identities gets tens of entries, and a new identity joins each set
//! once per node, not once per endpoint. Dataplanes that match by identity (eBPF) expand
//! sets themselves; ipset-based ones keep them as sets.
//!
//! The entries above are all that the eBPF and HNS dataplanes need. When asked, the plan
//! also carries the Azure NPM [`layout`]: one entry per NetworkPolicy matching pods through
//! label sets, which the iptables dataplane renders as chains and ipsets. Both are computed by
//! the compiler; dataplanes only render them.

pub mod layout;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::cluster_policy::Action;
use crate::model::{
    CidrBlock, Direction, LabelSelector, Labels, NamedPort, NamespaceScope, ObjectKey, Pod,
    Protocol,
};
pub use layout::{Layout, LayoutChange};

/// What makes pods indistinguishable to every selector and named port: pods with equal
/// keys share one identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct IdentityKey {
    pub namespace: String,
    pub labels: std::sync::Arc<Labels>,
    pub named_ports: std::sync::Arc<[NamedPort]>,
}

impl IdentityKey {
    pub fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.key.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports: pod.named_ports.clone(),
        }
    }
}

/// The pods a selector peer matches: `pods` in the namespaces of `namespaces`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PeerSelector {
    pub namespaces: NamespaceScope,
    pub pods: LabelSelector,
}

impl PeerSelector {
    /// Every pod of every namespace.
    pub fn everything() -> Self {
        Self {
            namespaces: NamespaceScope::Selector(LabelSelector::everything()),
            pods: LabelSelector::everything(),
        }
    }

    pub fn matches(&self, namespace: &str, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.namespaces.matches(namespace, namespace_labels) && self.pods.matches(pod_labels)
    }
}

/// `ns:x pods:app=web`, `nsselector:team=a pods:{}`: readable, and stable for set names.
impl std::fmt::Display for PeerSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespaces {
            NamespaceScope::Named(ns) => write!(f, "ns:{ns} pods:{}", self.pods),
            NamespaceScope::Selector(s) => write!(f, "nsselector:{s} pods:{}", self.pods),
        }
    }
}

/// A numeric identity shared by pods with the same namespace, labels and named ports.
/// Never 0: 0 means "no identity" (an address that is not a pod's).
pub type IdentityId = u32;

/// A peer set's number, unique while the compiler runs (never reused).
pub type SetId = u32;

/// The identities one selector peer matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerSet {
    /// What the set stands for (for names and explanations).
    pub selector: PeerSelector,
    pub members: BTreeSet<IdentityId>,
}

/// Who an allow entry admits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PeerMatch {
    /// Any address (a rule without peers).
    Any,
    /// Pods with this identity.
    Identity(IdentityId),
    /// Pods with any identity of this peer set.
    Set(SetId),
    /// Addresses in the block (pods or not).
    Cidr(CidrBlock),
}

/// Which packets of the peer an allow entry admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PortMatch {
    /// Every protocol and port, ICMP included (a rule without ports).
    Any,
    /// Every port of one protocol.
    Protocol(Protocol),
    /// Ports `first..=last` of one protocol.
    Range { protocol: Protocol, first: u16, last: u16 },
}

impl PortMatch {
    pub fn matches(&self, protocol: Protocol, port: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Protocol(p) => p == protocol,
            PortMatch::Range { protocol: p, first, last } => {
                p == protocol && (first..=last).contains(&port)
            }
        }
    }
}

/// What an entry does when it matches, and where it stands among the others.
///
/// NetworkPolicies only admit: their entries are [`Verdict::Allow`]. ClusterNetworkPolicy
/// rules come before them (Admin tier) or after them (Baseline tier), ordered by
/// [`Precedence`]; the variants are declared in that order, so the derived order is the
/// order of evaluation. How a set of matching entries decides is [`DirectionPlan::admits`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Verdict {
    /// An Admin-tier rule: the first that matches decides (Pass skips the rest of the tier).
    Admin(Precedence),
    /// A NetworkPolicy's rule: admits.
    #[default]
    Allow,
    /// A Baseline-tier rule: judged only where no NetworkPolicy isolates the endpoint.
    Baseline(Precedence),
}

/// A ClusterNetworkPolicy rule's place in its tier: lower priority first, equal priorities
/// by policy name (the API leaves that order to the implementation), then rule order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Precedence {
    pub priority: u32,
    pub policy: std::sync::Arc<str>,
    /// The rule's index in its direction's rules.
    pub rule: u32,
    pub action: Action,
}

impl Verdict {
    pub fn precedence(&self) -> Option<&Precedence> {
        match self {
            Verdict::Admin(p) | Verdict::Baseline(p) => Some(p),
            Verdict::Allow => None,
        }
    }
}

/// An entry of a profile: packets of `peer` on `ports` meet `verdict` (for a
/// NetworkPolicy's rule, they are admitted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Allow {
    pub peer: PeerMatch,
    pub ports: PortMatch,
    pub verdict: Verdict,
}

impl Allow {
    /// A NetworkPolicy's entry.
    pub fn new(peer: PeerMatch, ports: PortMatch) -> Self {
        Self { peer, ports, verdict: Verdict::Allow }
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.peer {
            PeerMatch::Any => f.write_str("any")?,
            PeerMatch::Identity(id) => write!(f, "identity {id}")?,
            PeerMatch::Set(s) => write!(f, "set {s}")?,
            PeerMatch::Cidr(b) => write!(f, "{b}")?,
        }
        match self.ports {
            PortMatch::Any => Ok(()),
            PortMatch::Protocol(p) => write!(f, " {p}"),
            PortMatch::Range { protocol, first, last } if first == last => {
                write!(f, " {protocol}/{first}")
            }
            PortMatch::Range { protocol, first, last } => write!(f, " {protocol}/{first}-{last}"),
        }?;
        match &self.verdict {
            Verdict::Allow => Ok(()),
            Verdict::Admin(p) => {
                write!(f, " admin {:?} ({} #{} rule {})", p.action, p.policy, p.priority, p.rule)
            }
            Verdict::Baseline(p) => {
                write!(f, " baseline {:?} ({} #{} rule {})", p.action, p.policy, p.priority, p.rule)
            }
        }
    }
}

/// A profile's number, unique while the compiler runs (never reused). Never 0.
pub type ProfileId = u32;

/// The entries of endpoint directions that the same policies select.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// Whether peers are sources (ingress) or destinations (egress).
    pub direction: Direction,
    /// Whether a NetworkPolicy selects its endpoint directions (or they are quarantined):
    /// what no entry admits is then refused. A profile of ClusterNetworkPolicies alone
    /// refuses only what their Deny entries say.
    pub isolating: bool,
    pub allow: HashSet<Allow>,
}

/// No entries: what an endpoint direction without a profile holds.
static NO_ENTRIES: std::sync::LazyLock<HashSet<Allow>> = std::sync::LazyLock::new(HashSet::new);

/// One direction of one endpoint, as the plan enforces it.
#[derive(Clone, Copy, Debug)]
pub struct DirectionPlan<'a> {
    /// Whether a NetworkPolicy isolates the endpoint for this direction (what no entry
    /// admits is refused).
    pub isolated: bool,
    /// Whether any policy selects it (it has a profile). When false, everything is allowed
    /// and `allow` is empty.
    pub selected: bool,
    pub allow: &'a HashSet<Allow>,
}

impl DirectionPlan<'_> {
    /// Whether the entries admit a packet from (or to) `peer`, whose identity (if it is a
    /// pod) is `identity`, with the plan's peer sets `sets`. A linear scan: dataplanes use
    /// hash lookups, with the same result.
    pub fn admits(
        &self,
        sets: &HashMap<SetId, PeerSet>,
        peer: IpAddr,
        identity: Option<IdentityId>,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        if !self.selected {
            return true;
        }
        let matching = self
            .allow
            .iter()
            .filter(|a| a.peer.matches(sets, peer, identity) && a.ports.matches(protocol, port))
            .map(|a| &a.verdict);
        decide(matching, self.isolated)
    }
}

/// What decides a packet among the entries that match it (see [`decider`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decider<'a> {
    /// An Admin-tier rule that accepts or denies.
    Admin(&'a Precedence),
    /// The NetworkPolicies: whether one admits (they isolate the endpoint, or one admits).
    NetworkPolicies { allowed: bool },
    /// A Baseline-tier rule (its Pass allows: nothing is left to deny).
    Baseline(&'a Precedence),
    /// Nothing: allowed.
    Default,
}

impl Decider<'_> {
    pub fn allowed(&self) -> bool {
        match self {
            Decider::Admin(p) => p.action == Action::Accept,
            Decider::NetworkPolicies { allowed } => *allowed,
            Decider::Baseline(p) => p.action != Action::Deny,
            Decider::Default => true,
        }
    }
}

/// What decides among the entries matching a packet (`matching`, in any order), for an
/// endpoint direction that NetworkPolicies isolate or not: the Admin tier's first match
/// (unless it passes), then the NetworkPolicies' allows (final where they isolate), then the
/// Baseline tier's first match; else the default (allowed).
pub fn decider<'a>(matching: impl Iterator<Item = &'a Verdict>, isolated: bool) -> Decider<'a> {
    let mut admin: Option<&Precedence> = None;
    let mut allowed = false;
    let mut baseline: Option<&Precedence> = None;
    for v in matching {
        match v {
            Verdict::Admin(p) => admin = Some(admin.map_or(p, |a| a.min(p))),
            Verdict::Allow => allowed = true,
            Verdict::Baseline(p) => baseline = Some(baseline.map_or(p, |b| b.min(p))),
        }
    }
    match admin {
        Some(p) if p.action != Action::Pass => return Decider::Admin(p),
        _ => {}
    }
    if allowed || isolated {
        return Decider::NetworkPolicies { allowed };
    }
    baseline.map_or(Decider::Default, Decider::Baseline)
}

/// Whether the entries matching a packet let it through (see [`decider`]).
pub fn decide<'a>(matching: impl Iterator<Item = &'a Verdict>, isolated: bool) -> bool {
    decider(matching, isolated).allowed()
}

impl PeerMatch {
    /// Whether the entry's peer is `peer`, whose identity (if it is a pod) is `identity`.
    pub fn matches(
        &self,
        sets: &HashMap<SetId, PeerSet>,
        peer: IpAddr,
        identity: Option<IdentityId>,
    ) -> bool {
        match self {
            PeerMatch::Any => true,
            PeerMatch::Identity(id) => identity == Some(*id),
            PeerMatch::Set(s) => {
                identity.is_some_and(|i| sets.get(s).is_some_and(|s| s.members.contains(&i)))
            }
            PeerMatch::Cidr(b) => b.contains(peer),
        }
    }
}

/// The plan of one local endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointPlan {
    pub pod: ObjectKey,
    /// The profile of each direction (ingress, egress) that a policy selects (a
    /// NetworkPolicy, which isolates it, or a ClusterNetworkPolicy).
    pub profiles: [Option<ProfileId>; 2],
}

impl EndpointPlan {
    pub fn new(pod: ObjectKey) -> Self {
        Self { pod, profiles: [None, None] }
    }

    pub fn profile(&self, d: Direction) -> Option<ProfileId> {
        self.profiles[d as usize]
    }

    pub fn isolated(&self, d: Direction) -> bool {
        self.profile(d).is_some()
    }
}

/// An address several pods claim and nothing tells apart cluster-wide (see
/// [`Claim`](crate::state::Claim)): reported, and enforced closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The pods claiming it, in key order.
    pub claimants: Vec<ObjectKey>,
    /// Whether several of them are on this node: the address's endpoint then admits nothing
    /// (and is isolated in both directions).
    pub quarantined: bool,
}

/// Everything one node's dataplane enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every pod address in the cluster and its identity.
    pub identities: HashMap<IpAddr, IdentityId>,
    /// The peer sets the entries name.
    pub sets: HashMap<SetId, PeerSet>,
    /// The local endpoints, by pod address.
    pub endpoints: HashMap<IpAddr, EndpointPlan>,
    /// The entries of the endpoints' isolated directions.
    pub profiles: HashMap<ProfileId, Profile>,
    /// The local node's addresses: always allowed to and from local endpoints.
    pub node_ips: BTreeSet<IpAddr>,
    /// Addresses in conflict (for reports; their entries above already fail closed).
    pub conflicts: std::collections::BTreeMap<IpAddr, Conflict>,
    /// The Azure NPM layout of every policy of the cluster (empty unless the compiler was
    /// asked for it).
    pub layout: Layout,
}

/// A connection attempt, as a dataplane sees its first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Connection {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl Plan {
    /// One direction of a local endpoint: its profile's entries, when it is isolated (a
    /// profile the plan lacks admits nothing).
    pub fn direction(&self, ep: &EndpointPlan, d: Direction) -> DirectionPlan<'_> {
        match ep.profile(d) {
            None => DirectionPlan { isolated: false, selected: false, allow: &NO_ENTRIES },
            Some(p) => match self.profiles.get(&p) {
                Some(p) => DirectionPlan { isolated: p.isolating, selected: true, allow: &p.allow },
                None => DirectionPlan { isolated: true, selected: true, allow: &NO_ENTRIES },
            },
        }
    }

    /// Whether the plan lets `conn` leave its source (when the source is a local endpoint).
    pub fn allows_egress(&self, conn: &Connection) -> bool {
        match self.endpoints.get(&conn.src) {
            None => true,
            Some(ep) => {
                self.node_ips.contains(&conn.dst)
                    || self.direction(ep, Direction::Egress).admits(
                        &self.sets,
                        conn.dst,
                        self.identities.get(&conn.dst).copied(),
                        conn.protocol,
                        conn.port,
                    )
            }
        }
    }

    /// Whether the plan lets `conn` reach its destination (when it is a local endpoint).
    pub fn allows_ingress(&self, conn: &Connection) -> bool {
        match self.endpoints.get(&conn.dst) {
            None => true,
            Some(ep) => {
                self.node_ips.contains(&conn.src)
                    || self.direction(ep, Direction::Ingress).admits(
                        &self.sets,
                        conn.src,
                        self.identities.get(&conn.src).copied(),
                        conn.protocol,
                        conn.port,
                    )
            }
        }
    }

    /// Applies a diff, checking that it fits the plan (a diff that adds what is there or
    /// removes what is not is a compiler bug, reported rather than ignored).
    pub fn apply(&mut self, diff: &PlanDiff) -> Result<(), String> {
        for c in &diff.changes {
            match c {
                Change::AddEndpoint { ip, pod } => {
                    if self.endpoints.insert(*ip, EndpointPlan::new(pod.clone())).is_some() {
                        return Err(format!("endpoint {ip} added twice"));
                    }
                }
                Change::RetargetEndpoint { ip, pod } => {
                    self.endpoints
                        .get_mut(ip)
                        .ok_or_else(|| format!("retarget of absent endpoint {ip}"))?
                        .pod = pod.clone();
                }
                Change::RemoveEndpoint { ip } => {
                    self.endpoints
                        .remove(ip)
                        .ok_or_else(|| format!("endpoint {ip} removed but absent"))?;
                }
                Change::AddProfile { profile, direction, isolating } => {
                    let new = Profile {
                        direction: *direction,
                        isolating: *isolating,
                        allow: HashSet::new(),
                    };
                    if self.profiles.insert(*profile, new).is_some() {
                        return Err(format!("profile {profile} added twice"));
                    }
                }
                Change::RemoveProfile { profile } => {
                    self.profiles
                        .remove(profile)
                        .ok_or_else(|| format!("profile {profile} removed but absent"))?;
                }
                Change::SetProfile { ip, direction, profile } => {
                    if let Some(p) = profile
                        && !self.profiles.contains_key(p)
                    {
                        return Err(format!("{ip} {direction}: absent profile {p}"));
                    }
                    let ep = self
                        .endpoints
                        .get_mut(ip)
                        .ok_or_else(|| format!("profile of absent endpoint {ip}"))?;
                    ep.profiles[*direction as usize] = *profile;
                }
                Change::AddAllow { profile, allow } => {
                    let p = self
                        .profiles
                        .get_mut(profile)
                        .ok_or_else(|| format!("allow on absent profile {profile}"))?;
                    if !p.allow.insert(allow.clone()) {
                        return Err(format!("profile {profile}: {allow} added twice"));
                    }
                }
                Change::RemoveAllow { profile, allow } => {
                    let p = self
                        .profiles
                        .get_mut(profile)
                        .ok_or_else(|| format!("allow on absent profile {profile}"))?;
                    if !p.allow.remove(allow) {
                        return Err(format!("profile {profile}: {allow} removed but absent"));
                    }
                }
                Change::SetIdentity { ip, identity } => {
                    self.identities.insert(*ip, *identity);
                }
                Change::RemoveIdentity { ip } => {
                    self.identities
                        .remove(ip)
                        .ok_or_else(|| format!("identity of {ip} removed but absent"))?;
                }
                Change::AddSet { set, selector } => {
                    let new = PeerSet { selector: selector.clone(), members: BTreeSet::new() };
                    if self.sets.insert(*set, new).is_some() {
                        return Err(format!("set {set} added twice"));
                    }
                }
                Change::RemoveSet { set } => {
                    self.sets.remove(set).ok_or_else(|| format!("set {set} removed but absent"))?;
                }
                Change::AddMember { set, identity } => {
                    let s = self
                        .sets
                        .get_mut(set)
                        .ok_or_else(|| format!("member of absent set {set}"))?;
                    if !s.members.insert(*identity) {
                        return Err(format!("identity {identity} added to set {set} twice"));
                    }
                }
                Change::RemoveMember { set, identity } => {
                    let s = self
                        .sets
                        .get_mut(set)
                        .ok_or_else(|| format!("member of absent set {set}"))?;
                    if !s.members.remove(identity) {
                        return Err(format!(
                            "identity {identity} removed from set {set} but absent"
                        ));
                    }
                }
                Change::SetConflict { ip, conflict } => {
                    self.conflicts.insert(*ip, conflict.clone());
                }
                Change::RemoveConflict { ip } => {
                    self.conflicts
                        .remove(ip)
                        .ok_or_else(|| format!("conflict on {ip} removed but absent"))?;
                }
                Change::AddNodeIp { ip } => {
                    self.node_ips.insert(*ip);
                }
                Change::RemoveNodeIp { ip } => {
                    self.node_ips.remove(ip);
                }
            }
        }
        self.layout.apply(&diff.layout)
    }

    /// A diff that builds this plan from nothing (what a dataplane applies at start-up).
    pub fn as_diff(&self) -> PlanDiff {
        PlanDiff { layout: self.layout.as_changes(), ..self.entries_diff() }
    }

    /// The same without the layout's changes: what a dataplane that reads only the entries
    /// applies at start-up.
    pub fn entries_diff(&self) -> PlanDiff {
        let mut changes = Vec::new();
        changes.extend(self.node_ips.iter().map(|ip| Change::AddNodeIp { ip: *ip }));
        changes.extend(
            self.conflicts
                .iter()
                .map(|(ip, c)| Change::SetConflict { ip: *ip, conflict: c.clone() }),
        );
        for (id, set) in &self.sets {
            changes.push(Change::AddSet { set: *id, selector: set.selector.clone() });
            changes
                .extend(set.members.iter().map(|m| Change::AddMember { set: *id, identity: *m }));
        }
        for (id, p) in &self.profiles {
            changes.push(Change::AddProfile {
                profile: *id,
                direction: p.direction,
                isolating: p.isolating,
            });
            changes.extend(
                p.allow.iter().map(|a| Change::AddAllow { profile: *id, allow: a.clone() }),
            );
        }
        changes.extend(
            self.endpoints
                .iter()
                .map(|(ip, ep)| Change::AddEndpoint { ip: *ip, pod: ep.pod.clone() }),
        );
        changes.extend(
            self.identities.iter().map(|(ip, id)| Change::SetIdentity { ip: *ip, identity: *id }),
        );
        for (ip, ep) in &self.endpoints {
            for d in Direction::BOTH {
                if let Some(p) = ep.profile(d) {
                    changes.push(Change::SetProfile { ip: *ip, direction: d, profile: Some(p) });
                }
            }
        }
        PlanDiff { changes, layout: Vec::new() }
    }
}

/// One change to a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Change {
    AddEndpoint {
        ip: IpAddr,
        pod: ObjectKey,
    },
    /// The endpoint's address now belongs to another pod (its entries follow as changes).
    RetargetEndpoint {
        ip: IpAddr,
        pod: ObjectKey,
    },
    RemoveEndpoint {
        ip: IpAddr,
    },
    /// A new, empty profile (before any endpoint names it).
    AddProfile {
        profile: ProfileId,
        direction: Direction,
        isolating: bool,
    },
    /// A profile no endpoint names any more, with its entries.
    RemoveProfile {
        profile: ProfileId,
    },
    /// An endpoint direction is isolated with this profile's entries, or (`None`) open.
    SetProfile {
        ip: IpAddr,
        direction: Direction,
        profile: Option<ProfileId>,
    },
    AddAllow {
        profile: ProfileId,
        allow: Allow,
    },
    RemoveAllow {
        profile: ProfileId,
        allow: Allow,
    },
    SetIdentity {
        ip: IpAddr,
        identity: IdentityId,
    },
    RemoveIdentity {
        ip: IpAddr,
    },
    /// A new, empty peer set (before any entry names it).
    AddSet {
        set: SetId,
        selector: PeerSelector,
    },
    /// A set no entry names any more, with its members.
    RemoveSet {
        set: SetId,
    },
    AddMember {
        set: SetId,
        identity: IdentityId,
    },
    RemoveMember {
        set: SetId,
        identity: IdentityId,
    },
    AddNodeIp {
        ip: IpAddr,
    },
    RemoveNodeIp {
        ip: IpAddr,
    },
    /// An address is (still) in conflict; set before its endpoint is quarantined.
    SetConflict {
        ip: IpAddr,
        conflict: Conflict,
    },
    /// An address is no longer in conflict; removed once its endpoint is whatever it becomes.
    RemoveConflict {
        ip: IpAddr,
    },
}

/// An ordered list of changes, to be applied in order.
///
/// The compiler orders a diff make-before-break for every endpoint and direction: a profile
/// edited in place gains its entries before it loses any, and keeps the same users all the
/// while; an endpoint direction that is isolated, or moves to another profile, does so in
/// one change (`SetProfile`), to a profile that already holds all its entries and is not
/// edited in the diff; isolation is lifted before entries are removed. So at every prefix of
/// the diff, each endpoint direction admits everything that both its old and its new state
/// admit, and nothing that neither admits (a property test checks this change by change).
/// Addresses that become pods get their identity before any endpoint is isolated. New sets
/// come first, with their members, before entries name them; members join existing sets
/// before anything is isolated and leave with the restricting removals; profiles and sets go
/// last. One exception: an endpoint whose address passes to another pod in the event (two
/// pods claiming one address while the first one's deletion is on its way) names the old
/// pod's peer sets and then the new one's while members join and leave them, so within the
/// diff it may admit a peer that neither pod's policies admit (never refusing what both
/// admit). Peers whose identity switches (their labels or named ports changed) are matched
/// by their old or their new identity, switched atomically in the middle of the diff;
/// endpoints move to new profiles after every switch.
///
/// All of the above is about NetworkPolicy entries, which only admit. ClusterNetworkPolicy
/// entries decide by their first match (an Admin Deny, a Pass), so adding one can refuse
/// and removing one can admit. A profile's tiered entries are therefore added in their order
/// of evaluation (`Verdict`'s) and removed in the reverse order: within one tier (what one
/// ClusterNetworkPolicy changes) the first match among any such intermediate entries is the
/// first match among the old entries or among the new ones, so a ClusterNetworkPolicy
/// created, changed or deleted decides at every step as the state before or the state after
/// (property test on every intermediate eBPF map state). What a pod or namespace change does
/// to the members of existing sets that tiered entries name follows the same order and its end
/// state is exact, but between its first and last change such a direction may briefly decide
/// as neither state does.
/// Endpoints that go unenforced go first, so a departing endpoint never refuses a peer that a
/// Deny entry of its old profile comes to name.
///
/// The layout's changes are a separate list, ordered as [`LayoutChange`] says: a dataplane
/// renders one list or the other (the eBPF dataplane follows the layout's sets for its
/// metrics only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlanDiff {
    /// The entries: endpoints, profiles and their allow entries, identities, peer sets, node
    /// addresses, conflicts.
    pub changes: Vec<Change>,
    /// The Azure NPM layout (empty unless the compiler was asked for it).
    pub layout: Vec<LayoutChange>,
}

impl PlanDiff {
    /// A diff of entries only.
    pub fn of(changes: Vec<Change>) -> Self {
        Self { changes, layout: Vec::new() }
    }

    /// Appends the changes of the diff that follows.
    pub fn extend(&mut self, next: PlanDiff) {
        self.changes.extend(next.changes);
        self.layout.extend(next.layout);
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.layout.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len() + self.layout.len()
    }
}

/// Whether a connection between two addresses is allowed, given the plans of the nodes of
/// its source and its destination (the same plan when both are local, or in the simulator).
/// A pod's traffic to itself never leaves its network namespace and is always allowed.
pub fn connection_allowed(src_plan: &Plan, dst_plan: &Plan, conn: &Connection) -> bool {
    conn.src == conn.dst || (src_plan.allows_egress(conn) && dst_plan.allows_ingress(conn))
}

/// A plan with identities replaced by the addresses they stand for, so that plans built by
/// different compilers (which number identities differently) can be compared.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CanonicalPlan {
    pub endpoints: Vec<(IpAddr, ObjectKey, [CanonicalDirection; 2])>,
    pub addresses_by_identity: BTreeSet<Vec<IpAddr>>,
    pub node_ips: BTreeSet<IpAddr>,
    /// The layout (it names addresses and labels, not identities).
    pub layout: Layout,
}

/// One endpoint direction, canonical: isolated, selected, and its sorted (peer, ports,
/// verdict) entries.
pub type CanonicalDirection = (bool, bool, Vec<(CanonicalPeer, PortMatch, Verdict)>);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CanonicalPeer {
    Any,
    Addresses(Vec<IpAddr>),
    Cidr(CidrBlock),
}

impl Plan {
    pub fn canonical(&self) -> CanonicalPlan {
        let mut members: HashMap<IdentityId, Vec<IpAddr>> = HashMap::new();
        for (ip, id) in &self.identities {
            members.entry(*id).or_default().push(*ip);
        }
        for v in members.values_mut() {
            v.sort();
        }
        let mut endpoints: Vec<_> = self
            .endpoints
            .iter()
            .map(|(ip, ep)| {
                let dir = |d: DirectionPlan| {
                    let mut allows: Vec<_> = d
                        .allow
                        .iter()
                        .map(|a| {
                            let peer = match &a.peer {
                                PeerMatch::Any => CanonicalPeer::Any,
                                PeerMatch::Identity(id) => CanonicalPeer::Addresses(
                                    members.get(id).cloned().unwrap_or_default(),
                                ),
                                PeerMatch::Set(s) => {
                                    let mut a: Vec<IpAddr> = self
                                        .sets
                                        .get(s)
                                        .into_iter()
                                        .flat_map(|s| &s.members)
                                        .flat_map(|id| {
                                            members.get(id).into_iter().flatten().copied()
                                        })
                                        .collect();
                                    a.sort();
                                    CanonicalPeer::Addresses(a)
                                }
                                PeerMatch::Cidr(b) => CanonicalPeer::Cidr(b.clone()),
                            };
                            (peer, a.ports, a.verdict.clone())
                        })
                        .collect();
                    allows.sort();
                    (d.isolated, d.selected, allows)
                };
                let [i, e] = Direction::BOTH.map(|d| dir(self.direction(ep, d)));
                (*ip, ep.pod.clone(), [i, e])
            })
            .collect();
        endpoints.sort();
        CanonicalPlan {
            endpoints,
            addresses_by_identity: members.into_values().collect(),
            node_ips: self.node_ips.clone(),
            layout: self.layout.clone(),
        }
    }
}
