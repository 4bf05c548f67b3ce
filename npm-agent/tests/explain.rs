//! `npm-agent explain` against the specification: every cell of the conformance suite (the
//! cases' tables, as `simulate` checks them) is explain's verdict; on random clusters, every
//! connection's verdict is the reference evaluator's; a side is allowed exactly when it is not isolated,
//! comes from its own node, or some rule part is named as admitting it; and each rule part
//! named admits the connection on its own (the reference evaluator, given a cluster whose only
//! policy is that part, allows it).

mod common;

use std::path::{Path, PathBuf};

use proptest::prelude::*;

use common::*;
use npm_agent::compile::explain::{Side, explain};
use npm_agent::model::{Direction, PortSpec, Protocol, Rule};
use npm_agent::reference::{self, End};
use npm_agent::simulate::{StateEnforcer, run_case};
use npm_agent::state::{ClusterState, Event};

#[test]
fn explain_answers_every_cell_of_the_conformance_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [root.join("tests/conformance"), root.join("../shared/conformance/examples")] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            files.extend(
                rd.map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml")),
            );
        }
    }
    assert!(files.len() >= 40, "{files:?}");
    let mut failures = Vec::new();
    for f in &files {
        // Every verdict is explain's.
        let mut enforcer = StateEnforcer::new(|state: &ClusterState, src, dst, protocol, port| {
            explain(state, src, dst, protocol, port).allowed
        });
        let report = run_case(f, &mut enforcer);
        if report.counts().failed > 0 {
            failures.push(npm_agent::simulate::report::render(&report));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The command: text naming the deciding rule, JSON, and the verdict as the exit status.
#[test]
fn the_command_names_the_rule_and_exits_with_the_verdict() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/47-union-of-policies.yaml");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_npm-agent"))
            .arg("explain")
            .arg("--case")
            .arg(&case)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // After the first step x/a admits namespace y through a-from-y's first peer.
    let (code, text, _) = run(&["--step", "1", "--from", "y/b", "--to", "x/a", "--port", "80/TCP"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ALLOWED"), "{text}");
    assert!(text.contains("admitted by: x/a-from-y spec.ingress[0].from[0]"), "{text}");
    assert!(text.contains("selected by: x/a-from-y, x/all-from-c"), "{text}");
    // After the second step (a-from-y deleted) nothing admits it.
    let (code, text, _) = run(&["--from", "y/b", "--to", "x/a", "--port", "80/TCP", "--json"]);
    assert_eq!(code, Some(1), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["ingress"]["policies"][0]["name"], "all-from-c");
    assert_eq!(v["ingress"]["admitted_by"].as_array().map(Vec::len), Some(0));
    // Bad input: named, exit 2.
    let (code, _, err) = run(&["--from", "x/nope", "--to", "x/a"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no pod x/nope"), "{err}");
    let (code, _, err) = run(&["--from", "x/a", "--to", "x/b", "--port", "80/ICMP"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown protocol"), "{err}");
}

/// Every question worth asking of `state`: two distinct addresses that at most one pod
/// claims each, a packet between which is not dropped as spoofed, on each protocol and port.
fn questions(state: &ClusterState) -> Vec<(End, End, Protocol, u16)> {
    let ips = addresses(state);
    let mut out = Vec::new();
    for &src in &ips {
        for &dst in &ips {
            if src == dst
                || src.is_ipv4() != dst.is_ipv4()
                || !claimed_once(state, src)
                || !claimed_once(state, dst)
            {
                continue;
            }
            let (a, b) = (End::at(state, src), End::at(state, dst));
            if reference::arrives_spoofed(state, &a, &b) {
                continue;
            }
            for protocol in Protocol::ALL {
                for port in PORTS {
                    out.push((a.clone(), b.clone(), protocol, port));
                }
            }
        }
    }
    out
}

fn claimed_once(state: &ClusterState, ip: std::net::IpAddr) -> bool {
    state.pods.values().filter(|p| p.is_endpoint() && p.has_address(ip)).count() <= 1
}

/// The rule part `path` (`spec.ingress[1].from[0]` and `spec.ingress[1].ports[0]`) of a
/// policy, alone.
fn part(rules: &[Rule], peer: &str, port: Option<&str>) -> Rule {
    let index = |s: &str, after: &str| -> usize {
        let at = s.find(after).unwrap() + after.len();
        s[at..].split(']').next().unwrap().parse().unwrap()
    };
    let list = if peer.contains("ingress") { "ingress[" } else { "egress[" };
    let rule = &rules[index(peer, list)];
    let peers = match peer.rsplit_once('.') {
        Some((_, p)) if p.starts_with("from[") || p.starts_with("to[") => {
            let j: usize = p.split('[').nth(1).unwrap().trim_end_matches(']').parse().unwrap();
            vec![rule.peers[j].clone()]
        }
        _ => Vec::new(),
    };
    let ports: Vec<PortSpec> = match port {
        Some(p) => vec![rule.ports[index(p, "ports[")].clone()],
        None => Vec::new(),
    };
    Rule { peers, ports }
}

fn check_side(
    state: &ClusterState,
    s: &Side,
    src: &End,
    dst: &End,
    protocol: Protocol,
    port: u16,
) -> Result<(), TestCaseError> {
    let Some(pod) = &s.pod else {
        prop_assert!(s.allowed && s.policies.is_empty() && s.admitted_by.is_empty());
        return Ok(());
    };
    let peer = if s.direction == Direction::Egress { dst.ip } else { src.ip };
    let own_node = s
        .node
        .as_ref()
        .and_then(|n| state.nodes.get(n))
        .is_some_and(|n| n.addresses.contains(&peer));
    if !s.policies.is_empty() && !own_node {
        prop_assert_eq!(s.allowed, !s.admitted_by.is_empty(), "{:?}", s);
        prop_assert_eq!(s.allowed, !s.entries.is_empty(), "the plan's entries: {:?}", s);
    }
    for r in &s.admitted_by {
        let policy = &state.policies[&r.policy];
        let rules = policy.rules(s.direction).unwrap();
        let alone = part(rules, &r.peer, r.port.as_deref());
        let mut only = state.clone();
        let mut p = policy.clone();
        match s.direction {
            Direction::Ingress => (p.ingress, p.egress) = (Some(vec![alone]), None),
            Direction::Egress => (p.ingress, p.egress) = (None, Some(vec![alone])),
        }
        only.policies.clear();
        only.policies.insert(p.key.clone(), p);
        prop_assert!(
            reference::allowed_between(&only, src, dst, protocol, port),
            "{} of {} does not admit {:?} -> {:?} {}/{} alone",
            r,
            pod,
            src,
            dst,
            protocol,
            port
        );
    }
    Ok(())
}

/// `state` after `events`: every question's verdict is the specification's, and each side's
/// explanation holds (see [`check_side`]).
fn explains_like_the_specification(
    state: &ClusterState,
    events: &[Event],
) -> Result<(), TestCaseError> {
    let mut current = state.clone();
    for e in events {
        current.apply(e);
    }
    for (a, b, protocol, port) in questions(&current) {
        let e = explain(&current, a.ip, b.ip, protocol, port);
        let want = reference::allowed_between(&current, &a, &b, protocol, port);
        prop_assert_eq!(e.allowed, want, "{:#?}", e);
        check_side(&current, &e.egress, &a, &b, protocol, port)?;
        check_side(&current, &e.ingress, &a, &b, protocol, port)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn explain_agrees_with_the_specification(state in cluster(), events in proptest::collection::vec(event(), 0..8)) {
        explains_like_the_specification(&state, &events)?;
    }

    /// With ClusterNetworkPolicies: the verdict is the specification's, and a side a tier's
    /// rule decides names that policy among those selecting the pod.
    #[test]
    fn explain_with_tiers_agrees_with_the_specification(state in tiered_cluster(), events in proptest::collection::vec(tiered_event(), 0..6)) {
        let mut current = state.clone();
        for e in &events {
            current.apply(e);
        }
        for (a, b, protocol, port) in questions(&current) {
            let e = explain(&current, a.ip, b.ip, protocol, port);
            let want = reference::allowed_between(&current, &a, &b, protocol, port);
            prop_assert_eq!(e.allowed, want, "{:#?}", e);
            for side in [&e.egress, &e.ingress] {
                if let Some(rest) = side.reason.split("ClusterNetworkPolicy ").nth(1) {
                    let name = rest.split(' ').next().unwrap();
                    prop_assert!(side.cluster_policies.iter().any(|p| p == name), "{:#?}", side);
                }
            }
        }
    }
}

proptest! {
    // (Twice the addresses, four times the questions: fewer cases.)
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]

    /// Dual stack: questions between IPv6 addresses (and IPv4 ones) of the same pods.
    #[test]
    fn explain_agrees_with_the_specification_dual_stack(state in dual_stack_cluster(), events in proptest::collection::vec(dual_stack_event(), 0..8)) {
        explains_like_the_specification(&state, &events)?;
    }
}
