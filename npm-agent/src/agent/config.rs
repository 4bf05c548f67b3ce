//! The agent's configuration: defaults, overridden by a config file (YAML, mounted from a
//! ConfigMap), overridden by flags. Every key of the file is also a flag of `npm-agent run`.
//!
//! A file that sets some keys keeps the defaults of the others (Azure NPM turns every key a
//! file leaves out false, a trap its users hit), and a key the agent does not know is
//! rejected with an error naming it rather than silently ignored. Keys are spelled as the
//! flags are (`node-name`); the camelCase spelling (`nodeName`) is accepted too.
//!
//! ```yaml
//! source: files:/etc/npm/manifests   # or kube
//! dataplane: auto                    # auto | ebpf | iptables (Linux) | hns (Windows)
//! node-name: node-1                  # default: $NODE_NAME, then the hostname
//! metrics-addr: 0.0.0.0:10091
//! pin-root: /sys/fs/bpf/npm-rs
//! log-drops: false                  # log every drop event the dataplane reports
//! drop-events-rate: 10               # drop events per second per CPU (0: none)
//! drop-events-burst: 20              # … and at once after a quiet time
//! drops-socket: /run/npm/drops.sock  # where `npm-agent drops` reads them
//! drop-metrics-pod-labels: false     # npm_drop_events_total by pod (cardinality!)
//! status-file: /run/npm/status.json
//! advanced-metrics: true             # npm_ipset_counts (false: not exported)
//! log-level: info                    # an EnvFilter directive; default: $RUST_LOG, then info
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context as _;
use serde::{Deserialize, Deserializer};

use crate::dataplane::ebpf::DEFAULT_PIN_ROOT;
use crate::source::SourceSpec;

pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:10091";
/// Where `npm-agent drops` finds the agent's drop events.
pub const DEFAULT_DROPS_SOCKET: &str = "/run/npm/drops.sock";

/// Which dataplane enforces the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneKind {
    /// eBPF when the kernel loads the programs, else iptables.
    #[default]
    Auto,
    Ebpf,
    Iptables,
    /// Windows: the Host Networking Service's SetPolicies and endpoint ACLs.
    Hns,
    /// Keeps the plan in memory and enforces nothing (tests).
    #[value(hide = true)]
    Memory,
}

impl std::fmt::Display for DataplaneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataplaneKind::Auto => "auto",
            DataplaneKind::Ebpf => "ebpf",
            DataplaneKind::Iptables => "iptables",
            DataplaneKind::Hns => "hns",
            DataplaneKind::Memory => "memory",
        })
    }
}

/// Every setting, each optional: what a config file or the flags set. [`Settings::resolve`]
/// fills in the defaults.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Where objects come from: `kube` (in-cluster config or KUBECONFIG) or `files:DIR` (a
    /// directory of manifests, watched for changes). [default: kube]
    #[arg(long, value_name = "kube|files:DIR")]
    #[serde(default, deserialize_with = "from_str_opt")]
    pub source: Option<SourceSpec>,

    /// The dataplane: auto (on Linux eBPF when the kernel supports it, else iptables; on
    /// Windows hns), ebpf, iptables or hns. [default: auto]
    #[arg(long)]
    #[serde(default)]
    pub dataplane: Option<DataplaneKind>,

    /// This node's name (pods scheduled here are enforced). [default: $NODE_NAME, then the
    /// hostname]
    #[arg(long)]
    #[serde(default, alias = "nodeName")]
    pub node_name: Option<String>,

    /// Where metrics, /healthz and /readyz are served. [default: 0.0.0.0:10091]
    #[arg(long)]
    #[serde(default, alias = "metricsAddr", deserialize_with = "from_str_opt")]
    pub metrics_addr: Option<SocketAddr>,

    /// Where the eBPF dataplane pins its maps and links. [default: /sys/fs/bpf/npm-rs]
    #[arg(long)]
    #[serde(default, alias = "pinRoot")]
    pub pin_root: Option<PathBuf>,

    /// Log every drop event (see --drop-events-rate). [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default, alias = "logDrops")]
    pub log_drops: Option<bool>,

    /// Drop events the eBPF programs may send, per second and CPU: the rest are counted as
    /// suppressed, not reported (0: none). [default: 10]
    #[arg(long, value_name = "N")]
    #[serde(default, alias = "dropEventsRate")]
    pub drop_events_rate: Option<u32>,

    /// Drop events a CPU may send at once after a quiet time. [default: 20]
    #[arg(long, value_name = "N")]
    #[serde(default, alias = "dropEventsBurst")]
    pub drop_events_burst: Option<u32>,

    /// The local socket `npm-agent drops` reads drop events from (inside the agent's pod;
    /// nothing is served on the network). [default: /run/npm/drops.sock]
    #[arg(long, value_name = "PATH")]
    #[serde(default, alias = "dropsSocket")]
    pub drops_socket: Option<PathBuf>,

    /// Count drop events by namespace and pod in `npm_drop_events_total` (one series per
    /// pod that drops: mind the cardinality). [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default, alias = "dropMetricsPodLabels")]
    pub drop_metrics_pod_labels: Option<bool>,

    /// After each applied batch, write the agent's status as JSON to this file (atomically).
    #[arg(long)]
    #[serde(default, alias = "statusFile")]
    pub status_file: Option<PathBuf>,

    /// Advanced metrics: `npm_ipset_counts`, the entries of each set (one series per set).
    /// Exported by default, as Azure NPM does: the collector chooses (Azure Monitor's
    /// `collect_advanced_metrics`, or the scrape job's drop rule). [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default, alias = "advancedMetrics")]
    pub advanced_metrics: Option<bool>,

    /// Log filter, as RUST_LOG takes it (`info`, `npm_agent=debug`). [default: $RUST_LOG,
    /// then info]
    #[arg(long)]
    #[serde(default, alias = "logLevel")]
    pub log_level: Option<String>,
}

