//! The two Linux dataplanes against each other on real packets: a random case (policies of
//! both kinds, label changes and deletions over the default model, every table `?`) runs through the lab
//! once with eBPF agents and once with iptables agents, and every observed table must be
//! identical, and identical to the simulator's. Every other case is dual stack: its pods have
//! both families, its blocks are of either, and each table is probed over IPv4 and IPv6. Needs root; skipped with a message otherwise.
//! The seed is printed (and `NPM_DIFF_SEED=<n>` replays one); a failing case is kept in the
//! temporary directory (every case with `NPM_DIFF_KEEP=1`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use npm_agent::lab::{LabCluster, LabOptions};
use npm_agent::simulate::{self, CaseReport, CompilerEnforcer};

/// xorshift64*: deterministic from the seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const NS: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn selector(r: &mut Rng, key: &str, values: &[&str]) -> String {
    match r.below(4) {
        0 => "{}".into(),
        1 => format!("{{matchLabels: {{{key}: {}}}}}", r.pick(values)),
        2 => format!(
            "{{matchExpressions: [{{key: {key}, operator: NotIn, values: [{}]}}]}}",
            r.pick(values)
        ),
        _ => format!(
            "{{matchExpressions: [{{key: {key}, operator: In, values: [{}, {}]}}]}}",
            r.pick(values),
            r.pick(values)
        ),
    }
}

fn peer(r: &mut Rng, dual: bool) -> String {
    if dual && r.below(2) == 0 {
        let pod = format!("{}/{}", r.pick(&NS), r.pick(&PODS));
        return match r.below(3) {
            0 => format!("ipBlock: {{cidr: '{{{{podIPv6 {pod}}}}}/128'}}"),
            1 => format!("ipBlock: {{cidr: '::/0', except: ['{{{{podIPv6 {pod}}}}}/128']}}"),
            _ => "ipBlock: {cidr: '::/0'}".into(),
        };
    }
    match r.below(6) {
        0 => format!("podSelector: {}", selector(r, "pod", &PODS)),
        1 => format!("namespaceSelector: {}", selector(r, "ns", &NS)),
        2 => format!(
            "namespaceSelector: {}\n            podSelector: {}",
            selector(r, "ns", &NS),
            selector(r, "pod", &PODS)
        ),
        3 => format!(
            "ipBlock: {{cidr: 10.240.{}.0/24, except: [10.240.{}.{}/32]}}",
            r.below(3),
            r.below(3),
            10 + r.below(3)
        ),
        4 => format!("ipBlock: {{cidr: 10.240.{}.{}/32}}", r.below(3), 10 + r.below(3)),
        _ => "ipBlock: {cidr: 0.0.0.0/0, except: [10.240.1.0/24]}".into(),
    }
}

fn port(r: &mut Rng) -> String {
    match r.below(6) {
        0 => "{port: 80, protocol: TCP}".into(),
        1 => "{port: 81}".into(),
        2 => {
            let (n, p) = (80 + r.below(2), *r.pick(&["tcp", "udp"]));
            format!("{{port: serve-{n}-{p}, protocol: {}}}", p.to_uppercase())
        }
        3 => "{port: 80, endPort: 81, protocol: TCP}".into(),
        4 => "{protocol: UDP}".into(),
        _ => "{port: 80, protocol: UDP}".into(),
    }
}

fn rules(r: &mut Rng, word: &str, dual: bool) -> String {
    let mut s = String::new();
    for _ in 0..r.below(3) {
        let _ = write!(s, "\n        - ");
        let mut first = true;
        let mut item = |s: &mut String, text: String| {
            if !first {
                s.push_str("\n          ");
            }
            first = false;
            s.push_str(&text);
        };
        if r.below(4) > 0 {
            let peers: Vec<String> =
                (0..1 + r.below(2)).map(|_| format!("          - {}", peer(r, dual))).collect();
            item(&mut s, format!("{word}:\n{}", peers.join("\n")));
        }
        if r.below(3) > 0 {
            let ports: Vec<String> =
                (0..1 + r.below(2)).map(|_| format!("          - {}", port(r))).collect();
            item(&mut s, format!("ports:\n{}", ports.join("\n")));
        }
        if first {
            s.push_str("{}");
        }
    }
    if s.is_empty() { " []".into() } else { s }
}

