//! The bench's kube-proxy baselines are real: the generated iptables and nftables rules, loaded into
//! a lab node, carry NodePort and LoadBalancer traffic to local and remote pods (masqueraded like
//! kube-proxy does), and a filler of many Services loads too.

use std::{collections::BTreeSet, net::SocketAddr};

use exposure_lab::{
    apps::{self, parse_answer},
    kube_proxy::{iptables_rules, nft_rules, ServicePort},
    lab::{lb_ip, Lab, CLIENT_IP, LB_NET},
    netns::unique_prefix,
};

fn services(lab: &Lab, fillers: usize) -> Vec<ServicePort> {
    let pods: Vec<_> = lab.pods().map(|(_, p)| (p.ip, 50000)).collect();
    let mut out = vec![ServicePort {
        namespace: "default".into(),
        name: "hello-world".into(),
        protocol: "tcp",
        cluster_ip: "198.18.50.1".parse().unwrap(),
        port: 60000,
        load_balancer_ip: Some(lb_ip(1)),
        node_port: Some(30600),
        endpoints: pods.clone(),
    }];
    out.push(ServicePort {
        protocol: "udp",
        ..out[0].clone()
    });
    for i in 0..fillers {
        out.push(ServicePort {
            name: format!("filler-{i}"),
            cluster_ip: std::net::Ipv4Addr::from(0xc612_8000 + i as u32),
            load_balancer_ip: None,
            node_port: None,
            endpoints: vec![pods[i % pods.len()]],
            ..out[0].clone()
        });
    }
    out
}

fn check_traffic(lab: &Lab, layout: &str) {
    let everyone: BTreeSet<String> = lab.pods().map(|(_, p)| p.name.clone()).collect();
    for to in [
        SocketAddr::from((lab.nodes[0].ip, 30600)),
        SocketAddr::from((lb_ip(1), 60000)),
    ] {
        let mut pods = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let answer = apps::tcp_ask(&lab.client, to)
                .unwrap_or_else(|e| panic!("{layout} TCP {to}: {e:#}"));
            let (pod, peer) = parse_answer(&answer).unwrap();
            pods.insert(pod.to_string());
            seen.insert(peer.ip());
            let answer = apps::udp_ask(&lab.client, to)
                .unwrap_or_else(|e| panic!("{layout} UDP {to}: {e:#}"));
            pods.insert(parse_answer(&answer).unwrap().0.to_string());
        }
        assert_eq!(pods, everyone, "{layout}: every endpoint via {to}");
        // External traffic is masqueraded to the node, as kube-proxy does (no Local policy here).
        assert!(
            !seen.contains(&std::net::IpAddr::V4(CLIENT_IP)),
            "{layout}: {seen:?}"
        );
    }
}

#[test]
fn iptables_and_nftables_layouts_carry_service_traffic() {
    let prefix = unique_prefix("k");
    let lab = Lab::new(&prefix, &[1, 1]).unwrap();
    let _servers: Vec<_> = lab
        .pods()
        .map(|(_, p)| apps::serve(&p.ns, 50000, &p.name).unwrap())
        .collect();
    assert!(LB_NET.starts_with("198.18.100."));
    let node = &lab.nodes[0].ns;
    let svcs = services(&lab, 2000);

    node.exec_with_input("iptables-restore", &[], &iptables_rules(&svcs))
        .unwrap();
    check_traffic(&lab, "iptables");
    // Flush the iptables tables; new connections (fresh client ports) then meet only nft's.
    node.exec_with_input("iptables-restore", &[], "*nat\nCOMMIT\n*filter\nCOMMIT\n")
        .unwrap();
    let left = node.exec("iptables-save", &[]).unwrap();
    assert!(!String::from_utf8_lossy(&left.stdout).contains("KUBE-"));

    node.exec_with_input("nft", &["-f", "-"], &nft_rules(&svcs, &[lab.nodes[0].ip]))
        .unwrap();
    check_traffic(&lab, "nftables");
}
