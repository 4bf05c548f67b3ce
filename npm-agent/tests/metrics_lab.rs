//! The metrics of a real agent on the network-namespace lab (eBPF dataplane, as root), then a
//! real Prometheus scraping it with the shipped scrape configuration:
//!
//! - every metric of Azure NPM with its name, type, help and labels, and values that follow
//!   known actions (three policies applied give `npm_num_policies 3`, blocked probes raise the
//!   dropped counter, a pod create is counted under `operation="create"`, ...);
//! - the counts of rules against the pinned maps' contents, read here, and of Azure NPM's sets
//!   (the layout's: `ns-x`, `podlabel-pod:a`, …) against the cluster;
//! - one cluster on an eBPF agent and on an iptables agent: the same `npm_num_ipsets`,
//!   `npm_num_ipset_entries` and `npm_ipset_counts` series;
//! - Prometheus (Debian's) in node 0's namespace with deploy/prometheus's jobs (static
//!   targets in place of Kubernetes discovery) and alert rules: both jobs up, the advanced
//!   metric dropped by the cluster job as shipped, the rules healthy, and every query of
//!   deploy/grafana's dashboard returning data.
//!
//! Without root: prints SKIPPED.

mod metrics_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use metrics_common::{dashboard_queries, deploy, tool};
use npm_agent::dataplane::azure::hashed_set_name;
use npm_agent::lab::{LabCluster, LabOptions, net};
use npm_agent::metrics::prometheus_config::{StaticTargets, with_static_targets};
use npm_agent::metrics::server::http_get;
use npm_agent::metrics::text::{Exposition, parse};
use npm_agent::model::Protocol;
use npm_agent::netns;
use npm_agent::simulate::Enforcer;
use npm_agent::simulate::case::{Action, ActionOutcome, Case, CaseCluster};
use npm_agent::state::Event;

const AGENT: &str = "127.0.0.1:10091";

/// Every metric of Azure NPM: (name, endpoint, type, help, label names of its samples).
const AZURE_NPM: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "npm_num_policies",
        "/cluster-metrics",
        "gauge",
        "The number of current network policies for this node",
        &[],
    ),
    (
        "npm_num_iptables_rules",
        "/cluster-metrics",
        "gauge",
        "The number of current IPTable rules for this node",
        &[],
    ),
    (
        "npm_num_ipsets",
        "/cluster-metrics",
        "gauge",
        "The number of current IP sets for this node",
        &[],
    ),
    (
        "npm_num_ipset_entries",
        "/cluster-metrics",
        "gauge",
        "The total number of entries in every IPSet",
        &[],
    ),
    (
        "npm_ipset_counts",
        "/cluster-metrics",
        "gauge",
        "The number of entries in each individual IPSet",
        &["set_hash", "set_name"],
    ),
    (
        "npm_pods_watched",
        "/cluster-metrics",
        "gauge",
        "Number of Pods NPM tracks across the cluster including Linux and Windows nodes",
        &[],
    ),
    (
        "npm_add_iptables_rule_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for adding an IPTable rule to a chain",
        &["quantile"],
    ),
    (
        "npm_add_ipset_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for creating an IP set",
        &["quantile"],
    ),
    (
        "npm_add_policy_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for adding a network policy",
        &["had_error", "quantile"],
    ),
    (
        "npm_controller_policy_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for updating/deleting a network policy. NOTE: for adding, see npm_add_policy_exec_time",
        &["had_error", "operation", "quantile"],
    ),
    (
        "npm_controller_namespace_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for adding/updating/deleting a namespace",
        &["had_error", "operation", "quantile"],
    ),
    (
        "npm_controller_pod_exec_time",
        "/node-metrics",
        "summary",
        "Execution time in milliseconds for adding/updating/deleting a pod",
        &["had_error", "operation", "quantile"],
    ),
];

/// The dataplane's metrics: (name, type, label names).
const DATAPLANE: &[(&str, &str, &[&str])] = &[
    ("npm_packets_allowed_total", "counter", &["direction", "reason"]),
    ("npm_packets_dropped_total", "counter", &["direction", "reason"]),
    ("npm_map_entries", "gauge", &["map"]),
    ("npm_map_max_entries", "gauge", &["map"]),
    ("npm_conntrack_entries", "gauge", &[]),
    ("npm_dataplane_apply_failures_total", "counter", &["dataplane", "operation"]),
];

struct Lab {
    lab: LabCluster,
    cluster: CaseCluster,
    netns: PathBuf,
}

impl Lab {
    fn get(&self, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = addr.parse()?;
        let path = path.to_string();
        Ok(netns::run_in(&self.netns, move || http_get(addr, &path, Duration::from_secs(10)))??)
    }

