//! A naive evaluator of the NetworkPolicy specification, written to be obviously right
//! rather than fast: "is this connection allowed?", answered straight from the objects.
//!
//! It shares nothing with the compiler but the model types (and their selector matching),
//! so that tests can hold the compiler to it.

use std::net::IpAddr;

use crate::model::{Direction, Peer, Pod, Policy, PortSpec, Protocol, Rule, find_named_port};
use crate::state::ClusterState;

/// Whether a connection from `src` to `dst` (addresses; pods are found by address) on
/// `protocol`/`port` is allowed by the policies of `state`.
pub fn allowed(
    state: &ClusterState,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let src_pod = pod_at(state, src);
    let dst_pod = pod_at(state, dst);
    // A pod's traffic to itself never leaves its network namespace.
    if src == dst {
        return true;
    }
    let egress_ok = match src_pod {
        None => true,
        Some(s) => {
            node_has(state, s, dst)
                || direction_allows(state, s, Direction::Egress, dst, dst_pod, protocol, port)
        }
    };
    let ingress_ok = match dst_pod {
        None => true,
        Some(d) => {
            node_has(state, d, src)
                || direction_allows(state, d, Direction::Ingress, src, src_pod, protocol, port)
        }
    };
    egress_ok && ingress_ok
}

/// The pod that has `ip`: a running (or pending) pod of its own network. When several
/// claim one address, the one with the smallest namespace/name.
fn pod_at(state: &ClusterState, ip: IpAddr) -> Option<&Pod> {
    state
        .pods
        .values()
        .filter(|p| p.ip == Some(ip) && !p.host_network)
        .filter(|p| {
            !matches!(p.phase, crate::model::PodPhase::Succeeded | crate::model::PodPhase::Failed)
        })
        .min_by(|a, b| a.key.cmp(&b.key))
}

/// Traffic between a pod and its own node is always allowed.
fn node_has(state: &ClusterState, pod: &Pod, ip: IpAddr) -> bool {
    pod.node.as_ref().and_then(|n| state.nodes.get(n)).is_some_and(|n| n.addresses.contains(&ip))
}

/// Whether the policies selecting `pod` let it talk to `peer` in `direction`: allowed
/// when no policy selects it for that direction, or when a rule of one that does matches.
fn direction_allows(
    state: &ClusterState,
    pod: &Pod,
    direction: Direction,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let selecting: Vec<&Policy> = state
        .policies
        .values()
        .filter(|p| p.key.namespace == pod.key.namespace && p.pod_selector.matches(&pod.labels))
        .filter(|p| p.rules(direction).is_some())
        .collect();
    if selecting.is_empty() {
        return true;
    }
    // Named ports name a port of the destination: the selected pod for ingress, the peer
    // for egress.
    let destination = match direction {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer_pod,
    };
    selecting.iter().any(|policy| {
        policy.rules(direction).unwrap_or_default().iter().any(|rule| {
            rule_peer_matches(state, rule, peer_ip, peer_pod)
                && rule_port_matches(rule, destination, protocol, port)
        })
    })
}

fn rule_peer_matches(state: &ClusterState, rule: &Rule, ip: IpAddr, peer: Option<&Pod>) -> bool {
    rule.peers.is_empty()
        || rule.peers.iter().any(|p| match p {
            Peer::Block(b) => b.contains(ip),
            Peer::Pods { namespaces, pods } => peer.is_some_and(|peer| {
                let ns = &peer.key.namespace;
                namespaces.matches(ns, &state.namespace_labels(ns)) && pods.matches(&peer.labels)
            }),
        })
}

fn rule_port_matches(
    rule: &Rule,
    destination: Option<&Pod>,
    protocol: Protocol,
    port: u16,
) -> bool {
    rule.ports.is_empty()
        || rule.ports.iter().any(|spec| match spec {
            PortSpec::Protocol(p) => *p == protocol,
            PortSpec::Range { protocol: p, first, last } => {
                *p == protocol && *first <= port && port <= *last
            }
            PortSpec::Named { protocol: p, name } => {
                *p == protocol
                    && destination.and_then(|d| find_named_port(&d.named_ports, name, *p))
                        == Some(port)
            }
        })
}
