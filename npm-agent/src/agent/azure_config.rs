//! Azure NPM's own configuration, `azure-npm.json` (the key of its ConfigMap
//! `azure-npm-config`), read so that a migrating cluster's kept ConfigMap keeps working: the
//! settings that have a meaning here become the agent's, every other one is named in a
//! warning (never an error: Azure NPM's file has keys for its own internals).

use std::net::SocketAddr;

use serde_json::Value;

/// The settings of Azure NPM's file that mean something here (the agent's config takes them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AzureSettings {
    /// `ListeningAddress` and `ListeningPort`.
    pub metrics_addr: Option<SocketAddr>,
    /// `LogLevel`.
    pub log_level: Option<String>,
}

/// The name of Azure NPM's configuration file in its ConfigMap.
pub const AZURE_CONFIG_FILE: &str = "azure-npm.json";

/// Why each of Azure NPM's settings does not apply here.
const NOT_APPLICABLE: &[(&str, &str)] = &[
    ("ResyncPeriodInMinutes", "the agent follows watches and resynchronizes on its own"),
    ("ApplyMaxBatches", "the agent applies each batch of events as one diff"),
    ("ApplyIntervalInMilliseconds", "the agent applies each batch of events as one diff"),
    ("MaxBatchedACLsPerPod", "HNS ACLs are not batched per pod here"),
    ("NetPolInvervalInMilliseconds", "the agent applies each batch of events as one diff"),
    ("NetPolInervalInMilliseconds", "the agent applies each batch of events as one diff"),
    ("MaxPendingNetPols", "the agent applies each batch of events as one diff"),
    ("Transport", "there is no controller/daemon split: each node's agent watches the API"),
    ("Toggles.EnablePprof", "no profiling endpoint is served"),
    ("Toggles.EnableHTTPDebugAPI", "no debug API is served (nothing new on a public port)"),
    ("Toggles.EnableV2NPM", "the agent's iptables layout is Azure NPM v2's"),
    ("Toggles.PlaceAzureChainFirst", "the agent's FORWARD jump is always placed first"),
    ("Toggles.ApplyIPSetsOnNeed", "sets are created when a rule needs them"),
    ("Toggles.ApplyInBackground", "the agent applies each batch of events as one diff"),
    ("Toggles.NetPolInBackground", "the agent applies each batch of events as one diff"),
];

/// Settings from `azure-npm.json`'s text, and a warning for each setting that does not apply.
pub fn settings(text: &str) -> Result<(AzureSettings, Vec<String>), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{AZURE_CONFIG_FILE}: {e}"))?;
    let Value::Object(top) = v else {
        return Err(format!("{AZURE_CONFIG_FILE}: not a JSON object"));
    };
    let mut s = AzureSettings::default();
    let mut warnings = Vec::new();
    let mut address: Option<String> = None;
    let mut port: Option<u64> = None;
    let mut keys: Vec<(String, Value)> = Vec::new();
    for (k, v) in top {
        match (k.as_str(), v) {
            ("Toggles", Value::Object(t)) => {
                keys.extend(t.into_iter().map(|(tk, tv)| (format!("Toggles.{tk}"), tv)))
            }
            (_, v) => keys.push((k, v)),
        }
    }
    for (k, v) in keys {
        match (k.as_str(), &v) {
            ("ListeningAddress", Value::String(a)) => address = Some(a.clone()),
            ("ListeningPort", Value::Number(n)) if n.as_u64().is_some_and(|p| p <= 65535) => {
                port = n.as_u64()
            }
            ("LogLevel", Value::String(l)) => s.log_level = Some(l.to_lowercase()),
            ("Toggles.EnablePrometheusMetrics", Value::Bool(true)) => {}
            ("Toggles.EnablePrometheusMetrics", Value::Bool(false)) => warnings.push(format!(
                "{AZURE_CONFIG_FILE}: Toggles.EnablePrometheusMetrics is false, but the metrics \
                 are always served (with /healthz and /readyz, which the DaemonSet's probes need)"
            )),
            (
                "ListeningAddress"
                | "ListeningPort"
                | "LogLevel"
                | "Toggles.EnablePrometheusMetrics",
                _,
            ) => {
                return Err(format!("{AZURE_CONFIG_FILE}: {k}: unexpected value {v}"));
            }
            _ => match NOT_APPLICABLE.iter().find(|(name, _)| *name == k) {
                Some((_, why)) => warnings.push(format!(
                    "{AZURE_CONFIG_FILE}: {k} does not apply to npm-agent ({why}); ignored"
                )),
                None => warnings.push(format!(
                    "{AZURE_CONFIG_FILE}: {k} is not a setting of Azure NPM that npm-agent knows; \
                     ignored"
                )),
            },
        }
    }
    if address.is_some() || port.is_some() {
        let addr = format!("{}:{}", address.as_deref().unwrap_or("0.0.0.0"), port.unwrap_or(10091));
        s.metrics_addr = Some(addr.parse().map_err(|e| {
            format!("{AZURE_CONFIG_FILE}: ListeningAddress/ListeningPort {addr}: {e}")
        })?);
    }
    Ok((s, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azure NPM's file as its ConfigMap ships it (written from its documented keys).
    const AZURE: &str = r#"{
        "ResyncPeriodInMinutes": 15,
        "ListeningPort": 10091,
        "ListeningAddress": "0.0.0.0",
        "ApplyMaxBatches": 100,
        "ApplyIntervalInMilliseconds": 500,
        "MaxBatchedACLsPerPod": 30,
        "NetPolInvervalInMilliseconds": 500,
        "MaxPendingNetPols": 100,
        "Toggles": {
            "EnablePrometheusMetrics": true,
            "EnablePprof": true,
            "EnableHTTPDebugAPI": true,
            "EnableV2NPM": true,
            "PlaceAzureChainFirst": true,
            "ApplyIPSetsOnNeed": false,
            "ApplyInBackground": true,
            "NetPolInBackground": true
        },
        "Transport": {"Address": "azure-npm.kube-system.svc.cluster.local", "Port": 10092, "ServicePort": 9001},
        "LogLevel": "info"
    }"#;

    #[test]
    fn azure_settings_map_and_the_rest_is_named() {
        let (s, warnings) = settings(AZURE).unwrap();
        assert_eq!(s.metrics_addr, Some("0.0.0.0:10091".parse().unwrap()));
        assert_eq!(s.log_level.as_deref(), Some("info"));
        // One warning per setting that does not apply, naming it.
        for k in ["ResyncPeriodInMinutes", "Toggles.EnablePprof", "Transport", "MaxPendingNetPols"]
        {
            assert!(warnings.iter().any(|w| w.contains(k)), "{k}: {warnings:?}");
        }
        assert_eq!(warnings.len(), 14, "{warnings:#?}");
    }

    #[test]
    fn a_changed_port_moves_the_metrics_and_bad_values_are_errors() {
        let (s, w) =
            settings(r#"{"ListeningPort": 10095, "Toggles": {"EnablePrometheusMetrics": false}}"#)
                .unwrap();
        assert_eq!(s.metrics_addr, Some("0.0.0.0:10095".parse().unwrap()));
        assert!(w[0].contains("EnablePrometheusMetrics"), "{w:?}");
        let err = settings(r#"{"ListeningPort": "x"}"#).unwrap_err();
        assert!(err.contains("ListeningPort"), "{err}");
        assert!(settings("[1]").is_err());
        let (_, w) = settings(r#"{"Unheard": 1}"#).unwrap();
        assert!(w[0].contains("Unheard"), "{w:?}");
    }
}
