//! Project tasks, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `setup`: install what the build and the lab need (idempotent, quick when all is there).
//! - `test`:  setup, build, unit and integration tests, the metrics' deploy files checked with
//!   promtool and a real Prometheus on a lab agent, deploy/'s manifests checked with
//!   kubernetes-validate, the simulator on every conformance case.
//! - `demo`:  setup, build, run the simulator on `deploy/examples/*.yaml`.
//! - `bench`: `cargo bench -p npm-agent`, extra arguments passed through.

mod setup;

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project tasks of the NetworkPolicy enforcer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check for and install the toolchain (nightly, rust-src, bpf-linker) and the lab's packages.
    Setup,
    /// Setup, build everything, run all tests and the simulator on every conformance case.
    Test,
    /// Setup, build, and show the example application of deploy/examples on a lab cluster
    /// enforced by eBPF agents (the simulator's tables without root).
    Demo {
        /// Keep the lab cluster up for exploration (Ctrl-C removes it).
        #[arg(long)]
        hold: bool,
    },
    /// Run each cargo-fuzz target of fuzz/ (manifests, case, frame) for a while, seeded with
    /// the project's manifests and cases (installs cargo-fuzz when missing; nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run the benchmarks (`cargo bench -p npm-agent`); extra arguments are passed through.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::setup(),
        Task::Test => test(),
        Task::Demo { hold } => demo(hold),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's directory). `cargo run` sets
/// `CARGO_MANIFEST_DIR` for the program it runs; the path baked in at compile time is the fallback
/// when the binary is run directly.
fn repo_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().expect("xtask lives in the workspace root").to_path_buf()
}

/// A `cargo` command run from the workspace root.
fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root());
    cmd
}

/// Runs `cmd` with inherited stdio; an error unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("failed to start {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    // `$CARGO` is a full toolchain path; its file name is enough for the log.
    let program = Path::new(cmd.get_program());
    let mut s = program.file_name().unwrap_or(program.as_os_str()).to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Whether this process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The `*.yaml` files of `dir`, sorted; `None` if the directory does not exist.
fn yaml_files(dir: &Path) -> Result<Option<Vec<PathBuf>>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(Some(files))
}

/// `npm-agent simulate FILES...` through `cargo run`, or a printed skip when there are no files.
fn simulate(what: &str, dirs: &[&Path]) -> Result<()> {
    agent_on_cases(what, dirs, &["simulate"])
}

/// `npm-agent lab run --dataplane DP FILES...` (as root) over the cases of `dirs`.
fn lab(what: &str, dataplane: &str, dirs: &[&Path]) -> Result<()> {
    if !is_root() {
        println!("SKIP: {what}: the lab needs root (network namespaces, eBPF)");
        return Ok(());
    }
    agent_on_cases(what, dirs, &["lab", "run", "--dataplane", dataplane])
}

/// Runs `npm-agent ARGS FILES...` with the cases of `dirs`; missing directories are skipped.
fn agent_on_cases(what: &str, dirs: &[&Path], args: &[&str]) -> Result<()> {
    let mut files = Vec::new();
    for dir in dirs {
        match yaml_files(dir)? {
            None => println!("SKIP: {what}: {} does not exist", dir.display()),
            Some(f) => files.extend(f),
        }
    }
    if files.is_empty() {
        println!("SKIP: {what}: no *.yaml case");
        return Ok(());
    }
    run(cargo()
        .args(["run", "--package", "npm-agent", "--"])
        .args(args)
        .args(files.iter().map(|f| relative_to_root(f))))
}

/// `path` relative to the workspace root (where the commands run) when it is inside the root or
/// its parent directory, so command lines stay short; otherwise unchanged.
fn relative_to_root(path: &Path) -> PathBuf {
    let root = repo_root();
    if let Ok(rel) = path.strip_prefix(&root) {
        return rel.to_path_buf();
    }
    match root.parent().map(|parent| path.strip_prefix(parent)) {
        Some(Ok(rel)) => Path::new("..").join(rel),
        _ => path.to_path_buf(),
    }
}

