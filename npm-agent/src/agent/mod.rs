//! The node agent: `npm-agent run` (the DaemonSet's entry point) and `npm-agent cleanup`
//! (uninstall).
//!
//! - [`config`]: defaults, config file and flags.
//! - [`run`]: the loop from a [`Source`] through the [`Engine`](crate::compile::Engine) to a
//!   dataplane, with readiness after the first full sync.
//! - [`status`]: the status file and per-event statistics.
//!
//! Stopping (SIGTERM, SIGINT) leaves enforcement in place: pinned programs, maps and links
//! (or the iptables chains and sets) keep enforcing while the next agent starts, and it
//! reconciles over them. [`cleanup`] removes everything the agent installed.

pub mod azure_config;
pub mod config;
pub mod drops;
pub mod run;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::dataplane::{Dataplane, Memory};
use crate::metrics::{Metrics, MetricsOptions};
use crate::source::{FilesSource, KubeOptions, KubeSource, Source, SourceSpec};

pub use config::{Config, DataplaneKind, Settings};
pub use run::{Agent, Handles, SharedMemory};
pub use status::{EventStats, OpStats, Operation, Sample, Status};

/// Opens the source the configuration names.
pub fn open_source(config: &Config) -> anyhow::Result<Box<dyn Source>> {
    match &config.source {
        SourceSpec::Kube => {
            Ok(Box::new(KubeSource::connect(KubeOptions::new(config.node_name.clone()))?))
        }
        SourceSpec::Files(dir) => {
            if !dir.is_dir() {
                tracing::warn!(dir = %dir.display(), "manifest directory does not exist (yet); waiting for it");
            }
            Ok(Box::new(FilesSource::new(dir.clone())))
        }
    }
}

/// Opens the dataplane the configuration names (`auto`: on Linux eBPF when the kernel loads
/// the programs, else iptables, saying why; on Windows HNS), and says which it opened.
pub fn open_dataplane(config: &Config) -> anyhow::Result<(DataplaneKind, Box<dyn Dataplane>)> {
    if config.dataplane == DataplaneKind::Memory {
        return Ok((DataplaneKind::Memory, Box::new(Memory::default())));
    }
    platform::open_dataplane(config)
}

#[cfg(target_os = "linux")]
mod platform {
    use anyhow::Context as _;

    use super::{Config, DataplaneKind};
    use crate::dataplane::Dataplane;
    use crate::dataplane::ebpf::{self, EbpfCleanup, EbpfConfig, EbpfDataplane};
    use crate::dataplane::iptables::{self, IptablesCleanup, IptablesConfig, IptablesDataplane};

    pub fn open_dataplane(config: &Config) -> anyhow::Result<(DataplaneKind, Box<dyn Dataplane>)> {
        let ebpf = || {
            EbpfDataplane::open(EbpfConfig {
                pin_root: config.pin_root.clone(),
                drop_events: ebpf::events::EventRate {
                    per_second: config.drop_events.per_second,
                    burst: config.drop_events.burst,
                },
                attach: true,
            })
        };
        let iptables = || IptablesDataplane::open(IptablesConfig::default());
        Ok(match config.dataplane {
            DataplaneKind::Ebpf => {
                (DataplaneKind::Ebpf, Box::new(ebpf().context("eBPF dataplane")?))
            }
            DataplaneKind::Auto => match ebpf() {
                Ok(d) => (DataplaneKind::Ebpf, Box::new(d)),
                Err(e) => {
                    tracing::warn!(reason = %e, "the eBPF dataplane is unavailable; falling back to iptables");
                    let d = iptables().with_context(|| {
                        format!("eBPF dataplane unavailable ({e}); iptables dataplane")
                    })?;
                    (DataplaneKind::Iptables, Box::new(d))
                }
            },
            DataplaneKind::Iptables => {
                (DataplaneKind::Iptables, Box::new(iptables().context("iptables dataplane")?))
            }
            DataplaneKind::Hns => {
                anyhow::bail!("the hns dataplane runs on Windows nodes only (this is Linux)")
            }
            DataplaneKind::Memory => unreachable!("opened by the caller"),
        })
    }

