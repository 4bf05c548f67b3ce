//! The Windows HNS translation: for every scenario (a conformance case per feature, see
//! `golden/scenarios.rs`), the JSON HNS would receive after each step is compared with
//! `tests/golden/hns/<scenario>.json` (`UPDATE_GOLDEN=1` rewrites them). Each step's diff is
//! also applied by the HNS dataplane to the HCN host model, which must then hold exactly that
//! translation, and whose ACLs are evaluated the way HNS evaluates them (by priority, first
//! match; no ACL: allowed) for every pair of addresses, ports and protocols: they must agree
//! with the plan except for the entries the translation reports it cannot express.

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::hns::{self, AclPolicySetting, HnsDataplane, HnsPolicies, HostHcn};
use npm_agent::model::{Direction, Protocol};
use npm_agent::plan::{Plan, PlanDiff};
use scenarios::*;
use serde_json::Value;

fn check_semantics(
    name: &str,
    step: &str,
    plan: &Plan,
    h: &HnsPolicies,
    hcn: &HostHcn,
) -> Result<(), String> {
    let mut peers: Vec<Ipv4Addr> = plan
        .identities
        .keys()
        .filter_map(|ip| if let IpAddr::V4(v) = ip { Some(*v) } else { None })
        .collect();
    peers.extend(
        ["10.224.0.4", "10.240.9.9", "192.168.1.1", "8.8.8.8"]
            .map(|s| s.parse::<Ipv4Addr>().unwrap()),
    );
    let unsupported: HashMap<(String, String), Vec<String>> =
        h.unsupported.iter().fold(HashMap::new(), |mut m, u| {
            m.entry((u.endpoint.clone(), u.direction.clone())).or_default().push(u.entry.clone());
            m
        });
    for (ip, ep) in &plan.endpoints {
        for d in Direction::BOTH {
            let dir = if d == Direction::Ingress { "In" } else { "Out" };
            let left_out = unsupported.get(&(format!("{ip} {}", ep.pod), dir.to_string()));
            for &peer in &peers {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80u16, 81, 1000, 5353, 60000] {
                        let want = plan.node_ips.contains(&IpAddr::V4(peer))
                            || plan.direction(ep, d).admits(
                                &plan.sets,
                                IpAddr::V4(peer),
                                plan.identities.get(&IpAddr::V4(peer)).copied(),
                                protocol,
                                port,
                            );
                        let got = hcn.allows(*ip, d, peer, protocol, port);
                        // A left-out entry may only make HNS refuse what the plan admits.
                        if got != want && !(want && !got && left_out.is_some()) {
                            return Err(format!(
                                "{name}, {step}: {} {dir} {peer} {protocol}/{port}: HNS {got}, plan {want}",
                                ep.pod
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Applies a step's diff through the dataplane over the model (endpoints of new pods made
/// first, as the CNI does, those of gone pods removed after), then checks that HCN holds
/// exactly the translation: its SetPolicies and each endpoint's ACLs.
fn apply_through_the_model(
    dp: &mut HnsDataplane<HostHcn>,
    diff: &PlanDiff,
    plan: &Plan,
    h: &HnsPolicies,
) -> Result<(), String> {
    for ip in plan.endpoints.keys().filter(|ip| ip.is_ipv4()) {
        if !dp.hcn().has_endpoint(*ip) {
            dp.hcn_mut().add_endpoint(*ip);
        }
    }
    dp.apply(diff).map_err(|e| format!("apply: {e}"))?;
    let gone: Vec<IpAddr> =
        h.endpoints.iter().map(|e| e.ip).filter(|ip| !plan.endpoints.contains_key(ip)).collect();
    for ip in gone {
        dp.hcn_mut().remove_endpoint(ip);
    }
    let mut want_sets: Vec<Value> = h.network.policies.iter().map(value).collect();
    want_sets.sort_by_key(|v| v["Settings"]["Id"].as_str().unwrap_or_default().to_string());
    if dp.hcn().set_policies() != want_sets {
        return Err(format!(
            "HCN holds the sets {:#?}\nnot {want_sets:#?}",
            dp.hcn().set_policies()
        ));
    }
    for e in &h.endpoints {
        let held: Vec<Value> =
            dp.hcn().endpoint_policies(e.ip).into_iter().filter(|p| p["Type"] == "ACL").collect();
        let want: Vec<Value> = e.request.policies.iter().map(value).collect();
        if held != want {
            return Err(format!("endpoint {} holds the ACLs {held:#?}\nnot {want:#?}", e.ip));
        }
    }
    Ok(())
}

fn value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serializes")
}

#[test]
fn hns_translation_matches_golden_files_and_the_plan() {
    #[derive(serde::Serialize)]
    struct Step {
        step: String,
        #[serde(rename = "ModifyNetworkSettings")]
        network: hns::PolicyRequest<hns::SetPolicySetting>,
        #[serde(rename = "ModifyEndpointSettings")]
        endpoints: BTreeMap<String, hns::PolicyRequest<AclPolicySetting>>,
        unsupported: Vec<hns::Unsupported>,
    }
    #[derive(serde::Serialize)]
    struct Golden {
        scenario: String,
        steps: Vec<Step>,
    }
    let mut failures = Vec::new();
    for (name, path) in scenarios().into_iter().chain(tier_scenarios()) {
        let mut steps = Vec::new();
        // The dataplane over the HCN host model, as the agent applies each step's diff.
        let mut dp = HnsDataplane::new(HostHcn::new());
        dp.reconcile(&Plan::default()).expect("an empty reconcile");
        for s in plans(&path) {
            let h = hns::translate(&s.plan);
            if let Err(e) = apply_through_the_model(&mut dp, &s.diff, &s.plan, &h) {
                failures.push(format!("{name}, {}: {e}", s.description));
                break;
            }
            if let Err(e) = check_semantics(&name, &s.description, &s.plan, &h, dp.hcn()) {
                failures.push(e);
            }
            steps.push(Step {
                step: s.description.clone(),
                network: h.network.clone(),
                endpoints: h
                    .endpoints
                    .iter()
                    .map(|e| (format!("{} {}", e.ip, e.pod), e.request.clone()))
                    .collect(),
                unsupported: h.unsupported.clone(),
            });
        }
        let json =
            serde_json::to_string_pretty(&Golden { scenario: name.clone(), steps }).unwrap() + "\n";
        if let Err(e) =
            check_golden(&manifest_dir().join(format!("tests/golden/hns/{name}.json")), &json)
        {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The features HNS cannot express are reported, each once per endpoint direction.
#[test]
fn inexpressible_features_are_reported() {
    let path = manifest_dir().join("tests/golden/scenarios/ipv6-and-wide-port-ranges.yaml");
    let last = plans(&path).pop().unwrap();
    let h = hns::translate(&last.plan);
    let reasons: Vec<&str> = h.unsupported.iter().map(|u| u.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("IPv6")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("port range")), "{reasons:?}");
    let sctp = manifest_dir().join("../tests/conformance/30-sctp-ingress.yaml");
    let h = hns::translate(&plans(&sctp).pop().unwrap().plan);
    assert!(h.unsupported.iter().any(|u| u.reason.contains("SCTP")), "{:?}", h.unsupported);
}
