//! eBPF dataplane benchmarks (root only; prints a note and exits otherwise):
//! - per-packet cost of the tc program through BPF_PROG_TEST_RUN, for a new flow (allowed,
//!   tracked), a new flow that is denied (the full policy lookup, nothing tracked) and a packet
//!   of an established flow, with 1, 100, 1k and 10k policies selecting the endpoint;
//! - the same at 10k policies beside 0, 1 and 1,000 ClusterNetworkPolicies selecting the
//!   endpoint (tiers are resolved into the trie's values: still three lookups);
//! - IPv6 beside IPv4 at 1 and 10k policies (dual-stack endpoint and client);
//! - the time from an event (a pod created, a policy created) to its map entries being
//!   written: compiler plus dataplane, p50/p90/p99.
//!
//! `cargo bench -p npm-agent --bench dataplane` (or `cargo xtask bench`). The kernel measures
//! the program's run time itself (`duration` of BPF_PROG_TEST_RUN), without syscall overhead.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::ebpf::testrun;
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_agent::model::cluster_policy::{
    Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, PodSet, Tier,
};
use npm_agent::model::{
    CidrBlock, LabelSelector, Namespace, NamespaceScope, Node, ObjectKey, Peer, Pod, Policy,
    PortSpec, Protocol, Rule,
};
use npm_agent::state::Event;
use npm_common::{DIR_EGRESS, DIR_INGRESS};

const ENDPOINT: [u8; 4] = [10, 0, 0, 1];
/// The loopback device's index.
const LOOPBACK: u32 = 1;
const CLIENT: [u8; 4] = [10, 0, 1, 1];

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, app: &str) -> Pod {
    let labels = BTreeMap::from([("app".to_string(), app.to_string())]);
    Pod::running(ObjectKey::new(ns, name), labels, IpAddr::V4(Ipv4Addr::from(ip)), node)
}

/// Policy `i` selects the endpoint and admits one /32 (outside the client) on one port, so
/// every policy adds its own CIDR prefix and policy-trie entries. Policy 0 admits the client's
/// pods on port 80.
fn policy(i: usize) -> Policy {
    let peer = if i == 0 {
        Peer::Pods {
            namespaces: NamespaceScope::Selector(LabelSelector::everything()),
            pods: LabelSelector::from_labels([("app", "client")]),
        }
    } else {
        let ip =
            Ipv4Addr::new(172, 16 + (i / 65536) as u8, ((i / 256) % 256) as u8, (i % 256) as u8);
        Peer::Block(CidrBlock::new(ipnet::IpNet::from(IpAddr::V4(ip)), []))
    };
    Policy {
        key: ObjectKey::new("x", format!("p{i}")),
        pod_selector: LabelSelector::everything(),
        ingress: Some(vec![Rule {
            peers: vec![peer],
            ports: vec![PortSpec::Range {
                protocol: Protocol::Tcp,
                first: 80 + (i % 1000) as u16,
                last: 80 + (i % 1000) as u16,
            }],
        }]),
        egress: None,
    }
}

fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    p.extend_from_slice(&ip);
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    p.extend_from_slice(&t);
    p
}

struct Setup {
    engine: Engine,
    dp: EbpfDataplane,
    pin_root: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}

