//! Drop events, as the operator reads them: `npm-agent drops [--follow]`.
//!
//! The dataplane reports each dropped packet it lets through its rate limiter as a
//! [`DropNotice`] (header, the local pod's address, the profile that judged it). The agent
//! names them here, from the compiler ([`resolve`]: the pod, the peer, and the policies that
//! isolate the pod in that direction), keeps the latest in a [`Hub`] and streams them to
//! readers of a local socket ([`server`], [`client`]). Nothing is served on the network.

#[cfg(unix)]
pub mod client;
#[cfg(unix)]
pub mod server;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::compile::Engine;
use crate::dataplane::drops::DropNotice;
use crate::model::{Direction, ObjectKey};

/// One dropped packet, named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    /// When the kernel dropped it (RFC 3339, UTC).
    pub time: String,
    /// As the pod sees it: `ingress` (entering it) or `egress` (leaving it).
    pub direction: String,
    /// `denied` (no policy admits it), `spoofed`, `malformed`, `fragment`, `unsupported`.
    pub reason: String,
    /// The local pod whose interface the packet crossed (`namespace/name`).
    pub pod: Option<String>,
    /// The pod's namespace and name, for filtering.
    #[serde(skip)]
    pub pod_key: Option<ObjectKey>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, or the protocol number.
    pub protocol: Option<String>,
    pub src: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dst: Option<IpAddr>,
    pub dport: Option<u16>,
    /// The pod at the other end's address, when the cluster has one there.
    pub peer: Option<String>,
    /// The policies that isolate the pod in this direction (none admitted the packet).
    #[serde(default)]
    pub policies: Vec<String>,
    /// The pod's address is claimed by several local pods: its endpoint admits nothing.
    #[serde(default)]
    pub quarantined: bool,
}

fn protocol_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn time_text(at: std::time::SystemTime) -> String {
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    jiff::Timestamp::from_nanosecond(d.as_nanos() as i128)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| format!("{}", d.as_secs()))
}

/// Names a dropped packet from what the compiler knows now.
pub fn resolve(n: &DropNotice, engine: &Engine) -> DropRecord {
    let name = |ip: &IpAddr| engine.pods_at(ip).first().cloned();
    // The endpoint on this node (several pods can claim an address), else its claimant.
    let pod_key =
        n.pod_ip.as_ref().and_then(|ip| engine.endpoint_at(ip).cloned().or_else(|| name(ip)));
    let peer_ip = n.flow.map(|f| match n.direction {
        Direction::Ingress => f.src,
        Direction::Egress => f.dst,
    });
    let origin = n.profile.and_then(|p| engine.profile_origin(p));
    DropRecord {
        time: time_text(n.at),
        direction: n.direction.to_string(),
        reason: n.reason.to_string(),
        pod: pod_key.as_ref().map(ToString::to_string),
        pod_key,
        protocol: n.flow.map(|f| protocol_name(f.protocol)),
        src: n.flow.map(|f| f.src),
        sport: n.flow.filter(|f| has_ports(f.protocol)).map(|f| f.sport),
        dst: n.flow.map(|f| f.dst),
        dport: n.flow.filter(|f| has_ports(f.protocol)).map(|f| f.dport),
        peer: peer_ip.as_ref().and_then(name).map(|k| k.to_string()),
        policies: origin
            .as_ref()
            .map(|o| o.policies.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        quarantined: origin.is_some_and(|o| o.quarantined),
    }
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132)
}

impl std::fmt::Display for DropRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = |ip: Option<IpAddr>, port: Option<u16>| match (ip, port) {
            (Some(ip), Some(p)) => format!("{ip}:{p}"),
            (Some(ip), None) => ip.to_string(),
            _ => "?".into(),
        };
        write!(
            f,
            "{} {} {} dropped ({})",
            self.time,
            self.pod.as_deref().unwrap_or("(unknown pod)"),
            self.direction,
            self.reason
        )?;
        if let Some(p) = &self.protocol {
            write!(f, " {p} {} -> {}", end(self.src, self.sport), end(self.dst, self.dport))?;
        }
        if let Some(peer) = &self.peer {
            let side = if self.direction == "ingress" { "from" } else { "to" };
            write!(f, " ({side} {peer})")?;
        }
        if self.quarantined {
            write!(f, "; address claimed by several pods: its endpoint admits nothing")?;
        } else if !self.policies.is_empty() {
            write!(f, "; isolated by {}, none admits it", self.policies.join(", "))?;
        }
        Ok(())
    }
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub namespace: Option<String>,
    /// A pod name (in `namespace`, or in any namespace without one).
    pub pod: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &DropRecord) -> bool {
        let Some(key) = &r.pod_key else {
            return self.namespace.is_none() && self.pod.is_none();
        };
        self.namespace.as_ref().is_none_or(|ns| *ns == key.namespace)
            && self.pod.as_ref().is_none_or(|p| *p == key.name)
    }
}

