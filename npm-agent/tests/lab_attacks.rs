//! A hostile pod, in the lab, against each dataplane: real agents on a two-node lab, real
//! packets forged with scapy (Debian's python3-scapy) from a pod's network namespace, real
//! sockets, and what arrives observed by a packet socket in the target pod's namespace.
//!
//! The pods (namespace x, all serving TCP and UDP on 80), by node:
//! - node 0: a (sends nothing: egress denied), e (admits only c, by a pod selector), g (no
//!   policy), h (no policy)
//! - node 1: c (admitted by e and f), f (admits only c, by c's address as an ipBlock on port
//!   80: in iptables mode, through its group's set of blocks and ports), k (admits only c, by
//!   a ClusterNetworkPolicy's Admin Accept)
//!
//! Each attack is one the issue found working before its fix:
//! 1. conntrack poisoning: a forges e→a (and f→a) "replies", then connects from the planted
//!    tuple;
//! 2. forged sources: a sends as c (admitted by e and f) and as 10.9.9.9; a and f send as c
//!    to k, which a ClusterNetworkPolicy's Admin Accept admits c into (and Denies the rest);
//! 3. a new connection from a reused tuple after the policy stopped admitting it;
//! 4. IPv6 to an isolated pod (while IPv4 is refused), and forged IPv6 sources (another
//!    pod's address, link-local ones);
//! 5. the ICMP error of an allowed flow must arrive (an isolated pod's UDP to a closed port);
//! 6. INVALID packets (SYN+FIN, SYN+RST, FIN+PSH+URG, a UDP datagram with a bad checksum) from
//!    a pod no policy admits.
//!
//! Root only (network namespaces, eBPF, iptables) and python3-scapy; SKIPPED otherwise.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use npm_agent::lab::{LabCluster, LabOptions};
use npm_agent::model::ObjectKey;
use npm_agent::simulate::Enforcer;
use npm_agent::simulate::case::{ActionOutcome, Case, CaseCluster};

/// Debian's Python, which has scapy (another python3 may be first on PATH).
const PYTHON: &str = "/usr/bin/python3";

const CASE: &str = r#"
name: attacks
model:
  ip-families: [IPv4, IPv6]
  namespaces: [x]
  pods:
  - {namespace: x, pod: a, labels: {pod: a}, ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]}
  - {namespace: x, pod: c, labels: {pod: c}, ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]}
  - {namespace: x, pod: e, labels: {pod: e}, ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]}
  - {namespace: x, pod: f, labels: {pod: f}, ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]}
  - {namespace: x, pod: g, labels: {pod: g}, ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]}
  - {namespace: x, pod: k, labels: {pod: k}, ports: [{port: 80, protocol: TCP}]}
  - {namespace: x, pod: h, labels: {pod: h}, ports: [{port: 80, protocol: TCP}]}
steps:
- description: a sends nothing; e and f admit only c
  actions:
  - apply:
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: a-quiet, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
  - apply:
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: only-c, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: e}}
        ingress:
        - from: [{podSelector: {matchLabels: {pod: c}}}]
  - apply:
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: c-block, namespace: x}
      spec:
        podSelector: {matchLabels: {pod: f}}
        ingress:
        - from: [{ipBlock: {cidr: 10.240.0.11/32}}]
          ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]
  - apply:
      apiVersion: policy.networking.k8s.io/v1alpha2
      kind: ClusterNetworkPolicy
      metadata: {name: k-admits-only-c}
      spec:
        tier: Admin
        priority: 10
        subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: k}}}}
        ingress:
        - action: Accept
          from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: c}}}}]
        - action: Deny
          from: [{namespaces: {}}]
- description: e and f admit nobody
  actions:
  - delete-policy: {namespace: x, name: c-block}
  - apply:
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: only-c, namespace: x}
      spec:
        podSelector: {matchExpressions: [{key: pod, operator: In, values: [e, f]}]}
        policyTypes: [Ingress]
"#;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn scapy() -> bool {
    Command::new(PYTHON).args(["-c", "import scapy.all"]).output().is_ok_and(|o| o.status.success())
}

struct Attack {
    lab: LabCluster,
    cluster: CaseCluster,
    case: Case,
    dataplane: &'static str,
}

