//! A naive evaluator of the NetworkPolicy specification, written to be obviously right
//! rather than fast: "is this connection allowed?", answered straight from the objects.
//!
//! It shares nothing with the compiler but the model types (and their selector matching),
//! so that tests can hold the compiler to it. It also judges ClusterNetworkPolicies (Admin
//! and Baseline tiers around the NetworkPolicies), which the compiler does not compile yet.
//!
//! A connection is judged on the node of each end: egress where the client runs, ingress
//! where the server runs. Each node knows which pod an address is by its own rules for
//! addresses several pods claim (see [`End`]).

use std::net::IpAddr;

use crate::model::cluster_policy::{Action, ClusterPeer, ClusterPolicy, ClusterPort, PodSet, Tier};
use crate::model::{
    Direction, Peer, Pod, PodPhase, Policy, PortSpec, Protocol, Rule, find_named_port,
};
use crate::state::ClusterState;

/// One end of a connection: an address, and the node whose pod it is (`None` for an address
/// that is no pod's, or when no node enforces anything for it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct End {
    pub ip: IpAddr,
    pub node: Option<String>,
}

impl End {
    /// The end at `ip` as the cluster sees it when nothing is contested: the node of the pod
    /// that has the address (of its first claimant when several do).
    pub fn at(state: &ClusterState, ip: IpAddr) -> End {
        let claimants = claimants(state, ip);
        let live: Vec<&&Pod> = claimants.iter().filter(|p| !p.terminating).collect();
        let pod = if live.len() == 1 { Some(*live[0]) } else { claimants.first().copied() };
        End { ip, node: pod.and_then(|p| p.node.clone()) }
    }
}

/// What a node knows of an address.
enum Seen<'a> {
    /// No pod has it.
    Nobody,
    /// This pod has it.
    Pod(&'a Pod),
    /// Pods claim it and the node cannot tell which: it is nobody's as a peer, and, when
    /// several claimants run on the node, its endpoint there admits nothing (but its node).
    Contested { local: bool },
}

/// The pods claiming an address: pods of their own network that have not terminated, in
/// key order.
fn claimants(state: &ClusterState, ip: IpAddr) -> Vec<&Pod> {
    state
        .pods
        .values()
        .filter(|p| p.has_address(ip) && !p.host_network)
        .filter(|p| !matches!(p.phase, PodPhase::Succeeded | PodPhase::Failed))
        .collect()
}

/// The pod at `ip` as node `node` sees it: claimants on the node count first (the node's own
/// interfaces say which pod has the address), then those not terminating.
fn seen<'a>(state: &'a ClusterState, ip: IpAddr, node: Option<&str>) -> Seen<'a> {
    let all = claimants(state, ip);
    if all.is_empty() {
        return Seen::Nobody;
    }
    let on_node: Vec<&Pod> = all.iter().copied().filter(|p| p.node.as_deref() == node).collect();
    let candidates = if on_node.is_empty() { all } else { on_node.clone() };
    let running: Vec<&Pod> = candidates.iter().copied().filter(|p| !p.terminating).collect();
    if running.len() == 1 {
        return Seen::Pod(running[0]);
    }
    if running.is_empty() && candidates.len() == 1 {
        return Seen::Pod(candidates[0]);
    }
    Seen::Contested { local: on_node.len() > 1 }
}

/// Whether a connection from `src` to `dst` (addresses; pods are found by address) on
/// `protocol`/`port` is allowed, each end judged by the node of the pod that has it.
pub fn allowed(
    state: &ClusterState,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    allowed_between(state, &End::at(state, src), &End::at(state, dst), protocol, port)
}

/// Whether a connection from `src` to `dst` is allowed: egress judged by `src`'s node,
/// ingress by `dst`'s.
pub fn allowed_between(
    state: &ClusterState,
    src: &End,
    dst: &End,
    protocol: Protocol,
    port: u16,
) -> bool {
    sides_allow(state, src, dst, protocol, port, |_| true)
}

/// Whether node `node` lets a connection from `src` to `dst` through: the sides whose end is
/// this node's pod (the other side is judged on its own node).
pub fn allowed_on(
    state: &ClusterState,
    node: &str,
    src: &End,
    dst: &End,
    protocol: Protocol,
    port: u16,
) -> bool {
    sides_allow(state, src, dst, protocol, port, |e| e.node.as_deref() == Some(node))
}

/// Whether the sides of a connection that `judged` says are judged (an end's) allow it.
fn sides_allow(
    state: &ClusterState,
    src: &End,
    dst: &End,
    protocol: Protocol,
    port: u16,
    judged: impl Fn(&End) -> bool,
) -> bool {
    // A pod's traffic to itself never leaves its network namespace.
    if src.ip == dst.ip {
        return true;
    }
    (!judged(src) || side_allows(state, src, dst, Direction::Egress, protocol, port))
        && (!judged(dst) || side_allows(state, dst, src, Direction::Ingress, protocol, port))
}

/// Whether a packet from `src` reaching `dst`'s node claims an address that a pod of that
/// node has, having come from another node: the node's programs (and rules) drop it as
/// spoofed, whatever policy says, since they know their pods' interfaces.
pub fn arrives_spoofed(state: &ClusterState, src: &End, dst: &End) -> bool {
    let Some(node) = dst.node.as_deref() else { return false };
    src.node.as_deref() != Some(node)
        && claimants(state, src.ip).iter().any(|p| p.node.as_deref() == Some(node))
}

