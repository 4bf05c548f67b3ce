//! Why a connection is allowed or denied: the compiler's verdict on each side (the egress of
//! the source pod, the ingress of the destination pod), the policies that select each end,
//! and the rules that admit the connection, named as the user wrote them
//! (`spec.ingress[1].from[0]`, `spec.ingress[1].ports[0]`).
//!
//! The verdict of a side is the plan's: the cluster is compiled for the node of the pod on
//! that side, as its agent compiles it, and the plan's entries are asked. The rules are found
//! by splitting each rule of a selecting policy into its peers and ports, one at a time, each
//! expanded by the same helpers ([`rule_terms`], [`PortSel::resolve`]) that build the plan;
//! `tests/explain.rs` holds both to the reference evaluator.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::{PortSel, Scope, TermPeer, compile, resolution_ports, rule_terms};
use crate::model::{Direction, ObjectKey, Pod, Policy, Protocol, Rule};
use crate::plan::{Allow, Connection, Plan};
use crate::state::{Claim, ClusterState};

/// A rule (or one peer and one port of it) of a policy, as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RuleRef {
    pub policy: ObjectKey,
    /// `spec.ingress[1].from[0]`, or `spec.ingress[1]` for a rule without peers (every peer).
    pub peer: String,
    /// `spec.ingress[1].ports[0]`, or `None` for a rule without ports (every port).
    pub port: Option<String>,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.policy, self.peer)?;
        if let Some(p) = &self.port {
            write!(f, " and {p}")?;
        }
        Ok(())
    }
}

/// One side of a connection: a pod's egress (source) or ingress (destination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    pub direction: Direction,
    /// The address on this side.
    pub ip: IpAddr,
    /// The pod that has the address, when one does (else nothing is enforced on this side).
    pub pod: Option<ObjectKey>,
    /// The node whose agent judges this side.
    pub node: Option<String>,
    /// The NetworkPolicies selecting the pod for this direction (empty: not isolated).
    pub policies: Vec<ObjectKey>,
    /// The ClusterNetworkPolicies whose subject selects the pod, with rules for this
    /// direction (by name).
    pub cluster_policies: Vec<String>,
    /// The rules admitting the connection (each peer and port of a rule that does).
    pub admitted_by: Vec<RuleRef>,
    /// The plan's entries of this side that admit the connection (what the dataplanes hold).
    pub entries: Vec<Allow>,
    pub allowed: bool,
    /// Why, in a sentence.
    pub reason: String,
}

/// A connection explained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub egress: Side,
    pub ingress: Side,
    pub allowed: bool,
}

/// The pod that has `ip` as the cluster sees it (none when no pod or several claim it).
fn owner(state: &ClusterState, ip: IpAddr) -> Option<&Pod> {
    let claimants: Vec<&Pod> =
        state.pods.values().filter(|p| p.is_endpoint() && p.has_address(ip)).collect();
    Claim::resolve(claimants, |_| false).owner()
}

/// The policies of `pod`'s namespace selecting it for `direction`.
pub fn selecting<'a>(
    state: &'a ClusterState,
    pod: &'a Pod,
    direction: Direction,
) -> impl Iterator<Item = &'a Policy> + 'a {
    state
        .policies_in(&pod.key.namespace)
        .filter(move |p| p.pod_selector.matches(&pod.labels) && p.rules(direction).is_some())
}

/// One side's question: does a rule of a policy selecting `endpoint` for `direction` admit
/// `peer_ip` (the pod `peer`, when it is one) on `protocol`/`port`?
#[derive(Clone, Copy, Debug)]
pub struct Question<'a> {
    pub direction: Direction,
    pub endpoint: &'a Pod,
    pub peer_ip: IpAddr,
    pub peer: Option<&'a Pod>,
    pub protocol: Protocol,
    pub port: u16,
}

