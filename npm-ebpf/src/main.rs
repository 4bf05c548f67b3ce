//! tc (tcx) programs of the NetworkPolicy enforcer, attached to the host side of each local
//! pod's veth: `npm_from_pod` on tc ingress (what the pod sends: its egress) and `npm_to_pod`
//! on tc egress (what the pod receives: its ingress).
//!
//! This file only binds the maps and the skb to `npm_common`: the frame is read by
//! `npm_common::classify_frame` and judged by `npm_common::decide`, the very code the agent's
//! tests and the fuzzer run on the host (see there for the order of the checks and the
//! choices for odd packets).
//!
//! The crate is built for `bpfel-unknown-none` by npm-agent's build script. On the host it
//! compiles as an ordinary binary with an empty `main`, so `cargo build --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_boot_ns,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use npm_common::{
    Addr, CONFIG_ENTRIES, CONFIG_EVENT_BURST, CONFIG_EVENT_COST_NS, COUNTERS, DIR_EGRESS,
    DIR_INGRESS, DropEvent, EVENTS_RING_BYTES, EndpointInfo, Frame, Hook, IfaceInfo, MAX_CIDRS,
    MAX_CT, MAX_ENDPOINTS, MAX_FRAGS, MAX_IDENTITIES, MAX_IFACES, MAX_NODE_IPS, MAX_POLICY, Maps,
    PolicyKeyData, PolicyValue, RateLimit, Reason, Verdict, classify_frame,
    conntrack::{CtKey, CtValue, FragKey, FragValue},
    counter_index, decide, drop_event,
    packet::Parsed,
    rate_admit,
};

#[map]
static NPM_ENDPOINTS: HashMap<Addr, EndpointInfo> = HashMap::pinned(MAX_ENDPOINTS, 0);
#[map]
static NPM_IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(MAX_IFACES, 0);
#[map]
static NPM_IDENTITIES: HashMap<Addr, u32> = HashMap::pinned(MAX_IDENTITIES, 0);
#[map]
static NPM_CIDRS: LpmTrie<Addr, u32> = LpmTrie::pinned(MAX_CIDRS, BPF_F_NO_PREALLOC);
#[map]
static NPM_POLICY: LpmTrie<PolicyKeyData, PolicyValue> =
    LpmTrie::pinned(MAX_POLICY, BPF_F_NO_PREALLOC);
#[map]
static NPM_NODE_IPS: HashMap<Addr, u32> = HashMap::pinned(MAX_NODE_IPS, 0);
#[map]
static NPM_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CT, 0);
#[map]
static NPM_FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(MAX_FRAGS, 0);
#[map]
static NPM_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);
#[map]
static NPM_CONFIG: Array<u32> = Array::pinned(CONFIG_ENTRIES, 0);
#[map]
static NPM_EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);
#[map]
static NPM_EVENT_RATE: PerCpuArray<RateLimit> = PerCpuArray::pinned(1, 0);
/// Per-CPU room for the packet being decided (not pinned: nothing outlives a run).
#[map]
static NPM_SCRATCH: PerCpuArray<Parsed> = PerCpuArray::with_max_entries(1, 0);

/// The skb, as `npm_common` reads frames.
struct Skb<'a>(&'a TcContext);

impl Frame for Skb<'_> {
    fn frame_len(&self) -> usize {
        self.0.len() as usize
    }

    fn load<T: bytemuck::Pod>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }
}

/// The maps, as `npm_common::decide` sees them.
struct Kernel;

impl Maps for Kernel {
    fn iface(&self, ifindex: u32) -> Option<&IfaceInfo> {
        // SAFETY: map values stay valid for the program's run (RCU). The agent writes an
        // interface's value whole, before attaching, and again only when a pod's other
        // address joins: a concurrent read sees either value, both the pod's.
        unsafe { NPM_IFACES.get(ifindex) }
    }

    fn endpoint(&self, ip: Addr) -> Option<EndpointInfo> {
        // SAFETY: as for `iface`.
        unsafe { NPM_ENDPOINTS.get(ip).copied() }
    }

    fn is_node_ip(&self, ip: Addr) -> bool {
        NPM_NODE_IPS.get_ptr(ip).is_some()
    }

