//! Deterministic synthetic clusters for the compiler benchmarks (and any other bench or
//! example: `#[path = "../benches/synth/mod.rs"] mod synth;`).
//!
//! The shape follows a real multi-tenant cluster:
//! - 500 namespaces labelled `team` (50 teams) and `env` (prod, staging, dev); the first is
//!   `kube-system` (with kube-dns), the second `monitoring` (`role=monitoring`, Prometheus).
//! - Pods come in deployments of 10 replicas sharing their labels (`app=<ns>-d<k>`, `tier`,
//!   `pod-template-hash`) and named container ports; deployment `d` lives in namespace
//!   `d % 500`, so every namespace gets deployments before any gets a second.
//! - Pods are spread at random (seeded) over nodes of 110 pods (the kubelet's default
//!   maximum); node `n` has the pod CIDR `10.(n/256).(n%256).0/24`, so pod addresses are
//!   unique in 10.0.0.0/8. Node addresses are `10.250.(n/256).(n%256)`.
//! - Policy `j` lives in namespace `j % 500`; its kind rotates per namespace over
//!   [`POLICY_KINDS`]: default-deny, same-namespace app selectors with named ports,
//!   namespaceSelector + podSelector peers, ipBlock with except (ingress and egress), port
//!   ranges (endPort), monitoring from another namespace on a named port, egress lockdown with
//!   DNS to kube-system, matchExpressions.
//!
//! Everything is a function of the [`Config`] (a xorshift generator, no `rand`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use npm_agent::model::{
    CidrBlock, LabelSelector, Labels, NamedPort, Namespace, NamespaceScope, Node, ObjectKey,
    Operator, Peer, Pod, PodPhase, Policy, PortSpec, Protocol, Requirement, Rule,
};
use npm_agent::state::{ClusterState, Event};

/// The benchmark sizes of the issue: (name, pods, policies).
pub const SIZES: [(&str, usize, usize); 3] =
    [("1k", 1_000, 100), ("10k", 10_000, 1_000), ("100k", 100_000, 10_000)];

/// The names of the policy kinds, in rotation order.
pub const POLICY_KINDS: [&str; 9] = [
    "default-deny-ingress",
    "same-namespace-app-named-port",
    "namespace-and-pod-selector",
    "ipblock-except-ingress",
    "egress-internet-except-private",
    "port-ranges-from-prod-namespaces",
    "monitoring-named-port",
    "egress-lockdown-dns",
    "match-expressions",
];

/// A small, fast, deterministic generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Never zero; mix the seed a little so that small seeds differ.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    pub replicas: usize,
    pub pods_per_node: usize,
    pub seed: u64,
}

impl Config {
    pub fn new(pods: usize, policies: usize) -> Self {
        Self { pods, policies, namespaces: 500, replicas: 10, pods_per_node: 110, seed: 42 }
    }

    /// One of [`SIZES`] by name (`1k`, `10k`, `100k`).
    pub fn named(name: &str) -> Option<Self> {
        SIZES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(_, pods, policies)| Self::new(pods, policies))
    }
}

/// A deployment: replicas sharing labels and named ports.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub namespace: String,
    pub labels: Labels,
    pub named_ports: Vec<NamedPort>,
    pub pods: Vec<ObjectKey>,
}

/// A generated cluster and what the benchmarks need to make events on it.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub config: Config,
    pub state: ClusterState,
    pub namespaces: Vec<String>,
    pub deployments: Vec<Deployment>,
    pub nodes: Vec<String>,
    /// The kind (index into [`POLICY_KINDS`]) of each policy.
    pub policy_kinds: BTreeMap<ObjectKey, usize>,
}

pub fn node_name(n: usize) -> String {
    format!("node-{n:04}")
}

/// The address of pod slot `slot` on node `n` (slots 0..=252).
pub fn pod_ip(n: usize, slot: usize) -> IpAddr {
    assert!(slot < 253 && n < 65_536);
    IpAddr::V4(Ipv4Addr::new(10, (n / 256) as u8, (n % 256) as u8, 2 + slot as u8))
}

