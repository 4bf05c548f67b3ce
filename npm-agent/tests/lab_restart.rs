//! A rolling update, in the lab, with each dataplane: with policies in force, the node agents
//! are stopped with SIGTERM and started again, several times, while probes run without pause.
//! Not one blocked connection may get through, and allowed connections keep working:
//! enforcement stays (the pinned programs and maps, or the chains and sets) while no agent
//! runs, and the new agent reconciles without flushing.
//!
//! Root only (network namespaces, eBPF, iptables); prints SKIPPED otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use npm_agent::lab::{LabCluster, LabOptions};
use npm_agent::model::Protocol;
use npm_agent::simulate::Enforcer;
use npm_agent::simulate::case::{ActionOutcome, Case, CaseCluster};

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

const CASE: &str = r#"
name: restart
model:
  namespaces: [x, y]
  pods:
  - {namespace: x, pod: a, labels: {pod: a}, ports: [{name: http, port: 80, protocol: TCP}]}
  - {namespace: y, pod: b, labels: {pod: b}, ports: [{name: http, port: 80, protocol: TCP}]}
  - {namespace: y, pod: c, labels: {pod: c}, ports: [{name: http, port: 80, protocol: TCP}]}
steps:
- description: x/a accepts only y/b; y/c is blocked
  actions:
  - apply:
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: only-b, namespace: x}
      spec:
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector: {matchLabels: {ns: y}}
            podSelector: {matchLabels: {pod: b}}
"#;

#[test]
fn ebpf_sigterm_and_restart_open_no_hole() {
    restarts_open_no_hole("ebpf", 3);
}

#[test]
fn iptables_sigterm_and_restart_open_no_hole() {
    restarts_open_no_hole("iptables", 5);
}

fn restarts_open_no_hole(dataplane: &str, restarts: usize) {
    if !root() {
        println!("SKIPPED {dataplane} restarts: needs root");
        return;
    }
    let mut opts = LabOptions::new(dataplane, 2);
    opts.agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_npm-agent"));
    let case: Case = serde_yaml_ng::from_str(CASE).unwrap();
    let mut cluster = CaseCluster::new(&case).unwrap();
    let mut lab = LabCluster::new(opts).expect("lab");
    lab.apply(&cluster, &cluster.initial_events()).unwrap();
    let mut events = Vec::new();
    for a in &case.steps[0].actions {
        match cluster.action(a).unwrap() {
            ActionOutcome::Events(e) => events.extend(e),
            ActionOutcome::Rejected(r) => panic!("{r}"),
        }
    }
    lab.apply(&cluster, &events).unwrap();
    let node_of_a = lab.node_of(&npm_agent::model::ObjectKey::new("x", "a")).unwrap();

    // Probe without pause, before and while the agents restart.
    let stop = AtomicBool::new(false);
    let (leaks, allowed_ok, allowed_fail, rounds) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut downtimes = Vec::new();
    std::thread::scope(|s| {
        let prober = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let m = lab
                    .lab()
                    .probe_matrix(
                        &["x/a", "y/b", "y/c"],
                        Protocol::Tcp,
                        80,
                        Duration::from_millis(200),
                    )
                    .unwrap();
                if m[2][0] {
                    leaks.fetch_add(1, Ordering::Relaxed);
                }
                if m[1][0] {
                    allowed_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    allowed_fail.fetch_add(1, Ordering::Relaxed);
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        for round in 0..restarts {
            for node in [node_of_a, 1 - node_of_a] {
                let down = lab.restart_agent(node).expect("restart");
                println!(
                    "round {round}: node {node}'s agent restarted; the node had no agent for {down:?}"
                );
                downtimes.push(down);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
    });
    let (leaked, ok, fail, n) = (
        leaks.load(Ordering::Relaxed),
        allowed_ok.load(Ordering::Relaxed),
        allowed_fail.load(Ordering::Relaxed),
        rounds.load(Ordering::Relaxed),
    );
    println!(
        "{n} probe rounds: the blocked connection got through {leaked} times; the allowed one {ok} ok, {fail} failed"
    );
    lab.shutdown().unwrap();
    assert_eq!(leaked, 0, "a blocked connection succeeded while agents restarted");
    assert_eq!(fail, 0, "an allowed connection failed while agents restarted");
    assert!(n >= 10, "probes ran throughout ({n} rounds)");
}
