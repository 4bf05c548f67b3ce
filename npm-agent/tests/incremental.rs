//! The incremental engine against compiling from scratch: after any sequence of events,
//! the plan built by applying the engine's diffs equals the plan of the final state; diffs
//! are net (an event that changes nothing yields an empty diff); and applying a diff in its
//! order never allows what neither plan allows nor blocks what both allow.

mod common;

use std::collections::HashSet;

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{DORMANT_SELECTORS, Engine, Scope, compile};
use std::net::IpAddr;

use npm_agent::model::{Direction, Protocol};
use npm_agent::plan::{Change, Plan, PlanDiff};
use npm_agent::state::{ClusterState, Event};

fn scopes() -> Vec<Scope> {
    vec![Scope::Cluster, Scope::Node(NODES[0].to_string())]
}

/// Every (endpoint side, peer, port) of interest: the addresses of both states.
fn probes(a: &ClusterState, b: &ClusterState) -> (Vec<IpAddr>, Vec<(Protocol, u16)>) {
    let mut addrs: Vec<_> = addresses(a);
    addrs.extend(addresses(b));
    addrs.sort();
    addrs.dedup();
    (
        addrs,
        vec![(Protocol::Tcp, 80), (Protocol::Udp, 53), (Protocol::Tcp, 8080), (Protocol::Sctp, 81)],
    )
}

/// What one endpoint direction admits from one peer: everything when the endpoint is not
/// in the plan (nothing enforces it).
fn side(
    plan: &Plan,
    ep: IpAddr,
    d: Direction,
    peer: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    match plan.endpoints.get(&ep) {
        None => true,
        Some(e) => plan.direction(e, d).admits(
            &plan.sets,
            peer,
            plan.identities.get(&peer).copied(),
            protocol,
            port,
        ),
    }
}

type Probe = (IpAddr, Direction, IpAddr, Protocol, u16);

fn verdicts(plan: &Plan, probes: &[Probe]) -> Vec<bool> {
    probes
        .iter()
        .map(|&(ep, d, peer, protocol, port)| side(plan, ep, d, peer, protocol, port))
        .collect()
}

/// Feeds `events` to an engine of each scope (made by `engine`): after each, its diffs have
/// rebuilt exactly the plan (layout included) that the one-pass compiler gives, and the same
/// event again changes nothing.
fn diffs_rebuild(events: &[Event], engine: impl Fn(Scope) -> Engine) -> Result<(), TestCaseError> {
    for scope in scopes() {
        let mut engine = engine(scope.clone());
        let mut plan = Plan::default();
        let mut state = ClusterState::default();
        for e in events {
            let diff = engine.handle(e.clone());
            state.apply(e);
            plan.apply(&diff).map_err(TestCaseError::fail)?;
            let full = compile(&state, &scope);
            prop_assert_eq!(&plan.layout, &full.layout, "after {:?} in {:?}", e, scope);
            prop_assert_eq!(plan.canonical(), full.canonical(), "after {:?} in {:?}", e, scope);
            prop_assert!(engine.handle(e.clone()).is_empty(), "repeating {:?} changed the plan", e);
        }
    }
    Ok(())
}

/// Builds a cluster-wide engine's plan from `initial`, then checks every prefix of the diff
/// of each of `events` (see [`apply_make_before_break`]).
fn events_apply_make_before_break(
    initial: Vec<Event>,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let mut engine = Engine::new(Scope::Cluster);
    let mut plan = Plan::default();
    let mut state = ClusterState::default();
    for e in initial {
        state.apply(&e);
        plan.apply(&engine.handle(e)).map_err(TestCaseError::fail)?;
    }
    for e in events {
        let before = state.clone();
        state.apply(e);
        let diff = engine.handle(e.clone());
        let new = compile(&state, &Scope::Cluster);
        apply_make_before_break(&mut plan, &diff, &new, &before, &state)?;
    }
    Ok(())
}

