//! iproute2 and sysctls in the lab's namespaces: `ip -batch` runs (with `-n <lab namespace>`
//! for everything but `netns add`/`netns delete`, so nothing touches the root namespace's
//! interfaces or routes) and the sysctls every lab namespace gets, written from a thread inside
//! the namespace.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

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

/// What every IPv6 interface of a lab namespace gets before IPv6 is turned on in it: no
/// duplicate address detection (addresses are usable at once, not tentative for a second), no
/// router advertisements, no autoconfiguration, no router solicitations. (The lab's addresses
/// and routes are all static.)
const IPV6_QUIET: [(&str, &str); 5] = [
    ("accept_dad", "0"),
    ("dad_transmits", "0"),
    ("accept_ra", "0"),
    ("autoconf", "0"),
    ("router_solicitations", "0"),
];

/// Turns IPv6 on in a lab namespace (from a thread inside it): first [`IPV6_QUIET`] for `all`,
/// `default` and every interface that exists already (the kernel takes the larger of `all`'s
/// and an interface's `accept_dad`, so `all` alone is not enough), then `forwarding` when
/// asked (a node), then `disable_ipv6=0` for `all` (which the kernel applies to `default` and
/// to every existing interface). Interfaces created afterwards take the `default`s.
pub(super) fn enable_ipv6(netns: &Path, forwarding: bool) -> Result<()> {
    netns::run_in(netns, || -> Result<()> {
        let conf = Path::new("/proc/sys/net/ipv6/conf");
        ensure!(conf.exists(), "this kernel has no IPv6");
        let mut interfaces: Vec<String> = std::fs::read_dir(conf)
            .with_context(|| format!("listing {}", conf.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "all" && n != "default")
            .collect();
        interfaces.sort();
        let write = |key: String, value: &str| -> Result<()> {
            let path = conf.join(key);
            std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
        };
        for dev in ["all", "default"].into_iter().chain(interfaces.iter().map(String::as_str)) {
            for (key, value) in IPV6_QUIET {
                write(format!("{dev}/{key}"), value)?;
            }
        }
        if forwarding {
            write("all/forwarding".into(), "1")?;
        }
        write("all/disable_ipv6".into(), "0")?;
        write("default/disable_ipv6".into(), "0")
    })?
    .with_context(|| format!("enabling IPv6 in {}", netns.display()))
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
