//! The HNS dataplane: keeps the plan, translates it ([`super::translate`]) and brings HCN to
//! the translation through an [`Hcn`], changing only what differs from what it wrote before:
//!
//! 1. SetPolicies added (IPSETs, then the NESTEDIPSETs naming them) and updated (each set's
//!    values replaced at once), in one `HcnModifyNetwork` per kind and request type;
//! 2. each endpoint whose ACLs differ: one `HcnModifyEndpoint` `Update` with the endpoint's
//!    own policies that are not the dataplane's (its NAT and the like, read back first) and
//!    the new ACLs, so the endpoint's ACL list is replaced at once;
//! 3. SetPolicies nothing names any longer removed (NESTEDIPSETs, then IPSETs).
//!
//! Sets exist before the ACLs naming them and outlive them. Endpoints are found by address
//! (`HcnEnumerateEndpoints`, cached, checked at each sync): the translation's entry of a pod
//! goes to the HNS endpoint holding its addresses (a dual-stack pod's one endpoint holds
//! both families' addresses and receives one list with the ACLs of both); what the dataplane
//! wrote is kept by endpoint ID. A pod whose endpoint the CNI has not created yet is written
//! on a later tick, and its ACLs are never needed before: it has no traffic.
//! [`HnsDataplane::reconcile`] reads what HCN holds of the dataplane's (SetPolicies named
//! `azure-npm-…`, ACLs whose `Id` starts with `azure-acl-`, as Azure NPM's), so a restart or
//! a former Azure NPM's leftovers are taken over, and what the plan does not hold removed.
//!
//! Each apply translates the whole plan (a Windows node's pods and the sets they name): the
//! requests are what changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::Value;

use super::hcn::{
    EndpointDoc, Hcn, HcnError, ModifyRequest, NetworkDoc, RequestType, parse, policy_id,
    policy_type,
};
use super::translate::{ACL_ID_PREFIX, HnsPolicies, Unsupported, translate};
use crate::dataplane::azure::SET_PREFIX;
use crate::dataplane::{Applied, Dataplane, DataplaneError};
use crate::plan::{Plan, PlanDiff};

/// Whether a network policy is one of the dataplane's SetPolicies.
fn is_our_set(p: &Value) -> bool {
    policy_type(p) == "SetPolicy" && policy_id(p).starts_with(SET_PREFIX)
}

/// Whether an endpoint policy is one of the dataplane's ACLs.
fn is_our_acl(p: &Value) -> bool {
    policy_type(p) == "ACL" && policy_id(p).starts_with(ACL_ID_PREFIX)
}

/// A Block of everything, both directions, under the dataplane's ACL `Id`.
fn block_everything() -> Vec<Value> {
    ["In", "Out"]
        .iter()
        .map(|d| {
            serde_json::json!({"Type": "ACL", "Settings": {"Id": format!("{ACL_ID_PREFIX}-conflict"),
                "Action": "Block", "Direction": d, "RuleType": "Switch", "Priority": 3000}})
        })
        .collect()
}

fn set_kind(p: &Value) -> &str {
    p["Settings"]["Type"].as_str().unwrap_or_default()
}

/// The HNS dataplane over an [`Hcn`] (see the module documentation).
pub struct HnsDataplane<H> {
    hcn: H,
    plan: Plan,
    /// The dataplane's SetPolicies in HCN, by `Id`.
    sets: BTreeMap<String, Value>,
    /// The dataplane's ACLs on each HNS endpoint, by the endpoint's ID.
    acls: BTreeMap<String, Vec<Value>>,
    /// Endpoint IDs by address, as HCN last listed them.
    endpoints: BTreeMap<IpAddr, String>,
    /// The endpoint IDs HCN last listed.
    listed: BTreeSet<String>,
    /// Addresses of the plan's endpoints whose ACLs HCN has no endpoint for yet.
    missing: BTreeSet<IpAddr>,
    /// What the last translation could not express (logged when it changes).
    unsupported: Vec<Unsupported>,
}

fn apply_error(operation: &str, e: HcnError) -> DataplaneError {
    DataplaneError::Apply { dataplane: "hns", operation: operation.into(), message: e.to_string() }
}

impl<H: Hcn> HnsDataplane<H> {
    /// A dataplane over `hcn` that has written nothing yet (call [`Dataplane::reconcile`]
    /// first: it reads what HCN holds).
    pub fn new(hcn: H) -> Self {
        Self {
            hcn,
            plan: Plan::default(),
            sets: BTreeMap::new(),
            acls: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            listed: BTreeSet::new(),
            missing: BTreeSet::new(),
            unsupported: Vec::new(),
        }
    }

