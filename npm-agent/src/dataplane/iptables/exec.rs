//! Running the programs of the iptables dataplane: which backend (nft or legacy) the node's
//! rules use, and a runner that starts `iptables-*`, `ipset` and friends in one network
//! namespace. The dataplane (`kernel`) and its observer (`observe`) both run through it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::names::Family;

/// The iptables backend (the same rules through two kernel interfaces).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "nft" => Some(Backend::Nft),
            "legacy" => Some(Backend::Legacy),
            _ => None,
        }
    }

    pub fn restore_program(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save_program(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }

    pub fn restore6_program(self) -> &'static str {
        match self {
            Backend::Nft => "ip6tables-nft-restore",
            Backend::Legacy => "ip6tables-legacy-restore",
        }
    }

    pub fn save6_program(self) -> &'static str {
        match self {
            Backend::Nft => "ip6tables-nft-save",
            Backend::Legacy => "ip6tables-legacy-save",
        }
    }

    /// The restore program of a family's rules.
    pub fn restore_for(self, f: Family) -> &'static str {
        match f {
            Family::V4 => self.restore_program(),
            Family::V6 => self.restore6_program(),
        }
    }

    /// The save program of a family's rules.
    pub fn save_for(self, f: Family) -> &'static str {
        match f {
            Family::V4 => self.save_program(),
            Family::V6 => self.save6_program(),
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Nft => Backend::Legacy,
            Backend::Legacy => Backend::Nft,
        }
    }
}

/// The environment variable that forces a backend (`nft` or `legacy`).
pub const BACKEND_ENV: &str = "NPM_IPTABLES_BACKEND";

/// Runs programs in one network namespace.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    netns: Option<PathBuf>,
}

/// A finished process: whether it succeeded, and what it printed.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Runner {
    pub fn new(netns: Option<PathBuf>) -> Self {
        Self { netns }
    }

    pub(super) fn command(&self, program: &str) -> std::io::Result<Command> {
        match &self.netns {
            Some(ns) => crate::netns::command(ns, program),
            None => Ok(Command::new(program)),
        }
    }

    pub(super) fn run(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> std::io::Result<Output> {
        let mut cmd = self.command(program)?;
        cmd.args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(text) = input {
            let mut stdin = child.stdin.take().expect("piped stdin");
            // A write error means the program exited early; its status says why.
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output()?;
        Ok(Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }

    /// A program's output, or why it did not run or failed.
    pub fn read(&self, program: &str, args: &[&str]) -> Result<String, String> {
        match self.run(program, args, None) {
            Ok(o) if o.ok => Ok(o.stdout),
            Ok(o) => Err(o.stderr),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A program's output when it exists and succeeds.
    pub(super) fn output(&self, program: &str, args: &[&str]) -> Option<String> {
        self.run(program, args, None).ok().filter(|o| o.ok).map(|o| o.stdout)
    }
}

/// The legacy (x_tables) tables that exist in the runner's network namespace. Reading them
/// with `iptables-legacy-save` would create the tables it names, so the legacy backend is
/// only read where it already holds tables.
fn legacy_tables(runner: &Runner, f: Family) -> Vec<String> {
    let names = match f {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    };
    runner
        .output("cat", &[names])
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether a backend may hold tables here (nft always may: reading it creates nothing).
pub fn may_hold(runner: &Runner, backend: Backend, table: &str) -> bool {
    may_hold_for(runner, backend, Family::V4, table)
}

/// The same, for a family's tables (iptables' or ip6tables').
pub fn may_hold_for(runner: &Runner, backend: Backend, f: Family, table: &str) -> bool {
    backend == Backend::Nft || legacy_tables(runner, f).iter().any(|t| t == table)
}

/// Picks the backend the node's rules use, as Azure NPM v2 does: kube-proxy's hint chain
/// `KUBE-IPTABLES-HINT` (or the kubelet's `KUBE-KUBELET-CANARY`) in the mangle table of nft,
/// then of legacy; without either, the backend that already holds this layout's chains, else
/// the one holding more rules, else nft. Returns the backend and why.
pub fn detect_backend(runner: &Runner) -> (Backend, String) {
    if let Some(b) = std::env::var(BACKEND_ENV).ok().as_deref().and_then(Backend::parse) {
        return (b, format!("{BACKEND_ENV}={}", b.as_str()));
    }
    for b in [Backend::Nft, Backend::Legacy] {
        if !may_hold(runner, b, "mangle") {
            continue;
        }
        if let Some(out) = runner.output(b.save_program(), &["-t", "mangle"]) {
            for hint in ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"] {
                if out.lines().any(|l| l.starts_with(&format!(":{hint} "))) {
                    return (
                        b,
                        format!("kube-proxy's hint chain {hint} is in iptables-{}", b.as_str()),
                    );
                }
            }
        }
    }
    let mut seen = Vec::new();
    for b in [Backend::Nft, Backend::Legacy] {
        if b == Backend::Legacy && legacy_tables(runner, Family::V4).is_empty() {
            // Installed or not, it holds nothing here.
            if runner.output(b.save_program(), &["--version"]).is_some() {
                seen.push((b, 0, false));
            }
            continue;
        }
        let Some(out) = runner.output(b.save_program(), &[]) else { continue };
        let rules = out.lines().filter(|l| l.starts_with("-A ")).count();
        let ours = out.lines().any(|l| l.starts_with(":AZURE-NPM"));
        seen.push((b, rules, ours));
    }
    let ours: Vec<_> = seen.iter().filter(|s| s.2).collect();
    if ours.len() == 1 {
        return (ours[0].0, format!("iptables-{} holds the AZURE-NPM chains", ours[0].0.as_str()));
    }
    match seen.as_slice() {
        [] => (Backend::Nft, "no iptables-save ran; assuming nft".into()),
        [(b, _, _)] => (*b, format!("only iptables-{} is available", b.as_str())),
        [(a, ra, _), (b, rb, _)] => {
            if rb > ra {
                (*b, format!("iptables-{} holds more rules ({rb} against {ra})", b.as_str()))
            } else if ra > rb {
                (*a, format!("iptables-{} holds more rules ({ra} against {rb})", a.as_str()))
            } else {
                (
                    Backend::Nft,
                    "no hint chain and no rules in either backend; nft by default".into(),
                )
            }
        }
        _ => unreachable!(),
    }
}