impl Attack {
    fn new(dataplane: &'static str) -> Option<Attack> {
        if !root() || !scapy() {
            println!("SKIPPED {dataplane} attacks: needs root and {PYTHON} with scapy");
            return None;
        }
        let mut opts = LabOptions::new(dataplane, 2);
        // NPM_LAB_AGENT runs the attacks against another build (an older one, to see them
        // succeed there).
        opts.agent = std::env::var_os("NPM_LAB_AGENT")
            .map_or_else(|| env!("CARGO_BIN_EXE_npm-agent").into(), std::path::PathBuf::from);
        let case: Case = serde_yaml_ng::from_str(CASE).unwrap();
        let cluster = CaseCluster::new(&case).unwrap();
        let mut lab = LabCluster::new(opts).expect("lab");
        lab.apply(&cluster, &cluster.initial_events()).unwrap();
        for (pod, node) in [("a", 0), ("c", 1), ("e", 0), ("f", 1), ("g", 0), ("k", 1), ("h", 0)] {
            assert_eq!(lab.node_of(&ObjectKey::new("x", pod)), Some(node), "placement of {pod}");
        }
        let mut a = Attack { lab, cluster, case, dataplane };
        a.step(0);
        Some(a)
    }

    fn step(&mut self, i: usize) {
        let mut events = Vec::new();
        for action in &self.case.steps[i].actions {
            match self.cluster.action(action).unwrap() {
                ActionOutcome::Events(e) => events.extend(e),
                ActionOutcome::Rejected(r) => panic!("{r}"),
            }
        }
        self.lab.apply(&self.cluster, &events).unwrap();
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.lab.lab().pod(&format!("x/{pod}")).expect("pod").ip.expect("an IPv4 address")
    }

    fn ip6(&self, pod: &str) -> std::net::Ipv6Addr {
        self.lab.lab().pod(&format!("x/{pod}")).expect("pod").ipv6.expect("an IPv6 address")
    }

    fn netns(&self, pod: &str) -> String {
        self.lab.lab().pod(&format!("x/{pod}")).expect("pod").netns.clone()
    }