    /// Once the agent is ready (its dataplane enforces the whole plan), removes what the
    /// other dataplane left on this node: the AZURE-NPM chains and azure-npm- sets under
    /// eBPF, the pin root under iptables. Never before, so switching modes opens no
    /// unprotected moment.
    pub fn cleanup_other_dataplane(
        config: &Config,
        running: DataplaneKind,
    ) -> Option<Box<dyn FnOnce() + Send>> {
        Some(match running {
            DataplaneKind::Ebpf => Box::new(|| {
                let r = iptables::cleanup(None);
                let chains: usize = r.chains.iter().map(|(_, n)| n).sum();
                if chains + r.sets > 0 {
                    tracing::info!(
                        chains,
                        sets = r.sets,
                        "removed what the iptables dataplane left"
                    );
                }
                for p in r.problems {
                    tracing::warn!("removing what the iptables dataplane left: {p}");
                }
            }),
            DataplaneKind::Iptables => {
                let pin_root = config.pin_root.clone();
                Box::new(move || match ebpf::cleanup(&pin_root) {
                    Ok(r) if r.existed => {
                        tracing::info!(pin_root = %pin_root.display(), links = r.links, maps = r.maps, "removed what the eBPF dataplane left")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "removing what the eBPF dataplane left"),
                })
            }
            DataplaneKind::Auto | DataplaneKind::Hns | DataplaneKind::Memory => return None,
        })
    }

    /// What [`cleanup`] removed.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Cleanup {
        /// The eBPF dataplane's pin root.
        pub ebpf: EbpfCleanup,
        /// The iptables dataplane's chains and sets removed.
        pub iptables: IptablesCleanup,
    }

    /// Removes everything the agent installed: the iptables dataplane's chains (every
    /// `AZURE-NPM…` chain and FORWARD's jump, in both iptables backends) and sets (every
    /// `azure-npm-…` set), and the eBPF dataplane's pin root (see [`ebpf::cleanup`]).
    pub fn cleanup(pin_root: &std::path::Path) -> anyhow::Result<Cleanup> {
        let iptables = iptables::cleanup(None);
        let ebpf = ebpf::cleanup(pin_root)?;
        Ok(Cleanup { ebpf, iptables })
    }
}

#[cfg(windows)]
mod platform {
    use anyhow::Context as _;

    use super::{Config, DataplaneKind};
    use crate::dataplane::Dataplane;
    use crate::dataplane::hns::HnsDataplane;
    use crate::dataplane::hns::windows::WindowsHcn;
    use crate::plan::Plan;

    /// The HCN network of the pods: `$NPM_HNS_NETWORK`, else Azure CNI's `azure`.
    fn network_name() -> String {
        std::env::var("NPM_HNS_NETWORK")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "azure".into())
    }

    fn open_hns() -> anyhow::Result<HnsDataplane<WindowsHcn>> {
        let name = network_name();
        let hcn = WindowsHcn::open(&name).with_context(|| format!("the HCN network {name:?}"))?;
        Ok(HnsDataplane::new(hcn))
    }

    pub fn open_dataplane(config: &Config) -> anyhow::Result<(DataplaneKind, Box<dyn Dataplane>)> {
        match config.dataplane {
            DataplaneKind::Auto | DataplaneKind::Hns => {
                Ok((DataplaneKind::Hns, Box::new(open_hns().context("hns dataplane")?)))
            }
            other => {
                anyhow::bail!("the {other} dataplane runs on Linux nodes only (this is Windows)")
            }
        }
    }

    pub fn cleanup_other_dataplane(
        _config: &Config,
        _running: DataplaneKind,
    ) -> Option<Box<dyn FnOnce() + Send>> {
        None
    }

    /// What [`cleanup`] removed.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Cleanup {
        /// The endpoints' ACLs and the network's SetPolicies were removed.
        pub hns: bool,
    }

    /// Removes the HNS dataplane's ACLs and SetPolicies (a reconcile to an empty plan).
    pub fn cleanup(_pin_root: &std::path::Path) -> anyhow::Result<Cleanup> {
        let mut d = open_hns()?;
        d.reconcile(&Plan::default())?;
        Ok(Cleanup { hns: true })
    }
}

