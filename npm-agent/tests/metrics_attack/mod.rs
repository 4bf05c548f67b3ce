//! A hostile pod against the metrics endpoint: huge headers, a huge URL, hundreds of idle
//! connections and a few that trickle their headers, while a prober (the kubelet) asks
//! `/healthz` every 50 ms. Shared by `tests/metrics_server_limits.rs` and the
//! `metrics_attack` example, which prints the figures of docs/BENCHMARKS.md.
//!
//! When the server listens on 127.0.0.1, the attackers connect from 127.0.0.2 (huge heads),
//! 127.0.0.3 (idle) and 127.0.0.4 (trickling) and the prober from 127.0.0.1, as pods and the kubelet have addresses of their own;
//! otherwise every connection comes from the default address.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use npm_agent::metrics::server::http_get;

/// What to send.
#[derive(Clone, Debug)]
pub struct Attack {
    pub addr: SocketAddr,
    /// The process to measure (`None`: this one).
    pub pid: Option<u32>,
    /// Connections sending one huge header each, and its size.
    pub huge_headers: usize,
    pub header_bytes: usize,
    /// The size of the URL of one request.
    pub url_bytes: usize,
    /// Connections opened and left idle.
    pub idle: usize,
    /// Connections sending their headers one byte every 100 ms (from an address of their
    /// own, so that the idle ones do not push them out first).
    pub trickle: usize,
    /// How long an attacking connection may stay open before it counts as not closed.
    pub patience: Duration,
}

impl Attack {
    /// The attack of the issue: four 64 MiB headers, an 8 MiB URL, 500 idle connections and
    /// 20 trickling ones.
    pub fn issue(addr: SocketAddr) -> Attack {
        Attack {
            addr,
            pid: None,
            huge_headers: 4,
            header_bytes: 64 << 20,
            url_bytes: 8 << 20,
            idle: 500,
            trickle: 20,
            patience: Duration::from_secs(8),
        }
    }
}

/// What became of one attacking connection.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Bytes the server took before it stopped reading or closed.
    pub sent: usize,
    /// The status of the response, if one came.
    pub status: Option<u16>,
    /// When the server closed the connection, from its opening; `None`: still open.
    pub closed_after: Option<Duration>,
}

/// The figures of one run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Threads of the measured process before, at most during, and after the attack.
    pub threads_before: u64,
    pub threads_max: u64,
    pub threads_after: u64,
    /// Threads the attack itself ran in the measured process (when it measures itself).
    pub attack_threads: u64,
    /// Resident memory (KiB) before, at most during, and after.
    pub rss_before_kib: u64,
    pub rss_max_kib: u64,
    pub rss_after_kib: u64,
    /// Every `/healthz` latency, and every failure.
    pub healthz: Vec<Duration>,
    pub healthz_failures: Vec<String>,
    pub huge_headers: Vec<Outcome>,
    pub huge_url: Outcome,
    pub idle: Vec<Outcome>,
    /// Idle connections still open 500 ms after the last one was opened.
    pub idle_open_after_burst: usize,
    pub trickle: Vec<Outcome>,
}

