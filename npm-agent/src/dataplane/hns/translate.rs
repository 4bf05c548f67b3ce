//! From a plan to what Windows' Host Networking Service receives, as Azure NPM's Windows
//! dataplane sends it: SetPolicies on the network (`IPSET`, `NESTEDIPSET`) and ACL policies
//! on each endpoint. Pure: the JSON is built here and only sent on Windows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::tiers;
use crate::dataplane::azure::{fnv1a64, hashed_set_name};
use crate::model::{CidrBlock, Direction, IpFamily, ObjectKey, Protocol};
use crate::plan::{DirectionPlan, EndpointPlan, IdentityId, PeerMatch, Plan, PortMatch};

/// Azure NPM's ACL priorities (lower runs first): its readiness-probe allow from the node
/// (201), its allow rules (222) and its default block (3000).
pub const PRIORITY_NODE: u16 = 201;
pub const PRIORITY_ALLOW: u16 = 222;
/// Blocks for `except` run after every other allow and before the allows they carve.
pub const PRIORITY_EXCEPT_BLOCK: u16 = 223;
pub const PRIORITY_EXCEPT_ALLOW: u16 = 224;
pub const PRIORITY_DEFAULT_BLOCK: u16 = 3000;
/// The widest port range expanded into a port list (HNS ACLs take lists, not ranges).
pub const MAX_EXPANDED_PORTS: u32 = 4096;
pub const ACL_ID_PREFIX: &str = "azure-acl";

/// `hcn.SetPolicySetting`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SetPolicySetting {
    pub id: String,
    pub name: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub values: String,
}

/// Azure NPM's `NPMACLPolSettings` (`hcn.AclPolicySetting` with an `Id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AclPolicySetting {
    #[serde(rename = "Id", skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(rename = "Protocols", skip_serializing_if = "String::is_empty")]
    pub protocols: String,
    #[serde(rename = "Action")]
    pub action: &'static str,
    #[serde(rename = "Direction")]
    pub direction: &'static str,
    #[serde(rename = "LocalAddresses", skip_serializing_if = "String::is_empty")]
    pub local_addresses: String,
    #[serde(rename = "RemoteAddresses", skip_serializing_if = "String::is_empty")]
    pub remote_addresses: String,
    #[serde(rename = "LocalPorts", skip_serializing_if = "String::is_empty")]
    pub local_ports: String,
    #[serde(rename = "RemotePorts", skip_serializing_if = "String::is_empty")]
    pub remote_ports: String,
    #[serde(rename = "RuleType", skip_serializing_if = "String::is_empty")]
    pub rule_type: String,
    #[serde(rename = "Priority")]
    pub priority: u16,
}

/// `hcn.NetworkPolicy` / `hcn.EndpointPolicy`: a type and its settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyEntry<T> {
    #[serde(rename = "Type")]
    pub kind: &'static str,
    #[serde(rename = "Settings")]
    pub settings: T,
}

/// `hcn.PolicyNetworkRequest` / `hcn.PolicyEndpointRequest`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyRequest<T> {
    #[serde(rename = "Policies")]
    pub policies: Vec<PolicyEntry<T>>,
}

/// An endpoint's ACLs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointAcls {
    /// The first of `ips`.
    pub ip: IpAddr,
    /// The addresses of the plan's endpoints these ACLs enforce: an HNS endpoint holding any
    /// of them receives them (a pod's one endpoint holds both of its families).
    pub ips: Vec<IpAddr>,
    pub pod: String,
    /// What `ModifyEndpointSettings` receives (request type Update: the whole list).
    pub request: PolicyRequest<AclPolicySetting>,
}

/// A plan entry HNS cannot express (left out: the endpoint admits less than the plan says).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Unsupported {
    pub endpoint: String,
    pub direction: String,
    pub entry: String,
    pub reason: String,
}

