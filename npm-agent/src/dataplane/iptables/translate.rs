//! From plan diffs to `ipset restore` and `iptables-restore --noflush` batches: the iptables
//! dataplane's encoding, pure and host-testable. It builds on the plan's *label view*
//! (identity keys, namespace labels, policies), as Azure NPM v2 builds on the API objects.
//!
//! # Encoding
//! - Every NetworkPolicy gets a chain per direction it covers,
//!   `AZURE-NPM-{INGRESS,EGRESS}-<FNV-1a of "<namespace>/<name>">`, jumped to from
//!   `AZURE-NPM-INGRESS` (by destination) or `AZURE-NPM-EGRESS` (by source) by a rule that
//!   matches the policy's pod selector: `ns-<namespace>` and the label sets of its
//!   requirements, all together.
//! - A selector becomes a conjunction of sets: `ns-<ns>` (the pods of a namespace, hash:net),
//!   `podlabel-<key>` / `podlabel-<key>:<value>` (pods with the label, hash:net, cluster-wide),
//!   `nestedlabel-<key>:<v1>:<v2>` (list:set of podlabel sets, for `In` with several values),
//!   `nslabel-<key>` / `nslabel-<key>:<value>` / `nslabel-<key>:<v1>:<v2>` (list:set of the
//!   `ns-` sets of matching namespaces) and `nslabel-all-namespaces`; `NotIn` and
//!   `DoesNotExist` are negated matches (`! --match-set`), with `nslabel-all-namespaces`
//!   added when nothing else says the address is a pod's.
//! - Allow rules are one per (peer, port) of each rule, as `rule_terms` splits them: numeric
//!   ports as `-p`/`--dport`, named ports as `namedport:<name>` (hash:ip,port of
//!   `<ip>,<proto>:<port>`, matched `dst,dst`: the selected pod's port for ingress, the
//!   destination pod's for egress), ipBlocks as `cidr-<block>[-except-…]` sets (hash:net,
//!   excepts as `nomatch`). The chain's last rule sets the drop mark.
//! - A set exists while a rule (or a list holding it) references it; its members follow the
//!   pods' identities and the namespaces' labels.
//!
//! # Order (make-before-break)
//! Every diff becomes up to three batches, each one process:
//! 1. `ipset`: new sets with their members; then, for addresses whose memberships change,
//!    the address joins the `transition` set, the memberships change, and it leaves again;
//! 2. `iptables`: every chain, rule and jump change of the diff in one transaction (atomic):
//!    a policy is created, rewritten or removed at once;
//! 3. `ipset`: sets no longer referenced are destroyed.
//!
//! Set memberships cannot change atomically, and selectors are conjunctions: adding an
//! address to its new label sets before removing it from its old ones would, for a moment,
//! match combinations that neither its old nor its new labels have (and removing first
//! would match negations wrongly). So `AZURE-NPM` first drops new connections from and to
//! an address in `transition`: while its labels change, its new connections are refused
//! (TCP retries), never admitted by a combination that neither state allows. Connections
//! already established are not affected (AZURE-NPM sees only a connection's first packet).
//!
//! A reconcile (start-up, or after a failed batch) builds the layout of the whole plan and
//! moves the kernel to it the same way: missing sets and members first (addresses whose
//! memberships differ held in `transition`), every chain in one transaction, stale chains
//! and sets last.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::names::{
    self, ACCEPT, AZURE_NPM, EGRESS, FORWARD_JUMP, INGRESS, INGRESS_ALLOW_MARK, quote_comment,
};
use super::state::{KernelState, jumps_to_azure_npm};
use crate::compile::{PortSel, TermPeer, rule_terms};
use crate::model::{
    CidrBlock, Direction, LabelSelector, Labels, Namespace, NamespaceScope, ObjectKey, Operator,
    Policy, PortSpec, Protocol,
};
use crate::plan::{Change, IdentityId, IdentityKey, PeerSelector, Plan, PlanDiff};

/// Which program a batch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `ipset restore` (one command per line, `-exist`).
    Ipset,
    /// `iptables-restore --noflush` (a `*filter` … `COMMIT` transaction).
    Iptables,
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
/// (A reconcile only: addresses leave the transition set once every chain is rewritten.)
pub const STEP_LIFT_TRANSITION: &str = "lift the transition guard";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    HashNet,
    HashIpPort,
    ListSet,
}

impl SetKind {
    pub fn type_name(self) -> &'static str {
        match self {
            SetKind::HashNet => "hash:net",
            SetKind::HashIpPort => "hash:ip,port",
            SetKind::ListSet => "list:set",
        }
    }
}

/// What a set holds, which also gives its readable name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetDef {
    /// `ns-<ns>`: the pods of a namespace.
    Namespace(String),
    /// `podlabel-<key>[:<value>]`: the pods with the label (any namespace).
    PodLabel { key: String, value: Option<String> },
    /// `nestedlabel-<key>:<v1>:<v2>…`: the podlabel sets of the values.
    PodValues { key: String, values: Vec<String> },
    /// `nslabel-<key>[:<value>]`: the ns sets of the namespaces with the label.
    NsLabel { key: String, value: Option<String> },
    /// `nslabel-<key>:<v1>:<v2>…`: the ns sets of the namespaces with one of the values.
    NsValues { key: String, values: Vec<String> },
    /// `nslabel-all-namespaces`: every ns set.
    AllNamespaces,
    /// `namedport:<name>`: `<ip>,<proto>:<port>` of every pod port with the name.
    NamedPort(String),
    /// `cidr-<block>[-except-…]`: the block, excepts as `nomatch`.
    Cidr { net: Ipv4Net, except: Vec<Ipv4Net> },
    /// `transition`: addresses whose memberships are changing (see the module docs).
    Transition,
    /// `quarantine`: local addresses several local pods claim (see `state::Claim`): their
    /// new connections are refused, both ways.
    Quarantine,
}