/// One step of a task: a name for the log and the work.
struct Step {
    name: &'static str,
    /// Whether later steps are pointless when this one fails (setup, build).
    gate: bool,
    run: Box<dyn Fn() -> Result<()>>,
}

impl Step {
    fn new(name: &'static str, run: impl Fn() -> Result<()> + 'static) -> Self {
        Self { name, gate: false, run: Box::new(run) }
    }

    fn gate(name: &'static str, run: impl Fn() -> Result<()> + 'static) -> Self {
        Self { name, gate: true, run: Box::new(run) }
    }
}

/// Runs the steps in order, printing each name and a summary. A failed gate step stops the run;
/// other failures are collected and the run goes on. An error if any step failed.
fn run_steps(task: &str, steps: Vec<Step>) -> Result<()> {
    let started = Instant::now();
    let mut results: Vec<(&'static str, Option<Result<()>>)> = Vec::new();
    let mut stopped = false;
    for step in &steps {
        if stopped {
            results.push((step.name, None));
            continue;
        }
        println!("\n==> {task}: {}", step.name);
        let t = Instant::now();
        let result = (step.run)();
        match &result {
            Ok(()) => println!("<== {}: ok ({:.1?})", step.name, t.elapsed()),
            Err(err) => println!("<== {}: FAILED ({:.1?}): {err:#}", step.name, t.elapsed()),
        }
        stopped = result.is_err() && step.gate;
        results.push((step.name, Some(result)));
    }

    println!("\n{task} summary ({:.1?}):", started.elapsed());
    let mut failed = 0;
    for (name, result) in &results {
        let status = match result {
            Some(Ok(())) => "ok",
            Some(Err(_)) => {
                failed += 1;
                "FAILED"
            }
            None => "not run",
        };
        println!("  {status:<8} {name}");
    }
    let passed = results.iter().filter(|(_, r)| matches!(r, Some(Ok(())))).count();
    println!("{task}: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{task}: {failed} step(s) failed");
    }
    Ok(())
}

fn test() -> Result<()> {
    let root = repo_root();
    let shared_examples = root
        .parent()
        .map(|parent| parent.join("shared/conformance/examples"))
        .unwrap_or_else(|| PathBuf::from("../shared/conformance/examples"));
    let own_cases = root.join("tests/conformance");
    let steps = vec![
        Step::gate("setup", setup::setup),
        Step::gate("build", || run(cargo().args(["build", "--workspace", "--all-targets"]))),
        Step::new("format (cargo fmt --check) and lints (cargo clippy -D warnings)", || {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))
        }),
        Step::new(
            "the Windows build (HNS dataplane): cargo clippy -D warnings for x86_64-pc-windows-gnu",
            || {
                run(cargo().args(["clippy", "--package", "npm-agent", "--lib", "--bins"]).args([
                    "--target",
                    setup::WINDOWS_TARGET,
                    "--",
                    "-D",
                    "warnings",
                ]))
            },
        ),
        Step::new("unit and integration tests", || {
            run(cargo()
                .args(["test", "--workspace", "--no-fail-fast"])
                .env("NPM_REQUIRE_CHROMIUM", "1"))
        }),
        Step::new(
            "metrics: promtool on deploy/prometheus and deploy/grafana, a real Prometheus on a lab agent",
            || {
                run(cargo()
                    .args(["test", "--package", "npm-agent"])
                    .args([
                        "--test",
                        "metrics_promtool",
                        "--test",
                        "metrics_endpoints",
                        "--test",
                        "metrics_lab",
                    ])
                    .env("NPM_REQUIRE_PROMTOOL", "1"))
            },
        ),
        Step::new(
            "deploy manifests: kubernetes-validate (Kubernetes 1.30 to 1.34 schemas, strict) and what the agent needs of them",
            || {
                run(cargo()
                    .args(["test", "--package", "npm-agent", "--test", "deploy_manifests"])
                    .env("NPM_REQUIRE_KUBERNETES_VALIDATE", "1"))
            },
        ),
        Step::new(
            "simulate tests/conformance (and its cluster-network-policy and dual-stack cases)",
            move || {
                let tiers = own_cases.join("cluster-network-policy");
                let dual = own_cases.join("dual-stack");
                simulate("the project's conformance cases", &[&own_cases, &tiers, &dual])
            },
        ),
        Step::new("simulate shared conformance examples (and cluster-network-policy)", {
            let shared_examples = shared_examples.clone();
            move || {
                let tiers = shared_examples.with_file_name("cluster-network-policy");
                simulate("the shared conformance examples", &[&shared_examples, &tiers])
            }
        }),
        Step::new(
            "lab (eBPF): conformance cases and shared examples with real packets, ClusterNetworkPolicy and dual-stack cases included",
            {
                let own = root.join("tests/conformance");
                let shared_examples = shared_examples.clone();
                move || {
                    let own_tiers = own.join("cluster-network-policy");
                    let own_dual = own.join("dual-stack");
                    let shared_tiers = shared_examples.with_file_name("cluster-network-policy");
                    lab(
                        "the lab in eBPF mode",
                        "ebpf",
                        &[&own, &own_tiers, &own_dual, &shared_examples, &shared_tiers],
                    )
                }
            },
        ),
        // (The cross-dataplane differential test, tests/lab_differential.rs, runs with the
        // integration tests.)
        Step::new(
            "lab (iptables): conformance cases and shared examples with real packets, ClusterNetworkPolicy and dual-stack cases included",
            {
                let own = root.join("tests/conformance");
                move || {
                    let own_tiers = own.join("cluster-network-policy");
                    let own_dual = own.join("dual-stack");
                    let shared_tiers = shared_examples.with_file_name("cluster-network-policy");
                    lab(
                        "the lab in iptables mode",
                        "iptables",
                        &[&own, &own_tiers, &own_dual, &shared_examples, &shared_tiers],
                    )
                }
            },
        ),
    ];
    run_steps("test", steps)
}

