//! `cargo xtask setup`: check for, and install when missing, everything the build, the tests and
//! the lab need on a Debian machine. Idempotent; when everything is present it only runs a few
//! quick queries.
//!
//! Prints one line per item: `ok`, `installing`, or `MISSING` with what to run.

use std::{
    env,
    ffi::OsString,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, run};

/// Debian packages: LLVM 22 for `bpf-linker`, and the lab's tools.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "iptables",
    "ipset",
    "iperf3",
    "prometheus",
    // scapy, for the lab's attack tests (forged packets from a pod's namespace).
    "python3-scapy",
    // A virtual environment for kubernetes-validate (PyPI), which checks deploy/'s manifests.
    "python3-venv",
    // A real browser for the HTML report's test (tests/explain_html.rs).
    "chromium",
    // The Windows build's C compiler (ring, under kube's rustls, builds C for the target).
    "gcc-mingw-w64-x86-64",
];

/// The Windows target the agent's HNS dataplane is built and linted for.
pub const WINDOWS_TARGET: &str = "x86_64-pc-windows-gnu";

/// The kubernetes-validate release installed when none is found (it bundles the Kubernetes
/// OpenAPI schemas, so validating needs no network).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where Debian's `llvm-22-dev` lives; `bpf-linker` is built against it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker release known to work with LLVM 22 (feature `llvm-22`, llvm-sys 221.x).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// One line of the report: `  ok          what`.
fn report(status: &str, what: &str) {
    println!("  {status:<11} {what}");
}

pub fn setup() -> Result<()> {
    println!("setup: checking the toolchain and the lab's packages");
    let root = is_root();
    let mut missing_manual: Vec<String> = Vec::new();

    let debs_ok = debian_packages(root, &mut missing_manual)?;
    let nightly_ok = nightly_toolchain(&mut missing_manual)?;
    lint_components()?;
    windows_target()?;
    bpf_linker(debs_ok && nightly_ok, &mut missing_manual)?;
    kubernetes_validate(debs_ok, &mut missing_manual)?;

    if !missing_manual.is_empty() {
        eprintln!("setup: some requirements are missing; install them with:");
        for line in &missing_manual {
            eprintln!("    {line}");
        }
        bail!("setup incomplete");
    }
    println!("setup: everything is in place");
    Ok(())
}

/// Checks the Debian packages with one `dpkg-query`, installs the missing ones as root with one
/// `apt-get update` and one `apt-get install`. Returns whether all of them are installed.
fn debian_packages(root: bool, manual: &mut Vec<String>) -> Result<bool> {
    if !Path::new("/usr/bin/dpkg-query").exists() {
        for pkg in DEBIAN_PACKAGES {
            report(
                "unknown",
                &format!("package {pkg} (not a Debian system; install its equivalent)"),
            );
        }
        // Not fatal: the equivalents may be there under other names.
        return Ok(true);
    }
    let installed = installed_debian_packages(DEBIAN_PACKAGES)?;
    let missing: Vec<&str> =
        DEBIAN_PACKAGES.iter().copied().filter(|pkg| !installed.iter().any(|i| i == pkg)).collect();
    for pkg in DEBIAN_PACKAGES {
        if !missing.contains(pkg) {
            report("ok", &format!("package {pkg}"));
        }
    }
    if missing.is_empty() {
        return Ok(true);
    }
    let list = missing.join(" ");
    if !root {
        for pkg in &missing {
            report("MISSING", &format!("package {pkg}"));
        }
        manual.push(format!("sudo apt-get update && sudo apt-get install -y {list}"));
        return Ok(false);
    }
    for pkg in &missing {
        report("installing", &format!("package {pkg}"));
    }
    run(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let installed = installed_debian_packages(&missing)?;
    let still: Vec<&str> =
        missing.iter().copied().filter(|pkg| !installed.iter().any(|i| i == pkg)).collect();
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(true)
}

/// Names among `pkgs` that dpkg reports as installed (`ii`).
fn installed_debian_packages(pkgs: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits 1 when some package is unknown; the output still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(pkgs)
        .stderr(Stdio::null())
        .output()
        .context("failed to run dpkg-query")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (name, status) = line.split_once(' ')?;
            status.starts_with("ii").then(|| name.split(':').next().unwrap_or(name).to_owned())
        })
        .collect())
}

