//! The network-namespace lab's network (no dataplane): nodes, pods, servers, probes and
//! cleanup. Needs root; skipped with a message otherwise.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use npm_agent::lab::net::{self, Lab, LabConfig};
use npm_agent::lab::probe::DEFAULT_PROBE_TIMEOUT;
use npm_agent::lab::registry;
use npm_agent::model::Protocol;
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

/// Names of `ip netns list` that start with `prefix-` (the lab's namespaces).
fn namespaces_of(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
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

fn timed_probe(
    lab: &Lab,
    keys: &[&str],
    protocol: Protocol,
    port: u16,
) -> (Vec<Vec<bool>>, Duration) {
    let start = Instant::now();
    let m = lab.probe_matrix(keys, protocol, port, DEFAULT_PROBE_TIMEOUT).expect("probe");
    let took = start.elapsed();
    eprintln!("{}x{} {protocol}/{port}: {took:?}\n{}", keys.len(), keys.len(), show(keys, &m));
    (m, took)
}

fn assert_all(m: &[Vec<bool>], keys: &[&str], want: bool, what: &str) {
    for (i, row) in m.iter().enumerate() {
        for (j, &ok) in row.iter().enumerate() {
            let expected = want || i == j;
            assert_eq!(ok, expected, "{what}: {} -> {}\n{}", keys[i], keys[j], show(keys, m));
        }
    }
}

#[test]
fn lab_network_end_to_end() {
    if !lab_available() {
        return;
    }
    let host_before = host_network_state();
    let build = Instant::now();
    let mut lab = Lab::new(LabConfig::default()).expect("lab");
    let prefix = lab.prefix().to_string();
    // Three namespaces' worth of pods (x/a x/b y/a y/b z/a z/b), spread over the two nodes.
    let keys = ["x/a", "x/b", "y/a", "y/b", "z/a", "z/b"];
    for (k, key) in keys.iter().enumerate() {
        let ip = Ipv4Addr::new(10, 240, (k / 2) as u8, 10 + (k % 2) as u8);
        let pod = lab.add_pod(key, ip, k % 2, &PORTS).expect("add pod");
        assert!(pod.host_ifindex > 0);
    }
    eprintln!("lab {prefix}: 2 nodes and 6 pods built in {:?}", build.elapsed());
    assert_eq!(namespaces_of(&prefix).len(), 1 + 2 + 6, "{:?}", namespaces_of(&prefix));
    for node in lab.nodes() {
        assert!(node.netns_path.exists());
        assert_eq!(node.address, Ipv4Addr::new(172, 31, 0, 10 + node.index as u8));
    }
    // The host side of a pod's veth is in its node's namespace, named as reported, and the
    // node routes the pod's address through it.
    let pod = lab.pod("y/a").unwrap().clone();
    let node = &lab.nodes()[pod.node];
    let out = Command::new("ip")
        .args(["-n", &node.netns, "-o", "route", "get", &pod.ip.unwrap().to_string()])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&out.stdout);
    assert!(route.contains(&format!("dev {} ", pod.host_ifname)), "{route}");
    assert_eq!(
        lab.host_interface("y/a"),
        Some((pod.node, pod.host_ifname.as_str(), pod.host_ifindex))
    );
    let out = Command::new("ip")
        .args(["-n", &node.netns, "-o", "link", "show", &pod.host_ifname])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&format!("{}: ", pod.host_ifindex)));

    // Commands and threads can run in a lab namespace.
    let out = lab
        .node_command(pod.node, "ip")
        .unwrap()
        .args(["-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}/24", node.address)));
    let out =
        netns::command(&pod.netns_path, "cat").unwrap().arg("/proc/net/route").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("eth0"), "the pod has its own routes");
    let forwarding = netns::run_in(&node.netns_path, || {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
    })
    .unwrap();
    assert_eq!(forwarding.trim(), "1", "forwarding is on in the node namespace");

    let (m, took_tcp) = timed_probe(&lab, &keys, Protocol::Tcp, 80);
    assert_all(&m, &keys, true, "TCP/80");
    assert!(
        took_tcp < Duration::from_millis(900),
        "reachable pairs are decided fast: {took_tcp:?}"
    );
    let (m, took_udp) = timed_probe(&lab, &keys, Protocol::Udp, 81);
    assert_all(&m, &keys, true, "UDP/81");
    assert!(took_udp < Duration::from_millis(900), "{took_udp:?}");
    let (m, _) = timed_probe(&lab, &keys, Protocol::Udp, 80);
    assert_all(&m, &keys, true, "UDP/80");
    // No server: TCP is refused, UDP gets a port unreachable.
    let (m, _) = timed_probe(&lab, &keys, Protocol::Tcp, 82);
    assert_all(&m, &keys, false, "TCP/82");
    let (m, _) = timed_probe(&lab, &keys, Protocol::Udp, 82);
    assert_all(&m, &keys, false, "UDP/82");

    // Blocked (dropped) traffic: cut node 1's route to x/a and probe; the probe decides within
    // about one timeout for the whole matrix.
    let xa = lab.pod("x/a").unwrap().clone();
    let n1 = lab.nodes()[1].netns.clone();
    let st = Command::new("ip")
        .args(["-n", &n1, "route", "replace", "blackhole", &format!("{}/32", xa.ip.unwrap())])
        .status()
        .unwrap();
    assert!(st.success());
    let (m, took_blocked) = timed_probe(&lab, &keys, Protocol::Tcp, 80);
    for (i, row) in m.iter().enumerate() {
        for (j, &ok) in row.iter().enumerate() {
            // Requests from node 1's pods to x/a and replies of node 1's pods to x/a are lost.
            let on_n1 = |k: usize| lab.pod(keys[k]).unwrap().node == 1;
            let expected = !((j == 0 && on_n1(i)) || (i == 0 && on_n1(j)));
            assert_eq!(ok, expected, "blackholed x/a: {} -> {}", keys[i], keys[j]);
        }
    }
    assert!(
        took_blocked >= DEFAULT_PROBE_TIMEOUT && took_blocked < DEFAULT_PROBE_TIMEOUT * 2,
        "{took_blocked:?}"
    );
    let (m, _) = timed_probe(&lab, &keys, Protocol::Udp, 81);
    assert!(
        !m[1][0] && !m[0][1] && m[0][2] && m[2][0],
        "UDP between x/a and node 1 fails, within node 0 works"
    );
    let st = Command::new("ip")
        .args([
            "-n",
            &n1,
            "route",
            "replace",
            &format!("{}/32", xa.ip.unwrap()),
            "via",
            &lab.nodes()[0].address.to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success());

    // Delete a pod and create others (one reusing the deleted pod's address on the other
    // node), then probe again.
    let yb = lab.pod("y/b").unwrap().clone();
    lab.remove_pod("y/b").expect("remove pod");
    assert!(lab.pod("y/b").is_none());
    assert!(!yb.netns_path.exists());
    lab.add_pod("y/c", Ipv4Addr::new(10, 240, 1, 100), 0, &PORTS).expect("add y/c");
    lab.add_pod("y/d", yb.ip.unwrap(), 1 - yb.node, &PORTS).expect("add y/d at y/b's address");
    let keys2 = ["x/a", "x/b", "y/a", "y/c", "y/d", "z/a", "z/b"];
    let (m, _) = timed_probe(&lab, &keys2, Protocol::Tcp, 81);
    assert_all(&m, &keys2, true, "TCP/81 after delete and create");
    let (m, _) = timed_probe(&lab, &keys2, Protocol::Udp, 80);
    assert_all(&m, &keys2, true, "UDP/80 after delete and create");
    assert!(lab.probe("y/c", "y/d", Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).unwrap());
    assert!(
        lab.probe_matrix(&["x/a", "y/b"], Protocol::Tcp, 80, DEFAULT_PROBE_TIMEOUT).is_err(),
        "y/b is gone"
    );

    drop(lab);
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new(), "the lab's namespaces are removed");

    // A second lab right after the first, with the same addresses.
    let mut lab = Lab::new(LabConfig { nodes: 3, ..LabConfig::default() }).expect("second lab");
    let prefix2 = lab.prefix().to_string();
    assert_ne!(prefix, prefix2);
    for (k, key) in keys.iter().enumerate() {
        lab.add_pod(key, Ipv4Addr::new(10, 240, (k / 2) as u8, 10 + (k % 2) as u8), k % 3, &PORTS)
            .expect("add pod");
    }
    let (m, _) = timed_probe(&lab, &keys, Protocol::Tcp, 80);
    assert_all(&m, &keys, true, "second lab TCP/80");
    lab.shutdown().expect("shutdown");
    assert_eq!(namespaces_of(&prefix2), Vec::<String>::new());
    assert_eq!(host_network_state(), host_before, "the root namespace is untouched");
}

