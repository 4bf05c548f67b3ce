//! The Azure NPM layout of the plan ([`crate::plan::layout`]), compiled incrementally:
//! which label sets exist, what they hold, and which conjunction of them each policy's jump
//! and rules match.
//!
//! The compiler keeps its own indexes of identities (by namespace, label key and port name),
//! of namespace labels and of the layout it has emitted; [`LayoutCompiler::update`] takes
//! what one event changed (from the engine's diff) and returns the layout's changes, in the
//! order [`LayoutChange`] promises. A set is reference-counted: by each policy direction that
//! names it (once) and by each list holding it; it is added, with its members, when first
//! referenced and removed at the end of the update that drops its last reference.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::{PolicyTerms, PortSel, Subject, TermPeer};
use crate::model::cluster_policy::Action;
use crate::model::{
    CidrBlock, Direction, LabelSelector, Labels, Namespace, NamespaceScope, ObjectKey, Operator,
};
use crate::plan::layout::{
    DirectionLayout, Layout, LayoutChange, LayoutRule, Member, PolicyLayout, SetDef, SetMatch,
};
use crate::plan::{IdentityId, IdentityKey, PeerSelector, Verdict};

/// What one event changed, as the layout needs it.
#[derive(Debug, Default)]
pub struct LayoutInput<'a> {
    /// Identities created (before any address has them).
    pub new_keys: Vec<(IdentityId, IdentityKey)>,
    /// Identities gone (no address has them any more).
    pub dropped_keys: Vec<IdentityId>,
    /// Pod addresses whose identity changed: the new one (`None`: no longer a pod's).
    pub addresses: Vec<(IpAddr, Option<IdentityId>)>,
    /// Namespaces whose object changed: its labels now (`None`: deleted).
    pub namespaces: Vec<(String, Option<Labels>)>,
    /// Policies of either kind touched: the policy now (`None`: deleted).
    pub policies: Vec<(ObjectKey, Option<&'a PolicyTerms>)>,
    /// Local addresses entering (`true`) or leaving quarantine.
    pub quarantine: Vec<(IpAddr, bool)>,
    /// (Policy, local endpoint direction) pairs that changed: whether the policy selects
    /// the endpoint now.
    pub dispatch: Vec<(Direction, IpAddr, ObjectKey, bool)>,
}

#[derive(Clone, Debug)]
struct SetEntry {
    /// (Shared with the layouts `layout()` hands out: a plan costs no copy of them; the next
    /// change copies a set only while such a layout lives.)
    members: Arc<BTreeSet<Member>>,
    /// Policy directions referencing the set (once each) and lists holding it.
    refs: u32,
}

/// The incremental compiler of the layout.
#[derive(Clone, Debug, Default)]
pub struct LayoutCompiler {
    identities: HashMap<IpAddr, IdentityId>,
    keys: HashMap<IdentityId, IdentityKey>,
    addresses: HashMap<IdentityId, BTreeSet<IpAddr>>,
    by_namespace: HashMap<String, HashSet<IdentityId>>,
    /// Label key → value → the identities with it (a `podlabel-<key>:<value>` set's members
    /// without a scan of every identity with the key).
    by_label: HashMap<String, HashMap<String, HashSet<IdentityId>>>,
    by_port_name: HashMap<String, HashSet<IdentityId>>,
    /// Namespace objects' labels.
    namespaces: HashMap<String, Labels>,
    sets: HashMap<SetDef, SetEntry>,
    /// The namespace lists among `sets`, in order (a pod event looks at them, not at every
    /// set).
    namespace_lists: BTreeSet<SetDef>,
    policies: HashMap<ObjectKey, Arc<PolicyLayout>>,
    quarantined: BTreeSet<IpAddr>,
    dispatch: BTreeMap<(Direction, IpAddr), Arc<BTreeSet<ObjectKey>>>,
}

/// One update's output and scratch.
#[derive(Default)]
struct Out {
    changes: Vec<LayoutChange>,
    regrouped: HashSet<IpAddr>,
    /// Sets whose last reference went during the update.
    unreferenced: Vec<SetDef>,
}

