//! Frames through the programs' own code on the host (`classify_frame`, then `decide` over
//! maps that hold a few endpoints, with connection tracking and fragments): never a panic, and
//! no packet leaving a pod is allowed with a source that is not the pod's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npm_agent::dataplane::ebpf::emulator::MapEmulator;
use npm_common::packet::FrameKind;
use npm_common::{DIR_EGRESS, DIR_INGRESS, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, EndpointInfo, Hook, Reason, classify_frame, decide};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (head, frame) = data.split_at(3);
    let mut maps = MapEmulator::default();
    for (i, ip) in [[10, 0, 0, 1], [10, 0, 0, 2]].into_iter().enumerate() {
        let flags = [EP_INGRESS_ISOLATED, EP_EGRESS_ISOLATED][i] | u32::from(head[2] & 1) * EP_INGRESS_ISOLATED;
        maps.endpoints.insert(ip, EndpointInfo { flags, profiles: [1, 2], ifindex: 0 });
        maps.bind_interface(ip.into(), 10 + i as u32);
    }
    let dir = if head[0] & 1 == 0 { DIR_INGRESS } else { DIR_EGRESS };
    let ifindex = 10 + u32::from(head[0] >> 1 & 3);
    let hook = Hook { dir, ifindex, ingress_ifindex: u32::from(head[1] & 15), now: u64::from(head[1]) << 30 };
    let parsed = classify_frame(frame);
    // The same frame twice: the second sees what the first left in conntrack.
    for _ in 0..2 {
        let v = decide(&maps, &hook, &parsed);
        if dir == DIR_EGRESS && v.allowed() && parsed.frame == FrameKind::Ipv4 {
            let own = maps.ifaces.get(&ifindex).map(|i| i.ip4);
            assert_eq!(Some(parsed.packet.flow.src), own, "{v:?}");
        }
        assert!(v.reason != Reason::Spoofed || !v.allowed());
    }
});
