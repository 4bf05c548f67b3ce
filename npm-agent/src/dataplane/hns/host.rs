//! A model of HCN on any host: a pod network's SetPolicies and its endpoints' policies,
//! changed by the same JSON documents the Windows calls send and refusing what HNS refuses
//! (a set added twice, a nested set or an ACL naming a set that does not exist, a set removed
//! while a nested set or an ACL names it, malformed ACLs). It also evaluates the ACLs as HNS
//! does ([`HostHcn::allows`]), so the tests judge what the dataplane left in it, not what it
//! meant to send. Endpoints are created and removed by the test, as the CNI would.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use super::hcn::{Hcn, HcnError, ModifyRequest, RequestType, policy_type};
use crate::model::{Direction, Protocol};

/// One SetPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
struct SetPolicy {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Values")]
    values: String,
}

impl SetPolicy {
    fn members(&self) -> impl Iterator<Item = &str> {
        self.values.split(',').filter(|v| !v.is_empty())
    }
}

/// The ACL fields HNS reads (what the model checks and evaluates).
#[derive(Clone, Debug, Deserialize)]
struct Acl {
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Direction")]
    direction: String,
    #[serde(rename = "Priority")]
    priority: u16,
    #[serde(rename = "Protocols", default)]
    protocols: String,
    #[serde(rename = "LocalAddresses", default)]
    local_addresses: String,
    #[serde(rename = "RemoteAddresses", default)]
    remote_addresses: String,
    #[serde(rename = "LocalPorts", default)]
    local_ports: String,
    #[serde(rename = "RemotePorts", default)]
    remote_ports: String,
    #[serde(rename = "RuleType", default)]
    rule_type: String,
}

fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').filter(|v| !v.is_empty())
}

/// An address or a prefix, of either family (HNS's ACLs and IPSETs take both on dual-stack
/// networks).
fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether an address-list item names a set (the dataplane's sets are `azure-npm-…`).
fn is_set_name(item: &str) -> bool {
    item.starts_with("azure-npm-")
}

#[derive(Clone, Debug)]
struct HostEndpoint {
    /// One address, or one of each family (a dual-stack pod's one endpoint).
    ips: Vec<IpAddr>,
    policies: Vec<Value>,
}

/// The model (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct HostHcn {
    sets: BTreeMap<String, SetPolicy>,
    endpoints: BTreeMap<String, HostEndpoint>,
    next_endpoint: u64,
    /// Successful modify calls (network and endpoints).
    pub modify_calls: u64,
}

