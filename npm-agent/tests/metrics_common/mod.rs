//! Shared by the metrics tests: the deploy files, the dashboard's queries, promtool.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn deploy(path: &str) -> PathBuf {
    root().join("deploy").join(path)
}

/// `promtool` and `prometheus` from PATH. When missing: `None`, unless `NPM_REQUIRE_PROMTOOL`
/// is set (`cargo xtask test` sets it, after installing them), then a panic.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file())
    });
    if found.is_none() && std::env::var_os("NPM_REQUIRE_PROMTOOL").is_some() {
        panic!(
            "{name} is not installed (Debian's prometheus package; cargo xtask setup installs it)"
        );
    }
    found
}

/// One query of the dashboard.
#[derive(Clone, Debug)]
pub struct Query {
    pub panel: String,
    pub expr: String,
}

/// Every query of the Grafana dashboard (panel targets and the `node` variable's
/// `label_values(...)`, as the series it lists), with Grafana's variables substituted: every
/// node (`.*`) and `rate_interval` for `$__rate_interval`.
pub fn dashboard_queries(rate_interval: &str) -> Vec<Query> {
    let text =
        std::fs::read_to_string(deploy("grafana/npm-dashboard.json")).expect("the dashboard");
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let subst = |e: &str| e.replace("$__rate_interval", rate_interval).replace("$node", ".*");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has an expr");
            out.push(Query {
                panel: p["title"].as_str().unwrap_or_default().to_string(),
                expr: subst(expr),
            });
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')'))
        {
            let series = inner.rsplit_once(',').map(|(s, _)| s).unwrap_or(inner).trim();
            out.push(Query {
                panel: format!("variable {}", v["name"].as_str().unwrap_or_default()),
                expr: subst(series),
            });
        }
    }
    out
}
