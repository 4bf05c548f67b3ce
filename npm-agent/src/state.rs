//! The cluster state the compiler reads (pods, namespaces, nodes, valid policies) and the
//! events that change it. Sources produce events; the compiler consumes them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{ClusterPolicy, Labels, Namespace, Node, ObjectKey, Pod, Policy};

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
    /// A ClusterNetworkPolicy (cluster-scoped: by name). Held in the state and judged by the
    /// reference evaluator; not compiled into plans yet.
    UpsertClusterPolicy(ClusterPolicy),
    DeleteClusterPolicy(String),
}

impl Event {
    /// The kind of object the event is about, as the metrics name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::UpsertNamespace(_) | Event::DeleteNamespace(_) => "namespace",
            Event::UpsertPod(_) | Event::DeletePod(_) => "pod",
            Event::UpsertPolicy(_) | Event::DeletePolicy(_) => "policy",
            Event::UpsertNode(_) | Event::DeleteNode(_) => "node",
            Event::UpsertClusterPolicy(_) | Event::DeleteClusterPolicy(_) => "clusterpolicy",
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
    pub cluster_policies: BTreeMap<String, ClusterPolicy>,
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
            Event::UpsertClusterPolicy(p) => {
                self.cluster_policies.insert(p.name.clone(), p.clone());
            }
            Event::DeleteClusterPolicy(name) => {
                self.cluster_policies.remove(name);
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

    /// Who each pod address belongs to, as a node sees it (`is_local`: the node's pods). See
    /// [`Claim`] for the rule.
    pub fn claims(&self, is_local: impl Fn(&Pod) -> bool) -> BTreeMap<IpAddr, Claim<'_>> {
        self.claimants()
            .into_iter()
            .map(|(ip, claimants)| (ip, Claim::resolve(claimants, &is_local)))
            .collect()
    }

    /// The endpoint pods claiming each address, in key order.
    pub fn claimants(&self) -> BTreeMap<IpAddr, Vec<&Pod>> {
        let mut by_ip: BTreeMap<IpAddr, Vec<&Pod>> = BTreeMap::new();
        for p in self.pods.values().filter(|p| p.is_endpoint()) {
            for ip in p.addresses() {
                by_ip.entry(ip).or_default().push(p);
            }
        }
        by_ip
    }
}

/// Who an address belongs to, as one node sees it.
///
/// The API does not stop two pods from claiming one address: a terminated pod's address is
/// reused before its object is gone, and whoever can write a pod's status can claim any
/// address. Claimants are told apart by, in order: being on this node (the node's own
/// interfaces say which pod really has the address, and its programs drop packets that claim
/// a local pod's address from elsewhere), then not terminating. Whatever is still ambiguous is
/// *contested*, and a contested address fails closed: as a peer it is no pod's (only ipBlocks
/// and rules without peers match it), and where several of its claimants are local its
/// endpoint admits nothing. So no claim can take another pod's protection or privileges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim<'a> {
    Owner(&'a Pod),
    Contested {
        /// Every claimant, in key order.
        claimants: Vec<&'a Pod>,
        /// Whether several claimants are on this node: the address's endpoint admits nothing.
        quarantined: bool,
    },
}

impl<'a> Claim<'a> {
    /// Resolves the claims on one address (`claimants` in key order, at least one).
    pub fn resolve(claimants: Vec<&'a Pod>, is_local: impl Fn(&Pod) -> bool) -> Claim<'a> {
        let local: Vec<&Pod> = claimants.iter().copied().filter(|p| is_local(p)).collect();
        let pool = if local.is_empty() { claimants.clone() } else { local };
        let live: Vec<&Pod> = pool.iter().copied().filter(|p| !p.terminating).collect();
        match (live.as_slice(), pool.as_slice()) {
            ([one], _) | ([], [one]) => Claim::Owner(one),
            _ => {
                let quarantined = claimants.iter().filter(|p| is_local(p)).count() > 1;
                Claim::Contested { claimants, quarantined }
            }
        }
    }

    pub fn owner(&self) -> Option<&'a Pod> {
        match self {
            Claim::Owner(p) => Some(p),
            Claim::Contested { .. } => None,
        }
    }
}
