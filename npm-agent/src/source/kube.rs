//! The Kubernetes source: kube-rs watchers on Pods (cluster-wide: peers on other nodes matter),
//! Namespaces, NetworkPolicies, ClusterNetworkPolicies and Nodes, turned into [`Event`]s.
//!
//! - The watchers (`kube::runtime::watcher`) run on a small tokio runtime owned by the source
//!   (one worker thread) and hand what they see over a bounded channel; [`Source::next_batch`]
//!   waits on that channel with its timeout, so the agent's loop stays synchronous. The
//!   bounded channel is backpressure: when the agent is busy the watchers stop reading.
//! - Each watcher lists (in pages), then watches from the list's resourceVersion with
//!   bookmarks, so a reconnect resumes where it left off. A `410 Gone` (the resourceVersion
//!   was compacted away) makes the watcher list again; when that relist completes, objects the
//!   source knew of that it did not list are deleted. A dropped connection is resumed from the
//!   last resourceVersion seen. API errors are retried with exponential backoff (800 ms up
//!   to 30 s, as client-go's reflector); meanwhile nothing is deleted, so enforcement goes on
//!   from the last known state.
//! - Objects are converted into the model as they are decoded, inside the HTTP client's
//!   deserialization (see [`Item`]): the API objects never outlive one list page or one
//!   watch event. The source itself keeps only a 64-bit fingerprint per object (to tell
//!   changed from unchanged objects on a relist, and what to delete); the engine holds the
//!   model. Pods are watched with a field selector that leaves out pods that can never be
//!   peers or endpoints (host-network pods and terminated ones). Pods and policies are listed
//!   in pages of 500 with the "most recent" semantics: a `resourceVersion=0` list is served
//!   from the API server's watch cache without pagination, which for 100k pods is a single
//!   response of hundreds of MiB, the very thing that runs a 300 MiB agent out of memory.
//!   Namespaces are small and listed from the watch cache (`resourceVersion=0`) in one
//!   response. Every Node is watched, paged as pods are (a Node object is large): this node's
//!   addresses are always allowed, and ClusterNetworkPolicy `nodes` peers select nodes by
//!   label. A Node whose labels and addresses did not change (a status heartbeat) changes
//!   nothing downstream.
//! - An object that does not deserialize or convert, or a policy that does not validate, is
//!   reported (an error naming the object and the field), counted in [`SourceHealth`], and
//!   skipped: the previous valid version, if any, stays in force (it is neither replaced nor
//!   deleted, also across relists). A watch line that is not JSON at all is counted as a parse
//!   error and skipped; the watch goes on.
//! - The first batch with `synced` set is the one that completes the initial list of every
//!   kind; before that the agent applies nothing to the dataplane, so whatever a previous
//!   agent pinned keeps enforcing.
//! - ClusterNetworkPolicies (`policy.networking.k8s.io/v1alpha2`, typed by kube's
//!   `CustomResource` in [`crate::model::cluster_policy::api`]) are optional: where their
//!   CRD is not installed the list answers 404, the kind counts as listed with nothing in it
//!   (the agent works as before), and the watcher keeps retrying with backoff, so the
//!   policies arrive once the CRD is installed. A 403 (the ClusterRole lacks them) is the
//!   same, but reported as a problem.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hasher as _;
use std::marker::PhantomData;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use kube::api::{Api, ObjectMeta};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::{Deserialize, DeserializeOwned, Deserializer};
use tokio::sync::mpsc;

use super::{Batch, Object, ObjectId, Source, SourceHealth};
use crate::model::validate::network_policy;
use crate::model::{ObjectKey, convert};
use crate::state::Event;

/// The field selector of the pod watch: pods that can never be peers or endpoints (they
/// share the node's address, or have terminated) are left out. A pod that stops matching
/// (it terminates) arrives as a deletion.
pub const POD_FIELD_SELECTOR: &str =
    "spec.hostNetwork=false,status.phase!=Failed,status.phase!=Succeeded";

/// Objects per list page.
pub const PAGE_SIZE: u32 = 500;

/// Watcher messages the channel holds before the watchers wait for the agent.
const CHANNEL_CAPACITY: usize = 1024;