/// The root namespace's interfaces, routes and the sysctls the lab sets in its namespaces.
fn host_network_state() -> Vec<String> {
    let mut state = Vec::new();
    for args in [["-o", "link", "show"], ["-o", "route", "show"]] {
        let out = Command::new("ip").args(args).output().unwrap();
        state.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string));
    }
    for key in [
        "ipv4/ip_forward",
        "ipv4/conf/all/rp_filter",
        "ipv4/conf/default/rp_filter",
        "ipv6/conf/all/disable_ipv6",
    ] {
        let value = std::fs::read_to_string(format!("/proc/sys/net/{key}")).unwrap_or_default();
        state.push(format!("{key}={}", value.trim()));
    }
    state
}

#[test]
fn lab_is_removed_when_a_test_panics() {
    if !lab_available() {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut lab = Lab::new(LabConfig::default()).expect("lab");
        *prefix.lock().unwrap() = lab.prefix().to_string();
        lab.add_pod("x/a", Ipv4Addr::new(10, 240, 0, 10), 0, &PORTS).unwrap();
        panic!("a failing case");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new());
}

/// A 9 x 9 matrix where every probe is dropped takes about one timeout, not 81.
#[test]
fn lab_blocked_matrix_takes_one_timeout() {
    if !lab_available() {
        return;
    }
    let mut lab = Lab::new(LabConfig::default()).expect("lab");
    let mut keys = Vec::new();
    for ns in 0..3u8 {
        for p in 0..3u8 {
            keys.push(format!("{}/{}", ["x", "y", "z"][ns as usize], ["a", "b", "c"][p as usize]));
            let k = keys.len() - 1;
            lab.add_pod(&keys[k], Ipv4Addr::new(10, 240, ns, 10 + p), k % 2, &PORTS).unwrap();
        }
    }
    // Drop everything each node forwards from the fabric and to its pods: blackhole every pod
    // route in both nodes (pods then cannot reach each other, not even on one node).
    for node in lab.nodes() {
        let lines: String =
            lab.pods().map(|p| format!("route replace blackhole {}/32\n", p.ip.unwrap())).collect();
        let mut child = Command::new("ip")
            .args(["-n", &node.netns, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let (m, took) = timed_probe(&lab, &refs, protocol, 80);
        assert_all(&m, &refs, false, "all blackholed");
        assert!(took < DEFAULT_PROBE_TIMEOUT * 2, "9x9 blocked {protocol} matrix took {took:?}");
    }
}

/// Run in a child process by `lab_cleans_up_when_interrupted_or_killed`: builds a lab, prints its
/// prefix and waits to be killed.
#[test]
#[ignore = "helper run as a child process by lab_cleans_up_when_interrupted_or_killed"]
fn lab_child_waits_for_a_signal() {
    if std::env::var_os("NPL_LAB_CHILD").is_none() {
        return;
    }
    let mut lab = Lab::new(LabConfig::default()).expect("lab");
    lab.add_pod("x/a", Ipv4Addr::new(10, 240, 0, 10), 0, &PORTS).unwrap();
    lab.add_pod("x/b", Ipv4Addr::new(10, 240, 0, 11), 1, &PORTS).unwrap();
    println!("LAB-PREFIX {}", lab.prefix());
    std::thread::sleep(Duration::from_secs(60));
}

fn spawn_child() -> (std::process::Child, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lab_child_waits_for_a_signal",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NPL_LAB_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let prefix = loop {
        let line = lines.next().expect("child printed its prefix").unwrap();
        // libtest prints "test <name> ... " without a newline before the test's output.
        if let Some((_, p)) = line.split_once("LAB-PREFIX ") {
            break p.trim().to_string();
        }
    };
    (child, prefix)
}

#[test]
fn lab_cleans_up_when_interrupted_or_killed() {
    if !lab_available() {
        return;
    }
    // SIGTERM and SIGINT: the handler removes the namespaces and exits non-zero.
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut child, prefix) = spawn_child();
        assert_eq!(namespaces_of(&prefix).len(), 5);
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(128 + sig), "{status:?}");
        assert_eq!(namespaces_of(&prefix), Vec::<String>::new(), "signal {sig} cleaned up");
    }
    // SIGKILL leaves the namespaces; the next lab's stale cleanup removes them.
    let (mut child, prefix) = spawn_child();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(namespaces_of(&prefix).len(), 5, "SIGKILL cannot clean up");
    let removed = registry::cleanup_stale().unwrap();
    assert!(removed.iter().all(|n| n.starts_with(registry::NAME_PREFIX)));
    assert_eq!(namespaces_of(&prefix), Vec::<String>::new(), "stale namespaces removed");
}

