//! A burst of policy events (docs/BENCHMARKS.md, "A burst of policies"): N NetworkPolicies
//! (default 10,000) arriving one after the other, as after an API server restart or a GitOps
//! sync, through the agent itself (`Agent::handle_batch`) on a node with 50 of a 250-pod
//! cluster's pods; then deleted the same way. Each policy selects a tenth of the node's pods
//! and admits a client selector and an ipBlock on its own port. Delivered as the Kubernetes
//! source delivers what is queued (one batch), and, for comparison, one event per batch. The
//! eBPF dataplane writes real maps (programs not attached); the iptables dataplane (both
//! backends) a scratch network namespace, with IPTABLES_POLICIES policies (default N), in one
//! batch. As root.
//!
//! ```text
//! cargo run --release -p npm-agent --example burst [N [IPTABLES_POLICIES]]
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use npm_agent::agent::Agent;
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_agent::dataplane::iptables::{Backend, IptablesConfig, IptablesDataplane};
use npm_agent::model::{
    CidrBlock, LabelSelector, Namespace, NamespaceScope, Node, ObjectKey, Peer, Pod, Policy,
    PortSpec, Protocol, Rule,
};
use npm_agent::netns::Scratch;
use npm_agent::source::{Batch, Source, SourceHealth};
use npm_agent::state::Event;

/// The agent here is fed by hand (`handle_batch`).
struct Nothing;

impl Source for Nothing {
    fn describe(&self) -> String {
        "burst".into()
    }
    fn next_batch(&mut self, _: Duration) -> anyhow::Result<Option<Batch>> {
        Ok(None)
    }
    fn health(&self) -> SourceHealth {
        SourceHealth::default()
    }
}

fn pod(name: &str, ip: Ipv4Addr, node: &str, group: u32) -> Pod {
    let labels = BTreeMap::from([
        ("app".into(), "web".into()),
        ("group".into(), format!("g{}", group % 10)),
    ]);
    Pod::running(ObjectKey::new("x", name), labels, IpAddr::V4(ip), node)
}

fn policy(i: u32) -> Policy {
    let port = 1000 + (i % 5000) as u16;
    let cidr = format!("172.16.{}.{}/32", (i / 250) % 250, i % 250 + 1);
    Policy {
        key: ObjectKey::new("x", format!("np{i}")),
        pod_selector: LabelSelector::from_labels([("group", format!("g{}", i % 10).as_str())]),
        ingress: Some(vec![Rule {
            peers: vec![
                Peer::Pods {
                    namespaces: NamespaceScope::Named("x".into()),
                    pods: LabelSelector::from_labels([("role", "client")]),
                },
                Peer::Block(CidrBlock::new(cidr.parse().expect("cidr"), [])),
            ],
            ports: vec![PortSpec::Range { protocol: Protocol::Tcp, first: port, last: port }],
        }]),
        egress: None,
    }
}

/// The cluster, delivered as the initial sync.
fn cluster() -> Vec<Event> {
    let mut events = vec![Event::UpsertNode(Node {
        name: "n1".into(),
        addresses: vec!["10.1.0.1".parse().expect("ip")],
        ..Default::default()
    })];
    events.push(Event::UpsertNamespace(Namespace::new("x", BTreeMap::new())));
    for i in 0..250u32 {
        let node = if i < 50 { "n1" } else { "n2" };
        let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1);
        events.push(Event::UpsertPod(pod(&format!("p{i}"), ip, node, i)));
    }
    events
}

/// Creates and then deletes `n` policies, delivered in batches of `per_batch` events.
fn burst(dp: Box<dyn Dataplane>, n: u32, per_batch: usize) -> (Duration, Duration) {
    let mut agent = Agent::new("n1", Box::new(Nothing), dp, None);
    agent.handle_batch(Batch { events: cluster(), synced: true, generation: None });
    let mut run = |events: Vec<Event>| {
        let t = Instant::now();
        for chunk in events.chunks(per_batch) {
            agent.handle_batch(Batch { events: chunk.to_vec(), synced: true, generation: None });
        }
        t.elapsed()
    };
    let create = run((0..n).map(|i| Event::UpsertPolicy(policy(i))).collect());
    let delete = run((0..n).map(|i| Event::DeletePolicy(policy(i).key)).collect());
    assert!(agent.handles().status().in_sync, "the dataplane applied every batch");
    (create, delete)
}

/// The scratch network namespaces' names begin with it.
const TAG: &str = "npm-burst";

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>().expect("a number"));
    let n = args.next().unwrap_or(10_000);
    let n_iptables = args.next().unwrap_or(n);
    assert!(unsafe { libc::geteuid() } == 0, "run as root (maps, network namespaces)");
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/npm-burst-{}", std::process::id()));
    for (what, per_batch) in [("one batch", n as usize), ("one event per batch", 1)] {
        let config = EbpfConfig {
            pin_root: pin_root.clone(),
            drop_events: Default::default(),
            attach: false,
        };
        let dp = EbpfDataplane::open(config).expect("load eBPF");
        let (create, delete) = burst(Box::new(dp), n, per_batch);
        println!("eBPF, {n} policies, {what}: created in {create:.2?}, deleted in {delete:.2?}");
        let _ = std::fs::remove_dir_all(&pin_root);
    }
    // (IPTABLES_POLICIES 0: the eBPF part only.)
    let backends = if n_iptables == 0 { vec![] } else { vec![Backend::Nft, Backend::Legacy] };
    for backend in backends {
        let ns = Scratch::new(format!("{TAG}-{}-{}", std::process::id(), backend.as_str()))
            .expect("ip netns add");
        let dp = IptablesDataplane::open(IptablesConfig {
            backend: Some(backend),
            netns: Some(ns.path()),
            ..IptablesConfig::default()
        })
        .expect("open iptables");
        let (create, delete) = burst(Box::new(dp), n_iptables, n_iptables as usize);
        println!(
            "iptables ({}), {n_iptables} policies, one batch: created in {create:.2?}, deleted \
             in {delete:.2?}",
            backend.as_str()
        );
    }
}