impl HostHcn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates an endpoint with this address (as the CNI does for a new pod), with a policy
    /// of its own (an `OutBoundNAT`, which the dataplane must keep); returns its ID.
    pub fn add_endpoint(&mut self, ip: IpAddr) -> String {
        self.add_endpoint_with(&[ip])
    }

    /// Creates an endpoint with these addresses (a dual-stack pod's: one of each family);
    /// returns its ID.
    pub fn add_endpoint_with(&mut self, ips: &[IpAddr]) -> String {
        self.next_endpoint += 1;
        let id = format!("ep-{:04}", self.next_endpoint);
        let nat = json!({"Type": "OutBoundNAT", "Settings": {"Exceptions": ["10.0.0.0/8"]}});
        self.endpoints.insert(id.clone(), HostEndpoint { ips: ips.to_vec(), policies: vec![nat] });
        id
    }

    /// Removes the endpoint with this ID.
    pub fn remove_endpoint_id(&mut self, id: &str) {
        self.endpoints.remove(id);
    }

    /// Removes the endpoints with this address (a pod deleted).
    pub fn remove_endpoint(&mut self, ip: IpAddr) {
        self.endpoints.retain(|_, e| !e.ips.contains(&ip));
    }

    /// Whether an endpoint has this address.
    pub fn has_endpoint(&self, ip: IpAddr) -> bool {
        self.endpoints.values().any(|e| e.ips.contains(&ip))
    }

    /// The network's SetPolicies, as documents, by `Id`.
    pub fn set_policies(&self) -> Vec<Value> {
        self.sets
            .values()
            .map(|s| {
                json!({"Type": "SetPolicy", "Settings": {"Id": s.id, "Name": s.name, "Type": s.kind, "Values": s.values}})
            })
            .collect()
    }

    /// The policies of the endpoint with this address (empty if there is none).
    pub fn endpoint_policies(&self, ip: IpAddr) -> Vec<Value> {
        self.endpoints
            .values()
            .find(|e| e.ips.contains(&ip))
            .map(|e| e.policies.clone())
            .unwrap_or_default()
    }

    /// The addresses a set holds, nested sets resolved.
    fn set_nets(&self, id: &str, depth: u8) -> Vec<IpNet> {
        let Some(s) = self.sets.get(id) else { return Vec::new() };
        match s.kind.as_str() {
            "NESTEDIPSET" if depth < 4 => {
                s.members().flat_map(|m| self.set_nets(m, depth + 1)).collect()
            }
            "IPSET" => s.members().filter_map(parse_net).collect(),
            _ => Vec::new(),
        }
    }

    fn list_matches(&self, list: &str, peer: IpAddr) -> bool {
        let mut any = false;
        for item in items(list) {
            any = true;
            let hit = if is_set_name(item) {
                self.set_nets(item, 0).iter().any(|n| n.contains(&peer))
            } else {
                parse_net(item).is_some_and(|n| n.contains(&peer))
            };
            if hit {
                return true;
            }
        }
        !any
    }

    fn acl_matches(&self, a: &Acl, peer: IpAddr, protocol: Protocol, port: u16) -> bool {
        if !a.protocols.is_empty()
            && !items(&a.protocols).any(|p| p == protocol.number().to_string())
        {
            return false;
        }
        let ports = if a.direction == "In" { &a.local_ports } else { &a.remote_ports };
        if !ports.is_empty() && !items(ports).any(|p| p == port.to_string()) {
            return false;
        }
        // Azure NPM's mapping, which the translation follows: a peer's sets are in
        // LocalAddresses for In and RemoteAddresses for Out, its addresses in
        // RemoteAddresses.
        self.list_matches(&a.local_addresses, peer) && self.list_matches(&a.remote_addresses, peer)
    }

    /// HNS's verdict for a connection of `peer` to (In) or from (Out) the endpoint with
    /// address `endpoint`: its ACLs of that direction by priority (lower first), the first
    /// that matches decides; none: allowed. No endpoint: allowed (HNS has nothing to apply).
    pub fn allows(
        &self,
        endpoint: IpAddr,
        direction: Direction,
        peer: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        let dir = if direction == Direction::Ingress { "In" } else { "Out" };
        let Some(e) = self.endpoints.values().find(|e| e.ips.contains(&endpoint)) else {
            return true;
        };
        let mut acls: Vec<Acl> = e
            .policies
            .iter()
            .filter(|p| policy_type(p) == "ACL")
            .filter_map(|p| serde_json::from_value(p["Settings"].clone()).ok())
            .filter(|a: &Acl| a.direction == dir)
            .collect();
        acls.sort_by_key(|a| a.priority);
        match acls.iter().find(|a| self.acl_matches(a, peer, protocol, port)) {
            Some(a) => a.action == "Allow",
            None => true,
        }
    }

    /// The sets something names: nested sets' members and ACLs' address lists.
    fn set_in_use(&self, id: &str) -> Option<String> {
        if let Some(s) =
            self.sets.values().find(|s| s.kind == "NESTEDIPSET" && s.members().any(|m| m == id))
        {
            return Some(format!("nested set {}", s.id));
        }
        for (eid, e) in &self.endpoints {
            for p in e.policies.iter().filter(|p| policy_type(p) == "ACL") {
                let s = &p["Settings"];
                let named = ["LocalAddresses", "RemoteAddresses"]
                    .iter()
                    .any(|k| s[k].as_str().is_some_and(|l| items(l).any(|m| m == id)));
                if named {
                    return Some(format!("an ACL of endpoint {eid}"));
                }
            }
        }
        None
    }

    fn check_set(&self, s: &SetPolicy) -> Result<(), String> {
        match s.kind.as_str() {
            "IPSET" => {
                if let Some(bad) = s.members().find(|m| parse_net(m).is_none()) {
                    return Err(format!("set {}: {bad:?} is not an address or prefix", s.id));
                }
            }
            "NESTEDIPSET" => {
                if let Some(bad) = s.members().find(|m| !self.sets.contains_key(*m) || *m == s.id) {
                    return Err(format!("nested set {} names {bad}, which does not exist", s.id));
                }
            }
            k => return Err(format!("set {}: unknown type {k:?}", s.id)),
        }
        Ok(())
    }

    fn check_acl(&self, settings: &Value) -> Result<(), String> {
        let a: Acl = serde_json::from_value(settings.clone()).map_err(|e| format!("ACL: {e}"))?;
        if !["Allow", "Block"].contains(&a.action.as_str()) {
            return Err(format!("ACL: Action {:?}", a.action));
        }
        if !["In", "Out"].contains(&a.direction.as_str()) {
            return Err(format!("ACL: Direction {:?}", a.direction));
        }
        if !a.rule_type.is_empty() && !["Switch", "Host"].contains(&a.rule_type.as_str()) {
            return Err(format!("ACL: RuleType {:?}", a.rule_type));
        }
        for p in items(&a.protocols) {
            p.parse::<u8>().map_err(|_| format!("ACL: protocol {p:?}"))?;
        }
        for p in items(&a.local_ports).chain(items(&a.remote_ports)) {
            p.parse::<u16>().map_err(|_| format!("ACL: port {p:?}"))?;
        }
        for item in items(&a.local_addresses).chain(items(&a.remote_addresses)) {
            if is_set_name(item) {
                if !self.sets.contains_key(item) {
                    return Err(format!("ACL names set {item}, which does not exist"));
                }
            } else if parse_net(item).is_none() {
                return Err(format!("ACL: address {item:?}"));
            }
        }
        Ok(())
    }
}

