//! The dataplane's figures as metric families. The figures are read from the kernel by the
//! dataplane's [`Observer`] when Prometheus scrapes (never from the agent's own bookkeeping,
//! so they say what is enforced); see `dataplane::ebpf::observe` and
//! `dataplane::iptables::observe` for what each reads.
//!
//! A scrape reads the kernel at most once a second ([`FiguresCache`]): `/node-metrics` and
//! `/cluster-metrics` scraped together share one reading.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::StateCounts;
use crate::dataplane::observe::{Figures, Observer, PacketFigure};

/// Figures read at most once per [`FiguresCache::TTL`].
pub struct FiguresCache {
    observer: Option<Box<dyn Observer>>,
    per_set: bool,
    last: Mutex<Option<(Instant, Figures)>>,
    error_logged: Mutex<Option<String>>,
}

impl FiguresCache {
    pub const TTL: Duration = Duration::from_secs(1);

    pub fn new(observer: Option<Box<dyn Observer>>, per_set: bool) -> Self {
        Self { observer, per_set, last: Mutex::new(None), error_logged: Mutex::new(None) }
    }

    pub fn has_observer(&self) -> bool {
        self.observer.is_some()
    }

    /// The figures, read now or less than a second ago. A failed reading is logged (once per
    /// distinct error) and gives no figures.
    pub fn get(&self) -> Option<Figures> {
        let observer = self.observer.as_ref()?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, f)) = &*last
            && at.elapsed() < Self::TTL
        {
            return Some(f.clone());
        }
        match observer.observe(self.per_set) {
            Ok(f) => {
                *last = Some((Instant::now(), f.clone()));
                *self.error_logged.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Some(f)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let mut logged = self.error_logged.lock().unwrap_or_else(|p| p.into_inner());
                if logged.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "reading the dataplane's figures for metrics");
                    *logged = Some(msg);
                }
                None
            }
        }
    }
}

// ---- metric families ----

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

fn family(name: &str, help: &str, ty: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(name.into());
    mf.set_help(help.into());
    mf.set_field_type(ty);
    mf.set_metric(metrics);
    mf
}

/// A metric's labels sorted by name, as the Go client writes them.
fn sorted(mut labels: Vec<LabelPair>) -> Vec<LabelPair> {
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    labels
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let labels = sorted(labels);
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::from_label(labels);
    m.set_gauge(g);
    m
}

fn counter(labels: Vec<LabelPair>, v: f64) -> Metric {
    let labels = sorted(labels);
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::from_label(labels);
    m.set_counter(c);
    m
}

fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
    Desc::new(
        name.into(),
        help.into(),
        labels.iter().map(|s| s.to_string()).collect(),
        Default::default(),
    )
    .expect("valid desc")
}

/// `/node-metrics`: packets, maps, connection tracking.
pub struct NodeCollector {
    cache: Arc<FiguresCache>,
    descs: Vec<Desc>,
}

impl NodeCollector {
    pub fn new(cache: Arc<FiguresCache>) -> Self {
        use super::*;
        let descs = vec![
            desc(PACKETS_ALLOWED, PACKETS_ALLOWED_HELP, &["direction", "reason"]),
            desc(PACKETS_DROPPED, PACKETS_DROPPED_HELP, &["direction", "reason"]),
            desc(MAP_ENTRIES, MAP_ENTRIES_HELP, &["map"]),
            desc(MAP_MAX_ENTRIES, MAP_MAX_ENTRIES_HELP, &["map"]),
            desc(CONNTRACK_ENTRIES, CONNTRACK_ENTRIES_HELP, &[]),
            desc(DROP_EVENTS_SUPPRESSED, DROP_EVENTS_SUPPRESSED_HELP, &[]),
            desc(DROP_EVENTS_LOST, DROP_EVENTS_LOST_HELP, &[]),
        ];
        Self { cache, descs }
    }
}