/// Whether `rule` answers `q` yes, expanded as the compiler expands it.
pub fn rule_admits(state: &ClusterState, rule: &Rule, q: &Question) -> bool {
    let Question { direction, endpoint, peer_ip, peer, protocol, port } = *q;
    rule_terms(rule, direction, &crate::plan::Verdict::Allow).iter().any(|term| {
        let peer_matches = match &term.peer {
            TermPeer::Any => true,
            TermPeer::Block(b) => b.contains(peer_ip),
            TermPeer::PodsInBlock(b) => peer.is_some() && b.contains(peer_ip),
            TermPeer::Pods(sel) => peer.is_some_and(|p| {
                sel.matches(&p.key.namespace, &state.namespace_labels(&p.key.namespace), &p.labels)
            }),
        };
        let peer_ports = peer.map(|p| &p.named_ports[..]).unwrap_or_default();
        let named = resolution_ports(direction, &endpoint.named_ports, peer_ports);
        peer_matches
            && term
                .ports
                .iter()
                .any(|p: &PortSel| p.resolve(named).is_some_and(|m| m.matches(protocol, port)))
    })
}

/// The peers and ports of `policy`'s rules (for `direction`) that admit the connection, each
/// named as in the policy's spec.
fn admitting_rules(state: &ClusterState, policy: &Policy, q: &Question) -> Vec<RuleRef> {
    let direction = q.direction;
    let (list, side) = match direction {
        Direction::Ingress => ("ingress", "from"),
        Direction::Egress => ("egress", "to"),
    };
    let mut out = Vec::new();
    for (i, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
        let peers: Vec<(String, Vec<_>)> = if rule.peers.is_empty() {
            vec![(format!("spec.{list}[{i}]"), Vec::new())]
        } else {
            rule.peers
                .iter()
                .enumerate()
                .map(|(j, p)| (format!("spec.{list}[{i}].{side}[{j}]"), vec![p.clone()]))
                .collect()
        };
        let ports: Vec<(Option<String>, Vec<_>)> = if rule.ports.is_empty() {
            vec![(None, Vec::new())]
        } else {
            rule.ports
                .iter()
                .enumerate()
                .map(|(k, p)| (Some(format!("spec.{list}[{i}].ports[{k}]")), vec![p.clone()]))
                .collect()
        };
        for (peer_name, one_peer) in &peers {
            for (port_name, one_port) in &ports {
                let part = Rule { peers: one_peer.clone(), ports: one_port.clone() };
                if rule_admits(state, &part, q) {
                    out.push(RuleRef {
                        policy: policy.key.clone(),
                        peer: peer_name.clone(),
                        port: port_name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The plan of the node that judges `pod` (the cluster's, for a pod on no node).
fn plan_for<'p>(
    state: &ClusterState,
    pod: &Pod,
    plans: &'p mut BTreeMap<Option<String>, Plan>,
) -> &'p Plan {
    plans.entry(pod.node.clone()).or_insert_with(|| {
        let scope = pod.node.clone().map_or(Scope::Cluster, Scope::Node);
        compile(state, &scope)
    })
}

fn side(
    state: &ClusterState,
    direction: Direction,
    conn: &Connection,
    plans: &mut BTreeMap<Option<String>, Plan>,
) -> Side {
    let (ip, peer_ip) = match direction {
        Direction::Egress => (conn.src, conn.dst),
        Direction::Ingress => (conn.dst, conn.src),
    };
    let what = match direction {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    };
    let mut s = Side {
        direction,
        ip,
        pod: None,
        node: None,
        policies: Vec::new(),
        cluster_policies: Vec::new(),
        admitted_by: Vec::new(),
        entries: Vec::new(),
        allowed: true,
        reason: String::new(),
    };
    let Some(pod) = owner(state, ip) else {
        s.reason = format!("{ip} is no pod's address: no policy applies to its {what}");
        return s;
    };
    s.pod = Some(pod.key.clone());
    s.node = pod.node.clone();
    if conn.src == conn.dst {
        s.reason = format!("{} to itself: never leaves the pod, never blocked", pod.key);
        return s;
    }
    let plan = plan_for(state, pod, plans);
    s.allowed = match direction {
        Direction::Egress => plan.allows_egress(conn),
        Direction::Ingress => plan.allows_ingress(conn),
    };
    s.policies = selecting(state, pod, direction).map(|p| p.key.clone()).collect();
    let ns_labels = state.namespace_labels(&pod.key.namespace);
    s.cluster_policies = state
        .cluster_policies
        .values()
        .filter(|p| !p.rules(direction).is_empty())
        .filter(|p| p.subject.selects(pod, &ns_labels))
        .map(|p| p.name.clone())
        .collect();
    let q = Question {
        direction,
        endpoint: pod,
        peer_ip,
        peer: owner(state, peer_ip),
        protocol: conn.protocol,
        port: conn.port,
    };
    for policy in selecting(state, pod, direction) {
        s.admitted_by.extend(admitting_rules(state, policy, &q));
    }
    if let Some(ep) = plan.endpoints.get(&ip) {
        let dp = plan.direction(ep, direction);
        let identity = plan.identities.get(&peer_ip).copied();
        s.entries = dp
            .allow
            .iter()
            .filter(|a| {
                a.ports.matches(conn.protocol, conn.port)
                    && a.peer.matches(&plan.sets, peer_ip, identity)
            })
            .cloned()
            .collect();
        s.entries.sort();
    }
    let own_node = plan.node_ips.contains(&peer_ip);
    let isolated = plan.endpoints.get(&ip).is_some_and(|e| plan.direction(e, direction).isolated);
    let decider = crate::plan::decider(s.entries.iter().map(|a| &a.verdict), isolated);
    let list = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let tier_rule = |tier: &str, p: &crate::plan::Precedence| {
        format!(
            "ClusterNetworkPolicy {} ({tier} tier, priority {}) spec.{list}[{}]: {:?}",
            p.policy, p.priority, p.rule, p.action
        )
    };
    let passed = s
        .entries
        .iter()
        .filter_map(|a| match &a.verdict {
            crate::plan::Verdict::Admin(p) => Some(p),
            _ => None,
        })
        .min()
        .filter(|p| p.action == crate::model::cluster_policy::Action::Pass)
        .map(|p| format!("passed by {}; ", tier_rule("Admin", p)))
        .unwrap_or_default();
    s.reason = if own_node {
        format!("{peer_ip} is the address of {}'s own node: always allowed", pod.key)
    } else if let crate::plan::Decider::Admin(p) = decider {
        format!("decided first by {}", tier_rule("Admin", p))
    } else if let crate::plan::Decider::Baseline(p) = decider {
        format!("no Admin rule decides and no NetworkPolicy isolates; {}", tier_rule("Baseline", p))
    } else if s.policies.is_empty()
        && !plan.endpoints.get(&ip).is_some_and(|e| e.isolated(direction))
    {
        format!("no policy selects {} for {what}: not isolated", pod.key)
    } else if s.policies.is_empty() && !isolated && !s.cluster_policies.is_empty() {
        format!(
            "no rule of the ClusterNetworkPolicies selecting {} decides and no NetworkPolicy isolates it: allowed",
            pod.key
        )
    } else if plan.conflicts.get(&ip).is_some_and(|c| c.quarantined) {
        format!("{ip} is claimed by several pods on this node: quarantined, nothing admitted")
    } else if s.allowed {
        format!(
            "admitted by {} rule part(s) of the policies selecting {}",
            s.admitted_by.len(),
            pod.key
        )
    } else {
        format!(
            "isolated for {what} by {}; no rule admits {peer_ip} on {}/{}",
            s.policies.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            conn.protocol,
            conn.port
        )
    };
    if !own_node && !matches!(decider, crate::plan::Decider::Admin(_)) {
        s.reason = format!("{passed}{}", s.reason);
    }
    s
}

/// Explains the connection from `src` to `dst` on `protocol`/`port` in `state`.
pub fn explain(
    state: &ClusterState,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Explanation {
    Explainer::new(state).explain(src, dst, protocol, port)
}

/// Explains many connections of one cluster state, compiling each node's plan once (a
/// report's matrix asks for every pair of pods).
pub struct Explainer<'a> {
    state: &'a ClusterState,
    plans: BTreeMap<Option<String>, Plan>,
}

impl<'a> Explainer<'a> {
    pub fn new(state: &'a ClusterState) -> Self {
        Self { state, plans: BTreeMap::new() }
    }

    pub fn explain(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Explanation {
        let conn = Connection { src, dst, protocol, port };
        let egress = side(self.state, Direction::Egress, &conn, &mut self.plans);
        let ingress = side(self.state, Direction::Ingress, &conn, &mut self.plans);
        Explanation {
            src,
            dst,
            protocol,
            port,
            allowed: egress.allowed && ingress.allowed,
            egress,
            ingress,
        }
    }
}