/// At most this many watcher messages go into one batch (the agent's loop keeps ticking).
const MAX_MESSAGES_PER_BATCH: usize = 4096;

/// How the source connects and retries.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name (for the logs: every Node is watched).
    pub node_name: String,
    /// Objects per list page of pods, policies and nodes (namespaces come in one).
    pub page_size: u32,
    /// The first delay after an API error; it doubles (with jitter) on each error in a row.
    pub backoff_min: Duration,
    /// The longest delay between retries.
    pub backoff_max: Duration,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        KubeOptions {
            node_name: node_name.into(),
            page_size: PAGE_SIZE,
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The kinds the source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Node,
    Policy,
    Pod,
    /// ClusterNetworkPolicies: optional (a cluster without their CRD serves none).
    ClusterPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] =
        [Kind::Namespace, Kind::Node, Kind::Policy, Kind::Pod, Kind::ClusterPolicy];

    /// The resource's plural name, as the API and the logs spell it.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Node => "nodes",
            Kind::Policy => "networkpolicies",
            Kind::Pod => "pods",
            Kind::ClusterPolicy => "clusternetworkpolicies",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The kind watched for objects like `id`.
    fn of(id: &ObjectId) -> Option<Kind> {
        Some(match id {
            ObjectId::Namespace(_) => Kind::Namespace,
            ObjectId::Node(_) => Kind::Node,
            ObjectId::Policy(_) => Kind::Policy,
            ObjectId::Pod(_) => Kind::Pod,
            ObjectId::ClusterPolicy(_) => Kind::ClusterPolicy,
        })
    }

    /// Whether the kind may be missing from the API (a CRD not installed): it then counts
    /// as listed, with nothing in it, and the watch keeps retrying to pick it up later.
    fn optional(self) -> bool {
        self == Kind::ClusterPolicy
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

/// An API kind the source watches: its k8s-openapi type and its conversion into the model.
pub trait Watched: Send + Sync + 'static {
    type Api: Resource<DynamicType = ()> + DeserializeOwned;
    const KIND: Kind;
    /// The API's kind name (`Pod`), for messages.
    const NAME: &'static str;
    fn id(namespace: &str, name: &str) -> ObjectId;
    fn convert(api: &Self::Api) -> Result<Object, String>;
}

pub struct Pods;
pub struct Namespaces;
pub struct Nodes;
pub struct Policies;
pub struct ClusterPolicies;

impl Watched for Pods {
    type Api = core::Pod;
    const KIND: Kind = Kind::Pod;
    const NAME: &'static str = "Pod";
    fn id(namespace: &str, name: &str) -> ObjectId {
        ObjectId::Pod(ObjectKey::new(namespace, name))
    }
    fn convert(api: &core::Pod) -> Result<Object, String> {
        convert::pod(api).map(Object::Pod).map_err(|e| e.to_string())
    }
}

impl Watched for Namespaces {
    type Api = core::Namespace;
    const KIND: Kind = Kind::Namespace;
    const NAME: &'static str = "Namespace";
    fn id(_: &str, name: &str) -> ObjectId {
        ObjectId::Namespace(name.to_string())
    }
    fn convert(api: &core::Namespace) -> Result<Object, String> {
        Ok(Object::Namespace(convert::namespace(api)))
    }
}

impl Watched for Nodes {
    type Api = core::Node;
    const KIND: Kind = Kind::Node;
    const NAME: &'static str = "Node";
    fn id(_: &str, name: &str) -> ObjectId {
        ObjectId::Node(name.to_string())
    }
    fn convert(api: &core::Node) -> Result<Object, String> {
        Ok(Object::Node(convert::node(api)))
    }
}

impl Watched for Policies {
    type Api = net::NetworkPolicy;
    const KIND: Kind = Kind::Policy;
    const NAME: &'static str = "NetworkPolicy";
    fn id(namespace: &str, name: &str) -> ObjectId {
        ObjectId::Policy(ObjectKey::new(namespace, name))
    }
    fn convert(api: &net::NetworkPolicy) -> Result<Object, String> {
        network_policy(api).map(Object::Policy).map_err(|e| e.to_string())
    }
}

