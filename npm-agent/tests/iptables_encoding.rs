//! The iptables encoding against the specification and against itself:
//! - random clusters and event sequences are compiled per node, translated into `ipset` and
//!   `iptables-restore` scripts, applied to a host model of each node's filter table and sets
//!   (which takes the very scripts), and every connection's first packet is walked through
//!   FORWARD of every node it crosses; the verdicts must equal the reference evaluator's;
//! - after every batch of every diff, no connection through the node is admitted that neither
//!   the old nor the new state allows, and none that both allow is refused unless an end is
//!   held in transition (its labels changing); nothing stays in transition;
//! - a restarted agent (another translator, identities numbered differently) reconciles over
//!   what the previous one left under the same conditions;
//! - a batch that fails is repaired by the next reconcile;
//! - Azure NPM's sets as the kernel holds them (the layout's, not the dataplane's own) equal
//!   what `AzureSets` counts from the compiler's diffs, as the eBPF dataplane reports them.
//!
//! Each node runs both families' translators, as the dataplane does (their batches merged
//! phase by phase), on a model with both filter tables and one namespace of sets; the
//! `_dual_stack` variants draw dual-stack and IPv6-only pods and blocks of both families.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::azure::{AzureSets, hashed_set_name};
use npm_agent::dataplane::iptables::emulator::{Packet, TableEmulator};
use npm_agent::dataplane::iptables::names::Family;
use npm_agent::dataplane::iptables::observe::kernel_counts;
use npm_agent::dataplane::iptables::translate::{Batch, RuleTranslator, Tool, merge_families};
use npm_agent::model::Protocol;
use npm_agent::plan::{Layout, Plan, PlanDiff};
use npm_agent::reference::{self, End};
use npm_agent::state::{ClusterState, Event};

struct Node {
    engine: Engine,
    /// IPv4's, IPv6's.
    translators: [RuleTranslator; 2],
    kernel: TableEmulator,
    /// The layout the kernel holds, which the dataplane advances by each apply's net move.
    layout: Layout,
    /// Azure NPM's sets as the iptables dataplane names them (from the net moves) and as the
    /// eBPF dataplane counts them (from the compiler's diffs).
    named_sets: AzureSets,
    counted_sets: AzureSets,
}

impl Node {
    fn new(node: &str) -> Self {
        let mut n = Self {
            engine: Engine::new(Scope::Node(node.into())).with_layout().with_cluster_policies(),
            translators: Family::BOTH.map(RuleTranslator::for_family),
            kernel: TableEmulator::default(),
            layout: Layout::default(),
            named_sets: AzureSets::default(),
            counted_sets: AzureSets::default(),
        };
        // Start-up: a reconcile over an empty kernel.
        let batches = reconcile(&mut n.translators, &Plan::default(), &n.kernel);
        for b in &batches {
            n.kernel.apply(b).expect("empty reconcile applies");
        }
        n
    }

    fn handle(&mut self, e: &Event) -> Result<(), TestCaseError> {
        let diff = self.engine.handle(e.clone());
        for b in self.batches(&diff)? {
            self.kernel.apply(&b).map_err(|err| {
                TestCaseError::fail(format!("{} failed: {err}\n{}", b.step, b.script))
            })?;
        }
        Ok(())
    }

    /// The batches of one diff (or of several, concatenated), as the dataplane makes them:
    /// the net move of the layout, translated.
    fn batches(&mut self, diff: &PlanDiff) -> Result<Vec<Batch>, TestCaseError> {
        let before = self.layout.clone();
        let layout = self.layout.advance(&diff.layout).map_err(TestCaseError::fail)?;
        // The net move is the one between the two whole layouts, and the layout the
        // dataplane follows is the compiler's.
        let sorted = |v: &[npm_agent::plan::LayoutChange]| {
            let mut s: Vec<String> = v.iter().map(|c| format!("{c:?}")).collect();
            s.sort();
            s
        };
        prop_assert_eq!(sorted(&layout), sorted(&before.diff(&self.layout)));
        prop_assert_eq!(&self.layout, &self.engine.plan().layout);
        let net = PlanDiff { changes: Vec::new(), layout };
        let batches =
            merge_families(self.translators.iter_mut().map(|t| t.translate(&net)).collect());
        // (Azure NPM's counts are of its IPv4 sets.)
        let t = &self.translators[0];
        self.named_sets.apply_named(&net.layout, |d| t.kernel_set_name(d));
        self.counted_sets.apply(&diff.layout);
        Ok(batches)
    }
}

