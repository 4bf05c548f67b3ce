//! Running the batches: `ipset -exist restore` and `iptables-restore -w <s> -T filter
//! --noflush` of the chosen backend, in the current network namespace (or the one the
//! configuration names), each batch one process; the backend chosen as kube-proxy's hint
//! chains say; reconciling with what the kernel holds at start-up; cleanup.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::exec::{Backend, Runner, detect_backend, may_hold_for};
use super::guard::{self, Guard};
use super::names::{Family, is_layout_set};
use super::observe::IptablesObserver;
use super::saved::KernelState;
use super::translate::{self, Batch, RuleTranslator, STEP_DEL_SETS, Tool};
use crate::dataplane::azure::AzureSets;
use crate::dataplane::observe::Observer;
use crate::dataplane::{Applied, Dataplane, DataplaneError};
use crate::plan::{Layout, Plan, PlanDiff};

const NAME: &str = "iptables";

#[derive(Clone, Debug)]
pub struct IptablesConfig {
    /// `None`: detected (see [`detect_backend`]), unless [`BACKEND_ENV`] says.
    pub backend: Option<Backend>,
    /// Run every command in this network namespace (tests, benchmarks); `None`: the
    /// process's own.
    pub netns: Option<PathBuf>,
    /// How long `iptables-restore` waits for the xtables lock (`-w`).
    pub wait_seconds: u32,
    /// Tries per batch before it is reported as failed.
    pub attempts: u32,
    /// How often the layout's anchor is checked once the plan is in place: the FORWARD jump
    /// put back first when another program moved or removed it (as Azure NPM's reconcile
    /// does), a missing AZURE-NPM chain reported so the next apply resynchronizes. `None`:
    /// never.
    pub guard_interval: Option<Duration>,
}

impl Default for IptablesConfig {
    fn default() -> Self {
        Self {
            backend: None,
            netns: None,
            wait_seconds: 60,
            attempts: 3,
            guard_interval: Some(Duration::from_secs(30)),
        }
    }
}

/// Counters of the dataplane's work (for logs and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Processes run (`ipset restore`, `iptables-restore`).
    pub processes: u64,
    /// Commands in those processes' scripts.
    pub commands: u64,
    /// Batches that failed at least once.
    pub retried: u64,
    /// Batches that failed every try.
    pub failed: u64,
    /// Time spent in the processes, in microseconds.
    pub busy_us: u64,
}

/// What a diff's batches added: rules (`-A`, `-I`), sets and members (`create`, `add`).
fn applied(batches: &[Batch]) -> Applied {
    let mut a = Applied::default();
    for b in batches {
        let lines = || b.script.lines();
        match b.tool {
            Tool::Iptables | Tool::Ip6tables => {
                a.rules_added |= lines().any(|l| l.starts_with("-A ") || l.starts_with("-I "))
            }
            Tool::Ipset => {
                a.sets_added |= lines().any(|l| l.starts_with("create ") || l.starts_with("add "))
            }
        }
    }
    a
}

