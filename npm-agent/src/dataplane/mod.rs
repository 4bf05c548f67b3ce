//! Dataplanes: what turns plan diffs into enforcement. One trait; the eBPF dataplane for
//! kernels that can run the tc programs, the iptables + ipset one (Azure NPM v2's layout)
//! where they cannot, the Windows HNS translation, and an in-memory one for tests.

pub mod azure;
pub mod drops;
pub mod ebpf;
pub mod hns;
#[cfg(target_os = "linux")]
pub mod iface;
pub mod iptables;
pub mod observe;

use crate::plan::{Change, Plan, PlanDiff};
use drops::DropFeed;
use observe::Observer;

/// A failure to program the dataplane. Enforcement of what was already applied goes on.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{dataplane}: {operation}: {message}")]
    Apply { dataplane: &'static str, operation: String, message: String },
    #[error("{dataplane}: not supported on this node: {reason}")]
    Unsupported { dataplane: &'static str, reason: String },
}

/// What applying a diff wrote, in Azure NPM's terms: its `npm_add_iptables_rule_exec_time`
/// and `npm_add_ipset_exec_time` summaries time the applies that add rules and sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Rules (or policy entries) were added.
    pub rules_added: bool,
    /// Sets (or set members, identities, prefixes) were added.
    pub sets_added: bool,
}

/// Something that enforces a plan.
pub trait Dataplane {
    fn name(&self) -> &'static str;
    /// Whether the dataplane needs the plan's Azure NPM layout (the compiler then computes
    /// it): the iptables dataplane renders it, the eBPF dataplane reports Azure NPM's counts of
    /// its sets; the others read only the entries.
    fn wants_layout(&self) -> bool {
        false
    }
    /// Whether the dataplane renders ClusterNetworkPolicy tiers (entries whose verdict is
    /// not a NetworkPolicy's allow, profiles that do not isolate): the compiler compiles
    /// ClusterNetworkPolicies only for those that do.
    fn renders_tiers(&self) -> bool {
        false
    }
    /// Whether the dataplane enforces the plan's IPv6 entries (endpoints, identities, blocks)
    /// as it does IPv4's; the agent reports what it does not.
    fn enforces_ipv6(&self) -> bool {
        false
    }
    /// Applies one diff, in its order (make-before-break): one event's, or several events'
    /// concatenated (each one after the other, as a burst is applied).
    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError>;
    /// Makes the dataplane enforce exactly `plan`, whatever it held before (start-up,
    /// including state left pinned by a previous agent): adds first, then removes.
    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError>;
    /// Periodic work of the dataplane's own (every second, once in sync): what depends on the
    /// node rather than the plan, such as pods' interfaces appearing.
    fn tick(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// What reads this dataplane's figures from the kernel for the metrics (at scrape time,
    /// from another thread); `None` when it has none (the metrics then count the plan).
    fn observer(&self) -> Option<Box<dyn Observer>> {
        None
    }
    /// The stream of drop events, taken once (by the agent's reader thread); `None` when the
    /// dataplane has none.
    fn drop_feed(&mut self) -> Option<Box<dyn DropFeed>> {
        None
    }
}

/// A dataplane that only keeps the plan: for tests of what sits above dataplanes.
#[derive(Default)]
pub struct Memory {
    pub plan: Plan,
}

impl Dataplane for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn renders_tiers(&self) -> bool {
        true
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError> {
        self.plan.apply(diff).map_err(|message| DataplaneError::Apply {
            dataplane: "memory",
            operation: "apply".into(),
            message,
        })?;
        Ok(Applied {
            rules_added: diff.changes.iter().any(|c| matches!(c, Change::AddAllow { .. })),
            sets_added: diff
                .changes
                .iter()
                .any(|c| matches!(c, Change::SetIdentity { .. } | Change::AddMember { .. })),
        })
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        self.plan = plan.clone();
        Ok(())
    }
}