/// Both families' translators reconcile `plan` over `kernel`, as the dataplane does.
fn reconcile(ts: &mut [RuleTranslator; 2], plan: &Plan, kernel: &TableEmulator) -> Vec<Batch> {
    merge_families(ts.iter_mut().map(|t| t.reconcile(plan, &kernel.state_of(t.family()))).collect())
}

/// The nodes whose FORWARD hook a connection between two ends crosses: the node of each
/// end's pod (one, when both are on it), unless the other end is that node's own address (a
/// node's own addresses talk to it through INPUT and OUTPUT, which FORWARD never sees).
fn crossed(state: &ClusterState, src: &End, dst: &End) -> BTreeSet<String> {
    let own = |node: &String, ip: IpAddr| {
        state.nodes.get(node).is_some_and(|n| n.addresses.contains(&ip))
    };
    let mut nodes = BTreeSet::new();
    if let Some(n) = &src.node
        && !own(n, dst.ip)
    {
        nodes.insert(n.clone());
    }
    if let Some(n) = &dst.node
        && !own(n, src.ip)
    {
        nodes.insert(n.clone());
    }
    nodes
}

/// Whether the kernel would never carry a connection this way: the receiving end's address is
/// also claimed by a pod on the sender's node, which routes it there instead.
fn routed_elsewhere(state: &ClusterState, src: &End, dst: &End) -> bool {
    src.node.is_some()
        && dst.node != src.node
        && state
            .pods
            .values()
            .any(|p| p.is_endpoint() && p.has_address(dst.ip) && p.node == src.node)
}

fn check(state: &ClusterState, nodes: &HashMap<String, Node>) -> Result<(), TestCaseError> {
    let ends = ends(state);
    for src in &ends {
        for dst in &ends {
            // (Packets claiming a local pod's address from elsewhere never reach FORWARD: the
            // raw table's guard drops them, tested in the kernel by iptables_netns.)
            if src.ip == dst.ip
                || src.ip.is_ipv4() != dst.ip.is_ipv4()
                || reference::arrives_spoofed(state, src, dst)
                || routed_elsewhere(state, src, dst)
            {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let p = Packet { src: src.ip, dst: dst.ip, protocol, dport: port };
                    let want = reference::allowed_between(state, src, dst, protocol, port);
                    let got = crossed(state, src, dst).iter().all(|n| nodes[n].kernel.forward(&p));
                    prop_assert_eq!(got, want, "{:?} {:?} -> {:?}:{}", protocol, src, dst, port);
                }
            }
        }
    }
    Ok(())
}

/// Connections whose first packet crosses node `node`'s FORWARD hook in one of `states` (a
/// pod of the node at either end), each with the ports probed. Left out: connections between
/// a pod and its own node in one of the states (a pod that moves to another node), which
/// never cross FORWARD there, and addresses several pods claim, which nodes see each their
/// own way (`check` holds each node's view to the specification).
fn probes(node: &str, states: &[&ClusterState]) -> Vec<Packet> {
    let mut addrs: BTreeSet<IpAddr> = BTreeSet::new();
    for s in states {
        addrs.extend(addresses(s));
    }
    addrs.retain(|ip| states.iter().all(|s| claimed_once(s, *ip)));
    let mut v = Vec::new();
    for &src in &addrs {
        for &dst in &addrs {
            let ends = |s: &ClusterState| (End::at(s, src), End::at(s, dst));
            if src == dst
                || src.is_ipv4() != dst.is_ipv4()
                || !states.iter().any(|s| {
                    let (a, b) = ends(s);
                    crossed(s, &a, &b).contains(node)
                })
                || states.iter().any(|s| {
                    let (a, b) = ends(s);
                    own_node(s, &a, &b)
                })
            {
                continue;
            }
            for (protocol, port) in [
                (Protocol::Tcp, 80),
                (Protocol::Udp, 53),
                (Protocol::Tcp, 8080),
                (Protocol::Sctp, 81),
            ] {
                v.push(Packet { src, dst, protocol, dport: port });
            }
        }
    }
    v
}

