//! The eBPF encoding against the specification: random clusters and event sequences are
//! compiled per node, encoded as map operations, applied to a host model of the maps, and
//! every connection is decided by `npm_common::decide` — the very code the tc programs run —
//! on the source node's maps (egress) and the destination node's (ingress). The verdicts
//! must equal the reference evaluator's. And the map operations of every diff, applied one
//! by one, keep make-before-break: after each, every endpoint direction admits what both
//! the old and the new plan admit, and nothing that neither admits.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::ebpf::emulator::MapEmulator;
use npm_agent::dataplane::ebpf::translate::MapTranslator;
use npm_agent::dataplane::ebpf::{addr_key, key_addr};
use npm_agent::model::{Direction, Protocol};
use npm_agent::plan::PlanDiff;
use npm_agent::reference;
use npm_agent::state::{ClusterState, Event};
use npm_common::packet::{FragmentKind, IPPROTO_TCP, Kind, Parsed, TCP_SYN};
use npm_common::{DIR_EGRESS, DIR_INGRESS, Flow, Hook, Packet, decide};

/// The interface packets from other nodes come in through.
const UPLINK: u32 = 2;

/// Whether a node's programs let a new connection's first packet through in direction
/// `dir`: they see it only at the veth of the endpoint it leaves (egress) or enters
/// (ingress), once attached there; a packet sent on the same node (`local`) comes in through
/// its source's veth, else through the uplink.
fn programs_allow(maps: &MapEmulator, dir: u8, flow: Flow, local: bool) -> bool {
    let endpoint = key_addr(if dir == DIR_EGRESS { flow.src } else { flow.dst });
    if !maps.attached.contains(&endpoint) {
        return true;
    }
    let ifindex = maps.ifindex_of(endpoint);
    let ingress_ifindex = match local && maps.attached.contains(&key_addr(flow.src)) {
        true => maps.ifindex_of(key_addr(flow.src)),
        false => UPLINK,
    };
    // A first packet: nothing tracked from earlier questions.
    maps.ct.borrow_mut().clear();
    maps.frags.borrow_mut().clear();
    let kind = if flow.protocol == IPPROTO_TCP { Kind::Tcp } else { Kind::Other };
    let packet = Packet {
        flow,
        kind,
        tcp_flags: TCP_SYN,
        fragment: FragmentKind::Whole,
        ..Packet::default()
    };
    decide(maps, &Hook { dir, ifindex, ingress_ifindex, now: 0 }, &Parsed::ip(packet)).allowed()
}

struct NodeDataplane {
    engine: Engine,
    translator: MapTranslator,
    maps: MapEmulator,
}

impl NodeDataplane {
    fn new(node: &str) -> Self {
        Self {
            engine: Engine::new(Scope::Node(node.into())),
            translator: MapTranslator::new(),
            maps: MapEmulator::default(),
        }
    }

    /// A node whose compiler also compiles ClusterNetworkPolicies (as the eBPF agent's does).
    fn tiered(node: &str) -> Self {
        Self {
            engine: Engine::new(Scope::Node(node.into())).with_cluster_policies(),
            ..Self::new(node)
        }
    }

    fn handle(&mut self, e: &Event) {
        self.handle_together(std::slice::from_ref(e));
    }

    /// Events compiled one by one, their diffs applied together (as the agent does a batch).
    fn handle_together(&mut self, events: &[Event]) {
        let mut diff = PlanDiff::default();
        for e in events {
            diff.extend(self.engine.handle(e.clone()));
        }
        let ops = self.translator.translate(&diff);
        self.maps.apply(&ops);
    }
}

/// Every node's dataplane (made by `make`) fed `state` from nothing, then `events`; the state
/// they come to.
fn replay(
    state: &ClusterState,
    events: &[Event],
    make: fn(&str) -> NodeDataplane,
) -> (ClusterState, HashMap<String, NodeDataplane>) {
    let mut nodes: HashMap<String, NodeDataplane> =
        NODES.iter().map(|n| (n.to_string(), make(n))).collect();
    let mut current = ClusterState::default();
    for e in initial_events(state).iter().chain(events) {
        current.apply(e);
        for n in nodes.values_mut() {
            n.handle(e);
        }
    }
    (current, nodes)
}

