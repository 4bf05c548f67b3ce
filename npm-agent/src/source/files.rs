//! The file source: Namespaces, Pods, Nodes, NetworkPolicies and ClusterNetworkPolicies
//! (`policy.networking.k8s.io/v1alpha2`) read from the manifests of one directory, watched for changes by polling (every [`POLL_INTERVAL`]).
//!
//! - Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (names
//!   starting with `.` are skipped, so `.x.yaml.tmp` files and the `..data` links of a
//!   ConfigMap volume are not read twice); YAML files may hold several documents separated by
//!   `---`, and a document may be a `List` (`kind: List`, `PodList`, ...) with `items`.
//! - Objects of other kinds are ignored (logged at debug level). Pods and NetworkPolicies
//!   without a namespace land in `default`, as `kubectl apply` would put them.
//! - Objects are read strictly, as the API server's strict field validation reads them: a
//!   field the Kubernetes type does not know (`form:` for `from:`, `matchLabel:`, a rule's
//!   `port:`), at any depth, makes the object invalid, naming the field
//!   (`x/allow-web: spec.ingress[0].form: unknown field`).
//! - A file that does not parse is reported and counted, and the objects it held at its last
//!   good read stay in force. An object that does not convert or validate is reported
//!   (naming the file, the object and the field) and counted, and its previous valid version,
//!   if any, stays in force: an invalid edit of a policy never opens a hole.
//! - Writers should replace files atomically (write a hidden or differently named temporary
//!   file, then rename it): a file read half-written may parse as fewer objects until the
//!   next scan.
//! - The lab's generation protocol: the writer writes every manifest, then writes a number
//!   into `DIR/.generation`. The source reads `.generation` before the manifests of each
//!   scan, so a batch reporting generation `g` reflects at least every manifest written
//!   before `g` was.
//! - Files are read with [`crate::input::read_file`]: a name that turns out to be a FIFO, a
//!   device or a file over 64 MiB (also when swapped in after the scan listed it) is
//!   reported as a file that does not parse, and the scan goes on.
//! - Problems are logged when they appear, change or clear, never at every scan (the
//!   directory is scanned five times a second): a file is read, and its problems logged, only
//!   when it changed; a manifest that cannot be stat'ed (a symbolic link loop, no
//!   permission) or an object defined twice is logged once while it stands. Every standing
//!   problem is in [`Source::health`].
//!
//! Each scan stats every file and re-reads only those whose size, times or inode changed.

use std::collections::{BTreeMap, BTreeSet};
#[cfg(unix)]
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use super::{Batch, Object, ObjectId, Source, SourceHealth};
use crate::input;
use crate::model::validate::network_policy;
use crate::model::{ObjectKey, convert};
use crate::state::Event;

/// How often the directory is scanned.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The file holding the generation marker of the lab's protocol.
pub const GENERATION_FILE: &str = ".generation";

/// The generation marker is a number: a larger file is not one.
const GENERATION_MAX_BYTES: u64 = 4096;

/// One object read from a file: its identity when it could be read, and the object or why
/// it was rejected.
#[derive(Clone, Debug)]
struct Entry {
    id: Option<ObjectId>,
    object: Result<Object, String>,
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// Windows has no inode and change time here: the size and modification time.
    #[cfg(not(unix))]
    fn of(m: &std::fs::Metadata) -> Self {
        let since = |t: std::io::Result<std::time::SystemTime>| {
            t.ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or((0, 0), |d| (d.as_secs() as i64, i64::from(d.subsec_nanos())))
        };
        Stamp { len: m.len(), ino: 0, mtime: since(m.modified()), ctime: (0, 0) }
    }

