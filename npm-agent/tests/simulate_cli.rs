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

/// Runs `npm-agent simulate` on `path`; fails the test if it does not exit within 10 s.
/// Its address space is capped (2 GiB), so a build that reads an endless file fails fast
/// instead of taking the machine's memory.
fn simulate_promptly(path: &Path) -> (bool, String) {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = bin();
    cmd.arg("simulate")
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 2 << 30, rlim_max: 2 << 30 };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("npm-agent simulate {} did not exit within 10 s", path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn a_fifo_or_a_device_as_a_case_is_an_error_not_a_hang() {
    // Opening a FIFO waits for a writer (forever); /dev/zero never ends. Both are refused
    // at once, naming the path.
    let dir = std::env::temp_dir().join(format!("npm-sim-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("case.yaml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (ok, text) = simulate_promptly(&fifo);
    assert!(!ok, "{text}");
    assert!(text.contains("case.yaml: not a regular file (a FIFO)"), "{text}");

    let (ok, text) = simulate_promptly(Path::new("/dev/zero"));
    assert!(!ok, "{text}");
    assert!(text.contains("/dev/zero: not a regular file (a character device)"), "{text}");

    // A huge (sparse) file is refused by its size, not read.
    let big = dir.join("big.yaml");
    std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
    let (ok, text) = simulate_promptly(&big);
    assert!(!ok, "{text}");
    assert!(text.contains("big.yaml: larger than 64 MiB"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_fields_and_invalid_lists_reject_the_policy() {
    let out = bin()
        .arg("simulate")
        .arg(repo("npm-agent/tests/fixtures/unknown-fields.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for rejected in [
        "invalid NetworkPolicy x/allow-web: spec.ingress[0].form: unknown field",
        "invalid NetworkPolicy x/match-typo: spec.podSelector.matchLabel: unknown field",
        "invalid NetworkPolicy x/port-typo: spec.ingress[0].port: unknown field",
        "invalid NetworkPolicy x/types: spec.policyTypes: may not specify more than two policyTypes",
    ] {
        assert!(
            text.contains(&format!("rejected (not applied): {rejected}")),
            "{rejected}:\n{text}"
        );
    }
    assert!(out.status.success(), "only deny-a applies:\n{text}");
}

/// Runs `npm-agent simulate` on a case written to a scratch file.
fn simulate_text(name: &str, case: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("npm-sim-strict-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("case.yaml");
    std::fs::write(&f, case).unwrap();
    let out = bin().arg("simulate").arg(&f).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

const ALL_ALLOWED: &str = "    table: |
      from\\to x/a x/b x/c y/a y/b y/c z/a z/b z/c
      x/a     .   .   .   .   .   .   .   .   .
      x/b     .   .   .   .   .   .   .   .   .
      x/c     .   .   .   .   .   .   .   .   .
      y/a     .   .   .   .   .   .   .   .   .
      y/b     .   .   .   .   .   .   .   .   .
      y/c     .   .   .   .   .   .   .   .   .
      z/a     .   .   .   .   .   .   .   .   .
      z/b     .   .   .   .   .   .   .   .   .
      z/c     .   .   .   .   .   .   .   .   .
";

#[test]
fn misspelled_case_keys_are_errors_naming_the_key() {
    // The case format's own keys: `expects:` for `expect:`, `action:` for `actions:`, a
    // pod's `label:`; and a namespace's `label:`, which the `{name, labels}` form used to
    // drop silently (the namespace then had the default labels).
    for (name, case, key) in [
        ("expects", format!("name: t\nsteps:\n- description: d\n  expects:\n  - port: 80\n    protocol: TCP\n{ALL_ALLOWED}"), "steps[0].expects"),
        ("action", format!("name: t\nsteps:\n- action: []\n  expect:\n  - port: 80\n    protocol: TCP\n{ALL_ALLOWED}"), "steps[0].action"),
        ("label", "name: t\nmodel:\n  namespaces: [{name: x, label: {team: a}}]\nsteps: []\n".to_string(), "model.namespaces[0].label"),
        ("pod-key", "name: t\nmodel:\n  namespaces: [x]\n  pods: [{namespace: x, pod: a, label: {a: b}}]\nsteps: []\n".to_string(), "model.pods[0].label"),
    ] {
        let (ok, text) = simulate_text(name, &case);
        assert!(!ok, "{name}: {text}");
        assert!(text.contains("not a valid case") && text.contains(key) && text.contains("unknown field"), "{name}: {text}");
    }
}

#[test]
fn documented_case_keys_are_read() {
    // FORMAT.md's keys: those whose values this runner supports run; the others are refused
    // saying what is not supported, never as unknown keys.
    let case = format!(
        "name: documented keys\nmodel:\n  ip-families: [IPv4]\nsteps:\n- description: d\n  actions:\n  \
         - create-pod: {{namespace: x, pod: d, ips: [10.240.0.200]}}\n  \
         - delete-pod: {{namespace: x, pod: d}}\n  \
         - delete-policy: {{kind: NetworkPolicy, namespace: x, name: none}}\n  expect:\n  - port: 80\n    protocol: TCP\n    family: IPv4\n    sctp: false\n{ALL_ALLOWED}"
    );
    let (ok, text) = simulate_text("documented", &case);
    assert!(ok, "{text}");
    // A dual-stack model's tables of either family run.
    let dual = case
        .replace("[IPv4]", "[IPv4, IPv6]")
        .replace("ips: [10.240.0.200]", "ips: [10.240.0.200, 'fd00:10:240::200']");
    let (ok, text) = simulate_text("dual", &dual);
    assert!(ok, "{text}");
    let (ok, text) = simulate_text("dual-v6", &dual.replace("family: IPv4", "family: IPv6"));
    assert!(ok, "{text}");
    for (name, case, words) in [
        (
            "v6-table-single-stack",
            case.replace("family: IPv4", "family: IPv6"),
            "has no V6 address",
        ),
        (
            "cnp-namespace",
            case.replace("kind: NetworkPolicy", "kind: ClusterNetworkPolicy"),
            "a ClusterNetworkPolicy is cluster-scoped: no namespace",
        ),
        (
            "v6-pod",
            case.replace("ips: [10.240.0.200]", "ips: [10.240.0.200, 'fd00:10:240::200']"),
            "IPv6 needs ip-families with IPv6",
        ),
    ] {
        let (ok, text) = simulate_text(name, &case);
        assert!(!ok, "{name}: {text}");
        assert!(text.contains(words) && !text.contains("unknown field"), "{name}: {text}");
    }
}

#[test]
fn every_case_file_loads() {
    // The suite, the shared examples and the deploy examples.
    let mut files = Vec::new();
    for dir in [
        "tests/conformance",
        "tests/conformance/cluster-network-policy",
        "tests/conformance/dual-stack",
        "../shared/conformance/examples",
        "../shared/conformance/cluster-network-policy",
        "deploy/examples",
    ] {
        let Ok(listing) = std::fs::read_dir(repo(dir)) else { continue };
        files.extend(
            listing
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml")),
        );
    }
    assert!(files.len() >= 44, "{files:?}");
    for f in files {
        let case = npm_agent::simulate::case::load(&f).unwrap_or_else(|e| panic!("{e:#}"));
        npm_agent::simulate::case::CaseCluster::new(&case)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}
