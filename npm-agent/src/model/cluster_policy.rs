//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, the Kubernetes
//! network-policy-api): the cluster administrator's Admin and Baseline tiers.
//!
//! [`api`] holds the object as the API serves it; [`cluster_network_policy`] validates it as
//! the CRD's schema does (errors naming the field) into the model's [`ClusterPolicy`]. Of the
//! experimental channel's peers, `nodes` is supported (the matching nodes' addresses);
//! `domainNames` is refused with an error on the object, never read as "anyone".

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::validate::{FieldError, InvalidObject, label_selector, valid_port_name};
use super::{LabelSelector, Protocol};

/// The API object, as served (unknown fields are the caller's to report, see
/// `input::strict`). kube's `CustomResource` makes the object type (`ClusterNetworkPolicy`:
/// metadata and spec) from the spec, with its `Resource` identity (what the Kubernetes source
/// watches) and its CRD (`CustomResourceExt::crd`, shipped in `deploy/`). Fields are as
/// permissive as the JSON allows: what the API's schema requires is checked by
/// [`cluster_network_policy`](super::cluster_network_policy), which names the field.
pub mod api {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

    /// The only version read (the API's current one).
    pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

    /// An error naming `apiVersion` unless it is [`API_VERSION`] (kube's type does not read it).
    pub fn check_api_version(found: Option<&str>) -> Result<(), super::FieldError> {
        match found {
            Some(API_VERSION) => Ok(()),
            other => Err(super::FieldError {
                field: "apiVersion".into(),
                message: format!("{other:?}: only {API_VERSION} is supported"),
            }),
        }
    }
    use kube::CustomResource;
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    /// The administrator's policy: a tier, a priority, whom it selects and its rules.
    #[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "policy.networking.k8s.io",
        version = "v1alpha2",
        kind = "ClusterNetworkPolicy",
        plural = "clusternetworkpolicies",
        shortname = "cnp"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct ClusterNetworkPolicySpec {
        /// `Admin` or `Baseline`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tier: Option<String>,
        /// 0 to 1000: lower first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub priority: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub subject: Option<Subject>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ingress: Option<Vec<Rule>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub egress: Option<Vec<Rule>>,
    }

    /// Exactly one of `namespaces`, `pods`.
    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Subject {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespaces: Option<meta::LabelSelector>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pods: Option<NamespacedPod>,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct NamespacedPod {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespace_selector: Option<meta::LabelSelector>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pod_selector: Option<meta::LabelSelector>,
    }

    /// An ingress rule (`from`) or an egress rule (`to`).
    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Rule {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// `Accept`, `Deny` or `Pass`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub from: Option<Vec<Peer>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub to: Option<Vec<Peer>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub protocols: Option<Vec<ProtocolMatch>>,
    }

    /// Exactly one field: `namespaces`, `pods`; on egress also `networks`, and in the API's
    /// experimental channel `nodes` (supported) and `domainNames` (refused here).
    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Peer {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespaces: Option<meta::LabelSelector>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pods: Option<NamespacedPod>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub networks: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nodes: Option<meta::LabelSelector>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub domain_names: Option<Vec<String>>,
    }

    /// Exactly one field.
    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ProtocolMatch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tcp: Option<Ports>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub udp: Option<Ports>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sctp: Option<Ports>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub destination_named_port: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Ports {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub destination_port: Option<Port>,
    }

    /// Exactly one of `number`, `range`.
    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct Port {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub number: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub range: Option<PortRange>,
    }

    #[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct PortRange {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub start: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub end: Option<i64>,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allowed: this side's evaluation ends.
    Accept,
    /// Dropped.
    Deny,
    /// The rest of the tier is skipped: the next tier decides.
    Pass,
}

/// Pods selected by namespace labels, and (`pods`) by their own labels too.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodSet {
    pub namespaces: LabelSelector,
    /// `None`: every pod of the namespaces.
    pub pods: Option<LabelSelector>,
}

