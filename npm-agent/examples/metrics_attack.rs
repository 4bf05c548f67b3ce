//! The metrics endpoint under a hostile pod's attack (the "what a hostile pod can do" issue):
//! four connections sending 64 MiB headers, one an 8 MiB URL, 500 idle connections and 20
//! trickling their headers a byte every 100 ms, while `/healthz` is asked every 50 ms. Prints
//! the measured process's threads and resident memory before, at most during and after the
//! attack, `/healthz` latency, and what became of the attacking connections.
//!
//! ```text
//! cargo run --release -p npm-agent --example metrics_attack
//! cargo run --release -p npm-agent --example metrics_attack -- --addr 127.0.0.1:10091 --pid PID
//! ```
//! Without `--addr`, the server runs in this process (whose figures then include the attack's
//! own threads, reported apart). With `--addr` and `--pid`, a running agent is attacked
//! (`npm-agent run --metrics-addr 127.0.0.1:PORT ...`) and that process is measured.

#[path = "../tests/metrics_attack/mod.rs"]
mod metrics_attack;

use std::sync::Arc;
use std::time::Duration;

use metrics_attack::{Attack, Outcome, run};
use npm_agent::metrics::server::MetricsServer;
use npm_agent::metrics::{Metrics, MetricsOptions};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn closed(outcomes: &[Outcome]) -> String {
    let mut times: Vec<Duration> = outcomes.iter().filter_map(|o| o.closed_after).collect();
    times.sort();
    let open = outcomes.len() - times.len();
    match (times.first(), times.last()) {
        (Some(a), Some(b)) => {
            format!("{} closed ({:.2?} to {:.2?}), {open} still open", times.len(), a, b)
        }
        _ => format!("none closed, {open} still open"),
    }
}

fn head(o: &Outcome) -> String {
    format!(
        "{:.1} MiB taken, {}, {}",
        o.sent as f64 / (1 << 20) as f64,
        o.status.map_or("no response".to_string(), |s| format!("status {s}")),
        o.closed_after.map_or("still open".to_string(), |t| format!("closed after {t:.2?}"))
    )
}

fn main() {
    let external = arg("--addr").map(|a| a.parse().expect("--addr HOST:PORT"));
    let pid = arg("--pid").map(|p| p.parse().expect("--pid PID"));
    let (server, addr) = match external {
        Some(addr) => (None, addr),
        None => {
            let metrics = Arc::new(Metrics::new(MetricsOptions::default()));
            metrics.heartbeat();
            let s = MetricsServer::start("127.0.0.1:0".parse().unwrap(), metrics)
                .expect("start the server");
            let addr = s.local_addr();
            (Some(s), addr)
        }
    };
    let (code, _) =
        npm_agent::metrics::server::http_get(addr, "/node-metrics", Duration::from_secs(5))
            .expect("the server answers");
    assert_eq!(code, 200);
    let attack = Attack { pid, ..Attack::issue(addr) };
    println!(
        "attacking {addr} (measuring {})",
        pid.map_or("this process".to_string(), |p| format!("process {p}"))
    );
    let r = run(&attack);
    let attack_threads = if pid.is_some() { 0 } else { r.attack_threads };
    println!();
    println!("| figure | before | during (max) | after |");
    println!("|---|---:|---:|---:|");
    println!(
        "| threads{} | {} | {} | {} |",
        if attack_threads > 0 {
            format!(" (the attack's own: {attack_threads})")
        } else {
            String::new()
        },
        r.threads_before,
        r.threads_max,
        r.threads_after
    );
    println!(
        "| resident memory (MiB) | {:.1} | {:.1} | {:.1} |",
        r.rss_before_kib as f64 / 1024.0,
        r.rss_max_kib as f64 / 1024.0,
        r.rss_after_kib as f64 / 1024.0
    );
    println!();
    println!(
        "/healthz: {} answered 200, {} failed; latency p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        r.healthz.len(),
        r.healthz_failures.len(),
        r.healthz_quantile(0.5),
        r.healthz_quantile(0.99),
        r.healthz_quantile(1.0)
    );
    for f in r.healthz_failures.iter().take(5) {
        println!("  failure: {f}");
    }
    for (i, o) in r.huge_headers.iter().enumerate() {
        println!("64 MiB header {}: {}", i + 1, head(o));
    }
    println!("8 MiB URL: {}", head(&r.huge_url));
    println!(
        "500 idle connections: {} 500 ms after the burst; {}",
        r.idle_open_after_burst,
        closed(&r.idle)
    );
    println!("20 trickling connections: {}", closed(&r.trickle));
    drop(server);
}
