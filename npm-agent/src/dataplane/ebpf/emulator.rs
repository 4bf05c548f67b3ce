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
use npm_common::{
    CtKey, CtValue, EndpointInfo, IfaceInfo, Maps, PolicyKeyData, PolicyValue, policy_key_prefix,
};

use super::translate::MapOp;

#[derive(Clone, Debug, Default)]
pub struct MapEmulator {
    pub endpoints: HashMap<[u8; 4], EndpointInfo>,
    pub identities: HashMap<[u8; 4], u32>,
    pub cidrs: BTreeMap<Ipv4Net, u32>,
    /// The policy trie: (prefix length, key with the bits past it cleared) -> value.
    pub policy: HashMap<(u32, PolicyKeyData), PolicyValue>,
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
                MapOp::PolicyAdd { prefix_len, key, value } => {
                    self.policy.insert((*prefix_len, policy_key_prefix(key, *prefix_len)), *value);
                }
                MapOp::PolicyDel { prefix_len, key } => {
                    self.policy.remove(&(*prefix_len, policy_key_prefix(key, *prefix_len)));
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

impl MapEmulator {
    /// What the programs decide for a new connection's first packet (a TCP SYN, or the
    /// first datagram) in direction `dir`, at the veth of the endpoint it leaves (egress)
    /// or enters (ingress); `None` when no program is attached there (nothing is decided).
    /// A packet from a local pod comes in through its veth, any other through the uplink.
    pub fn first_packet(
        &self,
        dir: u8,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        dport: u16,
    ) -> Option<npm_common::Reason> {
        use npm_common::packet::{FragmentKind, IPPROTO_TCP, Kind, Parsed, TCP_SYN};
        use npm_common::{DIR_EGRESS, Flow, Hook, Packet, decide};
        let endpoint = if dir == DIR_EGRESS { src } else { dst };
        let ifindex = self.endpoints.get(&endpoint.octets()).map(|e| e.ifindex)?;
        if ifindex == 0 || !self.attached.contains(&endpoint) {
            return None;
        }
        let ingress_ifindex = match self.endpoints.get(&src.octets()) {
            Some(e) if e.ifindex != 0 => e.ifindex,
            // (Any interface that is no pod's: the uplink.)
            _ => u32::MAX,
        };
        let flow = Flow { src: src.octets(), dst: dst.octets(), protocol, sport: 40000, dport };
        let kind = if protocol == IPPROTO_TCP { Kind::Tcp } else { Kind::Other };
        let packet = Packet {
            flow,
            kind,
            tcp_flags: TCP_SYN,
            fragment: FragmentKind::Whole,
            ..Packet::default()
        };
        self.ct.borrow_mut().clear();
        self.frags.borrow_mut().clear();
        let hook = Hook { dir, ifindex, ingress_ifindex, now: 0 };
        Some(decide(self, &hook, &Parsed::ipv4(packet)).reason)
    }
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

    fn policy_lookup(&self, prefix_len: u32, key: &PolicyKeyData) -> Option<PolicyValue> {
        // Longest-prefix match: the longest stored prefix of the key.
        (0..=prefix_len)
            .rev()
            .find_map(|len| self.policy.get(&(len, policy_key_prefix(key, len))).copied())
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
