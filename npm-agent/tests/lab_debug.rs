//! `npm-agent debug gettuples` against a running lab agent in eBPF mode: read from the maps
//! the agent pinned, the programs' own decision code judges a new connection at each end's
//! veth; its verdicts are those of real packets probed through the same lab. Without root:
//! prints SKIPPED.

use std::net::IpAddr;
use std::process::Command;

mod lab_common;

use lab_common::UnionLab;
use npm_agent::model::{ObjectKey, Protocol};

#[test]
fn gettuples_answers_from_the_pinned_maps_as_packets_do() {
    let Some(UnionLab { lab, cluster }) = UnionLab::start("ebpf", 1, &[]) else {
        return;
    };
    let ip = |ns: &str, name: &str| -> IpAddr {
        cluster.pods().find(|p| p.key == ObjectKey::new(ns, name)).and_then(|p| p.ip).unwrap()
    };
    let pin_root = lab.pin_root(0);
    let gettuples = |src: IpAddr, dst: IpAddr| {
        let out = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
            .args(["debug", "gettuples", "-s", &src.to_string(), "-d", &dst.to_string()])
            .args(["--port", "80/TCP", "--pin-root"])
            .arg(&pin_root)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let pods: Vec<(String, IpAddr)> = ["x/a", "x/b", "x/c", "y/b"]
        .iter()
        .map(|k| {
            let (ns, n) = k.split_once('/').unwrap();
            (k.to_string(), ip(ns, n))
        })
        .collect();
    let keys: Vec<&str> = pods.iter().map(|(k, _)| k.as_str()).collect();
    let probed = lab
        .lab()
        .probe_matrix(&keys, Protocol::Tcp, 80, std::time::Duration::from_secs(2))
        .unwrap();
    for (i, (sk, s)) in pods.iter().enumerate() {
        for (j, (dk, d)) in pods.iter().enumerate() {
            if i == j {
                continue;
            }
            let (code, text) = gettuples(*s, *d);
            let want = if probed[i][j] { Some(0) } else { Some(1) };
            assert_eq!(code, want, "{sk} -> {dk}: packets say {}\n{text}", probed[i][j]);
        }
    }
    // The deciding reasons are named.
    let (_, text) = gettuples(ip("y", "b"), ip("x", "a"));
    assert!(text.contains("ingress at") && text.contains("passed"), "{text}");
    let (_, text) = gettuples(ip("x", "b"), ip("x", "a"));
    assert!(text.contains("DROPPED (denied"), "{text}");
    lab.shutdown().unwrap();
}
