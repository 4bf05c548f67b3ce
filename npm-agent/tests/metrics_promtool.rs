//! The Prometheus and Grafana files of deploy/ checked with promtool (Debian's `prometheus`
//! package): the scrape configuration, the alert rules and their unit tests, and the
//! dashboard's queries. Skipped when promtool is missing, unless NPM_REQUIRE_PROMTOOL is set.

mod metrics_common;

use std::collections::BTreeSet;
use std::process::Command;

use metrics_common::{dashboard_queries, deploy, tool};
use npm_agent::metrics::prometheus_config::{StaticTargets, with_static_targets};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("npm-promtool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn alert_rules_check_and_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        println!("SKIPPED: promtool is not installed");
        return;
    };
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(deploy("prometheus/npm-alerts.yaml")));
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let out = run(Command::new(&promtool).current_dir(deploy("prometheus")).args([
        "test",
        "rules",
        "npm-alerts.test.yaml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
    // Every alert has a test.
    let rules = std::fs::read_to_string(deploy("prometheus/npm-alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(deploy("prometheus/npm-alerts.test.yaml")).unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {line}")), "alert {line} has no unit test");
    }
}

#[test]
fn scrape_configuration_checks() {
    let Some(promtool) = tool("promtool") else {
        println!("SKIPPED: promtool is not installed");
        return;
    };
    let dir = temp_dir("config");
    std::fs::copy(deploy("prometheus/npm-alerts.yaml"), dir.join("npm-alerts.yaml")).unwrap();
    let shipped = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    // Debian's Prometheus has no Kubernetes discovery: check the same jobs with the targets
    // it would discover.
    let config = with_static_targets(
        &shipped,
        &StaticTargets {
            nodes: vec![
                ("node-0".into(), "10.0.0.4:10250".into()),
                ("node-1".into(), "10.0.0.5:10250".into()),
            ],
            service: "npm-metrics-cluster-service.kube-system.svc:9000".into(),
            advanced_copy: true,
            ..StaticTargets::default()
        },
    )
    .unwrap();
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let out =
        run(Command::new(&promtool).arg("check").arg("config").arg(dir.join("prometheus.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dashboard_is_well_formed_and_its_queries_parse() {
    let text = std::fs::read_to_string(deploy("grafana/npm-dashboard.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} repeated");
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {id} wider than the grid"
        );
        titles.push(p["title"].as_str().unwrap().to_string());
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| e.contains("npm_") || e.contains("up{")),
                "panel {id}: {t}"
            );
        }
    }
    // Azure NPM's dashboard sections, and the dataplane.
    for want in [
        "Summary counts",
        "Counts over time",
        "IPSet entries",
        "Runtime quantiles (milliseconds, last 10 minutes)",
        "Dataplane",
    ] {
        assert!(titles.iter().any(|t| t == want), "no {want:?} row");
    }
    for want in ["Packets allowed per node and direction", "Packets dropped per node and direction"]
    {
        assert!(titles.iter().any(|t| t == want), "no {want:?} panel");
    }
    // Every metric of Azure NPM and the dataplane's appears in some query.
    let queries = dashboard_queries("1m");
    for metric in [
        "npm_num_policies",
        "npm_num_iptables_rules",
        "npm_num_ipsets",
        "npm_num_ipset_entries",
        "npm_ipset_counts",
        "npm_pods_watched",
        "npm_add_iptables_rule_exec_time",
        "npm_add_ipset_exec_time",
        "npm_add_policy_exec_time",
        "npm_controller_policy_exec_time",
        "npm_controller_namespace_exec_time",
        "npm_controller_pod_exec_time",
        "npm_packets_allowed_total",
        "npm_packets_dropped_total",
        "npm_map_entries",
        "npm_map_max_entries",
        "npm_conntrack_entries",
        "npm_dataplane_apply_failures_total",
    ] {
        assert!(
            queries.iter().any(|q| q.expr.contains(metric)),
            "no dashboard query uses {metric}"
        );
    }

    let Some(promtool) = tool("promtool") else {
        println!("SKIPPED: promtool is not installed (the queries' syntax is not checked)");
        return;
    };
    // promtool parses each query as a recording rule.
    let dir = temp_dir("dashboard");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules += &format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&q.expr).unwrap()
        );
    }
    std::fs::write(dir.join("queries.yaml"), &rules).unwrap();
    let out = run(Command::new(&promtool).arg("check").arg("rules").arg(dir.join("queries.yaml")));
    assert!(out.contains(&format!("SUCCESS: {} rules found", queries.len())), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
