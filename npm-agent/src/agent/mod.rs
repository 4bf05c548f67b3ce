//! The node agent: `npm-agent run` (the DaemonSet's entry point) and `npm-agent cleanup`
//! (uninstall).
//!
//! - [`config`]: defaults, config file and flags.
//! - [`run`]: the loop from a [`Source`] through the [`Engine`](crate::compile::Engine) to a
//!   dataplane, with readiness after the first full sync.
//! - [`status`]: the status file and per-event statistics.
//!
//! Stopping (SIGTERM, SIGINT) leaves enforcement in place: pinned programs, maps and links
//! (or, later, the iptables rules) keep enforcing while the next agent starts, and it
//! reconciles over them. [`cleanup`] removes everything the agent installed.

pub mod config;
pub mod run;
pub mod status;

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context as _, bail};

use crate::dataplane::Memory;
use crate::dataplane::ebpf::{EbpfConfig, EbpfDataplane};
use crate::source::{FilesSource, Source, SourceSpec};

pub use config::{Config, DataplaneKind, Settings};
pub use run::{Agent, AgentDataplane, Handles, SharedMemory};
pub use status::{EventStats, OpStats, Operation, Sample, Status};

/// Opens the source the configuration names.
pub fn open_source(config: &Config) -> anyhow::Result<Box<dyn Source>> {
    match &config.source {
        SourceSpec::Kube => bail!("kube source: not built yet"),
        SourceSpec::Files(dir) => {
            if !dir.is_dir() {
                tracing::warn!(dir = %dir.display(), "manifest directory does not exist (yet); waiting for it");
            }
            Ok(Box::new(FilesSource::new(dir.clone())))
        }
    }
}

/// Opens the dataplane the configuration names (`auto`: eBPF when the kernel loads the
/// programs, else iptables).
pub fn open_dataplane(config: &Config) -> anyhow::Result<AgentDataplane> {
    let ebpf = || EbpfDataplane::open(EbpfConfig { pin_root: config.pin_root.clone(), log_drops: config.log_drops, attach: true });
    match config.dataplane {
        DataplaneKind::Ebpf => Ok(AgentDataplane::Ebpf(Box::new(ebpf().context("eBPF dataplane")?))),
        DataplaneKind::Auto => match ebpf() {
            Ok(d) => Ok(AgentDataplane::Ebpf(Box::new(d))),
            Err(e) => bail!("eBPF dataplane unavailable ({e}); falling back to iptables: iptables dataplane: not built yet"),
        },
        DataplaneKind::Iptables => bail!("iptables dataplane: not built yet"),
        DataplaneKind::Memory => Ok(AgentDataplane::Other(Box::new(Memory::default()))),
    }
}

/// Builds the agent from a configuration.
pub fn build(config: &Config) -> anyhow::Result<Agent> {
    let source = open_source(config)?;
    let dataplane = open_dataplane(config)?;
    tracing::info!(dataplane = dataplane.name(), "dataplane open");
    Ok(Agent::new(&config.node_name, source, dataplane, config.status_file.clone()))
}

/// Runs the agent until `stop` is set.
pub fn run(config: &Config, stop: &AtomicBool) -> anyhow::Result<()> {
    build(config)?.run(stop)
}

/// Moves the process into the network namespace at `path` (as `ip netns exec` would, but
/// keeping the mount namespace). Affects only the calling thread: call it before any other
/// thread exists, first thing in `main`.
pub fn enter_netns(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
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
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
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
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Removes everything the agent installed: for the eBPF dataplane, the pin root (removing a
/// link's pin detaches its program, removing a map's pin frees the map once no program uses
/// it). Refuses a pin root that is not on a bpf filesystem. Later: the iptables chains and
/// sets.
pub fn cleanup(pin_root: &Path) -> anyhow::Result<Cleanup> {
    let mut report = Cleanup { pin_root: pin_root.to_path_buf(), ..Cleanup::default() };
    if !pin_root.exists() {
        return Ok(report);
    }
    report.existed = true;
    let c = std::ffi::CString::new(pin_root.as_os_str().as_encoded_bytes()).context("pin root path")?;
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
            std::fs::remove_file(entry.path()).with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    std::fs::remove_dir_all(pin_root).with_context(|| format!("removing {}", pin_root.display()))?;
    Ok(report)
}
