//! The metrics endpoint (`metrics-addr`, by default `0.0.0.0:10091`):
//!
//! - `GET /node-metrics`: execution times and the dataplane's figures;
//! - `GET /cluster-metrics`: the counts (policies, rules, sets, entries, pods);
//! - `GET /healthz`: 200 while the agent's loop runs (a heartbeat within
//!   [`super::LIVENESS_TIMEOUT`]), else 503;
//! - `GET /readyz`: 200 once the first full sync is enforced, else 503.
//!
//! Nothing else is served: no profiler and no state dump (Azure NPM serves both on
//! `0.0.0.0`); every other path is 404 and every other method 405 (`HEAD` is served as
//! `GET` without the body).
//!
//! Every pod reaches its node's addresses, so any pod can talk to this server: it must not
//! let a client take the agent's memory, threads or its answers to the kubelet's probes. It
//! is hyper's HTTP/1 server on a tokio runtime of its own, with these limits:
//!
//! - threads: [`WORKERS`] runtime threads and one thread that renders the metrics, started
//!   with the server; none per connection;
//! - a request's head (request line and headers) holds at most [`MAX_HEAD_BYTES`]: a longer
//!   URL or larger headers get 431 and the connection is closed, nothing more is read;
//!   requests with a body get 413 and the connection is closed without reading it;
//! - at most [`MAX_CONNECTIONS`] connections are open. Beyond it, one is closed at once: of
//!   the connections not in the middle of a request, the oldest one from the address that
//!   holds the most connections (so a client that opens hundreds only loses its own, and the
//!   kubelet's probe, from another address, gets in); when every connection is in the
//!   middle of a request, the new one;
//! - a connection must deliver its request head within [`HEADER_TIMEOUT`] of opening (bytes
//!   trickled in do not extend it), a request must be answered within [`REQUEST_TIMEOUT`],
//!   and a connection idle between requests is closed after [`IDLE_TIMEOUT`];
//! - `/node-metrics` and `/cluster-metrics` are rendered on the render thread, never on the
//!   runtime's: scrapes that arrive while a rendering runs share the next one, so a crowd of
//!   scrapes costs one rendering, one body in memory, and `/healthz` answers meanwhile.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, mpsc, oneshot};

use super::Metrics;

pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The runtime's threads.
pub const WORKERS: usize = 2;
/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head (request line and headers). hyper's smallest buffer.
pub const MAX_HEAD_BYTES: usize = 8192;
/// From a connection's opening to its complete request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// From a request's head to its response written.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Between a response and the next request's head.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often connections past their time are closed.
const REAP_INTERVAL: Duration = Duration::from_millis(250);

/// A running metrics server; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    renderer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer").field("addr", &self.addr).finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (port 0: any free port) and serves `metrics`.
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<MetricsServer> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics address {addr}"))?;
        listener.set_nonblocking(true).context("making the metrics listener non-blocking")?;
        let addr = listener.local_addr().unwrap_or(addr);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .max_blocking_threads(1)
            .thread_name("metrics-http")
            .enable_io()
            .enable_time()
            .build()
            .context("starting the metrics runtime")?;
        let (render_tx, render_rx) = mpsc::channel(MAX_CONNECTIONS);
        let renderer = std::thread::Builder::new()
            .name("metrics-render".into())
            .spawn({
                let metrics = metrics.clone();
                move || render_loop(&metrics, render_rx)
            })
            .context("starting the metrics render thread")?;
        let shared =
            Arc::new(Shared { conns: Conns::new(MAX_CONNECTIONS), render: render_tx, metrics });
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .context("registering the metrics listener")?
        };
        runtime.spawn(accept_loop(listener, shared.clone()));
        runtime.spawn(reap_loop(shared));
        Ok(MetricsServer { addr, runtime: Some(runtime), renderer: Some(renderer) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // Dropping the runtime's tasks closes the listener and every connection, and drops
        // the render channel's senders: the render thread then ends.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        if let Some(r) = self.renderer.take() {
            let _ = r.join();
        }
    }
}

/// What the runtime's tasks share.
struct Shared {
    conns: Conns,
    render: mpsc::Sender<RenderRequest>,
    metrics: Arc<Metrics>,
}

// ---- connections ----

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Opened; its first request head is not complete.
    Head,
    /// A request is being answered.
    Serving,
    /// Between a response and the next request.
    Idle,
}

struct Slot {
    peer: IpAddr,
    phase: Phase,
    since: Instant,
    close: Arc<Notify>,
}

/// The open connections: at most `limit`, each closed when past its time (see the module
/// documentation).
struct Conns {
    limit: usize,
    inner: Mutex<ConnsInner>,
}

#[derive(Default)]
struct ConnsInner {
    next: u64,
    slots: HashMap<u64, Slot>,
    per_peer: HashMap<IpAddr, usize>,
}

impl ConnsInner {
    fn close(&mut self, id: u64) {
        if let Some(slot) = self.slots.remove(&id) {
            slot.close.notify_one();
            if let Some(n) = self.per_peer.get_mut(&slot.peer) {
                *n -= 1;
                if *n == 0 {
                    self.per_peer.remove(&slot.peer);
                }
            }
        }
    }
}

