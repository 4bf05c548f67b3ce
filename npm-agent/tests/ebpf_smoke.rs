//! End-to-end check of the eBPF toolchain: the object that `build.rs` built with aya-build is
//! embedded, loaded into the kernel, and the stub tc classifier is run once on a hand-built
//! Ethernet + IPv4 + TCP packet through `BPF_PROG_TEST_RUN`.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN); without it the test prints why and passes.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use npm_common::{COUNTERS_MAP, Counter, TC_PROGRAM};

/// `TC_ACT_PIPE` from `<linux/pkt_cls.h>`: no verdict, the next program (or the stack) decides.
const TC_ACT_PIPE: u32 = 3;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/npm-ebpf"));

/// Effective user id from `/proc/self/status` (line `Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A minimal TCP SYN 10.0.0.1:40000 -> 10.0.0.2:80 in an Ethernet frame.
fn tcp_syn_packet() -> Vec<u8> {
    let mut pkt = Vec::with_capacity(54);
    // Ethernet: dst MAC, src MAC, EtherType IPv4.
    pkt.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    pkt.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    pkt.extend_from_slice(&0x0800u16.to_be_bytes());
    // IPv4: version 4, IHL 5, DSCP 0, total length 40, id 0, DF, TTL 64, protocol TCP (6).
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let checksum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    pkt.extend_from_slice(&ip);
    // TCP: ports, seq 1, ack 0, data offset 5, flags SYN, window 64240, checksum 0 (unchecked).
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    pkt.extend_from_slice(&tcp);
    pkt
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn stub_classifier_counts_and_passes() -> anyhow::Result<()> {
    if effective_uid() != Some(0) {
        println!("SKIPPED ebpf_smoke: loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN)");
        return Ok(());
    }
    if EBPF_OBJECT.is_empty() {
        println!("SKIPPED ebpf_smoke: the eBPF object is an empty placeholder (AYA_BUILD_SKIP)");
        return Ok(());
    }

    let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or_else(|| anyhow::anyhow!("program {TC_PROGRAM} not in the object"))?
        .try_into()?;
    program.load()?;

    let packet = tcp_syn_packet();
    let mut out = vec![0u8; packet.len()];
    let result = program.test_run(TestRunOptions {
        data_in: Some(&packet),
        data_out: Some(&mut out),
        repeat: 1,
        ..TestRunOptions::default()
    })?;
    assert_eq!(result.return_value, TC_ACT_PIPE, "classifier verdict");
    assert_eq!(out, packet, "classifier must not modify the packet");

    let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(
        ebpf.map(COUNTERS_MAP)
            .ok_or_else(|| anyhow::anyhow!("map {COUNTERS_MAP} not in the object"))?,
    )?;
    let total: u64 = counters.get(&0, 0)?.iter().map(|c| c.packets).sum();
    assert_eq!(total, 1, "packets counted over all CPUs");
    Ok(())
}