pub fn node_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 250, (n / 256) as u8, (n % 256) as u8))
}

fn namespace_name(i: usize) -> String {
    match i {
        0 => "kube-system".to_string(),
        1 => "monitoring".to_string(),
        _ => format!("ns-{i:03}"),
    }
}

const ENVS: [&str; 3] = ["prod", "staging", "dev"];
const TIERS: [&str; 3] = ["frontend", "backend", "db"];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn np(name: &str, protocol: Protocol, port: u16) -> NamedPort {
    NamedPort { name: name.to_string(), protocol, port }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("valid CIDR")
}

fn tcp(port: u16) -> PortSpec {
    PortSpec::Range { protocol: Protocol::Tcp, first: port, last: port }
}

fn named(name: &str) -> PortSpec {
    PortSpec::Named { protocol: Protocol::Tcp, name: name.to_string() }
}

fn in_ns(ns: &str, pods: LabelSelector) -> Peer {
    Peer::Pods { namespaces: NamespaceScope::Named(ns.to_string()), pods }
}

fn across(namespaces: LabelSelector, pods: LabelSelector) -> Peer {
    Peer::Pods { namespaces: NamespaceScope::Selector(namespaces), pods }
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::from_labels(pairs.iter().copied())
}

fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.to_string(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

impl Cluster {
    pub fn generate(config: Config) -> Self {
        let mut rng = XorShift::new(config.seed);
        let mut state = ClusterState::default();

        let namespaces: Vec<String> = (0..config.namespaces).map(namespace_name).collect();
        for (i, name) in namespaces.iter().enumerate() {
            let team = format!("team-{:02}", i % 50);
            let mut l = labels(&[("team", &team), ("env", ENVS[i % 3])]);
            if i == 1 {
                l.insert("role".into(), "monitoring".into());
            }
            state.namespaces.insert(name.clone(), Namespace::new(name.clone(), l));
        }

        let node_count = config.pods.div_ceil(config.pods_per_node);
        let nodes: Vec<String> = (0..node_count).map(node_name).collect();
        for (n, name) in nodes.iter().enumerate() {
            state.nodes.insert(
                name.clone(),
                Node { name: name.clone(), addresses: vec![node_ip(n)], ..Default::default() },
            );
        }

        // A random permutation of the node slots: pod i goes to slot perm[i].
        let mut perm: Vec<usize> = (0..config.pods).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }

        let deployment_count = config.pods.div_ceil(config.replicas);
        let mut deployments = Vec::with_capacity(deployment_count);
        for d in 0..deployment_count {
            let nsi = d % config.namespaces;
            let k = d / config.namespaces;
            let ns = &namespaces[nsi];
            let tier = TIERS[k % 3];
            let app = match (nsi, k) {
                (0, 0) => "kube-dns".to_string(),
                (1, 0) => "prometheus".to_string(),
                _ => format!("{ns}-d{k}"),
            };
            let hash = format!("{:010x}", rng.next_u64() & 0xff_ffff_ffff);
            let mut l = labels(&[("app", &app), ("tier", tier), ("pod-template-hash", &hash)]);
            let mut ports = match tier {
                "frontend" => {
                    vec![np("http", Protocol::Tcp, 8080), np("metrics", Protocol::Tcp, 9090)]
                }
                "backend" => vec![
                    np("http", Protocol::Tcp, 8080),
                    np("grpc", Protocol::Tcp, 9000),
                    np("metrics", Protocol::Tcp, 9090),
                ],
                _ => vec![np("db", Protocol::Tcp, 5432), np("metrics", Protocol::Tcp, 9187)],
            };
            if app == "kube-dns" {
                l.insert("k8s-app".into(), "kube-dns".into());
                ports = vec![
                    np("dns", Protocol::Udp, 53),
                    np("dns-tcp", Protocol::Tcp, 53),
                    np("metrics", Protocol::Tcp, 9153),
                ];
            }
            ports.sort();
            deployments.push(Deployment {
                namespace: ns.clone(),
                labels: l,
                named_ports: ports,
                pods: Vec::new(),
            });
        }
        for (i, &slot) in perm.iter().enumerate() {
            let d = i / config.replicas;
            let (n, s) = (slot / config.pods_per_node, slot % config.pods_per_node);
            let dep = &mut deployments[d];
            let key = ObjectKey::new(
                dep.namespace.clone(),
                format!(
                    "{}-{}-{}",
                    dep.labels["app"],
                    dep.labels["pod-template-hash"],
                    i % config.replicas
                ),
            );
            dep.pods.push(key.clone());
            state.pods.insert(
                key.clone(),
                Pod {
                    key,
                    labels: dep.labels.clone().into(),
                    ip: Some(pod_ip(n, s)),
                    ipv6: None,
                    node: Some(nodes[n].clone()),
                    phase: PodPhase::Running,
                    host_network: false,
                    terminating: false,
                    named_ports: dep.named_ports.clone().into(),
                },
            );
        }

        // The apps of each namespace, for policies to select.
        let mut apps: Vec<Vec<&Deployment>> = vec![Vec::new(); config.namespaces];
        for (d, dep) in deployments.iter().enumerate() {
            apps[d % config.namespaces].push(dep);
        }
        let mut policy_kinds = BTreeMap::new();
        for j in 0..config.policies {
            let nsi = j % config.namespaces;
            let slot = j / config.namespaces;
            let kind = (slot + nsi) % POLICY_KINDS.len();
            let app = |i: usize| -> String {
                let a = &apps[nsi];
                if a.is_empty() {
                    format!("{}-d{i}", namespaces[nsi])
                } else {
                    a[i % a.len()].labels["app"].clone()
                }
            };
            let policy = make_policy(&namespaces[nsi], nsi, slot, kind, &app(slot), &app(slot + 1));
            policy_kinds.insert(policy.key.clone(), kind);
            state.policies.insert(policy.key.clone(), policy);
        }

        Cluster { config, state, namespaces, deployments, nodes, policy_kinds }
    }

    /// The node whose agent the benchmarks measure: it holds a full 110 pods.
    pub fn measured_node(&self) -> &str {
        &self.nodes[0]
    }

    /// Every object as events, in the order an agent's informers deliver them at start-up
    /// (namespaces, nodes, pods, policies).
    pub fn events(&self) -> Vec<Event> {
        let s = &self.state;
        let mut events = Vec::with_capacity(
            s.namespaces.len() + s.nodes.len() + s.pods.len() + s.policies.len(),
        );
        events.extend(s.namespaces.values().cloned().map(Event::UpsertNamespace));
        events.extend(s.nodes.values().cloned().map(Event::UpsertNode));
        events.extend(s.pods.values().cloned().map(Event::UpsertPod));
        events.extend(s.policies.values().cloned().map(Event::UpsertPolicy));
        events
    }

    /// The same events with policies before pods.
    pub fn events_policies_first(&self) -> Vec<Event> {
        let s = &self.state;
        let mut events = Vec::new();
        events.extend(s.namespaces.values().cloned().map(Event::UpsertNamespace));
        events.extend(s.nodes.values().cloned().map(Event::UpsertNode));
        events.extend(s.policies.values().cloned().map(Event::UpsertPolicy));
        events.extend(s.pods.values().cloned().map(Event::UpsertPod));
        events
    }

    /// The pods on `node`, in key order.
    pub fn pods_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.state.pods.values().filter(move |p| p.node.as_deref() == Some(node))
    }

    /// Namespaces that have pods on `node`, and policies.
    pub fn local_policy_namespaces(&self, node: &str) -> Vec<String> {
        let set: BTreeSet<String> = self.pods_on(node).map(|p| p.key.namespace.clone()).collect();
        set.into_iter().filter(|ns| self.state.policies_in(ns).next().is_some()).collect()
    }

    /// A new pod `i` of the deployment of `like` (same namespace, labels, named ports) on node
    /// `node_index`, at an address no generated pod uses (slots 120..=252 of the node's /24).
    pub fn new_pod_like(&self, like: &Pod, node_index: usize, i: usize) -> Pod {
        let mut pod = like.clone();
        pod.key =
            ObjectKey::new(like.key.namespace.clone(), format!("{}-new-{i}", like.labels["app"]));
        pod.ip = Some(pod_ip(node_index, 120 + i % 133));
        pod.node = Some(self.nodes[node_index].clone());
        pod
    }

    /// `pod` relabelled into an identity no other pod has (a canary: new `app` label).
    pub fn relabelled(pod: &Pod, i: usize) -> Pod {
        let mut pod = pod.clone();
        let app = format!("{}-canary-{i}", pod.labels["app"]);
        std::sync::Arc::make_mut(&mut pod.labels).insert("app".into(), app);
        pod
    }

    /// `policy` with its first rule's (or, without rules, a new rule's) ports changed: an
    /// update that keeps the selected pods and changes their allow entries.
    pub fn updated_policy(policy: &Policy, i: usize) -> Policy {
        let mut p = policy.clone();
        let extra = tcp(10_000 + (i % 1000) as u16);
        let rules = p.ingress.get_or_insert_with(Vec::new);
        match rules.first_mut() {
            Some(r) if !r.ports.is_empty() => r.ports.push(extra),
            Some(r) => r.ports = vec![extra],
            None => rules.push(Rule {
                peers: vec![in_ns(&policy.key.namespace, LabelSelector::everything())],
                ports: vec![extra],
            }),
        }
        p
    }
}