/// The nightly toolchain and its `rust-src` component (aya-build uses `-Z build-std=core`).
fn nightly_toolchain(manual: &mut Vec<String>) -> Result<bool> {
    let Ok(list) = capture(Command::new("rustup").args(["toolchain", "list"])) else {
        report("MISSING", "rustup");
        manual.push(
            "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh   # then re-run setup"
                .to_owned(),
        );
        return Ok(false);
    };
    if list.lines().any(|l| l.starts_with("nightly-") || l.starts_with("nightly ")) {
        report("ok", "rust toolchain nightly");
    } else {
        report("installing", "rust toolchain nightly");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }

    let components = capture(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.trim() == "rust-src" || l.starts_with("rust-src")) {
        report("ok", "rust-src (nightly)");
    } else {
        report("installing", "rust-src (nightly)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(true)
}

/// rustfmt and clippy of the default toolchain (the test's format and lint gate).
fn lint_components() -> Result<()> {
    let components = capture(Command::new("rustup").args(["component", "list", "--installed"]))?;
    for c in ["rustfmt", "clippy"] {
        if components.lines().any(|l| l.starts_with(c)) {
            report("ok", c);
        } else {
            report("installing", c);
            run(Command::new("rustup").args(["component", "add", c]))?;
        }
    }
    Ok(())
}

/// The standard library of the Windows target (stable), for linting the Windows build.
fn windows_target() -> Result<()> {
    let targets = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if targets.lines().any(|l| l.trim() == WINDOWS_TARGET) {
        report("ok", WINDOWS_TARGET);
    } else {
        report("installing", WINDOWS_TARGET);
        run(Command::new("rustup").args(["target", "add", WINDOWS_TARGET]))?;
    }
    Ok(())
}

/// `bpf-linker`, built against Debian's LLVM 22.
fn bpf_linker(can_install: bool, manual: &mut Vec<String>) -> Result<()> {
    let install_cmd = format!(
        "LLVM_PREFIX={LLVM_PREFIX} LLVM_SYS_221_PREFIX={LLVM_PREFIX} cargo install bpf-linker \
         --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
    );
    if let Ok(version) = capture(Command::new("bpf-linker").arg("--version")) {
        report("ok", version.trim());
        return Ok(());
    }
    if !can_install {
        report("MISSING", "bpf-linker (needs llvm-22-dev and the nightly toolchain first)");
        manual.push(install_cmd);
        return Ok(());
    }
    report("installing", &format!("bpf-linker {BPF_LINKER_VERSION} (a few minutes)"));
    // bpf-linker's build script finds LLVM through LLVM_PREFIX (or the first llvm-config on
    // PATH); llvm-sys 221.x through LLVM_SYS_221_PREFIX. Set all three so neither picks up
    // another LLVM installed on the machine.
    let mut path = OsString::from(format!("{LLVM_PREFIX}/bin:"));
    path.push(env::var_os("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
        .env("PATH", path))
    .with_context(|| format!("installing bpf-linker failed; the command was: {install_cmd}"))?;
    let version = capture(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)")?;
    report("ok", version.trim());
    Ok(())
}

/// Where `kubernetes_validate` installs kubernetes-validate when it is not on `PATH`
/// (`npm-agent/tests/deploy_manifests.rs` looks there too).
fn kubernetes_validate_venv() -> std::path::PathBuf {
    crate::repo_root().join("target/tools/venv")
}

/// `kubernetes-validate` (PyPI), on `PATH` or in a virtual environment under `target/tools`.
fn kubernetes_validate(debs_ok: bool, manual: &mut Vec<String>) -> Result<()> {
    let venv = kubernetes_validate_venv();
    let tool = venv.join("bin/kubernetes-validate");
    for candidate in [Path::new("kubernetes-validate"), tool.as_path()] {
        if let Ok(version) = capture(Command::new(candidate).arg("--version")) {
            report("ok", &format!("kubernetes-validate {}", version.trim()));
            return Ok(());
        }
    }
    // Debian's python3 (with python3-venv, a package above) when there is one.
    let python =
        if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let spec = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    let install_cmd = format!("{python} -m venv {0} && {0}/bin/pip install {spec}", venv.display());
    if !debs_ok {
        report("MISSING", "kubernetes-validate (needs python3-venv first)");
        manual.push(install_cmd);
        return Ok(());
    }
    report("installing", &format!("{spec} into {}", venv.display()));
    let installed = run(Command::new(python).args(["-m", "venv"]).arg(&venv))
        .and_then(|()| run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", &spec])));
    if let Err(e) = installed {
        report("MISSING", &format!("kubernetes-validate ({e:#})"));
        manual.push(install_cmd);
        return Ok(());
    }
    let version = capture(Command::new(&tool).arg("--version"))
        .context("kubernetes-validate was installed but does not run")?;
    report("ok", &format!("kubernetes-validate {}", version.trim()));
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; an error if it cannot start or fails.
fn capture(cmd: &mut Command) -> Result<String> {
    let out =
        cmd.stderr(Stdio::null()).output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
