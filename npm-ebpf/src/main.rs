//! tc (tcx) programs of the NetworkPolicy enforcer, attached to the host side of each local
//! pod's veth: `npm_from_pod` on tc ingress (what the pod sends: its egress) and `npm_to_pod`
//! on tc egress (what the pod receives: its ingress).
//!
//! Parsing lives here; the decision is `npm_common::decide`, which the agent's tests also run
//! on the host. Choices for odd packets (see docs/ARCHITECTURE.md):
//! - not IPv4 (ARP, IPv6): passed and counted as unmanaged; IPv6 is not enforced yet;
//! - an IPv4 header that is truncated or inconsistent: dropped (the stack would drop it too);
//! - TCP/UDP/SCTP whose ports cannot be read: dropped when the endpoint is isolated in that
//!   direction, passed otherwise;
//! - fragments: the first is decided by its ports and remembered; later ones follow their
//!   first fragment's flow; a later fragment whose first was not seen is dropped when the
//!   endpoint is isolated.
//!
//! The crate is built for `bpfel-unknown-none` by npm-agent's build script. On the host it
//! compiles as an ordinary binary with an empty `main`, so `cargo build --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use aya_log_ebpf::info;
use npm_common::{
    CONFIG_ENTRIES, CONFIG_LOG_DROPS, COUNTERS, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS,
    EndpointInfo, FragKey, FragValue, MAX_CIDRS, MAX_CT, MAX_ENDPOINTS, MAX_FRAGS, MAX_IDENTITIES,
    MAX_NODE_IPS, MAX_POLICY, PolicyKeyData, Reason, counter_index,
    decide::{Flow, FragmentKind, Maps, decide, fragment_kind},
};

