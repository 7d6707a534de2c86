//! The bench's packet generator sends real packets: they cross the LAN and a forwarding node and
//! reach a pod; in new-flows mode nearly every packet is a new connection to the node's conntrack.

use exposure_lab::{
    frame::FrameSpec,
    lab::{Lab, CLIENT_IP},
    netns::{mac_text, unique_prefix, Netns},
    traffic::{counters, Flows, Generator},
    xdp_pass,
};

/// Connections the node's conntrack holds (a counting nft rule makes it track them).
fn connections(node: &Netns) -> u64 {
    let out = node
        .exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn live_frames_reach_a_pod_through_a_forwarding_node() {
    let prefix = unique_prefix("g");
    let lab = Lab::new(&prefix, &[1]).unwrap();
    let node = &lab.nodes[0].ns;
    let pod = &lab.nodes[0].pods[0];
    // XDP_TX from the client's veth needs an XDP program on its peer (see xdp_pass).
    let _c0 = xdp_pass::attach(&lab.lan, "c0").unwrap();
    let _sink = xdp_pass::attach_returning(&pod.ns, "eth0", xdp_pass::XDP_DROP).unwrap();
    // The sink drops ARP replies too: the node gets the pod's MAC up front.
    node.ip(&format!(
        "neigh replace {} lladdr {} dev vp1 nud permanent",
        pod.ip,
        mac_text(pod.ns.mac("eth0").unwrap())
    ))
    .unwrap();
    node.exec(
        "nft",
        &[
            "add table ip count; add chain ip count pre { type filter hook prerouting priority 0; }; add rule ip count pre ct state new counter",
        ],
    )
    .unwrap();
    lab.client
        .ip(&format!("route add 198.19.0.0/16 via {}", lab.nodes[0].ip))
        .unwrap();
    let mut spec = FrameSpec::udp((CLIENT_IP, 40000), (pod.ip, 50000));
    spec.src_mac = lab.client.mac("eth0").unwrap();
    spec.dst_mac = node.mac("eth0").unwrap();
    spec.payload = vec![0; 18]; // 64-byte frames
    let ifindex = lab
        .client
        .run(|| nix::net::if_::if_nametoindex("eth0"))
        .unwrap()
        .unwrap();
    let count = 100_000;
    for flows in [Flows::One, Flows::New] {
        let gen = std::sync::Arc::new(Generator::new(flows, &spec.build()).unwrap());
        // Every packet arrives, though recycled frames come back rewritten by the node. A CPU
        // busy elsewhere (e.g. the kernel still tearing down an earlier test's namespaces) can
        // push the path's softirqs to ksoftirqd and let the generator overrun a ring, so up to
        // three attempts.
        let mut results = Vec::new();
        for _ in 0..3 {
            let before = node.run(|| counters("vp1")).unwrap().unwrap();
            let new_before = connections(node);
            let g = gen.clone();
            lab.client
                .run(move || g.send(ifindex, count))
                .unwrap()
                .unwrap();
            let after = node.run(|| counters("vp1")).unwrap().unwrap();
            let delivered = after.tx_packets - before.tx_packets;
            let new = connections(node) - new_before;
            results.push((delivered, new));
            if delivered >= count as u64 * 99 / 100 {
                break;
            }
        }
        let &(delivered, new) = results.last().unwrap();
        assert!(
            delivered >= count as u64 * 99 / 100,
            "{flows:?}: only {results:?} (delivered, new connections) of {count} reached the pod"
        );
        match flows {
            Flows::One => assert!(new <= 1, "one flow, {new} new connections"),
            Flows::New => assert!(new >= count as u64 * 9 / 10, "only {new} new connections"),
        }
    }
}
