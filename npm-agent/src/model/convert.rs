//! Conversion of API objects (k8s-openapi types) into the model, keeping only what the
//! compiler needs: this is what keeps a 100k-pod cluster small in memory.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;

use super::{
    FieldError, InvalidObject, Labels, NamedPort, Namespace, Node, ObjectKey, Pod, PodPhase,
    Protocol,
};

/// Converts a Pod. A pod whose IP cannot be parsed is rejected (it could not be enforced
/// correctly); bad named ports are skipped, as they can never be matched.
pub fn pod(p: &core::Pod) -> Result<Pod, InvalidObject> {
    let key = ObjectKey::new(
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    );
    let invalid = |field: &str, message: String| InvalidObject {
        kind: "Pod",
        object: key.to_string(),
        errors: vec![FieldError { field: field.to_string(), message }],
    };
    if key.namespace.is_empty() || key.name.is_empty() {
        return Err(invalid("metadata", "name and namespace are required".into()));
    }
    let status = p.status.as_ref();
    // Prefer the IPv4 address of a dual-stack pod: the dataplanes enforce IPv4.
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(s) = status {
        for (i, a) in s.pod_ips.iter().flatten().enumerate() {
            match a.ip.parse() {
                Ok(ip) => ips.push(ip),
                Err(_) => {
                    return Err(invalid(
                        &format!("status.podIPs[{i}].ip"),
                        format!("invalid IP address {:?}", a.ip),
                    ));
                }
            }
        }
        // As the API server validates them: at most one address of each family, and
        // `podIP` is `podIPs[0]`.
        if ips.len() > 2 {
            return Err(invalid(
                "status.podIPs",
                format!("{} addresses: at most two, one of each family", ips.len()),
            ));
        }
        if ips.len() == 2 && ips[0].is_ipv4() == ips[1].is_ipv4() {
            return Err(invalid(
                "status.podIPs[1].ip",
                format!("{} is of the same family as podIPs[0] ({})", ips[1], ips[0]),
            ));
        }
        if let (Some(first), Some(ip)) =
            (ips.first(), s.pod_ip.as_deref().filter(|s| !s.is_empty()))
            && ip.parse::<IpAddr>().ok() != Some(*first)
        {
            return Err(invalid("status.podIP", format!("{ip:?} is not podIPs[0] ({first})")));
        }
        if ips.is_empty()
            && let Some(ip) = s.pod_ip.as_deref().filter(|s| !s.is_empty())
        {
            ips.push(
                ip.parse()
                    .map_err(|_| invalid("status.podIP", format!("invalid IP address {ip:?}")))?,
            );
        }
    }
    let ip = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied();
    let ipv6 = ips.iter().find_map(|a| match a {
        IpAddr::V6(v6) if ip.is_some_and(|ip| ip.is_ipv4()) => Some(*v6),
        _ => None,
    });
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Running") => PodPhase::Running,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        Some("Unknown") => PodPhase::Unknown,
        _ => PodPhase::Pending,
    };
    let spec = p.spec.as_ref();
    let mut named_ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for cp in c.ports.iter().flatten() {
            let (Some(name), Ok(port)) = (cp.name.as_ref(), u16::try_from(cp.container_port))
            else {
                continue;
            };
            let protocol = match cp.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => match Protocol::parse(s) {
                    Some(p) => p,
                    None => continue,
                },
            };
            named_ports.push(NamedPort { name: name.clone(), protocol, port });
        }
    }
    named_ports.sort();
    named_ports.dedup();
    Ok(Pod {
        key,
        labels: p.metadata.labels.clone().unwrap_or_default().into(),
        ip,
        ipv6,
        node: spec.and_then(|s| s.node_name.clone()),
        phase,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminating: p.metadata.deletion_timestamp.is_some(),
        named_ports: named_ports.into(),
    })
}

pub fn namespace(ns: &core::Namespace) -> Namespace {
    let name = ns.metadata.name.clone().unwrap_or_default();
    Namespace::new(name, ns.metadata.labels.clone().unwrap_or_default())
}

pub fn node(n: &core::Node) -> Node {
    let mut addresses: Vec<IpAddr> = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addresses.sort();
    addresses.dedup();
    let labels = n.metadata.labels.clone().unwrap_or_default().into_iter().collect();
    Node { name: n.metadata.name.clone().unwrap_or_default(), addresses, labels }
}

