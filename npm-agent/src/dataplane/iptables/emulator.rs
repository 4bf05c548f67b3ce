//! The kernel's filter table and ipsets modelled on the host: it takes the very scripts the
//! dataplane gives `ipset restore` and `iptables-restore --noflush`, with their semantics
//! (ipset line by line with `-exist`; iptables atomically per `COMMIT`; sets referenced by
//! rules or lists cannot be destroyed; referenced or non-empty chains cannot be deleted), and
//! decides packets the way the FORWARD hook would for a connection's first packet. Tests hold
//! the translator's output to the specification through it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::names::{Family, split_words};
use super::saved::{KernelSet, KernelState};
use super::translate::{Batch, Tool};
use crate::model::Protocol;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSet {
    pub kind: String,
    /// hash:net entries (prefix → nomatch), hash:ip,port entries, hash:net,port entries, or
    /// list:set members.
    pub nets: BTreeMap<IpNet, bool>,
    pub ports: BTreeSet<(IpAddr, Protocol, u16)>,
    pub net_ports: BTreeSet<(IpNet, Protocol, u16)>,
    pub list: Vec<String>,
}

/// What a set match looks at: `src`, `dst`, `dst,dst` (destination address and port) or
/// `src,dst` (source address, destination port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flags {
    Src,
    Dst,
    DstPort,
    SrcDstPort,
}

impl Flags {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "src" => Ok(Flags::Src),
            "dst" => Ok(Flags::Dst),
            "dst,dst" => Ok(Flags::DstPort),
            "src,dst" => Ok(Flags::SrcDstPort),
            other => Err(format!("unsupported set flags {other}")),
        }
    }
}

/// A hash:net,port member: `10.0.0.0/8,tcp:80` (a /32 without its length).
fn parse_net_port_member(m: &str) -> Option<(IpNet, Protocol, u16)> {
    let (net, rest) = m.split_once(',')?;
    let (proto, port) = rest.split_once(':')?;
    let net = net_member(net)?;
    Some((net.trunc(), Protocol::parse(&proto.to_uppercase())?, port.parse().ok()?))
}

/// A hash:ip,port member: `10.0.0.1,tcp:80`.
fn parse_port_member(m: &str) -> Option<(IpAddr, Protocol, u16)> {
    let (ip, rest) = m.split_once(',')?;
    let (proto, port) = rest.split_once(':')?;
    Some((ip.parse().ok()?, Protocol::parse(&proto.to_uppercase())?, port.parse().ok()?))
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    text: String,
    protocol: Option<Protocol>,
    dports: Option<(u16, u16)>,
    /// `-s` and `-d`.
    src: Option<IpNet>,
    dst: Option<IpNet>,
    /// (negated, set, what it looks at)
    sets: Vec<(bool, String, Flags)>,
    /// (negated, value, mask)
    mark: Option<(bool, u32, u32)>,
    ct_new: bool,
    target: String,
    set_xmark: Option<(u32, u32)>,
}

const BUILTIN: [&str; 3] = ["INPUT", "FORWARD", "OUTPUT"];

fn hex_pair(s: &str) -> Result<(u32, u32), String> {
    let (v, m) = s.split_once('/').unwrap_or((s, "0xffffffff"));
    let p = |x: &str| {
        u32::from_str_radix(x.trim_start_matches("0x"), 16)
            .map_err(|e| format!("bad mark {s}: {e}"))
    };
    Ok((p(v)?, p(m)?))
}

