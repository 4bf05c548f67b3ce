//! Entering a network namespace, given its file (e.g. `/run/netns/<name>`).
//!
//! `setns(fd, CLONE_NEWNET)` moves only the calling thread, so there are three ways to use a
//! namespace, and this module writes each once:
//! - [`enter`]: the calling thread, for good; checked against `/proc/thread-self/ns/net`. For
//!   the first thing in `main` before any other thread exists (`npm-agent run --netns`), or a
//!   thread dedicated to the namespace (the thread's sockets, interface indexes, routes and
//!   `/proc/sys/net` are the namespace's from then on).
//! - [`run_in`]: a closure on a scoped thread that enters the namespace (checked) and ends;
//!   sockets the closure creates belong to the namespace. The calling thread never moves.
//! - [`command`]: a child process that enters the namespace between fork and exec. It keeps
//!   the caller's mount namespace, unlike `ip netns exec`, which remounts /sys and so hides
//!   /sys/fs/bpf.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Moves the calling thread (only it) into the network namespace at `netns` and checks that it
/// did.
pub fn enter(netns: &Path) -> Result<()> {
    let file = open(netns)?;
    enter_file(&file).with_context(|| entering(netns))
}

/// Runs `f` on a new thread that has entered the network namespace at `netns`; sockets `f`
/// creates belong to that namespace. The calling thread never changes namespace.
pub fn run_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = open(netns)?;
    std::thread::scope(|s| {
        let handle = s.spawn(|| -> io::Result<T> {
            enter_file(&file)?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r.with_context(|| entering(netns)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A command whose child enters the network namespace at `netns` between fork and exec. The
/// error is opening the namespace's file.
pub fn command(netns: &Path, program: impl AsRef<OsStr>) -> io::Result<Command> {
    let file = File::open(netns)?;
    let mut cmd = Command::new(program);
    // SAFETY: only setns(2), which is async-signal-safe, runs in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn open(netns: &Path) -> Result<File> {
    File::open(netns).with_context(|| format!("opening network namespace {}", netns.display()))
}

fn entering(netns: &Path) -> String {
    format!("entering network namespace {}", netns.display())
}

/// Moves the calling thread into the network namespace `ns` and checks that it did.
fn enter_file(ns: &File) -> io::Result<()> {
    // SAFETY: a valid file descriptor and a namespace type flag.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let want = ns.metadata()?;
    let now = std::fs::metadata("/proc/thread-self/ns/net")?;
    if (want.dev(), want.ino()) != (now.dev(), now.ino()) {
        return Err(io::Error::other("setns did not move the thread into the namespace"));
    }
    Ok(())
}

/// A network namespace made for the caller (`ip netns add NAME`) and deleted when dropped: the
/// scratch namespace of a test or a benchmark.
pub struct Scratch {
    name: String,
}

impl Scratch {
    pub fn new(name: impl Into<String>) -> Result<Scratch> {
        let name = name.into();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running `ip netns add`")?;
        anyhow::ensure!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Scratch { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for [`enter`], [`run_in`] and [`command`].
    pub fn path(&self) -> std::path::PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}
