//! The lab's network: a cluster of network namespaces on one machine.
//!
//! # Layout
//! ```text
//!                    fabric namespace <prefix>-f
//!                 ┌────────── br0 (bridge) ──────────┐
//!                 n0                                 n1            (veth, fabric side)
//!                 │                                  │
//!   node <prefix>-n0: eth0 172.31.0.10/24    node <prefix>-n1: eth0 172.31.0.11/24
//!   ip_forward=1                             ip_forward=1
//!   10.240.0.10/32 dev veth0                 10.240.0.11/32 dev veth1
//!   10.240.0.11/32 via 172.31.0.11           10.240.0.10/32 via 172.31.0.10
//!        │ veth0 (ee:ee:ee:ee:ee:ee)                │ veth1
//!   pod <prefix>-p0: eth0 10.240.0.10/32     pod <prefix>-p1: eth0 10.240.0.11/32
//!   default via 169.254.1.1 dev eth0         default via 169.254.1.1 dev eth0
//! ```
//! - **Nodes** are namespaces `<prefix>-n<i>` with IP forwarding on, joined like hosts on one
//!   L2 segment: each has an uplink `eth0` whose peer is a port of the bridge `br0` in the fabric
//!   namespace `<prefix>-f`. Node `i` has the uplink address `<fabric>.(10 + i)/24`
//!   (172.31.0.0/24 by default); these addresses exist only inside the lab's namespaces.
//! - **Pods** are namespaces `<prefix>-p<k>` joined to their node by a veth pair: the pod side is
//!   `eth0` with the pod address as a /32 and a default route via the link-local gateway
//!   169.254.1.1 (onlink), the host side lives in the node namespace as `veth<k>` with the /32
//!   route `<pod IP>/32 dev veth<k>` (Azure CNI transparent mode, Calico). The gateway is
//!   resolved by a permanent neighbour entry in the pod to the host side's fixed MAC
//!   `ee:ee:ee:ee:ee:ee` (Calico's address), which needs no proxy ARP and no route to the
//!   gateway on the node. Every other node routes the pod address via the owning node's
//!   uplink address, so traffic between pods on different nodes crosses the fabric and both
//!   nodes' forwarding paths, and traffic between pods on one node is routed by that node.
//!   A dataplane running in a node namespace therefore sees every packet of its local pods on
//!   the host side of their veths (tc ingress = the pod's egress, tc egress = its ingress), and
//!   finds a pod's interface from its /32 route ([`LabPod::host_ifname`] and
//!   [`LabPod::host_ifindex`] say it directly).
//! - In every lab namespace reverse-path filtering is off and IPv6 is disabled (no router
//!   solicitations or DAD noise on the veths) unless the lab has IPv6 pods (below); these are
//!   sysctls of the lab's namespaces only.
//!
//! # IPv6 (dual stack and single-stack IPv6)
//! A pod may have an IPv6 address beside its IPv4 one, or only an IPv6 address. IPv6 stays
//! disabled everywhere until the first pod with an IPv6 address is added (so an IPv4-only lab
//! is exactly as above); then ([`Lab::has_ipv6`]) every node namespace gets IPv6 on, with
//! forwarding, and its uplink the fabric address `<fabric6>::(10 + i)/64`
//! (`fd00:172:31::/64` by default, [`LabNode::address6`]); the fabric bridge stops snooping
//! multicast, so neighbour solicitations reach every node. IPv6 mirrors IPv4:
//! ```text
//!   node n0: eth0 fd00:172:31::a/64           node n1: eth0 fd00:172:31::b/64
//!   fd00:10:240::10/128 dev veth0             fd00:10:240::10/128 via fd00:172:31::a dev eth0
//!   pod p0:  eth0 fd00:10:240::10/128
//!            default via fe80::1 dev eth0, fe80::1 lladdr ee:ee:ee:ee:ee:ee permanent
//! ```
//! The pod's gateway `fe80::1` ([`POD_GATEWAY_V6`]) is a permanent neighbour entry to the
//! host side's MAC, as 169.254.1.1 is: the node holds no such address, it forwards whatever
//! arrives on the veth, and resolves the pod's address on the veth by neighbour discovery
//! (the pod answers for its /128). Before IPv6 is turned on in a namespace, duplicate address
//! detection, router advertisements, autoconfiguration and router solicitations are turned
//! off there (every address is usable at once; nothing but the lab's static routes). A pod
//! namespace has IPv6 only when the pod has an IPv6 address. The dataplanes find a pod's
//! interface by its /128 route (`/proc/net/ipv6_route`) as by its /32.
//!
//! # Servers and probes
//! Each pod serves its declared ports from this process, and [`Lab::probe_matrix`] probes every
//! (client, server) pair in parallel, in about one timeout whatever the matrix's size; see
//! [`super::probe`].
//!
//! # Cleanup
//! A [`Lab`] deletes its namespaces when it is dropped (also while unwinding from a panic) or by
//! [`Lab::shutdown`], after stopping its servers (their sockets would keep a namespace alive).
//! Deleting a namespace removes the interfaces in it and their peers. Every namespace is
//! recorded in the process-wide registry ([`super::registry`]) before it is created:
//! [`Lab::new`] installs (once per process) the registry's SIGINT/SIGTERM/SIGHUP handler, which
//! deletes every registered namespace and exits with status 128 + signal, and calls
//! [`cleanup_stale`](super::registry::cleanup_stale), which deletes lab namespaces whose owning
//! process no longer exists, never those of a live process. Every `ip` command runs with
//! `-n <lab namespace>` except `netns add`/`netns delete`, so nothing touches the root
//! namespace's interfaces, routes or sysctls.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::iproute::{enable_ipv6, ip_batch, namespace_sysctls, write_sysctls};
use super::probe::{self, PodServer, ProbePod};
use super::registry::{
    self, cleanup_stale, create_namespaces, delete_namespaces, install_signal_cleanup, netns_path,
};
use crate::model::{IpFamily, Protocol};
use crate::netns;

