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
