//! The dataplane's figures, read from the kernel when Prometheus scrapes (never from the
//! agent's own bookkeeping, so they say what is enforced):
//!
//! - eBPF ([`EbpfObserver`]): the pinned maps under the pin root, opened read-only by path
//!   (no lock on the agent's loop). Packets: the per-CPU counters, summed over CPUs, per
//!   direction and reason. Maps: entries and `max_entries` of every hash, LRU and LPM map.
//!   Connection tracking: the entries of `NPM_CT`. Counts, in place of Azure NPM's ipsets and
//!   iptables rules: every identity of `NPM_IDENTITIES` is a set whose entries are its pod
//!   addresses; every prefix of `NPM_CIDRS` is a set of one entry; every entry of
//!   `NPM_POLICY` is a rule.
//! - iptables ([`IptablesObserver`]): `iptables-save -c` of the backend (nft or legacy) that
//!   holds the `AZURE-NPM*` chains (their rules; drops are the packet counters of their
//!   `DROP` rules, by the chain's direction)
//!   and `ipset save` (the `azure-npm-*` sets and their entries); conntrack entries from
//!   `/proc/sys/net/netfilter/nf_conntrack_count`.
//!
//! A scrape reads the kernel at most once a second ([`FiguresCache`]): `/node-metrics` and
//! `/cluster-metrics` scraped together share one reading.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::{StateCounts, set_hash};

/// Rules, sets and set entries (Azure NPM's counts), and the entries of each set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rules: u64,
    pub sets: u64,
    pub set_entries: u64,
    /// `(set name, kernel name or hash, entries)`, when asked for (advanced metrics).
    pub per_set: Vec<(String, String, u64)>,
}

/// One map of the eBPF dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFigure {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

/// Packets of one (direction, reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketFigure {
    /// `ingress` (entering the pod) or `egress`.
    pub direction: &'static str,
    pub reason: String,
    pub packets: u64,
}

/// What the kernel holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub allowed: Vec<PacketFigure>,
    pub dropped: Vec<PacketFigure>,
    pub maps: Vec<MapFigure>,
    pub conntrack_entries: Option<u64>,
    pub counts: Option<Counts>,
}

/// Reads a dataplane's figures from the kernel.
pub trait Observer: Send + Sync {
    /// `per_set`: also the entries of each set (advanced metrics).
    fn observe(&self, per_set: bool) -> Result<Figures>;
}

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
            Counts::from_state(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
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

// ---- eBPF ----

/// Reads the eBPF dataplane's pinned maps (under `<pin root>/maps`).
pub struct EbpfObserver {
    maps_dir: PathBuf,
}

/// What the eBPF maps hold, as the metrics count it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EbpfContents {
    /// Pod address → identity entries, and the entries of each identity.
    pub identity_entries: u64,
    pub identities: BTreeMap<u32, u64>,
    /// CIDR prefixes.
    pub prefixes: Vec<ipnet::Ipv4Net>,
    pub policy_entries: u64,
}

impl EbpfContents {
    /// Azure NPM's counts in eBPF terms (see the module documentation).
    pub fn counts(&self, per_set: bool) -> Counts {
        let mut c = Counts {
            rules: self.policy_entries,
            sets: self.identities.len() as u64 + self.prefixes.len() as u64,
            set_entries: self.identity_entries + self.prefixes.len() as u64,
            per_set: Vec::new(),
        };
        if per_set {
            for (id, n) in &self.identities {
                let name = format!("identity-{id}");
                c.per_set.push((name.clone(), set_hash(&name), *n));
            }
            for p in &self.prefixes {
                let name = format!("cidr-{p}");
                c.per_set.push((name.clone(), set_hash(&name), 1));
            }
        }
        c
    }
}

fn open_map(dir: &Path, name: &str) -> Result<aya::maps::Map> {
    let path = dir.join(name);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    aya::maps::Map::from_map_data(data).with_context(|| format!("{name}: unsupported map type"))
}

fn max_entries(map: &aya::maps::MapData) -> u64 {
    map.info().map(|i| u64::from(i.max_entries())).unwrap_or(0)
}

/// Counts keys, at most `cap` (a hash map's iteration can restart while entries are deleted).
fn count_keys<K>(
    keys: impl Iterator<Item = std::result::Result<K, aya::maps::MapError>>,
    cap: u64,
) -> u64 {
    (keys.filter_map(std::result::Result::ok).take(cap as usize + 1).count() as u64).min(cap)
}

