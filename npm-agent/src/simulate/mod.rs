//! Running conformance cases: the case format ([`case`]), tables ([`table`]), and a runner
//! that replays a case's steps against an [`Enforcer`] — the compiler for `simulate`, real
//! network namespaces for the lab — and reports every table.

pub mod case;
pub mod report;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::compile::{Engine, Scope};
use crate::model::{Pod, Protocol};
use crate::plan::{Connection, Plan, connection_allowed};
use crate::state::Event;
use case::{ActionOutcome, CaseCluster};
use table::{Cell, CellDiff, Table};

/// Where a case's steps are applied and its tables observed.
pub trait Enforcer {
    /// Applies events (in order) and returns once they are enforced.
    fn apply(&mut self, cluster: &CaseCluster, events: &[Event]) -> anyhow::Result<()>;
    /// Observes every (client, server) pair of `pods` for one protocol and port:
    /// `result[i][j]` is whether `pods[i]` reached `pods[j]`.
    fn probe(
        &mut self,
        cluster: &CaseCluster,
        pods: &[&Pod],
        protocol: Protocol,
        port: u16,
    ) -> anyhow::Result<Vec<Vec<bool>>>;
    /// Whether SCTP can be probed.
    fn supports_sctp(&self) -> bool;
    /// Whether IPv6 can be probed (dual-stack tables): the compiler's plan and the reference
    /// judge both families; the lab probes both (what a dataplane enforces of IPv6 is what its
    /// IPv6 tables then show). An enforcer that cannot has its IPv6 tables reported as errors.
    fn supports_ipv6(&self) -> bool {
        false
    }
}

/// The offline enforcer: the incremental compiler, its diffs applied to a plan, and the plan
/// evaluated the way a dataplane evaluates it.
pub struct CompilerEnforcer {
    engine: Engine,
    plan: Plan,
}

impl Default for CompilerEnforcer {
    fn default() -> Self {
        Self { engine: Engine::new(Scope::Cluster).with_cluster_policies(), plan: Plan::default() }
    }
}

impl Enforcer for CompilerEnforcer {
    fn apply(&mut self, _: &CaseCluster, events: &[Event]) -> anyhow::Result<()> {
        for e in events {
            let diff = self.engine.handle(e.clone());
            self.plan
                .apply(&diff)
                .map_err(|err| anyhow::anyhow!("compiler produced an inconsistent diff: {err}"))?;
        }
        Ok(())
    }

    fn probe(
        &mut self,
        _: &CaseCluster,
        pods: &[&Pod],
        protocol: Protocol,
        port: u16,
    ) -> anyhow::Result<Vec<Vec<bool>>> {
        Ok(pods
            .iter()
            .map(|src| {
                pods.iter()
                    .map(|dst| {
                        let conn = Connection {
                            src: src.ip.expect("case pods have addresses"),
                            dst: dst.ip.expect("case pods have addresses"),
                            protocol,
                            port,
                        };
                        src.key == dst.key || connection_allowed(&self.plan, &self.plan, &conn)
                    })
                    .collect()
            })
            .collect())
    }

    fn supports_sctp(&self) -> bool {
        true
    }

    fn supports_ipv6(&self) -> bool {
        true
    }
}

/// An enforcer that keeps the cluster's objects and answers each probe with a function of
/// them: for other evaluators of the same questions (the reference evaluator, `explain`),
/// held to the cases' tables as the compiler is.
pub struct StateEnforcer<F> {
    pub state: crate::state::ClusterState,
    verdict: F,
}

impl<F> StateEnforcer<F>
where
    F: Fn(&crate::state::ClusterState, std::net::IpAddr, std::net::IpAddr, Protocol, u16) -> bool,
{
    /// `verdict(state, src, dst, protocol, port)` answers the probes.
    pub fn new(verdict: F) -> Self {
        Self { state: crate::state::ClusterState::default(), verdict }
    }
}

