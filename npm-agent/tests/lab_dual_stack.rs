//! Dual-stack and single-stack IPv6 clusters in the lab, with real agents of each dataplane:
//! without any policy, every pod reaches every pod over IPv6 (TCP and UDP), and, in a dual
//! stack cluster, over IPv4 as well. The case runner hands the lab its `family: IPv6` tables
//! (the lab supports IPv6). Whether the dataplanes enforce IPv6 policies is not tested here.
//!
//! Root only (network namespaces, eBPF, iptables); prints SKIPPED otherwise.

use std::path::PathBuf;

use npm_agent::lab::{LabCluster, LabOptions, net};
use npm_agent::simulate::{Enforcer, TableOutcome, report, run_case_text};

fn table() -> String {
    let pods = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];
    let mut t = format!("from\\to {}\n", pods.join(" "));
    for p in pods {
        t += &format!("{p} {}\n", [". "; 9].concat().trim_end());
    }
    t
}

fn case(families: &str, v4: bool) -> String {
    let indent = |t: String| t.lines().map(|l| format!("      {l}\n")).collect::<String>();
    let mut expect = String::new();
    for (protocol, family) in [("TCP", "IPv6"), ("UDP", "IPv6"), ("TCP", "IPv4")] {
        if family == "IPv4" && !v4 {
            continue;
        }
        expect += &format!(
            "  - port: 80\n    protocol: {protocol}\n    family: {family}\n    table: |\n{}",
            indent(table())
        );
    }
    format!(
        "name: '{families} without policies'\nmodel:\n  ip-families: {families}\nsteps:\n\
         - description: no policies, everything is allowed\n  expect:\n{expect}"
    )
}

fn run(dataplane: &str, families: &str, v4: bool) {
    if let Err(e) = net::check_environment() {
        println!("SKIPPED {dataplane} {families}: the lab needs root and iproute2: {e:#}");
        return;
    }
    let mut opts = LabOptions::new(dataplane, 2);
    opts.agent = PathBuf::from(env!("CARGO_BIN_EXE_npm-agent"));
    let mut lab = LabCluster::new(opts).expect("building the lab");
    assert!(lab.supports_ipv6());
    let text = case(families, v4);
    let r = run_case_text(&text, &mut lab);
    let rendered = report::render(&r);
    println!("{rendered}");
    assert!(r.error.is_none(), "{text}\n{rendered}");
    assert!(lab.lab().has_ipv6());
    // Every pod has its IPv6 address, and an IPv4 one only in a dual-stack cluster.
    for p in lab.lab().pods() {
        assert!(p.ipv6.is_some(), "{p:?}");
        assert_eq!(p.ip.is_some(), v4, "{p:?}");
    }
    lab.shutdown().expect("cleanup");
    let tables: Vec<_> = r.steps.iter().flat_map(|s| &s.tables).collect();
    assert_eq!(tables.len(), if v4 { 3 } else { 2 }, "{rendered}");
    for t in tables {
        assert!(matches!(t.outcome, TableOutcome::Pass), "{dataplane} {families}:\n{rendered}");
    }
}

#[test]
fn ebpf_dual_stack_without_policies_allows_everything() {
    run("ebpf", "[IPv4, IPv6]", true);
}

#[test]
fn ebpf_ipv6_single_stack_without_policies_allows_everything() {
    run("ebpf", "[IPv6]", false);
}

#[test]
fn iptables_dual_stack_without_policies_allows_everything() {
    run("iptables", "[IPv4, IPv6]", true);
}

#[test]
fn iptables_ipv6_single_stack_without_policies_allows_everything() {
    run("iptables", "[IPv6]", false);
}
