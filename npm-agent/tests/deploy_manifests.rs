//! The Kubernetes manifests under `deploy/` (not `deploy/examples`, which are conformance
//! cases, nor `deploy/grafana`; from `deploy/prometheus` only the Kubernetes objects):
//!
//! - every object is validated against the Kubernetes 1.30 to 1.34 OpenAPI schemas, strictly
//!   (unknown fields are errors), by `kubernetes-validate` (PyPI; `cargo xtask setup`
//!   installs it). Without it the check is skipped, unless NPM_REQUIRE_KUBERNETES_VALIDATE
//!   is set (as `cargo xtask test` does);
//! - every object deserializes into its k8s-openapi type;
//! - what the agent depends on holds: the RBAC grants exactly get/list/watch on pods,
//!   namespaces, nodes and networkpolicies; the ConfigMap's file is a valid agent config
//!   and is where the DaemonSet tells the agent to read it; the DaemonSet has the node name,
//!   the probes, the mounts, the capabilities; the Service selects the DaemonSet's pods;
//!   the Windows DaemonSet runs the agent's HNS dataplane as a HostProcess container on
//!   Windows nodes only, with flags the agent takes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use npm_agent::agent::Settings;
use npm_agent::source::SourceSpec;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

/// The Kubernetes versions the manifests are validated against, strictly.
const VALIDATED_VERSIONS: [&str; 5] = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The YAML files under deploy/ that hold Kubernetes objects.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if name != "examples" && name != "grafana" {
                    walk(&path, out);
                }
            } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
                && !documents(&path).is_empty()
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root().join("deploy"), &mut out);
    out
}

/// The documents of a file that are Kubernetes objects (have apiVersion and kind).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| v.get("apiVersion").is_some() && v.get("kind").is_some())
        .collect()
}

/// Every object of deploy/, by (kind, name).
fn objects() -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for file in manifest_files() {
        for doc in documents(&file) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a {kind} without a name", file.display()))
                .to_string();
            let shown = file.strip_prefix(repo_root()).unwrap().display().to_string();
            // The same Service may be defined twice (deploy/ and deploy/prometheus/): the
            // definitions must then agree.
            if let Some(prev) = out.insert((kind.clone(), name.clone()), doc.clone()) {
                assert_eq!(
                    prev.get("spec"),
                    doc.get("spec"),
                    "{kind} {name} is defined twice, differently (again in {shown})"
                );
            }
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(
    objects: &BTreeMap<(String, String), Value>,
    kind: &str,
    name: &str,
) -> T {
    let v = objects
        .get(&(kind.to_string(), name.to_string()))
        .unwrap_or_else(|| panic!("no {kind} {name} under deploy/"));
    serde_path_to_error::deserialize(v.clone())
        .unwrap_or_else(|e| panic!("{kind} {name}: {}: {}", e.path(), e.inner()))
}

/// The kubernetes-validate command: $NPM_KUBERNETES_VALIDATE, on PATH, or where `cargo
/// xtask setup` installs it (target/tools/venv).
fn kubernetes_validate() -> Option<PathBuf> {
    let works =
        |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NPM_KUBERNETES_VALIDATE") {
        candidates.push(p.into());
    }
    candidates.push("kubernetes-validate".into());
    candidates.push(repo_root().join("target/tools/venv/bin/kubernetes-validate"));
    candidates.into_iter().find(|p| works(p))
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files = manifest_files();
    let names: Vec<String> =
        files.iter().map(|f| f.strip_prefix(repo_root()).unwrap().display().to_string()).collect();
    assert!(names.iter().any(|n| n == "deploy/azure-npm.yaml"), "{names:?}");
    assert!(names.iter().any(|n| n == "deploy/cleanup/azure-npm-cleanup.yaml"), "{names:?}");
    let Some(tool) = kubernetes_validate() else {
        if std::env::var_os("NPM_REQUIRE_KUBERNETES_VALIDATE").is_some() {
            panic!("kubernetes-validate not found (cargo xtask setup installs it)");
        }
        eprintln!("SKIP: kubernetes-validate not found (cargo xtask setup installs it)");
        return;
    };
    // Every Kubernetes version an operator may run it on (AKS's supported range).
    for version in VALIDATED_VERSIONS {
        let out = Command::new(&tool)
            .args(["--kubernetes-version", version, "--strict"])
            .args(&files)
            .output()
            .expect("running kubernetes-validate");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubernetes-validate {version} failed:\n{stdout}\n{stderr}");
        // One "passed" line per object.
        let objects: usize = files.iter().map(|f| documents(f).len()).sum();
        let passed = format!("{stdout}{stderr}").lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(passed, objects, "{version}: {stdout}\n{stderr}");
        assert!(!format!("{stdout}{stderr}").contains("ERROR"), "{version}: {stdout}\n{stderr}");
    }
}