    #[cfg(unix)]
    fn of(m: &std::fs::Metadata) -> Self {
        Stamp {
            len: m.len(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

struct FileState {
    stamp: Stamp,
    /// The entries of the last read that parsed.
    entries: Vec<Entry>,
    /// Why the last read did not parse (its previous entries are kept).
    parse_error: Option<String>,
}

/// The file source. See the module documentation.
pub struct FilesSource {
    dir: PathBuf,
    interval: Duration,
    files: BTreeMap<PathBuf, FileState>,
    /// The objects in force, as last delivered.
    current: BTreeMap<ObjectId, Object>,
    generation: Option<u64>,
    generation_raw: Option<String>,
    last_scan: Option<Instant>,
    synced: bool,
    parse_errors: u64,
    invalid_objects: u64,
    /// Problems of the last rebuild that are not tied to one file's parse (duplicates).
    merge_problems: Vec<String>,
    /// Manifests that cannot be stat'ed (a symbolic link loop, no permission), with the
    /// problem as last logged. Such a problem stands from scan to scan: it is logged when it
    /// appears, changes or clears, not at every scan.
    standing: BTreeMap<PathBuf, String>,
}

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_interval(dir, POLL_INTERVAL)
    }

    pub fn with_interval(dir: impl Into<PathBuf>, interval: Duration) -> Self {
        FilesSource {
            dir: dir.into(),
            interval,
            files: BTreeMap::new(),
            current: BTreeMap::new(),
            generation: None,
            generation_raw: None,
            last_scan: None,
            synced: false,
            parse_errors: 0,
            invalid_objects: 0,
            merge_problems: Vec::new(),
            standing: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The objects in force.
    pub fn objects(&self) -> &BTreeMap<ObjectId, Object> {
        &self.current
    }

    /// Scans the directory now; returns a batch when anything changed (always on the first
    /// scan).
    pub fn scan(&mut self) -> anyhow::Result<Option<Batch>> {
        self.last_scan = Some(Instant::now());
        // The generation first: manifests written before it are then seen by this scan.
        let generation_changed = self.read_generation();
        let listing = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading directory {}", self.dir.display()))?;
        let mut seen = BTreeSet::new();
        let mut failing = BTreeMap::new();
        let mut files_changed = false;
        for entry in listing {
            let entry =
                entry.with_context(|| format!("reading directory {}", self.dir.display()))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !is_manifest(&name) {
                continue;
            }
            let path = entry.path();
            // Follows symbolic links (ConfigMap volumes are made of them). Anything but a
            // directory is read, and the read refuses what is not a regular file (a FIFO, a
            // device): reported, never waited on.
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => continue,
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    failing.insert(path, format!("cannot stat manifest: {e}"));
                    continue;
                }
            };
            let stamp = Stamp::of(&meta);
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            files_changed = true;
            self.read_file(path, stamp);
        }
        self.report_standing(failing);
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        if self.files.len() != before {
            files_changed = true;
        }
        let first = !self.synced;
        if !first && !files_changed && !generation_changed {
            return Ok(None);
        }
        let events = if first || files_changed { self.rebuild() } else { Vec::new() };
        self.synced = true;
        Ok(Some(Batch { events, synced: true, generation: self.generation }))
    }

    /// Logs the problems of this scan that were not logged as they are, and the problems of
    /// the last scan that are gone; keeps this scan's.
    fn report_standing(&mut self, now: BTreeMap<PathBuf, String>) {
        for (path, problem) in &now {
            if self.standing.get(path) != Some(problem) {
                tracing::warn!(file = %path.display(), "{problem} (logged once, until it changes or clears)");
            }
        }
        for (path, problem) in &self.standing {
            if !now.contains_key(path) {
                tracing::info!(file = %path.display(), "cleared: {problem}");
            }
        }
        self.standing = now;
    }

    /// Reads `.generation`; returns whether it changed.
    fn read_generation(&mut self) -> bool {
        let raw =
            match input::read_file_limited(&self.dir.join(GENERATION_FILE), GENERATION_MAX_BYTES) {
                Ok(s) => Some(s.trim().to_string()),
                Err(e) if e.not_found() => None,
                Err(e) => Some(format!("(unreadable: {})", e.reason())),
            };
        if raw == self.generation_raw {
            return false;
        }
        self.generation_raw = raw.clone();
        match raw.as_deref().map(str::parse::<u64>) {
            Some(Ok(g)) => self.generation = Some(g),
            Some(Err(_)) => {
                tracing::warn!(file = %self.dir.join(GENERATION_FILE).display(), content = ?raw, "generation is not a number; ignored");
            }
            None => {}
        }
        true
    }

    fn read_file(&mut self, path: PathBuf, stamp: Stamp) {
        let parsed = input::read_file(&path)
            .map_err(|e| e.reason())
            .and_then(|text| parse_manifests(&path, &text));
        let shown = path.display().to_string();
        match parsed {
            Ok(entries) => {
                for e in &entries {
                    if let Err(message) = &e.object {
                        self.invalid_objects += 1;
                        let kept = e.id.as_ref().is_some_and(|id| self.current.contains_key(id));
                        tracing::warn!(
                            file = %shown,
                            object = %e.id.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "(unnamed)".into()),
                            kept_previous_version = kept,
                            "{message}"
                        );
                    }
                }
                let n = entries.iter().filter(|e| e.object.is_ok()).count();
                tracing::debug!(file = %shown, objects = n, "read manifest");
                self.files.insert(path, FileState { stamp, entries, parse_error: None });
            }
            Err(message) => {
                self.parse_errors += 1;
                let previous = self.files.remove(&path).map(|f| f.entries).unwrap_or_default();
                tracing::error!(
                    file = %shown,
                    kept_objects = previous.len(),
                    "manifest does not parse; its previous objects stay in force: {message}"
                );
                self.files.insert(
                    path,
                    FileState { stamp, entries: previous, parse_error: Some(message) },
                );
            }
        }
    }

    /// Builds the new set of objects from every file's entries and returns the events that
    /// take `current` there.
    fn rebuild(&mut self) -> Vec<Event> {
        let mut next: BTreeMap<ObjectId, Object> = BTreeMap::new();
        let mut origin: BTreeMap<ObjectId, &Path> = BTreeMap::new();
        let mut merge_problems = Vec::new();
        for (path, file) in &self.files {
            for e in &file.entries {
                let Some(id) = &e.id else { continue };
                let object = match &e.object {
                    Ok(o) => o.clone(),
                    // Keep the version in force, if there is one.
                    Err(_) => match self.current.get(id) {
                        Some(o) => o.clone(),
                        None => continue,
                    },
                };
                if let Some(prev) = origin.insert(id.clone(), path) {
                    let problem = format!(
                        "{}: {id} is also defined in {}; the definition in {} is used",
                        path.display(),
                        prev.display(),
                        path.display()
                    );
                    merge_problems.push(problem);
                }
                next.insert(id.clone(), object);
            }
        }
        // A duplicate stands from rebuild to rebuild: logged when it appears and when it
        // clears, not at every change of another file.
        for problem in &merge_problems {
            if !self.merge_problems.contains(problem) {
                tracing::warn!("{problem}");
            }
        }
        for problem in &self.merge_problems {
            if !merge_problems.contains(problem) {
                tracing::info!("cleared: {problem}");
            }
        }
        self.merge_problems = merge_problems;
        let mut events = Vec::new();
        for (id, object) in &next {
            if self.current.get(id) != Some(object) {
                events.push(object.upsert());
            }
        }
        for id in self.current.keys().rev() {
            if !next.contains_key(id) {
                events.push(id.delete());
            }
        }
        self.current = next;
        events
    }
}

impl Source for FilesSource {
    fn describe(&self) -> String {
        format!("files:{}", self.dir.display())
    }

