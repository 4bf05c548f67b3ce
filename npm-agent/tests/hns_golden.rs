//! The Windows HNS translation: for every scenario (a conformance case per feature, see
//! `golden/scenarios.rs`), the JSON HNS would receive after each step is compared with
//! `tests/golden/hns/<scenario>.json` (`UPDATE_GOLDEN=1` rewrites them), and the ACLs are
//! evaluated the way HNS evaluates them (by priority, first match; no ACL: allowed) for every
//! pair of addresses, ports and protocols, which must agree with the plan except for the
//! entries the translation reports it cannot express.

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use npm_agent::dataplane::hns::{self, AclPolicySetting, HnsPolicies};
use npm_agent::model::{Direction, Protocol};
use npm_agent::plan::Plan;
use scenarios::*;

/// The addresses a set holds (nested sets resolved).
fn set_nets(h: &HnsPolicies, id: &str) -> Vec<Ipv4Net> {
    let Some(s) = h.network.policies.iter().map(|p| &p.settings).find(|s| s.id == id) else {
        panic!("ACL names unknown set {id}")
    };
    let values = s.values.split(',').filter(|v| !v.is_empty());
    match s.kind.as_str() {
        "IPSET" => values
            .map(|v| {
                v.parse::<Ipv4Net>()
                    .or_else(|_| v.parse::<Ipv4Addr>().map(Ipv4Net::from))
                    .expect("address")
            })
            .collect(),
        "NESTEDIPSET" => values.flat_map(|m| set_nets(h, m)).collect(),
        k => panic!("unknown set type {k}"),
    }
}

fn addresses_match(h: &HnsPolicies, list: &str, peer: Ipv4Addr, sets: bool) -> bool {
    if list.is_empty() {
        return true;
    }
    list.split(',').any(|item| {
        if sets {
            set_nets(h, item).iter().any(|n| n.contains(&peer))
        } else {
            item.parse::<Ipv4Net>()
                .or_else(|_| item.parse::<Ipv4Addr>().map(Ipv4Net::from))
                .expect("address")
                .contains(&peer)
        }
    })
}

fn acl_matches(
    h: &HnsPolicies,
    a: &AclPolicySetting,
    peer: Ipv4Addr,
    protocol: Protocol,
    port: u16,
) -> bool {
    if !a.protocols.is_empty() && a.protocols != protocol.number().to_string() {
        return false;
    }
    let ports = if a.direction == "In" { &a.local_ports } else { &a.remote_ports };
    if !ports.is_empty() && !ports.split(',').any(|p| p == port.to_string()) {
        return false;
    }
    // Azure NPM's mapping: set peers in LocalAddresses for In and RemoteAddresses for Out;
    // direct addresses in RemoteAddresses.
    let remote_sets = a.remote_addresses.starts_with("azure-npm-");
    addresses_match(h, &a.local_addresses, peer, true)
        && addresses_match(h, &a.remote_addresses, peer, remote_sets)
}

/// HNS's verdict for one endpoint direction: the first matching ACL by priority; no ACL
/// allows.
fn hns_allows(
    h: &HnsPolicies,
    ep: IpAddr,
    d: Direction,
    peer: Ipv4Addr,
    protocol: Protocol,
    port: u16,
) -> bool {
    let Some(e) = h.endpoints.iter().find(|e| e.ip == ep) else { return true };
    let dir = if d == Direction::Ingress { "In" } else { "Out" };
    let mut acls: Vec<&AclPolicySetting> =
        e.request.policies.iter().map(|p| &p.settings).filter(|a| a.direction == dir).collect();
    acls.sort_by_key(|a| a.priority);
    match acls.iter().find(|a| acl_matches(h, a, peer, protocol, port)) {
        Some(a) => a.action == "Allow",
        None => true,
    }
}

fn check_semantics(name: &str, step: &str, plan: &Plan, h: &HnsPolicies) -> Result<(), String> {
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
                        let got = hns_allows(h, *ip, d, peer, protocol, port);
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
    for (name, path) in scenarios() {
        let mut steps = Vec::new();
        for s in plans(&path) {
            let h = hns::translate(&s.plan);
            if let Err(e) = check_semantics(&name, &s.description, &s.plan, &h) {
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
