//! From a plan to what Windows' Host Networking Service receives, as Azure NPM's Windows
//! dataplane sends it: SetPolicies on the network (`IPSET`, `NESTEDIPSET`) and ACL policies
//! on each endpoint. Pure: the JSON is built here and only sent on Windows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::Serialize;

use super::tiers;
use crate::dataplane::azure::{fnv1a64, hashed_set_name};
use crate::model::{CidrBlock, Direction, Protocol};
use crate::plan::{DirectionPlan, IdentityId, PeerMatch, PeerSet, Plan, PortMatch, SetId};

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
    pub ip: IpAddr,
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

/// An IPv4 block as (cidr, excepts): `None` for an IPv6 block, `Some(None)` for every
/// address (0.0.0.0/0 without excepts).
#[allow(clippy::option_option)]
pub(super) fn v4_block(b: &CidrBlock) -> Option<Option<(Ipv4Net, Vec<Ipv4Net>)>> {
    let IpNet::V4(net) = b.net else { return None };
    let ex: Vec<Ipv4Net> = b
        .except
        .iter()
        .filter_map(|e| if let IpNet::V4(e) = e { Some(*e) } else { None })
        .collect();
    Some((!ex.is_empty() || net.prefix_len() != 0).then_some((net, ex)))
}

/// `net` without the `except` prefixes, as the fewest prefixes (at most 32 per except).
pub fn subtract(net: Ipv4Net, except: &[Ipv4Net]) -> Vec<Ipv4Net> {
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
fn meets(x: Ipv4Net, a: Ipv4Net, a_except: &[Ipv4Net]) -> bool {
    let inter = if a.contains(&x) {
        x
    } else if x.contains(&a) {
        a
    } else {
        return false;
    };
    !subtract(inter, a_except).is_empty()
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
        plan_members: &BTreeMap<IdentityId, Vec<Ipv4Addr>>,
        id: IdentityId,
    ) -> String {
        let members = plan_members
            .get(&id)
            .map(|v| v.iter().map(|ip| ip.to_string()).collect())
            .unwrap_or_default();
        self.add(format!("identity-{id}"), "IPSET", members)
    }

    pub(super) fn nets(&mut self, readable: String, nets: &[Ipv4Net]) -> String {
        self.add(readable, "IPSET", nets.iter().map(|n| n.to_string()).collect())
    }
}

fn block_name(net: Ipv4Net, except: &[Ipv4Net]) -> String {
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

/// The ACLs of one endpoint direction.
#[allow(clippy::too_many_arguments)]
fn direction_acls(
    d: Direction,
    dp: DirectionPlan,
    peer_sets: &HashMap<SetId, PeerSet>,
    node_ips: &[String],
    members: &BTreeMap<IdentityId, Vec<Ipv4Addr>>,
    sets: &mut Sets,
    endpoint: &str,
    unsupported: &mut Vec<Unsupported>,
    identity_of: &HashMap<Ipv4Addr, IdentityId>,
) -> Vec<Acl> {
    let mut acls = Vec::new();
    let mut report = |entry: String, reason: String| {
        unsupported.push(Unsupported {
            endpoint: endpoint.into(),
            direction: hcn_direction(d).into(),
            entry,
            reason,
        });
    };
    if tiers::is_tiered(&dp) {
        let ctx = tiers::Context { peer_sets, members, identity_of };
        let (acls, narrowed) = tiers::tiered_acls(&dp, &ctx, node_ips, sets);
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
        blocks: BTreeSet<(Ipv4Net, Vec<Ipv4Net>)>,
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
            PeerMatch::Set(s) => {
                p.ids.extend(peer_sets.get(s).into_iter().flat_map(|s| s.members.iter().copied()))
            }
            PeerMatch::Cidr(b) => match v4_block(b) {
                Some(None) => p.any = true,
                Some(Some(block)) => {
                    p.blocks.insert(block);
                }
                None => report(
                    a.to_string(),
                    "IPv6 addresses: HNS ACLs here are IPv4 only (as Azure NPM's)".into(),
                ),
            },
        }
    }
    // Which except blocks can be a block ACL: one that would hide no other except-allow.
    let excepts: Vec<(PortMatch, Ipv4Net, Vec<Ipv4Net>)> = by_port
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
            let ids: Vec<String> = peers.ids.iter().map(|id| sets.identity(members, *id)).collect();
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
                    if net.prefix_len() == 0 {
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

/// Translates a plan into what HNS would receive.
pub fn translate(plan: &Plan) -> HnsPolicies {
    let mut members: BTreeMap<IdentityId, Vec<Ipv4Addr>> = BTreeMap::new();
    for (ip, id) in &plan.identities {
        if let IpAddr::V4(v) = ip {
            members.entry(*id).or_default().push(*v);
        }
    }
    for m in members.values_mut() {
        m.sort();
    }
    let identity_of: HashMap<Ipv4Addr, IdentityId> = plan
        .identities
        .iter()
        .filter_map(|(ip, id)| if let IpAddr::V4(v) = ip { Some((*v, *id)) } else { None })
        .collect();
    let node_ips: Vec<String> =
        plan.node_ips.iter().filter(|ip| ip.is_ipv4()).map(|ip| ip.to_string()).collect();
    let mut sets = Sets::default();
    let mut unsupported = Vec::new();
    let mut eps: Vec<_> = plan.endpoints.iter().collect();
    eps.sort_by_key(|(ip, _)| **ip);
    let mut endpoints = Vec::new();
    for (ip, ep) in eps {
        let name = format!("{} {}", ip, ep.pod);
        if ip.is_ipv6() {
            if ep.profiles.iter().any(Option::is_some) {
                unsupported.push(Unsupported {
                    endpoint: name,
                    direction: "In/Out".into(),
                    entry: "endpoint".into(),
                    reason: "IPv6 endpoint".into(),
                });
            }
            continue;
        }
        let mut policies = Vec::new();
        for d in Direction::BOTH {
            let acls = direction_acls(
                d,
                plan.direction(ep, d),
                &plan.sets,
                &node_ips,
                &members,
                &mut sets,
                &name,
                &mut unsupported,
                &identity_of,
            );
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
            endpoints.push(EndpointAcls {
                ip: *ip,
                pod: ep.pod.to_string(),
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

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subtraction_is_exact_and_small() {
        assert_eq!(subtract(n("10.0.0.0/24"), &[n("10.0.0.0/25")]), vec![n("10.0.0.128/25")]);
        assert_eq!(subtract(n("10.0.0.0/24"), &[n("10.0.0.0/24")]), vec![]);
        let r = subtract(n("0.0.0.0/0"), &[n("10.0.0.0/8")]);
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|p| !p.contains(&"10.1.2.3".parse::<Ipv4Addr>().unwrap())));
        assert!(r.iter().any(|p| p.contains(&"11.0.0.1".parse::<Ipv4Addr>().unwrap())));
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
