//! The compiler: NetworkPolicy semantics, once, for every dataplane.
//!
//! [`full`] compiles a whole [`ClusterState`](crate::state::ClusterState) into a
//! [`Plan`](crate::plan::Plan) in one pass; [`Engine`] keeps a plan up to date event by event
//! and returns the smallest diff for each. Both are built from the helpers here, which say
//! how a rule expands into allow entries; tests check that the two agree.

pub mod engine;
pub mod explain;
pub mod full;
pub mod layout;

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::model::cluster_policy::{
    ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, PodSet, Tier,
};
use crate::model::{
    CidrBlock, Direction, LabelSelector, Labels, NamedPort, NamespaceScope, Node, ObjectKey, Peer,
    Pod, Policy, PortSpec, Protocol, Rule, find_named_port,
};
use crate::plan::layout::TierRank;
use crate::plan::{Conflict, PeerSelector, PortMatch, Precedence, Verdict};
use crate::state::Claim;

pub use engine::{DORMANT_SELECTORS, Engine, ProfileOrigin};
pub use full::compile;

/// Which pods are local endpoints of the plan being built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Every pod (the simulator's single virtual node).
    Cluster,
    /// The pods scheduled on this node (the agent).
    Node(String),
}

impl Scope {
    pub fn is_local(&self, pod: &Pod) -> bool {
        match self {
            Scope::Cluster => true,
            Scope::Node(n) => pod.node.as_deref() == Some(n.as_str()),
        }
    }

    pub fn node(&self) -> Option<&str> {
        match self {
            Scope::Cluster => None,
            Scope::Node(n) => Some(n),
        }
    }
}

/// A rule's port entry, or "every port" for a rule without ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortSel {
    Any,
    Spec(PortSpec),
}

impl PortSel {
    fn is_named(&self) -> bool {
        matches!(self, PortSel::Spec(PortSpec::Named { .. }))
    }

    /// Whether the port resolves against the peer pod (an egress named port), so that a
    /// selector's entries for it are per identity rather than one for the whole peer set.
    pub fn per_peer(&self, direction: Direction) -> bool {
        direction == Direction::Egress && self.is_named()
    }

    /// The concrete ports, resolving a named port against `named` (the ports of the pod the
    /// name refers to). `None` when the name does not exist there with that protocol.
    pub fn resolve(&self, named: &[NamedPort]) -> Option<PortMatch> {
        match self {
            PortSel::Any => Some(PortMatch::Any),
            PortSel::Spec(PortSpec::Protocol(p)) => Some(PortMatch::Protocol(*p)),
            PortSel::Spec(PortSpec::Range { protocol, first, last }) => {
                Some(PortMatch::Range { protocol: *protocol, first: *first, last: *last })
            }
            PortSel::Spec(PortSpec::Named { protocol, name }) => {
                find_named_port(named, name, *protocol).map(|port| single(*protocol, port))
            }
        }
    }
}

fn single(protocol: Protocol, port: u16) -> PortMatch {
    PortMatch::Range { protocol, first: port, last: port }
}

/// Who a term admits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TermPeer {
    /// Any address.
    Any,
    /// The pods a selector matches, by identity.
    Pods(PeerSelector),
    /// Any address in the block.
    Block(CidrBlock),
    /// The pods whose address is in the block, each by its own address: egress named ports
    /// to an ipBlock, which resolve against each destination pod.
    PodsInBlock(CidrBlock),
}

/// A rule, split so that each part expands uniformly: the peers of one term resolve named
/// ports the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Term {
    pub peer: TermPeer,
    pub ports: Vec<PortSel>,
    /// What its entries do (a NetworkPolicy's admit).
    pub verdict: Verdict,
}

/// Whom a policy selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A NetworkPolicy's: the pods of its namespace that its podSelector matches.
    Namespaced { namespace: String, pods: LabelSelector },
    /// A ClusterNetworkPolicy's: pods of any namespace.
    Cluster(PodSet),
}

impl Subject {
    /// Whether it selects `pod`, whose namespace has labels `namespace_labels`.
    pub fn selects(&self, pod: &Pod, namespace_labels: &Labels) -> bool {
        match self {
            Subject::Namespaced { namespace, pods } => {
                *namespace == pod.key.namespace && pods.matches(&pod.labels)
            }
            Subject::Cluster(set) => set.selects(pod, namespace_labels),
        }
    }
}

