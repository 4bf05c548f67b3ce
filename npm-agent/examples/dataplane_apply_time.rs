//! Dataplane apply time (docs/BENCHMARKS.md, "Dataplane apply time"): Azure NPM's scenario of
//! 640 NetworkPolicies over 1,280 pods, applied from nothing, then one policy updated at that
//! size, with the iptables dataplane (nft and legacy backends, in a scratch network namespace)
//! and the eBPF dataplane (maps under a scratch pin root, programs not attached).
//!
//! ```text
//! cargo run --release -p npm-agent --example dataplane_apply_time      # as root
//! ```
//! Two shapes: one node of a cluster of 110-pod nodes (the node's 110 pods enforced, every
//! policy and pod of the cluster compiled), and all 1,280 pods on one node. "From nothing" is
//! the start-up reconcile of the whole plan (the compile is timed apart); "one policy update"
//! is a policy's rule gaining a port (its pods move to new rules), event to kernel, for 20
//! policies that select pods of the node, one after the other; "restart" is a new dataplane
//! reconciling the same plan over what the first left (make-before-break, nothing flushed).

#[path = "../benches/synth/mod.rs"]
mod synth;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use npm_agent::dataplane::iptables::{Backend, IptablesConfig, IptablesDataplane};
use npm_agent::model::ObjectKey;
use npm_agent::netns::{self, Scratch};
use npm_agent::state::Event;
use synth::{Cluster, Config};

/// The lines of a command's output in the scratch namespace that `pred` accepts.
fn count(ns: &Scratch, args: &[&str], pred: impl Fn(&str) -> bool) -> usize {
    let out = netns::command(&ns.path(), args[0])
        .expect("open the namespace")
        .args(&args[1..])
        .output()
        .expect("run in the namespace");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| pred(l)).count()
}

struct PinRoot(PathBuf);

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ms(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{} µs", d.as_micros())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    format!("median {} / p90 {} / max {}", ms(p(0.5)), ms(p(0.9)), ms(v[v.len() - 1]))
}

/// A compiled node: the engine after every event, and its plan.
fn compile(cluster: &Cluster, node: &str, layout: bool) -> (Engine, Duration) {
    let t = Instant::now();
    let engine = Engine::new(Scope::Node(node.into()));
    let mut engine = if layout { engine.with_layout() } else { engine };
    for e in cluster.events() {
        engine.handle(e);
    }
    (engine, t.elapsed())
}

/// Policies of the cluster that select pods of `node`, in key order.
fn local_policies(cluster: &Cluster, node: &str) -> Vec<ObjectKey> {
    let local: Vec<_> = cluster.pods_on(node).collect();
    cluster
        .state
        .policies
        .values()
        .filter(|p| {
            local.iter().any(|pod| {
                pod.key.namespace == p.key.namespace && p.pod_selector.matches(&pod.labels)
            })
        })
        .map(|p| p.key.clone())
        .collect()
}

