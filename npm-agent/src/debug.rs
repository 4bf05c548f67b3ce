//! `npm-agent debug`: Azure NPM's debug commands under the names its users know, answering
//! from a node's iptables layout (the tables the agent wrote, read live or from saved
//! files):
//! - `gettuples -s SRC -d DST [--port 80/TCP]`: the rules a new connection walks through the
//!   AZURE-NPM chains, each with its chain and comment, and the verdict;
//! - `convertiptable`: the AZURE-NPM chains as JSON (each rule's sets with their match
//!   flags, its ports, comment and target).
//!
//! In eBPF mode `gettuples` answers from the maps the agent pinned: they are read into the
//! host model of the maps, which runs the programs' own decision code (`npm_common::decide`)
//! on the connection's first packet at each end's veth.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow};
use serde::Serialize;

use crate::dataplane::iptables::emulator::{Packet, TableEmulator};
use crate::dataplane::iptables::names::{Family, split_words};
use crate::dataplane::iptables::{Backend, Runner, detect_backend};
use crate::explain::parse_port;

/// Where the tables come from: the node (the backend the agent uses) or saved files.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub iptables_save: Option<PathBuf>,
    pub ipset_save: Option<PathBuf>,
}

impl Tables {
    /// `(iptables-save -t filter, ipset save)`, or `ip6tables-save`'s for IPv6 (a file given
    /// is read as the family's).
    pub fn read(&self, family: Family) -> anyhow::Result<(String, String)> {
        let runner = Runner::new(None);
        let rules = match &self.iptables_save {
            Some(p) => crate::input::read_file(p)?,
            None => {
                // The backend holding the agent's chains (the one kube-proxy hints at, else
                // the other).
                let (hinted, _) = detect_backend(&runner);
                let read = |b: Backend| runner.read(b.save_for(family), &["-t", "filter"]);
                let first = read(hinted).map_err(|e| anyhow!(e))?;
                if first.lines().any(|l| l.starts_with(":AZURE-NPM ")) {
                    first
                } else {
                    read(hinted.other())
                        .ok()
                        .filter(|t| t.lines().any(|l| l.starts_with(":AZURE-NPM ")))
                        .unwrap_or(first)
                }
            }
        };
        let sets = match &self.ipset_save {
            Some(p) => crate::input::read_file(p)?,
            None => runner.read("ipset", &["save"]).map_err(|e| anyhow!(e))?,
        };
        Ok((rules, sets))
    }
}

/// The exit status of a command whose answer is a verdict: 0 allowed, 1 dropped, 2 error.
fn verdict_exit(command: &str, result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("npm-agent debug {command}: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn address(s: &str) -> anyhow::Result<IpAddr> {
    s.parse::<IpAddr>().with_context(|| format!("{s:?}: not an address"))
}

/// `npm-agent debug gettuples` in eBPF mode: the verdict of each end's program, from the maps
/// pinned under `pin_root`.
pub fn gettuples_ebpf(pin_root: &std::path::Path, src: &str, dst: &str, port: &str) -> ExitCode {
    use npm_common::{DIR_EGRESS, DIR_INGRESS};
    let run = || -> anyhow::Result<bool> {
        let maps = crate::dataplane::ebpf::observe::pinned_model(&pin_root.join("maps"))?;
        let (dport, protocol) = parse_port(port)?;
        let ip = |a: &str| a.parse::<IpAddr>().with_context(|| format!("{a:?}: not an address"));
        let (s, d) = (ip(src)?, ip(dst)?);
        anyhow::ensure!(s.is_ipv4() == d.is_ipv4(), "{src} -> {dst}: addresses of two families");
        let mut out = String::new();
        let mut allowed = true;
        for (dir, name, end) in [(DIR_EGRESS, "egress", s), (DIR_INGRESS, "ingress", d)] {
            let line = match maps.first_packet(dir, s, d, protocol.number(), dport) {
                None => {
                    format!("  {name} at {end}: no program attached (not a pod of this node)\n")
                }
                Some(reason) => {
                    allowed &= reason.allowed();
                    let ep = maps.endpoints.get(&crate::dataplane::ebpf::addr_key(end));
                    format!(
                        "  {name} at {end}'s veth (ifindex {}): {} ({}), endpoint flags {:#x}, profiles ingress {} egress {}\n",
                        ep.map_or(0, |e| e.ifindex),
                        if reason.allowed() { "passed" } else { "DROPPED" },
                        reason.name(),
                        ep.map_or(0, |e| e.flags),
                        ep.map_or(0, |e| e.profiles[usize::from(DIR_INGRESS)]),
                        ep.map_or(0, |e| e.profiles[usize::from(DIR_EGRESS)]),
                    )
                }
            };
            out.push_str(&line);
        }
        let id = |ip: IpAddr| {
            let key = crate::dataplane::ebpf::addr_key(ip);
            maps.identities.get(&key).map_or_else(|| "none".to_string(), u32::to_string)
        };
        out.push_str(&format!("  identities: {s} {}, {d} {}\n", id(s), id(d)));
        let head = format!(
            "{src} -> {dst} {protocol}/{dport}, a new connection: {} (eBPF maps under {})\n",
            if allowed { "ALLOWED" } else { "DROPPED" },
            pin_root.display()
        );
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), (head + &out).as_bytes());
        Ok(allowed)
    };
    verdict_exit("gettuples", run())
}