/// A policy of either kind as the compiler expands it: whom it selects, and, for each
/// direction it covers, its rules as terms carrying their verdicts.
#[derive(Clone, Debug)]
pub struct PolicyTerms {
    /// `ns/name` for a NetworkPolicy, the bare name (empty namespace) for a
    /// ClusterNetworkPolicy.
    pub key: ObjectKey,
    pub subject: Subject,
    /// Whether what it selects is isolated (NetworkPolicies: what no rule admits is refused).
    pub isolates: bool,
    /// A ClusterNetworkPolicy's tier and priority (`None`: a NetworkPolicy).
    pub rank: Option<TierRank>,
    /// The terms of each direction it covers (ingress, egress); `None` for a direction it
    /// does not (a NetworkPolicy's policyTypes, a ClusterNetworkPolicy without rules there).
    pub terms: [Option<Vec<Term>>; 2],
}

impl PolicyTerms {
    pub fn of_network_policy(p: &Policy) -> Self {
        Self {
            key: p.key.clone(),
            subject: Subject::Namespaced {
                namespace: p.key.namespace.clone(),
                pods: p.pod_selector.clone(),
            },
            isolates: true,
            rank: None,
            terms: Direction::BOTH.map(|d| {
                p.rules(d).map(|rules| {
                    rules.iter().flat_map(|r| rule_terms(r, d, &Verdict::Allow)).collect()
                })
            }),
        }
    }

    /// The tiers, priorities and rule order resolve here, into each term's verdict; a `nodes`
    /// peer, into the addresses of the `nodes` it selects now.
    pub fn of_cluster_policy(p: &ClusterPolicy, nodes: &BTreeMap<String, Node>) -> Self {
        let name: std::sync::Arc<str> = p.name.as_str().into();
        Self {
            key: cluster_policy_key(&p.name),
            subject: Subject::Cluster(p.subject.clone()),
            isolates: false,
            rank: Some(TierRank { tier: p.tier, priority: p.priority }),
            terms: Direction::BOTH.map(|d| {
                let rules = p.rules(d);
                (!rules.is_empty()).then(|| {
                    rules
                        .iter()
                        .enumerate()
                        .flat_map(|(i, r)| {
                            let precedence = Precedence {
                                priority: p.priority,
                                policy: name.clone(),
                                rule: i as u32,
                                action: r.action,
                            };
                            let verdict = match p.tier {
                                Tier::Admin => Verdict::Admin(precedence),
                                Tier::Baseline => Verdict::Baseline(precedence),
                            };
                            // (A rule whose peers are only nodes that do not exist matches
                            // nothing: not "any peer", as a rule without peers would.)
                            cluster_rule(r, nodes)
                                .map(|rule| rule_terms(&rule, d, &verdict))
                                .unwrap_or_default()
                        })
                        .collect()
                })
            }),
        }
    }

    pub fn covers(&self, d: Direction) -> bool {
        self.terms[d as usize].is_some()
    }

    pub fn terms(&self, d: Direction) -> &[Term] {
        self.terms[d as usize].as_deref().unwrap_or_default()
    }
}

/// How a ClusterNetworkPolicy is named where policies of both kinds are listed.
pub fn cluster_policy_key(name: &str) -> ObjectKey {
    ObjectKey { namespace: String::new(), name: name.to_string() }
}

/// Whether a ClusterNetworkPolicy's terms depend on the nodes (a `nodes` peer).
pub fn names_nodes(p: &ClusterPolicy) -> bool {
    Direction::BOTH
        .iter()
        .flat_map(|d| p.rules(*d))
        .any(|r| r.peers.iter().any(|peer| matches!(peer, ClusterPeer::Nodes(_))))
}

