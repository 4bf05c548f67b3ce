//! Prometheus metrics under the names, types, labels, units and help texts of Azure Network
//! Policy Manager, plus the dataplane's own figures. docs/METRICS.md is the reference.
//!
//! - [`summary`]: summaries with a sliding 10-minute window (the `prometheus` crate has none).
//! - [`dataplane`]: what the kernel holds, read at scrape time: packet counters, map entries,
//!   rules, sets and their entries, connection tracking.
//! - [`server`]: `/node-metrics`, `/cluster-metrics`, `/healthz` and `/readyz`.
//! - [`text`]: a parser of the text exposition format (tests and tools).
//! - [`prometheus_config`]: the shipped scrape configuration with static targets (the lab,
//!   promtool).
//!
//! As in Azure NPM, `/node-metrics` has the execution times (and here the dataplane's
//! packets, maps and failures) and `/cluster-metrics` the counts. Execution times are in
//! milliseconds.

pub mod dataplane;
pub mod prometheus_config;
pub mod server;
pub mod summary;
pub mod text;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder as _, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::dataplane::Applied;
use crate::dataplane::observe::{Counts, Observer};
use dataplane::FiguresCache;
use summary::{SummaryOpts, SummaryVec};

// ---- Azure NPM's metrics: names and help texts exactly as Azure NPM registers them ----

pub const NUM_POLICIES: &str = "npm_num_policies";
pub const NUM_POLICIES_HELP: &str = "The number of current network policies for this node";
pub const NUM_IPTABLES_RULES: &str = "npm_num_iptables_rules";
pub const NUM_IPTABLES_RULES_HELP: &str = "The number of current IPTable rules for this node";
pub const NUM_IPSETS: &str = "npm_num_ipsets";
pub const NUM_IPSETS_HELP: &str = "The number of current IP sets for this node";
pub const NUM_IPSET_ENTRIES: &str = "npm_num_ipset_entries";
pub const NUM_IPSET_ENTRIES_HELP: &str = "The total number of entries in every IPSet";
pub const IPSET_COUNTS: &str = "npm_ipset_counts";
pub const IPSET_COUNTS_HELP: &str = "The number of entries in each individual IPSet";
pub const PODS_WATCHED: &str = "npm_pods_watched";
pub const PODS_WATCHED_HELP: &str =
    "Number of Pods NPM tracks across the cluster including Linux and Windows nodes";
pub const ADD_IPTABLES_RULE_EXEC_TIME: &str = "npm_add_iptables_rule_exec_time";
pub const ADD_IPTABLES_RULE_EXEC_TIME_HELP: &str =
    "Execution time in milliseconds for adding an IPTable rule to a chain";
pub const ADD_IPSET_EXEC_TIME: &str = "npm_add_ipset_exec_time";
pub const ADD_IPSET_EXEC_TIME_HELP: &str = "Execution time in milliseconds for creating an IP set";
pub const ADD_POLICY_EXEC_TIME: &str = "npm_add_policy_exec_time";
pub const ADD_POLICY_EXEC_TIME_HELP: &str =
    "Execution time in milliseconds for adding a network policy";
pub const CONTROLLER_POLICY_EXEC_TIME: &str = "npm_controller_policy_exec_time";
pub const CONTROLLER_POLICY_EXEC_TIME_HELP: &str = "Execution time in milliseconds for updating/deleting a network policy. NOTE: for adding, see npm_add_policy_exec_time";
pub const CONTROLLER_NAMESPACE_EXEC_TIME: &str = "npm_controller_namespace_exec_time";
pub const CONTROLLER_NAMESPACE_EXEC_TIME_HELP: &str =
    "Execution time in milliseconds for adding/updating/deleting a namespace";
pub const CONTROLLER_POD_EXEC_TIME: &str = "npm_controller_pod_exec_time";
pub const CONTROLLER_POD_EXEC_TIME_HELP: &str =
    "Execution time in milliseconds for adding/updating/deleting a pod";

pub const SET_NAME_LABEL: &str = "set_name";
pub const SET_HASH_LABEL: &str = "set_hash";
pub const OPERATION_LABEL: &str = "operation";
pub const HAD_ERROR_LABEL: &str = "had_error";

// ---- the dataplane's figures (this project's; Prometheus naming conventions) ----

