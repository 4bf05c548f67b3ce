//! iproute2 and sysctls in the lab's namespaces: `ip -batch` runs (with `-n <lab namespace>`
//! for everything but `netns add`/`netns delete`, so nothing touches the root namespace's
//! interfaces or routes) and the sysctls every lab namespace gets, written from a thread inside
//! the namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::netns;

/// Runs `ip [-n netns] [-force] -batch -` with `lines` as its commands.
pub(super) fn ip_batch(
    netns: Option<&str>,
    force: bool,
    lines: impl IntoIterator<Item = String>,
) -> Result<()> {
    let lines: Vec<String> = lines.into_iter().collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running `ip` (iproute2)")?;
    let mut input = lines.join("\n");
    input.push('\n');
    let written = child.stdin.take().expect("stdin is piped").write_all(input.as_bytes());
    let out = child.wait_with_output().context("waiting for `ip`")?;
    written.context("writing commands to `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch` failed: {}\ncommands:\n  {}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n  ")
        );
    }
    Ok(())
}

/// The sysctls every lab namespace gets (paths under /proc/sys/net).
pub(super) fn namespace_sysctls() -> Vec<(&'static str, &'static str)> {
    vec![
        ("ipv4/conf/all/rp_filter", "0"),
        ("ipv4/conf/default/rp_filter", "0"),
        ("ipv6/conf/all/disable_ipv6", "1"),
        ("ipv6/conf/default/disable_ipv6", "1"),
    ]
}

/// Writes `/proc/sys/net/<key>` from inside the namespace: /proc/sys/net shows the writing
/// thread's namespace, and `netns::run_in` has checked that the thread is in it.
pub(super) fn write_sysctls(netns: &Path, settings: &[(&str, &str)]) -> Result<()> {
    netns::run_in(netns, || -> Result<()> {
        for (key, value) in settings {
            let path = format!("/proc/sys/net/{key}");
            if key.starts_with("ipv6/") && !Path::new(&path).exists() {
                continue; // kernel without IPv6
            }
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        }
        Ok(())
    })?
    .with_context(|| format!("setting sysctls in {}", netns.display()))
}