/// One policy of namespace `ns` (index `nsi`), the `slot`-th of its namespace, of `kind`.
/// `app` is the application it protects, `other` another application of the namespace.
fn make_policy(ns: &str, nsi: usize, slot: usize, kind: usize, app: &str, other: &str) -> Policy {
    let key = ObjectKey::new(ns, format!("{}-{slot}", POLICY_KINDS[kind]));
    let team = format!("team-{:02}", nsi % 50);
    let ingress_only = |pod_selector: LabelSelector, rules: Vec<Rule>| Policy {
        key: key.clone(),
        pod_selector,
        ingress: Some(rules),
        egress: None,
    };
    match kind {
        // policyTypes: [Ingress], no rules: nothing may reach the namespace's pods.
        0 => ingress_only(LabelSelector::everything(), vec![]),
        // The frontend app may reach `app` on its named http port and 8443.
        1 => ingress_only(
            sel(&[("app", app)]),
            vec![Rule {
                peers: vec![in_ns(ns, sel(&[("app", other)]))],
                ports: vec![named("http"), tcp(8443)],
            }],
        ),
        // Frontends of the team's namespaces may reach this namespace's backends.
        2 => ingress_only(
            sel(&[("tier", "backend")]),
            vec![Rule {
                peers: vec![across(sel(&[("team", &team)]), sel(&[("tier", "frontend")]))],
                ports: vec![tcp(8080), named("grpc")],
            }],
        ),
        // The load balancers' ranges, minus a subnet, may reach `app` on 80 and 443.
        3 => ingress_only(
            sel(&[("app", app)]),
            vec![Rule {
                peers: vec![
                    Peer::Block(CidrBlock::new(
                        net("10.0.0.0/8"),
                        [net(&format!("10.{}.0.0/16", 100 + nsi % 100)), net("10.250.0.0/16")],
                    )),
                    Peer::Block(CidrBlock::new(net("172.16.0.0/12"), [net("172.16.1.0/24")])),
                ],
                ports: vec![tcp(80), tcp(443)],
            }],
        ),
        // Frontends may reach the internet on 443 but not private ranges; and their own namespace.
        4 => Policy {
            key: key.clone(),
            pod_selector: sel(&[("tier", "frontend")]),
            ingress: None,
            egress: Some(vec![
                Rule {
                    peers: vec![Peer::Block(CidrBlock::new(
                        net("0.0.0.0/0"),
                        [net("10.0.0.0/8"), net("172.16.0.0/12"), net("192.168.0.0/16")],
                    ))],
                    ports: vec![tcp(443)],
                },
                Rule { peers: vec![in_ns(ns, LabelSelector::everything())], ports: vec![] },
            ]),
        },
        // Every pod of the prod namespaces may reach `app`'s port ranges.
        5 => ingress_only(
            sel(&[("app", app)]),
            vec![Rule {
                peers: vec![across(sel(&[("env", "prod")]), LabelSelector::everything())],
                ports: vec![
                    PortSpec::Range { protocol: Protocol::Tcp, first: 30_000, last: 32_767 },
                    PortSpec::Range { protocol: Protocol::Udp, first: 5_000, last: 5_100 },
                ],
            }],
        ),
        // Prometheus (in the monitoring namespace) may scrape every pod's metrics port.
        6 => ingress_only(
            LabelSelector::everything(),
            vec![Rule {
                peers: vec![across(sel(&[("role", "monitoring")]), sel(&[("app", "prometheus")]))],
                ports: vec![named("metrics")],
            }],
        ),
        // `app` may only reach kube-dns and its own namespace's http ports.
        7 => Policy {
            key: key.clone(),
            pod_selector: sel(&[("app", app)]),
            ingress: None,
            egress: Some(vec![
                Rule {
                    peers: vec![across(
                        sel(&[("kubernetes.io/metadata.name", "kube-system")]),
                        sel(&[("k8s-app", "kube-dns")]),
                    )],
                    ports: vec![
                        PortSpec::Range { protocol: Protocol::Udp, first: 53, last: 53 },
                        PortSpec::Range { protocol: Protocol::Tcp, first: 53, last: 53 },
                    ],
                },
                Rule {
                    peers: vec![in_ns(ns, LabelSelector::everything())],
                    ports: vec![named("http")],
                },
            ]),
        },
        // Backends and databases accept from the namespace's non-database pods, and from
        // namespaces of non-dev environments that carry a team label.
        _ => ingress_only(
            LabelSelector::new(vec![req("tier", Operator::In, &["backend", "db"])]),
            vec![
                Rule {
                    peers: vec![in_ns(
                        ns,
                        LabelSelector::new(vec![req("tier", Operator::NotIn, &["db"])]),
                    )],
                    ports: vec![named("http"), named("db")],
                },
                Rule {
                    peers: vec![across(
                        LabelSelector::new(vec![
                            req("env", Operator::NotIn, &["dev"]),
                            req("team", Operator::Exists, &[]),
                        ]),
                        sel(&[("tier", "backend")]),
                    )],
                    ports: vec![tcp(5432)],
                },
            ],
        ),
    }
}