fn demo(hold: bool) -> Result<()> {
    let example = repo_root().join("deploy/examples/shop-web-api-db.yaml");
    let examples = repo_root().join("deploy/examples");
    let steps = vec![
        Step::gate("setup", setup::setup),
        Step::gate("build", || run(cargo().args(["build", "--package", "npm-agent"]))),
        Step::new(
            "the example application on a lab cluster, enforced by the eBPF agents",
            move || {
                if !is_root() {
                    println!(
                        "The lab needs root (network namespaces, eBPF); showing the simulator's tables instead."
                    );
                    return simulate("the demo cases", &[&examples]);
                }
                let mut cmd = cargo();
                cmd.args(["run", "--package", "npm-agent", "--", "lab", "demo"]);
                if hold {
                    cmd.arg("--hold");
                }
                run(cmd.arg(relative_to_root(&example)))
            },
        ),
    ];
    run_steps("demo", steps)
}

/// `cargo +nightly fuzz run` of every target, each for `seconds`, with a corpus (under
/// fuzz/corpus, not committed) seeded from the project's YAML.
fn fuzz(seconds: u64) -> Result<()> {
    let root = repo_root();
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let seeds: Vec<PathBuf> =
        [root.join("tests/conformance"), root.join("deploy"), root.join("deploy/examples")]
            .iter()
            .filter_map(|d| yaml_files(d).ok().flatten())
            .flatten()
            .collect();
    for target in ["manifests", "case", "frame"] {
        let corpus = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        if target != "frame" {
            for s in &seeds {
                std::fs::copy(s, corpus.join(s.file_name().expect("file")))?;
            }
        }
        println!("==> fuzz {target} for {seconds} s");
        run(Command::new("cargo")
            .current_dir(root.join("fuzz"))
            // The eBPF object is not needed by any target (and would not build instrumented).
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .args(["--", &format!("-max_total_time={seconds}"), "-max_len=16384", "-timeout=10"]))?;
    }
    Ok(())
}

fn bench(args: &[OsString]) -> Result<()> {
    run(cargo().args(["bench", "--package", "npm-agent"]).args(args))
}
