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
//! Each pod serves its declared ports from this process: a short-lived thread enters the pod's
//! namespace (`setns(CLONE_NEWNET)`, checked against `/proc/thread-self/ns/net`), creates
//! and binds the sockets there (a socket stays in the namespace it was created in) and exits;
//! one thread per pod then serves them with `poll`: TCP (and SCTP) listeners accept and close,
//! UDP sockets echo every datagram. [`Lab::probe_matrix`] creates every client socket the
//! same way in its source pod's namespace (one short-lived thread per source, in parallel),
//! starts every connection at once and waits for all of them with one `poll` loop, so a whole
//! matrix takes about one timeout whatever its size. TCP succeeds when the connection is
//! established within the timeout; UDP when the echo of a nonce arrives (the datagram is sent
//! again at half the timeout). A pod to itself is `true` without probing.
//!
//! # Cleanup
//! Namespace names carry the owning process id: `npl-<pid>-<seq>-…` ([`NAME_PREFIX`]). Every
//! namespace is recorded in a process-wide registry before it is created. A [`Lab`] deletes its
//! namespaces when it is dropped (also while unwinding from a panic) or by [`Lab::shutdown`],
//! after stopping its servers (their sockets would keep a namespace alive). Deleting a
//! namespace removes the interfaces in it and their peers. [`Lab::new`] installs (once per
//! process) a SIGINT/SIGTERM/SIGHUP handler that deletes every registered namespace and exits
//! with status 128 + signal. [`Lab::new`] also calls [`cleanup_stale`], which deletes lab
//! namespaces whose owning process no longer exists (a run killed with SIGKILL), and never
//! those of a live process, so labs in concurrent processes do not disturb each other. Every
//! `ip` command runs with `-n <lab namespace>` except `netns add`/`netns delete`, so nothing
//! touches the root namespace's interfaces, routes or sysctls.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::model::Protocol;
use crate::netns;

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every lab namespace name starts with this, followed by the owning process id and `-`.
pub const NAME_PREFIX: &str = "npl-";
/// The pods' default gateway (link-local, answered by the node's side of the veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The MAC address of every host-side pod veth.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The node's interface to the fabric, and the pod's interface to its node.
pub const UPLINK_IFNAME: &str = "eth0";
pub const POD_IFNAME: &str = "eth0";
/// A probe timeout that decides blocked connections quickly and allowed ones reliably.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
        raise_fd_limit();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix =
            format!("{NAME_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
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
        let server = PodServer::start(&pod)?;
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
            .map(|k| self.pod(k).ok_or_else(|| anyhow!("pod {k} is not in the lab")))
            .collect::<Result<Vec<_>>>()?;
        let states = std::thread::scope(|s| {
            let handles: Vec<_> = entries
                .iter()
                .enumerate()
                .map(|(i, src)| {
                    let entries = &entries;
                    s.spawn(move || -> Result<Vec<ProbeState>> {
                        netns::enter(&src.netns_path)?;
                        entries
                            .iter()
                            .enumerate()
                            .map(|(j, dst)| {
                                if i == j || src.key == dst.key {
                                    return Ok(ProbeState::Done(true));
                                }
                                start_probe(protocol, SocketAddrV4::new(dst.ip, port), nonce(i, j))
                                    .with_context(|| format!("probing {} -> {}", src.key, dst.key))
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<_>>>()
        })?;
        wait_probes(states, timeout)
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

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes the lab namespaces whose owning process no longer exists (left by a run that was
/// killed with SIGKILL or crashed), including those of an earlier process that had this
/// process's id and that this process did not create. Namespaces of other running processes
/// are left alone. Returns the names deleted.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut live = live();
    let stale: Vec<String> = list_netns()?
        .into_iter()
        .filter(|n| {
            owner_pid(n)
                .is_some_and(|pid| if pid == me { !live.contains(n) } else { !pid_alive(pid) })
        })
        .collect();
    delete_namespaces_locked(&mut live, &stale)?;
    Ok(stale)
}

/// Deletes every namespace whose name starts with `prefix`, which must start with
/// [`NAME_PREFIX`], whoever owns it. Returns the names deleted.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    ensure!(
        prefix.starts_with(NAME_PREFIX),
        "refusing to delete namespaces not named {NAME_PREFIX}*"
    );
    let names: Vec<String> = list_netns()?.into_iter().filter(|n| n.starts_with(prefix)).collect();
    delete_namespaces(&names)?;
    Ok(names)
}

// ---- namespaces, the registry and signals ----

/// Namespaces created by this process and not deleted yet, for the signal handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<String>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers and creates namespaces; the registry lock is held throughout, so the signal
/// handler sees either none or all of them.
fn create_namespaces(names: &[String]) -> Result<()> {
    let mut live = live();
    for name in names {
        ensure!(!netns_path(name).exists(), "network namespace {name} already exists");
    }
    live.extend(names.iter().cloned());
    ip_batch(None, false, names.iter().map(|n| format!("netns add {n}")))
}

fn delete_namespaces(names: &[String]) -> Result<()> {
    delete_namespaces_locked(&mut live(), names)
}

fn delete_namespaces_locked(live: &mut Vec<String>, names: &[String]) -> Result<()> {
    let result = ip_batch(
        None,
        true,
        names.iter().filter(|n| netns_path(n).exists()).map(|n| format!("netns delete {n}")),
    );
    live.retain(|n| !names.contains(n));
    let left: Vec<&String> = names.iter().filter(|n| netns_path(n).exists()).collect();
    match result {
        Err(e) if !left.is_empty() => Err(e.context(format!("namespaces left: {left:?}"))),
        _ if !left.is_empty() => bail!("namespaces left after deletion: {left:?}"),
        _ => Ok(()),
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    unsafe {
        libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

type Hook = (u64, Box<dyn Fn() + Send>);

/// Work to do on SIGINT/SIGTERM/SIGHUP before the namespaces go (stopping agents, removing
/// their pins), registered by what runs inside the lab.
static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

fn hooks() -> MutexGuard<'static, Vec<Hook>> {
    HOOKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `f` to run if the process is interrupted; returns an id for [`remove_interrupt_hook`].
pub fn add_interrupt_hook(f: impl Fn() + Send + 'static) -> Result<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    install_signal_cleanup()?;
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    hooks().push((id, Box::new(f)));
    Ok(id)
}

pub fn remove_interrupt_hook(id: u64) {
    hooks().retain(|(i, _)| *i != id);
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: wake the cleanup thread.
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Once per process: SIGINT, SIGTERM and SIGHUP (unless ignored) wake a thread that deletes
/// every registered lab namespace and exits with 128 + the signal number.
fn install_signal_cleanup() -> Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| install_signal_cleanup_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn install_signal_cleanup_once() -> Result<()> {
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::thread::Builder::new()
        .name("npm-lab-signals".into())
        .spawn(move || {
            let mut pipe = File::from(read_end);
            let mut byte = [0u8];
            loop {
                match pipe.read(&mut byte) {
                    Ok(1) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    _ => return,
                }
            }
            let sig = i32::from(byte[0]);
            for hook in hooks().iter() {
                (hook.1)();
            }
            // Holding the registry until exit: no namespace can be created after this.
            let mut live = live();
            let names = live.clone();
            eprintln!("npm lab: signal {sig}: removing {} lab namespaces", names.len());
            if let Err(e) = delete_namespaces_locked(&mut live, &names) {
                eprintln!("npm lab: cleanup failed: {e:#}");
            }
            std::process::exit(128 + sig);
        })
        .context("starting the signal thread")?;
    SIGNAL_PIPE.store(write_end.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(write_end); // stays open for the life of the process
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error()).context("sigaction");
            }
        }
    }
    Ok(())
}

/// Lets the process hold a socket per probe of a large matrix.
fn raise_fd_limit() {
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

// ---- iproute2 and sysctls ----

/// Runs `ip [-n netns] [-force] -batch -` with `lines` as its commands.
fn ip_batch(
    netns: Option<&str>,
    force: bool,
    lines: impl IntoIterator<Item = String>,
) -> Result<()> {
    let lines: Vec<String> = lines.into_iter().collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running `ip` (iproute2)")?;
    let mut input = lines.join("\n");
    input.push('\n');
    let written = child.stdin.take().expect("stdin is piped").write_all(input.as_bytes());
    let out = child.wait_with_output().context("waiting for `ip`")?;
    written.context("writing commands to `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed: {}\ncommands:\n  {}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n  ")
        );
    }
    Ok(())
}

/// The sysctls every lab namespace gets (paths under /proc/sys/net).
fn namespace_sysctls() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ipv4/conf/all/rp_filter", "0"),
        ("ipv4/conf/default/rp_filter", "0"),
        ("ipv6/conf/all/disable_ipv6", "1"),
        ("ipv6/conf/default/disable_ipv6", "1"),
    ]
}

/// Writes `/proc/sys/net/<key>` from inside the namespace: /proc/sys/net shows the writing
/// thread's namespace, and `netns::run_in` has checked that the thread is in it.
fn write_sysctls(netns: &Path, settings: &[(&str, &str)]) -> Result<()> {
    netns::run_in(netns, || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/net/{key}");
            if key.starts_with("ipv6/") && !Path::new(&path).exists() {
                continue; // kernel without IPv6
            }
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        }
        Ok(())
    })?
    .with_context(|| format!("setting sysctls in {}", netns.display()))
}

// ---- sockets ----

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn new_socket(protocol: Protocol) -> io::Result<OwnedFd> {
    let (ty, proto) = match protocol {
        Protocol::Tcp => (libc::SOCK_STREAM, libc::IPPROTO_TCP),
        Protocol::Udp => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        Protocol::Sctp => (libc::SOCK_STREAM, libc::IPPROTO_SCTP),
    };
    let fd = cvt(unsafe {
        libc::socket(libc::AF_INET, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto)
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr_in(addr);
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn connect(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr_in(addr);
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The pending error of a socket (SO_ERROR), 0 when none.
fn socket_error(fd: &OwnedFd) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn send(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    let n =
        unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = unsafe {
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    loop {
        match cvt(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// A pod's servers: the sockets were made in the pod's namespace; a thread serves them until
/// it is stopped through an eventfd.
struct PodServer {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    fn start(pod: &LabPod) -> Result<PodServer> {
        let ports = pod.ports.clone();
        let (streams, datagrams) = netns::run_in(
            &pod.netns_path,
            move || -> io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                let (mut streams, mut datagrams) = (Vec::new(), Vec::new());
                for (protocol, port) in ports {
                    let fd = new_socket(protocol)?;
                    set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                    bind(&fd, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
                    if protocol == Protocol::Udp {
                        datagrams.push(UdpSocket::from(fd));
                    } else {
                        cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
                        // accept() is the same call for TCP and SCTP stream sockets.
                        streams.push(TcpListener::from(fd));
                    }
                }
                Ok((streams, datagrams))
            },
        )?
        .with_context(|| format!("starting servers in pod {}", pod.key))?;
        let stop = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
            .context("eventfd")?;
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_rx = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("lab-srv-{}", pod.host_ifname))
            .spawn(move || serve(stop_rx, streams, datagrams))
            .context("starting a server thread")?;
        Ok(PodServer { stop, thread: Some(thread) })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stop: OwnedFd, streams: Vec<TcpListener>, datagrams: Vec<UdpSocket>) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(streams.iter().map(|l| l.as_raw_fd()))
        .chain(datagrams.iter().map(|s| s.as_raw_fd()))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    let mut buf = [0u8; 2048];
    loop {
        fds.iter_mut().for_each(|p| p.revents = 0);
        if let Err(e) = poll(&mut fds, Duration::from_millis(i32::MAX as u64)) {
            eprintln!("npm lab: server poll failed: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (listener, pfd) in streams.iter().zip(&fds[1..]) {
            if pfd.revents == 0 {
                continue;
            }
            // Accept and close: the client's connection was established by then.
            loop {
                match listener.accept() {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::Interrupted
                            || e.kind() == io::ErrorKind::ConnectionAborted => {}
                    Err(_) => break,
                }
            }
        }
        for (socket, pfd) in datagrams.iter().zip(&fds[1 + streams.len()..]) {
            if pfd.revents == 0 {
                continue;
            }
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {} // a queued error is consumed by reporting it
                }
            }
        }
    }
}

// ---- probes ----

enum ProbeState {
    Done(bool),
    Pending { fd: OwnedFd, protocol: Protocol, payload: [u8; 16] },
}

/// A payload that no other probe of this process sends.
fn nonce(i: usize, j: usize) -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut payload = [0u8; 16];
    payload[..4].copy_from_slice(b"npl:");
    payload[4..12].copy_from_slice(&n.to_be_bytes());
    payload[12..14].copy_from_slice(&(i as u16).to_be_bytes());
    payload[14..].copy_from_slice(&(j as u16).to_be_bytes());
    payload
}

/// Binds a probe's socket to a source port no recent probe used. A kernel-chosen ephemeral
/// port can repeat the 5-tuple of a probe made a step earlier; conntrack (the dataplanes' or
/// netfilter's) then takes the new probe for a packet of that earlier, allowed flow, and a
/// connection the new policy blocks would seem to pass. Ports cycle through 33000..61000, so
/// a port comes back only after some 28,000 probes, well after such flows have expired.
fn bind_fresh_port(fd: &OwnedFd) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    for _ in 0..64 {
        let port = 33_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 28_000) as u16;
        if bind(fd, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return;
        }
    }
    // Every try taken: let the kernel pick (connect binds an ephemeral port).
}

/// Starts one probe from the calling thread's namespace. Errors only when no socket can be
/// made; a refused or unroutable destination is a failed probe.
fn start_probe(protocol: Protocol, dst: SocketAddrV4, payload: [u8; 16]) -> io::Result<ProbeState> {
    let fd = new_socket(protocol)?;
    bind_fresh_port(&fd);
    Ok(match protocol {
        Protocol::Tcp | Protocol::Sctp => match connect(&fd, dst) {
            Ok(()) => ProbeState::Done(true),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                ProbeState::Pending { fd, protocol, payload }
            }
            Err(_) => ProbeState::Done(false),
        },
        Protocol::Udp => match connect(&fd, dst).and_then(|()| send(&fd, &payload)) {
            Ok(_) => ProbeState::Pending { fd, protocol, payload },
            Err(_) => ProbeState::Done(false),
        },
    })
}

/// Waits until every probe is decided or `timeout` has passed; undecided probes fail. UDP
/// probes still pending at half the timeout send their datagram again.
fn wait_probes(mut states: Vec<Vec<ProbeState>>, timeout: Duration) -> Result<Vec<Vec<bool>>> {
    let begin = Instant::now();
    let deadline = begin + timeout;
    let resend_at = begin + timeout / 2;
    let mut resent = false;
    let mut buf = [0u8; 64];
    loop {
        let mut fds = Vec::new();
        let mut cells = Vec::new();
        for (i, row) in states.iter().enumerate() {
            for (j, state) in row.iter().enumerate() {
                if let ProbeState::Pending { fd, protocol, .. } = state {
                    let events =
                        if *protocol == Protocol::Udp { libc::POLLIN } else { libc::POLLOUT };
                    fds.push(libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 });
                    cells.push((i, j));
                }
            }
        }
        let now = Instant::now();
        if fds.is_empty() || now >= deadline {
            break;
        }
        let until = if resent { deadline } else { resend_at.min(deadline) };
        poll(&mut fds, until.saturating_duration_since(now)).context("waiting for probes")?;
        for (pfd, &(i, j)) in fds.iter().zip(&cells) {
            if pfd.revents == 0 {
                continue;
            }
            let ProbeState::Pending { fd, protocol, payload } = &states[i][j] else {
                unreachable!()
            };
            let verdict = if *protocol == Protocol::Udp {
                loop {
                    match recv(fd, &mut buf) {
                        Ok(n) if buf[..n] == payload[..] => break Some(true),
                        Ok(_) => continue, // not our echo
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break Some(false), // e.g. ECONNREFUSED from an ICMP port unreachable
                    }
                }
            } else {
                match socket_error(fd).context("SO_ERROR")? {
                    0 if pfd.revents & libc::POLLOUT != 0 => Some(true),
                    0 => None,
                    _ => Some(false),
                }
            };
            if let Some(ok) = verdict {
                states[i][j] = ProbeState::Done(ok);
            }
        }
        if !resent && Instant::now() >= resend_at {
            resent = true;
            for state in states.iter().flatten() {
                if let ProbeState::Pending { fd, protocol: Protocol::Udp, payload } = state {
                    let _ = send(fd, payload);
                }
            }
        }
    }
    Ok(states
        .into_iter()
        .map(|row| row.into_iter().map(|s| matches!(s, ProbeState::Done(true))).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_parsed_from_lab_names_only() {
        assert_eq!(owner_pid("npl-1234-0-n0"), Some(1234));
        assert_eq!(owner_pid("npl-1234-12-p3"), Some(1234));
        assert_eq!(owner_pid("npl-x-0-n0"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("npl1234"), None);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(0, 1), nonce(0, 1));
        assert_eq!(&nonce(3, 4)[12..], &[0, 3, 0, 4]);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