#[test]
fn every_object_deserializes_into_its_type() {
    let objects = objects();
    for ((kind, name), v) in &objects {
        let result = match kind.as_str() {
            "ServiceAccount" => {
                serde_path_to_error::deserialize::<_, ServiceAccount>(v.clone()).map(|_| ())
            }
            "ClusterRole" => {
                serde_path_to_error::deserialize::<_, ClusterRole>(v.clone()).map(|_| ())
            }
            "ClusterRoleBinding" => {
                serde_path_to_error::deserialize::<_, ClusterRoleBinding>(v.clone()).map(|_| ())
            }
            "ConfigMap" => serde_path_to_error::deserialize::<_, ConfigMap>(v.clone()).map(|_| ()),
            "DaemonSet" => serde_path_to_error::deserialize::<_, DaemonSet>(v.clone()).map(|_| ()),
            "Service" => serde_path_to_error::deserialize::<_, Service>(v.clone()).map(|_| ()),
            "CustomResourceDefinition" => {
                serde_path_to_error::deserialize::<_, CustomResourceDefinition>(v.clone())
                    .map(|_| ())
            }
            other => panic!("{other} {name}: a kind this test does not know"),
        };
        if let Err(e) = result {
            panic!("{kind} {name}: {}: {}", e.path(), e.inner());
        }
        if !["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"]
            .contains(&kind.as_str())
        {
            assert_eq!(v["metadata"]["namespace"].as_str(), Some("kube-system"), "{kind} {name}");
        }
    }
}

#[test]
fn rbac_grants_exactly_reading_what_the_agent_watches() {
    let objects = objects();
    let role: ClusterRole = typed(&objects, "ClusterRole", "azure-npm");
    let mut granted: BTreeSet<(String, String, String)> = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("networking.k8s.io", "networkpolicies"),
        ("policy.networking.k8s.io", "clusternetworkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            want.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    assert_eq!(granted, want);
    let binding: ClusterRoleBinding = typed(&objects, "ClusterRoleBinding", "azure-npm-binding");
    assert_eq!(
        (binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()),
        ("ClusterRole", "azure-npm")
    );
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", "azure-npm", Some("kube-system"))
    );
    let _: ServiceAccount = typed(&objects, "ServiceAccount", "azure-npm");
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == "azure-npm").expect("the azure-npm container")
}

