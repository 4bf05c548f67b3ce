//! The BPF maps modelled on the host: applies [`MapOp`]s to plain collections and answers
//! `npm_common::decide`'s lookups the way the kernel does (longest-prefix match included),
//! connection tracking and fragments included. Tests hold the encoding to the plan through
//! it, and the fuzzer holds the kernel's verdicts to it; `explain` tools can use it to say
//! why a packet would be dropped.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use npm_common::conntrack::{FragKey, FragValue};
use npm_common::{CtKey, CtValue, EndpointInfo, IfaceInfo, Maps, PolicyKeyData};

use super::translate::MapOp;

#[derive(Clone, Debug, Default)]
pub struct MapEmulator {
    pub endpoints: HashMap<[u8; 4], EndpointInfo>,
    pub identities: HashMap<[u8; 4], u32>,
    pub cidrs: BTreeMap<Ipv4Net, u32>,
    pub policy: HashSet<(u32, PolicyKeyData)>,
    pub node_ips: HashSet<[u8; 4]>,
    /// Interfaces of local pods (the kernel dataplane writes them when it attaches; tests
    /// write them with [`MapEmulator::bind_interface`]).
    pub ifaces: HashMap<u32, IfaceInfo>,
    pub ct: RefCell<HashMap<CtKey, CtValue>>,
    pub frags: RefCell<HashMap<FragKey, FragValue>>,
    /// Endpoints with programs attached.
    pub attached: HashSet<Ipv4Addr>,
}

impl MapEmulator {
    /// The interface index the model gives the veth of the pod at `ip` when it attaches
    /// (the kernel's are the system's; any distinct numbers serve the model).
    pub fn ifindex_of(ip: Ipv4Addr) -> u32 {
        u32::from(ip)
    }

    /// Says that `ifindex` is the interface of the pod at `ip`, as attaching does.
    pub fn bind_interface(&mut self, ip: Ipv4Addr, ifindex: u32) {
        self.ifaces.insert(ifindex, IfaceInfo { ip4: ip.octets() });
        if let Some(ep) = self.endpoints.get_mut(&ip.octets()) {
            ep.ifindex = ifindex;
        }
    }

    pub fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            match op {
                MapOp::Attach { ip, .. } => {
                    self.attached.insert(*ip);
                    self.bind_interface(*ip, Self::ifindex_of(*ip));
                }
                MapOp::Detach { ip } => {
                    self.attached.remove(ip);
                    self.ifaces.remove(&Self::ifindex_of(*ip));
                }
                MapOp::EndpointSet { ip, info } => {
                    // The interface is the kernel side's to know: kept across rewrites.
                    let ifindex = self.endpoints.get(&ip.octets()).map_or(0, |e| e.ifindex);
                    self.endpoints.insert(ip.octets(), EndpointInfo { ifindex, ..*info });
                }
                MapOp::EndpointDel { ip } => {
                    self.endpoints.remove(&ip.octets());
                }
                MapOp::IdentitySet { ip, id } => {
                    self.identities.insert(ip.octets(), *id);
                }
                MapOp::IdentityDel { ip } => {
                    self.identities.remove(&ip.octets());
                }
                MapOp::CidrSet { net, id } => {
                    self.cidrs.insert(*net, *id);
                }
                MapOp::CidrDel { net } => {
                    self.cidrs.remove(net);
                }
                MapOp::PolicyAdd { prefix_len, key } => {
                    self.policy.insert((*prefix_len, mask(key, *prefix_len)));
                }
                MapOp::PolicyDel { prefix_len, key } => {
                    self.policy.remove(&(*prefix_len, mask(key, *prefix_len)));
                }
                MapOp::NodeIpAdd { ip } => {
                    self.node_ips.insert(ip.octets());
                }
                MapOp::NodeIpDel { ip } => {
                    self.node_ips.remove(&ip.octets());
                }
            }
        }
    }
}

/// Clears the bits past the prefix, as the kernel's trie ignores them.
fn mask(key: &PolicyKeyData, prefix_len: u32) -> PolicyKeyData {
    let mut k = *key;
    for (i, b) in k.iter_mut().enumerate() {
        let bit = i as u32 * 8;
        if bit >= prefix_len {
            *b = 0;
        } else if bit + 8 > prefix_len {
            *b &= 0xffu8 << (8 - (prefix_len - bit));
        }
    }
    k
}

impl Maps for MapEmulator {
    fn iface(&self, ifindex: u32) -> Option<IfaceInfo> {
        self.ifaces.get(&ifindex).copied()
    }

    fn endpoint(&self, ip: [u8; 4]) -> Option<EndpointInfo> {
        self.endpoints.get(&ip).copied()
    }

    fn is_node_ip(&self, ip: [u8; 4]) -> bool {
        self.node_ips.contains(&ip)
    }

    fn identity(&self, ip: [u8; 4]) -> Option<u32> {
        self.identities.get(&ip).copied()
    }

    fn prefix_id(&self, ip: [u8; 4]) -> Option<u32> {
        let addr = Ipv4Addr::from(ip);
        self.cidrs
            .iter()
            .filter(|(n, _)| n.contains(&addr))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, id)| *id)
    }

    fn policy_matches(&self, prefix_len: u32, key: &PolicyKeyData) -> bool {
        // Longest-prefix match: any stored prefix of the key matches (every entry allows).
        (0..=prefix_len).any(|len| self.policy.contains(&(len, mask(key, len))))
    }

    fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
        self.ct.borrow().get(key).copied()
    }

    fn ct_put(&self, key: &CtKey, value: &CtValue) {
        self.ct.borrow_mut().insert(*key, *value);
    }

    fn ct_delete(&self, key: &CtKey) {
        self.ct.borrow_mut().remove(key);
    }

    fn frag_get(&self, key: &FragKey) -> Option<FragValue> {
        self.frags.borrow().get(key).copied()
    }

    fn frag_put(&self, key: &FragKey, value: &FragValue) {
        self.frags.borrow_mut().insert(*key, *value);
    }
}