/// `npm-agent debug gettuples` in iptables mode.
pub fn gettuples(tables: &Tables, src: &str, dst: &str, port: &str) -> ExitCode {
    let run = || -> anyhow::Result<bool> {
        let (s, d) = (address(src)?, address(dst)?);
        anyhow::ensure!(s.is_ipv4() == d.is_ipv4(), "{src} -> {dst}: addresses of two families");
        // (IPv6 is judged by ip6tables' rules and the `inet6:` sets.)
        let (rules, sets) = tables.read(Family::of(s))?;
        let t = TableEmulator::from_saved(&rules, &sets).map_err(|e| anyhow!(e))?;
        let (dport, protocol) = parse_port(port)?;
        let p = Packet { src: s, dst: d, protocol, dport };
        let (allowed, steps) = t.trace(&p);
        let mut out = format!(
            "{src} -> {dst} {protocol}/{dport}, a new connection: {}\n",
            if allowed { "ALLOWED" } else { "DROPPED" }
        );
        if steps.is_empty() {
            out.push_str("  no AZURE-NPM rule matched (no policy isolates either end here)\n");
        }
        for (chain, rule) in steps {
            out.push_str(&format!("  {chain}: {rule}\n"));
        }
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes());
        Ok(allowed)
    };
    verdict_exit("gettuples", run())
}

/// One set match of a rule.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SetMatch {
    pub set: String,
    pub flags: String,
    pub negated: bool,
}

/// One rule of an AZURE-NPM chain, taken apart.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RuleDoc {
    pub chain: String,
    pub rule: String,
    pub sets: Vec<SetMatch>,
    pub protocol: Option<String>,
    pub dport: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub comment: Option<String>,
    pub target: Option<String>,
}

/// The rules of the AZURE-NPM chains of `iptables-save` text, taken apart.
pub fn convert(iptables_save: &str) -> Vec<RuleDoc> {
    let mut out = Vec::new();
    for line in iptables_save.lines() {
        let Some(rest) = line.strip_prefix("-A ") else { continue };
        let words = split_words(rest);
        let Some(chain) = words.first().filter(|c| c.starts_with("AZURE-NPM")) else { continue };
        let mut doc = RuleDoc {
            chain: chain.clone(),
            rule: rest[chain.len()..].trim().to_string(),
            sets: Vec::new(),
            protocol: None,
            dport: None,
            source: None,
            destination: None,
            comment: None,
            target: None,
        };
        let mut negated = false;
        let mut i = 1;
        while i < words.len() {
            let next = words.get(i + 1).cloned();
            match words[i].as_str() {
                "!" => negated = true,
                "--match-set" => {
                    doc.sets.push(SetMatch {
                        set: next.unwrap_or_default(),
                        flags: words.get(i + 2).cloned().unwrap_or_default(),
                        negated,
                    });
                    negated = false;
                    i += 2;
                }
                "-p" => doc.protocol = next,
                "--dport" => doc.dport = next,
                "-s" => doc.source = next,
                "-d" => doc.destination = next,
                "--comment" => doc.comment = next,
                "-j" => doc.target = next,
                _ => {}
            }
            i += 1;
        }
        out.push(doc);
    }
    out
}

/// `npm-agent debug convertiptable`.
pub fn convertiptable(tables: &Tables) -> ExitCode {
    let run = || -> anyhow::Result<()> {
        let (rules, _) = tables.read(Family::V4)?;
        let json = serde_json::to_string_pretty(&convert(&rules))? + "\n";
        let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), json.as_bytes());
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("npm-agent debug convertiptable: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_taken_apart() {
        let save = "*filter\n:AZURE-NPM-INGRESS-1 - [0:0]\n-A AZURE-NPM-INGRESS-1 -p tcp -m tcp --dport 80 -m set --match-set azure-npm-2 src -m set ! --match-set azure-npm-3 src -m comment --comment \"ALLOW-FROM-ns-x AND NOT podlabel-a\" -j AZURE-NPM-INGRESS-ALLOW-MARK\n-A FORWARD -j KUBE-FORWARD\nCOMMIT\n";
        let docs = convert(save);
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(d.chain, "AZURE-NPM-INGRESS-1");
        assert_eq!((d.protocol.as_deref(), d.dport.as_deref()), (Some("tcp"), Some("80")));
        assert_eq!(
            d.sets,
            vec![
                SetMatch { set: "azure-npm-2".into(), flags: "src".into(), negated: false },
                SetMatch { set: "azure-npm-3".into(), flags: "src".into(), negated: true },
            ]
        );
        assert_eq!(d.comment.as_deref(), Some("ALLOW-FROM-ns-x AND NOT podlabel-a"));
        assert_eq!(d.target.as_deref(), Some("AZURE-NPM-INGRESS-ALLOW-MARK"));
    }
}