impl Report {
    pub fn healthz_quantile(&self, q: f64) -> Duration {
        let mut v = self.healthz.clone();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    pub fn rss_growth_kib(&self) -> u64 {
        self.rss_max_kib.saturating_sub(self.rss_before_kib)
    }
}

/// `Threads:` and `VmRSS:` (KiB) of a process.
pub fn proc_status(pid: Option<u32>) -> (u64, u64) {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

fn source(addr: SocketAddr, last: u8) -> Option<IpAddr> {
    (addr.ip() == IpAddr::from([127, 0, 0, 1])).then(|| IpAddr::from([127, 0, 0, last]))
}

/// A connection from `from` (any port) to `addr`.
pub fn connect_from(from: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if let Some(ip) = from {
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(s.into())
}

fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    )
}

/// Reads what the server answers until it closes (or `patience` passes): the status, and
/// whether it closed.
fn read_answer(s: &mut TcpStream, opened: Instant, patience: Duration, out: &mut Outcome) {
    let mut head = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = patience.saturating_sub(opened.elapsed());
        if left.is_zero() {
            return;
        }
        let _ = s.set_read_timeout(Some(left.min(Duration::from_millis(500))));
        match s.read(&mut buf) {
            Ok(0) => {
                out.closed_after = Some(opened.elapsed());
                break;
            }
            Ok(n) => {
                if head.len() < 64 {
                    head.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if closed(&e) => {
                out.closed_after = Some(opened.elapsed());
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => {
                out.closed_after = Some(opened.elapsed());
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&head);
    out.status =
        text.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5)).and_then(|c| c.parse().ok());
}

/// `n` connections from `from`, non-blocking, each with the instant it opened.
fn open_many(
    n: usize,
    from: Option<IpAddr>,
    addr: SocketAddr,
) -> Vec<(Option<TcpStream>, Instant, Outcome)> {
    (0..n)
        .map(|_| {
            let at = Instant::now();
            match connect_from(from, addr) {
                Ok(s) => {
                    let _ = s.set_nonblocking(true);
                    (Some(s), at, Outcome::default())
                }
                Err(_) => {
                    (None, at, Outcome { closed_after: Some(Duration::ZERO), ..Outcome::default() })
                }
            }
        })
        .collect()
}

/// Sends `prefix`, then `filler` bytes of `a`, then `suffix`, stopping when the server stops
/// taking them; then reads the answer.
fn flood(
    addr: SocketAddr,
    from: Option<IpAddr>,
    prefix: &str,
    filler: usize,
    suffix: &str,
    patience: Duration,
) -> Outcome {
    let mut out = Outcome::default();
    let opened = Instant::now();
    let Ok(mut s) = connect_from(from, addr) else {
        out.closed_after = Some(Duration::ZERO);
        return out;
    };
    let _ = s.set_write_timeout(Some(patience));
    let chunk = vec![b'a'; 64 << 10];
    let write = |s: &mut TcpStream, bytes: &[u8], out: &mut Outcome| -> bool {
        match s.write_all(bytes) {
            Ok(()) => {
                out.sent += bytes.len();
                true
            }
            Err(e) => {
                if closed(&e) {
                    out.closed_after = Some(opened.elapsed());
                }
                false
            }
        }
    };
    let mut ok = write(&mut s, prefix.as_bytes(), &mut out);
    while ok && out.sent < prefix.len() + filler {
        let n = chunk.len().min(prefix.len() + filler - out.sent);
        ok = write(&mut s, &chunk[..n], &mut out);
    }
    if ok {
        write(&mut s, suffix.as_bytes(), &mut out);
    }
    read_answer(&mut s, opened, patience, &mut out);
    out
}

/// Runs the attack; see the module documentation.
pub fn run(attack: &Attack) -> Report {
    let addr = attack.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new((Vec::new(), Vec::new(), 0u64, 0u64)));
    // The prober: /healthz every 50 ms; the measured process's figures as often.
    let prober = {
        let (stop, samples, pid) = (stop.clone(), samples.clone(), attack.pid);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = http_get(addr, "/healthz", Duration::from_secs(2));
                let took = t.elapsed();
                let (threads, rss) = proc_status(pid);
                let mut s = samples.lock().unwrap();
                match r {
                    Ok((200, body)) if body == "ok\n" => s.0.push(took),
                    Ok((code, body)) => s.1.push(format!("{code} {body:?} after {took:?}")),
                    Err(e) => s.1.push(format!("{e} after {took:?}")),
                }
                s.2 = s.2.max(threads);
                s.3 = s.3.max(rss);
                drop(s);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (threads_before, rss_before_kib) = proc_status(attack.pid);
    {
        let mut s = samples.lock().unwrap();
        s.2 = threads_before;
        s.3 = rss_before_kib;
    }

    // Huge headers and a huge URL, each on a thread of its own.
    let patience = attack.patience;
    let mut floods = Vec::new();
    for _ in 0..attack.huge_headers {
        let bytes = attack.header_bytes;
        floods.push(std::thread::spawn(move || {
            flood(
                addr,
                source(addr, 2),
                "GET /healthz HTTP/1.1\r\nHost: metrics\r\nX-Big: ",
                bytes,
                "\r\n\r\n",
                patience,
            )
        }));
    }
    let url = {
        let bytes = attack.url_bytes;
        std::thread::spawn(move || {
            flood(
                addr,
                source(addr, 2),
                "GET /healthz?",
                bytes,
                " HTTP/1.1\r\nHost: metrics\r\n\r\n",
                patience,
            )
        })
    };
    // Connections that trickle a header, one byte per 100 ms, on one thread.
    let trickle = {
        let n = attack.trickle;
        std::thread::spawn(move || {
            let opened = Instant::now();
            let mut conns = open_many(n, source(addr, 4), addr);
            let line = b"GET /healthz HTTP/1.1\r\nHost: metrics\r\nX-Slow: ";
            let mut i = 0;
            while opened.elapsed() < patience && conns.iter().any(|(s, _, _)| s.is_some()) {
                for (s, at, out) in &mut conns {
                    let Some(stream) = s else { continue };
                    let byte = if i < line.len() { line[i] } else { b'a' };
                    let gone = match stream.write(&[byte]) {
                        Ok(_) => {
                            out.sent += 1;
                            let mut buf = [0u8; 512];
                            match stream.read(&mut buf) {
                                Ok(0) => true,
                                Ok(_) => false,
                                Err(e) => !matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::Interrupted
                                ),
                            }
                        }
                        Err(e) => {
                            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
                        }
                    };
                    if gone {
                        out.closed_after = Some(at.elapsed());
                        *s = None;
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            conns.into_iter().map(|(_, _, o)| o).collect::<Vec<_>>()
        })
    };
    let attack_threads = attack.huge_headers as u64 + 2;

    // Idle connections, opened as fast as possible from this thread, then watched.
    let opened = Instant::now();
    let mut idle = open_many(attack.idle, source(addr, 3), addr);
    let burst_end = Instant::now();
    let mut idle_open_after_burst = None;
    while opened.elapsed() < patience {
        for (s, at, out) in &mut idle {
            let Some(stream) = s else { continue };
            let mut buf = [0u8; 512];
            let gone = match stream.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
            };
            if gone {
                out.closed_after = Some(at.elapsed());
                *s = None;
            }
        }
        let open = idle.iter().filter(|(s, _, _)| s.is_some()).count();
        if idle_open_after_burst.is_none() && burst_end.elapsed() >= Duration::from_millis(500) {
            idle_open_after_burst = Some(open);
        }
        if open == 0 && idle_open_after_burst.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let idle: Vec<Outcome> = idle.into_iter().map(|(_, _, o)| o).collect();
    let huge_headers: Vec<Outcome> = floods.into_iter().map(|t| t.join().unwrap()).collect();
    let huge_url = url.join().unwrap();
    let trickle = trickle.join().unwrap();

    // A second of calm, then the figures after.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    prober.join().unwrap();
    let (threads_after, rss_after_kib) = proc_status(attack.pid);
    let s = samples.lock().unwrap();
    Report {
        threads_before,
        threads_max: s.2,
        threads_after,
        attack_threads,
        rss_before_kib,
        rss_max_kib: s.3,
        rss_after_kib,
        healthz: s.0.clone(),
        healthz_failures: s.1.clone(),
        huge_headers,
        huge_url,
        idle,
        idle_open_after_burst: idle_open_after_burst.unwrap_or(usize::MAX),
        trickle,
    }
}
