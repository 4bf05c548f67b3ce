//! The HNS dataplane against the specification: random clusters and events (IPv4, and dual
//! stack: pods with one or both families, blocks of both), each node's engine feeding an
//! `HnsDataplane` over the HCN host model (endpoints created and removed as the CNI would:
//! one per pod, holding its addresses of both families), and what the model holds afterwards
//! evaluated as HNS evaluates ACLs, for packets of either family.
//! Every connection must be decided as the reference evaluator decides it, except where the
//! translation reports an entry it cannot express (SCTP, wide port ranges), where HNS may
//! only refuse more. A reconcile of the same plan over the model (a restarted agent) then
//! changes nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::hns::{HnsDataplane, HostHcn};
use npm_agent::model::{Direction, ObjectKey, Protocol};
use npm_agent::reference::{self, End};
use npm_agent::state::{ClusterState, Event};

struct Node {
    name: String,
    engine: Engine,
    dp: HnsDataplane<HostHcn>,
    /// The model's endpoints: (pod, its addresses) → endpoint ID.
    hns: BTreeMap<(ObjectKey, Vec<IpAddr>), String>,
}

impl Node {
    fn new(name: &str) -> Self {
        let mut dp = HnsDataplane::new(HostHcn::new());
        dp.reconcile(&npm_agent::plan::Plan::default()).expect("an empty reconcile");
        let engine = Engine::new(Scope::Node(name.into())).with_cluster_policies();
        Self { name: name.into(), engine, dp, hns: BTreeMap::new() }
    }

    /// The HNS endpoints of the node's endpoint pods in `state`, as the CNI gives them: one
    /// per pod with its addresses (both families), an address to one endpoint only (live
    /// pods first, then by key).
    fn endpoints(&self, state: &ClusterState) -> BTreeSet<(ObjectKey, Vec<IpAddr>)> {
        let mut pods: Vec<_> = state
            .pods
            .values()
            .filter(|p| p.is_endpoint() && p.node.as_deref() == Some(self.name.as_str()))
            .collect();
        pods.sort_by_key(|p| (p.terminating, p.key.clone()));
        let mut taken = BTreeSet::new();
        let mut v = BTreeSet::new();
        for p in pods {
            let ips: Vec<IpAddr> = p.addresses().filter(|ip| taken.insert(*ip)).collect();
            if !ips.is_empty() {
                v.insert((p.key.clone(), ips));
            }
        }
        v
    }

    /// One event: endpoints of new pods exist before the agent hears of them (the CNI made
    /// them; an endpoint whose addresses a new one takes is gone before), endpoints of
    /// deleted pods go after.
    fn handle(
        &mut self,
        e: &Event,
        _before: &ClusterState,
        after: &ClusterState,
    ) -> Result<(), TestCaseError> {
        let want = self.endpoints(after);
        let new: Vec<_> = want.iter().filter(|k| !self.hns.contains_key(*k)).cloned().collect();
        let new_ips: BTreeSet<IpAddr> = new.iter().flat_map(|(_, ips)| ips.clone()).collect();
        let replaced: Vec<_> = self
            .hns
            .keys()
            .filter(|k| !want.contains(*k) && k.1.iter().any(|ip| new_ips.contains(ip)))
            .cloned()
            .collect();
        for k in replaced {
            let id = self.hns.remove(&k).expect("listed");
            self.dp.hcn_mut().remove_endpoint_id(&id);
        }
        for k in new {
            let id = self.dp.hcn_mut().add_endpoint_with(&k.1);
            self.hns.insert(k, id);
        }
        let diff = self.engine.handle(e.clone());
        self.dp
            .apply(&diff)
            .map_err(|err| TestCaseError::fail(format!("{}: apply: {err}", self.name)))?;
        let gone: Vec<_> = self.hns.keys().filter(|k| !want.contains(*k)).cloned().collect();
        for k in gone {
            let id = self.hns.remove(&k).expect("listed");
            self.dp.hcn_mut().remove_endpoint_id(&id);
        }
        self.dp.tick().map_err(|err| TestCaseError::fail(format!("{}: tick: {err}", self.name)))?;
        Ok(())
    }

    /// Whether HNS on this node lets `peer` reach (In) or be reached from (Out) `ip`.
    fn allows(
        &self,
        ip: IpAddr,
        d: Direction,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        self.dp.hcn().allows(ip, d, peer, protocol, port)
    }

    /// Whether the translation left out something of this endpoint direction.
    fn left_out(&self, ip: IpAddr, d: Direction) -> bool {
        let dir = if d == Direction::Ingress { "In" } else { "Out" };
        self.dp.requests().unsupported.iter().any(|u| {
            u.endpoint.split(' ').next() == Some(ip.to_string().as_str())
                && (u.direction == dir || u.direction == "In/Out")
        })
    }
}

