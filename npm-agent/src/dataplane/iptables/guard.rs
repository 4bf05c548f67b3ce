//! What the policy layout cannot say because it needs the pods' interfaces, which only the
//! node knows: a pod sends only from its own addresses, and a local pod's address never comes
//! in from elsewhere. In both families.
//!
//! - `raw` table of iptables and of ip6tables, `AZURE-NPM-GUARD` (jumped to first from
//!   PREROUTING, before conntrack sees a packet, so a forged packet leaves no conntrack entry
//!   behind):
//!   - a packet entering through a pod's veth (`pod-interfaces`, hash:net,iface of
//!     `0.0.0.0/0,<veth>`, or `::/0,<veth>` in `inet6:`) whose (source, interface) is not
//!     that pod's (`pod-sources`, `<ip>,<veth>`) is dropped: a pod without an IPv6 address
//!     sends no IPv6 but link-local;
//!   - a packet whose source is a local pod's address (`pod-addresses`) arriving through
//!     another interface is dropped.
//!   - IPv6 only: link-local traffic (from `fe80::/10` to `fe80::/10` or multicast, and from
//!     `::` to multicast: neighbour and router discovery, MLD, duplicate address detection)
//!     is let through first. The kernel never forwards a link-local source (it is beyond
//!     scope), so such a packet reaches the node only, which a pod may always reach.
//!
//! The rules are fixed; the sets follow the plan's local endpoints and their veths (found
//! from the /32 and /128 routes, again on every tick, so a late or replaced veth is picked
//! up). Every veth of a pod is in both families' `pod-interfaces`, whatever addresses its pod
//! has. Each set is replaced whole and atomically (`ipset swap`). The rule counters of the
//! two DROP rules count spoofed packets (`iptables -t raw -L AZURE-NPM-GUARD -v`, and
//! `ip6tables`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use super::names::{Family, quote_comment};
use crate::plan::{Change, Plan, PlanDiff};

/// The raw-table chain (both families).
pub const GUARD_CHAIN: &str = "AZURE-NPM-GUARD";
/// PREROUTING's jump (raw table), as `iptables-save` prints it.
pub const GUARD_JUMP: &str = "-j AZURE-NPM-GUARD";
/// The ip6tables filter chain of earlier versions, which dropped IPv6 at isolated pods
/// before IPv6 was enforced (removed where found: its sets, no longer the guard's, are
/// destroyed as stale by the IPv4 layout's reconcile).
pub const OLD_IPV6_CHAIN: &str = "AZURE-NPM-IPV6";
pub const OLD_IPV6_JUMP: &str = "-j AZURE-NPM-IPV6";

/// The guard's sets (each in both families): readable name, type.
pub const SETS: [(&str, &str); 3] = [
    (POD_INTERFACES, "hash:net,iface"),
    (POD_SOURCES, "hash:net,iface"),
    (POD_ADDRESSES, "hash:net"),
];
pub const POD_INTERFACES: &str = "pod-interfaces";
pub const POD_SOURCES: &str = "pod-sources";
pub const POD_ADDRESSES: &str = "pod-addresses";

/// Whether `name` (a kernel set name) is one of the guard's, which the policy layout's
/// reconcile must leave alone.
pub fn is_guard_set(name: &str) -> bool {
    Family::BOTH.iter().any(|f| {
        SETS.iter()
            .any(|(readable, _)| f.set_name(readable) == name || staging(*f, readable) == name)
    })
}

/// The kernel name of the set a new content is built in before it is swapped in.
fn staging(f: Family, readable: &str) -> String {
    f.set_name(&format!("{readable}-next"))
}

/// The guard's view of the node: its endpoints and their interfaces.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// Local endpoints and the host side of their veth, once found.
    endpoints: BTreeMap<IpAddr, Option<String>>,
    /// The set contents the kernel was last given (to write only what changed).
    written: Option<BTreeMap<(Family, &'static str), BTreeSet<String>>>,
}

impl Guard {
    /// Follows a diff's local endpoints.
    pub fn apply(&mut self, diff: &PlanDiff) {
        for c in &diff.changes {
            match c {
                Change::AddEndpoint { ip, .. } => {
                    self.endpoints.entry(*ip).or_default();
                }
                Change::RemoveEndpoint { ip } => {
                    self.endpoints.remove(ip);
                }
                _ => {}
            }
        }
    }

    /// Holds exactly the plan's local endpoints (interfaces found again by the caller).
    pub fn reconcile(&mut self, plan: &Plan) {
        self.endpoints = plan.endpoints.keys().map(|ip| (*ip, None)).collect();
        self.written = None;
    }

    /// Takes each endpoint's veth from `routes` (the node's /32 and /128 routes, address →
    /// interface).
    pub fn find_interfaces(&mut self, routes: &HashMap<IpAddr, String>) {
        for (ip, ifname) in &mut self.endpoints {
            *ifname = routes.get(ip).cloned();
        }
    }

    /// Endpoints whose veth is not found yet.
    pub fn pending(&self) -> usize {
        self.endpoints.values().filter(|e| e.is_none()).count()
    }

