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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
    /// `[IPv4]` (the default), `[IPv4, IPv6]` (dual stack) or `[IPv6]`.
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
    /// Dual stack's form of `ip`: one address of each family.
    #[serde(default)]
    pub ips: Option<Vec<IpAddr>>,
}

impl PodSpec {
    /// The addresses the spec gives (`ip`, or `ips`: at most one of each family).
    fn addresses(&self) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), String> {
        let (mut v4, mut v6) = (None, None);
        for ip in self.ips.iter().flatten().copied().chain(self.ip) {
            let twice = match ip {
                IpAddr::V4(a) => v4.replace(a).is_some_and(|old| old != a),
                IpAddr::V6(a) => v6.replace(a).is_some_and(|old| old != a),
            };
            if twice {
                return Err(format!(
                    "pod {}/{}: more than one address of a family",
                    self.namespace, self.pod
                ));
            }
        }
        Ok((v4, v6))
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
    /// `IPv4` (the default) or `IPv6`: the addresses the table's probes go between.
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
    /// The cluster's families (IPv4, IPv6): which addresses pods get.
    families: (bool, bool),
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
            families: (true, false),
        };
        if let Some(families) = case.model.as_ref().and_then(|m| m.ip_families.as_ref()) {
            let (mut v4, mut v6) = (false, false);
            for f in families {
                match f.as_str() {
                    "IPv4" => v4 = true,
                    "IPv6" => v6 = true,
                    f => return Err(format!("model: ip-families: {f:?}: IPv4 or IPv6")),
                }
            }
            if families.is_empty() || families.len() > 2 || (families.len() == 2 && !(v4 && v6)) {
                return Err(format!("model: ip-families {families:?}: one or both families, once"));
            }
            c.families = (v4, v6);
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
        let ips = self.addresses(spec, i, 10 + j)?;
        self.insert(i, spec, ips)
    }

    /// Creates a pod by action: address 10.240.i.(100+n), n counting this namespace's
    /// created pods, unless the action gives one.
    pub fn create_pod(&mut self, spec: &PodSpec) -> Result<Pod, String> {
        let i = self.ns_ordinal(&spec.namespace).ok_or_else(|| {
            format!("create-pod {}/{}: unknown namespace", spec.namespace, spec.pod)
        })?;
        let n = *self.created.get(&spec.namespace).unwrap_or(&0);
        let ips = self.addresses(spec, i, 100 + n as usize)?;
        *self.created.entry(spec.namespace.clone()).or_insert(0) += 1;
        self.insert(i, spec, ips)?;
        Ok(self.pod(&spec.namespace, &spec.pod).expect("just inserted").clone())
    }

    /// A pod's addresses: those its spec gives, else the model's of ordinal `host` (IPv4
    /// `10.240.i.host`, IPv6 `fd00:10:240:i::host` written with the same decimal digits), of
    /// the cluster's families. The first is its `ip`; a dual-stack pod's IPv6 one is `ipv6`.
    fn addresses(&self, spec: &PodSpec, i: usize, host: usize) -> Result<Vec<IpAddr>, String> {
        let (v4, v6) = spec.addresses()?;
        let key = ObjectKey::new(&spec.namespace, &spec.pod);
        let mut out = Vec::new();
        if self.families.0 {
            out.push(IpAddr::V4(v4.unwrap_or(Ipv4Addr::new(10, 240, i as u8, host as u8))));
        } else if let Some(a) = v4 {
            return Err(format!("pod {key}: {a}: the cluster is IPv6 only (ip-families)"));
        }
        if self.families.1 {
            let model = || format!("fd00:10:240:{i}::{host}").parse::<Ipv6Addr>();
            let a = match v6 {
                Some(a) => a,
                None => model().map_err(|e| format!("pod {key}: model IPv6 address: {e}"))?,
            };
            out.push(IpAddr::V6(a));
        } else if let Some(a) = v6 {
            return Err(format!(
                "pod {key}: {a}: IPv6 needs ip-families with IPv6 in the model (dual stack)"
            ));
        }
        Ok(out)
    }

    fn insert(
        &mut self,
        ns_ordinal: usize,
        spec: &PodSpec,
        ips: Vec<IpAddr>,
    ) -> Result<(), String> {
        let key = ObjectKey::new(&spec.namespace, &spec.pod);
        if self.pod(&spec.namespace, &spec.pod).is_some() {
            return Err(format!("pod {key} already exists"));
        }
        for ip in &ips {
            if let Some((_, _, other)) = self.pods.iter().find(|(_, _, p)| p.has_address(*ip)) {
                return Err(format!("pod {key}: address {ip} already belongs to {}", other.key));
            }
        }
        let ip = ips.first().copied();
        let ipv6 = match ips.get(1) {
            Some(IpAddr::V6(a)) => Some(*a),
            _ => None,
        };
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
            ip,
            ipv6,
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
        let version = value.get("apiVersion").and_then(|v| v.as_str());
        if let Err(e) = api::check_api_version(version) {
            return ActionOutcome::Rejected(InvalidObject {
                kind: "ClusterNetworkPolicy",
                object: name,
                errors: vec![e],
            });
        }
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

    /// Replaces `{{podIP ns/pod}}` and `{{podIPv6 ns/pod}}` in every string of a policy.
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
            let (family, target) = if let Some(t) = inner.strip_prefix("podIPv6") {
                (crate::model::IpFamily::V6, t.trim())
            } else if let Some(t) = inner.strip_prefix("podIP") {
                (crate::model::IpFamily::V4, t.trim())
            } else {
                return Err(format!("unknown template {{{{{inner}}}}} in {s:?}"));
            };
            let (ns, pod) = target
                .split_once('/')
                .ok_or_else(|| format!("{{{{podIP {target}}}}}: expected ns/pod"))?;
            let p = self.pod(ns, pod).ok_or_else(|| format!("{{{{{inner}}}}}: no such pod"))?;
            let ip = p
                .address(family)
                .ok_or_else(|| format!("{{{{{inner}}}}}: the pod has no address of that family"))?;
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
