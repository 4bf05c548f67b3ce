//! The metrics endpoint of `npm-agent run` (no root: the in-memory dataplane): every metric
//! of Azure NPM with its name, type, help and labels, values that follow the manifests,
//! `/healthz` and `/readyz`, and nothing else served.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use npm_agent::metrics::server::http_get;
use npm_agent::metrics::text::{Exposition, parse};

const BIN: &str = env!("CARGO_BIN_EXE_npm-agent");

struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("npm-metrics-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("manifests")).unwrap();
        Dir(d)
    }

    fn write(&self, name: &str, text: &str) {
        let m = self.0.join("manifests");
        let tmp = m.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, m.join(name)).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join("manifests").join(name)).unwrap();
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path, Duration::from_secs(5)).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn scrape(addr: SocketAddr, path: &str) -> Exposition {
    let (code, body) = get(addr, path);
    assert_eq!(code, 200, "{path}: {body}");
    parse(&body).unwrap_or_else(|e| panic!("{path}: {e}\n{body}"))
}

/// Scrapes until `f` holds (the agent applies manifests asynchronously).
fn wait_for(
    addr: SocketAddr,
    path: &str,
    what: &str,
    f: impl Fn(&Exposition) -> bool,
) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, body)) = http_get(addr, path, Duration::from_secs(5))
            && let Ok(e) = parse(&body)
            && f(&e)
        {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached; last {path}:\n{}",
            http_get(addr, path, Duration::from_secs(5)).map(|r| r.1).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y}
";

fn pod(ns: &str, name: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec: {{nodeName: n1, containers: [{{name: c, image: i}}]}}
status: {{phase: Running, podIP: {ip}}}
"
    )
}

fn policy(name: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{protocol: TCP, port: {port}}}]
"
    )
}

/// Every metric of Azure NPM: (name, type, help, label names of its samples).
pub const AZURE_NPM_METRICS: &[(&str, &str, &str, &[&str])] = &[
    ("npm_num_policies", "gauge", "The number of current network policies for this node", &[]),
    ("npm_num_iptables_rules", "gauge", "The number of current IPTable rules for this node", &[]),
    ("npm_num_ipsets", "gauge", "The number of current IP sets for this node", &[]),
    ("npm_num_ipset_entries", "gauge", "The total number of entries in every IPSet", &[]),
    (
        "npm_pods_watched",
        "gauge",
        "Number of Pods NPM tracks across the cluster including Linux and Windows nodes",
        &[],
    ),
    (
        "npm_add_iptables_rule_exec_time",
        "summary",
        "Execution time in milliseconds for adding an IPTable rule to a chain",
        &["quantile"],
    ),
    (
        "npm_add_ipset_exec_time",
        "summary",
        "Execution time in milliseconds for creating an IP set",
        &["quantile"],
    ),
    (
        "npm_add_policy_exec_time",
        "summary",
        "Execution time in milliseconds for adding a network policy",
        &["had_error", "quantile"],
    ),
];

