//! Memory of the Kubernetes source at start-up on a synthetic cluster: the source's
//! watchers list every pod, namespace and policy (and the node) from a loopback API server
//! that serves the synthetic cluster (`benches/synth`) as API objects padded to a realistic
//! size (managedFields, annotations, container specs, statuses: about 4 KiB a pod), in pages
//! of 500 as the real API server does. The server runs in a child process, so the figures
//! are the agent's own: the resident set (VmRSS, and its peak VmHWM) and the live heap.
//!
//! ```text
//! cargo run --release -p npm-agent --example kube_source_memory -- [SIZE] [source|engine|ebpf|iptables]
//! ```
//! SIZE is 1k, 10k or 100k (default 100k). `source` (the default) drops the events once
//! counted: what remains is the source's own state (one fingerprint per object) and the
//! runtime. `engine` feeds them into an incremental engine for the measured node, as the
//! agent does: the engine holds the model of the cluster (without the Azure NPM layout: eBPF
//! mode before it counted Azure NPM's sets). `ebpf` does so with the layout, as eBPF mode does
//! now, and then follows Azure NPM's sets of the plan (`AzureSets`, what eBPF mode's
//! metrics count; the maps are not written). `iptables` then reconciles the
//! iptables translator over the plan (an empty kernel, no process run), as an agent in
//! iptables mode holds it: the engine with the Azure NPM layout (sets and their members),
//! and the translator's kernel names and rule text.

#[path = "../tests/kube_server/mod.rs"]
mod kube_server;
mod memory;
#[path = "../benches/synth/mod.rs"]
mod synth;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use kube_server::{Request, Response, Server, Step, status_response};
use npm_agent::compile::{Engine, Scope};
use npm_agent::dataplane::azure::AzureSets;
use npm_agent::dataplane::iptables::saved::KernelState;
use npm_agent::dataplane::iptables::translate::RuleTranslator;
use npm_agent::model::convert;
use npm_agent::source::{KubeOptions, KubeSource, Source};
use serde_json::{Value, json};
use synth::{Cluster, Config};

#[global_allocator]
static ALLOC: memory::Counting = memory::Counting;

use memory::report;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        serve(args.get(1).map(String::as_str).unwrap_or("100k"));
        return;
    }
    let size = args.first().map(String::as_str).unwrap_or("100k").to_string();
    let mode = args.get(1).map(String::as_str).unwrap_or("source").to_string();
    assert!(
        matches!(mode.as_str(), "source" | "engine" | "ebpf" | "iptables"),
        "mode is source, engine, ebpf or iptables"
    );

    // The API server: a child process serving the synthetic cluster.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["serve", &size])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the server process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let (url, node) = line.trim().split_once(' ').expect("URL NODE from the server");
    let (url, node) = (url.to_string(), node.to_string());

    println!("size {size}, mode {mode}, measured node {node}");
    println!();
    println!("| stage | VmRSS | VmHWM | live heap | peak heap |");
    println!("|---|---:|---:|---:|---:|");
    report("start");
    let config = kube::Config::new(url.parse().unwrap());
    let mut source =
        KubeSource::from_config(config, KubeOptions::new(node.clone())).expect("source");
    report("source started");
    let mut engine = (mode != "source").then(|| {
        let engine = Engine::new(Scope::Node(node.clone()));
        // (Both Linux dataplanes want the plan's layout, which the engine then keeps.)
        if mode == "engine" { engine } else { engine.with_layout() }
    });
    let t = Instant::now();
    let mut events = 0usize;
    loop {
        assert!(t.elapsed() < Duration::from_secs(600), "no sync within 10 minutes");
        let Some(batch) = source.next_batch(Duration::from_millis(200)).expect("next_batch") else {
            continue;
        };
        events += batch.events.len();
        if let Some(engine) = engine.as_mut() {
            for e in batch.events {
                engine.handle(e);
            }
        }
        if batch.synced {
            break;
        }
    }
    let took = t.elapsed();
    report(if mode == "source" {
        "synced, events dropped (the source's own state)"
    } else {
        "synced, the cluster in the engine"
    });
    let mut azure_sets = None;
    if mode == "ebpf" {
        let plan = engine.as_ref().expect("engine").plan();
        let sets = AzureSets::from_layout(&plan.layout);
        drop(plan);
        // SAFETY: malloc_trim only returns free memory of the allocator to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        report("Azure NPM's sets followed (plan dropped, malloc_trim)");
        println!();
        println!("Azure NPM's sets: {} with {} entries", sets.len(), sets.entries());
        println!();
        azure_sets = Some(sets);
    }
    let mut translator = None;
    if mode == "iptables" {
        let plan = engine.as_ref().expect("engine").plan();
        let mut t = RuleTranslator::new();
        let batches = t.reconcile(&plan, &KernelState::default());
        let lines: usize = batches.iter().map(|b| b.commands).sum();
        drop((plan, batches));
        report("iptables translator reconciled (plan dropped)");
        // As the agent does after a whole-plan reconcile.
        // SAFETY: malloc_trim only returns free memory of the allocator to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        report("freed memory returned (malloc_trim)");
        println!();
        println!("iptables: {:?}, {lines} commands", t.encoded());
        println!();
        translator = Some(t);
    }
    std::thread::sleep(Duration::from_millis(500));
    report("0.5 s later");
    println!();
    println!(
        "initial sync: {events} events in {took:.2?}; the source knows {} objects; {:?}",
        source.objects(),
        source.health().problems
    );
    if let Some(engine) = &engine {
        println!("engine: {:?}", engine.stats());
    }
    drop((source, translator, azure_sets));
    let _ = child.kill();
    let _ = child.wait();
}

