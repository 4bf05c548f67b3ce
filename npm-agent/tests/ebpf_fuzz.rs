//! The programs in the kernel against their own code on the host, on random frames: each
//! sequence of frames (odd headers, truncations, options, fragments, every TCP flag byte,
//! ICMP errors, forged sources, IPv6 with extension-header chains, fragments, ICMPv6 errors,
//! neighbour discovery and link-local or mapped addresses, other ethertypes, random bytes) runs through the real tc
//! programs (BPF_PROG_TEST_RUN, at the interface of a local pod or the uplink) and through
//! `classify_frame` + `decide` over a snapshot of the very maps the kernel holds, taken before
//! the sequence; connection tracking and fragments evolve on both sides. The verdict and the
//! reason (the counter that moved) must agree on every frame.
//!
//! `NPM_FUZZ_CASES` sets the number of sequences (default 1,000, of up to 24 frames each).
//! Needs root; without it each test says so and passes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use aya::maps::{HashMap as BpfHashMap, MapData};
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::ebpf::kernel::boot_time_ns;
use npm_agent::dataplane::ebpf::testrun::{self, PASS, TestInterfaces};
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_agent::model::validate::network_policy;
use npm_agent::model::{NamedPort, Namespace, Node, ObjectKey, Pod, Protocol};
use npm_agent::state::Event;
use npm_common::conntrack::{FragKey, FragValue};
use npm_common::{
    CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, Hook, MAP_CT, MAP_FRAGS, Reason, classify_frame,
    decide,
};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestRunner};

const A: [u8; 4] = [10, 0, 0, 1]; // x/a on this node, veth-a
const B: [u8; 4] = [10, 0, 0, 2]; // x/b on this node, veth-b
const C: [u8; 4] = [10, 0, 1, 3]; // y/c elsewhere
const NODE: [u8; 4] = [10, 1, 0, 1];
const OUTSIDE: [u8; 4] = [192, 168, 7, 7];
// IPv6: x/a and y/c are dual stack, x/b has IPv4 only.
const A6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const C6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x40, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x13];
const OUTSIDE6: [u8; 16] = [0xfd, 0x99, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const LINK_LOCAL: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 1, 3];

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, app: &str) -> Pod {
    let labels = BTreeMap::from([("app".to_string(), app.to_string())]);
    Pod {
        named_ports: vec![NamedPort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 }]
            .into(),
        ..Pod::running(ObjectKey::new(ns, name), labels, IpAddr::V4(Ipv4Addr::from(ip)), node)
    }
}

/// A frame and where it is seen.
#[derive(Clone, Debug)]
struct Shot {
    dir: u8,
    /// 0: veth-a, 1: veth-b, 2: uplink.
    at: usize,
    /// 0: veth-a, 1: veth-b, 2: uplink, 3: none (the node sent it).
    from: usize,
    frame: Vec<u8>,
}

fn addr() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![4 => select(vec![A, B, C, NODE, OUTSIDE]), 1 => any::<[u8; 4]>()]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => select(vec![80u16, 53, 5432, 8080, 40000, 40001]), 1 => any::<u16>()]
}

/// A transport header (and what the IPv4 protocol field says).
fn transport() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let tcp = (
        port(),
        port(),
        prop_oneof![
            select(vec![0x02u8, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x03, 0x06, 0x29, 0x00]),
            any::<u8>()
        ],
    )
        .prop_map(|(s, d, f)| {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&s.to_be_bytes());
            t[2..4].copy_from_slice(&d.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = f;
            (6u8, t)
        });
    let udp = (select(vec![17u8, 132]), port(), port()).prop_map(|(p, s, d)| {
        let mut u = vec![0u8; 12];
        u[0..2].copy_from_slice(&s.to_be_bytes());
        u[2..4].copy_from_slice(&d.to_be_bytes());
        (p, u)
    });
    let echo = (select(vec![0u8, 8]), any::<u16>()).prop_map(|(t, id)| {
        let mut m = vec![t, 0, 0, 0, 0, 0, 0, 1];
        m[4..6].copy_from_slice(&id.to_be_bytes());
        (1u8, m)
    });
    // An ICMP error quoting a packet between two of the addresses.
    let error = (
        select(vec![3u8, 4, 5, 11, 12, 9]),
        addr(),
        addr(),
        select(vec![6u8, 17, 1]),
        port(),
        port(),
    )
        .prop_map(|(ty, s, d, p, sp, dp)| {
            let mut m = vec![ty, 3, 0, 0, 0, 0, 0, 0];
            let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, p, 0, 0];
            ip.extend_from_slice(&s);
            ip.extend_from_slice(&d);
            m.extend_from_slice(&ip);
            m.extend_from_slice(&sp.to_be_bytes());
            m.extend_from_slice(&dp.to_be_bytes());
            m.extend_from_slice(&[0, 8, 0, 0]);
            (1u8, m)
        });
    let other = (select(vec![47u8, 50, 0, 255]), proptest::collection::vec(any::<u8>(), 0..16));
    prop_oneof![4 => tcp, 3 => udp, 1 => echo, 2 => error, 1 => other]
}