#[test]
fn daemonset_config_and_service_fit_the_agent() {
    let objects = objects();
    let ds: DaemonSet = typed(&objects, "DaemonSet", "azure-npm");
    let spec = ds.spec.as_ref().unwrap();
    let template_labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(template_labels.get("k8s-app").map(String::as_str), Some("azure-npm"));
    let annotations = spec.template.metadata.as_ref().unwrap().annotations.clone().unwrap();
    // Azure NPM's marker only: annotation-based discovery would scrape the agents a second
    // time, beside the two jobs of prometheus.yml.
    assert!(annotations.contains_key("azure.npm/scrapeable"), "{annotations:?}");
    assert!(annotations.keys().all(|k| !k.starts_with("prometheus.io/")), "{annotations:?}");
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.service_account_name.as_deref(), Some("azure-npm"));
    assert!(
        pod.tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );

    let c = agent_container(&ds);
    // NODE_NAME from the downward API.
    let env = c.env.as_ref().unwrap().iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        env.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path,
        "spec.nodeName"
    );
    // Only the capabilities eBPF and iptables need.
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.as_ref().unwrap().iter().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "BPF", "PERFMON", "NET_RAW"]));
    // Requests and limits.
    let res = c.resources.as_ref().unwrap();
    for key in ["cpu", "memory"] {
        assert!(res.requests.as_ref().unwrap().contains_key(key), "request {key}");
    }
    assert_eq!(res.limits.as_ref().unwrap().get("memory").map(|q| q.0.as_str()), Some("300Mi"));
    // Probes on the health endpoints of the metrics port.
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        (g.path.clone().unwrap(), g.port.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe), ("/healthz".to_string(), IntOrString::Int(10091)));
    assert_eq!(probe_path(&c.readiness_probe), ("/readyz".to_string(), IntOrString::Int(10091)));
    // The mounts: bpffs, the xtables lock, the config.
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let host_path = |volume: &str| -> String {
        let v = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == volume)
            .unwrap_or_else(|| panic!("volume {volume}"));
        v.host_path.as_ref().map(|h| h.path.clone()).unwrap_or_default()
    };
    assert_eq!(host_path(mounts["/sys/fs/bpf"]), "/sys/fs/bpf");
    assert_eq!(host_path(mounts["/run/xtables.lock"]), "/run/xtables.lock");

    // The config file: where the agent is told to read it, and valid.
    let args = c.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let config_path = Path::new(&args[at + 1]);
    let dir = config_path.parent().unwrap().to_str().unwrap();
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let volume = mounts.get(dir).unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let cm_name = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == *volume)
        .unwrap()
        .config_map
        .as_ref()
        .unwrap()
        .name
        .clone();
    assert_eq!(cm_name, "azure-npm-config");
    let cm: ConfigMap = typed(&objects, "ConfigMap", &cm_name);
    let text = cm
        .data
        .as_ref()
        .unwrap()
        .get(key)
        .unwrap_or_else(|| panic!("no key {key} in the ConfigMap"));
    let settings =
        Settings::from_yaml(text).unwrap_or_else(|e| panic!("the ConfigMap's {key}: {e}"));
    assert_eq!(settings.source, Some(SourceSpec::Kube));
    let metrics_port = settings.metrics_addr.map_or(10091, |a| a.port());
    assert_eq!(metrics_port, 10091);
    assert!(settings.node_name.is_none(), "node-name must come from NODE_NAME");
    if let Some(status) = &settings.status_file {
        assert!(
            mounts.keys().any(|m| status.starts_with(m)),
            "{} is not on a writable mount",
            status.display()
        );
    }

    // The Service: Azure NPM's name and ports, selecting the DaemonSet's pods.
    let svc: Service = typed(&objects, "Service", "npm-metrics-cluster-service");
    let svc_spec = svc.spec.unwrap();
    for (k, v) in svc_spec.selector.unwrap() {
        assert_eq!(
            template_labels.get(&k),
            Some(&v),
            "the Service selects {k}={v}, which the DaemonSet's pods lack"
        );
    }
    let port = &svc_spec.ports.unwrap()[0];
    assert_eq!((port.port, port.target_port.clone()), (9000, Some(IntOrString::Int(10091))));
}

