//! Compiling a whole cluster state in one pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use super::layout::{LayoutCompiler, LayoutInput};
use super::{PolicyTerms, PortSel, Scope, TermPeer, conflict_of, host_block, resolution_ports};
use crate::model::{Direction, NamedPort, ObjectKey, Pod};
use crate::plan::{
    Allow, EndpointPlan, IdentityId, IdentityKey, Layout, PeerMatch, PeerSelector, PeerSet, Plan,
    Profile, ProfileId, SetId,
};
use crate::state::{Claim, ClusterState};

/// Compiles `state` into the plan of `scope`. Identities are numbered from 1 in the order
/// of their keys, so the result depends only on the state.
pub fn compile(state: &ClusterState, scope: &Scope) -> Plan {
    let claimants = state.claimants();
    let claims: BTreeMap<IpAddr, Claim> = claimants
        .iter()
        .map(|(ip, cs)| (*ip, Claim::resolve(cs.clone(), |p| scope.is_local(p))))
        .collect();
    let owners: BTreeMap<IpAddr, &Pod> =
        claims.iter().filter_map(|(ip, c)| c.owner().map(|p| (*ip, p))).collect();

    let mut by_key: BTreeMap<IdentityKey, Vec<IpAddr>> = BTreeMap::new();
    for (ip, pod) in &owners {
        by_key.entry(IdentityKey::of(pod)).or_default().push(*ip);
    }
    let mut plan = Plan::default();
    let mut identities: Vec<(IdentityId, &IdentityKey)> = Vec::with_capacity(by_key.len());
    for (i, (key, ips)) in by_key.iter().enumerate() {
        let id = i as IdentityId + 1;
        identities.push((id, key));
        for ip in ips {
            plan.identities.insert(*ip, id);
        }
    }

    // Peer sets, numbered from 1 in the order the endpoints' policies first name them.
    let mut set_ids: HashMap<PeerSelector, SetId> = HashMap::new();
    let mut selector_set = |sel: &PeerSelector, plan: &mut Plan| -> (SetId, Vec<IdentityId>) {
        let id = *set_ids.entry(sel.clone()).or_insert_with(|| {
            let id = plan.sets.len() as SetId + 1;
            let members = identities
                .iter()
                .filter(|(_, k)| {
                    sel.matches(&k.namespace, &state.namespace_labels(&k.namespace), &k.labels)
                })
                .map(|(id, _)| *id)
                .collect();
            plan.sets.insert(id, PeerSet { selector: sel.clone(), members });
            id
        });
        (id, plan.sets[&id].members.iter().copied().collect())
    };
    let key_of: HashMap<IdentityId, &IdentityKey> =
        identities.iter().map(|(id, k)| (*id, *k)).collect();

    // Policies of both kinds, NetworkPolicies by namespace.
    let mut namespaced: HashMap<&str, Vec<PolicyTerms>> = HashMap::new();
    for p in state.policies.values() {
        namespaced.entry(&p.key.namespace).or_default().push(PolicyTerms::of_network_policy(p));
    }
    let cluster: Vec<PolicyTerms> = state
        .cluster_policies
        .values()
        .map(|p| PolicyTerms::of_cluster_policy(p, &state.nodes))
        .collect();

    // Profiles, numbered from 1 in the order endpoints first need them: one for each
    // direction and selecting policies (and the endpoint's own named ports, when those
    // policies resolve ingress named ports against it), as the engine shares them.
    let mut profile_ids: HashMap<ProfileKey, ProfileId> = HashMap::new();
    let mut dispatch: Vec<(Direction, IpAddr, ObjectKey, bool)> = Vec::new();
    for (ip, pod) in &owners {
        if !scope.is_local(pod) {
            continue;
        }
        let mut ep = EndpointPlan::new(pod.key.clone());
        let ns_labels = state.namespace_labels(&pod.key.namespace);
        for direction in Direction::BOTH {
            let policies: Vec<&PolicyTerms> = namespaced
                .get(pod.key.namespace.as_str())
                .into_iter()
                .flatten()
                .chain(&cluster)
                .filter(|p| p.subject.selects(pod, &ns_labels) && p.covers(direction))
                .collect();
            if policies.is_empty() {
                continue;
            }
            dispatch.extend(policies.iter().map(|p| (direction, *ip, p.key.clone(), true)));
            let own = direction == Direction::Ingress
                && policies
                    .iter()
                    .flat_map(|p| p.terms(direction))
                    .any(|t| t.ports.iter().any(PortSel::is_named));
            let own_ports: Vec<NamedPort> = if own { pod.named_ports.to_vec() } else { Vec::new() };
            let mut keys: Vec<ObjectKey> = policies.iter().map(|p| p.key.clone()).collect();
            keys.sort();
            let key = ProfileKey {
                direction,
                policies: keys,
                own_ports,
                quarantined: false,
                isolating: policies.iter().any(|p| p.isolates),
            };
            if let Some(id) = profile_ids.get(&key) {
                ep.profiles[direction as usize] = Some(*id);
                continue;
            }
            let mut allow: HashSet<Allow> = HashSet::new();
            for term in policies.iter().flat_map(|p| p.terms(direction)) {
                let verdict = &term.verdict;
                let add =
                    |allow: &mut HashSet<Allow>, peer: PeerMatch, peer_ports: &[NamedPort]| {
                        for port in &term.ports {
                            let named = resolution_ports(direction, &key.own_ports, peer_ports);
                            if let Some(ports) = port.resolve(named) {
                                let verdict = verdict.clone();
                                allow.insert(Allow { peer: peer.clone(), ports, verdict });
                            }
                        }
                    };
                match &term.peer {
                    TermPeer::Any => add(&mut allow, PeerMatch::Any, &[]),
                    TermPeer::Block(b) => add(&mut allow, PeerMatch::Cidr(b.clone()), &[]),
                    TermPeer::Pods(sel) => {
                        // One entry for the set per port, but egress named ports per
                        // member, each resolved against that member's ports.
                        let (set, members) = selector_set(sel, &mut plan);
                        for port in term.ports.iter().filter(|p| !p.per_peer(direction)) {
                            if let Some(ports) = port.resolve(&key.own_ports) {
                                let verdict = verdict.clone();
                                allow.insert(Allow { peer: PeerMatch::Set(set), ports, verdict });
                            }
                        }
                        for id in members {
                            for port in term.ports.iter().filter(|p| p.per_peer(direction)) {
                                if let Some(ports) = port.resolve(&key_of[&id].named_ports) {
                                    let peer = PeerMatch::Identity(id);
                                    let verdict = verdict.clone();
                                    allow.insert(Allow { peer, ports, verdict });
                                }
                            }
                        }
                    }
                    TermPeer::PodsInBlock(b) => {
                        for (peer_ip, peer) in &owners {
                            if b.contains(*peer_ip) {
                                add(
                                    &mut allow,
                                    PeerMatch::Cidr(host_block(*peer_ip)),
                                    &peer.named_ports,
                                );
                            }
                        }
                    }
                }
            }
            let id = new_profile(&mut plan, &mut profile_ids, key, allow);
            ep.profiles[direction as usize] = Some(id);
        }
        plan.endpoints.insert(*ip, ep);
    }
    // Contested addresses: reported; where several claimants are local, an endpoint that
    // admits nothing.
    for (ip, claim) in &claims {
        let quarantined = matches!(claim, Claim::Contested { quarantined: true, .. });
        if quarantined {
            let pod = claimants[ip].iter().find(|p| scope.is_local(p)).expect("local claimants");
            let mut ep = EndpointPlan::new(pod.key.clone());
            for direction in Direction::BOTH {
                let key = ProfileKey {
                    direction,
                    policies: Vec::new(),
                    own_ports: Vec::new(),
                    quarantined: true,
                    isolating: true,
                };
                let id = match profile_ids.get(&key) {
                    Some(id) => *id,
                    None => new_profile(&mut plan, &mut profile_ids, key, HashSet::new()),
                };
                ep.profiles[direction as usize] = Some(id);
            }
            plan.endpoints.insert(*ip, ep);
        }
        if let Some(conflict) = conflict_of(&claimants[ip], quarantined) {
            plan.conflicts.insert(*ip, conflict);
        }
    }
    if let Some(node) = scope.node().and_then(|n| state.nodes.get(n)) {
        plan.node_ips.extend(node.addresses.iter().copied());
    }
    let terms = namespaced.values().flatten().chain(&cluster);
    plan.layout = layout(state, &plan, &identities, terms, dispatch);
    plan
}

