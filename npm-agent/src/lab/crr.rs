//! `npm-agent lab crr`: the connection rate between two pods on different lab nodes (TCP
//! connect, a 1-byte request, a 1-byte reply, close; a new source port every time), and the
//! request rate on one established connection, with no agent or with every node's agent
//! enforcing N policies that select the server. Configurations are interleaved over rounds, so
//! the machine's drift falls on every one alike; each figure is the median of its rounds.
//!
//! The admitting policy is applied last and named to sort last (in iptables mode, the last
//! policy chain a connection walks through: an endpoint walks its policies by name); the
//! others each admit a /32 elsewhere on another port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cluster::{LabCluster, LabOptions};
use super::net::{self, Lab, LabConfig};
use super::registry;
use super::throughput::{OtherPeers, policy_of};
use crate::netns;
use crate::simulate::Enforcer;
use crate::simulate::case::CaseCluster;
use crate::state::Event;

const PORT: u16 = 5201;

/// One enforcement setup: no agent, or a dataplane (with an iptables backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// `none`, `ebpf`, `iptables-legacy` or `iptables-nft`.
    pub name: String,
    pub policies: usize,
}

/// What one measurement gave.
#[derive(Clone, Copy, Debug)]
pub struct Rates {
    /// New connections per second (connect, request, reply, close).
    pub connections: f64,
    /// Requests per second on one established connection.
    pub requests: f64,
}

/// Measures one setup for `seconds` of each kind of traffic, the policies other than the
/// admitting one admitting `others`.
pub fn measure(setup: &Setup, seconds: f64, others: OtherPeers) -> Result<Rates> {
    let case = super::throughput::client_server("crr");
    let cluster = CaseCluster::new(&case).map_err(anyhow::Error::msg)?;
    if setup.name == "none" {
        let mut lab = Lab::new(LabConfig::default())?;
        let mut pods = cluster.pods();
        let (c, s) = (pods.next().expect("client"), pods.next().expect("server"));
        lab.add_pod("x/client", v4(c.ip)?, 0, &[])?;
        lab.add_pod("x/server", v4(s.ip)?, 1, &[])?;
        let r = rates(&lab, seconds);
        lab.shutdown()?;
        return r;
    }
    let (dataplane, backend) = match setup.name.as_str() {
        "ebpf" => ("ebpf", None),
        "iptables" => ("iptables", None),
        "iptables-legacy" => ("iptables", Some("legacy")),
        "iptables-nft" => ("iptables", Some("nft")),
        other => bail!("unknown setup {other:?} (none, ebpf, iptables-legacy, iptables-nft)"),
    };
    let mut opts = LabOptions::new(dataplane, 2);
    opts.apply_timeout = Duration::from_secs(600);
    if let Some(b) = backend {
        opts.agent_env.push((crate::dataplane::iptables::BACKEND_ENV.into(), b.into()));
    }
    let mut lab = LabCluster::new(opts)?;
    let mut events = cluster.initial_events();
    // The admitting policy (number 0) last.
    events.extend((1..setup.policies.max(1)).map(|i| Event::UpsertPolicy(policy_of(i, others))));
    events.push(Event::UpsertPolicy(super::throughput::policy(0)));
    lab.apply(&cluster, &events)?;
    let r = rates(lab.lab(), seconds);
    lab.shutdown()?;
    r
}

fn v4(ip: Option<std::net::IpAddr>) -> Result<Ipv4Addr> {
    match ip {
        Some(std::net::IpAddr::V4(v)) => Ok(v),
        other => bail!("not an IPv4 pod address: {other:?}"),
    }
}

/// Pins the calling thread to CPU 0 (client and server share it, so that the figures do not
/// depend on where the scheduler puts them).
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The connection rate, then the request rate, between the lab's client and server pods.
fn rates(lab: &Lab, seconds: f64) -> Result<Rates> {
    let server = lab.pod("x/server").context("server pod")?.clone();
    let client = lab.pod("x/client").context("client pod")?.clone();
    // Short-lived connections: every ephemeral port, and TIME_WAIT ports reused, in the client.
    netns::run_in(&client.netns_path, || {
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000");
        let _ = std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1");
    })?;
    let stop = AtomicBool::new(false);
    let listener = netns::run_in(&server.netns_path, || {
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
    })??;
    listener.set_nonblocking(true)?;
    let addr = SocketAddrV4::new(server.ip.context("the server pod has an IPv4 address")?, PORT);
    std::thread::scope(|s| -> Result<Rates> {
        s.spawn(|| {
            pin_to_cpu0();
            serve(&listener, &stop)
        });
        let connections = netns::run_in(&client.netns_path, || {
            pin_to_cpu0();
            connect_loop(addr, seconds)
        })??;
        let requests = netns::run_in(&client.netns_path, || {
            pin_to_cpu0();
            request_loop(addr, seconds)
        })??;
        stop.store(true, Ordering::SeqCst);
        Ok(Rates { connections, requests })
    })
}