impl SetDef {
    pub fn readable(&self) -> String {
        match self {
            SetDef::Namespace(ns) => format!("ns-{ns}"),
            SetDef::PodLabel { key, value: None } => format!("podlabel-{key}"),
            SetDef::PodLabel { key, value: Some(v) } => format!("podlabel-{key}:{v}"),
            SetDef::PodValues { key, values } => format!("nestedlabel-{key}:{}", values.join(":")),
            SetDef::NsLabel { key, value: None } => format!("nslabel-{key}"),
            SetDef::NsLabel { key, value: Some(v) } => format!("nslabel-{key}:{v}"),
            SetDef::NsValues { key, values } => format!("nslabel-{key}:{}", values.join(":")),
            SetDef::AllNamespaces => "nslabel-all-namespaces".to_string(),
            SetDef::NamedPort(name) => format!("namedport:{name}"),
            SetDef::Cidr { net, except } => {
                let mut s = format!("cidr-{net}");
                if !except.is_empty() {
                    let list: Vec<String> = except.iter().map(|e| e.to_string()).collect();
                    let joined = list.join(",");
                    if joined.len() <= 120 {
                        let _ = write!(s, "-except-{joined}");
                    } else {
                        let _ = write!(
                            s,
                            "-except-{}-nets-{:016x}",
                            list.len(),
                            crate::dataplane::azure::fnv1a64(&joined)
                        );
                    }
                }
                s
            }
            SetDef::Transition => "transition".to_string(),
            SetDef::Quarantine => "quarantine".to_string(),
        }
    }

    pub fn kind(&self) -> SetKind {
        match self {
            SetDef::Namespace(_)
            | SetDef::PodLabel { .. }
            | SetDef::Cidr { .. }
            | SetDef::Transition
            | SetDef::Quarantine => SetKind::HashNet,
            SetDef::NamedPort(_) => SetKind::HashIpPort,
            SetDef::PodValues { .. }
            | SetDef::NsLabel { .. }
            | SetDef::NsValues { .. }
            | SetDef::AllNamespaces => SetKind::ListSet,
        }
    }

    /// Whether a namespace list holds the ns set of a namespace with these labels.
    fn holds_namespace(&self, labels: &Labels) -> bool {
        match self {
            SetDef::NsLabel { key, value: None } => labels.contains_key(key),
            SetDef::NsLabel { key, value: Some(v) } => labels.get(key) == Some(v),
            SetDef::NsValues { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            SetDef::AllNamespaces => true,
            _ => false,
        }
    }

    fn is_namespace_list(&self) -> bool {
        matches!(self, SetDef::NsLabel { .. } | SetDef::NsValues { .. } | SetDef::AllNamespaces)
    }
}

/// The commands that create a set and add its members, as one block of lines (one string,
/// not one per line: a reconcile at 100k pods writes half a million of them).
fn create_block(h: &str, def: &SetDef, members: &BTreeSet<String>) -> String {
    let mut b = create_line(h, def);
    for m in members {
        let _ = write!(b, "\nadd {h} {m}");
    }
    b
}

fn create_line(h: &str, def: &SetDef) -> String {
    match def.kind() {
        // Sets of pods may hold every pod of a large cluster.
        SetKind::HashNet => format!("create {h} hash:net family inet maxelem 4294967295"),
        SetKind::HashIpPort => format!("create {h} hash:ip,port family inet maxelem 4294967295"),
        // (Kernels before 4.x hold at most `size` members.)
        SetKind::ListSet => format!("create {h} list:set size 65536"),
    }
}

/// One match of a rule: a set, perhaps negated, by source or destination.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SetMatch {
    negated: bool,
    set: SetDef,
    /// `src`, `dst` or `dst,dst` (address and port of a hash:ip,port set).
    flags: &'static str,
}

/// What a set is now: its kernel name, members as `ipset save` prints them, references.
#[derive(Clone, Debug)]
struct SetState {
    name: String,
    readable: String,
    members: BTreeSet<String>,
    /// Chains referencing the set (once each) and lists holding it.
    refs: u32,
}

/// One direction of one policy, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainState {
    chain: String,
    /// The jump, as `iptables-save` prints it after `-A AZURE-NPM-INGRESS `.
    jump: String,
    rules: Vec<String>,
    /// The sets the jump and rules reference (each once).
    refs: Vec<SetDef>,
}

#[derive(Default)]
struct Phases {
    /// Whether to leave out the commands that create sets (a reconcile writes its own, from
    /// the whole layout, and at 100k pods these are half a million lines).
    discard_creates: bool,
    create_sets: Vec<String>,
    create_lists: Vec<String>,
    guard: BTreeSet<Ipv4Addr>,
    add_members: Vec<String>,
    del_members: Vec<String>,
    new_chains: Vec<String>,
    rules: Vec<String>,
    del_rules: Vec<String>,
    del_chains: Vec<String>,
    destroy_lists: Vec<String>,
    destroy_sets: Vec<String>,
}

/// The encoder's memory: the plan's label view (IPv4) and what it has told the kernel.
#[derive(Clone, Debug, Default)]
pub struct Translator {
    identities: HashMap<Ipv4Addr, IdentityId>,
    keys: HashMap<IdentityId, IdentityKey>,
    addresses: HashMap<IdentityId, BTreeSet<Ipv4Addr>>,
    by_namespace: HashMap<String, HashSet<IdentityId>>,
    by_label: HashMap<String, HashSet<IdentityId>>,
    by_port_name: HashMap<String, HashSet<IdentityId>>,
    namespaces: HashMap<String, Labels>,
    sets: HashMap<SetDef, SetState>,
    /// Kernel set name → readable name (every name given out).
    names: HashMap<String, String>,
    chains: HashMap<(ObjectKey, Direction), ChainState>,
    /// Sets whose last reference went during the diff being translated.
    unreferenced: Vec<SetDef>,
    /// Kernel chain name → the readable name it was claimed for.
    chain_names: HashMap<String, String>,
    /// Local addresses in quarantine (the `quarantine` set exists while there are any).
    quarantined: BTreeSet<Ipv4Addr>,
    /// Whether AZURE-NPM holds its rules (Azure NPM leaves it empty without policies).
    active: bool,
    /// Whether the base chains exist.
    base: bool,
    /// During a reconcile: the type of each set the kernel holds, so that no name is taken
    /// by a set of another type.
    kernel_kinds: Option<HashMap<String, String>>,
    /// Plan entries the encoding cannot express (IPv6 addresses and blocks), for the logs.
    pub skipped_ipv6: u64,
}

