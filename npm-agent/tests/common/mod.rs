//! Random clusters, policies, events and connections for property tests, drawn from small
//! universes (few labels, addresses, ports) so that matches, collisions and edge cases
//! (shared addresses, named ports with different numbers, nested except blocks) are common.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::select;

use npm_agent::model::cluster_policy::{
    Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, PodSet, Tier,
};
use npm_agent::model::{
    CidrBlock, LabelSelector, Labels, NamedPort, Namespace, NamespaceScope, Node, ObjectKey,
    Operator, Peer, Pod, PodPhase, Policy, PortSpec, Protocol, Requirement, Rule,
};
use npm_agent::plan::{Change, Plan, PlanDiff};
use npm_agent::reference::End;
use npm_agent::state::{ClusterState, Event};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const NODES: [&str; 2] = ["n1", "n2"];
pub const PORTS: [u16; 5] = [53, 80, 81, 8080, 9999];

pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1 + i as u8))
}

pub fn pod_ip(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))
}

/// Addresses that are not pods: an outside host, one in the pod range, and node addresses.
pub fn external_ips() -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)), pod_ip(200), node_ip(0), node_ip(1)]
}

fn labels_strategy(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = Labels> {
    proptest::collection::vec((select(keys), any::<prop::sample::Index>()), 0..3).prop_map(|kv| {
        kv.into_iter()
            .map(|((k, vs), i)| (k.to_string(), vs[i.index(vs.len())].to_string()))
            .collect()
    })
}

const POD_LABELS: &[(&str, &[&str])] =
    &[("app", &["web", "db", "api"]), ("tier", &["front", "back"]), ("env", &["prod", "dev"])];
const NS_LABELS: &[(&str, &[&str])] = &[("env", &["prod", "dev"]), ("team", &["a", "b"])];

pub fn protocol() -> impl Strategy<Value = Protocol> {
    select(&Protocol::ALL[..])
}

fn named_ports() -> impl Strategy<Value = Vec<NamedPort>> {
    let candidates = vec![
        NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 80 },
        NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 },
        NamedPort { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
        NamedPort { name: "dns".into(), protocol: Protocol::Tcp, port: 53 },
        NamedPort { name: "alt".into(), protocol: Protocol::Sctp, port: 81 },
        NamedPort { name: "alt".into(), protocol: Protocol::Tcp, port: 81 },
    ];
    proptest::sample::subsequence(candidates, 0..4).prop_map(|mut v| {
        // A pod has each name once per protocol.
        let mut seen = BTreeSet::new();
        v.retain(|p| seen.insert((p.name.clone(), p.protocol)));
        v.sort();
        v
    })
}

/// A pod of the universe (key chosen by the caller).
pub fn pod(key: ObjectKey) -> impl Strategy<Value = Pod> {
    (
        labels_strategy(POD_LABELS),
        prop_oneof![8 => (1u8..10).prop_map(Some), 1 => Just(None)],
        0..NODES.len(),
        prop_oneof![10 => Just(PodPhase::Running), 1 => Just(PodPhase::Succeeded), 1 => Just(PodPhase::Pending)],
        prop_oneof![12 => Just(false), 1 => Just(true)],
        named_ports(),
        prop_oneof![6 => Just(false), 1 => Just(true)],
    )
        .prop_map(move |(labels, ip, node, phase, host_network, named_ports, terminating)| Pod {
            key: key.clone(),
            labels: labels.into(),
            ip: ip.map(pod_ip),
            ipv6: None,
            node: Some(NODES[node].to_string()),
            phase,
            host_network,
            terminating,
            named_ports: named_ports.into(),
        })
}

pub fn pod_key() -> impl Strategy<Value = ObjectKey> {
    (select(&NAMESPACES[..]), 0u8..5).prop_map(|(ns, i)| ObjectKey::new(ns, format!("p{i}")))
}

pub fn namespace(name: &'static str) -> impl Strategy<Value = Namespace> {
    labels_strategy(NS_LABELS).prop_map(move |l| Namespace::new(name, l))
}

