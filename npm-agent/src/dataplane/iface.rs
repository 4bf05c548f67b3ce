//! Finding the host side of a pod's veth: the interface of the host route to the pod's
//! address, /32 or /128 (Azure CNI in transparent mode, Calico and the lab all route each pod
//! address through its own veth). Read from /proc/net/route and /proc/net/ipv6_route of the
//! calling thread's network namespace. Both Linux dataplanes need it: eBPF attaches there,
//! iptables checks sources there.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The interface that the host routes `ip` (either family) through with a host route, if any.
pub fn host_interface(ip: IpAddr) -> Option<String> {
    match ip {
        IpAddr::V4(v) => host_routes().remove(&v),
        IpAddr::V6(v) => host_routes6().remove(&v),
    }
}

/// Every host route of both families (/32 and /128): address → interface.
pub fn pod_routes() -> HashMap<IpAddr, String> {
    let v4 = host_routes().into_iter().map(|(a, i)| (IpAddr::V4(a), i));
    v4.chain(host_routes6().into_iter().map(|(a, i)| (IpAddr::V6(a), i))).collect()
}

/// Every IPv6 host route (/128) of the calling thread's namespace: address → interface.
pub fn host_routes6() -> HashMap<Ipv6Addr, String> {
    host_routes6_in(
        &std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default(),
    )
}

/// Parses a /proc/net/ipv6_route table: destination (32 hex digits), prefix length (hex),
/// source, source length, next hop, metric, references, use, flags, interface. Routes through
/// the loopback device (the node's own addresses) and multicast ones are not pods'.
pub fn host_routes6_in(table: &str) -> HashMap<Ipv6Addr, String> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok().map(Ipv6Addr::from)?;
            let plen = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let ifname = f.get(9)?;
            (plen == 128 && *ifname != "lo" && !dest.is_multicast())
                .then(|| (dest, ifname.to_string()))
        })
        .collect()
}

/// Every host route (/32) of the calling thread's namespace: address → interface.
pub fn host_routes() -> HashMap<Ipv4Addr, String> {
    host_routes_in(&std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default())
}

/// Parses a /proc/net/route table (addresses in the kernel's byte order, printed as hex).
pub fn host_routes_in(table: &str) -> HashMap<Ipv4Addr, String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            (mask == u32::MAX).then(|| (Ipv4Addr::from(dest.to_ne_bytes()), f[0].to_string()))
        })
        .collect()
}

/// The index of an interface of the calling thread's namespace.
pub fn index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_host_routes_only() {
        // 10.240.0.10/32 dev h1; 10.240.0.0/16 via 172.31.0.2 dev up0; default via up0.
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     up0\t00000000\t02001FAC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     up0\t0000F00A\t02001FAC\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                     h1\t0A00F00A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let routes = host_routes_in(table);
        assert_eq!(routes.get(&Ipv4Addr::new(10, 240, 0, 10)).map(String::as_str), Some("h1"));
        assert_eq!(routes.len(), 1);
        assert_eq!(index("lo"), Some(1));
    }

    #[test]
    fn finds_ipv6_host_routes_only() {
        // fd00:10:240::10/128 dev h1; fd00:10:240::/64 via fe80::1 dev up0; a local address
        // (dev lo); ff00::/8 dev h1.
        let table = concat!(
            "fd000010024000000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 h1\n",
            "fd000010024000000000000000000000 40 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 up0\n",
            "fd000010024000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 80200001 lo\n",
            "ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 h1\n",
        );
        let routes = host_routes6_in(table);
        let pod: Ipv6Addr = "fd00:10:240::10".parse().unwrap();
        assert_eq!(routes.get(&pod).map(String::as_str), Some("h1"), "{routes:?}");
        assert_eq!(routes.len(), 1);
    }
}