fn octets(ip: IpAddr) -> npm_common::Addr {
    addr_key(ip)
}

fn check(
    state: &ClusterState,
    nodes: &HashMap<String, NodeDataplane>,
) -> Result<(), TestCaseError> {
    let ends = ends(state);
    for src in &ends {
        for dst in &ends {
            // (A packet's addresses are of one family.)
            if src.ip == dst.ip || src.ip.is_ipv4() != dst.ip.is_ipv4() {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let flow = Flow {
                        src: octets(src.ip),
                        dst: octets(dst.ip),
                        protocol: protocol.number(),
                        sport: 40000,
                        dport: port,
                    };
                    // The sender's node sees the packet leave, the receiver's node enter.
                    let egress = src
                        .node
                        .as_ref()
                        .is_none_or(|n| programs_allow(&nodes[n].maps, DIR_EGRESS, flow, true));
                    let ingress = dst.node.as_ref().is_none_or(|n| {
                        programs_allow(&nodes[n].maps, DIR_INGRESS, flow, src.node == dst.node)
                    });
                    let want = reference::allowed_between(state, src, dst, protocol, port)
                        && !reference::arrives_spoofed(state, src, dst);
                    prop_assert_eq!(
                        egress && ingress,
                        want,
                        "{:?} {:?}/{} -> {:?}/{}",
                        protocol,
                        src,
                        40000,
                        dst,
                        port
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn encoded_maps_decide_like_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }

    /// With ClusterNetworkPolicies: verdict codes, folded values and three lookups decide
    /// as the specification's tiers do.
    #[test]
    fn encoded_tiers_decide_like_the_specification(state in tiered_cluster(), events in proptest::collection::vec(tiered_event(), 0..12)) {
        let (current, nodes) = replay(&state, &events, NodeDataplane::tiered);
        check(&current, &nodes)?;
        for n in nodes.values() {
            prop_assert_eq!(n.translator.desired().policy.len(), n.maps.policy.len());
        }
    }

    #[test]
    fn diffs_applied_together_decide_like_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..12), chunk in 2usize..6) {
        let mut nodes: HashMap<String, NodeDataplane> = NODES.iter().map(|n| (n.to_string(), NodeDataplane::new(n))).collect();
        let all: Vec<Event> = initial_events(&state).into_iter().chain(events).collect();
        let mut current = ClusterState::default();
        for part in all.chunks(chunk) {
            for e in part {
                current.apply(e);
            }
            for n in nodes.values_mut() {
                n.handle_together(part);
            }
        }
        check(&current, &nodes)?;
    }

    #[test]
    fn map_operations_apply_make_before_break(state in cluster(), events in proptest::collection::vec(event(), 1..8)) {
        make_before_break(NodeDataplane::new("n1"), &state, &events)?;
    }

    /// Dual stack: pods of one family or both, IPv6 blocks beside IPv4 ones; one set of maps
    /// (IPv4 keyed as mapped IPv6) decides both families as the specification does.
    #[test]
    fn encoded_maps_decide_like_the_specification_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 0..12)) {
        decide_like_the_specification(&state, &events)?;
    }

    #[test]
    fn map_operations_apply_make_before_break_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 1..8)) {
        make_before_break(NodeDataplane::new("n1"), &state, &events)?;
    }

    /// ClusterNetworkPolicies created, changed and deleted: every endpoint moves at once to
    /// a complete profile (first match decides, so entries cannot be edited in place).
    #[test]
    fn cluster_policy_changes_apply_make_before_break(
        state in tiered_cluster(),
        events in proptest::collection::vec(prop_oneof![
            3 => cluster_policy().prop_map(Event::UpsertClusterPolicy),
            1 => (0u8..4).prop_map(|i| Event::DeleteClusterPolicy(format!("cnp{i}"))),
        ], 1..6),
    ) {
        make_before_break(NodeDataplane::tiered("n1"), &state, &events)?;
    }
}