/// Applies `diff` change by change, checking every endpoint direction at every step.
/// Peers whose identity switches are exempt, and so is what an endpoint whose address passes
/// to another pod admits beyond both plans (see `PlanDiff`).
fn apply_make_before_break(
    plan: &mut Plan,
    diff: &PlanDiff,
    new: &Plan,
    before: &ClusterState,
    after: &ClusterState,
) -> Result<(), TestCaseError> {
    let switching = identity_switches(plan, diff);
    let retargeted = retargeted_endpoints(diff);
    let (addrs, ports) = probes(before, after);
    let mut all = Vec::new();
    for &ep in &addrs {
        for d in Direction::BOTH {
            for &peer in addrs
                .iter()
                .filter(|p| !switching.contains(p) && **p != ep && p.is_ipv4() == ep.is_ipv4())
            {
                for &(protocol, port) in &ports {
                    all.push((ep, d, peer, protocol, port));
                }
            }
        }
    }
    let old = verdicts(plan, &all);
    let new_v = verdicts(new, &all);
    for (i, change) in diff.changes.iter().enumerate() {
        plan.apply(&PlanDiff::of(vec![change.clone()])).map_err(TestCaseError::fail)?;
        let mid = verdicts(plan, &all);
        for (k, p) in all.iter().enumerate() {
            prop_assert!(
                !mid[k] || old[k] || new_v[k] || retargeted.contains(&p.0),
                "after change {} ({:?}): {:?} admitted though neither plan admits it; diff {:#?}",
                i,
                change,
                p,
                diff
            );
            prop_assert!(
                mid[k] || !(old[k] && new_v[k]),
                "after change {} ({:?}): {:?} refused though both plans admit it; diff {:#?}",
                i,
                change,
                p,
                diff
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn diffs_rebuild_the_full_plan(events in proptest::collection::vec(event(), 1..30)) {
        // Capacity 1 forgets released selectors soon (exercising both reviving and forgetting).
        for (scope, dormant) in scopes().into_iter().flat_map(|s| [(s.clone(), DORMANT_SELECTORS), (s, 1)]) {
            let mut engine = Engine::with_dormant_capacity(scope.clone(), dormant).with_layout();
            let mut plan = Plan::default();
            let mut state = ClusterState::default();
            for e in &events {
                let diff = engine.handle(e.clone());
                state.apply(e);
                // Net: no entry is both added and removed.
                let mut seen = HashSet::new();
                for c in &diff.changes {
                    if let Change::AddAllow { profile, allow } | Change::RemoveAllow { profile, allow } = c {
                        prop_assert!(seen.insert((*profile, allow.clone())), "{:?} twice in one diff", c);
                    }
                }
                let before = plan.layout.clone();
                plan.apply(&diff).map_err(TestCaseError::fail)?;
                let full = compile(&state, &scope);
                // A layout's diff to another moves it there (what a test builds diffs with).
                let mut moved = before.clone();
                moved.apply(&before.diff(&full.layout)).map_err(TestCaseError::fail)?;
                prop_assert_eq!(&moved, &full.layout);
                prop_assert_eq!(plan.canonical(), full.canonical(), "after {:?} in {:?}", e, scope);
                prop_assert_eq!(engine.plan().canonical(), full.canonical());
                // The same event again changes nothing.
                prop_assert!(engine.handle(e.clone()).is_empty(), "repeating {:?} changed the plan", e);
            }
        }
    }

    #[test]
    fn diffs_apply_make_before_break(setup in cluster(), events in proptest::collection::vec(event(), 1..8)) {
        let initial: Vec<Event> = setup.namespaces.values().cloned().map(Event::UpsertNamespace)
            .chain(setup.pods.values().cloned().map(Event::UpsertPod))
            .chain(setup.policies.values().cloned().map(Event::UpsertPolicy))
            .collect();
        events_apply_make_before_break(initial, &events)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Dual stack: pods gaining, losing and changing addresses of either family, one at a
    /// time contested; the diffs rebuild the full plan, layout included.
    #[test]
    fn diffs_rebuild_the_full_plan_dual_stack(events in proptest::collection::vec(dual_stack_event(), 1..30)) {
        diffs_rebuild(&events, |s| Engine::new(s).with_layout())?;
    }

    /// Dual stack: every prefix of every diff decides as the plan before or after does, in
    /// each family.
    #[test]
    fn diffs_apply_make_before_break_dual_stack(setup in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 1..8)) {
        events_apply_make_before_break(initial_events(&setup), &events)?;
    }

    /// With ClusterNetworkPolicies among the events: the diffs rebuild the full plan.
    #[test]
    fn diffs_rebuild_the_full_plan_tiers(events in proptest::collection::vec(tiered_event(), 1..30)) {
        diffs_rebuild(&events, |s| Engine::new(s).with_layout().with_cluster_policies())?;
    }
}

/// Found by `diffs_apply_make_before_break`: two pods claim one address (the second one
/// terminating, so the first owns it); the owner moves to a new address and the other,
/// isolated for egress, takes the old one over. The new address must have its identity
/// before the endpoint is isolated, or the endpoint briefly refuses the traffic both plans
/// allow.
#[test]
fn a_new_address_is_identified_before_isolation() {
    use npm_agent::model::{
        LabelSelector, Labels, Namespace, NamespaceScope, ObjectKey, Peer, Pod, PodPhase, Policy,
        Rule,
    };
    use npm_agent::plan::Connection;
    let pod = |ns: &str, name: &str, ip: &str, phase: PodPhase| Pod {
        key: ObjectKey::new(ns, name),
        labels: Labels::new().into(),
        ip: Some(ip.parse().unwrap()),
        ipv6: None,
        node: Some("n1".into()),
        phase,
        host_network: false,
        terminating: name == "p0",
        named_ports: vec![].into(),
    };
    let mut engine = Engine::new(Scope::Cluster);
    let mut plan = Plan::default();
    let mut events = vec![];
    for ns in ["x", "z"] {
        events.push(Event::UpsertNamespace(Namespace::new(ns, Labels::new())));
    }
    events.push(Event::UpsertPod(pod("x", "p1", "10.0.0.5", PodPhase::Running)));
    events.push(Event::UpsertPod(pod("z", "p0", "10.0.0.5", PodPhase::Running)));
    events.push(Event::UpsertPolicy(Policy {
        key: ObjectKey::new("z", "np0"),
        pod_selector: LabelSelector::everything(),
        ingress: None,
        egress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: NamespaceScope::Selector(LabelSelector::everything()),
                pods: LabelSelector::everything(),
            }],
            ports: vec![],
        }]),
    }));
    for e in events {
        plan.apply(&engine.handle(e)).unwrap();
    }
    let diff = engine.handle(Event::UpsertPod(pod("x", "p1", "10.0.0.6", PodPhase::Pending)));
    let conn = Connection {
        src: "10.0.0.5".parse().unwrap(),
        dst: "10.0.0.6".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    };
    for c in &diff.changes {
        plan.apply(&PlanDiff::of(vec![c.clone()])).unwrap();
        assert!(plan.allows_egress(&conn), "refused after {c:?} in {diff:#?}");
    }
}