fn policy(r: &mut Rng, name: &str, dual: bool) -> String {
    let ns = r.pick(&NS);
    let types = r.below(3);
    let mut spec = format!(
        "        podSelector: {}\n        policyTypes: [{}]\n",
        selector(r, "pod", &PODS),
        ["Ingress", "Egress", "Ingress, Egress"][types]
    );
    if types != 1 {
        let _ = writeln!(spec, "        ingress:{}", rules(r, "from", dual));
    }
    if types != 0 {
        let _ = writeln!(spec, "        egress:{}", rules(r, "to", dual));
    }
    format!(
        "  - apply:\n      apiVersion: networking.k8s.io/v1\n      kind: NetworkPolicy\n      metadata: {{name: {name}, namespace: {ns}}}\n      spec:\n{spec}"
    )
}

/// A ClusterNetworkPolicy peer: namespaces, pods, or (egress) networks.
fn cluster_peer(r: &mut Rng, egress: bool) -> String {
    match r.below(if egress { 4 } else { 3 }) {
        0 => format!("{{namespaces: {}}}", selector(r, "ns", &NS)),
        1 => format!(
            "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
            selector(r, "ns", &NS),
            selector(r, "pod", &PODS)
        ),
        2 => "{namespaces: {}}".into(),
        _ => format!("{{networks: [10.240.{}.0/24]}}", r.below(3)),
    }
}

fn cluster_protocols(r: &mut Rng) -> String {
    match r.below(5) {
        0 => "\n            protocols: [{tcp: {destinationPort: {number: 80}}}]".into(),
        1 => "\n            protocols: [{tcp: {destinationPort: {range: {start: 80, end: 81}}}}]"
            .into(),
        2 => {
            let (n, p) = (80 + r.below(2), *r.pick(&["tcp", "udp"]));
            format!("\n            protocols: [{{destinationNamedPort: serve-{n}-{p}}}]")
        }
        3 => "\n            protocols: [{udp: {}}]".into(),
        _ => String::new(),
    }
}

/// A random ClusterNetworkPolicy: a tier, a priority, a subject, a few rules of any action.
fn cluster_policy(r: &mut Rng, name: &str) -> String {
    let tier = *r.pick(&["Admin", "Baseline"]);
    let subject = if r.below(2) == 0 {
        format!("{{namespaces: {}}}", selector(r, "ns", &NS))
    } else {
        format!(
            "{{pods: {{namespaceSelector: {}, podSelector: {}}}}}",
            selector(r, "ns", &NS),
            selector(r, "pod", &PODS)
        )
    };
    let mut spec = format!(
        "        tier: {tier}\n        priority: {}\n        subject: {subject}\n",
        r.below(3) * 5
    );
    for (dir, word) in [("ingress", "from"), ("egress", "to")] {
        let n = r.below(3);
        if n == 0 {
            continue;
        }
        let _ = writeln!(spec, "        {dir}:");
        for _ in 0..n {
            let action = *r.pick(&["Accept", "Deny", "Pass"]);
            let peers: Vec<String> =
                (0..1 + r.below(2)).map(|_| cluster_peer(r, dir == "egress")).collect();
            let _ = writeln!(
                spec,
                "          - action: {action}\n            {word}: [{}]{}",
                peers.join(", "),
                cluster_protocols(r)
            );
        }
    }
    format!(
        "  - apply:\n      apiVersion: policy.networking.k8s.io/v1alpha2\n      kind: ClusterNetworkPolicy\n      metadata: {{name: {name}}}\n      spec:\n{spec}"
    )
}

fn table(protocol: &str, port: u16, ipv6: bool) -> String {
    let pods: Vec<String> =
        NS.iter().flat_map(|n| PODS.iter().map(move |p| format!("{n}/{p}"))).collect();
    let family = if ipv6 { "\n    family: IPv6" } else { "" };
    let mut t = format!(
        "  - port: {port}\n    protocol: {protocol}{family}\n    table: |\n      from\\to {}\n",
        pods.join(" ")
    );
    for p in &pods {
        let _ = writeln!(t, "      {p} {}", vec!["?"; pods.len()].join(" "));
    }
    t
}

