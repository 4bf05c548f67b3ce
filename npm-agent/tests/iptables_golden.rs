//! The iptables layout of every scenario (a conformance case per feature, see
//! `golden/scenarios.rs`, ClusterNetworkPolicy's tiers included), step by step: the batches each step's diff becomes, and the sets
//! and rules the kernel then holds (as `ipset save` and `iptables-save` print them, from the
//! host model that took the batches), with the readable name of every set. Compared with
//! `tests/golden/iptables/<scenario>.txt` (`UPDATE_GOLDEN=1` rewrites them).

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::fmt::Write as _;

use npm_agent::dataplane::iptables::emulator::TableEmulator;
use npm_agent::dataplane::iptables::translate::{RuleTranslator, Tool};
use npm_agent::plan::Plan;
use scenarios::*;

fn layout(name: &str) -> String {
    let path = scenarios()
        .into_iter()
        .chain(tier_scenarios())
        .find(|(n, _)| n == name)
        .expect("scenario")
        .1;
    let mut out = String::new();
    let mut t = RuleTranslator::new();
    let mut kernel = TableEmulator::default();
    for b in t.reconcile(&Plan::default(), &kernel.state()) {
        kernel.apply(&b).expect("start-up");
    }
    for (i, step) in plans(&path).into_iter().enumerate() {
        let _ = writeln!(out, "######## step {i}: {}\n", step.description);
        for b in t.translate(&step.diff) {
            let tool = match b.tool {
                Tool::Ipset => "ipset -exist restore",
                Tool::Iptables => "iptables-restore -w 60 -T filter --noflush",
                Tool::Ip6tables => "ip6tables-restore -w 60 -T filter --noflush",
            };
            let _ = writeln!(out, "# batch: {} ({tool})\n{}", b.step, b.script);
            kernel.apply(&b).unwrap_or_else(|e| panic!("{name} step {i}: {e}\n{}", b.script));
        }
        let (ipset, iptables) = kernel.save();
        let _ = writeln!(out, "# the kernel now holds (ipset save):\n{ipset}");
        let _ = writeln!(out, "# readable names of the sets:");
        for (h, readable) in t.set_names() {
            let _ = writeln!(out, "#   {h} = {readable}");
        }
        let _ = writeln!(out, "\n# iptables-save -t filter:\n{iptables}");
    }
    out
}

#[test]
fn iptables_layout_matches_golden_files() {
    let mut failures = Vec::new();
    for (name, _) in scenarios().into_iter().chain(tier_scenarios()) {
        let text = layout(&name);
        if let Err(e) =
            check_golden(&manifest_dir().join(format!("tests/golden/iptables/{name}.txt")), &text)
        {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
