//! The incremental compiler: keeps one node's plan up to date, event by event.
//!
//! Invariants (checked by the property tests against [`super::full::compile`]):
//! - Every isolated direction of a local endpoint names a profile: the one of its key, the
//!   policies selecting it for that direction (and its own named ports, when those
//!   policies resolve ingress named ports against it). Endpoints move between profiles at
//!   the end of an event; a profile goes with its last user. Every allow entry of a profile
//!   has a count: the number of (policy, term, peer, port) expansions that produce it, and
//!   is in the plan while its count is above zero. Every change of state adds or removes
//!   expansions symmetrically, so counts never drift. A profile whose policy stops being
//!   evaluated mid-event (no local endpoint selected) is no longer its key's: it may miss
//!   expansions from then on, so it is never named again and goes at the end of the event.
//!   A profile whose users all move to one new key differing by whole policies (a policy
//!   created, updated or deleted that selects them all) takes the new key and gains or loses
//!   those policies' expansions, so a policy event writes its own entries, not the profile's.
//! - A selector is evaluated ("materialized") only while a policy that uses it selects a
//!   local endpoint; its member identities are then kept up to date as identities appear,
//!   disappear and namespaces are relabelled. On a node, most of a large cluster's
//!   policies select no local pod and cost nothing but their storage.
//! - Every materialized selector is a peer set of the plan (same number). Entries of
//!   selector terms name the set, except for egress named ports, which resolve against each
//!   peer and so are per identity. A selector left without users is released at the end of
//!   the event, so that an event that drops and takes it again (a policy update) keeps it.
//!   A released selector leaves the plan but stays evaluated, *dormant*, while it is among
//!   the [`DORMANT_SELECTORS`] most recently released: a pod that goes and comes back (the
//!   only pod of its deployment on the node, restarted) takes its selectors again without
//!   a scan of every identity of the cluster.
//! - An identity exists while at least one pod that owns its address has it.
//! - The diff of an event is computed by recording, at first touch, what each plan entry
//!   was before the event, and comparing with what it is after: it is the net change,
//!   so an update that changes nothing yields an empty diff.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use super::layout::{LayoutCompiler, LayoutInput};
use super::{
    PolicyTerms, PortSel, Scope, Subject, TermPeer, conflict_of, host_block, resolution_ports,
};
use crate::model::{
    CidrBlock, Direction, IpFamily, Labels, NamedPort, Namespace, NamespaceScope, Node, ObjectKey,
    Pod,
};
use crate::plan::{
    Allow, Change, Conflict, EndpointPlan, IdentityId, IdentityKey, PeerMatch, PeerSelector,
    PeerSet, Plan, PlanDiff, Profile, ProfileId,
};
use crate::state::{Claim, ClusterState, Event};

type SelectorId = u32;

/// How many released selectors stay evaluated (members kept up to date, out of the plan).
/// Each costs its member set and a match per new identity; a cluster-wide selector at 100k
/// pods is about 10k members.
pub const DORMANT_SELECTORS: usize = 64;
type PolicyId = u32;

fn di(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// One address of a pod: what the compiler resolves claims for, identifies and makes an
/// endpoint. A dual-stack pod is two of them, each claimed and owned on its own (a pod may own
/// its IPv4 address while its IPv6 one is contested); both are of its identity, and as
/// endpoints both move to the same profiles (their keys are the pod's).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct PodAddr {
    pod: ObjectKey,
    family: IpFamily,
}

impl PodAddr {
    fn of(pod: &ObjectKey, ip: &IpAddr) -> PodAddr {
        PodAddr { pod: pod.clone(), family: IpFamily::of(ip) }
    }
}

/// A term of a policy: (policy, direction, index of the term).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TermRef {
    policy: PolicyId,
    direction: Direction,
    term: usize,
}

struct IdentityEntry {
    key: IdentityKey,
    /// Pods owning their address with this identity.
    pods: u32,
    /// Materialized selectors this identity is a member of.
    selectors: HashSet<SelectorId>,
}

struct SelectorEntry {
    selector: PeerSelector,
    members: HashSet<IdentityId>,
    users: HashSet<TermRef>,
    /// A peer set of the plan (else dormant: released, still evaluated).
    live: bool,
}

/// A policy of either kind (a NetworkPolicy, or a ClusterNetworkPolicy when the engine
/// compiles them).
struct PolicyEntry {
    policy: PolicyTerms,
    /// The selector of each `TermPeer::Pods` term, while materialized.
    term_selectors: [Vec<Option<SelectorId>>; 2],
    /// Local endpoints the policy selects.
    endpoints: BTreeSet<PodAddr>,
    /// Whether its ingress rules name ports (resolved against the endpoints it selects).
    ingress_named: bool,
}

/// Identities, selectors and policies: what the expansions are computed from.
#[derive(Default)]
struct Index {
    /// Endpoint pods claiming each address, in key order; who owns it is [`Claim::resolve`]'s
    /// to say. A sorted `Vec`, not a set: nearly always one pod, and 100k of them must stay
    /// small.
    claims: HashMap<IpAddr, Vec<ObjectKey>>,
    /// The identity of each pod address its pod owns.
    pod_identity: HashMap<PodAddr, IdentityId>,
    identities: HashMap<IdentityId, IdentityEntry>,
    identity_ids: HashMap<IdentityKey, IdentityId>,
    identities_by_ns: HashMap<String, HashSet<IdentityId>>,
    next_identity: IdentityId,
    selectors: HashMap<SelectorId, SelectorEntry>,
    selector_ids: HashMap<PeerSelector, SelectorId>,
    /// Materialized selectors scoped to one namespace, by namespace.
    selectors_by_ns: HashMap<String, HashSet<SelectorId>>,
    /// Materialized selectors with a namespaceSelector.
    global_selectors: HashSet<SelectorId>,
    next_selector: SelectorId,
    /// Selectors left without users during the event: released at its end unless taken again.
    unused_selectors: Vec<SelectorId>,
    /// Dormant selectors, the most recently released last.
    dormant: std::collections::VecDeque<SelectorId>,
    /// Materialized `PodsInBlock` terms.
    pods_in_block: HashMap<TermRef, CidrBlock>,
    policies: HashMap<PolicyId, PolicyEntry>,
    policy_ids: HashMap<ObjectKey, PolicyId>,
    policies_by_ns: HashMap<String, BTreeSet<PolicyId>>,
    /// ClusterNetworkPolicies, which may select pods of any namespace.
    cluster_policies: BTreeSet<PolicyId>,
    next_policy: PolicyId,
}

struct EndpointEntry {
    ip: IpAddr,
    named_ports: Vec<NamedPort>,
    /// The policies selecting the endpoint for each direction (isolated when non-empty).
    policies: [BTreeSet<PolicyId>; 2],
    /// How many of its ingress policies resolve named ports against it (kept as they
    /// attach and detach: a profile key is computed at every move).
    named_ingress: u32,
    /// The profile of each isolated direction, as of the end of the last event.
    profiles: [Option<ProfileId>; 2],
    /// A contested address with several local claimants: isolated both ways, no policy, no
    /// entry (see [`Claim`]).
    quarantined: bool,
}

impl EndpointEntry {
    fn isolated(&self, d: Direction) -> bool {
        self.quarantined || !self.policies[di(d)].is_empty()
    }
}

/// Where a profile comes from (see [`Engine::profile_origin`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileOrigin {
    pub direction: Direction,
    pub policies: Vec<ObjectKey>,
    pub quarantined: bool,
}

/// What makes endpoint directions share one profile (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ProfileKey {
    direction: Direction,
    /// The selecting policies, in order.
    policies: Vec<PolicyId>,
    /// The endpoint's named ports, when the policies resolve ingress named ports against
    /// it; else empty.
    own_ports: Vec<NamedPort>,
    quarantined: bool,
    /// Quarantined, or a NetworkPolicy among the policies (see [`Profile::isolating`]).
    isolating: bool,
}

struct ProfileEntry {
    key: ProfileKey,
    counts: HashMap<Allow, u32>,
    /// Endpoint directions naming it.
    users: u32,
}

/// What the claims on an address come to on this node (see [`Claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Resolution {
    Owner(PodAddr),
    /// Contested; with several local claimants, the first of them names the quarantined
    /// endpoint.
    Contested {
        quarantine: Option<PodAddr>,
    },
}

/// What an event changed, as first seen: the plan's entries before the event.
#[derive(Default)]
struct DiffBuilder {
    endpoints: HashMap<IpAddr, Option<PodAddr>>,
    /// Entries of profiles, whether each was there before the event.
    allows: HashMap<(ProfileId, Allow), bool>,
    /// The profile of each endpoint direction before the event.
    isolation: HashMap<(IpAddr, Direction), Option<ProfileId>>,
    /// Profiles made in this event, and profiles gone (made before it).
    created: HashSet<ProfileId>,
    removed: Vec<ProfileId>,
    /// The removed profiles that were quarantines (admitting nothing).
    removed_quarantines: HashSet<ProfileId>,
    identities: HashMap<IpAddr, Option<IdentityId>>,
    /// Peer sets touched: whether each existed before the event.
    sets: HashMap<SelectorId, bool>,
    /// Set memberships touched: whether each held before the event.
    members: HashMap<(SelectorId, IdentityId), bool>,
    node_ips: Option<BTreeSet<IpAddr>>,
    /// For the layout: identities created or dropped (whether each existed before the
    /// event), namespaces (their labels before), policies changed (whether each existed
    /// before).
    identity_keys: HashMap<IdentityId, bool>,
    namespaces: HashMap<String, Option<Labels>>,
    policies: HashMap<ObjectKey, bool>,
    /// Conflicts of the addresses whose claims changed, as they were before the event.
    conflicts: HashMap<IpAddr, Option<Conflict>>,
    /// For the layout's dispatch: (policy, local endpoint direction) pairs touched, whether
    /// each held before the event, and the policy's name.
    dispatch: HashMap<(Direction, IpAddr, PolicyId), (bool, ObjectKey)>,
}

