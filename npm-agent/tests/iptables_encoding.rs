//! The iptables encoding against the specification and against itself:
//! - random clusters and event sequences are compiled per node, translated into `ipset` and
//!   `iptables-restore` scripts, applied to a host model of each node's filter table and sets
//!   (which takes the very scripts), and every connection's first packet is walked through
//!   FORWARD of every node it crosses; the verdicts must equal the reference evaluator's;
//! - every batch of every diff keeps make-before-break per endpoint direction;
//! - a restarted agent (another translator, identities numbered differently) reconciles over
//!   what the previous one left without a moment where anything is admitted that neither the
//!   old nor the new plan admits, or refused that both admit;
//! - a batch that fails is repaired by the next reconcile.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::iptables::model::{KernelModel, Packet};
use npm_agent::dataplane::iptables::translate::Translator;
use npm_agent::model::{Direction, Protocol};
use npm_agent::plan::Plan;
use npm_agent::reference;
use npm_agent::state::{ClusterState, Event};

struct Node {
    engine: Engine,
    translator: Translator,
    kernel: KernelModel,
}

impl Node {
    fn new(node: &str) -> Self {
        let mut n = Self { engine: Engine::new(Scope::Node(node.into())), translator: Translator::new(), kernel: KernelModel::default() };
        // Start-up: a reconcile over an empty kernel.
        let batches = n.translator.reconcile(&Plan::default(), &n.kernel.state());
        for b in &batches {
            n.kernel.apply(b).expect("empty reconcile applies");
        }
        n
    }

    fn handle(&mut self, e: &Event) -> Result<(), TestCaseError> {
        let diff = self.engine.handle(e.clone());
        for b in self.translator.translate(&diff) {
            self.kernel.apply(&b).map_err(|err| TestCaseError::fail(format!("{} failed: {err}\n{}", b.step, b.script)))?;
        }
        Ok(())
    }
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => unreachable!("the universe is IPv4"),
    }
}

/// Whether every node whose FORWARD hook the packet crosses lets it through. A node's own
/// addresses are local traffic (OUTPUT/INPUT), which FORWARD never sees.
fn forwarded(state: &ClusterState, nodes: &HashMap<String, Node>, p: &Packet) -> bool {
    nodes.iter().all(|(name, n)| {
        let own = state.nodes.get(name).is_some_and(|nd| nd.addresses.iter().any(|a| *a == IpAddr::V4(p.src) || *a == IpAddr::V4(p.dst)));
        own || n.kernel.forward(p)
    })
}

fn check(state: &ClusterState, nodes: &HashMap<String, Node>) -> Result<(), TestCaseError> {
    let addrs = addresses(state);
    for &src in &addrs {
        for &dst in &addrs {
            if src == dst {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let p = Packet { src: v4(src), dst: v4(dst), protocol, dport: port };
                    let want = reference::allowed(state, src, dst, protocol, port);
                    prop_assert_eq!(forwarded(state, nodes, &p), want, "{:?} {} -> {}:{}", protocol, src, dst, port);
                }
            }
        }
    }
    Ok(())
}

/// Probes of one node that exercise one endpoint direction alone: ingress from an address
/// that is not a local endpoint, egress to one.
fn probes(plans: &[&Plan], addrs: &[IpAddr]) -> Vec<(IpAddr, Direction, IpAddr, Protocol, u16)> {
    let local: HashSet<IpAddr> = plans.iter().flat_map(|p| p.endpoints.keys().copied()).collect();
    // The node's own addresses talk to its pods through INPUT and OUTPUT, not FORWARD.
    let node: HashSet<IpAddr> = plans.iter().flat_map(|p| p.node_ips.iter().copied()).collect();
    let mut v = Vec::new();
    for &ep in &local {
        for &peer in addrs.iter().filter(|a| !local.contains(a) && !node.contains(a)) {
            for d in Direction::BOTH {
                for (protocol, port) in [(Protocol::Tcp, 80), (Protocol::Udp, 53), (Protocol::Tcp, 8080), (Protocol::Sctp, 81)] {
                    v.push((ep, d, peer, protocol, port));
                }
            }
        }
    }
    v
}

fn model_side(k: &KernelModel, (ep, d, peer, protocol, port): (IpAddr, Direction, IpAddr, Protocol, u16)) -> bool {
    let (src, dst) = match d {
        Direction::Ingress => (peer, ep),
        Direction::Egress => (ep, peer),
    };
    k.forward(&Packet { src: v4(src), dst: v4(dst), protocol, dport: port })
}

