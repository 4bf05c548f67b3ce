//! tc (tcx) programs of the NetworkPolicy enforcer.
//!
//! For now a single stub classifier that counts packets and has no opinion on them
//! (`TC_ACT_PIPE`: the next program or the stack decides). It proves the toolchain end to end
//! (aya-ebpf -> bpf-linker -> aya-build -> `include_bytes_aligned!` in the agent -> load and
//! `BPF_PROG_TEST_RUN`); the policy programs replace it in a later issue.
//!
//! The crate is built for `bpfel-unknown-none` by npm-agent's build script. On the host it compiles
//! as an ordinary binary with an empty `main`, so `cargo build --workspace` and IDEs work; the
//! `no_std`/`no_main` attributes and the panic handler exist only on the BPF target (a host build
//! with its own panic handler would clash with std's `panic_impl`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use npm_common::Counter;

/// Per-CPU packet counter; slot 0 counts every packet the classifier sees.
/// The agent sums the per-CPU values (map name: [`npm_common::COUNTERS_MAP`]).
#[map]
static NPM_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// The stub classifier (program name: [`npm_common::TC_PROGRAM`]).
#[classifier]
pub fn npm_tc(_ctx: TcContext) -> i32 {
    if let Some(counter) = NPM_COUNTERS.get_ptr_mut(0) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup, so it is valid,
        // aligned and only touched by this CPU while the program runs.
        unsafe { (*counter).packets += 1 };
    }
    TC_ACT_PIPE
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
