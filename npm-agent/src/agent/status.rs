//! What the agent reports about itself: the status (readiness, the generation applied, sizes,
//! problems), written as JSON for the lab, and per-event statistics for the metrics.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The agent's status, as written to `--status-file`.
///
/// `ready` turns true once the first full sync has been applied to the dataplane, and stays
/// true. `generation` is the files source's `.generation` as of the last scan whose events
/// are all enforced (0 before any); `in_sync` is false while a failed apply waits for the
/// next resynchronization (then `generation` stays at the last batch that was enforced).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    pub generation: u64,
    /// Events handled since start (the initial sync's included).
    pub applied_events: u64,
    /// Batches handled since start.
    pub batches: u64,
    pub in_sync: bool,
    pub node: String,
    pub dataplane: String,
    /// Failed dataplane applies and reconciles since start.
    pub apply_errors: u64,
    /// Sizes of the compiled plan (from the compiler).
    pub pods: usize,
    pub policies: usize,
    pub identities: usize,
    pub endpoints: usize,
    /// Profiles (entries shared by the endpoint directions the same policies select) and the
    /// allow entries they hold.
    pub profiles: usize,
    pub allow_entries: usize,
    /// From the source: files that did not parse, objects rejected (since start), and the
    /// problems standing now.
    pub parse_errors: u64,
    pub invalid_objects: u64,
    pub problems: Vec<String>,
}

impl Status {
    /// Writes the status atomically: a temporary file beside `path`, then a rename.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().context("status file has no name")?.to_string_lossy();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, self)?;
        f.write_all(b"\n")?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    }

    /// Reads a status file (for the lab and tests).
    pub fn read(path: &Path) -> anyhow::Result<Status> {
        let text = crate::input::read_file(path)?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Waits until the status file at `path` reports the agent ready, in sync, and at
    /// `generation` or later (the lab's handshake: write the manifests, bump `.generation`,
    /// then wait for every agent). Fails after `timeout` with the last status seen.
    pub fn wait_for_generation(
        path: &Path,
        generation: u64,
        timeout: Duration,
    ) -> anyhow::Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = Status::read(path);
            if let Ok(s) = &last
                && s.ready
                && s.in_sync
                && s.generation >= generation
            {
                return last;
            }
            if Instant::now() >= deadline {
                return match last {
                    Ok(s) => Err(anyhow::anyhow!(
                        "{}: generation {generation} not reached in {timeout:?}; last status {s:?}",
                        path.display()
                    )),
                    Err(e) => {
                        Err(e
                            .context(format!("generation {generation} not reached in {timeout:?}")))
                    }
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What an event did to its object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// One handled event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    /// Compiling the event and applying its diff.
    pub duration: Duration,
    pub failed: bool,
}

/// Totals and recent samples of one (kind, operation).
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    pub count: u64,
    pub failed: u64,
    pub total: Duration,
    pub max: Duration,
    /// Samples of the last [`EventStats::WINDOW`], at most [`EventStats::MAX_SAMPLES`]
    /// (oldest first): what summaries with quantiles over a window are computed from.
    pub recent: VecDeque<Sample>,
}

/// Per object kind (`namespace`, `pod`, `policy`, `node`, as [`crate::state::Event::kind`]
/// names them) and operation: how many events, how long they took, how many failed.
#[derive(Clone, Debug, Default)]
pub struct EventStats {
    pub by: BTreeMap<(&'static str, Operation), OpStats>,
    /// Whole-plan reconciles (start-up, and after a failed apply) and how many failed.
    pub reconciles: u64,
    pub reconcile_failures: u64,
    pub last_reconcile: Option<Duration>,
}

impl EventStats {
    pub const WINDOW: Duration = Duration::from_secs(600);
    pub const MAX_SAMPLES: usize = 10_000;

    pub fn record(&mut self, kind: &'static str, op: Operation, duration: Duration, failed: bool) {
        let now = Instant::now();
        let s = self.by.entry((kind, op)).or_default();
        s.count += 1;
        s.failed += u64::from(failed);
        s.total += duration;
        s.max = s.max.max(duration);
        while s.recent.front().is_some_and(|f| now.duration_since(f.at) > Self::WINDOW)
            || s.recent.len() >= Self::MAX_SAMPLES
        {
            s.recent.pop_front();
        }
        s.recent.push_back(Sample { at: now, duration, failed });
    }

    pub fn get(&self, kind: &str, op: Operation) -> Option<&OpStats> {
        self.by.iter().find(|((k, o), _)| *k == kind && *o == op).map(|(_, s)| s)
    }

    pub fn events(&self) -> u64 {
        self.by.values().map(|s| s.count).sum()
    }
}
