//! The eBPF dataplane's drop events: the programs write [`npm_common::DropEvent`]s to the
//! `NPM_EVENTS` ring buffer, rate-limited per CPU (`NPM_EVENT_RATE`, see
//! `npm_common::events`); the agent reads them here. What the limiter let through, kept back
//! and lost is summed from the per-CPU state for the metrics.

use npm_common::ADDR_NONE;
use std::time::{Duration, SystemTime};

use npm_common::{DIR_INGRESS, DropEvent, Reason};

use crate::dataplane::drops::{DropFlow, DropNotice};
use crate::model::Direction;

/// How many drop events each CPU may send: `per_second` on average, `burst` at once after a
/// quiet time. `per_second` 0: none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRate {
    pub per_second: u32,
    pub burst: u32,
}

impl EventRate {
    /// On by default at a low rate: a denied connection is worth a line, a flood is not.
    pub const DEFAULT: EventRate = EventRate { per_second: 10, burst: 20 };

    /// The config words the programs read: the cost of an event in ns of credit, the burst.
    pub fn config(self) -> (u32, u32) {
        if self.per_second == 0 {
            return (0, 0);
        }
        let cost = (1_000_000_000 / u64::from(self.per_second)).max(1) as u32;
        (cost, self.burst.max(1))
    }
}

impl Default for EventRate {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The notice of an event the programs wrote at `time_ns` of `CLOCK_BOOTTIME`, read when that
/// clock said `boot_now` and the wall clock `now`.
pub fn notice(e: &DropEvent, boot_now: u64, now: SystemTime) -> DropNotice {
    let ago = Duration::from_nanos(boot_now.saturating_sub(e.time_ns));
    let reason = Reason::ALL.get(usize::from(e.reason)).map_or("unknown", |r| r.name());
    let flow = (e.src != ADDR_NONE || e.dst != ADDR_NONE).then(|| DropFlow {
        src: super::key_addr(e.src),
        dst: super::key_addr(e.dst),
        protocol: e.protocol,
        sport: e.sport,
        dport: e.dport,
    });
    DropNotice {
        at: now.checked_sub(ago).unwrap_or(now),
        direction: if e.dir == DIR_INGRESS { Direction::Ingress } else { Direction::Egress },
        reason,
        flow,
        pod_ip: (e.pod != ADDR_NONE).then(|| super::key_addr(e.pod)),
        profile: (e.profile != 0).then_some(e.profile),
    }
}

#[cfg(target_os = "linux")]
pub use kernel::{RingFeed, pinned_event_totals};

#[cfg(target_os = "linux")]
mod kernel {
    use std::os::fd::AsRawFd as _;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use aya::maps::{MapData, PerCpuArray, RingBuf};
    use npm_common::{DropEvent, MAP_EVENT_RATE, RateLimit};

    use super::notice;
    use crate::dataplane::DataplaneError;
    use crate::dataplane::drops::{DropFeed, DropNotice};
    use crate::dataplane::ebpf::kernel::boot_time_ns;
    use crate::dataplane::observe::DropEventCounts as EventTotals;

    fn err(operation: &str, e: impl std::fmt::Display) -> DataplaneError {
        DataplaneError::Apply {
            dataplane: "ebpf",
            operation: operation.into(),
            message: e.to_string(),
        }
    }

    /// The ring buffer, read by one thread.
    pub struct RingFeed {
        ring: RingBuf<MapData>,
    }

    impl RingFeed {
        pub fn new(ring: RingBuf<MapData>) -> Self {
            Self { ring }
        }
    }

    impl DropFeed for RingFeed {
        fn wait(&mut self, timeout: Duration) -> Result<Vec<DropNotice>, DataplaneError> {
            let mut pfd =
                libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err("polling the drop events", e));
                }
            }
            let (boot_now, now) = (boot_time_ns(), SystemTime::now());
            let mut out = Vec::new();
            while let Some(item) = self.ring.next() {
                if item.len() >= std::mem::size_of::<DropEvent>() {
                    let e: DropEvent =
                        bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<DropEvent>()]);
                    out.push(notice(&e, boot_now, now));
                }
            }
            Ok(out)
        }
    }

    /// The limiter's totals of an agent, from its pin root.
    pub fn pinned_event_totals(pin_root: &Path) -> Result<EventTotals, DataplaneError> {
        let data = MapData::from_pin(pin_root.join("maps").join(MAP_EVENT_RATE))
            .map_err(|e| err("opening the pinned event limiter", e))?;
        let rates: PerCpuArray<MapData, RateLimit> =
            aya::maps::Map::PerCpuArray(data)
                .try_into()
                .map_err(|e| err("opening the pinned event limiter", e))?;
        let values = rates.get(&0, 0).map_err(|e| err("reading the event limiter", e))?;
        let mut t = EventTotals::default();
        for v in values.iter() {
            t.sent += v.emitted;
            t.suppressed += v.suppressed;
            t.lost += v.lost;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_a_notice() {
        let e = DropEvent {
            time_ns: 5_000_000_000,
            src: npm_common::v4_mapped([10, 0, 0, 1]),
            dst: npm_common::v4_mapped([10, 0, 0, 2]),
            sport: 40000,
            dport: 80,
            protocol: 6,
            dir: DIR_INGRESS,
            reason: Reason::Denied as u8,
            ifindex: 7,
            pod: npm_common::v4_mapped([10, 0, 0, 2]),
            profile: 3,
            ..DropEvent::default()
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let n = notice(&e, 7_000_000_000, now);
        assert_eq!(n.at, now - Duration::from_secs(2));
        assert_eq!(n.direction, Direction::Ingress);
        assert_eq!(n.reason, "denied");
        assert_eq!(n.flow.unwrap().dport, 80);
        assert_eq!(n.pod_ip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(n.profile, Some(3));
        let bare = notice(&DropEvent { reason: 200, ..DropEvent::default() }, 0, now);
        assert_eq!(
            (bare.reason, bare.flow, bare.pod_ip, bare.profile),
            ("unknown", None, None, None)
        );
    }

    #[test]
    fn rates_become_costs() {
        assert_eq!(EventRate { per_second: 10, burst: 20 }.config(), (100_000_000, 20));
        assert_eq!(EventRate { per_second: 0, burst: 20 }.config(), (0, 0));
        assert_eq!(EventRate { per_second: 2_000_000_000, burst: 0 }.config(), (1, 1));
    }
}