fn claimed_once(state: &ClusterState, ip: IpAddr) -> bool {
    state.pods.values().filter(|p| p.is_endpoint() && p.ip == Some(ip)).count() <= 1
}

fn check(state: &ClusterState, nodes: &HashMap<String, Node>) -> Result<(), TestCaseError> {
    let ends = ends(state);
    for src in &ends {
        // (A connection has one family: an IPv4 end never talks to an IPv6 one.)
        for dst in ends.iter().filter(|d| d.ip.is_ipv4() == src.ip.is_ipv4()) {
            // Contested addresses are quarantined by the compiler and tested with the
            // dataplanes that see interfaces; a spoofed source is the network's to drop.
            if src.ip == dst.ip
                || !claimed_once(state, src.ip)
                || !claimed_once(state, dst.ip)
                || reference::arrives_spoofed(state, src, dst)
            {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let want = reference::allowed_between(state, src, dst, protocol, port);
                    let side = |end: &End, d: Direction, peer: &End| match &end.node {
                        Some(n) => nodes[n].allows(end.ip, d, peer.ip, protocol, port),
                        None => true,
                    };
                    let got =
                        side(src, Direction::Egress, dst) && side(dst, Direction::Ingress, src);
                    let left_out = |end: &End, d| {
                        end.node.as_ref().is_some_and(|n| nodes[n].left_out(end.ip, d))
                    };
                    if left_out(src, Direction::Egress) || left_out(dst, Direction::Ingress) {
                        prop_assert!(
                            !got || want,
                            "{:?} {:?} -> {:?}:{} admitted by HNS, refused by the specification",
                            protocol,
                            src,
                            dst,
                            port
                        );
                    } else {
                        prop_assert_eq!(
                            got,
                            want,
                            "{:?} {:?} -> {:?}:{}",
                            protocol,
                            src,
                            dst,
                            port
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Every node's HCN after the cluster's initial sync and `events` decides every connection
/// as the specification does; HCN holds exactly the translation, and a restarted agent
/// writes nothing.
fn decide_like_the_specification(
    state: &ClusterState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let mut nodes: HashMap<String, Node> =
        NODES.iter().map(|n| (n.to_string(), Node::new(n))).collect();
    let mut current = ClusterState::default();
    for e in initial_events(state).iter().chain(events.iter()) {
        let before = current.clone();
        current.apply(e);
        for n in nodes.values_mut() {
            n.handle(e, &before, &current)?;
        }
    }
    check(&current, &nodes)?;
    // HCN holds exactly the translation of the plan.
    for n in nodes.values() {
        let want = n.dp.requests();
        let sets: Vec<serde_json::Value> =
            want.network.policies.iter().map(|p| serde_json::to_value(p).unwrap()).collect();
        let mut sorted = sets.clone();
        sorted.sort_by_key(|v| v["Settings"]["Id"].as_str().unwrap_or_default().to_string());
        prop_assert_eq!(n.dp.hcn().set_policies(), sorted);
        for e in &want.endpoints {
            let acls: Vec<serde_json::Value> =
                n.dp.hcn()
                    .endpoint_policies(e.ip)
                    .into_iter()
                    .filter(|p| p["Type"] == "ACL")
                    .collect();
            let want_acls: Vec<serde_json::Value> =
                e.request.policies.iter().map(|p| serde_json::to_value(p).unwrap()).collect();
            prop_assert_eq!(acls, want_acls, "ACLs of {}", e.ip);
        }
    }
    // A restarted agent over the same HCN (its reconcile reads what HCN holds) writes
    // nothing when the plan is the same.
    for n in nodes.values() {
        let mut next = HnsDataplane::new(n.dp.hcn().clone());
        let calls = next.hcn().modify_calls;
        next.reconcile(&n.engine.plan()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(next.hcn().modify_calls, calls, "a reconcile of the same plan wrote");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn hns_decides_like_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }
}

proptest! {
    // (More cases: a Pass meeting an overlapping rule of the next tier is a rare draw.)
    #![proptest_config(ProptestConfig { cases: 800, ..ProptestConfig::default() })]

    /// With ClusterNetworkPolicies: their tiers as ACL priorities.
    #[test]
    fn hns_decides_like_the_specification_tiers(state in tiered_cluster(), events in proptest::collection::vec(tiered_event(), 0..6)) {
        decide_like_the_specification(&state, &events)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Dual stack: pods with one or both families, IPv6 blocks, nodes with both.
    #[test]
    fn hns_decides_like_the_specification_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Dual stack with ClusterNetworkPolicies.
    #[test]
    fn hns_decides_like_the_specification_dual_stack_tiers(
        state in tiered_cluster(),
        choices in proptest::collection::vec(any::<u64>(), 16),
        events in proptest::collection::vec((tiered_event(), any::<u64>()), 0..6),
    ) {
        let state = dual_stack(state, &choices);
        let events: Vec<Event> = events.into_iter().map(|(e, draw)| match e {
            Event::UpsertPod(p) => Event::UpsertPod(with_families(p, draw as u8)),
            Event::UpsertPolicy(p) => Event::UpsertPolicy(with_v6_blocks(p, draw)),
            Event::UpsertNode(n) => Event::UpsertNode(dual_node(n)),
            e => e,
        }).collect();
        decide_like_the_specification(&state, &events)?;
    }
}

/// The model refuses a set removed while an ACL names it, so the dataplane's order (sets
/// before the ACLs naming them, removed after) is what lets a policy change land at all.
#[test]
fn a_policy_replaced_by_another_lands_in_one_apply() {
    use npm_agent::model::{LabelSelector, NamespaceScope, ObjectKey, Peer, Pod, Policy, Rule};
    let pod = |name: &str, ip: u8, app: &str| {
        Pod::running(ObjectKey::new("x", name), labels(&[("app", app)]), pod_ip(ip), "n1")
    };
    let policy = |app: &str| Policy {
        key: ObjectKey::new("x", "p"),
        pod_selector: LabelSelector::from_labels([("app", "db")]),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: NamespaceScope::Named("x".into()),
                pods: LabelSelector::from_labels([("app", app)]),
            }],
            ports: vec![],
        }]),
        egress: None,
    };
    let mut state = ClusterState::default();
    let mut node = Node::new("n1");
    let events = vec![
        Event::UpsertNode(nodes()[0].clone()),
        Event::UpsertPod(pod("db", 1, "db")),
        Event::UpsertPod(pod("web", 2, "web")),
        Event::UpsertPod(pod("api", 3, "api")),
        Event::UpsertPolicy(policy("web")),
        Event::UpsertPolicy(policy("api")),
    ];
    for e in &events {
        let before = state.clone();
        state.apply(e);
        node.handle(e, &before, &state).expect("applies");
    }
    let db = pod_ip(1);
    let ip = pod_ip;
    assert!(node.dp.hcn().allows(db, Direction::Ingress, ip(3), Protocol::Tcp, 80), "api now");
    assert!(!node.dp.hcn().allows(db, Direction::Ingress, ip(2), Protocol::Tcp, 80), "web no more");
}

/// A pod joining a peer's identity is added to the identity's set in place (`Update`), and
/// HNS admits it at once.
#[test]
fn a_pod_joining_a_peer_set_is_added_in_place() {
    use npm_agent::model::{LabelSelector, NamespaceScope, ObjectKey, Peer, Pod, Policy, Rule};
    let pod = |name: &str, ip: u8, app: &str| {
        Pod::running(ObjectKey::new("x", name), labels(&[("app", app)]), pod_ip(ip), "n1")
    };
    let policy = Policy {
        key: ObjectKey::new("x", "p"),
        pod_selector: LabelSelector::from_labels([("app", "db")]),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: NamespaceScope::Named("x".into()),
                pods: LabelSelector::from_labels([("app", "web")]),
            }],
            ports: vec![],
        }]),
        egress: None,
    };
    let mut state = ClusterState::default();
    let mut node = Node::new("n1");
    let web2 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
    let events = [
        Event::UpsertNode(nodes()[0].clone()),
        Event::UpsertPolicy(policy),
        Event::UpsertPod(pod("db", 1, "db")),
        Event::UpsertPod(pod("web", 2, "web")),
    ];
    for e in &events {
        let before = state.clone();
        state.apply(e);
        node.handle(e, &before, &state).expect("applies");
    }
    let sets = node.dp.hcn().set_policies();
    assert!(!node.dp.hcn().allows(pod_ip(1), Direction::Ingress, web2, Protocol::Tcp, 80));
    let e = Event::UpsertPod(pod("web2", 3, "web"));
    let before = state.clone();
    state.apply(&e);
    node.handle(&e, &before, &state).expect("applies");
    let after = node.dp.hcn().set_policies();
    assert_eq!(after.len(), sets.len(), "the same sets: {after:?}");
    assert!(after.iter().any(|s| s["Settings"]["Values"] == "10.0.0.2,10.0.0.3"), "{after:?}");
    assert!(node.dp.hcn().allows(pod_ip(1), Direction::Ingress, web2, Protocol::Tcp, 80));
}
