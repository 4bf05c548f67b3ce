//! The eBPF dataplane: tc programs on the host side of each local pod's veth, with BPF maps
//! in place of ipsets. [`translate`] encodes plan diffs as map operations; [`emulator`] models
//! the maps on the host; the kernel side loads, pins and attaches.

pub mod emulator;
pub mod events;
#[cfg(target_os = "linux")]
pub mod kernel;
#[cfg(target_os = "linux")]
pub mod observe;
#[cfg(target_os = "linux")]
pub mod testrun;
pub mod translate;

/// Where the agent pins its maps and links (bpffs).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/npm-rs";

#[cfg(target_os = "linux")]
pub use kernel::{CONNTRACK_SWEEP, EbpfCleanup, EbpfConfig, EbpfDataplane, cleanup};
#[cfg(target_os = "linux")]
pub use observe::{PacketCounters, pinned_counters};
