//! The agent driven by the file source: the run loop through the library (with an in-memory
//! dataplane whose plan the tests read), the `npm-agent run` command (status file, config
//! file, signals), and, as root, the eBPF dataplane in a throw-away network namespace and pin
//! root, with `npm-agent cleanup`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use npm_agent::agent::{
    Agent, Config, DataplaneKind, Handles, Operation, Settings, SharedMemory, Status,
};
use npm_agent::model::{Direction, ObjectKey, PortSpec, Protocol};
use npm_agent::plan::{Connection, Plan};
use npm_agent::source::{FilesSource, Source, SourceSpec};
use npm_agent::source::{Object, ObjectId};

const BIN: &str = env!("CARGO_BIN_EXE_npm-agent");

const A: [u8; 4] = [10, 0, 0, 1]; // x/a on n1, app=web
const B: [u8; 4] = [10, 0, 0, 2]; // x/b on n1, app=db
const C: [u8; 4] = [10, 0, 1, 3]; // y/c on n2, app=web

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn tcp(src: [u8; 4], dst: [u8; 4], port: u16) -> Connection {
    Connection { src: ip(src), dst: ip(dst), protocol: Protocol::Tcp, port }
}

/// A temporary manifest directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("npm-agent-files-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// Writes a file atomically (a hidden temporary file, then a rename), as the lab does.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.0.join(name)).unwrap();
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(name)).unwrap();
    }

    fn generation(&self, g: u64) {
        self.write(".generation", &format!("{g}\n"));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {team: a}
---
apiVersion: v1
kind: Namespace
metadata:
  name: y
";

fn pod(ns: &str, name: &str, ip: [u8; 4], node: &str, app: &str) -> String {
    let [a, b, c, d] = ip;
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: agnhost
    ports: [{{name: pg, containerPort: 5432}}]
status:
  phase: Running
  podIP: {a}.{b}.{c}.{d}
"
    )
}

/// The pods as a `kind: List` (plus the node, and a kind the source ignores).
fn pods() -> String {
    let items: Vec<String> = [
        pod("x", "a", A, "n1", "web"),
        pod("x", "b", B, "n1", "db"),
        pod("y", "c", C, "n2", "web"),
    ]
    .iter()
    .map(|p| {
        let mut lines = p.lines();
        let first = format!("- {}", lines.next().unwrap());
        std::iter::once(first).chain(lines.map(|l| format!("  {l}"))).collect::<Vec<_>>().join("\n")
    })
    .collect();
    format!(
        "apiVersion: v1
kind: List
items:
{}
- apiVersion: v1
  kind: Node
  metadata: {{name: n1}}
  status:
    addresses: [{{type: InternalIP, address: 10.1.0.1}}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {{name: ignored, namespace: x}}
",
        items.join("\n")
    )
}

/// x/db admits ingress from pods labelled app=web in namespaces with team=a, on `port`.
fn policy(port: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: db, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{team: a}}}}
      podSelector: {{matchLabels: {{app: web}}}}
    ports:
    - {{protocol: TCP, port: {port}}}
"
    )
}

fn write_cluster(dir: &Dir) {
    dir.write("00-namespaces.yaml", NAMESPACES);
    dir.write("10-pods.yml", &pods());
    dir.write("20-policy.yaml", &policy("5432"));
}