impl Watched for ClusterPolicies {
    type Api = crate::model::cluster_policy::api::ClusterNetworkPolicy;
    const KIND: Kind = Kind::ClusterPolicy;
    const NAME: &'static str = "ClusterNetworkPolicy";
    fn id(_: &str, name: &str) -> ObjectId {
        ObjectId::ClusterPolicy(name.to_string())
    }
    fn convert(api: &Self::Api) -> Result<Object, String> {
        crate::model::cluster_policy::cluster_network_policy(api)
            .map(Object::ClusterPolicy)
            .map_err(|e| e.to_string())
    }
}

/// What the watchers decode API objects into: the few metadata fields the watcher itself
/// needs (name, namespace, resourceVersion) and the object in model form, or why it could
/// not be had. Deserializing an `Item` never fails, whatever the JSON holds, so one
/// malformed object cannot fail a whole list page (which would make the watcher relist
/// forever) or a watch.
pub struct Item<W> {
    meta: ObjectMeta,
    pub id: Option<ObjectId>,
    pub object: Result<Object, String>,
    kind: PhantomData<fn() -> W>,
}

impl<W> Clone for Item<W> {
    fn clone(&self) -> Self {
        Item {
            meta: self.meta.clone(),
            id: self.id.clone(),
            object: self.object.clone(),
            kind: PhantomData,
        }
    }
}

impl<W> fmt::Debug for Item<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Item").field("id", &self.id).field("object", &self.object).finish()
    }
}

impl<W: Watched> Item<W> {
    /// Decodes one API object (as JSON) into the model.
    pub fn from_value(value: serde_json::Value) -> Self {
        let meta_str = |key: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let name = meta_str("name").filter(|n| !n.is_empty());
        let namespace = meta_str("namespace");
        let resource_version = meta_str("resourceVersion");
        let id = name.as_deref().map(|n| W::id(namespace.as_deref().unwrap_or_default(), n));
        let shown = match (&namespace, &name) {
            (_, None) => "(unnamed)".to_string(),
            (Some(ns), Some(n)) if !ns.is_empty() => format!("{ns}/{n}"),
            (_, Some(n)) => n.clone(),
        };
        let object = if !value.is_object() {
            Err(format!("invalid {} {shown}: (object): not a JSON object", W::NAME))
        } else {
            match serde_path_to_error::deserialize::<_, W::Api>(value) {
                Ok(api) => W::convert(&api),
                Err(e) => {
                    let path = e.path().to_string();
                    let field =
                        if path == "." || path.is_empty() { "(object)".to_string() } else { path };
                    Err(format!("invalid {} {shown}: {field}: {}", W::NAME, e.inner()))
                }
            }
        };
        let meta = ObjectMeta { name, namespace, resource_version, ..ObjectMeta::default() };
        Item { meta, id, object, kind: PhantomData }
    }
}

impl<'de, W: Watched> Deserialize<'de> for Item<W> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        Ok(Item::from_value(value))
    }
}

impl<W: Watched> Resource for Item<W> {
    type DynamicType = ();
    type Scope = <W::Api as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        <W::Api as Resource>::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        <W::Api as Resource>::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        <W::Api as Resource>::version(dt)
    }
    fn api_version(dt: &()) -> Cow<'_, str> {
        <W::Api as Resource>::api_version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        <W::Api as Resource>::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// What a watcher hands to the source.
#[derive(Debug)]
enum Msg {
    /// A (re)list starts.
    Init(Kind),
    /// An object listed (`initial`) or added or modified.
    Apply {
        kind: Kind,
        initial: bool,
        id: Option<ObjectId>,
        object: Result<Object, String>,
    },
    Delete {
        kind: Kind,
        id: Option<ObjectId>,
    },
    /// The (re)list is complete.
    InitDone(Kind),
    Error {
        kind: Kind,
        what: ErrorKind,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    /// 410 Gone: the watcher lists again.
    Gone,
    /// A response or watch line that does not parse.
    Parse,
    /// The resource is not served (404: its CRD is not installed) or not allowed (403):
    /// retried with backoff; for an optional kind, the kind counts as listed meanwhile.
    Unavailable(u16),
    /// Anything else (connection, authorization, server errors): retried with backoff.
    Api,
}

fn classify(e: &watcher::Error) -> ErrorKind {
    use kube::Error as K;
    use watcher::Error as W;
    match e {
        W::WatchError(status) if status.code == 410 => ErrorKind::Gone,
        W::InitialListFailed(K::Api(status))
        | W::WatchStartFailed(K::Api(status))
        | W::WatchFailed(K::Api(status))
            if status.code == 410 =>
        {
            ErrorKind::Gone
        }
        W::InitialListFailed(K::SerdeError(_)) | W::WatchFailed(K::SerdeError(_)) => {
            ErrorKind::Parse
        }
        W::InitialListFailed(K::Api(status)) | W::WatchStartFailed(K::Api(status))
            if status.code == 404 || status.code == 403 =>
        {
            ErrorKind::Unavailable(status.code)
        }
        _ => ErrorKind::Api,
    }
}

/// Exponential backoff with jitter (±25%), reset by the watcher's stream on every success.
struct ExpBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
    seed: u64,
}

