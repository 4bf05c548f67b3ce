//! The shipped Prometheus configuration (`deploy/prometheus/prometheus.yml`) turned into one
//! that runs without Kubernetes: each `kubernetes_sd_configs` becomes `static_configs` with
//! the addresses and `__meta_kubernetes_*` labels the discovery would give, so the jobs'
//! relabelling (node address to `:10091`, the Service's namespace and name, the
//! `npm_ipset_counts` drop) runs unchanged. The lab runs a real Prometheus on it, and
//! `promtool check config` checks it (Debian's Prometheus is built without Kubernetes
//! discovery, so it cannot check the shipped file itself).

use anyhow::{Context as _, Result, bail};
use serde_yaml_ng::{Mapping, Value};

/// What the discovery would find.
#[derive(Clone, Debug, Default)]
pub struct StaticTargets {
    /// Nodes: (name, address as the node role gives it, `host:kubelet-port`).
    pub nodes: Vec<(String, String)>,
    /// The address of the `npm-metrics-cluster-service` Service as discovery gives it
    /// (`npm-metrics-cluster-service.kube-system.svc:9000`; in the lab, the agent itself).
    pub service: String,
    /// Override `global.scrape_interval` and `evaluation_interval`.
    pub interval: Option<String>,
    /// Replace `rule_files` (absolute paths).
    pub rule_files: Option<Vec<String>>,
    /// Add a copy of every job that drops metrics, named `<job>-advanced`, without its
    /// `metric_relabel_configs` (what a user who wants advanced metrics runs).
    pub advanced_copy: bool,
}

fn key(s: &str) -> Value {
    Value::String(s.into())
}

fn labels(pairs: &[(&str, &str)]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in pairs {
        m.insert(key(k), key(v));
    }
    Value::Mapping(m)
}

fn static_config(targets: &[String], l: Value) -> Value {
    let mut m = Mapping::new();
    m.insert(key("targets"), Value::Sequence(targets.iter().map(|t| key(t)).collect()));
    m.insert(key("labels"), l);
    Value::Mapping(m)
}

/// The shipped configuration with static targets (see the module documentation).
pub fn with_static_targets(shipped: &str, t: &StaticTargets) -> Result<String> {
    let mut config: Value =
        serde_yaml_ng::from_str(shipped).context("parsing the Prometheus configuration")?;
    let root = config.as_mapping_mut().context("the configuration is not a mapping")?;
    if let Some(interval) = &t.interval {
        let global = root.entry(key("global")).or_insert_with(|| Value::Mapping(Mapping::new()));
        let g = global.as_mapping_mut().context("global is not a mapping")?;
        g.insert(key("scrape_interval"), key(interval));
        g.insert(key("evaluation_interval"), key(interval));
    }
    if let Some(files) = &t.rule_files {
        root.insert(key("rule_files"), Value::Sequence(files.iter().map(|f| key(f)).collect()));
    }
    let jobs = root
        .get_mut(key("scrape_configs"))
        .and_then(Value::as_sequence_mut)
        .context("no scrape_configs")?;
    let mut extra = Vec::new();
    for job in jobs.iter_mut() {
        let job = job.as_mapping_mut().context("a scrape config is not a mapping")?;
        let name = job.get(key("job_name")).and_then(Value::as_str).unwrap_or_default().to_string();
        let Some(sd) = job.remove(key("kubernetes_sd_configs")) else { continue };
        let mut statics = Vec::new();
        for d in sd.as_sequence().context("kubernetes_sd_configs is not a list")? {
            match d.get("role").and_then(Value::as_str) {
                Some("node") => {
                    for (node, addr) in &t.nodes {
                        statics.push(static_config(
                            std::slice::from_ref(addr),
                            labels(&[("__meta_kubernetes_node_name", node)]),
                        ));
                    }
                }
                Some("service") => statics.push(static_config(
                    std::slice::from_ref(&t.service),
                    labels(&[
                        ("__meta_kubernetes_namespace", "kube-system"),
                        ("__meta_kubernetes_service_name", "npm-metrics-cluster-service"),
                    ]),
                )),
                other => bail!(
                    "job {name}: kubernetes_sd_configs role {other:?} has no static equivalent here"
                ),
            }
        }
        job.insert(key("static_configs"), Value::Sequence(statics));
        if t.advanced_copy && job.contains_key(key("metric_relabel_configs")) {
            let mut copy = job.clone();
            copy.remove(key("metric_relabel_configs"));
            copy.insert(key("job_name"), key(&format!("{name}-advanced")));
            extra.push(Value::Mapping(copy));
        }
    }
    jobs.extend(extra);
    serde_yaml_ng::to_string(&config).context("writing the configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_becomes_static_targets() {
        let shipped = include_str!("../../../deploy/prometheus/prometheus.yml");
        let t = StaticTargets {
            nodes: vec![("node-0".into(), "127.0.0.1:10250".into())],
            service: "127.0.0.1:10091".into(),
            interval: Some("1s".into()),
            rule_files: Some(vec!["/x/npm-alerts.yaml".into()]),
            advanced_copy: true,
        };
        let out = with_static_targets(shipped, &t).unwrap();
        let v: Value = serde_yaml_ng::from_str(&out).unwrap();
        assert!(!out.contains("kubernetes_sd_configs"), "{out}");
        assert_eq!(v["global"]["scrape_interval"], key("1s"));
        assert_eq!(v["rule_files"][0], key("/x/npm-alerts.yaml"));
        let jobs = v["scrape_configs"].as_sequence().unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j["job_name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "azure-npm-node-metrics",
                "azure-npm-cluster-metrics",
                "azure-npm-cluster-metrics-advanced"
            ]
        );
        assert_eq!(jobs[0]["static_configs"][0]["targets"][0], key("127.0.0.1:10250"));
        assert_eq!(jobs[0]["metrics_path"], key("/node-metrics"));
        assert_eq!(
            jobs[1]["static_configs"][0]["labels"]["__meta_kubernetes_service_name"],
            key("npm-metrics-cluster-service")
        );
        assert!(
            jobs[1].get("metric_relabel_configs").is_some()
                && jobs[2].get("metric_relabel_configs").is_none()
        );
        // The relabelling is the shipped one.
        assert_eq!(jobs[0]["relabel_configs"][0]["replacement"], key("$1:10091"));
    }
}
