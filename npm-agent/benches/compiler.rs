//! Benchmarks of the compiler on synthetic clusters (see `synth`): 1k pods and 100
//! policies, 10k and 1k, 100k and 10k, over 500 namespaces.
//!
//! - `full_compile/engine_node/SIZE`: every object, as events, into a fresh [`Engine`] for one
//!   node (an agent's start-up). `compile_node`: the one-pass [`compile`] of the same.
//!   `engine_cluster` and `compile_cluster`: the same with every pod local (the simulator's
//!   scope), at 1k and 10k pods.
//! - `pod_event/KIND/SIZE` and `policy_event/KIND/SIZE`: one event into an engine holding the
//!   whole cluster (node scope), each undone, untimed, before the next (see
//!   [`synth::EventKind`]). The diff size (`PlanDiff::len`) of the first events of each kind is
//!   printed before its measurement.
//!
//! Quick by design (10 samples, short measurement times): `cargo bench -p npm-agent --bench
//! compiler` takes a few minutes. Filter as usual, e.g. `-- pod_event/local_create/100k`.
//! Latency percentiles (p99) are not what criterion reports: see `examples/compiler_latency.rs`.

mod synth;

use std::cell::OnceCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode};
use npm_agent::compile::{Engine, Scope, compile};
use synth::{Cluster, Config, EventKind, SIZES, Workload};

/// A cluster and, once an event benchmark needs it, an engine that has compiled it.
struct Fixture {
    cluster: OnceCell<Cluster>,
    loaded: Option<(Engine, Workload)>,
}

impl Fixture {
    fn cluster(&self, size: &str) -> &Cluster {
        self.cluster.get_or_init(|| {
            let t = Instant::now();
            let c = Cluster::generate(Config::named(size).expect("known size"));
            eprintln!("[{size}: cluster generated in {:.2?}]", t.elapsed());
            c
        })
    }

    fn loaded(&mut self, size: &str) -> (&Cluster, &mut Engine, &Workload) {
        if self.loaded.is_none() {
            let cluster = self.cluster(size);
            let t = Instant::now();
            let mut engine = Engine::new(Scope::Node(cluster.measured_node().to_string()));
            for ev in cluster.events() {
                engine.handle(ev);
            }
            eprintln!("[{size}: engine loaded in {:.2?}: {:?}]", t.elapsed(), engine.stats());
            self.loaded = Some((engine, cluster.workload()));
        }
        let (engine, workload) = self.loaded.as_mut().expect("loaded");
        (self.cluster.get().expect("generated"), engine, workload)
    }
}

/// The diff sizes (`PlanDiff::len`) of the first 100 events of `kind`.
fn print_diff_sizes(
    group: &str,
    name: &str,
    size: &str,
    cluster: &Cluster,
    engine: &mut Engine,
    workload: &Workload,
    kind: EventKind,
) {
    let mut sizes = Vec::new();
    for i in 0..100 {
        let (ev, undo) = cluster.event(workload, kind, i);
        sizes.push(engine.handle(ev).len());
        engine.handle(undo);
    }
    sizes.sort();
    eprintln!(
        "[{group}/{name}/{size}: diff size over 100 events: median {}, mean {:.0}, max {}]",
        sizes[50],
        sizes.iter().sum::<usize>() as f64 / 100.0,
        sizes[99]
    );
}

/// Times `kind` events, each undone untimed before the next.
fn bench_event(c: &mut Criterion, group: &str, kinds: &[EventKind], fixtures: &mut [Fixture]) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (f, (size, _, _)) in fixtures.iter_mut().zip(SIZES) {
        for &kind in kinds {
            let name = kind.name().trim_start_matches("policy_");
            // Criterion calls the routine several times (warm-up, samples): print once.
            let mut printed = false;
            // Event numbers go on across calls, so that samples cover different pods.
            let mut i = 0;
            g.bench_function(BenchmarkId::new(name, size), |b| {
                let (cluster, engine, workload) = f.loaded(size);
                if !printed {
                    printed = true;
                    print_diff_sizes(group, name, size, cluster, engine, workload, kind);
                }
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (ev, undo) = cluster.event(workload, kind, i);
                        i += 1;
                        let t = Instant::now();
                        let diff = engine.handle(ev);
                        total += t.elapsed();
                        black_box(diff);
                        engine.handle(undo);
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let mut fixtures: Vec<Fixture> =
        SIZES.iter().map(|_| Fixture { cluster: OnceCell::new(), loaded: None }).collect();

    {
        let mut g = c.benchmark_group("full_compile");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .sampling_mode(SamplingMode::Flat);
        for (f, (size, pods, _)) in fixtures.iter().zip(SIZES) {
            let scopes: &[(&str, bool)] = if pods <= 10_000 {
                &[("node", false), ("cluster", true)]
            } else {
                &[("node", false)]
            };
            for &(scope_name, cluster_scope) in scopes {
                let scope = |cluster: &Cluster| {
                    if cluster_scope {
                        Scope::Cluster
                    } else {
                        Scope::Node(cluster.measured_node().to_string())
                    }
                };
                g.bench_function(BenchmarkId::new(format!("engine_{scope_name}"), size), |b| {
                    let cluster = f.cluster(size);
                    b.iter_batched(
                        || cluster.events(),
                        |events| {
                            let mut engine = Engine::new(scope(cluster));
                            for ev in events {
                                black_box(engine.handle(ev));
                            }
                            engine
                        },
                        BatchSize::PerIteration,
                    );
                });
                g.bench_function(BenchmarkId::new(format!("compile_{scope_name}"), size), |b| {
                    let cluster = f.cluster(size);
                    let scope = scope(cluster);
                    b.iter_with_large_drop(|| compile(&cluster.state, &scope));
                });
            }
        }
        g.finish();
    }

    bench_event(c, "pod_event", &EventKind::POD, &mut fixtures);
    bench_event(c, "policy_event", &EventKind::POLICY, &mut fixtures);
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
