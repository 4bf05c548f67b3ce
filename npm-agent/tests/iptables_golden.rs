//! The iptables layout of every scenario (a conformance case per feature, see
//! `golden/scenarios.rs`, ClusterNetworkPolicy's tiers included), step by step: the batches each step's diff becomes, and the sets
//! and rules the kernel then holds (as `ipset save` and `iptables-save` print them, from the
//! host model that took the batches), with the readable name of every set. Compared with
//! `tests/golden/iptables/<scenario>.txt` (`UPDATE_GOLDEN=1` rewrites them). The dual-stack
//! scenarios run both families' translators, as the dataplane does, and show ip6tables' rules
//! and the `inet6:` sets too.

#[path = "golden/scenarios.rs"]
mod scenarios;

use std::fmt::Write as _;

use npm_agent::dataplane::iptables::emulator::TableEmulator;
use npm_agent::dataplane::iptables::names::Family;
use npm_agent::dataplane::iptables::translate::{RuleTranslator, Tool, merge_families};
use npm_agent::plan::Plan;
use scenarios::*;

fn layout(name: &str, families: &[Family]) -> String {
    let path = scenarios()
        .into_iter()
        .chain(tier_scenarios())
        .chain(dual_stack_scenarios())
        .find(|(n, _)| n == name)
        .expect("scenario")
        .1;
    let mut out = String::new();
    let mut ts: Vec<RuleTranslator> =
        families.iter().map(|f| RuleTranslator::for_family(*f)).collect();
    let mut kernel = TableEmulator::default();
    let start = ts.iter_mut().map(|t| t.reconcile(&Plan::default(), &kernel.state_of(t.family())));
    for b in merge_families(start.collect()) {
        kernel.apply(&b).expect("start-up");
    }
    for (i, step) in plans(&path).into_iter().enumerate() {
        let _ = writeln!(out, "######## step {i}: {}\n", step.description);
        for b in merge_families(ts.iter_mut().map(|t| t.translate(&step.diff)).collect()) {
            let tool = match b.tool {
                Tool::Ipset => "ipset -exist restore",
                Tool::Iptables => "iptables-restore -w 60 -T filter --noflush",
                Tool::Ip6tables => "ip6tables-restore -w 60 -T filter --noflush",
            };
            let _ = writeln!(out, "# batch: {} ({tool})\n{}", b.step, b.script);
            kernel.apply(&b).unwrap_or_else(|e| panic!("{name} step {i}: {e}\n{}", b.script));
        }
        let (ipset, _) = kernel.save();
        let _ = writeln!(out, "# the kernel now holds (ipset save):\n{ipset}");
        let _ = writeln!(out, "# readable names of the sets:");
        for (h, readable) in ts.iter().flat_map(|t| t.set_names()) {
            let _ = writeln!(out, "#   {h} = {readable}");
        }
        for f in families {
            let (_, rules) = kernel.save_of(*f);
            let save = if *f == Family::V4 { "iptables-save" } else { "ip6tables-save" };
            let _ = writeln!(out, "\n# {save} -t filter:\n{rules}");
        }
    }
    out
}

#[test]
fn iptables_layout_matches_golden_files() {
    let mut failures = Vec::new();
    let single =
        scenarios().into_iter().chain(tier_scenarios()).map(|(n, _)| (n, &[Family::V4][..]));
    let dual = dual_stack_scenarios().into_iter().map(|(n, _)| (n, &Family::BOTH[..]));
    for (name, families) in single.chain(dual) {
        let text = layout(&name, families);
        if let Err(e) =
            check_golden(&manifest_dir().join(format!("tests/golden/iptables/{name}.txt")), &text)
        {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
