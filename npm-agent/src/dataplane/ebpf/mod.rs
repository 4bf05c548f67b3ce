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

use std::net::IpAddr;

use ipnet::IpNet;
use npm_common::{Addr, V4_PREFIX_OFFSET, v4_mapped, v4_of};

/// An address as the maps key it (`npm_common::Addr`: IPv4 mapped into IPv6).
pub fn addr_key(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v) => v4_mapped(v.octets()),
        IpAddr::V6(v) => v.octets(),
    }
}

/// The address of a map key.
pub fn key_addr(a: Addr) -> IpAddr {
    match v4_of(&a) {
        Some(v) => IpAddr::from(v),
        None => IpAddr::from(a),
    }
}

/// A prefix as the CIDR trie keys it: (prefix length, network address).
pub fn prefix_key(net: IpNet) -> (u32, Addr) {
    let extra = if net.addr().is_ipv4() { V4_PREFIX_OFFSET } else { 0 };
    (u32::from(net.prefix_len()) + extra, addr_key(net.network()))
}

/// The prefix of a CIDR trie key; `None` for a key no prefix gives.
pub fn key_prefix(prefix_len: u32, a: Addr) -> Option<IpNet> {
    match (key_addr(a), prefix_len.checked_sub(V4_PREFIX_OFFSET)) {
        (ip @ IpAddr::V4(_), Some(len)) => IpNet::new(ip, len as u8).ok(),
        (IpAddr::V4(_), None) => None,
        (ip, _) => IpNet::new(ip, prefix_len as u8).ok(),
    }
    .map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_families_round_trip() {
        for s in ["10.1.2.3", "fd00::1", "::", "0.0.0.0", "::ffff:0.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            let back = key_addr(addr_key(ip));
            // `::ffff:a.b.c.d` is the IPv4 address's key: the reader never sees it as IPv6.
            assert_eq!(back, ip.to_canonical(), "{s}");
        }
        for s in ["10.0.0.0/8", "0.0.0.0/0", "10.1.2.3/32", "fd00::/8", "::/0"] {
            let net: IpNet = s.parse().unwrap();
            let (len, a) = prefix_key(net);
            assert_eq!(key_prefix(len, a), Some(net), "{s}");
        }
        assert_eq!(prefix_key("10.0.0.0/8".parse().unwrap()).0, 104);
    }
}
