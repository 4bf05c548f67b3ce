//! The BPF maps modelled on the host: applies [`MapOp`]s to plain collections and answers
//! `npm_common::decide`'s lookups the way the kernel does (longest-prefix match included),
//! connection tracking and fragments included. Tests hold the encoding to the plan through
//! it, and the fuzzer holds the kernel's verdicts to it; `explain` tools can use it to say
//! why a packet would be dropped.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use npm_common::conntrack::{FragKey, FragValue};
use npm_common::{
    Addr, CtKey, CtValue, EndpointInfo, IfaceInfo, Maps, PolicyKeyData, PolicyValue,
    policy_key_prefix,
};

use super::translate::MapOp;
use super::{addr_key, prefix_key};

#[derive(Clone, Debug, Default)]
pub struct MapEmulator {
    pub endpoints: HashMap<Addr, EndpointInfo>,
    pub identities: HashMap<Addr, u32>,
    pub cidrs: BTreeMap<IpNet, u32>,
    /// The policy trie: (prefix length, key with the bits past it cleared) -> value.
    pub policy: HashMap<(u32, PolicyKeyData), PolicyValue>,
    pub node_ips: HashSet<Addr>,
    /// Interfaces of local pods (the kernel dataplane writes them when it attaches; tests
    /// write them with [`MapEmulator::bind_interface`]).
    pub ifaces: HashMap<u32, IfaceInfo>,
    pub ct: RefCell<HashMap<CtKey, CtValue>>,
    pub frags: RefCell<HashMap<FragKey, FragValue>>,
    /// Endpoint addresses with programs attached.
    pub attached: HashSet<IpAddr>,
    /// The interface the model gives each pod (by its addresses), as attaching finds it.
    pub pod_ifindex: HashMap<IpAddr, u32>,
}

impl MapEmulator {
    /// The interface index the model gives the veth of the pod at `ip` when it attaches: a
    /// pod's addresses share one interface when the test says so ([`Self::same_pod`]), else
    /// each address gets its own (the kernel's are the system's; any distinct numbers serve
    /// the model).
    pub fn ifindex_of(&self, ip: IpAddr) -> u32 {
        if let Some(i) = self.pod_ifindex.get(&ip) {
            return *i;
        }
        let h = addr_key(ip)
            .iter()
            .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
        h | 1
    }

    /// Says that the addresses are one pod's (its two families): attaching either binds the
    /// same interface.
    pub fn same_pod(&mut self, addrs: &[IpAddr]) {
        if let Some(first) = addrs.first() {
            let i = self.ifindex_of(*first);
            for a in addrs {
                self.pod_ifindex.insert(*a, i);
            }
        }
    }

    /// Says that `ifindex` is the interface of the pod at `ip`, as attaching does (a pod's
    /// addresses of both families are bound to its one interface).
    pub fn bind_interface(&mut self, ip: IpAddr, ifindex: u32) {
        let info = self.ifaces.get(&ifindex).copied().unwrap_or_default();
        self.ifaces.insert(ifindex, info.with(addr_key(ip)));
        if let Some(ep) = self.endpoints.get_mut(&addr_key(ip)) {
            ep.ifindex = ifindex;
        }
    }

    /// Undoes [`Self::bind_interface`] for one address.
    fn unbind_interface(&mut self, ip: IpAddr, ifindex: u32) {
        if let Some(info) = self.ifaces.get(&ifindex) {
            let rest = info.without(addr_key(ip));
            if rest.families == 0 {
                self.ifaces.remove(&ifindex);
            } else {
                self.ifaces.insert(ifindex, rest);
            }
        }
    }

    pub fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            match op {
                MapOp::Attach { ip, .. } => {
                    self.attached.insert(*ip);
                    self.bind_interface(*ip, self.ifindex_of(*ip));
                }
                MapOp::Detach { ip } => {
                    self.attached.remove(ip);
                    self.unbind_interface(*ip, self.ifindex_of(*ip));
                }
                MapOp::EndpointSet { ip, info } => {
                    // The interface is the kernel side's to know: kept across rewrites.
                    let ifindex = self.endpoints.get(&addr_key(*ip)).map_or(0, |e| e.ifindex);
                    self.endpoints.insert(addr_key(*ip), EndpointInfo { ifindex, ..*info });
                }
                MapOp::EndpointDel { ip } => {
                    self.endpoints.remove(&addr_key(*ip));
                }
                MapOp::IdentitySet { ip, id } => {
                    self.identities.insert(addr_key(*ip), *id);
                }
                MapOp::IdentityDel { ip } => {
                    self.identities.remove(&addr_key(*ip));
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
                    self.node_ips.insert(addr_key(*ip));
                }
                MapOp::NodeIpDel { ip } => {
                    self.node_ips.remove(&addr_key(*ip));
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
        src: IpAddr,
        dst: IpAddr,
        protocol: u8,
        dport: u16,
    ) -> Option<npm_common::Reason> {
        use npm_common::packet::{FragmentKind, IPPROTO_TCP, Kind, Parsed, TCP_SYN};
        use npm_common::{DIR_EGRESS, Flow, Hook, Packet, decide};
        let endpoint = if dir == DIR_EGRESS { src } else { dst };
        let ifindex = self.endpoints.get(&addr_key(endpoint)).map(|e| e.ifindex)?;
        if ifindex == 0 || !self.attached.contains(&endpoint) {
            return None;
        }
        let ingress_ifindex = match self.endpoints.get(&addr_key(src)) {
            Some(e) if e.ifindex != 0 => e.ifindex,
            // (Any interface that is no pod's: the uplink.)
            _ => u32::MAX,
        };
        let flow = Flow { src: addr_key(src), dst: addr_key(dst), protocol, sport: 40000, dport };
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
        Some(decide(self, &hook, &Parsed::ip(packet)).reason)
    }
}

impl Maps for MapEmulator {
    fn iface(&self, ifindex: u32) -> Option<&IfaceInfo> {
        self.ifaces.get(&ifindex)
    }

    fn endpoint(&self, ip: Addr) -> Option<EndpointInfo> {
        self.endpoints.get(&ip).copied()
    }

    fn is_node_ip(&self, ip: Addr) -> bool {
        self.node_ips.contains(&ip)
    }

    fn identity(&self, ip: Addr) -> Option<u32> {
        self.identities.get(&ip).copied()
    }

    fn prefix_id(&self, ip: Addr) -> Option<u32> {
        // As the kernel's trie holds them: IPv4 prefixes inside `::ffff:0:0/96`.
        let (v6, v4) = (std::net::Ipv6Addr::from(ip), npm_common::v4_of(&ip));
        self.cidrs
            .iter()
            .filter(|(n, _)| match n {
                IpNet::V4(n) => v4.is_some_and(|a| n.contains(&std::net::Ipv4Addr::from(a))),
                IpNet::V6(n) => n.contains(&v6),
            })
            .max_by_key(|(n, _)| prefix_key(**n).0)
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
