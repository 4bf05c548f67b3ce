//! The iptables dataplane's figures: `iptables-save -c` of the dataplane's backend (its
//! `AZURE-NPM*` rules; drops are the packet counters of their `DROP` rules, by the chain's
//! direction, and of the source guard's), `ipset save` (the sets of the plan's layout, Azure
//! NPM's sets, and their entries as the kernel holds them; the dataplane's own sets,
//! `transition`, the groups' `blocks-and-ports-of-…` and the source guard's, are not Azure
//! NPM's and not counted, so that both Linux modes count the same sets), and conntrack entries from
//! `/proc/sys/net/netfilter/nf_conntrack_count`. Run in the dataplane's network namespace.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::exec::{Backend, Runner};
use super::saved::{KernelSet, KernelState};
use crate::dataplane::azure::AzureSets;
use crate::dataplane::observe::{Counts, Figures, Observer, PacketFigure};

/// Reads the iptables dataplane's rules, sets and counters with `iptables-save` and
/// `ipset save` (Azure NPM's chain and set names).
pub struct IptablesObserver {
    runner: Runner,
    backend: Backend,
    /// The layout's sets, by readable and kernel name (the dataplane keeps them).
    sets: Arc<Mutex<AzureSets>>,
}

impl IptablesObserver {
    /// Reads what `backend` holds, running the programs with `runner` (the dataplane's); counts
    /// the kernel's sets that are `sets`.
    pub fn new(runner: Runner, backend: Backend, sets: Arc<Mutex<AzureSets>>) -> Self {
        Self { runner, backend, sets }
    }

    fn read(&self, program: &str, args: &[&str]) -> Result<String> {
        self.runner
            .read(program, args)
            .map_err(|e| anyhow::anyhow!("{program} {}: {e}", args.join(" ")))
    }
}

/// Rules and drops parsed from `iptables-save -c`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IptablesFigures {
    pub rules: u64,
    pub dropped_ingress: u64,
    pub dropped_egress: u64,
}

/// Parses `iptables-save -c` (or without `-c`: no counters): the rules of every chain named
/// `AZURE-NPM*`, and the packets of their `DROP` rules, ingress or egress as the chain's name
/// says (`names::chain_direction`: a NetworkPolicy's denial or a ClusterNetworkPolicy's
/// `Deny`).
pub fn parse_iptables_save(text: &str) -> IptablesFigures {
    let mut f = IptablesFigures::default();
    for line in text.lines() {
        let line = line.trim();
        let (packets, rule) = match line.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((c, rule)) => (
                    c.split(':').next().and_then(|p| p.parse::<u64>().ok()).unwrap_or(0),
                    rule.trim(),
                ),
                None => continue,
            },
            None => (0, line),
        };
        let Some(rest) = rule.strip_prefix("-A ") else {
            continue;
        };
        let chain = rest.split_whitespace().next().unwrap_or_default();
        if !chain.starts_with("AZURE-NPM") {
            continue;
        }
        f.rules += 1;
        let words: Vec<&str> = rest.split_whitespace().collect();
        let drops = words.windows(2).any(|w| w[0] == "-j" && w[1] == "DROP");
        if drops {
            match super::names::chain_direction(chain) {
                Some(true) => f.dropped_ingress += packets,
                Some(false) => f.dropped_egress += packets,
                None => {}
            }
        }
    }
    f
}

/// The packets the source guard dropped (`iptables-save -c -t raw`, and `ip6tables-save`'s,
/// see `dataplane::iptables::guard`): spoofed sources leaving pods (egress) and local pods'
/// addresses arriving from elsewhere (ingress).
pub fn parse_guard_drops(raw: &str) -> Vec<PacketFigure> {
    let counted = |text: &str, comment: &str| -> u64 {
        text.lines()
            .filter(|l| l.contains(comment))
            .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
            .sum()
    };
    [
        ("egress", "spoofed", counted(raw, "DROP-SPOOFED-SOURCE-FROM-POD")),
        ("ingress", "spoofed", counted(raw, "DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE")),
    ]
    .into_iter()
    .map(|(direction, reason, packets)| PacketFigure { direction, reason: reason.into(), packets })
    .collect()
}