    pub fn hcn(&self) -> &H {
        &self.hcn
    }

    pub fn hcn_mut(&mut self) -> &mut H {
        &mut self.hcn
    }

    /// What HCN receives for the current plan.
    pub fn requests(&self) -> HnsPolicies {
        translate(&self.plan)
    }

    /// Endpoints of the plan that HCN has no endpoint for (yet).
    pub fn missing_endpoints(&self) -> &BTreeSet<IpAddr> {
        &self.missing
    }

    /// Lists HCN's endpoints anew; returns their documents.
    fn list_endpoints(&mut self) -> Result<Vec<EndpointDoc>, HcnError> {
        let mut docs = Vec::new();
        self.endpoints.clear();
        self.listed.clear();
        for id in self.hcn.endpoint_ids()? {
            // An endpoint deleted between the listing and the query is skipped.
            let Ok(json) = self.hcn.query_endpoint(&id) else { continue };
            let doc: EndpointDoc = parse("HcnQueryEndpointProperties", &json)?;
            self.listed.insert(doc.id.clone());
            for ip in doc.ips() {
                self.endpoints.insert(ip, doc.id.clone());
            }
            docs.push(doc);
        }
        Ok(docs)
    }

    fn modify_sets(&mut self, t: RequestType, sets: Vec<Value>) -> Result<(), DataplaneError> {
        if sets.is_empty() {
            return Ok(());
        }
        let request = ModifyRequest::policies(t, sets.clone()).to_json();
        self.hcn.modify_network(&request).map_err(|e| apply_error("SetPolicies", e))?;
        for s in sets {
            let id = policy_id(&s).to_string();
            if t == RequestType::Remove {
                self.sets.remove(&id);
            } else {
                self.sets.insert(id, s);
            }
        }
        Ok(())
    }

