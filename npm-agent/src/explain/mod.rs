//! `npm-agent explain`: why can (or can't) A reach B? The cluster comes from a directory of
//! manifests, a case file (its model and steps) or the Kubernetes API (read only); the answer
//! is [`compile::explain`](crate::compile::explain)'s, printed as text or JSON, with where
//! each deciding entry lives in the dataplanes (the plan's entries, which the eBPF maps hold,
//! and Azure NPM's chain of each policy in iptables mode).

pub mod html;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;

use crate::compile::explain::{Explanation, Side, explain};
use crate::dataplane::iptables::names::policy_chain;
use crate::model::{Direction, ObjectKey, Protocol};
use crate::simulate::case::{self, ActionOutcome, CaseCluster};
use crate::source::{FilesSource, KubeOptions, KubeSource, Source};
use crate::state::ClusterState;

/// Where the cluster comes from.
#[derive(Clone, Debug)]
pub enum ClusterFrom {
    /// A directory of manifests (as `--source files:DIR` reads it).
    Manifests(PathBuf),
    /// A case file: its model, then its first `steps` steps (all when `None`).
    Case { path: PathBuf, steps: Option<usize> },
    /// The Kubernetes API (in-cluster configuration, or `KUBECONFIG`), listed once.
    Kube,
}

/// One end as the user names it: `NAMESPACE/POD` or an address.
pub fn resolve_end(state: &ClusterState, end: &str) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = end.parse::<IpAddr>() {
        return Ok(ip);
    }
    let (ns, name) = end
        .split_once('/')
        .ok_or_else(|| anyhow!("{end:?}: expected NAMESPACE/POD or an IP address"))?;
    let pod = state
        .pods
        .get(&ObjectKey::new(ns, name))
        .ok_or_else(|| anyhow!("no pod {ns}/{name} in the cluster"))?;
    pod.ip.ok_or_else(|| anyhow!("pod {ns}/{name} has no address (yet)"))
}

/// `80/TCP`, `53/udp`, `80` (TCP).
pub fn parse_port(s: &str) -> anyhow::Result<(u16, Protocol)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port.parse().with_context(|| format!("{s:?}: not a port number"))?;
    let protocol = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        p => bail!("{s:?}: unknown protocol {p} (TCP, UDP or SCTP)"),
    };
    Ok((port, protocol))
}

/// The cluster, read once.
pub fn load(from: &ClusterFrom) -> anyhow::Result<ClusterState> {
    let mut state = ClusterState::default();
    match from {
        ClusterFrom::Manifests(dir) => {
            if !dir.is_dir() {
                bail!("{}: not a directory", dir.display());
            }
            let mut source = FilesSource::new(dir.clone());
            if let Some(batch) = source.scan()? {
                for e in &batch.events {
                    state.apply(e);
                }
            }
            for p in source.health().problems {
                eprintln!("npm-agent explain: {p}");
            }
        }
        ClusterFrom::Case { path, steps } => {
            let c = case::load(path)?;
            let mut cluster =
                CaseCluster::new(&c).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            for e in cluster.initial_events() {
                state.apply(&e);
            }
            for step in c.steps.iter().take(steps.unwrap_or(usize::MAX)) {
                for a in &step.actions {
                    match cluster.action(a).map_err(|e| anyhow!("{}: {e}", path.display()))? {
                        ActionOutcome::Events(events) => events.iter().for_each(|e| state.apply(e)),
                        ActionOutcome::Rejected(r) => {
                            eprintln!("npm-agent explain: rejected: {r:?}")
                        }
                        #[allow(unreachable_patterns)]
                        _ => {}
                    }
                }
            }
        }
        ClusterFrom::Kube => {
            let mut source = KubeSource::connect(KubeOptions::new(""))?;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(batch) = source.next_batch(Duration::from_millis(500))? {
                    for e in &batch.events {
                        state.apply(e);
                    }
                    if batch.synced {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("the Kubernetes API did not list every object within 120 s");
                }
            }
        }
    }
    Ok(state)
}

/// An explanation with where its entries live in each dataplane.
#[derive(Serialize)]
struct Report<'a> {
    from: &'a str,
    to: &'a str,
    #[serde(flatten)]
    explanation: &'a Explanation,
    /// Azure NPM's chain of each selecting policy (iptables mode).
    iptables_chains: Vec<(String, String)>,
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "ALLOWED" } else { "DENIED" }
}

fn chains(e: &Explanation) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in [&e.egress, &e.ingress] {
        for p in &s.policies {
            let name = p.to_string();
            out.push((name.clone(), policy_chain(s.direction == Direction::Ingress, &name)));
        }
    }
    out
}

