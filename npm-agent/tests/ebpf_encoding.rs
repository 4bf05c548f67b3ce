//! The eBPF encoding against the specification: random clusters and event sequences are
//! compiled per node, encoded as map operations, applied to a host model of the maps, and
//! every connection is decided by `npm_common::decide` — the very code the tc programs run —
//! on the source node's maps (egress) and the destination node's (ingress). The verdicts
//! must equal the reference evaluator's.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;

use proptest::prelude::*;

use common::*;
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::ebpf::model::MapModel;
use npm_agent::dataplane::ebpf::translate::Translator;
use npm_agent::model::Protocol;
use npm_agent::reference;
use npm_agent::state::{ClusterState, Event};
use npm_common::{DIR_EGRESS, DIR_INGRESS, Flow, decide};

struct NodeDataplane {
    engine: Engine,
    translator: Translator,
    maps: MapModel,
}

impl NodeDataplane {
    fn new(node: &str) -> Self {
        Self { engine: Engine::new(Scope::Node(node.into())), translator: Translator::new(), maps: MapModel::default() }
    }

    fn handle(&mut self, e: &Event) {
        let diff = self.engine.handle(e.clone());
        let ops = self.translator.translate(&diff);
        self.maps.apply(&ops);
    }
}

fn octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(_) => unreachable!("the universe is IPv4"),
    }
}

fn check(state: &ClusterState, nodes: &HashMap<String, NodeDataplane>) -> Result<(), TestCaseError> {
    let addrs = addresses(state);
    for &src in &addrs {
        for &dst in &addrs {
            if src == dst {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    let flow = Flow { src: octets(src), dst: octets(dst), protocol: protocol.number(), sport: 40000, dport: port };
                    // Every node's programs see the packet only at its own pods' veths, so
                    // asking every node is the same as asking the owners'.
                    let egress = nodes.values().all(|n| decide(&n.maps, &flow, DIR_EGRESS).allowed());
                    let ingress = nodes.values().all(|n| decide(&n.maps, &flow, DIR_INGRESS).allowed());
                    let want = reference::allowed(state, src, dst, protocol, port);
                    prop_assert_eq!(egress && ingress, want, "{:?} {}/{} -> {}/{}", protocol, src, 40000, dst, port);
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
        let mut nodes: HashMap<String, NodeDataplane> = NODES.iter().map(|n| (n.to_string(), NodeDataplane::new(n))).collect();
        let initial: Vec<Event> = state.namespaces.values().cloned().map(Event::UpsertNamespace)
            .chain(state.nodes.values().cloned().map(Event::UpsertNode))
            .chain(state.policies.values().cloned().map(Event::UpsertPolicy))
            .chain(state.pods.values().cloned().map(Event::UpsertPod))
            .collect();
        let mut current = ClusterState::default();
        for e in initial.iter().chain(events.iter()) {
            current.apply(e);
            for n in nodes.values_mut() {
                n.handle(e);
            }
        }
        check(&current, &nodes)?;
        // The maps hold exactly what the translator says they hold.
        for n in nodes.values() {
            let d = n.translator.desired();
            prop_assert_eq!(d.policy.len(), n.maps.policy.len());
            prop_assert_eq!(d.cidrs.len(), n.maps.cidrs.len());
            prop_assert_eq!(d.endpoints.len(), n.maps.endpoints.len());
        }
    }
}
