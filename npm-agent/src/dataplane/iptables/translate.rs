//! From the plan's Azure NPM layout ([`crate::plan::layout`]) to `ipset restore` and
//! `iptables-restore --noflush` batches: the iptables dataplane's encoding, pure and
//! host-testable. The compiler decides which sets exist, what they hold and what each policy
//! matches; this module names them as Azure NPM does (`dataplane::azure::set_name`, shared with
//! the metrics of both Linux modes) and spells them as rules and commands.
//!
//! # Encoding
//! - Every NetworkPolicy gets a chain per direction it covers,
//!   `AZURE-NPM-{INGRESS,EGRESS}-<FNV-1a of "<namespace>/<name>">`.
//! - Dispatch (where this layout departs from Azure NPM's, which jumps to every policy's
//!   chain through a rule matching the policy's pod selector sets, so that each new
//!   connection walks every policy of the cluster): `AZURE-NPM-INGRESS` (by destination)
//!   and `AZURE-NPM-EGRESS` (by source) hold one rule per local pod that policies isolate,
//!   `-d <pod>/32` (`-s`), jumping to the chain of the policies selecting it,
//!   `AZURE-NPM-IN-PODS-<hash>` / `AZURE-NPM-EG-PODS-<hash>` (shared by the pods that the
//!   same policies select). That *group* chain matches, at once, every rule of those
//!   policies whose peer is an ipBlock without excepts and whose port is one number (or a
//!   range of at most 16): a `hash:net,port` set of (block, protocol:port), named after its
//!   content; then jumps to the chains of the policies with other rules, by name; then sets
//!   the drop mark (the pod is isolated). The compiler says which policies select each local
//!   pod; a connection walks only those, and blocks on ports cost one set lookup however
//!   many policies name them. The policy chains hold all their rules, for reading.
//! - A selector becomes a conjunction of sets: `ns-<ns>` (the pods of a namespace, hash:net),
//!   `podlabel-<key>` / `podlabel-<key>:<value>` (pods with the label, hash:net, cluster-wide),
//!   `nestedlabel-<key>:<v1>:<v2>` (list:set of podlabel sets, for `In` with several values),
//!   `nslabel-<key>` / `nslabel-<key>:<value>` / `nslabel-<key>:<v1>:<v2>` (list:set of the
//!   `ns-` sets of matching namespaces) and `nslabel-all-namespaces`; `NotIn` and
//!   `DoesNotExist` are negated matches (`! --match-set`), with `nslabel-all-namespaces`
//!   added when nothing else says the address is a pod's.
//! - Allow rules are one per rule of the layout (one per peer and port): numeric
//!   ports as `-p`/`--dport`, named ports as `namedport:<name>` (hash:ip,port of
//!   `<ip>,<proto>:<port>`, matched `dst,dst`: the selected pod's port for ingress, the
//!   destination pod's for egress), ipBlocks with excepts as `cidr-<block>[-except-…]` sets
//!   (hash:net, excepts as `nomatch`), those without by address (`-s`/`-d`).
//! - Sets exist and hold what the layout says (which the compiler keeps following the pods
//!   and namespaces); `quarantine` holds addresses several local pods claim.
//!
//! # Families
//! A translator writes one family ([`Family`]): IPv4 in iptables with `family inet` sets, or
//! IPv6 in ip6tables with `family inet6` sets named `inet6:<the IPv4 twin's name>`. The
//! layout is one for both; each translator takes the members, blocks and local endpoints of
//! its family. A rule whose peer is a block of the other family matches nothing in this
//! family, so it is left out of this family's chain (never widened); a rule without peers,
//! or with selectors, is in both (the selectors' sets hold that family's addresses). The
//! dataplane runs both translators on every diff, phase by phase (see `kernel`).
//!
//! # Order (make-before-break)
//! Every diff becomes up to three batches, each one process (four when the transition is
//! lifted on its own):
//! 1. `ipset`: new sets with their members; then, for addresses whose memberships change,
//!    the address joins the `transition` set and the memberships change;
//! 2. `iptables`: every chain, rule and dispatch change of the diff in one transaction
//!    (atomic): a policy is created, rewritten or removed at once, an endpoint moves to its
//!    new policies at once;
//! 3. `ipset`: the addresses leave `transition` (at the end of 1 when the diff writes no
//!    rule); sets no longer referenced are destroyed.
//!
//! The dataplane hands the translator net diffs: a burst of events' diffs becomes the one
//! move from the layout the kernel holds to the layout after the burst (`Layout::diff`).
//! Between 1 and 2 the old rules judge the new memberships, but every address whose
//! memberships changed is in transition then, and the others are judged as before.
//!
//! Set memberships cannot change atomically, and selectors are conjunctions: adding an
//! address to its new label sets before removing it from its old ones would, for a moment,
//! match combinations that neither its old nor its new labels have (and removing first
//! would match negations wrongly). So `AZURE-NPM` first drops new connections from and to
//! an address in `transition` (the addresses the layout's diff regroups): while its labels change, its new connections are refused
//! (TCP retries), never admitted by a combination that neither state allows. Connections
//! already established are not affected (AZURE-NPM sees only a connection's first packet).
//!
//! A reconcile (start-up, or after a failed batch) builds the layout of the whole plan and
//! moves the kernel to it the same way: missing sets and members first (addresses whose
//! memberships differ held in `transition`), every chain in one transaction, stale chains
//! and sets last.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

pub use super::names::Family;
use super::names::{
    self, ACCEPT, AZURE_NPM, EGRESS, FORWARD_JUMP, INGRESS, INGRESS_ALLOW_MARK, quote_comment,
};
use super::saved::{KernelState, jumps_to_azure_npm};
use crate::dataplane::azure;
use crate::model::cluster_policy::{Action, Tier};
use crate::model::{Direction, ObjectKey, PortSpec};
use crate::plan::layout::{
    DirectionLayout, Layout, LayoutChange, LayoutRule, Member, PolicyLayout, SetDef, SetMatch,
    TierRank,
};
use crate::plan::{Plan, PlanDiff};

/// Which program a batch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `ipset restore` (one command per line, `-exist`).
    Ipset,
    /// `iptables-restore --noflush` (a `*filter` … `COMMIT` transaction).
    Iptables,
    /// `ip6tables-restore --noflush`, the same for IPv6.
    Ip6tables,
}

impl Family {
    /// The program that writes this family's rules.
    pub fn rules_tool(self) -> Tool {
        match self {
            Family::V4 => Tool::Iptables,
            Family::V6 => Tool::Ip6tables,
        }
    }
}

/// One process's worth of work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// What it does, for logs and errors.
    pub step: &'static str,
    pub tool: Tool,
    pub script: String,
    /// Commands in the script (not counting `*filter`, chain declarations, `COMMIT`).
    pub commands: usize,
}

/// The steps of a diff, in order.
pub const STEP_ADD_SETS: &str = "create sets and change members";
pub const STEP_RULES: &str = "write rules";
pub const STEP_DEL_SETS: &str = "destroy sets";
/// (A family's whole layout removed: [`cleanup_batches`].)
pub const STEP_REMOVE_CHAINS: &str = "remove chains";
/// (A reconcile only: addresses leave the transition set once every chain is rewritten.)
pub const STEP_LIFT_TRANSITION: &str = "lift the transition guard";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    HashNet,
    HashIpPort,
    HashNetPort,
    ListSet,
}

impl SetKind {
    pub fn type_name(self) -> &'static str {
        match self {
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
            SetKind::HashNetPort => "hash:net,port",
            SetKind::ListSet => "list:set",
        }
    }
}

/// A set the kernel holds: one of the plan's layout, or the dataplane's own `transition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelSet<'a> {
    Layout(&'a SetDef),
    /// `transition`: addresses whose memberships are changing (see the module docs).
    Transition,
}

impl KernelSet<'_> {
    /// Azure NPM's readable name (the kernel name is its hash).
    fn readable(self) -> String {
        match self {
            KernelSet::Transition => "transition".to_string(),
            KernelSet::Layout(d) => azure::set_name(d),
        }
    }

    fn kind(self) -> SetKind {
        match self {
            KernelSet::Transition => SetKind::HashNet,
            KernelSet::Layout(SetDef::NamedPort(_)) => SetKind::HashIpPort,
            KernelSet::Layout(d) if d.is_list() => SetKind::ListSet,
            KernelSet::Layout(_) => SetKind::HashNet,
        }
    }
}

