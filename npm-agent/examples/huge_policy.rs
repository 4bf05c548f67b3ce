//! One huge NetworkPolicy (docs/BENCHMARKS.md, "One huge policy"): RULES ingress and RULES
//! egress rules (default 10,000, the most a direction may expand to), each one peer (a /32
//! ipBlock or a pod selector) and one port, selecting the node's 50 pods (each with labels of
//! its own), on a node of a 250-pod cluster; validated, created, then deleted. Prints how long
//! validation takes (and whether it rejects the policy), then, for the eBPF dataplane (maps
//! under a scratch pin root, programs not attached) and the iptables dataplane (both
//! backends, in a scratch network namespace), the time the compiler and the dataplane take
//! for each event, what they write and the peak memory of each run. As root.
//!
//! ```text
//! cargo run --release -p npm-agent --example huge_policy [RULES]
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Instant;

use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::ebpf::translate::MapTranslator;
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_agent::dataplane::iptables::{Backend, IptablesConfig, IptablesDataplane};
use npm_agent::model::convert::policy_to_k8s;
use npm_agent::model::validate::network_policy;
use npm_agent::model::{
    CidrBlock, LabelSelector, Namespace, NamespaceScope, Node, ObjectKey, Peer, Pod, Policy,
    PortSpec, Protocol, Rule,
};
use npm_agent::netns::Scratch;
use npm_agent::state::Event;

fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    kb("VmHWM:") / 1024.0
}

fn pod(ns: &str, name: &str, ip: Ipv4Addr, node: &str, id: u32) -> Pod {
    let labels =
        BTreeMap::from([("app".into(), "web".into()), ("id".into(), format!("{}", id % 100))]);
    Pod::running(ObjectKey::new(ns, name), labels, IpAddr::V4(ip), node)
}

fn rules(n: usize, salt: u8) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let peer = if i % 2 == 0 {
                let ip = Ipv4Addr::new(172, 16 + salt, (i / 256 % 256) as u8, (i % 256) as u8);
                Peer::Block(CidrBlock::new(ipnet::IpNet::from(IpAddr::V4(ip)), []))
            } else {
                Peer::Pods {
                    namespaces: NamespaceScope::Named("y".into()),
                    pods: LabelSelector::from_labels([("id", format!("{}", i % 100).as_str())]),
                }
            };
            let port = 1000 + (i % 20_000) as u16;
            Rule {
                peers: vec![peer],
                ports: vec![PortSpec::Range { protocol: Protocol::Tcp, first: port, last: port }],
            }
        })
        .collect()
}

/// Resets the peak RSS (`VmHWM`), so that each run reports its own.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Builds the cluster, then creates and deletes `policy`, timing each step.
fn run(
    what: &str,
    mut engine: Engine,
    dp: &mut dyn Dataplane,
    mut translator: Option<MapTranslator>,
    policy: &Policy,
) {
    reset_peak();
    let mut handle = |e: Event, what: &str| {
        let t = Instant::now();
        let diff = engine.handle(e);
        let compiled = t.elapsed();
        let t = Instant::now();
        let ops = translator.as_mut().map(|tr| tr.translate(&diff).len());
        let translated = t.elapsed();
        let t = Instant::now();
        dp.apply(&diff).expect("apply");
        let applied = t.elapsed();
        if !what.is_empty() {
            let translate = match ops {
                Some(ops) => format!(", translate {translated:.2?} ({ops} map operations)"),
                None => String::new(),
            };
            println!(
                "  {what}: compile {compiled:.2?} ({} changes){translate}, dataplane apply \
                 {applied:.2?}, peak RSS {:.0} MiB",
                diff.len(),
                rss_mib()
            );
        }
    };
    handle(
        Event::UpsertNode(Node {
            name: "n1".into(),
            addresses: vec!["10.1.0.1".parse().unwrap()],
            ..Default::default()
        }),
        "",
    );
    for ns in ["x", "y"] {
        handle(Event::UpsertNamespace(Namespace::new(ns, BTreeMap::new())), "");
    }
    for i in 0..250u32 {
        let (ns, node) = if i < 50 { ("x", "n1") } else { ("y", "n2") };
        let ip = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8 + 1);
        handle(Event::UpsertPod(pod(ns, &format!("p{i}"), ip, node, i)), "");
    }
    println!("{what}:");
    handle(Event::UpsertPolicy(policy.clone()), "created");
    handle(Event::DeletePolicy(policy.key.clone()), "deleted");
}

/// The scratch network namespaces' names begin with it.
const TAG: &str = "npm-huge";

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(npm_agent::model::validate::MAX_DIRECTION_ENTRIES);
    assert!(unsafe { libc::geteuid() } == 0, "run as root (maps, network namespaces)");
    println!("{n} ingress and {n} egress rules, selecting the node's 50 pods:");
    let policy = Policy {
        key: ObjectKey::new("x", "huge"),
        pod_selector: LabelSelector::from_labels([("app", "web")]),
        ingress: Some(rules(n, 0)),
        egress: Some(rules(n, 1)),
    };
    let t = Instant::now();
    let validated = network_policy(&policy_to_k8s(&policy));
    println!(
        "validated in {:.2?}: {}",
        t.elapsed(),
        match &validated {
            Ok(_) => "accepted".to_string(),
            Err(e) => format!(
                "rejected ({})",
                e.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
            ),
        }
    );
    if validated.is_err() {
        return;
    }
    let scope = Scope::Node("n1".into());
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/npm-huge-{}", std::process::id()));
    let config =
        EbpfConfig { pin_root: pin_root.clone(), drop_events: Default::default(), attach: false };
    let mut dp = EbpfDataplane::open(config).expect("load eBPF");
    run("eBPF", Engine::new(scope.clone()), &mut dp, Some(MapTranslator::new()), &policy);
    drop(dp);
    let _ = std::fs::remove_dir_all(&pin_root);
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = Scratch::new(format!("{TAG}-{}-{}", std::process::id(), backend.as_str()))
            .expect("ip netns add");
        let mut dp = IptablesDataplane::open(IptablesConfig {
            backend: Some(backend),
            netns: Some(ns.path()),
            ..IptablesConfig::default()
        })
        .expect("open iptables");
        let what = format!("iptables ({})", backend.as_str());
        run(&what, Engine::new(scope.clone()).with_layout(), &mut dp, None, &policy);
    }
}