impl EbpfObserver {
    pub fn new(pin_root: &Path) -> Self {
        Self { maps_dir: pin_root.join("maps") }
    }

    /// The identity, CIDR and policy maps' contents (also for tests that check the metrics
    /// against the maps).
    pub fn contents(maps_dir: &Path) -> Result<EbpfContents> {
        use aya::maps::HashMap as BpfHashMap;
        use aya::maps::lpm_trie::LpmTrie;
        use npm_common::{MAP_CIDRS, MAP_IDENTITIES, MAP_POLICY, PolicyKeyData};
        let mut out = EbpfContents::default();
        let ids: BpfHashMap<_, [u8; 4], u32> = open_map(maps_dir, MAP_IDENTITIES)?.try_into()?;
        for (_, id) in ids.iter().filter_map(std::result::Result::ok) {
            out.identity_entries += 1;
            *out.identities.entry(id).or_default() += 1;
        }
        let cidrs: LpmTrie<_, [u8; 4], u32> = open_map(maps_dir, MAP_CIDRS)?.try_into()?;
        for k in cidrs.keys().filter_map(std::result::Result::ok) {
            if let Ok(net) = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8) {
                out.prefixes.push(net);
            }
        }
        out.prefixes.sort();
        out.prefixes.dedup();
        let policy: LpmTrie<_, PolicyKeyData, u32> = open_map(maps_dir, MAP_POLICY)?.try_into()?;
        out.policy_entries = count_keys(policy.keys(), u64::from(npm_common::MAX_POLICY));
        Ok(out)
    }
}

impl Observer for EbpfObserver {
    fn observe(&self, per_set: bool) -> Result<Figures> {
        use aya::maps::lpm_trie::LpmTrie;
        use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
        use npm_common::conntrack::{FragKey, FragValue};
        use npm_common::*;
        let dir = &self.maps_dir;
        let mut f = Figures::default();

        let counters: PerCpuArray<MapData, u64> = open_map(dir, MAP_COUNTERS)?.try_into()?;
        for (dir_byte, direction) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
            for r in Reason::ALL {
                let values = counters
                    .get(&counter_index(dir_byte, r), 0)
                    .context("reading the packet counters")?;
                let p = PacketFigure {
                    direction,
                    reason: r.name().into(),
                    packets: values.iter().sum(),
                };
                if r.allowed() { f.allowed.push(p) } else { f.dropped.push(p) }
            }
        }

        let mut push = |name: &str, data: &MapData, entries: u64| {
            f.maps.push(MapFigure { name: name.into(), entries, max_entries: max_entries(data) });
        };
        macro_rules! hash_map {
            ($name:expr, $k:ty, $v:ty) => {{
                let m: BpfHashMap<MapData, $k, $v> = open_map(dir, $name)?.try_into()?;
                let cap = max_entries(m.map());
                let n = count_keys(m.keys(), cap);
                push($name, m.map(), n);
                n
            }};
        }
        macro_rules! trie {
            ($name:expr, $k:ty) => {{
                let m: LpmTrie<MapData, $k, u32> = open_map(dir, $name)?.try_into()?;
                let cap = max_entries(m.map());
                let n = count_keys(m.keys(), cap);
                push($name, m.map(), n);
                n
            }};
        }
        use aya::maps::IterableMap as _;
        hash_map!(MAP_ENDPOINTS, [u8; 4], EndpointInfo);
        hash_map!(MAP_IFACES, u32, IfaceInfo);
        hash_map!(MAP_IDENTITIES, [u8; 4], u32);
        trie!(MAP_CIDRS, [u8; 4]);
        trie!(MAP_POLICY, PolicyKeyData);
        hash_map!(MAP_NODE_IPS, [u8; 4], u32);
        let ct = hash_map!(MAP_CT, CtKey, CtValue);
        hash_map!(MAP_FRAGS, FragKey, FragValue);
        f.conntrack_entries = Some(ct);

        f.counts = Some(Self::contents(dir)?.counts(per_set));
        Ok(f)
    }
}

// ---- iptables ----

/// The readable name of a kernel set name (`azure-npm-…`), when the dataplane knows it.
pub type SetNames = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Reads the iptables dataplane's rules, sets and counters with `iptables-save` and
/// `ipset save` (Azure NPM's chain and set names).
#[derive(Default)]
pub struct IptablesObserver {
    /// Readable set names; without, the kernel name is both `set_name` and `set_hash`.
    pub set_names: Option<SetNames>,
}

