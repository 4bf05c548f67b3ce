//! Azure NPM's names, which its users know from `ipset list`, `iptables-save`, HNS and the
//! `npm_ipset_counts` metric: a set's readable name (`ns-x`, `podlabel-app:web`, …,
//! [`set_name`]) and its kernel name, `azure-npm-` and the FNV-1a (32-bit) hash of the readable
//! name in decimal (`util.GetHashedName`). Shared by the dataplanes that name sets (iptables,
//! HNS) and by the eBPF dataplane's figures, which follow the same sets ([`AzureSets`]), so that
//! both Linux modes report the same `npm_num_ipsets`, `npm_num_ipset_entries` and
//! `npm_ipset_counts` for the same cluster.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use crate::dataplane::observe::Counts;
use crate::plan::layout::{Layout, LayoutChange, Member, SetDef};

/// Every set of the layout starts with this.
pub const SET_PREFIX: &str = "azure-npm-";

/// FNV-1a, 32 bits (Go's `hash/fnv` `New32a`).
pub fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// FNV-1a, 64 bits: content digests for readable names (not a kernel name).
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Azure NPM's `util.Hash`: the FNV-1a hash in decimal.
pub fn hash(s: &str) -> String {
    fnv1a32(s).to_string()
}

/// Azure NPM's `util.GetHashedName`: the kernel name of the set with readable name `s`.
pub fn hashed_set_name(readable: &str) -> String {
    format!("{SET_PREFIX}{}", hash(readable))
}

/// Azure NPM v2's readable name of a set of the layout: `ns-<ns>`, `podlabel-<key>`,
/// `podlabel-<key>:<value>`, `nestedlabel-<key>:<v1>:<v2>`, `nslabel-<key>`,
/// `nslabel-<key>:<value>` (or `:<v1>:<v2>`), `nslabel-all-namespaces`, `namedport:<name>`,
/// `cidr-<block>[-except-<…>]` (a long list of excepts as their number and a digest), and
/// `quarantine` (this agent's: addresses several local pods claim).
pub fn set_name(def: &SetDef) -> String {
    match def {
        SetDef::Namespace(ns) => format!("ns-{ns}"),
        SetDef::PodLabel { key, value: None } => format!("podlabel-{key}"),
        SetDef::PodLabel { key, value: Some(v) } => format!("podlabel-{key}:{v}"),
        SetDef::PodValues { key, values } => format!("nestedlabel-{key}:{}", values.join(":")),
        SetDef::NsLabel { key, value: None } => format!("nslabel-{key}"),
        SetDef::NsLabel { key, value: Some(v) } => format!("nslabel-{key}:{v}"),
        SetDef::NsValues { key, values } => format!("nslabel-{key}:{}", values.join(":")),
        SetDef::AllNamespaces => "nslabel-all-namespaces".to_string(),
        SetDef::NamedPort(name) => format!("namedport:{name}"),
        SetDef::Cidr(b) => {
            let mut s = format!("cidr-{}", b.net);
            // (An except of the other family, which validation refuses, names nothing.)
            let same = |e: &&IpNet| e.addr().is_ipv4() == b.net.addr().is_ipv4();
            let list: Vec<String> = b.except.iter().filter(same).map(|e| e.to_string()).collect();
            if !list.is_empty() {
                let joined = list.join(",");
                if joined.len() <= 120 {
                    let _ = write!(s, "-except-{joined}");
                } else {
                    let _ = write!(s, "-except-{}-nets-{:016x}", list.len(), fnv1a64(&joined));
                }
            }
            s
        }
        SetDef::Quarantine => "quarantine".to_string(),
    }
}

fn v4_net(net: &IpNet) -> Option<Ipv4Net> {
    match net {
        IpNet::V4(n) => Some(*n),
        IpNet::V6(_) => None,
    }
}