/// A random case: steps of policy applies (NetworkPolicies and ClusterNetworkPolicies),
/// deletions and relabelling; `dual`: on a dual-stack cluster, with IPv6 blocks too and
/// tables over IPv6.
fn random_case(seed: u64, steps: usize, dual: bool) -> String {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut s = format!("name: random case {seed}\n");
    if dual {
        s.push_str("model:\n  ip-families: [IPv4, IPv6]\n");
    }
    s.push_str("steps:\n");
    let mut live: Vec<(String, String)> = Vec::new();
    let mut live_cluster: std::collections::BTreeSet<String> = Default::default();
    for i in 0..steps {
        let _ = writeln!(s, "- description: step {i}\n  actions:");
        for _ in 0..1 + r.below(2) {
            match r.below(14) {
                10..=12 => {
                    let name = format!("c{}", r.below(3));
                    s.push_str(&cluster_policy(&mut r, &name));
                    live_cluster.insert(name);
                }
                13 if !live_cluster.is_empty() => {
                    let name = live_cluster.pop_first().expect("a live ClusterNetworkPolicy");
                    let _ = writeln!(
                        s,
                        "  - delete-policy: {{kind: ClusterNetworkPolicy, name: {name}}}"
                    );
                }
                0..=5 => {
                    let name = format!("p{}", r.below(4));
                    let text = policy(&mut r, &name, dual);
                    let ns = text
                        .split("namespace: ")
                        .nth(1)
                        .unwrap()
                        .split('}')
                        .next()
                        .unwrap()
                        .to_string();
                    live.retain(|(n, nn)| !(n == &name && nn == &ns));
                    live.push((name, ns));
                    s.push_str(&text);
                }
                6 | 7 if !live.is_empty() => {
                    let k = r.below(live.len());
                    let (name, ns) = live.remove(k);
                    let _ = writeln!(s, "  - delete-policy: {{namespace: {ns}, name: {name}}}");
                }
                8 => {
                    let _ = writeln!(
                        s,
                        "  - set-pod-labels: {{namespace: {}, pod: {}, labels: {{pod: {}}}}}",
                        r.pick(&NS),
                        r.pick(&PODS),
                        r.pick(&PODS)
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "  - set-namespace-labels: {{namespace: {}, labels: {{ns: {}}}}}",
                        r.pick(&NS),
                        r.pick(&NS)
                    );
                }
            }
        }
        s.push_str("  expect:\n");
        s.push_str(&table("TCP", 80, false));
        s.push_str(&table("TCP", 81, false));
        s.push_str(&table("UDP", 80, false));
        if dual {
            s.push_str(&table("TCP", 80, true));
            s.push_str(&table("UDP", 80, true));
        }
    }
    s
}

fn tables(r: &CaseReport) -> Vec<(String, String)> {
    assert!(r.error.is_none(), "{}: {:?}", r.file.display(), r.error);
    r.steps
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.tables.iter().map(move |t| {
                let observed = t
                    .observed
                    .as_ref()
                    .map(|o| o.render(""))
                    .unwrap_or_else(|| format!("{:?}", t.outcome));
                (format!("step {i} {}/{}", t.protocol, t.port), observed)
            })
        })
        .collect()
}

fn run(path: &Path, dataplane: &str) -> CaseReport {
    let mut opts = LabOptions::new(dataplane, 2);
    opts.agent = PathBuf::from(env!("CARGO_BIN_EXE_npm-agent"));
    let mut lab =
        LabCluster::new(opts).unwrap_or_else(|e| panic!("building the {dataplane} lab: {e:#}"));
    let report = simulate::run_case(path, &mut lab);
    lab.shutdown().expect("lab cleanup");
    report
}

#[test]
fn ebpf_and_iptables_observe_identical_tables() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: the lab differential test needs root");
        return;
    }
    let seed =
        std::env::var("NPM_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let dir = std::env::temp_dir().join(format!("npm-lab-differential-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let budget = Duration::from_secs(
        std::env::var("NPM_DIFF_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(90),
    );
    let start = Instant::now();
    let mut cases = 0;
    while cases == 0 || start.elapsed() < budget / 2 {
        let case_seed = seed.wrapping_add(cases);
        let path = dir.join(format!("random-{case_seed}.yaml"));
        // (Dual stack first: its IPv4 tables are an IPv4 case's, and its IPv6 ones more.)
        let dual = cases % 2 == 0;
        std::fs::write(&path, random_case(case_seed, 5, dual)).unwrap();
        eprintln!("lab differential: seed {case_seed}, dual stack {dual} ({})", path.display());
        let sim = tables(&simulate::run_case(&path, &mut CompilerEnforcer::default()));
        let ebpf = tables(&run(&path, "ebpf"));
        let ipt = tables(&run(&path, "iptables"));
        assert_eq!(sim.len(), ebpf.len());
        for ((k, s), ((_, e), (_, i))) in sim.iter().zip(ebpf.iter().zip(&ipt)) {
            assert_eq!(
                e,
                i,
                "seed {case_seed} ({}), {k}: eBPF (left) and iptables (right) differ",
                path.display()
            );
            assert_eq!(
                s,
                e,
                "seed {case_seed} ({}), {k}: the simulator (left) and the lab (right) differ",
                path.display()
            );
        }
        if std::env::var_os("NPM_DIFF_KEEP").is_none() {
            let _ = std::fs::remove_file(&path);
        }
        cases += 1;
    }
    eprintln!(
        "lab differential: {cases} random cases (every other one dual stack), 15 or 25 tables each, identical in {:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir(&dir);
}