fn from_str_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
}

/// The configuration the agent runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub source: SourceSpec,
    pub dataplane: DataplaneKind,
    pub node_name: String,
    pub metrics_addr: SocketAddr,
    pub pin_root: PathBuf,
    pub log_drops: bool,
    pub drop_events: crate::agent::drops::DropEventConfig,
    pub status_file: Option<PathBuf>,
    pub advanced_metrics: bool,
    /// `None`: RUST_LOG, then `info`.
    pub log_level: Option<String>,
    /// What loading the configuration has to say (settings of Azure NPM's file that do not
    /// apply), logged once logging is set up.
    pub warnings: Vec<String>,
}

impl Settings {
    /// Parses a config file's text. Unknown keys are errors naming the key.
    pub fn from_yaml(text: &str) -> Result<Settings, String> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if value.is_null() {
            return Ok(Settings::default());
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
        })
    }

    /// The settings of a config file and of Azure NPM's file (see [`Config::load`]).
    pub fn from_files(path: &Path, warnings: &mut Vec<String>) -> anyhow::Result<Settings> {
        use super::azure_config::{AZURE_CONFIG_FILE, settings};
        let azure = |p: &Path, warnings: &mut Vec<String>| -> anyhow::Result<Settings> {
            let text = crate::input::read_file(p).context("reading Azure NPM's config file")?;
            let (s, w) =
                settings(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", p.display()))?;
            warnings.extend(w);
            Ok(Settings {
                metrics_addr: s.metrics_addr,
                log_level: s.log_level,
                ..Settings::default()
            })
        };
        if path.extension().is_some_and(|e| e == "json") {
            return azure(path, warnings);
        }
        let beside = path.with_file_name(AZURE_CONFIG_FILE);
        match (path.exists(), beside.exists()) {
            (false, true) => {
                warnings.push(format!(
                    "{} is missing: running with Azure NPM's {} beside it",
                    path.display(),
                    beside.display()
                ));
                azure(&beside, warnings)
            }
            (true, true) => Ok(azure(&beside, warnings)?.overridden_by(Settings::from_file(path)?)),
            _ => Settings::from_file(path),
        }
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = crate::input::read_file(path).context("reading the config file")?;
        Settings::from_yaml(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// These settings, with every setting that `over` sets replaced by its value.
    pub fn overridden_by(self, over: Settings) -> Settings {
        Settings {
            source: over.source.or(self.source),
            dataplane: over.dataplane.or(self.dataplane),
            node_name: over.node_name.or(self.node_name),
            metrics_addr: over.metrics_addr.or(self.metrics_addr),
            pin_root: over.pin_root.or(self.pin_root),
            log_drops: over.log_drops.or(self.log_drops),
            drop_events_rate: over.drop_events_rate.or(self.drop_events_rate),
            drop_events_burst: over.drop_events_burst.or(self.drop_events_burst),
            drops_socket: over.drops_socket.or(self.drops_socket),
            drop_metrics_pod_labels: over.drop_metrics_pod_labels.or(self.drop_metrics_pod_labels),
            status_file: over.status_file.or(self.status_file),
            advanced_metrics: over.advanced_metrics.or(self.advanced_metrics),
            log_level: over.log_level.or(self.log_level),
        }
    }

    /// Fills in the defaults of the settings left unset.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let node_name = match self.node_name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => {
                default_node_name().context("no node name: give --node-name or set NODE_NAME")?
            }
        };
        Ok(Config {
            source: self.source.unwrap_or(SourceSpec::Kube),
            dataplane: self.dataplane.unwrap_or_default(),
            node_name,
            metrics_addr: self
                .metrics_addr
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("valid default")),
            pin_root: self.pin_root.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_ROOT)),
            log_drops: self.log_drops.unwrap_or(false),
            drop_events: crate::agent::drops::DropEventConfig {
                per_second: self.drop_events_rate.unwrap_or(10),
                burst: self.drop_events_burst.unwrap_or(20),
                socket: self.drops_socket.unwrap_or_else(|| PathBuf::from(DEFAULT_DROPS_SOCKET)),
                pod_labels: self.drop_metrics_pod_labels.unwrap_or(false),
            },
            status_file: self.status_file,
            advanced_metrics: self.advanced_metrics.unwrap_or(true),
            log_level: self.log_level,
            warnings: Vec::new(),
        })
    }
}

