//! The eBPF dataplane's figures, read from the pinned maps under the pin root, opened
//! read-only by path (no lock on the agent's loop). Packets: the per-CPU counters, summed over
//! CPUs, per direction and reason. Maps: entries and `max_entries` of every hash, LRU and LPM
//! map. Connection tracking: the entries of `NPM_CT`. Counts, in place of Azure NPM's ipsets
//! and iptables rules: every identity of `NPM_IDENTITIES` is a set whose entries are its pod
//! addresses; every prefix of `NPM_CIDRS` is a set of one entry; every entry of `NPM_POLICY`
//! is a rule.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::dataplane::DataplaneError;
use crate::dataplane::azure::hashed_set_name;
use crate::dataplane::observe::{Counts, Figures, MapFigure, Observer, PacketFigure};
use npm_common::{REASONS, Reason};

/// Reads the eBPF dataplane's pinned maps (under `<pin root>/maps`).
pub struct EbpfObserver {
    pin_root: PathBuf,
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
                c.per_set.push((name.clone(), hashed_set_name(&name), *n));
            }
            for p in &self.prefixes {
                let name = format!("cidr-{p}");
                c.per_set.push((name.clone(), hashed_set_name(&name), 1));
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
        Self { pin_root: pin_root.to_path_buf(), maps_dir: pin_root.join("maps") }
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

/// The decision maps of a running agent (under `<pin root>/maps`), read into the host model:
/// endpoints, interfaces, identities, CIDR prefixes, policy entries and node addresses (not
/// connection tracking: the model answers for a connection's first packet).
pub fn pinned_model(maps_dir: &Path) -> Result<crate::dataplane::ebpf::emulator::MapEmulator> {
    use aya::maps::HashMap as BpfHashMap;
    use aya::maps::lpm_trie::LpmTrie;
    use npm_common::*;
    let mut m = crate::dataplane::ebpf::emulator::MapEmulator::default();
    let endpoints: BpfHashMap<_, [u8; 4], EndpointInfo> =
        open_map(maps_dir, MAP_ENDPOINTS)?.try_into()?;
    m.endpoints = endpoints.iter().filter_map(std::result::Result::ok).collect();
    let ifaces: BpfHashMap<_, u32, IfaceInfo> = open_map(maps_dir, MAP_IFACES)?.try_into()?;
    m.ifaces = ifaces.iter().filter_map(std::result::Result::ok).collect();
    for (ifindex, info) in &m.ifaces {
        if m.endpoints.get(&info.ip4).is_some_and(|e| e.ifindex == *ifindex) {
            m.attached.insert(Ipv4Addr::from(info.ip4));
        }
    }
    let ids: BpfHashMap<_, [u8; 4], u32> = open_map(maps_dir, MAP_IDENTITIES)?.try_into()?;
    m.identities = ids.iter().filter_map(std::result::Result::ok).collect();
    let cidrs: LpmTrie<_, [u8; 4], u32> = open_map(maps_dir, MAP_CIDRS)?.try_into()?;
    for (k, id) in cidrs.iter().filter_map(std::result::Result::ok) {
        if let Ok(net) = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8) {
            m.cidrs.insert(net, id);
        }
    }
    let policy: LpmTrie<_, PolicyKeyData, u32> = open_map(maps_dir, MAP_POLICY)?.try_into()?;
    for k in policy.keys().filter_map(std::result::Result::ok).take(MAX_POLICY as usize) {
        m.policy.insert((k.prefix_len(), k.data()));
    }
    let nodes: BpfHashMap<_, [u8; 4], u32> = open_map(maps_dir, MAP_NODE_IPS)?.try_into()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let c = EbpfContents {
            identity_entries: 5,
            identities: BTreeMap::from([(1, 3), (2, 2)]),
            prefixes: vec!["10.0.0.0/8".parse().unwrap()],
            policy_entries: 7,
        };
        let counts = c.counts(true);
        assert_eq!((counts.rules, counts.sets, counts.set_entries), (7, 3, 6));
        assert_eq!(counts.per_set[0], ("identity-1".to_string(), hashed_set_name("identity-1"), 3));
        assert_eq!(counts.per_set[2].0, "cidr-10.0.0.0/8");
        assert!(c.counts(false).per_set.is_empty());
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
