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
//!   solicitations or DAD noise on the veths); these are sysctls of the lab's namespaces only.
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
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::iproute::{ip_batch, namespace_sysctls, write_sysctls};
use super::probe::{self, PodServer, ProbePod};
use super::registry::{
    self, cleanup_stale, create_namespaces, delete_namespaces, install_signal_cleanup, netns_path,
};
use crate::model::Protocol;
use crate::netns;

/// The pods' default gateway (link-local, answered by the node's side of the veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
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
    /// The node's interface to the fabric.
    pub uplink: String,
}

/// A pod namespace and its attachment to a node.
#[derive(Clone, Debug)]
pub struct LabPod {
    /// The caller's name for the pod (e.g. `x/a`).
    pub key: String,
    pub ip: Ipv4Addr,
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
    fn probe_pod(&self) -> ProbePod<'_> {
        ProbePod { key: &self.key, ip: self.ip, netns_path: &self.netns_path }
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
        let nodes = (0..config.nodes)
            .map(|i| {
                let netns = format!("{prefix}-n{i}");
                LabNode {
                    index: i,
                    netns_path: netns_path(&netns),
                    netns,
                    address: Ipv4Addr::new(a, b, c, 10 + i as u8),
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
        ensure!(!key.is_empty(), "a pod needs a key");
        ensure!(!self.pods.contains_key(key), "pod {key} already exists in the lab");
        ensure!(
            node < self.nodes.len(),
            "pod {key}: node {node} does not exist (the lab has {})",
            self.nodes.len()
        );
        if let Some(other) = self.pods.values().find(|e| e.info.ip == ip) {
            bail!("pod {key}: address {ip} is already used by pod {}", other.info.key);
        }
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
            node,
            netns_path: netns_path(&netns),
            netns,
            host_ifname: format!("veth{id}"),
            host_ifindex: 0,
            ports: served,
        };
        self.pods.insert(key.to_string(), PodEntry { info, server: None });
        if let Err(e) = self.attach_pod(key) {
            if let Some(entry) = self.pods.remove(key) {
                let _ = self.detach_pod(entry);
            }
            return Err(e.context(format!("adding pod {key} ({ip}) on node {node}")));
        }
        Ok(&self.pods[key].info)
    }

    fn attach_pod(&mut self, key: &str) -> Result<()> {
        let pod = self.pods[key].info.clone();
        let owner = &self.nodes[pod.node];
        self.namespaces.push(pod.netns.clone());
        create_namespaces(std::slice::from_ref(&pod.netns))?;
        write_sysctls(&pod.netns_path, &namespace_sysctls())?;
        let host = &pod.host_ifname;
        ip_batch(
            Some(&owner.netns),
            false,
            [
                format!(
                    "link add {host} address {HOST_VETH_MAC} type veth peer name {POD_IFNAME} netns {}",
                    pod.netns
                ),
                format!("link set {host} up"),
                format!("route add {}/32 dev {host} scope link", pod.ip),
            ],
        )?;
        ip_batch(
            Some(&pod.netns),
            false,
            [
                "link set lo up".to_string(),
                format!("addr add {}/32 dev {POD_IFNAME}", pod.ip),
                format!("link set {POD_IFNAME} up"),
                format!("route add {POD_GATEWAY} dev {POD_IFNAME} scope link"),
                format!("route add default via {POD_GATEWAY} dev {POD_IFNAME}"),
                format!(
                    "neigh replace {POD_GATEWAY} lladdr {HOST_VETH_MAC} dev {POD_IFNAME} nud permanent"
                ),
            ],
        )?;
        for other in self.nodes.iter().filter(|n| n.index != pod.node) {
            ip_batch(
                Some(&other.netns),
                false,
                [format!("route add {}/32 via {} dev {UPLINK_IFNAME}", pod.ip, owner.address)],
            )?;
        }
        let name = CString::new(host.as_str())?;
        let ifindex =
            netns::run_in(&owner.netns_path, || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
        ensure!(ifindex != 0, "{host} not found in {}", owner.netns);
        let server =
            PodServer::start(pod.probe_pod(), &pod.ports, &format!("lab-srv-{}", pod.host_ifname))?;
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
            if let Err(e) = ip_batch(
                Some(&other.netns),
                true,
                [format!("route del {}/32 via {}", pod.ip, owner.address)],
            ) {
                errors.push(format!("{e:#}"));
            }
        }
        // Deleting the veth now (rather than when the namespace is finally freed) removes its
        // /32 route at once, so the address can be reused right away.
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
    /// parallel: `result[i][j]` is whether `pods[i]` reached `pods[j]` within `timeout`.
    pub fn probe_matrix(
        &self,
        pods: &[&str],
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
                    .map(LabPod::probe_pod)
                    .ok_or_else(|| anyhow!("pod {k} is not in the lab"))
            })
            .collect::<Result<Vec<_>>>()?;
        probe::matrix(&entries, protocol, port, timeout)
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