/// Whether at most one endpoint pod claims `ip`.
fn claimed_once(state: &ClusterState, ip: IpAddr) -> bool {
    state.pods.values().filter(|p| p.is_endpoint() && p.has_address(ip)).count() <= 1
}

/// Whether one end is a pod and the other its node's address.
fn own_node(state: &ClusterState, src: &End, dst: &End) -> bool {
    let node_has = |end: &End, ip: IpAddr| {
        end.node
            .as_ref()
            .and_then(|n| state.nodes.get(n))
            .is_some_and(|n| n.addresses.contains(&ip))
    };
    node_has(src, dst.ip) || node_has(dst, src.ip)
}

/// The specification's verdict on a probe, for the sides that `node` judges (its own
/// pods'; the other node judges the other side).
fn spec(state: &ClusterState, node: &str, p: &Packet) -> bool {
    let (src, dst) = (End::at(state, p.src), End::at(state, p.dst));
    reference::allowed_on(state, node, &src, &dst, p.protocol, p.dport)
}

/// Every connection through node `n1` is decided as the specification says.
fn check_node(state: &ClusterState, n: &Node) -> Result<(), TestCaseError> {
    for p in probes("n1", &[state]) {
        prop_assert_eq!(n.kernel.forward(&p), spec(state, "n1", &p), "{:?}", p);
    }
    Ok(())
}

/// Whether an address is held in the transition set (its new connections refused while its
/// set memberships change).
fn in_transition(k: &TableEmulator, ip: IpAddr) -> bool {
    k.sets
        .get(&Family::of(ip).set_name("transition"))
        .is_some_and(|s| s.nets.contains_key(&ipnet::IpNet::from(ip)))
}

/// Applies batches one by one, checking after each that every probe is refused when neither
/// state allows it, and admitted when both do (unless an end is in transition, whose new
/// connections are refused for the moment); nothing is left in transition at the end.
fn apply_checked(
    node: &str,
    kernel: &mut TableEmulator,
    batches: &[Batch],
    old: &ClusterState,
    new: &ClusterState,
    all: &[Packet],
) -> Result<(), TestCaseError> {
    let o: Vec<bool> = all.iter().map(|p| spec(old, node, p)).collect();
    let n: Vec<bool> = all.iter().map(|p| spec(new, node, p)).collect();
    for (i, b) in batches.iter().enumerate() {
        // ipset applies a script command by command (packets see every step); an
        // iptables-restore transaction at once.
        let steps: Vec<String> = match b.tool {
            Tool::Ipset => b.script.lines().map(|l| format!("{l}\n")).collect(),
            Tool::Iptables | Tool::Ip6tables => vec![b.script.clone()],
        };
        for (j, step) in steps.iter().enumerate() {
            let one = Batch { script: step.clone(), ..b.clone() };
            kernel.apply(&one).map_err(|e| {
                TestCaseError::fail(format!("batch {i} ({}) failed: {e}\n{}", b.step, b.script))
            })?;
            for (k, p) in all.iter().enumerate() {
                let mid = kernel.forward(p);
                prop_assert!(
                    !mid || o[k] || n[k],
                    "after batch {} ({}) line {}: {:?} admitted though neither state allows it\n{}",
                    i,
                    b.step,
                    j,
                    p,
                    b.script
                );
                let held = in_transition(kernel, p.src) || in_transition(kernel, p.dst);
                prop_assert!(
                    mid || held || !(o[k] && n[k]),
                    "after batch {} ({}) line {}: {:?} refused though both states allow it\n{}",
                    i,
                    b.step,
                    j,
                    p,
                    b.script
                );
            }
        }
    }
    for f in Family::BOTH {
        let t = kernel.sets.get(&f.set_name("transition"));
        prop_assert!(t.is_none_or(|s| s.nets.is_empty()), "addresses left in transition: {:?}", t);
    }
    Ok(())
}