/// The events the benchmarks time, each with the event that undoes it (so that one engine
/// can be measured over and over in the same state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A new pod on the measured node with the labels of a deployment that has a pod there
    /// (a scale-up); undone by deleting it.
    LocalCreate,
    /// A pod of the measured node relabelled into a new identity; undone by relabelling back.
    LocalRelabel,
    /// A pod of the measured node deleted; undone by creating it again.
    LocalDelete,
    /// As `LocalCreate`, on another node (what most of an agent's pod events are).
    RemoteCreate,
    RemoteRelabel,
    RemoteDelete,
    /// A policy selecting pods of the measured node gets one more port; undone by restoring it.
    PolicyUpdate,
    /// A new policy (a variant of one selecting pods of the measured node); undone by deleting it.
    PolicyCreate,
}

impl EventKind {
    pub const POD: [EventKind; 6] = [
        EventKind::LocalCreate,
        EventKind::LocalRelabel,
        EventKind::LocalDelete,
        EventKind::RemoteCreate,
        EventKind::RemoteRelabel,
        EventKind::RemoteDelete,
    ];
    pub const POLICY: [EventKind; 2] = [EventKind::PolicyUpdate, EventKind::PolicyCreate];

    pub fn name(self) -> &'static str {
        match self {
            EventKind::LocalCreate => "local_create",
            EventKind::LocalRelabel => "local_relabel",
            EventKind::LocalDelete => "local_delete",
            EventKind::RemoteCreate => "remote_create",
            EventKind::RemoteRelabel => "remote_relabel",
            EventKind::RemoteDelete => "remote_delete",
            EventKind::PolicyUpdate => "policy_update",
            EventKind::PolicyCreate => "policy_create",
        }
    }

    /// The kind of the undoing event, as it would be named on its own.
    pub fn undo_name(self) -> &'static str {
        match self {
            EventKind::LocalCreate => "local_delete (new pod)",
            EventKind::LocalRelabel => "local_relabel (back)",
            EventKind::LocalDelete => "local_create (same name)",
            EventKind::RemoteCreate => "remote_delete (new pod)",
            EventKind::RemoteRelabel => "remote_relabel (back)",
            EventKind::RemoteDelete => "remote_create (same name)",
            EventKind::PolicyUpdate => "policy_update (back)",
            EventKind::PolicyCreate => "policy_delete",
        }
    }
}

