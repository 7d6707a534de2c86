//! The benchmarks' XDP-switched LAN: unicast frames between the client and the nodes are switched
//! by the XDP program on each LAN port (not by the bridge), and still arrive.

use exposure_lab::{lab::Lab, netns::unique_prefix};

/// How many frames XDP on the LAN port `port` redirected (veth's per-queue XDP counter).
fn redirected(lab: &Lab, port: &str) -> u64 {
    let out = lab.lan.exec("ethtool", &["-S", port]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_redirect:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("veth XDP redirect counter")
}

#[test]
fn unicast_crosses_the_lan_through_the_xdp_switch() {
    let prefix = unique_prefix("s");
    let mut lab = Lab::new(&prefix, &[1, 1]).unwrap();
    lab.fast_lan().unwrap();
    let (c0, n1) = (redirected(&lab, "c0"), redirected(&lab, "n1"));
    for (from, to) in [
        (&lab.client, lab.nodes[0].ip),
        (&lab.client, lab.nodes[1].ip),
        (&lab.nodes[0].ns, lab.nodes[1].ip),
    ] {
        let out = from
            .exec(
                "ping",
                &["-c", "3", "-i", "0.2", "-W", "2", &to.to_string()],
            )
            .unwrap();
        assert!(out.status.success(), "{} cannot reach {to}", from.name());
    }
    // The client's pings left through c0, node-1's through n1, each switched in XDP.
    assert!(redirected(&lab, "c0") >= c0 + 6);
    assert!(redirected(&lab, "n1") >= n1 + 3 + 3);
}
