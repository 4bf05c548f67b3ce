//! Finding the host side of a pod's veth: the interface of the /32 route to the pod's address
//! (Azure CNI in transparent mode, Calico and the lab all route each pod address through its
//! own veth). Read from /proc/net/route of the calling thread's network namespace.

use std::net::Ipv4Addr;

/// The interface that the host routes `ip` through with a host route, if any.
pub fn host_interface(ip: Ipv4Addr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/thread-self/net/route").ok()?;
    host_interface_in(&table, ip)
}

/// Parses a /proc/net/route table (addresses in the kernel's byte order, printed as hex).
pub fn host_interface_in(table: &str, ip: Ipv4Addr) -> Option<String> {
    let want = u32::from_ne_bytes(ip.octets());
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        let dest = u32::from_str_radix(f[1], 16).ok()?;
        let mask = u32::from_str_radix(f[7], 16).ok()?;
        (dest == want && mask == u32::MAX).then(|| f[0].to_string())
    })
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
        assert_eq!(host_interface_in(table, Ipv4Addr::new(10, 240, 0, 10)).as_deref(), Some("h1"));
        assert_eq!(host_interface_in(table, Ipv4Addr::new(10, 240, 0, 11)), None);
    }
}