/// The commands that create a set and add its members, as one block of lines (one string,
/// not one per line: a reconcile at 100k pods writes half a million of them).
fn create_block(f: Family, h: &str, kind: SetKind, members: &BTreeSet<String>) -> String {
    let mut b = create_line(f, h, kind);
    for m in members {
        let _ = write!(b, "\nadd {h} {m}");
    }
    b
}

fn create_line(f: Family, h: &str, kind: SetKind) -> String {
    let inet = f.inet();
    match kind {
        // Sets of pods may hold every pod of a large cluster.
        SetKind::HashNet | SetKind::HashIpPort | SetKind::HashNetPort => {
            format!("create {h} {} family {inet} maxelem 4294967295", kind.type_name())
        }
        // (Kernels before 4.x hold at most `size` members.)
        SetKind::ListSet => format!("create {h} list:set size 65536"),
    }
}

/// A set the kernel holds: its names and how many members it has (what they are is the
/// plan's layout: the translator spells them when it writes them, and keeps no copy).
#[derive(Clone, Debug)]
struct SetState {
    name: String,
    readable: String,
    members: usize,
}

/// One direction of one policy, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainState {
    chain: String,
    rules: Vec<String>,
    /// What its rules of one ipBlock (without excepts) and one port admit, as `hash:net,port`
    /// members (`ipset save`'s spelling): its endpoints' groups match them all at once.
    fast: BTreeSet<String>,
    /// Whether it has other rules (its endpoints' groups then jump to its chain).
    slow: bool,
    /// A ClusterNetworkPolicy's tier and priority (`None`: a NetworkPolicy's chain).
    rank: Option<TierRank>,
}

/// What the local endpoint directions that the same policies select walk: a chain, with
/// the policies' block-and-port rules as one set.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupState {
    chain: String,
    rules: Vec<String>,
    set: Option<GroupSet>,
}

/// What a group walks, as [`RuleTranslator::group_content`] finds it.
#[derive(Debug, Default)]
struct GroupContent {
    /// Whether a NetworkPolicy selects its endpoints (what no rule admits is refused).
    isolating: bool,
    fast: BTreeSet<String>,
    walk: Vec<String>,
    /// The tiers' chains, in the order of evaluation.
    admin: Vec<String>,
    baseline: Vec<String>,
}

/// The jumps to one tier's chains: the first to match decides (a chain's `Accept` or `Deny`
/// ends the walk); an Admin `Pass` marks the packet, and the tier's other chains are
/// walked only unmarked. The mark is cleared first: a packet's ingress side may have passed
/// before its egress side is walked, and a chain reads the mark after each of its `Pass`
/// rules.
fn tier_rules(chains: &[String], rules: &mut Vec<String>) {
    if !chains.is_empty() {
        rules.push(format!("-j MARK --set-xmark {}", names::PASS_MARK_CLEAR_HEX));
    }
    for (i, c) in chains.iter().enumerate() {
        if i == 0 {
            rules.push(format!("-j {c}"));
        } else {
            rules.push(format!("-m mark ! --mark {} -j {c}", names::PASS_MARK_HEX));
        }
    }
}

/// A group's `hash:net,port` set (named after its content: a group whose blocks and ports
/// change gets a new set, written before its chain names it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct GroupSet {
    name: String,
    readable: String,
    members: BTreeSet<String>,
}

#[derive(Default)]
struct Phases {
    create_sets: Vec<String>,
    create_lists: Vec<String>,
    guard: BTreeSet<IpAddr>,
    add_members: Vec<String>,
    del_members: Vec<String>,
    new_chains: Vec<String>,
    rules: Vec<String>,
    del_rules: Vec<String>,
    del_chains: Vec<String>,
    destroy_lists: Vec<String>,
    destroy_sets: Vec<String>,
}

/// The encoder's memory: what it has told the kernel (set names, chains as rule text). What the sets hold and what each policy matches is the plan's
/// layout; this only spells it.
#[derive(Clone, Debug, Default)]
pub struct RuleTranslator {
    /// The family it writes.
    family: Family,
    /// The layout's sets the kernel holds in this family (blocks of the other left out).
    sets: HashMap<SetDef, SetState>,
    transition: Option<SetState>,
    /// Kernel set name → readable name (every name given out).
    names: HashMap<String, String>,
    chains: HashMap<(ObjectKey, Direction), ChainState>,
    /// Local endpoint directions (of this family) and the policies each walks.
    dispatch: BTreeMap<(Direction, IpAddr), Arc<BTreeSet<ObjectKey>>>,
    /// The chains of the policy lists that dispatch names (two policies or more).
    groups: HashMap<(Direction, Arc<BTreeSet<ObjectKey>>), GroupState>,
    /// Kernel chain name → the readable name it was claimed for.
    chain_names: HashMap<String, String>,
    /// Whether AZURE-NPM holds its rules (Azure NPM leaves it empty without policies).
    active: bool,
    /// Whether the base chains exist.
    base: bool,
    /// During a reconcile: the type of each set the kernel holds, so that no name is taken
    /// by a set of another type.
    kernel_kinds: Option<HashMap<String, String>>,
}

/// Sizes of what the translator has told the kernel to hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub policies: usize,
    pub chains: usize,
    pub sets: usize,
    pub set_members: usize,
    pub rules: usize,
}

fn di(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// What a set of the layout is to one family's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// An ipBlock of the family without excepts: rules match it by address (`-s`/`-d`), not
    /// through a set (no set to create, no name for the kernel to look up among thousands,
    /// no set lookup per packet).
    Inline(IpNet),
    /// A set of the kernel's.
    Set,
    /// An ipBlock of the other family: it holds no address of this one.
    Foreign,
}

fn held(f: Family, def: &SetDef) -> Held {
    match def {
        SetDef::Cidr(b) if !f.holds_net(&b.net) => Held::Foreign,
        SetDef::Cidr(b) if !b.except.iter().any(|e| f.holds_net(e)) => Held::Inline(b.net),
        _ => Held::Set,
    }
}

/// A block as `ipset save` and `iptables-save` print it (a single address without `/n`).
fn net_text(f: Family, net: IpNet) -> String {
    if net.prefix_len() == f.host_len() { net.addr().to_string() } else { net.to_string() }
}

/// What a rule admits as `hash:net,port` members, when its peer is one ipBlock without
/// excepts (not /0) and its port one number or a short range (`None`: the rule is walked).
fn fast_members(f: Family, r: &LayoutRule) -> Option<Vec<String>> {
    let [m] = r.peers.as_slice() else { return None };
    let Held::Inline(net) = held(f, &m.set) else { return None };
    if m.negated || net.prefix_len() == 0 {
        return None;
    }
    let Some(PortSpec::Range { protocol, first, last }) = &r.port else { return None };
    if last < first || last - first >= 16 {
        return None;
    }
    let n = net_text(f, net);
    let p = protocol.as_str().to_lowercase();
    Some((*first..=*last).map(|port| format!("{n},{p}:{port}")).collect())
}

fn alternate(base: &str, k: usize) -> String {
    if k == 0 { base.to_string() } else { format!("{base}~{k}") }
}

/// A hash:net member as `ipset save` prints it.
fn net_member(f: Family, net: IpNet, nomatch: bool) -> String {
    let mut s = net_text(f, net);
    if nomatch {
        s.push_str(" nomatch");
    }
    s
}

/// The address a member line is about (for the transition set).
fn member_address(member: &str) -> Option<IpAddr> {
    member.split([',', '/', ' ']).next().and_then(|a| a.parse().ok())
}

