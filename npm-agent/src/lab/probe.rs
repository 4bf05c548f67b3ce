//! Sockets in pod namespaces: each pod's in-process servers and the parallel probes.
//!
//! Each pod serves its declared ports from this process: a short-lived thread enters the pod's
//! namespace ([`netns::run_in`]: `setns(CLONE_NEWNET)`, checked against
//! `/proc/thread-self/ns/net`), creates and binds the sockets there (a socket stays in the
//! namespace it was created in) and exits; one thread per pod then serves them with `poll`: TCP
//! (and SCTP) listeners accept and close, UDP sockets echo every datagram. A pod serves each
//! port once per family it has an address of (an IPv4 socket on `0.0.0.0`, an IPv6-only one on
//! `::`); a probe goes from the client's address of the probed family to the server's.
//! [`Lab::probe_matrix`](super::net::Lab::probe_matrix) creates every client socket the
//! same way in its source pod's namespace (one short-lived thread per source, in parallel),
//! starts every connection at once and waits for all of them with one `poll` loop, so a whole
//! matrix takes about one timeout whatever its size. TCP succeeds when the connection is
//! established within the timeout; UDP when the echo of a nonce arrives (the datagram is sent
//! again at half the timeout). A pod to itself is `true` without probing.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::model::Protocol;
use crate::netns;

/// A probe timeout that decides blocked connections quickly and allowed ones reliably.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Lets the process hold a socket per probe of a large matrix.
pub(super) fn raise_fd_limit() {
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

// ---- sockets ----

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// `addr` as a `sockaddr_in` or `sockaddr_in6` in a `sockaddr_storage`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A non-blocking socket of `protocol` for addresses like `like` (its family).
fn new_socket(protocol: Protocol, like: IpAddr) -> io::Result<OwnedFd> {
    let (ty, proto) = match protocol {
        Protocol::Tcp => (libc::SOCK_STREAM, libc::IPPROTO_TCP),
        Protocol::Udp => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        Protocol::Sctp => (libc::SOCK_STREAM, libc::IPPROTO_SCTP),
    };
    let domain = if like.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd =
        cvt(unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_storage).cast(), len) })
        .map(drop)
}

fn connect(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    cvt(unsafe {
        libc::connect(fd.as_raw_fd(), (&sa as *const libc::sockaddr_storage).cast(), len)
    })
    .map(drop)
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The pending error of a socket (SO_ERROR), 0 when none.
fn socket_error(fd: &OwnedFd) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn send(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    let n =
        unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = unsafe {
        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    loop {
        match cvt(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|n| n as usize),
        }
    }
}

/// A pod's servers: the sockets were made in the pod's namespace; a thread serves them until
/// it is stopped through an eventfd.
pub(super) struct PodServer {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// A pod as the probes see it: its address of the probed family.
#[derive(Clone, Copy)]
pub(super) struct ProbePod<'a> {
    /// The caller's name for the pod (for errors and thread names).
    pub key: &'a str,
    pub ip: IpAddr,
    pub netns_path: &'a Path,
}

impl PodServer {
    /// Serves `ports` in the pod (namespace `netns_path`), once per family of `addresses`
    /// (the pod's addresses; the sockets bind the family's unspecified address, IPv6 ones
    /// with `IPV6_V6ONLY`), `thread`: the server thread's name.
    pub(super) fn start(
        key: &str,
        netns_path: &Path,
        addresses: &[IpAddr],
        ports: &[(Protocol, u16)],
        thread: &str,
    ) -> Result<PodServer> {
        let ports = ports.to_vec();
        let mut families: Vec<IpAddr> = addresses.iter().map(|a| unspecified(*a)).collect();
        families.dedup();
        let (streams, datagrams) = netns::run_in(
            netns_path,
            move || -> io::Result<(Vec<TcpListener>, Vec<UdpSocket>)> {
                let (mut streams, mut datagrams) = (Vec::new(), Vec::new());
                for any in families {
                    for &(protocol, port) in &ports {
                        let fd = new_socket(protocol, any)?;
                        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
                        if any.is_ipv6() {
                            set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
                        }
                        bind(&fd, SocketAddr::new(any, port))?;
                        if protocol == Protocol::Udp {
                            datagrams.push(UdpSocket::from(fd));
                        } else {
                            cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
                            // accept() is the same call for TCP and SCTP stream sockets.
                            streams.push(TcpListener::from(fd));
                        }
                    }
                }
                Ok((streams, datagrams))
            },
        )?
        .with_context(|| format!("starting servers in pod {key}"))?;
        let stop = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
            .context("eventfd")?;
        let stop = unsafe { OwnedFd::from_raw_fd(stop) };
        let stop_rx = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(thread.to_string())
            .spawn(move || serve(stop_rx, streams, datagrams))
            .context("starting a server thread")?;
        Ok(PodServer { stop, thread: Some(thread) })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stop: OwnedFd, streams: Vec<TcpListener>, datagrams: Vec<UdpSocket>) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(streams.iter().map(|l| l.as_raw_fd()))
        .chain(datagrams.iter().map(|s| s.as_raw_fd()))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    let mut buf = [0u8; 2048];
    loop {
        fds.iter_mut().for_each(|p| p.revents = 0);
        if let Err(e) = poll(&mut fds, Duration::from_millis(i32::MAX as u64)) {
            eprintln!("npm lab: server poll failed: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (listener, pfd) in streams.iter().zip(&fds[1..]) {
            if pfd.revents == 0 {
                continue;
            }
            // Accept and close: the client's connection was established by then.
            loop {
                match listener.accept() {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::Interrupted
                            || e.kind() == io::ErrorKind::ConnectionAborted => {}
                    Err(_) => break,
                }
            }
        }
        for (socket, pfd) in datagrams.iter().zip(&fds[1 + streams.len()..]) {
            if pfd.revents == 0 {
                continue;
            }
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {} // a queued error is consumed by reporting it
                }
            }
        }
    }
}

