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
use std::net::IpAddr;

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
    let mut peers: Vec<IpAddr> = plan.identities.keys().copied().collect();
    peers.extend(plan.node_ips.iter().copied());
    peers.extend(
        [
            "10.224.0.4",
            "10.240.9.9",
            "192.168.1.1",
            "8.8.8.8",
            "fd00::1",
            "fd00:10:224::4",
            "fd00:10:240::9:9",
            "fd00:10:240:1::1",
            "2001:db8::1",
            "::ffff:10.240.0.10",
        ]
        .map(|s| s.parse::<IpAddr>().unwrap()),
    );
    peers.sort();
    peers.dedup();
    let unsupported: HashMap<(String, String), Vec<String>> =
        h.unsupported.iter().fold(HashMap::new(), |mut m, u| {
            m.entry((u.endpoint.clone(), u.direction.clone())).or_default().push(u.entry.clone());
            m
        });
    for (ip, ep) in &plan.endpoints {
        for d in Direction::BOTH {
            let dir = if d == Direction::Ingress { "In" } else { "Out" };
            let left_out = unsupported.get(&(format!("{ip} {}", ep.pod), dir.to_string()));
            // (A connection is of one family.)
            for &peer in peers.iter().filter(|p| p.is_ipv4() == ip.is_ipv4()) {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [80u16, 81, 1000, 5353, 60000] {
                        let want = plan.node_ips.contains(&peer)
                            || plan.direction(ep, d).admits(
                                &plan.sets,
                                peer,
                                plan.identities.get(&peer).copied(),
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
/// first, as the CNI does: one per pod, with its addresses of both families; those of gone
/// pods removed after), then checks that HCN holds exactly the translation: its SetPolicies
/// and each endpoint's ACLs.
fn apply_through_the_model(
    dp: &mut HnsDataplane<HostHcn>,
    diff: &PlanDiff,
    before: &Plan,
    plan: &Plan,
    h: &HnsPolicies,
) -> Result<(), String> {
    let mut pods: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (ip, ep) in &plan.endpoints {
        pods.entry(ep.pod.to_string()).or_default().push(*ip);
    }
    for mut ips in pods.into_values() {
        ips.retain(|ip| !dp.hcn().has_endpoint(*ip));
        ips.sort();
        if !ips.is_empty() {
            dp.hcn_mut().add_endpoint_with(&ips);
        }
    }
    dp.apply(diff).map_err(|e| format!("apply: {e}"))?;
    for ip in before.endpoints.keys().filter(|ip| !plan.endpoints.contains_key(ip)) {
        dp.hcn_mut().remove_endpoint(*ip);
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
    for (name, path) in scenarios().into_iter().chain(tier_scenarios()).chain(hns_scenarios()) {
        let mut steps = Vec::new();
        // The dataplane over the HCN host model, as the agent applies each step's diff.
        let mut dp = HnsDataplane::new(HostHcn::new());
        dp.reconcile(&Plan::default()).expect("an empty reconcile");
        let mut before = Plan::default();
        for s in plans(&path) {
            let h = hns::translate(&s.plan);
            if let Err(e) = apply_through_the_model(&mut dp, &s.diff, &before, &s.plan, &h) {
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
                    .map(|e| {
                        let ips: Vec<String> = e.ips.iter().map(IpAddr::to_string).collect();
                        (format!("{} {}", ips.join(","), e.pod), e.request.clone())
                    })
                    .collect(),
                unsupported: h.unsupported.clone(),
            });
            before = s.plan;
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

/// The features HNS cannot express are reported, each once per endpoint direction; IPv6 is
/// not one of them.
#[test]
fn inexpressible_features_are_reported() {
    let path = manifest_dir().join("tests/golden/scenarios/ipv6-and-wide-port-ranges.yaml");
    let last = plans(&path).pop().unwrap();
    let h = hns::translate(&last.plan);
    let reasons: Vec<&str> = h.unsupported.iter().map(|u| u.reason.as_str()).collect();
    // (An IPv6 block is expressed now: a set of its prefix, matching IPv6 peers only.)
    assert!(!reasons.iter().any(|r| r.contains("IPv6")), "{reasons:?}");
    assert!(h.network.policies.iter().any(|s| s.settings.values == "fd00::/8"));
    assert!(reasons.iter().any(|r| r.contains("port range")), "{reasons:?}");
    let sctp = manifest_dir().join("../tests/conformance/30-sctp-ingress.yaml");
    let h = hns::translate(&plans(&sctp).pop().unwrap().plan);
    assert!(h.unsupported.iter().any(|u| u.reason.contains("SCTP")), "{:?}", h.unsupported);
}