fn request(call: &'static str, json: &str) -> Result<ModifyRequest, HcnError> {
    let r: ModifyRequest =
        serde_json::from_str(json).map_err(|e| HcnError::new(call, format!("bad request: {e}")))?;
    if r.resource_type != "Policy" {
        return Err(HcnError::new(call, format!("ResourceType {:?}", r.resource_type)));
    }
    Ok(r)
}

impl Hcn for HostHcn {
    fn query_network(&mut self) -> Result<String, HcnError> {
        Ok(json!({"ID": "net-0001", "Name": "azure", "Policies": self.set_policies()}).to_string())
    }

    fn modify_network(&mut self, json: &str) -> Result<(), HcnError> {
        const CALL: &str = "HcnModifyNetwork";
        let r = request(CALL, json)?;
        let err = |m: String| HcnError::new(CALL, m);
        // HNS applies a request whole or not at all: work on a copy.
        let mut next = self.clone();
        for p in &r.settings.policies {
            if policy_type(p) != "SetPolicy" {
                return Err(err(format!("policy type {:?}", policy_type(p))));
            }
            let s: SetPolicy = serde_json::from_value(p["Settings"].clone())
                .map_err(|e| err(format!("SetPolicy: {e}")))?;
            match r.request_type {
                RequestType::Add => {
                    if next.sets.contains_key(&s.id) {
                        return Err(err(format!("set {} already exists", s.id)));
                    }
                    next.check_set(&s).map_err(err)?;
                    next.sets.insert(s.id.clone(), s);
                }
                RequestType::Update => {
                    match next.sets.get(&s.id) {
                        None => return Err(err(format!("set {} does not exist", s.id))),
                        Some(old) if old.kind != s.kind => {
                            return Err(err(format!("set {} changes type", s.id)));
                        }
                        Some(_) => {}
                    }
                    next.check_set(&s).map_err(err)?;
                    next.sets.insert(s.id.clone(), s);
                }
                RequestType::Remove => {
                    if next.sets.remove(&s.id).is_none() {
                        return Err(err(format!("set {} does not exist", s.id)));
                    }
                    if let Some(user) = next.set_in_use(&s.id) {
                        return Err(err(format!("set {} is in use by {user}", s.id)));
                    }
                }
            }
        }
        next.modify_calls += 1;
        *self = next;
        Ok(())
    }

    fn endpoint_ids(&mut self) -> Result<Vec<String>, HcnError> {
        Ok(self.endpoints.keys().cloned().collect())
    }

    fn query_endpoint(&mut self, id: &str) -> Result<String, HcnError> {
        let e = self
            .endpoints
            .get(id)
            .ok_or_else(|| HcnError::new("HcnOpenEndpoint", format!("no endpoint {id}")))?;
        let configs: Vec<Value> = e
            .ips
            .iter()
            .map(|ip| json!({"IpAddress": ip.to_string(), "PrefixLength": if ip.is_ipv4() { 16 } else { 64 }}))
            .collect();
        Ok(json!({
            "ID": id,
            "IpConfigurations": configs,
            "Policies": e.policies,
        })
        .to_string())
    }

