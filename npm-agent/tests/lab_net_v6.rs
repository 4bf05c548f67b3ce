//! The network-namespace lab's IPv6 (no dataplane): dual-stack and single-stack IPv6 pods
//! reach each other on one node and across nodes, over TCP and UDP, and stop doing so when
//! their IPv6 routes are missing; an IPv4-only lab keeps IPv6 off. Needs root; skipped with a
//! message otherwise. Every `ip` command runs with `-n <lab namespace>`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use npm_agent::lab::net::{self, Lab, LabConfig};
use npm_agent::lab::probe::DEFAULT_PROBE_TIMEOUT;
use npm_agent::model::{IpFamily, Protocol};
use npm_agent::netns;

fn lab_available() -> bool {
    match net::check_environment() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping the network-namespace lab test: {e:#}");
            false
        }
    }
}

const PORTS: [(Protocol, u16); 4] =
    [(Protocol::Tcp, 80), (Protocol::Tcp, 81), (Protocol::Udp, 80), (Protocol::Udp, 81)];

fn show(keys: &[&str], m: &[Vec<bool>]) -> String {
    let mut s = String::new();
    for (k, row) in keys.iter().zip(m) {
        s += &format!(
            "{k:>4} {}\n",
            row.iter().map(|&b| if b { '.' } else { 'X' }).collect::<String>()
        );
    }
    s
}

fn matrix(lab: &Lab, keys: &[&str], family: IpFamily, protocol: Protocol) -> Vec<Vec<bool>> {
    let m =
        lab.probe_matrix_family(keys, family, protocol, 80, DEFAULT_PROBE_TIMEOUT).expect("probe");
    eprintln!("{family:?} {protocol}/80\n{}", show(keys, &m));
    m
}

/// `ip -n <netns> args...`, which must succeed; its output.
fn ip(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip").arg("-n").arg(netns).args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn v6(ns: u16, pod: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x240, ns, 0, 0, 0, pod)
}

fn sysctl(netns_path: &std::path::Path, key: &str) -> String {
    let path = format!("/proc/sys/net/{key}");
    netns::run_in(netns_path, || std::fs::read_to_string(&path))
        .expect("enter")
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .to_string()
}

