//! The iptables + ipset dataplane: the Linux fallback, laid out as Azure Network Policy
//! Manager v2 lays out its rules, so that what operators know about Azure NPM (and their
//! `iptables-save | grep AZURE-NPM`, `ipset list` habits) carries over.
//!
//! - [`names`]: Azure NPM's chain names, marks, hashing (`azure-npm-<FNV-1a>`) and comments;
//! - [`translate`]: the plan's Azure NPM layout (its diffs) → `ipset restore` /
//!   `iptables-restore --noflush` batches, and a reconcile
//!   against what the kernel holds (pure, host-tested);
//! - [`emulator`]: the filter table and ipsets modelled on the host, to check the batches;
//! - [`saved`]: reading `ipset save` / `iptables-save`;
//! - [`exec`]: the backend (nft or legacy) and its detection, running programs in a netns;
//! - [`kernel`]: running the batches, reconciling, the guard's chains, cleanup;
//! - [`observe`]: the kernel's figures for the metrics.
//!
//! # The layout
//! ```text
//! FORWARD   -m conntrack --ctstate INVALID,NEW -j AZURE-NPM              (first rule)
//! AZURE-NPM -m set --match-set <quarantine> src|dst … -j DROP            (while an address is)
//!           -m set --match-set <transition> src … -j DROP                (while a policy exists;
//!           -m set --match-set <transition> dst … -j DROP                 empty otherwise)
//!           -j AZURE-NPM-INGRESS | -j AZURE-NPM-EGRESS | -j AZURE-NPM-ACCEPT
//! AZURE-NPM-INGRESS  -d 10.0.0.1/32 -j AZURE-NPM-IN-PODS-<hash>          (one per local pod
//!                                                                          policies isolate)
//!                    -m mark --mark 0x400/0x400 … DROP-ON-INGRESS-DROP-MARK-0x400/0x400 -j DROP
//! AZURE-NPM-IN-PODS-<hash>  (the policies selecting the pod, shared by the pods they all select)
//!                    -m set --match-set <blocks-and-ports-…> src,dst … -j AZURE-NPM-INGRESS-ALLOW-MARK
//!                      (their ipBlock-without-except rules on one port, as one hash:net,port set)
//!                    -j AZURE-NPM-INGRESS-2697641196                     (each policy with other rules)
//!                    -m comment --comment DROP-ALL -j MARK --set-xmark 0x400/0x400
//! AZURE-NPM-INGRESS-2697641196  -p tcp -m set --match-set <nslabel-team:a> src
//!                      -m set --match-set <podlabel-pod:b> src -m set --match-set <namedport:http> dst,dst
//!                      -m comment --comment "ALLOW-FROM-nslabel-team:a-AND-podlabel-pod:b-ON-TCP-TO-PORT-namedport:http"
//!                      -j AZURE-NPM-INGRESS-ALLOW-MARK                   (one per peer and port)
//! AZURE-NPM-INGRESS-ALLOW-MARK  … SET-INGRESS-ALLOW-MARK-0x200/0x200 -j MARK --set-xmark 0x200/0x200
//!                               -j AZURE-NPM-EGRESS
//! AZURE-NPM-EGRESS   jumps (-s) to AZURE-NPM-EG-PODS-<hash> as above, whose allow rules
//!                    jump to AZURE-NPM-ACCEPT and whose last rule sets 0x800/0x800;
//!                    -m mark --mark 0x800/0x800 … -j DROP
//!                    -m mark --mark 0x200/0x200 … ACCEPT-ON-INGRESS-ALLOW-MARK-0x200/0x200 -j AZURE-NPM-ACCEPT
//! AZURE-NPM-ACCEPT   -j ACCEPT
//! ```
//! Sets: `azure-npm-<FNV-1a 32 of the readable name, decimal>`, Azure NPM v2's readable names:
//! `ns-<ns>`, `podlabel-<key>`, `podlabel-<key>:<value>` (hash:net of pod addresses),
//! `nestedlabel-<key>:<v1>:<v2>` (list:set of podlabel sets, `In` with several values),
//! `nslabel-<key>`, `nslabel-<key>:<value>`, `nslabel-all-namespaces` (list:set of ns sets),
//! `namedport:<name>` (hash:ip,port, `<ip>,<proto>:<port>`), `cidr-<block>-except-…`
//! (hash:net, maxelem 4294967295, excepts as `nomatch`), the groups' `blocks-and-ports-of-…`
//! (hash:net,port) and `transition` (see below). A
//! selector is the conjunction of its sets; `NotIn` and `DoesNotExist` are `! --match-set`.
//! Rule comments carry the readable names.
//!
//! Packets: a connection's first packet (conntrack NEW), and whatever conntrack calls INVALID,
//! entering FORWARD goes through AZURE-NPM; replies and later packets of accepted connections
//! (ESTABLISHED, RELATED) never do, which is how Azure NPM accepts them before policy. Before
//! any of it, the raw table's `AZURE-NPM-GUARD` ([`guard`]) drops packets whose source is not
//! genuine, so that no forged packet leaves a conntrack entry behind. Ingress of the destination pod is
//! checked first (the pod's group: an allow sets 0x200 and goes on to egress, no allow leaves
//! 0x400, dropped); then egress of the source
//! pod (an allow accepts; no allow leaves 0x800, dropped); then the packet is accepted.
//! Traffic between a pod and its own node enters OUTPUT or INPUT, never FORWARD, so it is
//! always allowed, as the plan requires.
//!
//! Batches: `ipset -exist restore` and `iptables-restore -w 60 -T filter --noflush` (the
//! xtables lock taken, waiting up to 60 s), one process per batch and at most three per diff
//! (see [`translate`] for the make-before-break order). A failed batch is tried again twice,
//! then reported; the agent then reconciles the whole plan every second until it succeeds,
//! and the kernel keeps enforcing the last consistent state meanwhile. At start-up the
//! agent reconciles without flushing: new sets and members first, every chain rewritten in
//! one atomic `iptables-restore` transaction, stale chains and sets last; then it removes the
//! layout from the other iptables backend. Every 30 s a guard thread checks that the FORWARD
//! jump is still the first rule (putting it back if another program moved or removed it, as
//! Azure NPM's reconcile does) and that AZURE-NPM still exists (if not, the next change fails
//! and the agent reconciles).
//!
//! # ClusterNetworkPolicy (which Azure NPM does not have)
//! ```text
//! AZURE-NPM-IN-PODS-<hash>   -j MARK --set-xmark 0x0/0x1000              (before each tier)
//!                            -j AZURE-NPM-ADM-IN-<hash of name>          (Admin, by priority, name)
//!                            -m mark ! --mark 0x1000/0x1000 -j AZURE-NPM-ADM-IN-<…>
//!                            … the NetworkPolicies as above, where they select the pod;
//!                            else the Baseline chains the same way (AZURE-NPM-BASE-IN-<hash>)
//! AZURE-NPM-ADM-IN-<hash>    … -m comment --comment ACCEPT-FROM-… -j AZURE-NPM-INGRESS-ALLOW-MARK
//!                            … -m comment --comment DENY-FROM-… -j DROP
//!                            … -m comment --comment PASS-FROM-… -j MARK --set-xmark 0x1000/0x1000
//!                            -m mark --mark 0x1000/0x1000 -j RETURN
//! ```
//! The first rule to match decides, as the tiers say: an `Accept` jumps to the allow target
//! (ingress: the allow mark and on to egress; egress: accepted), a `Deny` drops, an Admin
//! `Pass` skips its tier's other chains, so the NetworkPolicies (where they isolate) or the
//! Baseline chains decide; a Baseline `Pass` allows. Egress chains are `-EG-`, with `-d`.
//!
//! # Where this differs from Azure NPM v2
//! - **Dispatch by pod**, for speed (issue 16): Azure NPM jumps to every policy's chain
//!   through a rule matching the policy's pod selector sets, so each new connection walks
//!   every policy of the cluster, on both nodes (ingress of a remote pod is judged on the
//!   client's node too). Here a new connection walks only its own local pods' groups: the
//!   policies that select them, their ipBlock-and-port rules in one set lookup. At 1,000
//!   policies selecting a server, Azure NPM's layout kept 12–19% of the connection rate
//!   (docs/BENCHMARKS.md).
//! - **ipBlocks without excepts** are matched by address (`-s`/`-d`) in the policy chains,
//!   not through a set of their own (each such set is a name the kernel looks up linearly
//!   among all sets when a script names it).
//! - **The transition set.** Set memberships change one command at a time, and selectors
//!   are conjunctions, so an address moving from one label to another would for a moment
//!   match label combinations that neither its old nor its new labels have (Azure NPM lets
//!   that happen). Here the address is put in `transition` first; AZURE-NPM drops new
//!   connections from and to it until its memberships have changed (microseconds, in the
//!   same `ipset restore`). A namespace relabel holds the namespace's pods the same way.
//!   Established connections are not affected.
//! - **INVALID packets** (SYN+FIN, bad checksums, ICMP errors about no connection) go through
//!   the policies like NEW ones; Azure NPM jumps for NEW only, so they skipped every policy.
//! - **Sources are checked** ([`guard`]): a pod's packets must carry its address, a local pod's
//!   address may come only through its veth (raw tables, before conntrack, both families).
//!   Azure NPM checks neither.
//! - **Contested addresses** (several local pods claim one, see `state::Claim`) are in a
//!   `quarantine` set whose new connections AZURE-NPM drops both ways.
//! - **Named ports for egress** use the same `namedport:` sets, matched `dst,dst`: the
//!   destination pod's own port of that name, as the specification says.
//! - **`In` on a namespace label with several values** is one list of the matching
//!   namespaces' sets (`nslabel-<key>:<v1>:<v2>`), as list:sets cannot hold lists.
//! - **CIDR sets are per block** (`cidr-<cidr>-except-<…>`), shared by every policy that
//!   names the block, where Azure NPM names one per policy rule.
//! - **Hashing** is the FNV-1a of every released Azure NPM v2 (Azure NPM's development
//!   branch has since moved to SHA-256/base36 names for uniqueness); a hash already taken by
//!   another name gets the name `…~1` (and so another hash) instead of sharing a set or
//!   chain.
//! - **Node addresses** need no rule (see above); Azure NPM has none either.
//! - **IPv6** (Azure NPM has none on Linux): the same layout in ip6tables, its sets
//!   `family inet6` and named `inet6:<the IPv4 twin's name>` (kube-router's convention), the
//!   chains named as IPv4's; both families are written in the same diff, make-before-break in
//!   each ([`translate::merge_families`]). An ipBlock matches only its own family. ip6tables
//!   is left empty until the layout names an IPv6 address or block
//!   ([`translate::names_ipv6`]), then written whole; a reconcile of a plan without IPv6
//!   empties it again.
//! - **The FORWARD jump** is always the first rule (Azure NPM's default; its option to place
//!   it after KUBE-SERVICES is not offered).
//!
//! Like Azure NPM, every node holds every policy and the label sets of every pod: a node
//! checks a connection's egress and ingress policies wherever the pods are, so a connection
//! between two nodes is checked on both (with the same answer).

pub mod emulator;
#[cfg(target_os = "linux")]
pub mod exec;
#[cfg(target_os = "linux")]
pub mod guard;
#[cfg(target_os = "linux")]
pub mod kernel;
pub mod names;
#[cfg(target_os = "linux")]
pub mod observe;
pub mod saved;
pub mod translate;

#[cfg(target_os = "linux")]
pub use exec::{BACKEND_ENV, Backend, Runner, detect_backend};
#[cfg(target_os = "linux")]
pub use kernel::{ApplyStats, IptablesCleanup, IptablesConfig, IptablesDataplane, cleanup};