pub const PACKETS_ALLOWED: &str = "npm_packets_allowed_total";
pub const PACKETS_ALLOWED_HELP: &str = "Packets the dataplane let through, by direction as the pod sees it (ingress: entering the pod) and reason";
pub const PACKETS_DROPPED: &str = "npm_packets_dropped_total";
pub const PACKETS_DROPPED_HELP: &str =
    "Packets the dataplane dropped, by direction as the pod sees it and reason";
pub const MAP_ENTRIES: &str = "npm_map_entries";
pub const MAP_ENTRIES_HELP: &str = "Entries in each BPF map of the eBPF dataplane";
pub const MAP_MAX_ENTRIES: &str = "npm_map_max_entries";
pub const MAP_MAX_ENTRIES_HELP: &str =
    "Capacity (max_entries) of each BPF map of the eBPF dataplane";
pub const CONNTRACK_ENTRIES: &str = "npm_conntrack_entries";
pub const CONNTRACK_ENTRIES_HELP: &str = "Connection-tracking entries: the eBPF dataplane's flow map, or the kernel's conntrack table in iptables mode";
pub const APPLY_FAILURES: &str = "npm_dataplane_apply_failures_total";
pub const APPLY_FAILURES_HELP: &str = "Failures to program the dataplane, by dataplane and operation (apply: an event's changes, reconcile: the whole plan, attach: the programs to a pod's interface)";
pub const DATAPLANE_INFO: &str = "npm_dataplane_info";
pub const DATAPLANE_INFO_HELP: &str = "The dataplane this agent programs (always 1)";
pub const DROP_EVENTS: &str = "npm_drop_events_total";
pub const DROP_EVENTS_HELP: &str = "Drop events the agent received from the dataplane (as many as its rate limiter lets through; npm_packets_dropped_total counts every drop), by direction and reason, and with --drop-metrics-pod-labels by namespace and pod";
pub const DROP_EVENTS_SUPPRESSED: &str = "npm_drop_events_suppressed_total";
pub const DROP_EVENTS_SUPPRESSED_HELP: &str =
    "Drops the dataplane's rate limiter kept from becoming drop events (--drop-events-rate)";
pub const DROP_EVENTS_LOST: &str = "npm_drop_events_lost_total";
pub const DROP_EVENTS_LOST_HELP: &str =
    "Drop events lost because the ring buffer was full (the agent was not reading)";
pub const ADDRESS_CONFLICTS: &str = "npm_pod_address_conflicts";
pub const CLUSTER_POLICIES: &str = "npm_cluster_network_policies";
pub const CLUSTER_POLICIES_HELP: &str =
    "ClusterNetworkPolicies this node enforces, per tier (admin, baseline)";
pub const CLUSTER_POLICIES_UNENFORCED: &str = "npm_cluster_network_policies_unenforced";
pub const CLUSTER_POLICIES_UNENFORCED_HELP: &str = "ClusterNetworkPolicies this node knows but does not enforce (its dataplane does not render tiers), per tier";
pub const ADDRESS_CONFLICTS_HELP: &str = "Pod addresses claimed by more than one pod, which this node cannot tell apart (they fail closed)";

/// The operations of [`APPLY_FAILURES`], exported from the start at 0.
pub const APPLY_OPERATIONS: [&str; 3] = ["apply", "reconcile", "attach"];

/// How long the loop may go without a heartbeat before `/healthz` fails.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// How the metrics are set up.
pub struct MetricsOptions {
    /// The dataplane's name (`ebpf`, `iptables`, `memory`).
    pub dataplane: String,
    /// Export `npm_ipset_counts` (one series per set).
    pub advanced: bool,
    /// Where the kernel's figures come from; `None`: the counts come from the compiled plan
    /// (the in-memory dataplane of tests) and there are no packet or map figures.
    pub observer: Option<Box<dyn Observer>>,
    /// Count drop events by namespace and pod too (a series per pod that drops).
    pub drop_pod_labels: bool,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self { dataplane: "memory".into(), advanced: false, observer: None, drop_pod_labels: false }
    }
}

/// Counts that come from the agent's own state: the policies and pods it knows, and (for a
/// dataplane without an observer) the plan's sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub policies: usize,
    pub pods: usize,
    /// Allow entries of the plan (the rules of a dataplane without an observer).
    pub allow_entries: usize,
    /// Identities of the plan (its sets).
    pub identities: usize,
    /// ClusterNetworkPolicies known, per tier (Admin, Baseline).
    pub cluster_policies: [usize; 2],
    /// Whether they are enforced (the dataplane renders tiers).
    pub cluster_policies_enforced: bool,
}

