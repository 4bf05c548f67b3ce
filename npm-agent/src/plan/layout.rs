//! The plan's Azure NPM layout: NetworkPolicy as Azure Network Policy Manager lays it out on
//! Linux, computed by the compiler and rendered by the iptables dataplane (rule text, set
//! names and `ipset` commands are the dataplane's; which sets exist, what they hold and which
//! conjunction of them each rule matches are decided here, once). The eBPF dataplane follows
//! its sets too, for Azure NPM's set metrics (`dataplane::azure::AzureSets`).
//!
//! - Every policy direction it covers has a *target* (the pods it selects, as a conjunction of
//!   set matches) and *rules*, one per (peer, port) of each NetworkPolicy rule: the peer as a
//!   conjunction of set matches (empty: any address), the port as the rule says it.
//! - A selector becomes a conjunction of sets: the pods of a namespace, pods with a label (or
//!   a label value), several values of one label key (a list of label sets), namespaces with a
//!   label (lists of namespace sets), all namespaces; `NotIn` and `DoesNotExist` are negated
//!   matches. Named ports match a set of (address, protocol, port); ipBlocks a set of the
//!   block with its excepts.
//! - A set exists while a policy (or a list holding it) references it; its members follow
//!   the pods' labels, named ports and addresses and the namespaces' labels, cluster-wide.
//! - `quarantine` holds the local addresses that several local pods claim (their
//!   connections are refused both ways); it exists while it holds any.
//! - The *dispatch*: for each local endpoint direction that policies isolate, the policies
//!   selecting it, so that a connection walks only the policies of its own endpoints, not
//!   every policy's target in turn. It changes a (policy, endpoint) pair at a time: a policy
//!   selecting a thousand endpoints' worth of others costs one change per pod it selects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::cluster_policy::{Action, Tier};
use crate::model::{CidrBlock, Direction, ObjectKey, PortSpec, Protocol};

/// A set of the layout: what it holds, which also gives its (Azure NPM) readable name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum SetDef {
    /// The pods of a namespace.
    Namespace(String),
    /// The pods with the label key (`value: None`) or the label (any namespace).
    PodLabel { key: String, value: Option<String> },
    /// A list of the `PodLabel` sets of several values of one key.
    PodValues { key: String, values: Vec<String> },
    /// A list of the `Namespace` sets of the namespaces with the label key or the label.
    NsLabel { key: String, value: Option<String> },
    /// A list of the `Namespace` sets of the namespaces with one of the values of a key.
    NsValues { key: String, values: Vec<String> },
    /// A list of every `Namespace` set.
    AllNamespaces,
    /// Every pod port with this name: (address, protocol, port).
    NamedPort(String),
    /// The addresses of a block, but its excepts.
    Cidr(CidrBlock),
    /// Local addresses several local pods claim.
    Quarantine,
}

impl SetDef {
    /// Whether the set holds other sets (the others hold addresses).
    pub fn is_list(&self) -> bool {
        matches!(
            self,
            SetDef::PodValues { .. }
                | SetDef::NsLabel { .. }
                | SetDef::NsValues { .. }
                | SetDef::AllNamespaces
        )
    }
}

/// One member of a set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Member {
    /// A pod's address.
    Address(IpAddr),
    /// A pod's named port.
    Port { ip: IpAddr, protocol: Protocol, port: u16 },
    /// A block of a `Cidr` set, or one of its excepts (`except`: addresses in it do not match).
    Net { net: IpNet, except: bool },
    /// A set of a list (boxed: a member is otherwise an address, and there are many).
    Set(Box<SetDef>),
}

impl Member {
    /// The address whose memberships this member is about (none for blocks and sets).
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            Member::Address(ip) | Member::Port { ip, .. } => Some(*ip),
            Member::Net { .. } | Member::Set(_) => None,
        }
    }
}

/// One set of a conjunction, perhaps negated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SetMatch {
    pub negated: bool,
    pub set: SetDef,
}

/// One rule: a peer (a conjunction of set matches; empty: any address) and a port (`None`:
/// every protocol and port), and what a match does (a NetworkPolicy's rules always
/// `Accept`). A named port matches the `NamedPort` set of its name by destination address
/// and port: the selected pod's for ingress, the peer's for egress.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LayoutRule {
    pub peers: Vec<SetMatch>,
    pub port: Option<PortSpec>,
    pub action: Action,
}