/// The Windows DaemonSet: a HostProcess container as SYSTEM on Windows nodes (and the Linux
/// one on Linux nodes only), its arguments as the agent parses them (the HNS dataplane), its
/// config from the Linux agents' ConfigMap, its pods in the metrics Service.
#[test]
fn windows_daemonset_runs_the_hns_agent_as_a_host_process() {
    use clap::Parser as _;
    use npm_agent::agent::DataplaneKind;
    #[derive(clap::Parser)]
    struct Run {
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    }
    let objects = objects();
    let os = |ds: &DaemonSet| {
        let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
        pod.node_selector.unwrap_or_default().get("kubernetes.io/os").cloned()
    };
    let linux: DaemonSet = typed(&objects, "DaemonSet", "azure-npm");
    let ds: DaemonSet = typed(&objects, "DaemonSet", "azure-npm-win");
    assert_eq!(os(&linux).as_deref(), Some("linux"));
    assert_eq!(os(&ds).as_deref(), Some("windows"));
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let windows = pod.security_context.as_ref().unwrap().windows_options.as_ref().unwrap();
    assert_eq!(windows.host_process, Some(true));
    assert_eq!(windows.run_as_user_name.as_deref(), Some("NT AUTHORITY\\SYSTEM"));
    assert_eq!(pod.host_network, Some(true), "HostProcess pods must use the host's network");
    assert_eq!(pod.service_account_name.as_deref(), Some("azure-npm"));
    let _: ServiceAccount = typed(&objects, "ServiceAccount", "azure-npm");

    let c = agent_container(&ds);
    let args = c.args.clone().unwrap();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let run =
        Run::try_parse_from(std::iter::once("run".to_string()).chain(args[1..].iter().cloned()))
            .unwrap_or_else(|e| panic!("the agent rejects the Windows DaemonSet's arguments: {e}"));
    assert_eq!(run.settings.dataplane, Some(DataplaneKind::Hns));
    let env: Vec<&str> = c.env.as_ref().unwrap().iter().map(|e| e.name.as_str()).collect();
    assert!(env.contains(&"NODE_NAME"), "{env:?}");
    // The config and the status file on the container's mounts.
    let mounts: BTreeMap<&str, &str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let config = run.config.expect("--config");
    let volume = mounts[config.parent().unwrap().to_str().unwrap()];
    let v = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == volume).unwrap();
    let cm_name = &v.config_map.as_ref().expect("a ConfigMap volume").name;
    let cm: ConfigMap = typed(&objects, "ConfigMap", cm_name);
    let text = &cm.data.as_ref().unwrap()[config.file_name().unwrap().to_str().unwrap()];
    let file = Settings::from_yaml(text).unwrap();
    assert!(
        matches!(file.dataplane, None | Some(DataplaneKind::Auto | DataplaneKind::Hns)),
        "the ConfigMap's dataplane {:?} does not run on Windows (flags override it, but auto is what both read)",
        file.dataplane
    );
    let status = run.settings.status_file.expect("--status-file");
    assert!(mounts.keys().any(|m| status.starts_with(m)), "{} is not on a mount", status.display());
    // Probes on the metrics port; the metrics Service selects these pods too.
    for p in [&c.liveness_probe, &c.readiness_probe] {
        let g = p.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(g.port, IntOrString::Int(10091));
    }
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let svc: Service = typed(&objects, "Service", "npm-metrics-cluster-service");
    for (k, v) in svc.spec.unwrap().selector.unwrap() {
        assert_eq!(labels.get(&k), Some(&v), "the Service does not select the Windows pods");
    }
    let annotations = spec.template.metadata.as_ref().unwrap().annotations.clone().unwrap();
    assert!(annotations.keys().all(|k| !k.starts_with("prometheus.io/")), "{annotations:?}");
}

