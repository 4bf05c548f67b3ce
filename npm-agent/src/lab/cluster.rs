//! A conformance case on real packets: the case's cluster built from network namespaces
//! ([`super::net`]), one agent per node (the real `npm-agent run` with the file source and
//! the chosen dataplane, fed manifests through its normal event path), and probes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::net::{self, Lab, LabConfig};
use super::registry;
use crate::model::convert::{namespace_to_k8s, node_to_k8s, pod_to_k8s, policy_to_k8s};
use crate::model::{IpFamily, Namespace, Node, ObjectKey, Pod, Policy, Protocol};
use crate::simulate::Enforcer;
use crate::simulate::case::CaseCluster;
use crate::state::Event;

/// How a lab run is set up.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub nodes: usize,
    /// `ebpf` or `iptables`.
    pub dataplane: String,
    /// The `npm-agent` binary to run on each node.
    pub agent: PathBuf,
    pub probe_timeout: Duration,
    /// How long an agent may take to apply a step.
    pub apply_timeout: Duration,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    /// Extra environment for every agent (e.g. the iptables backend).
    pub agent_env: Vec<(String, String)>,
}

impl LabOptions {
    pub fn new(dataplane: &str, nodes: usize) -> Self {
        Self {
            nodes,
            dataplane: dataplane.into(),
            agent: agent_binary(),
            probe_timeout: Duration::from_millis(500),
            apply_timeout: Duration::from_secs(20),
            agent_args: Vec::new(),
            agent_env: Vec::new(),
        }
    }
}

/// This binary, to run as the node agents. If it was rebuilt while running, the kernel calls
/// the old file "(deleted)": the new one at the same path is what we want.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("npm-agent"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

struct Agent {
    node: usize,
    child: Child,
    status_file: PathBuf,
    pin_root: PathBuf,
    log_file: PathBuf,
}

/// One case's cluster with its agents. Dropping it stops the agents and removes everything.
pub struct LabCluster {
    opts: LabOptions,
    lab: Option<Lab>,
    dir: PathBuf,
    /// Behind a lock so that an agent can restart while other threads probe.
    agents: std::sync::Mutex<Vec<Agent>>,
    hook: Option<u64>,
    generation: u64,
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<ObjectKey, Pod>,
    policies: BTreeMap<ObjectKey, Policy>,
    cluster_policies: BTreeMap<String, crate::model::cluster_policy::ClusterPolicy>,
    /// Node of each pod, fixed at creation (pods are spread round-robin).
    placement: HashMap<ObjectKey, usize>,
    placed: usize,
    /// The agents' process ids, for the interrupt hook.
    pids: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

impl LabCluster {
    pub fn new(opts: LabOptions) -> Result<Self> {
        net::check_environment()?;
        let lab = Lab::new(LabConfig { nodes: opts.nodes, ..LabConfig::default() })?;
        let dir = std::env::temp_dir().join(lab.prefix());
        std::fs::create_dir_all(dir.join("manifests"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut c = LabCluster {
            opts,
            lab: Some(lab),
            dir,
            agents: Default::default(),
            hook: None,
            generation: 0,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            cluster_policies: BTreeMap::new(),
            placement: HashMap::new(),
            placed: 0,
            pids: Default::default(),
        };
        c.write_manifests()?;
        c.start_agents()?;
        Ok(c)
    }

    /// The network the cluster runs on.
    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("lab lives until drop")
    }

    /// The node each pod runs on.
    pub fn node_of(&self, pod: &ObjectKey) -> Option<usize> {
        self.placement.get(pod).copied()
    }

    /// The agents' log files, by node.
    pub fn agent_logs(&self) -> Vec<PathBuf> {
        self.agents().iter().map(|a| a.log_file.clone()).collect()
    }

    /// Where node `node`'s agent pins its maps (eBPF mode).
    pub fn pin_root(&self, node: usize) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("{}-n{node}", self.lab().prefix()))
    }

