//! The run loop: source batches into the engine, plan diffs into the dataplane.
//!
//! Start-up is make-before-break over whatever a previous agent left pinned: nothing is
//! applied until the source's initial full sync is complete; then the whole plan is
//! reconciled onto the dataplane in one step (adds first, then removals), and only then is
//! the agent ready. After that each event's diff is applied as it comes. A failed apply is
//! logged and counted, the dataplane is marked out of sync, and the whole plan is reconciled
//! again on the next tick (every second) until that succeeds; the loop never stops for it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compile::{Engine, Scope};
use crate::dataplane::{Applied, Dataplane, DataplaneError, Memory};
use crate::metrics::{Metrics, MetricsOptions, StateCounts};
use crate::plan::{Change, Conflict, Plan, PlanDiff};
use crate::source::{Batch, Source};
use crate::state::Event;

use super::status::{EventStats, Operation, Status};

/// How often the dataplane's periodic work runs and a failed dataplane is resynchronized.
pub const TICK: Duration = Duration::from_secs(1);
/// The longest the loop waits before looking at the stop flag again.
const MAX_WAIT: Duration = Duration::from_millis(200);
/// The most events whose diffs one dataplane apply takes (see [`Agent::handle_events`]): a
/// bound on the diff held in memory and on how long the first of them waits.
pub const MAX_EVENTS_PER_APPLY: usize = 4096;

/// An in-memory dataplane whose plan can be read from another thread (tests, the lab).
#[derive(Clone, Default)]
pub struct SharedMemory(pub Arc<Mutex<Memory>>);

impl SharedMemory {
    /// The plan the dataplane holds now.
    pub fn plan(&self) -> Plan {
        self.0.lock().expect("memory dataplane lock").plan.clone()
    }
}

impl Dataplane for SharedMemory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn renders_tiers(&self) -> bool {
        true
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError> {
        self.0.lock().expect("memory dataplane lock").apply(diff)
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        self.0.lock().expect("memory dataplane lock").reconcile(plan)
    }
}

/// What other threads (metrics, tests) can read while the agent runs.
#[derive(Clone)]
pub struct Handles {
    pub status: Arc<Mutex<Status>>,
    pub stats: Arc<Mutex<EventStats>>,
    /// The Prometheus metrics (served by [`crate::metrics::server`]).
    pub metrics: Arc<Metrics>,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            status: Default::default(),
            stats: Default::default(),
            metrics: Arc::new(Metrics::new(MetricsOptions::default())),
        }
    }
}

impl Handles {
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }
}

/// The agent: one node's engine, source and dataplane.
pub struct Agent {
    engine: Engine,
    source: Box<dyn Source>,
    dataplane: Box<dyn Dataplane>,
    status_file: Option<PathBuf>,
    handles: Handles,
    /// Whether the dataplane holds the engine's plan (false before the first reconcile and
    /// after a failed apply).
    in_sync: bool,
    /// Whether the source has completed its initial full sync.
    synced: bool,
    /// The generation of the last batch handled (enforced once `in_sync`).
    pending_generation: Option<u64>,
    status_error_logged: bool,
    last_source_error: Option<String>,
    /// Addresses several pods claim (reported in the status and the metrics, logged when they
    /// appear, change and go).
    conflicts: BTreeMap<IpAddr, Conflict>,
    /// What is not enforced yet (IPv6): by object, the problem reported for it.
    unenforced: BTreeMap<String, String>,
    /// The dataplane enforces IPv6 (nothing IPv6 goes to `unenforced`).
    ipv6_enforced: bool,
    /// The dataplane's drop events, once taken (see [`Agent::take_drop_events`]).
    drops: Option<super::drops::DropPipe>,
}

impl Agent {
    pub fn new(
        node_name: &str,
        source: Box<dyn Source>,
        dataplane: Box<dyn Dataplane>,
        status_file: Option<PathBuf>,
    ) -> Agent {
        let metrics = Metrics::new(MetricsOptions {
            dataplane: dataplane.name().to_string(),
            ..MetricsOptions::default()
        });
        Agent::with_metrics(node_name, source, dataplane, status_file, Arc::new(metrics))
    }

