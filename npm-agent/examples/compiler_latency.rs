//! Latency distribution of the incremental compiler on a synthetic cluster: the full compile
//! an agent does at start-up, then thousands of pod and policy events, each timed on its own,
//! with p50/p90/p99/max and diff sizes per kind of event.
//!
//! ```text
//! cargo run --release -p npm-agent --example compiler_latency -- [SIZE] [POD_EVENTS] [POLICY_EVENTS] [--cluster] [--check] [--layout] [--cluster-policies N]
//! ```
//! SIZE is 1k, 10k or 100k (default 100k: 100,000 pods, 10,000 policies, 500 namespaces);
//! POD_EVENTS defaults to 10,000 and POLICY_EVENTS to 1,000. `--cluster` compiles every pod
//! as local (the simulator's scope) instead of one node's. `--check` compares the engine's
//! plan with the one-pass compiler's before and after the events. `--layout`: the engine also
//! keeps the Azure NPM layout, as it does for both Linux dataplanes (eBPF mode counts its sets
//! for the metrics; without it, the engine as eBPF mode ran before). `--cluster-policies N`:
//! N ClusterNetworkPolicies as well (half Admin, half Baseline; each selects the namespaces of
//! one `env`, a third of the cluster, and has a Pass, a Deny on a port and an Accept from one
//! team's namespaces), compiled as the eBPF agent compiles them.

#[path = "../benches/synth/mod.rs"]
mod synth;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use npm_agent::compile::{Engine, Scope, compile};
use npm_agent::model::cluster_policy::{
    Action, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, PodSet, Tier,
};
use npm_agent::model::{LabelSelector, Protocol};
use npm_agent::plan::Plan;
use npm_agent::state::Event;

/// ClusterNetworkPolicy `i` (see the module docs).
fn cluster_policy(i: usize) -> ClusterPolicy {
    let envs = ["prod", "staging", "dev"];
    let team = |t: usize| PodSet {
        namespaces: LabelSelector::from_labels([("team", format!("team-{:02}", t % 50).as_str())]),
        pods: None,
    };
    let rule = |action, peer: PodSet, ports| ClusterRule {
        name: None,
        action,
        peers: vec![ClusterPeer::Pods(peer)],
        ports,
    };
    let port = ClusterPort::Range {
        protocol: Protocol::Tcp,
        first: 1000 + i as u16,
        last: 1000 + i as u16,
    };
    ClusterPolicy {
        name: format!("cnp-{i:03}"),
        tier: if i.is_multiple_of(2) { Tier::Admin } else { Tier::Baseline },
        priority: i as u32,
        subject: PodSet {
            namespaces: LabelSelector::from_labels([("env", envs[i % 3])]),
            pods: None,
        },
        ingress: vec![
            rule(Action::Pass, team(i), None),
            rule(Action::Deny, team(i + 1), Some(vec![port])),
            rule(Action::Accept, team(i + 2), None),
        ],
        egress: vec![rule(
            Action::Deny,
            team(i + 3),
            Some(vec![ClusterPort::Protocol(Protocol::Udp)]),
        )],
    }
}
use synth::{Cluster, Config, EventKind};

#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    diffs: Vec<usize>,
}

impl Samples {
    fn push(&mut self, t: Duration, diff: usize) {
        self.times.push(t);
        self.diffs.push(diff);
    }

    fn extend(&mut self, other: &Samples) {
        self.times.extend(&other.times);
        self.diffs.extend(&other.diffs);
    }

    fn row(&self, name: &str) -> String {
        let mut t = self.times.clone();
        t.sort();
        let q = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
        let mean_diff = self.diffs.iter().sum::<usize>() as f64 / self.diffs.len() as f64;
        let max_diff = self.diffs.iter().max().copied().unwrap_or(0);
        format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {mean_diff:.0} | {max_diff} |",
            t.len(),
            fmt(t.iter().sum::<Duration>() / t.len() as u32),
            fmt(q(0.5)),
            fmt(q(0.9)),
            fmt(q(0.99)),
            fmt(*t.last().expect("samples")),
        )
    }
}

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 { format!("{us:.1} µs") } else { format!("{:.2} ms", us / 1000.0) }
}

