//! The ACLs of an endpoint direction that ClusterNetworkPolicies select, in the order HNS
//! evaluates ACLs (priority, lower first; the first match decides).
//!
//! The plan's entries carry their verdicts in the order of evaluation (`plan::decider`):
//! the Admin tier's rules, then the NetworkPolicies (final where they isolate), then the
//! Baseline tier's. ACLs have Allow and Block only, so the tiers become priorities:
//! - 201 allows the node's addresses (always allowed, as the plan says);
//! - from 1000, each Admin entry in precedence order: `Accept` an Allow, `Deny` a Block;
//!   a `Pass` hands what it matches to what follows the tier, which is written right there,
//!   restricted to the passed peers and ports: the NetworkPolicies' allows met with it and
//!   a Block of the rest where they isolate, else the Baseline entries met with it and an
//!   Allow of the rest. Later Admin entries so see only what no earlier one matched;
//! - from 40000, where NetworkPolicies isolate: their allows (a block with excepts as its
//!   exact prefixes) and a Block of everything else; elsewhere the Baseline entries (`Deny`
//!   a Block, `Accept` and `Pass` an Allow) and nothing after (HNS allows).
//!
//! Blocks match their own family only (see `translate::block`). What HNS cannot match
//! (SCTP) is never widened: an Allow is left out, a Block is
//! written for the peer on every protocol; both reported. Port ranges wider than an ACL's
//! list are split over several ACLs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::translate::{
    Acl, MAX_EXPANDED_PORTS, PRIORITY_NODE, Sets, block, protocol_number, subtract,
};
use crate::dataplane::azure::fnv1a64;
use crate::model::IpFamily;
use crate::model::cluster_policy::Action;
use crate::plan::{
    Allow, DirectionPlan, IdentityId, PeerMatch, PeerSet, PortMatch, SetId, Verdict,
};

/// The first and last priority of the Admin tier's ACLs.
pub const PRIORITY_ADMIN_FIRST: u16 = 1000;
pub const PRIORITY_ADMIN_LAST: u16 = 39_999;
/// The first priority after the Admin tier (NetworkPolicies or the Baseline tier).
pub const PRIORITY_AFTER_ADMIN: u16 = 40_000;

/// Whether a direction needs the tiers' ACLs: a ClusterNetworkPolicy's entry, or a profile
/// that no NetworkPolicy isolates.
pub fn is_tiered(dp: &DirectionPlan) -> bool {
    dp.selected && (!dp.isolated || dp.allow.iter().any(|a| a.verdict != Verdict::Allow))
}

/// Whom an entry matches, in a form two of them can be met in.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Who {
    Any,
    /// The pods of these identities.
    Ids(BTreeSet<IdentityId>),
    /// The addresses in these prefixes.
    Nets(Vec<IpNet>),
    /// These pod addresses.
    Addrs(BTreeSet<IpAddr>),
}

impl Who {
    fn is_empty(&self) -> bool {
        match self {
            Who::Any => false,
            Who::Ids(s) => s.is_empty(),
            Who::Nets(n) => n.is_empty(),
            Who::Addrs(a) => a.is_empty(),
        }
    }
}

/// What the translation reads besides the entries.
pub(super) struct Context<'a> {
    pub peer_sets: &'a HashMap<SetId, PeerSet>,
    /// Each identity's pod addresses, of both families.
    pub members: &'a BTreeMap<IdentityId, Vec<IpAddr>>,
    pub identity_of: &'a HashMap<IpAddr, IdentityId>,
    /// The family of the endpoint's addresses, when it has one family only.
    pub family: Option<IpFamily>,
}