    /// An agent that records into `metrics` (built for its dataplane, see
    /// [`crate::agent::build`]).
    pub fn with_metrics(
        node_name: &str,
        source: Box<dyn Source>,
        dataplane: Box<dyn Dataplane>,
        status_file: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Agent {
        let handles = Handles { metrics, ..Handles::default() };
        {
            let mut s = handles.status.lock().expect("status lock");
            s.node = node_name.to_string();
            s.dataplane = dataplane.name().to_string();
        }
        let ipv6_enforced = dataplane.enforces_ipv6();
        let engine = Engine::new(Scope::Node(node_name.to_string()));
        let engine = if dataplane.wants_layout() { engine.with_layout() } else { engine };
        let engine =
            if dataplane.renders_tiers() { engine.with_cluster_policies() } else { engine };
        Agent {
            engine,
            source,
            dataplane,
            status_file,
            handles,
            in_sync: false,
            synced: false,
            pending_generation: None,
            status_error_logged: false,
            last_source_error: None,
            conflicts: BTreeMap::new(),
            unenforced: BTreeMap::new(),
            ipv6_enforced,
            drops: None,
        }
    }

    pub fn handles(&self) -> Handles {
        self.handles.clone()
    }

    /// Runs until `stop` is set. Leaves the dataplane as it is (enforcement stays in place).
    pub fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        tracing::info!(source = %self.source.describe(), dataplane = self.dataplane.name(), node = ?self.engine.scope().node(), "agent starting");
        self.publish();
        let mut next_tick = Instant::now() + TICK;
        while !stop.load(Ordering::SeqCst) {
            self.handles.metrics.heartbeat();
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.tick();
            }
            self.handle_drops();
            let wait = next_tick.saturating_duration_since(Instant::now()).min(MAX_WAIT);
            match self.source.next_batch(wait) {
                Ok(Some(batch)) => {
                    self.last_source_error = None;
                    self.handle_batch(batch);
                }
                Ok(None) => {}
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.last_source_error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(source = %self.source.describe(), "source failed (retrying): {msg}");
                        self.last_source_error = Some(msg);
                    }
                }
            }
        }
        self.handle_drops();
        tracing::info!("stopping; enforcement stays in place");
        Ok(())
    }

    /// Starts reading the dataplane's drop events (if it has any), to be named by this
    /// agent's compiler, counted, logged (`log`) and published to the returned hub.
    pub fn take_drop_events(&mut self, log: bool) -> Option<Arc<crate::drops::Hub>> {
        let feed = self.dataplane.drop_feed()?;
        let hub = crate::drops::Hub::new();
        self.drops = Some(super::drops::spawn_reader(feed, hub.clone(), log));
        Some(hub)
    }

    /// Names, counts and publishes the drop events read since the last call.
    fn handle_drops(&mut self) {
        let Some(pipe) = &self.drops else { return };
        while let Ok(n) = pipe.rx.try_recv() {
            let r = crate::drops::resolve(&n, &self.engine);
            let pod = r.pod_key.as_ref().map(|k| (k.namespace.as_str(), k.name.as_str()));
            self.handles.metrics.count_drop_event(&r.direction, &r.reason, pod);
            if pipe.log {
                tracing::info!("{r}");
            }
            pipe.hub.publish(r);
        }
    }

    /// Handles one batch: every event through the engine, and through the dataplane when it
    /// is in sync; the whole plan when this batch completes the initial sync.
    pub fn handle_batch(&mut self, batch: Batch) {
        let n = batch.events.len();
        let mut events = batch.events.into_iter().peekable();
        while events.peek().is_some() {
            self.handle_events(events.by_ref().take(MAX_EVENTS_PER_APPLY).collect());
        }
        if batch.generation.is_some() {
            self.pending_generation = batch.generation;
        }
        {
            let mut s = self.handles.status.lock().expect("status lock");
            s.batches += 1;
            s.applied_events += n as u64;
        }
        if batch.synced && !self.synced {
            self.synced = true;
            tracing::info!(events = self.handles.status().applied_events, "initial sync complete");
        }
        if self.synced && !self.in_sync && !self.handles.status().ready {
            // The first full sync: make-before-break over what is pinned.
            self.reconcile();
        }
        self.publish();
    }

    /// Compiles events one by one and applies their diffs together, in order (a diff after
    /// another is the path through both states, make-before-break at every step): a burst
    /// (a resync, a GitOps sync of many policies) costs the dataplane one apply, not one per
    /// event. Each event is timed from the start of its compilation to the end of the apply
    /// that enforced it.
    fn handle_events(&mut self, events: Vec<Event>) {
        let mut diff = PlanDiff::default();
        let mut timed = Vec::with_capacity(events.len());
        for event in events {
            self.note_unenforced(&event);
            let kind = event.kind();
            let op = self.operation(&event);
            let start = Instant::now();
            let d = self.engine.handle(event);
            self.track_conflicts(d.changes.iter().filter_map(|c| match c {
                Change::SetConflict { ip, conflict } => Some((*ip, Some(conflict.clone()))),
                Change::RemoveConflict { ip } => Some((*ip, None)),
                _ => None,
            }));
            diff.extend(d);
            timed.push((kind, op, start));
        }
        let mut failed = false;
        if self.in_sync && !diff.is_empty() {
            let applying = Instant::now();
            let result = self.dataplane.apply(&diff);
            if let Ok(applied) = &result {
                self.handles.metrics.observe_apply(*applied, applying.elapsed());
            }
            if let Err(e) = result {
                failed = true;
                self.in_sync = false;
                self.handles.status.lock().expect("status lock").apply_errors += 1;
                self.handles.metrics.apply_failed("apply");
                tracing::error!(events = timed.len(), error = %e, "dataplane apply failed; resynchronizing on the next tick");
            }
        }
        let end = Instant::now();
        let mut stats = self.handles.stats.lock().expect("stats lock");
        for (kind, op, start) in timed {
            let took = end.duration_since(start);
            stats.record(kind, op, took, failed);
            self.handles.metrics.observe_event(kind, op.as_str(), took, failed);
        }
    }

    /// Create or update, by whether the engine knows the object.
    fn operation(&self, event: &Event) -> Operation {
        let st = self.engine.state();
        let existed = match event {
            Event::UpsertNamespace(n) => st.namespaces.contains_key(&n.name),
            Event::UpsertPod(p) => st.pods.contains_key(&p.key),
            Event::UpsertPolicy(p) => st.policies.contains_key(&p.key),
            Event::UpsertNode(n) => st.nodes.contains_key(&n.name),
            Event::UpsertClusterPolicy(p) => st.cluster_policies.contains_key(&p.name),
            Event::DeleteNamespace(_)
            | Event::DeletePod(_)
            | Event::DeletePolicy(_)
            | Event::DeleteNode(_)
            | Event::DeleteClusterPolicy(_) => {
                return Operation::Delete;
            }
        };
        if existed { Operation::Update } else { Operation::Create }
    }

    /// Notes what an event brings that is not enforced yet (IPv6, where the dataplane does not
    /// enforce it), logging it once when it appears or changes: the local pods with an IPv6
    /// address, and the IPv6 ipBlocks.
    fn note_unenforced(&mut self, event: &Event) {
        let (subject, problem) = match event {
            Event::UpsertPod(p) => {
                let local =
                    p.node.as_deref().is_some_and(|n| Some(n) == self.engine.scope().node());
                let problem = match p.ip {
                    _ if !local || !p.is_endpoint() || self.ipv6_enforced => None,
                    // (The dataplanes find a pod's interface, and whether it is isolated, by
                    // its IPv4 address: a pod without one is not enforced at all.)
                    Some(IpAddr::V6(v6)) => Some(format!(
                        "pod {} has only the IPv6 address {v6}: IPv6 is not enforced by this dataplane, and the pod has no IPv4 address to be found by: NetworkPolicies do not isolate it",
                        p.key
                    )),
                    _ => p.ipv6.map(|v6| {
                        format!(
                            "pod {} has the IPv6 address {v6}: IPv6 is not enforced by this dataplane; while a policy isolates the pod in a direction, its IPv6 traffic that way is dropped",
                            p.key
                        )
                    }),
                };
                (format!("pod {}", p.key), problem)
            }
            Event::DeletePod(k) => (format!("pod {k}"), None),
            Event::UpsertPolicy(p) => {
                let mut blocks = Vec::new();
                for (field, rules) in [("spec.ingress", &p.ingress), ("spec.egress", &p.egress)] {
                    for (i, rule) in rules.iter().flatten().enumerate() {
                        for peer in &rule.peers {
                            if let crate::model::Peer::Block(b) = peer
                                && b.net.addr().is_ipv6()
                            {
                                blocks.push(format!("{field}[{i}]: {}", b.net));
                            }
                        }
                    }
                }
                let problem = (!blocks.is_empty() && !self.ipv6_enforced).then(|| {
                    format!(
                        "NetworkPolicy {}: IPv6 ipBlocks are not enforced by this dataplane ({}): they admit no IPv4 traffic, and the pods the policy isolates get no IPv6",
                        p.key,
                        blocks.join(", ")
                    )
                });
                (format!("policy {}", p.key), problem)
            }
            Event::DeletePolicy(k) => (format!("policy {k}"), None),
            Event::UpsertClusterPolicy(p) => {
                let problem = (!self.engine.compiles_cluster_policies()).then(|| {
                    format!(
                        "ClusterNetworkPolicy {} is not enforced: this dataplane does not render ClusterNetworkPolicy tiers",
                        p.name
                    )
                });
                (format!("clusternetworkpolicy {}", p.name), problem)
            }
            Event::DeleteClusterPolicy(n) => (format!("clusternetworkpolicy {n}"), None),
            _ => return,
        };
        match problem {
            Some(p) if self.unenforced.get(&subject) != Some(&p) => {
                tracing::warn!("{p}");
                self.unenforced.insert(subject, p);
            }
            Some(_) => {}
            None => {
                self.unenforced.remove(&subject);
            }
        }
    }

    /// Follows the conflicts on addresses: logs each one as it appears, changes or goes.
    fn track_conflicts(&mut self, changes: impl IntoIterator<Item = (IpAddr, Option<Conflict>)>) {
        for (ip, now) in changes {
            let claimants = |c: &Conflict| {
                c.claimants.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            };
            match now {
                Some(c) if self.conflicts.get(&ip) != Some(&c) => {
                    tracing::warn!(
                        %ip,
                        claimants = %claimants(&c),
                        quarantined = c.quarantined,
                        "several pods claim one address: as a peer it matches no pod selector, and where several run on this node its endpoint admits nothing"
                    );
                    self.conflicts.insert(ip, c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = self.conflicts.remove(&ip) {
                        tracing::info!(%ip, claimants = %claimants(&c), "address no longer in conflict");
                    }
                }
            }
        }
    }

    /// Makes the dataplane enforce the engine's whole plan.
    fn reconcile(&mut self) {
        let start = Instant::now();
        let plan = self.engine.plan();
        let gone: Vec<IpAddr> =
            self.conflicts.keys().filter(|ip| !plan.conflicts.contains_key(ip)).copied().collect();
        self.track_conflicts(
            plan.conflicts
                .iter()
                .map(|(ip, c)| (*ip, Some(c.clone())))
                .chain(gone.into_iter().map(|ip| (ip, None)))
                .collect::<Vec<_>>(),
        );
        let result = self.dataplane.reconcile(&plan);
        let took = start.elapsed();
        let endpoints = plan.endpoints.len();
        drop(plan);
        release_free_memory();
        {
            let mut st = self.handles.stats.lock().expect("stats lock");
            st.reconciles += 1;
            st.reconcile_failures += u64::from(result.is_err());
            st.last_reconcile = Some(took);
        }
        match result {
            Ok(()) => {
                self.in_sync = true;
                let mut s = self.handles.status.lock().expect("status lock");
                if !s.ready {
                    tracing::info!(
                        endpoints,
                        took_ms = took.as_millis() as u64,
                        "first full sync applied; ready"
                    );
                } else {
                    tracing::info!(took_ms = took.as_millis() as u64, "dataplane resynchronized");
                }
                s.ready = true;
            }
            Err(e) => {
                self.handles.status.lock().expect("status lock").apply_errors += 1;
                self.handles.metrics.apply_failed("reconcile");
                tracing::error!(error = %e, "reconciling the dataplane failed; retrying on the next tick");
            }
        }
    }

    fn tick(&mut self) {
        if self.synced && !self.in_sync {
            self.reconcile();
            self.publish();
        }
        if self.in_sync
            && let Err(e) = self.dataplane.tick()
        {
            tracing::warn!(error = %e, "the dataplane's periodic work");
            self.handles.metrics.apply_failed("attach");
        }
    }

    /// Updates the shared status and writes the status file.
    fn publish(&mut self) {
        let stats = self.engine.stats();
        let health = self.source.health();
        // The metrics first: whoever sees the new generation in the status sees them too.
        self.handles.metrics.set_address_conflicts(self.conflicts.len());
        let tiers = |t| {
            let cnps = self.engine.state().cluster_policies.values();
            cnps.filter(|p| p.tier == t).count()
        };
        use crate::model::cluster_policy::Tier;
        self.handles.metrics.set_state(StateCounts {
            policies: stats.policies,
            pods: stats.pods,
            allow_entries: stats.allow_entries,
            identities: stats.identities,
            cluster_policies: [tiers(Tier::Admin), tiers(Tier::Baseline)],
            cluster_policies_enforced: self.engine.compiles_cluster_policies(),
        });
        let status = {
            let mut s = self.handles.status.lock().expect("status lock");
            if self.in_sync {
                s.generation = self.pending_generation.unwrap_or(s.generation);
            }
            s.in_sync = self.in_sync;
            s.pods = stats.pods;
            s.policies = stats.policies;
            s.identities = stats.identities;
            s.endpoints = stats.endpoints;
            s.profiles = stats.profiles;
            s.allow_entries = stats.allow_entries;
            s.parse_errors = health.parse_errors;
            s.invalid_objects = health.invalid_objects;
            s.problems = health.problems;
            s.problems.extend(self.unenforced.values().cloned());
            s.problems.extend(self.conflicts.iter().map(|(ip, c)| {
                let who: Vec<String> = c.claimants.iter().map(ToString::to_string).collect();
                format!(
                    "address {ip} is claimed by {}: {}",
                    who.join(", "),
                    if c.quarantined {
                        "several run on this node, whose endpoint for it admits nothing"
                    } else {
                        "as a peer it matches no pod selector"
                    }
                )
            }));
            self.handles.metrics.set_ready(s.ready);
            s.clone()
        };
        if let Some(path) = &self.status_file {
            match status.write(path) {
                Ok(()) => self.status_error_logged = false,
                Err(e) if !self.status_error_logged => {
                    self.status_error_logged = true;
                    tracing::warn!(error = %format!("{e:#}"), "writing the status file");
                }
                Err(_) => {}
            }
        }
    }

    /// The engine (for tests and the lab).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// Gives the memory a whole-plan reconcile freed (the plan, the scripts of a start-up: a few
/// hundred MiB at 100k pods in iptables mode) back to the system, so that the agent's
/// resident set reflects what it keeps. glibc's allocator keeps freed memory otherwise.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
