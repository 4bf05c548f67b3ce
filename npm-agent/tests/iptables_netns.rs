//! The iptables dataplane in the kernel, inside network namespaces this test creates (never
//! the root namespace's rules), with both backends: what `iptables-save` and `ipset save`
//! print after a reconcile and after each step is exactly what the translator says (so its
//! rules are in `iptables-save`'s own spelling); a restarted agent reconciles over another
//! agent's state; a failed batch is retried, reported, and repaired by the next reconcile;
//! switching backends leaves nothing in the old one; cleanup leaves nothing at all.
//! Needs root, `ip`, `ipset` and both iptables backends; skipped with a message otherwise.

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::path::PathBuf;
use std::process::Command;

use npm_agent::dataplane::Dataplane;
use npm_agent::dataplane::iptables::names::Family;
use npm_agent::dataplane::iptables::saved::KernelState;
use npm_agent::dataplane::iptables::{self, Backend, IptablesConfig, IptablesDataplane};
use npm_agent::netns::Scratch;
use npm_agent::plan::Plan;
use scenarios::*;

struct Netns {
    ns: Scratch,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let ns = Scratch::new(format!("npmipt-{}-{tag}", std::process::id())).expect("netns");
        Netns { ns }
    }

    fn path(&self) -> PathBuf {
        self.ns.path()
    }

    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The IPv4 policy layout (the source guard's sets, which the guard keeps, left out).
    fn state(&self, backend: Backend) -> KernelState {
        self.state_of(backend, Family::V4)
    }

    /// A family's policy layout: its rules, and its sets.
    fn state_of(&self, backend: Backend, f: Family) -> KernelState {
        let mut k = KernelState::parse("", &self.exec(&[backend.save_for(f), "-t", "filter"]));
        k.sets = KernelState::parse(&self.exec(&["ipset", "save"]), "").sets;
        k.sets.retain(|name, _| !iptables::guard::is_guard_set(name) && f.owns_set(name));
        k
    }

    /// Whether the source guard's chains are in place (the raw tables of both families),
    /// jumped to first.
    fn guard_in_place(&self, backend: Backend) -> bool {
        use iptables::guard::*;
        Family::BOTH.into_iter().all(|f| {
            let raw = self.exec(&[backend.save_for(f), "-t", "raw"]);
            table_rules(&raw, "raw", GUARD_CHAIN) == Some(guard_rules(f))
                && table_rules(&raw, "raw", "PREROUTING")
                    .unwrap_or_default()
                    .first()
                    .map(String::as_str)
                    == Some(GUARD_JUMP)
        })
    }

    /// Whether any of the layout is left in a backend's tables of either family.
    fn anything_left(&self, backend: Backend) -> bool {
        [
            self.exec(&[backend.save_program(), "-t", "filter"]),
            self.exec(&[backend.save_program(), "-t", "raw"]),
            self.exec(&[backend.save6_program(), "-t", "filter"]),
            self.exec(&[backend.save6_program(), "-t", "raw"]),
        ]
        .iter()
        .any(|save| save.contains("AZURE-NPM"))
    }
}

fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: the iptables netns test needs root");
        return false;
    }
    for p in ["ip", "ipset", "iptables-nft-restore", "iptables-legacy-restore"] {
        if Command::new(p).arg("--version").output().is_err()
            && Command::new(p).arg("-V").output().is_err()
        {
            eprintln!("skipping: {p} is not installed");
            return false;
        }
    }
    true
}

fn open(ns: &Netns, backend: Backend) -> IptablesDataplane {
    IptablesDataplane::open(IptablesConfig {
        backend: Some(backend),
        netns: Some(ns.path()),
        ..IptablesConfig::default()
    })
    .expect("open")
}

/// The kernel holds exactly what the translators say (rules in iptables-save's and
/// ip6tables-save's spelling, sets in ipset's).
fn assert_matches(ns: &Netns, backend: Backend, dp: &IptablesDataplane, plan: &Plan, what: &str) {
    for f in Family::BOTH {
        assert_family_matches(ns, backend, dp, f, plan, &format!("{what} ({})", f.as_str()));
    }
}