    /// The process id of a node's agent (for measuring its CPU time).
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents().iter().find(|a| a.node == node).map(|a| a.child.id())
    }

    /// The socket `npm-agent drops` reads a node's drop events from.
    pub fn drops_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("drops-{node}.sock"))
    }

    fn spawn_agent(&self, i: usize) -> Result<Agent> {
        let status_file = self.dir.join(format!("status-{i}.json"));
        let log_file = self.dir.join(format!("agent-{i}.log"));
        let pin_root = self.pin_root(i);
        // A restarted agent must not be taken for ready on its predecessor's word.
        let _ = std::fs::remove_file(&status_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_file)?;
        let mut cmd = self.lab().node_command(i, &self.opts.agent)?;
        cmd.arg("run")
            .arg("--source")
            .arg(format!("files:{}", self.dir.join("manifests").display()))
            .args(["--dataplane", &self.opts.dataplane])
            .args(["--node-name", &node_name(i)])
            .arg("--pin-root")
            .arg(&pin_root)
            .arg("--status-file")
            .arg(&status_file)
            .arg("--drops-socket")
            .arg(self.drops_socket(i))
            .args(["--metrics-addr", "127.0.0.1:10091"])
            .args(&self.opts.agent_args)
            .envs(self.opts.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting the agent of node {i}"))?;
        Ok(Agent { node: i, child, status_file, pin_root, log_file })
    }

    fn start_agents(&mut self) -> Result<()> {
        for i in 0..self.opts.nodes {
            let agent = self.spawn_agent(i)?;
            self.agents().push(agent);
        }
        self.update_pids();
        // If the lab is interrupted, the agents go and their pins with them.
        let pids = self.pids.clone();
        let pins: Vec<PathBuf> = self.agents().iter().map(|a| a.pin_root.clone()).collect();
        self.hook = Some(registry::add_interrupt_hook(move || {
            for pid in pids.lock().map(|p| p.clone()).unwrap_or_default() {
                // SAFETY: sending a signal to our own child process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(100));
            for p in &pins {
                let _ = std::fs::remove_dir_all(p);
            }
        })?);
        self.wait_applied()
    }

    fn update_pids(&self) {
        if let Ok(mut p) = self.pids.lock() {
            *p = self.agents().iter().map(|a| a.child.id() as i32).collect();
        }
    }

    /// Stops one node's agent with SIGTERM (as a rolling update does), starts a new one over
    /// what the old one left pinned, and waits until it is ready. Returns how long the node
    /// had no agent.
    pub fn restart_agent(&self, node: usize) -> Result<Duration> {
        let down = {
            let mut agents = self.agents();
            let i = agents.iter().position(|a| a.node == node).context("no such node")?;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(agents[i].child.id() as i32, libc::SIGTERM) };
            let status = agents[i].child.wait()?;
            let down = Instant::now();
            if !status.success() {
                bail!("the agent of node {node} exited with {status} on SIGTERM");
            }
            agents[i] = self.spawn_agent(node)?;
            down
        };
        self.update_pids();
        self.wait_applied()?;
        Ok(down.elapsed())
    }

    fn agents(&self) -> std::sync::MutexGuard<'_, Vec<Agent>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every object as manifests (each file atomically), then bumps the generation.
    fn write_manifests(&mut self) -> Result<()> {
        let dir = self.dir.join("manifests");
        let mut docs: Vec<(&str, Vec<String>)> = Vec::new();
        let yaml = |v: serde_json::Value| serde_yaml_ng::to_string(&v).expect("objects serialize");
        let with_kind = |mut v: serde_json::Value, api: &str, kind: &str| {
            v["apiVersion"] = api.into();
            v["kind"] = kind.into();
            v
        };
        docs.push((
            "namespaces.yaml",
            self.namespaces
                .values()
                .map(|n| {
                    yaml(with_kind(
                        serde_json::to_value(namespace_to_k8s(n)).unwrap(),
                        "v1",
                        "Namespace",
                    ))
                })
                .collect(),
        ));
        let ipv6 = self.lab().has_ipv6();
        let nodes: Vec<Node> = self
            .lab()
            .nodes()
            .iter()
            .map(|n| Node {
                name: node_name(n.index),
                // (Its IPv6 fabric address too once the lab has IPv6: a dual-stack node.)
                addresses: std::iter::once(IpAddr::V4(n.address))
                    .chain(ipv6.then_some(IpAddr::V6(n.address6)))
                    .collect(),
                // (As the kubelet labels every node.)
                labels: [("kubernetes.io/hostname".to_string(), node_name(n.index))].into(),
            })
            .collect();
        docs.push((
            "nodes.yaml",
            nodes
                .iter()
                .map(|n| {
                    yaml(with_kind(serde_json::to_value(node_to_k8s(n)).unwrap(), "v1", "Node"))
                })
                .collect(),
        ));
        docs.push((
            "pods.yaml",
            self.pods
                .values()
                .map(|p| yaml(with_kind(serde_json::to_value(pod_to_k8s(p)).unwrap(), "v1", "Pod")))
                .collect(),
        ));
        docs.push((
            "policies.yaml",
            self.policies
                .values()
                .map(|p| {
                    yaml(with_kind(
                        serde_json::to_value(policy_to_k8s(p)).unwrap(),
                        "networking.k8s.io/v1",
                        "NetworkPolicy",
                    ))
                })
                .collect(),
        ));
        docs.push((
            "cluster-policies.yaml",
            self.cluster_policies
                .values()
                .map(|p| yaml(crate::model::convert::cluster_policy_to_api(p)))
                .collect(),
        ));
        for (name, objects) in docs {
            write_atomic(&dir.join(name), &objects.join("---\n"))?;
        }
        self.generation += 1;
        write_atomic(&dir.join(".generation"), &self.generation.to_string())
    }

    /// Waits until every agent reports the current generation applied.
    fn wait_applied(&self) -> Result<()> {
        let deadline = Instant::now() + self.opts.apply_timeout;
        loop {
            let mut done = true;
            for a in self.agents().iter_mut() {
                if let Some(status) = a.child.try_wait()? {
                    let log = std::fs::read_to_string(&a.log_file).unwrap_or_default();
                    bail!("the agent of node {} exited ({status}):\n{}", a.node, tail(&log, 40));
                }
                let applied = std::fs::read_to_string(&a.status_file)
                    .ok()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                    .is_some_and(|v| {
                        v["ready"] == true && v["generation"].as_u64() >= Some(self.generation)
                    });
                done &= applied;
            }
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .agents()
                    .iter()
                    .map(|a| {
                        format!(
                            "node {}:\n{}",
                            a.node,
                            tail(&std::fs::read_to_string(&a.log_file).unwrap_or_default(), 20)
                        )
                    })
                    .collect();
                bail!(
                    "agents did not apply generation {} within {:?}:\n{}",
                    self.generation,
                    self.opts.apply_timeout,
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agents (SIGTERM: they leave enforcement in place), then removes their pins
    /// and the lab.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut agents = std::mem::take(&mut *self.agents());
        for a in &mut agents {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for a in &mut agents {
            while a.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = a.child.kill();
                    let _ = a.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut result = Ok(());
        for a in agents.drain(..) {
            if a.pin_root.exists()
                && let Err(e) = remove_pins(&a.pin_root)
            {
                result = Err(e);
            }
        }
        if let Some(id) = self.hook.take() {
            registry::remove_interrupt_hook(id);
        }
        if let Some(lab) = self.lab.take() {
            lab.shutdown()?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }

    fn upsert_pod(&mut self, cluster: &CaseCluster, pod: &Pod) -> Result<()> {
        let node = match self.placement.get(&pod.key) {
            Some(n) => *n,
            None => {
                let n = self.placed % self.opts.nodes;
                self.placed += 1;
                let ip = match pod.address(IpFamily::V4) {
                    Some(IpAddr::V4(ip)) => Some(ip),
                    _ => None,
                };
                let ipv6 = match pod.address(IpFamily::V6) {
                    Some(IpAddr::V6(ip)) => Some(ip),
                    _ => None,
                };
                if ip.is_none() && ipv6.is_none() {
                    bail!("pod {}: the lab needs an address", pod.key);
                }
                let sctp = net::sctp_supported();
                let ports: Vec<(Protocol, u16)> = cluster
                    .ports
                    .get(&pod.key)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|(p, _)| sctp || *p != Protocol::Sctp)
                    .collect();
                let key = pod.key.to_string();
                self.lab.as_mut().expect("lab").add_pod_addrs(&key, ip, ipv6, n, &ports)?;
                self.placement.insert(pod.key.clone(), n);
                n
            }
        };
        let mut p = pod.clone();
        p.node = Some(node_name(node));
        self.pods.insert(p.key.clone(), p);
        Ok(())
    }
}

impl Drop for LabCluster {
    fn drop(&mut self) {
        if self.lab.is_some()
            && let Err(e) = self.teardown()
        {
            eprintln!("npm lab: cleanup: {e:#}");
        }
    }
}

impl Enforcer for LabCluster {
    fn apply(&mut self, cluster: &CaseCluster, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            match e {
                Event::UpsertNamespace(ns) => {
                    self.namespaces.insert(ns.name.clone(), ns.clone());
                }
                Event::DeleteNamespace(name) => {
                    self.namespaces.remove(name);
                }
                Event::UpsertPod(p) => self.upsert_pod(cluster, p)?,
                Event::DeletePod(k) => {
                    self.pods.remove(k);
                    self.placement.remove(k);
                    self.lab.as_mut().expect("lab").remove_pod(&k.to_string())?;
                }
                Event::UpsertPolicy(p) => {
                    self.policies.insert(p.key.clone(), p.clone());
                }
                Event::DeletePolicy(k) => {
                    self.policies.remove(k);
                }
                Event::UpsertNode(_) | Event::DeleteNode(_) => {}
                Event::UpsertClusterPolicy(p) => {
                    self.cluster_policies.insert(p.name.clone(), p.clone());
                }
                Event::DeleteClusterPolicy(n) => {
                    self.cluster_policies.remove(n);
                }
            }
        }
        self.write_manifests()?;
        self.wait_applied()
    }

    fn probe(
        &mut self,
        _: &CaseCluster,
        pods: &[&Pod],
        protocol: Protocol,
        port: u16,
    ) -> Result<Vec<Vec<bool>>> {
        // The runner hands every pod with its address of the probed family as `ip`; the lab
        // probes between its pods' addresses of that family.
        let family = pods.first().and_then(|p| p.ip).map_or(IpFamily::V4, |ip| IpFamily::of(&ip));
        let keys: Vec<String> = pods.iter().map(|p| p.key.to_string()).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.lab().probe_matrix_family(&keys, family, protocol, port, self.opts.probe_timeout)
    }

    fn supports_sctp(&self) -> bool {
        net::sctp_supported()
    }

    /// IPv6 tables are probed over the pods' IPv6 addresses (whether the dataplane enforces
    /// IPv6 policies is what those tables then show).
    fn supports_ipv6(&self) -> bool {
        true
    }
}

/// Removes a pin root: unpinning a link detaches its programs (the agent is gone).
pub fn remove_pins(root: &Path) -> Result<()> {
    std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))
}

/// Removes pin roots left by lab runs whose process is gone.
pub fn remove_stale_pins() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else { return };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(registry::NAME_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) == 0 };
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn write_atomic(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `npm-agent lab run`: every case through the lab, reported exactly as `simulate` does.
pub fn run_cli(paths: &[PathBuf], opts: &LabOptions, json: bool) -> std::process::ExitCode {
    if let Err(e) = net::check_environment() {
        eprintln!("npm-agent lab: {e:#}");
        return std::process::ExitCode::from(2);
    }
    remove_stale_pins();
    let _ = registry::cleanup_stale();
    let mut reports = Vec::new();
    for path in paths {
        let report = match LabCluster::new(opts.clone()) {
            Ok(mut lab) => {
                let r = crate::simulate::run_case(path, &mut lab);
                if let Err(e) = lab.shutdown() {
                    eprintln!("npm-agent lab: cleanup after {}: {e:#}", path.display());
                }
                r
            }
            Err(e) => crate::simulate::CaseReport {
                file: path.clone(),
                name: String::new(),
                error: Some(format!("building the lab: {e:#}")),
                steps: Vec::new(),
            },
        };
        if !json {
            print!("{}", crate::simulate::report::render(&report));
        }
        reports.push(report);
    }
    crate::simulate::report::print_summary(&reports, json, "lab")
}
