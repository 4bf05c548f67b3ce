//! The Kubernetes source (kube-rs watchers) against a loopback server replaying recorded API
//! server responses (`tests/fixtures/kube/SCENARIO/`, see `kube_server`): lists, watch
//! streams with bookmarks, a 410 Gone that forces a relist, a dropped connection, a line that
//! is not JSON, malformed and invalid objects, failing lists and watches. Each test checks
//! that the state the source hands over converges to the scenario's `expected/` manifests
//! (read by the files source), and what the source reports on the way.

mod kube_server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube_server::Server;
use npm_agent::agent::{Agent, SharedMemory};
use npm_agent::compile::{Engine, Scope};
use npm_agent::model::ObjectKey;
use npm_agent::source::{Batch, FilesSource, KubeOptions, KubeSource, Source};
use npm_agent::state::{ClusterState, Event};

const NODE: &str = "node-1";
/// Every test ends within this, pass or fail.
const DEADLINE: Duration = Duration::from_secs(15);

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube").join(name)
}

fn options() -> KubeOptions {
    KubeOptions {
        backoff_min: Duration::from_millis(30),
        backoff_max: Duration::from_millis(200),
        ..KubeOptions::new(NODE)
    }
}

fn source_for(server: &Server) -> KubeSource {
    let config = kube::Config::new(server.url().parse().expect("server url"));
    KubeSource::from_config(config, options()).expect("kube source")
}

/// The state the scenario's `expected/` manifests describe.
fn expected_state(name: &str) -> ClusterState {
    let mut files = FilesSource::new(scenario(name).join("expected"));
    let batch = files.scan().expect("expected manifests").expect("a first batch");
    assert!(files.health().problems.is_empty(), "{:?}", files.health());
    let mut state = ClusterState::default();
    for e in &batch.events {
        state.apply(e);
    }
    state
}

/// Feeds batches into the engine until `done` holds (or the deadline passes); returns the
/// batches.
fn drive(
    source: &mut KubeSource,
    engine: &mut Engine,
    mut done: impl FnMut(&Engine, &KubeSource) -> bool,
) -> Vec<Batch> {
    let start = Instant::now();
    let mut batches = Vec::new();
    while start.elapsed() < DEADLINE {
        if let Some(batch) = source.next_batch(Duration::from_millis(50)).expect("next_batch") {
            for e in &batch.events {
                engine.handle(e.clone());
            }
            batches.push(batch);
        }
        if done(engine, source) {
            return batches;
        }
    }
    panic!(
        "did not converge within {DEADLINE:?}\nstate: {:#?}\nhealth: {:#?}\nbatches: {batches:#?}",
        engine.state(),
        source.health()
    );
}

fn count(batches: &[Batch], pred: impl Fn(&Event) -> bool) -> usize {
    batches.iter().flat_map(|b| &b.events).filter(|e| pred(e)).count()
}