/// Applies batches one by one, checking after each that every probe is admitted when both
/// plans admit it and refused when neither does.
fn apply_checked(
    kernel: &mut KernelModel,
    batches: &[npm_agent::dataplane::iptables::translate::Batch],
    old: &Plan,
    new: &Plan,
    all: &[(IpAddr, Direction, IpAddr, Protocol, u16)],
) -> Result<(), TestCaseError> {
    let o: Vec<bool> = all.iter().map(|&(ep, d, peer, pr, po)| dataplane_admits(old, ep, d, peer, pr, po)).collect();
    let n: Vec<bool> = all.iter().map(|&(ep, d, peer, pr, po)| dataplane_admits(new, ep, d, peer, pr, po)).collect();
    for (i, b) in batches.iter().enumerate() {
        kernel.apply(b).map_err(|e| TestCaseError::fail(format!("batch {i} ({}) failed: {e}\n{}", b.step, b.script)))?;
        for (k, probe) in all.iter().enumerate() {
            let mid = model_side(kernel, *probe);
            prop_assert!(!mid || o[k] || n[k], "after batch {} ({}): {:?} admitted though neither plan admits it", i, b.step, probe);
            prop_assert!(mid || !(o[k] && n[k]), "after batch {} ({}): {:?} refused though both plans admit it", i, b.step, probe);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn rules_decide_like_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..12)) {
        let mut nodes: HashMap<String, Node> = NODES.iter().map(|n| (n.to_string(), Node::new(n))).collect();
        let mut current = ClusterState::default();
        for e in initial_events(&state).iter().chain(events.iter()) {
            current.apply(e);
            for n in nodes.values_mut() {
                n.handle(e)?;
            }
        }
        check(&current, &nodes)?;
        // The kernel holds exactly what the translator says, and a reconcile of the same plan
        // over it changes no set and no chain.
        for n in nodes.values_mut() {
            let sets = n.translator.desired_sets();
            prop_assert_eq!(sets.keys().cloned().collect::<Vec<_>>(), n.kernel.sets.keys().cloned().collect::<Vec<_>>());
            let chains = n.translator.desired_chains();
            // (Jumps to policy groups may be in any order.)
            let sorted = |mut v: Vec<String>| { v.sort(); v };
            for (c, rules) in &chains {
                prop_assert_eq!(sorted(rules.clone()), sorted(n.kernel.rules(c)), "chain {}", c);
            }
            let plan = n.engine.plan();
            let before = n.kernel.state();
            for b in n.translator.reconcile(&plan, &before) {
                n.kernel.apply(&b).map_err(TestCaseError::fail)?;
            }
            let after = n.kernel.state();
            prop_assert_eq!(&after.sets, &before.sets);
            prop_assert_eq!(after.chains.keys().collect::<Vec<_>>(), before.chains.keys().collect::<Vec<_>>());
            for (c, rules) in &after.chains {
                prop_assert_eq!(sorted(rules.clone()), sorted(before.chains[c].clone()), "chain {}", c);
            }
        }
    }

    #[test]
    fn batches_apply_make_before_break(state in cluster(), events in proptest::collection::vec(event(), 1..8)) {
        let mut n = Node::new("n1");
        for e in initial_events(&state) {
            n.handle(&e)?;
        }
        let mut current = state.clone();
        for e in &events {
            let old = n.engine.plan();
            let diff = n.engine.handle(e.clone());
            current.apply(e);
            let new = n.engine.plan();
            // Addresses switching identity are matched by the old or the new one meanwhile.
            let switching = identity_switches(&old, &diff);
            let mut addrs = addresses(&current);
            addrs.extend(addresses(&state));
            addrs.sort();
            addrs.dedup();
            addrs.retain(|a| !switching.contains(a));
            let all = probes(&[&old, &new], &addrs);
            let batches = n.translator.translate(&diff);
            apply_checked(&mut n.kernel, &batches, &old, &new, &all)?;
        }
    }

    #[test]
    fn restart_reconciles_make_before_break(before in cluster(), after_events in proptest::collection::vec(event(), 0..6), seed in any::<u64>()) {
        // The old agent.
        let mut old = Node::new("n1");
        for e in initial_events(&before) {
            old.handle(&e)?;
        }
        let old_plan = old.engine.plan();
        // The new agent sees the cluster as it is now, in another order (so it numbers
        // identities differently), and reconciles over what the old one left.
        let mut now = before.clone();
        for e in &after_events {
            now.apply(e);
        }
        let mut events = initial_events(&now);
        let k = events.len().max(1);
        events.rotate_left((seed as usize) % k);
        let mut engine = Engine::new(Scope::Node("n1".into()));
        for e in events {
            engine.handle(e);
        }
        let new_plan = engine.plan();
        let mut addrs = addresses(&before);
        addrs.extend(addresses(&now));
        addrs.sort();
        addrs.dedup();
        let all = probes(&[&old_plan, &new_plan], &addrs);
        let mut t = Translator::new();
        let mut kernel = old.kernel.clone();
        let batches = t.reconcile(&new_plan, &kernel.state());
        apply_checked(&mut kernel, &batches, &old_plan, &new_plan, &all)?;
        // Nothing of the old agent's is left, and the new one's rules decide like its plan.
        let sets = t.desired_sets();
        prop_assert_eq!(sets.keys().cloned().collect::<Vec<_>>(), kernel.sets.keys().cloned().collect::<Vec<_>>());
        prop_assert_eq!(t.desired_chains().keys().cloned().collect::<Vec<_>>(), kernel.chain_names().into_iter().collect::<Vec<_>>());
        for &probe in &all {
            let (ep, d, peer, pr, po) = probe;
            prop_assert_eq!(model_side(&kernel, probe), dataplane_admits(&new_plan, ep, d, peer, pr, po), "{:?}", probe);
        }
    }

    #[test]
    fn a_failed_batch_is_repaired_by_reconcile(state in cluster(), events in proptest::collection::vec(event(), 1..8), lose in any::<prop::sample::Index>()) {
        let mut n = Node::new("n1");
        let mut current = ClusterState::default();
        let mut batches_seen = 0usize;
        let target = lose.index(64);
        let mut in_sync = true;
        for e in initial_events(&state).iter().chain(events.iter()) {
            current.apply(e);
            let diff = n.engine.handle(e.clone());
            if !in_sync {
                // The agent applies nothing more until it has reconciled.
                continue;
            }
            for b in n.translator.translate(&diff) {
                // One batch somewhere is lost (the process failed every try); the rest of
                // its diff is not applied.
                if batches_seen == target {
                    in_sync = false;
                    break;
                }
                n.kernel.apply(&b).map_err(TestCaseError::fail)?;
                batches_seen += 1;
            }
        }
        // The agent reconciles the whole plan: a fresh translator, as after a failure.
        let plan = n.engine.plan();
        let mut t = Translator::new();
        for b in t.reconcile(&plan, &n.kernel.state()) {
            n.kernel.apply(&b).map_err(|e| TestCaseError::fail(format!("{}: {e}\n{}", b.step, b.script)))?;
        }
        // Every endpoint direction decides like the plan.
        let mut addrs = addresses(&current);
        addrs.extend(addresses(&state));
        addrs.sort();
        addrs.dedup();
        for probe in probes(&[&plan], &addrs) {
            let (ep, d, peer, pr, po) = probe;
            prop_assert_eq!(model_side(&n.kernel, probe), dataplane_admits(&plan, ep, d, peer, pr, po), "{:?}", probe);
        }
        let _ = t;
    }
}

