//! The metrics endpoint (`metrics-addr`, by default `0.0.0.0:10091`), a small blocking HTTP
//! server on two threads:
//!
//! - `GET /node-metrics`: execution times and the dataplane's figures;
//! - `GET /cluster-metrics`: the counts (policies, rules, sets, entries, pods);
//! - `GET /healthz`: 200 while the agent's loop runs (a heartbeat within
//!   [`super::LIVENESS_TIMEOUT`]), else 503;
//! - `GET /readyz`: 200 once the first full sync is enforced, else 503.
//!
//! Nothing else is served: no profiler and no state dump (Azure NPM serves both on
//! `0.0.0.0`); every other path is 404 and every other method 405.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, anyhow};

use super::Metrics;

pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
const WORKERS: usize = 2;

/// A running metrics server; dropping it stops it.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port) and serves `metrics`.
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<MetricsServer> {
        let server = Arc::new(
            tiny_http::Server::http(addr)
                .map_err(|e| anyhow!("binding the metrics address {addr}: {e}"))?,
        );
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let workers = (0..WORKERS)
            .map(|i| {
                let server = server.clone();
                let metrics = metrics.clone();
                std::thread::Builder::new()
                    .name(format!("metrics-{i}"))
                    .spawn(move || {
                        while let Ok(req) = server.recv() {
                            handle(req, &metrics);
                        }
                    })
                    .map_err(|e| anyhow!("starting a metrics thread: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MetricsServer { server, addr, workers })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn respond(req: tiny_http::Request, code: u16, content_type: &str, body: String) {
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
        .expect("valid header");
    let resp = tiny_http::Response::from_string(body).with_status_code(code).with_header(header);
    let _ = req.respond(resp);
}

fn handle(req: tiny_http::Request, metrics: &Metrics) {
    use tiny_http::Method;
    let path = req.url().split('?').next().unwrap_or_default().to_string();
    let known =
        matches!(path.as_str(), "/node-metrics" | "/cluster-metrics" | "/healthz" | "/readyz");
    if !known {
        return respond(req, 404, "text/plain", "not found\n".into());
    }
    if !matches!(req.method(), Method::Get | Method::Head) {
        return respond(req, 405, "text/plain", "method not allowed\n".into());
    }
    match path.as_str() {
        "/node-metrics" => respond(req, 200, TEXT_FORMAT, metrics.render_node()),
        "/cluster-metrics" => respond(req, 200, TEXT_FORMAT, metrics.render_cluster()),
        "/healthz" if metrics.alive() => respond(req, 200, "text/plain", "ok\n".into()),
        "/healthz" => respond(
            req,
            503,
            "text/plain",
            format!("the agent's loop has not run for {:?}\n", metrics.since_heartbeat()),
        ),
        "/readyz" if metrics.ready() => respond(req, 200, "text/plain", "ready\n".into()),
        _ => respond(
            req,
            503,
            "text/plain",
            "not ready: the first full sync is not enforced yet\n".into(),
        ),
    }
}

/// The agent's server: started now, or, when the address cannot be bound (yet), retried
/// every few seconds on a thread while the agent goes on enforcing. Dropping it stops both.
pub struct ServerGuard {
    server: Arc<Mutex<Option<MetricsServer>>>,
    stop: Arc<AtomicBool>,
}

impl ServerGuard {
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(MetricsServer::local_addr)
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// Starts the agent's metrics server (see [`ServerGuard`]).
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> ServerGuard {
    let guard =
        ServerGuard { server: Arc::new(Mutex::new(None)), stop: Arc::new(AtomicBool::new(false)) };
    match MetricsServer::start(addr, metrics.clone()) {
        Ok(s) => {
            tracing::info!(addr = %s.local_addr(), "serving /node-metrics, /cluster-metrics, /healthz and /readyz");
            *guard.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "metrics not served; retrying every {BIND_RETRY:?}");
            let (slot, stop) = (guard.server.clone(), guard.stop.clone());
            let _ = std::thread::Builder::new().name("metrics-bind".into()).spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(BIND_RETRY);
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(s) = MetricsServer::start(addr, metrics.clone()) {
                        tracing::info!(addr = %s.local_addr(), "metrics served");
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        return;
                    }
                }
            });
        }
    }
    guard
}

/// A minimal HTTP/1.1 GET for tests and tools: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| {
        std::io::Error::other(format!("bad status line {:?}", head.lines().next()))
    })?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}