/// Every node's rules after the cluster's initial sync and `events` decide every connection
/// as the specification does; the kernel holds what the translator says, and a reconcile of
/// the same plan changes nothing.
fn decide_like_the_specification(
    state: &ClusterState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let mut nodes: HashMap<String, Node> =
        NODES.iter().map(|n| (n.to_string(), Node::new(n))).collect();
    let mut current = ClusterState::default();
    for e in initial_events(state).iter().chain(events.iter()) {
        current.apply(e);
        for n in nodes.values_mut() {
            n.handle(e)?;
        }
    }
    check(&current, &nodes)?;
    // The kernel holds exactly what the translator says, and a reconcile of the same plan
    // over it changes no set and no chain. Azure NPM's counts of the kernel's sets are
    // those counted from the compiler's diffs, and from its whole layout.
    for n in nodes.values_mut() {
        let kernel = kernel_counts(0, &n.named_sets, &n.kernel.state().sets, true);
        prop_assert_eq!(&kernel, &n.counted_sets.counts(0, true));
        prop_assert_eq!(&n.counted_sets, &AzureSets::from_layout(&n.engine.plan().layout));
        let layout = &n.engine.plan().layout;
        let mut sets: Vec<String> =
            n.translators.iter().flat_map(|t| t.desired_sets(layout).into_keys()).collect();
        sets.sort();
        prop_assert_eq!(sets, n.kernel.sets.keys().cloned().collect::<Vec<_>>());
        // (Jumps to policy chains may be in any order.)
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        for t in &n.translators {
            for (c, rules) in &t.desired_chains() {
                let held = n.kernel.rules_of(t.family(), c);
                prop_assert_eq!(
                    sorted(rules.clone()),
                    sorted(held),
                    "chain {} {:?}",
                    c,
                    t.family()
                );
            }
        }
        let plan = n.engine.plan();
        let before = Family::BOTH.map(|f| n.kernel.state_of(f));
        for b in reconcile(&mut n.translators, &plan, &n.kernel) {
            n.kernel.apply(&b).map_err(TestCaseError::fail)?;
        }
        for f in Family::BOTH {
            let (before, after) = (&before[f as usize], n.kernel.state_of(f));
            prop_assert_eq!(&after.sets, &before.sets);
            prop_assert_eq!(
                after.chains.keys().collect::<Vec<_>>(),
                before.chains.keys().collect::<Vec<_>>()
            );
            for (c, rules) in &after.chains {
                prop_assert_eq!(
                    sorted(rules.clone()),
                    sorted(before.chains[c].clone()),
                    "chain {}",
                    c
                );
            }
        }
    }
    Ok(())
}