impl Out {
    fn regroup(&mut self, ip: IpAddr) {
        if self.regrouped.insert(ip) {
            self.changes.push(LayoutChange::Regroup { ip });
        }
    }
}

impl SetDef {
    /// Whether a namespace list holds the namespace set of a namespace with these labels.
    fn holds_namespace(&self, labels: &Labels) -> bool {
        match self {
            SetDef::NsLabel { key, value: None } => labels.contains_key(key),
            SetDef::NsLabel { key, value: Some(v) } => labels.get(key) == Some(v),
            SetDef::NsValues { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            SetDef::AllNamespaces => true,
            _ => false,
        }
    }

    fn is_namespace_list(&self) -> bool {
        matches!(self, SetDef::NsLabel { .. } | SetDef::NsValues { .. } | SetDef::AllNamespaces)
    }
}

/// The set matches of a label selector's requirements, with the sets of one label and of
/// several values of one key (`None`: it matches nothing).
fn label_matches(
    sel: &LabelSelector,
    label: fn(String, Option<String>) -> SetDef,
    values: fn(String, Vec<String>) -> SetDef,
) -> Option<Vec<SetMatch>> {
    let mut out = Vec::new();
    for r in sel.requirements() {
        let key = r.key.clone();
        let m = |negated, set| SetMatch { negated, set };
        match r.operator {
            Operator::In => match r.values.len() {
                0 => return None,
                1 => out.push(m(false, label(key, r.values.first().cloned()))),
                _ => out.push(m(false, values(key, r.values.iter().cloned().collect()))),
            },
            Operator::NotIn => {
                out.extend(r.values.iter().map(|v| m(true, label(key.clone(), Some(v.clone())))))
            }
            Operator::Exists => out.push(m(false, label(key, None))),
            Operator::DoesNotExist => out.push(m(true, label(key, None))),
        }
    }
    Some(out)
}

/// The set matches of a selector peer (`None`: it matches no pod).
fn selector_matches(sel: &PeerSelector) -> Option<Vec<SetMatch>> {
    let mut out = Vec::new();
    match &sel.namespaces {
        NamespaceScope::Named(ns) => {
            out.push(SetMatch { negated: false, set: SetDef::Namespace(ns.clone()) })
        }
        NamespaceScope::Selector(s) => {
            out = label_matches(
                s,
                |key, value| SetDef::NsLabel { key, value },
                |key, values| SetDef::NsValues { key, values },
            )?;
            // Negations alone would match addresses that are no pod's.
            if !out.iter().any(|m| !m.negated) {
                out.insert(0, SetMatch { negated: false, set: SetDef::AllNamespaces });
            }
        }
    }
    out.extend(label_matches(
        &sel.pods,
        |key, value| SetDef::PodLabel { key, value },
        |key, values| SetDef::PodValues { key, values },
    )?);
    Some(out)
}

/// A block as a set (`None`: its excepts cover it, it admits nothing).
fn cidr_set(b: &CidrBlock) -> Option<SetDef> {
    (!b.except.iter().any(|e| e.prefix_len() == 0)).then(|| SetDef::Cidr(b.clone()))
}

/// One direction of a policy (`None`: the policy does not cover it, or selects no pod).
fn direction_layout(policy: &PolicyTerms, dir: Direction) -> Option<DirectionLayout> {
    if !policy.covers(dir) {
        return None;
    }
    let target = selector_matches(&match &policy.subject {
        Subject::Namespaced { namespace, pods } => PeerSelector {
            namespaces: NamespaceScope::Named(namespace.clone()),
            pods: pods.clone(),
        },
        Subject::Cluster(set) => PeerSelector {
            namespaces: NamespaceScope::Selector(set.namespaces.clone()),
            pods: set.pods.clone().unwrap_or_else(LabelSelector::everything),
        },
    })?;
    let mut out = Vec::new();
    for term in policy.terms(dir) {
        let action = match &term.verdict {
            Verdict::Allow => Action::Accept,
            Verdict::Admin(p) | Verdict::Baseline(p) => p.action,
        };
        let peers = match &term.peer {
            TermPeer::Any => Vec::new(),
            TermPeer::Pods(sel) => match selector_matches(sel) {
                Some(m) => m,
                None => continue,
            },
            TermPeer::Block(b) | TermPeer::PodsInBlock(b) => match cidr_set(b) {
                Some(set) => vec![SetMatch { negated: false, set }],
                None => continue,
            },
        };
        for port in &term.ports {
            let port = match port {
                PortSel::Any => None,
                PortSel::Spec(s) => Some(s.clone()),
            };
            out.push(LayoutRule { peers: peers.clone(), port, action });
        }
    }
    Some(DirectionLayout { target, rules: out })
}

/// The layout of a policy of either kind.
pub fn policy_layout(policy: &PolicyTerms) -> PolicyLayout {
    PolicyLayout {
        tier: policy.rank,
        ingress: direction_layout(policy, Direction::Ingress),
        egress: direction_layout(policy, Direction::Egress),
    }
}

/// The (address set, member) pairs of an address with identity key `key`.
fn memberships(key: &IdentityKey, ip: IpAddr) -> Vec<(SetDef, Member)> {
    let a = Member::Address(ip);
    let mut v = vec![(SetDef::Namespace(key.namespace.clone()), a.clone())];
    for (k, val) in key.labels.iter() {
        v.push((SetDef::PodLabel { key: k.clone(), value: None }, a.clone()));
        v.push((SetDef::PodLabel { key: k.clone(), value: Some(val.clone()) }, a.clone()));
    }
    for p in key.named_ports.iter() {
        v.push((
            SetDef::NamedPort(p.name.clone()),
            Member::Port { ip, protocol: p.protocol, port: p.port },
        ));
    }
    v
}

impl LayoutCompiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The layout as it stands.
    pub fn layout(&self) -> Layout {
        Layout {
            policies: self.policies.iter().map(|(k, l)| (k.clone(), l.clone())).collect(),
            sets: self.sets.iter().map(|(d, s)| (d.clone(), s.members.clone())).collect(),
            dispatch: self.dispatch.clone(),
        }
    }