impl PodSet {
    /// Whether it holds `pod`, whose namespace has labels `namespace_labels`.
    pub fn selects(&self, pod: &super::Pod, namespace_labels: &super::Labels) -> bool {
        self.namespaces.matches(namespace_labels)
            && self.pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ClusterPeer {
    Pods(PodSet),
    /// CIDRs, which match pod addresses too (egress only).
    Networks(Vec<IpNet>),
    /// The addresses of the nodes whose labels the selector matches (egress only; the API's
    /// experimental channel).
    Nodes(LabelSelector),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ClusterPort {
    /// A port, or a range (`first..=last`), of one protocol.
    Range { protocol: Protocol, first: u16, last: u16 },
    /// Every port of a protocol (`tcp: {}`).
    Protocol(Protocol),
    /// The destination pod's container port of that name (any protocol it is declared with).
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterRule {
    pub name: Option<String>,
    pub action: Action,
    pub peers: Vec<ClusterPeer>,
    /// `None`: any protocol and port.
    pub ports: Option<Vec<ClusterPort>>,
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0 to 1000; lower first.
    pub priority: u32,
    pub subject: PodSet,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    pub fn rules(&self, direction: super::Direction) -> &[ClusterRule] {
        match direction {
            super::Direction::Ingress => &self.ingress,
            super::Direction::Egress => &self.egress,
        }
    }
}

/// The most rules of a direction, peers of a rule and protocols of a rule (the CRD's limits).
pub const MAX_ITEMS: usize = 25;

fn pod_set(pods: &api::NamespacedPod, path: &str, errs: &mut Vec<FieldError>) -> Option<PodSet> {
    let namespaces = match &pods.namespace_selector {
        Some(s) => label_selector(s, &format!("{path}.namespaceSelector"), errs),
        None => LabelSelector::everything(),
    };
    let Some(ps) = &pods.pod_selector else {
        errs.push(FieldError {
            field: format!("{path}.podSelector"),
            message: "Required value".into(),
        });
        return None;
    };
    let pods = label_selector(ps, &format!("{path}.podSelector"), errs);
    Some(PodSet { namespaces, pods: Some(pods) })
}

fn peer(
    p: &api::Peer,
    path: &str,
    egress: bool,
    errs: &mut Vec<FieldError>,
) -> Option<ClusterPeer> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.networks.is_some(),
        p.nodes.is_some(),
        p.domain_names.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    let mut err = |field: String, message: String| errs.push(FieldError { field, message });
    if set != 1 {
        err(
            path.into(),
            format!(
                "exactly one of namespaces, pods{} must be set, not {set}",
                if egress { ", networks, nodes, domainNames" } else { "" }
            ),
        );
        return None;
    }
    if let Some(ns) = &p.namespaces {
        let namespaces = label_selector(ns, &format!("{path}.namespaces"), errs);
        return Some(ClusterPeer::Pods(PodSet { namespaces, pods: None }));
    }
    if let Some(pods) = &p.pods {
        return pod_set(pods, &format!("{path}.pods"), errs).map(ClusterPeer::Pods);
    }
    if !egress {
        err(path.into(), "ingress peers are namespaces or pods".into());
        return None;
    }
    if let Some(nets) = &p.networks {
        if nets.is_empty() || nets.len() > MAX_ITEMS {
            err(format!("{path}.networks"), format!("must hold 1 to {MAX_ITEMS} CIDRs"));
        }
        let mut out = Vec::new();
        for (i, n) in nets.iter().enumerate() {
            match n.parse::<IpNet>() {
                Ok(net) => out.push(net.trunc()),
                Err(_) => err(format!("{path}.networks[{i}]"), format!("invalid CIDR {n:?}")),
            }
        }
        return Some(ClusterPeer::Networks(out));
    }
    if let Some(nodes) = &p.nodes {
        return Some(ClusterPeer::Nodes(label_selector(nodes, &format!("{path}.nodes"), errs)));
    }
    err(
        format!("{path}.domainNames"),
        "domainNames peers (experimental) are not supported by this agent; the object is rejected"
            .into(),
    );
    None
}

fn port_number(v: Option<i64>, path: &str, errs: &mut Vec<FieldError>) -> u16 {
    match v {
        Some(n) if (1..=65535).contains(&n) => n as u16,
        Some(n) => {
            errs.push(FieldError {
                field: path.into(),
                message: format!("{n}: must be between 1 and 65535"),
            });
            1
        }
        None => {
            errs.push(FieldError { field: path.into(), message: "Required value".into() });
            1
        }
    }
}

fn protocol_match(
    p: &api::ProtocolMatch,
    path: &str,
    errs: &mut Vec<FieldError>,
) -> Option<ClusterPort> {
    let set =
        [p.tcp.is_some(), p.udp.is_some(), p.sctp.is_some(), p.destination_named_port.is_some()]
            .iter()
            .filter(|s| **s)
            .count();
    if set != 1 {
        errs.push(FieldError {
            field: path.into(),
            message: format!(
                "exactly one of tcp, udp, sctp, destinationNamedPort must be set, not {set}"
            ),
        });
        return None;
    }
    if let Some(name) = &p.destination_named_port {
        if let Err(why) = valid_port_name(name) {
            errs.push(FieldError {
                field: format!("{path}.destinationNamedPort"),
                message: format!("invalid port name {name:?}: {why}"),
            });
        }
        return Some(ClusterPort::Named(name.clone()));
    }
    let (protocol, ports, key) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(t), _, _) => (Protocol::Tcp, t, "tcp"),
        (_, Some(u), _) => (Protocol::Udp, u, "udp"),
        (_, _, Some(s)) => (Protocol::Sctp, s, "sctp"),
        _ => unreachable!("one is set"),
    };
    let path = format!("{path}.{key}.destinationPort");
    let Some(port) = &ports.destination_port else {
        return Some(ClusterPort::Protocol(protocol));
    };
    match (port.number, &port.range) {
        (Some(_), None) => {
            let n = port_number(port.number, &format!("{path}.number"), errs);
            Some(ClusterPort::Range { protocol, first: n, last: n })
        }
        (None, Some(r)) => {
            let first = port_number(r.start, &format!("{path}.range.start"), errs);
            let last = port_number(r.end, &format!("{path}.range.end"), errs);
            if first >= last {
                errs.push(FieldError {
                    field: format!("{path}.range"),
                    message: "Start port must be less than End port".into(),
                });
            }
            Some(ClusterPort::Range { protocol, first, last })
        }
        _ => {
            errs.push(FieldError {
                field: path,
                message: "exactly one of number, range must be set".into(),
            });
            None
        }
    }
}

fn rules(rules: &[api::Rule], egress: bool, errs: &mut Vec<FieldError>) -> Vec<ClusterRule> {
    let dir = if egress { "spec.egress" } else { "spec.ingress" };
    if rules.len() > MAX_ITEMS {
        errs.push(FieldError { field: dir.into(), message: format!("at most {MAX_ITEMS} rules") });
    }
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let path = format!("{dir}[{i}]");
        if let Some(name) = &r.name
            && name.len() > 100
        {
            errs.push(FieldError {
                field: format!("{path}.name"),
                message: "at most 100 characters".into(),
            });
        }
        let action = match r.action.as_deref() {
            Some("Accept") => Action::Accept,
            Some("Deny") => Action::Deny,
            Some("Pass") => Action::Pass,
            Some(a) => {
                errs.push(FieldError {
                    field: format!("{path}.action"),
                    message: format!(
                        "Unsupported value {a:?}: supported values: \"Accept\", \"Deny\", \"Pass\""
                    ),
                });
                continue;
            }
            None => {
                errs.push(FieldError {
                    field: format!("{path}.action"),
                    message: "Required value".into(),
                });
                continue;
            }
        };
        let (key, other) = if egress { ("to", &r.from) } else { ("from", &r.to) };
        if other.is_some() {
            let wrong = if egress { "from" } else { "to" };
            errs.push(FieldError {
                field: format!("{path}.{wrong}"),
                message: format!(
                    "unknown field: {} rules have {key}",
                    if egress { "egress" } else { "ingress" }
                ),
            });
        }
        let peers_in = if egress { &r.to } else { &r.from };
        let peers_in = peers_in.as_deref().unwrap_or_default();
        if peers_in.is_empty() || peers_in.len() > MAX_ITEMS {
            errs.push(FieldError {
                field: format!("{path}.{key}"),
                message: format!("must hold 1 to {MAX_ITEMS} peers"),
            });
        }
        let peers: Vec<ClusterPeer> = peers_in
            .iter()
            .enumerate()
            .filter_map(|(j, p)| peer(p, &format!("{path}.{key}[{j}]"), egress, errs))
            .collect();
        let ports = r.protocols.as_ref().map(|ps| {
            if ps.is_empty() || ps.len() > MAX_ITEMS {
                errs.push(FieldError {
                    field: format!("{path}.protocols"),
                    message: format!("must hold 1 to {MAX_ITEMS} items"),
                });
            }
            ps.iter()
                .enumerate()
                .filter_map(|(j, p)| protocol_match(p, &format!("{path}.protocols[{j}]"), errs))
                .collect::<Vec<_>>()
        });
        if let Some(ports) = &ports
            && ports.iter().any(|p| matches!(p, ClusterPort::Named(_)))
            && peers.iter().any(|p| matches!(p, ClusterPeer::Networks(_) | ClusterPeer::Nodes(_)))
        {
            errs.push(FieldError {
                field: format!("{path}.protocols"),
                message: "networks and nodes peers cannot be set with named ports (they have no named ports)"
                    .into(),
            });
        }
        out.push(ClusterRule { name: r.name.clone(), action, peers, ports });
    }
    out
}