/// Every metric of the agent, in the two registries Azure NPM serves.
pub struct Metrics {
    node: Registry,
    cluster: Registry,
    dataplane: String,
    advanced: bool,
    add_policy: Arc<SummaryVec>,
    controller_policy: Arc<SummaryVec>,
    controller_namespace: Arc<SummaryVec>,
    controller_pod: Arc<SummaryVec>,
    add_rule: Arc<SummaryVec>,
    add_ipset: Arc<SummaryVec>,
    apply_failures: IntCounterVec,
    num_policies: IntGauge,
    pods_watched: IntGauge,
    address_conflicts: IntGauge,
    cluster_policies: IntGaugeVec,
    cluster_policies_unenforced: IntGaugeVec,
    drop_events: IntCounterVec,
    drop_pod_labels: bool,
    state: Arc<Mutex<StateCounts>>,
    started: Instant,
    heartbeat_ms: AtomicU64,
    ready: AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("dataplane", &self.dataplane)
            .field("advanced", &self.advanced)
            .finish()
    }
}

/// Registers an `Arc`'d collector (a registry owns boxes).
struct Shared<C>(Arc<C>);

impl<C: Collector> Collector for Shared<C> {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

fn summary(name: &str, help: &str, labels: &[&str]) -> Arc<SummaryVec> {
    Arc::new(SummaryVec::new(SummaryOpts::new(name, help, labels)).expect("valid summary"))
}

fn had_error(failed: bool) -> &'static str {
    if failed { "true" } else { "false" }
}

impl Metrics {
    pub fn new(opts: MetricsOptions) -> Metrics {
        let node = Registry::new();
        let cluster = Registry::new();
        let add_policy =
            summary(ADD_POLICY_EXEC_TIME, ADD_POLICY_EXEC_TIME_HELP, &[HAD_ERROR_LABEL]);
        let crud = [OPERATION_LABEL, HAD_ERROR_LABEL];
        let controller_policy =
            summary(CONTROLLER_POLICY_EXEC_TIME, CONTROLLER_POLICY_EXEC_TIME_HELP, &crud);
        let controller_namespace =
            summary(CONTROLLER_NAMESPACE_EXEC_TIME, CONTROLLER_NAMESPACE_EXEC_TIME_HELP, &crud);
        let controller_pod =
            summary(CONTROLLER_POD_EXEC_TIME, CONTROLLER_POD_EXEC_TIME_HELP, &crud);
        let add_rule = summary(ADD_IPTABLES_RULE_EXEC_TIME, ADD_IPTABLES_RULE_EXEC_TIME_HELP, &[]);
        let add_ipset = summary(ADD_IPSET_EXEC_TIME, ADD_IPSET_EXEC_TIME_HELP, &[]);
        for s in [
            &add_policy,
            &controller_policy,
            &controller_namespace,
            &controller_pod,
            &add_rule,
            &add_ipset,
        ] {
            node.register(Box::new(Shared(s.clone()))).expect("unique metric");
        }
        let apply_failures = IntCounterVec::new(
            Opts::new(APPLY_FAILURES, APPLY_FAILURES_HELP),
            &["dataplane", OPERATION_LABEL],
        )
        .expect("valid counter");
        for op in APPLY_OPERATIONS {
            apply_failures.with_label_values(&[opts.dataplane.as_str(), op]);
        }
        node.register(Box::new(apply_failures.clone())).expect("unique metric");
        let info = IntGauge::with_opts(
            Opts::new(DATAPLANE_INFO, DATAPLANE_INFO_HELP)
                .const_label("dataplane", opts.dataplane.clone()),
        )
        .expect("valid gauge");
        info.set(1);
        node.register(Box::new(info)).expect("unique metric");
        let address_conflicts =
            IntGauge::new(ADDRESS_CONFLICTS, ADDRESS_CONFLICTS_HELP).expect("valid gauge");
        node.register(Box::new(address_conflicts.clone())).expect("unique metric");
        let tier_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["tier"]).expect("valid gauge");
            for tier in ["admin", "baseline"] {
                g.with_label_values(&[tier]).set(0);
            }
            node.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let cluster_policies = tier_gauge(CLUSTER_POLICIES, CLUSTER_POLICIES_HELP);
        let cluster_policies_unenforced =
            tier_gauge(CLUSTER_POLICIES_UNENFORCED, CLUSTER_POLICIES_UNENFORCED_HELP);
        let drop_labels: &[&str] = if opts.drop_pod_labels {
            &["direction", "reason", "namespace", "pod"]
        } else {
            &["direction", "reason"]
        };
        let drop_events = IntCounterVec::new(Opts::new(DROP_EVENTS, DROP_EVENTS_HELP), drop_labels)
            .expect("valid counter");
        node.register(Box::new(drop_events.clone())).expect("unique metric");

