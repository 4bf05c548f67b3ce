//! The eBPF dataplane's figures, read from the pinned maps under the pin root, opened
//! read-only by path (no lock on the agent's loop). Packets: the per-CPU counters, summed over
//! CPUs, per direction and reason. Maps: entries and `max_entries` of every hash, LRU and LPM
//! map. Connection tracking: the entries of `NPM_CT`. Azure NPM's counts: every entry of
//! `NPM_POLICY` is a rule; the sets are Azure NPM's sets of the plan's layout, which the
//! dataplane follows ([`AzureSets`]: the same sets, names and entries as the iptables
//! dataplane's kernel holds for the same cluster), since the maps hold none (a peer set is
//! spelled out as policy keys, one per identity; the maps' own sizes are `npm_map_entries`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};

use crate::dataplane::DataplaneError;
use crate::dataplane::azure::AzureSets;
use crate::dataplane::observe::{Figures, MapFigure, Observer, PacketFigure};
use npm_common::{REASONS, Reason};

/// Reads the eBPF dataplane's pinned maps (under `<pin root>/maps`) and the layout's sets.
pub struct EbpfObserver {
    pin_root: PathBuf,
    maps_dir: PathBuf,
    sets: Arc<Mutex<AzureSets>>,
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
    pub fn new(pin_root: &Path, sets: Arc<Mutex<AzureSets>>) -> Self {
        Self { pin_root: pin_root.to_path_buf(), maps_dir: pin_root.join("maps"), sets }
    }
}

/// The decision maps of a running agent (under `<pin root>/maps`), read into the host model:
/// endpoints, interfaces, identities, CIDR prefixes, policy entries and node addresses (not
/// connection tracking: the model answers for a connection's first packet).
pub fn pinned_model(maps_dir: &Path) -> Result<crate::dataplane::ebpf::emulator::MapEmulator> {
    use aya::maps::HashMap as BpfHashMap;
    use aya::maps::lpm_trie::LpmTrie;
    use npm_common::*;
    let mut m = crate::dataplane::ebpf::emulator::MapEmulator::default();
    let endpoints: BpfHashMap<_, Addr, EndpointInfo> =
        open_map(maps_dir, MAP_ENDPOINTS)?.try_into()?;
    m.endpoints = endpoints.iter().filter_map(std::result::Result::ok).collect();
    let ifaces: BpfHashMap<_, u32, IfaceInfo> = open_map(maps_dir, MAP_IFACES)?.try_into()?;
    m.ifaces = ifaces.iter().filter_map(std::result::Result::ok).collect();
    for (ifindex, info) in &m.ifaces {
        for a in [info.own(false), info.own(true)].into_iter().flatten() {
            if m.endpoints.get(&a).is_some_and(|e| e.ifindex == *ifindex) {
                let ip = super::key_addr(a);
                m.attached.insert(ip);
                m.pod_ifindex.insert(ip, *ifindex);
            }
        }
    }
    let ids: BpfHashMap<_, Addr, u32> = open_map(maps_dir, MAP_IDENTITIES)?.try_into()?;
    m.identities = ids.iter().filter_map(std::result::Result::ok).collect();
    let cidrs: LpmTrie<_, Addr, u32> = open_map(maps_dir, MAP_CIDRS)?.try_into()?;
    for (k, id) in cidrs.iter().filter_map(std::result::Result::ok) {
        if let Some(net) = super::key_prefix(k.prefix_len(), k.data()) {
            m.cidrs.insert(net, id);
        }
    }
    let policy: LpmTrie<_, PolicyKeyData, npm_common::PolicyValue> =
        open_map(maps_dir, MAP_POLICY)?.try_into()?;
    for (k, v) in policy.iter().filter_map(std::result::Result::ok).take(MAX_POLICY as usize) {
        m.policy.insert((k.prefix_len(), k.data()), v);
    }
    let nodes: BpfHashMap<_, Addr, u32> = open_map(maps_dir, MAP_NODE_IPS)?.try_into()?;
    m.node_ips = nodes.keys().filter_map(std::result::Result::ok).collect();
    Ok(m)
}

