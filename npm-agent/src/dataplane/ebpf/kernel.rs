//! The eBPF dataplane in the kernel: loads the tc programs once, pins the maps and links
//! under a pin root (so enforcement survives the agent), attaches to the host side of each
//! local pod's veth as pods appear, and writes the translator's map operations.
//!
//! Pin layout under the pin root (default `/sys/fs/bpf/npm-rs`):
//! - `maps/<NAME>`: every map (reused by the next agent: its contents are reconciled, never
//!   flushed). A pinned map whose definition differs from this build's (an upgrade that
//!   changed a key or value layout, or a size) is unpinned and created anew: the old programs
//!   keep their old maps until each link is swapped to the new program, after the new maps
//!   hold the whole plan, so an upgrade opens no hole;
//! - `links/<ifname>-<from|to>`: the tcx links. On restart, pinned links are kept and their
//!   program is replaced atomically by the new agent's.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use npm_common::conntrack::{FragKey, FragValue};
use npm_common::{
    Addr, CONFIG_EVENT_BURST, CONFIG_EVENT_COST_NS, CtKey, CtValue, EndpointInfo, IfaceInfo,
    MAP_CIDRS, MAP_CONFIG, MAP_COUNTERS, MAP_CT, MAP_ENDPOINTS, MAP_EVENTS, MAP_FRAGS,
    MAP_IDENTITIES, MAP_IFACES, MAP_NODE_IPS, MAP_POLICY, PROG_FROM_POD, PROG_TO_POD,
    PolicyKeyData, PolicyValue, Reason, counter_index,
};

use super::emulator::MapEmulator;
use super::events::{EventRate, RingFeed};
use super::observe::{EbpfObserver, PacketCounters};
use super::translate::{Encoded, MapOp, MapTranslator};
use super::{addr_key, key_addr, key_prefix, prefix_key};
use crate::dataplane::azure::AzureSets;
use crate::dataplane::iface;
use crate::dataplane::observe::Observer;
use crate::dataplane::{Applied, Dataplane, DataplaneError};
use crate::model::ObjectKey;
use crate::plan::{Plan, PlanDiff};

/// The tc programs, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npm-ebpf"));

pub use super::DEFAULT_PIN_ROOT;
const NAME: &str = "ebpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// Where maps and links are pinned; distinct per agent on one machine.
    pub pin_root: PathBuf,
    /// How many drop events the programs send (per CPU).
    pub drop_events: EventRate,
    /// Attach programs to pod interfaces. Off only for packet tests (`TestRun`).
    pub attach: bool,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            drop_events: EventRate::DEFAULT,
            attach: true,
        }
    }
}

fn err(operation: impl Into<String>, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Apply { dataplane: NAME, operation: operation.into(), message: e.to_string() }
}

/// Where a local endpoint's programs are attached.
struct Attachment {
    pod: ObjectKey,
    /// The host side of the pod's veth and its index, once found.
    ifname: Option<String>,
    ifindex: u32,
    /// "No host route yet" was logged (once, not at every retry).
    warned: bool,
}

struct Maps {
    endpoints: BpfHashMap<MapData, Addr, EndpointInfo>,
    ifaces: BpfHashMap<MapData, u32, IfaceInfo>,
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    identities: BpfHashMap<MapData, Addr, u32>,
    cidrs: LpmTrie<MapData, Addr, u32>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    node_ips: BpfHashMap<MapData, Addr, u32>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
}

pub struct EbpfDataplane {
    config: EbpfConfig,
    ebpf: Ebpf,
    maps: Maps,
    translator: MapTranslator,
    /// By endpoint address: a dual-stack pod's two addresses share its interface.
    attachments: HashMap<IpAddr, Attachment>,
    /// When dead connection-tracking entries were last swept.
    last_sweep: Instant,
    /// Azure NPM's sets of the plan's layout, for the observer: the maps hold no such sets,
    /// but Azure NPM's metrics count them (the same in iptables mode).
    azure_sets: Arc<Mutex<AzureSets>>,
    /// The drop-event ring buffer, until the agent's reader takes it.
    events: Option<aya::maps::RingBuf<MapData>>,
}

