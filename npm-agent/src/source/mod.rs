//! Sources: what turns the outside world into [`Event`]s for the compiler.
//!
//! A [`Source`] yields [`Batch`]es of events. The first batches rebuild the whole cluster
//! state; the batch whose `synced` flag is set completes that initial full sync (the agent
//! applies nothing before it, so whatever a previous agent left pinned keeps enforcing until
//! the new agent knows the whole cluster). Later batches carry changes.
//!
//! [`files`] reads manifests from a directory (the lab, clusterless tests); [`kube`] watches
//! the Kubernetes API (kube-rs watchers on a runtime of its own, handing what they see over a
//! channel that `next_batch` waits on with the timeout).
//!
//! Sources validate at the edge: an object that does not convert (or a policy that does not
//! validate) never becomes an event. A source reports it, counts it in [`SourceHealth`], and
//! keeps the previous valid version of the object in force (dropping it could open a hole).

pub mod files;
pub mod kube;
pub mod object;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::state::Event;

pub use self::kube::{KubeOptions, KubeSource};
pub use files::FilesSource;
pub use object::{Object, ObjectId};

/// Events that a source produced since its previous batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// In the order to apply them.
    pub events: Vec<Event>,
    /// Set when, with this batch, every event of the initial full listing has been
    /// delivered (and on every later batch).
    pub synced: bool,
    /// The generation marker the batch reflects, when the source has one (the files source:
    /// the content of `DIR/.generation` read before the manifests of this scan).
    pub generation: Option<u64>,
}

/// Problems a source met, for the status file and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceHealth {
    /// Files (or API responses) that could not be parsed at all, since start.
    pub parse_errors: u64,
    /// Objects rejected by conversion or validation, since start.
    pub invalid_objects: u64,
    /// The problems standing now (one line each, naming the file, the object and the field).
    pub problems: Vec<String>,
}

/// A producer of events.
pub trait Source {
    /// A short name for logs (`files:/etc/manifests`, `kube`).
    fn describe(&self) -> String;

    /// Waits at most `timeout` for changes and returns them, or `None` when nothing changed.
    /// An error is a failure of the source itself (the directory is gone, the API server is
    /// unreachable); the caller logs it and asks again.
    fn next_batch(&mut self, timeout: Duration) -> anyhow::Result<Option<Batch>>;

    /// Problems met so far.
    fn health(&self) -> SourceHealth;
}

/// Which source to run, as given by `--source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// The Kubernetes API (in-cluster configuration or KUBECONFIG).
    Kube,
    /// A directory of manifests, watched for changes.
    Files(PathBuf),
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "kube" {
            return Ok(SourceSpec::Kube);
        }
        match s.strip_prefix("files:") {
            Some("") => Err("files: needs a directory, as in files:/etc/npm/manifests".into()),
            Some(dir) => Ok(SourceSpec::Files(PathBuf::from(dir))),
            None => Err(format!("unknown source {s:?}: expected `kube` or `files:DIR`")),
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Kube => f.write_str("kube"),
            SourceSpec::Files(dir) => write!(f, "files:{}", dir.display()),
        }
    }
}