/// Everything HNS would receive for a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HnsPolicies {
    /// What `ModifyNetworkSettings` receives (request type Add), IPSETs before NESTEDIPSETs
    /// (which name them).
    pub network: PolicyRequest<SetPolicySetting>,
    pub endpoints: Vec<EndpointAcls>,
    pub unsupported: Vec<Unsupported>,
}

fn hcn_direction(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "In",
        Direction::Egress => "Out",
    }
}

pub(super) fn protocol_number(p: Protocol) -> Result<&'static str, String> {
    match p {
        Protocol::Tcp => Ok("6"),
        Protocol::Udp => Ok("17"),
        Protocol::Sctp => {
            Err("HNS ACLs cannot match SCTP (Azure NPM rejects it on Windows too)".into())
        }
    }
}

/// Protocols and the port list of a port match (`None` ports: every port).
fn ports_of(pm: &PortMatch) -> Result<(String, String), String> {
    match *pm {
        PortMatch::Any => Ok((String::new(), String::new())),
        PortMatch::Protocol(p) => Ok((protocol_number(p)?.into(), String::new())),
        PortMatch::Range { protocol, first, last } => {
            let proto = protocol_number(protocol)?.to_string();
            if first <= 1 && last == u16::MAX {
                return Ok((proto, String::new()));
            }
            let n = u32::from(last) - u32::from(first) + 1;
            if n > MAX_EXPANDED_PORTS {
                return Err(format!(
                    "a port range of {n} ports: HNS ACLs take port lists, expanded up to {MAX_EXPANDED_PORTS} ports"
                ));
            }
            let list: Vec<String> = (first..=last).map(|p| p.to_string()).collect();
            Ok((proto, list.join(",")))
        }
    }
}

fn ports_overlap(a: &PortMatch, b: &PortMatch) -> bool {
    let range = |p: &PortMatch| match *p {
        PortMatch::Any => (None, 0u16, u16::MAX),
        PortMatch::Protocol(pr) => (Some(pr), 0, u16::MAX),
        PortMatch::Range { protocol, first, last } => (Some(protocol), first, last),
    };
    let (pa, fa, la) = range(a);
    let (pb, fb, lb) = range(b);
    (pa.is_none() || pb.is_none() || pa == pb) && fa <= lb && fb <= la
}

/// A block as (cidr, excepts of its family), or `None` when it is every address of its
/// family and the endpoint has addresses of that family only (`family`): an ACL naming no
/// address then matches exactly what the block does. An IPv4 block never matches IPv6
/// traffic, nor the reverse: a block of the other family, or `0.0.0.0/0` on a dual-stack
/// endpoint, is written as its prefixes.
pub(super) fn block(b: &CidrBlock, family: Option<IpFamily>) -> Option<(IpNet, Vec<IpNet>)> {
    let ex: Vec<IpNet> = b
        .except
        .iter()
        .filter(|e| e.network().is_ipv4() == b.net.network().is_ipv4())
        .copied()
        .collect();
    let every = ex.is_empty() && b.net.prefix_len() == 0 && family == Some(net_family(&b.net));
    (!every).then_some((b.net, ex))
}

pub(super) fn net_family(n: &IpNet) -> IpFamily {
    IpFamily::of(&n.network())
}

