//! The Windows translation: the plan as the Host Networking Service (HNS) receives it from
//! Azure NPM's Windows dataplane: SetPolicies on the network (`IPSET` of addresses,
//! `NESTEDIPSET` of sets) and, per endpoint, ACL policies (`Id`, `Action` Allow/Block,
//! `Direction` In/Out, `Priority`, `Protocols`, `LocalAddresses`/`RemoteAddresses`,
//! `LocalPorts`/`RemotePorts`, `RuleType` Switch). [`translate`] builds it (pure, golden-tested
//! in `tests/hns_golden.rs` against `tests/golden/hns/*.json`); [`dataplane`] brings HCN to it,
//! changing what differs, through the [`hcn::Hcn`] seam: [`windows`] makes the calls on
//! Windows (`cfg(windows)`), [`host`] models them anywhere, for the golden and differential
//! tests.
//!
//! # Layout
//! - Sets: `identity-<n>` (IPSET of the pods of one identity), `nestedlabel-<sets>`
//!   (NESTEDIPSET of identity sets admitted on the same ports), `cidr-<block>` (IPSET of
//!   prefixes), `cidr-<block>-except-<…>-excepts` (IPSET of the excepts, for a block ACL);
//!   `Id` is `azure-npm-<FNV-1a>` of the name, as on Linux and in Azure NPM.
//! - Endpoints: on Windows a pod has one HNS endpoint holding all its addresses (a dual-stack
//!   pod: one of each family), so the plan's endpoints of a pod (one per address) are one
//!   ACL list, written to the HNS endpoint holding them (`EndpointAcls::ips`); pods that
//!   claim an address together are one list too. Where those addresses have different
//!   entries (an address in conflict), one list cannot tell them apart: only the node is
//!   admitted there (reported). The dataplane keeps what it wrote by HNS endpoint ID.
//! - Families (HNS v2 ACLs and SetPolicies take IPv6 addresses and prefixes on dual-stack
//!   networks): identity sets hold a pod's addresses of both families; a block is a set of
//!   its own family's prefixes, so an IPv4 block never matches IPv6 traffic nor the reverse;
//!   an entry with no peer restriction is an ACL naming no address, for both families;
//!   "every address" of one family (`0.0.0.0/0`, `::/0`) is written as no address only on
//!   an endpoint of that family alone, elsewhere as a set of the family's two halves
//!   (`0.0.0.0/1,128.0.0.0/1`, `::/1,8000::/1`). The node's addresses of both families are
//!   at 201.
//! - Per isolated endpoint direction, in priority order (lower first, as HNS evaluates):
//!   201 allow the node's addresses (Azure NPM's readiness-probe ACL, here for both
//!   directions, as the plan requires); 222 the allow entries; 223 a block per `except`;
//!   224 the allows those blocks carve; 3000 block everything else (Azure NPM's default
//!   deny). An endpoint direction no policy isolates has no ACL (HNS allows).
//! - Peers as sets follow Azure NPM's mapping: for In, sets go to `LocalAddresses` (HNS's
//!   source sets) and ports to `LocalPorts`; for Out, sets go to `RemoteAddresses` and ports
//!   to `RemotePorts`; direct addresses (the node's) go to `RemoteAddresses`.
//! - All ACLs of one endpoint direction share one `Id`, `azure-acl-<ns>-plan-<digest>`, as
//!   Azure NPM gives one `Id` to the ACLs of one policy.
//!
//! # Features Azure NPM lacks on Windows, expressed here
//! | feature | Azure NPM on Windows | here |
//! |---|---|---|
//! | named ports | rejected (`ErrUnsupportedNamedPort`) | resolved to numbers per pod by the compiler |
//! | `except` in ipBlock | rejected (`ErrUnsupportedExceptCIDR`) | a Block ACL of the excepts at 223 above the Allow of the cidr at 224; where such a block would hide another block's addresses on the same ports, the cidr minus its excepts as prefixes (at most 32 per IPv4 except, 128 per IPv6 one) |
//! | IPv6, dual stack | IPv4 only | endpoints, peers, blocks (with excepts) and the node of both families; a dual-stack pod's one HNS endpoint holds the ACLs of both |
//! | NotIn / DoesNotExist selectors | rejected (`ErrUnsupportedNegativeMatch`) | expanded by the compiler to the identities (pods) they match |
//! | egress to the node | not allowed | allowed (Allow Out to the node's addresses at 201) |
//!
//! # What HNS cannot express (reported in [`HnsPolicies::unsupported`], left out)
//! | feature | why |
//! |---|---|
//! | SCTP | HNS ACLs have no SCTP (Azure NPM rejects it on Windows) |
//! | port ranges wider than 4,096 ports | HNS ACLs take port lists, so ranges are expanded (as Azure NPM does); `1-65535` is written as "every port" |
//! | established-connection state | HNS ACLs are stateful per flow on their own (replies pass); nothing to write |
//! | ICMPv6 specifics (neighbour discovery past a Block) | ACLs match a protocol, not ICMP types: no ACL is written for neighbour discovery (an isolated IPv6 endpoint relies on HNS passing it below the ACLs, as for ARP; untested, nothing has run on Windows) |
//! | different entries for the addresses of one HNS endpoint (an address in conflict) | one ACL list per endpoint: only the node is admitted there |
//!
//! A left-out entry makes the endpoint admit less than the plan, never more.
//!
//! # ClusterNetworkPolicy
//! A direction a ClusterNetworkPolicy selects gets the tiers' ACLs instead ([`tiers`]): the
//! node at 201, Admin entries from 1000 in precedence order (a `Pass` expanded in place),
//! then the NetworkPolicies (where they isolate) or the Baseline entries from 40000.

pub mod dataplane;
pub mod hcn;
pub mod host;
pub mod tiers;
pub mod translate;
#[cfg(windows)]
pub mod windows;

pub use dataplane::HnsDataplane;
pub use hcn::{Hcn, HcnError};
pub use host::HostHcn;
pub use translate::{
    AclPolicySetting, EndpointAcls, HnsPolicies, PolicyEntry, PolicyRequest, SetPolicySetting,
    Unsupported, translate,
};
