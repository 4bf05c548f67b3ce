//! Finding the host side of a pod's veth: the interface of the /32 route to the pod's address
//! (Azure CNI in transparent mode, Calico and the lab all route each pod address through its
//! own veth). Read from /proc/net/route of the calling thread's network namespace. Both Linux
//! dataplanes need it: eBPF attaches there, iptables checks sources there.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The interface that the host routes `ip` through with a host route, if any.
pub fn host_interface(ip: Ipv4Addr) -> Option<String> {
    host_routes().remove(&ip)
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
}