fn requirement(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = Requirement> {
    (
        select(keys),
        select(&[Operator::In, Operator::NotIn, Operator::Exists, Operator::DoesNotExist][..]),
        any::<prop::sample::Index>(),
    )
        .prop_map(|((key, vals), operator, i)| {
            let values: BTreeSet<String> = match operator {
                Operator::Exists | Operator::DoesNotExist => BTreeSet::new(),
                _ => {
                    let n = 1 + i.index(vals.len());
                    vals.iter().take(n).map(|v| v.to_string()).collect()
                }
            };
            Requirement { key: key.to_string(), operator, values }
        })
}

pub fn selector(
    keys: &'static [(&'static str, &'static [&'static str])],
) -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        1 => Just(LabelSelector::everything()),
        3 => proptest::collection::vec(requirement(keys), 1..3).prop_map(LabelSelector::new),
    ]
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn block() -> impl Strategy<Value = CidrBlock> {
    // (cidr, candidate excepts strictly inside it)
    let shapes: Vec<(&str, Vec<&str>)> = vec![
        ("10.0.0.0/24", vec!["10.0.0.4/30", "10.0.0.0/29", "10.0.0.3/32"]),
        ("10.0.0.0/28", vec!["10.0.0.4/30", "10.0.0.8/29"]),
        ("10.0.0.4/30", vec!["10.0.0.5/32"]),
        ("0.0.0.0/0", vec!["10.0.0.0/24", "10.1.0.0/16", "10.0.0.6/31"]),
        ("10.1.0.0/16", vec!["10.1.0.2/32"]),
        ("10.0.0.7/32", vec![]),
        ("192.168.0.0/16", vec![]),
    ];
    (select(shapes), any::<u8>()).prop_map(|((cidr, excepts), mask)| {
        let chosen =
            excepts.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, e)| net(e));
        CidrBlock::new(net(cidr), chosen)
    })
}

fn peer(ns: &'static str) -> impl Strategy<Value = Peer> {
    prop_oneof![
        3 => selector(POD_LABELS).prop_map(move |pods| Peer::Pods { namespaces: NamespaceScope::Named(ns.to_string()), pods }),
        2 => selector(NS_LABELS).prop_map(|s| Peer::Pods { namespaces: NamespaceScope::Selector(s), pods: LabelSelector::everything() }),
        2 => (selector(NS_LABELS), selector(POD_LABELS)).prop_map(|(n, pods)| Peer::Pods { namespaces: NamespaceScope::Selector(n), pods }),
        1 => Just(Peer::Pods { namespaces: NamespaceScope::Selector(LabelSelector::from_labels([("kubernetes.io/metadata.name", "y")])), pods: LabelSelector::everything() }),
        2 => block().prop_map(Peer::Block),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        1 => protocol().prop_map(PortSpec::Protocol),
        3 => (protocol(), select(&PORTS[..])).prop_map(|(protocol, p)| PortSpec::Range { protocol, first: p, last: p }),
        1 => (protocol(), select(&PORTS[..]), 0u16..100).prop_map(|(protocol, p, w)| PortSpec::Range { protocol, first: p, last: p + w }),
        2 => (protocol(), select(&["http", "dns", "alt", "none"][..])).prop_map(|(protocol, n)| PortSpec::Named { protocol, name: n.to_string() }),
    ]
}

fn rule(ns: &'static str) -> impl Strategy<Value = Rule> {
    (proptest::collection::vec(peer(ns), 0..3), proptest::collection::vec(port_spec(), 0..3))
        .prop_map(|(mut peers, mut ports)| {
            peers.dedup();
            ports.dedup();
            Rule { peers, ports }
        })
}

fn rules(ns: &'static str) -> impl Strategy<Value = Option<Vec<Rule>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(vec![])),
        3 => proptest::collection::vec(rule(ns), 1..3).prop_map(Some),
    ]
}

pub fn policy_in(ns: &'static str, name: String) -> impl Strategy<Value = Policy> {
    (selector(POD_LABELS), rules(ns), rules(ns)).prop_map(move |(pod_selector, ingress, egress)| {
        Policy { key: ObjectKey::new(ns, name.clone()), pod_selector, ingress, egress }
    })
}

pub fn policy() -> impl Strategy<Value = Policy> {
    (select(&NAMESPACES[..]), 0u8..4).prop_flat_map(|(ns, i)| policy_in(ns, format!("np{i}")))
}

/// The nodes, each in its own zone (what `nodes` peers select).
pub fn nodes() -> Vec<Node> {
    (0..NODES.len()).map(|i| node(i, ["a", "b"][i])).collect()
}

/// Node `i` with a zone label.
pub fn node(i: usize, zone: &str) -> Node {
    Node {
        name: NODES[i].to_string(),
        addresses: vec![node_ip(i)],
        labels: labels(&[("zone", zone), ("kubernetes.io/hostname", NODES[i])]),
    }
}

