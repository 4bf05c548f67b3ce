//! Peak memory of compiling a synthetic cluster: the resident set (VmRSS, and its peak
//! VmHWM, from /proc/self/status) and the live heap (counted by a wrapping allocator) after
//! building the cluster state and after compiling it.
//!
//! ```text
//! cargo run --release -p npm-agent --example compiler_memory -- [SIZE] [engine|compile] [--cluster] [--dual-stack]
//! ```
//! `--dual-stack` gives every pod an IPv6 address beside its IPv4 one (`fd00::` and the IPv4
//! address), as `status.podIPs` of a dual-stack cluster do.
//! SIZE is 1k, 10k or 100k (default 100k). `engine` (the default) feeds the state, as events,
//! into a fresh incremental engine for one node, as an agent does at start-up: the events
//! are moved into the engine, which keeps its own copy of the state, so the state is counted
//! once. `compile` runs the one-pass compiler, which borrows the state. Run each mode in its own
//! process: VmHWM only grows.

mod memory;
#[path = "../benches/synth/mod.rs"]
mod synth;

use std::time::Instant;

use npm_agent::compile::{Engine, Scope, compile};
use npm_agent::state::Event;
use synth::{Cluster, Config};

#[global_allocator]
static ALLOC: memory::Counting = memory::Counting;

use memory::report;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let positional: Vec<&str> =
        args.iter().map(String::as_str).filter(|a| !a.starts_with("--")).collect();
    let cluster_scope = args.iter().any(|a| a == "--cluster");
    let dual_stack = args.iter().any(|a| a == "--dual-stack");
    let size = positional.first().copied().unwrap_or("100k");
    let mode = positional.get(1).copied().unwrap_or("engine");
    let config = Config::named(size).expect("SIZE is one of 1k, 10k, 100k");

    println!(
        "size {size}, mode {mode}, scope {}, {}",
        if cluster_scope { "cluster" } else { "node" },
        if dual_stack { "dual stack" } else { "IPv4" }
    );
    println!();
    println!("| stage | VmRSS | VmHWM | live heap | peak heap |");
    println!("|---|---:|---:|---:|---:|");
    report("start");
    let cluster = Cluster::generate(config);
    let scope = if cluster_scope {
        Scope::Cluster
    } else {
        Scope::Node(cluster.measured_node().to_string())
    };
    let Cluster { mut state, .. } = cluster;
    if dual_stack {
        for pod in state.pods.values_mut() {
            if let Some(std::net::IpAddr::V4(v4)) = pod.ip {
                // (fd00:: and the IPv4 address, not the mapped form: a pod range of its own.)
                pod.ipv6 = Some(std::net::Ipv6Addr::from_bits(
                    0xfd00_u128 << 112 | u128::from(v4.to_bits()),
                ));
            }
        }
    }
    report("cluster state built");

    let t = Instant::now();
    match mode {
        "engine" => {
            // Move the objects into events: the state is then held only by the engine.
            let mut events: Vec<Event> = Vec::new();
            events.extend(state.namespaces.into_values().map(Event::UpsertNamespace));
            events.extend(state.nodes.into_values().map(Event::UpsertNode));
            events.extend(state.pods.into_values().map(Event::UpsertPod));
            events.extend(state.policies.into_values().map(Event::UpsertPolicy));
            let mut engine = Engine::new(scope);
            for ev in events {
                engine.handle(ev);
            }
            let elapsed = t.elapsed();
            report("engine: full compile done (state inside the engine)");
            let plan = engine.plan();
            report("engine: plan() materialized as well");
            println!();
            println!(
                "compile time {elapsed:.2?}; {:?}; plan of {} endpoints",
                engine.stats(),
                plan.endpoints.len()
            );
        }
        "compile" => {
            let plan = compile(&state, &scope);
            let elapsed = t.elapsed();
            report("compile: plan built (state kept)");
            println!();
            println!(
                "compile time {elapsed:.2?}; plan of {} endpoints, {} profiles, {} allow entries",
                plan.endpoints.len(),
                plan.profiles.len(),
                plan.profiles.values().map(|p| p.allow.len()).sum::<usize>()
            );
        }
        other => panic!("unknown mode {other}: engine or compile"),
    }
}