/// A pod as the API server returns it in a list: the model's fields and the usual rest.
fn padded_pod(p: &npm_agent::model::Pod, i: usize) -> Value {
    let mut v = serde_json::to_value(convert::pod_to_k8s(p)).unwrap();
    let name = p.key.name.clone();
    let ns = p.key.namespace.clone();
    let meta = v["metadata"].as_object_mut().unwrap();
    meta.insert("uid".into(), json!(format!("6f1c2a9e-{i:08x}-4c1e-9d5b-0242ac120002")));
    meta.insert("resourceVersion".into(), json!(format!("{}", 1000 + i)));
    meta.insert("creationTimestamp".into(), json!("2025-01-01T00:00:00Z"));
    meta.insert(
        "generateName".into(),
        json!(format!("{}-", &name[..name.len().saturating_sub(6)])),
    );
    meta.insert(
        "annotations".into(),
        json!({"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z", "prometheus.io/scrape": "true", "prometheus.io/port": "9090"}),
    );
    meta.insert(
        "ownerReferences".into(),
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{ns}-rs"), "uid": "0b9a2c5e-1111-2222-3333-444455556666", "controller": true, "blockOwnerDeletion": true}]),
    );
    meta.insert(
        "managedFields".into(),
        json!([
            {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}}, "f:ownerReferences": {".": {}}},
                          "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:name": {}, "f:ports": {}, "f:resources": {}}}}}},
            {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:05Z", "fieldsType": "FieldsV1", "subresource": "status",
             "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}}
        ]),
    );
    let spec = v["spec"].as_object_mut().unwrap();
    let c = &mut spec["containers"][0];
    c["image"] = json!("registry.example.com/team/service:1.2.3");
    c["imagePullPolicy"] = json!("IfNotPresent");
    c["env"] = json!([{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}]);
    c["resources"] =
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}});
    c["volumeMounts"] = json!([{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
    c["terminationMessagePath"] = json!("/dev/termination-log");
    spec.insert("restartPolicy".into(), json!("Always"));
    spec.insert("serviceAccountName".into(), json!("default"));
    spec.insert("schedulerName".into(), json!("default-scheduler"));
    spec.insert("dnsPolicy".into(), json!("ClusterFirst"));
    spec.insert(
        "tolerations".into(),
        json!([{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
               {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
    );
    spec.insert(
        "volumes".into(),
        json!([{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}]),
    );
    let status = v["status"].as_object_mut().unwrap();
    status.insert("hostIP".into(), json!("10.250.0.1"));
    status.insert("startTime".into(), json!("2025-01-01T00:00:01Z"));
    status.insert("qosClass".into(), json!("Burstable"));
    status.insert(
        "conditions".into(),
        json!(["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
            .iter()
            .map(|t| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": "2025-01-01T00:00:03Z"}))
            .collect::<Vec<_>>()),
    );
    status.insert(
        "containerStatuses".into(),
        json!([{"name": "main", "ready": true, "started": true, "restartCount": 0, "image": "registry.example.com/team/service:1.2.3",
                "imageID": "registry.example.com/team/service@sha256:4f1c1b2e3d4c5b6a79808f7e6d5c4b3a29181716151413121110090807060504",
                "containerID": format!("containerd://{:064x}", i), "state": {"running": {"startedAt": "2025-01-01T00:00:02Z"}}, "lastState": {}}]),
    );
    v
}

fn with_rv(mut v: Value, rv: usize) -> Value {
    v["metadata"]["resourceVersion"] = json!(rv.to_string());
    v
}

/// The child: serves the synthetic cluster; prints `URL NODE` and serves until killed.
fn serve(size: &str) {
    let config = Config::named(size).expect("SIZE is one of 1k, 10k, 100k");
    let cluster = Cluster::generate(config);
    let node = cluster.measured_node().to_string();
    let s = &cluster.state;
    let to_strings =
        |v: Vec<Value>| -> Vec<String> { v.into_iter().map(|v| v.to_string()).collect() };
    let pods = to_strings(s.pods.values().enumerate().map(|(i, p)| padded_pod(p, i)).collect());
    let namespaces = to_strings(
        s.namespaces
            .values()
            .enumerate()
            .map(|(i, n)| {
                with_rv(serde_json::to_value(convert::namespace_to_k8s(n)).unwrap(), 10 + i)
            })
            .collect(),
    );
    let policies = to_strings(
        s.policies
            .values()
            .enumerate()
            .map(|(i, p)| {
                with_rv(serde_json::to_value(convert::policy_to_k8s(p)).unwrap(), 500_000 + i)
            })
            .collect(),
    );
    let nodes: Vec<(String, String)> = s
        .nodes
        .values()
        .enumerate()
        .map(|(i, n)| {
            (
                n.name.clone(),
                with_rv(serde_json::to_value(convert::node_to_k8s(n)).unwrap(), 900_000 + i)
                    .to_string(),
            )
        })
        .collect();
    let bytes: usize = pods.iter().map(String::len).sum();
    eprintln!(
        "server: {} pods ({} MiB of JSON, {} bytes a pod)",
        pods.len(),
        bytes >> 20,
        bytes / pods.len().max(1)
    );
    drop(cluster);
    let responder = move |req: &Request| -> Response {
        if req.watch {
            return Response::Watch { steps: vec![Step::Line(json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "2000000"}}}).to_string())] };
        }
        let items: Vec<&String> = match req.resource.as_str() {
            "pods" => pods.iter().collect(),
            "namespaces" => namespaces.iter().collect(),
            "networkpolicies" => policies.iter().collect(),
            "nodes" => {
                let want =
                    req.query.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name="));
                nodes.iter().filter(|(n, _)| want.is_none_or(|w| w == n)).map(|(_, j)| j).collect()
            }
            other => return status_response(404, "NotFound", other),
        };
        let start: usize = req.query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize =
            req.query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
        let end = start.saturating_add(limit).min(items.len());
        let mut body = String::from(
            "{\"kind\":\"List\",\"apiVersion\":\"v1\",\"metadata\":{\"resourceVersion\":\"2000000\"",
        );
        if end < items.len() {
            body.push_str(&format!(",\"continue\":\"{end}\""));
        }
        body.push_str("},\"items\":[");
        for (i, item) in items[start.min(end)..end].iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(item);
        }
        body.push_str("]}");
        Response::Json { status: 200, body }
    };
    let server = Server::start(Box::new(responder));
    println!("{} {node}", server.url());
    use std::io::Write as _;
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
