//! Compiling a whole cluster state in one pass.

use std::collections::{BTreeMap, HashMap};

use super::{IdentityKey, PeerSelector, Scope, TermPeer, host_block, resolution_ports, rule_terms};
use crate::model::{Direction, Pod};
use crate::plan::{Allow, EndpointPlan, IdentityId, PeerMatch, Plan};
use crate::state::ClusterState;

/// Compiles `state` into the plan of `scope`. Identities are numbered from 1 in the order
/// of their keys, so the result depends only on the state.
pub fn compile(state: &ClusterState, scope: &Scope) -> Plan {
    let owners = state.address_owners();

    let mut by_key: BTreeMap<IdentityKey, Vec<&Pod>> = BTreeMap::new();
    for pod in owners.values() {
        by_key.entry(IdentityKey::of(pod)).or_default().push(pod);
    }
    let mut plan = Plan::default();
    let mut identities: Vec<(IdentityId, &IdentityKey)> = Vec::with_capacity(by_key.len());
    for (i, (key, pods)) in by_key.iter().enumerate() {
        let id = i as IdentityId + 1;
        identities.push((id, key));
        for p in pods {
            plan.identities.insert(p.ip.expect("owners have addresses"), id);
        }
    }

    let mut members: HashMap<PeerSelector, Vec<IdentityId>> = HashMap::new();
    let mut selector_members = |sel: &PeerSelector| -> Vec<IdentityId> {
        members
            .entry(sel.clone())
            .or_insert_with(|| {
                identities
                    .iter()
                    .filter(|(_, k)| sel.matches(&k.namespace, &state.namespace_labels(&k.namespace), &k.labels))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .clone()
    };
    let key_of: HashMap<IdentityId, &IdentityKey> = identities.iter().map(|(id, k)| (*id, *k)).collect();

    for (ip, pod) in &owners {
        if !scope.is_local(pod) {
            continue;
        }
        let mut ep = EndpointPlan::new(pod.key.clone());
        for policy in state.policies_in(&pod.key.namespace) {
            if !policy.pod_selector.matches(&pod.labels) {
                continue;
            }
            for direction in Direction::BOTH {
                let Some(rules) = policy.rules(direction) else { continue };
                let dp = ep.direction_mut(direction);
                dp.isolated = true;
                for rule in rules {
                    for term in rule_terms(rule, direction) {
                        let mut add = |peer: PeerMatch, peer_ports: &[crate::model::NamedPort]| {
                            for port in &term.ports {
                                let named = resolution_ports(direction, &pod.named_ports, peer_ports);
                                if let Some(ports) = port.resolve(named) {
                                    dp.allow.insert(Allow { peer: peer.clone(), ports });
                                }
                            }
                        };
                        match &term.peer {
                            TermPeer::Any => add(PeerMatch::Any, &[]),
                            TermPeer::Block(b) => add(PeerMatch::Cidr(b.clone()), &[]),
                            TermPeer::Pods(sel) => {
                                for id in selector_members(sel) {
                                    add(PeerMatch::Identity(id), &key_of[&id].named_ports);
                                }
                            }
                            TermPeer::PodsInBlock(b) => {
                                for (peer_ip, peer) in &owners {
                                    if b.contains(*peer_ip) {
                                        add(PeerMatch::Cidr(host_block(*peer_ip)), &peer.named_ports);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        plan.endpoints.insert(*ip, ep);
    }
    if let Some(node) = scope.node().and_then(|n| state.nodes.get(n)) {
        plan.node_ips.extend(node.addresses.iter().copied());
    }
    plan
}