/// The layout of a small cluster, step by step, as a readable check of the names.
#[test]
fn layout_uses_azure_names() {
    let mut n = Node::new("n1");
    let x = npm_agent::model::Namespace::new("x", labels(&[("ns", "x")]));
    n.handle(&Event::UpsertNamespace(x)).unwrap();
    n.handle(&Event::UpsertNode(nodes()[0].clone())).unwrap();
    let pod = npm_agent::model::Pod {
        key: npm_agent::model::ObjectKey::new("x", "a"),
        labels: labels(&[("app", "web")]).into(),
        ip: Some(pod_ip(1)),
        node: Some("n1".into()),
        phase: npm_agent::model::PodPhase::Running,
        host_network: false,
        named_ports: vec![].into(),
    };
    n.handle(&Event::UpsertPod(pod)).unwrap();
    let deny = npm_agent::model::Policy {
        key: npm_agent::model::ObjectKey::new("x", "deny"),
        pod_selector: npm_agent::model::LabelSelector::everything(),
        ingress: Some(vec![]),
        egress: None,
    };
    n.handle(&Event::UpsertPolicy(deny)).unwrap();
    let chains = n.kernel.chain_names();
    for base in ["AZURE-NPM", "AZURE-NPM-INGRESS", "AZURE-NPM-EGRESS", "AZURE-NPM-ACCEPT", "AZURE-NPM-INGRESS-ALLOW-MARK"] {
        assert!(chains.contains(base), "{base} in {chains:?}");
    }
    assert_eq!(n.kernel.rules("FORWARD"), vec!["-m conntrack --ctstate NEW -j AZURE-NPM".to_string()]);
    let group: Vec<&String> = chains.iter().filter(|c| c.starts_with("AZURE-NPM-INGRESS-") && *c != "AZURE-NPM-INGRESS-ALLOW-MARK").collect();
    assert_eq!(group.len(), 1, "{chains:?}");
    assert_eq!(n.kernel.rules(group[0]), vec!["-m comment --comment DROP-ALL -j MARK --set-xmark 0x400/0x400".to_string()]);
    assert!(n.kernel.sets.keys().all(|s| s.starts_with("azure-npm-") && s["azure-npm-".len()..].parse::<u32>().is_ok()));
    let p = Packet { src: v4(pod_ip(2)), dst: v4(pod_ip(1)), protocol: Protocol::Tcp, dport: 80 };
    assert!(!n.kernel.forward(&p));
}
