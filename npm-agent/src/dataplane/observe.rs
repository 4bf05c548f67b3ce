//! What a dataplane reads back from the kernel for the metrics: packets by direction and
//! reason, maps, connection tracking, and Azure NPM's counts of rules, sets and entries. Each
//! dataplane that can be observed has an [`Observer`]; the metrics module only formats what
//! it returns, so the figures say what is enforced rather than what the agent meant to do.

use anyhow::Result;

/// Rules, sets and set entries (Azure NPM's counts), and the entries of each set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub rules: u64,
    pub sets: u64,
    pub set_entries: u64,
    /// `(set name, kernel name or hash, entries)`, when asked for (advanced metrics).
    pub per_set: Vec<(String, String, u64)>,
}

/// One map of the eBPF dataplane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFigure {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

/// Packets of one (direction, reason).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketFigure {
    /// `ingress` (entering the pod) or `egress`.
    pub direction: &'static str,
    pub reason: String,
    pub packets: u64,
}

/// Drop events the dataplane's rate limiter let through (`sent`), kept back (`suppressed`)
/// and lost (`lost`: let through, but the agent was not reading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEventCounts {
    pub sent: u64,
    pub suppressed: u64,
    pub lost: u64,
}

/// What the kernel holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub allowed: Vec<PacketFigure>,
    pub dropped: Vec<PacketFigure>,
    pub maps: Vec<MapFigure>,
    pub conntrack_entries: Option<u64>,
    pub counts: Option<Counts>,
    pub drop_events: Option<DropEventCounts>,
}

/// Reads a dataplane's figures from the kernel.
pub trait Observer: Send + Sync {
    /// `per_set`: also the entries of each set (advanced metrics).
    fn observe(&self, per_set: bool) -> Result<Figures>;
}