const NODE_LABELS: &[(&str, &[&str])] = &[("zone", &["a", "b"])];

/// A whole cluster: namespaces (some may be missing: pods may reference unseen ones),
/// pods, policies and nodes.
pub fn cluster() -> impl Strategy<Value = ClusterState> {
    (
        namespace("x"),
        namespace("y"),
        namespace("z"),
        any::<bool>(),
        proptest::collection::vec(pod_key().prop_flat_map(pod), 0..9),
        proptest::collection::vec(policy(), 0..5),
    )
        .prop_map(|(x, y, z, drop_z, pods, policies)| {
            let mut s = ClusterState::default();
            for ns in [x, y].into_iter().chain((!drop_z).then_some(z)) {
                s.namespaces.insert(ns.name.clone(), ns);
            }
            for p in pods {
                s.pods.insert(p.key.clone(), p);
            }
            for p in policies {
                s.policies.insert(p.key.clone(), p);
            }
            for n in nodes() {
                s.nodes.insert(n.name.clone(), n);
            }
            s
        })
}

/// One event over the universe.
pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => pod_key().prop_flat_map(pod).prop_map(Event::UpsertPod),
        2 => pod_key().prop_map(Event::DeletePod),
        2 => select(&NAMESPACES[..]).prop_flat_map(namespace).prop_map(Event::UpsertNamespace),
        1 => select(&NAMESPACES[..]).prop_map(|n| Event::DeleteNamespace(n.to_string())),
        5 => policy().prop_map(Event::UpsertPolicy),
        2 => (select(&NAMESPACES[..]), 0u8..4).prop_map(|(ns, i)| Event::DeletePolicy(ObjectKey::new(ns, format!("np{i}")))),
        1 => select(&NODES[..]).prop_map(|n| Event::DeleteNode(n.to_string())),
        1 => (0..NODES.len()).prop_map(|i| Event::UpsertNode(nodes()[i].clone())),
    ]
}

/// Every address worth probing in a state: pod addresses and the externals (with their
/// IPv6 twins when any pod has an IPv6 address).
pub fn addresses(state: &ClusterState) -> Vec<IpAddr> {
    let mut v: BTreeSet<IpAddr> = state.pods.values().flat_map(|p| p.addresses()).collect();
    let dual = v.iter().any(IpAddr::is_ipv6);
    v.extend(external_ips());
    if dual {
        v.extend(external_ips().into_iter().map(twin));
    }
    v.into_iter().collect()
}

// ---- dual stack ----
//
// A dual-stack universe is the IPv4 one with IPv6 twins: `10.0.0.5` has `fd00::a00:5`,
// `10.0.0.0/24` has `fd00::a00:0/120` (`0.0.0.0/0`: `::/0`). Which pods get which families
// and which blocks become IPv6 is drawn per case, so a pod may own its IPv4 address while its
// IPv6 one is contested, and a policy may name blocks of both families.

/// The IPv6 twin of an IPv4 address (an IPv6 address is its own).
pub fn twin(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            ))
        }
        v6 => v6,
    }
}

fn twin_net(n: IpNet) -> IpNet {
    match n {
        IpNet::V4(v4) if v4.prefix_len() == 0 => "::/0".parse().unwrap(),
        IpNet::V4(v4) => match twin(IpAddr::V4(v4.network())) {
            IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, 96 + v4.prefix_len()).unwrap()),
            IpAddr::V4(_) => unreachable!(),
        },
        v6 => v6,
    }
}

fn twin_block(b: &CidrBlock) -> CidrBlock {
    CidrBlock::new(twin_net(b.net), b.except.iter().map(|e| twin_net(*e)))
}

/// `pod` with the families `choice` gives it: 0 IPv4 only, 1 and 2 both, 3 IPv6 only.
pub fn with_families(mut pod: Pod, choice: u8) -> Pod {
    let Some(IpAddr::V4(v4)) = pod.ip else { return pod };
    let v6 = match twin(IpAddr::V4(v4)) {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => unreachable!(),
    };
    match choice % 4 {
        0 => {}
        3 => pod.ip = Some(IpAddr::V6(v6)),
        _ => pod.ipv6 = Some(v6),
    }
    pod
}