impl Setup {
    fn new(tag: &str) -> Setup {
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/npm-bench-{}-{tag}", std::process::id()));
        let dp = EbpfDataplane::open(EbpfConfig {
            pin_root: pin_root.clone(),
            drop_events: Default::default(),
            attach: false,
        })
        .expect("load eBPF");
        let engine = Engine::new(Scope::Node("n1".into())).with_cluster_policies();
        let mut s = Setup { engine, dp, pin_root };
        s.event(Event::UpsertNode(Node {
            name: "n1".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1))],
            ..Default::default()
        }));
        for ns in ["x", "y"] {
            s.event(Event::UpsertNamespace(Namespace::new(ns, BTreeMap::new())));
        }
        s.event(Event::UpsertPod(pod("x", "server", ENDPOINT, "n1", "server")));
        s.event(Event::UpsertPod(pod("y", "client", CLIENT, "n2", "client")));
        // BPF_PROG_TEST_RUN runs packets at the loopback device unless told otherwise: it
        // stands for the server's veth.
        s.dp.bind_interface(IpAddr::V4(Ipv4Addr::from(ENDPOINT)), LOOPBACK).expect("bind");
        s
    }

    fn event(&mut self, e: Event) -> Duration {
        let t = Instant::now();
        let diff = self.engine.handle(e);
        self.dp.apply(&diff).expect("apply");
        t.elapsed()
    }

    /// Average kernel run time of the to-pod program (one packet, `repeat` times), seen at the
    /// endpoint's interface (the loopback device stands for its veth: `Setup::new` binds it).
    fn run(&mut self, pkt: &[u8], repeat: u32) -> (Duration, u32) {
        self.run_dir(DIR_INGRESS, pkt, repeat)
    }

    fn run_dir(&mut self, dir: u8, pkt: &[u8], repeat: u32) -> (Duration, u32) {
        let r = testrun::run(&mut self.dp, dir, LOOPBACK, LOOPBACK, pkt, repeat).expect("test run");
        (r.duration, r.verdict)
    }
}

/// ClusterNetworkPolicy `i`: Admin (even) or Baseline (odd), selecting every pod, accepting
/// every namespace's pods on TCP port 2000 + i: an entry per CNP for the client's identity
/// and the server's, so the client's key group holds them all.
fn cluster_policy(i: usize) -> ClusterPolicy {
    let every = PodSet { namespaces: LabelSelector::everything(), pods: None };
    let port = 2000 + i as u16;
    ClusterPolicy {
        name: format!("cnp-{i:04}"),
        tier: if i.is_multiple_of(2) { Tier::Admin } else { Tier::Baseline },
        priority: (i % 1000) as u32,
        subject: every.clone(),
        ingress: vec![ClusterRule {
            name: None,
            action: Action::Accept,
            peers: vec![ClusterPeer::Pods(every)],
            ports: Some(vec![ClusterPort::Range {
                protocol: Protocol::Tcp,
                first: port,
                last: port,
            }]),
        }],
        egress: Vec::new(),
    }
}

fn per_packet() {
    per_packet_rows("policies", [1usize, 100, 1_000, 10_000].map(|n| (n, 0)));
}

fn tiers() {
    println!();
    per_packet_rows("CNPs (10k NPs)", [0usize, 1, 1_000].map(|c| (10_000, c)));
}

/// One row per (NetworkPolicies, ClusterNetworkPolicies) selecting the endpoint.
fn per_packet_rows(label: &str, rows: impl IntoIterator<Item = (usize, usize)>) {
    println!("per-packet cost (npm_to_pod, ns per packet, kernel-measured)");
    println!(
        "{:>14} {:>16} {:>16} {:>16}",
        label, "new flow allowed", "new flow denied", "established"
    );
    let mut first: Option<[f64; 3]> = None;
    for (n, cnps) in rows {
        let mut s = Setup::new(&format!("pp{n}-{cnps}"));
        for i in 0..n {
            s.event(Event::UpsertPolicy(policy(i)));
        }
        for i in 0..cnps {
            s.event(Event::UpsertClusterPolicy(cluster_policy(i)));
        }
        // New allowed flows: one packet each, distinct source ports (each one a conntrack miss
        // and insert), averaged.
        let flows = 20_000u32;
        let mut total = Duration::ZERO;
        for k in 0..flows {
            let (d, v) =
                s.run(&packet(CLIENT, ENDPOINT, 1024 + (k % 60000) as u16 + (n % 3) as u16, 80), 1);
            assert_eq!(v, u32::MAX, "allowed");
            total += d;
        }
        let new_allowed = total.as_nanos() as f64 / flows as f64;
        // Denied: the full lookup on every repetition (nothing is tracked).
        let (d, v) = s.run(&packet(CLIENT, ENDPOINT, 5555, 81), 1_000_000);
        assert_eq!(v, 2, "denied");
        let denied = d.as_nanos() as f64;
        // Established: the first run tracks the flow, then every repetition hits conntrack.
        let est_pkt = packet(CLIENT, ENDPOINT, 6666, 80);
        s.run(&est_pkt, 1);
        let (d, _) = s.run(&est_pkt, 1_000_000);
        let established = d.as_nanos() as f64;
        let row = [new_allowed, denied, established];
        let base = *first.get_or_insert(row);
        let n = if label == "policies" { n } else { cnps };
        println!(
            "{n:>14} {:>10.0} ({:.2}x) {:>10.0} ({:.2}x) {:>10.0} ({:.2}x)",
            row[0],
            row[0] / base[0],
            row[1],
            row[1] / base[1],
            row[2],
            row[2] / base[2]
        );
    }
}