/// Each event's batches, applied one by one on node n1, never admit what neither the state
/// before nor the one after allows (see [`apply_checked`]).
fn make_before_break(state: &ClusterState, events: &[Event]) -> Result<(), TestCaseError> {
    let mut n = Node::new("n1");
    for e in initial_events(state) {
        n.handle(&e)?;
    }
    let mut current = state.clone();
    for e in events {
        let old = current.clone();
        let diff = n.engine.handle(e.clone());
        current.apply(e);
        let all = probes("n1", &[&old, &current]);
        let batches = n.batches(&diff)?;
        apply_checked("n1", &mut n.kernel, &batches, &old, &current, &all)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn rules_decide_like_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }

    /// With ClusterNetworkPolicies: their tiers' chains around the NetworkPolicies'.
    #[test]
    fn rules_decide_like_the_specification_tiers(state in tiered_cluster(), events in proptest::collection::vec(tiered_event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }

    #[test]
    fn batches_apply_make_before_break(state in cluster(), events in proptest::collection::vec(event(), 1..8)) {
        make_before_break(&state, &events)?;
    }

    #[test]
    fn bursts_apply_make_before_break(
        state in cluster(),
        bursts in proptest::collection::vec(proptest::collection::vec(event(), 1..5), 1..4),
    ) {
        // Several events' diffs applied at once (a burst): no state between the burst's
        // first and last admits what neither of those two does.
        let mut n = Node::new("n1");
        for e in initial_events(&state) {
            n.handle(&e)?;
        }
        let mut current = state.clone();
        for burst in &bursts {
            let old = current.clone();
            let mut diff = PlanDiff::default();
            for e in burst {
                diff.extend(n.engine.handle(e.clone()));
                current.apply(e);
            }
            let all = probes("n1", &[&old, &current]);
            let batches = n.batches(&diff)?;
            apply_checked("n1", &mut n.kernel, &batches, &old, &current, &all)?;
        }
        check_node(&current, &n)?;
    }

    #[test]
    fn restart_reconciles_make_before_break(before in cluster(), after_events in proptest::collection::vec(event(), 0..6), seed in any::<u64>()) {
        // The old agent.
        let mut old = Node::new("n1");
        for e in initial_events(&before) {
            old.handle(&e)?;
        }
        // The new agent sees the cluster as it is now, in another order (so it numbers
        // identities differently), and reconciles over what the old one left.
        let mut now = before.clone();
        for e in &after_events {
            now.apply(e);
        }
        let mut events = initial_events(&now);
        let k = events.len().max(1);
        events.rotate_left((seed as usize) % k);
        let mut engine = Engine::new(Scope::Node("n1".into())).with_layout();
        for e in events {
            engine.handle(e);
        }
        let new_plan = engine.plan();
        let all = probes("n1", &[&before, &now]);
        let mut ts = Family::BOTH.map(RuleTranslator::for_family);
        let mut kernel = old.kernel.clone();
        let batches = reconcile(&mut ts, &new_plan, &kernel);
        apply_checked("n1", &mut kernel, &batches, &before, &now, &all)?;
        // Nothing of the old agent's is left, and the new one's rules decide like the
        // specification.
        let mut sets: Vec<String> = ts.iter().flat_map(|t| t.desired_sets(&new_plan.layout).into_keys()).collect();
        sets.sort();
        prop_assert_eq!(sets, kernel.sets.keys().cloned().collect::<Vec<_>>());
        for t in &ts {
            prop_assert_eq!(t.desired_chains().keys().cloned().collect::<Vec<_>>(), kernel.chain_names_of(t.family()).into_iter().collect::<Vec<_>>());
        }
        for p in probes("n1", &[&now]) {
            prop_assert_eq!(kernel.forward(&p), spec(&now, "n1", &p), "{:?}", p);
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
            for b in n.batches(&diff)? {
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
        let mut ts = Family::BOTH.map(RuleTranslator::for_family);
        for b in reconcile(&mut ts, &plan, &n.kernel) {
            n.kernel.apply(&b).map_err(|e| TestCaseError::fail(format!("{}: {e}\n{}", b.step, b.script)))?;
        }
        // Every connection through the node is decided as the specification says.
        for p in probes("n1", &[&current]) {
            prop_assert_eq!(n.kernel.forward(&p), spec(&current, "n1", &p), "{:?}", p);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    /// Both families: dual-stack and IPv6-only pods, blocks of either family; ip6tables'
    /// rules and `inet6:` sets judge IPv6 as the specification does.
    #[test]
    fn rules_decide_like_the_specification_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }

    #[test]
    fn batches_apply_make_before_break_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 1..8)) {
        make_before_break(&state, &events)?;
    }
}

/// The layout of a small cluster, as a readable check of Azure NPM's names.
#[test]
fn layout_uses_azure_names() {
    use npm_agent::model::{LabelSelector, NamedPort, Namespace, ObjectKey, Peer, PortSpec, Rule};
    let mut n = Node::new("n1");
    n.handle(&Event::UpsertNamespace(Namespace::new("y", labels(&[("team", "a")])))).unwrap();
    n.handle(&Event::UpsertNode(nodes()[0].clone())).unwrap();
    let pod = |name: &str, ip: u8, l: &[(&str, &str)]| npm_agent::model::Pod {
        named_ports: vec![NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }]
            .into(),
        ..npm_agent::model::Pod::running(ObjectKey::new("y", name), labels(l), pod_ip(ip), "n1")
    };
    n.handle(&Event::UpsertPod(pod("a", 1, &[("pod", "a")]))).unwrap();
    n.handle(&Event::UpsertPod(pod("b", 2, &[("pod", "b")]))).unwrap();
    // Azure NPM's own test policy y/base: pods pod=a, ingress from pod=b in namespaces
    // team=a on the named port http.
    let base = npm_agent::model::Policy {
        key: ObjectKey::new("y", "base"),
        pod_selector: LabelSelector::from_labels([("pod", "a")]),
        ingress: Some(vec![Rule {
            peers: vec![Peer::Pods {
                namespaces: npm_agent::model::NamespaceScope::Selector(LabelSelector::from_labels(
                    [("team", "a")],
                )),
                pods: LabelSelector::from_labels([("pod", "b")]),
            }],
            ports: vec![PortSpec::Named { protocol: Protocol::Tcp, name: "http".into() }],
        }]),
        egress: None,
    };
    n.handle(&Event::UpsertPolicy(base)).unwrap();
    let chains = n.kernel.chain_names();
    for c in [
        "AZURE-NPM",
        "AZURE-NPM-INGRESS",
        "AZURE-NPM-EGRESS",
        "AZURE-NPM-ACCEPT",
        "AZURE-NPM-INGRESS-ALLOW-MARK",
        "AZURE-NPM-INGRESS-2697641196",
    ] {
        assert!(chains.contains(c), "{c} in {chains:?}");
    }
    // ... and the chain of the pods it selects (y/a): a jump to it, then the drop mark.
    let group = npm_agent::dataplane::iptables::names::group_chain(true, "y/base");
    assert!(chains.contains(&group), "{group} in {chains:?}");
    assert_eq!(chains.len(), 7, "{chains:?}");
    assert_eq!(
        n.kernel.rules(&group),
        vec![
            "-j AZURE-NPM-INGRESS-2697641196".to_string(),
            "-m comment --comment DROP-ALL -j MARK --set-xmark 0x400/0x400".to_string()
        ]
    );
    assert_eq!(
        n.kernel.rules("FORWARD"),
        vec!["-m conntrack --ctstate INVALID,NEW -j AZURE-NPM".to_string()]
    );
    let set = |r: &str| hashed_set_name(r);
    // The pod the policy selects walks it: a jump by its address (the policy's namespace and
    // pod label sets are matched by the compiler, not per packet).
    let jump = format!("-d {}/32 -j {group}", pod_ip(1));
    assert!(
        n.kernel.rules("AZURE-NPM-INGRESS").contains(&jump),
        "{:#?}",
        n.kernel.rules("AZURE-NPM-INGRESS")
    );
    let allow = format!(
        "-p tcp -m set --match-set {} src -m set --match-set {} src -m set --match-set {} dst,dst -m comment --comment \"ALLOW-FROM-nslabel-team:a-AND-podlabel-pod:b-ON-TCP-TO-PORT-namedport:http\" -j AZURE-NPM-INGRESS-ALLOW-MARK",
        set("nslabel-team:a"),
        set("podlabel-pod:b"),
        set("namedport:http")
    );
    assert_eq!(n.kernel.rules("AZURE-NPM-INGRESS-2697641196"), vec![allow]);
    let named = &n.kernel.sets[&set("namedport:http")];
    assert_eq!(named.kind, "hash:ip,port");
    assert_eq!(named.ports.len(), 2);
    assert_eq!(n.kernel.sets[&set("nslabel-team:a")].list, vec![set("ns-y")]);
    // (IPv6's twins are `inet6:` and the same name.)
    assert!(n.kernel.sets.keys().all(|s| {
        let s = s.strip_prefix("inet6:").unwrap_or(s);
        s.starts_with("azure-npm-") && s["azure-npm-".len()..].parse::<u32>().is_ok()
    }));
    let p = |src: u8, dst: u8, dport| Packet {
        src: pod_ip(src),
        dst: pod_ip(dst),
        protocol: Protocol::Tcp,
        dport,
    };
    assert!(n.kernel.forward(&p(2, 1, 8080)));
    assert!(!n.kernel.forward(&p(2, 1, 80)));
    assert!(!n.kernel.forward(&p(3, 1, 8080)));
    // Relabelling the namespace takes pod b out of nslabel-team:a.
    n.handle(&Event::UpsertNamespace(Namespace::new("y", labels(&[("team", "b")])))).unwrap();
    assert!(!n.kernel.forward(&p(2, 1, 8080)));
    assert!(n.kernel.sets[&set("nslabel-team:a")].list.is_empty());
    // Deleting the policy leaves the base chains and the transition set alone.
    n.handle(&Event::DeletePolicy(ObjectKey::new("y", "base"))).unwrap();
    assert_eq!(n.kernel.chain_names().len(), 5);
    assert_eq!(
        n.kernel.sets.keys().cloned().collect::<Vec<_>>(),
        vec![set("transition"), format!("inet6:{}", set("transition"))]
    );
    assert!(n.kernel.forward(&p(2, 1, 80)));
}
