//! Map keys and values shared by the eBPF programs (`npm-ebpf`) and the agent (`npm-agent`).
//!
//! Everything here is `#[repr(C)]` plain old data so the kernel side and the user side agree on
//! the layout byte for byte. With the `user` feature the types also implement [`aya::Pod`] so the
//! agent can read and write them through aya's map APIs.
#![no_std]

/// Name of the per-CPU packet counter map of the stub tc program (`npm-ebpf`).
pub const COUNTERS_MAP: &str = "NPM_COUNTERS";

/// Name of the stub tc classifier program in the eBPF object.
pub const TC_PROGRAM: &str = "npm_tc";

/// A packet counter, one slot of a per-CPU array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Counter {
    /// Packets seen by the program on this CPU.
    pub packets: u64,
}

// SAFETY: `Counter` is `#[repr(C)]`, has no padding and every bit pattern is valid (it is
// `bytemuck::Pod`, which the derive checks at compile time).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::Counter;

    #[test]
    fn counter_layout_is_one_u64() {
        assert_eq!(core::mem::size_of::<Counter>(), 8);
        assert_eq!(core::mem::align_of::<Counter>(), 8);
        let c = Counter { packets: 7 };
        assert_eq!(bytemuck::bytes_of(&c), &7u64.to_ne_bytes());
    }
}