// ---- probes ----

/// Probes every (client, server) pair of `entries`, all in parallel: `result[i][j]` is whether
/// `entries[i]` reached `entries[j]` within `timeout`. Every client socket is made on a
/// short-lived thread in its source pod's namespace (one per source), and one `poll` loop waits
/// for all of them.
pub(super) fn matrix(
    entries: &[ProbePod<'_>],
    protocol: Protocol,
    port: u16,
    timeout: Duration,
) -> Result<Vec<Vec<bool>>> {
    let states = std::thread::scope(|s| {
        let handles: Vec<_> = entries
            .iter()
            .enumerate()
            .map(|(i, src)| {
                s.spawn(move || -> Result<Vec<ProbeState>> {
                    netns::enter(src.netns_path)?;
                    entries
                        .iter()
                        .enumerate()
                        .map(|(j, dst)| {
                            if i == j || src.key == dst.key {
                                return Ok(ProbeState::Done(true));
                            }
                            start_probe(
                                protocol,
                                src.ip,
                                SocketAddr::new(dst.ip, port),
                                nonce(i, j),
                            )
                            .with_context(|| format!("probing {} -> {}", src.key, dst.key))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Result<Vec<_>>>()
    })?;
    wait_probes(states, timeout)
}

enum ProbeState {
    Done(bool),
    Pending { fd: OwnedFd, protocol: Protocol, payload: [u8; 16] },
}

/// A payload that no other probe of this process sends.
fn nonce(i: usize, j: usize) -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut payload = [0u8; 16];
    payload[..4].copy_from_slice(b"npl:");
    payload[4..12].copy_from_slice(&n.to_be_bytes());
    payload[12..14].copy_from_slice(&(i as u16).to_be_bytes());
    payload[14..].copy_from_slice(&(j as u16).to_be_bytes());
    payload
}

/// Binds a probe's socket to a source port no recent probe used. A kernel-chosen ephemeral
/// port can repeat the 5-tuple of a probe made a step earlier; conntrack (the dataplanes' or
/// netfilter's) then takes the new probe for a packet of that earlier, allowed flow, and a
/// connection the new policy blocks would seem to pass. Ports cycle through 33000..61000, so
/// a port comes back only after some 28,000 probes, well after such flows have expired.
/// `src` gives the family (the socket binds its unspecified address: the kernel picks the
/// pod's address of that family, its only one that routes anywhere).
fn bind_fresh_port(fd: &OwnedFd, src: IpAddr) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    for _ in 0..64 {
        let port = 33_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 28_000) as u16;
        if bind(fd, SocketAddr::new(unspecified(src), port)).is_ok() {
            return;
        }
    }
    // Every try taken: let the kernel pick (connect binds an ephemeral port).
}

/// Starts one probe from the calling thread's namespace. Errors only when no socket can be
/// made; a refused or unroutable destination is a failed probe.
fn start_probe(
    protocol: Protocol,
    src: IpAddr,
    dst: SocketAddr,
    payload: [u8; 16],
) -> io::Result<ProbeState> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{src} and {dst} are not of one family"),
        ));
    }
    let fd = new_socket(protocol, dst.ip())?;
    bind_fresh_port(&fd, src);
    Ok(match protocol {
        Protocol::Tcp | Protocol::Sctp => match connect(&fd, dst) {
            Ok(()) => ProbeState::Done(true),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                ProbeState::Pending { fd, protocol, payload }
            }
            Err(_) => ProbeState::Done(false),
        },
        Protocol::Udp => match connect(&fd, dst).and_then(|()| send(&fd, &payload)) {
            Ok(_) => ProbeState::Pending { fd, protocol, payload },
            Err(_) => ProbeState::Done(false),
        },
    })
}

