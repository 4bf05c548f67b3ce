//! Fuzzing the readers of what users hand the agent, as property tests (bounded, in every
//! `cargo test`; `fuzz/` holds the same targets for cargo-fuzz's longer runs):
//! - manifests (the files source's reader, YAML and JSON): documents built from the words
//!   NetworkPolicies, Pods, Namespaces and Nodes are made of, with values of every type, and
//!   the project's own manifests mutated byte by byte;
//! - conformance cases, run through the compiler: cases built from the format's words, and the
//!   project's cases mutated.
//!
//! Nothing may panic, hang or take unbounded time; every reader answers (with objects or with
//! errors). `NPM_FUZZ_CASES` multiplies the number of inputs (default 1).

use std::path::Path;

use npm_agent::simulate::{CompilerEnforcer, run_case_text};
use npm_agent::source::files::check_manifests;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

fn scale() -> u32 {
    std::env::var("NPM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// The words manifests and cases are made of (and a few that are none of theirs).
const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "labels",
    "spec",
    "status",
    "podSelector",
    "namespaceSelector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "policyTypes",
    "ingress",
    "egress",
    "from",
    "to",
    "ipBlock",
    "cidr",
    "except",
    "ports",
    "port",
    "endPort",
    "protocol",
    "podIP",
    "podIPs",
    "ip",
    "phase",
    "nodeName",
    "hostNetwork",
    "containers",
    "containerPort",
    "addresses",
    "address",
    "type",
    "items",
    "deletionTimestamp",
    "form",
    "matchLabel",
    "steps",
    "actions",
    "expect",
    "table",
    "apply",
    "delete-policy",
    "set-pod-labels",
    "set-namespace-labels",
    "create-pod",
    "delete-pod",
    "model",
    "namespaces",
    "pods",
    "pod",
    "description",
    "sctp",
    "family",
    "ips",
    "ip-families",
];

const STRINGS: &[&str] = &[
    "",
    "x",
    "y",
    "a",
    "web",
    "NetworkPolicy",
    "Pod",
    "Namespace",
    "Node",
    "List",
    "v1",
    "networking.k8s.io/v1",
    "Ingress",
    "Egress",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "TCP",
    "UDP",
    "SCTP",
    "ICMP",
    "10.0.0.1",
    "10.0.0.0/8",
    "10.0.0.1/33",
    "0.0.0.0/0",
    "::/0",
    "fd00::1",
    "fd00::/64",
    "300.1.2.3",
    "http",
    "Running",
    "Succeeded",
    "-1",
    "65536",
    "k8s.io/x",
    "a/b/c",
    "x/a",
    "{{podIP x/a}}",
    "{{podIP z/q}}",
    "{{podIPv6 x/a}}",
    "IPv6",
    "from\\to x/a x/b\nx/a . X\nx/b ? .",
    "from\\to x/a\nx/a .",
    ".",
    "X",
    "?",
    "kubernetes.io/metadata.name",
    "\u{0}",
    "é",
    "\"",
    "a\nb",
];

/// A value of any type, built from the vocabulary, at most `depth` levels deep.
fn value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        select(vec![0i64, 1, 5, 80, 65535, 65536, -1, i64::MAX, 1 << 40]).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(1.5)),
        select(STRINGS.to_vec()).prop_map(Value::from),
        "[a-z0-9./:-]{0,12}".prop_map(Value::from),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    let inner = value(depth - 1);
    prop_oneof![
        3 => leaf,
        2 => proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
        4 => proptest::collection::vec((select(KEYS.to_vec()), inner), 0..6)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
    ]
    .boxed()
}

