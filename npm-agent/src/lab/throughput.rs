//! `npm-agent lab throughput`: iperf3 between two pods on different lab nodes, with no agent
//! at all, or with every node's agent enforcing `policies` policies that select the server
//! (one of them admits the client), to show what enforcement costs on the data path.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cluster::{LabCluster, LabOptions};
use super::net::{self, Lab, LabConfig};
use super::registry;
use crate::model::{
    CidrBlock, LabelSelector, NamespaceScope, ObjectKey, Peer, Policy, PortSpec, Protocol, Rule,
};
use crate::netns;
use crate::simulate::Enforcer;
use crate::simulate::case::{Case, CaseCluster};
use crate::state::Event;

const PORT: u16 = 5201;

/// A policy selecting the server; policy 0 admits the client's pods on the iperf3 port, the
/// others one /32 each on another port, so the maps hold `n` policies' entries.
pub fn policy(i: usize) -> Policy {
    policy_of(i, OtherPeers::Blocks)
}

/// What the policies other than the admitting one admit (each on a port of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtherPeers {
    /// A /32 ipBlock each.
    Blocks,
    /// The pods of a label of its own, in any namespace.
    Selectors,
}

/// Policy `i` (0 admits the client) with the others' peers of kind `others`.
pub fn policy_of(i: usize, others: OtherPeers) -> Policy {
    let peer = if i == 0 {
        Peer::Pods {
            namespaces: NamespaceScope::Selector(LabelSelector::everything()),
            pods: LabelSelector::from_labels([("app", "client")]),
        }
    } else if others == OtherPeers::Selectors {
        Peer::Pods {
            namespaces: NamespaceScope::Selector(LabelSelector::everything()),
            pods: LabelSelector::from_labels([("app", format!("other-{i}").as_str())]),
        }
    } else {
        let ip =
            Ipv4Addr::new(172, 16 + (i / 65536) as u8, ((i / 256) % 256) as u8, (i % 256) as u8);
        Peer::Block(CidrBlock::new(ipnet::IpNet::from(IpAddr::V4(ip)), []))
    };
    let port = if i == 0 { PORT } else { 1000 + (i % 1000) as u16 };
    Policy {
        // (The admitting policy's name sorts after the others': the iptables layout walks an
        // endpoint's policies by name, so it is walked last, the worst case.)
        key: ObjectKey::new(
            "x",
            if i == 0 { "bench-zz-admit".into() } else { format!("bench-{i}") },
        ),
        pod_selector: LabelSelector::from_labels([("app", "server")]),
        ingress: Some(vec![Rule {
            peers: vec![peer],
            ports: vec![PortSpec::Range { protocol: Protocol::Tcp, first: port, last: port }],
        }]),
        egress: None,
    }
}

// The model pods serve 5299 (the lab starts servers on model ports); iperf3 and the crr
// server take 5201.
const CASE: &str = r#"
name: client-server
model:
  namespaces: [x]
  pods:
  - {namespace: x, pod: client, labels: {app: client}, ports: [{name: unused, port: 5299, protocol: TCP}]}
  - {namespace: x, pod: server, labels: {app: server}, ports: [{name: unused, port: 5299, protocol: TCP}]}
steps: []
"#;

/// The two pods the lab's benchmarks measure between, x/client and x/server (app labels), as
/// the case `name`.
pub(super) fn client_server(name: &str) -> Case {
    let mut case: Case = serde_yaml_ng::from_str(CASE).expect("the client-server case parses");
    case.name = name.to_string();
    case
}