/// Azure NPM's counts of the kernel's sets (`ipset save`, parsed): the layout's sets the
/// kernel holds, with the entries the kernel holds (a set the layout has and the kernel not yet,
/// or the reverse, while a change is written, is not counted).
pub fn kernel_counts(
    rules: u64,
    azure: &AzureSets,
    kernel: &BTreeMap<String, KernelSet>,
    per_set: bool,
) -> Counts {
    let mut counts = Counts { rules, ..Counts::default() };
    for (_, s) in azure.iter() {
        let Some(k) = kernel.get(&s.hash) else { continue };
        let n = k.members.len() as u64;
        counts.sets += 1;
        counts.set_entries += n;
        if per_set {
            counts.per_set.push((s.name.clone(), s.hash.clone(), n));
        }
    }
    counts.per_set.sort();
    counts
}

impl Observer for IptablesObserver {
    fn observe(&self, per_set: bool) -> Result<Figures> {
        // (Both families' rules: ip6tables' as iptables'.)
        let (save, save6) = (self.backend.save_program(), self.backend.save6_program());
        let mut filter = self.read(save, &["-c", "-t", "filter"])?;
        filter.push_str(&self.read(save6, &["-c", "-t", "filter"]).unwrap_or_default());
        let rules = parse_iptables_save(&filter);
        let sets = KernelState::parse(&self.read("ipset", &["save"])?, "").sets;
        let mut f = Figures::default();
        for (direction, packets) in
            [("ingress", rules.dropped_ingress), ("egress", rules.dropped_egress)]
        {
            f.dropped.push(PacketFigure { direction, reason: "denied".into(), packets });
        }
        // The guard's counters (an absent table counts nothing).
        let mut raw = self.read(save, &["-c", "-t", "raw"]).unwrap_or_default();
        raw.push_str(&self.read(save6, &["-c", "-t", "raw"]).unwrap_or_default());
        f.dropped.extend(parse_guard_drops(&raw));
        f.conntrack_entries = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        f.counts = Some(kernel_counts(
            rules.rules,
            &self.sets.lock().unwrap_or_else(|p| p.into_inner()),
            &sets,
            per_set,
        ));
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_drops_are_counted_by_rule() {
        let raw = "*raw\n:AZURE-NPM-GUARD - [0:0]\n[7:420] -A AZURE-NPM-GUARD -m set --match-set azure-npm-1 src,src -m set ! --match-set azure-npm-2 src,src -m comment --comment DROP-SPOOFED-SOURCE-FROM-POD -j DROP\n[2:120] -A AZURE-NPM-GUARD -m set --match-set azure-npm-3 src -m set ! --match-set azure-npm-2 src,src -m comment --comment DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE -j DROP\nCOMMIT\n";
        // (ip6tables' raw table after iptables'.)
        let v6 = "*raw\n[0:0] -A AZURE-NPM-GUARD -s fe80::/10 -d fe80::/10 -m comment --comment LINK-LOCAL-TRAFFIC-STAYS-ON-THE-NODE -j RETURN\n[5:400] -A AZURE-NPM-GUARD -m set --match-set inet6:azure-npm-1 src,src -m set ! --match-set inet6:azure-npm-2 src,src -m comment --comment DROP-SPOOFED-SOURCE-FROM-POD -j DROP\nCOMMIT\n";
        let f = parse_guard_drops(&format!("{raw}{v6}"));
        let get = |d: &str, r: &str| {
            f.iter().find(|p| p.direction == d && p.reason == r).map(|p| p.packets)
        };
        assert_eq!(get("egress", "spoofed"), Some(12));
        assert_eq!(get("ingress", "spoofed"), Some(2));
    }

    #[test]
    fn iptables_rules_and_drops() {
        let save = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [10:600]
:AZURE-NPM - [0:0]
:AZURE-NPM-INGRESS - [0:0]
:AZURE-NPM-EGRESS - [0:0]
[10:600] -A FORWARD -j AZURE-NPM
[10:600] -A AZURE-NPM -j AZURE-NPM-INGRESS
[3:180] -A AZURE-NPM-INGRESS -m set --match-set azure-npm-1 dst -m mark --mark 0x2000/0x2000 -j AZURE-NPM-ACCEPT
[4:240] -A AZURE-NPM-INGRESS -m set --match-set azure-npm-1 dst -m comment --comment \"DROP-ALL\" -j DROP
[2:120] -A AZURE-NPM-EGRESS -m set --match-set azure-npm-2 src -j DROP
[0:0] -A AZURE-NPM-EGRESS-ALLOW -j RETURN
COMMIT
";
        assert_eq!(
            parse_iptables_save(save),
            IptablesFigures { rules: 5, dropped_ingress: 4, dropped_egress: 2 }
        );
    }
}
