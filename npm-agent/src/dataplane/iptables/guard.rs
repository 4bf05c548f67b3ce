//! What the policy layout cannot say because it needs the pods' interfaces, which only the
//! node knows: a pod sends only from its own address, a local pod's address never comes in
//! from elsewhere, and (until IPv6 is enforced) an isolated pod neither sends nor receives
//! IPv6.
//!
//! - `raw` table, `AZURE-NPM-GUARD` (jumped to first from PREROUTING, before conntrack sees a
//!   packet, so a forged packet leaves no conntrack entry behind):
//!   - a packet entering through a pod's veth (`pod-interfaces`, hash:net,iface of
//!     `0.0.0.0/0,<veth>`) whose (source, interface) is not that pod's (`pod-sources`,
//!     `<ip>,<veth>`) is dropped;
//!   - a packet whose source is a local pod's address (`pod-addresses`) arriving through
//!     another interface is dropped.
//! - `filter` table of ip6tables, `AZURE-NPM-IPV6` (jumped to first from FORWARD): IPv6 to an
//!   ingress-isolated pod's veth (`isolated-ingress-ipv6`, `::/0,<veth>`, matched against the
//!   outgoing interface) or from an egress-isolated one's (`isolated-egress-ipv6`, incoming)
//!   is dropped.
//!
//! The rules are fixed; the sets follow the plan's local endpoints and their veths (found
//! from the /32 routes, again on every tick, so a late or replaced veth is picked up). Each
//! set is replaced whole and atomically (`ipset swap`). The rule counters of the two DROP
//! rules count spoofed packets (`iptables -t raw -L AZURE-NPM-GUARD -v`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::names::quote_comment;
use crate::dataplane::azure::hashed_set_name;
use crate::model::Direction;
use crate::plan::{Change, Plan, PlanDiff};

/// The raw-table chain (IPv4).
pub const GUARD_CHAIN: &str = "AZURE-NPM-GUARD";
/// The ip6tables filter chain.
pub const IPV6_CHAIN: &str = "AZURE-NPM-IPV6";
/// PREROUTING's jump (raw table), as `iptables-save` prints it.
pub const GUARD_JUMP: &str = "-j AZURE-NPM-GUARD";
/// FORWARD's jump (ip6tables filter table).
pub const IPV6_JUMP: &str = "-j AZURE-NPM-IPV6";

/// The guard's sets: readable name, family, type.
pub const SETS: [(&str, &str, &str); 5] = [
    (POD_INTERFACES, "inet", "hash:net,iface"),
    (POD_SOURCES, "inet", "hash:net,iface"),
    (POD_ADDRESSES, "inet", "hash:net"),
    (ISOLATED_INGRESS_V6, "inet6", "hash:net,iface"),
    (ISOLATED_EGRESS_V6, "inet6", "hash:net,iface"),
];
pub const POD_INTERFACES: &str = "pod-interfaces";
pub const POD_SOURCES: &str = "pod-sources";
pub const POD_ADDRESSES: &str = "pod-addresses";
pub const ISOLATED_INGRESS_V6: &str = "isolated-ingress-ipv6";
pub const ISOLATED_EGRESS_V6: &str = "isolated-egress-ipv6";

/// Whether `name` (a kernel set name) is one of the guard's, which the policy layout's
/// reconcile must leave alone.
pub fn is_guard_set(name: &str) -> bool {
    SETS.iter()
        .any(|(readable, _, _)| hashed_set_name(readable) == name || staging(readable) == name)
}

/// The kernel name of the set a new content is built in before it is swapped in.
fn staging(readable: &str) -> String {
    hashed_set_name(&format!("{readable}-next"))
}

/// One local endpoint, as the guard needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Endpoint {
    /// Isolated for ingress, for egress.
    isolated: [bool; 2],
    /// The host side of its veth, once found.
    ifname: Option<String>,
}

/// The guard's view of the node: its endpoints and their interfaces.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// The set contents the kernel was last given (to write only what changed).
    written: Option<BTreeMap<&'static str, BTreeSet<String>>>,
}