    /// A command in a pod's network namespace.
    fn in_pod(&self, pod: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns(pod), program]);
        c
    }

    /// Runs a Python script in a pod's namespace; returns what it printed.
    fn python(&self, pod: &str, script: &str) -> String {
        let out = self.in_pod(pod, PYTHON).args(["-c", script]).output().expect("python");
        assert!(out.status.success(), "{pod}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends packets (scapy expressions) out of a pod's eth0 as frames to its gateway, as an
    /// attacker crafting frames would: the pod's own kernel neither routes nor checks them.
    fn forge(&self, pod: &str, packets: &[String]) {
        let script = format!(
            "from scapy.all import *\nconf.verb=0\nfor p in [{}]:\n    sendp(Ether(dst='{}')/p, iface='eth0')\n",
            packets.join(", "),
            npm_agent::lab::net::HOST_VETH_MAC,
        );
        self.python(pod, &script);
    }

    /// Starts watching what enters a pod (until [`Watcher::seen`], or `secs` at most).
    fn watch(&self, pod: &str, secs: f64) -> Watcher {
        let mut child = self
            .in_pod(pod, PYTHON)
            .args(["-c", SNIFFER, &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sniffer");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert_eq!(first.trim(), "ready", "the sniffer of {pod} did not start");
        Watcher { child, out }
    }

    /// Connects from `pod`'s port `sport` to `dst`:`port` (TCP), or sends a datagram and
    /// waits for its echo (UDP); whether it worked.
    fn connect(&self, pod: &str, dst: &str, port: u16, sport: u16, udp: bool) -> bool {
        let script = format!(
            r#"
import socket
s = socket.socket(socket.{family}, socket.{kind})
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", {sport}))
s.settimeout(1.5)
try:
    if {udp}:
        s.sendto(b"hello", ("{dst}", {port}))
        s.recvfrom(100)
    else:
        s.connect(("{dst}", {port}))
    print("ok")
except Exception as e:
    print("fail", e)
"#,
            family = if dst.contains(':') { "AF_INET6" } else { "AF_INET" },
            kind = if udp { "SOCK_DGRAM" } else { "SOCK_STREAM" },
            udp = if udp { "True" } else { "False" },
        );
        self.python(pod, &script).starts_with("ok")
    }
}

/// Prints one line per packet entering the pod's eth0: `4 src dst proto sport dport flags`
/// (IPv4) or `6 src dst nexthdr` (IPv6).
const SNIFFER: &str = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
end = time.time() + float(sys.argv[1])
print("ready", flush=True)
while time.time() < end:
    try:
        d, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    t = struct.unpack("!H", d[12:14])[0]
    if t == 0x0800:
        ihl = (d[14] & 15) * 4
        proto = d[23]
        l4 = 14 + ihl
        sp, dp = struct.unpack("!HH", d[l4:l4 + 4]) if proto in (6, 17) else (0, 0)
        flags = d[l4 + 13] if proto == 6 else 0
        print(4, socket.inet_ntoa(d[26:30]), socket.inet_ntoa(d[30:34]), proto, sp, dp, flags, flush=True)
    elif t == 0x86dd:
        print(6, socket.inet_ntop(socket.AF_INET6, d[22:38]), socket.inet_ntop(socket.AF_INET6, d[38:54]), d[20], flush=True)
"#;

struct Watcher {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Watcher {
    /// Ends the watch (after a moment for packets still on their way); every packet seen.
    fn seen(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let mut lines = Vec::new();
        let mut line = String::new();
        while self.out.read_line(&mut line).unwrap_or(0) > 0 {
            lines.push(line.trim().to_string());
            line.clear();
        }
        let _ = self.child.wait();
        lines
    }
}

/// Packets of `lines` from `src` to `dst` on destination port `dport`.
fn arrived(lines: &[String], src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            w.len() == 7
                && w[1] == src.to_string()
                && w[2] == dst.to_string()
                && w[5] == dport.to_string()
        })
        .cloned()
        .collect()
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: &str) -> String {
    format!(r#"IP(src="{src}",dst="{dst}")/TCP(sport={sport},dport={dport},flags="{flags}")"#)
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> String {
    format!(r#"IP(src="{src}",dst="{dst}")/UDP(sport={sport},dport={dport})/Raw(b"x"*8)"#)
}

#[test]
fn ebpf_resists_a_hostile_pod() {
    if let Some(a) = Attack::new("ebpf") {
        run_attacks(a);
    }
}

#[test]
fn iptables_resists_a_hostile_pod() {
    if let Some(a) = Attack::new("iptables") {
        run_attacks(a);
    }
}

fn run_attacks(mut t: Attack) {
    let dp = t.dataplane;
    // Every breach is collected, so that one run reports them all (see NPM_LAB_AGENT).
    let mut breaches: Vec<String> = Vec::new();
    macro_rules! expect {
        ($ok:expr, $($what:tt)+) => {
            if !$ok {
                breaches.push(format!($($what)+));
            }
        };
    }
    let (a, c, e, f, g) = (t.ip("a"), t.ip("c"), t.ip("e"), t.ip("f"), t.ip("g"));
    assert_eq!(c, Ipv4Addr::new(10, 240, 0, 11), "c-block names c's address");

    // The policies hold for honest packets: c reaches e and f, a and g do not.
    assert!(t.connect("c", &e.to_string(), 80, 41000, false), "{dp}: c -> e");
    assert!(t.connect("c", &f.to_string(), 80, 41001, false), "{dp}: c -> f");
    expect!(!t.connect("g", &e.to_string(), 80, 41002, false), "{dp}: g -> e");
    expect!(!t.connect("a", &g.to_string(), 80, 41003, false), "{dp}: a -> g (a sends nothing)");
    // Over IPv6 too.
    let (e6, g6) = (t.ip6("e").to_string(), t.ip6("g").to_string());
    let c_e = (0..5).any(|i| t.connect("c", &e6, 80, 41100 + i, false));
    assert!(c_e, "{dp}: c -> e over IPv6 (a pod selector admits both families)");
    expect!(!t.connect("g", &e6, 80, 41110, false), "{dp}: g -> e over IPv6");
    expect!(!t.connect("a", &g6, 80, 41111, false), "{dp}: a -> g over IPv6 (a sends nothing)");

    // 1. Conntrack poisoning: a plants "replies" from e:80 and f:80 to a:4444 (TCP SYN and
    //    UDP), then connects from a:4444 to them.
    let planted: Vec<String> = [e, f]
        .iter()
        .flat_map(|s| [tcp(*s, a, 80, 4444, "S"), tcp(*s, a, 80, 4444, "SA"), udp(*s, a, 80, 4444)])
        .collect();
    t.forge("a", &planted);
    for target in [e, f] {
        expect!(
            !t.connect("a", &target.to_string(), 80, 4444, false),
            "{dp}: a:4444 -> {target}:80 TCP after poisoning"
        );
        expect!(
            !t.connect("a", &target.to_string(), 80, 4444, true),
            "{dp}: a:4444 -> {target}:80 UDP after poisoning"
        );
    }

    // 2. Forged sources: a (which may send nothing) as c, which e and f admit, and as any
    //    address towards g (no policy); g as c towards e.
    let watch_e = t.watch("e", 30.0);
    let watch_f = t.watch("f", 30.0);
    let watch_g = t.watch("g", 30.0);
    let outside = Ipv4Addr::new(10, 9, 9, 9);
    t.forge(
        "a",
        &[
            udp(c, e, 5000, 80),
            tcp(c, e, 5001, 80, "S"),
            udp(c, f, 5002, 80),
            tcp(c, f, 5003, 80, "S"),
        ],
    );
    t.forge("a", &[udp(outside, g, 5004, 80), tcp(outside, g, 5005, 80, "S")]);
    t.forge("g", &[udp(c, e, 5006, 80), tcp(c, e, 5007, 80, "S")]);
    // Honest packets from c, as a control that the watchers see what arrives.
    t.forge("c", &[udp(c, e, 5008, 80), udp(c, f, 5009, 80)]);
    let (seen_e, seen_f, seen_g) = (watch_e.seen(), watch_f.seen(), watch_g.seen());
    // The honest datagrams arrive (the watchers work), the forged ones do not.
    let (to_e, to_f) = (arrived(&seen_e, c, e, 80), arrived(&seen_f, c, f, 80));
    assert!(
        to_e.iter().any(|l| l.contains(" 5008 ")),
        "{dp}: the honest datagram to e: {seen_e:?}"
    );
    assert!(
        to_f.iter().any(|l| l.contains(" 5009 ")),
        "{dp}: the honest datagram to f: {seen_f:?}"
    );
    expect!(to_e.len() == 1, "{dp}: e received forged packets: {to_e:?}");
    expect!(to_f.len() == 1, "{dp}: f received forged packets: {to_f:?}");
    expect!(
        arrived(&seen_g, outside, g, 80).is_empty(),
        "{dp}: g received forged packets: {seen_g:?}"
    );

    // 2b. The same under a ClusterNetworkPolicy: k admits only c, by an Admin Accept (every
    //     other pod Denied). a (another node) and f (c's node) forge c's address towards k.
    let k = t.ip("k");
    assert!(t.connect("c", &k.to_string(), 80, 41004, false), "{dp}: c -> k (Admin Accept)");
    expect!(!t.connect("g", &k.to_string(), 80, 41005, false), "{dp}: g -> k (Admin Deny)");
    let watch_k = t.watch("k", 30.0);
    t.forge("a", &[tcp(c, k, 5010, 80, "S"), udp(c, k, 5011, 80)]);
    t.forge("f", &[tcp(c, k, 5012, 80, "S"), udp(c, k, 5013, 80)]);
    t.forge("c", &[udp(c, k, 5014, 80)]);
    let seen_k = watch_k.seen();
    let to_k = arrived(&seen_k, c, k, 80);
    assert!(
        to_k.iter().any(|l| l.contains(" 5014 ")),
        "{dp}: the honest datagram to k: {seen_k:?}"
    );
    let forged: Vec<&String> = to_k.iter().filter(|l| !l.contains(" 5014 ")).collect();
    expect!(forged.is_empty(), "{dp}: k received packets forged as c (Admin Accept): {forged:?}");

    // 2c. IPv6 (every pod is dual stack): a, g and f (c's node) forge c's IPv6 address
    //     towards e, which admits c; a and g send from link-local sources. Nothing reaches e
    //     but c's honest datagram.
    let (e6, c6, g6) = (t.ip6("e"), t.ip6("c"), t.ip6("g"));
    let watch_e6 = t.watch("e", 30.0);
    t.forge(
        "a",
        &[
            format!(r#"IPv6(src="{c6}",dst="{e6}")/TCP(sport=5020,dport=80,flags="S")"#),
            format!(r#"IPv6(src="fe80::c",dst="{e6}")/UDP(sport=5021,dport=80)/Raw(b"x"*8)"#),
        ],
    );
    // g and f send nothing a policy of theirs refuses: only the source check stands between
    // their forgeries of c's IPv6 address (which e admits) and e.
    t.forge(
        "g",
        &[
            format!(r#"IPv6(src="{c6}",dst="{e6}")/TCP(sport=5024,dport=80,flags="S")"#),
            format!(r#"IPv6(src="fe80::9",dst="{e6}")/TCP(sport=5022,dport=80,flags="S")"#),
            format!(r#"IPv6(src="{g6}",dst="{e6}")/UDP(sport=5023,dport=80)/Raw(b"x"*8)"#),
        ],
    );
    t.forge("f", &[format!(r#"IPv6(src="{c6}",dst="{e6}")/UDP(sport=5025,dport=80)/Raw(b"x"*8)"#)]);
    // c's honest datagram (admitted over IPv6), so the watch is seen to work.
    let honest = 1u8;
    t.forge("c", &[format!(r#"IPv6(src="{c6}",dst="{e6}")/UDP(sport=5026,dport=80)/Raw(b"x"*8)"#)]);
    let seen_e6 = watch_e6.seen();
    let reached: Vec<&String> = seen_e6
        .iter()
        .filter(|l| l.starts_with("6 ") && l.split(' ').nth(2) == Some(&e6.to_string()))
        .filter(|l| l.split(' ').nth(3) != Some("58")) // (neighbour discovery from the node)
        .collect();
    let from_c = reached.iter().filter(|l| l.split(' ').nth(1) == Some(&c6.to_string())).count();
    assert!(from_c >= usize::from(honest), "{dp}: c's honest IPv6 datagram to e: {seen_e6:?}");
    expect!(
        reached.len() == usize::from(honest),
        "{dp}: forged or denied IPv6 reached e: {reached:?}"
    );

    // 3. A reused tuple: c's connection from port 6000 works; the policy stops admitting c;
    //    the same tuple does not connect again.
    assert!(t.connect("c", &e.to_string(), 80, 6000, false), "{dp}: c:6000 -> e");
    t.step(1);
    expect!(
        !t.connect("c", &e.to_string(), 80, 6000, false),
        "{dp}: c:6000 -> e after the policy changed"
    );
    expect!(
        !t.connect("c", &f.to_string(), 80, 41001, false),
        "{dp}: c:41001 -> f after the policy changed"
    );

    // 4. IPv6: g reaches h (no policy) over IPv6, not e (isolated, by now admitting nobody).
    let h6 = t.ip6("h");
    // (Neighbour discovery may take a moment on fresh interfaces.)
    let to_h = (0..5).any(|i| t.connect("g", &h6.to_string(), 80, 42000 + i, false));
    assert!(to_h, "{dp}: IPv6 between pods without policy must work (the test's own check)");
    expect!(
        !t.connect("g", &e6.to_string(), 80, 42010, false),
        "{dp}: IPv6 reached a pod isolated for ingress"
    );

    // 5. An ICMP error of an allowed flow: e (isolated for ingress) sends UDP to a closed port
    //    of g; the port unreachable must come back (a connected socket sees it).
    let refused = t.python(
        "e",
        &format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1.5)\ns.connect(('{g}',9))\ns.send(b'x')\ntry:\n    s.recv(10)\n    print('answered')\nexcept ConnectionRefusedError:\n    print('refused')\nexcept Exception as e:\n    print('nothing', e)\n"),
    );
    expect!(refused.trim() == "refused", "{dp}: the ICMP error of e's flow: {refused}");

    // 6. INVALID: from g, which no policy admits into e: flag combinations no connection has,
    //    and a UDP datagram with a bad checksum.
    let watch = t.watch("e", 30.0);
    t.forge(
        "g",
        &[
            tcp(g, e, 7000, 80, "SF"),
            tcp(g, e, 7001, 80, "SR"),
            tcp(g, e, 7002, 80, "FPU"),
            format!(
                r#"IP(src="{g}",dst="{e}")/UDP(sport=7003,dport=80,chksum=0x1234)/Raw(b"x"*8)"#
            ),
        ],
    );
    let seen = watch.seen();
    expect!(arrived(&seen, g, e, 80).is_empty(), "{dp}: INVALID packets reached e: {seen:?}");
    t.lab.shutdown().expect("shutdown");
    assert!(breaches.is_empty(), "{} breaches:\n{}", breaches.len(), breaches.join("\n"));
}
