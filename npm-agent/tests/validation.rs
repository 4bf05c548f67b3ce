//! Validation: every kind of bad policy is rejected with an error naming the object and the
//! field; good ones come out with the API server's defaults applied.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use npm_agent::model::validate::network_policy;
use npm_agent::model::{Direction, Peer, PortSpec, Protocol};

fn parse(spec: &str) -> NetworkPolicy {
    let doc = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: np\n  namespace: ns1\nspec:\n{}",
        indent(spec)
    );
    serde_yaml_ng::from_str(&doc)
        .unwrap_or_else(|e| panic!("test policy does not parse: {e}\n{doc}"))
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// Asserts that the policy is rejected with an error on `field` whose message contains `words`.
fn rejects(spec: &str, field: &str, words: &str) {
    let err = network_policy(&parse(spec)).expect_err("policy should be rejected");
    assert_eq!(err.object, "ns1/np");
    assert_eq!(err.kind, "NetworkPolicy");
    assert!(
        err.errors.iter().any(|e| e.field == field && e.message.contains(words)),
        "expected an error on {field} containing {words:?}, got: {err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("ns1/np") && text.contains(field),
        "message names object and field: {text}"
    );
}

#[test]
fn malformed_cidr() {
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/33",
        "spec.ingress[0].from[0].ipBlock.cidr",
        "invalid CIDR",
    );
    rejects(
        "podSelector: {}\negress:\n- to:\n  - ipBlock:\n      cidr: banana",
        "spec.egress[0].to[0].ipBlock.cidr",
        "invalid CIDR",
    );
    rejects(
        "podSelector: {}\negress:\n- to:\n  - ipBlock:\n      cidr: 10.0.0.1",
        "spec.egress[0].to[0].ipBlock.cidr",
        "invalid CIDR",
    );
}

#[test]
fn except_outside_or_equal_to_cidr() {
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/24\n      except: [10.0.1.0/28]",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/24\n      except: [10.0.0.0/24]",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "strict subset",
    );
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/24\n      except: [10.0.0.0/99]",
        "spec.ingress[0].from[0].ipBlock.except[0]",
        "invalid CIDR",
    );
}

#[test]
fn end_port_rules() {
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - endPort: 90",
        "spec.ingress[0].ports[0].endPort",
        "not specified",
    );
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - port: http\n    endPort: 90",
        "spec.ingress[0].ports[0].endPort",
        "named port",
    );
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - port: 100\n    endPort: 90",
        "spec.ingress[0].ports[0].endPort",
        "greater than or equal",
    );
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - port: 0",
        "spec.ingress[0].ports[0].port",
        "between 1 and 65535",
    );
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - port: 80\n    endPort: 70000",
        "spec.ingress[0].ports[0].endPort",
        "between 1 and 65535",
    );
    rejects(
        "podSelector: {}\ningress:\n- ports:\n  - port: Not_A_Name",
        "spec.ingress[0].ports[0].port",
        "invalid port name",
    );
}

#[test]
fn unknown_protocol() {
    rejects(
        "podSelector: {}\negress:\n- ports:\n  - port: 80\n    protocol: ICMP",
        "spec.egress[0].ports[0].protocol",
        "unsupported value",
    );
    rejects(
        "podSelector: {}\negress:\n- ports:\n  - port: 80\n    protocol: tcp",
        "spec.egress[0].ports[0].protocol",
        "unsupported value",
    );
}

#[test]
fn bad_selectors() {
    rejects(
        "podSelector:\n  matchExpressions:\n  - key: app\n    operator: Equals\n    values: [a]",
        "spec.podSelector.matchExpressions[0].operator",
        "not a valid selector operator",
    );
    rejects(
        "podSelector:\n  matchExpressions:\n  - key: app\n    operator: In",
        "spec.podSelector.matchExpressions[0].values",
        "must be specified",
    );
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - namespaceSelector:\n      matchExpressions:\n      - key: env\n        operator: Exists\n        values: [prod]",
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "may not be specified",
    );
    rejects(
        "podSelector:\n  matchLabels:\n    'bad key!': x",
        "spec.podSelector.matchLabels",
        "invalid label key",
    );
    rejects(
        "podSelector:\n  matchLabels:\n    app: '-bad-'",
        "spec.podSelector.matchLabels",
        "invalid label value",
    );
}