/// Gbit/s from the client pod to the server pod over `seconds` (between their IPv6
/// addresses when `ipv6`: the pods are then dual stack).
pub fn measure(dataplane: Option<&str>, policies: usize, seconds: u32, ipv6: bool) -> Result<f64> {
    let case = if ipv6 {
        let yaml = CASE.replace("model:\n", "model:\n  ip-families: [IPv4, IPv6]\n");
        serde_yaml_ng::from_str(&yaml).context("the dual-stack client-server case")?
    } else {
        client_server("throughput")
    };
    let cluster = CaseCluster::new(&case).map_err(anyhow::Error::msg)?;
    match dataplane {
        None => {
            let mut lab = Lab::new(LabConfig::default())?;
            let mut pods = cluster.pods();
            let (c, s) = (pods.next().expect("client"), pods.next().expect("server"));
            lab.add_pod_addrs("x/client", Some(v4(c.ip)?), c.ipv6, 0, &[])?;
            lab.add_pod_addrs("x/server", Some(v4(s.ip)?), s.ipv6, 1, &[])?;
            let r = iperf(&lab, seconds, ipv6);
            lab.shutdown()?;
            r
        }
        Some(dp) => {
            let mut opts = LabOptions::new(dp, 2);
            if std::env::var_os("NPM_LAB_LOG_DROPS").is_some() {
                opts.agent_args = vec!["--log-drops".into(), "true".into()];
            }
            let mut lab = LabCluster::new(opts)?;
            let mut events = cluster.initial_events();
            events.extend((0..policies.max(1)).map(|i| Event::UpsertPolicy(policy(i))));
            lab.apply(&cluster, &events)?;
            let r = iperf(lab.lab(), seconds, ipv6);
            if r.is_err() {
                for l in lab.agent_logs() {
                    eprintln!(
                        "--- {}:\n{}",
                        l.display(),
                        std::fs::read_to_string(&l)
                            .unwrap_or_default()
                            .lines()
                            .rev()
                            .take(15)
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
            lab.shutdown()?;
            r
        }
    }
}

fn v4(ip: Option<IpAddr>) -> Result<Ipv4Addr> {
    match ip {
        Some(IpAddr::V4(v)) => Ok(v),
        other => bail!("not an IPv4 pod address: {other:?}"),
    }
}

fn iperf(lab: &Lab, seconds: u32, ipv6: bool) -> Result<f64> {
    let server = lab.pod("x/server").context("server pod")?;
    let client = lab.pod("x/client").context("client pod")?;
    let mut srv = netns::command(&server.netns_path, "iperf3")
        .with_context(|| format!("opening network namespace {}", server.netns_path.display()))?
        .args(["-s", "-1", "-p", &PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (is iperf3 installed?)")?;
    std::thread::sleep(Duration::from_millis(300));
    let server_ip: IpAddr = match ipv6 {
        true => server.ipv6.context("the server pod has an IPv6 address")?.into(),
        false => server.ip.context("the server pod has an IPv4 address")?.into(),
    };
    let out = netns::command(&client.netns_path, "iperf3")
        .with_context(|| format!("opening network namespace {}", client.netns_path.display()))?
        .args([
            "-c",
            &server_ip.to_string(),
            "-p",
            &PORT.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .context("running iperf3 -c")?;
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 failed: {}", v["error"]))?;
    Ok(bps / 1e9)
}

pub fn throughput_cli(
    dataplanes: &[String],
    policies: usize,
    seconds: u32,
    runs: usize,
    ipv6: bool,
) -> ExitCode {
    if let Err(e) = net::check_environment() {
        eprintln!("npm-agent lab throughput: {e:#}");
        return ExitCode::from(2);
    }
    super::cluster::remove_stale_pins();
    let _ = registry::cleanup_stale();
    println!(
        "iperf3, TCP over {}, one stream, {seconds} s, pods on different lab nodes; median of {runs} runs",
        if ipv6 { "IPv6" } else { "IPv4" }
    );
    let mut baseline = None;
    for dp in dataplanes {
        let which = (dp != "none").then_some(dp.as_str());
        let mut results = Vec::new();
        for _ in 0..runs {
            match measure(which, policies, seconds, ipv6) {
                Ok(g) => results.push(g),
                Err(e) => {
                    eprintln!("{dp}: {e:#}");
                    return ExitCode::FAILURE;
                }
            }
        }
        results.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        let median = results[results.len() / 2];
        let base = *baseline.get_or_insert(median);
        let label = if which.is_none() {
            "no agent".to_string()
        } else {
            format!("{dp}, {policies} policies")
        };
        println!(
            "  {label:<28} {median:>7.2} Gbit/s  ({:.1}% of the first)  runs: {results:.2?}",
            100.0 * median / base
        );
    }
    ExitCode::SUCCESS
}