/// An IPv4 ipBlock without excepts: the iptables dataplane matches it by address (`-s`/`-d`),
/// not through a set of its own, so it is no set of the kernel's (nor of the counts).
pub fn inline_block(def: &SetDef) -> Option<Ipv4Net> {
    match def {
        SetDef::Cidr(b) if b.except.iter().all(|e| v4_net(e).is_none()) => v4_net(&b.net),
        _ => None,
    }
}

/// Whether a set of the layout is a set of the kernel's in Azure NPM's Linux encoding (IPv4,
/// `family inet`): every set but an ipBlock without excepts ([`inline_block`]) and an IPv6
/// block (not enforced yet).
pub fn is_kernel_set(def: &SetDef) -> bool {
    inline_block(def).is_none() && !matches!(def, SetDef::Cidr(b) if v4_net(&b.net).is_none())
}

/// The entries a member of a kernel set is in the kernel: an IPv4 address, named port or
/// block one (an except too: a `nomatch` entry; a block of /0 two, as `hash:net` holds no /0),
/// a list's set one (when it is a kernel set), IPv6 none (not enforced yet).
pub fn member_entries(member: &Member) -> u64 {
    let v4 = |ip: &IpAddr| ip.is_ipv4();
    match member {
        Member::Address(ip) | Member::Port { ip, .. } => u64::from(v4(ip)),
        Member::Net { net, except } => match v4_net(net) {
            Some(n) if n.prefix_len() == 0 && !except => 2,
            Some(_) => 1,
            None => 0,
        },
        Member::Set(sub) => u64::from(is_kernel_set(sub)),
    }
}

/// The entries a member adds to a kernel set ([`member_entries`]), but an except of a /1 in a
/// block of /0: the block is the two /1 entries, and the except's `nomatch` entry is one of
/// them, flagged.
fn entries_in(def: &SetDef, member: &Member) -> u64 {
    if let (SetDef::Cidr(b), Member::Net { net, except: true }) = (def, member)
        && b.net.prefix_len() == 0
        && net.prefix_len() == 1
    {
        return 0;
    }
    member_entries(member)
}

/// One of Azure NPM's sets: its readable name, its kernel name and its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureSet {
    pub name: String,
    pub hash: String,
    pub entries: u64,
}

/// Azure NPM's sets of a layout and their entries, as the kernel holds them in the Linux
/// encoding (see [`is_kernel_set`], [`member_entries`]), followed through the layout's changes:
/// what `npm_num_ipsets`, `npm_num_ipset_entries` and `npm_ipset_counts` count. The eBPF
/// dataplane, which holds no such sets, reports them from here; the iptables dataplane names
/// the kernel's sets with it (its own helper sets, which are not Azure NPM's, left out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AzureSets {
    sets: BTreeMap<SetDef, AzureSet>,
    entries: u64,
}

impl AzureSets {
    /// The sets of a whole layout, kernel names the hashes of their readable names.
    pub fn from_layout(layout: &Layout) -> Self {
        Self::from_layout_named(layout, |_| None)
    }

    /// The same, with kernel names `kernel_name` gives (`None`: the hash of the readable
    /// name), as a dataplane that names colliding sets otherwise says.
    pub fn from_layout_named(
        layout: &Layout,
        kernel_name: impl Fn(&SetDef) -> Option<String>,
    ) -> Self {
        let mut out = AzureSets::default();
        for (def, members) in &layout.sets {
            if !is_kernel_set(def) {
                continue;
            }
            let entries = members.iter().map(|m| entries_in(def, m)).sum();
            out.entries += entries;
            out.sets.insert(def.clone(), AzureSet { entries, ..named(def, &kernel_name) });
        }
        out
    }

    /// Follows changes of the layout (one diff's, or several diffs' one after the other).
    pub fn apply(&mut self, changes: &[LayoutChange]) {
        self.apply_named(changes, |_| None)
    }

