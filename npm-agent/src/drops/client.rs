//! `npm-agent drops`: reads the drop events of the agent on this node from its socket (see
//! [`super::server`]), as lines or JSON.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context as _, Result};

use super::DropRecord;
use super::server::Request;

/// Asks the agent at `socket` and hands each event to `each` until the agent has sent what
/// was asked (or, following, until `each` returns false or the agent goes away).
pub fn read(socket: &Path, req: &Request, mut each: impl FnMut(DropRecord) -> bool) -> Result<()> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!("connecting to the agent at {} (is it running on this node?)", socket.display())
    })?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    for line in BufReader::new(&stream).lines() {
        let line = line.context("reading from the agent")?;
        if line.trim().is_empty() {
            continue; // keep-alive
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("a line from the agent")?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("the agent says: {}", e.as_str().unwrap_or_default());
        }
        if !each(serde_json::from_value(v).context("a drop event from the agent")?) {
            break;
        }
    }
    Ok(())
}