impl Conns {
    fn new(limit: usize) -> Conns {
        Conns { limit, inner: Mutex::new(ConnsInner::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `peer`, closing another one if the table is full; `None`:
    /// the table is full of connections in the middle of a request, and this one is closed.
    fn admit(&self, peer: IpAddr, now: Instant) -> Option<(u64, Arc<Notify>)> {
        let mut c = self.lock();
        if c.slots.len() >= self.limit {
            let victim = c
                .slots
                .iter()
                .filter(|(_, s)| s.phase != Phase::Serving)
                .max_by_key(|(_, s)| {
                    (c.per_peer.get(&s.peer).copied().unwrap_or(0), std::cmp::Reverse(s.since))
                })
                .map(|(id, _)| *id)?;
            tracing::debug!(%peer, "metrics: connection limit reached; closing an idle connection");
            c.close(victim);
        }
        let id = c.next;
        c.next += 1;
        let close = Arc::new(Notify::new());
        c.slots.insert(id, Slot { peer, phase: Phase::Head, since: now, close: close.clone() });
        *c.per_peer.entry(peer).or_default() += 1;
        Some((id, close))
    }

    fn set(&self, id: u64, phase: Phase) {
        if let Some(s) = self.lock().slots.get_mut(&id) {
            s.phase = phase;
            s.since = Instant::now();
        }
    }

    /// The connection's task ended.
    fn remove(&self, id: u64) {
        self.lock().close(id);
    }

    /// Closes the connections past their time.
    fn reap(&self, now: Instant) {
        let mut c = self.lock();
        let expired: Vec<u64> = c
            .slots
            .iter()
            .filter(|(_, s)| {
                let limit = match s.phase {
                    Phase::Head => HEADER_TIMEOUT,
                    Phase::Serving => REQUEST_TIMEOUT,
                    Phase::Idle => IDLE_TIMEOUT,
                };
                now.saturating_duration_since(s.since) >= limit
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            c.close(id);
        }
    }

    #[cfg(test)]
    fn open(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().slots.keys().copied().collect();
        ids.sort();
        ids
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors, most likely: wait for connections to close.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Beyond the limit with every connection mid-request: closed at once (dropped).
        if let Some((id, close)) = shared.conns.admit(peer.ip(), Instant::now()) {
            tokio::spawn(serve(stream, id, close, shared.clone()));
        }
    }
}

async fn reap_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    loop {
        tick.tick().await;
        shared.conns.reap(Instant::now());
    }
}

async fn serve(stream: tokio::net::TcpStream, id: u64, close: Arc<Notify>, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(req, id, &shared).await) }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .writev(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = close.notified() => {}
    }
    shared.conns.remove(id);
}

// ---- requests ----

/// A response body: one chunk. Dropped when written (or when the connection goes): the
/// connection is then idle.
struct Page {
    data: Option<Bytes>,
    _idle: Option<IdleOnDrop>,
}

struct IdleOnDrop {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        self.shared.conns.set(self.id, Phase::Idle);
    }
}

impl Body for Page {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

fn respond(
    code: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
    idle: IdleOnDrop,
    close: bool,
) -> Response<Page> {
    let mut resp = Response::new(Page { data: Some(body.into()), _idle: Some(idle) });
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    if close {
        resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    resp
}

async fn handle(req: Request<Incoming>, id: u64, shared: &Arc<Shared>) -> Response<Page> {
    shared.conns.set(id, Phase::Serving);
    let idle = IdleOnDrop { id, shared: shared.clone() };
    // A body is never read: the connection closes after the response instead.
    let has_body = !req.body().is_end_stream();
    let path = req.uri().path();
    let known = matches!(path, "/node-metrics" | "/cluster-metrics" | "/healthz" | "/readyz");
    if !known {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n", idle, has_body);
    }
    if !matches!(req.method(), &Method::GET | &Method::HEAD) {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
            idle,
            has_body,
        );
    }
    if has_body {
        return respond(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain",
            "request bodies are not accepted\n",
            idle,
            true,
        );
    }
    let m = &shared.metrics;
    let (code, body) = match path {
        "/node-metrics" | "/cluster-metrics" => {
            let which = if path == "/node-metrics" { Which::Node } else { Which::Cluster };
            return match render(shared, which).await {
                Some(page) => respond(StatusCode::OK, TEXT_FORMAT, page, idle, false),
                None => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "metrics unavailable\n",
                    idle,
                    false,
                ),
            };
        }
        "/healthz" if m.alive() => (StatusCode::OK, "ok\n".to_string()),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent's loop has not run for {:?}\n", m.since_heartbeat()),
        ),
        "/readyz" if m.ready() => (StatusCode::OK, "ready\n".to_string()),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first full sync is not enforced yet\n".to_string(),
        ),
    };
    respond(code, "text/plain", body, idle, false)
}

// ---- rendering ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Node,
    Cluster,
}

struct RenderRequest {
    which: Which,
    reply: oneshot::Sender<Bytes>,
}