/// The local endpoints, their profiles and the profiles' counted allow entries: the plan,
/// and what an event did to it.
#[derive(Default)]
struct Output {
    endpoints: HashMap<PodAddr, EndpointEntry>,
    endpoint_at: HashMap<IpAddr, PodAddr>,
    endpoints_by_ns: HashMap<String, BTreeSet<PodAddr>>,
    node_ips: BTreeSet<IpAddr>,
    profiles: HashMap<ProfileId, ProfileEntry>,
    /// The profile of each key (not of a stale profile's: see the module docs).
    profile_ids: HashMap<ProfileKey, ProfileId>,
    /// The (current) profiles whose key holds each policy.
    profiles_by_policy: HashMap<PolicyId, HashSet<ProfileId>>,
    next_profile: ProfileId,
    /// Endpoints whose profiles may change: moved at the end of the event.
    dirty: HashSet<PodAddr>,
    /// Profiles that lost a user during the event: removed at its end if unused.
    released: Vec<ProfileId>,
    diff: DiffBuilder,
}

impl Output {
    fn bump(&mut self, profile: ProfileId, allow: Allow, up: bool) {
        let counts = &mut self.profiles.get_mut(&profile).expect("bumped profile exists").counts;
        let count = counts.get(&allow).copied().unwrap_or(0);
        self.diff.allows.entry((profile, allow.clone())).or_insert(count > 0);
        if up {
            counts.insert(allow, count + 1);
        } else if count <= 1 {
            debug_assert_eq!(count, 1, "allow count underflow");
            counts.remove(&allow);
        } else {
            counts.insert(allow, count - 1);
        }
    }

    /// Records an endpoint direction's profile before the event, at first touch.
    fn touch_isolation(&mut self, endpoint: &PodAddr, direction: Direction) {
        let ep = &self.endpoints[endpoint];
        let profile = ep.profiles[di(direction)];
        self.diff.isolation.entry((ep.ip, direction)).or_insert(profile);
    }

    /// The profiles whose key holds policy `pid` for direction `d`.
    fn profiles_of(&self, pid: PolicyId, d: Direction) -> Vec<ProfileId> {
        self.profiles_by_policy
            .get(&pid)
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| self.profiles[p].key.direction == d)
            .collect()
    }

    /// One endpoint direction stops naming `p`.
    fn release(&mut self, p: ProfileId) {
        self.profiles.get_mut(&p).expect("released profile").users -= 1;
        self.released.push(p);
    }

    /// A new profile, the one of `key`, made in this event.
    fn new_profile(&mut self, key: ProfileKey, counts: HashMap<Allow, u32>) -> ProfileId {
        self.next_profile += 1;
        let p = self.next_profile;
        for pid in &key.policies {
            self.profiles_by_policy.entry(*pid).or_default().insert(p);
        }
        self.profile_ids.insert(key.clone(), p);
        self.profiles.insert(p, ProfileEntry { key, counts, users: 0 });
        self.diff.created.insert(p);
        p
    }

    /// Profile `p` no longer holds policy `pid` (for membership changes).
    fn unlink(&mut self, pid: PolicyId, p: ProfileId) {
        if let Some(ps) = self.profiles_by_policy.get_mut(&pid) {
            ps.remove(&p);
            if ps.is_empty() {
                self.profiles_by_policy.remove(&pid);
            }
        }
    }

    /// A profile stops being its key's (see the module docs).
    fn stale(&mut self, p: ProfileId) {
        let key = self.profiles[&p].key.clone();
        if self.profile_ids.get(&key) == Some(&p) {
            self.profile_ids.remove(&key);
        }
        for pid in key.policies {
            self.unlink(pid, p);
        }
    }
}

/// The stages of a diff's order (see [`PlanDiff`]), in order: changes are sorted by stage,
/// stably. Addresses that become pods get their identity before anything is isolated, so a
/// newly isolated endpoint already recognizes them; entries are added before isolation is
/// switched on and removed only after it is lifted, so no endpoint direction ever admits
/// what neither its old nor its new entries admit (`tests/incremental.rs` checks every
/// prefix of every diff).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Isolation lifted, and endpoints that go unenforced: an endpoint that goes (its pod
    /// gone, or its address now another node's pod's) admits everything in the new plan, so
    /// it goes first: before any address loses its identity (it never refuses what it
    /// admitted and still admits), and before any gains one that a Deny entry of its old
    /// profile names.
    Unisolate,
    /// New peer sets with their members; conflicts reported.
    Sets,
    /// New (or retargeted) endpoints.
    Endpoints,
    /// New profiles with their entries (no endpoint names them yet), and members joining
    /// existing sets (no address has a new identity yet).
    QuietAdds,
    /// Addresses that become pods.
    IdentifyNew,
    /// Entries of profiles in use.
    WideningAdds,
    /// Addresses whose identity switches (atomically, for each).
    Identify,
    /// Endpoint directions isolated, or moved to another profile (atomically, for each):
    /// after every identity switch, since a new profile's entries name peers by their new
    /// identities. (Until then an old profile holds entries for both: it follows membership
    /// changes as they happen.) Quarantines, which admit nothing, are entered in `QuietAdds`
    /// (before any address gains an identity) and left in `Unidentify` (after addresses leave
    /// the sets).
    Switch,
    /// Entries removed from profiles, members leaving sets, node addresses gone.
    Removes,
    /// Addresses no longer a pod's.
    Unidentify,
    /// Profiles and peer sets gone, conflicts ended.
    Unset,
}

/// The incremental compiler of one node's plan (or of every pod's, for the simulator).
pub struct Engine {
    scope: Scope,
    /// How many released selectors stay dormant ([`DORMANT_SELECTORS`] unless a test asks).
    dormant_capacity: usize,
    state: ClusterState,
    idx: Index,
    out: Output,
    /// The Azure NPM layout, when a dataplane wants it ([`Engine::with_layout`]).
    layout: Option<LayoutCompiler>,
    /// Whether ClusterNetworkPolicies are compiled ([`Engine::with_cluster_policies`]); if
    /// not, they are held in the state only.
    cluster_policies: bool,
}

impl Engine {
    pub fn new(scope: Scope) -> Self {
        Self::with_dormant_capacity(scope, DORMANT_SELECTORS)
    }

    /// An engine keeping at most `capacity` released selectors dormant (tests use small
    /// numbers to exercise forgetting them).
    pub fn with_dormant_capacity(scope: Scope, capacity: usize) -> Self {
        Self {
            scope,
            dormant_capacity: capacity,
            state: ClusterState::default(),
            idx: Index { next_identity: 1, ..Index::default() },
            out: Output::default(),
            layout: None,
            cluster_policies: false,
        }
    }

    /// The engine, also compiling ClusterNetworkPolicies into the plan (their entries carry
    /// [`Verdict`](crate::plan::Verdict)s other than `Allow`): for the dataplanes that render
    /// tiers. Call before the first event.
    pub fn with_cluster_policies(mut self) -> Self {
        self.cluster_policies = true;
        self
    }

    /// Whether ClusterNetworkPolicies are compiled.
    pub fn compiles_cluster_policies(&self) -> bool {
        self.cluster_policies
    }