fn ipv4_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        addr(),
        addr(),
        transport(),
        prop_oneof![6 => Just(0u16), 1 => Just(0x2000), 1 => Just(0x0003), 1 => Just(0x2003), 1 => any::<u16>()],
        select(vec![1u16, 2, 77]),
        prop_oneof![8 => Just(5u8), 2 => 0u8..16],
        prop_oneof![8 => Just(None), 2 => (0usize..80).prop_map(Some)],
        prop_oneof![8 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(src, dst, (proto, l4), frag, id, ihl, cut, total)| {
            let options = usize::from(ihl.max(5) - 5) * 4;
            let mut f = vec![2, 0, 0, 0, 0, 2, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0x08, 0x00];
            let len = 20 + options + l4.len();
            let mut ip = vec![0u8; 20 + options];
            ip[0] = 0x40 | ihl;
            ip[2..4].copy_from_slice(&total.unwrap_or(len as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&id.to_be_bytes());
            ip[6..8].copy_from_slice(&frag.to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            f.extend_from_slice(&ip);
            f.extend_from_slice(&l4);
            // (BPF_PROG_TEST_RUN refuses IPv4 frames without a whole fixed header.)
            if let Some(c) = cut {
                f.truncate((14 + c).max(34));
            }
            f
        })
}

fn addr6() -> impl Strategy<Value = [u8; 16]> {
    prop_oneof![
        6 => select(vec![A6, C6, OUTSIDE6, LINK_LOCAL, ALL_NODES, MAPPED]),
        1 => any::<[u8; 16]>()
    ]
}

/// An IPv6 upper-layer header: the IPv4 ones (ICMP as ICMPv6 numbers), neighbour discovery
/// and MLD, and ICMPv6 errors quoting an IPv6 packet.
fn transport6() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let v4 = transport().prop_map(|(p, l4)| {
        if p != 1 {
            return (p, l4);
        }
        let mut m = l4;
        m[0] = match m[0] {
            8 => 128,
            0 => 129,
            _ => 1,
        };
        (58u8, m)
    });
    let link = (select(vec![133u8, 134, 135, 136, 137, 130, 143]), any::<[u8; 4]>())
        .prop_map(|(t, b)| (58u8, [vec![t, 0, 0, 0], b.to_vec(), vec![0; 16]].concat()));
    let error =
        (select(vec![1u8, 2, 3, 4]), addr6(), addr6(), select(vec![6u8, 17, 58]), port(), port())
            .prop_map(|(ty, s, d, p, sp, dp)| {
                let mut m = vec![ty, 0, 0, 0, 0, 0, 5, 0xdc];
                let mut ip = vec![0x60, 0, 0, 0, 0, 8, p, 64];
                ip.extend_from_slice(&s);
                ip.extend_from_slice(&d);
                m.extend_from_slice(&ip);
                m.extend_from_slice(&sp.to_be_bytes());
                m.extend_from_slice(&dp.to_be_bytes());
                m.extend_from_slice(&[0, 8, 0, 0]);
                (58u8, m)
            });
    prop_oneof![6 => v4, 2 => link, 2 => error]
}