/// Labels for a namespace from a model file (tests, simulator).
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A selector in API form (match expressions only).
pub fn selector_to_k8s(
    s: &super::LabelSelector,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    let exprs: Vec<meta::LabelSelectorRequirement> = s
        .requirements()
        .iter()
        .map(|r| meta::LabelSelectorRequirement {
            key: r.key.clone(),
            operator: format!("{:?}", r.operator),
            values: (!r.values.is_empty()).then(|| r.values.iter().cloned().collect()),
        })
        .collect();
    meta::LabelSelector {
        match_expressions: (!exprs.is_empty()).then_some(exprs),
        match_labels: None,
    }
}

/// The API form of a validated ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, as
/// JSON): validating it again gives the same policy. The lab hands it to its agents as a file.
pub fn cluster_policy_to_api(p: &super::cluster_policy::ClusterPolicy) -> serde_json::Value {
    use super::cluster_policy::{Action, ClusterPeer, ClusterPort, PodSet, Tier};
    use serde_json::json;
    let pod_set = |s: &PodSet| match &s.pods {
        None => json!({ "namespaces": selector_to_k8s(&s.namespaces) }),
        Some(pods) => json!({ "pods": {
            "namespaceSelector": selector_to_k8s(&s.namespaces),
            "podSelector": selector_to_k8s(pods),
        }}),
    };
    let rule = |r: &super::cluster_policy::ClusterRule, peers_key: &str| {
        let mut v = json!({
            "action": match r.action { Action::Accept => "Accept", Action::Deny => "Deny", Action::Pass => "Pass" },
        });
        if let Some(name) = &r.name {
            v["name"] = name.as_str().into();
        }
        v[peers_key] = r
            .peers
            .iter()
            .map(|peer| match peer {
                ClusterPeer::Pods(s) => pod_set(s),
                ClusterPeer::Networks(n) => {
                    json!({ "networks": n.iter().map(|n| n.to_string()).collect::<Vec<_>>() })
                }
                ClusterPeer::Nodes(s) => json!({ "nodes": selector_to_k8s(s) }),
            })
            .collect::<Vec<_>>()
            .into();
        if let Some(ports) = &r.ports {
            let proto = |p: super::Protocol| match p {
                super::Protocol::Tcp => "tcp",
                super::Protocol::Udp => "udp",
                super::Protocol::Sctp => "sctp",
            };
            v["protocols"] = ports
                .iter()
                .map(|port| match port {
                    ClusterPort::Range { protocol, first, last } if first == last => {
                        json!({ proto(*protocol): { "destinationPort": { "number": first } } })
                    }
                    ClusterPort::Range { protocol, first, last } => json!({ proto(*protocol): {
                        "destinationPort": { "range": { "start": first, "end": last } }
                    }}),
                    ClusterPort::Protocol(protocol) => json!({ proto(*protocol): {} }),
                    ClusterPort::Named(name) => json!({ "destinationNamedPort": name }),
                })
                .collect::<Vec<_>>()
                .into();
        }
        v
    };
    let mut spec = json!({
        "tier": match p.tier { Tier::Admin => "Admin", Tier::Baseline => "Baseline" },
        "priority": p.priority,
        "subject": pod_set(&p.subject),
    });
    if !p.ingress.is_empty() {
        spec["ingress"] = p.ingress.iter().map(|r| rule(r, "from")).collect::<Vec<_>>().into();
    }
    if !p.egress.is_empty() {
        spec["egress"] = p.egress.iter().map(|r| rule(r, "to")).collect::<Vec<_>>().into();
    }
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": { "name": p.name },
        "spec": spec,
    })
}