#[test]
fn ipv6_pods_reach_each_other_on_one_node_and_across_nodes() {
    if !lab_available() {
        return;
    }
    let mut lab = Lab::new(LabConfig::default()).expect("lab");
    let prefix = lab.prefix().to_string();
    // x/a, x/b dual stack on node 0; y/a dual stack on node 1; z/a IPv6 only on node 1; z/b
    // IPv6 only on node 0.
    lab.add_pod_addrs("x/a", Some(Ipv4Addr::new(10, 240, 0, 10)), Some(v6(0, 0x10)), 0, &PORTS)
        .expect("x/a");
    assert!(lab.has_ipv6());
    lab.add_pod_addrs("x/b", Some(Ipv4Addr::new(10, 240, 0, 11)), Some(v6(0, 0x11)), 0, &PORTS)
        .expect("x/b");
    lab.add_pod_addrs("y/a", Some(Ipv4Addr::new(10, 240, 1, 10)), Some(v6(1, 0x10)), 1, &PORTS)
        .expect("y/a");
    lab.add_pod_addrs("z/a", None, Some(v6(2, 0x10)), 1, &PORTS).expect("z/a");
    lab.add_pod_addrs("z/b", None, Some(v6(2, 0x11)), 0, &PORTS).expect("z/b");
    // An address is one pod's only, in either family.
    assert!(lab.add_pod_addrs("z/c", None, Some(v6(2, 0x10)), 0, &PORTS).is_err());
    assert!(lab.add_pod_addrs("z/c", None, Some("fe80::5".parse().unwrap()), 0, &PORTS).is_err());
    assert!(lab.pod("z/c").is_none());

    // The nodes: IPv6 on, forwarding, the uplinks' fabric addresses.
    for node in lab.nodes() {
        assert_eq!(
            node.address6,
            Ipv6Addr::new(0xfd00, 172, 31, 0, 0, 0, 0, 10 + node.index as u16)
        );
        assert_eq!(sysctl(&node.netns_path, "ipv6/conf/all/forwarding"), "1");
        assert_eq!(sysctl(&node.netns_path, "ipv6/conf/all/disable_ipv6"), "0");
        assert_eq!(sysctl(&node.netns_path, "ipv6/conf/eth0/accept_dad"), "0");
        assert_eq!(sysctl(&node.netns_path, "ipv6/conf/eth0/accept_ra"), "0");
        let addrs = ip(&node.netns, &["-6", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("{}/64", node.address6)), "{addrs}");
        assert!(!addrs.contains("tentative"), "{addrs}");
    }
    // A pod: its /128 on eth0, its default route via fe80::1 (a permanent neighbour); its node
    // routes the /128 through the pod's veth (what the dataplanes read), the other node via
    // the owner's uplink.
    let xa = lab.pod("x/a").unwrap().clone();
    assert_eq!(xa.ipv6, Some(v6(0, 0x10)));
    let addrs = ip(&xa.netns, &["-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("{}/128", v6(0, 0x10))), "{addrs}");
    assert!(!addrs.contains("tentative"), "{addrs}");
    let routes = ip(&xa.netns, &["-6", "route", "show", "default"]);
    assert!(routes.contains("via fe80::1 dev eth0"), "{routes}");
    let neigh = ip(&xa.netns, &["-6", "neigh", "show", "fe80::1", "dev", "eth0"]);
    assert!(neigh.contains("lladdr ee:ee:ee:ee:ee:ee") && neigh.contains("PERMANENT"), "{neigh}");
    let n0 = lab.nodes()[0].clone();
    let n1 = lab.nodes()[1].clone();
    let route = ip(&n0.netns, &["-6", "route", "show", &format!("{}/128", v6(0, 0x10))]);
    assert!(route.contains(&format!("dev {}", xa.host_ifname)), "{route}");
    let ipv6_route = netns::run_in(&n0.netns_path, || {
        // (/proc/net is the main thread's namespace; thread-self is this thread's.)
        std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap()
    })
    .unwrap();
    assert!(
        ipv6_route.lines().any(|l| l.starts_with("fd000010024000000000000000000010 80 ")
            && l.trim_end().ends_with(&xa.host_ifname)),
        "{ipv6_route}"
    );
    let route = ip(&n1.netns, &["-6", "route", "show", &format!("{}/128", v6(0, 0x10))]);
    assert!(route.contains(&format!("via {} dev eth0", n0.address6)), "{route}");
    // A single-stack IPv6 pod has no IPv4 address at all.
    let za = lab.pod("z/a").unwrap().clone();
    assert_eq!(za.ip, None);
    assert_eq!(ip(&za.netns, &["-4", "-o", "addr", "show", "dev", "eth0"]).trim(), "");
    assert!(lab.probe_matrix(&["x/a", "z/a"], Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).is_err());

    // Everything reaches everything over IPv6 (TCP and UDP), and the dual-stack pods over
    // IPv4 as well.
    let keys = ["x/a", "x/b", "y/a", "z/a", "z/b"];
    let all = |m: &[Vec<bool>]| m.iter().flatten().all(|&b| b);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let m = matrix(&lab, &keys, IpFamily::V6, protocol);
        assert!(all(&m), "IPv6 {protocol}\n{}", show(&keys, &m));
        let m = matrix(&lab, &keys[..3], IpFamily::V4, protocol);
        assert!(all(&m), "IPv4 {protocol}\n{}", show(&keys[..3], &m));
    }
    // A port nobody serves is refused over IPv6 too.
    let m = lab
        .probe_matrix_family(&keys, IpFamily::V6, Protocol::Tcp, 82, DEFAULT_PROBE_TIMEOUT)
        .unwrap();
    assert!(
        m.iter().enumerate().all(|(i, row)| row.iter().enumerate().all(|(j, &b)| b == (i == j)))
    );

    // Without x/a's /128 route on its node, x/a is unreachable over IPv6 from its node's pods
    // and from the other node (replies too), and still reachable over IPv4.
    let xa6 = format!("{}/128", v6(0, 0x10));
    ip(&n0.netns, &["-6", "route", "del", &xa6, "dev", &xa.host_ifname]);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let m = matrix(&lab, &keys, IpFamily::V6, protocol);
        for (i, row) in m.iter().enumerate() {
            for (j, &ok) in row.iter().enumerate() {
                let expected = i == j || (i != 0 && j != 0);
                assert_eq!(
                    ok, expected,
                    "no /128 route on node 0 for x/a: {} -> {}",
                    keys[i], keys[j]
                );
            }
        }
    }
    assert!(lab.probe("x/b", "x/a", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    assert!(lab.probe("y/a", "x/a", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    ip(&n0.netns, &["-6", "route", "add", &xa6, "dev", &xa.host_ifname]);
    assert!(lab.probe6("z/a", "x/a", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());

    // Without node 1's route to x/a, only node 1's pods lose x/a (and only over IPv6).
    ip(&n1.netns, &["-6", "route", "del", &xa6]);
    let m = matrix(&lab, &keys, IpFamily::V6, Protocol::Tcp);
    for (i, row) in m.iter().enumerate() {
        for (j, &ok) in row.iter().enumerate() {
            let on_n1 = |k: usize| lab.pod(keys[k]).unwrap().node == 1;
            let expected = !((j == 0 && on_n1(i)) || (i == 0 && on_n1(j)));
            assert_eq!(ok, expected, "no route on node 1 to x/a: {} -> {}", keys[i], keys[j]);
        }
    }
    assert!(lab.probe("y/a", "x/a", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    ip(&n1.netns, &["-6", "route", "add", &xa6, "via", &n0.address6.to_string(), "dev", "eth0"]);
    assert!(all(&matrix(&lab, &keys, IpFamily::V6, Protocol::Udp)));

    // Without a pod's default IPv6 route it reaches nothing beyond itself.
    ip(&za.netns, &["-6", "route", "del", "default"]);
    assert!(!lab.probe6("z/a", "y/a", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    assert!(!lab.probe6("z/a", "z/b", Protocol::Udp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    ip(&za.netns, &["-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"]);
    assert!(lab.probe6("z/a", "z/b", Protocol::Udp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());

    // Removing a pod removes its routes from the other node; its address can be used again.
    lab.remove_pod("z/a").expect("remove z/a");
    let route = ip(&n0.netns, &["-6", "route", "show", &format!("{}/128", v6(2, 0x10))]);
    assert_eq!(route.trim(), "");
    lab.add_pod_addrs("z/c", None, Some(v6(2, 0x10)), 0, &PORTS).expect("z/c at z/a's address");
    let keys = ["x/a", "y/a", "z/b", "z/c"];
    assert!(all(&matrix(&lab, &keys, IpFamily::V6, Protocol::Tcp)));

    lab.shutdown().expect("shutdown");
    let left = ip_netns_list(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn ip_netns_list(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

#[test]
fn an_ipv4_lab_keeps_ipv6_off() {
    if !lab_available() {
        return;
    }
    let mut lab = Lab::new(LabConfig::default()).expect("lab");
    lab.add_pod("x/a", Ipv4Addr::new(10, 240, 0, 10), 0, &PORTS).unwrap();
    lab.add_pod("x/b", Ipv4Addr::new(10, 240, 0, 11), 1, &PORTS).unwrap();
    assert!(!lab.has_ipv6());
    let namespaces: Vec<_> = lab
        .nodes()
        .iter()
        .map(|n| n.netns_path.clone())
        .chain(lab.pods().map(|p| p.netns_path.clone()))
        .collect();
    for ns in &namespaces {
        assert_eq!(sysctl(ns, "ipv6/conf/all/disable_ipv6"), "1", "{}", ns.display());
    }
    let n0 = lab.nodes()[0].netns.clone();
    assert_eq!(ip(&n0, &["-6", "-o", "addr", "show"]).trim(), "");
    assert!(lab.probe("x/a", "x/b", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    assert!(
        lab.probe_matrix_family(
            &["x/a", "x/b"],
            IpFamily::V6,
            Protocol::Tcp,
            80,
            DEFAULT_PROBE_TIMEOUT
        )
        .is_err(),
        "the pods have no IPv6 address"
    );
    let prefix = lab.prefix().to_string();
    drop(lab);
    assert!(ip_netns_list(&prefix).is_empty());
}