pub use platform::{Cleanup, cleanup};

/// Once the agent is ready, removes what the other dataplane left (see the platform's
/// `cleanup_other_dataplane`), on a thread of its own.
fn cleanup_other_dataplane_when_ready(
    config: &Config,
    running: DataplaneKind,
    handles: crate::agent::Handles,
) {
    let Some(job) = platform::cleanup_other_dataplane(config, running) else { return };
    let spawned = std::thread::Builder::new().name("cleanup-other".into()).spawn(move || {
        while !handles.status().ready {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        job();
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "not removing what the other dataplane left");
    }
}

/// Builds the agent from a configuration.
pub fn build(config: &Config) -> anyhow::Result<Agent> {
    let source = open_source(config)?;
    let (kind, dataplane) = open_dataplane(config)?;
    tracing::info!(dataplane = dataplane.name(), "dataplane open");
    let metrics = Arc::new(Metrics::new(metrics_options(config, dataplane.as_ref())));
    let mut agent = Agent::with_metrics(
        &config.node_name,
        source,
        dataplane,
        config.status_file.clone(),
        metrics,
    );
    let hub = agent.take_drop_events(config.log_drops).unwrap_or_else(|| {
        crate::drops::Hub::unavailable(format!(
            "the {} dataplane reports no drop events (the eBPF dataplane does); npm_packets_dropped_total counts its drops, `iptables-save -c` shows which rules dropped them",
            kind
        ))
    });
    serve_drops(config, hub);
    cleanup_other_dataplane_when_ready(config, kind, agent.handles());
    Ok(agent)
}

/// Serves drop events to `npm-agent drops` on the configured socket.
#[cfg(unix)]
fn serve_drops(config: &Config, hub: Arc<crate::drops::Hub>) {
    match crate::drops::server::serve(&config.drop_events.socket, hub) {
        Ok(path) => tracing::info!(socket = %path.display(), "serving drop events"),
        Err(e) => tracing::warn!(error = %format!("{e:#}"), "not serving drop events"),
    }
}

#[cfg(not(unix))]
fn serve_drops(_config: &Config, _hub: Arc<crate::drops::Hub>) {}

/// The metrics of a dataplane: its figures are read from the kernel at scrape time by its
/// observer (the pinned maps of the eBPF dataplane; iptables-save and ipset for iptables).
pub fn metrics_options(config: &Config, dataplane: &dyn Dataplane) -> MetricsOptions {
    MetricsOptions {
        dataplane: dataplane.name().to_string(),
        advanced: config.advanced_metrics,
        observer: dataplane.observer(),
        drop_pod_labels: config.drop_events.pod_labels,
    }
}

/// Runs the agent until `stop` is set, serving its metrics on the metrics address.
pub fn run(config: &Config, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut agent = build(config)?;
    let _server =
        crate::metrics::server::spawn(config.metrics_addr, agent.handles().metrics.clone());
    agent.run(stop)
}

static STOP: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes Ctrl-C, Ctrl-Break, closing and shutdown set the returned flag (a HostProcess
/// container is stopped with these console events).
#[cfg(windows)]
pub fn stop_on_signals() -> &'static AtomicBool {
    unsafe extern "system" fn on_event(_: u32) -> windows::core::BOOL {
        STOP.store(true, Ordering::SeqCst);
        true.into()
    }
    // SAFETY: the handler only stores into an atomic.
    if let Err(e) =
        unsafe { windows::Win32::System::Console::SetConsoleCtrlHandler(Some(on_event), true) }
    {
        tracing::warn!("the agent cannot catch console stop events: {e}");
    }
    &STOP
}

/// Makes SIGTERM and SIGINT set the returned flag (the run loop stops within 200 ms).
#[cfg(unix)]
pub fn stop_on_signals() -> &'static AtomicBool {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    &STOP
}

/// Logs to stderr, filtered by `level` (an EnvFilter directive), else RUST_LOG, else info.
pub fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|e| {
            eprintln!("npm-agent: invalid log level {l:?} ({e}); using info");
            EnvFilter::new("info")
        }),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}
