//! A NetworkPolicy in validated form: defaults applied (policyTypes, protocol), CIDRs
//! normalized, selectors parsed. Built only by [`super::validate`].

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{LabelSelector, ObjectKey, Protocol};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Policy {
    pub key: ObjectKey,
    /// Selects the pods of `key.namespace` the policy applies to.
    pub pod_selector: LabelSelector,
    /// `Some` when the policy's types include Ingress: the selected pods are then isolated
    /// for ingress and these rules (possibly none) are what it allows.
    pub ingress: Option<Vec<Rule>>,
    /// As `ingress`, for Egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// The rules of one direction, or `None` when the policy does not cover that direction.
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// One ingress or egress rule. Empty `peers` means every peer; empty `ports` every port of
/// every protocol (the API treats absent and empty lists alike for both).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

/// A rule's peer: pods chosen by selectors, or an IP block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces of `namespaces`. A peer with only a
    /// podSelector has the policy's own namespace as scope; one with only a
    /// namespaceSelector has the selector that matches every pod.
    Pods {
        namespaces: NamespaceScope,
        pods: LabelSelector,
    },
    Block(CidrBlock),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NamespaceScope {
    /// Exactly this namespace (the policy's own).
    Named(String),
    /// Every namespace whose labels match.
    Selector(LabelSelector),
}

impl NamespaceScope {
    pub fn matches(&self, namespace: &str, labels: &super::Labels) -> bool {
        match self {
            NamespaceScope::Named(n) => n == namespace,
            NamespaceScope::Selector(s) => s.matches(labels),
        }
    }
}

/// An ipBlock: `net` minus every `except` (each strictly inside `net`). Host bits are
/// cleared, excepts sorted and deduplicated, so equal blocks compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CidrBlock {
    pub net: IpNet,
    pub except: Vec<IpNet>,
}

impl CidrBlock {
    pub fn new(net: IpNet, except: impl IntoIterator<Item = IpNet>) -> Self {
        let mut except: Vec<IpNet> = except.into_iter().map(|e| e.trunc()).collect();
        except.sort();
        except.dedup();
        Self { net: net.trunc(), except }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

impl fmt::Display for CidrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        for e in &self.except {
            write!(f, " except {e}")?;
        }
        Ok(())
    }
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortSpec {
    /// Every port of the protocol (`port` absent).
    Protocol(Protocol),
    /// `port` alone (`first == last`) or `port` to `endPort`.
    Range { protocol: Protocol, first: u16, last: u16 },
    /// A named container port, resolved per pod.
    Named { protocol: Protocol, name: String },
}

impl PortSpec {
    pub fn protocol(&self) -> Protocol {
        match self {
            PortSpec::Protocol(p) => *p,
            PortSpec::Range { protocol, .. } | PortSpec::Named { protocol, .. } => *protocol,
        }
    }
}