    /// Applies what one event changed; returns the layout's changes, in order.
    pub fn update(&mut self, input: LayoutInput<'_>) -> Vec<LayoutChange> {
        let mut out = Out::default();
        let LayoutInput {
            new_keys,
            dropped_keys,
            mut addresses,
            namespaces,
            policies,
            quarantine,
            dispatch,
        } = input;
        // Namespaces whose lists may change: those whose object changed, and those that may
        // appear or go with their first or last identity (a namespace exists while it has an
        // object or a pod). Pods coming and going elsewhere leave the lists alone: a pod
        // event then costs nothing per namespace list.
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut existed: BTreeMap<String, bool> = BTreeMap::new();
        let identity_namespaces = new_keys
            .iter()
            .map(|(_, k)| k.namespace.clone())
            .chain(
                dropped_keys.iter().filter_map(|id| self.keys.get(id)).map(|k| k.namespace.clone()),
            )
            .collect::<Vec<_>>();
        for ns in identity_namespaces {
            existed.entry(ns).or_insert_with_key(|ns| self.namespace_exists(ns));
        }
        for (ip, on) in quarantine {
            self.quarantine(ip, on, &mut out);
        }
        for (id, key) in new_keys {
            self.index_identity(id, key);
        }
        for (name, labels) in namespaces {
            match labels {
                Some(l) => self.namespaces.insert(name.clone(), l),
                None => self.namespaces.remove(&name),
            };
            touched.insert(name);
        }
        // Addresses changing identity: out of the sets of the old key, into those of the new.
        addresses.sort();
        for (ip, new) in addresses {
            let old = self.identities.get(&ip).copied();
            if old == new {
                continue;
            }
            let pairs = |id: Option<IdentityId>| -> Vec<(SetDef, Member)> {
                id.and_then(|i| self.keys.get(&i)).map(|k| memberships(k, ip)).unwrap_or_default()
            };
            let (before, after) = (pairs(old), pairs(new));
            if let Some(o) = old
                && let Some(a) = self.addresses.get_mut(&o)
            {
                a.remove(&ip);
                if a.is_empty() {
                    self.addresses.remove(&o);
                }
            }
            match new {
                Some(n) => {
                    self.identities.insert(ip, n);
                    self.addresses.entry(n).or_default().insert(ip);
                }
                None => {
                    self.identities.remove(&ip);
                }
            }
            for pair in &before {
                if !after.contains(pair) {
                    self.change_member(&pair.0, pair.1.clone(), false, &mut out);
                }
            }
            for pair in after {
                if !before.contains(&pair) {
                    self.change_member(&pair.0, pair.1, true, &mut out);
                }
            }
        }
        for id in dropped_keys {
            self.unindex_identity(id);
        }
        for (ns, before) in existed {
            if self.namespace_exists(&ns) != before {
                touched.insert(ns);
            }
        }
        // Namespaces appearing, going or relabelled: the lists holding their sets.
        self.update_namespace_lists(&touched, &mut out);
        // Policies set, then the dispatch that names them, then policies removed.
        let policies: BTreeMap<ObjectKey, Option<&PolicyTerms>> = policies.into_iter().collect();
        let (set, removed): (Vec<_>, Vec<_>) = policies.into_iter().partition(|(_, p)| p.is_some());
        for (key, policy) in set {
            self.update_policy(key, policy, &mut out);
        }
        let (on, off): (Vec<_>, Vec<_>) = dispatch.into_iter().partition(|x| x.3);
        for (direction, ip, policy, _) in on {
            let x = self.dispatch.entry((direction, ip)).or_default();
            if Arc::make_mut(x).insert(policy.clone()) {
                out.changes.push(LayoutChange::AddDispatch { direction, ip, policy });
            }
        }
        for (direction, ip, policy, _) in off {
            let Some(x) = self.dispatch.get_mut(&(direction, ip)) else { continue };
            if Arc::make_mut(x).remove(&policy) {
                if x.is_empty() {
                    self.dispatch.remove(&(direction, ip));
                }
                out.changes.push(LayoutChange::RemoveDispatch { direction, ip, policy });
            }
        }
        for (key, policy) in removed {
            self.update_policy(key, policy, &mut out);
        }
        self.collect(&mut out);
        out.changes
    }