impl Collector for NodeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use super::*;
        let Some(f) = self.cache.get() else {
            return Vec::new();
        };
        let packets = |v: &[PacketFigure]| {
            v.iter()
                .map(|p| {
                    counter(
                        vec![label("direction", p.direction), label("reason", &p.reason)],
                        p.packets as f64,
                    )
                })
                .collect()
        };
        let mut out = vec![
            family(PACKETS_ALLOWED, PACKETS_ALLOWED_HELP, MetricType::COUNTER, packets(&f.allowed)),
            family(PACKETS_DROPPED, PACKETS_DROPPED_HELP, MetricType::COUNTER, packets(&f.dropped)),
            family(
                MAP_ENTRIES,
                MAP_ENTRIES_HELP,
                MetricType::GAUGE,
                f.maps
                    .iter()
                    .map(|m| gauge(vec![label("map", &m.name)], m.entries as f64))
                    .collect(),
            ),
            family(
                MAP_MAX_ENTRIES,
                MAP_MAX_ENTRIES_HELP,
                MetricType::GAUGE,
                f.maps
                    .iter()
                    .map(|m| gauge(vec![label("map", &m.name)], m.max_entries as f64))
                    .collect(),
            ),
        ];
        if let Some(ct) = f.conntrack_entries {
            out.push(family(
                CONNTRACK_ENTRIES,
                CONNTRACK_ENTRIES_HELP,
                MetricType::GAUGE,
                vec![gauge(Vec::new(), ct as f64)],
            ));
        }
        if let Some(e) = f.drop_events {
            for (name, help, v) in [
                (DROP_EVENTS_SUPPRESSED, DROP_EVENTS_SUPPRESSED_HELP, e.suppressed),
                (DROP_EVENTS_LOST, DROP_EVENTS_LOST_HELP, e.lost),
            ] {
                out.push(family(
                    name,
                    help,
                    MetricType::COUNTER,
                    vec![counter(Vec::new(), v as f64)],
                ));
            }
        }
        out
    }
}

/// `/cluster-metrics`: Azure NPM's counts of rules, sets and entries (and, advanced, the
/// entries of each set).
pub struct ClusterCollector {
    cache: Arc<FiguresCache>,
    state: Arc<Mutex<StateCounts>>,
    advanced: bool,
    descs: Vec<Desc>,
}

impl ClusterCollector {
    pub fn new(cache: Arc<FiguresCache>, state: Arc<Mutex<StateCounts>>, advanced: bool) -> Self {
        use super::*;
        let mut descs = vec![
            desc(NUM_IPTABLES_RULES, NUM_IPTABLES_RULES_HELP, &[]),
            desc(NUM_IPSETS, NUM_IPSETS_HELP, &[]),
            desc(NUM_IPSET_ENTRIES, NUM_IPSET_ENTRIES_HELP, &[]),
        ];
        if advanced {
            descs.push(desc(IPSET_COUNTS, IPSET_COUNTS_HELP, &[SET_NAME_LABEL, SET_HASH_LABEL]));
        }
        Self { cache, state, advanced, descs }
    }
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use super::*;
        let counts = if self.cache.has_observer() {
            match self.cache.get().and_then(|f| f.counts) {
                Some(c) => c,
                None => return Vec::new(),
            }
        } else {
            super::counts_from_state(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
        };
        let one = |name: &str, help: &str, v: u64| {
            family(name, help, MetricType::GAUGE, vec![gauge(Vec::new(), v as f64)])
        };
        let mut out = vec![
            one(NUM_IPTABLES_RULES, NUM_IPTABLES_RULES_HELP, counts.rules),
            one(NUM_IPSETS, NUM_IPSETS_HELP, counts.sets),
            one(NUM_IPSET_ENTRIES, NUM_IPSET_ENTRIES_HELP, counts.set_entries),
        ];
        if self.advanced {
            out.push(family(
                IPSET_COUNTS,
                IPSET_COUNTS_HELP,
                MetricType::GAUGE,
                counts
                    .per_set
                    .iter()
                    .map(|(name, hash, n)| {
                        gauge(
                            vec![label(SET_NAME_LABEL, name), label(SET_HASH_LABEL, hash)],
                            *n as f64,
                        )
                    })
                    .collect(),
            ));
        }
        out
    }
}