/// `policy` with some of its blocks turned into their IPv6 twins (bit i of `mask`: the i-th
/// block).
pub fn with_v6_blocks(mut policy: Policy, mask: u64) -> Policy {
    let mut i = 0;
    for rules in [&mut policy.ingress, &mut policy.egress].into_iter().flatten() {
        for rule in rules.iter_mut() {
            for peer in rule.peers.iter_mut() {
                if let Peer::Block(b) = peer {
                    if mask & (1 << (i % 64)) != 0 {
                        *b = twin_block(b);
                    }
                    i += 1;
                }
            }
        }
    }
    policy
}

/// A node with the IPv6 twins of its addresses.
pub fn dual_node(mut node: Node) -> Node {
    let twins: Vec<IpAddr> = node.addresses.iter().map(|a| twin(*a)).collect();
    node.addresses.extend(twins);
    node.addresses.sort();
    node.addresses.dedup();
    node
}

/// `state` made dual stack by the draws in `choices`.
pub fn dual_stack(mut state: ClusterState, choices: &[u64]) -> ClusterState {
    let draw = |i: usize| choices.get(i % choices.len().max(1)).copied().unwrap_or(1);
    for (i, pod) in state.pods.values_mut().enumerate() {
        *pod = with_families(pod.clone(), draw(i) as u8);
    }
    for (i, policy) in state.policies.values_mut().enumerate() {
        *policy = with_v6_blocks(policy.clone(), draw(i + 7));
    }
    for node in state.nodes.values_mut() {
        *node = dual_node(node.clone());
    }
    state
}

/// A whole dual-stack cluster (see [`dual_stack`]).
pub fn dual_stack_cluster() -> impl Strategy<Value = ClusterState> {
    (cluster(), proptest::collection::vec(any::<u64>(), 16))
        .prop_map(|(state, choices)| dual_stack(state, &choices))
}

/// One event of the dual-stack universe.
pub fn dual_stack_event() -> impl Strategy<Value = Event> {
    (event(), any::<u64>()).prop_map(|(e, draw)| match e {
        Event::UpsertPod(p) => Event::UpsertPod(with_families(p, draw as u8)),
        Event::UpsertPolicy(p) => Event::UpsertPolicy(with_v6_blocks(p, draw)),
        Event::UpsertNode(n) => Event::UpsertNode(dual_node(n)),
        e => e,
    })
}

/// Every end a connection can have: each address with the node of each endpoint pod that
/// claims it (a contested address is sent from, and delivered to, each of them), or with no
/// node for addresses that are no endpoint's.
pub fn ends(state: &ClusterState) -> Vec<End> {
    let mut v: BTreeSet<End> = BTreeSet::new();
    for ip in addresses(state) {
        let nodes: BTreeSet<Option<String>> = state
            .pods
            .values()
            .filter(|p| p.is_endpoint() && p.has_address(ip))
            .map(|p| p.node.clone())
            .collect();
        if nodes.is_empty() {
            v.insert(End { ip, node: None });
        }
        v.extend(nodes.into_iter().map(|node| End { ip, node }));
    }
    v.into_iter().collect()
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()
}

/// The events that build `state` from nothing (namespaces and nodes first, pods last).
pub fn initial_events(state: &ClusterState) -> Vec<Event> {
    state
        .namespaces
        .values()
        .cloned()
        .map(Event::UpsertNamespace)
        .chain(state.nodes.values().cloned().map(Event::UpsertNode))
        .chain(state.policies.values().cloned().map(Event::UpsertPolicy))
        .chain(state.cluster_policies.values().cloned().map(Event::UpsertClusterPolicy))
        .chain(state.pods.values().cloned().map(Event::UpsertPod))
        .collect()
}

/// Addresses that `diff` moves from one identity to another (`old` is the plan before it):
/// matched by the old or the new identity while the diff applies, as `PlanDiff` allows.
pub fn identity_switches(old: &Plan, diff: &PlanDiff) -> std::collections::HashSet<IpAddr> {
    diff.changes
        .iter()
        .filter_map(|c| match c {
            Change::SetIdentity { ip, .. } if old.identities.contains_key(ip) => Some(*ip),
            _ => None,
        })
        .collect()
}

/// Endpoint addresses that `diff` passes to another pod: such an endpoint may admit more
/// than both plans while the diff applies (see `PlanDiff`).
pub fn retargeted_endpoints(diff: &PlanDiff) -> std::collections::HashSet<IpAddr> {
    diff.changes
        .iter()
        .filter_map(|c| match c {
            Change::RetargetEndpoint { ip, .. } => Some(*ip),
            _ => None,
        })
        .collect()
}