/// Extension headers before the upper layer: (next-header value, bytes), naming `next`.
fn ext_header() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        3 => (select(vec![0u8, 60, 135]), 0u8..3).prop_map(|(t, len)| (t, vec![0u8; (len as usize + 1) * 8])),
        2 => (0u8..2).prop_map(|left| (43u8, vec![0, 0, 4, left, 0, 0, 0, 0])),
        3 => (select(vec![0u16, 1, 8, 9]), any::<u8>()).prop_map(|(off, id)| {
            (44u8, vec![0, 0, (off >> 5) as u8, ((off << 3) as u8) | (off & 1) as u8, 0, 0, 0, id % 3])
        }),
        1 => Just((51u8, vec![0u8; 12])),
    ]
}

fn ipv6_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        addr6(),
        addr6(),
        proptest::collection::vec(ext_header(), 0..4),
        transport6(),
        select(vec![64u8, 255, 254, 1]),
        prop_oneof![8 => Just(None), 2 => (0usize..80).prop_map(Some)],
        prop_oneof![8 => Just(None), 1 => any::<u16>().prop_map(Some)],
    )
        .prop_map(|(src, dst, exts, (proto, l4), hop, cut, plen)| {
            // Chain the headers: each names the next, the last the upper layer.
            let mut body = Vec::new();
            let first = exts.first().map_or(proto, |e| e.0);
            for (i, (_, h)) in exts.iter().enumerate() {
                let mut h = h.clone();
                h[0] = exts.get(i + 1).map_or(proto, |e| e.0);
                if h.len() > 8 && exts[i].0 != 51 {
                    h[1] = (h.len() / 8 - 1) as u8;
                } else if exts[i].0 == 51 {
                    h[1] = 1; // AH: (1 + 2) * 4 = 12 bytes
                }
                body.extend_from_slice(&h);
            }
            body.extend_from_slice(&l4);
            let mut f = vec![2, 0, 0, 0, 0, 2, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0x86, 0xdd];
            let mut ip = vec![0x60, 0, 0, 0, 0, 0, first, hop];
            ip[4..6].copy_from_slice(&plen.unwrap_or(body.len() as u16).to_be_bytes());
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            f.extend_from_slice(&ip);
            f.extend_from_slice(&body);
            if let Some(c) = cut {
                f.truncate((14 + c).max(54));
            }
            f
        })
}