    fn next_batch(&mut self, timeout: Duration) -> anyhow::Result<Option<Batch>> {
        let now = Instant::now();
        let due = self.last_scan.map_or(now, |t| t + self.interval);
        if due > now + timeout {
            std::thread::sleep(timeout);
            return Ok(None);
        }
        std::thread::sleep(due.saturating_duration_since(now));
        self.scan()
    }

    fn health(&self) -> SourceHealth {
        let mut problems = Vec::new();
        for (path, f) in &self.files {
            if let Some(e) = &f.parse_error {
                problems.push(format!(
                    "{}: does not parse (previous objects kept): {e}",
                    path.display()
                ));
            }
            for e in &f.entries {
                if let Err(message) = &e.object {
                    let kept = e.id.as_ref().is_some_and(|id| self.current.contains_key(id));
                    let what = if kept { "previous version kept" } else { "not applied" };
                    problems.push(format!("{}: {message} ({what})", path.display()));
                }
            }
        }
        problems.extend(self.merge_problems.iter().cloned());
        problems.extend(
            self.standing.iter().map(|(path, problem)| format!("{}: {problem}", path.display())),
        );
        SourceHealth {
            parse_errors: self.parse_errors,
            invalid_objects: self.invalid_objects,
            problems,
        }
    }
}

fn is_manifest(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")
}

/// Reads a manifest file's text as the files source does: the objects it holds and the
/// problems of those it rejects (`Err` when the file does not parse at all). For the fuzzer
/// and tools; `name` says whether it is JSON.
pub fn check_manifests(name: &Path, text: &str) -> Result<(usize, Vec<String>), String> {
    let entries = parse_manifests(name, text)?;
    let problems: Vec<String> =
        entries.iter().filter_map(|e| e.object.as_ref().err().cloned()).collect();
    Ok((entries.len() - problems.len(), problems))
}

/// Parses one file's text into entries. An error means the file does not parse at all.
fn parse_manifests(path: &Path, text: &str) -> Result<Vec<Entry>, String> {
    let mut docs = Vec::new();
    if path.extension().is_some_and(|e| e == "json") {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        docs.push(v);
    } else {
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let v = Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
            docs.push(v);
        }
    }
    let mut entries = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        collect(doc, &format!("document {}", i + 1), &mut entries);
    }
    Ok(entries)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

