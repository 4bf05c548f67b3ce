//! Drop events: what the programs tell the agent about a dropped packet, through the ring
//! buffer map, and the per-CPU token bucket that bounds how many they send.
//!
//! The counters (`NPM_COUNTERS`) count every drop; an event is the story of one, and costs
//! the ring buffer's space and the agent's time. So events are rate-limited in the kernel,
//! before anything is written: a flood of denied packets costs each CPU one map lookup and
//! a few arithmetic operations per packet beyond the drop itself, and the agent at most
//! `rate` events a second per CPU.
//!
//! An event names the pod by the interface the packet crossed (never by the addresses it
//! claims) and the profile of the isolated direction: the agent knows which policies made
//! that profile, so the kernel does no per-packet work to name them.

use crate::Addr;
use crate::decide::{Hook, Maps, Verdict};

/// One dropped packet, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropEvent {
    /// `CLOCK_BOOTTIME` of the drop, ns.
    pub time_ns: u64,
    /// Addresses as in the header (see [`crate::Addr`]); zero when the frame was not read as
    /// far.
    pub src: Addr,
    pub dst: Addr,
    /// Ports (host order) for TCP, UDP and SCTP; the identifier of an ICMP echo.
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`, as the pod sees it.
    pub dir: u8,
    /// A [`crate::Reason`] as `u8`.
    pub reason: u8,
    pub _pad: u8,
    /// The host side of the pod's veth the packet crossed.
    pub ifindex: u32,
    /// The address of the pod on that interface (from the interface map; of the packet's
    /// family when the pod has one); zero if unknown.
    pub pod: Addr,
    /// The profile of that pod's direction (see [`crate::EndpointInfo`]); 0 when the
    /// direction is not isolated (a drop for another reason than policy).
    pub profile: u32,
    /// The interface the packet entered the node through (0: the node sent it); for a
    /// spoofed packet, where it came from.
    pub ingress_ifindex: u32,
    pub _pad2: u32,
}

/// Builds the event of a dropped packet: two map lookups (the interface, the endpoint),
/// taken only once the rate limiter let the event through.
#[inline(always)]
pub fn drop_event<M: Maps>(m: &M, hook: &Hook, verdict: &Verdict) -> DropEvent {
    let mut e = DropEvent {
        time_ns: hook.now,
        dir: hook.dir,
        reason: verdict.reason as u8,
        ifindex: hook.ifindex,
        ingress_ifindex: hook.ingress_ifindex,
        ..DropEvent::default()
    };
    if let Some(f) = verdict.flow() {
        e.src = f.src;
        e.dst = f.dst;
        e.sport = f.sport;
        e.dport = f.dport;
        e.protocol = f.protocol;
    }
    let v6 = verdict.flow().is_some_and(|f| f.is_v6());
    if let Some(iface) = m.iface(hook.ifindex) {
        let pod = iface.endpoint_addr(v6);
        e.pod = pod;
        if let Some(ep) = m.endpoint(pod)
            && ep.isolated(hook.dir)
        {
            e.profile = ep.profile(hook.dir);
        }
    }
    e
}

/// The per-CPU state of the event rate limiter, and what it let through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RateLimit {
    /// Time credit, ns: an event costs `cost_ns`; credit grows with time, up to
    /// `burst * cost_ns`.
    pub credit_ns: u64,
    /// When credit was last added (`CLOCK_BOOTTIME`, ns).
    pub last_ns: u64,
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Drops the limiter kept from becoming events.
    pub suppressed: u64,
    /// Events let through but lost: the ring buffer was full (the agent is not reading).
    pub lost: u64,
}

/// Whether one more event may be sent now: a token bucket kept in time units, so the
/// packet path needs no division. `cost_ns` 0 turns events off.
#[inline(always)]
pub fn rate_admit(state: &mut RateLimit, now: u64, cost_ns: u64, burst: u64) -> bool {
    if cost_ns == 0 {
        return false;
    }
    let cap = cost_ns.saturating_mul(if burst == 0 { 1 } else { burst });
    // A clock that seems to go back (another CPU's stamp is never seen here, but be safe)
    // grants nothing.
    if now > state.last_ns {
        state.credit_ns = state.credit_ns.saturating_add(now - state.last_ns);
        state.last_ns = now;
    }
    if state.credit_ns > cap {
        state.credit_ns = cap;
    }
    if state.credit_ns >= cost_ns {
        state.credit_ns -= cost_ns;
        true
    } else {
        state.suppressed += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_flood_gets_burst_then_rate() {
        // 10 events a second, burst 5: a 10 µs-spaced flood of 3 s.
        let mut s = RateLimit::default();
        let (cost, burst) = (SEC / 10, 5);
        let start = 100 * SEC; // the first packet finds a full bucket (credit from boot)
        let mut admitted = 0u64;
        let mut t = start;
        while t < start + 3 * SEC {
            if rate_admit(&mut s, t, cost, burst) {
                admitted += 1;
            }
            t += 10_000;
        }
        // burst + 3 s × 10/s, give or take the one in flight.
        assert!((34..=36).contains(&admitted), "{admitted}");
        assert_eq!(s.suppressed, 300_000 - admitted);
    }

    #[test]
    fn slow_drops_are_all_reported_and_zero_cost_is_off() {
        let mut s = RateLimit::default();
        for i in 1..=50 {
            assert!(rate_admit(&mut s, i * SEC, SEC / 10, 1), "event {i}");
        }
        assert!(!rate_admit(&mut RateLimit::default(), SEC, 0, 10));
    }

    #[test]
    fn the_clock_going_back_never_grants_credit() {
        let mut s = RateLimit::default();
        assert!(rate_admit(&mut s, 10 * SEC, SEC, 1));
        assert!(!rate_admit(&mut s, 5 * SEC, SEC, 1));
        assert!(!rate_admit(&mut s, 10 * SEC + SEC / 2, SEC, 1));
    }

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<DropEvent>(), 80);
        assert_eq!(core::mem::size_of::<RateLimit>(), 40);
    }
}