/// An object with the shape of one of the kinds the agent reads, with random insides.
fn object() -> impl Strategy<Value = Value> {
    (
        select(vec!["NetworkPolicy", "Pod", "Namespace", "Node", "List", "ConfigMap"]),
        value(4),
        value(2),
        value(3),
    )
        .prop_map(|(kind, spec, meta, status)| {
            let mut o = Map::new();
            o.insert(
                "apiVersion".into(),
                Value::from(if kind == "NetworkPolicy" { "networking.k8s.io/v1" } else { "v1" }),
            );
            o.insert("kind".into(), Value::from(kind));
            let mut m = match meta {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            m.entry("name").or_insert(Value::from("n"));
            m.entry("namespace").or_insert(Value::from("x"));
            o.insert("metadata".into(), Value::Object(m));
            o.insert(if kind == "List" { "items" } else { "spec" }.into(), spec);
            o.insert("status".into(), status);
            Value::Object(o)
        })
}

/// A NetworkPolicy that is mostly well-formed: selectors, peers and ports of the shapes the API
/// has, with now and then a value of another shape.
fn policy() -> impl Strategy<Value = Value> {
    let selector = prop_oneof![
        6 => Just(serde_json::json!({})),
        6 => select(vec!["a", "b", "c"]).prop_map(|p| serde_json::json!({"matchLabels": {"pod": p}})),
        6 => (select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]), select(vec!["ns", "pod", "team"]))
            .prop_map(|(op, k)| serde_json::json!({"matchExpressions": [{"key": k, "operator": op, "values": ["x", "a"]}]})),
        1 => value(1),
    ];
    let peer = prop_oneof![
        6 => (selector.clone(), selector.clone())
            .prop_map(|(n, p)| serde_json::json!({"namespaceSelector": n, "podSelector": p})),
        6 => selector.clone().prop_map(|p| serde_json::json!({"podSelector": p})),
        6 => select(vec![
            "10.240.0.0/16",
            "10.240.1.11/32",
            "0.0.0.0/0",
            "{{podIP x/b}}/24",
            "::/0",
            "10.0.0.0/33"
        ])
        .prop_map(|c| serde_json::json!({"ipBlock": {"cidr": c, "except": ["10.240.1.0/24"]}})),
        1 => value(2),
    ];
    let port = prop_oneof![
        select(vec![80i64, 81, 0, 70000]).prop_map(|p| serde_json::json!({"port": p})),
        select(vec!["serve-80-tcp", "serve-81-udp", "nope"])
            .prop_map(|p| serde_json::json!({"port": p, "protocol": "UDP"})),
        Just(serde_json::json!({"port": 80, "endPort": 81, "protocol": "TCP"})),
        Just(serde_json::json!({"protocol": "SCTP"})),
        value(1),
    ];
    let rule = (proptest::collection::vec(peer, 0..3), proptest::collection::vec(port, 0..3))
        .prop_map(|(peers, ports)| serde_json::json!({"from": peers.clone(), "to": peers, "ports": ports}));
    (
        select(vec!["x", "y", "z"]),
        selector,
        proptest::collection::vec(rule.clone(), 0..3),
        proptest::collection::vec(rule, 0..3),
        select(vec![vec!["Ingress"], vec!["Egress"], vec!["Ingress", "Egress"], vec![]]),
    )
        .prop_map(|(ns, sel, ingress, egress, types)| {
            serde_json::json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "p", "namespace": ns},
                "spec": {"podSelector": sel, "ingress": ingress, "egress": egress, "policyTypes": types},
            })
        })
}

/// The project's own manifests and cases, as seeds for mutation.
fn seeds(dirs: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let mut out = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(root.join(d)) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    assert!(!out.is_empty(), "no seeds in {dirs:?}");
    out
}

