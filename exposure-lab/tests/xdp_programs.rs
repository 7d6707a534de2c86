//! The lab's hand-assembled XDP programs: the LAN switch (unicast frames between the client and
//! the nodes are switched by XDP on each LAN port, not by the bridge, and still arrive) and the
//! one-lookup reference the per-packet bench measures beside the floor.

use exposure_lab::{frame::FrameSpec, lab::Lab, netns::unique_prefix, xdp_pass};

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

#[test]
fn one_lookup_program_finds_its_entry() {
    let (prog, _map) = xdp_pass::load_one_lookup().unwrap();
    let frame = FrameSpec::udp(
        (std::net::Ipv4Addr::new(198, 18, 0, 1), 40000),
        (std::net::Ipv4Addr::new(198, 18, 0, 10), 53),
    )
    .build();
    // XDP_PASS only when the lookup hits (XDP_DROP on a miss): the bench measures the hit.
    let (verdict, _) = xdp_pass::test_run(&prog, &frame, 1000).unwrap();
    assert_eq!(verdict, xdp_pass::XDP_PASS as u32);
}

#[test]
fn inserts_program_adds_a_new_entry_to_each_map_per_run() {
    let (prog, maps) = xdp_pass::load_inserts(&[72, 64], 1024).unwrap();
    let frame = FrameSpec::udp(
        (std::net::Ipv4Addr::new(198, 18, 0, 1), 40000),
        (std::net::Ipv4Addr::new(198, 18, 0, 10), 53),
    )
    .build();
    let (verdict, _) = xdp_pass::test_run(&prog, &frame, 100).unwrap();
    assert_eq!(verdict, xdp_pass::XDP_PASS as u32, "every insert succeeded");
    for map in &maps {
        assert_eq!(
            xdp_pass::count_keys(map, 16).unwrap(),
            100,
            "one new key per run"
        );
    }
    // Past the maps' size, each insert evicts: they stay full.
    xdp_pass::test_run(&prog, &frame, 3000).unwrap();
    for map in &maps {
        let n = xdp_pass::count_keys(map, 16).unwrap();
        assert!((900..=1024).contains(&n), "{n} entries");
    }
}