impl Context<'_> {
    fn who(&self, peer: &PeerMatch) -> Who {
        match peer {
            PeerMatch::Any => Who::Any,
            PeerMatch::Identity(id) => Who::Ids([*id].into()),
            PeerMatch::Set(s) => Who::Ids(
                self.peer_sets
                    .get(s)
                    .map(|s| s.members.iter().copied().collect())
                    .unwrap_or_default(),
            ),
            PeerMatch::Cidr(b) => match block(b, self.family) {
                None => Who::Any,
                Some((net, except)) => Who::Nets(subtract(net, &except)),
            },
        }
    }

    fn addresses(&self, ids: &BTreeSet<IdentityId>) -> impl Iterator<Item = IpAddr> {
        ids.iter().flat_map(|id| self.members.get(id).into_iter().flatten().copied())
    }

    /// Whom both match.
    fn meet(&self, a: &Who, b: &Who) -> Who {
        let in_nets = |ip: &IpAddr, n: &[IpNet]| n.iter().any(|n| n.contains(ip));
        match (a, b) {
            (Who::Any, x) | (x, Who::Any) => x.clone(),
            (Who::Ids(a), Who::Ids(b)) => Who::Ids(a.intersection(b).copied().collect()),
            (Who::Ids(ids), Who::Nets(n)) | (Who::Nets(n), Who::Ids(ids)) => {
                Who::Addrs(self.addresses(ids).filter(|ip| in_nets(ip, n)).collect())
            }
            (Who::Ids(ids), Who::Addrs(s)) | (Who::Addrs(s), Who::Ids(ids)) => Who::Addrs(
                s.iter()
                    .filter(|ip| self.identity_of.get(ip).is_some_and(|i| ids.contains(i)))
                    .copied()
                    .collect(),
            ),
            (Who::Nets(a), Who::Nets(b)) => {
                let mut out: Vec<IpNet> = Vec::new();
                for x in a {
                    for y in b {
                        if x.contains(y) {
                            out.push(*y);
                        } else if y.contains(x) {
                            out.push(*x);
                        }
                    }
                }
                out.sort();
                out.dedup();
                Who::Nets(out)
            }
            (Who::Nets(n), Who::Addrs(s)) | (Who::Addrs(s), Who::Nets(n)) => {
                Who::Addrs(s.iter().filter(|ip| in_nets(ip, n)).copied().collect())
            }
            (Who::Addrs(a), Who::Addrs(b)) => Who::Addrs(a.intersection(b).copied().collect()),
        }
    }
}

/// The ports both match (`None`: none).
fn meet_ports(a: &PortMatch, b: &PortMatch) -> Option<PortMatch> {
    let range = |p: &PortMatch| match *p {
        PortMatch::Any => (None, 0u16, u16::MAX),
        PortMatch::Protocol(pr) => (Some(pr), 0, u16::MAX),
        PortMatch::Range { protocol, first, last } => (Some(protocol), first, last),
    };
    let ((pa, fa, la), (pb, fb, lb)) = (range(a), range(b));
    let protocol = match (pa, pb) {
        (None, p) | (p, None) => p,
        (Some(x), Some(y)) if x == y => Some(x),
        _ => return None,
    };
    let (first, last) = (fa.max(fb), la.min(lb));
    if first > last {
        return None;
    }
    Some(match protocol {
        None => PortMatch::Any,
        Some(protocol) if first == 0 && last == u16::MAX => PortMatch::Protocol(protocol),
        Some(protocol) => PortMatch::Range { protocol, first, last },
    })
}

/// The (protocols, port list) of each ACL a port match needs: ranges wider than an ACL's
/// list are split. `Err`: HNS cannot match the protocol.
fn port_lists(pm: &PortMatch) -> Result<Vec<(String, String)>, String> {
    match *pm {
        PortMatch::Any => Ok(vec![(String::new(), String::new())]),
        PortMatch::Protocol(p) => Ok(vec![(protocol_number(p)?.into(), String::new())]),
        PortMatch::Range { protocol, first, last } => {
            let proto = protocol_number(protocol)?.to_string();
            if first <= 1 && last == u16::MAX {
                return Ok(vec![(proto, String::new())]);
            }
            let ports: Vec<u16> = (first..=last).collect();
            Ok(ports
                .chunks(MAX_EXPANDED_PORTS as usize)
                .map(|c| {
                    let list: Vec<String> = c.iter().map(u16::to_string).collect();
                    (proto.clone(), list.join(","))
                })
                .collect())
        }
    }
}

/// The ACLs being written, in priority order.
struct Writer<'a, 'c> {
    ctx: &'a Context<'c>,
    sets: &'a mut Sets,
    acls: Vec<Acl>,
    /// (Wider than a priority: the last one may be `u16::MAX`.)
    next: u32,
    last: u32,
    /// Entries not written as the plan says (for the report): (entry, reason).
    narrowed: Vec<(String, String)>,
    full: bool,
}

impl Writer<'_, '_> {
    /// The set (or none, for anyone) an ACL names for `who`.
    fn set_of(&mut self, who: &Who) -> Vec<String> {
        match who {
            Who::Any => Vec::new(),
            Who::Ids(ids) => {
                let names: Vec<String> =
                    ids.iter().map(|id| self.sets.identity(self.ctx.members, *id)).collect();
                if names.len() == 1 {
                    return names;
                }
                let readable: Vec<String> = ids.iter().map(|id| format!("identity-{id}")).collect();
                let joined = readable.join(",");
                let name = if joined.len() <= 120 {
                    format!("nestedlabel-{joined}")
                } else {
                    format!("nestedlabel-{}-sets-{:016x}", names.len(), fnv1a64(&names.join(",")))
                };
                vec![self.sets.add(name, "NESTEDIPSET", names)]
            }
            Who::Nets(nets) => {
                let list: Vec<String> = nets.iter().map(IpNet::to_string).collect();
                let name = format!("nets-{}-{:016x}", list.len(), fnv1a64(&list.join(",")));
                vec![self.sets.nets(name, nets)]
            }
            Who::Addrs(addrs) => {
                let nets: Vec<IpNet> = addrs.iter().map(|a| IpNet::from(*a)).collect();
                let list: Vec<String> = nets.iter().map(IpNet::to_string).collect();
                let name = format!("addresses-{}-{:016x}", list.len(), fnv1a64(&list.join(",")));
                vec![self.sets.nets(name, &nets)]
            }
        }
    }

