//! The node agent of a Kubernetes NetworkPolicy enforcer, as a library.
//!
//! Data flows one way: sources produce [`state::Event`]s; the [`compile`] engine turns
//! them into [`plan::PlanDiff`]s; dataplanes apply those. [`reference`] is the naive
//! specification the compiler is tested against; [`simulate`] replays conformance cases
//! through the compiler. See docs/ARCHITECTURE.md for the map.

pub mod agent;
pub mod compile;
pub mod dataplane;
#[cfg(target_os = "linux")]
pub mod debug;
pub mod drops;
pub mod explain;
pub mod input;
#[cfg(target_os = "linux")]
pub mod lab;
pub mod metrics;
pub mod model;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod plan;
pub mod reference;
pub mod simulate;
pub mod source;
pub mod state;
