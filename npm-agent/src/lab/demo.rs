//! `npm-agent lab demo`: one case on a lab cluster, shown to a person: the connectivity before
//! any policy, then after each step (with the case's expectations checked), the node agents'
//! metrics served on :10091 of the host while it runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::cluster::{LabCluster, LabOptions};
use super::{net, registry};
use crate::model::Protocol;
use crate::netns;
use crate::simulate::case::{self, ActionOutcome, CaseCluster};
use crate::simulate::{Enforcer, TableOutcome, check_table, observe};

pub fn demo_cli(path: &Path, opts: &LabOptions, hold: bool, metrics_addr: &str) -> ExitCode {
    match demo(path, opts, hold, metrics_addr) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("npm-agent lab demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo(path: &Path, opts: &LabOptions, hold: bool, metrics_addr: &str) -> Result<bool> {
    net::check_environment()?;
    super::cluster::remove_stale_pins();
    let _ = registry::cleanup_stale();
    let case = case::load(path)?;
    let mut cluster = CaseCluster::new(&case).map_err(anyhow::Error::msg)?;
    println!("== {}\n   ({})", case.name, path.display());
    let mut lab = LabCluster::new(opts.clone())?;
    lab.apply(&cluster, &cluster.initial_events())?;
    println!(
        "\nA lab cluster of {} nodes (network namespaces), one {} agent per node:",
        opts.nodes, opts.dataplane
    );
    for p in cluster.pods() {
        let node = lab.node_of(&p.key).map(|n| format!("node-{n}")).unwrap_or_default();
        let ip = p.ip.map(|i| i.to_string()).unwrap_or_default();
        println!("   {:<16} {:<14} on {node}", p.key.to_string(), ip);
    }
    match serve_metrics(&lab, metrics_addr) {
        Ok(()) => println!(
            "\nMetrics of node-0's agent: http://{metrics_addr}/node-metrics and /cluster-metrics"
        ),
        Err(e) => println!("\n(metrics not served on {metrics_addr}: {e:#})"),
    }

    // The distinct tables the case looks at, observed before any policy.
    let mut kinds: Vec<(Protocol, u16)> = Vec::new();
    for step in &case.steps {
        for e in &step.expect {
            if let Some(p) = Protocol::parse(&e.protocol.to_uppercase())
                && !kinds.contains(&(p, e.port))
                && (p != Protocol::Sctp || lab.supports_sctp())
            {
                kinds.push((p, e.port));
            }
        }
    }
    println!("\n-- before any policy: everything is reachable");
    for (p, port) in &kinds {
        let t = observe(&cluster, &mut lab, false, *p, *port)?;
        println!("   {p}/{port}:\n{}", t.render("     "));
    }

    let mut all_pass = true;
    for (i, step) in case.steps.iter().enumerate() {
        println!("-- step {}: {}", i + 1, step.description);
        let mut events = Vec::new();
        for a in &step.actions {
            match cluster.action(a).map_err(anyhow::Error::msg)? {
                ActionOutcome::Events(e) => events.extend(e),
                ActionOutcome::Rejected(invalid) => {
                    println!("   rejected (not applied): {invalid}")
                }
            }
        }
        lab.apply(&cluster, &events)?;
        for e in &step.expect {
            let tr = check_table(&cluster, &mut lab, e);
            let label = format!("{}/{}", tr.protocol.to_uppercase(), tr.port);
            let verdict = match &tr.outcome {
                TableOutcome::Pass => "as expected".to_string(),
                TableOutcome::Skipped { reason } => format!("skipped: {reason}"),
                TableOutcome::Fail { diffs } => {
                    all_pass = false;
                    format!("{} cells differ from the expectation", diffs.len())
                }
                TableOutcome::Error { message } => {
                    all_pass = false;
                    message.clone()
                }
            };
            println!("   {label} ({verdict}):");
            if let Some(t) = &tr.observed {
                print!("{}", t.render("     "));
            }
        }
    }
    println!(
        "\n{}",
        if all_pass {
            "Every table matched the case's expectations."
        } else {
            "Some tables did not match."
        }
    );
    if hold {
        println!("\nHolding the lab (Ctrl-C removes it). To explore:");
        for n in lab.lab().nodes() {
            println!(
                "   ip netns exec {}  ...   # node-{} (its agent's pins: /sys/fs/bpf/{}-n{})",
                n.netns,
                n.index,
                lab.lab().prefix(),
                n.index
            );
        }
        for p in lab.lab().pods() {
            let ips: Vec<String> = p.addresses().map(|a| a.to_string()).collect();
            println!("   ip netns exec {}  ...   # pod {} {}", p.netns, p.key, ips.join(" "));
        }
        for l in lab.agent_logs() {
            println!("   agent log: {}", l.display());
        }
        loop {
            std::thread::park();
        }
    }
    lab.shutdown()?;
    Ok(all_pass)
}

/// Forwards `addr` on the host to node-0's agent metrics endpoint inside its namespace.
fn serve_metrics(lab: &LabCluster, addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let netns: PathBuf = lab.lab().node(0).context("no node")?.netns_path.clone();
    std::thread::Builder::new().name("metrics-proxy".into()).spawn(move || {
        for client in listener.incoming().flatten() {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let Ok(Ok(upstream)) =
                    netns::run_in(&netns, || TcpStream::connect("127.0.0.1:10091"))
                else {
                    return;
                };
                pipe(client, upstream);
            });
        }
    })?;
    Ok(())
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else { return };
    let t = std::thread::spawn(move || copy(&mut a2, &mut b2));
    let (mut a, mut b) = (a, b);
    copy(&mut b, &mut a);
    let _ = t.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
