//! Golden-test scenarios: conformance cases (the project's, and a few of
//! `tests/golden/scenarios/`), replayed through the compiler into one plan per step, for the
//! dataplane translations to be printed and compared with golden files.
//!
//! Included with `#[path = "golden/scenarios.rs"] mod scenarios;`.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use npm_agent::compile::{Engine, Scope};
use npm_agent::model::Node;
use npm_agent::plan::{Plan, PlanDiff};
use npm_agent::simulate::case::{self, ActionOutcome, CaseCluster, SIM_NODE};
use npm_agent::state::Event;

/// The address of the node every scenario pod runs on.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 224, 0, 4);

/// One step of a scenario: its description, the diff that led to it and the plan after it.
pub struct StepPlan {
    pub description: String,
    pub diff: PlanDiff,
    pub plan: Plan,
}

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The scenarios: (golden file stem, case file).
pub fn scenarios() -> Vec<(String, PathBuf)> {
    let conformance = manifest_dir().join("../tests/conformance");
    let mut v: Vec<(String, PathBuf)> = [
        // default deny and allow-all, by direction
        "02-default-deny-ingress",
        "03-default-deny-egress",
        "04-default-deny-ingress-and-egress",
        "05-allow-all-ingress-after-deny",
        // selectors (matchExpressions: the negative ones are expanded to the pods they match)
        "08-podselector-matchlabels",
        "09-matchexpressions-in",
        "10-matchexpressions-notin",
        "11-matchexpressions-exists",
        "12-matchexpressions-doesnotexist",
        "15-namespaceselector-alone",
        "17-ns-and-pod-selector-one-peer",
        // ipBlock
        "21-ipblock-pod-ip-32",
        "22-ipblock-literal-cidrs",
        "23-ipblock-except",
        "25-ipblock-all-except",
        // ports and protocols
        "26-port-number",
        "28-port-range-endport",
        "29-protocol-only-udp",
        "30-sctp-ingress",
        "31-egress-udp-port",
        "33-named-port-ingress",
        "34-named-port-ingress-per-pod",
        "35-named-port-egress-per-pod",
        // several rules and policies, pods coming and going
        "47-union-of-policies",
        "53-create-pod",
        "60-ipblock-or-selector-peers",
    ]
    .iter()
    .map(|s| (s.to_string(), conformance.join(format!("{s}.yaml"))))
    .collect();
    let own = manifest_dir().join("tests/golden/scenarios");
    let mut extra: Vec<PathBuf> = std::fs::read_dir(&own)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect()
        })
        .unwrap_or_default();
    extra.sort();
    for p in extra {
        v.push((p.file_stem().unwrap().to_string_lossy().into_owned(), p));
    }
    v
}

/// Scenarios with ClusterNetworkPolicies, for the dataplanes that render tiers: (golden file
/// stem, case file).
pub fn tier_scenarios() -> Vec<(String, PathBuf)> {
    let dir = manifest_dir().join("../tests/conformance/cluster-network-policy");
    ["02-pass-ranges-relabels"]
        .iter()
        .map(|s| (format!("cluster-{s}"), dir.join(format!("{s}.yaml"))))
        .collect()
}

/// Dual-stack cases (`tests/conformance/dual-stack`): blocks of both families, named ports
/// and port ranges over both.
pub fn dual_stack_scenarios() -> Vec<(String, PathBuf)> {
    let dir = manifest_dir().join("../tests/conformance/dual-stack");
    ["01-ipblocks-match-their-own-family", "128-port-range-endport", "133-named-port-ingress"]
        .iter()
        .map(|s| (format!("dual-stack-{s}"), dir.join(format!("{s}.yaml"))))
        .collect()
}

/// Scenarios of the HNS golden test only (dual stack): `tests/golden/scenarios/hns/`.
pub fn hns_scenarios() -> Vec<(String, PathBuf)> {
    let dir = manifest_dir().join("tests/golden/scenarios/hns");
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The node's IPv6 address, in dual-stack scenarios.
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x224, 0, 0, 0, 0, 4);

/// Replays a case: the node's plan after its model, then after each step. In a dual-stack
/// model the node has an IPv6 address too.
pub fn plans(path: &Path) -> Vec<StepPlan> {
    let c = case::load(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let mut cluster = CaseCluster::new(&c).expect("case model");
    let dual_stack = c
        .model
        .as_ref()
        .and_then(|m| m.ip_families.as_ref())
        .is_some_and(|f| f.iter().any(|f| f == "IPv6"));
    let mut engine =
        Engine::new(Scope::Node(SIM_NODE.into())).with_layout().with_cluster_policies();
    let mut diff = engine.handle(Event::UpsertNode(Node {
        name: SIM_NODE.into(),
        addresses: if dual_stack {
            vec![IpAddr::V4(NODE_IP), IpAddr::V6(NODE_IPV6)]
        } else {
            vec![IpAddr::V4(NODE_IP)]
        },
        ..Default::default()
    }));
    for e in cluster.initial_events() {
        diff.extend(engine.handle(e));
    }
    let mut out =
        vec![StepPlan { description: "the model, no policy".into(), diff, plan: engine.plan() }];
    for step in &c.steps {
        let mut diff = PlanDiff::default();
        for a in &step.actions {
            if let ActionOutcome::Events(events) = cluster.action(a).expect("action") {
                for e in events {
                    diff.extend(engine.handle(e));
                }
            }
        }
        out.push(StepPlan { description: step.description.clone(), diff, plan: engine.plan() });
    }
    out
}

/// Compares `actual` with the golden file, or writes it when `UPDATE_GOLDEN=1`.
pub fn check_golden(path: &Path, actual: &str) -> Result<(), String> {
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(path, actual).map_err(|e| format!("writing {}: {e}", path.display()))?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()))?;
    if expected == actual {
        return Ok(());
    }
    let first = expected
        .lines()
        .zip(actual.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(expected.lines().count().min(actual.lines().count()));
    Err(format!(
        "{} differs from the translation at line {} (UPDATE_GOLDEN=1 rewrites it):\n  golden: {:?}\n  actual: {:?}",
        path.display(),
        first + 1,
        expected.lines().nth(first),
        actual.lines().nth(first)
    ))
}