        let num_policies = IntGauge::new(NUM_POLICIES, NUM_POLICIES_HELP).expect("valid gauge");
        let pods_watched = IntGauge::new(PODS_WATCHED, PODS_WATCHED_HELP).expect("valid gauge");
        cluster.register(Box::new(num_policies.clone())).expect("unique metric");
        cluster.register(Box::new(pods_watched.clone())).expect("unique metric");

        let state = Arc::new(Mutex::new(StateCounts::default()));
        let cache = Arc::new(FiguresCache::new(opts.observer, opts.advanced));
        node.register(Box::new(dataplane::NodeCollector::new(cache.clone())))
            .expect("unique metric");
        cluster
            .register(Box::new(dataplane::ClusterCollector::new(
                cache,
                state.clone(),
                opts.advanced,
            )))
            .expect("unique metric");

        Metrics {
            node,
            cluster,
            dataplane: opts.dataplane,
            advanced: opts.advanced,
            add_policy,
            controller_policy,
            controller_namespace,
            controller_pod,
            add_rule,
            add_ipset,
            apply_failures,
            num_policies,
            address_conflicts,
            cluster_policies,
            cluster_policies_unenforced,
            drop_events,
            drop_pod_labels: opts.drop_pod_labels,
            pods_watched,
            state,
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    pub fn dataplane(&self) -> &str {
        &self.dataplane
    }

    pub fn advanced(&self) -> bool {
        self.advanced
    }

    /// Records one handled event of `kind` (`pod`, `namespace`, `policy`, as
    /// [`crate::state::Event::kind`] names them) and `operation` (`create`, `update`,
    /// `delete`): compiling it and applying its changes took `took`. As in Azure NPM, a
    /// policy create goes to `npm_add_policy_exec_time`, other policy events to
    /// `npm_controller_policy_exec_time`. Node events have no metric.
    pub fn observe_event(&self, kind: &str, operation: &str, took: Duration, failed: bool) {
        let ms = took.as_secs_f64() * 1000.0;
        let err = had_error(failed);
        match (kind, operation) {
            ("policy", "create") => self.add_policy.observe(&[err], ms),
            ("policy", op) => self.controller_policy.observe(&[op, err], ms),
            ("pod", op) => self.controller_pod.observe(&[op, err], ms),
            ("namespace", op) => self.controller_namespace.observe(&[op, err], ms),
            _ => {}
        }
    }

    /// Records a successful application of one event's diff to the dataplane: its time goes
    /// to `npm_add_iptables_rule_exec_time` when the dataplane added rules (iptables rules,
    /// policy-map entries) and to `npm_add_ipset_exec_time` when it added sets or members
    /// (ipsets and their entries, identities, CIDR prefixes).
    pub fn observe_apply(&self, applied: Applied, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        if applied.rules_added {
            self.add_rule.observe(&[], ms);
        }
        if applied.sets_added {
            self.add_ipset.observe(&[], ms);
        }
    }

    /// Counts a failure to program the dataplane (`operation`: one of [`APPLY_OPERATIONS`]).
    pub fn apply_failed(&self, operation: &str) {
        self.apply_failures.with_label_values(&[self.dataplane.as_str(), operation]).inc();
    }

    /// Counts a drop event (`pod`: namespace and name, when known; a label only if the user
    /// opted in).
    pub fn count_drop_event(&self, direction: &str, reason: &str, pod: Option<(&str, &str)>) {
        if self.drop_pod_labels {
            let (ns, name) = pod.unwrap_or(("", ""));
            self.drop_events.with_label_values(&[direction, reason, ns, name]).inc();
        } else {
            self.drop_events.with_label_values(&[direction, reason]).inc();
        }
    }

    /// How many addresses several pods claim (see `state::Claim`).
    pub fn set_address_conflicts(&self, n: usize) {
        self.address_conflicts.set(n as i64);
    }

    pub fn set_state(&self, counts: StateCounts) {
        self.num_policies.set(counts.policies as i64);
        let [enforced, unenforced] = if counts.cluster_policies_enforced {
            [&self.cluster_policies, &self.cluster_policies_unenforced]
        } else {
            [&self.cluster_policies_unenforced, &self.cluster_policies]
        };
        for (i, tier) in ["admin", "baseline"].into_iter().enumerate() {
            enforced.with_label_values(&[tier]).set(counts.cluster_policies[i] as i64);
            unenforced.with_label_values(&[tier]).set(0);
        }
        self.pods_watched.set(counts.pods as i64);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    /// The run loop is alive.
    pub fn heartbeat(&self) {
        self.heartbeat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last heartbeat (or since creation).
    pub fn since_heartbeat(&self) -> Duration {
        let now = self.started.elapsed();
        now.saturating_sub(Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    pub fn alive(&self) -> bool {
        self.since_heartbeat() < LIVENESS_TIMEOUT
    }

    /// The first full sync is enforced.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn gather_node(&self) -> Vec<MetricFamily> {
        self.node.gather()
    }

    pub fn gather_cluster(&self) -> Vec<MetricFamily> {
        self.cluster.gather()
    }

    /// `/node-metrics` in the text exposition format.
    pub fn render_node(&self) -> String {
        encode(&self.gather_node())
    }

    /// `/cluster-metrics` in the text exposition format.
    pub fn render_cluster(&self) -> String {
        encode(&self.gather_cluster())
    }
}

fn encode(families: &[MetricFamily]) -> String {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(families, &mut buf) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// The counts of a dataplane without an observer: the plan's sizes.
pub fn counts_from_state(s: &StateCounts) -> Counts {
    Counts {
        rules: s.allow_entries as u64,
        sets: s.identities as u64,
        set_entries: s.pods as u64,
        per_set: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_events_are_counted_by_pod_only_when_asked() {
        let plain = Metrics::new(MetricsOptions::default());
        plain.count_drop_event("ingress", "denied", Some(("x", "a")));
        plain.count_drop_event("ingress", "denied", None);
        let text = plain.render_node();
        assert!(
            text.contains("npm_drop_events_total{direction=\"ingress\",reason=\"denied\"} 2"),
            "{text}"
        );
        assert!(!text.contains("pod=\""), "{text}");
        let by_pod =
            Metrics::new(MetricsOptions { drop_pod_labels: true, ..MetricsOptions::default() });
        by_pod.count_drop_event("egress", "spoofed", Some(("x", "a")));
        let text = by_pod.render_node();
        assert!(
            text.contains(
                "npm_drop_events_total{direction=\"egress\",namespace=\"x\",pod=\"a\",reason=\"spoofed\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn events_go_to_azure_npm_summaries() {
        let m = Metrics::new(MetricsOptions::default());
        m.observe_event("policy", "create", Duration::from_millis(3), false);
        m.observe_event("policy", "update", Duration::from_millis(4), false);
        m.observe_event("policy", "delete", Duration::from_millis(5), true);
        m.observe_event("pod", "create", Duration::from_micros(1500), false);
        m.observe_event("namespace", "update", Duration::from_millis(1), false);
        m.observe_event("node", "create", Duration::from_millis(1), false);
        let text = m.render_node();
        for line in [
            "npm_add_policy_exec_time_count{had_error=\"false\"} 1",
            "npm_add_policy_exec_time{had_error=\"false\",quantile=\"0.5\"} 3",
            "npm_controller_policy_exec_time_count{had_error=\"false\",operation=\"update\"} 1",
            "npm_controller_policy_exec_time_count{had_error=\"true\",operation=\"delete\"} 1",
            "npm_controller_pod_exec_time_sum{had_error=\"false\",operation=\"create\"} 1.5",
            "npm_controller_namespace_exec_time_count{had_error=\"false\",operation=\"update\"} 1",
            "npm_add_iptables_rule_exec_time_count 0",
            "npm_add_ipset_exec_time{quantile=\"0.99\"} NaN",
            "npm_dataplane_apply_failures_total{dataplane=\"memory\",operation=\"reconcile\"} 0",
            "npm_dataplane_info{dataplane=\"memory\"} 1",
            "# TYPE npm_controller_pod_exec_time summary",
            "# HELP npm_add_policy_exec_time Execution time in milliseconds for adding a network policy",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("npm_num_policies"), "counts are cluster metrics");
    }
}