impl ExpBackoff {
    fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        ExpBackoff { min, max: max.max(min), next: min, seed }
    }
}

impl Iterator for ExpBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // 0.75..1.25 of the base.
        let factor = 0.75 + (self.seed % 1000) as f64 / 2000.0;
        Some(base.mul_f64(factor))
    }
}

impl Backoff for ExpBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

async fn watch<W: Watched>(
    api: Api<Item<W>>,
    config: watcher::Config,
    options: KubeOptions,
    tx: mpsc::Sender<Msg>,
) {
    let backoff = ExpBackoff::new(options.backoff_min, options.backoff_max);
    let mut stream = watcher::watcher(api, config).backoff(backoff).boxed();
    while let Some(next) = stream.next().await {
        let kind = W::KIND;
        let msg = match next {
            Ok(watcher::Event::Init) => Msg::Init(kind),
            Ok(watcher::Event::InitApply(item)) => {
                Msg::Apply { kind, initial: true, id: item.id, object: item.object }
            }
            Ok(watcher::Event::Apply(item)) => {
                Msg::Apply { kind, initial: false, id: item.id, object: item.object }
            }
            Ok(watcher::Event::Delete(item)) => Msg::Delete { kind, id: item.id },
            Ok(watcher::Event::InitDone) => Msg::InitDone(kind),
            Err(e) => Msg::Error { kind, what: classify(&e), message: e.to_string() },
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
}

/// What the source keeps of one object: enough to tell whether a new version differs and
/// whether a relist still had it.
#[derive(Clone, Copy, Debug)]
struct Entry {
    fingerprint: u64,
    /// The relist epoch of its kind in which it was last seen.
    epoch: u32,
}

#[derive(Debug, Default)]
struct KindState {
    /// Whether a list of this kind has completed since start.
    synced: bool,
    /// The current (re)list, while one is running.
    listing: bool,
    epoch: u32,
    /// The last error of an ongoing streak of errors, and how many.
    error: Option<String>,
    errors_in_row: u64,
}

/// The Kubernetes source. See the module documentation.
pub struct KubeSource {
    rx: mpsc::Receiver<Msg>,
    describe: String,
    kinds: [KindState; 5],
    current: HashMap<ObjectId, Entry>,
    /// Objects whose last version was rejected: why, and the relist epoch of their kind in
    /// which that version was seen.
    invalid: BTreeMap<ObjectId, (String, u32)>,
    /// Rejected objects without a name (the last few).
    unnamed: Vec<String>,
    synced: bool,
    parse_errors: u64,
    invalid_objects: u64,
    api_errors: u64,
    /// Dropped (in [`Drop`]) after everything else.
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeSource {
    /// Connects with the in-cluster configuration (the service account's token), or else
    /// KUBECONFIG / `~/.kube/config`. Does not wait for the API server: the watchers retry
    /// until it answers.
    pub fn connect(options: KubeOptions) -> anyhow::Result<KubeSource> {
        let runtime = runtime()?;
        let config = runtime
            .block_on(kube::Config::infer())
            .context("kube source: no in-cluster configuration and no usable kubeconfig")?;
        KubeSource::start(runtime, config, options)
    }

    /// Starts the watchers against the API server `config` names (tests point it at a
    /// loopback server).
    pub fn from_config(config: kube::Config, options: KubeOptions) -> anyhow::Result<KubeSource> {
        KubeSource::start(runtime()?, config, options)
    }

    fn start(
        runtime: tokio::runtime::Runtime,
        config: kube::Config,
        options: KubeOptions,
    ) -> anyhow::Result<KubeSource> {
        let describe = format!("kube:{}", config.cluster_url);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        {
            let _guard = runtime.enter();
            let client =
                Client::try_from(config).context("kube source: building the API client")?;
            // Large kinds: paginated lists (kube-rs then leaves resourceVersion unset: the
            // most recent semantics). Small kinds: one list from the watch cache
            // (resourceVersion=0, no limit), which spares etcd.
            let paged = watcher::Config::default().page_size(options.page_size);
            let cached =
                watcher::Config { page_size: None, ..watcher::Config::default() }.any_semantic();
            let pods = paged.clone().fields(POD_FIELD_SELECTOR);
            let nodes = paged.clone();
            let policies = paged;
            let namespaces = cached.clone();
            runtime.spawn(watch::<Namespaces>(
                Api::all(client.clone()),
                namespaces,
                options.clone(),
                tx.clone(),
            ));
            runtime.spawn(watch::<Nodes>(
                Api::all(client.clone()),
                nodes,
                options.clone(),
                tx.clone(),
            ));
            runtime.spawn(watch::<Policies>(
                Api::all(client.clone()),
                policies,
                options.clone(),
                tx.clone(),
            ));
            runtime.spawn(watch::<ClusterPolicies>(
                Api::all(client.clone()),
                cached.clone(),
                options.clone(),
                tx.clone(),
            ));
            runtime.spawn(watch::<Pods>(Api::all(client), pods, options.clone(), tx));
        }
        tracing::info!(source = %describe, node = %options.node_name, "watching pods, namespaces, networkpolicies, clusternetworkpolicies and nodes");
        Ok(KubeSource {
            rx,
            describe,
            kinds: Default::default(),
            current: HashMap::new(),
            invalid: BTreeMap::new(),
            unnamed: Vec::new(),
            synced: false,
            parse_errors: 0,
            invalid_objects: 0,
            api_errors: 0,
            runtime: Some(runtime),
        })
    }

    /// Whether every kind has completed its initial list.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// How many objects the source knows of (valid ones, or invalid ones whose previous
    /// version stays in force).
    pub fn objects(&self) -> usize {
        self.current.len()
    }

    /// API errors met since start (connection, authorization, server errors, 410 Gone).
    pub fn api_errors(&self) -> u64 {
        self.api_errors
    }

    fn handle(&mut self, msg: Msg, events: &mut Vec<Event>) {
        let kind = match &msg {
            Msg::Init(k) | Msg::InitDone(k) => *k,
            Msg::Apply { kind, .. } | Msg::Delete { kind, .. } | Msg::Error { kind, .. } => *kind,
        };
        if !matches!(msg, Msg::Error { .. }) {
            let st = &mut self.kinds[kind.index()];
            if let Some(last) = st.error.take() {
                tracing::info!(kind = %kind, errors = st.errors_in_row, last_error = %last, "watch recovered");
                st.errors_in_row = 0;
            }
        }
        match msg {
            Msg::Init(kind) => {
                let st = &mut self.kinds[kind.index()];
                st.listing = true;
                st.epoch = st.epoch.wrapping_add(1);
                if st.synced {
                    tracing::info!(kind = %kind, "relisting");
                } else {
                    tracing::debug!(kind = %kind, "listing");
                }
            }
            Msg::Apply { kind, initial, id, object } => {
                self.apply(kind, initial, id, object, events)
            }
            Msg::Delete { kind: _, id: None } => {}
            Msg::Delete { kind: _, id: Some(id) } => {
                self.invalid.remove(&id);
                if self.current.remove(&id).is_some() {
                    events.push(delete_event(&id));
                }
            }
            Msg::InitDone(kind) => {
                let epoch = self.kinds[kind.index()].epoch;
                let mut gone: Vec<ObjectId> = self
                    .current
                    .iter()
                    .filter(|(id, e)| Kind::of(id) == Some(kind) && e.epoch != epoch)
                    .map(|(id, _)| id.clone())
                    .collect();
                gone.sort();
                if !gone.is_empty() {
                    tracing::info!(kind = %kind, deleted = gone.len(), "objects gone while the watch was down");
                }
                for id in gone.into_iter().rev() {
                    self.current.remove(&id);
                    self.invalid.remove(&id);
                    events.push(delete_event(&id));
                }
                self.invalid.retain(|id, (_, e)| Kind::of(id) != Some(kind) || *e == epoch);
                let st = &mut self.kinds[kind.index()];
                st.listing = false;
                if !st.synced {
                    st.synced = true;
                    tracing::info!(kind = %kind, "initial list complete");
                }
            }
            Msg::Error { kind, what, message } => {
                let st = &mut self.kinds[kind.index()];
                match what {
                    ErrorKind::Gone => {
                        self.api_errors += 1;
                        tracing::info!(kind = %kind, "{message}; listing again");
                    }
                    ErrorKind::Parse => {
                        self.parse_errors += 1;
                        tracing::error!(kind = %kind, "malformed API response skipped: {message}");
                    }
                    ErrorKind::Unavailable(code) if kind.optional() => {
                        if !st.synced {
                            st.synced = true;
                            if code == 404 {
                                tracing::info!(kind = %kind, "not served (its CRD is not installed): none enforced; watching for it");
                            }
                        }
                        if code == 403 {
                            // Not allowed: the operator must know (a missing ClusterRole rule).
                            self.api_errors += 1;
                            if st.error.is_none() {
                                tracing::warn!(kind = %kind, "not allowed to list them (the ClusterRole lacks it); none enforced: {message}");
                            }
                            st.error = Some(message);
                            st.errors_in_row += 1;
                        }
                    }
                    ErrorKind::Unavailable(_) | ErrorKind::Api => {
                        self.api_errors += 1;
                        if st.error.is_none() {
                            tracing::warn!(kind = %kind, "API error; retrying with backoff, enforcing the last known state: {message}");
                        } else {
                            tracing::debug!(kind = %kind, "API error (again): {message}");
                        }
                        st.error = Some(message);
                        st.errors_in_row += 1;
                    }
                }
            }
        }
    }

    fn apply(
        &mut self,
        kind: Kind,
        initial: bool,
        id: Option<ObjectId>,
        object: Result<Object, String>,
        events: &mut Vec<Event>,
    ) {
        let epoch = self.kinds[kind.index()].epoch;
        let Some(id) = id else {
            self.invalid_objects += 1;
            let message = match object {
                Err(m) => m,
                Ok(_) => format!("invalid {kind}: metadata.name: required"),
            };
            tracing::error!(kind = %kind, "{message}");
            if self.unnamed.len() >= 8 {
                self.unnamed.remove(0);
            }
            self.unnamed.push(message);
            return;
        };
        match object {
            Ok(object) => {
                self.invalid.remove(&id);
                let fingerprint = fingerprint(&object);
                let entry = Entry { fingerprint, epoch };
                match self.current.insert(id, entry) {
                    Some(old) if old.fingerprint == fingerprint => {}
                    _ => events.push(upsert_event(object)),
                }
            }
            Err(message) => {
                self.invalid_objects += 1;
                let kept = match self.current.get_mut(&id) {
                    Some(e) => {
                        // Still there: a relist must not delete the version in force.
                        e.epoch = epoch;
                        true
                    }
                    None => false,
                };
                tracing::error!(object = %id, kept_previous_version = kept, listed = initial, "{message}");
                self.invalid.insert(id, (message, epoch));
            }
        }
    }

    fn all_synced(&self) -> bool {
        self.kinds.iter().all(|k| k.synced)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("npm-kube")
        .enable_all()
        .build()
        .context("kube source: starting its runtime")
}

fn upsert_event(object: Object) -> Event {
    object.upsert()
}

fn delete_event(id: &ObjectId) -> Event {
    id.delete()
}

/// Feeds what is written into a hasher.
struct HashWriter(std::collections::hash_map::DefaultHasher);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A fingerprint of an object's model form (what the compiler sees of it).
fn fingerprint(object: &Object) -> u64 {
    let mut w = HashWriter(std::collections::hash_map::DefaultHasher::new());
    let result = match object {
        Object::Namespace(n) => serde_json::to_writer(&mut w, n),
        Object::Node(n) => serde_json::to_writer(&mut w, n),
        Object::Policy(p) => serde_json::to_writer(&mut w, p),
        Object::ClusterPolicy(p) => serde_json::to_writer(&mut w, p),
        Object::Pod(p) => serde_json::to_writer(&mut w, p),
    };
    debug_assert!(result.is_ok());
    w.0.finish()
}

impl Source for KubeSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn next_batch(&mut self, timeout: Duration) -> anyhow::Result<Option<Batch>> {
        let Some(runtime) = self.runtime.as_ref() else { anyhow::bail!("kube source: stopped") };
        let rx = &mut self.rx;
        // The timer is made inside the runtime (it needs its time driver).
        let first = match runtime.block_on(async { tokio::time::timeout(timeout, rx.recv()).await })
        {
            Err(_elapsed) => return Ok(None),
            Ok(None) => {
                // Cannot happen while the runtime runs (watchers never end); do not spin.
                std::thread::sleep(timeout);
                anyhow::bail!("kube source: every watcher stopped")
            }
            Ok(Some(m)) => m,
        };
        let mut events = Vec::new();
        self.handle(first, &mut events);
        for _ in 1..MAX_MESSAGES_PER_BATCH {
            match self.rx.try_recv() {
                Ok(m) => self.handle(m, &mut events),
                Err(_) => break,
            }
        }
        let newly_synced = !self.synced && self.all_synced();
        if newly_synced {
            self.synced = true;
            tracing::info!(objects = self.current.len(), "initial sync of every kind complete");
        }
        if events.is_empty() && !newly_synced {
            return Ok(None);
        }
        Ok(Some(Batch { events, synced: self.synced, generation: None }))
    }

    fn health(&self) -> SourceHealth {
        let mut problems: Vec<String> = Vec::new();
        for (id, (message, _)) in &self.invalid {
            let what =
                if self.current.contains_key(id) { "previous version kept" } else { "not applied" };
            problems.push(format!("{message} ({what})"));
        }
        problems.extend(self.unnamed.iter().map(|m| format!("{m} (not applied)")));
        for kind in Kind::ALL {
            let st = &self.kinds[kind.index()];
            if let Some(e) = &st.error {
                let state = if st.synced {
                    "enforcing the last known state"
                } else {
                    "initial list not complete"
                };
                problems.push(format!(
                    "{kind}: {e} ({} errors in a row; retrying with backoff; {state})",
                    st.errors_in_row
                ));
            } else if !st.synced {
                problems.push(format!("{kind}: initial list not complete"));
            }
        }
        SourceHealth {
            parse_errors: self.parse_errors,
            invalid_objects: self.invalid_objects,
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_items_decode_into_errors_naming_object_and_field() {
        let v = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "x", "resourceVersion": "7", "labels": [1]},
        });
        let item = Item::<Pods>::from_value(v);
        assert_eq!(item.id, Some(ObjectId::Pod(ObjectKey::new("x", "p"))));
        assert_eq!(item.meta.resource_version.as_deref(), Some("7"));
        let e = item.object.unwrap_err();
        assert!(e.contains("Pod x/p") && e.contains("metadata.labels"), "{e}");

        let item = Item::<Namespaces>::from_value(serde_json::json!(42));
        assert!(item.id.is_none() && item.object.is_err());
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let v = serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "np", "namespace": "x", "resourceVersion": "1"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]},
        });
        let e = Item::<Policies>::from_value(v).object.unwrap_err();
        assert!(e.contains("x/np") && e.contains("spec.ingress[0].from[0].ipBlock.cidr"), "{e}");
    }

    #[test]
    fn backoff_grows_to_its_maximum_and_resets() {
        let mut b = ExpBackoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<Duration> = (0..5).map(|_| b.next().unwrap()).collect();
        assert!(d[0] >= Duration::from_millis(75) && d[0] <= Duration::from_millis(125), "{d:?}");
        assert!(d[4] >= Duration::from_millis(300) && d[4] <= Duration::from_millis(500), "{d:?}");
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(125));
    }
}
