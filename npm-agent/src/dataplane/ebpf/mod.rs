//! The eBPF dataplane: tc programs on the host side of each local pod's veth, with BPF maps
//! in place of ipsets. [`translate`] encodes plan diffs as map operations; [`emulator`] models
//! the maps on the host; the kernel side loads, pins and attaches.

pub mod emulator;
pub mod kernel;
pub mod observe;
pub mod testrun;
pub mod translate;

pub use kernel::{
    CONNTRACK_SWEEP, DEFAULT_PIN_ROOT, EbpfCleanup, EbpfConfig, EbpfDataplane, cleanup,
};
pub use observe::{PacketCounters, pinned_counters};