/// What makes endpoint directions share a profile (as the engine's key, by policy name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ProfileKey {
    direction: Direction,
    policies: Vec<ObjectKey>,
    own_ports: Vec<NamedPort>,
    quarantined: bool,
    isolating: bool,
}

fn new_profile(
    plan: &mut Plan,
    ids: &mut HashMap<ProfileKey, ProfileId>,
    key: ProfileKey,
    allow: HashSet<Allow>,
) -> ProfileId {
    let id = ids.len() as ProfileId + 1;
    plan.profiles.insert(id, Profile { direction: key.direction, isolating: key.isolating, allow });
    ids.insert(key, id);
    id
}

/// The Azure NPM layout of `state` (cluster-wide: it follows every pod and policy).
fn layout<'a>(
    state: &ClusterState,
    plan: &Plan,
    identities: &[(IdentityId, &IdentityKey)],
    policies: impl Iterator<Item = &'a PolicyTerms>,
    dispatch: Vec<(Direction, IpAddr, ObjectKey, bool)>,
) -> Layout {
    let mut compiler = LayoutCompiler::new();
    compiler.update(LayoutInput {
        new_keys: identities.iter().map(|(id, k)| (*id, (*k).clone())).collect(),
        addresses: plan.identities.iter().map(|(ip, id)| (*ip, Some(*id))).collect(),
        namespaces: state
            .namespaces
            .iter()
            .map(|(name, ns)| (name.clone(), Some(ns.labels.clone())))
            .collect(),
        policies: policies.map(|p| (p.key.clone(), Some(p))).collect(),
        quarantine: plan
            .conflicts
            .iter()
            .filter(|(_, c)| c.quarantined)
            .map(|(ip, _)| (*ip, true))
            .collect(),
        dropped_keys: Vec::new(),
        dispatch,
    });
    compiler.layout()
}