#[test]
fn converges_through_bookmarks_gone_drops_and_malformed_objects() {
    let server = Server::scenario(&scenario("converge"));
    let expected = expected_state("converge");
    let mut source = source_for(&server);
    let mut engine = Engine::new(Scope::Node(NODE.into()));
    let mut synced_at: Option<usize> = None;
    let mut nodes_lists_at_sync = 0;
    let batches = drive(&mut source, &mut engine, |engine, source| {
        if synced_at.is_none() && source.synced() {
            synced_at = Some(0);
            nodes_lists_at_sync = server.requests_of("nodes", false).len();
        }
        // The relist after 410 Gone has been served and its deletions applied.
        engine.state() == &expected
            && server.requests_of("pods", false).len() >= 2
            && server.requests_of("pods", true).len() >= 3
            && source.health().parse_errors >= 1
    });

    // Converged, with the expected state in the engine.
    assert_eq!(engine.state(), &expected);

    // Synced only once every kind had been listed: the first nodes list failed (500), so
    // the second one had to be served first.
    let first_synced = batches.iter().position(|b| b.synced).expect("a synced batch");
    assert!(batches[first_synced..].iter().all(|b| b.synced), "synced stays set");
    assert!(
        nodes_lists_at_sync >= 2,
        "synced before the nodes list succeeded ({nodes_lists_at_sync} lists)"
    );

    // The relist deleted the pod that went away while the watch was down, and did not
    // re-send what had not changed.
    let web3 = ObjectKey::new("prod", "web-3");
    assert_eq!(count(&batches, |e| *e == Event::DeletePod(web3.clone())), 1);
    let db1 = ObjectKey::new("prod", "db-1");
    assert_eq!(
        count(&batches, |e| matches!(e, Event::UpsertPod(p) if p.key == db1)),
        1,
        "unchanged pod re-sent by the relist"
    );
    // Malformed and invalid objects never became events.
    let broken = ObjectKey::new("prod", "broken");
    assert_eq!(count(&batches, |e| matches!(e, Event::UpsertPod(p) if p.key == broken)), 0);
    assert_eq!(
        count(&batches, |e| matches!(e, Event::UpsertPolicy(p) if p.key.name == "bad-cidr")),
        0
    );
    assert_eq!(
        count(&batches, |e| matches!(e, Event::UpsertPolicy(p) if p.key.name == "deny-ingress")),
        1
    );

    // Reported: the malformed pod (in both lists), the invalid policy, the invalid update
    // (whose previous version stays), and the line that is not JSON.
    let health = source.health();
    assert!(health.invalid_objects >= 4, "{health:#?}");
    assert!(health.parse_errors >= 1, "{health:#?}");
    let problem =
        |needles: &[&str]| health.problems.iter().any(|p| needles.iter().all(|n| p.contains(n)));
    assert!(problem(&["Pod prod/broken", "spec.containers", "not applied"]), "{health:#?}");
    assert!(
        problem(&[
            "NetworkPolicy prod/bad-cidr",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "not applied"
        ]),
        "{health:#?}"
    );
    assert!(
        problem(&[
            "NetworkPolicy prod/deny-ingress",
            "spec.ingress[0].ports[0].port",
            "previous version kept"
        ]),
        "{health:#?}"
    );
    assert_eq!(health.problems.len(), 3, "{health:#?}");

    // What the watchers asked for.
    let pod_lists = server.requests_of("pods", false);
    let q = &pod_lists[0].query;
    assert_eq!(
        q.get("fieldSelector").map(String::as_str),
        Some(npm_agent::source::kube::POD_FIELD_SELECTOR)
    );
    assert_eq!(q.get("limit").map(String::as_str), Some("500"));
    assert_eq!(
        q.get("resourceVersion"),
        None,
        "pods are listed with the most recent semantics (paginated)"
    );
    // Every node (ClusterNetworkPolicy `nodes` peers select them by label), paged.
    let node_lists = server.requests_of("nodes", false);
    assert_eq!(node_lists[0].query.get("fieldSelector"), None);
    assert_eq!(node_lists[0].query.get("limit").map(String::as_str), Some("500"));
    assert_eq!(node_lists[0].query.get("resourceVersion"), None, "nodes are paged, as pods");
    let ns_lists = server.requests_of("namespaces", false);
    assert_eq!(
        ns_lists[0].query.get("resourceVersion").map(String::as_str),
        Some("0"),
        "small kinds come from the watch cache"
    );
    assert_eq!(ns_lists[0].query.get("limit"), None);
    let policy_lists = server.requests_of("networkpolicies", false);
    assert_eq!(policy_lists[0].query.get("limit").map(String::as_str), Some("500"));
    let pod_watches = server.requests_of("pods", true);
    assert!(pod_watches.len() >= 3, "{pod_watches:#?}");
    for w in server.requests().iter().filter(|r| r.watch) {
        assert_eq!(w.query.get("allowWatchBookmarks").map(String::as_str), Some("true"), "{w:?}");
    }
    // The first watch starts at the list's version; after the dropped connection the watch
    // resumes from the last event seen; after the relist, from the new list's version.
    let rv = |i: usize| pod_watches[i].query.get("resourceVersion").cloned().unwrap_or_default();
    assert_eq!((rv(0), rv(1), rv(2)), ("200".to_string(), "206".to_string(), "300".to_string()));
    drop(source);
}