fn di(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn v4(ip: std::net::IpAddr) -> Option<Ipv4Addr> {
    match ip {
        std::net::IpAddr::V4(v) => Some(v),
        std::net::IpAddr::V6(_) => None,
    }
}

impl Guard {
    /// Follows a diff's local endpoints and their isolation.
    pub fn apply(&mut self, diff: &PlanDiff) {
        for c in &diff.changes {
            match c {
                Change::AddEndpoint { ip, .. } => {
                    if let Some(ip) = v4(*ip) {
                        self.endpoints.entry(ip).or_default();
                    }
                }
                Change::RemoveEndpoint { ip } => {
                    if let Some(ip) = v4(*ip) {
                        self.endpoints.remove(&ip);
                    }
                }
                Change::SetProfile { ip, direction, profile } => {
                    if let Some(ep) = v4(*ip).and_then(|ip| self.endpoints.get_mut(&ip)) {
                        ep.isolated[di(*direction)] = profile.is_some();
                    }
                }
                _ => {}
            }
        }
    }

    /// Holds exactly the plan's local endpoints (interfaces found again by the caller).
    pub fn reconcile(&mut self, plan: &Plan) {
        self.endpoints = plan
            .endpoints
            .iter()
            .filter_map(|(ip, ep)| {
                let isolated = Direction::BOTH.map(|d| ep.isolated(d));
                v4(*ip).map(|ip| (ip, Endpoint { isolated, ifname: None }))
            })
            .collect();
        self.written = None;
    }

    /// Takes each endpoint's veth from `routes` (the node's /32 routes, address → interface).
    pub fn find_interfaces(&mut self, routes: &HashMap<Ipv4Addr, String>) {
        for (ip, ep) in &mut self.endpoints {
            ep.ifname = routes.get(ip).cloned();
        }
    }

    /// Endpoints whose veth is not found yet.
    pub fn pending(&self) -> usize {
        self.endpoints.values().filter(|e| e.ifname.is_none()).count()
    }

    /// What each set should hold now (members as `ipset save` prints them).
    fn contents(&self) -> BTreeMap<&'static str, BTreeSet<String>> {
        let mut c: BTreeMap<&'static str, BTreeSet<String>> =
            SETS.iter().map(|(n, _, _)| (*n, BTreeSet::new())).collect();
        for (ip, ep) in &self.endpoints {
            let Some(ifname) = &ep.ifname else { continue };
            let mut add = |set: &'static str, m: String| {
                c.get_mut(set).expect("guard set").insert(m);
            };
            add(POD_INTERFACES, format!("0.0.0.0/0,{ifname}"));
            add(POD_SOURCES, format!("{ip},{ifname}"));
            add(POD_ADDRESSES, ip.to_string());
            if ep.isolated[0] {
                add(ISOLATED_INGRESS_V6, format!("::/0,{ifname}"));
            }
            if ep.isolated[1] {
                add(ISOLATED_EGRESS_V6, format!("::/0,{ifname}"));
            }
        }
        c
    }

    /// The `ipset restore` script that brings the sets to what they should hold (each one
    /// built aside and swapped in), or `None` when the kernel already holds it.
    pub fn sets_script(&mut self) -> Option<String> {
        let want = self.contents();
        if self.written.as_ref() == Some(&want) {
            return None;
        }
        let mut s = String::new();
        for (readable, family, kind) in SETS {
            let members = &want[readable];
            if self.written.as_ref().is_some_and(|w| &w[readable] == members) {
                continue;
            }
            let (name, next) = (hashed_set_name(readable), staging(readable));
            let _ = writeln!(s, "create {name} {kind} family {family} maxelem 65536");
            let _ = writeln!(s, "create {next} {kind} family {family} maxelem 65536");
            let _ = writeln!(s, "flush {next}");
            for m in members {
                let _ = writeln!(s, "add {next} {m}");
            }
            let _ = writeln!(s, "swap {next} {name}");
            let _ = writeln!(s, "destroy {next}");
        }
        self.written = Some(want);
        Some(s)
    }

    /// Forgets what the kernel holds (after a failed write), so that the next write is whole.
    pub fn forget_written(&mut self) {
        self.written = None;
    }
}

/// The raw table's guard rules, as `iptables-save` prints them.
pub fn guard_rules() -> Vec<String> {
    let (ifaces, sources, addresses) = (
        hashed_set_name(POD_INTERFACES),
        hashed_set_name(POD_SOURCES),
        hashed_set_name(POD_ADDRESSES),
    );
    vec![
        format!(
            "-m set --match-set {ifaces} src,src -m set ! --match-set {sources} src,src -m comment --comment {} -j DROP",
            quote_comment("DROP-SPOOFED-SOURCE-FROM-POD")
        ),
        format!(
            "-m set --match-set {addresses} src -m set ! --match-set {sources} src,src -m comment --comment {} -j DROP",
            quote_comment("DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE")
        ),
    ]
}

/// The ip6tables filter rules, as `ip6tables-save` prints them.
pub fn ipv6_rules() -> Vec<String> {
    vec![
        format!(
            "-m set --match-set {} dst,dst -m comment --comment {} -j DROP",
            hashed_set_name(ISOLATED_INGRESS_V6),
            quote_comment("DROP-IPV6-TO-ISOLATED-POD-NOT-ENFORCED")
        ),
        format!(
            "-m set --match-set {} src,src -m comment --comment {} -j DROP",
            hashed_set_name(ISOLATED_EGRESS_V6),
            quote_comment("DROP-IPV6-FROM-ISOLATED-POD-NOT-ENFORCED")
        ),
    ]
}

/// The rules of `chain` in `table` of an `iptables-save` output (`None`: no such chain).
pub fn table_rules(save: &str, table: &str, chain: &str) -> Option<Vec<String>> {
    let mut in_table = false;
    let mut declared = false;
    let mut rules = Vec::new();
    let prefix = format!("-A {chain} ");
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_table = t.trim() == table;
        } else if in_table && line.starts_with(&format!(":{chain} ")) {
            declared = true;
        } else if in_table && let Some(rule) = line.strip_prefix(&prefix) {
            rules.push(rule.to_string());
        }
    }
    declared.then_some(rules)
}