#[test]
fn bad_peers_and_types() {
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.0.0.0/8\n    podSelector: {}",
        "spec.ingress[0].from[0]",
        "may not specify both",
    );
    rejects(
        "podSelector: {}\ningress:\n- from:\n  - {}",
        "spec.ingress[0].from[0]",
        "must specify a peer",
    );
    rejects(
        "podSelector: {}\npolicyTypes: [Ingress, Sideways]",
        "spec.policyTypes[1]",
        "unsupported value",
    );
}

#[test]
fn more_than_two_policy_types() {
    // Accepted before as Ingress and Egress; the API server allows at most two entries.
    rejects(
        "podSelector: {}\npolicyTypes: [Ingress, Ingress, Egress]",
        "spec.policyTypes",
        "may not specify more than two policyTypes",
    );
    rejects(
        "podSelector: {}\npolicyTypes: [Egress, Egress, Egress]",
        "spec.policyTypes",
        "may not specify more than two policyTypes",
    );
    // Two entries naming one type twice: the API server accepts it, and so does the agent
    // (refusing a policy the cluster holds would leave its pods unprotected).
    let p = network_policy(&parse("podSelector: {}\npolicyTypes: [Ingress, Ingress]")).unwrap();
    assert!(p.rules(Direction::Ingress).is_some() && p.rules(Direction::Egress).is_none());
}

#[test]
fn every_error_is_reported_at_once() {
    let err = network_policy(&parse(
        "podSelector: {}\ningress:\n- ports:\n  - protocol: FOO\n  - port: 0\negress:\n- to:\n  - ipBlock:\n      cidr: x",
    ))
    .unwrap_err();
    assert_eq!(err.errors.len(), 3, "{err}");
}