fn collect(mut doc: Value, place: &str, out: &mut Vec<Entry>) {
    if doc.is_null() {
        return;
    }
    if !doc.is_mapping() {
        out.push(Entry { id: None, object: Err(format!("{place}: not an object")) });
        return;
    }
    let Some(kind) = str_at(&doc, &["kind"]).map(str::to_string) else {
        out.push(Entry { id: None, object: Err(format!("{place}: kind: required")) });
        return;
    };
    if kind.ends_with("List")
        && let Some(Value::Sequence(items)) = doc.get_mut("items").map(std::mem::take)
    {
        for (i, item) in items.into_iter().enumerate() {
            collect(item, &format!("{place} items[{i}]"), out);
        }
        return;
    }
    let name = str_at(&doc, &["metadata", "name"]).unwrap_or_default().to_string();
    let namespaced = matches!(kind.as_str(), "Pod" | "NetworkPolicy");
    if namespaced
        && str_at(&doc, &["metadata", "namespace"]).is_none_or(str::is_empty)
        && let Some(Value::Mapping(meta)) = doc.get_mut("metadata")
    {
        meta.insert(Value::from("namespace"), Value::from("default"));
    }
    let namespace = str_at(&doc, &["metadata", "namespace"]).unwrap_or("default").to_string();
    let unnamed = name.is_empty();
    let id = match kind.as_str() {
        "Namespace" => ObjectId::Namespace(name.clone()),
        "Node" => ObjectId::Node(name.clone()),
        "NetworkPolicy" => ObjectId::Policy(ObjectKey::new(&namespace, &name)),
        "ClusterNetworkPolicy" => ObjectId::ClusterPolicy(name.clone()),
        "Pod" => ObjectId::Pod(ObjectKey::new(&namespace, &name)),
        other => {
            tracing::debug!(kind = other, name = %name, "{place}: kind ignored");
            return;
        }
    };
    if unnamed {
        out.push(Entry {
            id: None,
            object: Err(format!("{place}: invalid {kind}: metadata.name: required")),
        });
        return;
    }
    let object = match &id {
        ObjectId::Namespace(_) => typed::<core::Namespace>(doc, &kind, &id)
            .map(|n| Object::Namespace(convert::namespace(&n))),
        ObjectId::Node(_) => {
            typed::<core::Node>(doc, &kind, &id).map(|n| Object::Node(convert::node(&n)))
        }
        ObjectId::Policy(_) => typed::<net::NetworkPolicy>(doc, &kind, &id)
            .and_then(|np| network_policy(&np).map(Object::Policy).map_err(|e| e.to_string())),
        ObjectId::Pod(_) => typed::<core::Pod>(doc, &kind, &id)
            .and_then(|p| convert::pod(&p).map(Object::Pod).map_err(|e| e.to_string())),
        ObjectId::ClusterPolicy(_) => {
            use crate::model::cluster_policy::{api, cluster_network_policy};
            let version = str_at(&doc, &["apiVersion"]);
            api::check_api_version(version)
                .map_err(|e| format!("invalid {kind} {name}: {e}"))
                .and_then(|()| typed::<api::ClusterNetworkPolicy>(doc, &kind, &id))
                .and_then(|p| {
                    cluster_network_policy(&p).map(Object::ClusterPolicy).map_err(|e| e.to_string())
                })
        }
    };
    out.push(Entry { id: Some(id), object });
}