/// How often [`EbpfDataplane::tick`] sweeps dead connection-tracking entries.
pub const CONNTRACK_SWEEP: Duration = Duration::from_secs(30);

impl EbpfDataplane {
    /// Loads the programs and opens (or creates) the pinned maps. Fails when the kernel cannot
    /// load them: the caller falls back to another dataplane.
    pub fn open(config: EbpfConfig) -> Result<Self, DataplaneError> {
        ensure_bpffs()?;
        let maps_dir = config.pin_root.join("maps");
        std::fs::create_dir_all(&maps_dir)
            .map_err(|e| err(format!("creating {}", maps_dir.display()), e))?;
        std::fs::create_dir_all(config.pin_root.join("links"))
            .map_err(|e| err("creating the links directory", e))?;
        if OBJECT.is_empty() {
            return Err(DataplaneError::Unsupported {
                dataplane: NAME,
                reason: "built without eBPF programs (AYA_BUILD_SKIP)".into(),
            });
        }
        replace_incompatible_pins(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)
            .map_err(|e| DataplaneError::Unsupported {
                dataplane: NAME,
                reason: format!("loading the programs: {e}"),
            })?;
        for name in [PROG_FROM_POD, PROG_TO_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| err("loading", format!("program {name} missing")))?
                .try_into()
                .map_err(|e| err("loading", e))?;
            prog.load().map_err(|e| DataplaneError::Unsupported {
                dataplane: NAME,
                reason: format!("verifying {name}: {e}"),
            })?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name).ok_or_else(|| err("opening maps", format!("map {name} missing")))
        };
        let maps = Maps {
            endpoints: take(MAP_ENDPOINTS)?.try_into().map_err(|e| err(MAP_ENDPOINTS, e))?,
            ifaces: take(MAP_IFACES)?.try_into().map_err(|e| err(MAP_IFACES, e))?,
            ct: take(MAP_CT)?.try_into().map_err(|e| err(MAP_CT, e))?,
            identities: take(MAP_IDENTITIES)?.try_into().map_err(|e| err(MAP_IDENTITIES, e))?,
            cidrs: take(MAP_CIDRS)?.try_into().map_err(|e| err(MAP_CIDRS, e))?,
            policy: take(MAP_POLICY)?.try_into().map_err(|e| err(MAP_POLICY, e))?,
            node_ips: take(MAP_NODE_IPS)?.try_into().map_err(|e| err(MAP_NODE_IPS, e))?,
            counters: take(MAP_COUNTERS)?.try_into().map_err(|e| err(MAP_COUNTERS, e))?,
            config: take(MAP_CONFIG)?.try_into().map_err(|e| err(MAP_CONFIG, e))?,
        };
        let events = take(MAP_EVENTS)?.try_into().map_err(|e| err(MAP_EVENTS, e))?;
        let mut dp = Self {
            config,
            ebpf,
            maps,
            translator: MapTranslator::new(),
            attachments: HashMap::new(),
            last_sweep: Instant::now(),
            azure_sets: Arc::default(),
            events: Some(events),
        };
        dp.set_drop_events(dp.config.drop_events)?;
        Ok(dp)
    }

    pub fn pin_root(&self) -> &Path {
        &self.config.pin_root
    }

    /// Sets how many drop events the programs send, at run time.
    pub fn set_drop_events(&mut self, rate: EventRate) -> Result<(), DataplaneError> {
        let (cost, burst) = rate.config();
        self.maps.config.set(CONFIG_EVENT_BURST, burst, 0).map_err(|e| err("config", e))?;
        self.maps.config.set(CONFIG_EVENT_COST_NS, cost, 0).map_err(|e| err("config", e))
    }

    /// One of the two programs (for `TestRun` packet tests and benchmarks).
    pub fn program_mut(&mut self, name: &str) -> Option<&mut SchedClassifier> {
        self.ebpf.program_mut(name).and_then(|p| p.try_into().ok())
    }

    pub fn counters(&self) -> Result<PacketCounters, DataplaneError> {
        let mut c = PacketCounters::default();
        for dir in 0..2u8 {
            for r in Reason::ALL {
                let values = self
                    .maps
                    .counters
                    .get(&counter_index(dir, r), 0)
                    .map_err(|e| err("reading counters", e))?;
                c.counts[dir as usize][r as usize] = values.iter().sum();
            }
        }
        Ok(c)
    }

    /// What the maps hold, as encoded.
    pub fn encoded(&self) -> Encoded {
        self.translator.encoded()
    }

    /// Entries really in the kernel maps (for metrics that must match the maps).
    pub fn map_entries(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (MAP_ENDPOINTS, self.maps.endpoints.keys().count(), npm_common::MAX_ENDPOINTS),
            (MAP_IDENTITIES, self.maps.identities.keys().count(), npm_common::MAX_IDENTITIES),
            (MAP_CIDRS, self.maps.cidrs.keys().count(), npm_common::MAX_CIDRS),
            (MAP_POLICY, self.maps.policy.keys().count(), npm_common::MAX_POLICY),
            (MAP_NODE_IPS, self.maps.node_ips.keys().count(), npm_common::MAX_NODE_IPS),
        ]
    }

    /// Attaches to interfaces that were not there yet, and again to interfaces that were
    /// replaced (a pod sandbox recreated with the same address gets a new veth, which has no
    /// programs). Returns how many attachments were (re)tried.
    pub fn refresh_attachments(&mut self) -> Result<usize, DataplaneError> {
        if !self.config.attach {
            return Ok(0);
        }
        let routes = iface::pod_routes();
        let stale: Vec<(IpAddr, ObjectKey)> = self
            .attachments
            .iter()
            .filter(|(ip, a)| match &a.ifname {
                None => true,
                Some(name) => routes.get(ip) != Some(name) || iface::index(name) != Some(a.ifindex),
            })
            .map(|(ip, a)| (*ip, a.pod.clone()))
            .collect();
        let n = stale.len();
        for (ip, pod) in stale {
            self.attach(ip, pod)?;
        }
        Ok(n)
    }

    /// Says that `ifindex` is the interface of the local endpoint at `ip`, as attaching does,
    /// without attaching anything: for packet tests through `TestRun`, where the interface
    /// is only a number the test passes in.
    pub fn bind_interface(&mut self, ip: IpAddr, ifindex: u32) -> Result<(), DataplaneError> {
        let pod = self
            .attachments
            .get(&ip)
            .map(|a| a.pod.clone())
            .unwrap_or_else(|| ObjectKey::new("", ""));
        self.bind(ip, &pod, ifindex)?;
        self.attachments.insert(ip, Attachment { pod, ifname: None, ifindex, warned: false });
        Ok(())
    }

    /// The interface map's value for `ifindex`: the addresses of `pod` bound to it (`ip` and
    /// whatever other address of the pod is already there). Another pod's addresses never
    /// join, whatever the attachments say.
    fn iface_info(&self, ifindex: u32, pod: &ObjectKey, ip: Option<IpAddr>) -> IfaceInfo {
        let others = self
            .attachments
            .iter()
            .filter(|(a, att)| Some(**a) != ip && att.ifindex == ifindex && att.pod == *pod)
            .map(|(a, _)| *a);
        ip.into_iter().chain(others).fold(IfaceInfo::default(), |i, a| i.with(addr_key(a)))
    }

    /// Records `ifindex` as the interface of the pod at `ip` in the maps: the interface map
    /// (what its packets may claim as their source) and the endpoint's value (where packets
    /// with its address must come from). Done before the programs are attached.
    fn bind(&mut self, ip: IpAddr, pod: &ObjectKey, ifindex: u32) -> Result<(), DataplaneError> {
        let info = self.iface_info(ifindex, pod, Some(ip));
        self.maps.ifaces.insert(ifindex, info, 0).map_err(|e| err("interface", e))?;
        if let Ok(info) = self.maps.endpoints.get(&addr_key(ip), 0)
            && info.ifindex != ifindex
        {
            self.maps
                .endpoints
                .insert(addr_key(ip), EndpointInfo { ifindex, ..info }, 0)
                .map_err(|e| err("endpoint", e))?;
        }
        Ok(())
    }

    /// Deletes the connection-tracking entries that are dead (idle past their timeout, see
    /// `npm_common::conntrack`) or belong to an interface no endpoint uses any more. The
    /// programs ignore dead entries anyway; this keeps the map for live flows. Returns the
    /// number of entries deleted.
    pub fn sweep_conntrack(&mut self) -> Result<usize, DataplaneError> {
        let now = boot_time_ns();
        let bound: HashSet<u32> =
            self.attachments.values().map(|a| a.ifindex).filter(|i| *i != 0).collect();
        let dead: Vec<CtKey> = self
            .maps
            .ct
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                npm_common::conntrack::expired(k, v, now)
                    || (self.config.attach && !bound.contains(&k.ifindex))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &dead {
            ignore_missing(self.maps.ct.remove(k)).map_err(|e| err("conntrack", e))?;
        }
        Ok(dead.len())
    }

    /// The connection-tracking entries, live or not (for tests and tools).
    pub fn conntrack(&self) -> Vec<(CtKey, CtValue)> {
        self.maps.ct.iter().filter_map(Result::ok).collect()
    }

    /// What the kernel maps hold now, as the host model (connection tracking and fragments
    /// included): to hold the programs' verdicts to the host's on the same state, and for
    /// tools that explain a verdict.
    pub fn snapshot(&self) -> Result<MapEmulator, DataplaneError> {
        let m = &self.maps;
        let mut model = MapEmulator::default();
        let read = |e: aya::maps::MapError| err("reading the maps", e);
        for kv in m.endpoints.iter() {
            let (k, v) = kv.map_err(read)?;
            model.endpoints.insert(k, v);
        }
        for kv in m.ifaces.iter() {
            let (k, v) = kv.map_err(read)?;
            model.ifaces.insert(k, v);
        }
        for kv in m.identities.iter() {
            let (k, v) = kv.map_err(read)?;
            model.identities.insert(k, v);
        }
        for kv in m.cidrs.iter() {
            let (k, v) = kv.map_err(read)?;
            let net = key_prefix(k.prefix_len(), k.data())
                .ok_or_else(|| err("reading the maps", "a CIDR key of no prefix"))?;
            model.cidrs.insert(net, v);
        }
        for kv in m.policy.iter() {
            let (k, v) = kv.map_err(read)?;
            model.policy.insert((k.prefix_len(), k.data()), v);
        }
        for k in m.node_ips.keys() {
            model.node_ips.insert(k.map_err(read)?);
        }
        for kv in m.ct.iter() {
            let (k, v) = kv.map_err(read)?;
            model.ct.borrow_mut().insert(k, v);
        }
        let frags: BpfHashMap<&MapData, FragKey, FragValue> = BpfHashMap::try_from(
            self.ebpf.map(MAP_FRAGS).ok_or_else(|| err("reading the maps", "no fragment map"))?,
        )
        .map_err(|e| err(MAP_FRAGS, e))?;
        for kv in frags.iter() {
            let (k, v) = kv.map_err(read)?;
            model.frags.borrow_mut().insert(k, v);
        }
        Ok(model)
    }

    fn write(&mut self, ops: &[MapOp]) -> Result<(), DataplaneError> {
        let m = &mut self.maps;
        for op in ops {
            match op {
                MapOp::EndpointSet { ip, info } => {
                    // The interface is this side's to know (the translator's value has none).
                    let ifindex = self.attachments.get(ip).map_or(0, |a| a.ifindex);
                    m.endpoints
                        .insert(addr_key(*ip), EndpointInfo { ifindex, ..*info }, 0)
                        .map_err(|e| err("endpoint", e))?
                }
                MapOp::EndpointDel { ip } => ignore_missing(m.endpoints.remove(&addr_key(*ip)))
                    .map_err(|e| err("endpoint", e))?,
                MapOp::IdentitySet { ip, id } => {
                    m.identities.insert(addr_key(*ip), id, 0).map_err(|e| err("identity", e))?
                }
                MapOp::IdentityDel { ip } => ignore_missing(m.identities.remove(&addr_key(*ip)))
                    .map_err(|e| err("identity", e))?,
                MapOp::CidrSet { net, id } => {
                    let (len, key) = prefix_key(*net);
                    m.cidrs.insert(&Key::new(len, key), id, 0).map_err(|e| err("cidr", e))?
                }
                MapOp::CidrDel { net } => {
                    let (len, key) = prefix_key(*net);
                    ignore_missing(m.cidrs.remove(&Key::new(len, key)))
                        .map_err(|e| err("cidr", e))?
                }
                MapOp::PolicyAdd { prefix_len, key, value } => m
                    .policy
                    .insert(&Key::new(*prefix_len, *key), value, 0)
                    .map_err(|e| err("policy", e))?,
                MapOp::PolicyDel { prefix_len, key } => {
                    ignore_missing(m.policy.remove(&Key::new(*prefix_len, *key)))
                        .map_err(|e| err("policy", e))?
                }
                MapOp::NodeIpAdd { ip } => {
                    m.node_ips.insert(addr_key(*ip), 1, 0).map_err(|e| err("node address", e))?
                }
                MapOp::NodeIpDel { ip } => ignore_missing(m.node_ips.remove(&addr_key(*ip)))
                    .map_err(|e| err("node address", e))?,
                MapOp::Attach { .. } | MapOp::Detach { .. } => {}
            }
        }
        Ok(())
    }

    /// Writes map operations, detaching first and attaching last: a new pod's programs start
    /// only once everything it needs is in the maps.
    fn run_ops(&mut self, ops: Vec<MapOp>) -> Result<(), DataplaneError> {
        for op in &ops {
            if let MapOp::Detach { ip } = op {
                self.detach(*ip)?;
            }
        }
        self.write(&ops)?;
        for op in ops {
            if let MapOp::Attach { ip, pod } = op {
                self.attach(ip, pod)?;
            }
        }
        Ok(())
    }

    /// bpffs refuses names with a dot, which interface names may have (VLANs): escape them.
    fn link_path(&self, ifname: &str, dir: &str) -> PathBuf {
        self.config.pin_root.join("links").join(format!("{}-{dir}", ifname.replace('.', "_")))
    }

    fn attach(&mut self, ip: IpAddr, pod: ObjectKey) -> Result<(), DataplaneError> {
        let warned = self.attachments.get(&ip).is_some_and(|a| a.warned);
        if !self.config.attach {
            let ifindex = self.attachments.get(&ip).map_or(0, |a| a.ifindex);
            self.attachments.insert(ip, Attachment { pod, ifname: None, ifindex, warned: false });
            return Ok(());
        }
        let found = iface::host_interface(ip)
            .and_then(|name| iface::index(&name).map(|index| (name, index)));
        let Some((ifname, ifindex)) = found else {
            // Said once, not at every retry: the pod's veth usually appears within seconds.
            if !warned {
                tracing::warn!(%ip, %pod, "no host route to the pod yet; will attach when it appears");
            }
            self.attachments.insert(ip, Attachment { pod, ifname: None, ifindex: 0, warned: true });
            return Ok(());
        };
        if let Some(old) = self.attachments.get(&ip)
            && old.ifname.as_ref().is_some_and(|n| *n != ifname)
                | (old.ifindex != 0 && old.ifindex != ifindex)
        {
            self.detach(ip)?;
        }
        // The maps know the interface before its programs run: the first packet is checked.
        self.bind(ip, &pod, ifindex)?;
        // The pod's other address may have attached the programs already.
        let attached = self.attachments.iter().any(|(a, att)| {
            *a != ip && att.ifindex == ifindex && att.ifname.as_deref() == Some(ifname.as_str())
        });
        for (prog, ty, dir) in [
            (PROG_FROM_POD, TcAttachType::Ingress, "from"),
            (PROG_TO_POD, TcAttachType::Egress, "to"),
        ]
        .into_iter()
        .filter(|_| !attached)
        {
            let path = self.link_path(&ifname, dir);
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| err("attach", "program missing"))?;
            let id = match PinnedLink::from_pin(&path) {
                // A link pinned by an earlier agent: swap in this agent's program atomically.
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|e| err("reusing a pinned link", e))?;
                    let _ = std::fs::remove_file(&path);
                    program
                        .attach_to_link(link)
                        .map_err(|e| err(format!("replacing the program on {ifname}"), e))?
                }
                Err(_) => program
                    .attach_with_options(
                        &ifname,
                        ty,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .or_else(|_| {
                        // Kernels before 6.6 have no tcx: legacy tc (clsact) filters, which
                        // outlive the agent by themselves.
                        let _ = aya::programs::tc::qdisc_add_clsact(&ifname);
                        program.attach(&ifname, ty)
                    })
                    .map_err(|e| err(format!("attaching to {ifname}"), e))?,
            };
            let link = program.take_link(id).map_err(|e| err("attach", e))?;
            if let Ok(fd) = FdLink::try_from(link) {
                fd.pin(&path).map_err(|e| err(format!("pinning {}", path.display()), e))?;
            }
        }
        if warned {
            tracing::info!(%ip, %pod, interface = %ifname, "host route appeared; attached");
        }
        self.attachments
            .insert(ip, Attachment { pod, ifname: Some(ifname), ifindex, warned: false });
        Ok(())
    }

    fn detach(&mut self, ip: IpAddr) -> Result<(), DataplaneError> {
        let Some(a) = self.attachments.remove(&ip) else {
            return Ok(());
        };
        // The pod's other address keeps the interface (and its programs) when it is there.
        let shared = a.ifindex != 0
            && self.attachments.values().any(|o| o.ifindex == a.ifindex && o.pod == a.pod);
        if shared {
            let info = self.iface_info(a.ifindex, &a.pod, None);
            return self.maps.ifaces.insert(a.ifindex, info, 0).map_err(|e| err("interface", e));
        }
        if let Some(ifname) = a.ifname {
            for dir in ["from", "to"] {
                let path = self.link_path(&ifname, dir);
                if let Ok(pinned) = PinnedLink::from_pin(&path) {
                    // Unpinned and dropped, the link (and the program on the interface) goes.
                    pinned.unpin().map_err(|e| err("detach", e))?;
                }
            }
        }
        if a.ifindex != 0 {
            ignore_missing(self.maps.ifaces.remove(&a.ifindex)).map_err(|e| err("interface", e))?;
        }
        Ok(())
    }

    /// Deletes every map entry and link the current plan does not need (after the new
    /// entries are in: adds first, then removes).
    fn remove_stale(&mut self) -> Result<(), DataplaneError> {
        let want = self.translator.desired();
        let m = &mut self.maps;
        let stale: Vec<Addr> = m
            .endpoints
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.endpoints.contains(&key_addr(*k)))
            .collect();
        for k in stale {
            ignore_missing(m.endpoints.remove(&k)).map_err(|e| err("stale endpoint", e))?;
        }
        let stale: Vec<Addr> = m
            .identities
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.identities.contains(&key_addr(*k)))
            .collect();
        for k in stale {
            ignore_missing(m.identities.remove(&k)).map_err(|e| err("stale identity", e))?;
        }
        let stale: Vec<Key<Addr>> = m
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !key_prefix(k.prefix_len(), k.data()).is_some_and(|n| want.cidrs.contains(&n))
            })
            .collect();
        for k in stale {
            ignore_missing(m.cidrs.remove(&k)).map_err(|e| err("stale cidr", e))?;
        }
        let stale: Vec<Key<PolicyKeyData>> = m
            .policy
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.policy.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            ignore_missing(m.policy.remove(&k)).map_err(|e| err("stale policy entry", e))?;
        }
        let bound: HashSet<u32> = self.attachments.values().map(|a| a.ifindex).collect();
        let stale: Vec<u32> =
            m.ifaces.keys().filter_map(Result::ok).filter(|k| !bound.contains(k)).collect();
        for k in stale {
            ignore_missing(m.ifaces.remove(&k)).map_err(|e| err("stale interface", e))?;
        }
        // Links of interfaces no endpoint uses any more.
        let keep: HashSet<String> =
            self.attachments.values().filter_map(|a| a.ifname.clone()).collect();
        if let Ok(dir) = std::fs::read_dir(self.config.pin_root.join("links")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let ifname = name.rsplit_once('-').map(|(i, _)| i.to_string()).unwrap_or_default();
                if !keep.iter().any(|k| k.replace('.', "_") == ifname) {
                    if let Ok(pinned) = PinnedLink::from_pin(entry.path()) {
                        let _ = pinned.unpin();
                    } else {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(())
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The layout is followed only for Azure NPM's counts of its sets.
    fn wants_layout(&self) -> bool {
        true
    }

    fn renders_tiers(&self) -> bool {
        true
    }

    /// Both families, by one set of maps (see `npm_common::Addr`).
    fn enforces_ipv6(&self) -> bool {
        true
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError> {
        self.azure_sets.lock().unwrap_or_else(|p| p.into_inner()).apply(&diff.layout);
        let ops = self.translator.translate(diff);
        let applied = Applied {
            rules_added: ops.iter().any(|op| matches!(op, MapOp::PolicyAdd { .. })),
            sets_added: ops
                .iter()
                .any(|op| matches!(op, MapOp::IdentitySet { .. } | MapOp::CidrSet { .. })),
        };
        self.run_ops(ops)?;
        Ok(applied)
    }

    /// Attachments whose interface was not there yet (or was replaced); every
    /// [`CONNTRACK_SWEEP`], dead connection-tracking entries.
    fn tick(&mut self) -> Result<(), DataplaneError> {
        if self.last_sweep.elapsed() >= CONNTRACK_SWEEP {
            self.last_sweep = Instant::now();
            match self.sweep_conntrack() {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "swept dead connection-tracking entries"),
                Err(e) => tracing::warn!(error = %e, "sweeping connection tracking"),
            }
        }
        let n = self.refresh_attachments()?;
        if n > 0 {
            tracing::debug!(pending = n, "retried pending attachments");
        }
        Ok(())
    }

    fn observer(&self) -> Option<Box<dyn Observer>> {
        Some(Box::new(EbpfObserver::new(&self.config.pin_root, self.azure_sets.clone())))
    }

    fn drop_feed(&mut self) -> Option<Box<dyn crate::dataplane::drops::DropFeed>> {
        let ring = self.events.take()?;
        Some(Box::new(RingFeed::new(ring)))
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        // Start from an empty encoding and write the whole plan over whatever is pinned:
        // entries first, then each endpoint's final isolation, then attachments, and only
        // then the removal of what is stale. An endpoint that was isolated stays isolated
        // throughout.
        *self.azure_sets.lock().unwrap_or_else(|p| p.into_inner()) =
            AzureSets::from_layout(&plan.layout);
        self.translator = MapTranslator::new();
        let ops = self.translator.translate(&plan.entries_diff());
        let (endpoint_sets, rest): (Vec<MapOp>, Vec<MapOp>) =
            ops.into_iter().partition(|op| matches!(op, MapOp::EndpointSet { .. }));
        let mut last: HashMap<IpAddr, MapOp> = HashMap::new();
        for op in endpoint_sets {
            if let MapOp::EndpointSet { ip, .. } = op {
                last.insert(ip, op);
            }
        }
        let (attaches, rest): (Vec<MapOp>, Vec<MapOp>) =
            rest.into_iter().partition(|op| matches!(op, MapOp::Attach { .. }));
        // Interfaces are found first, so that endpoint values are written with theirs.
        let previous = std::mem::take(&mut self.attachments);
        let routes = if self.config.attach { iface::pod_routes() } else { HashMap::new() };
        for op in &attaches {
            if let MapOp::Attach { ip, pod } = op {
                let ifindex = match self.config.attach {
                    true => routes.get(ip).and_then(|name| iface::index(name)).unwrap_or(0),
                    false => previous.get(ip).map_or(0, |a| a.ifindex),
                };
                self.attachments.insert(
                    *ip,
                    Attachment { pod: pod.clone(), ifname: None, ifindex, warned: false },
                );
            }
        }
        self.write(&rest)?;
        self.write(&last.into_values().collect::<Vec<_>>())?;
        for op in attaches {
            if let MapOp::Attach { ip, pod } = op {
                self.attach(ip, pod)?;
            }
        }
        self.remove_stale()
    }
}

/// A pinned map's definition, as the kernel reports it or as the object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapShape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// Unpins every map under `maps_dir` whose definition differs from the one in [`OBJECT`], so
/// that the loader creates it anew instead of handing the new programs a map of another
/// layout (the verifier would refuse them, or worse, they would misread it). Unpinning does
/// not destroy the old map: the programs still attached keep using it until replaced.
fn replace_incompatible_pins(maps_dir: &Path) -> Result<(), DataplaneError> {
    let object = aya_obj::Object::parse(OBJECT)
        .map_err(|e| err("reading the programs' map definitions", e))?;
    for (name, def) in &object.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let want = MapShape {
            map_type: def.map_type(),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
        };
        let found = aya::maps::MapInfo::from_pin(&path).map(|info| MapShape {
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        });
        match found {
            Ok(found) if found == want => {}
            found => {
                tracing::warn!(map = %name, pinned = ?found.ok(), expected = ?want, "pinned map has another definition (an upgrade changed it): creating it anew");
                std::fs::remove_file(&path)
                    .map_err(|e| err(format!("unpinning {}", path.display()), e))?;
            }
        }
    }
    Ok(())
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// `CLOCK_BOOTTIME` in ns: the clock the programs stamp connection-tracking entries with
/// (`bpf_ktime_get_boot_ns`).
pub fn boot_time_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs() -> Result<(), DataplaneError> {
    let path = std::ffi::CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let _ = std::fs::create_dir_all("/sys/fs/bpf");
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(DataplaneError::Unsupported {
            dataplane: NAME,
            reason: format!("mounting bpffs at /sys/fs/bpf: {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EbpfCleanup {
    pub pin_root: PathBuf,
    /// Pinned links removed (each detaching its program from an interface).
    pub links: usize,
    /// Pinned maps removed.
    pub maps: usize,
    /// Whether the pin root existed.
    pub existed: bool,
}

/// Removes the dataplane's pin root: removing a link's pin detaches its program, removing a
/// map's pin frees the map once no program uses it. Refuses a pin root that is not on a bpf
/// filesystem.
pub fn cleanup(pin_root: &Path) -> Result<EbpfCleanup, DataplaneError> {
    let mut report = EbpfCleanup { pin_root: pin_root.to_path_buf(), ..EbpfCleanup::default() };
    if !pin_root.exists() {
        return Ok(report);
    }
    report.existed = true;
    let c = std::ffi::CString::new(pin_root.as_os_str().as_encoded_bytes())
        .map_err(|e| err("pin root path", e))?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(err(format!("statfs {}", pin_root.display()), std::io::Error::last_os_error()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(err(
            "cleanup",
            format!("{} is not on a bpf filesystem; refusing to remove it", pin_root.display()),
        ));
    }
    let count = |sub: &str| std::fs::read_dir(pin_root.join(sub)).map(|d| d.count()).unwrap_or(0);
    report.links = count("links");
    report.maps = count("maps");
    // Links first, so programs leave the interfaces before their maps go.
    if let Ok(dir) = std::fs::read_dir(pin_root.join("links")) {
        for entry in dir.flatten() {
            std::fs::remove_file(entry.path())
                .map_err(|e| err(format!("removing {}", entry.path().display()), e))?;
        }
    }
    std::fs::remove_dir_all(pin_root)
        .map_err(|e| err(format!("removing {}", pin_root.display()), e))?;
    Ok(report)
}