    /// The same, with kernel names as [`AzureSets::from_layout_named`].
    pub fn apply_named(
        &mut self,
        changes: &[LayoutChange],
        kernel_name: impl Fn(&SetDef) -> Option<String>,
    ) {
        for c in changes {
            match c {
                LayoutChange::AddSet { set } if is_kernel_set(set) => {
                    if let Some(old) = self.sets.insert(set.clone(), named(set, &kernel_name)) {
                        self.entries -= old.entries;
                    }
                }
                LayoutChange::RemoveSet { set } => {
                    if let Some(old) = self.sets.remove(set) {
                        self.entries -= old.entries;
                    }
                }
                LayoutChange::AddMember { set, member } => {
                    if let Some(s) = self.sets.get_mut(set) {
                        let n = entries_in(set, member);
                        s.entries += n;
                        self.entries += n;
                    }
                }
                LayoutChange::RemoveMember { set, member } => {
                    if let Some(s) = self.sets.get_mut(set) {
                        let n = entries_in(set, member).min(s.entries);
                        s.entries -= n;
                        self.entries -= n;
                    }
                }
                _ => {}
            }
        }
    }

    /// How many sets.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Entries of every set.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The sets, in the layout's order.
    pub fn iter(&self) -> impl Iterator<Item = (&SetDef, &AzureSet)> {
        self.sets.iter()
    }

    /// Azure NPM's counts of these sets (`rules`: the dataplane's), with each set's entries
    /// when `per_set` (by readable name).
    pub fn counts(&self, rules: u64, per_set: bool) -> Counts {
        let mut c = Counts {
            rules,
            sets: self.sets.len() as u64,
            set_entries: self.entries,
            per_set: Vec::new(),
        };
        if per_set {
            c.per_set =
                self.sets.values().map(|s| (s.name.clone(), s.hash.clone(), s.entries)).collect();
            c.per_set.sort();
        }
        c
    }
}

