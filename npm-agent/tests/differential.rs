//! The compiler against the reference evaluator: on random clusters, the plans (one per
//! node, as the agents would hold them) must allow exactly the connections the
//! specification allows.

mod common;

use std::collections::HashMap;

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope, compile};
use npm_agent::model::Protocol;
use npm_agent::plan::{Connection, Plan, connection_allowed};
use npm_agent::reference::{self, End};
use npm_agent::state::{ClusterState, Event};

fn check_against_reference(
    state: &ClusterState,
    plans: &HashMap<String, Plan>,
) -> Result<(), TestCaseError> {
    let empty = Plan::default();
    // The plan of the node an end's pod runs on; an end on no node is enforced by nobody.
    let plan_of = |end: &End| end.node.as_ref().map_or(&empty, |n| &plans[n]);
    let ends = ends(state);
    for src in &ends {
        // (A connection has one family: an IPv4 end never talks to an IPv6 one.)
        for dst in ends.iter().filter(|d| d.ip.is_ipv4() == src.ip.is_ipv4()) {
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let conn = Connection { src: src.ip, dst: dst.ip, protocol, port };
                    let want = reference::allowed_between(state, src, dst, protocol, port);
                    let got = connection_allowed(plan_of(src), plan_of(dst), &conn);
                    prop_assert_eq!(
                        got,
                        want,
                        "{:?} -> {:?}: {:?}\nstate: {:#?}",
                        src,
                        dst,
                        conn,
                        state
                    );
                }
            }
        }
    }
    Ok(())
}

/// The plan `engine` builds from `state`'s objects as events.
fn engine_plan(mut engine: Engine, state: &ClusterState) -> Plan {
    let mut plan = Plan::default();
    for e in initial_events(state) {
        plan.apply(&engine.handle(e)).expect("consistent diff");
    }
    plan
}

fn per_node(compile_one: impl Fn(&Scope) -> Plan) -> HashMap<String, Plan> {
    NODES.iter().map(|n| (n.to_string(), compile_one(&Scope::Node(n.to_string())))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The one-pass compiler, one plan per node, against the specification.
    #[test]
    fn full_compile_agrees_with_reference(state in cluster()) {
        let plans = per_node(|scope| compile(&state, scope));
        check_against_reference(&state, &plans)?;
    }

    /// The incremental engine fed the state as events, against the specification.
    #[test]
    fn engine_agrees_with_reference(state in cluster()) {
        let plans = per_node(|scope| {
            let mut engine = Engine::new(scope.clone());
            let mut plan = Plan::default();
            let events = state.namespaces.values().cloned().map(Event::UpsertNamespace)
                .chain(state.policies.values().cloned().map(Event::UpsertPolicy))
                .chain(state.pods.values().cloned().map(Event::UpsertPod))
                .chain(state.nodes.values().cloned().map(Event::UpsertNode));
            for e in events {
                plan.apply(&engine.handle(e)).expect("consistent diff");
            }
            plan
        });
        check_against_reference(&state, &plans)?;
    }

    /// Dual stack: pods with IPv4, IPv6 or both addresses (each claimed on its own), blocks
    /// of both families; the one-pass compiler against the specification, per family.
    #[test]
    fn full_compile_agrees_with_reference_dual_stack(state in dual_stack_cluster()) {
        let plans = per_node(|scope| compile(&state, scope));
        check_against_reference(&state, &plans)?;
    }

    /// Dual stack: the engine fed the state as events.
    #[test]
    fn engine_agrees_with_reference_dual_stack(state in dual_stack_cluster()) {
        let plans = per_node(|scope| engine_plan(Engine::new(scope.clone()), &state));
        check_against_reference(&state, &plans)?;
    }

    /// With ClusterNetworkPolicies: the one-pass compiler, one plan per node, against the
    /// specification's tiers.
    #[test]
    fn full_compile_agrees_with_reference_tiers(state in tiered_cluster()) {
        let plans = per_node(|scope| compile(&state, scope));
        check_against_reference(&state, &plans)?;
    }

    /// With ClusterNetworkPolicies: the engine fed the state as events.
    #[test]
    fn engine_agrees_with_reference_tiers(state in tiered_cluster()) {
        let plans =
            per_node(|scope| engine_plan(Engine::new(scope.clone()).with_cluster_policies(), &state));
        check_against_reference(&state, &plans)?;
    }
}

/// A hand-made case the random ones may miss: a named port that means different numbers
/// on different destination pods, reached through an ipBlock in egress.
#[test]
fn egress_named_port_resolves_per_destination_pod() {
    use npm_agent::model::*;
    let mut state = ClusterState::default();
    let node = Node { name: "n1".into(), addresses: vec![node_ip(0)], ..Default::default() };
    state.nodes.insert("n1".into(), node);
    for ns in ["x", "y"] {
        state.namespaces.insert(ns.into(), Namespace::new(ns, Labels::new()));
    }
    let mk = |ns: &str, name: &str, ip: u8, port: u16| Pod {
        key: ObjectKey::new(ns, name),
        labels: labels(&[("app", name)]).into(),
        ip: Some(pod_ip(ip)),
        ipv6: None,
        node: Some("n1".into()),
        phase: PodPhase::Running,
        host_network: false,
        terminating: false,
        named_ports: vec![NamedPort { name: "http".into(), protocol: Protocol::Tcp, port }].into(),
    };
    for p in [mk("x", "client", 1, 1), mk("y", "s80", 2, 80), mk("y", "s8080", 3, 8080)] {
        state.pods.insert(p.key.clone(), p);
    }
    let policy = Policy {
        key: ObjectKey::new("x", "egress"),
        pod_selector: LabelSelector::from_labels([("app", "client")]),
        ingress: None,
        egress: Some(vec![Rule {
            peers: vec![Peer::Block(CidrBlock::new("10.0.0.0/24".parse().unwrap(), []))],
            ports: vec![PortSpec::Named { protocol: Protocol::Tcp, name: "http".into() }],
        }]),
    };
    state.policies.insert(policy.key.clone(), policy);
    let plan = compile(&state, &Scope::Node("n1".into()));
    let allowed = |dst: u8, port: u16| {
        connection_allowed(
            &plan,
            &plan,
            &Connection { src: pod_ip(1), dst: pod_ip(dst), protocol: Protocol::Tcp, port },
        )
    };
    assert!(allowed(2, 80));
    assert!(!allowed(2, 8080));
    assert!(allowed(3, 8080));
    assert!(!allowed(3, 80));
    // Not a pod: a named port cannot resolve.
    assert!(!allowed(200, 80));
    for (d, port) in [(2u8, 80u16), (2, 8080), (3, 8080), (3, 80), (200, 80)] {
        assert_eq!(
            allowed(d, port),
            reference::allowed(&state, pod_ip(1), pod_ip(d), Protocol::Tcp, port)
        );
    }
}