fn frame() -> impl Strategy<Value = Vec<u8>> {
    let typed = (
        select(vec![0x86ddu16, 0x0806, 0x88b5, 0x8100]),
        proptest::collection::vec(any::<u8>(), 0..60),
    )
        .prop_map(|(t, body)| {
            let mut f = vec![2, 0, 0, 0, 0, 2, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
            f.extend_from_slice(&t.to_be_bytes());
            f.extend_from_slice(&body);
            f
        });
    prop_oneof![
        12 => ipv4_frame(),
        8 => ipv6_frame(),
        2 => typed,
        1 => proptest::collection::vec(any::<u8>(), 14..90)
    ]
}

fn shot() -> impl Strategy<Value = Shot> {
    (select(vec![DIR_INGRESS, DIR_EGRESS]), 0usize..3, 0usize..4, frame())
        .prop_map(|(dir, at, from, frame)| Shot { dir, at, from, frame })
}

#[test]
fn kernel_and_host_decide_alike() {
    if !root() {
        println!("SKIPPED kernel_and_host_decide_alike: needs root");
        return;
    }
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/npm-fuzz-{}", std::process::id()));
    let ifaces = TestInterfaces::new(&["veth-a", "veth-b", "uplink"]).expect("test interfaces");
    let index = [ifaces.index("veth-a"), ifaces.index("veth-b"), ifaces.index("uplink"), 0];
    let _cleanup = scopeguard(pin_root.clone());
    let mut dp = EbpfDataplane::open(EbpfConfig {
        pin_root: pin_root.clone(),
        drop_events: Default::default(),
        attach: false,
    })
    .expect("load");
    let mut engine = Engine::new(Scope::Node("n1".into()));
    let mut events = vec![
        Event::UpsertNode(Node {
            name: "n1".into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::from(NODE))],
            ..Default::default()
        }),
        Event::UpsertNamespace(Namespace::new("x", BTreeMap::new())),
        Event::UpsertNamespace(Namespace::new("y", BTreeMap::new())),
        Event::UpsertPod(Pod { ipv6: Some(A6.into()), ..pod("x", "a", A, "n1", "web") }),
        Event::UpsertPod(pod("x", "b", B, "n1", "db")),
        Event::UpsertPod(Pod { ipv6: Some(C6.into()), ..pod("y", "c", C, "n2", "web") }),
    ];
    for yaml in [
        // b admits web pods on 5432 and the outside on 53/UDP; a may reach b and 192.168/16.
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.7.0/24]}}]\n    ports: [{port: 53, protocol: UDP}]\n",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - ports: [{port: http}]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: db}}}, {ipBlock: {cidr: 192.168.0.0/16}}, {ipBlock: {cidr: 'fd99::/16', except: ['fd99:8::/32']}}]\n",
    ] {
        let np = serde_yaml_ng::from_str(yaml).unwrap();
        events.push(Event::UpsertPolicy(network_policy(&np).unwrap()));
    }
    for e in events {
        dp.apply(&engine.handle(e)).expect("apply");
    }
    dp.bind_interface(IpAddr::V4(Ipv4Addr::from(A)), index[0]).unwrap();
    dp.bind_interface(IpAddr::V4(Ipv4Addr::from(B)), index[1]).unwrap();
    dp.bind_interface(IpAddr::from(A6), index[0]).unwrap();

    let cases = std::env::var("NPM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let mut runner =
        TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    // (The runner takes a `Fn`: the dataplane and the tallies behind cells.)
    let dp = std::cell::RefCell::new(dp);
    let (frames, allowed, refused) =
        (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let result = runner.run(&proptest::collection::vec(shot(), 1..24), |shots| {
        // Both sides start from the same state: whatever the kernel holds now.
        let mut dp = dp.borrow_mut();
        // A fresh start for conntrack and fragments (else they pile up over sequences).
        clear::<CtKey, CtValue>(&pin_root, MAP_CT);
        clear::<FragKey, FragValue>(&pin_root, MAP_FRAGS);
        let host = dp.snapshot().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for s in &shots {
            let before = dp.counters().unwrap();
            // (BPF_PROG_TEST_RUN refuses some short frames outright: neither side sees them.)
            let Ok(kernel) = testrun::run(&mut dp, s.dir, index[s.at], index[s.from], &s.frame, 1)
            else {
                if std::env::var("NPM_FUZZ_DEBUG").is_ok() {
                    eprintln!(
                        "refused: {} bytes {:02x?}",
                        s.frame.len(),
                        &s.frame[..s.frame.len().min(40)]
                    );
                }
                refused.set(refused.get() + 1);
                continue;
            };
            let after = dp.counters().unwrap();
            let moved: Vec<Reason> = Reason::ALL
                .iter()
                .copied()
                .filter(|r| after.get(s.dir, *r) != before.get(s.dir, *r))
                .collect();
            let hook = Hook {
                dir: s.dir,
                ifindex: index[s.at],
                ingress_ifindex: index[s.from],
                now: boot_time_ns(),
            };
            let v = decide(&host, &hook, &classify_frame(&s.frame[..]));
            prop_assert_eq!(&moved, &vec![v.reason], "reason of {:?} ({:02x?})", s, s.frame);
            prop_assert_eq!(kernel.verdict == PASS, v.allowed(), "verdict of {:?}", s);
            frames.set(frames.get() + 1);
            allowed.set(allowed.get() + u64::from(v.allowed()));
        }
        Ok(())
    });
    println!(
        "{} frames ({} allowed), {} refused by BPF_PROG_TEST_RUN, in {cases} sequences",
        frames.get(),
        allowed.get(),
        refused.get()
    );
    assert!(refused.get() * 20 < frames.get(), "too many frames refused to judge anything");
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Empties a pinned (LRU) hash map.
fn clear<K: aya::Pod, V: aya::Pod>(pin_root: &std::path::Path, name: &str) {
    let data = MapData::from_pin(pin_root.join("maps").join(name)).expect("pinned map");
    let mut map: BpfHashMap<MapData, K, V> =
        aya::maps::Map::LruHashMap(data).try_into().expect("hash map");
    let keys: Vec<K> = map.keys().map(Result::unwrap).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Removes the pin root when the test ends, however it ends.
fn scopeguard(path: PathBuf) -> impl Drop {
    struct Guard(PathBuf);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Guard(path)
}