const ENDPOINT6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A TCP SYN over IPv6.
fn packet6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&20u16.to_be_bytes());
    ip[6] = 6;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&dst);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&packet(CLIENT, ENDPOINT, sport, dport)[34..]);
    p
}

/// IPv6 beside IPv4: the server and the client dual stack, the same policies (policy 0's pod
/// selector admits the client over both families); each packet kind of both families.
fn ipv6() {
    println!(
        "
per-packet cost by family (npm_to_pod, ns per packet, kernel-measured)"
    );
    println!(
        "{:>9} {:>6} {:>16} {:>16} {:>16}",
        "policies", "family", "new flow allowed", "new flow denied", "established"
    );
    for n in [1usize, 10_000] {
        let mut s = Setup::new(&format!("v6-{n}"));
        let dual = |p: Pod, v6: [u8; 16]| Pod { ipv6: Some(v6.into()), ..p };
        s.event(Event::UpsertPod(dual(pod("x", "server", ENDPOINT, "n1", "server"), ENDPOINT6)));
        s.event(Event::UpsertPod(dual(pod("y", "client", CLIENT, "n2", "client"), CLIENT6)));
        s.dp.bind_interface(IpAddr::from(ENDPOINT6), LOOPBACK).expect("bind");
        for i in 0..n {
            s.event(Event::UpsertPolicy(policy(i)));
        }
        type Make = fn(u16, u16) -> Vec<u8>;
        let families: [(&str, Make); 2] = [
            ("IPv4", |sp, dp| packet(CLIENT, ENDPOINT, sp, dp)),
            ("IPv6", |sp, dp| packet6(CLIENT6, ENDPOINT6, sp, dp)),
        ];
        for (family, make) in families {
            let flows = 20_000u32;
            let mut total = Duration::ZERO;
            for k in 0..flows {
                let (d, v) = s.run(&make(1024 + (k % 60000) as u16, 80), 1);
                assert_eq!(v, u32::MAX, "{family}: allowed");
                total += d;
            }
            let new_allowed = total.as_nanos() as f64 / flows as f64;
            let (d, v) = s.run(&make(5555, 81), 1_000_000);
            assert_eq!(v, 2, "{family}: denied");
            let denied = d.as_nanos() as f64;
            let est = make(6666, 80);
            s.run(&est, 1);
            let (d, _) = s.run(&est, 1_000_000);
            println!(
                "{n:>9} {family:>6} {new_allowed:>16.0} {denied:>16.0} {:>16.0}",
                d.as_nanos() as f64
            );
        }
    }
}

/// The checks a packet leaving a pod meets first, at 1 policy: its source (a packet of a
/// tracked flow, so the rest is one conntrack hit), and a forged source (dropped there).
fn egress_checks() {
    println!("\nnpm_from_pod at 1 policy, ns per packet (10^6 repetitions each)");
    let mut s = Setup::new("egress");
    s.event(Event::UpsertPolicy(policy(0)));
    let reply = packet(ENDPOINT, CLIENT, 80, 7777);
    s.run(&packet(CLIENT, ENDPOINT, 7777, 80), 1); // the flow, tracked on the way in
    let (d, v) = s.run_dir(DIR_EGRESS, &reply, 1_000_000);
    assert_eq!(v, u32::MAX, "a reply passes");
    println!(
        "  reply of a tracked flow (source checked, then conntrack): {:>6.0}",
        d.as_nanos() as f64
    );
    let (d, v) = s.run_dir(DIR_EGRESS, &packet([10, 9, 9, 9], CLIENT, 80, 7777), 1_000_000);
    assert_eq!(v, 2, "a forged source is dropped");
    println!(
        "  forged source (dropped at the source check):            {:>6.0}",
        d.as_nanos() as f64
    );
}