/// Answers each byte with a byte, on every connection, until `stop`.
fn serve(listener: &TcpListener, stop: &AtomicBool) {
    let mut buf = [0u8; 1];
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut c, _)) => {
                let _ = c.set_nonblocking(false);
                let _ = c.set_nodelay(true);
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                while c.read_exact(&mut buf).is_ok() && c.write_all(&buf).is_ok() {}
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Connections per second: connect, one byte each way, close.
fn connect_loop(addr: SocketAddrV4, seconds: f64) -> Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    while start.elapsed().as_secs_f64() < seconds {
        let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))
            .with_context(|| format!("connection {n}"))?;
        c.set_nodelay(true)?;
        c.write_all(b"x")?;
        c.read_exact(&mut buf)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Requests per second on one connection: one byte each way.
fn request_loop(addr: SocketAddrV4, seconds: f64) -> Result<f64> {
    let mut c = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
    c.set_nodelay(true)?;
    let start = Instant::now();
    let mut n = 0u64;
    let mut buf = [0u8; 1];
    while start.elapsed().as_secs_f64() < seconds {
        c.write_all(b"x")?;
        c.read_exact(&mut buf)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `npm-agent lab crr`: every setup × policy count, interleaved over `rounds`.
pub fn crr_cli(
    setups: &[String],
    policies: &[usize],
    seconds: f64,
    rounds: usize,
    others: OtherPeers,
) -> ExitCode {
    if let Err(e) = net::check_environment() {
        eprintln!("npm-agent lab crr: {e:#}");
        return ExitCode::from(2);
    }
    super::cluster::remove_stale_pins();
    let _ = registry::cleanup_stale();
    let mut all: Vec<Setup> = Vec::new();
    for name in setups {
        if name == "none" {
            all.push(Setup { name: name.clone(), policies: 0 });
        } else {
            all.extend(policies.iter().map(|p| Setup { name: name.clone(), policies: *p }));
        }
    }
    println!(
        "TCP between pods on two lab nodes, client and server on CPU 0: new connections/s (connect, 1-byte request, 1-byte reply, close) and requests/s on one connection, {seconds} s each; median of {rounds} rounds, setups interleaved; the admitting policy applied last, the others admitting {} on ports of their own",
        match others {
            OtherPeers::Blocks => "a /32 ipBlock each",
            OtherPeers::Selectors => "a pod label of their own each",
        }
    );
    let mut results: Vec<Vec<Rates>> = vec![Vec::new(); all.len()];
    for round in 0..rounds {
        for (i, setup) in all.iter().enumerate() {
            match measure(setup, seconds, others) {
                Ok(r) => {
                    eprintln!(
                        "round {}: {} {}: {:.0} connections/s, {:.0} requests/s",
                        round + 1,
                        setup.name,
                        setup.policies,
                        r.connections,
                        r.requests
                    );
                    results[i].push(r);
                }
                Err(e) => {
                    eprintln!("{} with {} policies: {e:#}", setup.name, setup.policies);
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        v[v.len() / 2]
    };
    let mut base: Option<(f64, f64)> = None;
    println!(
        "| setup | policies | connections/s | % of no agent | requests/s | % of no agent | connections/s, each round |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (setup, rs) in all.iter().zip(&results) {
        let mut c: Vec<f64> = rs.iter().map(|r| r.connections).collect();
        let rounds: Vec<String> = c.iter().map(|x| format!("{x:.0}")).collect();
        let mut q: Vec<f64> = rs.iter().map(|r| r.requests).collect();
        let (mc, mq) = (median(&mut c), median(&mut q));
        let (bc, bq) = *base.get_or_insert((mc, mq));
        println!(
            "| {} | {} | {mc:.0} | {:.0}% | {mq:.0} | {:.0}% | {} |",
            setup.name,
            if setup.name == "none" { "-".to_string() } else { setup.policies.to_string() },
            100.0 * mc / bc,
            100.0 * mq / bq,
            rounds.join(", ")
        );
    }
    ExitCode::SUCCESS
}