/// Pods and policies to make events from, as seen from the measured node.
#[derive(Clone, Debug)]
pub struct Workload {
    pub local_pods: Vec<Pod>,
    pub remote_pods: Vec<Pod>,
    /// Policies that select at least one pod of the measured node.
    pub local_policies: Vec<Policy>,
}

impl Cluster {
    pub fn workload(&self) -> Workload {
        let node = self.measured_node();
        let local_pods: Vec<Pod> = self.pods_on(node).cloned().collect();
        let mut remote_pods: Vec<Pod> =
            self.state.pods.values().filter(|p| p.node.as_deref() != Some(node)).cloned().collect();
        // A scattered, deterministic order.
        let mut rng = XorShift::new(self.config.seed ^ 0xE7E7);
        for i in (1..remote_pods.len()).rev() {
            remote_pods.swap(i, rng.below(i + 1));
        }
        let local_policies = self
            .state
            .policies
            .values()
            .filter(|pol| {
                local_pods.iter().any(|p| {
                    p.key.namespace == pol.key.namespace && pol.pod_selector.matches(&p.labels)
                })
            })
            .cloned()
            .collect();
        Workload { local_pods, remote_pods, local_policies }
    }

    /// The `i`-th event of `kind` and the event that undoes it.
    pub fn event(&self, w: &Workload, kind: EventKind, i: usize) -> (Event, Event) {
        let local = || &w.local_pods[i % w.local_pods.len()];
        let remote = || &w.remote_pods[i % w.remote_pods.len()];
        let create = |like: &Pod, node: usize| {
            let pod = self.new_pod_like(like, node, i);
            let key = pod.key.clone();
            (Event::UpsertPod(pod), Event::DeletePod(key))
        };
        let relabel =
            |pod: &Pod| (Event::UpsertPod(Self::relabelled(pod, i)), Event::UpsertPod(pod.clone()));
        let delete = |pod: &Pod| (Event::DeletePod(pod.key.clone()), Event::UpsertPod(pod.clone()));
        match kind {
            EventKind::LocalCreate => create(local(), 0),
            EventKind::LocalRelabel => relabel(local()),
            EventKind::LocalDelete => delete(local()),
            // New remote pods go to node 1 (slots no generated pod uses).
            EventKind::RemoteCreate => create(remote(), 1),
            EventKind::RemoteRelabel => relabel(remote()),
            EventKind::RemoteDelete => delete(remote()),
            EventKind::PolicyUpdate => {
                let p = &w.local_policies[i % w.local_policies.len()];
                (Event::UpsertPolicy(Self::updated_policy(p, i)), Event::UpsertPolicy(p.clone()))
            }
            EventKind::PolicyCreate => {
                let p = &w.local_policies[i % w.local_policies.len()];
                let mut new = Self::updated_policy(p, i);
                new.key.name = format!("{}-new-{i}", p.key.name);
                let key = new.key.clone();
                (Event::UpsertPolicy(new), Event::DeletePolicy(key))
            }
        }
    }
}