impl Observer for EbpfObserver {
    fn observe(&self, per_set: bool) -> Result<Figures> {
        use aya::maps::lpm_trie::LpmTrie;
        use aya::maps::{HashMap as BpfHashMap, MapData};
        use npm_common::conntrack::{FragKey, FragValue};
        use npm_common::*;
        let dir = &self.maps_dir;
        let mut f = Figures::default();

        let counters = pinned_counters(&self.pin_root)?;
        for (dir_byte, direction) in [(DIR_INGRESS, "ingress"), (DIR_EGRESS, "egress")] {
            for r in Reason::ALL {
                let p = PacketFigure {
                    direction,
                    reason: r.name().into(),
                    packets: counters.get(dir_byte, r),
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
            ($name:expr, $k:ty) => {
                trie!($name, $k, u32)
            };
            ($name:expr, $k:ty, $v:ty) => {{
                let m: LpmTrie<MapData, $k, $v> = open_map(dir, $name)?.try_into()?;
                let cap = max_entries(m.map());
                let n = count_keys(m.keys(), cap);
                push($name, m.map(), n);
                n
            }};
        }
        use aya::maps::IterableMap as _;
        hash_map!(MAP_ENDPOINTS, Addr, EndpointInfo);
        hash_map!(MAP_IFACES, u32, IfaceInfo);
        hash_map!(MAP_IDENTITIES, Addr, u32);
        trie!(MAP_CIDRS, Addr);
        let rules = trie!(MAP_POLICY, PolicyKeyData, npm_common::PolicyValue);
        hash_map!(MAP_NODE_IPS, Addr, u32);
        let ct = hash_map!(MAP_CT, CtKey, CtValue);
        hash_map!(MAP_FRAGS, FragKey, FragValue);
        f.conntrack_entries = Some(ct);
        // An older agent's pins have no limiter: no figures, rather than no metrics at all.
        f.drop_events = super::events::pinned_event_totals(&self.pin_root).ok();

        let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        f.counts = Some(sets.counts(rules, per_set));
        Ok(f)
    }
}

/// Packets passed and dropped, per direction and reason, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketCounters {
    /// `[direction][reason]`, direction as `npm_common::DIR_*`.
    pub counts: [[u64; REASONS as usize]; 2],
}

impl PacketCounters {
    pub fn get(&self, dir: u8, reason: Reason) -> u64 {
        self.counts[dir as usize][reason as usize]
    }

    pub fn allowed(&self, dir: u8) -> u64 {
        Reason::ALL.iter().filter(|r| r.allowed()).map(|r| self.get(dir, *r)).sum()
    }

    pub fn dropped(&self, dir: u8) -> u64 {
        Reason::ALL.iter().filter(|r| !r.allowed()).map(|r| self.get(dir, *r)).sum()
    }
}

/// Reads the packet counters of an agent from its pin root (for `npm-agent counters`, while
/// the agent runs or after).
pub fn pinned_counters(pin_root: &Path) -> Result<PacketCounters, DataplaneError> {
    use aya::maps::{MapData, PerCpuArray};
    use npm_common::{MAP_COUNTERS, Reason, counter_index};
    let err = |operation: &str, e: &dyn std::fmt::Display| DataplaneError::Apply {
        dataplane: "ebpf",
        operation: operation.into(),
        message: e.to_string(),
    };
    let data = MapData::from_pin(pin_root.join("maps").join(MAP_COUNTERS))
        .map_err(|e| err("opening the pinned counters", &e))?;
    let counters: PerCpuArray<MapData, u64> = aya::maps::Map::PerCpuArray(data)
        .try_into()
        .map_err(|e| err("opening the pinned counters", &e))?;
    let mut c = PacketCounters::default();
    for dir in 0..2u8 {
        for r in Reason::ALL {
            let values =
                counters.get(&counter_index(dir, r), 0).map_err(|e| err("reading counters", &e))?;
            c.counts[dir as usize][r as usize] = values.iter().sum();
        }
    }
    Ok(c)
}