/// Edits of a text: flipped, inserted and deleted bytes, lines duplicated or dropped, a cut.
fn mutated(seeds: Vec<String>) -> impl Strategy<Value = String> {
    let edit = prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| (0u8, i, b)),
        (any::<prop::sample::Index>(), select(b"-:[]{}\n #\"'&*!|>%@0.".to_vec()))
            .prop_map(|(i, b)| (1u8, i, b)),
        any::<prop::sample::Index>().prop_map(|i| (2u8, i, 0)),
        any::<prop::sample::Index>().prop_map(|i| (3u8, i, 0)),
        any::<prop::sample::Index>().prop_map(|i| (4u8, i, 0)),
        any::<prop::sample::Index>().prop_map(|i| (5u8, i, 0)),
    ];
    (select(seeds), proptest::collection::vec(edit, 1..8)).prop_map(|(seed, edits)| {
        let mut bytes = seed.into_bytes();
        for (op, at, b) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = b,
                1 => bytes.insert(i, b),
                2 => {
                    bytes.remove(i);
                }
                3 | 4 => {
                    // A whole line, duplicated or dropped.
                    let start = bytes[..i].iter().rposition(|c| *c == b'\n').map_or(0, |p| p + 1);
                    let end = bytes[i..]
                        .iter()
                        .position(|c| *c == b'\n')
                        .map_or(bytes.len(), |p| i + p + 1);
                    let line: Vec<u8> = bytes[start..end].to_vec();
                    if op == 3 {
                        bytes.splice(end..end, line);
                    } else {
                        bytes.drain(start..end);
                    }
                }
                _ => bytes.truncate(i),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn run(cases: u32, strategy: impl Strategy<Value = String>, check: impl Fn(&str)) {
    let mut runner = TestRunner::new(Config {
        cases: cases * scale(),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |text| {
            check(&text);
            Ok(())
        })
        .unwrap();
}

fn read_manifests(text: &str) {
    let _ = check_manifests(Path::new("m.yaml"), text);
    let _ = check_manifests(Path::new("m.json"), text);
}

#[test]
fn manifests_of_every_shape_are_read_or_refused() {
    let docs = proptest::collection::vec(object(), 1..4).prop_map(|objs| {
        objs.iter().map(|o| serde_yaml_ng::to_string(o).unwrap()).collect::<Vec<_>>().join("---\n")
    });
    run(1500, docs, read_manifests);
    let json = object().prop_map(|o| serde_json::to_string(&o).unwrap());
    run(500, json, |text| {
        let _ = check_manifests(Path::new("m.json"), text);
    });
}

#[test]
fn mutated_manifests_are_read_or_refused() {
    let mut s = seeds(&["deploy", "npm-agent/tests/fixtures"]);
    // Manifests of every kind the agent reads, as the lab writes them.
    s.push(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a, namespace: x, labels: {app: web}}\n  spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\n  status: {phase: Running, podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}]}\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n  status: {addresses: [{type: InternalIP, address: 10.1.0.1}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {namespaceSelector: {}, podSelector: {}}]\n    ports: [{port: 80, endPort: 90}, {port: http, protocol: UDP}]\n".into(),
    );
    run(2000, mutated(s), read_manifests);
}

#[test]
fn cases_of_every_shape_are_run_or_refused() {
    // The default model (or, now and then, one of any shape), steps that apply policies and
    // relabel pods, and tables of random cells.
    let table = proptest::collection::vec(select(vec![".", "X", "?"]), 81).prop_map(|cells| {
        let pods = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];
        let mut t = format!("from\\to {}\n", pods.join(" "));
        for (i, p) in pods.iter().enumerate() {
            t.push_str(&format!("{p} {}\n", cells[i * 9..i * 9 + 9].join(" ")));
        }
        t
    });
    let action = prop_oneof![
        12 => policy().prop_map(|p| serde_json::json!({"apply": p})),
        1 => object().prop_map(|o| serde_json::json!({"apply": o})),
        3 => select(vec!["a", "b", "c"]).prop_map(|p| serde_json::json!({"set-pod-labels": {"namespace": "x", "pod": p, "labels": {"pod": "b"}}})),
        3 => Just(serde_json::json!({"delete-policy": {"namespace": "x", "name": "p"}})),
        1 => value(2).prop_map(|v| serde_json::json!({"create-pod": v})),
    ];
    let expect = (select(vec![80i64, 81]), select(vec!["TCP", "UDP", "SCTP", "ICMP"]), table)
        .prop_map(|(port, protocol, table)| serde_json::json!({"port": port, "protocol": protocol, "table": table}));
    let case = (
        prop_oneof![6 => Just(Value::Null), 1 => value(3)],
        proptest::collection::vec((proptest::collection::vec(action, 0..4), expect), 1..3),
    )
        .prop_map(|(model, steps)| {
            let steps: Vec<Value> = steps
                .into_iter()
                .map(|(actions, expect)| serde_json::json!({ "description": "d", "actions": actions, "expect": [expect] }))
                .collect();
            let mut case = serde_json::json!({ "name": "fuzz", "steps": steps });
            if !model.is_null() {
                case["model"] = model;
            }
            serde_yaml_ng::to_string(&case).unwrap()
        });
    let ran = std::cell::Cell::new(0u32);
    run(400, case, |text| {
        let report = run_case_text(text, &mut CompilerEnforcer::default());
        if std::env::var("NPM_FUZZ_DEBUG").is_ok()
            && let Some(e) = &report.error
        {
            eprintln!("case error: {}", e.chars().take(150).collect::<String>());
        }
        ran.set(ran.get() + u32::from(report.error.is_none() && !report.steps.is_empty()));
    });
    println!("{} generated cases ran their steps", ran.get());
    assert!(ran.get() * 3 > 400 * scale(), "only {} generated cases ran", ran.get());
}

#[test]
fn mutated_cases_are_run_or_refused() {
    let s = seeds(&["tests/conformance", "deploy/examples"]);
    let ran = std::cell::Cell::new(0u32);
    run(600, mutated(s), |text| {
        let report = run_case_text(text, &mut CompilerEnforcer::default());
        ran.set(ran.get() + u32::from(report.error.is_none() && !report.steps.is_empty()));
    });
    // The mutations must leave many cases whole enough to run (else this fuzzes the YAML
    // parser only).
    println!("{} mutated cases ran their steps", ran.get());
    assert!(ran.get() * 10 > 600 * scale(), "only {} mutated cases ran", ran.get());
}