fn assert_family_matches(
    ns: &Netns,
    backend: Backend,
    dp: &IptablesDataplane,
    f: Family,
    plan: &Plan,
    what: &str,
) {
    let t = dp.translator_of(f);
    let k = ns.state_of(backend, f);
    if f == Family::V6 && !dp.ipv6_active() {
        // (No IPv6 address in the layout: ip6tables holds nothing of it.)
        assert!(k.is_empty(), "{what}: an IPv6 layout without IPv6: {k:?}");
        return;
    }
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let want = t.desired_chains();
    assert_eq!(
        k.chains.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: chains"
    );
    for (c, rules) in &want {
        assert_eq!(sorted(k.chains[c].clone()), sorted(rules.clone()), "{what}: chain {c}");
    }
    let sets = t.desired_sets(&plan.layout);
    assert_eq!(k.sets.keys().collect::<Vec<_>>(), sets.keys().collect::<Vec<_>>(), "{what}: sets");
    for (h, (readable, kind, members)) in &sets {
        assert_eq!(&k.sets[h].kind, kind, "{what}: {h} ({readable})");
        assert_eq!(&k.sets[h].members, members, "{what}: {h} ({readable})");
    }
    assert_eq!(
        k.forward,
        vec!["-m conntrack --ctstate INVALID,NEW -j AZURE-NPM".to_string()],
        "{what}: FORWARD"
    );
}

fn final_plan(name: &str) -> Plan {
    let path = scenarios().into_iter().find(|(n, _)| n == name).expect("scenario").1;
    plans(&path).pop().expect("steps").plan
}

/// The groups' `hash:net,port` sets of blocks and ports, and their `src,dst`/`dst,dst`
/// matches, are spelled as the kernel prints them, step by step and after a restart.
#[test]
fn block_and_port_sets_are_spelled_as_the_kernel_prints_them() {
    if !available() {
        return;
    }
    spelled_as_the_kernel_prints_them("blocks-on-ports", "bp", |ns, backend| {
        assert!(ns.state(backend).sets.values().any(|s| s.kind == "hash:net,port"));
    });
}

/// ClusterNetworkPolicy's tier chains, their actions and the groups' Pass marks are spelled
/// as the kernel prints them, step by step and after a restart.
#[test]
fn tier_chains_are_spelled_as_the_kernel_prints_them() {
    if !available() {
        return;
    }
    spelled_as_the_kernel_prints_them("cluster-02-pass-ranges-relabels", "tiers", |ns, backend| {
        let chains = ns.state(backend).chains;
        assert!(chains.keys().any(|c| c.starts_with("AZURE-NPM-BASE-IN-")), "{chains:?}");
    });
}

/// ip6tables' rules and the `inet6:` sets (blocks of both families, named ports, port ranges
/// as `hash:net,port` sets) are spelled as the kernel prints them.
#[test]
fn ipv6_rules_and_sets_are_spelled_as_the_kernel_prints_them() {
    if !available() {
        return;
    }
    for (name, _) in dual_stack_scenarios() {
        spelled_as_the_kernel_prints_them(&name, "v6", |ns, backend| {
            let k = ns.state_of(backend, Family::V6);
            assert!(k.sets.keys().any(|s| s.starts_with("inet6:")), "{:?}", k.sets);
            assert!(k.chains.keys().any(|c| c.starts_with("AZURE-NPM-IN-PODS-")), "{:?}", k.chains);
        });
    }
}

/// A node without IPv6 leaves ip6tables empty; the first IPv6 address writes the whole IPv6
/// layout; a reconcile of a plan without IPv6 removes it again.
#[test]
fn ipv6_layout_follows_the_first_ipv6_address() {
    if !available() {
        return;
    }
    let backend = Backend::Nft;
    let ns = Netns::new("v6-on-off");
    let mut dp = open(&ns, backend);
    dp.reconcile(&Plan::default()).expect("empty reconcile");
    assert!(!dp.ipv6_active());
    assert!(ns.state_of(backend, Family::V6).is_empty());
    let (_, path) = dual_stack_scenarios().into_iter().next().expect("a dual-stack scenario");
    // (The model's pods alone name no set: sets come with the policies that use them.)
    for (i, step) in plans(&path).into_iter().enumerate() {
        dp.apply(&step.diff).expect("a step");
        assert_eq!(dp.ipv6_active(), i > 0, "step {i}: the policies' IPv6 turn it on");
        assert_matches(&ns, backend, &dp, &step.plan, &format!("step {i}"));
    }
    assert!(ns.state_of(backend, Family::V6).chains.len() > 5);
    // A restarted agent with a plan of IPv4 only removes the IPv6 layout.
    let v4 = final_plan("23-ipblock-except");
    let mut dp2 = open(&ns, backend);
    dp2.reconcile(&v4).expect("reconcile without IPv6");
    assert!(!dp2.ipv6_active());
    assert_matches(&ns, backend, &dp2, &v4, "IPv6 removed");
    iptables::cleanup(Some(ns.path()));
}