fn write_side(out: &mut String, label: &str, s: &Side) {
    use std::fmt::Write as _;
    let who = s.pod.as_ref().map_or_else(|| s.ip.to_string(), |p| format!("{p} ({})", s.ip));
    let node = s.node.as_deref().map(|n| format!(", judged on node {n}")).unwrap_or_default();
    let _ = writeln!(out, "  {label} of {who}: {}{node}", verdict(s.allowed).to_lowercase());
    let _ = writeln!(out, "    {}", s.reason);
    if !s.policies.is_empty() {
        let list: Vec<String> = s.policies.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "    selected by: {}", list.join(", "));
    }
    if !s.cluster_policies.is_empty() {
        let _ = writeln!(out, "    ClusterNetworkPolicies: {}", s.cluster_policies.join(", "));
    }
    for r in &s.admitted_by {
        let _ = writeln!(out, "    admitted by: {r}");
    }
    for a in &s.entries {
        let _ = writeln!(out, "    plan entry: {a}");
    }
}

/// `npm-agent explain`.
pub fn cli(from: &ClusterFrom, src: &str, dst: &str, port: &str, json: bool) -> ExitCode {
    let run = || -> anyhow::Result<bool> {
        let state = load(from)?;
        let (port_number, protocol) = parse_port(port)?;
        let (s, d) = (resolve_end(&state, src)?, resolve_end(&state, dst)?);
        let e = explain(&state, s, d, protocol, port_number);
        let mut out = String::new();
        if json {
            let report =
                Report { from: src, to: dst, explanation: &e, iptables_chains: chains(&e) };
            out = serde_json::to_string_pretty(&report)? + "\n";
        } else {
            use std::fmt::Write as _;
            let line = format!("{src} ({s}) -> {dst} ({d}) {protocol}/{port_number}");
            let _ = writeln!(out, "{line}: {}", verdict(e.allowed));
            write_side(&mut out, "egress", &e.egress);
            write_side(&mut out, "ingress", &e.ingress);
            let chains = chains(&e);
            if !chains.is_empty() {
                let _ = writeln!(out, "  in iptables mode:");
                for (policy, chain) in chains {
                    let _ = writeln!(out, "    {policy}: chain {chain}");
                }
            }
        }
        // A closed pipe (`| head`) is not an error of the explanation.
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
        Ok(e.allowed)
    };
    match run() {
        // The exit status is the verdict, for scripts: 0 allowed, 1 denied.
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("npm-agent explain: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn describe(from: &ClusterFrom) -> String {
    match from {
        ClusterFrom::Manifests(dir) => format!("the manifests of {}", dir.display()),
        ClusterFrom::Case { path, steps: Some(n) } => {
            format!("{} after {n} step(s)", path.display())
        }
        ClusterFrom::Case { path, steps: None } => path.display().to_string(),
        ClusterFrom::Kube => "the cluster".into(),
    }
}

fn probes(ports: &[String]) -> anyhow::Result<Vec<html::Probe>> {
    ports
        .iter()
        .map(|p| parse_port(p).map(|(port, protocol)| html::Probe { port, protocol }))
        .collect()
}

fn write_page(out: &Path, page: &str) -> anyhow::Result<()> {
    std::fs::write(out, page).with_context(|| format!("writing {}", out.display()))
}

/// `npm-agent explain --html`: the matrix of each port over the cluster.
pub fn html_cli(from: &ClusterFrom, ports: &[String], out: &Path) -> ExitCode {
    let run = || -> anyhow::Result<()> {
        let state = load(from)?;
        let section =
            html::Section { title: describe(from), state: &state, probes: probes(ports)? };
        let title = format!("Connectivity of {}", describe(from));
        write_page(out, &html::render(&title, &[section]))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("npm-agent explain: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `npm-agent simulate --html`: every case's state after each step, with the matrix of each
/// port and protocol the step expects (TCP/80 for a step that expects none).
pub fn html_cases(cases: &[PathBuf], out: &Path) -> anyhow::Result<()> {
    let mut states: Vec<(String, ClusterState, Vec<html::Probe>)> = Vec::new();
    for path in cases {
        let c = case::load(path)?;
        let mut cluster = CaseCluster::new(&c).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut state = ClusterState::default();
        for e in cluster.initial_events() {
            state.apply(&e);
        }
        for (i, step) in c.steps.iter().enumerate() {
            for a in &step.actions {
                if let Ok(ActionOutcome::Events(events)) = cluster.action(a) {
                    events.iter().for_each(|e| state.apply(e));
                }
            }
            let mut probes = Vec::new();
            for e in &step.expect {
                let (port, protocol) = parse_port(&format!("{}/{}", e.port, e.protocol))?;
                probes.push(html::Probe { port, protocol });
            }
            if probes.is_empty() {
                probes.push(html::Probe { port: 80, protocol: Protocol::Tcp });
            }
            let title = format!("{}: step {}: {}", c.name, i + 1, step.description);
            states.push((title, state.clone(), probes));
        }
    }
    let sections: Vec<html::Section> = states
        .iter()
        .map(|(title, state, probes)| html::Section {
            title: title.clone(),
            state,
            probes: probes.clone(),
        })
        .collect();
    write_page(out, &html::render("Connectivity of the cases", &sections))
}
