//! `npm-agent lab run` interrupted while its agents enforce: SIGINT or SIGTERM must leave no
//! namespace, agent process or pinned program, map or link behind.
//!
//! Root only; prints SKIPPED otherwise.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn with_prefix(dir: &str, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Agent processes of the lab: their command line names a pin root with the lab's prefix
/// (whoever their parent is now).
fn agents_with(prefix: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(&format!("/sys/fs/bpf/{prefix}")))
        .count()
}

fn interrupted(signal: i32) {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let cases: Vec<_> = std::fs::read_dir(&case)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_npm-agent"))
        .args(["lab", "run", "--dataplane", "ebpf"])
        .args(&cases)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = format!("npl-{}-", child.id());
    // Wait until the first case's agents have pinned their state.
    let deadline = Instant::now() + Duration::from_secs(30);
    while with_prefix("/sys/fs/bpf", &prefix).is_empty() || agents_with(&prefix) == 0 {
        assert!(Instant::now() < deadline, "the lab's agents never started");
        assert!(child.try_wait().unwrap().is_none(), "lab run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc_kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted run reports failure ({status})");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(with_prefix("/run/netns", &prefix), Vec::<String>::new(), "namespaces left");
    assert_eq!(with_prefix("/sys/fs/bpf", &prefix), Vec::<String>::new(), "pins left");
    assert_eq!(agents_with(&prefix), 0, "agents left");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn interrupted_lab_run_leaves_nothing() {
    if !root() {
        println!("SKIPPED interrupted_lab_run_leaves_nothing: needs root");
        return;
    }
    interrupted(2); // SIGINT
    interrupted(15); // SIGTERM
}