/// `-p` … `--dport`, the named port (matched by the `namedport:` set), and the comment's
/// `-ON-…-TO-PORT-…` of a rule's port.
fn port_spec(port: Option<&PortSpec>) -> (String, Option<&str>, String) {
    let Some(spec) = port else { return (String::new(), None, String::new()) };
    match spec {
        PortSpec::Protocol(p) => {
            (format!("-p {} ", p.as_str().to_lowercase()), None, format!("-ON-{}", p.as_str()))
        }
        PortSpec::Range { protocol, first, last } => {
            let l = protocol.as_str().to_lowercase();
            let u = protocol.as_str();
            if first == last {
                (
                    format!("-p {l} -m {l} --dport {first} "),
                    None,
                    format!("-ON-{u}-TO-PORT-{first}"),
                )
            } else {
                (
                    format!("-p {l} -m {l} --dport {first}:{last} "),
                    None,
                    format!("-ON-{u}-TO-PORT-{first}:{last}"),
                )
            }
        }
        PortSpec::Named { protocol, name } => (
            format!("-p {} ", protocol.as_str().to_lowercase()),
            Some(name.as_str()),
            format!("-ON-{}-TO-PORT-namedport:{name}", protocol.as_str()),
        ),
    }
}

fn allow_target(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => INGRESS_ALLOW_MARK,
        Direction::Egress => ACCEPT,
    }
}

fn drop_rule(dir: Direction) -> String {
    let mark = match dir {
        Direction::Ingress => names::INGRESS_DROP_MARK_HEX,
        Direction::Egress => names::EGRESS_DROP_MARK_HEX,
    };
    format!("-m comment --comment DROP-ALL -j MARK --set-xmark {mark}")
}

fn base_of(dir: Direction) -> &'static str {
    match dir {
        Direction::Ingress => INGRESS,
        Direction::Egress => EGRESS,
    }
}

/// AZURE-NPM's rules while a policy (or a quarantine) exists: the quarantine, the transition
/// guard, then the three jumps.
fn azure_npm_rules(transition: &str, quarantine: Option<&str>) -> Vec<String> {
    let mut r = Vec::new();
    for flag in ["src", "dst"] {
        if let Some(q) = quarantine {
            r.push(format!(
                "-m set --match-set {q} {flag} -m comment --comment {} -j DROP",
                quote_comment(&format!("DROP-CONTESTED-POD-ADDRESS-{}", flag.to_uppercase()))
            ));
        }
    }
    for flag in ["src", "dst"] {
        r.push(format!(
            "-m set --match-set {transition} {flag} -m comment --comment {} -j DROP",
            quote_comment(&format!(
                "DROP-NEW-CONNECTIONS-OF-PODS-CHANGING-LABELS-{}",
                flag.to_uppercase()
            ))
        ));
    }
    for t in [INGRESS, EGRESS, ACCEPT] {
        r.push(format!("-j {t}"));
    }
    r
}

/// The base chains' fixed rules (AZURE-NPM's and the policy jumps excluded).
fn base_rules() -> Vec<(&'static str, String)> {
    let mut r = vec![(INGRESS, ingress_tail())];
    let allow = names::INGRESS_ALLOW_MARK_HEX;
    r.push((
        INGRESS_ALLOW_MARK,
        format!(
            "-m comment --comment {} -j MARK --set-xmark {allow}",
            quote_comment(&format!("SET-INGRESS-ALLOW-MARK-{allow}"))
        ),
    ));
    r.push((INGRESS_ALLOW_MARK, format!("-j {EGRESS}")));
    for t in egress_tail() {
        r.push((EGRESS, t));
    }
    r.push((ACCEPT, "-j ACCEPT".to_string()));
    r
}

fn ingress_tail() -> String {
    let m = names::INGRESS_DROP_MARK_HEX;
    format!(
        "-m mark --mark {m} -m comment --comment {} -j DROP",
        quote_comment(&format!("DROP-ON-INGRESS-DROP-MARK-{m}"))
    )
}

fn egress_tail() -> [String; 2] {
    let d = names::EGRESS_DROP_MARK_HEX;
    let a = names::INGRESS_ALLOW_MARK_HEX;
    [
        format!(
            "-m mark --mark {d} -m comment --comment {} -j DROP",
            quote_comment(&format!("DROP-ON-EGRESS-DROP-MARK-{d}"))
        ),
        format!(
            "-m mark --mark {a} -m comment --comment {} -j {ACCEPT}",
            quote_comment(&format!("ACCEPT-ON-INGRESS-ALLOW-MARK-{a}"))
        ),
    ]
}

impl RuleTranslator {
    /// A translator of IPv4 (iptables).
    pub fn new() -> Self {
        Self::default()
    }