    // ---- indexes ----

    fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).cloned().unwrap_or_else(|| Namespace::default_labels(ns))
    }

    /// Namespaces that have a Namespace object or a pod.
    fn namespace_exists(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns) || self.by_namespace.contains_key(ns)
    }

    fn index_identity(&mut self, id: IdentityId, key: IdentityKey) {
        self.by_namespace.entry(key.namespace.clone()).or_default().insert(id);
        for (k, v) in key.labels.iter() {
            let values = self.by_label.entry(k.clone()).or_default();
            values.entry(v.clone()).or_default().insert(id);
        }
        for p in key.named_ports.iter() {
            self.by_port_name.entry(p.name.clone()).or_default().insert(id);
        }
        self.keys.insert(id, key);
    }

    fn unindex_identity(&mut self, id: IdentityId) {
        let Some(key) = self.keys.remove(&id) else { return };
        let drop = |m: &mut HashMap<String, HashSet<IdentityId>>, k: &str| {
            if let Some(s) = m.get_mut(k) {
                s.remove(&id);
                if s.is_empty() {
                    m.remove(k);
                }
            }
        };
        drop(&mut self.by_namespace, &key.namespace);
        for (k, v) in key.labels.iter() {
            if let Some(values) = self.by_label.get_mut(k) {
                drop(values, v);
                if values.is_empty() {
                    self.by_label.remove(k);
                }
            }
        }
        for p in key.named_ports.iter() {
            drop(&mut self.by_port_name, &p.name);
        }
    }

    fn addresses_of(&self, ids: impl IntoIterator<Item = IdentityId>) -> BTreeSet<Member> {
        ids.into_iter()
            .flat_map(|id| self.addresses.get(&id).into_iter().flatten())
            .map(|ip| Member::Address(*ip))
            .collect()
    }

    /// The members an address set should have now.
    fn address_members(&self, def: &SetDef) -> BTreeSet<Member> {
        match def {
            SetDef::Namespace(ns) => {
                self.addresses_of(self.by_namespace.get(ns).into_iter().flatten().copied())
            }
            SetDef::PodLabel { key, value } => {
                let values = self.by_label.get(key);
                let ids: Vec<IdentityId> = match value {
                    None => {
                        values.into_iter().flat_map(|v| v.values().flatten()).copied().collect()
                    }
                    Some(v) => {
                        values.and_then(|m| m.get(v)).into_iter().flatten().copied().collect()
                    }
                };
                self.addresses_of(ids)
            }
            SetDef::NamedPort(name) => {
                let mut m = BTreeSet::new();
                for id in self.by_port_name.get(name).into_iter().flatten() {
                    for p in self.keys[id].named_ports.iter().filter(|p| &p.name == name) {
                        for ip in self.addresses.get(id).into_iter().flatten() {
                            m.insert(Member::Port { ip: *ip, protocol: p.protocol, port: p.port });
                        }
                    }
                }
                m
            }
            SetDef::Cidr(b) => std::iter::once(Member::Net { net: b.net, except: false })
                .chain(b.except.iter().map(|e| Member::Net { net: *e, except: true }))
                .collect(),
            SetDef::Quarantine => self.quarantined.iter().map(|ip| Member::Address(*ip)).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The sets a list should hold now.
    fn list_members(&self, def: &SetDef) -> Vec<SetDef> {
        match def {
            SetDef::PodValues { key, values } => values
                .iter()
                .map(|v| SetDef::PodLabel { key: key.clone(), value: Some(v.clone()) })
                .collect(),
            d if d.is_namespace_list() => {
                // The namespaces that exist: objects, and namespaces of pods (`by_namespace`
                // holds no empty entry).
                let all: BTreeSet<&String> =
                    self.namespaces.keys().chain(self.by_namespace.keys()).collect();
                all.into_iter()
                    .filter(|ns| d.holds_namespace(&self.namespace_labels(ns)))
                    .map(|ns| SetDef::Namespace(ns.clone()))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    // ---- sets ----

    /// Takes a reference to a set, adding it (with its members, and the sets a list holds)
    /// when it does not exist.
    fn acquire(&mut self, def: &SetDef, out: &mut Out) {
        if let Some(s) = self.sets.get_mut(def) {
            s.refs += 1;
            return;
        }
        // (A list is added before the sets it holds, and given them after.)
        out.changes.push(LayoutChange::AddSet { set: def.clone() });
        let members: BTreeSet<Member> = if def.is_list() {
            let subs = self.list_members(def);
            for d in &subs {
                self.acquire(d, out);
            }
            subs.into_iter().map(|d| Member::Set(Box::new(d))).collect()
        } else {
            self.address_members(def)
        };
        out.changes.extend(
            members.iter().map(|m| LayoutChange::AddMember { set: def.clone(), member: m.clone() }),
        );
        if def.is_namespace_list() {
            self.namespace_lists.insert(def.clone());
        }
        self.sets.insert(def.clone(), SetEntry { members: Arc::new(members), refs: 1 });
    }

    /// Drops a reference to a set; one left without references is removed at the end of
    /// the update ([`Self::collect`]) unless something takes it again meanwhile.
    fn release(&mut self, def: &SetDef, out: &mut Out) {
        let Some(s) = self.sets.get_mut(def) else { return };
        s.refs -= 1;
        if s.refs == 0 {
            out.unreferenced.push(def.clone());
        }
    }

    /// Removes the sets left without references (and releases what a list held).
    fn collect(&mut self, out: &mut Out) {
        while let Some(def) = out.unreferenced.pop() {
            if self.sets.get(&def).is_none_or(|s| s.refs > 0) {
                continue;
            }
            let s = self.sets.remove(&def).expect("set");
            self.namespace_lists.remove(&def);
            out.changes.push(LayoutChange::RemoveSet { set: def });
            for m in s.members.iter() {
                if let Member::Set(sub) = m {
                    self.release(sub, out);
                }
            }
        }
    }

    /// Changes one member of an existing address set (the address regrouped first).
    fn change_member(&mut self, def: &SetDef, member: Member, add: bool, out: &mut Out) {
        let Some(s) = self.sets.get_mut(def) else { return };
        let changed = if add {
            Arc::make_mut(&mut s.members).insert(member.clone())
        } else {
            Arc::make_mut(&mut s.members).remove(&member)
        };
        if !changed {
            return;
        }
        if let Some(ip) = member.address() {
            out.regroup(ip);
        }
        let set = def.clone();
        out.changes.push(if add {
            LayoutChange::AddMember { set, member }
        } else {
            LayoutChange::RemoveMember { set, member }
        });
    }

    /// Brings every existing namespace list up to date for the namespaces in `touched`.
    fn update_namespace_lists(&mut self, touched: &BTreeSet<String>, out: &mut Out) {
        if touched.is_empty() || self.namespace_lists.is_empty() {
            return;
        }
        let lists: Vec<SetDef> = self.namespace_lists.iter().cloned().collect();
        for ns in touched {
            let exists = self.namespace_exists(ns);
            let labels = self.namespace_labels(ns);
            let sub = SetDef::Namespace(ns.clone());
            let member = Member::Set(Box::new(sub.clone()));
            for list in &lists {
                let want = exists && list.holds_namespace(&labels);
                if want == self.sets[list].members.contains(&member) {
                    continue;
                }
                if want {
                    self.acquire(&sub, out);
                }
                // Every pod of the namespace changes memberships.
                let pods: Vec<IpAddr> =
                    self.sets[&sub].members.iter().filter_map(Member::address).collect();
                for ip in pods {
                    out.regroup(ip);
                }
                let l = self.sets.get_mut(list).expect("list");
                let set = list.clone();
                if want {
                    Arc::make_mut(&mut l.members).insert(member.clone());
                    out.changes.push(LayoutChange::AddMember { set, member: member.clone() });
                } else {
                    Arc::make_mut(&mut l.members).remove(&member);
                    out.changes.push(LayoutChange::RemoveMember { set, member: member.clone() });
                    self.release(&sub, out);
                }
            }
        }
    }

    // ---- policies ----

    /// Lays out one policy again (created, changed or deleted): the sets of its new layout
    /// are taken before those of its old one are released, so a set it keeps stays.
    fn update_policy(&mut self, key: ObjectKey, policy: Option<&PolicyTerms>, out: &mut Out) {
        let new = policy.map(policy_layout);
        let old = self.policies.get(&key).cloned();
        if old.as_deref() == new.as_ref() {
            return;
        }
        if let Some(n) = &new {
            for d in Direction::BOTH {
                for set in n.direction(d).map(DirectionLayout::references).unwrap_or_default() {
                    self.acquire(&set, out);
                }
            }
        }
        match new {
            Some(n) => {
                let n = Arc::new(n);
                self.policies.insert(key.clone(), n.clone());
                out.changes.push(LayoutChange::SetPolicy { key, layout: n });
            }
            None => {
                self.policies.remove(&key);
                out.changes.push(LayoutChange::RemovePolicy { key });
            }
        }
        if let Some(o) = old {
            for d in Direction::BOTH {
                for set in o.direction(d).map(DirectionLayout::references).unwrap_or_default() {
                    self.release(&set, out);
                }
            }
        }
    }

    /// Puts `ip` in quarantine (or takes it out): the set is added with its first address
    /// and removed after its last.
    fn quarantine(&mut self, ip: IpAddr, on: bool, out: &mut Out) {
        if on == self.quarantined.contains(&ip) {
            return;
        }
        let had = !self.quarantined.is_empty();
        if on {
            self.quarantined.insert(ip);
        } else {
            self.quarantined.remove(&ip);
        }
        // (The set may still be there, its last address gone earlier in this update.)
        self.change_member(&SetDef::Quarantine, Member::Address(ip), on, out);
        match (had, self.quarantined.is_empty()) {
            (false, false) => self.acquire(&SetDef::Quarantine, out),
            (true, true) => self.release(&SetDef::Quarantine, out),
            _ => {}
        }
    }
}