/// Times of 20 policy updates (event to kernel), and the mean number of plan changes each.
fn updates(
    cluster: &Cluster,
    engine: &mut Engine,
    dp: &mut dyn Dataplane,
    node: &str,
) -> (Vec<Duration>, usize) {
    let keys = local_policies(cluster, node);
    let mut times = Vec::new();
    let mut changes = 0;
    for (i, key) in keys.iter().take(20).enumerate() {
        let updated = synth::Cluster::updated_policy(&cluster.state.policies[key], i);
        let t = Instant::now();
        let diff = engine.handle(Event::UpsertPolicy(updated));
        dp.apply(&diff).expect("apply");
        times.push(t.elapsed());
        changes += diff.len();
    }
    let n = times.len().max(1);
    (times, changes / n)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("dataplane_apply_time needs root (network namespaces, eBPF); skipped");
        return;
    }
    let shapes =
        [("one node of 110 pods (12 nodes)", 110usize), ("all 1,280 pods on one node", 1_280)];
    println!("640 policies over 1,280 pods (64 namespaces, deployments of 10), per dataplane\n");
    println!(
        "| shape | dataplane | compile | from nothing (apply) | one policy update (event to kernel, 20 policies) | restart (reconcile over it) | kernel objects |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, per_node) in shapes {
        let mut cluster = Cluster::generate(Config {
            pods: 1_280,
            policies: 640,
            namespaces: 64,
            replicas: 10,
            pods_per_node: 110,
            seed: 42,
        });
        let node = cluster.measured_node().to_string();
        if per_node > 110 {
            // Every pod on the measured node (addresses stay as generated).
            for p in cluster.state.pods.values_mut() {
                p.node = Some(node.clone());
            }
        }
        for backend in [Backend::Nft, Backend::Legacy] {
            let (mut engine, compiled) = compile(&cluster, &node, true);
            let plan = engine.plan();
            let ns = Scratch::new(format!(
                "npm-apply-bench-{}-{}",
                std::process::id(),
                backend.as_str()
            ))
            .expect("ip netns add");
            let mut dp = IptablesDataplane::open(IptablesConfig {
                backend: Some(backend),
                netns: Some(ns.path()),
                ..IptablesConfig::default()
            })
            .expect("open");
            let t = Instant::now();
            dp.reconcile(&plan).expect("reconcile");
            let full = t.elapsed();
            let rules =
                count(&ns, &[backend.save_program(), "-t", "filter"], |l| l.starts_with("-A "));
            let enc = dp.translator().encoded();
            let (up, changes) = updates(&cluster, &mut engine, &mut dp, &node);
            let processes = dp.stats().processes;
            // A restarted agent reconciling the same plan over what is there.
            let plan = engine.plan();
            let mut again = IptablesDataplane::open(IptablesConfig {
                backend: Some(backend),
                netns: Some(ns.path()),
                ..IptablesConfig::default()
            })
            .expect("open");
            let t = Instant::now();
            again.reconcile(&plan).expect("restart reconcile");
            let restart = t.elapsed();
            println!(
                "| {label} | iptables ({}) | {} | {} | {} ({changes} plan changes each) | {} | {} endpoints, {} policies, {} policy chains, {rules} rules, {} sets, {} set members; {processes} processes |",
                backend.as_str(),
                ms(compiled),
                ms(full),
                stats(up),
                ms(restart),
                plan.endpoints.len(),
                enc.policies,
                enc.chains,
                enc.sets,
                enc.set_members,
            );
        }
        let (mut engine, compiled) = compile(&cluster, &node, false);
        let plan = engine.plan();
        let pin =
            PinRoot(PathBuf::from(format!("/sys/fs/bpf/npm-apply-bench-{}", std::process::id())));
        let mut dp = EbpfDataplane::open(EbpfConfig {
            pin_root: pin.0.clone(),
            drop_events: Default::default(),
            attach: false,
        })
        .expect("eBPF");
        let t = Instant::now();
        dp.reconcile(&plan).expect("reconcile");
        let full = t.elapsed();
        let enc = dp.encoded();
        let (up, changes) = updates(&cluster, &mut engine, &mut dp, &node);
        drop(dp);
        let plan = engine.plan();
        let mut again = EbpfDataplane::open(EbpfConfig {
            pin_root: pin.0.clone(),
            drop_events: Default::default(),
            attach: false,
        })
        .expect("eBPF");
        let t = Instant::now();
        again.reconcile(&plan).expect("restart reconcile");
        let restart = t.elapsed();
        println!(
            "| {label} | eBPF (maps, not attached) | {} | {} | {} ({changes} plan changes each) | {} | {} endpoints, {} identities, {} CIDR prefixes, {} policy-trie entries |",
            ms(compiled),
            ms(full),
            stats(up),
            ms(restart),
            enc.endpoints,
            enc.identities,
            enc.cidr_prefixes,
            enc.policy_entries
        );
        drop(again);
        drop(pin);
    }
}