/// The agent on a thread, with an in-memory dataplane.
struct Running {
    handles: Handles,
    memory: SharedMemory,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn start(dir: &Dir, status_file: Option<PathBuf>) -> Running {
        let memory = SharedMemory::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, s, d) = (memory.clone(), stop.clone(), dir.0.clone());
        let thread = std::thread::spawn(move || {
            let mut agent =
                Agent::new("n1", Box::new(FilesSource::new(d)), Box::new(m), status_file);
            tx.send(agent.handles()).unwrap();
            agent.run(&s)
        });
        let handles = rx.recv().unwrap();
        Running { handles, memory, stop, thread: Some(thread) }
    }

    /// Waits until the agent reports generation `g` (ready and in sync).
    fn wait_generation(&self, g: u64) -> Status {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.handles.status();
            if s.ready && s.in_sync && s.generation >= g {
                return s;
            }
            assert!(Instant::now() < deadline, "generation {g} not reached: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the in-memory plan satisfies `f`; returns how long that took.
    fn wait_plan(&self, what: &str, f: impl Fn(&Plan) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if f(&self.memory.plan()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: not reached; status {:?}",
                self.handles.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn allowed(&self, conn: &Connection) -> bool {
        let p = self.memory.plan();
        npm_agent::plan::connection_allowed(&p, &p, conn)
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn applies_the_manifests_of_a_directory() {
    let dir = Dir::new("applies");
    write_cluster(&dir);
    dir.generation(1);
    let status_file = dir.0.with_extension("status.json");
    let agent = Running::start(&dir, Some(status_file.clone()));
    let s = agent.wait_generation(1);
    assert_eq!((s.pods, s.policies, s.endpoints), (3, 1, 2), "{s:?}");
    assert_eq!(s.applied_events, 7, "2 namespaces, 1 node, 1 policy, 3 pods: {s:?}");
    assert!(s.problems.is_empty(), "{s:?}");

    let plan = agent.memory.plan();
    let mut local: Vec<IpAddr> = plan.endpoints.keys().copied().collect();
    local.sort();
    assert_eq!(local, vec![ip(A), ip(B)], "only n1's pods are endpoints");
    assert!(plan.endpoints[&ip(B)].isolated(Direction::Ingress));
    assert!(!plan.endpoints[&ip(A)].isolated(Direction::Ingress));
    assert!(plan.node_ips.contains(&"10.1.0.1".parse().unwrap()));
    assert!(agent.allowed(&tcp(A, B, 5432)));
    assert!(!agent.allowed(&tcp(A, B, 80)));
    assert!(!agent.allowed(&tcp(C, B, 5432)), "y has no team=a label");

    // The status file says the same (it is written just after the in-memory status).
    let file = Status::wait_for_generation(&status_file, 1, Duration::from_secs(10)).unwrap();
    assert!(file.ready && file.generation == 1 && file.applied_events == 7, "{file:?}");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&status_file).unwrap()).unwrap();
    assert_eq!(raw["ready"], true);
    assert_eq!(raw["generation"], 1);
    assert_eq!(raw["applied_events"], 7);

    // Per kind and operation statistics.
    {
        let st = agent.handles.stats.lock().unwrap();
        assert_eq!(st.get("pod", Operation::Create).map(|s| s.count), Some(3));
        assert_eq!(st.get("namespace", Operation::Create).map(|s| s.count), Some(2));
        assert_eq!(st.reconciles, 1);
    }

    // Labelling y team=a is an update that admits y/c.
    dir.write(
        "00-namespaces.yaml",
        &NAMESPACES.replace("  name: y\n", "  name: y\n  labels: {team: a}\n"),
    );
    dir.generation(2);
    agent.wait_generation(2);
    assert!(agent.allowed(&tcp(C, B, 5432)));
    assert_eq!(
        agent.handles.stats.lock().unwrap().get("namespace", Operation::Update).map(|s| s.count),
        Some(1)
    );

    // Removing the policy file deletes the policy: x/b is no longer isolated.
    dir.remove("20-policy.yaml");
    dir.generation(3);
    let s = agent.wait_generation(3);
    assert_eq!(s.policies, 0);
    assert!(!agent.memory.plan().endpoints[&ip(B)].isolated(Direction::Ingress));
    assert_eq!(
        agent.handles.stats.lock().unwrap().get("policy", Operation::Delete).map(|s| s.count),
        Some(1)
    );
    agent.stop();
    let _ = std::fs::remove_file(status_file);
}

/// A pod on another node claiming x/b's address (its key sorts before x/b's) neither takes
/// x/b's endpoint nor its protection: x/b stays isolated and keeps its own policy; as a peer
/// the contested address is nobody's; the conflict is in the status, the metrics and the log.
#[test]
fn a_pod_claiming_a_local_pods_address_takes_nothing() {
    let dir = Dir::new("claim");
    write_cluster(&dir);
    dir.generation(1);
    let agent = Running::start(&dir, None);
    agent.wait_generation(1);
    assert!(agent.memory.plan().endpoints[&ip(B)].isolated(Direction::Ingress));
    // x/0evil on n2 (not isolated, labelled web) claims x/b's address.
    dir.write("30-evil.yaml", &pod("x", "0evil", B, "n2", "web"));
    dir.generation(2);
    let s = agent.wait_generation(2);
    let plan = agent.memory.plan();
    let ep = &plan.endpoints[&ip(B)];
    assert_eq!(ep.pod.to_string(), "x/b", "the local pod keeps its address");
    assert!(ep.isolated(Direction::Ingress), "x/b is still isolated");
    assert!(!agent.allowed(&tcp(A, B, 80)), "x/b's policy still holds");
    assert!(agent.allowed(&tcp(A, B, 5432)));
    assert!(
        s.problems
            .iter()
            .any(|p| p.contains("10.0.0.2") && p.contains("x/0evil") && p.contains("x/b")),
        "{:?}",
        s.problems
    );
    let metrics = agent.handles.metrics.render_node();
    assert!(metrics.contains("npm_pod_address_conflicts 1"), "{metrics}");
    // The impostor gone, nothing is left of the conflict.
    dir.remove("30-evil.yaml");
    dir.generation(3);
    let s = agent.wait_generation(3);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert!(agent.handles.metrics.render_node().contains("npm_pod_address_conflicts 0"));
    agent.stop();
}

/// A ClusterNetworkPolicy manifest is read, validated and enforced (the in-memory dataplane
/// renders tiers, as the eBPF one does), counted per tier; deleting it lifts it.
#[test]
fn a_cluster_network_policy_manifest_is_enforced() {
    let dir = Dir::new("cnp");
    write_cluster(&dir);
    dir.generation(1);
    let agent = Running::start(&dir, None);
    agent.wait_generation(1);
    assert!(agent.allowed(&tcp(A, B, 5432)));
    // Admin: x's pods may not reach x/b's 5432, whatever x's NetworkPolicy says.
    dir.write(
        "30-cnp.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-db}\nspec:\n  tier: Admin\n  priority: 1\n  subject:\n    pods:\n      namespaceSelector: {}\n      podSelector: {matchLabels: {app: db}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {matchLabels: {team: a}}}]\n",
    );
    dir.generation(3);
    let s = agent.wait_generation(3);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    assert!(!agent.allowed(&tcp(A, B, 5432)), "the admin tier denies it");
    let metrics = agent.handles.metrics.render_node();
    assert!(metrics.contains("npm_cluster_network_policies{tier=\"admin\"} 1"), "{metrics}");
    assert!(metrics.contains("npm_cluster_network_policies_unenforced{tier=\"admin\"} 0"));
    // An invalid version (a domainNames peer) is reported and the valid one stays in force.
    dir.write(
        "30-cnp.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: no-db}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  egress:\n  - action: Accept\n    to: [{domainNames: [example.com]}]\n",
    );
    dir.generation(4);
    let s = agent.wait_generation(4);
    assert!(
        s.problems.iter().any(|p| p.contains("no-db") && p.contains("domainNames")),
        "{:?}",
        s.problems
    );
    assert!(!agent.allowed(&tcp(A, B, 5432)), "the previous version holds");
    dir.remove("30-cnp.yaml");
    dir.generation(5);
    agent.wait_generation(5);
    assert!(agent.allowed(&tcp(A, B, 5432)));
    assert!(
        agent
            .handles
            .metrics
            .render_node()
            .contains("npm_cluster_network_policies{tier=\"admin\"} 0")
    );
    agent.stop();
}

/// What a dataplane does not enforce is reported (here the in-memory one, which, like iptables, does not enforce IPv6): a local pod with an IPv6 address and a policy with an IPv6
/// ipBlock are reported (status problems), and no longer once they are gone.
#[test]
fn what_is_not_enforced_is_reported() {
    let dir = Dir::new("ipv6");
    write_cluster(&dir);
    dir.write(
        "30-dual.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: d, namespace: x, labels: {app: db}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {phase: Running, podIP: 10.0.0.9, podIPs: [{ip: 10.0.0.9}, {ip: 'fd00::9'}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: v6, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00::/64'}}]\n",
    );
    dir.generation(1);
    let agent = Running::start(&dir, None);
    let s = agent.wait_generation(1);
    assert!(
        s.problems.iter().any(|p| p.contains("pod x/d") && p.contains("fd00::9")),
        "{:?}",
        s.problems
    );
    assert!(
        s.problems.iter().any(|p| p.contains("x/v6") && p.contains("spec.ingress[0]: fd00::/64")),
        "{:?}",
        s.problems
    );
    // A pod with only an IPv6 address is not isolated at all (the dataplanes find a pod by its
    // IPv4 address), and the report says so rather than that its IPv6 is dropped.
    dir.write(
        "31-v6-only.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: s, namespace: x, labels: {app: db}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {phase: Running, podIP: 'fd00::5', podIPs: [{ip: 'fd00::5'}]}\n",
    );
    dir.generation(2);
    let s = agent.wait_generation(2);
    assert!(
        s.problems.iter().any(|p| p.contains("pod x/s has only the IPv6 address fd00::5")
            && p.contains("NetworkPolicies do not isolate it")),
        "{:?}",
        s.problems
    );
    dir.remove("31-v6-only.yaml");
    dir.remove("30-dual.yaml");
    dir.generation(3);
    let s = agent.wait_generation(3);
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    agent.stop();
}

#[test]
fn a_changed_manifest_is_picked_up_within_a_second() {
    let dir = Dir::new("changed");
    write_cluster(&dir);
    let agent = Running::start(&dir, None);
    agent.wait_generation(0);
    assert!(agent.allowed(&tcp(A, B, 5432)));
    for (round, port) in [(1, 6543u16), (2, 7000), (3, 5432)] {
        dir.write("20-policy.yaml", &policy(&port.to_string()));
        let took = agent.wait_plan(&format!("round {round}: port {port}"), |p| {
            let c = tcp(A, B, port);
            npm_agent::plan::connection_allowed(p, p, &c)
        });
        assert!(took < Duration::from_secs(1), "round {round}: took {took:?}");
    }
    // A new pod in a new file.
    dir.write(
        "30-more.json",
        &serde_json::to_string(
            &serde_yaml_ng::from_str::<serde_json::Value>(&pod(
                "x",
                "d",
                [10, 0, 0, 4],
                "n1",
                "web",
            ))
            .unwrap(),
        )
        .unwrap(),
    );
    let took = agent.wait_plan("pod d", |p| p.endpoints.contains_key(&ip([10, 0, 0, 4])));
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(agent.allowed(&tcp([10, 0, 0, 4], B, 5432)));
    agent.stop();
}

#[test]
fn malformed_and_invalid_manifests_are_reported_and_the_old_version_kept() {
    let dir = Dir::new("malformed");
    write_cluster(&dir);
    dir.generation(1);
    let agent = Running::start(&dir, None);
    agent.wait_generation(1);
    let before = agent.memory.plan();

    // A file that does not parse, an invalid new version of the policy (a bad CIDR), and a
    // policy that was never valid.
    dir.write("05-broken.yaml", "kind: [unclosed\n");
    dir.write(
        "20-policy.yaml",
        &policy("5432").replace("    ports:\n", "    - ipBlock: {cidr: 10.0.0.0/33}\n    ports:\n"),
    );
    dir.write(
        "21-never.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: never, namespace: x}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{protocol: ICMP, port: 1}]\n",
    );
    dir.generation(2);
    let s = agent.wait_generation(2);
    assert_eq!(s.parse_errors, 1, "{s:?}");
    assert_eq!(s.invalid_objects, 2, "{s:?}");
    let all = s.problems.join("\n");
    assert!(all.contains("05-broken.yaml") && all.contains("does not parse"), "{all}");
    assert!(
        all.contains("20-policy.yaml")
            && all.contains("x/db")
            && all.contains("ipBlock.cidr")
            && all.contains("previous version kept"),
        "{all}"
    );
    assert!(
        all.contains("21-never.yaml")
            && all.contains("x/never")
            && all.contains("protocol")
            && all.contains("not applied"),
        "{all}"
    );
    assert_eq!(
        agent.memory.plan(),
        before,
        "the previous valid policy stays in force; the invalid one is not applied"
    );

    // A file that parsed before and now does not keeps its objects.
    dir.write("10-pods.yml", "items: [\n");
    dir.generation(3);
    let s = agent.wait_generation(3);
    assert_eq!(s.parse_errors, 2, "{s:?}");
    assert_eq!(s.pods, 3);
    assert_eq!(agent.memory.plan(), before);

    // The agent goes on: fixing the files applies them.
    dir.write("20-policy.yaml", &policy("6543"));
    dir.write("10-pods.yml", &pods());
    dir.remove("05-broken.yaml");
    dir.remove("21-never.yaml");
    dir.generation(4);
    let s = agent.wait_generation(4);
    assert!(s.problems.is_empty(), "{s:?}");
    assert!(agent.allowed(&tcp(A, B, 6543)) && !agent.allowed(&tcp(A, B, 5432)));
    agent.stop();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
}

/// The policy x/db's ports, as the source holds it.
fn db_ports(source: &FilesSource) -> Vec<PortSpec> {
    match source.objects().get(&ObjectId::Policy(ObjectKey::new("x", "db"))) {
        Some(Object::Policy(p)) => {
            p.rules(Direction::Ingress).unwrap().iter().flat_map(|r| r.ports.clone()).collect()
        }
        other => panic!("x/db: {other:?}"),
    }
}

#[test]
fn a_fifo_swapped_in_for_a_manifest_is_reported_and_never_blocks_the_scan() {
    // The attack: a manifest is replaced by a FIFO between the scan's stat (a regular file)
    // and its open. Opening a FIFO for reading waits for a writer, so a plain open blocked
    // the source for good (the loop stopped: /healthz 503, no edit applied). The source
    // scans as fast as it can on a thread while the file flips between a regular file and
    // a FIFO thousands of times, so the swap lands between the stat and the open.
    let dir = Dir::new("fifo");
    write_cluster(&dir);
    dir.write("30-swapped.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n");
    let stop = Arc::new(AtomicBool::new(false));
    let scans = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let scanner = {
        let (stop, scans, d) = (stop.clone(), scans.clone(), dir.0.clone());
        std::thread::spawn(move || {
            let mut source = FilesSource::with_interval(d, Duration::ZERO);
            while !stop.load(Ordering::SeqCst) {
                source.scan().unwrap();
                scans.fetch_add(1, Ordering::SeqCst);
            }
            source
        })
    };
    let (regular, fifo, target) =
        (dir.path(".regular.tmp"), dir.path(".fifo.tmp"), dir.path("30-swapped.yaml"));
    let start = Instant::now();
    let mut last = (0, Instant::now());
    let mut edited = false;
    while start.elapsed() < Duration::from_secs(3) {
        std::fs::write(&regular, "apiVersion: v1\nkind: Namespace\nmetadata: {name: z}\n").unwrap();
        std::fs::rename(&regular, &target).unwrap();
        mkfifo(&fifo);
        std::fs::rename(&fifo, &target).unwrap();
        let n = scans.load(Ordering::SeqCst);
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(last.1.elapsed() < Duration::from_secs(2), "the scan is blocked (after {n} scans)");
        if !edited && start.elapsed() > Duration::from_secs(1) {
            // Other manifests keep applying meanwhile.
            dir.write("20-policy.yaml", &policy("6543"));
            edited = true;
        }
    }
    // The FIFO stays; a few more scans see it.
    let n = scans.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(2);
    while scans.load(Ordering::SeqCst) < n + 10 {
        assert!(Instant::now() < deadline, "the scan is blocked");
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::SeqCst);
    let source = scanner.join().unwrap();
    assert!(scans.load(Ordering::SeqCst) > 100, "scans: {}", scans.load(Ordering::SeqCst));
    let health = source.health();
    let all = health.problems.join("\n");
    assert!(
        all.contains("30-swapped.yaml") && all.contains("not a regular file (a FIFO)"),
        "{all}"
    );
    assert!(health.parse_errors > 0);
    assert_eq!(
        db_ports(&source),
        vec![PortSpec::Range { protocol: Protocol::Tcp, first: 6543, last: 6543 }]
    );
    assert!(
        source.objects().contains_key(&ObjectId::Namespace("z".into())),
        "the last good read of the file stays in force"
    );
    assert!(source.objects().contains_key(&ObjectId::Pod(ObjectKey::new("x", "a"))));
}

/// Log lines written through a subscriber scoped to one thread.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn lines(&self, level: &str, words: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(level) && l.contains(words))
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn a_symlink_loop_is_logged_once_not_at_every_scan() {
    // The attack: a symbolic link loop in the manifest directory. Stat fails with ELOOP at
    // every scan (five a second), and every failure was logged: a log flood for as long as
    // the link stayed. Now: one warning when it appears, one line when it clears.
    let dir = Dir::new("symlink-loop");
    write_cluster(&dir);
    std::os::unix::fs::symlink("loop.yaml", dir.path("loop.yaml")).unwrap();
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let mut source = FilesSource::new(&dir.0);
        // The source as the agent runs it: a scan every 200 ms.
        let run = |source: &mut FilesSource, for_: Duration| {
            let start = Instant::now();
            while start.elapsed() < for_ {
                source.next_batch(Duration::from_millis(100)).unwrap();
            }
        };
        run(&mut source, Duration::from_secs(3));
        let warnings = logs.lines("WARN", "loop.yaml");
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(warnings[0].contains("cannot stat manifest"), "{warnings:#?}");
        let problems = source.health().problems;
        assert!(
            problems.iter().any(|p| p.contains("loop.yaml: cannot stat manifest")),
            "{problems:?}"
        );
        assert!(
            source.objects().contains_key(&ObjectId::Policy(ObjectKey::new("x", "db"))),
            "the rest applies"
        );

        // Gone: one line says so, and nothing more is logged about it.
        std::fs::remove_file(dir.path("loop.yaml")).unwrap();
        run(&mut source, Duration::from_secs(1));
        assert_eq!(logs.lines("INFO", "loop.yaml").len(), 1, "{:#?}", logs.lines("", "loop.yaml"));
        assert_eq!(logs.lines("WARN", "loop.yaml").len(), 1);
        assert!(source.health().problems.is_empty(), "{:?}", source.health().problems);

        // An object defined in two files stands until one changes: logged once, however many
        // other files change meanwhile.
        dir.write("40-dup.yaml", NAMESPACES);
        run(&mut source, Duration::from_millis(500));
        for port in ["6001", "6002", "6003"] {
            dir.write("20-policy.yaml", &policy(port));
            run(&mut source, Duration::from_millis(500));
        }
        assert_eq!(
            db_ports(&source),
            vec![PortSpec::Range { protocol: Protocol::Tcp, first: 6003, last: 6003 }]
        );
        assert_eq!(
            logs.lines("WARN", "is also defined in").len(),
            2,
            "x and y: {:#?}",
            logs.lines("WARN", "also defined")
        );
        dir.remove("40-dup.yaml");
        run(&mut source, Duration::from_millis(500));
        assert_eq!(
            logs.lines("INFO", "cleared")
                .iter()
                .filter(|l| l.contains("is also defined in"))
                .count(),
            2
        );
    });
}

#[test]
fn readiness_waits_for_the_directory() {
    // The directory appears only after the agent started: not ready (nothing applied) until
    // the first full sync.
    let dir = Dir::new("late");
    std::fs::remove_dir(&dir.0).unwrap();
    let agent = Running::start(&dir, None);
    std::thread::sleep(Duration::from_millis(500));
    let s = agent.handles.status();
    assert!(!s.ready && s.applied_events == 0, "{s:?}");
    std::fs::create_dir_all(&dir.0).unwrap();
    write_cluster(&dir);
    dir.generation(5);
    let s = agent.wait_generation(5);
    assert_eq!(s.endpoints, 2);
    agent.stop();
}

// ---- configuration ----

#[test]
fn config_file_keys_missing_keep_their_defaults_and_flags_win() {
    let dir = Dir::new("config");
    dir.write(
        "agent.yaml",
        "dataplane: memory\nlogDrops: true\nnode-name: from-file\nsource: files:/m\n",
    );
    let flags = Settings { node_name: Some("from-flag".into()), ..Settings::default() };
    let c = Config::load(Some(&dir.path("agent.yaml")), flags).unwrap();
    assert_eq!(c.dataplane, DataplaneKind::Memory);
    assert!(c.log_drops);
    assert_eq!(c.node_name, "from-flag");
    assert_eq!(c.source, SourceSpec::Files("/m".into()));
    // Left out: defaults, not false or empty.
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:10091");
    assert_eq!(c.pin_root, PathBuf::from("/sys/fs/bpf/npm-rs"));
    assert!(c.advanced_metrics);
    assert_eq!(c.status_file, None);
}

/// A migrating cluster's kept ConfigMap: Azure NPM's `azure-npm.json` where the agent's file
/// is expected (alone, or beside the agent's, which wins).
#[test]
fn azure_npm_config_map_is_read_and_what_does_not_apply_is_named() {
    let dir = Dir::new("azure-config");
    dir.write(
        "azure-npm.json",
        r#"{"ListeningPort": 10095, "ResyncPeriodInMinutes": 15, "LogLevel": "debug",
            "Toggles": {"EnablePprof": true, "EnablePrometheusMetrics": true}}"#,
    );
    let flags = || Settings { node_name: Some("n1".into()), ..Settings::default() };
    let c = Config::load(Some(&dir.path("npm-agent.yaml")), flags()).unwrap();
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:10095");
    assert_eq!(c.log_level.as_deref(), Some("debug"));
    for k in ["npm-agent.yaml is missing", "ResyncPeriodInMinutes", "Toggles.EnablePprof"] {
        assert!(c.warnings.iter().any(|w| w.contains(k)), "{k}: {:?}", c.warnings);
    }
    assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
    // Both files: the agent's own settings win, Azure NPM's fill in the rest.
    dir.write("npm-agent.yaml", "log-level: warn\ndataplane: memory\n");
    let c = Config::load(Some(&dir.path("npm-agent.yaml")), flags()).unwrap();
    assert_eq!(c.log_level.as_deref(), Some("warn"));
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:10095");
    assert_eq!(c.dataplane, DataplaneKind::Memory);
    // Given directly.
    let c = Config::load(Some(&dir.path("azure-npm.json")), flags()).unwrap();
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:10095");
    // A value of the wrong type is an error naming the setting.
    dir.write("azure-npm.json", r#"{"ListeningPort": "ten"}"#);
    let err = Config::load(Some(&dir.path("npm-agent.yaml")), flags()).unwrap_err();
    assert!(format!("{err:#}").contains("ListeningPort"), "{err:#}");
}

#[test]
fn config_file_with_an_unknown_key_is_rejected_naming_it() {
    let dir = Dir::new("unknown-key");
    dir.write("agent.yaml", "dataplane: memory\nenableV2NPM: true\n");
    let out = Command::new(BIN)
        .args(["run", "--node-name", "n1", "--source"])
        .arg(format!("files:{}", dir.0.display()))
        .arg("--config")
        .arg(dir.path("agent.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("enableV2NPM") && err.contains("unknown field") && err.contains("agent.yaml"),
        "{err}"
    );
}

#[test]
fn config_file_that_is_a_fifo_is_an_error_not_a_hang() {
    let dir = Dir::new("config-fifo");
    mkfifo(&dir.path("agent.yaml"));
    let mut child = Command::new(BIN)
        .args(["run", "--node-name", "n1", "--dataplane", "memory", "--source"])
        .arg(format!("files:{}", dir.0.display()))
        .arg("--config")
        .arg(dir.path("agent.yaml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("npm-agent run --config FIFO did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.yaml: not a regular file (a FIFO)"), "{err}");
}

#[test]
fn kube_source_without_a_cluster_exits_non_zero() {
    // Neither in a pod (no KUBERNETES_SERVICE_HOST) nor a kubeconfig that exists.
    let out = Command::new(BIN)
        .args(["run", "--node-name", "n1", "--dataplane", "memory", "--source", "kube"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", "/nonexistent/npm-agent-test-kubeconfig")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kube source: no in-cluster configuration and no usable kubeconfig"),
        "{err}"
    );
}

// ---- the command ----

struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(args: &[&str], extra: &[PathBuf], log: PathBuf) -> Process {
        let child = Command::new(BIN)
            .args(args)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Process { child, log }
    }

    fn wait_status(&mut self, status_file: &Path, g: u64) -> Status {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(code) = self.child.try_wait().unwrap() {
                panic!("agent exited ({code}): {}", self.log());
            }
            if let Ok(s) = Status::read(status_file)
                && s.ready
                && s.generation >= g
            {
                return s;
            }
            assert!(Instant::now() < deadline, "generation {g} not reached: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn run_command_reports_status_logs_problems_and_stops_on_sigterm() {
    let dir = Dir::new("command");
    write_cluster(&dir);
    dir.generation(1);
    let work = Dir::new("command-work");
    work.write("agent.yaml", "dataplane: memory\nnodeName: n1\n");
    let status = work.path("status.json");
    let source = format!("files:{}", dir.0.display());
    let mut p = Process::spawn(
        &["run", "--source", &source, "--config"],
        &[work.path("agent.yaml"), "--status-file".into(), status.clone()],
        std::env::temp_dir().join(format!("npm-agent-files-{}-command.log", std::process::id())),
    );
    p.wait_status(&status, 1);
    let s = Status::wait_for_generation(&status, 1, Duration::from_secs(10)).unwrap();
    assert_eq!(
        (s.node.as_str(), s.dataplane.as_str(), s.endpoints, s.policies),
        ("n1", "memory", 2, 1),
        "{s:?}"
    );

    dir.write("20-policy.yaml", &policy("bad_name!"));
    dir.generation(2);
    let s = p.wait_status(&status, 2);
    assert_eq!(s.invalid_objects, 1, "{s:?}");
    assert_eq!(s.policies, 1, "the previous version stays");
    let log = p.log();
    assert!(
        log.contains("20-policy.yaml")
            && log.contains("x/db")
            && log.contains("spec.ingress[0].ports[0].port"),
        "{log}"
    );

    let code = p.terminate();
    assert!(code.success(), "SIGTERM exits 0: {code:?}\n{}", p.log());
    assert!(p.log().contains("enforcement stays in place"));
}

// ---- eBPF (root) ----

fn root() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn ebpf_run_survives_restart_and_cleanup_removes_everything() {
    ebpf_round_trip("ebpf", false);
}

#[test]
fn ebpf_run_attaches_keeps_links_on_sigterm_and_cleanup_detaches() {
    ebpf_round_trip("ebpf-attach", true);
}

/// Two runs of `npm-agent run --dataplane ebpf` in a network namespace of their own and a
/// throw-away pin root (each becomes ready and stops on SIGTERM leaving the pins), then
/// `npm-agent cleanup`. With `attach`, x/b gets a host-side veth and /32 route in that
/// namespace, so the agent attaches there (and nowhere else).
fn ebpf_round_trip(test: &str, attach: bool) {
    if !root() || !Path::new("/sys/fs/bpf").exists() {
        println!("SKIPPED {test}: needs root and bpffs");
        return;
    }
    let pid = std::process::id();
    let ns = Netns(format!("npm-test-{test}-{pid}"));
    sh(&format!("ip netns add {}", ns.0));
    if attach {
        sh(&format!(
            "ip -n {0} link add h-b type veth peer name p-b && ip -n {0} link set h-b up && ip -n {0} link set p-b up \
             && ip -n {0} route add 10.0.0.2/32 dev h-b",
            ns.0
        ));
    }
    let pin_root = PathBuf::from(format!("/sys/fs/bpf/npm-test-{test}-{pid}"));
    struct RemovePins(PathBuf);
    impl Drop for RemovePins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _pins = RemovePins(pin_root.clone());

    let dir = Dir::new(test);
    write_cluster(&dir);
    dir.generation(1);
    let status = dir.0.with_extension("status.json");
    let source = format!("files:{}", dir.0.display());
    let netns = format!("/run/netns/{}", ns.0);
    let args = |_: ()| {
        vec![
            "run".to_string(),
            "--netns".into(),
            netns.clone(),
            "--source".into(),
            source.clone(),
            "--dataplane".into(),
            "ebpf".into(),
            "--node-name".into(),
            "n1".into(),
            "--pin-root".into(),
            pin_root.display().to_string(),
            "--status-file".into(),
            status.display().to_string(),
        ]
    };
    let log = std::env::temp_dir().join(format!("npm-agent-files-{pid}-{test}.log"));
    for round in 0..2 {
        let a = args(());
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let _ = std::fs::remove_file(&status);
        let mut p = Process::spawn(&refs, &[], log.clone());
        let s = p.wait_status(&status, 1);
        assert_eq!((s.dataplane.as_str(), s.endpoints), ("ebpf", 2), "round {round}: {s:?}");
        let links = || pin_root.join("links").read_dir().map(|d| d.count()).unwrap_or(0);
        assert_eq!(links(), if attach { 2 } else { 0 }, "round {round}: {}", p.log());
        let code = p.terminate();
        assert!(code.success(), "round {round}: {code:?}\n{}", p.log());
        // Enforcement stays: the pins are still there.
        assert_eq!(
            links(),
            if attach { 2 } else { 0 },
            "round {round}: links stay pinned after SIGTERM"
        );
        assert!(pin_root.join("maps").read_dir().unwrap().count() > 0);
    }

    let out = Command::new(BIN).args(["cleanup", "--pin-root"]).arg(&pin_root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = format!("removed {} pinned links", if attach { 2 } else { 0 });
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&want),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!pin_root.exists());
    let out = Command::new(BIN).args(["cleanup", "--pin-root"]).arg(&pin_root).output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing to remove")
    );
    // Refuses what is not on bpffs.
    let out = Command::new(BIN).args(["cleanup", "--pin-root"]).arg(&dir.0).output().unwrap();
    assert!(!out.status.success() && dir.0.exists());
    let _ = std::fs::remove_file(status);
}