#[test]
fn endpoints_serve_azure_npm_metrics() {
    let dir = Dir::new("endpoints");
    dir.write("00-ns.yaml", NAMESPACES);
    let pods = [
        pod("x", "a", "10.0.0.1", "web"),
        pod("x", "b", "10.0.0.2", "db"),
        pod("y", "c", "10.0.0.3", "web"),
    ]
    .join("---\n");
    dir.write("10-pods.yaml", &pods);
    dir.write("20-p1.yaml", &policy("p1", 80));
    dir.write("21-p2.yaml", &policy("p2", 81));
    dir.write("22-p3.yaml", &policy("p3", 82));
    let addr = free_port();
    let child = Command::new(BIN)
        .args(["run", "--dataplane", "memory", "--node-name", "n1", "--advanced-metrics"])
        .arg("--source")
        .arg(format!("files:{}", dir.0.join("manifests").display()))
        .args(["--metrics-addr", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Agent(child);

    let cluster = wait_for(addr, "/cluster-metrics", "three policies", |e| {
        e.value("npm_num_policies", &[]) == Some(3.0)
    });
    assert_eq!(cluster.value("npm_pods_watched", &[]), Some(3.0));
    let node = wait_for(addr, "/node-metrics", "three pod creates", |e| {
        e.value(
            "npm_controller_pod_exec_time_count",
            &[("operation", "create"), ("had_error", "false")],
        ) == Some(3.0)
    });
    assert_eq!(node.value("npm_add_policy_exec_time_count", &[("had_error", "false")]), Some(3.0));
    assert_eq!(
        node.value(
            "npm_controller_namespace_exec_time_count",
            &[("operation", "create"), ("had_error", "false")]
        ),
        Some(2.0)
    );

    // Names, types, help texts and labels.
    for (name, kind, help, labels) in AZURE_NPM_METRICS {
        let e = if kind == &"summary" { &node } else { &cluster };
        let f = e.family(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((f.kind.as_str(), f.help.as_str()), (*kind, *help), "{name}");
        let quantile_samples: Vec<_> = f.samples.iter().filter(|s| s.name == *name).collect();
        assert!(!quantile_samples.is_empty(), "{name}: no samples");
        for s in quantile_samples {
            let names: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(names, *labels, "{name}: labels");
        }
        if kind == &"summary" {
            let qs: Vec<&str> = f.samples.iter().filter_map(|s| s.label("quantile")).collect();
            assert!(
                qs.contains(&"0.5") && qs.contains(&"0.9") && qs.contains(&"0.99"),
                "{name}: quantiles {qs:?}"
            );
            assert!(
                f.samples.iter().any(|s| s.name == format!("{name}_sum"))
                    && f.samples.iter().any(|s| s.name == format!("{name}_count"))
            );
        }
    }
    // Counts come from the cluster endpoint only, execution times from the node endpoint.
    assert!(
        node.family("npm_num_policies").is_none()
            && cluster.family("npm_add_policy_exec_time").is_none()
    );

    // Update a policy, delete another, relabel a pod, delete a pod.
    dir.write("20-p1.yaml", &policy("p1", 8080));
    dir.remove("22-p3.yaml");
    let pods = [pod("x", "a", "10.0.0.1", "db"), pod("x", "b", "10.0.0.2", "db")].join("---\n");
    dir.write("10-pods.yaml", &pods);
    let node = wait_for(addr, "/node-metrics", "updates and deletes", |e| {
        e.value(
            "npm_controller_policy_exec_time_count",
            &[("operation", "update"), ("had_error", "false")],
        ) == Some(1.0)
            && e.value(
                "npm_controller_policy_exec_time_count",
                &[("operation", "delete"), ("had_error", "false")],
            ) == Some(1.0)
            && e.value(
                "npm_controller_pod_exec_time_count",
                &[("operation", "delete"), ("had_error", "false")],
            ) == Some(1.0)
            && e.value(
                "npm_controller_pod_exec_time_count",
                &[("operation", "update"), ("had_error", "false")],
            ) == Some(1.0)
    });
    for name in [
        "npm_controller_policy_exec_time",
        "npm_controller_pod_exec_time",
        "npm_controller_namespace_exec_time",
    ] {
        let f = node.family(name).unwrap();
        assert_eq!(f.kind, "summary");
        for s in f.samples.iter().filter(|s| s.name == name) {
            let names: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(names, ["had_error", "operation", "quantile"], "{name}");
        }
    }
    let cluster = wait_for(addr, "/cluster-metrics", "two policies", |e| {
        e.value("npm_num_policies", &[]) == Some(2.0)
    });
    assert_eq!(cluster.value("npm_pods_watched", &[]), Some(2.0));
    assert_eq!(
        node.value(
            "npm_dataplane_apply_failures_total",
            &[("dataplane", "memory"), ("operation", "apply")]
        ),
        Some(0.0)
    );

    // Health, readiness, and nothing else.
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz").0, 200);
    for path in ["/debug/pprof/", "/npm/v1/debug/manager", "/metrics", "/"] {
        assert_eq!(get(addr, path).0, 404, "{path}");
    }
}

#[test]
fn readyz_waits_for_the_first_sync() {
    // No manifest directory yet: the source never completes its first sync.
    let dir = Dir::new("notready");
    let missing = dir.0.join("missing");
    let addr = free_port();
    let child = Command::new(BIN)
        .args(["run", "--dataplane", "memory", "--node-name", "n1"])
        .arg("--source")
        .arg(format!("files:{}", missing.display()))
        .args(["--metrics-addr", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Agent(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/healthz", Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "the metrics server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(get(addr, "/readyz").0, 503);
    // Counts and summaries without labels are there from the start (as in Azure NPM).
    let node = scrape(addr, "/node-metrics");
    assert_eq!(node.value("npm_add_ipset_exec_time_count", &[]), Some(0.0));
    assert!(node.family("npm_ipset_counts").is_none());
    let cluster = scrape(addr, "/cluster-metrics");
    assert_eq!(cluster.value("npm_num_policies", &[]), Some(0.0));
    // (On by default, but the memory dataplane has no sets to count.)
    assert!(cluster.family("npm_ipset_counts").is_none(), "no sets, no series");
}