/// Sizes of what the translator has told the kernel to hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub pods: usize,
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

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

fn alternate(base: &str, k: usize) -> String {
    if k == 0 { base.to_string() } else { format!("{base}~{k}") }
}

/// A hash:net member as `ipset save` prints it.
fn net_member(net: Ipv4Net, nomatch: bool) -> String {
    let mut s = if net.prefix_len() == 32 { net.addr().to_string() } else { net.to_string() };
    if nomatch {
        s.push_str(" nomatch");
    }
    s
}

/// The entries of a CIDR block's set.
fn cidr_members(net: Ipv4Net, except: &[Ipv4Net]) -> BTreeSet<String> {
    let mut m = BTreeSet::new();
    if net.prefix_len() == 0 {
        // hash:net cannot hold /0.
        m.insert("0.0.0.0/1".to_string());
        m.insert("128.0.0.0/1".to_string());
    } else {
        m.insert(net_member(net, false));
    }
    for e in except {
        if e.prefix_len() == 0 {
            // Everything is excepted: nothing matches.
            m.clear();
            return m;
        }
        m.insert(net_member(*e, true));
    }
    m
}

/// A hash:ip,port member as `ipset save` prints it.
fn port_member(ip: Ipv4Addr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.as_str().to_lowercase())
}

/// The address a member line is about (for the transition set).
fn member_address(member: &str) -> Option<Ipv4Addr> {
    member.split([',', '/', ' ']).next().and_then(|a| a.parse().ok())
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

/// The set matches of a label selector's requirements, with the sets of one label
/// (`podlabel-…` or `nslabel-…`) and of several values of one key (`None`: it matches
/// nothing).
fn label_matches(
    sel: &LabelSelector,
    flags: &'static str,
    label: fn(String, Option<String>) -> SetDef,
    values: fn(String, Vec<String>) -> SetDef,
) -> Option<Vec<SetMatch>> {
    let mut out = Vec::new();
    for r in sel.requirements() {
        let key = r.key.clone();
        let m = |negated, set| SetMatch { negated, set, flags };
        match r.operator {
            Operator::In => match r.values.len() {
                0 => return None,
                1 => out.push(m(false, label(key, r.values.first().cloned()))),
                _ => out.push(m(false, values(key, r.values.iter().cloned().collect()))),
            },
            Operator::NotIn => {
                out.extend(r.values.iter().map(|v| m(true, label(key.clone(), Some(v.clone())))))
            }
            Operator::Exists => out.push(m(false, label(key, None))),
            Operator::DoesNotExist => out.push(m(true, label(key, None))),
        }
    }
    Some(out)
}

/// The set matches of a selector peer (`None`: it matches no pod).
fn selector_matches(sel: &PeerSelector, flags: &'static str) -> Option<Vec<SetMatch>> {
    let mut out = Vec::new();
    match &sel.namespaces {
        NamespaceScope::Named(ns) => {
            out.push(SetMatch { negated: false, set: SetDef::Namespace(ns.clone()), flags })
        }
        NamespaceScope::Selector(s) => {
            out = label_matches(
                s,
                flags,
                |key, value| SetDef::NsLabel { key, value },
                |key, values| SetDef::NsValues { key, values },
            )?;
            // Negations alone would match addresses that are no pod's.
            if !out.iter().any(|m| !m.negated) {
                out.insert(0, SetMatch { negated: false, set: SetDef::AllNamespaces, flags });
            }
        }
    }
    out.extend(label_matches(
        &sel.pods,
        flags,
        |key, value| SetDef::PodLabel { key, value },
        |key, values| SetDef::PodValues { key, values },
    )?);
    Some(out)
}

/// `-p` … `--dport` / named-port match, and the comment's `-ON-…-TO-PORT-…`, of a port.
fn port_spec(port: &PortSel) -> (String, Option<SetMatch>, String) {
    let spec = match port {
        PortSel::Any => return (String::new(), None, String::new()),
        PortSel::Spec(s) => s,
    };
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
        PortSpec::Named { protocol, name } => {
            let m =
                SetMatch { negated: false, set: SetDef::NamedPort(name.clone()), flags: "dst,dst" };
            (
                format!("-p {} ", protocol.as_str().to_lowercase()),
                Some(m),
                format!("-ON-{}-TO-PORT-namedport:{name}", protocol.as_str()),
            )
        }
    }
}

/// A rendered direction of a policy, set names still readable.
struct Rendered {
    jump: Vec<SetMatch>,
    /// (port spec, matches, comment) of each allow rule.
    rules: Vec<(String, Vec<SetMatch>, String)>,
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn encoded(&self) -> Encoded {
        Encoded {
            pods: self.identities.len(),
            policies: self.chains.keys().map(|(k, _)| k).collect::<HashSet<_>>().len(),
            chains: self.chains.len(),
            sets: self.sets.len(),
            set_members: self.sets.values().map(|s| s.members.len()).sum(),
            rules: self.chains.values().map(|c| c.rules.len() + 1).sum(),
        }
    }

    // ---- the label view ----

    fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces.get(ns).cloned().unwrap_or_else(|| Namespace::default_labels(ns))
    }

    /// Namespaces that have a Namespace object or a pod.
    fn namespace_exists(&self, ns: &str) -> bool {
        self.namespaces.contains_key(ns) || self.by_namespace.contains_key(ns)
    }

    fn index_identity(&mut self, id: IdentityId, key: IdentityKey) {
        self.by_namespace.entry(key.namespace.clone()).or_default().insert(id);
        for k in key.labels.keys() {
            self.by_label.entry(k.clone()).or_default().insert(id);
        }
        for p in key.named_ports.iter() {
            self.by_port_name.entry(p.name.clone()).or_default().insert(id);
        }
        self.keys.insert(id, key);
    }

    fn unindex_identity(&mut self, id: IdentityId) {
        let Some(key) = self.keys.remove(&id) else { return };
        let drop = |m: &mut HashMap<String, HashSet<IdentityId>>, k: &str| {
            if let Some(s) = m.get_mut(k) {
                s.remove(&id);
                if s.is_empty() {
                    m.remove(k);
                }
            }
        };
        drop(&mut self.by_namespace, &key.namespace);
        for k in key.labels.keys() {
            drop(&mut self.by_label, k);
        }
        for p in key.named_ports.iter() {
            drop(&mut self.by_port_name, &p.name);
        }
    }

    /// The (hash set, member) pairs an address with identity key `key` belongs to.
    fn memberships(key: &IdentityKey, ip: Ipv4Addr) -> Vec<(SetDef, String)> {
        let a = ip.to_string();
        let mut v = vec![(SetDef::Namespace(key.namespace.clone()), a.clone())];
        for (k, val) in key.labels.iter() {
            v.push((SetDef::PodLabel { key: k.clone(), value: None }, a.clone()));
            v.push((SetDef::PodLabel { key: k.clone(), value: Some(val.clone()) }, a.clone()));
        }
        for p in key.named_ports.iter() {
            v.push((SetDef::NamedPort(p.name.clone()), port_member(ip, p.protocol, p.port)));
        }
        v
    }

    fn pods_of(&self, ids: impl IntoIterator<Item = IdentityId>) -> BTreeSet<String> {
        ids.into_iter()
            .flat_map(|id| self.addresses.get(&id).into_iter().flatten())
            .map(|ip| ip.to_string())
            .collect()
    }

    /// The members a hash set should have now.
    fn hash_members(&self, def: &SetDef) -> BTreeSet<String> {
        match def {
            SetDef::Namespace(ns) => {
                self.pods_of(self.by_namespace.get(ns).into_iter().flatten().copied())
            }
            SetDef::PodLabel { key, value } => {
                self.pods_of(self.by_label.get(key).into_iter().flatten().copied().filter(|id| {
                    value.is_none() || self.keys[id].labels.get(key) == value.as_ref()
                }))
            }
            SetDef::NamedPort(name) => {
                let mut m = BTreeSet::new();
                for id in self.by_port_name.get(name).into_iter().flatten() {
                    for p in self.keys[id].named_ports.iter().filter(|p| &p.name == name) {
                        for ip in self.addresses.get(id).into_iter().flatten() {
                            m.insert(port_member(*ip, p.protocol, p.port));
                        }
                    }
                }
                m
            }
            SetDef::Cidr { net, except } => cidr_members(*net, except),
            SetDef::Quarantine => self.quarantined.iter().map(|ip| ip.to_string()).collect(),
            _ => BTreeSet::new(),
        }
    }

    /// The member sets a list should hold now.
    fn list_members(&self, def: &SetDef) -> Vec<SetDef> {
        match def {
            SetDef::PodValues { key, values } => values
                .iter()
                .map(|v| SetDef::PodLabel { key: key.clone(), value: Some(v.clone()) })
                .collect(),
            d if d.is_namespace_list() => {
                // The namespaces that exist: objects, and namespaces of pods (`by_namespace`
                // holds no empty entry).
                let all: BTreeSet<&String> =
                    self.namespaces.keys().chain(self.by_namespace.keys()).collect();
                all.into_iter()
                    .filter(|ns| d.holds_namespace(&self.namespace_labels(ns)))
                    .map(|ns| SetDef::Namespace(ns.clone()))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    // ---- sets ----

    /// Claims the kernel name of a set: the hash of its readable name, or of an alternate
    /// when that hash is taken by another set or, during a reconcile, by a kernel set of
    /// another type.
    fn claim(&mut self, readable: &str, kind: SetKind) -> String {
        for k in 0.. {
            let cand = alternate(readable, k);
            let h = crate::dataplane::azure::hashed_set_name(&cand);
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

    /// Takes a reference to a set, creating it (with its members, and the sets a list holds)
    /// when it does not exist; returns its kernel name.
    fn acquire(&mut self, def: &SetDef, ph: &mut Phases) -> String {
        if let Some(s) = self.sets.get_mut(def) {
            s.refs += 1;
            return s.name.clone();
        }
        let readable = def.readable();
        let name = self.claim(&readable, def.kind());
        let members = if def.kind() == SetKind::ListSet {
            let subs = self.list_members(def);
            subs.iter().map(|d| self.acquire(d, ph)).collect()
        } else {
            self.hash_members(def)
        };
        if !ph.discard_creates {
            let out = if def.kind() == SetKind::ListSet {
                &mut ph.create_lists
            } else {
                &mut ph.create_sets
            };
            out.push(create_block(&name, def, &members));
        }
        self.sets.insert(def.clone(), SetState { name: name.clone(), readable, members, refs: 1 });
        name
    }

    /// Drops a reference to a set. A set left without references is destroyed at the end of
    /// the diff ([`Self::collect`]) unless something takes it again meanwhile.
    fn release(&mut self, def: &SetDef) {
        let Some(s) = self.sets.get_mut(def) else { return };
        s.refs -= 1;
        if s.refs == 0 {
            self.unreferenced.push(def.clone());
        }
    }

    /// Destroys the sets left without references (and releases what a list held).
    fn collect(&mut self, ph: &mut Phases) {
        while let Some(def) = self.unreferenced.pop() {
            if self.sets.get(&def).is_none_or(|s| s.refs > 0) {
                continue;
            }
            let s = self.sets.remove(&def).expect("set");
            self.names.remove(&s.name);
            // Members need not leave a set that is destroyed.
            let prefix = format!("del {} ", s.name);
            ph.del_members.retain(|l| !l.starts_with(&prefix));
            if def.kind() == SetKind::ListSet {
                ph.destroy_lists.push(format!("destroy {}", s.name));
                let subs: Vec<SetDef> = self
                    .sets
                    .iter()
                    .filter(|(_, st)| s.members.contains(&st.name))
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in subs {
                    self.release(&d);
                }
            } else {
                ph.destroy_sets.push(format!("destroy {}", s.name));
            }
        }
    }

    /// Changes one member of an existing hash set, holding its address in transition.
    fn change_member(&mut self, def: &SetDef, member: String, add: bool, ph: &mut Phases) {
        let Some(s) = self.sets.get_mut(def) else { return };
        let changed =
            if add { s.members.insert(member.clone()) } else { s.members.remove(&member) };
        if !changed {
            return;
        }
        let line = format!("{} {} {member}", if add { "add" } else { "del" }, s.name);
        if add {
            ph.add_members.push(line)
        } else {
            ph.del_members.push(line)
        }
        if let Some(ip) = member_address(&member) {
            ph.guard.insert(ip);
        }
    }

    /// Brings every existing namespace list up to date for the namespaces in `touched`.
    fn update_namespace_lists(&mut self, touched: &BTreeSet<String>, ph: &mut Phases) {
        let lists: Vec<SetDef> =
            self.sets.keys().filter(|d| d.is_namespace_list()).cloned().collect();
        if lists.is_empty() {
            return;
        }
        for ns in touched {
            let exists = self.namespace_exists(ns);
            let labels = self.namespace_labels(ns);
            let sub = SetDef::Namespace(ns.clone());
            for list in &lists {
                let want = exists && list.holds_namespace(&labels);
                let has =
                    self.sets.get(&sub).is_some_and(|s| self.sets[list].members.contains(&s.name));
                if want == has {
                    continue;
                }
                let sub_name =
                    if want { self.acquire(&sub, ph) } else { self.sets[&sub].name.clone() };
                // Every pod of the namespace changes memberships.
                ph.guard.extend(self.sets[&sub].members.iter().filter_map(|m| member_address(m)));
                let l = self.sets.get_mut(list).expect("list");
                if want {
                    l.members.insert(sub_name.clone());
                    ph.add_members.push(format!("add {} {sub_name}", l.name));
                } else {
                    l.members.remove(&sub_name);
                    ph.del_members.push(format!("del {} {sub_name}", l.name));
                    self.release(&sub);
                }
            }
        }
    }

    // ---- chains ----

    /// A policy direction's jump and rules (readable), or `None` when the policy does not
    /// cover the direction.
    fn render(&mut self, policy: &Policy, dir: Direction) -> Option<Rendered> {
        let rules = policy.rules(dir)?;
        let (own, peer) = match dir {
            Direction::Ingress => ("dst", "src"),
            Direction::Egress => ("src", "dst"),
        };
        let target = PeerSelector {
            namespaces: NamespaceScope::Named(policy.key.namespace.clone()),
            pods: policy.pod_selector.clone(),
        };
        let jump = selector_matches(&target, own)?;
        let mut out = Vec::new();
        for rule in rules {
            for term in rule_terms(rule, dir) {
                let peers = match &term.peer {
                    TermPeer::Any => Vec::new(),
                    TermPeer::Pods(sel) => match selector_matches(sel, peer) {
                        Some(m) => m,
                        None => continue,
                    },
                    TermPeer::Block(b) | TermPeer::PodsInBlock(b) => match self.cidr_def(b) {
                        Some(set) => vec![SetMatch { negated: false, set, flags: peer }],
                        None => continue,
                    },
                };
                for port in &term.ports {
                    let (spec, named, comment) = port_spec(port);
                    let mut matches = peers.clone();
                    matches.extend(named);
                    out.push((spec, matches, comment));
                }
            }
        }
        Some(Rendered { jump, rules: out })
    }

    fn cidr_def(&mut self, b: &CidrBlock) -> Option<SetDef> {
        let IpNet::V4(net) = b.net else {
            self.skipped_ipv6 += 1;
            return None;
        };
        let except: Vec<Ipv4Net> = b
            .except
            .iter()
            .filter_map(|e| if let IpNet::V4(e) = e { Some(*e) } else { None })
            .collect();
        // A block whose excepts cover it admits nothing.
        if except.iter().any(|e| e.prefix_len() == 0) {
            return None;
        }
        Some(SetDef::Cidr { net, except })
    }

    /// A match as `iptables-save` prints it.
    fn match_text(&self, m: &SetMatch) -> String {
        let bang = if m.negated { "! " } else { "" };
        format!("-m set {bang}--match-set {} {} ", self.sets[&m.set].name, m.flags)
    }

    /// A match's readable name, for comments.
    fn match_readable(&self, m: &SetMatch) -> String {
        format!("{}{}", if m.negated { "!" } else { "" }, self.sets[&m.set].readable)
    }

    /// Writes a policy direction: sets acquired, rules and jump as `iptables-save` prints them.
    fn write(
        &mut self,
        policy: &Policy,
        dir: Direction,
        r: Rendered,
        ph: &mut Phases,
    ) -> ChainState {
        let key = (policy.key.clone(), dir);
        let chain = match self.chains.get(&key) {
            Some(c) => c.chain.clone(),
            None => self.claim_chain(&policy.key, dir),
        };
        let mut refs: Vec<SetDef> = Vec::new();
        for m in r.jump.iter().chain(r.rules.iter().flat_map(|(_, ms, _)| ms)) {
            if !refs.contains(&m.set) {
                refs.push(m.set.clone());
            }
        }
        for d in &refs {
            self.acquire(d, ph);
        }
        let (word, peer_word) = match dir {
            Direction::Ingress => ("INGRESS", "FROM"),
            Direction::Egress => ("EGRESS", "TO"),
        };
        let target = allow_target(dir);
        let mut rules = Vec::new();
        for (spec, matches, port_comment) in &r.rules {
            let text: String = matches.iter().map(|m| self.match_text(m)).collect();
            // (A named port is in the port part of the comment.)
            let peers: Vec<String> = matches
                .iter()
                .filter(|m| !matches!(m.set, SetDef::NamedPort(_)))
                .map(|m| self.match_readable(m))
                .collect();
            let who = if peers.is_empty() {
                "ALLOW-ALL".to_string()
            } else {
                format!("ALLOW-{peer_word}-{}", peers.join("-AND-"))
            };
            let comment = quote_comment(&format!("{who}{port_comment}"));
            rules.push(format!("{spec}{text}-m comment --comment {comment} -j {target}"));
        }
        rules.push(drop_rule(dir));
        let text: String = r.jump.iter().map(|m| self.match_text(m)).collect();
        let readable: Vec<String> = r.jump.iter().map(|m| self.match_readable(m)).collect();
        let to = if dir == Direction::Ingress { "TO" } else { "FROM" };
        let comment = format!(
            "{word}-POLICY-{}-{to}-{}-IN-ns-{}",
            policy.key,
            readable.join("-AND-"),
            policy.key.namespace
        );
        let jump = format!("{text}-m comment --comment {} -j {chain}", quote_comment(&comment));
        ChainState { chain, jump, rules, refs }
    }

    fn claim_chain(&mut self, key: &ObjectKey, dir: Direction) -> String {
        let readable = format!("{key}");
        for k in 0.. {
            let cand = alternate(&readable, k);
            let chain = names::policy_chain(dir == Direction::Ingress, &cand);
            if !self.chain_names.contains_key(&chain) {
                self.chain_names.insert(chain.clone(), readable);
                return chain;
            }
        }
        unreachable!()
    }

    /// Rewrites the chains of one policy (created, changed or deleted). Both directions'
    /// sets are taken before any is released, so a set that moves from one to the other
    /// stays.
    /// (The translator keeps a policy's chains, not the policy: `policy` is what the plan
    /// now has, `None` when it was deleted.)
    fn update_policy(&mut self, key: &ObjectKey, policy: Option<&Policy>, ph: &mut Phases) {
        let mut written = Vec::new();
        for dir in Direction::BOTH {
            let new = policy.as_ref().and_then(|p| self.render(p, dir).map(|r| (p, r)));
            written.push((dir, new.map(|(p, r)| self.write(p, dir, r, ph))));
        }
        for (dir, new) in written {
            let ck = (key.clone(), dir);
            let old = self.chains.remove(&ck);
            match (&old, &new) {
                (None, None) => {}
                (_, Some(n)) => {
                    // (Declaring an existing chain flushes it, in the same transaction.)
                    if old.as_ref().is_none_or(|o| o.rules != n.rules) {
                        ph.new_chains.push(format!(":{} - [0:0]", n.chain));
                        ph.rules.extend(n.rules.iter().map(|r| format!("-A {} {r}", n.chain)));
                    }
                    if old.as_ref().is_none_or(|o| o.jump != n.jump) {
                        if let Some(o) = &old {
                            ph.rules.push(format!("-D {} {}", base_of(dir), o.jump));
                        }
                        ph.rules.push(format!("-I {} 1 {}", base_of(dir), n.jump));
                    }
                }
                (Some(o), None) => {
                    ph.del_rules.push(format!("-D {} {}", base_of(dir), o.jump));
                    ph.del_rules.push(format!("-F {}", o.chain));
                    ph.del_chains.push(format!("-X {}", o.chain));
                    self.chain_names.remove(&o.chain);
                }
            }
            if let Some(n) = new {
                self.chains.insert(ck, n);
            }
            if let Some(o) = old {
                for d in &o.refs {
                    self.release(d);
                }
            }
        }
    }

    /// Writes AZURE-NPM's rules again when whether it has any, or whether they look at the
    /// quarantine, changes.
    fn set_active(&mut self, ph: &mut Phases, quarantine_changed: bool) {
        let want = !self.chains.is_empty() || !self.quarantined.is_empty();
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
        // (A quarantine set left without addresses is on its way out: no rule names it.)
        let quarantine =
            (!self.quarantined.is_empty()).then(|| self.sets[&SetDef::Quarantine].name.as_str());
        azure_npm_rules(&self.sets[&SetDef::Transition].name, quarantine)
    }

    /// Puts `ip` in quarantine (or takes it out): the set is created with its first address
    /// and destroyed after its last, once AZURE-NPM no longer looks at it.
    fn quarantine(&mut self, ip: Ipv4Addr, on: bool, ph: &mut Phases) -> bool {
        let had = !self.quarantined.is_empty();
        if on == self.quarantined.contains(&ip) {
            return false;
        }
        if on {
            if had {
                self.quarantined.insert(ip);
                self.change_member(&SetDef::Quarantine, ip.to_string(), true, ph);
            } else {
                // Created with its member.
                self.quarantined.insert(ip);
                self.acquire(&SetDef::Quarantine, ph);
            }
        } else {
            self.quarantined.remove(&ip);
            if self.quarantined.is_empty() {
                self.release(&SetDef::Quarantine);
            } else {
                self.change_member(&SetDef::Quarantine, ip.to_string(), false, ph);
            }
        }
        // Whether the set appeared or went (AZURE-NPM's rules then change).
        had == self.quarantined.is_empty()
    }

    fn ensure_base(&mut self, ph: &mut Phases) {
        if self.base {
            return;
        }
        self.base = true;
        self.acquire(&SetDef::Transition, ph);
        for c in names::BASE_CHAINS {
            ph.new_chains.push(format!(":{c} - [0:0]"));
        }
        for (chain, rule) in base_rules() {
            ph.rules.push(format!("-A {chain} {rule}"));
        }
        ph.rules.push(format!("-I FORWARD 1 {FORWARD_JUMP}"));
    }

    // ---- diffs ----

    /// Translates one diff into batches, in order (empty ones left out).
    pub fn translate(&mut self, diff: &PlanDiff) -> Vec<Batch> {
        let mut ph = Phases::default();
        self.ensure_base(&mut ph);
        let mut old_identity: BTreeMap<Ipv4Addr, Option<IdentityId>> = BTreeMap::new();
        let mut dropped_keys: Vec<IdentityId> = Vec::new();
        let mut namespaces: BTreeSet<String> = BTreeSet::new();
        let mut policies: BTreeMap<ObjectKey, Option<std::sync::Arc<Policy>>> = BTreeMap::new();
        let mut quarantine_changed = false;
        for c in &diff.changes {
            match c {
                Change::AddIdentityKey { identity, key } => {
                    self.index_identity(*identity, key.clone())
                }
                Change::RemoveIdentityKey { identity } => dropped_keys.push(*identity),
                Change::SetIdentity { ip, identity } => match v4(*ip) {
                    Some(ip) => {
                        let old = self.identities.insert(ip, *identity);
                        old_identity.entry(ip).or_insert(old);
                    }
                    None => self.skipped_ipv6 += 1,
                },
                Change::RemoveIdentity { ip } => {
                    if let Some(ip) = v4(*ip) {
                        let old = self.identities.remove(&ip);
                        old_identity.entry(ip).or_insert(old);
                    }
                }
                Change::SetNamespaceLabels { namespace, labels } => {
                    self.namespaces.insert(namespace.clone(), labels.clone());
                    namespaces.insert(namespace.clone());
                }
                Change::RemoveNamespace { namespace } => {
                    self.namespaces.remove(namespace);
                    namespaces.insert(namespace.clone());
                }
                Change::SetPolicy { policy } => {
                    policies.insert(policy.key.clone(), Some(policy.clone()));
                }
                Change::RemovePolicy { key } => {
                    policies.insert(key.clone(), None);
                }
                // The entries: what the label view already says, resolved (the eBPF and HNS
                // dataplanes' input). Node addresses need no rule (see the module docs of
                // `iptables`).
                Change::AddEndpoint { .. }
                | Change::RetargetEndpoint { .. }
                | Change::RemoveEndpoint { .. }
                | Change::SetIsolation { .. }
                | Change::AddAllow { .. }
                | Change::RemoveAllow { .. }
                | Change::AddSet { .. }
                | Change::RemoveSet { .. }
                | Change::AddMember { .. }
                | Change::RemoveMember { .. }
                | Change::AddNodeIp { .. }
                | Change::RemoveNodeIp { .. } => {}
                Change::SetConflict { ip, conflict } => {
                    if let Some(ip) = v4(*ip) {
                        quarantine_changed |= self.quarantine(ip, conflict.quarantined, &mut ph);
                    }
                }
                Change::RemoveConflict { ip } => {
                    if let Some(ip) = v4(*ip) {
                        quarantine_changed |= self.quarantine(ip, false, &mut ph);
                    }
                }
            }
        }
        // Addresses changing identity: out of the sets of the old key, into those of the new.
        for (ip, old) in old_identity {
            let new = self.identities.get(&ip).copied();
            if old == new {
                continue;
            }
            let before: Vec<(SetDef, String)> = old
                .and_then(|o| self.keys.get(&o))
                .map(|k| Self::memberships(k, ip))
                .unwrap_or_default();
            let after: Vec<(SetDef, String)> = new
                .and_then(|n| self.keys.get(&n))
                .map(|k| Self::memberships(k, ip))
                .unwrap_or_default();
            if let Some(o) = old {
                if let Some(a) = self.addresses.get_mut(&o) {
                    a.remove(&ip);
                    if a.is_empty() {
                        self.addresses.remove(&o);
                    }
                }
                if let Some(ns) = self.keys.get(&o).map(|k| k.namespace.clone()) {
                    namespaces.insert(ns);
                }
            }
            if let Some(n) = new {
                self.addresses.entry(n).or_default().insert(ip);
                if let Some(ns) = self.keys.get(&n).map(|k| k.namespace.clone()) {
                    namespaces.insert(ns);
                }
            }
            for pair in &before {
                if !after.contains(pair) {
                    self.change_member(&pair.0, pair.1.clone(), false, &mut ph);
                }
            }
            for pair in after {
                if !before.contains(&pair) {
                    self.change_member(&pair.0, pair.1, true, &mut ph);
                }
            }
        }
        for id in dropped_keys {
            if let Some(ns) = self.keys.get(&id).map(|k| k.namespace.clone()) {
                namespaces.insert(ns);
            }
            self.unindex_identity(id);
        }
        // Namespaces appearing, going or relabelled: the lists holding their ns sets.
        self.update_namespace_lists(&namespaces, &mut ph);
        for (key, policy) in &policies {
            self.update_policy(key, policy.as_deref(), &mut ph);
        }
        self.set_active(&mut ph, quarantine_changed);
        self.collect(&mut ph);
        if !self.active {
            // No rule looks at the transition set.
            ph.guard.clear();
        }
        self.batches(ph, false)
    }

    /// The batches of `ph`: (1) new sets, then member changes with their addresses in
    /// transition; (2) every rule change in one transaction; (3) sets nothing references,
    /// lists first. The transition is lifted at the end of (1), or, when `lift_after_rules`
    /// (a reconcile, whose old rules look at the changed sets until (2)), after (2).
    fn batches(&self, ph: Phases, lift_after_rules: bool) -> Vec<Batch> {
        let mut out = Vec::new();
        let guard: Vec<String> = match self.sets.get(&SetDef::Transition) {
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
            out.push(Batch { step: STEP_RULES, tool: Tool::Iptables, script, commands });
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

    /// Makes the translator hold exactly `plan` and returns the batches that move the kernel
    /// from `kernel` to it (see the module docs).
    pub fn reconcile(&mut self, plan: &Plan, kernel: &KernelState) -> Vec<Batch> {
        let kinds = kernel.sets.iter().map(|(h, ks)| (h.clone(), ks.kind.clone())).collect();
        let mut t = Translator {
            kernel_kinds: Some(kinds),
            base: true,
            skipped_ipv6: self.skipped_ipv6,
            ..Translator::default()
        };
        // The commands of the steps below are not kept: `reconcile_batches` writes the whole
        // layout. (A fresh scratch each time, so that they do not pile up.)
        let scratch = || Phases { discard_creates: true, ..Phases::default() };
        // Sets are claimed in a fixed order (the transition set, then by policy), so that a
        // restart gives colliding names the same alternates.
        t.acquire(&SetDef::Transition, &mut scratch());
        for (id, key) in &plan.identity_keys {
            t.index_identity(*id, key.clone());
        }
        for (ip, id) in &plan.identities {
            match v4(*ip) {
                Some(v) => {
                    t.identities.insert(v, *id);
                    t.addresses.entry(*id).or_default().insert(v);
                }
                None => t.skipped_ipv6 += 1,
            }
        }
        t.namespaces = plan.namespaces.clone();
        for (ip, conflict) in &plan.conflicts {
            if let (Some(ip), true) = (v4(*ip), conflict.quarantined) {
                t.quarantine(ip, true, &mut scratch());
            }
        }
        for (key, policy) in &plan.policies {
            t.update_policy(key, Some(policy), &mut scratch());
        }
        t.active = !t.chains.is_empty() || !t.quarantined.is_empty();
        t.kernel_kinds = None;
        let batches = t.reconcile_batches(kernel);
        *self = t;
        batches
    }

    /// Every chain the layout should hold, with its rules, in `iptables-save` order of rules
    /// (policy jumps sorted).
    pub fn desired_chains(&self) -> BTreeMap<String, Vec<String>> {
        let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in names::BASE_CHAINS {
            chains.insert(c.to_string(), Vec::new());
        }
        let mut jumps: [Vec<&String>; 2] = [Vec::new(), Vec::new()];
        for ((_, dir), c) in &self.chains {
            jumps[di(*dir)].push(&c.jump);
            chains.insert(c.chain.clone(), c.rules.clone());
        }
        for j in &mut jumps {
            j.sort();
        }
        if self.active && self.sets.contains_key(&SetDef::Transition) {
            chains.insert(AZURE_NPM.to_string(), self.azure_npm_rules());
        }
        let ing = chains.get_mut(INGRESS).expect("base");
        ing.extend(jumps[0].iter().map(|j| j.to_string()));
        ing.push(ingress_tail());
        for (chain, rule) in base_rules() {
            if chain == INGRESS_ALLOW_MARK || chain == ACCEPT {
                chains.get_mut(chain).expect("base").push(rule);
            }
        }
        let eg = chains.get_mut(EGRESS).expect("base");
        eg.extend(jumps[1].iter().map(|j| j.to_string()));
        eg.extend(egress_tail());
        chains
    }

    /// Every set the layout should hold: kernel name → (readable name, type, members).
    pub fn desired_sets(&self) -> BTreeMap<String, (String, &'static str, BTreeSet<String>)> {
        self.sets
            .iter()
            .map(|(d, s)| {
                (s.name.clone(), (s.readable.clone(), d.kind().type_name(), s.members.clone()))
            })
            .collect()
    }

    fn reconcile_batches(&self, kernel: &KernelState) -> Vec<Batch> {
        let mut ph = Phases::default();
        let mut sets: Vec<(&SetDef, &SetState)> = self.sets.iter().collect();
        sets.sort_by(|a, b| {
            (a.0.kind() == SetKind::ListSet, &a.1.name)
                .cmp(&(b.0.kind() == SetKind::ListSet, &b.1.name))
        });
        let kernel_addresses = |set: &str| -> Vec<Ipv4Addr> {
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
            if **def == SetDef::Transition
                && let Some(ks) = kernel.sets.get(h)
            {
                // Addresses a failed batch left in transition stay there until the rules are
                // rewritten, then leave with the others.
                ph.guard.extend(ks.members.iter().filter_map(|m| member_address(m)));
                continue;
            }
            match kernel.sets.get(h) {
                None => {
                    out.push(create_block(h, def, &s.members));
                }
                Some(ks) => {
                    for m in s.members.difference(&ks.members) {
                        ph.add_members.push(format!("add {h} {m}"));
                        ph.guard.extend(member_address(m));
                        if def.kind() == SetKind::ListSet {
                            ph.guard.extend(
                                self.sets.values().filter(|x| &x.name == m).flat_map(|x| {
                                    x.members.iter().filter_map(|a| member_address(a))
                                }),
                            );
                            ph.guard.extend(kernel_addresses(m));
                        }
                    }
                    for m in ks.members.difference(&s.members) {
                        ph.del_members.push(format!("del {h} {}", m.trim_end_matches(" nomatch")));
                        ph.guard.extend(member_address(m));
                        if def.kind() == SetKind::ListSet {
                            ph.guard.extend(kernel_addresses(m));
                        }
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
        // Stale chains (flushed first: they may jump to each other).
        for c in &stale {
            ph.del_rules.push(format!("-F {c}"));
        }
        for c in &stale {
            ph.del_chains.push(format!("-X {c}"));
        }
        // 3. Stale sets, lists first (they reference the others).
        let names: HashSet<&String> = self.sets.values().map(|s| &s.name).collect();
        for (h, ks) in &kernel.sets {
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

    /// The kernel name and readable name of every set, for explaining rules.
    pub fn set_names(&self) -> BTreeMap<String, String> {
        self.sets.values().map(|s| (s.name.clone(), s.readable.clone())).collect()
    }

    /// The chain of every policy direction: (policy, direction) → chain.
    pub fn policy_chains(&self) -> BTreeMap<(ObjectKey, Direction), String> {
        self.chains.iter().map(|(k, c)| (k.clone(), c.chain.clone())).collect()
    }
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
/// switching dataplanes): FORWARD's jumps, then every chain, in one transaction; and the
/// sets, lists first.
pub fn cleanup_batches(kernel: &KernelState) -> Vec<Batch> {
    let mut out = Vec::new();
    let jumps: Vec<&String> = kernel.forward.iter().filter(|r| jumps_to_azure_npm(r)).collect();
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
            step: "remove chains",
            tool: Tool::Iptables,
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