/// What a denied packet costs with drop events off, at the default rate (after the burst:
/// the limiter says no, the flood case), and without a limit (every drop tries the ring
/// buffer; nobody reads it here, so after the first 6,500 it is full and the write fails
/// fast: the reserve is still tried).
fn drop_event_cost() {
    use npm_agent::dataplane::ebpf::events::EventRate;
    println!("\nnpm_to_pod, a denied packet at 1 policy, ns per packet (10^6 repetitions each)");
    let mut s = Setup::new("events");
    s.event(Event::UpsertPolicy(policy(0)));
    let denied = packet(CLIENT, ENDPOINT, 5555, 81);
    for (label, rate) in [
        ("drop events off (rate 0)", EventRate { per_second: 0, burst: 1 }),
        ("default rate, limiter saying no", EventRate::DEFAULT),
        ("unlimited, every drop an event", EventRate { per_second: u32::MAX, burst: u32::MAX }),
    ] {
        s.dp.set_drop_events(rate).expect("config");
        s.run(&denied, 1_000); // past the burst
        let (d, v) = s.run(&denied, 1_000_000);
        assert_eq!(v, 2, "denied");
        println!("  {label:<34} {:>6.0}", d.as_nanos() as f64);
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!(
        "p50 {:>9.1?}  p90 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        p(0.5),
        p(0.9),
        p(0.99),
        v[v.len() - 1]
    )
}

fn event_to_maps() {
    println!(
        "\nevent to maps written (compiler + eBPF dataplane), with 1,000 policies selecting the node's pods"
    );
    let mut s = Setup::new("lat");
    for i in 0..1_000 {
        s.event(Event::UpsertPolicy(policy(i)));
    }
    // 1,000 peer pods elsewhere in the cluster.
    for i in 0..1_000u32 {
        let ip = [10, 2, (i / 250) as u8, (i % 250) as u8 + 1];
        s.event(Event::UpsertPod(pod("y", &format!("peer{i}"), ip, "n2", "client")));
    }
    let mut pods = Vec::new();
    for i in 0..1_000u32 {
        // A pod created on this node: it is selected by every policy (1,000 policies' entries).
        let ip = [10, 3, (i / 250) as u8, (i % 250) as u8 + 1];
        pods.push(s.event(Event::UpsertPod(pod("x", &format!("new{i}"), ip, "n1", "server"))));
        s.event(Event::DeletePod(ObjectKey::new("x", format!("new{i}"))));
    }
    println!("  local pod created (1,000 policies select it):  {}", percentiles(pods));
    let mut remote = Vec::new();
    for i in 0..1_000u32 {
        let ip = [10, 4, (i / 250) as u8, (i % 250) as u8 + 1];
        remote.push(s.event(Event::UpsertPod(pod("y", &format!("remote{i}"), ip, "n2", "client"))));
    }
    println!("  remote peer pod created (joins a selector):     {}", percentiles(remote));
    let mut policies = Vec::new();
    for i in 0..1_000 {
        let mut p = policy(2_000 + i);
        p.key = ObjectKey::new("x", format!("extra{i}"));
        policies.push(s.event(Event::UpsertPolicy(p)));
    }
    println!("  policy created (selects the node's pods):       {}", percentiles(policies));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks harness=false benches to list; nothing to list.
    }
    if !root() {
        println!("dataplane benchmarks need root (BPF_PROG_TEST_RUN); skipped");
        return;
    }
    // `cargo bench --bench dataplane -- NAME...` runs only the named parts.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let parts: [(&str, fn()); 6] = [
        ("per-packet", per_packet),
        ("tiers", tiers),
        ("ipv6", ipv6),
        ("egress-checks", egress_checks),
        ("drop-events", drop_event_cost),
        ("event-to-maps", event_to_maps),
    ];
    for (name, part) in parts {
        if only.is_empty() || only.iter().any(|o| o == name) {
            part();
        }
    }
}