    fn modify_endpoint(&mut self, id: &str, json: &str) -> Result<(), HcnError> {
        const CALL: &str = "HcnModifyEndpoint";
        let r = request(CALL, json)?;
        if !self.endpoints.contains_key(id) {
            return Err(HcnError::new("HcnOpenEndpoint", format!("no endpoint {id}")));
        }
        if r.request_type != RequestType::Update {
            return Err(HcnError::new(CALL, "the model takes Update (the whole list) only"));
        }
        for p in r.settings.policies.iter().filter(|p| policy_type(p) == "ACL") {
            self.check_acl(&p["Settings"]).map_err(|m| HcnError::new(CALL, m))?;
        }
        if let Some(e) = self.endpoints.get_mut(id) {
            e.policies = r.settings.policies;
        }
        self.modify_calls += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(id: &str, kind: &str, values: &str) -> Value {
        json!({"Type": "SetPolicy", "Settings": {"Id": id, "Name": id, "Type": kind, "Values": values}})
    }

    fn change(t: RequestType, policies: Vec<Value>) -> String {
        ModifyRequest::policies(t, policies).to_json()
    }

    #[test]
    fn refuses_what_hns_refuses() {
        let mut h = HostHcn::new();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let ep = h.add_endpoint(ip);
        let nested = set("azure-npm-2", "NESTEDIPSET", "azure-npm-1");
        assert!(
            h.modify_network(&change(RequestType::Add, vec![nested.clone()])).is_err(),
            "names an absent set"
        );
        let ips = set("azure-npm-1", "IPSET", "10.0.0.7,10.1.0.0/16");
        h.modify_network(&change(RequestType::Add, vec![ips.clone(), nested])).unwrap();
        assert!(h.modify_network(&change(RequestType::Add, vec![ips])).is_err(), "added twice");
        let acl = |sets: &str| {
            json!({"Type": "ACL", "Settings": {"Id": "azure-acl-a", "Action": "Allow", "Direction": "In",
                   "Priority": 222, "LocalAddresses": sets, "LocalPorts": "80", "Protocols": "6", "RuleType": "Switch"}})
        };
        let block = json!({"Type": "ACL", "Settings": {"Id": "azure-acl-a", "Action": "Block", "Direction": "In", "Priority": 3000}});
        assert!(
            h.modify_endpoint(&ep, &change(RequestType::Update, vec![acl("azure-npm-9")])).is_err()
        );
        h.modify_endpoint(&ep, &change(RequestType::Update, vec![acl("azure-npm-2"), block]))
            .unwrap();
        let remove = |id: &str| change(RequestType::Remove, vec![set(id, "IPSET", "")]);
        assert!(h.modify_network(&remove("azure-npm-1")).is_err(), "a nested set names it");
        assert!(h.modify_network(&remove("azure-npm-2")).is_err(), "an ACL names it");
        // Evaluated as HNS does: the allow on 80 from the nested set's members, else the block.
        let peer = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(h.allows(ip, Direction::Ingress, peer("10.1.2.3"), Protocol::Tcp, 80));
        assert!(!h.allows(ip, Direction::Ingress, peer("10.1.2.3"), Protocol::Tcp, 81));
        assert!(!h.allows(ip, Direction::Ingress, peer("10.2.0.1"), Protocol::Tcp, 80));
        assert!(h.allows(ip, Direction::Egress, peer("10.2.0.1"), Protocol::Tcp, 80));
        // A failed request changes nothing.
        let before = h.set_policies();
        let bad = change(
            RequestType::Add,
            vec![set("azure-npm-3", "IPSET", "10.0.0.1"), set("azure-npm-4", "IPSET", "x")],
        );
        assert!(h.modify_network(&bad).is_err());
        assert_eq!(h.set_policies(), before);
    }

    #[test]
    fn a_dual_stack_endpoint_evaluates_each_family_by_its_addresses() {
        let mut h = HostHcn::new();
        let (v4, v6): (IpAddr, IpAddr) = ("10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap());
        let ep = h.add_endpoint_with(&[v4, v6]);
        assert!(h.has_endpoint(v4) && h.has_endpoint(v6));
        let doc: super::super::hcn::EndpointDoc =
            serde_json::from_str(&h.query_endpoint(&ep).unwrap()).unwrap();
        assert_eq!(doc.ips(), vec![v4, v6]);
        let sets = vec![
            set("azure-npm-1", "IPSET", "10.0.0.7,fd00::7"),
            set("azure-npm-2", "IPSET", "0.0.0.0/1,128.0.0.0/1"),
            set("azure-npm-3", "IPSET", "fd00::/120"),
        ];
        h.modify_network(&change(RequestType::Add, sets)).unwrap();
        let acl = |sets: &str, priority: u16| {
            json!({"Type": "ACL", "Settings": {"Id": "azure-acl-a", "Action": "Allow", "Direction": "In",
                   "Priority": priority, "LocalAddresses": sets, "RuleType": "Switch"}})
        };
        let block = json!({"Type": "ACL", "Settings": {"Id": "azure-acl-a", "Action": "Block", "Direction": "In", "Priority": 3000}});
        let acls = vec![acl("azure-npm-1", 222), acl("azure-npm-2", 223), block];
        h.modify_endpoint(&ep, &change(RequestType::Update, acls)).unwrap();
        let peer = |s: &str| s.parse::<IpAddr>().unwrap();
        let allows = |p: &str| h.allows(v6, Direction::Ingress, peer(p), Protocol::Tcp, 80);
        assert!(allows("fd00::7"), "a set holds both families");
        assert!(allows("10.0.0.7"));
        assert!(allows("8.8.8.8"), "every IPv4 address");
        assert!(!allows("fd00::8"), "which is no IPv6 address");
        assert!(!allows("::ffff:8.8.8.8"));
        assert!(!allows("2001:db8::1"));
        let bad = set("azure-npm-4", "IPSET", "fd00::/129");
        assert!(h.modify_network(&change(RequestType::Add, vec![bad])).is_err());
    }
}
