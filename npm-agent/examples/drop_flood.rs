//! What a flood of denied packets costs the node with drop events on (docs/BENCHMARKS.md,
//! "Drop events"): a lab node in eBPF mode, a pod denied by policy sends UDP datagrams to
//! another as fast as one thread can for SECONDS (default 5), and the agent's CPU time
//! (utime + stime from /proc) is measured over the flood and the second after it, with the
//! events off (`--drop-events-rate 0`), at the defaults (10 a second per CPU, bursts of 20),
//! and without a limit (rate and burst 10^9: every drop an event). As root.
//!
//! ```text
//! cargo build --release -p npm-agent   # the agent the lab runs
//! cargo run --release -p npm-agent --example drop_flood [SECONDS]
//! ```

use std::net::{IpAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use npm_agent::dataplane::ebpf::events::pinned_event_totals;
use npm_agent::dataplane::ebpf::pinned_counters;
use npm_agent::lab::{LabCluster, LabOptions};
use npm_agent::model::ObjectKey;
use npm_agent::simulate::Enforcer;
use npm_agent::simulate::case::{self, ActionOutcome, CaseCluster};

/// CPU time of a process so far (user + system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent runs");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 of `rest` (from field 3).
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[11] + f[12]) * 1000 / hz)
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/47-union-of-policies.yaml");
    let c = case::load(&path)?;
    println!(
        "{:<28} {:>12} {:>10} {:>10} {:>12} {:>14}",
        "drop events", "datagrams/s", "events", "suppressed", "agent CPU", "agent CPU/s"
    );
    for (label, args) in [
        ("off (rate 0)", vec!["--drop-events-rate", "0"]),
        ("default (10/s per CPU, 20)", vec![]),
        (
            "unlimited (every drop)",
            vec!["--drop-events-rate", "1000000000", "--drop-events-burst", "1000000000"],
        ),
    ] {
        let mut cluster = CaseCluster::new(&c).map_err(anyhow::Error::msg)?;
        let mut opts = LabOptions::new("ebpf", 1);
        // target/<profile>/examples/drop_flood -> target/<profile>/npm-agent
        let exe = std::env::current_exe()?;
        opts.agent = exe.parent().and_then(Path::parent).expect("target dir").join("npm-agent");
        opts.agent_args = args.iter().map(|s| s.to_string()).collect();
        let mut lab = LabCluster::new(opts)?;
        let initial = cluster.initial_events();
        lab.apply(&cluster, &initial)?;
        for a in &c.steps[0].actions {
            if let ActionOutcome::Events(events) = cluster.action(a).map_err(anyhow::Error::msg)? {
                lab.apply(&cluster, &events)?;
            }
        }
        let a: IpAddr = cluster
            .pods()
            .find(|p| p.key == ObjectKey::new("x", "a"))
            .and_then(|p| p.ip)
            .expect("x/a");
        let pid = lab.agent_pid(0).expect("the agent");
        let pin_root = lab.pin_root(0);
        let x_b = lab.lab().pod("x/b").expect("x/b").netns_path.clone();
        std::thread::sleep(Duration::from_secs(1));
        let (cpu0, ev0) = (cpu_time(pid), pinned_event_totals(&pin_root)?);
        let dropped0 = pinned_counters(&pin_root)?.dropped(npm_common::DIR_INGRESS);
        let sent = npm_agent::netns::run_in(&x_b, move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("socket");
            s.connect((a, 80)).expect("connect");
            let (start, mut n) = (Instant::now(), 0u64);
            while start.elapsed() < Duration::from_secs(seconds) {
                for _ in 0..256 {
                    let _ = s.send(b"flood");
                }
                n += 256;
            }
            n
        })?;
        std::thread::sleep(Duration::from_secs(1)); // the agent reads what is left
        let (cpu1, ev1) = (cpu_time(pid), pinned_event_totals(&pin_root)?);
        let dropped = pinned_counters(&pin_root)?.dropped(npm_common::DIR_INGRESS) - dropped0;
        let cpu = cpu1 - cpu0;
        println!(
            "{label:<28} {:>12.0} {:>10} {:>10} {:>10.2} s {:>12.1} %",
            sent as f64 / seconds as f64,
            ev1.sent - ev0.sent,
            ev1.suppressed - ev0.suppressed,
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / (seconds + 1) as f64,
        );
        assert!(dropped >= sent * 9 / 10, "the flood was dropped by policy ({dropped} of {sent})");
        lab.shutdown()?;
    }
    Ok(())
}