/// Issue 10, item 11 (one huge policy): the endpoints one policy selects share its entries.
/// A policy of 2,000 ipBlock rules selecting 50 pods of the node (each with labels of its own)
/// costs the plan, its diff and the eBPF maps 2,000 entries, not 50 × 2,000; a new replica
/// joins them with one change per direction, not 2,000.
#[test]
fn a_policy_s_entries_are_held_once_for_the_pods_it_selects() {
    use npm_agent::dataplane::ebpf::translate::{MapOp, MapTranslator};
    use npm_agent::model::{
        CidrBlock, LabelSelector, Labels, Namespace, Node, ObjectKey, Peer, Pod, Policy, Rule,
    };
    let pod = |i: u32| {
        let labels = Labels::from([("app".into(), "web".into()), ("id".into(), format!("{i}"))]);
        let ip = format!("10.0.0.{}", i + 1).parse().unwrap();
        Pod::running(ObjectKey::new("x", format!("p{i}")), labels, ip, "n1")
    };
    let rules: Vec<Rule> = (0..2_000u32)
        .map(|i| Rule {
            peers: vec![Peer::Block(CidrBlock::new(
                format!("172.16.{}.{}/32", i / 250, i % 250).parse().unwrap(),
                [],
            ))],
            ports: vec![],
        })
        .collect();
    let mut engine = Engine::new(Scope::Node("n1".into()));
    let mut translator = MapTranslator::new();
    let mut handle = |e: Event| {
        let diff = engine.handle(e);
        let ops = translator.translate(&diff);
        (diff, ops, engine.stats())
    };
    handle(Event::UpsertNode(Node { name: "n1".into(), addresses: vec![], ..Default::default() }));
    handle(Event::UpsertNamespace(Namespace::new("x", Labels::new())));
    for i in 0..50 {
        handle(Event::UpsertPod(pod(i)));
    }
    let (diff, ops, stats) = handle(Event::UpsertPolicy(Policy {
        key: ObjectKey::new("x", "huge"),
        pod_selector: LabelSelector::from_labels([("app", "web")]),
        ingress: Some(rules),
        egress: None,
    }));
    let allows = diff.changes.iter().filter(|c| matches!(c, Change::AddAllow { .. })).count();
    assert_eq!(allows, 2_000, "one profile's entries");
    let keys = ops.iter().filter(|o| matches!(o, MapOp::PolicyAdd { .. })).count();
    assert_eq!(keys, 2_000, "one key per entry, once");
    assert_eq!(stats.profiles, 1);
    assert_eq!(stats.allow_entries, 2_000);
    // A new replica: its endpoint, identity and profile, nothing of the policy's entries.
    let (diff, ops, _) = handle(Event::UpsertPod(pod(50)));
    assert!(!diff.changes.iter().any(|c| matches!(c, Change::AddAllow { .. })), "{diff:?}");
    assert!(ops.len() <= 6, "{ops:?}");
}