/// Scale check, run by hand: `cargo test --test lab_net -- --ignored lab_scale --nocapture`.
#[test]
#[ignore = "scale check, run by hand"]
fn lab_scale() {
    if !lab_available() || std::env::var_os("NPL_LAB_CHILD").is_some() {
        return;
    }
    let build = Instant::now();
    let mut lab = Lab::new(LabConfig { nodes: 3, ..LabConfig::default() }).expect("lab");
    let keys: Vec<String> = (0..30).map(|k| format!("ns{}/p{}", k / 10, k % 10)).collect();
    for (k, key) in keys.iter().enumerate() {
        lab.add_pod(
            key,
            Ipv4Addr::new(10, 240, (k / 10) as u8, 10 + (k % 10) as u8),
            k % 3,
            &PORTS,
        )
        .unwrap();
    }
    eprintln!("3 nodes, 30 pods built in {:?}", build.elapsed());
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let start = Instant::now();
        let m = lab.probe_matrix(&refs, protocol, 80, DEFAULT_PROBE_TIMEOUT).unwrap();
        eprintln!("30x30 {protocol}/80: {:?}", start.elapsed());
        assert_all(&m, &refs, true, "scale");
    }
    let start = Instant::now();
    drop(lab);
    eprintln!("teardown: {:?}", start.elapsed());
}