/// Waits until every probe is decided or `timeout` has passed; undecided probes fail. UDP
/// probes still pending at half the timeout send their datagram again.
fn wait_probes(mut states: Vec<Vec<ProbeState>>, timeout: Duration) -> Result<Vec<Vec<bool>>> {
    let begin = Instant::now();
    let deadline = begin + timeout;
    let resend_at = begin + timeout / 2;
    let mut resent = false;
    let mut buf = [0u8; 64];
    loop {
        let mut fds = Vec::new();
        let mut cells = Vec::new();
        for (i, row) in states.iter().enumerate() {
            for (j, state) in row.iter().enumerate() {
                if let ProbeState::Pending { fd, protocol, .. } = state {
                    let events =
                        if *protocol == Protocol::Udp { libc::POLLIN } else { libc::POLLOUT };
                    fds.push(libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 });
                    cells.push((i, j));
                }
            }
        }
        let now = Instant::now();
        if fds.is_empty() || now >= deadline {
            break;
        }
        let until = if resent { deadline } else { resend_at.min(deadline) };
        poll(&mut fds, until.saturating_duration_since(now)).context("waiting for probes")?;
        for (pfd, &(i, j)) in fds.iter().zip(&cells) {
            if pfd.revents == 0 {
                continue;
            }
            let ProbeState::Pending { fd, protocol, payload } = &states[i][j] else {
                unreachable!()
            };
            let verdict = if *protocol == Protocol::Udp {
                loop {
                    match recv(fd, &mut buf) {
                        Ok(n) if buf[..n] == payload[..] => break Some(true),
                        Ok(_) => continue, // not our echo
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break Some(false), // e.g. ECONNREFUSED from an ICMP port unreachable
                    }
                }
            } else {
                match socket_error(fd).context("SO_ERROR")? {
                    0 if pfd.revents & libc::POLLOUT != 0 => Some(true),
                    0 => None,
                    _ => Some(false),
                }
            };
            if let Some(ok) = verdict {
                states[i][j] = ProbeState::Done(ok);
            }
        }
        if !resent && Instant::now() >= resend_at {
            resent = true;
            for state in states.iter().flatten() {
                if let ProbeState::Pending { fd, protocol: Protocol::Udp, payload } = state {
                    let _ = send(fd, payload);
                }
            }
        }
    }
    Ok(states
        .into_iter()
        .map(|row| row.into_iter().map(|s| matches!(s, ProbeState::Done(true))).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(0, 1), nonce(0, 1));
        assert_eq!(&nonce(3, 4)[12..], &[0, 3, 0, 4]);
    }
}