    fn identity(&self, ip: Addr) -> Option<u32> {
        // SAFETY: as for `iface`.
        unsafe { NPM_IDENTITIES.get(ip).copied() }
    }

    fn prefix_id(&self, ip: Addr) -> Option<u32> {
        NPM_CIDRS.get(Key::new(128, ip)).copied()
    }

    fn policy_lookup(&self, prefix_len: u32, key: &PolicyKeyData) -> Option<PolicyValue> {
        NPM_POLICY.get(Key::new(prefix_len, *key)).copied()
    }

    fn ct_get(&self, key: &CtKey) -> Option<CtValue> {
        // SAFETY: as for `iface`; a racing refresh from another CPU is as good as ours.
        unsafe { NPM_CT.get(key).copied() }
    }

    fn ct_put(&self, key: &CtKey, value: &CtValue) {
        // A full LRU map evicts its oldest entry; nothing else can fail that matters here.
        let _ = NPM_CT.insert(key, value, 0);
    }

    fn ct_delete(&self, key: &CtKey) {
        let _ = NPM_CT.remove(key);
    }

    fn frag_get(&self, key: &FragKey) -> Option<FragValue> {
        // SAFETY: as for `iface`.
        unsafe { NPM_FRAGS.get(key).copied() }
    }

    fn frag_put(&self, key: &FragKey, value: &FragValue) {
        let _ = NPM_FRAGS.insert(key, value, 0);
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
    // SAFETY: the skb pointer is the program's context, valid for the whole run.
    let (ifindex, ingress_ifindex) =
        unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).ingress_ifindex) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let hook = Hook { dir, ifindex, ingress_ifindex, now };
    // The parsed packet lives in a per-CPU slot, not on the stack (see `parse`).
    let Some(parsed) = NPM_SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT; // cannot happen: the slot of an array always exists
    };
    // SAFETY: this CPU's slot, used only by this run (tc programs do not preempt one another
    // on a CPU), from a successful lookup.
    let parsed = unsafe { &mut *parsed };
    parse(ctx, parsed);
    let verdict = judge(&hook, parsed);
    count(dir, verdict.reason);
    if verdict.allowed() {
        return TC_ACT_UNSPEC; // no objection: the next program, or the stack, decides
    }
    report(&hook, &verdict);
    TC_ACT_SHOT
}

// Reading, deciding and reporting are functions of their own (BPF-to-BPF calls): their
// locals (IPv6 headers, connection-tracking keys, the event) are never on the stack at
// once, and the parsed packet is kept in `NPM_SCRATCH`, which keeps the program within the
// 512 bytes of stack BPF allows a call chain.

#[inline(never)]
fn parse(ctx: &TcContext, out: &mut Parsed) {
    *out = classify_frame(&Skb(ctx));
}

#[inline(never)]
fn judge(hook: &Hook, parsed: &Parsed) -> Verdict {
    decide(&Kernel, hook, parsed)
}

/// Sends the drop's event to the agent, if the CPU's rate limiter lets it through.
#[inline(never)]
fn report(hook: &Hook, verdict: &Verdict) {
    let cost = NPM_CONFIG.get(CONFIG_EVENT_COST_NS).copied().unwrap_or(0);
    if cost == 0 {
        return;
    }
    let burst = NPM_CONFIG.get(CONFIG_EVENT_BURST).copied().unwrap_or(1);
    let Some(limit) = NPM_EVENT_RATE.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot from a successful lookup; only this CPU touches it while the
    // program runs (tc programs are not preempted by one another on a CPU).
    let limit = unsafe { &mut *limit };
    if !rate_admit(limit, hook.now, u64::from(cost), u64::from(burst)) {
        return;
    }
    let event: DropEvent = drop_event(&Kernel, hook, verdict);
    if NPM_EVENTS.output::<DropEvent>(&event, 0).is_ok() {
        limit.emitted += 1;
    } else {
        limit.lost += 1;
    }
}

#[inline(always)]
fn count(dir: u8, reason: Reason) {
    if let Some(c) = NPM_COUNTERS.get_ptr_mut(counter_index(dir, reason)) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it now.
        unsafe { *c += 1 };
    }
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
