//! The process-wide registry of the lab's network namespaces, and what removes them.
//!
//! Namespace names carry the owning process id: `npl-<pid>-<seq>-…` ([`NAME_PREFIX`]). Every
//! namespace is recorded in the registry before it is created and leaves it when it is
//! deleted. Once per process, a SIGINT/SIGTERM/SIGHUP handler (installed by
//! [`Lab::new`](super::net::Lab::new) and by [`add_interrupt_hook`]) wakes a thread that runs
//! the interrupt hooks (what runs inside the lab: stopping agents, removing their pins),
//! deletes every registered namespace and exits with status 128 + signal. [`cleanup_stale`]
//! deletes lab namespaces whose owning process no longer exists (a run killed with SIGKILL or
//! crashed), and never those of a live process, so labs in concurrent processes do not disturb
//! each other; [`cleanup_prefix`] deletes one lab's namespaces whoever owns them.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::iproute::ip_batch;

/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every lab namespace name starts with this, followed by the owning process id and `-`.
pub const NAME_PREFIX: &str = "npl-";

/// A new lab's unique prefix of namespace names: `npl-<pid>-<seq>`.
pub(super) fn new_prefix() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    format!("{NAME_PREFIX}{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The named network namespaces (`ip netns list`).
pub fn list_netns() -> Result<Vec<String>> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in dir {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Deletes the lab namespaces whose owning process no longer exists (left by a run that was
/// killed with SIGKILL or crashed), including those of an earlier process that had this
/// process's id and that this process did not create. Namespaces of other running processes
/// are left alone. Returns the names deleted.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let me = std::process::id();
    let mut live = live();
    let stale: Vec<String> = list_netns()?
        .into_iter()
        .filter(|n| {
            owner_pid(n)
                .is_some_and(|pid| if pid == me { !live.contains(n) } else { !pid_alive(pid) })
        })
        .collect();
    delete_namespaces_locked(&mut live, &stale)?;
    Ok(stale)
}

/// Deletes every namespace whose name starts with `prefix`, which must start with
/// [`NAME_PREFIX`], whoever owns it. Returns the names deleted.
pub fn cleanup_prefix(prefix: &str) -> Result<Vec<String>> {
    ensure!(
        prefix.starts_with(NAME_PREFIX),
        "refusing to delete namespaces not named {NAME_PREFIX}*"
    );
    let names: Vec<String> = list_netns()?.into_iter().filter(|n| n.starts_with(prefix)).collect();
    delete_namespaces(&names)?;
    Ok(names)
}

/// Namespaces created by this process and not deleted yet, for the signal handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<String>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers and creates namespaces; the registry lock is held throughout, so the signal
/// handler sees either none or all of them.
pub(super) fn create_namespaces(names: &[String]) -> Result<()> {
    let mut live = live();
    for name in names {
        ensure!(!netns_path(name).exists(), "network namespace {name} already exists");
    }
    live.extend(names.iter().cloned());
    ip_batch(None, false, names.iter().map(|n| format!("netns add {n}")))
}

pub(super) fn delete_namespaces(names: &[String]) -> Result<()> {
    delete_namespaces_locked(&mut live(), names)
}

fn delete_namespaces_locked(live: &mut Vec<String>, names: &[String]) -> Result<()> {
    let result = ip_batch(
        None,
        true,
        names.iter().filter(|n| netns_path(n).exists()).map(|n| format!("netns delete {n}")),
    );
    live.retain(|n| !names.contains(n));
    let left: Vec<&String> = names.iter().filter(|n| netns_path(n).exists()).collect();
    match result {
        Err(e) if !left.is_empty() => Err(e.context(format!("namespaces left: {left:?}"))),
        _ if !left.is_empty() => bail!("namespaces left after deletion: {left:?}"),
        _ => Ok(()),
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(NAME_PREFIX)?.split('-').next()?.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    unsafe {
        libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
}

type Hook = (u64, Box<dyn Fn() + Send>);

/// Work to do on SIGINT/SIGTERM/SIGHUP before the namespaces go (stopping agents, removing
/// their pins), registered by what runs inside the lab.
static HOOKS: Mutex<Vec<Hook>> = Mutex::new(Vec::new());

fn hooks() -> MutexGuard<'static, Vec<Hook>> {
    HOOKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers `f` to run if the process is interrupted; returns an id for [`remove_interrupt_hook`].
pub fn add_interrupt_hook(f: impl Fn() + Send + 'static) -> Result<u64> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    install_signal_cleanup()?;
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    hooks().push((id, Box::new(f)));
    Ok(id)
}

pub fn remove_interrupt_hook(id: u64) {
    hooks().retain(|(i, _)| *i != id);
}

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: wake the cleanup thread.
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// Once per process: SIGINT, SIGTERM and SIGHUP (unless ignored) wake a thread that deletes
/// every registered lab namespace and exits with 128 + the signal number.
pub(super) fn install_signal_cleanup() -> Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| install_signal_cleanup_once().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn install_signal_cleanup_once() -> Result<()> {
    let mut fds = [0 as RawFd; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::thread::Builder::new()
        .name("npm-lab-signals".into())
        .spawn(move || {
            let mut pipe = File::from(read_end);
            let mut byte = [0u8];
            loop {
                match pipe.read(&mut byte) {
                    Ok(1) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    _ => return,
                }
            }
            let sig = i32::from(byte[0]);
            for hook in hooks().iter() {
                (hook.1)();
            }
            // Holding the registry until exit: no namespace can be created after this.
            let mut live = live();
            let names = live.clone();
            eprintln!("npm lab: signal {sig}: removing {} lab namespaces", names.len());
            if let Err(e) = delete_namespaces_locked(&mut live, &names) {
                eprintln!("npm lab: cleanup failed: {e:#}");
            }
            std::process::exit(128 + sig);
        })
        .context("starting the signal thread")?;
    SIGNAL_PIPE.store(write_end.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(write_end); // stays open for the life of the process
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error()).context("sigaction");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_parsed_from_lab_names_only() {
        assert_eq!(owner_pid("npl-1234-0-n0"), Some(1234));
        assert_eq!(owner_pid("npl-1234-12-p3"), Some(1234));
        assert_eq!(owner_pid("npl-x-0-n0"), None);
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("npl1234"), None);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