/// Every node's maps, fed `state` then `events`, decide as the specification does, and hold
/// exactly what the translator says they hold.
fn decide_like_the_specification(
    state: &ClusterState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let (current, nodes) = replay(state, events, NodeDataplane::new);
    check(&current, &nodes)?;
    for n in nodes.values() {
        let d = n.translator.desired();
        prop_assert_eq!(d.policy.len(), n.maps.policy.len());
        prop_assert_eq!(d.cidrs.len(), n.maps.cidrs.len());
        prop_assert_eq!(d.endpoints.len(), n.maps.endpoints.len());
    }
    Ok(())
}

/// After every map operation of every event's diff, no probe is refused that both the plan
/// before and the plan after admit, and none admitted that neither does.
fn make_before_break(
    mut n: NodeDataplane,
    state: &ClusterState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let initial = initial_events(state);
    for e in &initial {
        n.handle(e);
    }
    let mut current = state.clone();
    for e in events {
        let old = n.engine.plan();
        let diff = n.engine.handle(e.clone());
        current.apply(e);
        let new = n.engine.plan();
        // Addresses switching identity are matched by the old or the new one meanwhile;
        // an endpoint whose address passes to another pod may admit more (see `PlanDiff`).
        let switching = identity_switches(&old, &diff);
        let retargeted = retargeted_endpoints(&diff);
        let mut addrs = addresses(&current);
        addrs.extend(addresses(state));
        addrs.sort();
        addrs.dedup();
        let local: HashSet<IpAddr> =
            old.endpoints.keys().chain(new.endpoints.keys()).copied().collect();
        let node: HashSet<IpAddr> = old.node_ips.iter().chain(&new.node_ips).copied().collect();
        let mut all = Vec::new();
        for &ep in &local {
            for &peer in addrs
                .iter()
                .filter(|a| !local.contains(a) && !node.contains(a) && !switching.contains(a))
                .filter(|a| a.is_ipv4() == ep.is_ipv4())
            {
                for d in Direction::BOTH {
                    for (protocol, port) in [
                        (Protocol::Tcp, 80),
                        (Protocol::Udp, 53),
                        (Protocol::Tcp, 8080),
                        (Protocol::Sctp, 81),
                    ] {
                        all.push((ep, d, peer, protocol, port));
                    }
                }
            }
        }
        let o: Vec<bool> = all
            .iter()
            .map(|&(ep, d, peer, pr, po)| dataplane_admits(&old, ep, d, peer, pr, po))
            .collect();
        let nw: Vec<bool> = all
            .iter()
            .map(|&(ep, d, peer, pr, po)| dataplane_admits(&new, ep, d, peer, pr, po))
            .collect();
        let ops = n.translator.translate(&diff);
        for (i, op) in ops.iter().enumerate() {
            n.maps.apply(std::slice::from_ref(op));
            for (k, &(ep, d, peer, protocol, port)) in all.iter().enumerate() {
                let (src, dst, dir) = match d {
                    Direction::Ingress => (peer, ep, DIR_INGRESS),
                    Direction::Egress => (ep, peer, DIR_EGRESS),
                };
                let flow = Flow {
                    src: octets(src),
                    dst: octets(dst),
                    protocol: protocol.number(),
                    sport: 40000,
                    dport: port,
                };
                let mid = programs_allow(&n.maps, dir, flow, local.contains(&src));
                prop_assert!(
                    mid || !(o[k] && nw[k]),
                    "after op {} ({:?}): {:?} refused though both plans admit it; ops {:#?}",
                    i,
                    op,
                    all[k],
                    ops
                );
                prop_assert!(
                    !mid || o[k] || nw[k] || retargeted.contains(&ep),
                    "after op {} ({:?}): {:?} admitted though neither plan admits it; ops {:#?}",
                    i,
                    op,
                    all[k],
                    ops
                );
            }
        }
    }
    Ok(())
}