/// A plan's entries, canonical (without the layout, which only `--layout` compiles).
fn entries(p: &npm_agent::plan::Plan) -> npm_agent::plan::CanonicalPlan {
    let mut c = p.canonical();
    c.layout = Default::default();
    c
}

fn main() {
    let mut positional = Vec::new();
    let mut cluster_scope = false;
    let mut check = false;
    let mut layout = false;
    let mut cluster_policies = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cluster" => cluster_scope = true,
            "--check" => check = true,
            "--layout" => layout = true,
            "--cluster-policies" => {
                cluster_policies = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--cluster-policies takes a number")
            }
            _ => positional.push(arg),
        }
    }
    let size = positional.first().map(String::as_str).unwrap_or("100k");
    let pod_events: usize =
        positional.get(1).map(|s| s.parse().expect("POD_EVENTS is a number")).unwrap_or(10_000);
    let policy_events: usize =
        positional.get(2).map(|s| s.parse().expect("POLICY_EVENTS is a number")).unwrap_or(1_000);
    let config = Config::named(size).expect("SIZE is one of 1k, 10k, 100k");

    let t = Instant::now();
    let mut cluster = Cluster::generate(config.clone());
    for i in 0..cluster_policies {
        let p = cluster_policy(i);
        cluster.state.cluster_policies.insert(p.name.clone(), p);
    }
    println!(
        "generated {size}: {} pods, {} policies, {} namespaces, {} nodes, {} deployments in {:.2?}",
        cluster.state.pods.len(),
        cluster.state.policies.len(),
        cluster.state.namespaces.len(),
        cluster.nodes.len(),
        cluster.deployments.len(),
        t.elapsed()
    );
    let scope = if cluster_scope {
        Scope::Cluster
    } else {
        Scope::Node(cluster.measured_node().to_string())
    };
    println!("scope: {scope:?}");

    // Start-up: every object as an event into a fresh engine.
    let mut events = cluster.events();
    events.extend(cluster.state.cluster_policies.values().cloned().map(Event::UpsertClusterPolicy));
    let mut engine = Engine::new(scope.clone()).with_cluster_policies();
    println!("cluster network policies: {cluster_policies}");
    if layout {
        engine = engine.with_layout();
    }
    println!("layout: {layout}");
    // With --check, the plan the diffs build, as a dataplane would hold it.
    let mut applied = Plan::default();
    let t = Instant::now();
    let mut startup_changes = 0;
    for ev in events {
        let diff = engine.handle(ev);
        startup_changes += diff.len();
        if check {
            applied.apply(&diff).expect("start-up diff applies");
        }
    }
    let engine_full = t.elapsed();
    println!(
        "engine full compile: {engine_full:.2?}, {startup_changes} changes in all diffs, {:?}",
        engine.stats()
    );

    let t = Instant::now();
    let plan = compile(&cluster.state, &scope);
    let one_pass = t.elapsed();
    println!(
        "one-pass compile: {one_pass:.2?}, {} endpoints, {} profiles, {} allow entries, {} pod \
         addresses",
        plan.endpoints.len(),
        plan.profiles.len(),
        plan.profiles.values().map(|p| p.allow.len()).sum::<usize>(),
        plan.identities.len()
    );
    if check {
        let want = entries(&plan);
        assert!(entries(&engine.plan()) == want, "engine and one-pass plans differ");
        assert!(
            entries(&applied) == want,
            "the plan built from the diffs differs from the one-pass plan"
        );
        println!(
            "check: the engine's plan and the plan built from its diffs equal the one-pass plan"
        );
    }
    drop(plan);

    let workload = cluster.workload();
    println!(
        "workload: {} local pods, {} local policies (selecting local pods)",
        workload.local_pods.len(),
        workload.local_policies.len()
    );

    let mut by_kind: BTreeMap<String, Samples> = BTreeMap::new();
    let mut run = |engine: &mut Engine, kinds: &[EventKind], total: usize| {
        let mut done = 0;
        let mut i = 0;
        while done < total {
            for &kind in kinds {
                let (ev, undo) = cluster.event(&workload, kind, i);
                for (name, ev) in [(kind.name(), ev), (kind.undo_name(), undo)] {
                    let t = Instant::now();
                    let diff = engine.handle(ev);
                    let elapsed = t.elapsed();
                    if check {
                        applied.apply(&diff).expect("event diff applies");
                    }
                    by_kind.entry(name.to_string()).or_default().push(elapsed, diff.len());
                    done += 1;
                }
            }
            i += 1;
        }
    };
    let t = Instant::now();
    run(&mut engine, &EventKind::POD, pod_events);
    run(&mut engine, &EventKind::POLICY, policy_events);
    // ClusterNetworkPolicy updates (the Deny's port moves) and back, each one timed.
    for round in 0..10 {
        for i in 0..cluster_policies {
            let original = cluster_policy(i);
            let mut changed = original.clone();
            changed.ingress[1].ports = Some(vec![ClusterPort::Range {
                protocol: Protocol::Tcp,
                first: 3000 + round,
                last: 3000 + round,
            }]);
            for (name, p) in [("cnp_update", changed), ("cnp_update (back)", original)] {
                let t = Instant::now();
                let diff = engine.handle(Event::UpsertClusterPolicy(p));
                let elapsed = t.elapsed();
                if check {
                    applied.apply(&diff).expect("event diff applies");
                }
                by_kind.entry(name.to_string()).or_default().push(elapsed, diff.len());
            }
        }
    }
    println!("events run in {:.2?}", t.elapsed());

    let mut pod_all = Samples::default();
    let mut local_all = Samples::default();
    let mut policy_all = Samples::default();
    for (name, s) in &by_kind {
        if name.starts_with("policy") || name.starts_with("cnp") {
            policy_all.extend(s);
        } else {
            pod_all.extend(s);
            if name.starts_with("local") {
                local_all.extend(s);
            }
        }
    }

    println!();
    println!("| event | n | mean | p50 | p90 | p99 | max | mean diff | max diff |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, s) in &by_kind {
        println!("{}", s.row(name));
    }
    println!("{}", pod_all.row("**all pod events**"));
    println!("{}", local_all.row("**local pod events**"));
    println!("{}", policy_all.row("**all policy events**"));

    // An agent sees every pod event of the cluster, and few are about its own pods: weigh
    // the local and remote samples by the share of pods on the measured node.
    let mut remote_all = Samples::default();
    for (name, s) in &by_kind {
        if name.starts_with("remote") {
            remote_all.extend(s);
        }
    }
    let local_share = workload.local_pods.len() as f64 / cluster.state.pods.len() as f64;
    let mut weighted: Vec<(Duration, f64)> = Vec::new();
    weighted
        .extend(local_all.times.iter().map(|t| (*t, local_share / local_all.times.len() as f64)));
    weighted.extend(
        remote_all.times.iter().map(|t| (*t, (1.0 - local_share) / remote_all.times.len() as f64)),
    );
    weighted.sort_by_key(|(t, _)| *t);
    let quantile = |q: f64| {
        let mut acc = 0.0;
        for (t, w) in &weighted {
            acc += w;
            if acc >= q {
                return *t;
            }
        }
        weighted.last().expect("samples").0
    };
    let mean = weighted.iter().map(|(t, w)| t.as_secs_f64() * w).sum::<f64>();
    println!(
        "| **cluster-wide pod event stream** (local share {:.2}%) | weighted | {} | {} | {} | {} | | | |",
        local_share * 100.0,
        fmt(Duration::from_secs_f64(mean)),
        fmt(quantile(0.5)),
        fmt(quantile(0.9)),
        fmt(quantile(0.99)),
    );

    if check {
        let plan = compile(engine.state(), &scope);
        assert!(
            entries(&engine.plan()) == entries(&plan),
            "engine and one-pass plans differ after the events"
        );
        assert!(
            entries(&applied) == entries(&plan),
            "the plan built from the diffs differs from the one-pass plan"
        );
        assert!(engine.state() == &cluster.state, "the events did not undo themselves");
        println!(
            "check: after the events, the engine's plan and the plan built from its diffs equal the one-pass plan, and the state is restored"
        );
    }
}
