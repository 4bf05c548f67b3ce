//! The objects sources read, in model form, and their identities: what both sources track
//! to turn listings and changes into [`Event`]s.

use crate::model::cluster_policy::ClusterPolicy;
use crate::model::{Namespace, Node, ObjectKey, Pod, Policy};
use crate::state::Event;

/// What an object is, in the order upserts are applied (namespaces and nodes before the
/// policies that select by them, policies before the pods they isolate); deletions go in
/// the reverse order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectId {
    Namespace(String),
    Node(String),
    Policy(ObjectKey),
    /// A ClusterNetworkPolicy, by name (cluster-scoped).
    ClusterPolicy(String),
    Pod(ObjectKey),
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectId::Namespace(n) => write!(f, "Namespace {n}"),
            ObjectId::Node(n) => write!(f, "Node {n}"),
            ObjectId::Policy(k) => write!(f, "NetworkPolicy {k}"),
            ObjectId::ClusterPolicy(n) => write!(f, "ClusterNetworkPolicy {n}"),
            ObjectId::Pod(k) => write!(f, "Pod {k}"),
        }
    }
}

/// An object in model form.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Node(Node),
    Policy(Policy),
    ClusterPolicy(ClusterPolicy),
    Pod(Pod),
}

impl Object {
    pub fn upsert(&self) -> Event {
        match self {
            Object::Namespace(n) => Event::UpsertNamespace(n.clone()),
            Object::Node(n) => Event::UpsertNode(n.clone()),
            Object::Policy(p) => Event::UpsertPolicy(p.clone()),
            Object::ClusterPolicy(p) => Event::UpsertClusterPolicy(p.clone()),
            Object::Pod(p) => Event::UpsertPod(p.clone()),
        }
    }
}

impl ObjectId {
    pub fn delete(&self) -> Event {
        match self {
            ObjectId::Namespace(n) => Event::DeleteNamespace(n.clone()),
            ObjectId::Node(n) => Event::DeleteNode(n.clone()),
            ObjectId::Policy(k) => Event::DeletePolicy(k.clone()),
            ObjectId::ClusterPolicy(n) => Event::DeleteClusterPolicy(n.clone()),
            ObjectId::Pod(k) => Event::DeletePod(k.clone()),
        }
    }
}