/// Whether `plan` admits the connection at endpoint `ep` in direction `d`, as a dataplane
/// decides it (node addresses always pass; an address that is no endpoint is not enforced).
pub fn dataplane_admits(
    plan: &Plan,
    ep: IpAddr,
    d: npm_agent::model::Direction,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    match plan.endpoints.get(&ep) {
        None => true,
        Some(e) => {
            plan.node_ips.contains(&peer)
                || plan.direction(e, d).admits(
                    &plan.sets,
                    peer,
                    plan.identities.get(&peer).copied(),
                    protocol,
                    port,
                )
        }
    }
}

// ---- ClusterNetworkPolicies ----

fn pod_set() -> impl Strategy<Value = PodSet> {
    (selector(NS_LABELS), prop::option::of(selector(POD_LABELS)))
        .prop_map(|(namespaces, pods)| PodSet { namespaces, pods })
}

fn cluster_peer(egress: bool) -> BoxedStrategy<ClusterPeer> {
    let pods = pod_set().prop_map(ClusterPeer::Pods);
    if !egress {
        return pods.boxed();
    }
    let nets = ["10.0.0.0/24", "10.0.0.4/30", "0.0.0.0/0", "10.0.0.7/32", "192.168.0.0/16"];
    prop_oneof![
        3 => pods,
        2 => proptest::sample::subsequence(nets.to_vec(), 1..3)
            .prop_map(|v| ClusterPeer::Networks(v.into_iter().map(net).collect())),
        1 => selector(NODE_LABELS).prop_map(ClusterPeer::Nodes),
    ]
    .boxed()
}

fn cluster_port() -> impl Strategy<Value = ClusterPort> {
    prop_oneof![
        3 => (protocol(), select(&PORTS[..])).prop_map(|(protocol, p)| ClusterPort::Range { protocol, first: p, last: p }),
        1 => (protocol(), select(&PORTS[..]), 0u16..100).prop_map(|(protocol, p, w)| ClusterPort::Range { protocol, first: p, last: p + w }),
        1 => protocol().prop_map(ClusterPort::Protocol),
        2 => select(&["http", "dns", "alt", "none"][..]).prop_map(|n| ClusterPort::Named(n.to_string())),
    ]
}

fn cluster_rule(egress: bool) -> impl Strategy<Value = ClusterRule> {
    (
        select(&[Action::Accept, Action::Deny, Action::Pass][..]),
        proptest::collection::vec(cluster_peer(egress), 1..3),
        prop::option::of(proptest::collection::vec(cluster_port(), 1..3)),
    )
        .prop_map(|(action, peers, ports)| ClusterRule { name: None, action, peers, ports })
}

/// A ClusterNetworkPolicy `cnp0`..`cnp3` of either tier; few priorities, so that ties
/// (ordered by name) happen.
pub fn cluster_policy() -> impl Strategy<Value = ClusterPolicy> {
    (
        0u8..4,
        select(&[Tier::Admin, Tier::Baseline][..]),
        select(&[0u32, 5, 10][..]),
        pod_set(),
        proptest::collection::vec(cluster_rule(false), 0..3),
        proptest::collection::vec(cluster_rule(true), 0..3),
    )
        .prop_map(|(i, tier, priority, subject, ingress, egress)| ClusterPolicy {
            name: format!("cnp{i}"),
            tier,
            priority,
            subject,
            ingress,
            egress,
        })
}

/// A cluster with ClusterNetworkPolicies too.
pub fn tiered_cluster() -> impl Strategy<Value = ClusterState> {
    (cluster(), proptest::collection::vec(cluster_policy(), 0..4)).prop_map(|(mut s, cnps)| {
        for p in cnps {
            s.cluster_policies.insert(p.name.clone(), p);
        }
        s
    })
}

/// One event over the universe, ClusterNetworkPolicies included.
pub fn tiered_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => event(),
        2 => cluster_policy().prop_map(Event::UpsertClusterPolicy),
        1 => (0u8..4).prop_map(|i| Event::DeleteClusterPolicy(format!("cnp{i}"))),
        // (Nodes moving between zones: `nodes` peers follow.)
        1 => (0..NODES.len(), select(&["a", "b", "c"][..])).prop_map(|(i, z)| Event::UpsertNode(node(i, z))),
    ]
}