fn parse_rule(text: &str) -> Result<Rule, String> {
    let w = split_words(text);
    // As iptables-save prints it: only the comment is a quoted string.
    let canonical =
        w.iter()
            .enumerate()
            .map(|(i, x)| {
                if i > 0 && w[i - 1] == "--comment" {
                    super::names::quote_word(x)
                } else {
                    x.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    let mut r = Rule {
        text: canonical,
        protocol: None,
        dports: None,
        src: None,
        dst: None,
        sets: Vec::new(),
        mark: None,
        ct_new: false,
        target: String::new(),
        set_xmark: None,
    };
    let mut i = 0;
    let next = |i: &mut usize| -> Result<&String, String> {
        *i += 1;
        w.get(*i).ok_or_else(|| format!("rule ends early: {text}"))
    };
    while i < w.len() {
        match w[i].as_str() {
            "-p" => {
                r.protocol = Some(
                    Protocol::parse(&next(&mut i)?.to_uppercase())
                        .ok_or_else(|| format!("protocol in {text}"))?,
                )
            }
            "-m" => {
                next(&mut i)?;
            }
            "-s" | "-d" => {
                let flag = w[i].clone();
                let v = next(&mut i)?;
                let net: IpNet = v.parse().map_err(|_| format!("address {v} in {text}"))?;
                if flag == "-s" {
                    r.src = Some(net);
                } else {
                    r.dst = Some(net);
                }
            }
            "--dport" => {
                let v = next(&mut i)?;
                let (a, b) = v.split_once(':').unwrap_or((v, v));
                r.dports = Some((
                    a.parse().map_err(|_| format!("port {v}"))?,
                    b.parse().map_err(|_| format!("port {v}"))?,
                ));
            }
            "!" if w.get(i + 1).map(String::as_str) == Some("--mark") => {
                i += 1;
                let (v, m) = hex_pair(next(&mut i)?)?;
                r.mark = Some((true, v, m));
            }
            "!" => {
                if w.get(i + 1).map(String::as_str) != Some("--match-set") {
                    return Err(format!("unsupported negation in {text}"));
                }
                i += 1;
                let name = next(&mut i)?.clone();
                let d = next(&mut i)?.clone();
                r.sets.push((true, name, Flags::parse(&d)?));
            }
            "--match-set" => {
                let name = next(&mut i)?.clone();
                let d = next(&mut i)?.clone();
                r.sets.push((false, name, Flags::parse(&d)?));
            }
            "--mark" => {
                let (v, m) = hex_pair(next(&mut i)?)?;
                r.mark = Some((false, v, m));
            }
            "--ctstate" => r.ct_new = next(&mut i)?.split(',').any(|s| s == "NEW"),
            "--comment" => {
                next(&mut i)?;
            }
            "-j" => r.target = next(&mut i)?.clone(),
            "--set-xmark" => r.set_xmark = Some(hex_pair(next(&mut i)?)?),
            other => return Err(format!("the model does not know {other:?} in {text}")),
        }
        i += 1;
    }
    if r.target.is_empty() {
        return Err(format!("rule without target: {text}"));
    }
    Ok(r)
}

/// The filter tables (iptables' and ip6tables') and the sets (one namespace for both
/// families, as in the kernel) of one network namespace.
#[derive(Clone, Debug)]
pub struct TableEmulator {
    pub sets: BTreeMap<String, ModelSet>,
    /// iptables' filter table.
    chains: BTreeMap<String, Vec<Rule>>,
    /// ip6tables'.
    chains6: BTreeMap<String, Vec<Rule>>,
}

impl Default for TableEmulator {
    fn default() -> Self {
        let builtin = || BUILTIN.iter().map(|c| (c.to_string(), Vec::new())).collect();
        Self { sets: BTreeMap::new(), chains: builtin(), chains6: builtin() }
    }
}

/// A connection's first packet.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub dport: u16,
}

impl TableEmulator {
    pub fn apply(&mut self, batch: &Batch) -> Result<(), String> {
        match batch.tool {
            Tool::Ipset => self.apply_ipset(&batch.script),
            Tool::Iptables => self.apply_rules(Family::V4, &batch.script),
            Tool::Ip6tables => self.apply_rules(Family::V6, &batch.script),
        }
    }

    fn table(&self, f: Family) -> &BTreeMap<String, Vec<Rule>> {
        match f {
            Family::V4 => &self.chains,
            Family::V6 => &self.chains6,
        }
    }

    fn table_mut(&mut self, f: Family) -> &mut BTreeMap<String, Vec<Rule>> {
        match f {
            Family::V4 => &mut self.chains,
            Family::V6 => &mut self.chains6,
        }
    }

    fn set_referenced(&self, name: &str) -> bool {
        let tables = self.chains.values().chain(self.chains6.values());
        self.sets.values().any(|s| s.list.iter().any(|m| m == name))
            || tables.flatten().any(|r| r.sets.iter().any(|(_, s, _)| s == name))
    }

    /// `ipset -exist restore`: line by line, stopping at the first error (earlier lines stay).
    pub fn apply_ipset(&mut self, script: &str) -> Result<(), String> {
        for (n, line) in script.lines().enumerate() {
            let err = |m: String| format!("ipset v7: Error in line {}: {m}", n + 1);
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                [] => {}
                ["create", name, kind, ..] => match self.sets.get(*name) {
                    Some(s) if s.kind != *kind => {
                        return Err(err(
                            "Set cannot be created: set with the same name already exists".into(),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        if !["hash:net", "hash:ip,port", "hash:net,port", "list:set"].contains(kind)
                        {
                            return Err(err(format!("unknown type {kind}")));
                        }
                        self.sets.insert(
                            name.to_string(),
                            ModelSet { kind: kind.to_string(), ..ModelSet::default() },
                        );
                    }
                },
                ["add", name, member, rest @ ..] => {
                    let nomatch = rest == ["nomatch"];
                    let member_exists = self.sets.contains_key(*member);
                    let s = self
                        .sets
                        .get_mut(*name)
                        .ok_or_else(|| err("The set with the given name does not exist".into()))?;
                    if s.kind == "list:set" {
                        if !member_exists {
                            return Err(err(
                                "Set to be added/deleted/tested as element does not exist".into(),
                            ));
                        }
                        if !s.list.iter().any(|m| m == member) {
                            s.list.push(member.to_string());
                        }
                    } else if s.kind == "hash:ip,port" {
                        s.ports.insert(
                            parse_port_member(member)
                                .ok_or_else(|| err(format!("bad element {member}")))?,
                        );
                    } else if s.kind == "hash:net,port" {
                        s.net_ports.insert(
                            parse_net_port_member(member)
                                .ok_or_else(|| err(format!("bad element {member}")))?,
                        );
                    } else {
                        let net = net_member(member)
                            .ok_or_else(|| err(format!("bad element {member}")))?;
                        if net.prefix_len() == 0 {
                            return Err(err("hash:net cannot hold /0".into()));
                        }
                        s.nets.insert(net.trunc(), nomatch);
                    }
                }
                ["del", name, member, ..] => {
                    let s = self
                        .sets
                        .get_mut(*name)
                        .ok_or_else(|| err("The set with the given name does not exist".into()))?;
                    if s.kind == "list:set" {
                        s.list.retain(|m| m != member);
                    } else if s.kind == "hash:ip,port" {
                        s.ports.remove(
                            &parse_port_member(member)
                                .ok_or_else(|| err(format!("bad element {member}")))?,
                        );
                    } else if s.kind == "hash:net,port" {
                        s.net_ports.remove(
                            &parse_net_port_member(member)
                                .ok_or_else(|| err(format!("bad element {member}")))?,
                        );
                    } else {
                        let net = net_member(member)
                            .ok_or_else(|| err(format!("bad element {member}")))?;
                        s.nets.remove(&net.trunc());
                    }
                }
                ["flush", name] => {
                    let s = self
                        .sets
                        .get_mut(*name)
                        .ok_or_else(|| err("The set with the given name does not exist".into()))?;
                    s.nets.clear();
                    s.ports.clear();
                    s.net_ports.clear();
                    s.list.clear();
                }
                ["destroy", name] => {
                    if !self.sets.contains_key(*name) {
                        return Err(err("The set with the given name does not exist".into()));
                    }
                    if self.set_referenced(name) {
                        return Err(err(
                            "Set cannot be destroyed: it is in use by a kernel component".into(),
                        ));
                    }
                    self.sets.remove(*name);
                }
                _ => return Err(err(format!("unsupported command {line:?}"))),
            }
        }
        Ok(())
    }

    /// `iptables-restore --noflush`: every table section commits atomically or not at all.
    pub fn apply_iptables(&mut self, script: &str) -> Result<(), String> {
        self.apply_rules(Family::V4, script)
    }

    /// `iptables-restore` or `ip6tables-restore --noflush`: atomically per `COMMIT`.
    pub fn apply_rules(&mut self, f: Family, script: &str) -> Result<(), String> {
        let mut work: Option<BTreeMap<String, Vec<Rule>>> = None;
        for (n, line) in script.lines().enumerate() {
            let err = |m: String| format!("iptables-restore: line {} failed: {m}", n + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "*filter" {
                work = Some(self.table(f).clone());
                continue;
            }
            let chains = work.as_mut().ok_or_else(|| err("no table".into()))?;
            if line == "COMMIT" {
                // Sets referenced by rules must exist.
                for r in chains.values().flatten() {
                    for (_, s, _) in &r.sets {
                        if !self.sets.contains_key(s) {
                            return Err(err(format!("Set {s} doesn't exist.")));
                        }
                    }
                }
                *self.table_mut(f) = work.take().expect("table");
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap_or_default().to_string();
                if !BUILTIN.contains(&name.as_str()) {
                    chains.insert(name, Vec::new());
                }
                continue;
            }
            let w = split_words(line);
            let chain = w.get(1).cloned().unwrap_or_default();
            let exists = chains.contains_key(&chain);
            match w.first().map(String::as_str) {
                Some("-A") | Some("-I") | Some("-D") => {
                    if !exists {
                        return Err(err(format!("chain {chain} does not exist")));
                    }
                    let (pos, rest) =
                        match (w[0].as_str(), w.get(2).and_then(|p| p.parse::<usize>().ok())) {
                            ("-I", Some(p)) => (p, &w[3..]),
                            ("-I", None) => (1, &w[2..]),
                            _ => (0, &w[2..]),
                        };
                    let text = rest.iter().map(|x| names_quote(x)).collect::<Vec<_>>().join(" ");
                    let rule = parse_rule(&text).map_err(err)?;
                    let t = &rule.target;
                    if !["ACCEPT", "DROP", "RETURN", "MARK"].contains(&t.as_str())
                        && !chains.contains_key(t)
                    {
                        return Err(err(format!("Couldn't load target `{t}'")));
                    }
                    let rules = chains.get_mut(&chain).expect("exists");
                    match w[0].as_str() {
                        "-A" => rules.push(rule),
                        "-I" => {
                            if pos == 0 || pos > rules.len() + 1 {
                                return Err(err("Index of insertion too big".into()));
                            }
                            rules.insert(pos - 1, rule);
                        }
                        _ => match rules.iter().position(|r| r.text == rule.text) {
                            Some(p) => {
                                rules.remove(p);
                            }
                            None => {
                                return Err(err(
                                    "Bad rule (does a matching rule exist in that chain?)".into(),
                                ));
                            }
                        },
                    }
                }
                Some("-F") => {
                    chains
                        .get_mut(&chain)
                        .ok_or_else(|| err(format!("chain {chain} does not exist")))?
                        .clear();
                }
                Some("-X") => {
                    let rules = chains
                        .get(&chain)
                        .ok_or_else(|| err(format!("chain {chain} does not exist")))?;
                    if !rules.is_empty() {
                        return Err(err(format!("chain {chain} is not empty")));
                    }
                    if chains.values().flatten().any(|r| r.target == chain) {
                        return Err(err(format!("chain {chain} is referenced")));
                    }
                    chains.remove(&chain);
                }
                _ => return Err(err(format!("unsupported line {line:?}"))),
            }
        }
        if work.is_some() {
            return Err("iptables-restore: missing COMMIT".into());
        }
        Ok(())
    }

    /// The model as `ipset save` and `iptables-save` would print it (only what the parser
    /// of [`KernelState`] reads).
    pub fn save(&self) -> (String, String) {
        self.save_of(Family::V4)
    }

    /// The same with `ip6tables-save`'s rules for IPv6 (every set either way).
    pub fn save_of(&self, f: Family) -> (String, String) {
        let mut ipset = String::new();
        for (name, s) in &self.sets {
            ipset.push_str(&format!("create {name} {} family inet\n", s.kind));
            for (net, nomatch) in &s.nets {
                let m = if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                ipset.push_str(&format!(
                    "add {name} {m}{}\n",
                    if *nomatch { " nomatch" } else { "" }
                ));
            }
            for (ip, proto, port) in &s.ports {
                ipset.push_str(&format!(
                    "add {name} {ip},{}:{port}\n",
                    proto.as_str().to_lowercase()
                ));
            }
            for (net, proto, port) in &s.net_ports {
                let n = if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                ipset.push_str(&format!(
                    "add {name} {n},{}:{port}\n",
                    proto.as_str().to_lowercase()
                ));
            }
            for m in &s.list {
                ipset.push_str(&format!("add {name} {m}\n"));
            }
        }
        let mut ipt = String::from("*filter\n");
        for c in self.table(f).keys() {
            let policy = if BUILTIN.contains(&c.as_str()) { "ACCEPT" } else { "-" };
            ipt.push_str(&format!(":{c} {policy} [0:0]\n"));
        }
        for (c, rules) in self.table(f) {
            for r in rules {
                ipt.push_str(&format!("-A {c} {}\n", r.text));
            }
        }
        ipt.push_str("COMMIT\n");
        (ipset, ipt)
    }

    /// What a reconcile would read from this kernel (IPv4's rules, every set).
    pub fn state(&self) -> KernelState {
        self.state_of(Family::V4)
    }

    /// The same with a family's rules.
    pub fn state_of(&self, f: Family) -> KernelState {
        let (a, b) = self.save_of(f);
        KernelState::parse(&a, &b)
    }

    /// Whether the model holds nothing but the empty built-in chains.
    pub fn is_clean(&self) -> bool {
        self.sets.is_empty()
            && [&self.chains, &self.chains6]
                .iter()
                .all(|t| t.len() == BUILTIN.len() && t.values().all(Vec::is_empty))
    }

    /// The names of the user chains (IPv4's).
    pub fn chain_names(&self) -> BTreeSet<String> {
        self.chain_names_of(Family::V4)
    }

    pub fn chain_names_of(&self, f: Family) -> BTreeSet<String> {
        self.table(f).keys().filter(|c| !BUILTIN.contains(&c.as_str())).cloned().collect()
    }

    /// The rules of a chain, as `iptables-save` prints them after `-A CHAIN ` (IPv4's).
    pub fn rules(&self, chain: &str) -> Vec<String> {
        self.rules_of(Family::V4, chain)
    }

    pub fn rules_of(&self, f: Family, chain: &str) -> Vec<String> {
        self.table(f)
            .get(chain)
            .map(|r| r.iter().map(|r| r.text.clone()).collect())
            .unwrap_or_default()
    }

    fn in_set(&self, name: &str, p: &Packet, flags: Flags, depth: usize) -> bool {
        let Some(s) = self.sets.get(name) else { return false };
        if s.kind == "list:set" {
            return depth < 4 && s.list.iter().any(|m| self.in_set(m, p, flags, depth + 1));
        }
        let ip = if matches!(flags, Flags::Src | Flags::SrcDstPort) { p.src } else { p.dst };
        if s.kind == "hash:net,port" {
            // (Only `src,dst` and `dst,dst`: the address, then the destination port.)
            return matches!(flags, Flags::SrcDstPort | Flags::DstPort)
                && s.net_ports
                    .iter()
                    .any(|(n, pr, port)| n.contains(&ip) && *pr == p.protocol && *port == p.dport);
        }
        if s.kind == "hash:ip,port" {
            // (A `src`/`dst` match of a hash:ip,port set compares no port: never the case here.)
            return flags == Flags::DstPort && s.ports.contains(&(ip, p.protocol, p.dport));
        }
        // The most specific entry decides (nomatch entries exclude).
        s.nets
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .is_some_and(|(_, nomatch)| !nomatch)
    }

    fn walk(
        &self,
        chain: &str,
        p: &Packet,
        mark: &mut u32,
        depth: usize,
        trace: &mut Option<&mut Vec<(String, String)>>,
    ) -> Option<bool> {
        // (Deeper than any layout nests: a loop in tables read from a node is not followed.)
        if depth >= 16 {
            return Some(false);
        }
        for r in self.table(Family::of(p.src)).get(chain)? {
            if r.src.is_some_and(|n| !n.contains(&p.src))
                || r.dst.is_some_and(|n| !n.contains(&p.dst))
            {
                continue;
            }
            if r.protocol.is_some_and(|pr| pr != p.protocol) {
                continue;
            }
            if let Some((a, b)) = r.dports
                && !(a..=b).contains(&p.dport)
            {
                continue;
            }
            if r.sets.iter().any(|(neg, s, flags)| self.in_set(s, p, *flags, 0) == *neg) {
                continue;
            }
            if r.mark.is_some_and(|(neg, v, m)| (*mark & m == v) == neg) {
                continue;
            }
            if let Some(t) = trace.as_deref_mut() {
                t.push((chain.to_string(), r.text.clone()));
            }
            // Every packet decided here is a connection's first (conntrack NEW).
            match r.target.as_str() {
                "ACCEPT" => return Some(true),
                "DROP" => return Some(false),
                "RETURN" => return None,
                "MARK" => {
                    if let Some((v, m)) = r.set_xmark {
                        *mark = (*mark & !m) ^ v;
                    }
                }
                t => {
                    if let Some(v) = self.walk(t, p, mark, depth + 1, trace) {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    /// The agent's part of a node's tables as `iptables-save -t filter` and `ipset save`
    /// print them: the `azure-npm-` sets and the `AZURE-NPM` chains, with FORWARD's jumps to
    /// them (what else the node holds is not the agent's and is left out).
    pub fn from_saved(iptables_save: &str, ipset_save: &str) -> Result<Self, String> {
        Self::from_saved_of(Family::V4, iptables_save, ipset_save)
    }

    /// The same with a family's rules (`ip6tables-save`'s for IPv6).
    pub fn from_saved_of(f: Family, iptables_save: &str, ipset_save: &str) -> Result<Self, String> {
        let mut t = TableEmulator::default();
        // The filter table's sets: the source guard's (`hash:net,iface`, in the raw table)
        // are not modelled.
        let modelled: BTreeSet<&str> = ipset_save
            .lines()
            .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["create", name, kind, ..]
                    if super::names::is_layout_set(name)
                        && ["hash:net", "hash:ip,port", "hash:net,port", "list:set"]
                            .contains(kind) =>
                {
                    Some(*name)
                }
                _ => None,
            })
            .collect();
        let ours = |l: &&str| l.split_whitespace().nth(1).is_some_and(|n| modelled.contains(n));
        let (creates, adds): (Vec<&str>, Vec<&str>) =
            ipset_save.lines().filter(ours).partition(|l| l.starts_with("create "));
        t.apply_ipset(&(creates.join("\n") + "\n" + &adds.join("\n")))?;
        let mut script = String::from("*filter\n");
        for line in iptables_save.lines() {
            let keep = line.starts_with(":AZURE-NPM")
                || line.starts_with("-A AZURE-NPM")
                || (line.starts_with("-A FORWARD ") && line.ends_with(" -j AZURE-NPM"));
            if keep {
                script.push_str(line);
                script.push('\n');
            }
        }
        script.push_str("COMMIT\n");
        t.apply_rules(f, &script)?;
        Ok(t)
    }

    /// [`TableEmulator::forward`], with every rule that matched on the way, in order (chain,
    /// rule): what `npm-agent debug gettuples` prints.
    pub fn trace(&self, p: &Packet) -> (bool, Vec<(String, String)>) {
        let mut mark = 0;
        let mut steps = Vec::new();
        let verdict = self.walk("FORWARD", p, &mut mark, 0, &mut Some(&mut steps)).unwrap_or(true);
        (verdict, steps)
    }

    /// Whether the FORWARD hook lets a connection's first packet through (policy ACCEPT).
    pub fn forward(&self, p: &Packet) -> bool {
        let mut mark = 0;
        self.walk("FORWARD", p, &mut mark, 0, &mut None).unwrap_or(true)
    }
}

fn names_quote(w: &str) -> String {
    super::names::quote_word(w)
}

impl From<&TableEmulator> for KernelState {
    fn from(m: &TableEmulator) -> Self {
        m.state()
    }
}

/// A set as the parser reads it (for tests comparing with the kernel).
pub fn kernel_set(kind: &str, members: &[&str]) -> KernelSet {
    KernelSet { kind: kind.into(), members: members.iter().map(|m| m.to_string()).collect() }
}

/// A hash:net member as `ipset` takes it: a block, or an address (a /32).
fn net_member(member: &str) -> Option<IpNet> {
    member.parse().ok().or_else(|| member.parse::<IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomatch_and_lists() {
        let mut m = TableEmulator::default();
        m.apply_ipset("create a hash:net family inet\nadd a 10.0.0.0/16\nadd a 10.0.1.0/24 nomatch\ncreate b hash:net family inet\nadd b 10.0.1.5\ncreate l list:set\nadd l a\nadd l b\n").unwrap();
        let to = |ip: &str| Packet {
            src: "192.0.2.1".parse().unwrap(),
            dst: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            dport: 80,
        };
        assert!(m.in_set("a", &to("10.0.2.1"), Flags::Dst, 0));
        assert!(!m.in_set("a", &to("10.0.1.1"), Flags::Dst, 0));
        assert!(!m.in_set("a", &to("10.0.2.1"), Flags::Src, 0));
        assert!(m.in_set("l", &to("10.0.1.5"), Flags::Dst, 0));
        assert!(m.apply_ipset("destroy a\n").is_err(), "referenced by the list");
        assert!(m.apply_ipset("destroy l\ndestroy a\n").is_ok());
    }

    #[test]
    fn named_ports_match_address_protocol_and_port() {
        let mut m = TableEmulator::default();
        m.apply_ipset("create p hash:ip,port family inet\nadd p 10.0.0.1,tcp:8080\n").unwrap();
        let p = |dst: &str, protocol, dport| Packet {
            src: "10.0.0.9".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            dport,
        };
        assert!(m.in_set("p", &p("10.0.0.1", Protocol::Tcp, 8080), Flags::DstPort, 0));
        assert!(!m.in_set("p", &p("10.0.0.1", Protocol::Udp, 8080), Flags::DstPort, 0));
        assert!(!m.in_set("p", &p("10.0.0.1", Protocol::Tcp, 80), Flags::DstPort, 0));
        assert!(!m.in_set("p", &p("10.0.0.2", Protocol::Tcp, 8080), Flags::DstPort, 0));
        m.apply_ipset("del p 10.0.0.1,tcp:8080\n").unwrap();
        assert!(m.sets["p"].ports.is_empty());
    }

    #[test]
    fn iptables_is_atomic() {
        let mut m = TableEmulator::default();
        m.apply_iptables("*filter\n:X - [0:0]\n-A X -j ACCEPT\n-A FORWARD -j X\nCOMMIT\n").unwrap();
        let before = m.rules("FORWARD");
        assert!(m.apply_iptables("*filter\n-F FORWARD\n-A FORWARD -j NOPE\nCOMMIT\n").is_err());
        assert_eq!(m.rules("FORWARD"), before);
        assert!(m.apply_iptables("*filter\n-X X\nCOMMIT\n").is_err(), "referenced and not empty");
    }
}