/// The pods' default gateway (link-local, answered by the node's side of the veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 default gateway (link-local; a permanent neighbour entry to the host side).
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The MAC address of every host-side pod veth.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The node's interface to the fabric, and the pod's interface to its node.
pub const UPLINK_IFNAME: &str = "eth0";
pub const POD_IFNAME: &str = "eth0";

/// How to build a [`Lab`].
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Number of node namespaces (at least 1).
    pub nodes: usize,
    /// The /24 of the node uplinks (its last octet is ignored); node `i` is `.(10 + i)`.
    pub fabric_network: Ipv4Addr,
    /// The /64 of the node uplinks' IPv6 addresses (its last 64 bits are ignored); node `i`
    /// is `::(10 + i)`. Configured once the lab has a pod with an IPv6 address.
    pub fabric_network6: Ipv6Addr,
    /// Install the process-wide SIGINT/SIGTERM/SIGHUP handler that removes lab namespaces.
    pub handle_signals: bool,
    /// Remove namespaces left by lab processes that no longer exist before building.
    pub cleanup_stale: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            fabric_network: Ipv4Addr::new(172, 31, 0, 0),
            fabric_network6: Ipv6Addr::new(0xfd00, 172, 31, 0, 0, 0, 0, 0),
            handle_signals: true,
            cleanup_stale: true,
        }
    }
}

/// A node namespace.
#[derive(Clone, Debug)]
pub struct LabNode {
    pub index: usize,
    /// The namespace's name, as `ip netns list` shows it.
    pub netns: String,
    /// `/run/netns/<name>`, for `setns`, `nsenter --net=` or `ip -n`.
    pub netns_path: PathBuf,
    /// The node's address on the fabric (its "node IP").
    pub address: Ipv4Addr,
    /// Its IPv6 address on the fabric, configured once the lab has IPv6 ([`Lab::has_ipv6`]).
    pub address6: Ipv6Addr,
    /// The node's interface to the fabric.
    pub uplink: String,
}

/// A pod namespace and its attachment to a node.
#[derive(Clone, Debug)]
pub struct LabPod {
    /// The caller's name for the pod (e.g. `x/a`).
    pub key: String,
    /// Its IPv4 address (none: a single-stack IPv6 pod).
    pub ip: Option<Ipv4Addr>,
    /// Its IPv6 address (dual stack, or a single-stack IPv6 pod).
    pub ipv6: Option<Ipv6Addr>,
    /// Index of the node it is attached to.
    pub node: usize,
    pub netns: String,
    pub netns_path: PathBuf,
    /// The host side of the pod's veth, in the node's namespace.
    pub host_ifname: String,
    /// Its interface index in the node's namespace.
    pub host_ifindex: u32,
    /// The ports served in the pod (SCTP ports are left out when the kernel has no SCTP).
    pub ports: Vec<(Protocol, u16)>,
}