async fn render(shared: &Shared, which: Which) -> Option<Bytes> {
    let (reply, rx) = oneshot::channel();
    shared.render.send(RenderRequest { which, reply }).await.ok()?;
    rx.await.ok()
}

/// Renders pages for every request waiting when a rendering starts: requests that arrive
/// meanwhile share the next one (each gets a page rendered after it arrived).
fn render_loop(metrics: &Metrics, mut rx: mpsc::Receiver<RenderRequest>) {
    while let Some(first) = rx.blocking_recv() {
        let mut waiting = vec![first];
        while let Ok(r) = rx.try_recv() {
            waiting.push(r);
        }
        waiting.retain(|r| !r.reply.is_closed());
        for which in [Which::Node, Which::Cluster] {
            if !waiting.iter().any(|r| r.which == which) {
                continue;
            }
            let page = Bytes::from(match which {
                Which::Node => metrics.render_node(),
                Which::Cluster => metrics.render_cluster(),
            });
            for r in waiting.extract_if(.., |r| r.which == which) {
                let _ = r.reply.send(page.clone());
            }
        }
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
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(server);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_full_table_closes_the_oldest_idle_connection_of_the_busiest_address() {
        let conns = Conns::new(4);
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let (probe, _) = conns.admit(ip(1), at(0)).unwrap();
        let a: Vec<u64> = (1..4).map(|i| conns.admit(ip(2), at(i)).unwrap().0).collect();
        // Full: the oldest of ip(2)'s goes, not the older connection of ip(1).
        let (b, _) = conns.admit(ip(3), at(10)).unwrap();
        assert_eq!(conns.open(), vec![probe, a[1], a[2], b]);
        // Connections in the middle of a request are never closed for a new one.
        for id in [probe, a[1], a[2], b] {
            conns.set(id, Phase::Serving);
        }
        assert!(conns.admit(ip(4), at(20)).is_none());
        assert_eq!(conns.open().len(), 4);
        conns.set(a[2], Phase::Idle);
        let (c, _) = conns.admit(ip(4), at(30)).unwrap();
        assert_eq!(conns.open(), vec![probe, a[1], b, c]);
    }

    /// Sends `request` as is; the answer's status line and body.
    fn raw(addr: SocketAddr, request: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.lines().next().unwrap_or_default().to_string(), body.to_string())
    }

    #[test]
    fn serves_the_four_paths_and_nothing_else() {
        let metrics = Arc::new(Metrics::new(super::super::MetricsOptions::default()));
        metrics.heartbeat();
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), metrics.clone()).unwrap();
        let addr = server.local_addr();
        let get = |path: &str| http_get(addr, path, Duration::from_secs(5)).unwrap();
        assert_eq!(get("/healthz"), (200, "ok\n".into()));
        assert_eq!(get("/readyz").0, 503);
        metrics.set_ready(true);
        assert_eq!(get("/readyz"), (200, "ready\n".into()));
        assert!(get("/node-metrics?x=1").1.contains("npm_add_ipset_exec_time_count 0"));
        assert!(get("/cluster-metrics").1.contains("npm_num_policies"));
        assert_eq!(get("/metrics").0, 404);
        let close = "Host: x\r\nConnection: close\r\n";
        let (status, body) = raw(addr, &format!("HEAD /cluster-metrics HTTP/1.1\r\n{close}\r\n"));
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
        assert_eq!(
            raw(addr, &format!("POST /healthz HTTP/1.1\r\n{close}Content-Length: 0\r\n\r\n")).0,
            "HTTP/1.1 405 Method Not Allowed"
        );
        assert_eq!(
            raw(addr, &format!("DELETE /nothing HTTP/1.1\r\n{close}\r\n")).0,
            "HTTP/1.1 404 Not Found"
        );
        // A body is not read: 413, and the connection closes though the body is not sent.
        let (status, _) =
            raw(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
        // A head over 8 KiB: 431.
        let (status, _) = raw(
            addr,
            &format!("GET /healthz?{} HTTP/1.1\r\n{close}\r\n", "a".repeat(MAX_HEAD_BYTES)),
        );
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
        drop(server);
    }

    #[test]
    fn connections_past_their_time_are_closed() {
        let conns = Conns::new(8);
        let t = Instant::now();
        let (head, head_closed) = conns.admit(ip(1), t).unwrap();
        let (serving, _) = conns.admit(ip(1), t).unwrap();
        let (idle, _) = conns.admit(ip(1), t).unwrap();
        conns.set(serving, Phase::Serving);
        conns.set(idle, Phase::Idle);
        let now = Instant::now();
        conns.reap(now + HEADER_TIMEOUT - Duration::from_millis(1));
        assert_eq!(conns.open(), vec![head, serving, idle]);
        conns.reap(now + HEADER_TIMEOUT);
        assert_eq!(conns.open(), vec![serving, idle]);
        conns.reap(now + IDLE_TIMEOUT);
        assert_eq!(conns.open(), vec![serving]);
        conns.reap(now + REQUEST_TIMEOUT);
        assert!(conns.open().is_empty());
        // The closed connection's task is told (the permit waits for it).
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), head_closed.notified())
                .await
                .expect("notified")
        });
    }
}