impl<F> Enforcer for StateEnforcer<F>
where
    F: Fn(&crate::state::ClusterState, std::net::IpAddr, std::net::IpAddr, Protocol, u16) -> bool,
{
    fn apply(&mut self, _: &CaseCluster, events: &[Event]) -> anyhow::Result<()> {
        for e in events {
            self.state.apply(e);
        }
        Ok(())
    }

    fn probe(
        &mut self,
        _: &CaseCluster,
        pods: &[&Pod],
        protocol: Protocol,
        port: u16,
    ) -> anyhow::Result<Vec<Vec<bool>>> {
        let ip = |p: &Pod| p.ip.expect("case pods have addresses");
        Ok(pods
            .iter()
            .map(|s| {
                pods.iter()
                    .map(|d| (self.verdict)(&self.state, ip(s), ip(d), protocol, port))
                    .collect()
            })
            .collect())
    }

    fn supports_sctp(&self) -> bool {
        true
    }

    fn supports_ipv6(&self) -> bool {
        true
    }
}

/// The outcome of one expect table.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum TableOutcome {
    Pass,
    Fail { diffs: Vec<CellDiff> },
    Skipped { reason: String },
    Error { message: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    pub protocol: String,
    pub port: u16,
    pub sctp: bool,
    #[serde(flatten)]
    pub outcome: TableOutcome,
    pub expected: Option<Table>,
    pub observed: Option<Table>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub description: String,
    /// Objects the API server would have rejected: reported and not applied.
    pub rejected: Vec<String>,
    pub tables: Vec<TableReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseReport {
    pub file: PathBuf,
    pub name: String,
    /// A problem with the case itself (unreadable, bad action): the case fails.
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
}

impl CaseReport {
    pub fn counts(&self) -> Tally {
        let mut c = Tally::default();
        if self.error.is_some() {
            c.failed += 1;
        }
        for t in self.steps.iter().flat_map(|s| &s.tables) {
            match t.outcome {
                TableOutcome::Pass => c.passed += 1,
                TableOutcome::Fail { .. } | TableOutcome::Error { .. } => c.failed += 1,
                TableOutcome::Skipped { .. } => c.skipped += 1,
            }
        }
        c
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// Runs one case file against an enforcer.
pub fn run_case(path: &Path, enforcer: &mut dyn Enforcer) -> CaseReport {
    let mut report = CaseReport {
        file: path.to_path_buf(),
        name: String::new(),
        error: None,
        steps: Vec::new(),
    };
    let case = match case::load(path) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(format!("{e:#}"));
            return report;
        }
    };
    report.name = case.name.clone();
    if let Err(e) = run_steps(&case, enforcer, &mut report) {
        report.error = Some(e);
    }
    report
}

/// Runs a case given as text (for the fuzzer): what [`run_case`] does after reading the file.
pub fn run_case_text(text: &str, enforcer: &mut dyn Enforcer) -> CaseReport {
    let mut report =
        CaseReport { file: PathBuf::new(), name: String::new(), error: None, steps: Vec::new() };
    match case::parse(text) {
        Ok(case) => {
            report.name = case.name.clone();
            if let Err(e) = run_steps(&case, enforcer, &mut report) {
                report.error = Some(e);
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

fn run_steps(
    case: &case::Case,
    enforcer: &mut dyn Enforcer,
    report: &mut CaseReport,
) -> Result<(), String> {
    let mut cluster = CaseCluster::new(case)?;
    enforcer
        .apply(&cluster, &cluster.initial_events())
        .map_err(|e| format!("setting up the model: {e:#}"))?;
    for (i, step) in case.steps.iter().enumerate() {
        let mut sr = StepReport {
            description: step.description.clone(),
            rejected: Vec::new(),
            tables: Vec::new(),
        };
        let mut events = Vec::new();
        for action in &step.actions {
            match cluster.action(action).map_err(|e| format!("step {}: {e}", i + 1))? {
                ActionOutcome::Events(e) => events.extend(e),
                ActionOutcome::Rejected(invalid) => sr.rejected.push(invalid.to_string()),
            }
        }
        enforcer
            .apply(&cluster, &events)
            .map_err(|e| format!("step {}: applying: {e:#}", i + 1))?;
        for expect in &step.expect {
            sr.tables.push(check_table(&cluster, enforcer, expect));
        }
        report.steps.push(sr);
    }
    Ok(())
}

/// Probes one expect table and compares it.
pub fn check_table(
    cluster: &CaseCluster,
    enforcer: &mut dyn Enforcer,
    expect: &case::Expect,
) -> TableReport {
    let mut tr = TableReport {
        protocol: expect.protocol.clone(),
        port: expect.port,
        sctp: expect.sctp,
        outcome: TableOutcome::Pass,
        expected: None,
        observed: None,
    };
    let expected = match Table::parse(&expect.table) {
        Ok(t) => t,
        Err(e) => {
            tr.outcome = TableOutcome::Error { message: format!("bad table: {e}") };
            return tr;
        }
    };
    tr.expected = Some(expected.clone());
    let v6 = match expect.family.as_deref() {
        None | Some("IPv4") => false,
        Some("IPv6") if enforcer.supports_ipv6() => true,
        Some("IPv6") => {
            tr.outcome = TableOutcome::Error {
                message: "family IPv6: IPv6 is not enforced yet (only IPv4 tables are run here)"
                    .into(),
            };
            return tr;
        }
        Some(f) => {
            tr.outcome = TableOutcome::Error { message: format!("family {f}: IPv4 or IPv6") };
            return tr;
        }
    };
    let Some(protocol) = Protocol::parse(&expect.protocol.to_uppercase()) else {
        tr.outcome =
            TableOutcome::Error { message: format!("unknown protocol {:?}", expect.protocol) };
        return tr;
    };
    if (expect.sctp || protocol == Protocol::Sctp) && !enforcer.supports_sctp() {
        tr.outcome =
            TableOutcome::Skipped { reason: "SCTP is not available on this kernel".into() };
        return tr;
    }
    let observed = match observe(cluster, enforcer, v6, protocol, expect.port) {
        Ok(t) => t,
        Err(e) => {
            tr.outcome = TableOutcome::Error { message: format!("probing: {e:#}") };
            return tr;
        }
    };
    tr.outcome = match table::compare(&expected, &observed) {
        Ok(d) if d.is_empty() => TableOutcome::Pass,
        Ok(diffs) => TableOutcome::Fail { diffs },
        Err(message) => TableOutcome::Error { message },
    };
    tr.observed = Some(observed);
    tr
}

/// The observed table of every pod pair for one protocol and port.
/// `v6`: probes go between the pods' IPv6 addresses, else their IPv4 ones (each pod's `ip`
/// is, for the enforcer, its address of that family).
pub fn observe(
    cluster: &CaseCluster,
    enforcer: &mut dyn Enforcer,
    v6: bool,
    protocol: Protocol,
    port: u16,
) -> anyhow::Result<Table> {
    use crate::model::IpFamily;
    let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
    let owned: Vec<Pod> = cluster
        .pods()
        .map(|p| {
            let ip = p.address(family).ok_or_else(|| {
                anyhow::anyhow!(
                    "pod {} has no {family:?} address (see the model's ip-families)",
                    p.key
                )
            })?;
            Ok(Pod { ip: Some(ip), ..p.clone() })
        })
        .collect::<anyhow::Result<_>>()?;
    let pods: Vec<&Pod> = owned.iter().collect();
    let matrix = enforcer.probe(cluster, &pods, protocol, port)?;
    let names: Vec<String> = pods.iter().map(|p| p.key.to_string()).collect();
    Ok(Table {
        columns: names.clone(),
        rows: names
            .iter()
            .zip(&matrix)
            .map(|(n, row)| (n.clone(), row.iter().map(|a| Cell::from_allowed(*a)).collect()))
            .collect(),
    })
}

/// `npm-agent simulate`: runs every case through the compiler, prints the report, and
/// exits 0 only when every table passed.
pub fn cli(paths: &[PathBuf], json: bool) -> ExitCode {
    let reports: Vec<CaseReport> =
        paths.iter().map(|p| run_case(p, &mut CompilerEnforcer::default())).collect();
    report::print(&reports, json, "simulate")
}
