//! The `simulate` command as a user meets it: exit status, the readable diff, JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_npm-agent"))
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn wrong_expectation_fails_with_a_readable_diff() {
    let out = bin()
        .arg("simulate")
        .arg(repo("npm-agent/tests/fixtures/wrong-expectation.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "must exit non-zero:\n{text}");
    assert!(text.contains("TCP/80    FAIL: 1 cells differ"), "{text}");
    assert!(text.contains("x/b -> x/a: expected ., observed X"), "{text}");
    assert!(text.contains("observed:"), "{text}");
    assert!(text.contains("rejected (not applied): invalid NetworkPolicy x/broken: spec.ingress[0].from[0].ipBlock.cidr"), "{text}");
    assert!(text.trim_end().ends_with("simulate: 0 passed, 1 failed"), "{text}");
}

#[test]
fn json_report_is_machine_readable() {
    let out = bin()
        .args(["simulate", "--json"])
        .arg(repo("npm-agent/tests/fixtures/wrong-expectation.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["failed"], 1);
    let table = &v["cases"][0]["steps"][0]["tables"][0];
    assert_eq!(table["status"], "fail");
    assert_eq!(table["diffs"][0]["from"], "x/b");
    assert_eq!(table["diffs"][0]["expected"], ".");
    assert_eq!(table["diffs"][0]["observed"], "X");
}

#[test]
fn the_shared_examples_and_the_suite_pass() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("tests/conformance"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(files.len() >= 40, "the suite has at least 40 cases");
    if let Ok(dir) = std::fs::read_dir(repo("../shared/conformance/examples")) {
        files.extend(
            dir.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")),
        );
    }
    let out = bin().arg("simulate").args(&files).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(" 0 failed"), "{text}");
}

#[test]
fn unreadable_case_is_an_error() {
    let dir = std::env::temp_dir().join(format!("npm-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(&f, "name: x\nsteps:\n- actions:\n  - explode: {}\n").unwrap();
    let out = bin().arg("simulate").arg(&f).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("ERROR"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
