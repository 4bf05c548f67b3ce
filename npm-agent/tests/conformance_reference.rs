//! The conformance suite through the reference evaluator instead of the compiler: checks the
//! cases' expectations against the specification as written, independently of the compiler
//! (the simulator test runs the same cases through the compiler).

use std::path::{Path, PathBuf};

use npm_agent::reference;
use npm_agent::simulate::{StateEnforcer, run_case};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        root.join("tests/conformance"),
        root.join("../shared/conformance/examples"),
        // ClusterNetworkPolicy: judged by the reference only (not compiled yet).
        root.join("../shared/conformance/cluster-network-policy"),
        root.join("tests/conformance/cluster-network-policy"),
        // Dual stack: the reference judges the IPv6 tables too (as the simulator does).
        root.join("tests/conformance/dual-stack"),
        root.join("deploy/examples"),
    ] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            files.extend(
                rd.map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml")),
            );
        }
    }
    files.sort();
    files
}

#[test]
fn every_case_agrees_with_the_reference_evaluator() {
    let files = cases();
    assert!(files.len() >= 40);
    let mut failures = Vec::new();
    for f in &files {
        let mut enforcer = StateEnforcer::new(reference::allowed);
        let report = run_case(f, &mut enforcer);
        if report.counts().failed > 0 {
            failures.push(npm_agent::simulate::report::render(&report));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
