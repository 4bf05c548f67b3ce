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
                Err(_) => return Err(invalid(&format!("status.podIPs[{i}].ip"), format!("invalid IP address {:?}", a.ip))),
            }
        }
        if ips.is_empty() {
            if let Some(ip) = s.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                ips.push(ip.parse().map_err(|_| invalid("status.podIP", format!("invalid IP address {ip:?}")))?);
            }
        }
    }
    let ip = ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied();
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
            let (Some(name), Ok(port)) = (cp.name.as_ref(), u16::try_from(cp.container_port)) else { continue };
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
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ip,
        node: spec.and_then(|s| s.node_name.clone()),
        phase,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        named_ports,
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
    Node { name: n.metadata.name.clone().unwrap_or_default(), addresses }
}

/// Labels for a namespace from a model file (tests, simulator).
pub fn labels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}
