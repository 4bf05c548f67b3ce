//! The iptables + ipset dataplane: the Linux fallback, laid out as Azure Network Policy
//! Manager v2 lays out its rules, so that what operators know about Azure NPM (and their
//! `iptables-save | grep AZURE-NPM`, `ipset list` habits) carries over.
//!
//! - [`names`]: Azure NPM's chain names, marks, hashing (`azure-npm-<FNV-1a>`) and comments;
//! - [`translate`]: plan diffs → `ipset restore` / `iptables-restore --noflush` batches, and a
//!   reconcile against what the kernel holds (pure, host-tested);
//! - [`model`]: the filter table and ipsets modelled on the host, to check the batches;
//! - [`state`]: reading `ipset save` / `iptables-save`;
//! - [`kernel`]: running the batches, backend detection, cleanup.
//!
//! # The layout
//! ```text
//! FORWARD   -m conntrack --ctstate NEW -j AZURE-NPM                      (first rule)
//! AZURE-NPM -j AZURE-NPM-INGRESS | -j AZURE-NPM-EGRESS | -j AZURE-NPM-ACCEPT   (empty while
//!                                                                         no pod is isolated)
//! AZURE-NPM-INGRESS  -m set --match-set <podselector> dst -m comment --comment
//!                      "INGRESS-POLICY-<ns>/plan-<digest>-TO-podselector-…-IN-ns-<ns>"
//!                      -j AZURE-NPM-INGRESS-<hash>                       (one per policy group)
//!                    -m mark --mark 0x400/0x400 … DROP-ON-INGRESS-DROP-MARK-0x400/0x400 -j DROP
//! AZURE-NPM-INGRESS-<hash>  [-p tcp -m tcp --dport 80] -m set --match-set <peers> src
//!                      -m comment --comment "ALLOW-FROM-<peers>-ON-TCP-TO-PORT-80"
//!                      -j AZURE-NPM-INGRESS-ALLOW-MARK                   (one per allow rule)
//!                    -m comment --comment DROP-ALL -j MARK --set-xmark 0x400/0x400
//! AZURE-NPM-INGRESS-ALLOW-MARK  … SET-INGRESS-ALLOW-MARK-0x200/0x200 -j MARK --set-xmark 0x200/0x200
//!                               -j AZURE-NPM-EGRESS
//! AZURE-NPM-EGRESS   jumps (src) to AZURE-NPM-EGRESS-<hash>, whose allow rules jump to
//!                    AZURE-NPM-ACCEPT and whose last rule sets 0x800/0x800;
//!                    -m mark --mark 0x800/0x800 … -j DROP
//!                    -m mark --mark 0x200/0x200 … ACCEPT-ON-INGRESS-ALLOW-MARK-0x200/0x200 -j AZURE-NPM-ACCEPT
//! AZURE-NPM-ACCEPT   -j ACCEPT
//! ```
//! Sets: `azure-npm-<FNV-1a 32 of the readable name, decimal>`: `identity-<n>` (hash:net, the
//! pods of one identity), `nestedlabel-<sets>` (list:set of identity sets admitted on the same
//! ports), `cidr-<block>[-except-…]` (hash:net, maxelem 4294967295, excepts as `nomatch`),
//! `podselector-<group>` (hash:net, the endpoints a policy group applies to). Rule comments
//! carry the readable names.
//!
//! Packets: a connection's first packet (conntrack NEW) entering FORWARD goes through
//! AZURE-NPM; replies and later packets of accepted connections (ESTABLISHED, RELATED) never
//! do, which is how Azure NPM accepts them before policy. Ingress of a destination pod on
//! this node is checked first (every policy group of the pod jumps; an allow sets 0x200 and
//! goes on to egress, no allow leaves 0x400, dropped after the last group); then egress of
//! the source pod (an allow accepts; no allow leaves 0x800, dropped); then the packet is
//! accepted. Pods on the same node are checked in one pass; across nodes, the source node
//! checks egress and the destination node ingress. Traffic between a pod and its own node
//! enters OUTPUT or INPUT, never FORWARD, so it is always allowed, as the plan requires.
//!
//! Batches: `ipset -exist restore` and `iptables-restore -w 60 -T filter --noflush` (the
//! xtables lock taken, waiting up to 60 s), one process per batch and at most five per diff
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
//! # Where this differs from Azure NPM v2
//! - **Policy groups instead of policies.** The dataplane receives the compiled plan (per
//!   endpoint: isolation and resolved allow entries), not NetworkPolicy objects. A chain
//!   therefore stands for a *policy group*: the endpoints of one namespace whose direction
//!   has the same allow entries (usually: the pods that the same policies select). Its
//!   readable name is `<ns>/plan-<64-bit digest of its rules>` and its chain is
//!   `AZURE-NPM-INGRESS-<FNV-1a of that name>`, where Azure NPM hashes `<ns>/<policy name>`.
//!   Several policies selecting the same pods make one chain (their union); a policy whose
//!   pods differ in other policies makes several.
//! - **Sets of identities instead of label sets.** The compiler has already evaluated
//!   selectors, namespace selectors, matchExpressions (In, NotIn, Exists, DoesNotExist) and
//!   named ports, so there are no `ns-`, `podlabel-`, `nslabel-`, `nestedlabel-<policy>`
//!   or `namedport:` sets: an identity (pods with equal namespace, labels and named ports)
//!   is a hash:net set of its pods' addresses, several identities admitted on the same ports
//!   are a list:set of those (Azure NPM's nested sets), and named ports are numbers in the
//!   rules (`namedport:` hash:ip,port sets are not needed: the plan resolved each name per
//!   pod). Negative selectors therefore cost nothing extra.
//! - **Policy-group jumps match one set**, `podselector-<group>`, the group's endpoints,
//!   where Azure NPM matches the policy's label and namespace sets together.
//! - **CIDR sets are per block** (`cidr-<cidr>-except-<…>`), shared by every group that
//!   admits the block, where Azure NPM names one per policy rule.
//! - **Rule comments** follow Azure NPM's format (`ALLOW-FROM-<set>-ON-TCP-TO-PORT-80`,
//!   `ALLOW-ALL`, `DROP-ALL`, `INGRESS-POLICY-<name>-TO-<set>-IN-ns-<ns>`) with the names
//!   above, cut to the kernel's 255 characters.
//! - **Hashing** is the FNV-1a of every released Azure NPM v2 (Azure NPM's development
//!   branch has since moved to SHA-256/base36 names for uniqueness); a hash already taken by
//!   another name gets the name `…~1` (and so another hash) instead of sharing a set or
//!   chain.
//! - **Sets are not reused with other members across restarts.** A restarted agent may
//!   number identities differently; a set whose kernel copy has other members is created
//!   under another name (`identity-7~1`) rather than changed under rules that use it.
//! - **Node addresses** need no rule (see above); Azure NPM has none either.
//! - **IPv6** plan entries are not enforced (ip6tables is not programmed), as in Azure NPM.
//! - **The FORWARD jump** is always the first rule (Azure NPM's default; its option to place
//!   it after KUBE-SERVICES is not offered).

pub mod kernel;
pub mod model;
pub mod names;
pub mod state;
pub mod translate;

pub use kernel::{ApplyStats, BACKEND_ENV, Backend, IptablesCleanup, IptablesConfig, IptablesDataplane, cleanup, detect_backend};
