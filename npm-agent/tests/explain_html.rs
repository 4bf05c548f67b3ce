//! `npm-agent explain --html` in a real browser (Debian's Chromium, headless): the page
//! renders, its script opens the explanation of the cell the address names, every cell's
//! verdict is `npm-agent explain --json`'s for that pair, and a screenshot is kept as a test
//! artifact (`target/test-artifacts/explain-report.png`). Without Chromium: SKIPPED, unless
//! NPM_REQUIRE_CHROMIUM is set (as `cargo xtask test` does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_npm-agent"))
}

fn chromium() -> Option<PathBuf> {
    let candidates = [std::env::var_os("NPM_CHROMIUM").map(PathBuf::from), Some("chromium".into())];
    candidates
        .into_iter()
        .flatten()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Chromium headless, as the machine's notes say to start it (no background networking: the
/// machine's network is closed).
fn headless(chromium: &Path, profile: &Path) -> Command {
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The attributes of every `<td …>` of a page.
fn cells(html: &str) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    for chunk in html.split("<td ").skip(1) {
        let tag = &chunk[..chunk.find('>').unwrap_or(chunk.len())];
        let mut attrs = BTreeMap::new();
        let mut rest = tag;
        while let Some(eq) = rest.find("=\"") {
            let name = rest[..eq].trim().to_string();
            let after = &rest[eq + 2..];
            let end = after.find('"').unwrap_or(after.len());
            attrs.insert(name, after[..end].to_string());
            rest = &after[(end + 1).min(after.len())..];
        }
        out.push(attrs);
    }
    out
}

#[test]
fn the_report_renders_in_chromium_and_its_cells_are_explains() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("NPM_REQUIRE_CHROMIUM").is_none(),
            "Chromium is required (NPM_REQUIRE_CHROMIUM) but not found"
        );
        println!("SKIPPED: no chromium (apt-get install chromium)");
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("explain-html");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let case = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance/47-union-of-policies.yaml");
    let page = dir.join("report.html");
    let status = agent()
        .arg("explain")
        .arg("--case")
        .arg(&case)
        .args(["--step", "1", "--port", "80/TCP", "--port", "53/UDP", "--html"])
        .arg(&page)
        .status()
        .unwrap();
    assert!(status.success());
    let written = std::fs::read_to_string(&page).unwrap();
    let all = cells(&written);
    assert_eq!(all.len(), 2 * 9 * 9, "two matrices of the case's nine pods");

    // Every cell is explain's verdict for that pair.
    for c in &all {
        let (probe_proto, probe_port) = c["data-probe"].split_once('/').unwrap();
        let out = agent()
            .arg("explain")
            .arg("--case")
            .arg(&case)
            .args(["--step", "1", "--json", "--from", &c["data-from"], "--to", &c["data-to"]])
            .args(["--port", &format!("{probe_port}/{probe_proto}")])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            c["data-allowed"],
            v["allowed"].to_string(),
            "{} -> {} {}",
            c["data-from"],
            c["data-to"],
            c["data-probe"]
        );
        assert_eq!(c["class"].starts_with("allow"), v["allowed"] == true);
    }

    // The page in the browser, the address naming y/b -> x/a on TCP/80 (admitted through
    // a-from-y's first peer after this step): the script selects it and explains it.
    let target = all
        .iter()
        .find(|c| c["data-from"] == "y/b" && c["data-to"] == "x/a" && c["data-probe"] == "TCP/80")
        .unwrap();
    let url = format!("file://{}#cell-{}", page.display(), target["data-id"]);
    let dom =
        headless(&chromium, &dir.join("profile")).arg("--dump-dom").arg(&url).output().unwrap();
    assert!(dom.status.success(), "{}", String::from_utf8_lossy(&dom.stderr));
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains(&format!("data-cell=\"{}\"", target["data-id"])), "the script ran");
    assert!(dom.contains("y/b -&gt; x/a TCP/80: ALLOWED"), "{dom}");
    assert!(dom.contains("admitted by: x/a-from-y spec.ingress[0].from[0]"), "{dom}");
    let rendered = cells(&dom);
    assert_eq!(rendered.len(), all.len());
    let selected: Vec<_> = rendered.iter().filter(|c| c["class"].contains("selected")).collect();
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0]["data-id"], target["data-id"]);

    // A screenshot, kept.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("explain-report.png");
    let _ = std::fs::remove_file(&png);
    let shot = headless(&chromium, &dir.join("profile"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{} bytes", bytes.len());
}

/// `simulate --html` writes every case's steps.
#[test]
fn simulate_writes_the_steps_of_every_case() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("simulate-html");
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("cases.html");
    let conformance = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance");
    let status = agent()
        .arg("simulate")
        .arg("--html")
        .arg(&page)
        .arg(conformance.join("47-union-of-policies.yaml"))
        .arg(conformance.join("31-egress-udp-port.yaml"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stdout));
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<section>").count(), 2 + 1, "two steps of 47, one of 31");
    assert!(html.contains("<h3>UDP/81</h3>"), "31's step expects UDP/81");
    let denied = cells(&html).iter().filter(|c| c["data-allowed"] == "false").count();
    assert!(denied > 0);
}