/// Rules and drops parsed from `iptables-save -c`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesFigures {
    pub rules: u64,
    pub dropped_ingress: u64,
    pub dropped_egress: u64,
}

/// Parses `iptables-save -c` (or without `-c`: no counters): the rules of every chain named
/// `AZURE-NPM*`, and the packets of their `DROP` rules, ingress for chains whose name has
/// `INGRESS`, egress for `EGRESS`.
pub fn parse_iptables_save(text: &str) -> IptablesFigures {
    let mut f = IptablesFigures::default();
    for line in text.lines() {
        let line = line.trim();
        let (packets, rule) = match line.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((c, rule)) => (
                    c.split(':').next().and_then(|p| p.parse::<u64>().ok()).unwrap_or(0),
                    rule.trim(),
                ),
                None => continue,
            },
            None => (0, line),
        };
        let Some(rest) = rule.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or_default();
        if !chain.starts_with("AZURE-NPM") {
            continue;
        }
        f.rules += 1;
        let words: Vec<&str> = rest.split_whitespace().collect();
        let drops = words.windows(2).any(|w| w[0] == "-j" && w[1] == "DROP");
        if drops {
            if chain.contains("INGRESS") {
                f.dropped_ingress += packets;
            } else if chain.contains("EGRESS") {
                f.dropped_egress += packets;
            }
        }
    }
    f
}

/// The packets the source guard dropped (`iptables-save -c -t raw` and `ip6tables-save -c -t
/// filter`, see `dataplane::iptables::guard`): spoofed sources leaving pods (egress) and local
/// pods' addresses arriving from elsewhere (ingress); IPv6 refused at isolated pods.
pub fn parse_guard_drops(raw: &str, ipv6: &str) -> Vec<PacketFigure> {
    let counted = |text: &str, comment: &str| -> u64 {
        text.lines()
            .filter(|l| l.contains(comment))
            .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
            .sum()
    };
    [
        ("egress", "spoofed", counted(raw, "DROP-SPOOFED-SOURCE-FROM-POD")),
        ("ingress", "spoofed", counted(raw, "DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE")),
        ("ingress", "unsupported", counted(ipv6, "DROP-IPV6-TO-ISOLATED-POD")),
        ("egress", "unsupported", counted(ipv6, "DROP-IPV6-FROM-ISOLATED-POD")),
    ]
    .into_iter()
    .map(|(direction, reason, packets)| PacketFigure { direction, reason: reason.into(), packets })
    .collect()
}