/// The API form of a validated policy: validating it again gives the same policy. Used to
/// write manifests (the lab hands policies to its agents as files) and to show a policy as
/// the compiler understood it.
pub fn policy_to_k8s(p: &super::Policy) -> k8s_openapi::api::networking::v1::NetworkPolicy {
    use k8s_openapi::api::networking::v1 as net;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::{Direction, NamespaceScope, Peer, PortSpec};

    let selector = selector_to_k8s;
    let peers = |r: &super::Rule| -> Option<Vec<net::NetworkPolicyPeer>> {
        (!r.peers.is_empty()).then(|| {
            r.peers
                .iter()
                .map(|peer| match peer {
                    Peer::Block(b) => net::NetworkPolicyPeer {
                        ip_block: Some(net::IPBlock {
                            cidr: b.net.to_string(),
                            except: (!b.except.is_empty())
                                .then(|| b.except.iter().map(|e| e.to_string()).collect()),
                        }),
                        ..Default::default()
                    },
                    Peer::Pods { namespaces, pods } => {
                        let namespace_selector = match namespaces {
                            NamespaceScope::Named(n) if *n == p.key.namespace => None,
                            NamespaceScope::Named(n) => {
                                Some(selector(&super::LabelSelector::from_labels([(
                                    super::NAMESPACE_NAME_LABEL,
                                    n.as_str(),
                                )])))
                            }
                            NamespaceScope::Selector(s) => Some(selector(s)),
                        };
                        let pod_selector = match (&namespace_selector, pods.is_everything()) {
                            (Some(_), true) => None,
                            _ => Some(selector(pods)),
                        };
                        net::NetworkPolicyPeer { ip_block: None, namespace_selector, pod_selector }
                    }
                })
                .collect()
        })
    };
    let ports = |r: &super::Rule| -> Option<Vec<net::NetworkPolicyPort>> {
        (!r.ports.is_empty()).then(|| {
            r.ports
                .iter()
                .map(|port| {
                    let protocol = Some(port.protocol().as_str().to_string());
                    match port {
                        PortSpec::Protocol(_) => {
                            net::NetworkPolicyPort { protocol, ..Default::default() }
                        }
                        PortSpec::Range { first, last, .. } => net::NetworkPolicyPort {
                            port: Some(IntOrString::Int(i32::from(*first))),
                            end_port: (last != first).then_some(i32::from(*last)),
                            protocol,
                        },
                        PortSpec::Named { name, .. } => net::NetworkPolicyPort {
                            port: Some(IntOrString::String(name.clone())),
                            end_port: None,
                            protocol,
                        },
                    }
                })
                .collect()
        })
    };
    let types: Vec<String> = Direction::BOTH
        .iter()
        .filter(|d| p.rules(**d).is_some())
        .map(|d| if *d == Direction::Ingress { "Ingress" } else { "Egress" }.to_string())
        .collect();
    net::NetworkPolicy {
        metadata: meta::ObjectMeta {
            name: Some(p.key.name.clone()),
            namespace: Some(p.key.namespace.clone()),
            ..Default::default()
        },
        spec: Some(net::NetworkPolicySpec {
            pod_selector: Some(selector(&p.pod_selector)),
            policy_types: Some(types),
            ingress: p.ingress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| net::NetworkPolicyIngressRule { from: peers(r), ports: ports(r) })
                    .collect()
            }),
            egress: p.egress.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| net::NetworkPolicyEgressRule { to: peers(r), ports: ports(r) })
                    .collect()
            }),
        }),
    }
}

/// The API form of a model pod (for manifests): labels, address, node, phase, named ports.
pub fn pod_to_k8s(p: &Pod) -> core::Pod {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    let ports: Vec<core::ContainerPort> = p
        .named_ports
        .iter()
        .map(|np| core::ContainerPort {
            name: Some(np.name.clone()),
            container_port: i32::from(np.port),
            protocol: Some(np.protocol.as_str().to_string()),
            ..Default::default()
        })
        .collect();
    let phase = match p.phase {
        PodPhase::Pending => "Pending",
        PodPhase::Running => "Running",
        PodPhase::Succeeded => "Succeeded",
        PodPhase::Failed => "Failed",
        PodPhase::Unknown => "Unknown",
    };
    core::Pod {
        metadata: meta::ObjectMeta {
            name: Some(p.key.name.clone()),
            namespace: Some(p.key.namespace.clone()),
            labels: Some(p.labels.as_ref().clone()),
            // The moment is not kept; any time in the past says the same.
            deletion_timestamp: p
                .terminating
                .then_some(meta::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            ..Default::default()
        },
        spec: Some(core::PodSpec {
            node_name: p.node.clone(),
            host_network: Some(p.host_network),
            containers: vec![core::Container {
                name: "main".into(),
                ports: (!ports.is_empty()).then_some(ports),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(core::PodStatus {
            phase: Some(phase.into()),
            pod_ip: p.ip.map(|ip| ip.to_string()),
            pod_ips: p.ip.map(|ip| {
                let mut ips = vec![core::PodIP { ip: ip.to_string() }];
                ips.extend(p.ipv6.map(|v6| core::PodIP { ip: v6.to_string() }));
                ips
            }),
            ..Default::default()
        }),
    }
}

pub fn namespace_to_k8s(ns: &Namespace) -> core::Namespace {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    core::Namespace {
        metadata: meta::ObjectMeta {
            name: Some(ns.name.clone()),
            labels: Some(ns.labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn node_to_k8s(n: &Node) -> core::Node {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    core::Node {
        metadata: meta::ObjectMeta {
            name: Some(n.name.clone()),
            labels: (!n.labels.is_empty())
                .then(|| n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            ..Default::default()
        },
        status: Some(core::NodeStatus {
            addresses: Some(
                n.addresses
                    .iter()
                    .map(|a| core::NodeAddress {
                        type_: "InternalIP".into(),
                        address: a.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}
