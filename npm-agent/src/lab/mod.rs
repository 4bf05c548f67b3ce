//! The network-namespace lab: a small cluster built out of Linux network namespaces on one
//! machine, so that conformance cases run against the real dataplanes (eBPF and iptables)
//! without a Kubernetes cluster.
//!
//! [`net`] builds the network: node namespaces joined through a fabric (bridge) namespace,
//! pods as namespaces attached to their node by a veth pair with a /32 route per pod (and a
//! /128 per pod with an IPv6 address: dual stack or single-stack IPv6), TCP and UDP servers in
//! every pod (on each of its families), and parallel probing of every (client, server) pair
//! over either family. Everything
//! it creates lives in namespaces it creates, and it removes them on drop, on panic and on
//! SIGINT/SIGTERM/SIGHUP; see the module's documentation for the layout and the guarantees.
//! It is built from:
//! - [`registry`]: the process-wide registry of lab namespaces (named with the owning process
//!   id), the interrupt hooks and the SIGINT/SIGTERM/SIGHUP cleanup, and the cleanup of what
//!   dead lab processes left;
//! - `iproute`: `ip` batches and sysctls in the lab's namespaces (IPv6 turned on quietly);
//! - [`probe`]: the sockets, each pod's in-process servers and the parallel probes.
//!
//! Entering a namespace (threads and child processes) is [`crate::netns`]'s.
//!
//! [`cluster`] runs a conformance case on it: one real agent per node (`npm-agent run` with
//! the file source and the chosen dataplane, inside the node's network namespace), the
//! case's steps written as manifests, and every table probed with real packets.

pub mod cluster;
pub mod crr;
pub mod demo;
mod iproute;
pub mod net;
pub mod probe;
pub mod registry;
pub mod throughput;

pub use cluster::{LabCluster, LabOptions, run_cli};
pub use demo::demo_cli;
