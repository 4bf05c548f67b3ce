//! The cluster state the compiler reads (pods, namespaces, nodes, valid policies) and the
//! events that change it. Sources produce events; the compiler consumes them.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::model::{Labels, Namespace, Node, ObjectKey, Pod, Policy};

/// One change to the cluster, as the compiler sees it. Objects arrive validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    UpsertNamespace(Namespace),
    DeleteNamespace(String),
    UpsertPod(Pod),
    DeletePod(ObjectKey),
    UpsertPolicy(Policy),
    DeletePolicy(ObjectKey),
    UpsertNode(Node),
    DeleteNode(String),
}

impl Event {
    /// The kind of object the event is about, as the metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::UpsertNamespace(_) | Event::DeleteNamespace(_) => "namespace",
            Event::UpsertPod(_) | Event::DeletePod(_) => "pod",
            Event::UpsertPolicy(_) | Event::DeletePolicy(_) => "policy",
            Event::UpsertNode(_) | Event::DeleteNode(_) => "node",
        }
    }
}

/// Every object the compiler depends on, keyed for ordered iteration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub policies: BTreeMap<ObjectKey, Policy>,
    pub nodes: BTreeMap<String, Node>,
}

impl ClusterState {
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::UpsertNamespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns.clone());
            }
            Event::DeleteNamespace(name) => {
                self.namespaces.remove(name);
            }
            Event::UpsertPod(p) => {
                self.pods.insert(p.key.clone(), p.clone());
            }
            Event::DeletePod(k) => {
                self.pods.remove(k);
            }
            Event::UpsertPolicy(p) => {
                self.policies.insert(p.key.clone(), p.clone());
            }
            Event::DeletePolicy(k) => {
                self.policies.remove(k);
            }
            Event::UpsertNode(n) => {
                self.nodes.insert(n.name.clone(), n.clone());
            }
            Event::DeleteNode(n) => {
                self.nodes.remove(n);
            }
        }
    }

    /// A namespace's labels; a namespace not (yet) seen has only its name label.
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => Cow::Owned(Namespace::default_labels(name)),
        }
    }

    /// The policies of one namespace.
    pub fn policies_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .range(ObjectKey::new(namespace, "")..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, p)| p)
    }

    /// The pod that owns each address: of the endpoint pods claiming one address (a
    /// terminated pod's address can be reused before the old pod object is gone), the one
    /// with the smallest key, so that every compiler agrees.
    pub fn address_owners(&self) -> BTreeMap<std::net::IpAddr, &Pod> {
        let mut owners = BTreeMap::new();
        for p in self.pods.values().filter(|p| p.is_endpoint()) {
            // Pods iterate in key order: the first claim wins.
            owners.entry(p.ip.expect("endpoint pods have an address")).or_insert(p);
        }
        owners
    }
}