    fn scrape(&self, path: &str) -> Exposition {
        let (code, body) =
            self.get(AGENT, path).unwrap_or_else(|e| panic!("scraping {path}: {e:#}"));
        assert_eq!(code, 200, "{path}: {body}");
        parse(&body).unwrap_or_else(|e| panic!("{path}: {e}\n{body}"))
    }

    /// Scrapes until `f` holds (the dataplane's figures are read at most once a second).
    fn wait(&self, path: &str, what: &str, f: impl Fn(&Exposition) -> bool) -> Exposition {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let e = self.scrape(path);
            if f(&e) {
                return e;
            }
            if Instant::now() > deadline {
                let (_, body) = self.get(AGENT, path).unwrap();
                panic!("{what}: not reached; {path}:\n{body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Applies actions of the case format and waits until the agent enforces them.
    fn act(&mut self, yaml: &str) {
        let actions: Vec<Action> =
            serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
        let mut events: Vec<Event> = Vec::new();
        for a in &actions {
            match self.cluster.action(a).unwrap() {
                ActionOutcome::Events(e) => events.extend(e),
                ActionOutcome::Rejected(e) => panic!("rejected: {e}"),
            }
        }
        self.lab.apply(&self.cluster, &events).unwrap();
    }

    /// A PromQL query to the Prometheus in node 0's namespace: the result vector.
    fn query(&self, q: &str) -> serde_json::Value {
        let (code, body) = self
            .get("127.0.0.1:9090", &format!("/api/v1/query?query={}", urlencode(q)))
            .unwrap_or_else(|e| panic!("{q}: {e:#}"));
        assert_eq!(code, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{q}: {body}");
        v["data"]["result"].clone()
    }

    fn probe(&mut self, from: &str, to: &str, port: u16) -> bool {
        let pods: Vec<_> = [from, to]
            .iter()
            .map(|k| {
                let (ns, name) = k.split_once('/').unwrap();
                self.cluster.pod(ns, name).unwrap().clone()
            })
            .collect();
        let refs: Vec<_> = pods.iter().collect();
        self.lab.probe(&self.cluster, &refs, Protocol::Tcp, port).unwrap()[0][1]
    }
}

/// The agent the labs run: this build's, or NPM_LAB_AGENT (another build: an older one, to see
/// the tests fail there).
fn agent() -> PathBuf {
    std::env::var_os("NPM_LAB_AGENT")
        .map_or_else(|| env!("CARGO_BIN_EXE_npm-agent").into(), PathBuf::from)
}

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "- apply:\n    apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    metadata: {{name: {name}, namespace: {ns}}}\n    spec: {spec}\n"
    )
}

fn labels_of(e: &Exposition, name: &str) -> BTreeSet<Vec<String>> {
    e.family(name)
        .map(|f| {
            f.samples
                .iter()
                .filter(|s| s.name == name)
                .map(|s| s.labels.keys().cloned().collect())
                .collect()
        })
        .unwrap_or_default()
}

/// What the pinned maps hold, read here with aya (not through the agent's code): counts as
/// docs/METRICS.md defines them for eBPF.
#[derive(Debug, Default)]
struct MapContents {
    identities: BTreeMap<u32, u64>,
    identity_entries: u64,
    prefixes: BTreeSet<(u32, npm_common::Addr)>,
    policy_entries: u64,
    entries: BTreeMap<String, (u64, u64)>,
}

fn read_maps(maps: &Path) -> MapContents {
    use aya::maps::lpm_trie::LpmTrie;
    use aya::maps::{HashMap, Map, MapData};
    let open =
        |name: &str| Map::from_map_data(MapData::from_pin(maps.join(name)).unwrap()).unwrap();
    let cap = |name: &str| {
        u64::from(MapData::from_pin(maps.join(name)).unwrap().info().unwrap().max_entries())
    };
    let mut c = MapContents::default();
    let ids: HashMap<_, npm_common::Addr, u32> =
        open(npm_common::MAP_IDENTITIES).try_into().unwrap();
    for (_, id) in ids.iter().map(Result::unwrap) {
        *c.identities.entry(id).or_default() += 1;
        c.identity_entries += 1;
    }
    let cidrs: LpmTrie<_, npm_common::Addr, u32> = open(npm_common::MAP_CIDRS).try_into().unwrap();
    for k in cidrs.keys().map(Result::unwrap) {
        c.prefixes.insert((k.prefix_len(), k.data()));
    }
    let policy: LpmTrie<_, npm_common::PolicyKeyData, npm_common::PolicyValue> =
        open(npm_common::MAP_POLICY).try_into().unwrap();
    c.policy_entries = policy.keys().count() as u64;
    c.entries.insert(
        npm_common::MAP_IDENTITIES.into(),
        (c.identity_entries, cap(npm_common::MAP_IDENTITIES)),
    );
    c.entries.insert(
        npm_common::MAP_CIDRS.into(),
        (c.prefixes.len() as u64, cap(npm_common::MAP_CIDRS)),
    );
    c.entries
        .insert(npm_common::MAP_POLICY.into(), (c.policy_entries, cap(npm_common::MAP_POLICY)));
    let eps: HashMap<_, npm_common::Addr, npm_common::EndpointInfo> =
        open(npm_common::MAP_ENDPOINTS).try_into().unwrap();
    c.entries.insert(
        npm_common::MAP_ENDPOINTS.into(),
        (eps.keys().count() as u64, cap(npm_common::MAP_ENDPOINTS)),
    );
    c
}

struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn lab_agent_metrics_and_prometheus() {
    if let Err(e) = net::check_environment() {
        println!("SKIPPED: the metrics lab test needs root and iproute2: {e:#}");
        return;
    }
    let mut opts = LabOptions::new("ebpf", 1);
    opts.agent = agent();
    opts.agent_args = vec!["--advanced-metrics".into()];
    let lab = LabCluster::new(opts).expect("building the lab");
    let netns = lab.lab().node(0).unwrap().netns_path.clone();
    let maps = PathBuf::from("/sys/fs/bpf").join(format!("{}-n0", lab.lab().prefix())).join("maps");
    let case: Case = serde_yaml_ng::from_str("name: metrics\nsteps: []\n").unwrap();
    let cluster = CaseCluster::new(&case).unwrap();
    let mut lab = Lab { lab, cluster, netns };
    let initial = lab.cluster.initial_events();
    lab.lab.apply(&lab.cluster, &initial).unwrap();

    // The model: 3 namespaces and 9 pods, created.
    let cluster_m = lab
        .wait("/cluster-metrics", "nine pods", |e| e.value("npm_pods_watched", &[]) == Some(9.0));
    assert_eq!(cluster_m.value("npm_num_policies", &[]), Some(0.0));
    let node = lab.scrape("/node-metrics");
    assert_eq!(
        node.value(
            "npm_controller_pod_exec_time_count",
            &[("operation", "create"), ("had_error", "false")]
        ),
        Some(9.0)
    );
    assert_eq!(
        node.value(
            "npm_controller_namespace_exec_time_count",
            &[("operation", "create"), ("had_error", "false")]
        ),
        Some(3.0)
    );
    assert_eq!(node.value("npm_dataplane_info", &[("dataplane", "ebpf")]), Some(1.0));

    // Three policies: ingress of x denied but from y to x/a on 80; z/a's egress limited to a
    // block with an exception (two CIDR prefixes).
    lab.act(&format!(
        "{}{}{}",
        policy("deny-x", "x", "{podSelector: {}, policyTypes: [Ingress]}"),
        policy(
            "y-to-xa",
            "x",
            "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{protocol: TCP, port: 80}]}]}"
        ),
        policy(
            "za-egress",
            "z",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.240.0.0/16, except: ['{{podIP x/b}}/32']}}]}]}"
        ),
    ));
    lab.wait("/cluster-metrics", "three policies and their rules", |e| {
        e.value("npm_num_policies", &[]) == Some(3.0)
            && e.value("npm_num_iptables_rules", &[]).is_some_and(|v| v > 0.0)
    });
    let node = lab.scrape("/node-metrics");
    assert_eq!(node.value("npm_add_policy_exec_time_count", &[("had_error", "false")]), Some(3.0));
    assert!(
        node.value("npm_add_iptables_rule_exec_time_count", &[]).unwrap() >= 1.0,
        "rules were added"
    );
    assert!(
        node.value("npm_add_ipset_exec_time_count", &[]).unwrap() >= 1.0,
        "set members were added"
    );

    // Blocked probes raise the dropped counter; allowed ones the allowed counter.
    let dropped =
        |e: &Exposition, dir: &str| e.sum("npm_packets_dropped_total", &[("direction", dir)]);
    let allowed =
        |e: &Exposition, dir: &str| e.sum("npm_packets_allowed_total", &[("direction", dir)]);
    let before = lab.scrape("/node-metrics");
    assert!(!lab.probe("x/b", "x/c", 81), "deny-x blocks x/b -> x/c");
    assert!(!lab.probe("y/a", "x/a", 81), "y-to-xa admits port 80 only");
    assert!(lab.probe("y/a", "x/a", 80), "y-to-xa admits y -> x/a on 80");
    assert!(!lab.probe("z/a", "x/b", 80), "za-egress excepts x/b");
    let after = lab.wait("/node-metrics", "drops counted", |e| {
        dropped(e, "ingress") >= dropped(&before, "ingress") + 2.0
            && dropped(e, "egress") >= dropped(&before, "egress") + 1.0
    });
    assert!(
        after.sum("npm_packets_dropped_total", &[("direction", "ingress"), ("reason", "denied")])
            >= 2.0
    );
    assert!(allowed(&after, "ingress") > allowed(&before, "ingress"));
    assert!(allowed(&after, "egress") > allowed(&before, "egress"));
    assert!(
        after.value("npm_conntrack_entries", &[]).unwrap() >= 1.0,
        "the allowed connection is tracked"
    );

    // More events: a policy updated, one added and deleted, a pod and a namespace relabelled,
    // a pod deleted and one created.
    lab.act(&policy(
        "y-to-xa",
        "x",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{protocol: TCP, port: 81}]}]}",
    ));
    lab.act(&policy("temp", "y", "{podSelector: {}, policyTypes: [Ingress]}"));
    lab.act("- delete-policy: {namespace: y, name: temp}\n");
    lab.act("- set-pod-labels: {namespace: y, pod: b, labels: {pod: b, tier: web}}\n");
    lab.act("- set-namespace-labels: {namespace: z, labels: {ns: z, env: test}}\n");
    lab.act("- delete-pod: {namespace: z, pod: c}\n");
    lab.act("- create-pod: {namespace: x, pod: d}\n");
    let node = lab.wait("/node-metrics", "every operation counted", |e| {
        let c = |name: &str, op: &str| {
            e.value(&format!("{name}_count"), &[("operation", op), ("had_error", "false")])
        };
        c("npm_controller_pod_exec_time", "create") == Some(10.0)
            && c("npm_controller_pod_exec_time", "update") == Some(1.0)
            && c("npm_controller_pod_exec_time", "delete") == Some(1.0)
            && c("npm_controller_namespace_exec_time", "update") == Some(1.0)
            && c("npm_controller_policy_exec_time", "update") == Some(1.0)
            && c("npm_controller_policy_exec_time", "delete") == Some(1.0)
            && e.value("npm_add_policy_exec_time_count", &[("had_error", "false")]) == Some(4.0)
    });
    let cluster_m = lab.wait("/cluster-metrics", "three policies, nine pods", |e| {
        e.value("npm_num_policies", &[]) == Some(3.0)
            && e.value("npm_pods_watched", &[]) == Some(9.0)
    });
    assert!(lab.probe("y/a", "x/a", 81), "the update took effect");

    // Every metric of Azure NPM: name, type, help, labels; summaries with their quantiles,
    // _sum and _count.
    for (name, path, kind, help, labels) in AZURE_NPM {
        let e = if *path == "/node-metrics" { &node } else { &cluster_m };
        let f = e.family(name).unwrap_or_else(|| panic!("{name} is not on {path}"));
        assert_eq!((f.kind.as_str(), f.help.as_str()), (*kind, *help), "{name}");
        let want: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        assert_eq!(labels_of(e, name), BTreeSet::from([want]), "{name}: labels");
        if *kind == "summary" {
            let qs: BTreeSet<&str> = f.samples.iter().filter_map(|s| s.label("quantile")).collect();
            assert_eq!(qs, BTreeSet::from(["0.5", "0.9", "0.99"]), "{name}");
            assert!(f.samples.iter().any(|s| s.name == format!("{name}_sum")), "{name}_sum");
            assert!(f.samples.iter().any(|s| s.name == format!("{name}_count")), "{name}_count");
        }
        let other = if *path == "/node-metrics" { &cluster_m } else { &node };
        assert!(other.family(name).is_none(), "{name} is on one endpoint only");
    }
    let ops = |name: &str| -> BTreeSet<String> {
        node.samples(name, &[]).filter_map(|s| s.label("operation").map(String::from)).collect()
    };
    assert_eq!(
        ops("npm_controller_policy_exec_time"),
        BTreeSet::from(["update".into(), "delete".into()])
    );
    assert_eq!(
        ops("npm_controller_pod_exec_time"),
        BTreeSet::from(["create".into(), "update".into(), "delete".into()])
    );
    assert_eq!(
        ops("npm_controller_namespace_exec_time"),
        BTreeSet::from(["create".into(), "update".into()])
    );
    // Execution times are milliseconds: handling an event takes well under a minute and
    // more than a nanosecond.
    let sum = node
        .value(
            "npm_controller_pod_exec_time_sum",
            &[("operation", "create"), ("had_error", "false")],
        )
        .unwrap();
    assert!(sum > 0.0001 && sum < 60_000.0, "pod create time sum {sum} ms");

    for (name, kind, labels) in DATAPLANE {
        let f = node.family(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(f.kind, *kind, "{name}");
        let want: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        assert_eq!(labels_of(&node, name), BTreeSet::from([want]), "{name}: labels");
    }
    for op in ["apply", "reconcile", "attach"] {
        assert_eq!(
            node.value(
                "npm_dataplane_apply_failures_total",
                &[("dataplane", "ebpf"), ("operation", op)]
            ),
            Some(0.0)
        );
    }

    // The counts against the maps (nothing changes between these readings).
    std::thread::sleep(Duration::from_millis(1100));
    let cluster_m = lab.scrape("/cluster-metrics");
    let node = lab.scrape("/node-metrics");
    if std::env::var_os("NPM_SHOW_METRICS").is_some() {
        for path in ["/node-metrics", "/cluster-metrics"] {
            println!("---- {path}\n{}", lab.get(AGENT, path).unwrap().1);
        }
    }
    let m = read_maps(&maps);
    assert_eq!(m.identity_entries, 9, "every pod of the cluster has an identity entry");
    assert_eq!(m.prefixes.len(), 2, "za-egress names a block and an exception");
    assert_eq!(
        cluster_m.value("npm_num_iptables_rules", &[]),
        Some(m.policy_entries as f64),
        "rules: policy-map entries"
    );
    // Azure NPM's sets of the cluster, as iptables mode holds them (the maps hold none):
    // the pods of x (a, b, c, d), y, z (a, b), the pods labelled pod=a, the namespaces
    // labelled ns=y (a list of ns-y), and za-egress's block with its except.
    let xb = lab.cluster.pod("x", "b").unwrap().ip.unwrap();
    let want: BTreeMap<String, f64> = [
        ("ns-x".to_string(), 4.0),
        ("ns-y".to_string(), 3.0),
        ("ns-z".to_string(), 2.0),
        ("podlabel-pod:a".to_string(), 3.0),
        ("nslabel-ns:y".to_string(), 1.0),
        (format!("cidr-10.240.0.0/16-except-{xb}/32"), 2.0),
    ]
    .into();
    let per_set: BTreeMap<String, f64> = cluster_m
        .samples("npm_ipset_counts", &[])
        .map(|s| {
            let name = s.label("set_name").unwrap();
            assert_eq!(s.label("set_hash").unwrap(), hashed_set_name(name), "{name}: Azure's hash");
            (name.to_string(), s.value)
        })
        .collect();
    assert_eq!(per_set, want, "npm_ipset_counts");
    assert_eq!(cluster_m.value("npm_num_ipsets", &[]), Some(want.len() as f64), "sets");
    assert_eq!(
        cluster_m.value("npm_num_ipset_entries", &[]),
        Some(want.values().sum::<f64>()),
        "set entries"
    );
    for (map, (entries, cap)) in &m.entries {
        assert_eq!(
            node.value("npm_map_entries", &[("map", map)]),
            Some(*entries as f64),
            "{map} entries"
        );
        assert_eq!(
            node.value("npm_map_max_entries", &[("map", map)]),
            Some(*cap as f64),
            "{map} capacity"
        );
    }
    assert_eq!(
        node.value("npm_map_max_entries", &[("map", npm_common::MAP_POLICY)]),
        Some(f64::from(npm_common::MAX_POLICY))
    );

    // A real Prometheus with the shipped jobs and rules.
    let Some(prometheus) = tool("prometheus") else {
        println!("SKIPPED: the Prometheus part: prometheus is not installed");
        return;
    };
    let dir = std::env::temp_dir().join(format!("npm-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(deploy("prometheus/npm-alerts.yaml"), dir.join("npm-alerts.yaml")).unwrap();
    let config = with_static_targets(
        &std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap(),
        &StaticTargets {
            // As the node role gives it: the node's address with the kubelet's port, which
            // the job's relabelling turns into :10091.
            nodes: vec![("node-0".into(), "127.0.0.1:10250".into())],
            service: AGENT.into(),
            interval: Some("1s".into()),
            rule_files: Some(vec![dir.join("npm-alerts.yaml").display().to_string()]),
            advanced_copy: true,
        },
    )
    .unwrap();
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = lab
        .lab
        .lab()
        .node_command(0, &prometheus)
        .unwrap()
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .args(["--web.listen-address=127.0.0.1:9090", "--log.level=warn"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prometheus");
    let prom = Prometheus { child, dir: dir.clone() };
    let query = |lab: &Lab, q: &str| lab.query(q);
    // Both jobs up for a few scrapes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = lab.get("127.0.0.1:9090", "/-/ready").map(|r| r.0 == 200).unwrap_or(false);
        if ready {
            let up = query(&lab, "count_over_time(up[1m]) >= 5 and up == 1");
            let jobs: BTreeSet<String> = up
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["metric"]["job"].as_str().unwrap().to_string())
                .collect();
            if jobs.len() == 3 {
                break;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "prometheus did not scrape both jobs:\n{}",
                std::fs::read_to_string(prom.dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // The node job's relabelling sent it to :10091.
    let up = query(&lab, r#"up{job="azure-npm-node-metrics"}"#);
    assert_eq!(up[0]["metric"]["instance"], AGENT, "{up}");
    // The cluster job drops npm_ipset_counts as shipped; without the drop it is there.
    assert_eq!(
        query(&lab, r#"npm_ipset_counts{job="azure-npm-cluster-metrics"}"#)
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(
        !query(&lab, r#"npm_ipset_counts{job="azure-npm-cluster-metrics-advanced"}"#)
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        query(&lab, r#"npm_num_policies{job="azure-npm-cluster-metrics"}"#)[0]["value"][1],
        "3"
    );

    // Traffic while Prometheus watches, then every dashboard query returns data.
    assert!(!lab.probe("x/b", "x/c", 80));
    std::thread::sleep(Duration::from_secs(2));
    let mut empty = Vec::new();
    for q in dashboard_queries("10s") {
        let result = query(&lab, &q.expr);
        if result.as_array().is_none_or(|r| r.is_empty()) {
            empty.push(format!("{}: {}", q.panel, q.expr));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}", empty.join("\n"));

    // The alert rules load and evaluate on real data without error; the agent is up, has not
    // failed and its maps are far from full. (The pod create median depends on the machine.)
    let (_, rules) = lab.get("127.0.0.1:9090", "/api/v1/rules").unwrap();
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let list: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(list.len(), 7, "{rules}");
    for r in list {
        assert_eq!(r["health"], "ok", "{r}");
        if [
            "NpmAgentDown",
            "AzureNPMFailureCreatePolicy",
            "NpmDataplaneApplyFailures",
            "NpmMapNearCapacity",
            "NpmClusterNetworkPolicyNotEnforced",
        ]
        .contains(&r["name"].as_str().unwrap_or_default())
        {
            assert_eq!(r["state"], "inactive", "{r}");
        }
    }
    drop(prom);
    lab.lab.shutdown().unwrap();
}

/// The iptables dataplane's counts are the kernel's: the rules of the AZURE-NPM chains
/// (iptables-save) and Azure NPM's sets (the layout's, not the dataplane's own) and their
/// entries (ipset save), in the node's namespace; blocked probes raise the DROP rules' counters.
#[test]
fn lab_iptables_metrics() {
    if let Err(e) = net::check_environment() {
        println!("SKIPPED: the metrics lab test needs root and iproute2: {e:#}");
        return;
    }
    let mut opts = LabOptions::new("iptables", 1);
    opts.agent = agent();
    opts.agent_args = vec!["--advanced-metrics".into()];
    let lab = LabCluster::new(opts).expect("building the lab");
    let netns = lab.lab().node(0).unwrap().netns_path.clone();
    let case: Case = serde_yaml_ng::from_str("name: metrics\nsteps: []\n").unwrap();
    let cluster = CaseCluster::new(&case).unwrap();
    let mut lab = Lab { lab, cluster, netns };
    let initial = lab.cluster.initial_events();
    lab.lab.apply(&lab.cluster, &initial).unwrap();
    lab.act(&format!(
        "{}{}",
        policy("deny-x", "x", "{podSelector: {}, policyTypes: [Ingress]}"),
        policy(
            "za-egress",
            "z",
            "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.240.0.0/16, except: ['{{podIP y/b}}/32']}}]}]}"
        ),
    ));
    let node = lab.wait("/node-metrics", "the iptables dataplane", |e| {
        e.value("npm_dataplane_info", &[("dataplane", "iptables")]) == Some(1.0)
    });
    let before_in = node.sum("npm_packets_dropped_total", &[("direction", "ingress")]);
    let before_out = node.sum("npm_packets_dropped_total", &[("direction", "egress")]);
    assert!(!lab.probe("y/a", "x/a", 80), "deny-x");
    assert!(
        !lab.probe("z/a", "y/b", 81),
        "za-egress excepts y/b (which no ingress policy isolates)"
    );
    lab.wait("/node-metrics", "drops counted", |e| {
        e.sum("npm_packets_dropped_total", &[("direction", "ingress")]) > before_in
            && e.sum("npm_packets_dropped_total", &[("direction", "egress")]) > before_out
    });

    // The counts against the kernel's tables, read in the node's namespace.
    std::thread::sleep(Duration::from_millis(1100));
    let cluster_m = lab.scrape("/cluster-metrics");
    let output = |program: &str, args: &[&str]| {
        let out = lab.lab.lab().node_command(0, program).unwrap().args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut rules = 0;
    let mut saved = String::new();
    for (save, save6) in [
        ("iptables-nft-save", "ip6tables-nft-save"),
        ("iptables-legacy-save", "ip6tables-legacy-save"),
    ] {
        let text = output(save, &["-t", "filter"]);
        if text.lines().any(|l| l.starts_with(":AZURE-NPM ")) {
            // (Both families' rules: the IPv6 layout, when there is one, in ip6tables.)
            let v6 = output(save6, &["-t", "filter"]);
            let count = |t: &str| t.lines().filter(|l| l.starts_with("-A AZURE-NPM")).count();
            rules = count(&text) + count(&v6);
            saved = text;
        }
    }
    assert!(rules > 0, "the AZURE-NPM chains are in the node's namespace");
    // Azure NPM's chain per policy, named from `<namespace>/<name>`, walked from the chain
    // of the pods it selects, which the base chain jumps to by the pod's address.
    use npm_agent::dataplane::iptables::names::{group_chain, policy_chain};
    for chain in [policy_chain(true, "x/deny-x"), policy_chain(false, "z/za-egress")] {
        assert!(saved.lines().any(|l| l == format!(":{chain} - [0:0]")), "{chain} in\n{saved}");
    }
    let group = group_chain(false, "z/za-egress");
    let jump =
        |l: &&str| l.starts_with("-A AZURE-NPM-EGRESS -s ") && l.ends_with(&format!(" -j {group}"));
    assert!(saved.lines().any(|l| jump(&l)), "a jump to {group} in\n{saved}");
    let sets = output("ipset", &["save"]);
    for readable in ["ns-x", "ns-z", "podlabel-pod:a", "transition"] {
        assert!(
            sets.contains(&format!("create {} ", hashed_set_name(readable))),
            "{readable} in\n{sets}"
        );
    }
    // Azure NPM's sets (the layout's) with their entries in the kernel, by readable name; the
    // dataplane's own (transition, the groups', the guard's) are not counted.
    let yb = lab.cluster.pod("y", "b").unwrap().ip.unwrap();
    let azure: Vec<String> = ["ns-x", "ns-z", "podlabel-pod:a"]
        .into_iter()
        .map(String::from)
        .chain([format!("cidr-10.240.0.0/16-except-{yb}/32")])
        .collect();
    let mut entries: BTreeMap<String, u64> = BTreeMap::new();
    for line in sets.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["add", name, ..] = w.as_slice() {
            *entries.entry(name.to_string()).or_default() += 1;
        }
    }
    let want: BTreeMap<(String, String), f64> = azure
        .iter()
        .map(|n| {
            let h = hashed_set_name(n);
            let e = entries.get(&h).copied().unwrap_or(0) as f64;
            ((n.clone(), h), e)
        })
        .collect();
    assert_eq!(cluster_m.value("npm_num_iptables_rules", &[]), Some(rules as f64));
    assert_eq!(cluster_m.value("npm_num_ipsets", &[]), Some(want.len() as f64));
    assert_eq!(cluster_m.value("npm_num_ipset_entries", &[]), Some(want.values().sum::<f64>()));
    let per_set: BTreeMap<(String, String), f64> = cluster_m
        .samples("npm_ipset_counts", &[])
        .map(|s| {
            let name = s.label("set_name").unwrap().to_string();
            ((name, s.label("set_hash").unwrap().to_string()), s.value)
        })
        .collect();
    assert_eq!(per_set, want);
    // ns-x holds x's three pods; the block, itself and its except (a `nomatch` entry).
    assert_eq!(want[&("ns-x".to_string(), hashed_set_name("ns-x"))], 3.0);
    let cidr = &azure[3];
    assert_eq!(want[&(cidr.clone(), hashed_set_name(cidr))], 2.0);
    assert_eq!(cluster_m.value("npm_num_policies", &[]), Some(2.0));
    lab.lab.shutdown().unwrap();
}

/// One cluster with every kind of Azure NPM set: namespaces, pod labels, a list of label
/// values, namespace labels, all namespaces, a named port, blocks with and without excepts, a
/// negated label.
const SETS_CASE: &str = r#"
name: sets
model:
  namespaces:
  - {name: x, labels: {ns: x, team: a}}
  - {name: y, labels: {ns: y, team: b}}
  - {name: z, labels: {ns: z}}
  pods:
  - {namespace: x, pod: a, labels: {app: web, tier: front}, ports: [{name: http, port: 80}]}
  - {namespace: x, pod: b, labels: {app: db}}
  - {namespace: y, pod: a, labels: {app: web}, ports: [{name: http, port: 81}]}
  - {namespace: y, pod: b, labels: {app: api}}
  - {namespace: z, pod: a, labels: {app: web}}
  - {namespace: z, pod: b, labels: {app: db, tier: back}}
steps: []
"#;

/// Azure NPM's set series of `/cluster-metrics`: `npm_num_ipsets`, `npm_num_ipset_entries`,
/// and `npm_ipset_counts` by (set_name, set_hash).
type SetSeries = (f64, f64, BTreeMap<(String, String), f64>);

/// `SETS_CASE` and its policies on a one-node lab of `dataplane`: the set series once enforced.
fn set_series(dataplane: &str) -> SetSeries {
    let mut opts = LabOptions::new(dataplane, 1);
    opts.agent = agent();
    opts.agent_args = vec!["--advanced-metrics".into()];
    let lab = LabCluster::new(opts).expect("building the lab");
    let netns = lab.lab().node(0).unwrap().netns_path.clone();
    let case: Case = serde_yaml_ng::from_str(SETS_CASE).unwrap();
    let cluster = CaseCluster::new(&case).unwrap();
    let mut lab = Lab { lab, cluster, netns };
    let initial = lab.cluster.initial_events();
    lab.lab.apply(&lab.cluster, &initial).unwrap();
    lab.act(&format!(
        "{}{}{}",
        policy(
            "web",
            "x",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [web, api]}]}}], ports: [{port: http}]}]}"
        ),
        policy(
            "out",
            "y",
            "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.240.0.0/16, except: ['{{podIP x/b}}/32']}}, {ipBlock: {cidr: 192.168.0.0/16}}, {namespaceSelector: {}}]}]}"
        ),
        policy(
            "not-db",
            "z",
            "{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}, ingress: [{from: [{podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}}]}]}"
        ),
    ));
    lab.wait("/cluster-metrics", "three policies", |e| {
        e.value("npm_num_policies", &[]) == Some(3.0)
    });
    // (The figures are read at most once a second.)
    std::thread::sleep(Duration::from_millis(1100));
    let m = lab.scrape("/cluster-metrics");
    if std::env::var_os("NPM_SHOW_METRICS").is_some() {
        println!("---- {dataplane}\n{}", lab.get(AGENT, "/cluster-metrics").unwrap().1);
    }
    let per_set = m
        .samples("npm_ipset_counts", &[])
        .map(|s| {
            let name = s.label("set_name").unwrap().to_string();
            ((name, s.label("set_hash").unwrap().to_string()), s.value)
        })
        .collect();
    let series = (
        m.value("npm_num_ipsets", &[]).unwrap(),
        m.value("npm_num_ipset_entries", &[]).unwrap(),
        per_set,
    );
    lab.lab.shutdown().unwrap();
    series
}

/// One cluster, both dataplanes: Azure NPM's set series are equal (docs/METRICS.md), so that a
/// dashboard shows the same series for the same cluster in either mode.
#[test]
fn lab_both_dataplanes_report_the_same_sets() {
    if let Err(e) = net::check_environment() {
        println!("SKIPPED: the metrics lab test needs root and iproute2: {e:#}");
        return;
    }
    let ebpf = set_series("ebpf");
    let iptables = set_series("iptables");
    // The cluster has every kind of set, named as Azure NPM names them, with Azure's hashes.
    let names: BTreeSet<&str> = iptables.2.keys().map(|(n, _)| n.as_str()).collect();
    for n in [
        "ns-x",
        "ns-y",
        "ns-z",
        "podlabel-app:web",
        "podlabel-app:api",
        "podlabel-app:db",
        "podlabel-tier",
        "nestedlabel-app:api:web",
        "nslabel-team:b",
        "nslabel-all-namespaces",
        "namedport:http",
    ] {
        assert!(names.contains(n), "{n} in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("cidr-10.240.0.0/16-except-")), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("cidr-192.168.")),
        "a block without excepts is matched by address"
    );
    for (n, h) in iptables.2.keys() {
        assert_eq!(*h, hashed_set_name(n), "{n}");
    }
    assert_eq!(iptables.0, iptables.2.len() as f64);
    assert_eq!(iptables.1, iptables.2.values().sum::<f64>());
    assert_eq!(ebpf.2, iptables.2, "npm_ipset_counts: eBPF mode, then iptables mode");
    assert_eq!(ebpf.0, iptables.0, "npm_num_ipsets");
    assert_eq!(ebpf.1, iptables.1, "npm_num_ipset_entries");
}