/// Whether the node of `end` lets traffic in `direction` between `end` and `peer` through.
fn side_allows(
    state: &ClusterState,
    end: &End,
    peer: &End,
    direction: Direction,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(node) = end.node.as_deref() else { return true };
    let pod = match seen(state, end.ip, Some(node)) {
        Seen::Pod(p) if p.node.as_deref() == Some(node) => p,
        // Not a pod of this node: nothing is enforced here.
        Seen::Pod(_) | Seen::Nobody | Seen::Contested { local: false } => return true,
        Seen::Contested { local: true } => return node_has(state, node, peer.ip),
    };
    if node_has(state, node, peer.ip) {
        return true;
    }
    let peer_pod = match seen(state, peer.ip, Some(node)) {
        Seen::Pod(p) => Some(p),
        Seen::Nobody | Seen::Contested { .. } => None,
    };
    direction_allows(state, pod, direction, peer.ip, peer_pod, protocol, port)
}

/// Traffic between a pod and its own node is always allowed.
fn node_has(state: &ClusterState, node: &str, ip: IpAddr) -> bool {
    state.nodes.get(node).is_some_and(|n| n.addresses.contains(&ip))
}

/// One side's question: may `pod` talk to the peer at `peer_ip` (the pod there, if the node
/// knows one) in `direction`, on `protocol`/`port`?
struct Side<'a> {
    pod: &'a Pod,
    direction: Direction,
    peer_ip: IpAddr,
    peer_pod: Option<&'a Pod>,
    protocol: Protocol,
    port: u16,
}

impl Side<'_> {
    /// Named ports name a port of the destination: the selected pod for ingress, the peer
    /// for egress.
    fn destination(&self) -> Option<&Pod> {
        match self.direction {
            Direction::Ingress => Some(self.pod),
            Direction::Egress => self.peer_pod,
        }
    }
}

/// Whether `pod` may talk to `peer` in `direction`, tier by tier (the ClusterNetworkPolicy
/// API's precedence): the Admin tier's first matching rule decides, unless it passes; then
/// the NetworkPolicies that select the pod for that direction, if any; then the Baseline
/// tier the same way; what nothing decided is allowed.
fn direction_allows(
    state: &ClusterState,
    pod: &Pod,
    direction: Direction,
    peer_ip: IpAddr,
    peer_pod: Option<&Pod>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let q = Side { pod, direction, peer_ip, peer_pod, protocol, port };
    match tier_decides(state, Tier::Admin, &q) {
        Some(Action::Accept) => return true,
        Some(Action::Deny) => return false,
        Some(Action::Pass) | None => {}
    }
    if let Some(allowed) = network_policies_decide(state, &q) {
        return allowed;
    }
    tier_decides(state, Tier::Baseline, &q) != Some(Action::Deny)
}

fn pod_set_has(state: &ClusterState, set: &PodSet, pod: &Pod) -> bool {
    let ns = &pod.key.namespace;
    set.namespaces.matches(&state.namespace_labels(ns))
        && set.pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
}

/// The action of the first rule of a tier that matches: policies whose subject selects the
/// pod, lower priority first (equal priorities by name: the API leaves the order to the
/// implementation), rules in order. `Pass` ends the tier as well.
fn tier_decides(state: &ClusterState, tier: Tier, q: &Side) -> Option<Action> {
    let mut policies: Vec<&ClusterPolicy> = state
        .cluster_policies
        .values()
        .filter(|p| p.tier == tier && pod_set_has(state, &p.subject, q.pod))
        .collect();
    policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    policies.iter().flat_map(|p| p.rules(q.direction)).find_map(|rule| {
        let peer = rule.peers.iter().any(|peer| match peer {
            ClusterPeer::Pods(set) => q.peer_pod.is_some_and(|pp| pod_set_has(state, set, pp)),
            ClusterPeer::Networks(nets) => nets.iter().any(|n| n.contains(&q.peer_ip)),
            ClusterPeer::Nodes(sel) => state
                .nodes
                .values()
                .any(|n| sel.matches(&n.labels) && n.addresses.contains(&q.peer_ip)),
        });
        let ports = rule.ports.as_ref().is_none_or(|ports| {
            ports.iter().any(|p| match p {
                ClusterPort::Range { protocol, first, last } => {
                    *protocol == q.protocol && *first <= q.port && q.port <= *last
                }
                ClusterPort::Protocol(p) => *p == q.protocol,
                ClusterPort::Named(name) => {
                    q.destination().and_then(|d| find_named_port(&d.named_ports, name, q.protocol))
                        == Some(q.port)
                }
            })
        });
        (peer && ports).then_some(rule.action)
    })
}

/// What the NetworkPolicies selecting the pod for the direction say: `None` when none does
/// (the pod is not isolated that way), else whether a rule of one of them matches.
fn network_policies_decide(state: &ClusterState, q: &Side) -> Option<bool> {
    let selecting: Vec<&Policy> = state
        .policies
        .values()
        .filter(|p| p.key.namespace == q.pod.key.namespace && p.pod_selector.matches(&q.pod.labels))
        .filter(|p| p.rules(q.direction).is_some())
        .collect();
    if selecting.is_empty() {
        return None;
    }
    Some(selecting.iter().any(|policy| {
        policy.rules(q.direction).unwrap_or_default().iter().any(|rule| {
            rule_peer_matches(state, rule, q.peer_ip, q.peer_pod)
                && rule_port_matches(rule, q.destination(), q.protocol, q.port)
        })
    }))
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