#[test]
fn agent_is_ready_only_after_every_kind_is_listed_and_keeps_state_through_api_errors() {
    let server = Server::scenario(&scenario("readiness"));
    let expected = expected_state("readiness");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let agent_thread = {
        let (url, stop) = (server.url(), stop.clone());
        std::thread::spawn(move || {
            let config = kube::Config::new(url.parse().unwrap());
            let source = KubeSource::from_config(config, options()).unwrap();
            let memory = SharedMemory::default();
            let mut agent = Agent::new(NODE, Box::new(source), Box::new(memory.clone()), None);
            tx.send((agent.handles(), memory)).unwrap();
            agent.run(&stop).unwrap();
            agent.engine().state().clone()
        })
    };
    let (handles, memory) = rx.recv().unwrap();
    let start = Instant::now();
    let mut saw_waiting_problem = false;
    // Not ready while the policies list fails (503, then 500); ready after the third.
    loop {
        assert!(start.elapsed() < DEADLINE, "never ready: {:#?}", handles.status());
        let status = handles.status();
        let lists = server.requests_of("networkpolicies", false).len();
        if lists < 3 {
            assert!(!status.ready, "ready before the policies were listed");
            assert!(memory.plan().endpoints.is_empty(), "applied before the initial sync");
        }
        saw_waiting_problem |= status
            .problems
            .iter()
            .any(|p| p.starts_with("networkpolicies:") && p.contains("initial list not complete"));
        if status.ready {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(saw_waiting_problem, "the failing list was never reported");
    // The pod watch then fails to start twice; nothing is lost, and the pod added once it
    // works arrives.
    loop {
        assert!(start.elapsed() < DEADLINE, "pod never arrived: {:#?}", handles.status());
        if handles.status().pods == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.requests_of("pods", true).len() >= 3);
    let plan = memory.plan();
    stop.store(true, Ordering::SeqCst);
    let state = agent_thread.join().expect("agent thread");
    assert_eq!(state, expected);
    // node-1's pods (web-1, db-1, web-3) are enforced, isolated for ingress by deny-ingress.
    assert_eq!(plan.endpoints.len(), 3, "{plan:#?}");
    assert!(handles.status().problems.is_empty(), "{:#?}", handles.status().problems);
}

#[test]
fn unreachable_api_server_is_retried_and_never_synced() {
    // A port nobody listens on: every request fails to connect.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let mut source = KubeSource::from_config(config, options()).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        let batch =
            source.next_batch(Duration::from_millis(50)).expect("errors are not the caller's");
        assert!(batch.is_none_or(|b| !b.synced && b.events.is_empty()));
    }
    assert!(!source.synced());
    assert!(source.api_errors() >= 4, "retried with backoff: {} errors", source.api_errors());
    let health = source.health();
    assert_eq!(health.problems.len(), 5, "{health:#?}");
    assert!(health.problems.iter().all(|p| p.contains("initial list not complete")), "{health:#?}");
}

/// A cluster without the ClusterNetworkPolicy CRD (the list answers 404) syncs as before,
/// with none enforced and no problem; once the CRD is installed (the retried list succeeds)
/// its policies arrive, an invalid one is reported naming the field, and a watched change
/// follows.
#[test]
fn cluster_policies_are_picked_up_when_their_crd_is_installed() {
    let server = Server::scenario(&scenario("cluster-policies"));
    let mut source = source_for(&server);
    let mut engine = Engine::new(Scope::Node(NODE.into())).with_cluster_policies();
    let mut synced_without = false;
    let batches = drive(&mut source, &mut engine, |engine, source| {
        if source.synced() && engine.state().cluster_policies.is_empty() {
            synced_without = true;
            assert!(source.health().problems.is_empty(), "{:#?}", source.health());
        }
        engine.state().cluster_policies.get("deny-y").is_some_and(|p| p.priority == 3)
    });
    assert!(synced_without, "synced only once the CRD was served");
    assert!(server.requests_of("clusternetworkpolicies", false).len() >= 3, "the list is retried");
    assert_eq!(
        count(&batches, |e| matches!(e, Event::UpsertClusterPolicy(p) if p.name == "deny-y")),
        2,
        "listed, then modified"
    );
    assert_eq!(engine.state().cluster_policies.len(), 1, "by-domain is not applied");
    let health = source.health();
    assert!(
        health.problems.iter().any(|p| p.contains("by-domain")
            && p.contains("domainNames")
            && p.contains("not applied")),
        "{health:#?}"
    );
    assert_eq!(health.invalid_objects, 1);
}