/// `net` without the `except` prefixes (of its family), as the fewest prefixes (at most 32
/// per IPv4 except, 128 per IPv6 one).
pub fn subtract(net: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    if except.iter().any(|e| e.contains(&net)) {
        return Vec::new();
    }
    if !except.iter().any(|e| net.contains(e)) {
        return vec![net];
    }
    match net.subnets(net.prefix_len() + 1) {
        Ok(halves) => halves.flat_map(|h| subtract(h, except)).collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `x ∩ (a \ a_except)` holds an address.
fn meets(x: IpNet, a: IpNet, a_except: &[IpNet]) -> bool {
    let inter = if a.contains(&x) {
        x
    } else if x.contains(&a) {
        a
    } else {
        return false;
    };
    !subtract(inter, a_except).is_empty()
}

/// A prefix as a set holds it: every address of a family (`/0`) as its two halves, so that
/// a set's entries are never mistaken for "any" (nor one family's for the other's).
fn spell(n: &IpNet) -> Vec<String> {
    match n.subnets(1) {
        Ok(halves) if n.prefix_len() == 0 => halves.map(|h| h.to_string()).collect(),
        _ => vec![n.to_string()],
    }
}

#[derive(Default)]
pub(super) struct Sets {
    /// Kernel-style name → setting.
    sets: BTreeMap<String, SetPolicySetting>,
}

impl Sets {
    pub(super) fn add(&mut self, readable: String, kind: &str, values: Vec<String>) -> String {
        let id = hashed_set_name(&readable);
        self.sets.entry(id.clone()).or_insert_with(|| SetPolicySetting {
            id: id.clone(),
            name: readable,
            kind: kind.into(),
            values: values.join(","),
        });
        id
    }

    pub(super) fn identity(
        &mut self,
        plan_members: &BTreeMap<IdentityId, Vec<IpAddr>>,
        id: IdentityId,
    ) -> String {
        let members = plan_members
            .get(&id)
            .map(|v| v.iter().map(|ip| ip.to_string()).collect())
            .unwrap_or_default();
        self.add(format!("identity-{id}"), "IPSET", members)
    }

    pub(super) fn nets(&mut self, readable: String, nets: &[IpNet]) -> String {
        self.add(readable, "IPSET", nets.iter().flat_map(spell).collect())
    }
}

fn block_name(net: IpNet, except: &[IpNet]) -> String {
    let mut s = format!("cidr-{net}");
    if !except.is_empty() {
        let list: Vec<String> = except.iter().map(|e| e.to_string()).collect();
        let joined = list.join(",");
        if joined.len() <= 120 {
            s.push_str(&format!("-except-{joined}"));
        } else {
            s.push_str(&format!("-except-{}-nets-{:016x}", list.len(), fnv1a64(&joined)));
        }
    }
    s
}

/// One ACL, before it is spelled for HNS.
pub(super) struct Acl {
    pub action: &'static str,
    pub priority: u16,
    /// Set names (matched by the peer side) or direct addresses.
    pub sets: Vec<String>,
    pub direct: Vec<String>,
    pub protocols: String,
    pub ports: String,
}

impl Acl {
    pub fn new(
        action: &'static str,
        priority: u16,
        sets: Vec<String>,
        protocols: &str,
        ports: &str,
    ) -> Self {
        Self {
            action,
            priority,
            sets,
            direct: Vec::new(),
            protocols: protocols.into(),
            ports: ports.into(),
        }
    }
}

/// The ACLs of one endpoint direction; what they cannot express is reported for each of
/// `endpoints` (the names of the plan's endpoints an HNS endpoint holds).
fn direction_acls(
    d: Direction,
    dp: DirectionPlan,
    ctx: &tiers::Context,
    node_ips: &[String],
    sets: &mut Sets,
    endpoints: &[String],
    unsupported: &mut Vec<Unsupported>,
) -> Vec<Acl> {
    let mut acls = Vec::new();
    let mut report = |entry: String, reason: String| {
        for endpoint in endpoints {
            unsupported.push(Unsupported {
                endpoint: endpoint.clone(),
                direction: hcn_direction(d).into(),
                entry: entry.clone(),
                reason: reason.clone(),
            });
        }
    };
    if tiers::is_tiered(&dp) {
        let (acls, narrowed) = tiers::tiered_acls(&dp, ctx, node_ips, sets);
        for (entry, reason) in narrowed {
            report(entry, reason);
        }
        return acls;
    }
    if !dp.isolated {
        return acls;
    }
    if !node_ips.is_empty() {
        acls.push(Acl {
            action: "Allow",
            priority: PRIORITY_NODE,
            sets: vec![],
            direct: node_ips.to_vec(),
            protocols: String::new(),
            ports: String::new(),
        });
    }
    #[derive(Default)]
    struct Peers {
        any: bool,
        ids: BTreeSet<IdentityId>,
        blocks: BTreeSet<(IpNet, Vec<IpNet>)>,
    }
    let mut by_port: BTreeMap<PortMatch, Peers> = BTreeMap::new();
    let mut allows: Vec<_> = dp.allow.iter().collect();
    allows.sort();
    for a in allows {
        if let Err(reason) = ports_of(&a.ports) {
            report(a.to_string(), reason);
            continue;
        }
        let p = by_port.entry(a.ports).or_default();
        match &a.peer {
            PeerMatch::Any => p.any = true,
            PeerMatch::Identity(id) => {
                p.ids.insert(*id);
            }
            // A whole-plan translation: a peer set is its members.
            PeerMatch::Set(s) => p
                .ids
                .extend(ctx.peer_sets.get(s).into_iter().flat_map(|s| s.members.iter().copied())),
            PeerMatch::Cidr(b) => match block(b, ctx.family) {
                None => p.any = true,
                Some(block) => {
                    p.blocks.insert(block);
                }
            },
        }
    }
    // Which except blocks can be a block ACL: one that would hide no other except-allow.
    let excepts: Vec<(PortMatch, IpNet, Vec<IpNet>)> = by_port
        .iter()
        .flat_map(|(pm, p)| {
            p.blocks.iter().filter(|(_, e)| !e.is_empty()).map(|(n, e)| (*pm, *n, e.clone()))
        })
        .collect();
    let mut as_block: Vec<bool> = vec![true; excepts.len()];
    loop {
        let mut changed = false;
        for i in 0..excepts.len() {
            if !as_block[i] {
                continue;
            }
            let hides = (0..excepts.len()).any(|j| {
                j != i
                    && as_block[j]
                    && ports_overlap(&excepts[i].0, &excepts[j].0)
                    && excepts[i].2.iter().any(|x| meets(*x, excepts[j].1, &excepts[j].2))
            });
            if hides {
                as_block[i] = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (pm, peers) in &by_port {
        let (protocols, ports) = ports_of(pm).expect("checked above");
        let acl = |priority, action, sets: Vec<String>| Acl {
            action,
            priority,
            sets,
            direct: vec![],
            protocols: protocols.clone(),
            ports: ports.clone(),
        };
        if peers.any {
            acls.push(acl(PRIORITY_ALLOW, "Allow", vec![]));
            continue;
        }
        if !peers.ids.is_empty() {
            let ids: Vec<String> =
                peers.ids.iter().map(|id| sets.identity(ctx.members, *id)).collect();
            let set = if ids.len() == 1 {
                ids[0].clone()
            } else {
                let readable: Vec<String> =
                    peers.ids.iter().map(|id| format!("identity-{id}")).collect();
                let joined = readable.join(",");
                let name = if joined.len() <= 120 {
                    format!("nestedlabel-{joined}")
                } else {
                    format!("nestedlabel-{}-sets-{:016x}", ids.len(), fnv1a64(&ids.join(",")))
                };
                sets.add(name, "NESTEDIPSET", ids)
            };
            acls.push(acl(PRIORITY_ALLOW, "Allow", vec![set]));
        }
        for (net, except) in &peers.blocks {
            let k = excepts.iter().position(|(p, n, e)| p == pm && n == net && e == except);
            match k {
                None => {
                    let s = sets.nets(block_name(*net, &[]), &[*net]);
                    acls.push(acl(PRIORITY_ALLOW, "Allow", vec![s]));
                }
                Some(k) if as_block[k] => {
                    // The except as a higher-priority block, then the cidr.
                    let x = sets.nets(format!("{}-excepts", block_name(*net, except)), except);
                    acls.push(acl(PRIORITY_EXCEPT_BLOCK, "Block", vec![x]));
                    if net.prefix_len() == 0 && ctx.family == Some(net_family(net)) {
                        acls.push(acl(PRIORITY_EXCEPT_ALLOW, "Allow", vec![]));
                    } else {
                        let s = sets.nets(block_name(*net, &[]), &[*net]);
                        acls.push(acl(PRIORITY_EXCEPT_ALLOW, "Allow", vec![s]));
                    }
                }
                Some(_) => {
                    // A block would hide another block's addresses: the cidr minus its
                    // excepts, as prefixes.
                    let s = sets.nets(block_name(*net, except), &subtract(*net, except));
                    acls.push(acl(PRIORITY_ALLOW, "Allow", vec![s]));
                }
            }
        }
    }
    acls.push(Acl {
        action: "Block",
        priority: PRIORITY_DEFAULT_BLOCK,
        sets: vec![],
        direct: vec![],
        protocols: String::new(),
        ports: String::new(),
    });
    acls
}

/// The plan's endpoints one HNS endpoint holds: on Windows a pod has one HNS endpoint with
/// all its addresses (dual stack: one of each family), so the plan's endpoints of a pod are
/// written as one ACL list. An address several pods claim joins their groups (whichever of
/// their HNS endpoints holds it, the ACLs there are the group's). Returns each group's
/// addresses, in order.
fn endpoint_groups(plan: &Plan) -> Vec<Vec<IpAddr>> {
    fn root(parent: &BTreeMap<ObjectKey, ObjectKey>, k: &ObjectKey) -> ObjectKey {
        let mut r = k.clone();
        while let Some(p) = parent.get(&r) {
            r = p.clone();
        }
        r
    }
    // (Each pod points to a smaller one of its group, or to none: its group's root.)
    let mut parent: BTreeMap<ObjectKey, ObjectKey> = BTreeMap::new();
    for (ip, ep) in &plan.endpoints {
        for c in plan.conflicts.get(ip).into_iter().flat_map(|c| &c.claimants) {
            let (x, y) = (root(&parent, &ep.pod), root(&parent, c));
            if x != y {
                parent.insert(x.clone().max(y.clone()), x.min(y));
            }
        }
    }
    let mut groups: BTreeMap<ObjectKey, Vec<IpAddr>> = BTreeMap::new();
    for (ip, ep) in &plan.endpoints {
        groups.entry(root(&parent, &ep.pod)).or_default().push(*ip);
    }
    let mut v: Vec<Vec<IpAddr>> = groups.into_values().collect();
    for g in &mut v {
        g.sort();
    }
    v.sort();
    v
}

/// Translates a plan into what HNS would receive.
pub fn translate(plan: &Plan) -> HnsPolicies {
    let mut members: BTreeMap<IdentityId, Vec<IpAddr>> = BTreeMap::new();
    for (ip, id) in &plan.identities {
        members.entry(*id).or_default().push(*ip);
    }
    for m in members.values_mut() {
        m.sort();
    }
    let identity_of = &plan.identities;
    let node_ips: Vec<String> = plan.node_ips.iter().map(|ip| ip.to_string()).collect();
    let mut sets = Sets::default();
    let mut unsupported = Vec::new();
    let mut endpoints = Vec::new();
    for ips in endpoint_groups(plan) {
        let eps: Vec<&EndpointPlan> = ips.iter().map(|ip| &plan.endpoints[ip]).collect();
        let names: Vec<String> =
            ips.iter().zip(&eps).map(|(ip, ep)| format!("{ip} {}", ep.pod)).collect();
        let family = IpFamily::of(&ips[0]);
        let family = ips.iter().all(|ip| IpFamily::of(ip) == family).then_some(family);
        let ctx = tiers::Context { peer_sets: &plan.sets, members: &members, identity_of, family };
        let ep = eps[0];
        let mut policies = Vec::new();
        for d in Direction::BOTH {
            let dp = plan.direction(ep, d);
            let same = eps.iter().all(|e| {
                let o = plan.direction(e, d);
                (o.isolated, o.selected, o.allow) == (dp.isolated, dp.selected, dp.allow)
            });
            let acls = if same {
                direction_acls(d, dp, &ctx, &node_ips, &mut sets, &names, &mut unsupported)
            } else {
                // One HNS endpoint, addresses the plan treats differently (an address several
                // pods claim): one ACL list cannot tell them apart; only the node is admitted.
                for name in &names {
                    unsupported.push(Unsupported {
                        endpoint: name.clone(),
                        direction: hcn_direction(d).into(),
                        entry: format!("the entries of {}", names.join(", ")),
                        reason: "addresses of one HNS endpoint with different entries: one ACL list cannot tell them apart; only the node is admitted".into(),
                    });
                }
                let mut node = Acl::new("Allow", PRIORITY_NODE, Vec::new(), "", "");
                node.direct = node_ips.clone();
                let block = Acl::new("Block", PRIORITY_DEFAULT_BLOCK, Vec::new(), "", "");
                if node_ips.is_empty() { vec![block] } else { vec![node, block] }
            };
            if acls.is_empty() {
                continue;
            }
            // One Id for the direction's ACLs, from a digest of them (as Azure NPM gives one Id
            // to a policy's ACLs).
            let digest_src: Vec<String> = acls
                .iter()
                .map(|a| {
                    format!(
                        "{}|{}|{}|{}|{}|{}",
                        a.action,
                        a.priority,
                        a.sets.join(","),
                        a.direct.join(","),
                        a.protocols,
                        a.ports
                    )
                })
                .collect();
            let id = format!(
                "{ACL_ID_PREFIX}-{}-plan-{:016x}",
                ep.pod.namespace,
                fnv1a64(&format!("{d}\n{}", digest_src.join("\n")))
            );
            for a in acls {
                // Azure NPM's mapping: set-based peers go to LocalAddresses for In (HNS's
                // source sets) and RemoteAddresses for Out; direct addresses to
                // RemoteAddresses; destination ports to LocalPorts for In, RemotePorts for Out.
                let (local_addresses, remote_addresses) = match (d, a.sets.is_empty()) {
                    (_, true) => (String::new(), a.direct.join(",")),
                    (Direction::Ingress, false) => (a.sets.join(","), String::new()),
                    (Direction::Egress, false) => (String::new(), a.sets.join(",")),
                };
                let (local_ports, remote_ports) = match d {
                    Direction::Ingress => (a.ports, String::new()),
                    Direction::Egress => (String::new(), a.ports),
                };
                policies.push(PolicyEntry {
                    kind: "ACL",
                    settings: AclPolicySetting {
                        id: id.clone(),
                        protocols: a.protocols,
                        action: a.action,
                        direction: hcn_direction(d),
                        local_addresses,
                        remote_addresses,
                        local_ports,
                        remote_ports,
                        rule_type: "Switch".into(),
                        priority: a.priority,
                    },
                });
            }
        }
        if !policies.is_empty() {
            let pods: BTreeSet<String> = eps.iter().map(|e| e.pod.to_string()).collect();
            endpoints.push(EndpointAcls {
                ip: ips[0],
                ips: ips.clone(),
                pod: pods.into_iter().collect::<Vec<_>>().join(","),
                request: PolicyRequest { policies },
            });
        }
    }
    let mut all: Vec<SetPolicySetting> = sets.sets.into_values().collect();
    all.sort_by(|a, b| (a.kind != "IPSET", &a.name).cmp(&(b.kind != "IPSET", &b.name)));
    unsupported.sort();
    unsupported.dedup();
    HnsPolicies {
        network: PolicyRequest {
            policies: all
                .into_iter()
                .map(|s| PolicyEntry { kind: "SetPolicy", settings: s })
                .collect(),
        },
        endpoints,
        unsupported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn subtraction_is_exact_and_small() {
        assert_eq!(subtract(n("10.0.0.0/24"), &[n("10.0.0.0/25")]), vec![n("10.0.0.128/25")]);
        assert_eq!(subtract(n("10.0.0.0/24"), &[n("10.0.0.0/24")]), vec![]);
        let r = subtract(n("0.0.0.0/0"), &[n("10.0.0.0/8")]);
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|p| !p.contains(&ip("10.1.2.3"))));
        assert!(r.iter().any(|p| p.contains(&ip("11.0.0.1"))));
    }

    #[test]
    fn ipv6_subtraction_is_exact_small_and_keeps_to_its_family() {
        assert_eq!(subtract(n("fd00::/120"), &[n("fd00::/121")]), vec![n("fd00::80/121")]);
        assert_eq!(subtract(n("fd00::/64"), &[n("fd00::/64")]), vec![]);
        // A /128 out of ::/0: one prefix per bit, 128 of them, none holding it.
        let r = subtract(n("::/0"), &[n("fd00::1/128")]);
        assert_eq!(r.len(), 128);
        assert!(r.iter().all(|p| !p.contains(&ip("fd00::1"))));
        for a in ["fd00::", "fd00::2", "::1", "2001:db8::1", "ffff::"] {
            assert!(r.iter().any(|p| p.contains(&ip(a))), "{a}");
        }
        // Prefixes, pairwise disjoint, covering the rest exactly.
        let r = subtract(n("fd00::/8"), &[n("fd00::/16"), n("fd12:3400::/24"), n("fe00::/8")]);
        for (i, x) in r.iter().enumerate() {
            assert!(n("fd00::/8").contains(x));
            assert!(!n("fd00::/16").contains(x) && !x.contains(&n("fd00::/16")));
            assert!(r[i + 1..].iter().all(|y| !x.contains(y) && !y.contains(x)), "{r:?}");
        }
        assert!(r.iter().all(|p| !p.contains(&ip("fd12:34ff::1"))));
        assert!(r.iter().any(|p| p.contains(&ip("fd12:3300::1"))));
        assert!(r.iter().any(|p| p.contains(&ip("fdff::1"))));
        // An except of the other family takes nothing away, in either direction.
        assert_eq!(subtract(n("fd00::/8"), &[n("0.0.0.0/0")]), vec![n("fd00::/8")]);
        assert_eq!(subtract(n("10.0.0.0/8"), &[n("::/0")]), vec![n("10.0.0.0/8")]);
    }

    #[test]
    fn blocks_keep_to_their_family() {
        let every_v4 = CidrBlock::new(n("0.0.0.0/0"), []);
        let every_v6 = CidrBlock::new(n("::/0"), []);
        // "Every address" is an ACL with no address only where the endpoint has that family
        // only; elsewhere the prefix, spelled as its halves.
        assert_eq!(block(&every_v4, Some(IpFamily::V4)), None);
        assert_eq!(block(&every_v4, None), Some((n("0.0.0.0/0"), vec![])));
        assert_eq!(block(&every_v6, Some(IpFamily::V4)), Some((n("::/0"), vec![])));
        assert_eq!(block(&every_v6, Some(IpFamily::V6)), None);
        assert_eq!(spell(&n("::/0")), ["::/1", "8000::/1"]);
        assert_eq!(spell(&n("0.0.0.0/0")), ["0.0.0.0/1", "128.0.0.0/1"]);
        assert_eq!(spell(&n("fd00::/8")), ["fd00::/8"]);
        let b = CidrBlock::new(n("fd00::/8"), [n("fd00::/16")]);
        assert_eq!(block(&b, Some(IpFamily::V6)), Some((n("fd00::/8"), vec![n("fd00::/16")])));
    }

    #[test]
    fn ranges_expand_like_azure_npm() {
        let (p, ports) =
            ports_of(&PortMatch::Range { protocol: Protocol::Tcp, first: 80, last: 83 }).unwrap();
        assert_eq!((p.as_str(), ports.as_str()), ("6", "80,81,82,83"));
        assert!(
            ports_of(&PortMatch::Range { protocol: Protocol::Udp, first: 1, last: 65535 })
                .unwrap()
                .1
                .is_empty()
        );
        assert!(
            ports_of(&PortMatch::Range { protocol: Protocol::Udp, first: 1000, last: 60000 })
                .is_err()
        );
        assert!(ports_of(&PortMatch::Protocol(Protocol::Sctp)).is_err());
    }
}
