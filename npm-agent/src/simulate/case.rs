//! The conformance case format (shared/conformance/FORMAT.md): parsing, and turning a
//! case's model and actions into the compiler's events.
//!
//! Cases are read strictly ([`crate::input`]): a key the format does not have (`expects:`,
//! `action:`) is an error naming it, and so is a field a policy of an `apply` does not have
//! (`spec.ingress[0].form`): the policy is rejected, as the API server's strict field
//! validation would. ClusterNetworkPolicy objects are validated into events (the reference
//! evaluator judges them; the compiler's enforcer refuses them, not compiled yet). Keys the
//! format documents for what this runner does not do yet (dual stack) are read and refused
//! with an error saying so.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::model::{
    self, InvalidObject, Labels, NamedPort, Namespace, ObjectKey, Pod, PodPhase, Protocol,
};
use crate::state::Event;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub model: Option<ModelSpec>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Absent: the default namespaces and pods.
    #[serde(default)]
    pub namespaces: Option<Vec<NamespaceSpec>>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Only `[IPv4]` is supported (dual stack is documented, not implemented yet).
    #[serde(default, rename = "ip-families")]
    pub ip_families: Option<Vec<String>>,
}

/// A namespace of the model: its name, or `{name, labels}`.
#[derive(Debug)]
pub enum NamespaceSpec {
    Name(String),
    Full { name: String, labels: Option<Labels> },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceFull {
    name: String,
    #[serde(default, deserialize_with = "opt_labels")]
    labels: Option<Labels>,
}

impl<'de> Deserialize<'de> for NamespaceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Spec;
        impl<'de> serde::de::Visitor<'de> for Spec {
            type Value = NamespaceSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a namespace name or {name, labels}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NamespaceSpec, E> {
                Ok(NamespaceSpec::Name(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<NamespaceSpec, A::Error> {
                let f =
                    NamespaceFull::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(NamespaceSpec::Full { name: f.name, labels: f.labels })
            }
        }
        d.deserialize_any(Spec)
    }
}

impl NamespaceSpec {
    fn name(&self) -> &str {
        match self {
            NamespaceSpec::Name(n) | NamespaceSpec::Full { name: n, .. } => n,
        }
    }