    /// The engine, also compiling the plan's Azure NPM layout (for the iptables dataplane, which
    /// renders it, and the eBPF dataplane, which counts its sets for the metrics).
    pub fn with_layout(mut self) -> Self {
        let mut compiler = LayoutCompiler::new();
        let input = LayoutInput {
            new_keys: self.idx.identities.iter().map(|(id, e)| (*id, e.key.clone())).collect(),
            addresses: self
                .idx
                .pod_identity
                .iter()
                .map(|(k, id)| (self.address(k), Some(*id)))
                .collect(),
            namespaces: self
                .state
                .namespaces
                .iter()
                .map(|(n, ns)| (n.clone(), Some(ns.labels.clone())))
                .collect(),
            policies: self
                .idx
                .policies
                .values()
                .map(|e| (e.policy.key.clone(), Some(&e.policy)))
                .collect(),
            quarantine: self
                .idx
                .claims
                .keys()
                .filter(|ip| self.conflict(ip).is_some_and(|c| c.quarantined))
                .map(|ip| (*ip, true))
                .collect(),
            dropped_keys: Vec::new(),
            dispatch: self
                .out
                .endpoints
                .values()
                .flat_map(|e| {
                    Direction::BOTH
                        .into_iter()
                        .flat_map(move |d| e.policies[di(d)].iter().map(move |pid| (d, e.ip, *pid)))
                })
                .map(|(d, ip, pid)| (d, ip, self.idx.policies[&pid].policy.key.clone(), true))
                .collect(),
        };
        compiler.update(input);
        self.layout = Some(compiler);
        self
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The objects as the compiler last saw them.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Applies one event and returns the change of the plan, in make-before-break order.
    pub fn handle(&mut self, event: Event) -> PlanDiff {
        match event {
            Event::UpsertNamespace(ns) => {
                self.touch_namespace(&ns.name);
                self.upsert_namespace(ns)
            }
            Event::DeleteNamespace(name) => {
                self.touch_namespace(&name);
                let labels = Namespace::default_labels(&name);
                self.relabel_namespace(&name, labels);
                self.state.namespaces.remove(&name);
            }
            Event::UpsertPod(pod) => self.upsert_pod(pod),
            Event::DeletePod(key) => {
                // Removed from the state only after its contributions: expansions read it.
                if let Some(old) = self.state.pods.get(&key).cloned() {
                    self.remove_pod(&old);
                    self.state.pods.remove(&key);
                }
            }
            Event::UpsertPolicy(policy) => {
                let key = policy.key.clone();
                if self.state.policies.get(&key) != Some(&policy) {
                    self.touch_policy(&key);
                    self.replace_policy(PolicyTerms::of_network_policy(&policy));
                    self.state.policies.insert(key, policy);
                }
            }
            Event::DeletePolicy(key) => {
                self.touch_policy(&key);
                self.remove_policy(&key);
                self.state.policies.remove(&key);
            }
            Event::UpsertNode(node) => {
                let changed =
                    self.state.nodes.get(&node.name).is_none_or(|n| {
                        (&n.labels, &n.addresses) != (&node.labels, &node.addresses)
                    });
                self.set_node(node.name.clone(), Some(node));
                if changed {
                    self.renode_cluster_policies();
                }
            }
            Event::DeleteNode(name) => {
                let existed = self.state.nodes.contains_key(&name);
                self.set_node(name, None);
                if existed {
                    self.renode_cluster_policies();
                }
            }
            Event::UpsertClusterPolicy(policy) if self.cluster_policies => {
                if self.state.cluster_policies.get(&policy.name) != Some(&policy) {
                    self.touch_policy(&super::cluster_policy_key(&policy.name));
                    self.replace_policy(PolicyTerms::of_cluster_policy(&policy, &self.state.nodes));
                    self.state.cluster_policies.insert(policy.name.clone(), policy);
                }
            }
            Event::DeleteClusterPolicy(name) if self.cluster_policies => {
                self.touch_policy(&super::cluster_policy_key(&name));
                self.remove_policy(&super::cluster_policy_key(&name));
                self.state.cluster_policies.remove(&name);
            }
            // Not compiled here: held in the state only.
            e @ (Event::UpsertClusterPolicy(_) | Event::DeleteClusterPolicy(_)) => {
                self.state.apply(&e)
            }
        }
        self.finish()
    }

    fn touch_namespace(&mut self, name: &str) {
        if !self.out.diff.namespaces.contains_key(name) {
            let before = self.state.namespaces.get(name).map(|n| n.labels.clone());
            self.out.diff.namespaces.insert(name.to_string(), before);
        }
    }

    /// Notes a policy of either kind (its key) as touched by the event.
    fn touch_policy(&mut self, key: &ObjectKey) {
        let existed = self.idx.policy_ids.contains_key(key);
        self.out.diff.policies.entry(key.clone()).or_insert(existed);
    }

    /// The whole current plan (what a dataplane needs at start-up, or to resynchronize).
    pub fn plan(&self) -> Plan {
        let mut plan = Plan {
            node_ips: self.out.node_ips.clone(),
            layout: self.layout.as_ref().map(LayoutCompiler::layout).unwrap_or_default(),
            ..Plan::default()
        };
        for (key, id) in &self.idx.pod_identity {
            plan.identities.insert(self.address(key), *id);
        }
        for (id, s) in self.idx.selectors.iter().filter(|(_, s)| s.live) {
            plan.sets.insert(
                *id,
                PeerSet {
                    selector: s.selector.clone(),
                    members: s.members.iter().copied().collect(),
                },
            );
        }
        for ip in self.idx.claims.keys() {
            if let Some(c) = self.conflict(ip) {
                plan.conflicts.insert(*ip, c);
            }
        }
        for (id, p) in &self.out.profiles {
            let allow = p.counts.keys().cloned().collect();
            let profile = Profile { direction: p.key.direction, isolating: p.key.isolating, allow };
            plan.profiles.insert(*id, profile);
        }
        for (key, ep) in &self.out.endpoints {
            let p = EndpointPlan { pod: key.pod.clone(), profiles: ep.profiles };
            plan.endpoints.insert(ep.ip, p);
        }
        plan
    }

    /// The pods claiming an address, in key order (nearly always one): who a dropped packet's
    /// address names.
    pub fn pods_at(&self, ip: &IpAddr) -> &[ObjectKey] {
        self.idx.claims.get(ip).map_or(&[], Vec::as_slice)
    }

    /// The local endpoint at an address: the pod whose interface carries it on this node.
    pub fn endpoint_at(&self, ip: &IpAddr) -> Option<&ObjectKey> {
        self.out.endpoint_at.get(ip).map(|a| &a.pod)
    }

    /// The address of a pod address (its pod owns it, or claims it).
    fn address(&self, a: &PodAddr) -> IpAddr {
        self.state.pods[&a.pod].address(a.family).expect("pod addresses are of their pods")
    }

    /// What a profile enforces: the policies whose union it is (those still known), its
    /// direction, and whether it is a quarantine (an address several local pods claim,
    /// admitting nothing). `None` for a profile no longer in the plan.
    pub fn profile_origin(&self, id: ProfileId) -> Option<ProfileOrigin> {
        let key = &self.out.profiles.get(&id)?.key;
        Some(ProfileOrigin {
            direction: key.direction,
            policies: key
                .policies
                .iter()
                .filter_map(|p| self.idx.policies.get(p).map(|e| e.policy.key.clone()))
                .collect(),
            quarantined: key.quarantined,
        })
    }

    /// Sizes of the compiler's state, for metrics and benchmarks.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            pods: self.state.pods.len(),
            policies: self.state.policies.len(),
            identities: self.idx.identities.len(),
            materialized_selectors: self.idx.selectors.len() - self.idx.dormant.len(),
            endpoints: self.out.endpoints.len(),
            profiles: self.out.profiles.len(),
            allow_entries: self.out.profiles.values().map(|p| p.counts.len()).sum(),
        }
    }

    // ---- namespaces and nodes ----

    fn upsert_namespace(&mut self, ns: Namespace) {
        let ns = Namespace::new(ns.name, ns.labels);
        self.relabel_namespace(&ns.name, ns.labels.clone());
        self.state.namespaces.insert(ns.name.clone(), ns);
    }

    /// Re-evaluates namespaceSelectors for the identities of one namespace, and the
    /// ClusterNetworkPolicies' subjects for its endpoints.
    fn relabel_namespace(&mut self, name: &str, new: Labels) {
        let old = self.state.namespace_labels(name).into_owned();
        if old == new {
            return;
        }
        let mut subjects = Vec::new();
        for ep in self.out.endpoints_by_ns.get(name).into_iter().flatten() {
            let pod = &self.state.pods[&ep.pod];
            for pid in &self.idx.cluster_policies {
                let subject = &self.idx.policies[pid].policy.subject;
                let (was, is) = (subject.selects(pod, &old), subject.selects(pod, &new));
                if was != is {
                    subjects.push((*pid, ep.clone(), is));
                }
            }
        }
        for (pid, ep, is) in subjects {
            if is {
                self.attach(pid, &ep);
            } else {
                self.detach(pid, &ep);
            }
        }
        let Some(ids) = self.idx.identities_by_ns.get(name) else { return };
        let ids: Vec<IdentityId> = ids.iter().copied().collect();
        let mut changes = Vec::new();
        for &sel in &self.idx.global_selectors {
            let s = &self.idx.selectors[&sel].selector;
            let (was, is) = (s.namespaces.matches(name, &old), s.namespaces.matches(name, &new));
            if was == is {
                continue;
            }
            for &id in &ids {
                if s.pods.matches(&self.idx.identities[&id].key.labels) {
                    changes.push((sel, id, is));
                }
            }
        }
        for (sel, id, join) in changes {
            if join {
                self.join(sel, id);
            } else {
                self.leave(sel, id);
            }
        }
    }

    /// Compiles again the ClusterNetworkPolicies with `nodes` peers (whose addresses are
    /// their terms), after a node's labels or addresses changed.
    fn renode_cluster_policies(&mut self) {
        if !self.cluster_policies {
            return;
        }
        let policies: Vec<PolicyTerms> = self
            .state
            .cluster_policies
            .values()
            .filter(|p| super::names_nodes(p))
            .map(|p| PolicyTerms::of_cluster_policy(p, &self.state.nodes))
            .collect();
        for terms in policies {
            self.touch_policy(&terms.key);
            self.replace_policy(terms);
        }
    }

    fn set_node(&mut self, name: String, node: Option<Node>) {
        if self.scope.node() == Some(name.as_str()) {
            self.out.diff.node_ips.get_or_insert_with(|| self.out.node_ips.clone());
            self.out.node_ips =
                node.as_ref().map(|n| n.addresses.iter().copied().collect()).unwrap_or_default();
        }
        match node {
            Some(n) => self.state.nodes.insert(name, n),
            None => self.state.nodes.remove(&name),
        };
    }

    // ---- pods ----

    fn upsert_pod(&mut self, pod: Pod) {
        match self.state.pods.get(&pod.key) {
            Some(old) if old.same_for_policy(&pod) => {
                self.state.pods.insert(pod.key.clone(), pod);
            }
            Some(old) => {
                let old = old.clone();
                self.remove_pod(&old);
                self.add_pod(pod);
            }
            None => self.add_pod(pod),
        }
    }

    /// Claims each address of a pod (one, or one of each family).
    fn add_pod(&mut self, pod: Pod) {
        let key = pod.key.clone();
        let ips: Vec<IpAddr> =
            if pod.is_endpoint() { pod.addresses().collect() } else { Vec::new() };
        self.state.pods.insert(key.clone(), pod);
        for ip in ips {
            self.touch_claims(ip);
            let before = self.resolve(&ip);
            let claims = self.idx.claims.entry(ip).or_default();
            if let Err(at) = claims.binary_search(&key) {
                claims.insert(at, key.clone());
            }
            let after = self.resolve(&ip);
            self.settle(ip, before, after, None);
        }
    }

    /// Removes what `old` contributed; `state.pods` may or may not still hold it.
    fn remove_pod(&mut self, old: &Pod) {
        if !old.is_endpoint() {
            return;
        }
        for ip in old.addresses() {
            self.touch_claims(ip);
            let before = self.resolve(&ip);
            let Some(claims) = self.idx.claims.get_mut(&ip) else { continue };
            if let Ok(at) = claims.binary_search(&old.key) {
                claims.remove(at);
            }
            if claims.is_empty() {
                self.idx.claims.remove(&ip);
            }
            let after = self.resolve(&ip);
            self.settle(ip, before, after, Some(old));
        }
    }

    /// The claims on `ip`, resolved as this node sees them.
    fn resolve(&self, ip: &IpAddr) -> Option<Resolution> {
        let keys = self.idx.claims.get(ip)?;
        let claimants: Vec<&Pod> = keys.iter().map(|k| &self.state.pods[k]).collect();
        Some(match Claim::resolve(claimants, |p| self.scope.is_local(p)) {
            Claim::Owner(p) => Resolution::Owner(PodAddr::of(&p.key, ip)),
            Claim::Contested { claimants, quarantined } => Resolution::Contested {
                quarantine: quarantined.then(|| {
                    let p = claimants.iter().find(|p| self.scope.is_local(p)).expect("local");
                    PodAddr::of(&p.key, ip)
                }),
            },
        })
    }

    /// What the claims on `ip` report.
    fn conflict(&self, ip: &IpAddr) -> Option<Conflict> {
        let keys = self.idx.claims.get(ip).filter(|k| k.len() > 1)?;
        let claimants: Vec<&Pod> = keys.iter().map(|k| &self.state.pods[k]).collect();
        let quarantined =
            matches!(self.resolve(ip), Some(Resolution::Contested { quarantine: Some(_) }));
        conflict_of(&claimants, quarantined)
    }

    /// Moves `ip` from what its claims came to (`before`) to what they come to now; `removed`
    /// is the pod whose claim just went (its old version, which the state may no longer hold).
    fn settle(
        &mut self,
        ip: IpAddr,
        before: Option<Resolution>,
        after: Option<Resolution>,
        removed: Option<&Pod>,
    ) {
        if before == after {
            return;
        }
        match before {
            Some(Resolution::Owner(k)) => match removed.filter(|p| p.key == k.pod) {
                Some(old) => self.deactivate_pod(old, &k),
                None => self.deactivate(&k),
            },
            Some(Resolution::Contested { quarantine: Some(k) }) => self.remove_endpoint(&k),
            Some(Resolution::Contested { quarantine: None }) | None => {}
        }
        match after {
            Some(Resolution::Owner(k)) => self.activate(&k),
            Some(Resolution::Contested { quarantine: Some(k) }) => self.add_quarantine(&k, ip),
            Some(Resolution::Contested { quarantine: None }) | None => {}
        }
    }

    fn deactivate(&mut self, key: &PodAddr) {
        let pod = self.state.pods[&key.pod].clone();
        self.deactivate_pod(&pod, key);
    }

    /// A pod now owns one of its addresses (`key`): give it an identity there, make it a
    /// peer, and an endpoint if it is local.
    fn activate(&mut self, key: &PodAddr) {
        let pod = self.state.pods[&key.pod].clone();
        let ip = pod.address(key.family).expect("activated pods have addresses");
        self.touch_identity(ip);
        let id = self.identity_for(&pod);
        // Pods of one identity share its labels and named ports: one copy per identity, not
        // per pod (most of the model's weight in a large cluster).
        let shared = &self.idx.identities[&id].key;
        if let Some(p) = self.state.pods.get_mut(&key.pod) {
            p.labels = shared.labels.clone();
            p.named_ports = shared.named_ports.clone();
        }
        self.idx.pod_identity.insert(key.clone(), id);
        self.pods_in_block_change(ip, &pod.named_ports, true);
        if self.scope.is_local(&pod) {
            self.add_endpoint(&pod, key, ip);
        }
    }

    /// `pod` (as it was) no longer owns its address `key`.
    fn deactivate_pod(&mut self, pod: &Pod, key: &PodAddr) {
        let ip = pod.address(key.family).expect("owners have addresses");
        self.touch_identity(ip);
        if self.out.endpoints.contains_key(key) {
            self.remove_endpoint(key);
        }
        self.pods_in_block_change(ip, &pod.named_ports, false);
        if let Some(id) = self.idx.pod_identity.remove(key) {
            let e = self.idx.identities.get_mut(&id).expect("identity of a pod exists");
            e.pods -= 1;
            if e.pods == 0 {
                self.drop_identity(id);
            }
        }
    }

    fn touch_identity(&mut self, ip: IpAddr) {
        if !self.out.diff.identities.contains_key(&ip) {
            let current = self.identity_at(&ip);
            self.out.diff.identities.insert(ip, current);
        }
    }

    /// Records the identity and conflict of `ip` before its claims change.
    fn touch_claims(&mut self, ip: IpAddr) {
        self.touch_identity(ip);
        if !self.out.diff.conflicts.contains_key(&ip) {
            let current = self.conflict(&ip);
            self.out.diff.conflicts.insert(ip, current);
        }
    }

    /// The identity of the pod owning `ip` (only the owner of an address is activated).
    fn identity_at(&self, ip: &IpAddr) -> Option<IdentityId> {
        let family = IpFamily::of(ip);
        self.idx
            .claims
            .get(ip)?
            .iter()
            .find_map(|k| self.idx.pod_identity.get(&PodAddr { pod: k.clone(), family }))
            .copied()
    }

    fn identity_for(&mut self, pod: &Pod) -> IdentityId {
        let key = IdentityKey::of(pod);
        if let Some(&id) = self.idx.identity_ids.get(&key) {
            self.idx.identities.get_mut(&id).expect("indexed identity exists").pods += 1;
            return id;
        }
        let id = self.idx.next_identity;
        self.idx.next_identity += 1;
        let ns_labels = self.state.namespace_labels(&key.namespace).into_owned();
        let candidates: Vec<SelectorId> = self
            .idx
            .selectors_by_ns
            .get(&key.namespace)
            .into_iter()
            .flatten()
            .chain(self.idx.global_selectors.iter())
            .copied()
            .filter(|s| {
                self.idx.selectors[s].selector.matches(&key.namespace, &ns_labels, &key.labels)
            })
            .collect();
        self.idx.identities_by_ns.entry(key.namespace.clone()).or_default().insert(id);
        self.idx.identity_ids.insert(key.clone(), id);
        self.idx.identities.insert(id, IdentityEntry { key, pods: 1, selectors: HashSet::new() });
        self.out.diff.identity_keys.entry(id).or_insert(false);
        for sel in candidates {
            self.join(sel, id);
        }
        id
    }

    fn drop_identity(&mut self, id: IdentityId) {
        let sels: Vec<SelectorId> = self.idx.identities[&id].selectors.iter().copied().collect();
        for sel in sels {
            self.leave(sel, id);
        }
        let e = self.idx.identities.remove(&id).expect("dropped identity exists");
        self.out.diff.identity_keys.entry(id).or_insert(true);
        self.idx.identity_ids.remove(&e.key);
        if let Some(set) = self.idx.identities_by_ns.get_mut(&e.key.namespace) {
            set.remove(&id);
            if set.is_empty() {
                self.idx.identities_by_ns.remove(&e.key.namespace);
            }
        }
    }

    // ---- selector membership ----

    /// Identity `id` joins selector `sel`: every endpoint of every term using it gains it.
    fn join(&mut self, sel: SelectorId, id: IdentityId) {
        self.out.diff.members.entry((sel, id)).or_insert(false);
        self.idx.selectors.get_mut(&sel).expect("selector").members.insert(id);
        self.idx.identities.get_mut(&id).expect("identity").selectors.insert(sel);
        self.membership_bump(sel, id, true);
    }

    fn leave(&mut self, sel: SelectorId, id: IdentityId) {
        self.out.diff.members.entry((sel, id)).or_insert(true);
        self.membership_bump(sel, id, false);
        self.idx.selectors.get_mut(&sel).expect("selector").members.remove(&id);
        self.idx.identities.get_mut(&id).expect("identity").selectors.remove(&sel);
    }

    /// The per-identity entries (egress named ports) of the terms using `sel`, for `id`.
    fn membership_bump(&mut self, sel: SelectorId, id: IdentityId, up: bool) {
        let Self { idx, out, .. } = self;
        let peer_ports = &idx.identities[&id].key.named_ports;
        for t in &idx.selectors[&sel].users {
            let policy = &idx.policies[&t.policy];
            let term = &policy.policy.terms(t.direction)[t.term];
            // (Per-peer ports are egress named ports: they resolve against the peer alone.)
            if !term.ports.iter().any(|p| p.per_peer(t.direction)) {
                continue;
            }
            for prof in out.profiles_of(t.policy, t.direction) {
                for port in term.ports.iter().filter(|p| p.per_peer(t.direction)) {
                    if let Some(ports) = port.resolve(peer_ports) {
                        let verdict = term.verdict.clone();
                        out.bump(prof, Allow { peer: PeerMatch::Identity(id), ports, verdict }, up);
                    }
                }
            }
        }
    }

    /// A pod (address) appears or disappears inside the blocks of `PodsInBlock` terms.
    fn pods_in_block_change(&mut self, ip: IpAddr, peer_ports: &[NamedPort], up: bool) {
        let Self { idx, out, .. } = self;
        for (t, block) in &idx.pods_in_block {
            if !block.contains(ip) {
                continue;
            }
            let policy = &idx.policies[&t.policy];
            let term = &policy.policy.terms(t.direction)[t.term];
            for prof in out.profiles_of(t.policy, t.direction) {
                for port in &term.ports {
                    if let Some(ports) = port.resolve(peer_ports) {
                        let (peer, verdict) =
                            (PeerMatch::Cidr(host_block(ip)), term.verdict.clone());
                        out.bump(prof, Allow { peer, ports, verdict }, up);
                    }
                }
            }
        }
    }

    // ---- endpoints ----

    /// A quarantined endpoint at `ip`, named after local claimant `key`: isolated both ways,
    /// admitting nothing, selected by no policy.
    fn add_quarantine(&mut self, key: &PodAddr, ip: IpAddr) {
        self.out.diff.endpoints.entry(ip).or_insert_with(|| self.out.endpoint_at.get(&ip).cloned());
        let entry = EndpointEntry {
            ip,
            named_ports: Vec::new(),
            policies: Default::default(),
            named_ingress: 0,
            profiles: Default::default(),
            quarantined: true,
        };
        self.out.endpoints.insert(key.clone(), entry);
        self.out.endpoint_at.insert(ip, key.clone());
        self.out.dirty.insert(key.clone());
    }

    fn add_endpoint(&mut self, pod: &Pod, key: &PodAddr, ip: IpAddr) {
        self.out.diff.endpoints.entry(ip).or_insert_with(|| self.out.endpoint_at.get(&ip).cloned());
        self.out.endpoints.insert(
            key.clone(),
            EndpointEntry {
                ip,
                named_ports: pod.named_ports.to_vec(),
                policies: Default::default(),
                named_ingress: 0,
                profiles: Default::default(),
                quarantined: false,
            },
        );
        self.out.endpoint_at.insert(ip, key.clone());
        self.out.dirty.insert(key.clone());
        self.out.endpoints_by_ns.entry(pod.key.namespace.clone()).or_default().insert(key.clone());
        let ns_labels = self.state.namespace_labels(&pod.key.namespace);
        let selecting: Vec<PolicyId> = self
            .idx
            .policies_by_ns
            .get(&pod.key.namespace)
            .into_iter()
            .flatten()
            .chain(&self.idx.cluster_policies)
            .copied()
            .filter(|p| self.idx.policies[p].policy.subject.selects(pod, &ns_labels))
            .collect();
        for p in selecting {
            self.attach(p, key);
        }
    }

    fn remove_endpoint(&mut self, key: &PodAddr) {
        let ip = self.out.endpoints[key].ip;
        self.out.diff.endpoints.entry(ip).or_insert_with(|| Some(key.clone()));
        for d in Direction::BOTH {
            self.out.touch_isolation(key, d);
            if let Some(p) = self.out.endpoints[key].profiles[di(d)] {
                self.out.release(p);
            }
        }
        let ep = &self.out.endpoints[key];
        let policies: BTreeSet<PolicyId> = ep.policies[0].union(&ep.policies[1]).copied().collect();
        for p in policies {
            self.detach(p, key);
        }
        let ep = self.out.endpoints.remove(key).expect("endpoint exists");
        self.out.dirty.remove(key);
        self.out.endpoint_at.remove(&ep.ip);
        if ep.quarantined {
            return;
        }
        if let Some(set) = self.out.endpoints_by_ns.get_mut(&key.pod.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.out.endpoints_by_ns.remove(&key.pod.namespace);
            }
        }
    }

    /// Policy `pid` starts selecting endpoint `ep` (which moves to its new profiles at the
    /// end of the event).
    fn attach(&mut self, pid: PolicyId, ep: &PodAddr) {
        if Direction::BOTH.iter().all(|d| !self.idx.policies[&pid].policy.covers(*d)) {
            // (It isolates nothing: nothing to evaluate.)
            return;
        }
        if self.idx.policies[&pid].endpoints.is_empty() {
            self.materialize(pid);
        }
        self.idx.policies.get_mut(&pid).expect("policy").endpoints.insert(ep.clone());
        for d in Direction::BOTH {
            if self.idx.policies[&pid].policy.covers(d) {
                self.select(pid, ep, d, true);
            }
        }
        self.out.dirty.insert(ep.clone());
    }

    /// Policy `pid` starts (`on`) or stops selecting endpoint `ep` for direction `d`: the
    /// endpoint's policies and named-port count, and, for the layout, the dispatch pair as
    /// it was before the event.
    fn select(&mut self, pid: PolicyId, ep: &PodAddr, d: Direction, on: bool) {
        let named = d == Direction::Ingress && self.idx.policies[&pid].ingress_named;
        let e = self.out.endpoints.get_mut(ep).expect("endpoint");
        let changed =
            if on { e.policies[di(d)].insert(pid) } else { e.policies[di(d)].remove(&pid) };
        if !changed {
            return;
        }
        if on {
            e.named_ingress += u32::from(named);
        } else {
            e.named_ingress -= u32::from(named);
        }
        if self.layout.is_some() {
            let key = self.idx.policies[&pid].policy.key.clone();
            self.out.diff.dispatch.entry((d, e.ip, pid)).or_insert((!on, key));
        }
    }

    /// Policy `pid` stops selecting endpoint `ep`.
    fn detach(&mut self, pid: PolicyId, ep: &PodAddr) {
        for d in Direction::BOTH {
            self.select(pid, ep, d, false);
        }
        self.out.dirty.insert(ep.clone());
        let entry = self.idx.policies.get_mut(&pid).expect("policy");
        entry.endpoints.remove(ep);
        if entry.endpoints.is_empty() {
            self.dematerialize(pid);
        }
    }

    /// The profile key of one direction of an endpoint, when it is isolated.
    fn profile_key(&self, ep: &EndpointEntry, d: Direction) -> Option<ProfileKey> {
        if !ep.isolated(d) {
            return None;
        }
        let policies: Vec<PolicyId> = ep.policies[di(d)].iter().copied().collect();
        let own = d == Direction::Ingress && ep.named_ingress > 0;
        debug_assert_eq!(own, self.needs_own_ports(&policies, d));
        Some(ProfileKey {
            direction: d,
            isolating: ep.quarantined || self.isolate(&policies),
            policies,
            own_ports: if own { ep.named_ports.clone() } else { Vec::new() },
            quarantined: ep.quarantined,
        })
    }

    /// Whether `policies` isolate what they select (a NetworkPolicy among them).
    fn isolate(&self, policies: &[PolicyId]) -> bool {
        policies.iter().any(|p| self.idx.policies[p].policy.isolates)
    }

    /// Whether `policies` resolve named ports against the endpoint they select (ingress).
    fn needs_own_ports(&self, policies: &[PolicyId], d: Direction) -> bool {
        d == Direction::Ingress && policies.iter().any(|p| self.idx.policies[p].ingress_named)
    }

    /// Gives profile `p` a new key whose expansions differ by whole policies: the policies
    /// it gains are added, those it loses taken away (both evaluated now), so its users keep
    /// it and it is edited in place by the entries that change.
    fn rekey(&mut self, p: ProfileId, key: ProfileKey) {
        let old = self.out.profiles[&p].key.clone();
        debug_assert_eq!(old.own_ports, key.own_ports);
        debug_assert_eq!(old.isolating, key.isolating);
        if self.out.profile_ids.get(&old) == Some(&p) {
            self.out.profile_ids.remove(&old);
        }
        self.out.profile_ids.insert(key.clone(), p);
        // (Keys hold their policies in order.)
        let only = |a: &[PolicyId], b: &[PolicyId]| -> Vec<PolicyId> {
            a.iter().copied().filter(|x| b.binary_search(x).is_err()).collect()
        };
        let gone = only(&old.policies, &key.policies);
        let new = only(&key.policies, &old.policies);
        for pid in &gone {
            self.out.unlink(*pid, p);
            self.contribute(*pid, key.direction, p, false);
        }
        for pid in &new {
            self.out.profiles_by_policy.entry(*pid).or_default().insert(p);
            self.contribute(*pid, key.direction, p, true);
        }
        self.out.profiles.get_mut(&p).expect("profile").key = key;
    }

    /// The profile of `key`, made (with every expansion of its policies) if there is none.
    fn profile_for(&mut self, key: ProfileKey) -> ProfileId {
        if let Some(&p) = self.out.profile_ids.get(&key) {
            return p;
        }
        let p = self.out.new_profile(key.clone(), HashMap::new());
        for pid in key.policies {
            self.contribute(pid, key.direction, p, true);
        }
        p
    }

    /// Adds (or removes) every expansion of one direction of a policy to one profile.
    fn contribute(&mut self, pid: PolicyId, d: Direction, prof: ProfileId, up: bool) {
        let Self { idx, out, state, .. } = self;
        let policy = &idx.policies[&pid];
        let ep_ports = out.profiles[&prof].key.own_ports.clone();
        for (ti, term) in policy.policy.terms(d).iter().enumerate() {
            let add = |out: &mut Output, peer: PeerMatch, peer_ports: &[NamedPort]| {
                for port in &term.ports {
                    if let Some(ports) = port.resolve(resolution_ports(d, &ep_ports, peer_ports)) {
                        let verdict = term.verdict.clone();
                        out.bump(prof, Allow { peer: peer.clone(), ports, verdict }, up);
                    }
                }
            };
            match &term.peer {
                TermPeer::Any => add(out, PeerMatch::Any, &[]),
                TermPeer::Block(b) => add(out, PeerMatch::Cidr(b.clone()), &[]),
                TermPeer::Pods(_) => {
                    let sel =
                        policy.term_selectors[di(d)][ti].expect("materialized term has a selector");
                    for port in term.ports.iter().filter(|p| !p.per_peer(d)) {
                        if let Some(ports) = port.resolve(&ep_ports) {
                            let verdict = term.verdict.clone();
                            out.bump(prof, Allow { peer: PeerMatch::Set(sel), ports, verdict }, up);
                        }
                    }
                    if term.ports.iter().any(|p| p.per_peer(d)) {
                        for id in &idx.selectors[&sel].members {
                            let peer_ports = &idx.identities[id].key.named_ports;
                            for port in term.ports.iter().filter(|p| p.per_peer(d)) {
                                if let Some(ports) = port.resolve(peer_ports) {
                                    out.bump(
                                        prof,
                                        Allow {
                                            peer: PeerMatch::Identity(*id),
                                            ports,
                                            verdict: term.verdict.clone(),
                                        },
                                        up,
                                    );
                                }
                            }
                        }
                    }
                }
                TermPeer::PodsInBlock(b) => {
                    for key in idx.pod_identity.keys() {
                        let pod = &state.pods[&key.pod];
                        let ip = pod.address(key.family).expect("owners have addresses");
                        if b.contains(ip) {
                            add(out, PeerMatch::Cidr(host_block(ip)), &pod.named_ports);
                        }
                    }
                }
            }
        }
    }

    /// Moves every user of profile `old` to a new copy of it (see [`Self::move_endpoints`]).
    fn replace_profile(&mut self, old: ProfileId) {
        let (key, counts) = {
            let e = &self.out.profiles[&old];
            (e.key.clone(), e.counts.clone())
        };
        self.out.stale(old);
        let p = self.out.new_profile(key, counts);
        let users: Vec<(PodAddr, Direction)> = self
            .out
            .endpoints
            .iter()
            .flat_map(|(k, e)| {
                Direction::BOTH
                    .into_iter()
                    .filter(|d| e.profiles[di(*d)] == Some(old))
                    .map(|d| (k.clone(), d))
            })
            .collect();
        for (k, d) in users {
            self.out.touch_isolation(&k, d);
            self.out.release(old);
            self.out.profiles.get_mut(&p).expect("profile").users += 1;
            self.out.endpoints.get_mut(&k).expect("endpoint").profiles[di(d)] = Some(p);
        }
    }

    /// Moves every endpoint touched by the event to the profiles of its keys, and drops the
    /// profiles left unused.
    ///
    /// A profile edited in place is make-before-break for the endpoints that stay on it
    /// (its additions come before its removals), and a move between two profiles is atomic;
    /// but an endpoint moving onto (or off) a profile that is also being edited would see the
    /// edits that are neither its old entries nor its new ones. Such a profile is replaced:
    /// its users move, with the others, to a copy of its new entries.
    fn move_endpoints(&mut self) {
        let mut dirty: Vec<PodAddr> = std::mem::take(&mut self.out.dirty).into_iter().collect();
        dirty.sort();
        let moves: Vec<(PodAddr, Direction, Option<ProfileKey>)> = dirty
            .iter()
            .filter_map(|k| self.out.endpoints.get(k).map(|ep| (k, ep)))
            .flat_map(|(k, ep)| Direction::BOTH.map(|d| (k.clone(), d, self.profile_key(ep, d))))
            .collect();
        // A profile whose every user moves to one new key that no profile has (a policy
        // created or changed that selects them all, as a rule) takes that key, and stays.
        let mut groups: HashMap<ProfileId, (Option<&ProfileKey>, u32)> = HashMap::new();
        for (k, d, new) in &moves {
            let Some(old) = self.out.endpoints[k].profiles[di(*d)] else { continue };
            let g = groups.entry(old).or_insert((new.as_ref(), 0));
            if g.0 != new.as_ref() {
                g.0 = None;
            }
            g.1 += 1;
        }
        let mut rekeys: Vec<(ProfileId, ProfileKey)> = groups
            .into_iter()
            .filter_map(|(p, (key, n))| {
                let e = &self.out.profiles[&p];
                let key = key?;
                (n == e.users
                    && *key != e.key
                    && key.own_ports == e.key.own_ports
                    && key.quarantined == e.key.quarantined
                    && key.isolating == e.key.isolating
                    && self.out.profile_ids.get(&e.key) == Some(&p))
                .then(|| (p, key.clone()))
            })
            .collect();
        rekeys.sort_unstable_by_key(|(p, _)| *p);
        for (p, key) in rekeys {
            if !self.out.profile_ids.contains_key(&key) {
                self.rekey(p, key);
            }
        }
        let mut joined: HashSet<ProfileId> = HashSet::new();
        for (key, d, new) in moves {
            let new = new.map(|k| self.profile_for(k));
            let old = self.out.endpoints[&key].profiles[di(d)];
            if new == old {
                continue;
            }
            self.out.touch_isolation(&key, d);
            if let Some(p) = old {
                self.out.release(p);
            }
            if let Some(p) = new {
                self.out.profiles.get_mut(&p).expect("profile").users += 1;
                joined.insert(p);
            }
            self.out.endpoints.get_mut(&key).expect("endpoint").profiles[di(d)] = new;
        }
        let edited: HashSet<ProfileId> = self
            .out
            .diff
            .allows
            .iter()
            .filter(|((p, a), before)| {
                self.out.profiles.get(p).is_some_and(|e| e.counts.contains_key(a) != **before)
            })
            .map(|((p, _), _)| *p)
            .collect();
        let mut replaced: Vec<ProfileId> = joined
            .into_iter()
            .chain(self.out.released.iter().copied())
            .filter(|p| {
                edited.contains(p)
                    && !self.out.diff.created.contains(p)
                    && self.out.profiles.get(p).is_some_and(|e| e.users > 0)
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        replaced.sort_unstable();
        for p in replaced {
            self.replace_profile(p);
        }
        for p in std::mem::take(&mut self.out.released) {
            if self.out.profiles.get(&p).is_some_and(|e| e.users == 0) {
                self.out.stale(p);
                let gone = self.out.profiles.remove(&p).expect("profile");
                debug_assert!(!self.out.diff.created.contains(&p), "a new profile without users");
                self.out.diff.removed.push(p);
                if gone.key.quarantined {
                    self.out.diff.removed_quarantines.insert(p);
                }
            }
        }
    }

    // ---- policies ----

    /// A new (or, with `number`, an updated) policy.
    fn add_policy(&mut self, policy: PolicyTerms, number: Option<PolicyId>) {
        let pid = number.unwrap_or_else(|| {
            self.idx.next_policy += 1;
            self.idx.next_policy
        });
        let selects = |k: &PodAddr| {
            let pod = &self.state.pods[&k.pod];
            policy.subject.selects(pod, &self.state.namespace_labels(&k.pod.namespace))
        };
        let selected: Vec<PodAddr> = match &policy.subject {
            Subject::Namespaced { namespace, .. } => self
                .out
                .endpoints_by_ns
                .get(namespace)
                .into_iter()
                .flatten()
                .filter(|k| selects(k))
                .cloned()
                .collect(),
            // (Quarantined endpoints are in no namespace's list: no policy selects them.)
            Subject::Cluster(_) => self
                .out
                .endpoints_by_ns
                .values()
                .flatten()
                .filter(|k| selects(k))
                .cloned()
                .collect(),
        };
        self.idx.policy_ids.insert(policy.key.clone(), pid);
        match &policy.subject {
            Subject::Namespaced { namespace, .. } => {
                self.idx.policies_by_ns.entry(namespace.clone()).or_default().insert(pid);
            }
            Subject::Cluster(_) => {
                self.idx.cluster_policies.insert(pid);
            }
        }
        self.idx.policies.insert(
            pid,
            PolicyEntry {
                ingress_named: policy
                    .terms(Direction::Ingress)
                    .iter()
                    .any(|t| t.ports.iter().any(PortSel::is_named)),
                policy,
                term_selectors: [Vec::new(), Vec::new()],
                endpoints: BTreeSet::new(),
            },
        );
        for ep in selected {
            self.attach(pid, &ep);
        }
    }

    /// An updated policy keeps its number, so the profiles of its endpoints keep their keys:
    /// they lose the old expansions and gain the new ones, and a policy update changes the
    /// entries it changes, not all of them.
    fn replace_policy(&mut self, policy: PolicyTerms) {
        let Some(&pid) = self.idx.policy_ids.get(&policy.key) else {
            return self.add_policy(policy, None);
        };
        let profiles: Vec<ProfileId> =
            self.out.profiles_by_policy.remove(&pid).into_iter().flatten().collect();
        for &p in &profiles {
            let d = self.out.profiles[&p].key.direction;
            self.contribute(pid, d, p, false);
        }
        self.remove_policy(&policy.key);
        self.add_policy(policy, Some(pid));
        let evaluated = !self.idx.policies[&pid].endpoints.is_empty();
        for p in profiles {
            if evaluated {
                self.out.profiles_by_policy.entry(pid).or_default().insert(p);
                let d = self.out.profiles[&p].key.direction;
                self.contribute(pid, d, p, true);
            } else {
                // No endpoint of it is left: it goes at the end of the event.
                self.out.stale(p);
            }
        }
    }

    fn remove_policy(&mut self, key: &ObjectKey) {
        let Some(pid) = self.idx.policy_ids.remove(key) else { return };
        // Its profiles lose its expansions now, while they are evaluated, and take the key
        // of what is left: their users keep them (edited in place) unless another profile
        // already has that key. (An update took them out already: see `replace_policy`.)
        let profiles: Vec<ProfileId> =
            self.out.profiles_by_policy.get(&pid).into_iter().flatten().copied().collect();
        let mut profiles = profiles;
        profiles.sort_unstable();
        for p in profiles {
            let mut k = self.out.profiles[&p].key.clone();
            k.policies.retain(|x| *x != pid);
            if !self.needs_own_ports(&k.policies, k.direction) {
                k.own_ports.clear();
            }
            k.isolating = k.quarantined || self.isolate(&k.policies);
            let own_ports_kept = k.own_ports == self.out.profiles[&p].key.own_ports;
            if (k.policies.is_empty() && !k.quarantined)
                || !own_ports_kept
                || k.isolating != self.out.profiles[&p].key.isolating
                || self.out.profile_ids.contains_key(&k)
            {
                // Its users go elsewhere: it goes at the end of the event.
                self.out.stale(p);
            } else {
                self.rekey(p, k);
            }
        }
        let endpoints: Vec<PodAddr> = self.idx.policies[&pid].endpoints.iter().cloned().collect();
        for ep in endpoints {
            self.detach(pid, &ep);
        }
        self.idx.policies.remove(&pid);
        self.idx.cluster_policies.remove(&pid);
        if let Some(set) = self.idx.policies_by_ns.get_mut(&key.namespace) {
            set.remove(&pid);
            if set.is_empty() {
                self.idx.policies_by_ns.remove(&key.namespace);
            }
        }
    }

    /// Interns and evaluates the selectors of a policy that now selects a local endpoint.
    fn materialize(&mut self, pid: PolicyId) {
        for d in Direction::BOTH {
            let terms = self.idx.policies[&pid].policy.terms(d).to_vec();
            let mut sels = Vec::with_capacity(terms.len());
            for (ti, term) in terms.iter().enumerate() {
                let tref = TermRef { policy: pid, direction: d, term: ti };
                sels.push(match &term.peer {
                    TermPeer::Pods(s) => {
                        let sel = self.intern_selector(s);
                        self.idx.selectors.get_mut(&sel).expect("selector").users.insert(tref);
                        Some(sel)
                    }
                    TermPeer::PodsInBlock(b) => {
                        self.idx.pods_in_block.insert(tref, b.clone());
                        None
                    }
                    TermPeer::Any | TermPeer::Block(_) => None,
                });
            }
            self.idx.policies.get_mut(&pid).expect("policy").term_selectors[di(d)] = sels;
        }
    }

    /// Stops evaluating the selectors of a policy that selects no local endpoint any more;
    /// its profiles go stale (see the module docs).
    fn dematerialize(&mut self, pid: PolicyId) {
        let profiles: Vec<ProfileId> =
            self.out.profiles_by_policy.get(&pid).into_iter().flatten().copied().collect();
        for p in profiles {
            self.out.stale(p);
        }
        for d in Direction::BOTH {
            let sels = std::mem::take(
                &mut self.idx.policies.get_mut(&pid).expect("policy").term_selectors[di(d)],
            );
            for (ti, sel) in sels.into_iter().enumerate() {
                let tref = TermRef { policy: pid, direction: d, term: ti };
                self.idx.pods_in_block.remove(&tref);
                let Some(sel) = sel else { continue };
                let entry = self.idx.selectors.get_mut(&sel).expect("selector");
                entry.users.remove(&tref);
                if entry.users.is_empty() {
                    self.idx.unused_selectors.push(sel);
                }
            }
        }
    }

    fn intern_selector(&mut self, s: &PeerSelector) -> SelectorId {
        if let Some(&id) = self.idx.selector_ids.get(s) {
            let entry = self.idx.selectors.get_mut(&id).expect("interned selector");
            if !entry.live {
                // Dormant: back into the plan with the members it kept.
                entry.live = true;
                self.idx.dormant.retain(|d| *d != id);
                self.out.diff.sets.entry(id).or_insert(false);
            }
            return id;
        }
        let id = self.idx.next_selector;
        self.idx.next_selector += 1;
        let mut members = HashSet::new();
        let mut consider = |ids: &HashSet<IdentityId>, idx: &Index| {
            for i in ids {
                if s.pods.matches(&idx.identities[i].key.labels) {
                    members.insert(*i);
                }
            }
        };
        match &s.namespaces {
            NamespaceScope::Named(ns) => {
                if let Some(ids) = self.idx.identities_by_ns.get(ns) {
                    consider(ids, &self.idx);
                }
                self.idx.selectors_by_ns.entry(ns.clone()).or_default().insert(id);
            }
            NamespaceScope::Selector(nss) => {
                for (ns, ids) in &self.idx.identities_by_ns {
                    if nss.matches(&self.state.namespace_labels(ns)) {
                        consider(ids, &self.idx);
                    }
                }
                self.idx.global_selectors.insert(id);
            }
        }
        for m in &members {
            self.idx.identities.get_mut(m).expect("identity").selectors.insert(id);
        }
        self.out.diff.sets.entry(id).or_insert(false);
        self.idx.selector_ids.insert(s.clone(), id);
        self.idx.selectors.insert(
            id,
            SelectorEntry { selector: s.clone(), members, users: HashSet::new(), live: true },
        );
        id
    }

    /// Takes a selector without users out of the plan; it stays evaluated (dormant) until
    /// [`DORMANT_SELECTORS`] others have been released after it.
    fn release_selector(&mut self, sel: SelectorId) {
        self.out.diff.sets.entry(sel).or_insert(true);
        self.idx.selectors.get_mut(&sel).expect("selector").live = false;
        self.idx.dormant.push_back(sel);
        while self.idx.dormant.len() > self.dormant_capacity {
            let oldest = self.idx.dormant.pop_front().expect("non-empty");
            self.forget_selector(oldest);
        }
    }

    /// Stops evaluating a dormant selector.
    fn forget_selector(&mut self, sel: SelectorId) {
        let entry = self.idx.selectors.remove(&sel).expect("selector");
        for m in &entry.members {
            if let Some(i) = self.idx.identities.get_mut(m) {
                i.selectors.remove(&sel);
            }
        }
        self.idx.selector_ids.remove(&entry.selector);
        match &entry.selector.namespaces {
            NamespaceScope::Named(ns) => {
                if let Some(set) = self.idx.selectors_by_ns.get_mut(ns) {
                    set.remove(&sel);
                    if set.is_empty() {
                        self.idx.selectors_by_ns.remove(ns);
                    }
                }
            }
            NamespaceScope::Selector(_) => {
                self.idx.global_selectors.remove(&sel);
            }
        }
    }

    // ---- the diff ----

    /// What the layout needs of an event: identities created and dropped, addresses whose
    /// identity changed (from the entries' changes), namespaces relabelled, policies touched,
    /// quarantines.
    fn layout_input(
        &self,
        identity_keys: HashMap<IdentityId, bool>,
        changes: &[(Stage, Change)],
        namespaces: HashMap<String, Option<Labels>>,
        policies: HashMap<ObjectKey, bool>,
        quarantine: Vec<(IpAddr, bool)>,
    ) -> LayoutInput<'_> {
        let mut input = LayoutInput { quarantine, ..LayoutInput::default() };
        for (id, before) in identity_keys {
            match (before, self.idx.identities.get(&id)) {
                (false, Some(e)) => input.new_keys.push((id, e.key.clone())),
                (true, None) => input.dropped_keys.push(id),
                _ => {}
            }
        }
        for (_, c) in changes {
            match c {
                Change::SetIdentity { ip, identity } => {
                    input.addresses.push((*ip, Some(*identity)))
                }
                Change::RemoveIdentity { ip } => input.addresses.push((*ip, None)),
                _ => {}
            }
        }
        for (name, before) in namespaces {
            let now = self.state.namespaces.get(&name).map(|ns| ns.labels.clone());
            if now != before {
                input.namespaces.push((name, now));
            }
        }
        input.policies = policies
            .into_keys()
            .map(|k| {
                let terms = self.idx.policy_ids.get(&k).map(|pid| &self.idx.policies[pid].policy);
                (k, terms)
            })
            .collect();
        input
    }

    /// Turns what the event touched into the net diff, ordered as [`PlanDiff`] explains.
    fn finish(&mut self) -> PlanDiff {
        for sel in std::mem::take(&mut self.idx.unused_selectors) {
            if self.idx.selectors.get(&sel).is_some_and(|s| s.live && s.users.is_empty()) {
                self.release_selector(sel);
            }
        }
        self.move_endpoints();
        let diff = std::mem::take(&mut self.out.diff);
        let mut changes: Vec<(Stage, Change)> = Vec::new();
        // Endpoints that are new in this event get their whole state; endpoints that are
        // gone get nothing but their removal.
        let mut fresh: HashSet<IpAddr> = HashSet::new();
        let mut gone: HashSet<IpAddr> = HashSet::new();
        for (ip, before) in &diff.endpoints {
            let after = self.out.endpoint_at.get(ip);
            match (before, after) {
                (None, None) => {}
                (None, Some(pod)) => {
                    fresh.insert(*ip);
                    changes.push((
                        Stage::Endpoints,
                        Change::AddEndpoint { ip: *ip, pod: pod.pod.clone() },
                    ));
                }
                (Some(_), None) => {
                    gone.insert(*ip);
                    changes.push((Stage::Unisolate, Change::RemoveEndpoint { ip: *ip }));
                }
                // The address passed to another pod: its profiles change as they change.
                (Some(a), Some(b)) if a != b => changes.push((
                    Stage::Endpoints,
                    Change::RetargetEndpoint { ip: *ip, pod: b.pod.clone() },
                )),
                (Some(_), Some(_)) => {}
            }
        }
        // Profiles made in the event, whole (no endpoint names them before `Switch`); gone,
        // whole (no endpoint names them after `Unisolate`).
        let mut created: Vec<ProfileId> = diff.created.iter().copied().collect();
        created.sort_unstable();
        for p in created {
            let Some(prof) = self.out.profiles.get(&p) else { continue };
            changes.push((
                Stage::QuietAdds,
                Change::AddProfile {
                    profile: p,
                    direction: prof.key.direction,
                    isolating: prof.key.isolating,
                },
            ));
            changes.extend(
                prof.counts
                    .keys()
                    .map(|a| (Stage::QuietAdds, Change::AddAllow { profile: p, allow: a.clone() })),
            );
        }
        changes.extend(
            diff.removed.iter().map(|p| (Stage::Unset, Change::RemoveProfile { profile: *p })),
        );
        for ((ip, d), before) in &diff.isolation {
            if gone.contains(ip) {
                continue;
            }
            let after =
                self.out.endpoint_at.get(ip).and_then(|k| self.out.endpoints[k].profiles[di(*d)]);
            let before = if fresh.contains(ip) { None } else { *before };
            if before != after {
                let quarantine = |p: ProfileId| {
                    self.out.profiles.get(&p).map_or_else(
                        || diff.removed_quarantines.contains(&p),
                        |e| e.key.quarantined,
                    )
                };
                let stage = match after {
                    // A quarantine admits nothing, so it cannot admit what neither state
                    // admits: entered first, before any address gains an identity that the
                    // old entries would admit; left last, once every address that leaves the
                    // new entries' sets has left them.
                    Some(p) if quarantine(p) => Stage::QuietAdds,
                    Some(_) if before.is_some_and(quarantine) => Stage::Unidentify,
                    Some(_) => Stage::Switch,
                    None => Stage::Unisolate,
                };
                changes
                    .push((stage, Change::SetProfile { ip: *ip, direction: *d, profile: after }));
            }
        }
        // Entries of profiles kept through the event: their net change. ClusterNetworkPolicy
        // entries decide by their first match, so the additions go in the order of
        // evaluation and the removals in the reverse order: every state between decides as
        // the profile's old entries or its new ones do, never otherwise (for a change within
        // one tier, as one ClusterNetworkPolicy's is: the first match among old and new
        // entries together is the old one's or the new one's).
        let mut allows: Vec<((ProfileId, Allow), bool)> = diff.allows.into_iter().collect();
        allows.sort_unstable_by(|((pa, a), _), ((pb, b), _)| {
            (&a.verdict, pa, a).cmp(&(&b.verdict, pb, b))
        });
        let mut removes = Vec::new();
        for ((p, allow), before) in allows {
            if diff.created.contains(&p) {
                continue;
            }
            let Some(prof) = self.out.profiles.get(&p) else { continue };
            let after = prof.counts.contains_key(&allow);
            if before == after {
                continue;
            }
            if after {
                changes.push((Stage::WideningAdds, Change::AddAllow { profile: p, allow }));
            } else {
                removes.push((Stage::Removes, Change::RemoveAllow { profile: p, allow }));
            }
        }
        changes.extend(removes.into_iter().rev());
        let mut quarantine: Vec<(IpAddr, bool)> = Vec::new();
        for (ip, before) in diff.conflicts {
            let now = self.conflict(&ip);
            let (was, is) = (before.as_ref(), now.as_ref());
            if was.is_some_and(|c| c.quarantined) != is.is_some_and(|c| c.quarantined) {
                quarantine.push((ip, is.is_some_and(|c| c.quarantined)));
            }
            match (before, now) {
                (before, Some(c)) if before.as_ref() != Some(&c) => {
                    changes.push((Stage::Sets, Change::SetConflict { ip, conflict: c }))
                }
                (Some(_), None) => changes.push((Stage::Unset, Change::RemoveConflict { ip })),
                _ => {}
            }
        }
        for (ip, before) in diff.identities {
            let after = self.identity_at(&ip);
            match (before, after) {
                (None, Some(a)) => {
                    changes.push((Stage::IdentifyNew, Change::SetIdentity { ip, identity: a }))
                }
                (Some(b), Some(a)) if b != a => {
                    changes.push((Stage::Identify, Change::SetIdentity { ip, identity: a }))
                }
                (Some(_), None) => changes.push((Stage::Unidentify, Change::RemoveIdentity { ip })),
                _ => {}
            }
        }
        // Peer sets: new ones with their members first, gone ones (and their members) last.
        let mut new_sets: HashSet<SelectorId> = HashSet::new();
        for (sel, before) in diff.sets {
            match (before, self.idx.selectors.get(&sel).filter(|s| s.live)) {
                (false, Some(s)) => {
                    new_sets.insert(sel);
                    changes.push((
                        Stage::Sets,
                        Change::AddSet { set: sel, selector: s.selector.clone() },
                    ));
                    let mut members: Vec<IdentityId> = s.members.iter().copied().collect();
                    members.sort_unstable();
                    changes.extend(
                        members
                            .into_iter()
                            .map(|m| (Stage::Sets, Change::AddMember { set: sel, identity: m })),
                    );
                }
                (true, None) => changes.push((Stage::Unset, Change::RemoveSet { set: sel })),
                _ => {}
            }
        }
        for ((sel, id), before) in diff.members {
            if new_sets.contains(&sel) {
                continue;
            }
            let Some(s) = self.idx.selectors.get(&sel).filter(|s| s.live) else { continue };
            match (before, s.members.contains(&id)) {
                // (In a pod event, only a new identity joins sets: no address has it until
                // `Identify` or `IdentifyNew`.)
                (false, true) => {
                    changes.push((Stage::QuietAdds, Change::AddMember { set: sel, identity: id }))
                }
                (true, false) => {
                    changes.push((Stage::Removes, Change::RemoveMember { set: sel, identity: id }))
                }
                _ => {}
            }
        }
        if let Some(before) = diff.node_ips {
            for ip in self.out.node_ips.difference(&before) {
                changes.push((Stage::WideningAdds, Change::AddNodeIp { ip: *ip }));
            }
            for ip in before.difference(&self.out.node_ips) {
                changes.push((Stage::Removes, Change::RemoveNodeIp { ip: *ip }));
            }
        }
        let layout = match self.layout.take() {
            Some(mut compiler) => {
                let mut input = self.layout_input(
                    diff.identity_keys,
                    &changes,
                    diff.namespaces,
                    diff.policies,
                    quarantine,
                );
                input.dispatch =
                    diff.dispatch
                        .into_iter()
                        .filter_map(|((d, ip, pid), (before, key))| {
                            // (A policy keeps its number, and its number its name.)
                            let after = self.out.endpoint_at.get(&ip).is_some_and(|k| {
                                self.out.endpoints[k].policies[di(d)].contains(&pid)
                            });
                            (before != after).then_some((d, ip, key, after))
                        })
                        .collect();
                let layout = compiler.update(input);
                self.layout = Some(compiler);
                layout
            }
            None => Vec::new(),
        };
        changes.sort_by_key(|(stage, _)| *stage);
        PlanDiff { changes: changes.into_iter().map(|(_, c)| c).collect(), layout }
    }
}

/// Sizes of the compiler's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub pods: usize,
    pub policies: usize,
    pub identities: usize,
    pub materialized_selectors: usize,
    pub endpoints: usize,
    /// Profiles, and the allow entries they hold (each once, however many endpoints name it).
    pub profiles: usize,
    pub allow_entries: usize,
}