    /// Writes an endpoint's ACLs (the whole list, its other policies kept). `Ok(false)`:
    /// HCN has no endpoint with this ID (any longer).
    fn write_acls(&mut self, id: &str, acls: &[Value]) -> Result<bool, DataplaneError> {
        let Ok(json) = self.hcn.query_endpoint(id) else { return Ok(false) };
        let doc: EndpointDoc = parse("HcnQueryEndpointProperties", &json)
            .map_err(|e| apply_error("reading an endpoint", e))?;
        let mut policies: Vec<Value> =
            doc.policies.into_iter().filter(|p| !is_our_acl(p)).collect();
        policies.extend(acls.iter().cloned());
        let request = ModifyRequest::policies(RequestType::Update, policies).to_json();
        let ips: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(_, e)| e.as_str() == id)
            .map(|(ip, _)| ip.to_string())
            .collect();
        self.hcn.modify_endpoint(id, &request).map_err(|e| {
            apply_error(&format!("the ACLs of endpoint {id} ({})", ips.join(", ")), e)
        })?;
        Ok(true)
    }

    /// The HNS endpoints holding one of these addresses, as last listed.
    fn endpoints_of(&self, ips: &[IpAddr]) -> BTreeSet<String> {
        ips.iter().filter_map(|ip| self.endpoints.get(ip)).cloned().collect()
    }

    /// Brings HCN to the plan's translation (see the module documentation).
    fn sync(&mut self) -> Result<Applied, DataplaneError> {
        let want = translate(&self.plan);
        if want.unsupported != self.unsupported {
            for u in want.unsupported.iter().filter(|u| !self.unsupported.contains(u)) {
                tracing::warn!(endpoint = %u.endpoint, direction = %u.direction, entry = %u.entry, reason = %u.reason, "HNS cannot express this; left out (the endpoint admits less)");
            }
            self.unsupported = want.unsupported.clone();
        }
        let want_sets: BTreeMap<String, Value> = want
            .network
            .policies
            .iter()
            .map(|p| {
                let v = serde_json::to_value(p).expect("a SetPolicy serializes");
                (p.settings.id.clone(), v)
            })
            .collect();
        let mut applied = Applied::default();

        // 1. Sets added and updated: IPSETs before the NESTEDIPSETs naming them.
        for kind in ["IPSET", "NESTEDIPSET"] {
            let (mut add, mut update) = (Vec::new(), Vec::new());
            for (id, s) in want_sets.iter().filter(|(_, s)| set_kind(s) == kind) {
                match self.sets.get(id) {
                    None => add.push(s.clone()),
                    Some(old) if old != s => update.push(s.clone()),
                    Some(_) => {}
                }
            }
            applied.sets_added |= !add.is_empty() || !update.is_empty();
            self.modify_sets(RequestType::Add, add)?;
            self.modify_sets(RequestType::Update, update)?;
        }

        // 2. Endpoints whose ACLs differ. Which HNS endpoints exist is checked first, and
        // they are listed anew when that changed (an endpoint ID is never reused: an
        // address moves to another endpoint only with endpoints made or removed).
        let live: BTreeSet<String> = self
            .hcn
            .endpoint_ids()
            .map_err(|e| apply_error("listing endpoints", e))?
            .into_iter()
            .collect();
        self.acls.retain(|id, _| live.contains(id));
        if live != self.listed {
            self.list_endpoints().map_err(|e| apply_error("listing endpoints", e))?;
        }
        let mut desired: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut missing = BTreeSet::new();
        for e in &want.endpoints {
            let ids = self.endpoints_of(&e.ips);
            if ids.is_empty() {
                missing.extend(e.ips.iter().copied());
                continue;
            }
            let acls: Vec<Value> = e
                .request
                .policies
                .iter()
                .map(|p| serde_json::to_value(p).expect("an ACL serializes"))
                .collect();
            for id in ids {
                let held = desired.entry(id.clone()).or_insert_with(|| acls.clone());
                if *held != acls {
                    // Entries of different addresses on one HNS endpoint (the translation
                    // groups a pod's addresses, and those pods claim together): refuse
                    // everything there rather than pick one.
                    tracing::warn!(endpoint = %id, "HNS endpoint holding addresses of different entries; blocking its traffic");
                    *held = block_everything();
                }
            }
        }
        let ids: BTreeSet<String> = desired.keys().chain(self.acls.keys()).cloned().collect();
        for id in ids {
            let wanted = desired.get(&id).map(Vec::as_slice).unwrap_or_default();
            let had = self.acls.get(&id).map(Vec::as_slice).unwrap_or_default();
            if wanted == had {
                continue;
            }
            if self.write_acls(&id, wanted)? {
                applied.rules_added |= !wanted.is_empty();
                if wanted.is_empty() {
                    self.acls.remove(&id);
                } else {
                    self.acls.insert(id, wanted.to_vec());
                }
            } else {
                // Gone since the listing: its entries wait for their endpoint (a tick lists).
                self.acls.remove(&id);
                let ips: Vec<IpAddr> =
                    self.endpoints.iter().filter(|(_, e)| **e == id).map(|(ip, _)| *ip).collect();
                for ip in &ips {
                    self.endpoints.remove(ip);
                }
                for e in want.endpoints.iter().filter(|e| e.ips.iter().any(|ip| ips.contains(ip))) {
                    missing.extend(e.ips.iter().copied());
                }
            }
        }
        self.missing = missing;

        // 3. Sets nothing names any longer: NESTEDIPSETs before the IPSETs they name.
        for kind in ["NESTEDIPSET", "IPSET"] {
            let stale: Vec<Value> = self
                .sets
                .iter()
                .filter(|(id, s)| set_kind(s) == kind && !want_sets.contains_key(*id))
                .map(|(_, s)| s.clone())
                .collect();
            self.modify_sets(RequestType::Remove, stale)?;
        }
        Ok(applied)
    }
}

