//! What the kernel holds, as `ipset save` and `iptables-save -t filter` print it: the input of
//! a reconcile. Only the layout's own objects are kept (sets named `azure-npm-…`, chains named
//! `AZURE-NPM…`) and FORWARD's rules (for the jump).

use std::collections::{BTreeMap, BTreeSet};

use super::names::CHAIN_PREFIX;
use super::names::is_layout_set;

/// One set: its type (`hash:net`, `list:set`, …) and members as `ipset save` prints them
/// (`10.0.0.1`, `10.0.0.0/16`, `10.0.1.0/24 nomatch`, a set name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSet {
    pub kind: String,
    pub members: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    pub sets: BTreeMap<String, KernelSet>,
    /// The layout's chains and their rules (each as printed after `-A CHAIN `).
    pub chains: BTreeMap<String, Vec<String>>,
    /// FORWARD's rules, in order.
    pub forward: Vec<String>,
}

impl KernelState {
    /// Parses `ipset save` and `iptables-save -t filter` output.
    pub fn parse(ipset_save: &str, iptables_save: &str) -> KernelState {
        let mut k = KernelState::default();
        for line in ipset_save.lines() {
            let mut words = line.splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("create"), Some(name), Some(rest)) if is_layout_set(name) => {
                    let kind = rest.split(' ').next().unwrap_or_default().to_string();
                    k.sets.entry(name.to_string()).or_default().kind = kind;
                }
                (Some("add"), Some(name), Some(member)) if is_layout_set(name) => {
                    k.sets
                        .entry(name.to_string())
                        .or_default()
                        .members
                        .insert(member.trim().to_string());
                }
                _ => {}
            }
        }
        let mut in_filter = false;
        for line in iptables_save.lines() {
            if let Some(table) = line.strip_prefix('*') {
                in_filter = table.trim() == "filter";
                continue;
            }
            if !in_filter {
                continue;
            }
            if line == "COMMIT" {
                in_filter = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap_or_default();
                if name.starts_with(CHAIN_PREFIX) {
                    k.chains.entry(name.to_string()).or_default();
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                if chain == "FORWARD" {
                    k.forward.push(spec.to_string());
                } else if chain.starts_with(CHAIN_PREFIX) {
                    k.chains.entry(chain.to_string()).or_default().push(spec.to_string());
                }
            }
        }
        k
    }

    /// Whether the kernel holds anything of the layout.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
            && self.chains.is_empty()
            && !self.forward.iter().any(|r| jumps_to_azure_npm(r))
    }
}

/// Whether a FORWARD rule jumps to `AZURE-NPM`.
pub fn jumps_to_azure_npm(spec: &str) -> bool {
    spec.ends_with("-j AZURE-NPM") || spec.contains("-j AZURE-NPM ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_save_output() {
        let ipset = "create azure-npm-1 hash:net family inet hashsize 1024 maxelem 4294967295 bucketsize 12 initval 0x1\n\
                     add azure-npm-1 10.0.0.0/16\nadd azure-npm-1 10.0.1.0/24 nomatch\ncreate other hash:ip family inet\nadd other 1.2.3.4\n\
                     create azure-npm-2 list:set size 8\nadd azure-npm-2 azure-npm-1\n";
        let ipt = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:AZURE-NPM - [0:0]\n:AZURE-NPM-ACCEPT - [0:0]\n\
                   -A FORWARD -m conntrack --ctstate INVALID,NEW -j AZURE-NPM\n-A AZURE-NPM-ACCEPT -j ACCEPT\nCOMMIT\n";
        let k = KernelState::parse(ipset, ipt);
        assert_eq!(k.sets.len(), 2);
        assert_eq!(k.sets["azure-npm-1"].kind, "hash:net");
        assert!(k.sets["azure-npm-1"].members.contains("10.0.1.0/24 nomatch"));
        assert_eq!(k.sets["azure-npm-2"].kind, "list:set");
        assert_eq!(k.chains["AZURE-NPM"], Vec::<String>::new());
        assert_eq!(k.chains["AZURE-NPM-ACCEPT"], vec!["-j ACCEPT".to_string()]);
        assert_eq!(k.forward, vec!["-m conntrack --ctstate INVALID,NEW -j AZURE-NPM".to_string()]);
        assert!(jumps_to_azure_npm(&k.forward[0]));
        assert!(!jumps_to_azure_npm("-j AZURE-NPM-ACCEPT"));
    }
}