/// The line a restore program names in its error (`line 3 failed`, `Error in line 3:`).
fn failed_line(stderr: &str) -> Option<usize> {
    for pat in ["Error in line ", "line "] {
        if let Some(i) = stderr.find(pat) {
            let digits: String =
                stderr[i + pat.len()..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

fn describe_failure(batch: &Batch, stderr: &str) -> String {
    match failed_line(stderr).and_then(|n| batch.script.lines().nth(n.wrapping_sub(1))) {
        Some(line) => format!("{stderr} (the line: {line})"),
        None => stderr.to_string(),
    }
}

/// The iptables + ipset dataplane.
pub struct IptablesDataplane {
    config: IptablesConfig,
    runner: Runner,
    backend: Backend,
    backend_reason: String,
    /// IPv4's translator (iptables), then IPv6's (ip6tables).
    translators: [RuleTranslator; 2],
    /// Whether ip6tables holds the IPv6 layout: from the first layout change naming an IPv6
    /// address or block (`translate::names_ipv6`); until then it is left empty, which costs a
    /// single-stack cluster nothing (no local endpoint has an IPv6 address, and the source
    /// guard keeps pods from sending any). Shared with the guard thread.
    ipv6: Arc<AtomicBool>,
    /// The layout the kernel holds (as of the last apply or reconcile): a burst's diffs are
    /// applied as one net move from it.
    layout: Layout,
    /// The layout's sets by their kernel names, for the observer: Azure NPM's counts are of
    /// these (the dataplane's own sets, `transition`, the groups' and the guard's, are not
    /// Azure NPM's).
    azure_sets: Arc<Mutex<AzureSets>>,
    /// The source checks (see [`guard`]).
    guard: Guard,
    stats: ApplyStats,
    /// Set by the guard when the layout's base was removed under the agent.
    damaged: Arc<AtomicBool>,
    /// Stops the guard thread.
    stop_guard: Arc<AtomicBool>,
    guard_started: bool,
}

impl Drop for IptablesDataplane {
    fn drop(&mut self) {
        self.stop_guard.store(true, Ordering::SeqCst);
    }
}

impl IptablesDataplane {
    /// Checks that `ipset` and the backend's `iptables-restore` run, and picks the backend.
    pub fn open(config: IptablesConfig) -> Result<Self, DataplaneError> {
        let runner = Runner::new(config.netns.clone());
        let unsupported = |reason: String| DataplaneError::Unsupported { dataplane: NAME, reason };
        match runner.run("ipset", &["version"], None) {
            Ok(o) if o.ok => {}
            Ok(o) => return Err(unsupported(format!("`ipset version` failed: {}", o.stderr))),
            Err(e) => return Err(unsupported(format!("ipset: {e}"))),
        }
        let (backend, backend_reason) = match config.backend {
            Some(b) => (b, "configured".to_string()),
            None => detect_backend(&runner),
        };
        match runner.run(backend.restore_program(), &["--version"], None) {
            Ok(o) if o.ok => {}
            Ok(o) => {
                return Err(unsupported(format!(
                    "{} --version failed: {}",
                    backend.restore_program(),
                    o.stderr
                )));
            }
            Err(e) => return Err(unsupported(format!("{}: {e}", backend.restore_program()))),
        }
        tracing::info!(backend = backend.as_str(), reason = %backend_reason, "iptables backend");
        Ok(Self {
            config,
            runner,
            backend,
            backend_reason,
            translators: Family::BOTH.map(RuleTranslator::for_family),
            ipv6: Arc::new(AtomicBool::new(false)),
            layout: Layout::default(),
            azure_sets: Arc::default(),
            guard: Guard::default(),
            stats: ApplyStats::default(),
            damaged: Arc::new(AtomicBool::new(false)),
            stop_guard: Arc::new(AtomicBool::new(false)),
            guard_started: false,
        })
    }

    /// Starts the guard (see [`IptablesConfig::guard_interval`]) once, in this thread's
    /// network namespace.
    fn start_guard(&mut self) {
        let Some(every) = self.config.guard_interval else { return };
        if self.guard_started {
            return;
        }
        self.guard_started = true;
        let (runner, backend, wait) = (self.runner.clone(), self.backend, self.config.wait_seconds);
        let (damaged, stop) = (self.damaged.clone(), self.stop_guard.clone());
        let ipv6 = self.ipv6.clone();
        let spawned = std::thread::Builder::new().name("iptables-guard".into()).spawn(move || {
            let step = Duration::from_millis(200);
            loop {
                let mut waited = Duration::ZERO;
                while waited < every {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(step);
                    waited += step;
                }
                if let Err(e) = guard_once(&runner, backend, wait, &damaged, &ipv6) {
                    tracing::warn!(error = %e, "checking the FORWARD jump to AZURE-NPM");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "not guarding the FORWARD jump");
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Why the backend was chosen.
    pub fn backend_reason(&self) -> &str {
        &self.backend_reason
    }

    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    /// IPv4's translator.
    pub fn translator(&self) -> &RuleTranslator {
        self.translator_of(Family::V4)
    }

    pub fn translator_of(&self, f: Family) -> &RuleTranslator {
        &self.translators[f as usize]
    }

    /// Whether ip6tables holds the IPv6 layout (see the field).
    pub fn ipv6_active(&self) -> bool {
        self.ipv6.load(Ordering::SeqCst)
    }

    /// What the kernel holds of the policy layout, through the dataplane's backend (the
    /// guard's sets, which the guard keeps itself, left out): IPv4's (iptables and the
    /// `azure-npm-` sets), then IPv6's (ip6tables and the `inet6:azure-npm-` sets).
    pub fn read_state(&self) -> Result<[KernelState; 2], DataplaneError> {
        read_state(&self.runner, self.backend)
    }

    /// Brings the guard's sets to the endpoints' veths as the routes show them now, and, when
    /// `chains`, its chains and jumps too.
    fn write_guard(&mut self, chains: bool) -> Result<(), DataplaneError> {
        use crate::dataplane::iface;
        let routes = match &self.config.netns {
            None => iface::pod_routes(),
            Some(_) => {
                let v4 = self.runner.output("cat", &["/proc/net/route"]).unwrap_or_default();
                let v6 = self.runner.output("cat", &["/proc/net/ipv6_route"]).unwrap_or_default();
                let mut r: std::collections::HashMap<std::net::IpAddr, String> =
                    iface::host_routes_in(&v4).into_iter().map(|(a, i)| (a.into(), i)).collect();
                r.extend(iface::host_routes6_in(&v6).into_iter().map(|(a, i)| (a.into(), i)));
                r
            }
        };
        self.guard.find_interfaces(&routes);
        if let Some(script) = self.guard.sets_script() {
            let batch = Batch {
                step: "write the source guard's sets",
                tool: Tool::Ipset,
                commands: script.lines().count(),
                script,
            };
            if let Err(e) = self.run_batch(&batch) {
                self.guard.forget_written();
                return Err(e);
            }
        }
        if chains {
            write_guard_chains(&self.runner, self.backend, self.config.wait_seconds).map_err(
                |message| DataplaneError::Apply {
                    dataplane: NAME,
                    operation: "write the source guard's chains".into(),
                    message,
                },
            )?;
        }
        Ok(())
    }

    /// Runs one batch, trying again (a busy lock, a transient failure) before reporting.
    fn run_batch(&mut self, batch: &Batch) -> Result<(), DataplaneError> {
        let mut last = String::new();
        for attempt in 1..=self.config.attempts.max(1) {
            let start = Instant::now();
            let result = run_script(&self.runner, self.backend, self.config.wait_seconds, batch);
            self.stats.processes += 1;
            self.stats.busy_us += start.elapsed().as_micros() as u64;
            match result {
                Ok(()) => {
                    self.stats.commands += batch.commands as u64;
                    if attempt > 1 {
                        tracing::info!(step = batch.step, attempt, "batch applied after retrying");
                    }
                    return Ok(());
                }
                Err(e) => {
                    if attempt == 1 {
                        self.stats.retried += 1;
                    }
                    tracing::warn!(step = batch.step, attempt, error = %e, "batch failed");
                    last = e;
                    std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
                }
            }
        }
        self.stats.failed += 1;
        Err(DataplaneError::Apply {
            dataplane: NAME,
            operation: batch.step.to_string(),
            message: last,
        })
    }

    fn run_batches(
        &mut self,
        batches: &[Batch],
        before_destroy: impl FnOnce(&mut Self),
    ) -> Result<(), DataplaneError> {
        let mut hook = Some(before_destroy);
        for b in batches {
            if b.step == STEP_DEL_SETS {
                if let Some(h) = hook.take() {
                    h(self);
                }
                // A set still referenced (by something outside the layout) is left behind,
                // which is harmless; report it and go on.
                for w in run_ipset_lenient(&self.runner, &b.script) {
                    tracing::warn!("destroying stale sets: {w}");
                }
                self.stats.processes += 1;
                continue;
            }
            self.run_batch(b)?;
        }
        if let Some(h) = hook.take() {
            h(self);
        }
        Ok(())
    }

    /// Removes the layout from the other backend (left by a previous agent or by Azure NPM
    /// using it), as Azure NPM v2 does at boot.
    fn cleanup_other_backend(&mut self) {
        let other = self.backend.other();
        if self.runner.output(other.save_program(), &["--version"]).is_none() {
            return;
        }
        for problem in remove_guard_chains(&self.runner, other) {
            tracing::warn!(backend = other.as_str(), %problem, "removing the source guard from the other iptables backend");
        }
        for f in Family::BOTH {
            if !may_hold_for(&self.runner, other, f, "filter") {
                continue;
            }
            let Ok(state) = read_iptables(&self.runner, other, f) else { continue };
            if state.chains.is_empty() && state.forward.is_empty() {
                continue;
            }
            let batches = translate::cleanup_batches(&state, f);
            for b in batches.into_iter().filter(|b| b.tool != Tool::Ipset) {
                match run_script(&self.runner, other, self.config.wait_seconds, &b) {
                    Ok(()) => tracing::info!(
                        backend = other.as_str(),
                        family = f.as_str(),
                        chains = state.chains.len(),
                        "removed the layout from the other iptables backend"
                    ),
                    Err(e) => {
                        tracing::warn!(backend = other.as_str(), error = %e, "removing the layout from the other iptables backend")
                    }
                }
            }
        }
    }
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        NAME
    }

    fn wants_layout(&self) -> bool {
        true
    }

    /// The layout holds ClusterNetworkPolicies' chains, walked around the NetworkPolicies'.
    fn renders_tiers(&self) -> bool {
        true
    }

    /// Both families: iptables and ip6tables, each with its family's sets.
    fn enforces_ipv6(&self) -> bool {
        true
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError> {
        if self.damaged.swap(false, Ordering::SeqCst) {
            return Err(DataplaneError::Apply {
                dataplane: NAME,
                operation: "checking the layout".into(),
                message: "the AZURE-NPM chain was removed by another program; resynchronizing"
                    .into(),
            });
        }
        // The translator groups a diff's set and rule changes into three phases, which needs
        // a net diff: several events' diffs (a burst) become the one move from the layout
        // the kernel holds to the layout after the last of them.
        // (After a failure the next reconcile starts from the plan, whatever the kernel got.)
        let layout = self.layout.advance(&diff.layout).map_err(|e| DataplaneError::Apply {
            dataplane: NAME,
            operation: "following the layout".into(),
            message: e,
        })?;
        let net = PlanDiff { changes: Vec::new(), layout };
        let mut families = vec![self.translators[0].translate(&net)];
        if self.ipv6_active() {
            families.push(self.translators[1].translate(&net));
        } else if net.layout.iter().any(translate::names_ipv6) {
            // The first IPv6 address: the whole layout, over an ip6tables that holds none.
            let all =
                PlanDiff { changes: Vec::new(), layout: Layout::default().diff(&self.layout) };
            families.push(self.translators[1].translate(&all));
            self.ipv6.store(true, Ordering::SeqCst);
        }
        let batches = translate::merge_families(families);
        // (Azure NPM's counts are of its IPv4 sets.)
        let t = self.translator();
        lock(&self.azure_sets).apply_named(&net.layout, |d| t.kernel_set_name(d));
        self.run_batches(&batches, |_| {})?;
        self.guard.apply(diff);
        self.write_guard(false)?;
        Ok(applied(&batches))
    }

    fn observer(&self) -> Option<Box<dyn Observer>> {
        Some(Box::new(IptablesObserver::new(
            self.runner.clone(),
            self.backend,
            self.azure_sets.clone(),
        )))
    }

    fn tick(&mut self) -> Result<(), DataplaneError> {
        // Veths that appeared (or were replaced) since: their sources are checked from now.
        self.write_guard(false)
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        self.damaged.store(false, Ordering::SeqCst);
        let [k4, k6] = self.read_state()?;
        let mut families = vec![self.translators[0].reconcile(plan, &k4)];
        let ipv6 = translate::layout_has_ipv6(&plan.layout);
        if ipv6 {
            families.push(self.translators[1].reconcile(plan, &k6));
        } else {
            // (Whatever an earlier agent left in ip6tables goes.)
            self.translators[1] = RuleTranslator::for_family(Family::V6);
            families.push(translate::cleanup_batches(&k6, Family::V6));
        }
        self.ipv6.store(ipv6, Ordering::SeqCst);
        drop((k4, k6));
        let batches = translate::merge_families(families);
        self.layout = plan.layout.clone();
        let t = self.translator();
        *lock(&self.azure_sets) =
            AzureSets::from_layout_named(&plan.layout, |d| t.kernel_set_name(d));
        self.run_batches(&batches, |dp| dp.cleanup_other_backend())?;
        self.guard.reconcile(plan);
        self.write_guard(true)?;
        self.start_guard();
        Ok(())
    }
}

fn lock(sets: &Mutex<AzureSets>) -> std::sync::MutexGuard<'_, AzureSets> {
    sets.lock().unwrap_or_else(|p| p.into_inner())
}

/// One check of the guard, in both families: the FORWARD jump first and alone, the
/// AZURE-NPM chain present.
fn guard_once(
    runner: &Runner,
    backend: Backend,
    wait: u32,
    damaged: &AtomicBool,
    ipv6: &AtomicBool,
) -> Result<(), String> {
    write_guard_chains(runner, backend, wait)?;
    for f in Family::BOTH {
        if f == Family::V6 && !ipv6.load(Ordering::SeqCst) {
            continue;
        }
        let state = read_iptables(runner, backend, f).map_err(|e| e.to_string())?;
        if !state.chains.contains_key(super::names::AZURE_NPM) {
            if !damaged.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    family = f.as_str(),
                    "the AZURE-NPM chain is gone (removed by another program); the next change resynchronizes"
                );
            }
            continue;
        }
        let jumps: Vec<&String> =
            state.forward.iter().filter(|r| super::saved::jumps_to_azure_npm(r)).collect();
        if jumps.len() == 1
            && state.forward.first().map(String::as_str) == Some(super::names::FORWARD_JUMP)
        {
            continue;
        }
        let mut script = String::from("*filter\n");
        for j in &jumps {
            script.push_str(&format!("-D FORWARD {j}\n"));
        }
        script.push_str(&format!("-I FORWARD 1 {}\nCOMMIT\n", super::names::FORWARD_JUMP));
        let batch = Batch {
            step: "position the FORWARD jump",
            tool: f.rules_tool(),
            script,
            commands: jumps.len() + 1,
        };
        run_script(runner, backend, wait, &batch)?;
        tracing::warn!(
            family = f.as_str(),
            found = jumps.len(),
            "the FORWARD jump to AZURE-NPM was moved or removed by another program; put back first"
        );
    }
    Ok(())
}

/// Writes the guard's chains (the raw tables of iptables and ip6tables) and puts their jumps
/// first, where they are not exactly so.
fn write_guard_chains(runner: &Runner, backend: Backend, wait: u32) -> Result<(), String> {
    let wait = wait.to_string();
    for f in Family::BOTH {
        let (save, restore) = (backend.save_for(f), backend.restore_for(f));
        let (table, chain, hook, jump) =
            ("raw", guard::GUARD_CHAIN, "PREROUTING", guard::GUARD_JUMP);
        let saved = runner.run(save, &["-t", table], None).map_err(|e| format!("{save}: {e}"))?;
        if !saved.ok {
            return Err(format!("{save}: {}", saved.stderr));
        }
        let hook_rules = guard::table_rules(&saved.stdout, table, hook).unwrap_or_default();
        let chain_rules = guard::table_rules(&saved.stdout, table, chain);
        let Some(script) = guard::chain_script(
            table,
            chain,
            &guard::guard_rules(f),
            hook,
            jump,
            &hook_rules,
            chain_rules.as_deref(),
        ) else {
            continue;
        };
        match runner.run(restore, &["-w", &wait, "--noflush"], Some(&script)) {
            Ok(o) if o.ok => {}
            Ok(o) => return Err(format!("{restore}: {}", o.stderr)),
            Err(e) => return Err(format!("{restore}: {e}")),
        }
    }
    Ok(())
}

/// Removes the guard's chains and jumps from one backend (both families), and the IPv6
/// fail-closed chain of earlier versions (`AZURE-NPM-IPV6`, ip6tables' filter table).
fn remove_guard_chains(runner: &Runner, backend: Backend) -> Vec<String> {
    let mut problems = Vec::new();
    let tables = [
        (Family::V4, "raw", guard::GUARD_CHAIN, "PREROUTING", guard::GUARD_JUMP),
        (Family::V6, "raw", guard::GUARD_CHAIN, "PREROUTING", guard::GUARD_JUMP),
        (Family::V6, "filter", guard::OLD_IPV6_CHAIN, "FORWARD", guard::OLD_IPV6_JUMP),
    ];
    for (f, table, chain, hook, jump) in tables {
        if !may_hold_for(runner, backend, f, table) {
            continue;
        }
        let (save, restore) = (backend.save_for(f), backend.restore_for(f));
        let Some(saved) = runner.output(save, &["-t", table]) else { continue };
        let Some(script) = guard::removal_script(&saved, table, chain, hook, jump) else {
            continue;
        };
        match runner.run(restore, &["-w", "60", "--noflush"], Some(&script)) {
            Ok(o) if o.ok => {}
            Ok(o) => problems.push(format!("{restore}: {}", o.stderr)),
            Err(e) => problems.push(format!("{restore}: {e}")),
        }
    }
    problems
}

fn run_script(runner: &Runner, backend: Backend, wait: u32, batch: &Batch) -> Result<(), String> {
    let wait = wait.to_string();
    let (program, args): (&str, Vec<&str>) = match batch.tool {
        Tool::Ipset => ("ipset", vec!["-exist", "restore"]),
        Tool::Iptables => {
            (backend.restore_program(), vec!["-w", &wait, "-T", "filter", "--noflush"])
        }
        Tool::Ip6tables => {
            (backend.restore6_program(), vec!["-w", &wait, "-T", "filter", "--noflush"])
        }
    };
    match runner.run(program, &args, Some(&batch.script)) {
        Ok(o) if o.ok => Ok(()),
        Ok(o) => Err(format!("{program}: {}", describe_failure(batch, &o.stderr))),
        Err(e) => Err(format!("{program}: {e}")),
    }
}

/// `ipset -exist restore` that skips a failing line and goes on with the rest; returns the
/// failures.
fn run_ipset_lenient(runner: &Runner, script: &str) -> Vec<String> {
    let mut lines: Vec<&str> = script.lines().collect();
    let mut failures = Vec::new();
    while !lines.is_empty() && failures.len() < 1000 {
        let text = lines.join("\n") + "\n";
        match runner.run("ipset", &["-exist", "restore"], Some(&text)) {
            Ok(o) if o.ok => break,
            Ok(o) => match failed_line(&o.stderr) {
                Some(n) if n >= 1 && n <= lines.len() => {
                    failures.push(format!("{} ({})", o.stderr, lines[n - 1]));
                    lines.drain(..n);
                }
                _ => {
                    failures.push(o.stderr);
                    break;
                }
            },
            Err(e) => {
                failures.push(e.to_string());
                break;
            }
        }
    }
    failures
}

fn read_iptables(
    runner: &Runner,
    backend: Backend,
    f: Family,
) -> Result<KernelState, DataplaneError> {
    let save = backend.save_for(f);
    let failed = |message: String| DataplaneError::Apply {
        dataplane: NAME,
        operation: "reading the rules".into(),
        message: format!("{save}: {message}"),
    };
    let out = runner.run(save, &["-t", "filter"], None).map_err(|e| failed(e.to_string()))?;
    if !out.ok {
        return Err(failed(out.stderr));
    }
    Ok(KernelState::parse("", &out.stdout))
}

/// Both families' layouts as the kernel holds them (the guard's sets left out); `ipset save`
/// is read once.
fn read_state(runner: &Runner, backend: Backend) -> Result<[KernelState; 2], DataplaneError> {
    let sets = runner.run("ipset", &["save"], None).map_err(|e| DataplaneError::Apply {
        dataplane: NAME,
        operation: "reading the sets".into(),
        message: format!("ipset save: {e}"),
    })?;
    if !sets.ok {
        return Err(DataplaneError::Apply {
            dataplane: NAME,
            operation: "reading the sets".into(),
            message: format!("ipset save: {}", sets.stderr),
        });
    }
    let mut all = KernelState::parse(&sets.stdout, "").sets;
    drop(sets);
    all.retain(|name, _| !guard::is_guard_set(name));
    let mut out = [KernelState::default(), KernelState::default()];
    for f in Family::BOTH {
        let mut state = read_iptables(runner, backend, f)?;
        let (mine, rest) = std::mem::take(&mut all).into_iter().partition(|(n, _)| f.owns_set(n));
        state.sets = mine;
        all = rest;
        out[f as usize] = state;
    }
    Ok(out)
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesCleanup {
    /// Chains removed, per backend that had any.
    pub chains: Vec<(Backend, usize)>,
    /// Sets destroyed.
    pub sets: usize,
    /// What could not be removed.
    pub problems: Vec<String>,
}

/// Removes every `AZURE-NPM…` chain and FORWARD's jumps to them from both backends and both
/// families (iptables, ip6tables), then every `azure-npm-…` and `inet6:azure-npm-…` set, in the current network namespace (or `netns`). Programs that are
/// not installed are skipped.
pub fn cleanup(netns: Option<PathBuf>) -> IptablesCleanup {
    let runner = Runner::new(netns);
    let mut report = IptablesCleanup::default();
    for backend in [Backend::Nft, Backend::Legacy] {
        if runner.output(backend.save_program(), &["--version"]).is_none() {
            continue;
        }
        report.problems.extend(remove_guard_chains(&runner, backend));
        let mut chains = 0;
        for f in Family::BOTH {
            if !may_hold_for(&runner, backend, f, "filter") {
                continue;
            }
            let state = match read_iptables(&runner, backend, f) {
                Ok(s) => s,
                Err(e) => {
                    report.problems.push(e.to_string());
                    continue;
                }
            };
            if state.is_empty() {
                continue;
            }
            for b in translate::cleanup_batches(&state, f) {
                if let Err(e) = run_script(&runner, backend, 60, &b) {
                    report.problems.push(e);
                }
            }
            chains += state.chains.len();
        }
        if chains > 0 {
            report.chains.push((backend, chains));
        }
    }
    if let Some(save) = runner.output("ipset", &["save"]) {
        let state = KernelState::parse(&save, "");
        if !state.sets.is_empty() {
            for b in translate::cleanup_batches(&state, Family::V4) {
                report.problems.extend(run_ipset_lenient(&runner, &b.script));
            }
            let left = runner.output("ipset", &["list", "-n"]).unwrap_or_default();
            let remaining = left.lines().filter(|l| is_layout_set(l)).count();
            report.sets = state.sets.len() - remaining.min(state.sets.len());
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_lines_are_found() {
        assert_eq!(
            failed_line("ipset v7.17: Error in line 3: The set with the given name does not exist"),
            Some(3)
        );
        assert_eq!(failed_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(
            failed_line("iptables-restore v1.8.9 (nf_tables): Couldn't load match `set'"),
            None
        );
    }
}