/// Parses `ipset save`: the `azure-npm-*` sets and the entries of each.
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, u64> {
    let mut sets = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("create"), Some(name)) if name.starts_with("azure-npm-") => {
                sets.entry(name.to_string()).or_insert(0);
            }
            (Some("add"), Some(name)) if name.starts_with("azure-npm-") => {
                *sets.entry(name.to_string()).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    sets
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The filter table with counters of the iptables backend (nft or legacy) that holds the
/// `AZURE-NPM` chains (the dataplane chose one and removes its layout from the other), and the
/// program that printed it.
fn iptables_save() -> Result<(String, &'static str)> {
    let args = ["-c", "-t", "filter"];
    let mut first_error = None;
    let mut any_ran = false;
    for program in ["iptables-nft-save", "iptables-legacy-save", "iptables-save"] {
        match run(program, &args) {
            Ok(text) if text.lines().any(|l| l.starts_with(":AZURE-NPM ")) => {
                return Ok((text, program));
            }
            Ok(_) => any_ran = true,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        // No backend holds the chains yet: no rules.
        Some(e) if !any_ran => Err(e),
        _ => Ok((String::new(), "iptables-save")),
    }
}

impl Observer for IptablesObserver {
    fn observe(&self, per_set: bool) -> Result<Figures> {
        let (filter, save) = iptables_save()?;
        let rules = parse_iptables_save(&filter);
        let sets = parse_ipset_save(&run("ipset", &["save"])?);
        let mut f = Figures::default();
        for (direction, packets) in
            [("ingress", rules.dropped_ingress), ("egress", rules.dropped_egress)]
        {
            f.dropped.push(PacketFigure { direction, reason: "denied".into(), packets });
        }
        // The guard's counters, from the same backend (absent tables count nothing).
        let raw = run(save, &["-c", "-t", "raw"]).unwrap_or_default();
        let save6 = save.replacen("iptables", "ip6tables", 1);
        let ipv6 = run(&save6, &["-c", "-t", "filter"]).unwrap_or_default();
        f.dropped.extend(parse_guard_drops(&raw, &ipv6));
        f.conntrack_entries = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let mut counts = Counts {
            rules: rules.rules,
            sets: sets.len() as u64,
            set_entries: sets.values().sum(),
            per_set: Vec::new(),
        };
        if per_set {
            for (kernel, n) in &sets {
                let name = self
                    .set_names
                    .as_ref()
                    .and_then(|f| f(kernel))
                    .unwrap_or_else(|| kernel.clone());
                counts.per_set.push((name, kernel.clone(), *n));
            }
        }
        f.counts = Some(counts);
        Ok(f)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn guard_drops_are_counted_by_rule() {
        let raw = "*raw\n:AZURE-NPM-GUARD - [0:0]\n[7:420] -A AZURE-NPM-GUARD -m set --match-set azure-npm-1 src,src -m set ! --match-set azure-npm-2 src,src -m comment --comment DROP-SPOOFED-SOURCE-FROM-POD -j DROP\n[2:120] -A AZURE-NPM-GUARD -m set --match-set azure-npm-3 src -m set ! --match-set azure-npm-2 src,src -m comment --comment DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE -j DROP\nCOMMIT\n";
        let v6 = "*filter\n[5:400] -A AZURE-NPM-IPV6 -m set --match-set azure-npm-4 dst,dst -m comment --comment DROP-IPV6-TO-ISOLATED-POD-NOT-ENFORCED -j DROP\nCOMMIT\n";
        let f = parse_guard_drops(raw, v6);
        let get = |d: &str, r: &str| {
            f.iter().find(|p| p.direction == d && p.reason == r).map(|p| p.packets)
        };
        assert_eq!(get("egress", "spoofed"), Some(7));
        assert_eq!(get("ingress", "spoofed"), Some(2));
        assert_eq!(get("ingress", "unsupported"), Some(5));
        assert_eq!(get("egress", "unsupported"), Some(0));
    }

    use super::*;

    #[test]
    fn iptables_rules_and_drops() {
        let save = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:600]
:AZURE-NPM - [0:0]
:AZURE-NPM-INGRESS - [0:0]
:AZURE-NPM-EGRESS - [0:0]
[10:600] -A FORWARD -j AZURE-NPM
[10:600] -A AZURE-NPM -j AZURE-NPM-INGRESS
[3:180] -A AZURE-NPM-INGRESS -m set --match-set azure-npm-1 dst -m mark --mark 0x2000/0x2000 -j AZURE-NPM-ACCEPT
[4:240] -A AZURE-NPM-INGRESS -m set --match-set azure-npm-1 dst -m comment --comment \"DROP-ALL\" -j DROP
[2:120] -A AZURE-NPM-EGRESS -m set --match-set azure-npm-2 src -j DROP
[0:0] -A AZURE-NPM-EGRESS-ALLOW -j RETURN
COMMIT
";
        assert_eq!(
            parse_iptables_save(save),
            IptablesFigures { rules: 5, dropped_ingress: 4, dropped_egress: 2 }
        );
    }

    #[test]
    fn ipset_sets_and_entries() {
        let save = "\
create azure-npm-1 hash:net family inet hashsize 1024 maxelem 65536
add azure-npm-1 10.0.0.1
add azure-npm-1 10.0.0.2
create azure-npm-2 hash:net family inet hashsize 1024 maxelem 65536
create other hash:ip family inet
add other 1.2.3.4
create azure-npm-3 list:set size 8
add azure-npm-3 azure-npm-1
";
        let sets = parse_ipset_save(save);
        assert_eq!(
            sets,
            BTreeMap::from([
                ("azure-npm-1".into(), 2),
                ("azure-npm-2".into(), 0),
                ("azure-npm-3".into(), 1)
            ])
        );
    }

    #[test]
    fn ebpf_counts() {
        let c = EbpfContents {
            identity_entries: 5,
            identities: BTreeMap::from([(1, 3), (2, 2)]),
            prefixes: vec!["10.0.0.0/8".parse().unwrap()],
            policy_entries: 7,
        };
        let counts = c.counts(true);
        assert_eq!((counts.rules, counts.sets, counts.set_entries), (7, 3, 6));
        assert_eq!(counts.per_set[0], ("identity-1".to_string(), set_hash("identity-1"), 3));
        assert_eq!(counts.per_set[2].0, "cidr-10.0.0.0/8");
        assert!(c.counts(false).per_set.is_empty());
    }
}
