//! The agent's end of `npm-agent drops`: a Unix socket in the agent's own filesystem (inside
//! its pod; `kubectl exec` reaches it, the network does not). A reader writes one JSON
//! [`Request`] line; the agent answers with the latest events its filter takes, one JSON
//! [`DropRecord`](super::DropRecord) a line, and, when following, every new one (an empty
//! line now and then tells a quiet follower the agent is still there, and the agent that
//! the follower is).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{Filter, Hub};

/// What a reader asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub filter: Filter,
    /// How many of the latest events to send first.
    #[serde(default)]
    pub recent: usize,
    /// Then stream new events until the reader leaves.
    #[serde(default)]
    pub follow: bool,
}

/// Readers at once: each holds a thread.
pub const MAX_READERS: usize = 16;
/// How long a quiet follower waits for a sign of life.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Serves the hub on `path` (replacing a socket left there by an earlier agent), on threads
/// of its own. Only root (the socket's owner) may connect.
pub fn serve(path: &Path, hub: Arc<Hub>) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket; not replacing it", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    let readers = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("drops-socket".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if readers.fetch_add(1, Ordering::SeqCst) >= MAX_READERS {
                readers.fetch_sub(1, Ordering::SeqCst);
                let _ = (&stream).write_all(b"{\"error\":\"too many readers\"}\n");
                continue;
            }
            let (hub, readers) = (hub.clone(), readers.clone());
            let spawned =
                std::thread::Builder::new().name("drops-reader".into()).spawn(move || {
                    let _ = answer(stream, &hub);
                    readers.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                tracing::warn!("no thread for a drops reader");
            }
        }
    })?;
    Ok(path.to_path_buf())
}

fn answer(stream: UnixStream, hub: &Hub) -> Result<()> {
    stream.set_read_timeout(Some(KEEPALIVE))?;
    let mut line = String::new();
    BufReader::new((&stream).take(4096)).read_line(&mut line)?;
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("bad request: {e}") });
            (&stream).write_all(format!("{msg}\n").as_bytes())?;
            return Ok(());
        }
    };
    if let Some(why) = hub.why_unavailable() {
        let msg = serde_json::json!({ "error": why });
        (&stream).write_all(format!("{msg}\n").as_bytes())?;
        return Ok(());
    }
    let (recent, rx) = hub.open(&req.filter, req.recent, req.follow);
    let mut out = std::io::BufWriter::new(&stream);
    for r in recent {
        serde_json::to_writer(&mut out, &r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    let Some(rx) = rx else { return Ok(()) };
    loop {
        match rx.recv_timeout(KEEPALIVE) {
            Ok(r) => {
                serde_json::to_writer(&mut out, &r)?;
                out.write_all(b"\n")?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => out.write_all(b"\n")?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drops::{DropRecord, client};
    use crate::model::ObjectKey;

    fn record(ns: &str, name: &str, dport: u16) -> DropRecord {
        DropRecord {
            time: "t".into(),
            direction: "egress".into(),
            reason: "denied".into(),
            pod: Some(format!("{ns}/{name}")),
            pod_key: Some(ObjectKey::new(ns, name)),
            protocol: Some("UDP".into()),
            src: None,
            sport: None,
            dst: None,
            dport: Some(dport),
            peer: None,
            policies: vec![],
            quarantined: false,
        }
    }

    fn socket(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("npm-drops-{}-{tag}.sock", std::process::id()))
    }

    #[test]
    fn readers_get_the_latest_then_follow_through_the_socket() {
        let hub = Hub::new();
        let path = socket("follow");
        serve(&path, hub.clone()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "root's alone"
        );
        hub.publish(record("x", "a", 1));
        hub.publish(record("y", "b", 2));
        let req = |follow| Request {
            filter: Filter { namespace: Some("x".into()), pod: None },
            recent: 10,
            follow,
        };
        let mut got = Vec::new();
        client::read(&path, &req(false), |r| {
            got.push(r.dport);
            true
        })
        .unwrap();
        assert_eq!(got, [Some(1)]);
        // Following: the latest, then new ones as they come, until the reader stops.
        let (path2, hub2) = (path.clone(), hub.clone());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            client::read(&path2, &req(true), |r| {
                got.push(r.dport);
                got.len() < 3
            })
            .unwrap();
            got
        });
        while hub2.followers() == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        hub.publish(record("y", "c", 3));
        hub.publish(record("x", "d", 4));
        hub.publish(record("x", "e", 5));
        assert_eq!(reader.join().unwrap(), [Some(1), Some(4), Some(5)]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_agent_without_drop_events_says_why() {
        let path = socket("none");
        serve(&path, Hub::unavailable("the iptables dataplane reports no drop events")).unwrap();
        let e = client::read(&path, &Request::default(), |_| true).unwrap_err();
        assert!(format!("{e:#}").contains("iptables dataplane reports no drop events"), "{e:#}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_bad_request_is_answered_not_fatal() {
        let hub = Hub::new();
        let path = socket("bad");
        serve(&path, hub).unwrap();
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(b"{\"follow\": 7}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
        // The server still answers.
        client::read(&path, &Request::default(), |_| true).unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