/// Validates a ClusterNetworkPolicy as the CRD's schema does, into the model.
pub fn cluster_network_policy(
    o: &api::ClusterNetworkPolicy,
) -> Result<ClusterPolicy, InvalidObject> {
    let mut errs = Vec::new();
    let name = o.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        errs.push(FieldError { field: "metadata.name".into(), message: "Required value".into() });
    }
    let s = &o.spec;
    let tier = match s.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(t) => {
            errs.push(FieldError {
                field: "spec.tier".into(),
                message: format!(
                    "Unsupported value {t:?}: supported values: \"Admin\", \"Baseline\""
                ),
            });
            Tier::Admin
        }
        None => {
            errs.push(FieldError { field: "spec.tier".into(), message: "Required value".into() });
            Tier::Admin
        }
    };
    let priority = match s.priority {
        Some(p) if (0..=1000).contains(&p) => p as u32,
        Some(p) => {
            errs.push(FieldError {
                field: "spec.priority".into(),
                message: format!("{p}: must be between 0 and 1000"),
            });
            0
        }
        None => {
            errs.push(FieldError {
                field: "spec.priority".into(),
                message: "Required value".into(),
            });
            0
        }
    };
    let subject = match &s.subject {
        Some(api::Subject { namespaces: Some(ns), pods: None }) => Some(PodSet {
            namespaces: label_selector(ns, "spec.subject.namespaces", &mut errs),
            pods: None,
        }),
        Some(api::Subject { namespaces: None, pods: Some(p) }) => {
            pod_set(p, "spec.subject.pods", &mut errs)
        }
        Some(_) => {
            errs.push(FieldError {
                field: "spec.subject".into(),
                message: "exactly one of namespaces, pods must be set".into(),
            });
            None
        }
        None => {
            errs.push(FieldError {
                field: "spec.subject".into(),
                message: "Required value".into(),
            });
            None
        }
    };
    let ingress = rules(s.ingress.as_deref().unwrap_or_default(), false, &mut errs);
    let egress = rules(s.egress.as_deref().unwrap_or_default(), true, &mut errs);
    match subject {
        Some(subject) if errs.is_empty() => {
            Ok(ClusterPolicy { name, tier, priority, subject, ingress, egress })
        }
        _ => Err(InvalidObject { kind: "ClusterNetworkPolicy", object: name, errors: errs }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ClusterPolicy, InvalidObject> {
        let o: api::ClusterNetworkPolicy = serde_yaml_ng::from_str(yaml).unwrap();
        cluster_network_policy(&o)
    }

    #[test]
    fn a_full_policy_reads_into_the_model() {
        let p = parse(
            "metadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {}}}\n  ingress:\n  - {name: deny-z, action: Deny, from: [{namespaces: {matchLabels: {ns: z}}}], protocols: [{tcp: {destinationPort: {number: 80}}}, {udp: {destinationPort: {range: {start: 1000, end: 2000}}}}, {destinationNamedPort: web}, {sctp: {}}]}\n  egress:\n  - {action: Accept, to: [{networks: [10.0.0.1/8, 'fd00::/8']}]}\n",
        )
        .unwrap();
        assert_eq!((p.tier, p.priority), (Tier::Admin, 10));
        assert!(p.subject.pods.is_some());
        let r = &p.ingress[0];
        assert_eq!(r.action, Action::Deny);
        assert_eq!(
            r.ports.as_deref().unwrap(),
            [
                ClusterPort::Range { protocol: Protocol::Tcp, first: 80, last: 80 },
                ClusterPort::Range { protocol: Protocol::Udp, first: 1000, last: 2000 },
                ClusterPort::Named("web".into()),
                ClusterPort::Protocol(Protocol::Sctp),
            ]
        );
        assert_eq!(
            p.egress[0].peers,
            [ClusterPeer::Networks(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(
            "metadata: {name: bad}\nspec:\n  tier: Middle\n  priority: 1001\n  subject: {namespaces: {}, pods: {podSelector: {}}}\n  ingress:\n  - {action: Allow, from: [{namespaces: {}}]}\n  - {action: Deny, from: []}\n  egress:\n  - {action: Accept, to: [{nodes: {matchLabels: {\"bad key!\": x}}}]}\n  - {action: Deny, to: [{domainNames: [example.com]}]}\n  - {action: Deny, to: [{networks: [nonsense]}], protocols: [{tcp: {destinationPort: {range: {start: 9, end: 9}}}}]}\n",
        )
        .unwrap_err();
        let text = e.to_string();
        for want in [
            "invalid ClusterNetworkPolicy bad",
            "spec.tier: Unsupported value \"Middle\"",
            "spec.priority: 1001",
            "spec.subject: exactly one of",
            "spec.ingress[0].action: Unsupported value \"Allow\"",
            "spec.ingress[1].from: must hold 1 to 25 peers",
            "spec.egress[0].to[0].nodes.matchLabels",
            "spec.egress[1].to[0].domainNames: domainNames peers",
            "spec.egress[2].to[0].networks[0]: invalid CIDR \"nonsense\"",
            "spec.egress[2].protocols[0].tcp.destinationPort.range: Start port must be less",
        ] {
            assert!(text.contains(want), "{want:?} missing from {text}");
        }
    }
}
