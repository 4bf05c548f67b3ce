//! The metrics endpoint against a hostile pod (every pod reaches its node's addresses): four
//! 64 MiB headers, an 8 MiB URL, 500 idle connections and 20 that trickle their headers,
//! while `/healthz` is asked every 50 ms. The server must keep its threads, keep its memory,
//! close every attacking connection within its timeouts, and answer `/healthz` throughout.
//!
//! One test in this binary: it measures the whole process's threads and memory.

mod metrics_attack;

use std::sync::Arc;
use std::time::Duration;

use metrics_attack::{Attack, run};
use npm_agent::metrics::server::MetricsServer;
use npm_agent::metrics::{Metrics, MetricsOptions};

/// The server's header timeout (`metrics::server::HEADER_TIMEOUT`), its reaping tick, and
/// slack for a loaded machine.
const CLOSED_WITHIN: Duration = Duration::from_millis(3000 + 250 + 2000);
/// The server's connection limit (`metrics::server::MAX_CONNECTIONS`).
const MAX_CONNECTIONS: usize = 64;

#[test]
fn hostile_clients_cannot_exhaust_the_metrics_server() {
    let metrics = Arc::new(Metrics::new(MetricsOptions::default()));
    metrics.heartbeat();
    let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
    // Warm up: the runtime's threads, the first page.
    let (code, _) = npm_agent::metrics::server::http_get(
        server.local_addr(),
        "/node-metrics",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200);

    let r = run(&Attack::issue(server.local_addr()));
    eprintln!(
        "threads {} → max {} (attack: {}) → {}; RSS {} → max {} → {} KiB; /healthz p50 {:?} p99 {:?} max {:?} ({} probes)",
        r.threads_before,
        r.threads_max,
        r.attack_threads,
        r.threads_after,
        r.rss_before_kib,
        r.rss_max_kib,
        r.rss_after_kib,
        r.healthz_quantile(0.5),
        r.healthz_quantile(0.99),
        r.healthz_quantile(1.0),
        r.healthz.len()
    );

    // /healthz answered 200 quickly throughout.
    assert!(
        r.healthz_failures.is_empty(),
        "/healthz failed under attack: {:?}",
        r.healthz_failures
    );
    assert!(r.healthz.len() >= 50, "{} probes", r.healthz.len());
    assert!(
        r.healthz_quantile(1.0) < Duration::from_secs(1),
        "slowest /healthz: {:?}",
        r.healthz_quantile(1.0)
    );

    // No thread per connection: the process grew by the attack's own threads only, and
    // nothing stayed.
    assert!(
        r.threads_max <= r.threads_before + r.attack_threads,
        "threads {} → {} (attack: {})",
        r.threads_before,
        r.threads_max,
        r.attack_threads
    );
    assert!(
        r.threads_after <= r.threads_before,
        "threads {} → {} after the attack",
        r.threads_before,
        r.threads_after
    );

    // Memory: 256 MiB of headers and 8 MiB of URL were sent; the server kept a few MiB.
    assert!(r.rss_growth_kib() < 24 << 10, "RSS grew by {} KiB", r.rss_growth_kib());

    // Huge heads: refused (431) and closed long before they were sent whole.
    for o in r.huge_headers.iter().chain([&r.huge_url]) {
        assert!(o.closed_after.is_some_and(|t| t < CLOSED_WITHIN), "not closed: {o:?}");
        assert!(o.status.is_none_or(|s| s >= 400), "answered: {o:?}");
    }
    for o in &r.huge_headers {
        assert!(o.sent < 64 << 20, "the whole header was taken: {o:?}");
    }

    // Idle connections: beyond the limit closed at once, the others at the header timeout;
    // trickling a header does not extend it.
    assert!(
        r.idle_open_after_burst <= MAX_CONNECTIONS,
        "{} of 500 idle connections open after the burst",
        r.idle_open_after_burst
    );
    for (what, outcomes) in [("idle", &r.idle), ("trickling", &r.trickle)] {
        let open: Vec<_> =
            outcomes.iter().filter(|o| o.closed_after.is_none_or(|t| t >= CLOSED_WITHIN)).collect();
        assert!(
            open.is_empty(),
            "{} of {} {what} connections not closed within {CLOSED_WITHIN:?}: {:?}",
            open.len(),
            outcomes.len(),
            open.first()
        );
    }
    drop(server);
}