fn named(def: &SetDef, kernel_name: &impl Fn(&SetDef) -> Option<String>) -> AzureSet {
    let name = set_name(def);
    let hash = kernel_name(def).unwrap_or_else(|| hashed_set_name(&name));
    AzureSet { name, hash, entries: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_go() {
        // Known FNV-1a values (Go's hash/fnv).
        assert_eq!(fnv1a32(""), 0x811c_9dc5);
        assert_eq!(fnv1a32("a"), 0xe40c_292c);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hashed_set_name(""), "azure-npm-2166136261");
    }

    fn block(net: &str, except: &[&str]) -> SetDef {
        SetDef::Cidr(crate::model::CidrBlock {
            net: net.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn readable_names_are_azure_npms() {
        let v = |s: &str| Some(s.to_string());
        assert_eq!(set_name(&SetDef::Namespace("x".into())), "ns-x");
        assert_eq!(
            set_name(&SetDef::PodLabel { key: "pod".into(), value: v("a") }),
            "podlabel-pod:a"
        );
        assert_eq!(set_name(&SetDef::PodLabel { key: "pod".into(), value: None }), "podlabel-pod");
        assert_eq!(
            set_name(&SetDef::PodValues {
                key: "app".into(),
                values: vec!["a".into(), "b".into()]
            }),
            "nestedlabel-app:a:b"
        );
        assert_eq!(set_name(&SetDef::NsLabel { key: "ns".into(), value: v("y") }), "nslabel-ns:y");
        assert_eq!(
            set_name(&SetDef::NsValues { key: "ns".into(), values: vec!["x".into(), "y".into()] }),
            "nslabel-ns:x:y"
        );
        assert_eq!(set_name(&SetDef::AllNamespaces), "nslabel-all-namespaces");
        assert_eq!(set_name(&SetDef::NamedPort("http".into())), "namedport:http");
        assert_eq!(
            set_name(&block("10.0.0.0/16", &["10.0.1.0/24"])),
            "cidr-10.0.0.0/16-except-10.0.1.0/24"
        );
        // Azure NPM's own test data (iptablesave-v2): podlabel-pod:a.
        assert_eq!(hashed_set_name("podlabel-pod:a"), "azure-npm-3922407721");
    }

    #[test]
    fn sets_follow_changes_as_the_kernel_holds_them() {
        let ip = |s: &str| Member::Address(s.parse().unwrap());
        let ns = SetDef::Namespace("x".into());
        let cidr = block("10.0.0.0/16", &["10.0.1.0/24"]);
        let inline = block("10.1.0.0/16", &[]);
        let any = block("0.0.0.0/0", &["10.2.0.0/16"]);
        let half = block("0.0.0.0/0", &["128.0.0.0/1"]);
        let net = |n: &str, except| Member::Net { net: n.parse().unwrap(), except };
        let changes = vec![
            LayoutChange::AddSet { set: ns.clone() },
            LayoutChange::AddMember { set: ns.clone(), member: ip("10.0.0.1") },
            LayoutChange::AddMember { set: ns.clone(), member: ip("10.0.0.2") },
            LayoutChange::AddMember { set: ns.clone(), member: ip("fd00::1") },
            LayoutChange::AddSet { set: SetDef::AllNamespaces },
            LayoutChange::AddMember {
                set: SetDef::AllNamespaces,
                member: Member::Set(Box::new(ns.clone())),
            },
            LayoutChange::AddSet { set: cidr.clone() },
            LayoutChange::AddMember { set: cidr.clone(), member: net("10.0.0.0/16", false) },
            LayoutChange::AddMember { set: cidr.clone(), member: net("10.0.1.0/24", true) },
            LayoutChange::AddSet { set: inline.clone() },
            LayoutChange::AddMember { set: inline.clone(), member: net("10.1.0.0/16", false) },
            LayoutChange::AddSet { set: any.clone() },
            LayoutChange::AddMember { set: any.clone(), member: net("0.0.0.0/0", false) },
            LayoutChange::AddMember { set: any.clone(), member: net("10.2.0.0/16", true) },
            LayoutChange::RemoveMember { set: ns.clone(), member: ip("10.0.0.2") },
            LayoutChange::AddSet { set: half.clone() },
            LayoutChange::AddMember { set: half.clone(), member: net("0.0.0.0/0", false) },
            LayoutChange::AddMember { set: half.clone(), member: net("128.0.0.0/1", true) },
        ];
        let mut sets = AzureSets::default();
        sets.apply(&changes);
        let mut layout = Layout::default();
        layout.apply(&changes).unwrap();
        assert_eq!(sets, AzureSets::from_layout(&layout));
        let c = sets.counts(7, true);
        // ns-x: one IPv4 address; the list: one set; the block: itself and its except; the
        // /0: two /1 and the except; the /0 without a /1: two /1, one flagged `nomatch`; the
        // block without excepts is no set.
        assert_eq!((c.rules, c.sets, c.set_entries), (7, 5, 1 + 1 + 2 + 3 + 2));
        let names: Vec<&str> = c.per_set.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "cidr-0.0.0.0/0-except-10.2.0.0/16",
                "cidr-0.0.0.0/0-except-128.0.0.0/1",
                "cidr-10.0.0.0/16-except-10.0.1.0/24",
                "ns-x",
                "nslabel-all-namespaces"
            ]
        );
        assert!(c.per_set.iter().all(|(n, h, _)| *h == hashed_set_name(n)));
        sets.apply(&[LayoutChange::RemoveSet { set: any }]);
        assert_eq!((sets.len(), sets.entries()), (4, 6));
        let named = AzureSets::from_layout_named(&layout, |d| {
            (d == &ns).then(|| "azure-npm-1".to_string())
        });
        assert!(named.iter().any(|(d, s)| d == &ns && s.hash == "azure-npm-1"));
        assert!(sets.counts(0, false).per_set.is_empty());
    }
}