#[test]
fn defaults_follow_the_api_server() {
    // No policyTypes, no egress: Ingress only.
    let p = network_policy(&parse("podSelector: {}")).unwrap();
    assert!(p.rules(Direction::Ingress).is_some_and(|r| r.is_empty()));
    assert!(p.rules(Direction::Egress).is_none());
    // No policyTypes, `egress: []`: still Ingress only (egress has no rules).
    let p = network_policy(&parse("podSelector: {}\negress: []")).unwrap();
    assert!(p.rules(Direction::Egress).is_none());
    // No policyTypes, egress rules: both.
    let p = network_policy(&parse("podSelector: {}\negress:\n- {}")).unwrap();
    assert!(p.rules(Direction::Ingress).is_some() && p.rules(Direction::Egress).is_some());
    // Egress only.
    let p =
        network_policy(&parse("podSelector: {}\npolicyTypes: [Egress]\ningress:\n- {}")).unwrap();
    assert!(p.rules(Direction::Ingress).is_none());
    assert!(p.rules(Direction::Egress).is_some_and(|r| r.is_empty()));
    // Port defaults: TCP; a cidr with host bits set means its network.
    let p = network_policy(&parse(
        "podSelector: {}\ningress:\n- from:\n  - ipBlock:\n      cidr: 10.240.1.11/24\n  ports:\n  - port: 80\n  - protocol: UDP\n  - port: http",
    ))
    .unwrap();
    let rule = &p.rules(Direction::Ingress).unwrap()[0];
    match &rule.peers[0] {
        Peer::Block(b) => assert_eq!(b.net.to_string(), "10.240.1.0/24"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rule.ports,
        vec![
            PortSpec::Range { protocol: Protocol::Tcp, first: 80, last: 80 },
            PortSpec::Protocol(Protocol::Udp),
            PortSpec::Named { protocol: Protocol::Tcp, name: "http".into() },
        ]
    );
}

#[test]
fn missing_metadata_is_reported() {
    let np: NetworkPolicy = serde_yaml_ng::from_str(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {}\nspec: {}",
    )
    .unwrap();
    let err = network_policy(&np).unwrap_err();
    assert!(err.errors.iter().any(|e| e.field == "metadata.name"));
    assert!(err.errors.iter().any(|e| e.field == "metadata.namespace"));
}

mod common;

mod roundtrip {
    use super::common;
    use npm_agent::model::convert::{pod_to_k8s, policy_to_k8s};
    use npm_agent::model::{Policy, convert, validate};
    use proptest::prelude::*;

    /// Validation removes repeated peers and ports within a rule.
    fn normalized(mut p: Policy) -> Policy {
        for rules in [p.ingress.as_mut(), p.egress.as_mut()].into_iter().flatten() {
            for r in rules {
                let mut peers = Vec::new();
                for x in r.peers.drain(..) {
                    if !peers.contains(&x) {
                        peers.push(x);
                    }
                }
                r.peers = peers;
                let mut ports = Vec::new();
                for x in r.ports.drain(..) {
                    if !ports.contains(&x) {
                        ports.push(x);
                    }
                }
                r.ports = ports;
            }
        }
        p
    }

    proptest! {
        #[test]
        fn policies_survive_the_api_form(p in common::policy()) {
            // A policy of no direction has no API form (empty policyTypes means the default).
            prop_assume!(p.ingress.is_some() || p.egress.is_some());
            let back = validate::network_policy(&policy_to_k8s(&p)).expect("the API form of a valid policy is valid");
            prop_assert_eq!(back, normalized(p));
        }

        #[test]
        fn pods_survive_the_api_form(p in common::pod_key().prop_flat_map(common::pod)) {
            let back = convert::pod(&pod_to_k8s(&p)).unwrap();
            prop_assert_eq!(back, p);
        }

        /// Dual stack and IPv6 single stack: `status.podIPs` of both families.
        #[test]
        fn dual_stack_pods_survive_the_api_form(p in common::pod_key().prop_flat_map(common::pod), draw in 0u8..4) {
            let p = common::with_families(p, draw);
            let back = convert::pod(&pod_to_k8s(&p)).unwrap();
            prop_assert_eq!(back, p);
        }
    }

    /// `status.podIPs` as the API server validates it: one address of each family at most,
    /// `podIP` its first; each error names the field.
    #[test]
    fn pod_ips_are_validated_as_the_api_server_does() {
        use k8s_openapi::api::core::v1::{Pod as K8sPod, PodIP, PodStatus};
        let pod = |pod_ip: Option<&str>, ips: &[&str]| K8sPod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("p".into()),
                namespace: Some("x".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                pod_ip: pod_ip.map(str::to_string),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // IPv6 first (an IPv6-primary dual-stack cluster): both addresses are the pod's.
        let ok = convert::pod(&pod(Some("fd00::1"), &["fd00::1", "10.0.0.1"])).unwrap();
        assert_eq!(ok.address(npm_agent::model::IpFamily::V4), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(ok.address(npm_agent::model::IpFamily::V6), Some("fd00::1".parse().unwrap()));
        for (p, field, words) in [
            (pod(None, &["10.0.0.1", "10.0.0.2"]), "status.podIPs[1].ip", "same family"),
            (pod(None, &["fd00::1", "fd00::2"]), "status.podIPs[1].ip", "same family"),
            (pod(None, &["10.0.0.1", "fd00::1", "10.0.0.2"]), "status.podIPs", "at most two"),
            (pod(Some("10.0.0.2"), &["10.0.0.1", "fd00::1"]), "status.podIP", "not podIPs[0]"),
            (pod(None, &["10.0.0.300"]), "status.podIPs[0].ip", "invalid IP address"),
        ] {
            let err = convert::pod(&p).expect_err(field);
            assert_eq!(err.errors[0].field, field, "{err:?}");
            assert!(err.errors[0].message.contains(words), "{err:?}");
            assert_eq!(err.object, "x/p");
        }
    }
}

mod files_source {
    //! The four policies an unknown field or an invalid list used to widen, read by the file
    //! source: each reported naming the object and the field, and not applied; the rest of
    //! the directory applies.

    use npm_agent::source::ObjectId;
    use npm_agent::source::{FilesSource, Source};

    const BAD: [(&str, &str, &str); 4] = [
        (
            "allow-web",
            "podSelector: {matchLabels: {app: db}}\n  ingress:\n  - form:\n    - podSelector: {matchLabels: {app: web}}",
            "invalid NetworkPolicy x/allow-web: spec.ingress[0].form: unknown field",
        ),
        (
            "match-typo",
            "podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {matchLabel: {app: web}}",
            "invalid NetworkPolicy x/match-typo: spec.ingress[0].from[0].podSelector.matchLabel: unknown field",
        ),
        (
            "port-typo",
            "podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n    port:\n    - port: 5432",
            "invalid NetworkPolicy x/port-typo: spec.ingress[0].port: unknown field",
        ),
        (
            "types",
            "podSelector: {}\n  policyTypes: [Ingress, Ingress, Egress]",
            "invalid NetworkPolicy x/types: spec.policyTypes: may not specify more than two policyTypes",
        ),
    ];

    fn manifest(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  {spec}\n"
        )
    }

    #[test]
    fn each_is_reported_naming_the_field_and_not_applied() {
        let dir = std::env::temp_dir().join(format!("npm-validation-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("00-ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("10-good.yaml"),
            manifest("good", "podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}"),
        )
        .unwrap();
        for (name, spec, _) in BAD {
            std::fs::write(dir.join(format!("20-{name}.yaml")), manifest(name, spec)).unwrap();
        }
        let mut source = FilesSource::new(&dir);
        source.scan().unwrap();
        let health = source.health();
        let all = health.problems.join("\n");
        for (name, _, error) in BAD {
            assert!(
                health.problems.iter().any(|p| p.contains(&format!("20-{name}.yaml"))
                    && p.contains(error)
                    && p.contains("not applied")),
                "{error}:\n{all}"
            );
            let key = npm_agent::model::ObjectKey::new("x", name);
            assert!(!source.objects().contains_key(&ObjectId::Policy(key)), "{name} applied");
        }
        assert_eq!(health.invalid_objects, 4, "{all}");
        assert!(
            source
                .objects()
                .contains_key(&ObjectId::Policy(npm_agent::model::ObjectKey::new("x", "good")))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// One policy of 20,000 ingress and 20,000 egress rules used to stall the agent for 19 s and
/// take 350 MB: a direction expanding to more than `MAX_DIRECTION_ENTRIES` (peer, port) pairs
/// is rejected at once, naming the field; one at the limit is accepted.
#[test]
fn a_policy_too_large_to_enforce_is_rejected() {
    use npm_agent::model::validate::MAX_DIRECTION_ENTRIES;
    let rules = |n: usize, key: &str| -> String {
        (0..n)
            .map(|i| {
                format!(
                    "- {key}: [{{ipBlock: {{cidr: 172.16.{}.{}/32}}}}]\n  ports: [{{port: {}}}]\n",
                    i / 256 % 256,
                    i % 256,
                    1 + i % 60000
                )
            })
            .collect()
    };
    let huge = format!(
        "podSelector: {{}}\ningress:\n{}egress:\n{}",
        rules(20_000, "from"),
        rules(20_000, "to")
    );
    let started = std::time::Instant::now();
    rejects(&huge, "spec.ingress", "20000 rules expand to 20000 (peer, port) pairs");
    rejects(&huge, "spec.egress", "more than the 10000");
    println!("rejected in {:?}", started.elapsed());
    // Two peers by three ports is six pairs: the count is of pairs, not rules.
    let per_rule = "- from: [{podSelector: {}}, {namespaceSelector: {}}]\n  ports: [{port: 1}, {port: 2}, {port: 3}]\n";
    let n = MAX_DIRECTION_ENTRIES / 6;
    let at_limit = format!("podSelector: {{}}\ningress:\n{}", per_rule.repeat(n));
    assert!(network_policy(&parse(&at_limit)).is_ok(), "{} pairs", n * 6);
    let over = format!("podSelector: {{}}\ningress:\n{}", per_rule.repeat(n + 1));
    rejects(&over, "spec.ingress", &format!("{} (peer, port) pairs", (n + 1) * 6));
}
