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

pub mod config;
pub mod run;
pub mod status;

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

use crate::dataplane::Memory;
use crate::dataplane::ebpf::observe::EbpfObserver;
use crate::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use crate::dataplane::iptables::observe::IptablesObserver;
use crate::dataplane::iptables::{IptablesCleanup, IptablesConfig, IptablesDataplane};
use crate::dataplane::observe::Observer;
use crate::metrics::{Metrics, MetricsOptions};
use crate::source::{FilesSource, KubeOptions, KubeSource, Source, SourceSpec};

pub use config::{Config, DataplaneKind, Settings};
pub use run::{Agent, AgentDataplane, Handles, SharedMemory};
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

/// Opens the dataplane the configuration names (`auto`: eBPF when the kernel loads the
/// programs, else iptables, saying why).
pub fn open_dataplane(config: &Config) -> anyhow::Result<AgentDataplane> {
    let ebpf = || {
        EbpfDataplane::open(EbpfConfig {
            pin_root: config.pin_root.clone(),
            log_drops: config.log_drops,
            attach: true,
        })
    };
    let iptables = || IptablesDataplane::open(IptablesConfig::default());
    match config.dataplane {
        DataplaneKind::Ebpf => {
            Ok(AgentDataplane::Ebpf(Box::new(ebpf().context("eBPF dataplane")?)))
        }
        DataplaneKind::Auto => match ebpf() {
            Ok(d) => Ok(AgentDataplane::Ebpf(Box::new(d))),
            Err(e) => {
                tracing::warn!(reason = %e, "the eBPF dataplane is unavailable; falling back to iptables");
                let d = iptables().with_context(|| {
                    format!("eBPF dataplane unavailable ({e}); iptables dataplane")
                })?;
                Ok(AgentDataplane::Other(Box::new(d)))
            }
        },
        DataplaneKind::Iptables => {
            Ok(AgentDataplane::Other(Box::new(iptables().context("iptables dataplane")?)))
        }
        DataplaneKind::Memory => Ok(AgentDataplane::Other(Box::new(Memory::default()))),
    }
}

/// Once the agent is ready (its dataplane enforces the whole plan), removes what the other
/// dataplane left on this node: the AZURE-NPM chains and azure-npm- sets under eBPF, the
/// pin root under iptables. Never before, so switching modes opens no unprotected moment.
fn cleanup_other_dataplane_when_ready(
    config: &Config,
    dataplane: &str,
    handles: crate::agent::Handles,
) {
    let job: Box<dyn FnOnce() + Send> = match dataplane {
        "ebpf" => Box::new(|| {
            let r = crate::dataplane::iptables::cleanup(None);
            let chains: usize = r.chains.iter().map(|(_, n)| n).sum();
            if chains + r.sets > 0 {
                tracing::info!(chains, sets = r.sets, "removed what the iptables dataplane left");
            }
            for p in r.problems {
                tracing::warn!("removing what the iptables dataplane left: {p}");
            }
        }),
        "iptables" => {
            let pin_root = config.pin_root.clone();
            Box::new(move || match cleanup_ebpf(&pin_root) {
                Ok(r) if r.existed => {
                    tracing::info!(pin_root = %pin_root.display(), links = r.links, maps = r.maps, "removed what the eBPF dataplane left")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "removing what the eBPF dataplane left")
                }
            })
        }
        _ => return,
    };
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
    let dataplane = open_dataplane(config)?;
    tracing::info!(dataplane = dataplane.name(), "dataplane open");
    let metrics = Arc::new(Metrics::new(metrics_options(config, dataplane.name())));
    let name = dataplane.name();
    let agent = Agent::with_metrics(
        &config.node_name,
        source,
        dataplane,
        config.status_file.clone(),
        metrics,
    );
    cleanup_other_dataplane_when_ready(config, name, agent.handles());
    Ok(agent)
}

/// The metrics of a dataplane: its figures are read from the kernel at scrape time (the
/// pinned maps of the eBPF dataplane; iptables-save and ipset for iptables).
pub fn metrics_options(config: &Config, dataplane: &str) -> MetricsOptions {
    let observer: Option<Box<dyn Observer>> = match dataplane {
        "ebpf" => Some(Box::new(EbpfObserver::new(&config.pin_root))),
        "iptables" => Some(Box::new(IptablesObserver::default())),
        _ => None,
    };
    MetricsOptions { dataplane: dataplane.to_string(), advanced: config.advanced_metrics, observer }
}

/// Runs the agent until `stop` is set, serving its metrics on the metrics address.
pub fn run(config: &Config, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut agent = build(config)?;
    let _server =
        crate::metrics::server::spawn(config.metrics_addr, agent.handles().metrics.clone());
    agent.run(stop)
}

/// Moves the process into the network namespace at `path` (as `ip netns exec` would, but
/// keeping the mount namespace). Affects only the calling thread: call it before any other
/// thread exists, first thing in `main`.
pub fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: a valid file descriptor and a namespace type flag.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("entering network namespace {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT set the returned flag (the run loop stops within 200 ms).
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

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    pub pin_root: PathBuf,
    /// Pinned links removed (each detaching its program from an interface).
    pub links: usize,
    /// Pinned maps removed.
    pub maps: usize,
    /// Whether the pin root existed.
    pub existed: bool,
    /// The iptables dataplane's chains and sets removed.
    pub iptables: IptablesCleanup,
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Removes everything the agent installed: the iptables dataplane's chains (every
/// `AZURE-NPM…` chain and FORWARD's jump, in both iptables backends) and sets (every
/// `azure-npm-…` set), and the eBPF dataplane's pin root (removing a link's pin detaches its
/// program, removing a map's pin frees the map once no program uses it). Refuses a pin root
/// that is not on a bpf filesystem.
pub fn cleanup(pin_root: &Path) -> anyhow::Result<Cleanup> {
    let iptables = crate::dataplane::iptables::cleanup(None);
    let mut report = cleanup_ebpf(pin_root)?;
    report.iptables = iptables;
    Ok(report)
}

/// Removes the eBPF dataplane's pin root (see [`cleanup`]).
pub fn cleanup_ebpf(pin_root: &Path) -> anyhow::Result<Cleanup> {
    let mut report = Cleanup { pin_root: pin_root.to_path_buf(), ..Cleanup::default() };
    if !pin_root.exists() {
        return Ok(report);
    }
    report.existed = true;
    let c =
        std::ffi::CString::new(pin_root.as_os_str().as_encoded_bytes()).context("pin root path")?;
    // SAFETY: statfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!("statfs {}: {}", pin_root.display(), std::io::Error::last_os_error());
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        bail!("{} is not on a bpf filesystem; refusing to remove it", pin_root.display());
    }
    let count = |sub: &str| std::fs::read_dir(pin_root.join(sub)).map(|d| d.count()).unwrap_or(0);
    report.links = count("links");
    report.maps = count("maps");
    // Links first, so programs leave the interfaces before their maps go.
    if let Ok(dir) = std::fs::read_dir(pin_root.join("links")) {
        for entry in dir.flatten() {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    std::fs::remove_dir_all(pin_root)
        .with_context(|| format!("removing {}", pin_root.display()))?;
    Ok(report)
}