impl LabPod {
    /// Its address of one family.
    pub fn address(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => self.ip.map(IpAddr::V4),
            IpFamily::V6 => self.ipv6.map(IpAddr::V6),
        }
    }

    /// Its addresses (IPv4 first).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        [IpFamily::V4, IpFamily::V6].into_iter().filter_map(|f| self.address(f))
    }

    /// The pod as the probes see it, addressed in `family`.
    fn probe_pod(&self, family: IpFamily) -> Result<ProbePod<'_>> {
        let ip = self
            .address(family)
            .ok_or_else(|| anyhow!("pod {} has no {} address", self.key, family_name(family)))?;
        Ok(ProbePod { key: &self.key, ip, netns_path: &self.netns_path })
    }
}

fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// A cluster of network namespaces; see the module documentation.
pub struct Lab {
    prefix: String,
    fabric: String,
    nodes: Vec<LabNode>,
    pods: BTreeMap<String, PodEntry>,
    next_pod: u32,
    /// Every namespace this lab created and has not deleted yet.
    namespaces: Vec<String>,
    /// IPv6 is on in the nodes (since the first pod with an IPv6 address).
    ipv6: bool,
}

struct PodEntry {
    info: LabPod,
    server: Option<PodServer>,
}

impl Lab {
    /// Builds the nodes and the fabric (no pods yet).
    pub fn new(config: LabConfig) -> Result<Lab> {
        check_environment()?;
        ensure!(
            (1..=200).contains(&config.nodes),
            "a lab has 1 to 200 nodes, not {}",
            config.nodes
        );
        if config.handle_signals {
            install_signal_cleanup()?;
        }
        if config.cleanup_stale {
            match cleanup_stale() {
                Ok(removed) if !removed.is_empty() => {
                    eprintln!("npm lab: removed stale namespaces {removed:?}")
                }
                Ok(_) => {}
                Err(e) => eprintln!("npm lab: could not remove stale namespaces: {e:#}"),
            }
        }
        probe::raise_fd_limit();
        let prefix = registry::new_prefix();
        let [a, b, c, _] = config.fabric_network.octets();
        let fabric6 = config.fabric_network6.segments();
        let nodes = (0..config.nodes)
            .map(|i| {
                let netns = format!("{prefix}-n{i}");
                LabNode {
                    index: i,
                    netns_path: netns_path(&netns),
                    netns,
                    address: Ipv4Addr::new(a, b, c, 10 + i as u8),
                    address6: Ipv6Addr::new(
                        fabric6[0],
                        fabric6[1],
                        fabric6[2],
                        fabric6[3],
                        0,
                        0,
                        0,
                        10 + i as u16,
                    ),
                    uplink: UPLINK_IFNAME.to_string(),
                }
            })
            .collect();
        let mut lab = Lab {
            fabric: format!("{prefix}-f"),
            prefix,
            nodes,
            pods: BTreeMap::new(),
            next_pod: 0,
            namespaces: Vec::new(),
            ipv6: false,
        };
        // On error, dropping `lab` removes whatever was created.
        lab.build().with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let mut names = vec![self.fabric.clone()];
        names.extend(self.nodes.iter().map(|n| n.netns.clone()));
        self.namespaces.extend(names.iter().cloned());
        create_namespaces(&names)?;
        // Sysctls first: interfaces created afterwards take the namespace's defaults.
        write_sysctls(&netns_path(&self.fabric), &namespace_sysctls())?;
        for node in &self.nodes {
            let mut settings = namespace_sysctls();
            settings.push(("ipv4/ip_forward", "1"));
            write_sysctls(&node.netns_path, &settings)?;
        }
        let mut fabric = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge".into(),
            "link set br0 up".into(),
        ];
        for node in &self.nodes {
            let port = format!("n{}", node.index);
            fabric.push(format!(
                "link add {port} type veth peer name {UPLINK_IFNAME} netns {}",
                node.netns
            ));
            fabric.push(format!("link set {port} master br0"));
            fabric.push(format!("link set {port} up"));
        }
        ip_batch(Some(&self.fabric), false, fabric)?;
        for node in &self.nodes {
            ip_batch(
                Some(&node.netns),
                false,
                [
                    "link set lo up".to_string(),
                    format!("addr add {}/24 dev {UPLINK_IFNAME}", node.address),
                    format!("link set {UPLINK_IFNAME} up"),
                ],
            )?;
        }
        Ok(())
    }

    /// Turns IPv6 on in the nodes (once): quiet IPv6 sysctls, forwarding, the uplinks' fabric
    /// IPv6 addresses; the bridge stops snooping multicast (neighbour solicitations are
    /// multicast, and the fabric namespace itself keeps IPv6 off, sending no MLD queries).
    fn ensure_ipv6(&mut self) -> Result<()> {
        if self.ipv6 {
            return Ok(());
        }
        ip_batch(
            Some(&self.fabric),
            false,
            ["link set br0 type bridge mcast_snooping 0".to_string()],
        )?;
        for node in &self.nodes {
            enable_ipv6(&node.netns_path, true)?;
            ip_batch(
                Some(&node.netns),
                false,
                [format!("addr add {}/64 dev {UPLINK_IFNAME} nodad", node.address6)],
            )?;
        }
        self.ipv6 = true;
        Ok(())
    }

    /// Whether IPv6 is on in the lab (it has had a pod with an IPv6 address).
    pub fn has_ipv6(&self) -> bool {
        self.ipv6
    }

    /// The unique prefix of this lab's namespace names (`npl-<pid>-<seq>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> Option<&LabNode> {
        self.nodes.get(index)
    }

    /// A command that runs in node `index`'s network namespace (see [`netns::command`]).
    pub fn node_command(
        &self,
        index: usize,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let node = self.nodes.get(index).ok_or_else(|| anyhow!("node {index} does not exist"))?;
        netns::command(&node.netns_path, program)
            .with_context(|| format!("opening network namespace {}", node.netns_path.display()))
    }

    /// The fabric namespace's name.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric
    }

    /// Every namespace of the lab that currently exists (fabric, nodes, pods).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn pod(&self, key: &str) -> Option<&LabPod> {
        self.pods.get(key).map(|e| &e.info)
    }

    /// The host side of a pod's veth in its node's namespace: (node index, name, ifindex).
    pub fn host_interface(&self, key: &str) -> Option<(usize, &str, u32)> {
        self.pod(key).map(|p| (p.node, p.host_ifname.as_str(), p.host_ifindex))
    }

    /// The pods, in the order of their keys.
    pub fn pods(&self) -> impl Iterator<Item = &LabPod> {
        self.pods.values().map(|e| &e.info)
    }

    /// Creates a pod namespace attached to node `node` with address `ip`, serving `ports`
    /// (TCP: accept and close; UDP: echo). Returns once the pod is reachable and serving.
    pub fn add_pod(
        &mut self,
        key: &str,
        ip: Ipv4Addr,
        node: usize,
        ports: &[(Protocol, u16)],
    ) -> Result<&LabPod> {
        self.add_pod_addrs(key, Some(ip), None, node, ports)
    }

    /// Creates a pod with an IPv4 address, an IPv6 address or both (dual stack), serving
    /// `ports` on each (see [`Lab::add_pod`]). The first pod with an IPv6 address turns IPv6
    /// on in the lab (see the module documentation).
    pub fn add_pod_addrs(
        &mut self,
        key: &str,
        ip: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
        node: usize,
        ports: &[(Protocol, u16)],
    ) -> Result<&LabPod> {
        ensure!(!key.is_empty(), "a pod needs a key");
        ensure!(ip.is_some() || ipv6.is_some(), "pod {key} needs an address");
        ensure!(!self.pods.contains_key(key), "pod {key} already exists in the lab");
        ensure!(
            node < self.nodes.len(),
            "pod {key}: node {node} does not exist (the lab has {})",
            self.nodes.len()
        );
        let wanted: Vec<IpAddr> =
            ip.map(IpAddr::V4).into_iter().chain(ipv6.map(IpAddr::V6)).collect();
        for addr in &wanted {
            if let Some(other) = self.pods.values().find(|e| e.info.addresses().any(|a| a == *addr))
            {
                bail!("pod {key}: address {addr} is already used by pod {}", other.info.key);
            }
        }
        if let Some(ip) = ip {
            let fabric = self.nodes[0].address.octets();
            ensure!(
                !(ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.is_multicast())
                    && ip.octets()[..3] != fabric[..3],
                "pod {key}: {ip} cannot be a pod address in the lab"
            );
        }
        if let Some(ip) = ipv6 {
            let fabric = self.nodes[0].address6.segments();
            let segments = ip.segments();
            ensure!(
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_unicast_link_local()
                    || ip.to_ipv4_mapped().is_some())
                    && segments[..4] != fabric[..4],
                "pod {key}: {ip} cannot be a pod address in the lab"
            );
        }
        let mut served: Vec<(Protocol, u16)> = ports
            .iter()
            .copied()
            .filter(|(p, _)| *p != Protocol::Sctp || sctp_supported())
            .collect();
        served.sort();
        served.dedup();
        let id = self.next_pod;
        self.next_pod += 1;
        let netns = format!("{}-p{id}", self.prefix);
        let info = LabPod {
            key: key.to_string(),
            ip,
            ipv6,
            node,
            netns_path: netns_path(&netns),
            netns,
            host_ifname: format!("veth{id}"),
            host_ifindex: 0,
            ports: served,
        };
        if ipv6.is_some() {
            self.ensure_ipv6().context("turning IPv6 on in the lab")?;
        }
        self.pods.insert(key.to_string(), PodEntry { info, server: None });
        if let Err(e) = self.attach_pod(key) {
            if let Some(entry) = self.pods.remove(key) {
                let _ = self.detach_pod(entry);
            }
            let addrs: Vec<String> = wanted.iter().map(IpAddr::to_string).collect();
            return Err(
                e.context(format!("adding pod {key} ({}) on node {node}", addrs.join(", ")))
            );
        }
        Ok(&self.pods[key].info)
    }

    fn attach_pod(&mut self, key: &str) -> Result<()> {
        let pod = self.pods[key].info.clone();
        let owner = &self.nodes[pod.node];
        self.namespaces.push(pod.netns.clone());
        create_namespaces(std::slice::from_ref(&pod.netns))?;
        // Sysctls before the veth exists: its pod side takes the namespace's defaults.
        write_sysctls(&pod.netns_path, &namespace_sysctls())?;
        if pod.ipv6.is_some() {
            enable_ipv6(&pod.netns_path, false)?;
        }
        let host = &pod.host_ifname;
        let mut node_side = vec![
            format!(
                "link add {host} address {HOST_VETH_MAC} type veth peer name {POD_IFNAME} netns {}",
                pod.netns
            ),
            format!("link set {host} up"),
        ];
        let mut pod_side = vec!["link set lo up".to_string(), format!("link set {POD_IFNAME} up")];
        if let Some(ip) = pod.ip {
            node_side.push(format!("route add {ip}/32 dev {host} scope link"));
            pod_side.extend([
                format!("addr add {ip}/32 dev {POD_IFNAME}"),
                format!("route add {POD_GATEWAY} dev {POD_IFNAME} scope link"),
                format!("route add default via {POD_GATEWAY} dev {POD_IFNAME}"),
                format!(
                    "neigh replace {POD_GATEWAY} lladdr {HOST_VETH_MAC} dev {POD_IFNAME} nud permanent"
                ),
            ]);
        }
        if let Some(ip) = pod.ipv6 {
            node_side.push(format!("route add {ip}/128 dev {host}"));
            pod_side.extend([
                format!("addr add {ip}/128 dev {POD_IFNAME} nodad"),
                format!(
                    "neigh replace {POD_GATEWAY_V6} lladdr {HOST_VETH_MAC} dev {POD_IFNAME} nud permanent"
                ),
                format!("route add ::/0 via {POD_GATEWAY_V6} dev {POD_IFNAME}"),
            ]);
        }
        ip_batch(Some(&owner.netns), false, node_side)?;
        ip_batch(Some(&pod.netns), false, pod_side)?;
        for other in self.nodes.iter().filter(|n| n.index != pod.node) {
            let mut routes = Vec::new();
            if let Some(ip) = pod.ip {
                routes.push(format!("route add {ip}/32 via {} dev {UPLINK_IFNAME}", owner.address));
            }
            if let Some(ip) = pod.ipv6 {
                routes
                    .push(format!("route add {ip}/128 via {} dev {UPLINK_IFNAME}", owner.address6));
            }
            ip_batch(Some(&other.netns), false, routes)?;
        }
        let name = CString::new(host.as_str())?;
        let ifindex =
            netns::run_in(&owner.netns_path, || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        ensure!(ifindex != 0, "{host} not found in {}", owner.netns);
        let server = PodServer::start(
            &pod.key,
            &pod.netns_path,
            &pod.addresses().collect::<Vec<_>>(),
            &pod.ports,
            &format!("lab-srv-{}", pod.host_ifname),
        )?;
        let entry = self.pods.get_mut(key).expect("inserted by add_pod");
        entry.info.host_ifindex = ifindex;
        entry.server = Some(server);
        Ok(())
    }

    /// Deletes a pod: stops its servers, removes its routes and its namespace.
    pub fn remove_pod(&mut self, key: &str) -> Result<()> {
        let entry = self.pods.remove(key).ok_or_else(|| anyhow!("pod {key} is not in the lab"))?;
        self.detach_pod(entry).with_context(|| format!("removing pod {key}"))
    }

    fn detach_pod(&mut self, mut entry: PodEntry) -> Result<()> {
        // The server's sockets hold references to the namespace.
        drop(entry.server.take());
        let pod = &entry.info;
        let mut errors = Vec::new();
        let owner = &self.nodes[pod.node];
        for other in self.nodes.iter().filter(|n| n.index != pod.node) {
            let mut routes = Vec::new();
            if let Some(ip) = pod.ip {
                routes.push(format!("route del {ip}/32 via {}", owner.address));
            }
            if let Some(ip) = pod.ipv6 {
                routes.push(format!("route del {ip}/128 via {}", owner.address6));
            }
            if let Err(e) = ip_batch(Some(&other.netns), true, routes) {
                errors.push(format!("{e:#}"));
            }
        }
        // Deleting the veth now (rather than when the namespace is finally freed) removes its
        // /32 and /128 routes at once, so the addresses can be reused right away.
        if let Err(e) =
            ip_batch(Some(&owner.netns), false, [format!("link del {}", pod.host_ifname)])
        {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = delete_namespaces(std::slice::from_ref(&pod.netns)) {
            errors.push(format!("{e:#}"));
        }
        self.namespaces.retain(|n| *n != pod.netns);
        ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }

    /// Probes every (client, server) pair of `pods` (keys) for one protocol and port, all in
    /// parallel, over IPv4: `result[i][j]` is whether `pods[i]` reached `pods[j]` within
    /// `timeout`.
    pub fn probe_matrix(
        &self,
        pods: &[&str],
        protocol: Protocol,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<Vec<bool>>> {
        self.probe_matrix_family(pods, IpFamily::V4, protocol, port, timeout)
    }

    /// [`Lab::probe_matrix`] over one family: from each client's address of that family to
    /// each server's (an error if a pod has none).
    pub fn probe_matrix_family(
        &self,
        pods: &[&str],
        family: IpFamily,
        protocol: Protocol,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<Vec<bool>>> {
        ensure!(
            protocol != Protocol::Sctp || sctp_supported(),
            "this kernel has no SCTP (module sctp not loaded)"
        );
        let entries = pods
            .iter()
            .map(|k| {
                self.pod(k)
                    .ok_or_else(|| anyhow!("pod {k} is not in the lab"))
                    .and_then(|p| p.probe_pod(family))
            })
            .collect::<Result<Vec<_>>>()?;
        probe::matrix(&entries, protocol, port, timeout)
    }

    /// Probes one pair over IPv6 (see [`Lab::probe_matrix_family`]).
    pub fn probe6(
        &self,
        from: &str,
        to: &str,
        protocol: Protocol,
        port: u16,
        timeout: Duration,
    ) -> Result<bool> {
        Ok(self.probe_matrix_family(&[from, to], IpFamily::V6, protocol, port, timeout)?[0][1])
    }

    /// Probes one pair (see [`Lab::probe_matrix`]).
    pub fn probe(
        &self,
        from: &str,
        to: &str,
        protocol: Protocol,
        port: u16,
        timeout: Duration,
    ) -> Result<bool> {
        Ok(self.probe_matrix(&[from, to], protocol, port, timeout)?[0][1])
    }

    /// Stops every server and deletes every namespace of the lab, reporting failures (dropping
    /// the lab does the same and prints them).
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        for entry in self.pods.values_mut() {
            drop(entry.server.take());
        }
        self.pods.clear();
        let names = std::mem::take(&mut self.namespaces);
        delete_namespaces(&names)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("npm lab: cleanup of {} failed: {e:#}", self.prefix);
        }
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("nodes", &self.nodes)
            .field("pods", &self.pods.values().map(|e| &e.info).collect::<Vec<_>>())
            .finish()
    }
}

/// Whether the lab can run here: root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`.
pub fn check_environment() -> Result<()> {
    ensure!(unsafe { libc::geteuid() } == 0, "the network-namespace lab needs root");
    let out = Command::new("ip").arg("-V").output().context("iproute2 (`ip`) is not installed")?;
    ensure!(out.status.success(), "`ip -V` failed");
    Ok(())
}

/// Whether SCTP sockets can be used without loading a kernel module.
pub fn sctp_supported() -> bool {
    Path::new("/sys/module/sctp").exists()
}