/// One direction of one policy: the pods it selects and its rules, in order (a
/// ClusterNetworkPolicy's first match decides).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DirectionLayout {
    pub target: Vec<SetMatch>,
    pub rules: Vec<LayoutRule>,
}

impl DirectionLayout {
    /// The sets the direction references, each once: the target's, then each rule's peers'
    /// and named port's.
    pub fn references(&self) -> Vec<SetDef> {
        let mut refs: Vec<SetDef> = Vec::new();
        let mut add = |s: &SetDef| {
            if !refs.contains(s) {
                refs.push(s.clone());
            }
        };
        for m in &self.target {
            add(&m.set);
        }
        for r in &self.rules {
            for m in &r.peers {
                add(&m.set);
            }
            if let Some(PortSpec::Named { name, .. }) = &r.port {
                add(&SetDef::NamedPort(name.clone()));
            }
        }
        refs
    }
}

/// Where a ClusterNetworkPolicy stands: its tier and priority (equal priorities are ordered
/// by name, as the compiler's `Precedence` orders them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TierRank {
    pub tier: Tier,
    pub priority: u32,
}

/// One policy: the directions it covers (`None`: not covered, or its pod selector can
/// match no pod), and, for a ClusterNetworkPolicy, its tier (a NetworkPolicy has none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PolicyLayout {
    pub tier: Option<TierRank>,
    pub ingress: Option<DirectionLayout>,
    pub egress: Option<DirectionLayout>,
}

impl PolicyLayout {
    pub fn direction(&self, d: Direction) -> Option<&DirectionLayout> {
        match d {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }
}

/// The whole layout.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Layout {
    pub policies: BTreeMap<ObjectKey, Arc<PolicyLayout>>,
    /// (Each set's members behind an `Arc`: the compiler's copy and a plan's share them.)
    pub sets: BTreeMap<SetDef, Arc<BTreeSet<Member>>>,
    /// Local endpoint directions selected by policies of either kind: the policies selecting
    /// each (never empty). (Behind an `Arc`, as the sets' members.)
    pub dispatch: BTreeMap<(Direction, IpAddr), Arc<BTreeSet<ObjectKey>>>,
}

/// One change of the layout.
///
/// The compiler orders them so that a set is added (with its members) before anything
/// references it and removed after nothing does; `Regroup` names, before its member
/// changes, every address whose memberships change in pre-existing sets (directly or
/// through a list): a dataplane that cannot change them atomically holds the address's new
/// connections meanwhile, since a conjunction evaluated halfway could match what neither
/// the old nor the new memberships match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LayoutChange {
    AddSet {
        set: SetDef,
    },
    AddMember {
        set: SetDef,
        member: Member,
    },
    RemoveMember {
        set: SetDef,
        member: Member,
    },
    RemoveSet {
        set: SetDef,
    },
    Regroup {
        ip: IpAddr,
    },
    /// A policy created or changed.
    SetPolicy {
        key: ObjectKey,
        layout: Arc<PolicyLayout>,
    },
    RemovePolicy {
        key: ObjectKey,
    },
    /// Policy `policy` now selects the local endpoint at `ip` for `direction` (after the
    /// policy is set).
    AddDispatch {
        direction: Direction,
        ip: IpAddr,
        policy: ObjectKey,
    },
    /// It no longer does (before the policy is removed).
    RemoveDispatch {
        direction: Direction,
        ip: IpAddr,
        policy: ObjectKey,
    },
}

