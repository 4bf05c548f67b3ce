//! The cluster model: the few fields of Pods, Namespaces, Nodes and NetworkPolicies that
//! NetworkPolicy semantics depend on, in validated form.
//!
//! Everything else in the agent works on these types, never on raw API objects: conversion
//! from the API types (and validation, with errors naming the object and the field) happens
//! once, at the edge, in [`validate`] and [`convert`].

pub mod cluster_policy;
pub mod convert;
pub mod policy;
pub mod selector;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use cluster_policy::ClusterPolicy;
pub use policy::{CidrBlock, Direction, NamespaceScope, Peer, Policy, PortSpec, Rule};
pub use selector::{LabelSelector, Operator, Requirement};
pub use validate::{FieldError, InvalidObject};

/// Labels of a pod or namespace. Ordered so that identities and output are deterministic.
pub type Labels = BTreeMap<String, String>;

/// The label the API server puts on every namespace (Kubernetes 1.22+).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// `namespace/name` of a namespaced object (pods and policies).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The transport protocols a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number (as in the IPv4 header).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API server is).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named container port, the target of NetworkPolicy ports given by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// Looks up a named port; a name matches only with the same protocol.
pub fn find_named_port(ports: &[NamedPort], name: &str, protocol: Protocol) -> Option<u16> {
    ports.iter().find(|p| p.name == name && p.protocol == protocol).map(|p| p.port)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

/// A pod, reduced to what NetworkPolicy depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub key: ObjectKey,
    /// Shared (`Arc`): the compiler keeps one copy per identity, not one per pod, which is
    /// most of what a large cluster's model weighs.
    pub labels: Arc<Labels>,
    pub ip: Option<IpAddr>,
    /// Its IPv6 address beside an IPv4 one (dual stack, `status.podIPs`).
    #[serde(default)]
    pub ipv6: Option<std::net::Ipv6Addr>,
    pub node: Option<String>,
    pub phase: PodPhase,
    pub host_network: bool,
    /// Its deletion has begun (`metadata.deletionTimestamp`): its address may already be
    /// another pod's, so another live claimant of the address wins over it.
    #[serde(default)]
    pub terminating: bool,
    /// Named container ports, sorted; unnamed ports are irrelevant to policy. Shared as the
    /// labels are.
    pub named_ports: Arc<[NamedPort]>,
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        if ip.is_ipv4() { IpFamily::V4 } else { IpFamily::V6 }
    }
}

impl Pod {
    /// The pod's address of one family: `ip` when it is of that family, else (IPv6) the
    /// dual-stack `ipv6`.
    pub fn address(&self, family: IpFamily) -> Option<IpAddr> {
        match (self.ip, family) {
            (Some(ip), f) if IpFamily::of(&ip) == f => Some(ip),
            (_, IpFamily::V6) => self.ipv6.map(IpAddr::V6),
            _ => None,
        }
    }

    /// The pod's addresses: one, or one of each family (dual stack).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        [IpFamily::V4, IpFamily::V6].into_iter().filter_map(|f| self.address(f))
    }

    /// Whether the pod has this address, of either family.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        self.ip == Some(ip) || matches!(ip, IpAddr::V6(v6) if self.ipv6 == Some(v6))
    }

    /// A running pod with its own address and no named ports (tests, benchmarks, examples
    /// set the rest with struct update syntax).
    pub fn running(key: ObjectKey, labels: Labels, ip: IpAddr, node: &str) -> Pod {
        Pod {
            key,
            labels: Arc::new(labels),
            ip: Some(ip),
            ipv6: None,
            node: Some(node.to_string()),
            phase: PodPhase::Running,
            host_network: false,
            terminating: false,
            named_ports: Arc::new([]),
        }
    }

    /// Whether the pod takes part in policy as a peer or an endpoint: it has its own address
    /// (host-network pods share the node's and are never endpoints) and has not terminated
    /// (a terminated pod's address may already belong to a new pod).
    pub fn is_endpoint(&self) -> bool {
        self.ip.is_some()
            && !self.host_network
            && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    /// Whether two versions of a pod differ in anything the compiler reads.
    pub fn same_for_policy(&self, other: &Pod) -> bool {
        self.labels == other.labels
            && self.ip == other.ip
            && self.ipv6 == other.ipv6
            && self.node == other.node
            && self.is_endpoint() == other.is_endpoint()
            && self.terminating == other.terminating
            && self.named_ports == other.named_ports
    }
}

/// A namespace and its labels; `kubernetes.io/metadata.name` is always among them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

impl Namespace {
    /// Builds a namespace, adding the `kubernetes.io/metadata.name` label the API server
    /// always sets (and overriding any other value for it, as the API server does).
    pub fn new(name: impl Into<String>, mut labels: Labels) -> Self {
        let name = name.into();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
        Self { name, labels }
    }

    /// The labels of a namespace the agent has not seen (yet): just its name label.
    pub fn default_labels(name: &str) -> Labels {
        Namespace::new(name, Labels::new()).labels
    }
}

/// A node: the addresses that may always reach its pods and be reached by them, and its
/// labels (what a ClusterNetworkPolicy's `nodes` peer selects).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub labels: Labels,
}