    /// One match: an Allow or a Block of `who` on `ports`. What HNS cannot match is left out
    /// (an Allow) or blocked on every protocol (a Block): never wider.
    fn push(&mut self, allow: bool, who: &Who, ports: &PortMatch, entry: &dyn Fn() -> String) {
        if who.is_empty() || self.full {
            return;
        }
        let lists = match port_lists(ports) {
            Ok(l) => l,
            Err(reason) if allow => {
                self.narrowed.push((entry(), format!("{reason}; left out")));
                return;
            }
            Err(reason) => {
                self.narrowed.push((entry(), format!("{reason}; blocked on every protocol")));
                vec![(String::new(), String::new())]
            }
        };
        let sets = self.set_of(who);
        for (protocols, ports) in lists {
            if self.next > self.last {
                // Out of priorities: everything else is refused (never wider).
                self.full = true;
                self.narrowed.push((entry(), "more ACLs than the tier's priorities".into()));
                self.acls.push(Acl::new("Block", self.last as u16, Vec::new(), "", ""));
                return;
            }
            self.acls.push(Acl::new(
                if allow { "Allow" } else { "Block" },
                self.next as u16,
                sets.clone(),
                &protocols,
                &ports,
            ));
            self.next += 1;
        }
    }
}

/// The ACLs of a tiered endpoint direction (see the module documentation). Entries it
/// cannot write as the plan says are returned as (entry, reason).
pub(super) fn tiered_acls(
    dp: &DirectionPlan,
    ctx: &Context,
    node_ips: &[String],
    sets: &mut Sets,
) -> (Vec<Acl>, Vec<(String, String)>) {
    let mut entries: Vec<&Allow> = dp.allow.iter().collect();
    entries.sort_by(|a, b| (a.verdict.precedence(), *a).cmp(&(b.verdict.precedence(), *b)));
    let resolve = |tier: fn(&Verdict) -> bool| -> Vec<(Who, PortMatch, Action, String)> {
        entries
            .iter()
            .filter(|a| tier(&a.verdict))
            .map(|a| {
                let action = a.verdict.precedence().map_or(Action::Accept, |p| p.action);
                (ctx.who(&a.peer), a.ports, action, a.to_string())
            })
            .collect()
    };
    let admin = resolve(|v| matches!(v, Verdict::Admin(_)));
    let allows = resolve(|v| matches!(v, Verdict::Allow));
    let baseline = resolve(|v| matches!(v, Verdict::Baseline(_)));
    let mut w = Writer {
        ctx,
        sets,
        acls: Vec::new(),
        next: PRIORITY_ADMIN_FIRST.into(),
        last: PRIORITY_ADMIN_LAST.into(),
        narrowed: Vec::new(),
        full: false,
    };
    if !node_ips.is_empty() {
        let mut node = Acl::new("Allow", PRIORITY_NODE, Vec::new(), "", "");
        node.direct = node_ips.to_vec();
        w.acls.push(node);
    }
    // What follows the Admin tier, for `scope` (everything, or what a Pass hands over).
    let after_admin = |w: &mut Writer, scope: &Who, scope_ports: &PortMatch, entry: &str| {
        let rest: &[(Who, PortMatch, Action, String)] =
            if dp.isolated { &allows } else { &baseline };
        for (who, ports, action, e) in rest {
            let (Some(ports), who) = (meet_ports(ports, scope_ports), w.ctx.meet(who, scope))
            else {
                continue;
            };
            let allow = *action != Action::Deny;
            w.push(allow, &who, &ports, &|| format!("{e} (within {entry})"));
        }
        // Where NetworkPolicies isolate, what they do not admit is refused.
        w.push(!dp.isolated, scope, scope_ports, &|| entry.to_string());
    };
    for (who, ports, action, e) in &admin {
        match action {
            Action::Accept => w.push(true, who, ports, &|| e.clone()),
            Action::Deny => w.push(false, who, ports, &|| e.clone()),
            Action::Pass => after_admin(&mut w, who, ports, e),
        }
    }
    w.full = false;
    w.next = PRIORITY_AFTER_ADMIN.into();
    w.last = u16::MAX.into();
    if dp.isolated {
        after_admin(&mut w, &Who::Any, &PortMatch::Any, "what no NetworkPolicy admits");
    } else {
        for (who, ports, action, e) in &baseline {
            w.push(*action != Action::Deny, who, ports, &|| e.clone());
        }
    }
    (w.acls, w.narrowed)
}