impl Layout {
    /// Applies changes, checking that they fit (see [`super::Plan::apply`]).
    pub fn apply(&mut self, changes: &[LayoutChange]) -> Result<(), String> {
        for c in changes {
            match c {
                LayoutChange::AddSet { set } => {
                    if self.sets.insert(set.clone(), Arc::default()).is_some() {
                        return Err(format!("layout set {set:?} added twice"));
                    }
                }
                LayoutChange::RemoveSet { set } => {
                    self.sets
                        .remove(set)
                        .ok_or_else(|| format!("layout set {set:?} removed but absent"))?;
                }
                LayoutChange::AddMember { set, member } => {
                    let s = self
                        .sets
                        .get_mut(set)
                        .ok_or_else(|| format!("member of absent layout set {set:?}"))?;
                    if !Arc::make_mut(s).insert(member.clone()) {
                        return Err(format!("{member:?} added to {set:?} twice"));
                    }
                }
                LayoutChange::RemoveMember { set, member } => {
                    let s = self
                        .sets
                        .get_mut(set)
                        .ok_or_else(|| format!("member of absent layout set {set:?}"))?;
                    if !Arc::make_mut(s).remove(member) {
                        return Err(format!("{member:?} removed from {set:?} but absent"));
                    }
                }
                LayoutChange::Regroup { .. } => {}
                LayoutChange::SetPolicy { key, layout } => {
                    self.policies.insert(key.clone(), layout.clone());
                }
                LayoutChange::RemovePolicy { key } => {
                    self.policies
                        .remove(key)
                        .ok_or_else(|| format!("layout of policy {key} removed but absent"))?;
                    if let Some(((d, ip), _)) = self.dispatch.iter().find(|(_, x)| x.contains(key))
                    {
                        return Err(format!("policy {key} removed while {ip} {d:?} walks it"));
                    }
                }
                LayoutChange::AddDispatch { direction, ip, policy } => {
                    if !self.policies.contains_key(policy) {
                        return Err(format!("{ip} {direction:?} walks absent policy {policy}"));
                    }
                    let x = self.dispatch.entry((*direction, *ip)).or_default();
                    if !Arc::make_mut(x).insert(policy.clone()) {
                        return Err(format!("{ip} {direction:?} walks {policy} twice"));
                    }
                }
                LayoutChange::RemoveDispatch { direction, ip, policy } => {
                    let k = (*direction, *ip);
                    let x = self.dispatch.get_mut(&k);
                    if !x.is_some_and(|x| Arc::make_mut(x).remove(policy)) {
                        return Err(format!(
                            "{ip} {direction:?} stops walking {policy} it did not"
                        ));
                    }
                    if self.dispatch.get(&k).is_some_and(|x| x.is_empty()) {
                        self.dispatch.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies changes (one diff, or several diffs one after the other) and returns the net
    /// move they make from the layout before them to the layout after, in the promised order
    /// (as [`Layout::diff`] would give it): what a dataplane that cannot take several diffs'
    /// changes in one pass applies instead. It costs what the changes touch (and the members
    /// of sets they create or re-create), not the layout's size.
    pub fn advance(&mut self, changes: &[LayoutChange]) -> Result<Vec<LayoutChange>, String> {
        // What each thing the changes touch was before them (taken at first touch).
        let mut whole: BTreeMap<SetDef, Option<Arc<BTreeSet<Member>>>> = BTreeMap::new();
        let mut members: BTreeMap<(SetDef, Member), bool> = BTreeMap::new();
        let mut policies: BTreeMap<ObjectKey, Option<Arc<PolicyLayout>>> = BTreeMap::new();
        let mut dispatch: BTreeMap<(Direction, IpAddr, ObjectKey), bool> = BTreeMap::new();
        for c in changes {
            match c {
                LayoutChange::AddSet { set } | LayoutChange::RemoveSet { set } => {
                    whole.entry(set.clone()).or_insert_with(|| self.sets.get(set).cloned());
                }
                LayoutChange::AddMember { set, member }
                | LayoutChange::RemoveMember { set, member } => {
                    members
                        .entry((set.clone(), member.clone()))
                        .or_insert_with(|| self.sets.get(set).is_some_and(|m| m.contains(member)));
                }
                LayoutChange::Regroup { .. } => {}
                LayoutChange::SetPolicy { key, .. } | LayoutChange::RemovePolicy { key } => {
                    policies.entry(key.clone()).or_insert_with(|| self.policies.get(key).cloned());
                }
                LayoutChange::AddDispatch { direction, ip, policy }
                | LayoutChange::RemoveDispatch { direction, ip, policy } => {
                    dispatch.entry((*direction, *ip, policy.clone())).or_insert_with(|| {
                        self.dispatch.get(&(*direction, *ip)).is_some_and(|x| x.contains(policy))
                    });
                }
            }
        }
        // (A set removed or re-created keeps its old members only in the `Arc` taken above.)
        self.apply(changes)?;
        let mut out = Vec::new();
        let mut new_lists = Vec::new();
        let mut kept: Vec<(SetDef, Member, bool)> = Vec::new();
        let mut gone: (Vec<SetDef>, Vec<SetDef>) = (Vec::new(), Vec::new());
        for (set, before) in &whole {
            match (before, self.sets.get(set)) {
                (None, Some(now)) => {
                    let block = std::iter::once(LayoutChange::AddSet { set: set.clone() }).chain(
                        now.iter().map(|m| LayoutChange::AddMember {
                            set: set.clone(),
                            member: m.clone(),
                        }),
                    );
                    if set.is_list() { new_lists.extend(block) } else { out.extend(block) }
                }
                (Some(_), None) => {
                    if set.is_list() {
                        gone.0.push(set.clone())
                    } else {
                        gone.1.push(set.clone())
                    }
                }
                (Some(was), Some(now)) => {
                    kept.extend(now.difference(was).map(|m| (set.clone(), m.clone(), true)));
                    kept.extend(was.difference(now).map(|m| (set.clone(), m.clone(), false)));
                }
                (None, None) => {}
            }
        }
        out.extend(new_lists);
        for ((set, member), before) in members {
            if whole.contains_key(&set) {
                continue;
            }
            let after = self.sets.get(&set).is_some_and(|m| m.contains(&member));
            if after != before {
                kept.push((set, member, after));
            }
        }
        // Addresses whose memberships change: a member's, or those of a set a list gains or
        // loses (as it holds them now, or held them before; an address that joined or left
        // that set in the meantime is a member change of its own).
        let mut regroup: BTreeSet<IpAddr> = BTreeSet::new();
        for (_, m, _) in &kept {
            match m {
                Member::Set(sub) => {
                    regroup.extend(self.addresses_of(m));
                    if let Some(Some(was)) = whole.get(sub.as_ref()) {
                        regroup.extend(was.iter().flat_map(|x| self.addresses_of(x)));
                    }
                }
                m => regroup.extend(m.address()),
            }
        }
        out.extend(regroup.into_iter().map(|ip| LayoutChange::Regroup { ip }));
        out.extend(kept.into_iter().map(|(set, member, add)| {
            if add {
                LayoutChange::AddMember { set, member }
            } else {
                LayoutChange::RemoveMember { set, member }
            }
        }));
        let mut removed_policies = Vec::new();
        for (key, before) in policies {
            match (before, self.policies.get(&key)) {
                (b, Some(now)) if b.as_ref().is_none_or(|b| !Arc::ptr_eq(b, now) && b != now) => {
                    out.push(LayoutChange::SetPolicy { key, layout: now.clone() })
                }
                (Some(_), None) => removed_policies.push(LayoutChange::RemovePolicy { key }),
                _ => {}
            }
        }
        let mut off = Vec::new();
        for ((direction, ip, policy), before) in dispatch {
            let after = self.dispatch.get(&(direction, ip)).is_some_and(|x| x.contains(&policy));
            match (before, after) {
                (false, true) => out.push(LayoutChange::AddDispatch { direction, ip, policy }),
                (true, false) => off.push(LayoutChange::RemoveDispatch { direction, ip, policy }),
                _ => {}
            }
        }
        out.extend(off);
        out.extend(removed_policies);
        out.extend(gone.0.into_iter().chain(gone.1).map(|set| LayoutChange::RemoveSet { set }));
        Ok(out)
    }

    /// Changes that build this layout from nothing: sets with their members (lists after
    /// the sets they hold), then policies.
    pub fn as_changes(&self) -> Vec<LayoutChange> {
        Layout::default().diff(self)
    }

    /// Changes that move this layout to `to`, in the promised order: new sets with their
    /// members (lists after the sets they hold), the members of kept sets (their addresses
    /// regrouped first), policies, then gone sets (lists first).
    pub fn diff(&self, to: &Layout) -> Vec<LayoutChange> {
        let mut out = Vec::new();
        let (lists, others): (Vec<_>, Vec<_>) = to
            .sets
            .iter()
            .filter(|(d, _)| !self.sets.contains_key(*d))
            .partition(|(d, _)| d.is_list());
        for (set, members) in others.into_iter().chain(lists) {
            out.push(LayoutChange::AddSet { set: set.clone() });
            out.extend(
                members
                    .iter()
                    .map(|m| LayoutChange::AddMember { set: set.clone(), member: m.clone() }),
            );
        }
        let mut members = Vec::new();
        let mut regroup = BTreeSet::new();
        for (set, now) in &to.sets {
            let Some(was) = self.sets.get(set) else { continue };
            // (The compiler shares unchanged sets with earlier layouts.)
            if Arc::ptr_eq(now, was) {
                continue;
            }
            // A list's member set stands for its addresses, as they are in either layout.
            for m in now.difference(was) {
                members.push(LayoutChange::AddMember { set: set.clone(), member: m.clone() });
                regroup.extend(self.addresses_of(m));
                regroup.extend(to.addresses_of(m));
            }
            for m in was.difference(now) {
                members.push(LayoutChange::RemoveMember { set: set.clone(), member: m.clone() });
                regroup.extend(self.addresses_of(m));
                regroup.extend(to.addresses_of(m));
            }
        }
        out.extend(regroup.into_iter().map(|ip| LayoutChange::Regroup { ip }));
        out.extend(members);
        for (key, l) in &to.policies {
            if self.policies.get(key).is_none_or(|o| !Arc::ptr_eq(o, l) && o != l) {
                out.push(LayoutChange::SetPolicy { key: key.clone(), layout: l.clone() });
            }
        }
        let none = BTreeSet::new();
        let keys: BTreeSet<&(Direction, IpAddr)> =
            self.dispatch.keys().chain(to.dispatch.keys()).collect();
        let mut gone = Vec::new();
        for k in keys {
            let (was, now) = (self.dispatch.get(k), to.dispatch.get(k));
            if let (Some(a), Some(b)) = (was, now)
                && Arc::ptr_eq(a, b)
            {
                continue;
            }
            let (was, now) = (was.map_or(&none, |x| &**x), now.map_or(&none, |x| &**x));
            let (direction, ip) = *k;
            for policy in now.difference(was).cloned() {
                out.push(LayoutChange::AddDispatch { direction, ip, policy });
            }
            for policy in was.difference(now).cloned() {
                gone.push(LayoutChange::RemoveDispatch { direction, ip, policy });
            }
        }
        out.extend(gone);
        for key in self.policies.keys().filter(|k| !to.policies.contains_key(*k)) {
            out.push(LayoutChange::RemovePolicy { key: key.clone() });
        }
        let (lists, others): (Vec<_>, Vec<_>) =
            self.sets.keys().filter(|d| !to.sets.contains_key(*d)).partition(|d| d.is_list());
        out.extend(
            lists.into_iter().chain(others).map(|d| LayoutChange::RemoveSet { set: d.clone() }),
        );
        out
    }

    /// The addresses whose memberships a member stands for (a set's: all it holds).
    fn addresses_of(&self, m: &Member) -> Vec<IpAddr> {
        match m {
            Member::Set(sub) => self
                .sets
                .get(sub.as_ref())
                .into_iter()
                .flat_map(|m| m.iter())
                .flat_map(|m| self.addresses_of(m))
                .collect(),
            m => m.address().into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 100k-pod cluster's layout holds about half a million members: each stays an address's
    /// size (a list's set is boxed).
    #[test]
    fn a_member_is_small() {
        assert!(std::mem::size_of::<Member>() <= 24, "{}", std::mem::size_of::<Member>());
    }

    #[test]
    fn a_diff_moves_one_layout_to_another_and_regroups_list_members() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let ns = |n: &str| SetDef::Namespace(n.into());
        let mut a = Layout::default();
        a.sets.insert(ns("x"), Arc::new([Member::Address(ip("10.0.0.1"))].into()));
        a.sets.insert(SetDef::AllNamespaces, Arc::new([Member::Set(Box::new(ns("x")))].into()));
        let mut b = a.clone();
        Arc::make_mut(b.sets.get_mut(&SetDef::AllNamespaces).unwrap()).clear();
        b.sets.insert(ns("y"), Arc::new([Member::Address(ip("10.0.0.2"))].into()));
        let d = a.diff(&b);
        assert!(d.contains(&LayoutChange::Regroup { ip: ip("10.0.0.1") }), "{d:?}");
        let mut moved = a.clone();
        moved.apply(&d).unwrap();
        assert_eq!(moved, b);
        assert_eq!(b.diff(&b), vec![]);
    }
}