    /// Labels default to `ns: <name>`; the name label is always added.
    fn labels(&self) -> Labels {
        match self {
            NamespaceSpec::Full { labels: Some(l), .. } => l.clone(),
            _ => BTreeMap::from([("ns".to_string(), self.name().to_string())]),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub namespace: String,
    pub pod: String,
    #[serde(default, deserialize_with = "opt_labels")]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub ports: Option<Vec<PortDecl>>,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Dual stack's form of `ip`: only one IPv4 address is supported.
    #[serde(default)]
    pub ips: Option<Vec<IpAddr>>,
}

impl PodSpec {
    /// The address the spec gives (`ip`, or `ips` with one IPv4 address), if any.
    fn address(&self) -> Result<Option<IpAddr>, String> {
        let ips = self.ips.iter().flatten().copied().chain(self.ip);
        let mut v4: Vec<IpAddr> = Vec::new();
        for ip in ips {
            if !ip.is_ipv4() {
                return Err(format!(
                    "pod {}/{}: {ip}: IPv6 addresses are not supported yet",
                    self.namespace, self.pod
                ));
            }
            if !v4.contains(&ip) {
                v4.push(ip);
            }
        }
        match v4.as_slice() {
            [] => Ok(None),
            [ip] => Ok(Some(*ip)),
            _ => Err(format!("pod {}/{}: more than one IPv4 address", self.namespace, self.pod)),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortDecl {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub actions: Vec<Action>,
    #[serde(default)]
    pub expect: Vec<Expect>,
}

/// One action of a step. In the file, a map with exactly one key naming the action.
#[derive(Debug)]
pub enum Action {
    Apply(serde_yaml_ng::Value),
    DeletePolicy { namespace: String, name: String },
    DeleteClusterPolicy { name: String },
    SetPodLabels { namespace: String, pod: String, labels: Labels },
    SetNamespaceLabels { namespace: String, labels: Labels },
    CreatePod(PodSpec),
    DeletePod { namespace: String, pod: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyRef {
    /// `NetworkPolicy` (the default) or `ClusterNetworkPolicy` (cluster-scoped: no namespace).
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodRef {
    namespace: String,
    pod: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodLabels {
    namespace: String,
    pod: String,
    #[serde(deserialize_with = "labels")]
    labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceLabels {
    namespace: String,
    #[serde(deserialize_with = "labels")]
    labels: Labels,
}

/// The on-disk form of an action (YAML enums need tags; cases use one-key maps).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAction {
    apply: Option<serde_yaml_ng::Value>,
    delete_policy: Option<PolicyRef>,
    set_pod_labels: Option<PodLabels>,
    set_namespace_labels: Option<NamespaceLabels>,
    create_pod: Option<PodSpec>,
    delete_pod: Option<PodRef>,
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawAction::deserialize(d)?;
        let mut found = Vec::new();
        if let Some(v) = raw.apply {
            found.push(Action::Apply(v));
        }
        if let Some(r) = raw.delete_policy {
            match r.kind.as_deref() {
                None | Some("NetworkPolicy") => {
                    let namespace = r.namespace.ok_or_else(|| {
                        serde::de::Error::custom("delete-policy: missing field `namespace`")
                    })?;
                    found.push(Action::DeletePolicy { namespace, name: r.name });
                }
                Some("ClusterNetworkPolicy") => {
                    if r.namespace.is_some() {
                        return Err(serde::de::Error::custom(
                            "delete-policy: a ClusterNetworkPolicy is cluster-scoped: no namespace",
                        ));
                    }
                    found.push(Action::DeleteClusterPolicy { name: r.name });
                }
                Some(other) => {
                    return Err(serde::de::Error::custom(format!(
                        "delete-policy: kind {other}: NetworkPolicy or ClusterNetworkPolicy"
                    )));
                }
            }
        }
        if let Some(r) = raw.set_pod_labels {
            found.push(Action::SetPodLabels {
                namespace: r.namespace,
                pod: r.pod,
                labels: r.labels,
            });
        }
        if let Some(r) = raw.set_namespace_labels {
            found.push(Action::SetNamespaceLabels { namespace: r.namespace, labels: r.labels });
        }
        if let Some(p) = raw.create_pod {
            found.push(Action::CreatePod(p));
        }
        if let Some(r) = raw.delete_pod {
            found.push(Action::DeletePod { namespace: r.namespace, pod: r.pod });
        }
        match found.len() {
            1 => Ok(found.pop().expect("one action")),
            n => Err(serde::de::Error::custom(format!(
                "an action must have exactly one key, found {n}"
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub port: u16,
    pub protocol: String,
    pub table: String,
    #[serde(default)]
    pub sctp: bool,
    /// `IPv4` (the default); `IPv6` is not supported yet.
    #[serde(default)]
    pub family: Option<String>,
}

/// Label values are strings in Kubernetes; YAML may spell `1` or `true` without quotes,
/// which the API server would reject, but a case means the string.
fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
    let raw: BTreeMap<String, serde_yaml_ng::Value> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_yaml_ng::Value::String(s) => s,
                serde_yaml_ng::Value::Number(n) => n.to_string(),
                serde_yaml_ng::Value::Bool(b) => b.to_string(),
                serde_yaml_ng::Value::Null => String::new(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "label {k}: not a string: {other:?}"
                    )));
                }
            };
            Ok((k, s))
        })
        .collect()
}

fn opt_labels<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Labels>, D::Error> {
    labels(d).map(Some)
}

/// Reads a case file ([`crate::input::read_file`]) strictly: unknown keys are errors.
pub fn load(path: &Path) -> anyhow::Result<Case> {
    let text = crate::input::read_file(path)?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: not a valid case: {e}", path.display()))
}

/// Parses a case strictly (a key the format does not have is an error naming it).
pub fn parse(text: &str) -> Result<Case, crate::input::StrictError> {
    crate::input::strict(serde_yaml_ng::Deserializer::from_str(text))
}

/// The default model's ports: 80 and 81 over TCP, UDP and SCTP, named `serve-<port>-<proto>`.
pub fn default_ports() -> Vec<NamedPort> {
    let mut ports = Vec::new();
    for port in [80u16, 81] {
        for protocol in Protocol::ALL {
            ports.push(NamedPort {
                name: format!("serve-{port}-{}", protocol.as_str().to_lowercase()),
                protocol,
                port,
            });
        }
    }
    ports.sort();
    ports
}

/// The cluster a case runs on, as it changes step by step: namespaces and pods in model
/// order (the order of the tables).
#[derive(Clone, Debug)]
pub struct CaseCluster {
    /// Namespaces in model order, with their labels.
    pub namespaces: Vec<Namespace>,
    /// Pods present now, each with its namespace's ordinal and a creation sequence number.
    pods: Vec<(usize, u64, Pod)>,
    /// Declared ports of each pod (the servers the lab starts), by pod.
    pub ports: HashMap<ObjectKey, Vec<(Protocol, u16)>>,
    created: HashMap<String, u32>,
    seq: u64,
}

/// The node every simulated pod runs on.
pub const SIM_NODE: &str = "node-0";

impl CaseCluster {
    pub fn new(case: &Case) -> Result<Self, String> {
        let mut c = CaseCluster {
            namespaces: Vec::new(),
            pods: Vec::new(),
            ports: HashMap::new(),
            created: HashMap::new(),
            seq: 0,
        };
        if let Some(families) = case.model.as_ref().and_then(|m| m.ip_families.as_ref()) {
            match families.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["IPv4"] => {}
                f if f.iter().all(|x| matches!(*x, "IPv4" | "IPv6")) => {
                    return Err(format!(
                        "model: ip-families {f:?}: IPv6 (dual stack) is not supported yet"
                    ));
                }
                f => return Err(format!("model: ip-families {f:?}: each must be IPv4 or IPv6")),
            }
        }
        match case.model.as_ref().and_then(|m| m.namespaces.as_ref().map(|ns| (ns, &m.pods))) {
            None => {
                for ns in ["x", "y", "z"] {
                    c.namespaces.push(Namespace::new(
                        ns,
                        BTreeMap::from([("ns".to_string(), ns.to_string())]),
                    ));
                }
                for ns in ["x", "y", "z"] {
                    for pod in ["a", "b", "c"] {
                        c.add_model_pod(&PodSpec {
                            namespace: ns.into(),
                            pod: pod.into(),
                            labels: None,
                            ports: None,
                            ip: None,
                            ips: None,
                        })?;
                    }
                }
            }
            Some((namespaces, pods)) => {
                for ns in namespaces {
                    if c.ns_ordinal(ns.name()).is_some() {
                        return Err(format!("model: namespace {} listed twice", ns.name()));
                    }
                    c.namespaces.push(Namespace::new(ns.name(), ns.labels()));
                }
                for p in pods {
                    c.add_model_pod(p)?;
                }
            }
        }
        Ok(c)
    }

    fn ns_ordinal(&self, ns: &str) -> Option<usize> {
        self.namespaces.iter().position(|n| n.name == ns)
    }

    fn add_model_pod(&mut self, spec: &PodSpec) -> Result<(), String> {
        let i = self.ns_ordinal(&spec.namespace).ok_or_else(|| {
            format!("model: pod {}/{}: unknown namespace", spec.namespace, spec.pod)
        })?;
        let j = self.pods.iter().filter(|(n, _, _)| *n == i).count();
        let ip =
            spec.address()?.unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 240, i as u8, 10 + j as u8)));
        self.insert(i, spec, ip)
    }

    /// Creates a pod by action: address 10.240.i.(100+n), n counting this namespace's
    /// created pods, unless the action gives one.
    pub fn create_pod(&mut self, spec: &PodSpec) -> Result<Pod, String> {
        let i = self.ns_ordinal(&spec.namespace).ok_or_else(|| {
            format!("create-pod {}/{}: unknown namespace", spec.namespace, spec.pod)
        })?;
        let n = self.created.entry(spec.namespace.clone()).or_insert(0);
        let ip = spec.address()?.unwrap_or(IpAddr::V4(Ipv4Addr::new(
            10,
            240,
            i as u8,
            (100 + *n) as u8,
        )));
        *n += 1;
        self.insert(i, spec, ip)?;
        Ok(self.pod(&spec.namespace, &spec.pod).expect("just inserted").clone())
    }

    fn insert(&mut self, ns_ordinal: usize, spec: &PodSpec, ip: IpAddr) -> Result<(), String> {
        let key = ObjectKey::new(&spec.namespace, &spec.pod);
        if self.pod(&spec.namespace, &spec.pod).is_some() {
            return Err(format!("pod {key} already exists"));
        }
        if let Some((_, _, other)) = self.pods.iter().find(|(_, _, p)| p.ip == Some(ip)) {
            return Err(format!("pod {key}: address {ip} already belongs to {}", other.key));
        }
        let mut named_ports = Vec::new();
        let mut served = Vec::new();
        match &spec.ports {
            None => {
                named_ports = default_ports();
                served = named_ports.iter().map(|p| (p.protocol, p.port)).collect();
            }
            Some(decls) => {
                for d in decls {
                    let protocol = Protocol::parse(&d.protocol).ok_or_else(|| {
                        format!("pod {key}: port {}: unknown protocol {:?}", d.port, d.protocol)
                    })?;
                    served.push((protocol, d.port));
                    if let Some(name) = &d.name {
                        named_ports.push(NamedPort { name: name.clone(), protocol, port: d.port });
                    }
                }
            }
        }
        named_ports.sort();
        served.sort();
        served.dedup();
        let labels = spec
            .labels
            .clone()
            .unwrap_or_else(|| BTreeMap::from([("pod".to_string(), spec.pod.clone())]));
        let pod = Pod {
            key: key.clone(),
            labels: labels.into(),
            ip: Some(ip),
            ipv6: None,
            node: Some(SIM_NODE.to_string()),
            phase: PodPhase::Running,
            host_network: false,
            terminating: false,
            named_ports: named_ports.into(),
        };
        self.ports.insert(key, served);
        self.seq += 1;
        self.pods.push((ns_ordinal, self.seq, pod));
        self.pods.sort_by_key(|(n, s, _)| (*n, *s));
        Ok(())
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<&Pod> {
        self.pods.iter().map(|(_, _, p)| p).find(|p| p.key.namespace == ns && p.key.name == name)
    }

    /// Pods present now, in table order.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().map(|(_, _, p)| p)
    }

    /// The events that create the model: namespaces, then pods.
    pub fn initial_events(&self) -> Vec<Event> {
        let mut events: Vec<Event> =
            self.namespaces.iter().cloned().map(Event::UpsertNamespace).collect();
        events.extend(self.pods().cloned().map(Event::UpsertPod));
        events
    }

    /// A ClusterNetworkPolicy object of an `apply`: validated, or rejected as the API server
    /// would (fields the object does not have, values the CRD's schema refuses).
    fn cluster_policy(value: serde_yaml_ng::Value) -> ActionOutcome {
        use crate::model::cluster_policy::{api, cluster_network_policy};
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        match crate::input::strict::<_, api::ClusterNetworkPolicy>(value) {
            Ok(o) => match cluster_network_policy(&o) {
                Ok(p) => ActionOutcome::Events(vec![Event::UpsertClusterPolicy(p)]),
                Err(e) => ActionOutcome::Rejected(e),
            },
            Err(e) => ActionOutcome::Rejected(InvalidObject {
                kind: "ClusterNetworkPolicy",
                object: name,
                errors: e.into_errors(),
            }),
        }
    }

    /// Applies one action to the case's cluster and returns the compiler's events. A policy
    /// the API server would reject is returned as `Rejected` and changes nothing.
    pub fn action(&mut self, action: &Action) -> Result<ActionOutcome, String> {
        Ok(match action {
            Action::Apply(value) => {
                let value = self.substitute(value)?;
                let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
                if kind == "ClusterNetworkPolicy" {
                    return Ok(Self::cluster_policy(value));
                }
                if kind != "NetworkPolicy" {
                    return Err(format!(
                        "apply: kind {kind:?}: only NetworkPolicy objects are supported"
                    ));
                }
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    match crate::input::strict(value.clone()) {
                        Ok(np) => np,
                        // Fields a NetworkPolicy does not have: rejected, as the API server's
                        // strict field validation rejects them.
                        Err(crate::input::StrictError::Unknown(errors)) => {
                            let name = |k: &str| {
                                value
                                    .get("metadata")
                                    .and_then(|m| m.get(k))
                                    .and_then(|v| v.as_str())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let object =
                                ObjectKey::new(name("namespace"), name("name")).to_string();
                            return Ok(ActionOutcome::Rejected(InvalidObject {
                                kind: "NetworkPolicy",
                                object,
                                errors,
                            }));
                        }
                        Err(e) => return Err(format!("apply: not a NetworkPolicy: {e}")),
                    };
                match model::validate::network_policy(&np) {
                    Ok(p) => ActionOutcome::Events(vec![Event::UpsertPolicy(p)]),
                    Err(e) => ActionOutcome::Rejected(e),
                }
            }
            Action::DeleteClusterPolicy { name } => {
                ActionOutcome::Events(vec![Event::DeleteClusterPolicy(name.clone())])
            }
            Action::DeletePolicy { namespace, name } => {
                ActionOutcome::Events(vec![Event::DeletePolicy(ObjectKey::new(namespace, name))])
            }
            Action::SetPodLabels { namespace, pod, labels } => {
                let p = self
                    .pods
                    .iter_mut()
                    .map(|(_, _, p)| p)
                    .find(|p| p.key.namespace == *namespace && p.key.name == *pod)
                    .ok_or_else(|| format!("set-pod-labels: no pod {namespace}/{pod}"))?;
                p.labels = labels.clone().into();
                ActionOutcome::Events(vec![Event::UpsertPod(p.clone())])
            }
            Action::SetNamespaceLabels { namespace, labels } => {
                let i = self
                    .ns_ordinal(namespace)
                    .ok_or_else(|| format!("set-namespace-labels: no namespace {namespace}"))?;
                self.namespaces[i] = Namespace::new(namespace, labels.clone());
                ActionOutcome::Events(vec![Event::UpsertNamespace(self.namespaces[i].clone())])
            }
            Action::CreatePod(spec) => {
                ActionOutcome::Events(vec![Event::UpsertPod(self.create_pod(spec)?)])
            }
            Action::DeletePod { namespace, pod } => {
                let before = self.pods.len();
                self.pods
                    .retain(|(_, _, p)| !(p.key.namespace == *namespace && p.key.name == *pod));
                if self.pods.len() == before {
                    return Err(format!("delete-pod: no pod {namespace}/{pod}"));
                }
                let key = ObjectKey::new(namespace, pod);
                self.ports.remove(&key);
                ActionOutcome::Events(vec![Event::DeletePod(key)])
            }
        })
    }

    /// Replaces `{{podIP ns/pod}}` in every string of a policy.
    fn substitute(&self, v: &serde_yaml_ng::Value) -> Result<serde_yaml_ng::Value, String> {
        use serde_yaml_ng::Value;
        Ok(match v {
            Value::String(s) => Value::String(self.substitute_str(s)?),
            Value::Sequence(seq) => {
                Value::Sequence(seq.iter().map(|x| self.substitute(x)).collect::<Result<_, _>>()?)
            }
            Value::Mapping(m) => {
                let mut out = serde_yaml_ng::Mapping::new();
                for (k, x) in m {
                    out.insert(k.clone(), self.substitute(x)?);
                }
                Value::Mapping(out)
            }
            other => other.clone(),
        })
    }

    fn substitute_str(&self, s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| format!("unterminated {{{{ in {s:?}"))?;
            let inner = after[..end].trim();
            let target = inner
                .strip_prefix("podIP")
                .map(str::trim)
                .ok_or_else(|| format!("unknown template {{{{{inner}}}}} in {s:?}"))?;
            let (ns, pod) = target
                .split_once('/')
                .ok_or_else(|| format!("{{{{podIP {target}}}}}: expected ns/pod"))?;
            let ip = self
                .pod(ns, pod)
                .and_then(|p| p.ip)
                .ok_or_else(|| format!("{{{{podIP {target}}}}}: no such pod"))?;
            out.push_str(&ip.to_string());
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// What an action did.
pub enum ActionOutcome {
    Events(Vec<Event>),
    /// A policy the API server would reject: reported, not applied.
    Rejected(InvalidObject),
}