/// How many events the hub keeps for readers that ask for the latest.
pub const RECENT: usize = 1024;

/// The latest events and the readers following new ones.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
    /// Why this agent has no drop events (its dataplane reports none), told to readers.
    unavailable: Option<String>,
}

#[derive(Default)]
struct HubInner {
    recent: VecDeque<DropRecord>,
    followers: Vec<(Filter, SyncSender<DropRecord>)>,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::default()
    }

    /// A hub of an agent whose dataplane reports no drop events, saying why.
    pub fn unavailable(why: impl Into<String>) -> Arc<Hub> {
        Arc::new(Hub { unavailable: Some(why.into()), ..Hub::default() })
    }

    pub fn why_unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Keeps an event and hands it to every follower whose filter takes it. A follower that
    /// does not keep up loses events (never the agent's time); one that left is forgotten.
    pub fn publish(&self, r: DropRecord) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        h.followers.retain(|(filter, tx)| {
            !filter.matches(&r)
                || !matches!(tx.try_send(r.clone()), Err(TrySendError::Disconnected(_)))
        });
        if h.recent.len() == RECENT {
            h.recent.pop_front();
        }
        h.recent.push_back(r);
    }

    /// The latest events the filter takes (oldest first, at most `limit`), and, with
    /// `follow`, a receiver of those to come.
    pub fn open(
        &self,
        filter: &Filter,
        limit: usize,
        follow: bool,
    ) -> (Vec<DropRecord>, Option<Receiver<DropRecord>>) {
        let mut h = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut recent: Vec<DropRecord> =
            h.recent.iter().rev().filter(|r| filter.matches(r)).take(limit).cloned().collect();
        recent.reverse();
        let rx = follow.then(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(RECENT);
            h.followers.push((filter.clone(), tx));
            rx
        });
        (recent, rx)
    }

    pub fn followers(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).followers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, name: &str) -> DropRecord {
        DropRecord {
            time: "t".into(),
            direction: "ingress".into(),
            reason: "denied".into(),
            pod: Some(format!("{ns}/{name}")),
            pod_key: Some(ObjectKey::new(ns, name)),
            protocol: Some("TCP".into()),
            src: Some("10.0.0.1".parse().unwrap()),
            sport: Some(40000),
            dst: Some("10.0.0.2".parse().unwrap()),
            dport: Some(80),
            peer: Some("y/a".into()),
            policies: vec!["x/deny".into()],
            quarantined: false,
        }
    }

    #[test]
    fn filters_take_namespace_and_pod() {
        let r = record("x", "a");
        assert!(Filter::default().matches(&r));
        assert!(Filter { namespace: Some("x".into()), pod: None }.matches(&r));
        assert!(!Filter { namespace: Some("y".into()), pod: None }.matches(&r));
        assert!(Filter { namespace: None, pod: Some("a".into()) }.matches(&r));
        assert!(!Filter { namespace: Some("x".into()), pod: Some("b".into()) }.matches(&r));
        let unknown = DropRecord { pod: None, pod_key: None, ..r };
        assert!(Filter::default().matches(&unknown));
        assert!(!Filter { namespace: Some("x".into()), pod: None }.matches(&unknown));
    }

    #[test]
    fn the_hub_keeps_the_latest_and_streams_to_followers() {
        let hub = Hub::new();
        for i in 0..RECENT + 5 {
            hub.publish(record("x", &format!("p{i}")));
        }
        let (recent, rx) = hub.open(&Filter::default(), 3, false);
        assert!(rx.is_none());
        let names: Vec<_> = recent.iter().map(|r| r.pod.clone().unwrap()).collect();
        let last = RECENT + 4;
        assert_eq!(names, [last - 2, last - 1, last].map(|i| format!("x/p{i}")));
        let (_, rx) = hub.open(&Filter { namespace: Some("y".into()), pod: None }, 0, true);
        let rx = rx.unwrap();
        hub.publish(record("x", "a"));
        hub.publish(record("y", "b"));
        assert_eq!(rx.try_recv().unwrap().pod.as_deref(), Some("y/b"));
        assert!(rx.try_recv().is_err());
        drop(rx);
        hub.publish(record("y", "c"));
        assert_eq!(hub.followers(), 0, "a follower that left is forgotten");
    }

    #[test]
    fn a_record_reads_as_one_line() {
        let line = record("x", "a").to_string();
        assert_eq!(
            line,
            "t x/a ingress dropped (denied) TCP 10.0.0.1:40000 -> 10.0.0.2:80 (from y/a); isolated by x/deny, none admits it"
        );
        let back: DropRecord =
            serde_json::from_str(&serde_json::to_string(&record("x", "a")).unwrap()).unwrap();
        assert_eq!(back.pod.as_deref(), Some("x/a"));
    }
}