/// What an Azure NPM user's monitoring keys on, written from Azure NPM's documentation and
/// its sample Prometheus files (names and labels, not copied): the sample alerts' names and
/// labels, the scrape jobs' names and paths, the metrics Service. Each must be in deploy/.
#[test]
fn azure_npm_users_find_their_alerts_and_scrape_jobs() {
    let alerts_file = repo_root().join("deploy/prometheus/npm-alerts.yaml");
    let alerts: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&alerts_file).unwrap()).unwrap();
    let rules: Vec<&Value> = alerts["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .collect();
    for (name, labels) in [
        ("AzureNPMFailureCreatePolicy", [("severity", "warning"), ("addon", "azure-npm")]),
        (
            "AzureNPMHighControllerPodCreateTimeMedian",
            [("severity", "warning"), ("addon", "azure-npm")],
        ),
    ] {
        let rule = rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("Azure NPM's alert {name} is not in {alerts_file:?}"));
        for (k, v) in labels {
            assert_eq!(rule["labels"][k].as_str(), Some(v), "{name}: label {k}");
        }
    }
    // Every alert of ours is routed as Azure NPM's are.
    for r in &rules {
        assert_eq!(r["labels"]["addon"].as_str(), Some("azure-npm"), "{:?}", r["alert"]);
    }
    let scrape_file = repo_root().join("deploy/prometheus/prometheus.yml");
    let scrape: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&scrape_file).unwrap()).unwrap();
    let jobs = scrape["scrape_configs"].as_sequence().unwrap();
    for (job, path) in [
        ("azure-npm-node-metrics", "/node-metrics"),
        ("azure-npm-cluster-metrics", "/cluster-metrics"),
    ] {
        let j = jobs
            .iter()
            .find(|j| j["job_name"].as_str() == Some(job))
            .unwrap_or_else(|| panic!("Azure NPM's scrape job {job} is not in {scrape_file:?}"));
        assert_eq!(j["metrics_path"].as_str(), Some(path), "{job}");
    }
    let objects = objects();
    let svc: Service = typed(&objects, "Service", "npm-metrics-cluster-service");
    assert_eq!(svc.metadata.namespace.as_deref(), Some("kube-system"));
    // Azure Monitor's settings for Azure NPM, under the names its agent reads.
    let azm: ConfigMap = typed(&objects, "ConfigMap", "container-azm-ms-agentconfig");
    assert_eq!(azm.metadata.namespace.as_deref(), Some("kube-system"));
    let integrations = &azm.data.as_ref().unwrap()["integrations"];
    for key in [
        "[integrations.azure_network_policy_manager]",
        "collect_basic_metrics",
        "collect_advanced_metrics",
    ] {
        assert!(integrations.contains(key), "{key} in {integrations}");
    }
}

/// deploy/crds/clusternetworkpolicies.yaml is the CRD kube's `CustomResourceExt` makes from the
/// Rust types the agent reads (group, version, kind, scope, plural and schema), so what the
/// cluster serves is what the source decodes. `UPDATE_GOLDEN=1` rewrites it.
#[test]
fn the_shipped_crd_is_generated_from_the_rust_types() {
    use kube::CustomResourceExt as _;
    use npm_agent::model::cluster_policy::api::ClusterNetworkPolicy;
    let crd = ClusterNetworkPolicy::crd();
    let path = repo_root().join("deploy/crds/clusternetworkpolicies.yaml");
    let generated = format!(
        "# Generated from npm_agent::model::cluster_policy::api (kube's CustomResourceExt);\n\
         # regenerate with UPDATE_GOLDEN=1 cargo test -p npm-agent --test deploy_manifests.\n{}",
        serde_yaml_ng::to_string(&crd).unwrap()
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).expect("deploy/crds/clusternetworkpolicies.yaml");
    assert_eq!(shipped, generated, "regenerate with UPDATE_GOLDEN=1");
    let spec = &crd.spec;
    assert_eq!(
        (spec.group.as_str(), spec.names.plural.as_str(), spec.scope.as_str()),
        ("policy.networking.k8s.io", "clusternetworkpolicies", "Cluster")
    );
    assert_eq!(spec.versions.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v1alpha2"]);
    // The shared example decodes with these types and validates.
    let case = std::fs::read_to_string(
        repo_root().join("../shared/conformance/cluster-network-policy/tiers.yaml"),
    );
    if let Ok(case) = case {
        let v: Value = serde_yaml_ng::from_str(&case).unwrap();
        let mut n = 0;
        for step in v["steps"].as_sequence().unwrap() {
            for a in step["actions"].as_sequence().into_iter().flatten() {
                let o = &a["apply"];
                if o["kind"] == "ClusterNetworkPolicy" {
                    let o: ClusterNetworkPolicy = serde_yaml_ng::from_value(o.clone()).unwrap();
                    npm_agent::model::cluster_policy::cluster_network_policy(&o).unwrap();
                    n += 1;
                }
            }
        }
        assert!(n > 0);
    }
}