    /// What each set should hold now (members as `ipset save` prints them).
    fn contents(&self) -> BTreeMap<(Family, &'static str), BTreeSet<String>> {
        let mut c: BTreeMap<(Family, &'static str), BTreeSet<String>> = Family::BOTH
            .iter()
            .flat_map(|f| SETS.iter().map(|(n, _)| ((*f, *n), BTreeSet::new())))
            .collect();
        for (ip, ifname) in &self.endpoints {
            let Some(ifname) = ifname else { continue };
            let mut add = |f: Family, set: &'static str, m: String| {
                c.get_mut(&(f, set)).expect("guard set").insert(m);
            };
            for (f, any) in [(Family::V4, "0.0.0.0/0"), (Family::V6, "::/0")] {
                add(f, POD_INTERFACES, format!("{any},{ifname}"));
            }
            let f = Family::of(*ip);
            add(f, POD_SOURCES, format!("{ip},{ifname}"));
            add(f, POD_ADDRESSES, ip.to_string());
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
        for f in Family::BOTH {
            for (readable, kind) in SETS {
                let members = &want[&(f, readable)];
                if self.written.as_ref().is_some_and(|w| &w[&(f, readable)] == members) {
                    continue;
                }
                let (name, next) = (f.set_name(readable), staging(f, readable));
                let family = f.inet();
                let _ = writeln!(s, "create {name} {kind} family {family} maxelem 65536");
                let _ = writeln!(s, "create {next} {kind} family {family} maxelem 65536");
                let _ = writeln!(s, "flush {next}");
                for m in members {
                    let _ = writeln!(s, "add {next} {m}");
                }
                let _ = writeln!(s, "swap {next} {name}");
                let _ = writeln!(s, "destroy {next}");
            }
        }
        self.written = Some(want);
        Some(s)
    }

    /// Forgets what the kernel holds (after a failed write), so that the next write is whole.
    pub fn forget_written(&mut self) {
        self.written = None;
    }
}

/// The raw table's guard rules of a family, as `iptables-save` / `ip6tables-save` print them.
pub fn guard_rules(f: Family) -> Vec<String> {
    let (ifaces, sources, addresses) =
        (f.set_name(POD_INTERFACES), f.set_name(POD_SOURCES), f.set_name(POD_ADDRESSES));
    let mut rules = Vec::new();
    if f == Family::V6 {
        for (src, dst) in
            [("fe80::/10", "fe80::/10"), ("fe80::/10", "ff00::/8"), ("::/128", "ff00::/8")]
        {
            rules.push(format!(
                "-s {src} -d {dst} -m comment --comment {} -j RETURN",
                quote_comment("LINK-LOCAL-TRAFFIC-STAYS-ON-THE-NODE")
            ));
        }
    }
    rules.push(format!(
        "-m set --match-set {ifaces} src,src -m set ! --match-set {sources} src,src -m comment --comment {} -j DROP",
        quote_comment("DROP-SPOOFED-SOURCE-FROM-POD")
    ));
    rules.push(format!(
        "-m set --match-set {addresses} src -m set ! --match-set {sources} src,src -m comment --comment {} -j DROP",
        quote_comment("DROP-LOCAL-POD-ADDRESS-FROM-ANOTHER-INTERFACE")
    ));
    rules
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
    fn sets_follow_endpoints_and_interfaces_in_both_families() {
        let mut g = Guard::default();
        let pod = ObjectKey::new("x", "a");
        g.apply(&PlanDiff::of(vec![
            Change::AddEndpoint { ip: ip("10.0.0.1"), pod: pod.clone() },
            Change::AddEndpoint { ip: ip("fd00::1"), pod: pod.clone() },
            Change::AddEndpoint { ip: ip("10.0.0.2"), pod },
        ]));
        assert_eq!(g.pending(), 3);
        // Without interfaces nothing is checked yet.
        assert!(g.contents().values().all(BTreeSet::is_empty));
        g.find_interfaces(&HashMap::from([
            (ip("10.0.0.1"), "veth1".to_string()),
            (ip("fd00::1"), "veth1".to_string()),
        ]));
        assert_eq!(g.pending(), 1);
        let c = g.contents();
        let one = |s: &str| BTreeSet::from([s.to_string()]);
        assert_eq!(c[&(Family::V4, POD_INTERFACES)], one("0.0.0.0/0,veth1"));
        assert_eq!(c[&(Family::V6, POD_INTERFACES)], one("::/0,veth1"));
        assert_eq!(c[&(Family::V4, POD_SOURCES)], one("10.0.0.1,veth1"));
        assert_eq!(c[&(Family::V6, POD_SOURCES)], one("fd00::1,veth1"));
        assert_eq!(c[&(Family::V4, POD_ADDRESSES)], one("10.0.0.1"));
        assert_eq!(c[&(Family::V6, POD_ADDRESSES)], one("fd00::1"));
        // Written once; again only after a change, and then only the sets that changed.
        let first = g.sets_script().expect("first write");
        let (v6, next6) = (Family::V6.set_name(POD_SOURCES), staging(Family::V6, POD_SOURCES));
        assert!(first.contains(&format!("create {v6} hash:net,iface family inet6 ")), "{first}");
        assert!(first.contains(&format!("swap {next6} {v6}")), "{first}");
        assert_eq!(g.sets_script(), None);
        g.apply(&PlanDiff::of(vec![Change::RemoveEndpoint { ip: ip("fd00::1") }]));
        let second = g.sets_script().expect("second write");
        let creates =
            |f: Family, set: &str| second.contains(&format!("create {} ", f.set_name(set)));
        assert!(creates(Family::V6, POD_SOURCES), "{second}");
        // (The veth is still the IPv4 endpoint's: every family's interfaces stay.)
        assert!(!creates(Family::V6, POD_INTERFACES), "{second}");
        assert!(!creates(Family::V4, POD_SOURCES), "{second}");
    }

    #[test]
    fn chains_are_written_only_when_they_differ() {
        let rules = guard_rules(Family::V4);
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
        assert!(is_guard_set(&Family::V4.set_name(POD_SOURCES)));
        assert!(is_guard_set(&Family::V6.set_name(POD_SOURCES)));
        assert!(!is_guard_set(&Family::V4.set_name("ns-x")));
        assert!(!is_guard_set(&Family::V6.set_name("ns-x")));
    }
}