#[map]
static NPM_ENDPOINTS: HashMap<[u8; 4], EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
static NPM_IDENTITIES: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_IDENTITIES, 0);
#[map]
static NPM_CIDRS: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
static NPM_POLICY: LpmTrie<PolicyKeyData, u32> = LpmTrie::pinned(MAX_POLICY, BPF_F_NO_PREALLOC);
#[map]
static NPM_NODE_IPS: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_NODE_IPS, 0);
#[map]
static NPM_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CT, 0);
#[map]
static NPM_FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(MAX_FRAGS, 0);
#[map]
static NPM_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);
#[map]
static NPM_CONFIG: Array<u32> = Array::pinned(CONFIG_ENTRIES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;

/// The maps, as `npm_common::decide` sees them.
struct Kernel;

impl Maps for Kernel {
    fn endpoint(&self, ip: [u8; 4]) -> Option<EndpointInfo> {
        // SAFETY: the value is copied out at once; a concurrent update can at worst give a
        // torn read of one u32, which the kernel does not allow for naturally aligned words.
        unsafe { NPM_ENDPOINTS.get(&ip).copied() }
    }

    fn ct_contains(&self, key: &CtKey) -> bool {
        NPM_CT.get_ptr(key).is_some()
    }

    fn is_node_ip(&self, ip: [u8; 4]) -> bool {
        NPM_NODE_IPS.get_ptr(&ip).is_some()
    }

    fn identity(&self, ip: [u8; 4]) -> Option<u32> {
        // SAFETY: as for `endpoint`.
        unsafe { NPM_IDENTITIES.get(&ip).copied() }
    }

    fn prefix_id(&self, ip: [u8; 4]) -> Option<u32> {
        NPM_CIDRS.get(&Key::new(32, ip)).copied()
    }

    fn policy_matches(&self, prefix_len: u32, key: &PolicyKeyData) -> bool {
        NPM_POLICY.get(&Key::new(prefix_len, *key)).is_some()
    }
}

#[classifier]
pub fn npm_from_pod(ctx: TcContext) -> i32 {
    run(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn npm_to_pod(ctx: TcContext) -> i32 {
    run(&ctx, DIR_INGRESS)
}

#[inline(always)]
fn run(ctx: &TcContext, dir: u8) -> i32 {
    let (reason, flow) = classify(ctx, dir);
    count(dir, reason);
    if reason.allowed() {
        return TC_ACT_UNSPEC; // no objection: the next program, or the stack, decides
    }
    if let Some(flow) = flow {
        if NPM_CONFIG.get(CONFIG_LOG_DROPS).is_some_and(|v| *v != 0) {
            info!(
                ctx,
                "npm drop {} reason={} {:i}:{} -> {:i}:{} proto={}",
                if dir == DIR_EGRESS { "egress" } else { "ingress" },
                reason as u32,
                u32::from_be_bytes(flow.src),
                flow.sport,
                u32::from_be_bytes(flow.dst),
                flow.dport,
                flow.protocol
            );
        }
    }
    TC_ACT_SHOT
}

#[inline(always)]
fn count(dir: u8, reason: Reason) {
    if let Some(c) = NPM_COUNTERS.get_ptr_mut(counter_index(dir, reason)) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it now.
        unsafe { *c += 1 };
    }
}

/// Parses the packet and decides it; returns the flow when one could be read.
#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> (Reason, Option<Flow>) {
    let Ok(ethertype) = ctx.load::<u16>(12) else { return (Reason::Unmanaged, None) };
    if u16::from_be(ethertype) != ETH_P_IP {
        return (Reason::Unmanaged, None);
    }
    // IPv4 header: version/IHL, total length, fragment field, protocol, addresses.
    let (Ok(vihl), Ok(total_len), Ok(frag), Ok(protocol), Ok(src), Ok(dst)) = (
        ctx.load::<u8>(ETH_HLEN),
        ctx.load::<u16>(ETH_HLEN + 2),
        ctx.load::<u16>(ETH_HLEN + 6),
        ctx.load::<u8>(ETH_HLEN + 9),
        ctx.load::<[u8; 4]>(ETH_HLEN + 12),
        ctx.load::<[u8; 4]>(ETH_HLEN + 16),
    ) else {
        return (Reason::Malformed, None);
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be(total_len) as usize;
    if vihl >> 4 != 4 || ihl < 20 || total_len < ihl || (ctx.len() as usize) < ETH_HLEN + total_len
    {
        return (Reason::Malformed, None);
    }
    let mut flow = Flow { src, dst, protocol, sport: 0, dport: 0 };
    let endpoint = if dir == DIR_EGRESS { src } else { dst };
    let isolated = Kernel.endpoint(endpoint).is_some_and(|e| e.isolated(dir));
    let has_ports = matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
    let frag = u16::from_be(frag);
    let id = ctx.load::<u16>(ETH_HLEN + 4).map(u16::from_be).unwrap_or(0);
    match fragment_kind(frag) {
        FragmentKind::Later if has_ports => {
            // Later fragments carry no ports: use those of the first fragment.
            match NPM_FRAGS.get_ptr(&flow.frag_key(id, dir)) {
                Some(v) => {
                    // SAFETY: pointer from a successful lookup, read at once.
                    let v = unsafe { *v };
                    flow.sport = v.sport;
                    flow.dport = v.dport;
                }
                None if isolated => return (Reason::Fragment, Some(flow)),
                None => {}
            }
        }
        kind => {
            if has_ports {
                let l4 = ETH_HLEN + ihl;
                let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
                    let reason = if isolated { Reason::Malformed } else { Reason::NotIsolated };
                    return (reason, Some(flow));
                };
                if total_len < ihl + 4 {
                    let reason = if isolated { Reason::Malformed } else { Reason::NotIsolated };
                    return (reason, Some(flow));
                }
                flow.sport = u16::from_be(sport);
                flow.dport = u16::from_be(dport);
                if kind == FragmentKind::First {
                    let _ = NPM_FRAGS.insert(&flow.frag_key(id, dir), &flow.frag_value(), 0);
                }
            }
        }
    }
    let d = decide(&Kernel, &flow, dir);
    if d.track {
        let _ = NPM_CT.insert(&flow.ct_key(dir), &CtValue { packets: 1 }, 0);
    }
    (d.reason, Some(flow))
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
