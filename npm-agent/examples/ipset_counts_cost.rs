//! What `npm_ipset_counts` (exported by default) costs a scrape of `/cluster-metrics`
//! (docs/BENCHMARKS.md, "The per-set metric"): the agent's metrics with an observer that reports
//! SETS sets (default 10,000, each with 20 entries), rendered 100 times; prints the time of one
//! render with and without the per-set series, the body's size and the process's peak memory.
//! The kernel reading itself (`ipset save` in iptables mode) happens for the other counts too.
//!
//! ```text
//! cargo run --release -p npm-agent --example ipset_counts_cost [SETS]
//! ```

use std::time::Instant;

use npm_agent::dataplane::observe::{Counts, Figures, Observer};
use npm_agent::metrics::{Metrics, MetricsOptions};

struct Sets(usize);

impl Observer for Sets {
    fn observe(&self, per_set: bool) -> anyhow::Result<Figures> {
        let per = if per_set {
            (0..self.0)
                .map(|i| {
                    (format!("podlabel-app:web-{i}"), format!("azure-npm-{}", 1_000_000 + i), 20)
                })
                .collect()
        } else {
            Vec::new()
        };
        let counts = Counts {
            rules: 4 * self.0 as u64,
            sets: self.0 as u64,
            set_entries: 20 * self.0 as u64,
            per_set: per,
        };
        Ok(Figures { counts: Some(counts), ..Figures::default() })
    }
}

fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let sets: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    for advanced in [false, true] {
        let metrics = Metrics::new(MetricsOptions {
            dataplane: "iptables".into(),
            advanced,
            observer: Some(Box::new(Sets(sets))),
            ..MetricsOptions::default()
        });
        let mut body = String::new();
        let t = Instant::now();
        for _ in 0..100 {
            // (The figures are cached for a second: each render here reads them anew only
            // the first time, as scrapes every 30 s would not; the render is what is timed.)
            body = metrics.render_cluster();
        }
        let each = t.elapsed() / 100;
        println!(
            "{sets} sets, npm_ipset_counts {}: a render of /cluster-metrics takes {each:.2?}, \
             {} KiB, {} series; peak RSS so far {:.0} MiB",
            if advanced { "on" } else { "off" },
            body.len() / 1024,
            body.lines().filter(|l| !l.starts_with('#')).count(),
            peak_mib()
        );
    }
}
