//! Frames through the programs' own code on the host (`classify_frame`, then `decide` over
//! maps that hold a few endpoints, with connection tracking and fragments): never a panic, and
//! no packet leaving a pod is allowed with a source that is not the pod's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::dataplane::ebpf::addr_key;
use npm_agent::dataplane::ebpf::emulator::MapEmulator;
use npm_common::packet::{FrameKind, Kind};
use npm_common::{DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointInfo, Hook, Reason, classify_frame, decide};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, frame) = data.split_at(3);
    let mut maps = MapEmulator::default();
    // Two pods: 10.0.0.1 (dual stack, fd00::1) and 10.0.0.2.
    let pods: [(&[std::net::IpAddr], u32); 2] = [
        (&["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()], 10),
        (&["10.0.0.2".parse().unwrap()], 11),
    ];
    for (i, (addrs, ifindex)) in pods.into_iter().enumerate() {
        let flags = [EP_INGRESS_ISOLATED, EP_EGRESS_ISOLATED][i] | u32::from(head[2] & 1) * EP_INGRESS_ISOLATED;
        for ip in addrs {
            maps.endpoints.insert(addr_key(*ip), EndpointInfo { flags, profiles: [1, 2], ifindex: 0 });
            maps.bind_interface(*ip, ifindex);
        }
    }
    let dir = if head[0] & 1 == 0 { DIR_INGRESS } else { DIR_EGRESS };
    let ifindex = 10 + u32::from(head[0] >> 1 & 3);
    let hook = Hook { dir, ifindex, ingress_ifindex: u32::from(head[1] & 15), now: u64::from(head[1]) << 30 };
    let parsed = classify_frame(frame);
    // The same frame twice: the second sees what the first left in conntrack.
    for _ in 0..2 {
        let v = decide(&maps, &hook, &parsed);
        // (Neighbour discovery to link-scope addresses passes as ARP does.)
        if dir == DIR_EGRESS && v.allowed() && parsed.frame == FrameKind::Ip && parsed.packet.kind != Kind::Neighbor {
            let flow = parsed.packet.flow;
            let own = maps.ifaces.get(&ifindex).is_some_and(|i| i.is_own(flow.is_v6(), &flow.src));
            assert!(own, "{v:?}");
        }
        assert!(v.reason != Reason::Spoofed || !v.allowed());
    }
});