/// Applies a scenario step by step, checking after each that the kernel holds exactly what
/// the translator says; then a restarted agent reconciles over it without a change, and
/// cleanup leaves nothing.
fn spelled_as_the_kernel_prints_them(scenario: &str, tag: &str, last_check: fn(&Netns, Backend)) {
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = Netns::new(&format!("{tag}-{}", backend.as_str()));
        let mut dp = open(&ns, backend);
        dp.reconcile(&Plan::default()).expect("empty reconcile");
        let path = scenarios()
            .into_iter()
            .chain(tier_scenarios())
            .chain(dual_stack_scenarios())
            .find(|(n, _)| n == scenario)
            .expect("scenario")
            .1;
        let mut last = Plan::default();
        for (i, step) in plans(&path).into_iter().enumerate() {
            dp.apply(&step.diff).unwrap_or_else(|e| panic!("{backend:?} step {i}: {e}"));
            let what = format!("{scenario} {backend:?} step {i}");
            assert_matches(&ns, backend, &dp, &step.plan, &what);
            last = step.plan;
        }
        last_check(&ns, backend);
        let mut dp2 = open(&ns, backend);
        dp2.reconcile(&last).expect("reconcile over the same plan");
        assert_matches(&ns, backend, &dp2, &last, "after restart");
        drop(dp2);
        iptables::cleanup(Some(ns.path()));
        assert!(!ns.anything_left(backend), "{backend:?} after cleanup");
    }
}

/// `npm-agent debug gettuples` reads the kernel's tables as the kernel prints them (either
/// backend) and walks them as the packet would.
#[test]
fn debug_gettuples_reads_the_kernels_tables() {
    if !available() {
        return;
    }
    let path = manifest_dir().join("../tests/conformance/47-union-of-policies.yaml");
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = Netns::new(&format!("dbg-{}", backend.as_str()));
        let mut dp = open(&ns, backend);
        dp.reconcile(&Plan::default()).expect("empty reconcile");
        // After the first step: x/a (10.240.0.10) admits namespace y, not x/b (10.240.0.11).
        for step in plans(&path).into_iter().take(2) {
            dp.apply(&step.diff).expect("apply");
        }
        let gettuples = |src: &str| {
            Command::new("ip")
                .args(["netns", "exec", ns.ns.name(), env!("CARGO_BIN_EXE_npm-agent")])
                .args(["debug", "gettuples", "-s", src, "-d", "10.240.0.10", "--port", "80/TCP"])
                .output()
                .expect("npm-agent debug")
        };
        let out = gettuples("10.240.1.11");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{backend:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("ALLOW-FROM-nslabel-ns:y"), "{backend:?}: {text}");
        let out = gettuples("10.240.0.11");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{backend:?}: {text}");
        assert!(text.contains("DROP-ALL"), "{backend:?}: {text}");
        drop(dp);
        iptables::cleanup(Some(ns.path()));
    }
}

#[test]
fn kernel_holds_the_translation_through_restarts_failures_and_cleanup() {
    if !available() {
        return;
    }
    for backend in [Backend::Nft, Backend::Legacy] {
        let ns = Netns::new(backend.as_str());
        // Start-up over nothing, then step by step.
        let mut dp = open(&ns, backend);
        dp.reconcile(&Plan::default()).expect("empty reconcile");
        assert_matches(&ns, backend, &dp, &Plan::default(), "empty");
        assert!(ns.guard_in_place(backend), "{backend:?}: the source guard after start-up");
        let path =
            scenarios().into_iter().find(|(n, _)| n == "60-ipblock-or-selector-peers").unwrap().1;
        let mut last = Plan::default();
        for (i, step) in plans(&path).into_iter().enumerate() {
            dp.apply(&step.diff).unwrap_or_else(|e| panic!("{backend:?} step {i}: {e}"));
            assert_matches(&ns, backend, &dp, &step.plan, &format!("{backend:?} step {i}"));
            last = step.plan;
        }
        assert!(dp.stats().processes > 0);
        // A restarted agent with another plan reconciles over it.
        let other = final_plan("47-union-of-policies");
        let mut dp2 = open(&ns, backend);
        dp2.reconcile(&other).expect("reconcile over another agent's state");
        assert_matches(&ns, backend, &dp2, &other, "after restart");
        // And once more with the first plan: nothing of the second is left.
        let mut dp3 = open(&ns, backend);
        dp3.reconcile(&last).expect("reconcile back");
        assert_matches(&ns, backend, &dp3, &last, "after second restart");
        // A batch fails (a set of another type squats the name of the next set to create):
        // it is retried, reported, and the next reconcile gets around it.
        let next = final_plan("23-ipblock-except");
        let mut dry = dp3.translator().clone();
        let diff = {
            // The diff from `last` to `next`: everything of `next` over a reset translator.
            let mut d = npm_agent::plan::PlanDiff::default();
            for ip in last.endpoints.keys() {
                d.changes.push(npm_agent::plan::Change::RemoveEndpoint { ip: *ip });
            }
            for ip in last.identities.keys() {
                d.changes.push(npm_agent::plan::Change::RemoveIdentity { ip: *ip });
            }
            d.changes.extend(next.as_diff().changes);
            d.layout = last.layout.diff(&next.layout);
            d
        };
        let first_create = dry
            .translate(&diff)
            .iter()
            .flat_map(|b| b.script.lines().map(str::to_string).collect::<Vec<_>>())
            .find(|l| l.starts_with("create "))
            .expect("the diff creates a set");
        let squat = first_create.split(' ').nth(1).unwrap().to_string();
        ns.exec(&["ipset", "create", &squat, "hash:ip"]);
        let err = dp3.apply(&diff).expect_err("the squatted name makes the batch fail");
        assert!(err.to_string().contains("create sets"), "{err}");
        assert!(dp3.stats().failed >= 1 && dp3.stats().retried >= 1, "{:?}", dp3.stats());
        dp3.reconcile(&next).expect("the reconcile names the set otherwise");
        // (The squatter is not ours to keep: it is a stale azure-npm- set and goes.)
        assert_matches(&ns, backend, &dp3, &next, "after the failure");
        // Switching backends: the other backend's reconcile removes this one's chains.
        let mut switched = open(&ns, backend.other());
        switched.reconcile(&next).expect("reconcile with the other backend");
        let left = KernelState::parse("", &ns.exec(&[backend.save_program(), "-t", "filter"]));
        assert!(
            left.chains.is_empty() && left.forward.is_empty(),
            "{backend:?} still holds {left:?}"
        );
        assert!(!ns.anything_left(backend), "{backend:?} still holds the source guard");
        assert!(ns.guard_in_place(backend.other()));
        assert_matches(&ns, backend.other(), &switched, &next, "after switching backends");
        // Cleanup leaves nothing.
        let report = iptables::cleanup(Some(ns.path()));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert!(report.sets > 0);
        for b in [Backend::Nft, Backend::Legacy] {
            assert!(!ns.anything_left(b), "{b:?} after cleanup");
        }
        assert!(!ns.exec(&["ipset", "list", "-n"]).contains("azure-npm-"), "sets after cleanup");
    }
}