impl Config {
    /// Defaults, then the config file (if any), then the flags.
    ///
    /// Azure NPM's own file is read too (see [`super::azure_config`]): given as the config
    /// file (`*.json`), or found beside it (`azure-npm.json` in the same directory: the
    /// ConfigMap mounted there is Azure NPM's, kept, or holds both keys), under the agent's
    /// own file, which wins where both set a setting.
    pub fn load(config_file: Option<&Path>, flags: Settings) -> anyhow::Result<Config> {
        let mut warnings = Vec::new();
        let file = match config_file {
            Some(p) => Settings::from_files(p, &mut warnings)?,
            None => Settings::default(),
        };
        let mut config = file.overridden_by(flags).resolve()?;
        config.warnings = warnings;
        Ok(config)
    }
}

/// `$NODE_NAME`, then the hostname.
pub fn default_node_name() -> Option<String> {
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return Some(n);
    }
    hostname()
}

#[cfg(windows)]
fn hostname() -> Option<String> {
    std::env::var("COMPUTERNAME").ok().filter(|n| !n.is_empty()).map(|n| n.to_lowercase())
}

#[cfg(unix)]
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it (or
    // truncates, which the search for NUL below tolerates).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let e = Settings::from_yaml("dataplane: ebpf\nlogDrop: true\n").unwrap_err();
        assert!(e.contains("logDrop"), "{e}");
    }

    #[test]
    fn missing_keys_keep_defaults_and_flags_win() {
        let file =
            Settings::from_yaml("log-drops: true\nnodeName: n7\nsource: files:/m\n").unwrap();
        let flags = Settings { node_name: Some("n9".into()), ..Settings::default() };
        let c = file.overridden_by(flags).resolve().unwrap();
        assert!(c.log_drops);
        assert_eq!(c.node_name, "n9");
        assert_eq!(c.source, SourceSpec::Files("/m".into()));
        assert_eq!(c.dataplane, DataplaneKind::Auto);
        assert!(c.advanced_metrics);
        assert_eq!(c.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
        assert_eq!(c.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Settings::from_yaml("").unwrap(), Settings::default());
        assert_eq!(Settings::from_yaml("# nothing\n").unwrap(), Settings::default());
    }

    #[test]
    fn bad_values_are_named() {
        let e = Settings::from_yaml("source: cluster\n").unwrap_err();
        assert!(e.contains("cluster"), "{e}");
        let e = Settings::from_yaml("dataplane: nft\n").unwrap_err();
        assert!(e.contains("nft"), "{e}");
    }
}