    /// A translator of `family`.
    pub fn for_family(family: Family) -> Self {
        Self { family, ..Self::default() }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn encoded(&self) -> Encoded {
        let group_sets = || self.groups.values().filter_map(|g| g.set.as_ref());
        Encoded {
            policies: self.chains.keys().map(|(k, _)| k).collect::<HashSet<_>>().len(),
            chains: self.chains.len() + self.groups.len(),
            sets: self.all_sets().count() + group_sets().count(),
            set_members: self.all_sets().map(|(_, s)| s.members).sum::<usize>()
                + group_sets().map(|g| g.members.len()).sum::<usize>(),
            rules: self.chains.values().map(|c| c.rules.len()).sum::<usize>()
                + self.groups.values().map(|g| g.rules.len()).sum::<usize>()
                + self.dispatch.len(),
        }
    }

    fn all_sets(&self) -> impl Iterator<Item = (KernelSet<'_>, &SetState)> {
        self.transition
            .iter()
            .map(|s| (KernelSet::Transition, s))
            .chain(self.sets.iter().map(|(d, s)| (KernelSet::Layout(d), s)))
    }

    // ---- sets ----

    /// Claims the kernel name of a set: the hash of its readable name, or of an alternate
    /// when that hash is taken by another set or, during a reconcile, by a kernel set of
    /// another type.
    fn claim(&mut self, readable: &str, kind: SetKind) -> String {
        for k in 0.. {
            let cand = alternate(readable, k);
            let h = self.family.set_name(&cand);
            if self.names.contains_key(&h) {
                continue;
            }
            if let Some(k) = self.kernel_kinds.as_ref().and_then(|kinds| kinds.get(&h))
                && k != kind.type_name()
            {
                continue;
            }
            self.names.insert(h.clone(), readable.to_string());
            return h;
        }
        unreachable!()
    }

    /// Names a set of the layout (`false`: the kernel holds no such set: an ipBlock matched
    /// by address, or one of the other family).
    fn add_set(&mut self, def: &SetDef) -> bool {
        if held(self.family, def) != Held::Set {
            return false;
        }
        let set = KernelSet::Layout(def);
        let readable = set.readable();
        let name = self.claim(&readable, set.kind());
        self.sets.insert(def.clone(), SetState { name, readable, members: 0 });
        true
    }

    /// A member as `ipset save` prints it (a block of /0 is two /1: hash:net cannot hold
    /// /0); `None` for an address or block of the other family.
    fn member_strings(&self, member: &Member) -> Option<Vec<String>> {
        let f = self.family;
        match member {
            Member::Address(ip) => f.holds(*ip).then(|| vec![ip.to_string()]),
            Member::Port { ip, protocol, port } => f
                .holds(*ip)
                .then(|| vec![format!("{ip},{}:{port}", protocol.as_str().to_lowercase())]),
            Member::Net { net, except } => f.holds_net(net).then(|| {
                if net.prefix_len() == 0 && !except {
                    f.halves().map(String::from).to_vec()
                } else {
                    vec![net_member(f, *net, *except)]
                }
            }),
            Member::Set(sub) => {
                Some(self.sets.get(sub).map(|s| vec![s.name.clone()]).unwrap_or_default())
            }
        }
    }

    /// The members of every set held, as `ipset save` prints them, from `layout` (kernel
    /// name → members; the transition set's are the kernel's business).
    fn members_from(&self, layout: &Layout) -> HashMap<String, BTreeSet<String>> {
        let mut out: HashMap<String, BTreeSet<String>> = self
            .sets
            .iter()
            .map(|(def, s)| {
                let members = layout.sets.get(def).into_iter().flat_map(|m| m.iter());
                let strings = members.filter_map(|m| self.member_strings(m)).flatten().collect();
                (s.name.clone(), strings)
            })
            .collect();
        if let Some(t) = &self.transition {
            out.insert(t.name.clone(), BTreeSet::new());
        }
        out
    }

    // ---- chains ----

    /// A match as `iptables-save` prints it (`None`: the set is not held).
    fn match_text(&self, negated: bool, set: &SetDef, flags: &str) -> Option<String> {
        let bang = if negated { "! " } else { "" };
        let name = &self.sets.get(set)?.name;
        Some(format!("-m set {bang}--match-set {name} {flags} "))
    }

    /// A match's readable name, for comments.
    fn match_readable(&self, m: &SetMatch) -> String {
        let readable = match self.sets.get(&m.set) {
            Some(s) => s.readable.clone(),
            None => KernelSet::Layout(&m.set).readable(),
        };
        format!("{}{readable}", if m.negated { "!" } else { "" })
    }

    /// Writes a policy direction: rules and jump as `iptables-save` prints them. A rule whose
    /// peer is a block of the other family matches nothing here and is left out.
    fn write(
        &mut self,
        key: &ObjectKey,
        dir: Direction,
        rank: Option<TierRank>,
        l: &DirectionLayout,
    ) -> ChainState {
        let tier = rank.map(|r| r.tier);
        let chain = match self.chains.get(&(key.clone(), dir)) {
            Some(c) if c.rank.map(|r| r.tier) == tier => c.chain.clone(),
            _ => self.claim_chain(key, dir, tier),
        };
        let (peer, peer_word) = match dir {
            Direction::Ingress => ("src", "FROM"),
            Direction::Egress => ("dst", "TO"),
        };
        let target = allow_target(dir);
        let mut rules = Vec::new();
        let (mut fast, mut slow) = (BTreeSet::new(), false);
        for r in &l.rules {
            let (spec, named, port_comment) = port_spec(r.port.as_ref());
            let named = named.map(|n| SetDef::NamedPort(n.to_string()));
            // (`iptables-save` prints the address before the protocol and the matches.)
            let mut addr = None;
            let mut texts = Some(Vec::new());
            for m in &r.peers {
                let h = held(self.family, &m.set);
                if h == Held::Foreign && m.negated {
                    // (No address of this family is in it: the negation holds for all.)
                    continue;
                }
                match Some(h).filter(|_| !m.negated) {
                    Some(Held::Inline(net)) if addr.is_none() => {
                        let flag = if peer == "src" { "-s" } else { "-d" };
                        // (A /0 matches every address: `iptables-save` prints nothing.)
                        addr = Some(if net.prefix_len() == 0 {
                            String::new()
                        } else {
                            format!("{flag} {net} ")
                        });
                    }
                    _ => {
                        let t = self.match_text(m.negated, &m.set, peer);
                        texts = texts.zip(t).map(|(mut v, t)| {
                            v.push(t);
                            v
                        });
                    }
                }
            }
            if let Some(n) = &named {
                let t = self.match_text(false, n, "dst,dst");
                texts = texts.zip(t).map(|(mut v, t)| {
                    v.push(t);
                    v
                });
            }
            let Some(texts) = texts else { continue };
            let addr = addr.unwrap_or_default();
            // (A named port is in the port part of the comment.)
            let peers: Vec<String> = r.peers.iter().map(|m| self.match_readable(m)).collect();
            // A NetworkPolicy allows; a ClusterNetworkPolicy's rule says what it does.
            let (word, jump) = match (tier, r.action) {
                (None, _) => ("ALLOW", format!("-j {target}")),
                (Some(_), Action::Accept) => ("ACCEPT", format!("-j {target}")),
                (Some(_), Action::Deny) => ("DENY", "-j DROP".to_string()),
                // (Baseline is the last tier: passing it leaves the connection allowed.)
                (Some(Tier::Baseline), Action::Pass) => ("PASS", format!("-j {target}")),
                (Some(Tier::Admin), Action::Pass) => {
                    ("PASS", format!("-j MARK --set-xmark {}", names::PASS_MARK_HEX))
                }
            };
            let who = if peers.is_empty() {
                format!("{word}-ALL")
            } else {
                format!("{word}-{peer_word}-{}", peers.join("-AND-"))
            };
            let comment = quote_comment(&format!("{who}{port_comment}"));
            match fast_members(self.family, r).filter(|_| tier.is_none()) {
                Some(m) => fast.extend(m),
                None => slow = true,
            }
            rules.push(format!(
                "{addr}{spec}{}-m comment --comment {comment} {jump}",
                texts.concat()
            ));
            if tier == Some(Tier::Admin) && r.action == Action::Pass {
                // (The rest of this policy and of the tier is skipped: the group looks at
                // the mark before each other policy of the tier.)
                rules.push(format!("-m mark --mark {} -j RETURN", names::PASS_MARK_HEX));
            }
        }
        // (The drop mark is set by the groups that jump here, once per connection.)
        ChainState { chain, rules, fast, slow, rank }
    }

    /// A name for a policy's chain: `ns/name` hashed for a NetworkPolicy (as Azure NPM
    /// does), the bare name in its tier's chains for a ClusterNetworkPolicy.
    fn claim_chain(&mut self, key: &ObjectKey, dir: Direction, tier: Option<Tier>) -> String {
        let readable = match tier {
            None => format!("{key}"),
            Some(_) => key.name.clone(),
        };
        let ingress = dir == Direction::Ingress;
        for k in 0.. {
            let cand = alternate(&readable, k);
            let chain = match tier {
                None => names::policy_chain(ingress, &cand),
                Some(t) => names::tier_chain(t == Tier::Admin, ingress, &cand),
            };
            if !self.chain_names.contains_key(&chain) {
                self.chain_names.insert(chain.clone(), readable);
                return chain;
            }
        }
        unreachable!()
    }

    /// Rewrites the chains of one policy (created, changed or deleted: `None`).
    fn set_policy(&mut self, key: &ObjectKey, layout: Option<&PolicyLayout>, ph: &mut Phases) {
        for dir in Direction::BOTH {
            let rank = layout.and_then(|l| l.tier);
            let new = layout.and_then(|l| l.direction(dir)).map(|l| self.write(key, dir, rank, l));
            let ck = (key.clone(), dir);
            let old = self.chains.remove(&ck);
            match (&old, &new) {
                (None, None) => {}
                (_, Some(n)) => {
                    // (Declaring an existing chain flushes it, in the same transaction.)
                    if old.as_ref().is_none_or(|o| o.rules != n.rules || o.chain != n.chain) {
                        ph.new_chains.push(format!(":{} - [0:0]", n.chain));
                        ph.rules.extend(n.rules.iter().map(|r| format!("-A {} {r}", n.chain)));
                    }
                    // (A ClusterNetworkPolicy that changed tiers has a chain of the new tier;
                    // its groups are rewritten in the same transaction.)
                    if let Some(o) = old.as_ref().filter(|o| o.chain != n.chain) {
                        ph.del_rules.push(format!("-F {}", o.chain));
                        ph.del_chains.push(format!("-X {}", o.chain));
                        self.chain_names.remove(&o.chain);
                    }
                }
                (Some(o), None) => {
                    // (Nothing dispatches to it any more: the layout removes a policy after
                    // the dispatch stops naming it, and the base chains are rewritten first.)
                    ph.del_rules.push(format!("-F {}", o.chain));
                    ph.del_chains.push(format!("-X {}", o.chain));
                    self.chain_names.remove(&o.chain);
                }
            }
            if let Some(n) = new {
                self.chains.insert(ck, n);
            }
        }
    }

    // ---- dispatch ----

    /// The chain a local endpoint direction's rule jumps to: its group's.
    fn dispatch_target(&self, d: Direction, x: &Arc<BTreeSet<ObjectKey>>) -> Option<&str> {
        self.groups.get(&(d, x.clone())).map(|g| g.chain.as_str())
    }

    /// A base chain's dispatch rules (by address), then its tail.
    fn base_chain_rules(&self, d: Direction) -> Vec<String> {
        // (No comment: a comment is a match, walked by every connection; the address says
        // which pod it is.)
        let flag = if d == Direction::Ingress { "-d" } else { "-s" };
        let len = self.family.host_len();
        let mut rules: Vec<String> = self
            .dispatch
            .range(dispatch_range(d))
            .filter_map(|((_, ip), x)| {
                Some(format!("{flag} {ip}/{len} -j {}", self.dispatch_target(d, x)?))
            })
            .collect();
        match d {
            Direction::Ingress => rules.push(ingress_tail()),
            Direction::Egress => rules.extend(egress_tail()),
        }
        rules
    }

    /// What a group holds: the block-and-port members of its NetworkPolicies, and the
    /// chains of its policies with other rules, by tier.
    fn group_content(&self, d: Direction, policies: &BTreeSet<ObjectKey>) -> GroupContent {
        let mut g = GroupContent::default();
        let mut tiered: Vec<(TierRank, &ObjectKey, &ChainState)> = Vec::new();
        for k in policies {
            let Some(c) = self.chains.get(&(k.clone(), d)) else {
                // (A NetworkPolicy selecting the endpoint isolates it, rules or not; a
                // ClusterNetworkPolicy's key has no namespace.)
                g.isolating |= !k.namespace.is_empty();
                continue;
            };
            match c.rank {
                None => {
                    g.isolating = true;
                    g.fast.extend(c.fast.iter().cloned());
                    if c.slow {
                        g.walk.push(c.chain.clone());
                    }
                }
                Some(r) => tiered.push((r, k, c)),
            }
        }
        // (In the order of evaluation: priority, then name.)
        tiered.sort_by(|a, b| (a.0.priority, a.1).cmp(&(b.0.priority, b.1)));
        for (r, _, c) in tiered.into_iter().filter(|t| t.2.slow) {
            match r.tier {
                Tier::Admin => g.admin.push(c.chain.clone()),
                Tier::Baseline => g.baseline.push(c.chain.clone()),
            }
        }
        g
    }

    /// A group's rules: the Admin tier's chains; then, where NetworkPolicies isolate, its
    /// set (their blocks and ports, matched at once), a jump to each of their chains with
    /// other rules (no comment: the walk is the hot path) and the drop mark; elsewhere the
    /// Baseline tier's chains.
    fn group_rules(d: Direction, set: Option<&GroupSet>, g: &GroupContent) -> Vec<String> {
        let mut rules = Vec::new();
        tier_rules(&g.admin, &mut rules);
        if !g.isolating {
            tier_rules(&g.baseline, &mut rules);
            return rules;
        }
        if let Some(s) = set {
            let (flags, word) = match d {
                Direction::Ingress => ("src,dst", "FROM"),
                Direction::Egress => ("dst,dst", "TO"),
            };
            let comment = quote_comment(&format!("ALLOW-{word}-{}", s.readable));
            rules.push(format!(
                "-m set --match-set {} {flags} -m comment --comment {comment} -j {}",
                s.name,
                allow_target(d)
            ));
        }
        rules.extend(g.walk.iter().map(|c| format!("-j {c}")));
        rules.push(drop_rule(d));
        rules
    }

    fn claim_group(&mut self, d: Direction, policies: &BTreeSet<ObjectKey>) -> String {
        let readable: Vec<String> = policies.iter().map(ToString::to_string).collect();
        let readable = readable.join(",");
        for k in 0.. {
            let chain = names::group_chain(d == Direction::Ingress, &alternate(&readable, k));
            if !self.chain_names.contains_key(&chain) {
                self.chain_names.insert(chain.clone(), readable);
                return chain;
            }
        }
        unreachable!()
    }

    /// Makes the groups of `d` those its dispatch names: new ones written, those holding a
    /// policy in `touched` brought up to date (a new set when their blocks and ports change),
    /// unused ones removed. With `ph`, the changes go into it and, when `rewrite_base`, the
    /// base chain is rewritten (all in the diff's one transaction: every endpoint direction
    /// moves at once; new sets before, old sets after).
    fn render_groups(
        &mut self,
        d: Direction,
        touched: &HashSet<ObjectKey>,
        rewrite_base: bool,
        mut ph: Option<&mut Phases>,
    ) {
        // (In order: the scripts, and the names claimed, do not depend on hashing.)
        let wanted: BTreeSet<Arc<BTreeSet<ObjectKey>>> =
            self.dispatch.range(dispatch_range(d)).map(|(_, x)| x.clone()).collect();
        let redo: Vec<Arc<BTreeSet<ObjectKey>>> = wanted
            .iter()
            .filter(|g| {
                !self.groups.contains_key(&(d, (*g).clone()))
                    || touched.iter().any(|k| g.contains(k))
            })
            .cloned()
            .collect();
        for g in redo {
            let content = self.group_content(d, &g);
            let fast = content.fast.clone();
            let old = self.groups.remove(&(d, g.clone()));
            let chain = match &old {
                Some(o) => o.chain.clone(),
                None => self.claim_group(d, &g),
            };
            let set = match old.as_ref().and_then(|o| o.set.as_ref()) {
                Some(s) if s.members == fast => Some(s.clone()),
                _ if fast.is_empty() => None,
                _ => {
                    let joined: Vec<&str> = fast.iter().map(String::as_str).collect();
                    let digest = azure::fnv1a64(&joined.join(" "));
                    let readable = format!("blocks-and-ports-of-{chain}-{digest:016x}");
                    let name = self.claim(&readable, SetKind::HashNetPort);
                    if let Some(ph) = ph.as_deref_mut() {
                        let f = self.family;
                        ph.create_sets.push(create_block(f, &name, SetKind::HashNetPort, &fast));
                    }
                    Some(GroupSet { name, readable, members: fast })
                }
            };
            if let Some(o) = old.as_ref().and_then(|o| o.set.as_ref())
                && set.as_ref().is_none_or(|s| s.name != o.name)
            {
                self.names.remove(&o.name);
                if let Some(ph) = ph.as_deref_mut() {
                    ph.destroy_sets.push(format!("destroy {}", o.name));
                }
            }
            let rules = Self::group_rules(d, set.as_ref(), &content);
            if let Some(ph) = ph.as_deref_mut()
                && old.as_ref().is_none_or(|o| o.rules != rules)
            {
                // (Declaring an existing chain flushes it, in the same transaction.)
                ph.new_chains.push(format!(":{chain} - [0:0]"));
                ph.rules.extend(rules.iter().map(|r| format!("-A {chain} {r}")));
            }
            self.groups.insert((d, g), GroupState { chain, rules, set });
        }
        let mut gone: Vec<(Direction, Arc<BTreeSet<ObjectKey>>)> =
            self.groups.keys().filter(|(gd, g)| *gd == d && !wanted.contains(g)).cloned().collect();
        gone.sort();
        for k in gone {
            let g = self.groups.remove(&k).expect("group");
            self.chain_names.remove(&g.chain);
            if let Some(s) = &g.set {
                self.names.remove(&s.name);
            }
            if let Some(ph) = ph.as_deref_mut() {
                ph.del_rules.push(format!("-F {}", g.chain));
                ph.del_chains.push(format!("-X {}", g.chain));
                if let Some(s) = &g.set {
                    ph.destroy_sets.push(format!("destroy {}", s.name));
                }
            }
        }
        if let Some(ph) = ph
            && rewrite_base
        {
            let base = base_of(d);
            ph.rules.push(format!("-F {base}"));
            ph.rules.extend(self.base_chain_rules(d).into_iter().map(|r| format!("-A {base} {r}")));
        }
    }

    /// Writes AZURE-NPM's rules again when whether it has any, or whether they look at the
    /// quarantine, changes.
    fn set_active(&mut self, ph: &mut Phases, quarantine_changed: bool) {
        let want = !self.chains.is_empty() || self.sets.contains_key(&SetDef::Quarantine);
        if want == self.active && !(want && quarantine_changed) {
            return;
        }
        self.active = want;
        ph.rules.push(format!("-F {AZURE_NPM}"));
        if want {
            ph.rules
                .extend(self.azure_npm_rules().into_iter().map(|r| format!("-A {AZURE_NPM} {r}")));
        }
    }

    fn azure_npm_rules(&self) -> Vec<String> {
        let quarantine = self.sets.get(&SetDef::Quarantine).map(|s| s.name.as_str());
        let transition = self.transition.as_ref().map(|s| s.name.as_str()).unwrap_or_default();
        azure_npm_rules(transition, quarantine)
    }

    fn ensure_base(&mut self, ph: &mut Phases) {
        if self.base {
            return;
        }
        self.base = true;
        self.add_transition();
        let t = self.transition.as_ref().expect("transition");
        ph.create_sets.push(create_line(self.family, &t.name, KernelSet::Transition.kind()));
        for c in names::BASE_CHAINS {
            ph.new_chains.push(format!(":{c} - [0:0]"));
        }
        for (chain, rule) in base_rules() {
            ph.rules.push(format!("-A {chain} {rule}"));
        }
        ph.rules.push(format!("-I FORWARD 1 {FORWARD_JUMP}"));
    }

    fn add_transition(&mut self) {
        let readable = KernelSet::Transition.readable();
        let name = self.claim(&readable, SetKind::HashNet);
        self.transition = Some(SetState { name, readable, members: 0 });
    }

    // ---- diffs ----

    /// Translates one diff's layout changes into batches, in order (empty ones left out).
    pub fn translate(&mut self, diff: &PlanDiff) -> Vec<Batch> {
        let mut ph = Phases::default();
        self.ensure_base(&mut ph);
        let quarantine_before = self.sets.contains_key(&SetDef::Quarantine);
        // Whether the dispatch of each direction changes, and the policies changed.
        let mut dispatched = [false; 2];
        let mut touched: HashSet<ObjectKey> = HashSet::new();
        // Sets added by this diff, in order: their members go into their create blocks.
        let mut fresh: Vec<&SetDef> = Vec::new();
        let mut fresh_members: HashMap<&SetDef, BTreeSet<String>> = HashMap::new();
        for c in &diff.layout {
            match c {
                LayoutChange::AddSet { set } => {
                    if self.add_set(set) {
                        fresh.push(set);
                        fresh_members.insert(set, BTreeSet::new());
                    }
                }
                LayoutChange::AddMember { set, member }
                | LayoutChange::RemoveMember { set, member } => {
                    let add = matches!(c, LayoutChange::AddMember { .. });
                    let Some(strings) = self.member_strings(member) else { continue };
                    if let Some(f) = fresh_members.get_mut(set) {
                        for m in strings {
                            if add {
                                f.insert(m)
                            } else {
                                f.remove(&m)
                            };
                        }
                        continue;
                    }
                    // (The compiler changes a member only when it changes.)
                    let Some(s) = self.sets.get_mut(set) else { continue };
                    for m in strings {
                        if add {
                            s.members += 1;
                            ph.add_members.push(format!("add {} {m}", s.name));
                        } else {
                            s.members = s.members.saturating_sub(1);
                            let m = m.trim_end_matches(" nomatch");
                            ph.del_members.push(format!("del {} {m}", s.name));
                        }
                    }
                }
                LayoutChange::RemoveSet { set } => {
                    let Some(s) = self.sets.remove(set) else { continue };
                    self.names.remove(&s.name);
                    if fresh_members.remove(set).is_some() {
                        // Added and removed within the diff: never created.
                        continue;
                    }
                    // Members need not leave a set that is destroyed.
                    let prefix = format!("del {} ", s.name);
                    ph.del_members.retain(|l| !l.starts_with(&prefix));
                    let out =
                        if set.is_list() { &mut ph.destroy_lists } else { &mut ph.destroy_sets };
                    out.push(format!("destroy {}", s.name));
                }
                LayoutChange::Regroup { ip } => {
                    if self.family.holds(*ip) {
                        ph.guard.insert(*ip);
                    }
                }
                LayoutChange::SetPolicy { key, layout } => {
                    self.set_policy(key, Some(layout), &mut ph);
                    touched.insert(key.clone());
                }
                LayoutChange::RemovePolicy { key } => {
                    self.set_policy(key, None, &mut ph);
                    touched.insert(key.clone());
                }
                LayoutChange::AddDispatch { direction, ip, policy }
                | LayoutChange::RemoveDispatch { direction, ip, policy } => {
                    if !self.family.holds(*ip) {
                        continue;
                    }
                    let k = (*direction, *ip);
                    let x = Arc::make_mut(self.dispatch.entry(k).or_default());
                    if matches!(c, LayoutChange::AddDispatch { .. }) {
                        x.insert(policy.clone());
                    } else {
                        x.remove(policy);
                    }
                    if x.is_empty() {
                        self.dispatch.remove(&k);
                    }
                    dispatched[di(*direction)] = true;
                }
            }
        }
        for d in Direction::BOTH {
            if dispatched[di(d)] || !touched.is_empty() {
                self.render_groups(d, &touched, dispatched[di(d)], Some(&mut ph));
            }
        }
        for def in fresh {
            let Some(members) = fresh_members.remove(def) else { continue };
            let s = self.sets.get_mut(def).expect("a fresh set is held");
            s.members = members.len();
            let block = create_block(self.family, &s.name, KernelSet::Layout(def).kind(), &members);
            if def.is_list() {
                ph.create_lists.push(block);
            } else {
                ph.create_sets.push(block);
            }
        }
        let quarantine_changed = quarantine_before != self.sets.contains_key(&SetDef::Quarantine);
        self.set_active(&mut ph, quarantine_changed);
        if !self.active {
            // No rule looks at the transition set.
            ph.guard.clear();
        }
        // Addresses whose memberships change stay in transition until the rules are
        // written too, when the diff writes any: the rules of one state and the memberships
        // of the other would judge them together otherwise (a pod relabelled and its
        // dispatch moved; in a burst's net diff, a policy changed by one event and a pod by
        // another).
        let writes_rules = !ph.rules.is_empty() || !ph.del_rules.is_empty();
        self.batches(ph, writes_rules)
    }

    /// The batches of `ph`: (1) new sets, then member changes with their addresses in
    /// transition; (2) every rule change in one transaction; (3) sets nothing references,
    /// lists first. The transition is lifted at the end of (1), or, when `lift_after_rules`
    /// (a reconcile, whose old rules look at the changed sets until (2)), after (2).
    fn batches(&self, ph: Phases, lift_after_rules: bool) -> Vec<Batch> {
        let mut out = Vec::new();
        let guard: Vec<String> = match &self.transition {
            Some(t) => ph.guard.iter().map(|ip| format!("{} {ip}", t.name)).collect(),
            None => Vec::new(),
        };
        let lift: Vec<String> = guard.iter().map(|g| format!("del {g}")).collect();
        let mut lines: Vec<String> = ph.create_sets.into_iter().chain(ph.create_lists).collect();
        lines.extend(guard.iter().map(|g| format!("add {g}")));
        lines.extend(ph.add_members);
        lines.extend(ph.del_members);
        if !lift_after_rules {
            lines.extend(lift.iter().cloned());
        }
        push_ipset(STEP_ADD_SETS, lines, &mut out);
        let commands = ph.rules.len() + ph.del_rules.len() + ph.del_chains.len();
        if commands > 0 || !ph.new_chains.is_empty() {
            let mut script = String::from("*filter\n");
            for l in
                ph.new_chains.into_iter().chain(ph.rules).chain(ph.del_rules).chain(ph.del_chains)
            {
                script.push_str(&l);
                script.push('\n');
            }
            script.push_str("COMMIT\n");
            let tool = self.family.rules_tool();
            out.push(Batch { step: STEP_RULES, tool, script, commands });
        }
        if lift_after_rules {
            push_ipset(STEP_LIFT_TRANSITION, lift, &mut out);
        }
        push_ipset(
            STEP_DEL_SETS,
            ph.destroy_lists.into_iter().chain(ph.destroy_sets).collect(),
            &mut out,
        );
        out
    }

    // ---- whole plans ----

    /// Makes the translator hold exactly `plan`'s layout and returns the batches that move
    /// the kernel from `kernel` to it (see the module docs).
    pub fn reconcile(&mut self, plan: &Plan, kernel: &KernelState) -> Vec<Batch> {
        let kinds = kernel.sets.iter().map(|(h, ks)| (h.clone(), ks.kind.clone())).collect();
        let mut t = RuleTranslator {
            family: self.family,
            kernel_kinds: Some(kinds),
            base: true,
            ..RuleTranslator::default()
        };
        let layout = &plan.layout;
        // Sets are named in a fixed order (the transition set, the quarantine, then by
        // policy, a list before the sets it holds), so that a restart gives colliding names
        // the same alternates.
        t.add_transition();
        let policy_sets = layout.policies.values().flat_map(|p| {
            Direction::BOTH.into_iter().flat_map(|d| p.direction(d).map(|l| l.references()))
        });
        let order: Vec<SetDef> = std::iter::once(vec![SetDef::Quarantine])
            .chain(policy_sets)
            .flatten()
            .chain(layout.sets.keys().cloned())
            .collect();
        for def in &order {
            t.name_tree(def, layout);
        }
        let counts: Vec<(SetDef, usize)> = t
            .sets
            .keys()
            .map(|d| {
                let members = layout.sets.get(d).into_iter().flat_map(|m| m.iter());
                (d.clone(), members.filter_map(|m| t.member_strings(m)).map(|v| v.len()).sum())
            })
            .collect();
        for (d, n) in counts {
            t.sets.get_mut(&d).expect("named").members = n;
        }
        for (key, p) in &layout.policies {
            for d in Direction::BOTH {
                if let Some(l) = p.direction(d) {
                    let c = t.write(key, d, p.tier, l);
                    t.chains.insert((key.clone(), d), c);
                }
            }
        }
        for ((d, ip), x) in &layout.dispatch {
            if t.family.holds(*ip) {
                t.dispatch.insert((*d, *ip), x.clone());
            }
        }
        for d in Direction::BOTH {
            t.render_groups(d, &HashSet::new(), false, None);
        }
        t.active = !t.chains.is_empty() || t.sets.contains_key(&SetDef::Quarantine);
        t.kernel_kinds = None;
        let batches = t.reconcile_batches(kernel, layout);
        *self = t;
        batches
    }

    /// Names a set of `layout` not named yet, and the sets it holds.
    fn name_tree(&mut self, def: &SetDef, layout: &Layout) {
        let Some(members) = layout.sets.get(def) else { return };
        if self.sets.contains_key(def) || !self.add_set(def) {
            return;
        }
        for m in members.iter() {
            if let Member::Set(sub) = m {
                self.name_tree(sub, layout);
            }
        }
    }

    /// Every chain the layout should hold, with its rules, in `iptables-save` order of rules
    /// (policy jumps sorted).
    pub fn desired_chains(&self) -> BTreeMap<String, Vec<String>> {
        let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in names::BASE_CHAINS {
            chains.insert(c.to_string(), Vec::new());
        }
        for c in self.chains.values() {
            chains.insert(c.chain.clone(), c.rules.clone());
        }
        for g in self.groups.values() {
            chains.insert(g.chain.clone(), g.rules.clone());
        }
        if self.active && self.transition.is_some() {
            chains.insert(AZURE_NPM.to_string(), self.azure_npm_rules());
        }
        for (chain, rule) in base_rules() {
            if chain == INGRESS_ALLOW_MARK || chain == ACCEPT {
                chains.get_mut(chain).expect("base").push(rule);
            }
        }
        chains.insert(INGRESS.to_string(), self.base_chain_rules(Direction::Ingress));
        chains.insert(EGRESS.to_string(), self.base_chain_rules(Direction::Egress));
        chains
    }

    /// Every set the kernel should hold for `layout` (the one the translator last applied):
    /// kernel name → (readable name, type, members).
    pub fn desired_sets(
        &self,
        layout: &Layout,
    ) -> BTreeMap<String, (String, &'static str, BTreeSet<String>)> {
        let mut members = self.members_from(layout);
        let mut out: BTreeMap<String, (String, &'static str, BTreeSet<String>)> = self
            .all_sets()
            .map(|(d, s)| {
                let m = members.remove(&s.name).unwrap_or_default();
                (s.name.clone(), (s.readable.clone(), d.kind().type_name(), m))
            })
            .collect();
        for s in self.groups.values().filter_map(|g| g.set.as_ref()) {
            let kind = SetKind::HashNetPort.type_name();
            out.insert(s.name.clone(), (s.readable.clone(), kind, s.members.clone()));
        }
        out
    }

    /// (Each set's members are spelled from `layout` when the set's turn comes, and dropped
    /// after: at 100k pods they are half a million strings.)
    fn reconcile_batches(&self, kernel: &KernelState, layout: &Layout) -> Vec<Batch> {
        let def_of: HashMap<&str, &SetDef> =
            self.sets.iter().map(|(d, s)| (s.name.as_str(), d)).collect();
        let members_of = |name: &str| -> BTreeSet<String> {
            let members = def_of
                .get(name)
                .and_then(|d| layout.sets.get(*d))
                .into_iter()
                .flat_map(|m| m.iter());
            members.filter_map(|m| self.member_strings(m)).flatten().collect()
        };
        let mut ph = Phases::default();
        let mut sets: Vec<(KernelSet<'_>, &SetState)> = self.all_sets().collect();
        sets.sort_by(|a, b| {
            (a.0.kind() == SetKind::ListSet, &a.1.name)
                .cmp(&(b.0.kind() == SetKind::ListSet, &b.1.name))
        });
        let kernel_addresses = |set: &str| -> Vec<IpAddr> {
            kernel
                .sets
                .get(set)
                .into_iter()
                .flat_map(|s| &s.members)
                .filter_map(|m| member_address(m))
                .collect()
        };
        // 1. Sets: create what is missing; members that differ change with their addresses
        //    (or, for lists, the addresses of the sets that join or leave) in transition.
        for (def, s) in &sets {
            let h = &s.name;
            let out = if def.kind() == SetKind::ListSet {
                &mut ph.create_lists
            } else {
                &mut ph.create_sets
            };
            if *def == KernelSet::Transition
                && let Some(ks) = kernel.sets.get(h)
            {
                // Addresses a failed batch left in transition stay there until the rules are
                // rewritten, then leave with the others.
                ph.guard.extend(ks.members.iter().filter_map(|m| member_address(m)));
                continue;
            }
            let mine = members_of(h);
            match kernel.sets.get(h) {
                None => {
                    out.push(create_block(self.family, h, def.kind(), &mine));
                }
                Some(ks) => {
                    for m in mine.difference(&ks.members) {
                        ph.add_members.push(format!("add {h} {m}"));
                        ph.guard.extend(member_address(m));
                        if def.kind() == SetKind::ListSet {
                            ph.guard.extend(members_of(m).iter().filter_map(|a| member_address(a)));
                            ph.guard.extend(kernel_addresses(m));
                        }
                    }
                    for m in ks.members.difference(&mine) {
                        ph.del_members.push(format!("del {h} {}", m.trim_end_matches(" nomatch")));
                        ph.guard.extend(member_address(m));
                        if def.kind() == SetKind::ListSet {
                            ph.guard.extend(kernel_addresses(m));
                        }
                    }
                }
            }
        }
        //    The groups' sets (blocks and ports: no pod's memberships).
        for g in self.groups.values().filter_map(|g| g.set.as_ref()) {
            let h = &g.name;
            match kernel.sets.get(h) {
                None => ph.create_sets.push(create_block(
                    self.family,
                    h,
                    SetKind::HashNetPort,
                    &g.members,
                )),
                Some(ks) => {
                    for m in g.members.difference(&ks.members) {
                        ph.add_members.push(format!("add {h} {m}"));
                    }
                    for m in ks.members.difference(&g.members) {
                        ph.del_members.push(format!("del {h} {m}"));
                    }
                }
            }
        }
        // 2. Every chain, in one transaction.
        let chains = self.desired_chains();
        let stale: Vec<&String> =
            kernel.chains.keys().filter(|c| !chains.contains_key(*c)).collect();
        for (c, rules) in chains {
            ph.new_chains.push(format!(":{c} - [0:0]"));
            // (Each rule moves into its command: the layout's rules are not held twice.)
            ph.rules.extend(rules.into_iter().map(|r| format!("-A {c} {r}")));
        }
        let jumps: Vec<&String> = kernel.forward.iter().filter(|r| jumps_to_azure_npm(r)).collect();
        let in_place =
            jumps.len() == 1 && kernel.forward.first().map(String::as_str) == Some(FORWARD_JUMP);
        if !in_place {
            for j in jumps {
                ph.rules.push(format!("-D FORWARD {j}"));
            }
            ph.rules.push(format!("-I FORWARD 1 {FORWARD_JUMP}"));
        }
        // FORWARD's jumps to stale chains (an older agent's) go with them.
        for r in &kernel.forward {
            if stale.iter().any(|c| r.ends_with(&format!("-j {c}"))) {
                ph.rules.push(format!("-D FORWARD {r}"));
            }
        }
        // Stale chains (flushed first: they may jump to each other).
        for c in &stale {
            ph.del_rules.push(format!("-F {c}"));
        }
        for c in &stale {
            ph.del_chains.push(format!("-X {c}"));
        }
        // 3. Stale sets, lists first (they reference the others).
        let groups = self.groups.values().filter_map(|g| g.set.as_ref());
        let names: HashSet<&String> =
            self.all_sets().map(|(_, s)| &s.name).chain(groups.map(|g| &g.name)).collect();
        for (h, ks) in kernel.sets.iter().filter(|(h, _)| self.family.owns_set(h)) {
            if !names.contains(h) {
                if ks.kind == "list:set" {
                    ph.destroy_lists.push(format!("destroy {h}"));
                } else {
                    ph.destroy_sets.push(format!("destroy {h}"));
                }
            }
        }
        // The guard is lifted only after the rules are rewritten: until then, the old rules
        // look at the changed sets.
        self.batches(ph, true)
    }

    /// The kernel name of a set of the layout, when the kernel holds it as a set.
    pub fn kernel_set_name(&self, def: &SetDef) -> Option<String> {
        self.sets.get(def).map(|s| s.name.clone())
    }

    /// The kernel name and readable name of every set, for explaining rules.
    pub fn set_names(&self) -> BTreeMap<String, String> {
        let groups = self.groups.values().filter_map(|g| g.set.as_ref());
        self.all_sets()
            .map(|(_, s)| (s.name.clone(), s.readable.clone()))
            .chain(groups.map(|s| (s.name.clone(), s.readable.clone())))
            .collect()
    }

    /// The chain that each local endpoint direction's new connections walk (its policy's or
    /// its group's), for explaining rules.
    pub fn dispatch_chains(&self) -> BTreeMap<(Direction, IpAddr), String> {
        self.dispatch
            .iter()
            .filter_map(|(k, x)| Some((*k, self.dispatch_target(k.0, x)?.to_string())))
            .collect()
    }

    /// The chain of every policy direction: (policy, direction) → chain.
    pub fn policy_chains(&self) -> BTreeMap<(ObjectKey, Direction), String> {
        self.chains.iter().map(|(k, c)| (k.clone(), c.chain.clone())).collect()
    }
}

/// The batches of both families' translators for one diff (or reconcile) as one run, phase
/// by phase: both families' sets and members (one `ipset` process), IPv4's rules, IPv6's
/// rules, both families' lifts of the transition guard, both families' stale sets. Each
/// family stays make-before-break, and its sets are in place before either family's rules
/// name them.
pub fn merge_families(families: Vec<Vec<Batch>>) -> Vec<Batch> {
    const ORDER: [&str; 5] =
        [STEP_ADD_SETS, STEP_RULES, STEP_REMOVE_CHAINS, STEP_LIFT_TRANSITION, STEP_DEL_SETS];
    // (Any other step last, in its order.)
    let mut buckets: Vec<Vec<Batch>> = vec![Vec::new(); ORDER.len() + 1];
    for b in families.into_iter().flatten() {
        let i = ORDER.iter().position(|s| *s == b.step).unwrap_or(ORDER.len());
        buckets[i].push(b);
    }
    let mut out = Vec::new();
    for bucket in buckets {
        let mut ipset: Option<Batch> = None;
        for b in bucket {
            match &mut ipset {
                _ if b.tool != Tool::Ipset => out.push(b),
                None => ipset = Some(b),
                Some(i) => {
                    i.script.push_str(&b.script);
                    i.commands += b.commands;
                }
            }
        }
        out.extend(ipset);
    }
    out
}

fn member_is_ipv6(m: &Member) -> bool {
    match m {
        Member::Address(ip) | Member::Port { ip, .. } => ip.is_ipv6(),
        Member::Net { net, .. } => matches!(net, IpNet::V6(_)),
        Member::Set(_) => false,
    }
}

/// Whether a layout change names an IPv6 address or block. Until one does, the IPv6
/// ruleset has nothing to judge (no local endpoint has an IPv6 address, no rule names one),
/// so the dataplane leaves ip6tables empty and writes it whole from the first such change.
pub fn names_ipv6(c: &LayoutChange) -> bool {
    match c {
        LayoutChange::AddSet { set: SetDef::Cidr(b) } => matches!(b.net, IpNet::V6(_)),
        LayoutChange::AddMember { member, .. } => member_is_ipv6(member),
        LayoutChange::Regroup { ip } | LayoutChange::AddDispatch { ip, .. } => ip.is_ipv6(),
        _ => false,
    }
}

/// Whether a whole layout names an IPv6 address or block (see [`names_ipv6`]).
pub fn layout_has_ipv6(l: &Layout) -> bool {
    l.dispatch.keys().any(|(_, ip)| ip.is_ipv6())
        || l.sets.iter().any(|(def, members)| {
            matches!(def, SetDef::Cidr(b) if matches!(b.net, IpNet::V6(_)))
                || members.iter().any(member_is_ipv6)
        })
}

/// Every dispatch key of direction `d`, in order.
fn dispatch_range(d: Direction) -> std::ops::RangeInclusive<(Direction, IpAddr)> {
    (d, IpAddr::V4(Ipv4Addr::UNSPECIFIED))..=(d, IpAddr::V6(Ipv6Addr::from(u128::MAX)))
}

/// An ipset batch of `lines` (each one command, or a block of them).
fn push_ipset(step: &'static str, lines: Vec<String>, out: &mut Vec<Batch>) {
    if lines.is_empty() {
        return;
    }
    let commands = lines.iter().map(|l| l.lines().count()).sum();
    let mut script = String::new();
    // (Each line is freed as it is copied: the script and the lines are not both whole.)
    for l in lines {
        script.push_str(&l);
        script.push('\n');
    }
    out.push(Batch { step, tool: Tool::Ipset, script, commands });
}

/// The script that removes everything of the layout found in `kernel` (for `cleanup` and
/// switching dataplanes): FORWARD's jumps, then every chain, in one transaction (`kernel`'s
/// chains being of `family`); and the sets, lists first.
pub fn cleanup_batches(kernel: &KernelState, family: Family) -> Vec<Batch> {
    let mut out = Vec::new();
    // (Jumps to AZURE-NPM, and to any other chain of ours: an older agent's.)
    let ours = |r: &&String| {
        jumps_to_azure_npm(r) || kernel.chains.keys().any(|c| r.ends_with(&format!("-j {c}")))
    };
    let jumps: Vec<&String> = kernel.forward.iter().filter(ours).collect();
    if !jumps.is_empty() || !kernel.chains.is_empty() {
        let mut s = String::from("*filter\n");
        for j in &jumps {
            let _ = writeln!(s, "-D FORWARD {j}");
        }
        for c in kernel.chains.keys() {
            let _ = writeln!(s, "-F {c}");
        }
        for c in kernel.chains.keys() {
            let _ = writeln!(s, "-X {c}");
        }
        s.push_str("COMMIT\n");
        out.push(Batch {
            step: STEP_REMOVE_CHAINS,
            tool: family.rules_tool(),
            script: s,
            commands: jumps.len() + 2 * kernel.chains.len(),
        });
    }
    if !kernel.sets.is_empty() {
        let mut s = String::new();
        let lists = kernel.sets.iter().filter(|(_, k)| k.kind == "list:set");
        let others = kernel.sets.iter().filter(|(_, k)| k.kind != "list:set");
        for (h, _) in lists.chain(others) {
            let _ = writeln!(s, "destroy {h}");
        }
        out.push(Batch {
            step: STEP_DEL_SETS,
            tool: Tool::Ipset,
            script: s,
            commands: kernel.sets.len(),
        });
    }
    out
}
