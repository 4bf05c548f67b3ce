//! A loopback HTTP/1.1 server that plays the Kubernetes API server for the kube source:
//! it answers list and watch requests of pods, namespaces, nodes and networkpolicies from a
//! script of recorded responses (or from a function), and logs every request.
//!
//! A scenario directory holds one file per response, consumed in order per resource and
//! request type: `RESOURCE.list.N.json` (a list, or a `Status` object, served with its
//! `code` as the HTTP status) and `RESOURCE.watch.N.jsonl` (a watch stream: one event per
//! line, each sent as one chunk, lines sent as they are so a malformed line stays
//! malformed). A `.json` watch file is a non-stream answer (an error). Directives in a watch
//! stream, alone on a line: `#sleep MS`; `#drop` (cut the connection in the middle of a
//! chunk, as a dropped connection does); `#close` (end the stream properly). A stream
//! without either is held open until the server stops. When its files run out, a list
//! repeats the last one and a watch is held open with no events.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// `pods`, `namespaces`, `nodes`, `networkpolicies`.
    pub resource: String,
    pub watch: bool,
    pub at: Instant,
}

/// One response.
#[derive(Clone, Debug)]
pub enum Response {
    /// A whole JSON body with an HTTP status.
    Json { status: u16, body: String },
    /// A chunked watch stream.
    Watch { steps: Vec<Step> },
}

#[derive(Clone, Debug)]
pub enum Step {
    Line(String),
    Sleep(Duration),
    /// Cut the connection in the middle of a chunk.
    Drop,
    /// End the stream properly.
    Close,
}

/// What answers requests.
pub type Responder = Box<dyn Fn(&Request) -> Response + Send + Sync>;

/// Responses per (resource, watch), consumed in order.
#[derive(Default)]
pub struct Script {
    queues: Mutex<HashMap<(String, bool), VecDeque<Response>>>,
    last_list: Mutex<HashMap<String, Response>>,
}

impl Script {
    /// Reads a scenario directory (see the module documentation).
    pub fn from_dir(dir: &Path) -> Script {
        let mut files: Vec<(String, bool, u32, std::path::PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let parts: Vec<&str> = name.split('.').collect();
            if parts.len() != 4 || !matches!(parts[1], "list" | "watch") {
                continue;
            }
            let n: u32 = parts[2].parse().unwrap_or_else(|_| panic!("{name}: N is not a number"));
            files.push((parts[0].to_string(), parts[1] == "watch", n, path));
        }
        files.sort();
        let script = Script::default();
        for (resource, watch, _, path) in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let response = if path.extension().is_some_and(|e| e == "jsonl") {
                Response::Watch { steps: parse_steps(&text) }
            } else {
                json_response(text)
            };
            script.push(&resource, watch, response);
        }
        script
    }

    pub fn push(&self, resource: &str, watch: bool, response: Response) {
        self.queues
            .lock()
            .unwrap()
            .entry((resource.to_string(), watch))
            .or_default()
            .push_back(response);
    }

    pub fn respond(&self, req: &Request) -> Response {
        let next = self
            .queues
            .lock()
            .unwrap()
            .get_mut(&(req.resource.clone(), req.watch))
            .and_then(|q| q.pop_front());
        match (next, req.watch) {
            (Some(r), false) => {
                self.last_list.lock().unwrap().insert(req.resource.clone(), r.clone());
                r
            }
            (Some(r), true) => r,
            (None, true) => Response::Watch { steps: Vec::new() },
            (None, false) => {
                self.last_list.lock().unwrap().get(&req.resource).cloned().unwrap_or_else(|| {
                    status_response(
                        404,
                        "NotFound",
                        &format!("no recorded list of {}", req.resource),
                    )
                })
            }
        }
    }
}

/// Parses the lines of a watch stream file.
pub fn parse_steps(text: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if let Some(ms) = trimmed.strip_prefix("#sleep ") {
            steps.push(Step::Sleep(Duration::from_millis(ms.trim().parse().expect("#sleep MS"))));
        } else if trimmed == "#drop" {
            steps.push(Step::Drop);
        } else if trimmed == "#close" {
            steps.push(Step::Close);
        } else if trimmed.starts_with("//") {
            // A comment.
        } else {
            steps.push(Step::Line(line.to_string()));
        }
    }
    steps
}

/// A JSON body; a `Status` object is served with its code.
pub fn json_response(body: String) -> Response {
    let v: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let status = match &v {
        Some(v) if v.get("kind").and_then(|k| k.as_str()) == Some("Status") => {
            v.get("code").and_then(|c| c.as_u64()).unwrap_or(500) as u16
        }
        _ => 200,
    };
    Response::Json { status, body }
}

pub fn status_response(code: u16, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    Response::Json { status: code, body: body.to_string() }
}

/// The running server; stops (and releases held watches) when dropped.
pub struct Server {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves a scenario directory.
    pub fn scenario(dir: &Path) -> Server {
        let script = Arc::new(Script::from_dir(dir));
        Server::start(Box::new(move |req| script.respond(req)))
    }

    pub fn start(responder: Responder) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let responder: Arc<Responder> = Arc::new(responder);
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (log, stop, responder) =
                                (log.clone(), stop.clone(), responder.clone());
                            handlers.push(std::thread::spawn(move || {
                                serve(conn, &log, &stop, &responder)
                            }));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for h in handlers {
                    let _ = h.join();
                }
            })
        };
        Server { addr, log, stop, thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// The requests of one resource and type, in order.
    pub fn requests_of(&self, resource: &str, watch: bool) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.resource == resource && r.watch == watch).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, log: &Mutex<Vec<Request>>, stop: &AtomicBool, responder: &Responder) {
    conn.set_nonblocking(false).ok();
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    let mut conn = conn;
    // One request per connection (the response says `Connection: close`).
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), parse_query(q)),
        None => (target.clone(), BTreeMap::new()),
    };
    let resource = path.rsplit('/').next().unwrap_or_default().to_string();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let req = Request { path, query, resource, watch, at: Instant::now() };
    log.lock().unwrap().push(req.clone());
    let _ = write_response(&mut conn, responder(&req), stop);
    let _ = conn.flush();
    let _ = conn.shutdown(std::net::Shutdown::Both);
    // Drain anything left so the close is clean.
    let _ = reader.read(&mut [0u8; 64]);
}

fn write_response(
    conn: &mut TcpStream,
    response: Response,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    match response {
        Response::Json { status, body } => {
            write!(
                conn,
                "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                reason(status),
                body.len()
            )
        }
        Response::Watch { steps } => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )?;
            conn.flush()?;
            for step in steps {
                match step {
                    Step::Line(line) => {
                        let data = format!("{line}\n");
                        write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
                        conn.flush()?;
                    }
                    Step::Sleep(d) => std::thread::sleep(d),
                    Step::Drop => {
                        // A chunk announced and cut short.
                        write!(conn, "40\r\n{{\"type\":\"MODIFIED\",")?;
                        conn.flush()?;
                        return Ok(());
                    }
                    Step::Close => {
                        write!(conn, "0\r\n\r\n")?;
                        return conn.flush();
                    }
                }
            }
            // Held open until the server stops (or the client goes away).
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
