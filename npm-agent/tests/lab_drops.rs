//! Drop events on a running lab agent (eBPF): a denied probe produces exactly one event,
//! read with `npm-agent drops` from the agent's socket, naming the pod, the peer and the
//! policies that isolate the pod; a flood of denied packets is held to the kernel's rate
//! limit (the rest counted as suppressed in the pinned limiter). Without root: prints
//! SKIPPED.

use std::collections::BTreeSet;
use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod lab_common;

use lab_common::UnionLab;
use npm_agent::dataplane::ebpf::events::pinned_event_totals;
use npm_agent::drops::DropRecord;
use npm_agent::metrics::server::http_get;
use npm_agent::metrics::text::parse;
use npm_agent::model::{ObjectKey, Protocol};

/// The events `npm-agent drops` prints for pod `ns/name`.
fn drops(socket: &Path, ns: &str, name: &str) -> Vec<DropRecord> {
    let out = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["drops", "--json", "--recent", "1024", "--namespace", ns, "--pod", name])
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until `f` gives events (or 5 s), then a second more for stragglers.
fn settle(mut f: impl FnMut() -> Vec<DropRecord>) -> Vec<DropRecord> {
    let start = Instant::now();
    while f().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    f()
}

#[test]
fn a_denied_probe_is_one_event_naming_pod_and_policies_and_a_flood_is_rate_limited() {
    let Some(UnionLab { lab, cluster }) =
        UnionLab::start("ebpf", 2, &["--drop-metrics-pod-labels"])
    else {
        return;
    };
    let ip = |ns: &str, name: &str| -> IpAddr {
        cluster.pods().find(|p| p.key == ObjectKey::new(ns, name)).and_then(|p| p.ip).unwrap()
    };
    let (a, b) = (ip("x", "a"), ip("x", "b"));
    let node = lab.node_of(&ObjectKey::new("x", "a")).unwrap();
    let socket = lab.drops_socket(node);

    // One denied TCP probe within 500 ms: one SYN (the first retransmission is at 1 s).
    assert!(
        !lab.lab().probe("x/b", "x/a", Protocol::Tcp, 80, Duration::from_millis(500)).unwrap(),
        "x/b must not reach x/a"
    );
    let of_probe = |r: &DropRecord| r.src == Some(b) && r.dst == Some(a) && r.dport == Some(80);
    let events: Vec<DropRecord> =
        settle(|| drops(&socket, "x", "a").into_iter().filter(of_probe).collect());
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    println!("{e}");
    assert_eq!(e.pod.as_deref(), Some("x/a"));
    assert_eq!(e.peer.as_deref(), Some("x/b"));
    assert_eq!((e.direction.as_str(), e.reason.as_str()), ("ingress", "denied"));
    assert_eq!(e.protocol.as_deref(), Some("TCP"));
    let policies: BTreeSet<&str> = e.policies.iter().map(String::as_str).collect();
    assert_eq!(policies, BTreeSet::from(["x/a-from-y", "x/all-from-c"]));
    // The filter holds: nothing of x/a's is reported for x/b.
    assert!(drops(&socket, "x", "b").iter().all(|r| r.pod.as_deref() == Some("x/b")));

    // A flood: 30,000 denied datagrams as fast as x/b can send them.
    let pin_root = lab.pin_root(node);
    let before = pinned_event_totals(&pin_root).unwrap();
    let x_b = lab.lab().pod("x/b").unwrap().netns_path.clone();
    let start = Instant::now();
    let sport = npm_agent::netns::run_in(&x_b, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((a, 80)).unwrap();
        for _ in 0..30_000 {
            let _ = s.send(b"flood");
        }
        s.local_addr().unwrap().port()
    })
    .unwrap();
    let of_flood = |r: &DropRecord| r.src == Some(b) && r.sport == Some(sport);
    let flood: Vec<DropRecord> =
        settle(|| drops(&socket, "x", "a").into_iter().filter(of_flood).collect());
    let secs = start.elapsed().as_secs_f64();
    let after = pinned_event_totals(&pin_root).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // The agent's defaults: 10 events a second per CPU, bursts of 20.
    let bound = cpus * (20.0 + 10.0 * secs + 1.0);
    assert!(
        !flood.is_empty() && (flood.len() as f64) <= bound,
        "{} events of the flood in {secs:.1} s (bound {bound:.0})",
        flood.len()
    );
    let suppressed = after.suppressed - before.suppressed;
    println!(
        "flood: {} events in {secs:.1} s (bound {bound:.0}), {suppressed} suppressed",
        flood.len()
    );
    assert!(suppressed >= 30_000 - bound as u64, "suppressed {suppressed}");
    assert_eq!(after.lost, before.lost, "the agent kept up");

    // The same events are counted in the metrics, here by pod (opted in).
    let netns = lab.lab().node(node).unwrap().netns_path.clone();
    let (code, body) = npm_agent::netns::run_in(&netns, || {
        http_get("127.0.0.1:10091".parse().unwrap(), "/node-metrics", Duration::from_secs(10))
    })
    .unwrap()
    .unwrap();
    assert_eq!(code, 200);
    let m = parse(&body).unwrap();
    let counted = m
        .value(
            "npm_drop_events_total",
            &[("direction", "ingress"), ("reason", "denied"), ("namespace", "x"), ("pod", "a")],
        )
        .unwrap_or_else(|| panic!("no drop events of x/a counted:\n{body}"));
    assert!(counted >= 1.0 + flood.len() as f64, "{counted}");
    let suppressed_metric = m.value("npm_drop_events_suppressed_total", &[]).unwrap();
    assert!(suppressed_metric >= suppressed as f64, "{suppressed_metric}");
    lab.shutdown().unwrap();
}