/// Deserializes an API object strictly ([`input::strict`]: a field the type does not know is
/// an error), naming the fields that do not fit.
fn typed<T: DeserializeOwned>(doc: Value, kind: &str, id: &ObjectId) -> Result<T, String> {
    let object = match id {
        ObjectId::Namespace(n) | ObjectId::Node(n) | ObjectId::ClusterPolicy(n) => n.clone(),
        ObjectId::Policy(k) | ObjectId::Pod(k) => k.to_string(),
    };
    input::strict(doc).map_err(|e| format!("invalid {kind} {object}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Entry> {
        parse_manifests(Path::new("t.yaml"), text).unwrap()
    }

    #[test]
    fn multi_document_and_lists() {
        let e = parse(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {a: b}}\n---\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n\
             - apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: c}\n",
        );
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, Some(ObjectId::Namespace("x".into())));
        assert_eq!(e[1].id, Some(ObjectId::Pod(ObjectKey::new("default", "p"))));
        assert!(e[1].object.is_ok());
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: x}\n\
             spec:\n  podSelector: {matchLabels: [1]}\n",
        );
        let msg = e[0].object.as_ref().unwrap_err();
        assert!(msg.contains("x/np") && msg.contains("spec.podSelector.matchLabels"), "{msg}");
    }

    #[test]
    fn unknown_fields_make_the_object_invalid() {
        let e = parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: x}\n\
             spec:\n  podSelector: {}\n  ingress:\n  - form: [{podSelector: {}}]\n",
        );
        assert_eq!(
            e[0].object.as_ref().unwrap_err(),
            "invalid NetworkPolicy x/allow-web: spec.ingress[0].form: unknown field"
        );
        let e = parse(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x, label: {app: web}}\n",
        );
        assert_eq!(
            e[0].object.as_ref().unwrap_err(),
            "invalid Pod x/p: metadata.label: unknown field"
        );
    }

    #[test]
    fn syntax_errors_fail_the_file() {
        assert!(parse_manifests(Path::new("t.yaml"), "kind: [unclosed\n").is_err());
        assert!(parse_manifests(Path::new("t.json"), "{\"kind\": ").is_err());
    }
}
