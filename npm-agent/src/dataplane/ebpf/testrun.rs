//! Packets through the real programs without any pod: `BPF_PROG_TEST_RUN`, told which
//! interface the packet is seen at and which one it came in through, as the programs learn
//! it from the skb. For packet tests, the fuzzer and the per-packet benchmarks.
//!
//! The kernel runs a test packet "at" a real device of the caller's network namespace, so
//! [`TestInterfaces`] moves the calling thread into a network namespace of its own and makes
//! interfaces there (veth pairs: not every kernel has the dummy driver); they (and the
//! namespace) vanish with the thread. Nothing touches the host's interfaces.

use std::io;
use std::process::Command;
use std::time::Duration;

use aya::programs::{TestRun as _, TestRunOptions};
use npm_common::{DIR_EGRESS, PROG_FROM_POD, PROG_TO_POD};

use super::kernel::EbpfDataplane;
use crate::dataplane::iface;

/// `TC_ACT_UNSPEC` (-1) as the kernel returns it: no objection.
pub const PASS: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
pub const DROP: u32 = 2;

/// Offsets in `struct __sk_buff` (uapi/linux/bpf.h) of the fields a test run may set.
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;
const SKB_CTX_LEN: usize = 48;

/// Interfaces in a network namespace of the calling thread's own.
pub struct TestInterfaces {
    names: Vec<(String, u32)>,
}

impl TestInterfaces {
    /// Moves the calling thread into a new network namespace and creates `names` there (each
    /// one end of a veth pair). Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
    pub fn new(names: &[&str]) -> io::Result<TestInterfaces> {
        // SAFETY: unshare(2) affects only the calling thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        for name in names {
            // Run from this thread, `ip` starts in its namespace.
            let peer = format!("{name}-p");
            let status = Command::new("ip")
                .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
                .status()?;
            if !status.success() {
                return Err(io::Error::other(format!("ip link add {name} type veth: {status}")));
            }
            let index = iface::index(name)
                .ok_or_else(|| io::Error::other(format!("no index for {name}")))?;
            out.push((name.to_string(), index));
        }
        Ok(TestInterfaces { names: out })
    }

    /// The index of one of the interfaces.
    pub fn index(&self, name: &str) -> u32 {
        self.names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .unwrap_or_else(|| panic!("no test interface {name}"))
    }
}

/// What one test run returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// [`PASS`] or [`DROP`].
    pub verdict: u32,
    /// The kernel's average time per repetition.
    pub duration: Duration,
}

/// Runs `frame` `repeat` times through the program of direction `dir` (`npm_from_pod` for
/// `DIR_EGRESS`), seen at interface `ifindex` (0: the loopback device) after entering the
/// node through `ingress_ifindex`.
pub fn run(
    dp: &mut EbpfDataplane,
    dir: u8,
    ifindex: u32,
    ingress_ifindex: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<Outcome, String> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
    let name = if dir == DIR_EGRESS { PROG_FROM_POD } else { PROG_TO_POD };
    let prog = dp.program_mut(name).ok_or_else(|| format!("program {name} missing"))?;
    let mut out = vec![0u8; frame.len() + 64];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .map_err(|e| format!("test run of {} bytes: {e}", frame.len()))?;
    Ok(Outcome { verdict: r.return_value, duration: r.duration })
}