/// A ClusterNetworkPolicy rule's peers and ports in a NetworkPolicy rule's terms: `pods`
/// and `namespaces` as selector peers, `networks` as blocks, `nodes` as a block of each
/// address of each node it selects, a named port for each protocol it may be declared with.
/// `None`: its peers are nodes that select no address (it matches nothing).
fn cluster_rule(rule: &ClusterRule, nodes: &BTreeMap<String, Node>) -> Option<Rule> {
    let peers: Vec<Peer> = rule
        .peers
        .iter()
        .flat_map(|p| match p {
            ClusterPeer::Pods(set) => vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(set.namespaces.clone()),
                pods: set.pods.clone().unwrap_or_else(LabelSelector::everything),
            }],
            ClusterPeer::Networks(nets) => {
                nets.iter().map(|n| Peer::Block(CidrBlock::new(*n, []))).collect()
            }
            ClusterPeer::Nodes(sel) => nodes
                .values()
                .filter(|n| sel.matches(&n.labels))
                .flat_map(|n| n.addresses.iter().map(|ip| Peer::Block(host_block(*ip))))
                .collect(),
        })
        .collect();
    let ports = rule
        .ports
        .iter()
        .flatten()
        .flat_map(|p| match p {
            ClusterPort::Range { protocol, first, last } => {
                vec![PortSpec::Range { protocol: *protocol, first: *first, last: *last }]
            }
            ClusterPort::Protocol(p) => vec![PortSpec::Protocol(*p)],
            ClusterPort::Named(name) => Protocol::ALL
                .iter()
                .map(|p| PortSpec::Named { protocol: *p, name: name.clone() })
                .collect(),
        })
        .collect();
    (!peers.is_empty()).then_some(Rule { peers, ports })
}

/// Splits a rule into terms whose entries do `verdict`.
///
/// Ingress named ports resolve against the endpoint itself, so every peer keeps every port.
/// Egress named ports resolve against the destination pod: a peer that is not a selector
/// (every address, an ipBlock) only admits pods for its named ports.
pub fn rule_terms(rule: &Rule, direction: Direction, verdict: &Verdict) -> Vec<Term> {
    let ports: Vec<PortSel> = if rule.ports.is_empty() {
        vec![PortSel::Any]
    } else {
        rule.ports.iter().cloned().map(PortSel::Spec).collect()
    };
    let (named, numeric): (Vec<PortSel>, Vec<PortSel>) = match direction {
        Direction::Ingress => (Vec::new(), ports.clone()),
        Direction::Egress => ports.iter().cloned().partition(PortSel::is_named),
    };
    let mut terms = Vec::new();
    let mut push = |peer: TermPeer, ports: &[PortSel]| {
        if !ports.is_empty() {
            terms.push(Term { peer, ports: ports.to_vec(), verdict: verdict.clone() });
        }
    };
    let any_peer = [None];
    let peers: Vec<Option<&Peer>> = if rule.peers.is_empty() {
        any_peer.to_vec()
    } else {
        rule.peers.iter().map(Some).collect()
    };
    for peer in peers {
        match peer {
            Some(Peer::Pods { namespaces, pods }) => push(
                TermPeer::Pods(PeerSelector { namespaces: namespaces.clone(), pods: pods.clone() }),
                &ports,
            ),
            None if direction == Direction::Ingress => push(TermPeer::Any, &ports),
            None => {
                push(TermPeer::Any, &numeric);
                push(TermPeer::Pods(PeerSelector::everything()), &named);
            }
            Some(Peer::Block(b)) => {
                push(TermPeer::Block(b.clone()), &numeric);
                push(TermPeer::PodsInBlock(b.clone()), &named);
            }
        }
    }
    terms
}

/// The named ports a term's ports resolve against: the endpoint's for ingress, the peer
/// pod's for egress (none for an address that is not a pod).
pub fn resolution_ports<'a>(
    direction: Direction,
    endpoint: &'a [NamedPort],
    peer: &'a [NamedPort],
) -> &'a [NamedPort] {
    match direction {
        Direction::Ingress => endpoint,
        Direction::Egress => peer,
    }
}

/// What the claims on an address (`claimants`, in key order) report: a conflict when nothing
/// tells the claimants apart cluster-wide (two live pods, or only terminating ones), or when
/// this node had to quarantine the address. An address merely reused by a new pod before its
/// terminating pod is gone is not one.
pub fn conflict_of(claimants: &[&Pod], quarantined: bool) -> Option<Conflict> {
    let global = Claim::resolve(claimants.to_vec(), |_| false);
    (quarantined || matches!(global, Claim::Contested { .. })).then(|| Conflict {
        claimants: claimants.iter().map(|p| p.key.clone()).collect(),
        quarantined,
    })
}

/// The /32 (or /128) block of one address.
pub fn host_block(ip: IpAddr) -> CidrBlock {
    CidrBlock::new(ipnet::IpNet::from(ip), [])
}