#[test]
fn backend_follows_kube_proxy_hint() {
    if !available() {
        return;
    }
    let ns = Netns::new("hint");
    // (The override would win over the hint.)
    assert!(std::env::var(iptables::BACKEND_ENV).is_err());
    let runner = iptables::Runner::new(Some(ns.path()));
    ns.exec(&["iptables-legacy", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    let (b, why) = iptables::detect_backend(&runner);
    assert_eq!(b, Backend::Legacy, "{why}");
    ns.exec(&["iptables-nft", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"]);
    let (b, why) = iptables::detect_backend(&runner);
    assert_eq!(b, Backend::Nft, "{why}");
}

#[test]
fn guard_puts_the_forward_jump_back_and_reports_a_removed_chain() {
    if !available() {
        return;
    }
    let ns = Netns::new("guard");
    let backend = Backend::Nft;
    let config = IptablesConfig {
        backend: Some(backend),
        netns: Some(ns.path()),
        guard_interval: Some(std::time::Duration::from_millis(400)),
        ..IptablesConfig::default()
    };
    let mut dp = IptablesDataplane::open(config).expect("open");
    let plan = final_plan("23-ipblock-except");
    dp.reconcile(&plan).expect("reconcile");
    // Another program puts a rule before the jump (and a second copy of the jump after it).
    ns.exec(&["iptables-nft", "-I", "FORWARD", "1", "-j", "ACCEPT"]);
    ns.exec(&[
        "iptables-nft",
        "-A",
        "FORWARD",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "AZURE-NPM",
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let k = ns.state(backend);
        if k.forward.first().map(String::as_str)
            == Some("-m conntrack --ctstate INVALID,NEW -j AZURE-NPM")
            && k.forward.len() == 2
        {
            assert_eq!(k.forward[1], "-j ACCEPT");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guard did not put the jump back first: {:?}",
            k.forward
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Another program removes the whole layout: the next change asks for a resync, and the
    // reconcile rebuilds it.
    ns.exec(&["sh", "-c", "iptables-nft -D FORWARD -m conntrack --ctstate INVALID,NEW -j AZURE-NPM; iptables-nft -F AZURE-NPM; iptables-nft -X AZURE-NPM"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let err =
        dp.apply(&npm_agent::plan::PlanDiff::default()).expect_err("a removed chain is reported");
    assert!(err.to_string().contains("resynchronizing"), "{err}");
    dp.reconcile(&plan).expect("reconcile");
    assert!(ns.state(backend).chains.contains_key("AZURE-NPM"));
    assert_eq!(ns.state(backend).forward[0], "-m conntrack --ctstate INVALID,NEW -j AZURE-NPM");
}