impl<H: Hcn> Dataplane for HnsDataplane<H> {
    fn name(&self) -> &'static str {
        "hns"
    }

    /// ClusterNetworkPolicy's tiers become ACL priorities (`super::tiers`).
    fn renders_tiers(&self) -> bool {
        true
    }

    /// IPv6 endpoints, peers and blocks are written as IPv4's are (`super::translate`).
    fn enforces_ipv6(&self) -> bool {
        true
    }

    fn apply(&mut self, diff: &PlanDiff) -> Result<Applied, DataplaneError> {
        self.plan.apply(diff).map_err(|message| DataplaneError::Apply {
            dataplane: "hns",
            operation: "apply".into(),
            message,
        })?;
        self.sync()
    }

    fn reconcile(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        let network: NetworkDoc = self
            .hcn
            .query_network()
            .and_then(|json| parse("HcnQueryNetworkProperties", &json))
            .map_err(|e| apply_error("reading the network", e))?;
        self.sets = network
            .policies
            .into_iter()
            .filter(is_our_set)
            .map(|p| (policy_id(&p).to_string(), p))
            .collect();
        let docs = self.list_endpoints().map_err(|e| apply_error("listing endpoints", e))?;
        self.acls.clear();
        for doc in docs {
            let ours: Vec<Value> = doc.policies.iter().filter(|p| is_our_acl(p)).cloned().collect();
            if !ours.is_empty() {
                self.acls.insert(doc.id, ours);
            }
        }
        self.missing.clear();
        self.plan = plan.clone();
        self.sync().map(|_| ())
    }

    /// Writes the ACLs of endpoints that HCN did not have yet.
    fn tick(&mut self) -> Result<(), DataplaneError> {
        if self.missing.is_empty() {
            return Ok(());
        }
        self.list_endpoints().map_err(|e| apply_error("listing endpoints", e))?;
        if self.missing.iter().any(|ip| self.endpoints.contains_key(ip)) {
            self.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::hns::host::HostHcn;

    #[test]
    fn a_missing_endpoint_is_written_once_it_appears_and_others_policies_are_kept() {
        use crate::model::{Direction, ObjectKey};
        use crate::plan::{EndpointPlan, Profile};
        let ip: IpAddr = "10.240.0.9".parse().unwrap();
        let mut plan = Plan::default();
        let mut ep = EndpointPlan::new(ObjectKey::new("x", "a"));
        ep.profiles = [Some(1), None];
        assert!(ep.isolated(Direction::Ingress));
        plan.endpoints.insert(ip, ep);
        plan.profiles.insert(
            1,
            Profile { direction: Direction::Ingress, isolating: true, allow: Default::default() },
        );
        let mut dp = HnsDataplane::new(HostHcn::new());
        dp.reconcile(&plan).unwrap();
        assert!(dp.missing_endpoints().contains(&ip), "no endpoint yet");
        dp.hcn_mut().add_endpoint(ip);
        dp.tick().unwrap();
        assert!(dp.missing_endpoints().is_empty());
        let policies = dp.hcn().endpoint_policies(ip);
        assert_eq!(policy_type(&policies[0]), "OutBoundNAT", "{policies:?}");
        assert!(policies.iter().any(is_our_acl), "{policies:?}");
        let peer = "10.240.0.1".parse().unwrap();
        let d = Direction::Ingress;
        assert!(!dp.hcn().allows(ip, d, peer, crate::model::Protocol::Tcp, 80), "isolated");
        // Another agent starting over the same HCN takes the ACLs over and removes them
        // when its plan has none.
        let hcn = dp.hcn().clone();
        let mut next = HnsDataplane::new(hcn);
        next.reconcile(&Plan::default()).unwrap();
        assert!(next.hcn().allows(ip, d, peer, crate::model::Protocol::Tcp, 80));
        assert_eq!(next.hcn().endpoint_policies(ip).len(), 1, "the NAT policy stays");
    }

    /// Addresses with different entries on one HNS endpoint (which the translation does not
    /// expect: it groups a pod's addresses): the endpoint refuses everything.
    #[test]
    fn one_endpoint_holding_addresses_of_different_entries_refuses_everything() {
        use crate::model::{Direction, ObjectKey, Protocol};
        use crate::plan::{EndpointPlan, Profile};
        let (a, b): (IpAddr, IpAddr) = ("10.240.0.9".parse().unwrap(), "fd00::9".parse().unwrap());
        let mut plan = Plan::default();
        let mut isolated = EndpointPlan::new(ObjectKey::new("x", "a"));
        isolated.profiles = [Some(1), None];
        plan.endpoints.insert(a, isolated);
        let mut open = EndpointPlan::new(ObjectKey::new("x", "b"));
        open.profiles = [None, Some(2)];
        plan.endpoints.insert(b, open);
        for (id, direction) in [(1, Direction::Ingress), (2, Direction::Egress)] {
            plan.profiles
                .insert(id, Profile { direction, isolating: true, allow: Default::default() });
        }
        let mut hcn = HostHcn::new();
        hcn.add_endpoint_with(&[a, b]);
        let mut dp = HnsDataplane::new(hcn);
        dp.reconcile(&plan).unwrap();
        let peer: IpAddr = "fd00::1".parse().unwrap();
        for d in Direction::BOTH {
            assert!(!dp.hcn().allows(b, d, peer, Protocol::Tcp, 80), "{d:?}");
        }
        assert_eq!(dp.hcn().endpoint_policies(a).iter().filter(|p| is_our_acl(p)).count(), 2);
    }
}
