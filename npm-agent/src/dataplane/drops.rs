//! Drop events as a dataplane reports them: one dropped packet, with what the dataplane knows
//! of it (its header, the local pod whose interface it crossed, the profile that judged it).
//! The agent names the pod and the profile's policies; the dataplane only reads the kernel.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use crate::model::Direction;
use crate::plan::ProfileId;

use super::DataplaneError;

/// One dropped packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropNotice {
    pub at: SystemTime,
    /// As the local pod sees it: `Ingress` entering it, `Egress` leaving it.
    pub direction: Direction,
    /// Why (a packet counter's reason: `denied`, `spoofed`, `malformed`, …).
    pub reason: &'static str,
    /// The header, when the frame was read as far (not for a frame of another ethertype).
    pub flow: Option<DropFlow>,
    /// The local pod whose interface the packet crossed (by the interface, not the header).
    pub pod_ip: Option<IpAddr>,
    /// The profile of that pod's direction, when it is isolated.
    pub profile: Option<ProfileId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Ports for TCP, UDP, SCTP; the identifier of an ICMP echo; else 0.
    pub sport: u16,
    pub dport: u16,
}

/// The stream of a dataplane's drop events, read on a thread of its own.
pub trait DropFeed: Send {
    /// Waits up to `timeout` for events and returns those that came (maybe none).
    fn wait(&mut self, timeout: Duration) -> Result<Vec<DropNotice>, DataplaneError>;
}