/// The script that removes `chain` of `table` and `hook`'s jumps to it (`None`: neither is
/// there).
pub fn removal_script(
    save: &str,
    table: &str,
    chain: &str,
    hook: &str,
    jump: &str,
) -> Option<String> {
    let jumps: Vec<String> = table_rules(save, table, hook)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r == jump)
        .collect();
    let declared = table_rules(save, table, chain).is_some();
    if jumps.is_empty() && !declared {
        return None;
    }
    let mut s = format!("*{table}\n");
    for j in jumps {
        let _ = writeln!(s, "-D {hook} {j}");
    }
    if declared {
        let _ = writeln!(s, "-F {chain}\n-X {chain}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The `iptables-restore --noflush` script that writes `chain` with `rules` in `table` and
/// puts `jump` first in `hook`, given the hook's current rules (`None`: the chain's jump is
/// first already and the chain holds `rules`: nothing to write).
pub fn chain_script(
    table: &str,
    chain: &str,
    rules: &[String],
    hook: &str,
    jump: &str,
    hook_rules: &[String],
    chain_rules: Option<&[String]>,
) -> Option<String> {
    let jumps: Vec<&String> = hook_rules.iter().filter(|r| r.as_str() == jump).collect();
    let jump_in_place = jumps.len() == 1 && hook_rules.first().map(String::as_str) == Some(jump);
    if jump_in_place && chain_rules == Some(rules) {
        return None;
    }
    let mut s = format!("*{table}\n:{chain} - [0:0]\n");
    for r in rules {
        let _ = writeln!(s, "-A {chain} {r}");
    }
    if !jump_in_place {
        for j in jumps {
            let _ = writeln!(s, "-D {hook} {j}");
        }
        let _ = writeln!(s, "-I {hook} 1 {jump}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sets_follow_endpoints_interfaces_and_isolation() {
        let mut g = Guard::default();
        let pod = ObjectKey::new("x", "a");
        g.apply(&PlanDiff::of(vec![
            Change::AddEndpoint { ip: ip("10.0.0.1"), pod: pod.clone() },
            Change::AddEndpoint { ip: ip("10.0.0.2"), pod },
            Change::AddProfile { profile: 1, direction: Direction::Ingress, isolating: true },
            Change::SetProfile {
                ip: ip("10.0.0.1"),
                direction: Direction::Ingress,
                profile: Some(1),
            },
        ]));
        assert_eq!(g.pending(), 2);
        // Without interfaces nothing is checked yet.
        assert!(g.contents().values().all(BTreeSet::is_empty));
        g.find_interfaces(&HashMap::from([("10.0.0.1".parse().unwrap(), "veth1".to_string())]));
        assert_eq!(g.pending(), 1);
        let c = g.contents();
        assert_eq!(c[POD_INTERFACES], BTreeSet::from(["0.0.0.0/0,veth1".to_string()]));
        assert_eq!(c[POD_SOURCES], BTreeSet::from(["10.0.0.1,veth1".to_string()]));
        assert_eq!(c[POD_ADDRESSES], BTreeSet::from(["10.0.0.1".to_string()]));
        assert_eq!(c[ISOLATED_INGRESS_V6], BTreeSet::from(["::/0,veth1".to_string()]));
        assert!(c[ISOLATED_EGRESS_V6].is_empty());
        // Written once; again only after a change, and then only the sets that changed.
        let first = g.sets_script().expect("first write");
        assert!(first.contains(&format!(
            "swap {} {}",
            staging(POD_SOURCES),
            hashed_set_name(POD_SOURCES)
        )));
        assert_eq!(g.sets_script(), None);
        g.apply(&PlanDiff::of(vec![Change::RemoveEndpoint { ip: ip("10.0.0.1") }]));
        let second = g.sets_script().expect("second write");
        assert!(second.contains(&hashed_set_name(POD_SOURCES)));
        assert!(!second.contains(&hashed_set_name(ISOLATED_EGRESS_V6)), "{second}");
    }

    #[test]
    fn chains_are_written_only_when_they_differ() {
        let rules = guard_rules();
        let hook = vec![GUARD_JUMP.to_string(), "-j OTHER".to_string()];
        assert_eq!(
            chain_script("raw", GUARD_CHAIN, &rules, "PREROUTING", GUARD_JUMP, &hook, Some(&rules)),
            None
        );
        let moved = vec!["-j OTHER".to_string(), GUARD_JUMP.to_string()];
        let s = chain_script(
            "raw",
            GUARD_CHAIN,
            &rules,
            "PREROUTING",
            GUARD_JUMP,
            &moved,
            Some(&rules),
        )
        .unwrap();
        assert!(
            s.contains("-D PREROUTING -j AZURE-NPM-GUARD\n-I PREROUTING 1 -j AZURE-NPM-GUARD\n"),
            "{s}"
        );
        assert!(is_guard_set(&hashed_set_name(POD_SOURCES)));
        assert!(!is_guard_set(&hashed_set_name("ns-x")));
    }
}
