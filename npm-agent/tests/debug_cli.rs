//! `npm-agent debug gettuples` and `convertiptable` on a node's saved tables: the iptables
//! layout of a case (the translator's batches taken by the host model, saved as
//! `iptables-save` and `ipset save` print them), asked about connections the case's table
//! decides.

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::path::PathBuf;
use std::process::Command;

use npm_agent::dataplane::iptables::emulator::TableEmulator;
use npm_agent::dataplane::iptables::names::policy_chain;
use npm_agent::dataplane::iptables::translate::RuleTranslator;
use npm_agent::plan::Plan;
use scenarios::*;

#[test]
fn gettuples_walks_the_rules_and_convertiptable_takes_them_apart() {
    let path = manifest_dir().join("../tests/conformance/47-union-of-policies.yaml");
    let mut t = RuleTranslator::new();
    let mut kernel = TableEmulator::default();
    for b in t.reconcile(&Plan::default(), &kernel.state()) {
        kernel.apply(&b).unwrap();
    }
    // After the first step: x/a admits namespace y (a-from-y) and x/c (all-from-c).
    for step in plans(&path).into_iter().take(2) {
        for b in t.translate(&step.diff) {
            kernel.apply(&b).unwrap();
        }
    }
    let (ipset, iptables) = kernel.save();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debug-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let (rules, sets) = (dir.join("iptables-save.txt"), dir.join("ipset-save.txt"));
    // (A node's table holds others' rules too: they are left out.)
    std::fs::write(
        &rules,
        format!(
            "# node\n*filter\n:KUBE-FORWARD - [0:0]\n-A FORWARD -j KUBE-FORWARD\n{}",
            iptables.trim_start_matches("*filter\n")
        ),
    )
    .unwrap();
    std::fs::write(&sets, format!("create KUBE-X hash:ip family inet\n{ipset}")).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
            .arg("debug")
            .args(args)
            .arg("--iptables-save")
            .arg(&rules)
            .arg("--ipset-save")
            .arg(&sets)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // y/b (10.240.1.11) -> x/a (10.240.0.10): through a-from-y's chain.
    let (code, text, err) =
        run(&["gettuples", "-s", "10.240.1.11", "-d", "10.240.0.10", "--port", "80/TCP"]);
    assert_eq!(code, Some(0), "{text}{err}");
    assert!(text.contains("ALLOWED"), "{text}");
    let chain = policy_chain(true, "x/a-from-y");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with(&format!("{chain}:"))
            && l.contains("ALLOW-FROM-nslabel-ns:y")),
        "{text}"
    );
    // x/b (10.240.0.11) -> x/a: isolated, nothing admits it.
    let (code, text, _) = run(&["gettuples", "-s", "10.240.0.11", "-d", "10.240.0.10"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("DROPPED") && text.contains("DROP-ALL"), "{text}");
    // z/a (10.240.2.10) -> y/a (10.240.1.10): no policy there.
    let (code, text, _) = run(&["gettuples", "-s", "10.240.2.10", "-d", "10.240.1.10"]);
    assert_eq!(code, Some(0), "{text}");
    // convertiptable: every AZURE-NPM rule, taken apart.
    let (code, text, _) = run(&["convertiptable"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rules = v.as_array().unwrap();
    assert_eq!(rules.len(), iptables.lines().filter(|l| l.starts_with("-A AZURE-NPM")).count());
    assert!(
        rules.iter().any(|r| r["chain"] == chain.as_str()
            && r["comment"] == "ALLOW-FROM-nslabel-ns:y"
            && r["sets"][0]["flags"] == "src"),
        "{text}"
    );
}
