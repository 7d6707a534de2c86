//! kube-proxy's rules for a set of Services, laid out as kube-proxy lays them out, so the bench can
//! measure the same traffic through them, Exposure and plain forwarding on one topology.
//!
//! - iptables mode (`pkg/proxy/iptables/proxier.go`): `KUBE-SERVICES` with one rule per cluster IP
//!   and LoadBalancer IP, `KUBE-NODEPORTS` behind an `addrtype LOCAL` rule at its end, a `KUBE-EXT-*`
//!   chain marking external traffic for masquerade, a `KUBE-SVC-*` chain choosing an endpoint with
//!   `statistic --mode random` probabilities, and a `KUBE-SEP-*` chain per endpoint doing the DNAT.
//! - nftables mode (`pkg/proxy/nftables/proxier.go`): one `service-ips` verdict map keyed by
//!   address . protocol . port and a `service-nodeports` map, `service-*` chains choosing an endpoint
//!   with `numgen random mod N vmap`, `endpoint-*` chains doing the DNAT.
//!
//! Both masquerade marked traffic in POSTROUTING (`--random-fully`), as kube-proxy does.

use std::{fmt::Write as _, net::Ipv4Addr};

/// One Service port as both layouts need it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub load_balancer_ip: Option<Ipv4Addr>,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServicePort {
    /// `namespace/name:port` as kube-proxy's comments and chain names spell it.
    fn display(&self) -> String {
        format!("{}/{}:p{}", self.namespace, self.name, self.port)
    }
}

/// kube-proxy hashes a name into 16 base32 characters (its `portProtoHash`); any stable hash of the
/// same shape gives the same rule layout.
fn chain_hash(text: &str) -> String {
    const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut out = String::with_capacity(16);
    for round in 0..2u64 {
        for b in text.bytes().chain(round.to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut x = h;
        for _ in 0..8 {
            out.push(BASE32[(x & 31) as usize] as char);
            x >>= 5;
        }
    }
    out
}

/// `iptables-restore` input for the nat and filter tables.
pub fn iptables_rules(services: &[ServicePort]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut nodeports = String::new();
    for s in services {
        let name = s.display();
        let hash = chain_hash(&format!("{name}/{}", s.protocol));
        let (svc, ext) = (format!("KUBE-SVC-{hash}"), format!("KUBE-EXT-{hash}"));
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let p = s.protocol;
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{name} cluster IP\" -m {p} --dport {} -j {svc}",
            s.cluster_ip, s.port
        );
        if let Some(lb) = s.load_balancer_ip {
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -d {lb}/32 -p {p} -m comment --comment \"{name} loadbalancer IP\" -m {p} --dport {} -j {ext}",
                s.port
            );
        }
        if let Some(np) = s.node_port {
            let _ = writeln!(
                nodeports,
                "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{name}\" -m {p} --dport {np} -j {ext}"
            );
        }
        let _ = writeln!(
            rules,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}"
        );
        let n = s.endpoints.len();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{name}/{p}/{ip}:{port}"))
            );
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let pick = if i + 1 < n {
                // Endpoint i of n takes 1/(n-i) of what is left: an even spread overall.
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {ip}:{port}\"{pick} -j {sep}\n-A {sep} -s {ip}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n-A {sep} -p {p} -m comment --comment \"{name}\" -m {p} -j DNAT --to-destination {ip}:{port}"
            );
        }
    }
    format!(
        "*filter\n:KUBE-FORWARD - [0:0]\n-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
COMMIT\n\
*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n{chains}\
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
{rules}{nodeports}\
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
COMMIT\n"
    )
}

/// `nft -f` input: kube-proxy's `ip kube-proxy` table. `node_ips` are the NodePort addresses.
pub fn nft_rules(services: &[ServicePort], node_ips: &[Ipv4Addr]) -> String {
    let mut chains = String::new();
    let mut service_ips = Vec::new();
    let mut node_ports = Vec::new();
    for s in services {
        let p = s.protocol;
        let id = format!(
            "{}-{}/{}/{p}/p{}",
            chain_hash(&format!("{}/{p}", s.display())),
            s.namespace,
            s.name,
            s.port
        );
        let (svc, ext) = (format!("service-{id}"), format!("external-{id}"));
        service_ips.push(format!("{} . {p} . {} : goto {svc}", s.cluster_ip, s.port));
        if let Some(lb) = s.load_balancer_ip {
            service_ips.push(format!("{lb} . {p} . {} : goto {ext}", s.port));
        }
        if let Some(np) = s.node_port {
            node_ports.push(format!("{p} . {np} : goto {ext}"));
        }
        let mut picks = Vec::new();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let ep = format!(
                "endpoint-{}-{}/{}/{p}/p{}__{ip}/{port}",
                chain_hash(&format!("{id}/{ip}")),
                s.namespace,
                s.name,
                s.port
            );
            let _ = writeln!(
                chains,
                "  chain {ep} {{\n    ip saddr {ip} jump mark-for-masquerade\n    meta l4proto {p} dnat to {ip}:{port}\n  }}"
            );
            picks.push(format!("{i} : goto {ep}"));
        }
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    numgen random mod {} vmap {{ {} }}\n  }}\n  chain {ext} {{\n    jump mark-for-masquerade\n    goto {svc}\n  }}",
            picks.len().max(1),
            picks.join(", ")
        );
    }
    let elements = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!("\n    elements = {{ {} }}", v.join(",\n      "))
        }
    };
    let node_ips: Vec<String> = node_ips.iter().map(|ip| ip.to_string()).collect();
    format!(
        "table ip kube-proxy {{\n\
  set nodeport-ips {{\n    type ipv4_addr{}\n  }}\n\
  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict{}\n  }}\n\
  map service-nodeports {{\n    type inet_proto . inet_service : verdict{}\n  }}\n\
  chain filter-forward {{\n    type filter hook forward priority -110; policy accept;\n    ct state invalid drop\n  }}\n\
  chain nat-prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n    jump services\n  }}\n\
  chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n\
  chain nat-postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    jump masquerading\n  }}\n\
  chain mark-for-masquerade {{\n    mark set mark or 0x4000\n  }}\n\
  chain masquerading {{\n    mark and 0x4000 == 0 return\n    mark set mark xor 0x4000\n    masquerade fully-random\n  }}\n\
  chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n    ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n  }}\n\
{chains}}}\n",
        elements(&node_ips),
        elements(&service_ips),
        elements(&node_ports),
    )
}

/// The same Services as Kubernetes objects (a manifest directory's YAML), for Exposure.
/// `node_of` names the node an endpoint runs on.
pub fn manifests(services: &[ServicePort], node_of: impl Fn(Ipv4Addr) -> String) -> String {
    use serde_json::json;
    let mut docs = Vec::new();
    for (k, s) in services.iter().enumerate() {
        let svc_type = match (s.node_port, s.load_balancer_ip) {
            (_, Some(_)) => "LoadBalancer",
            (Some(_), None) => "NodePort",
            (None, None) => "ClusterIP",
        };
        let mut port = json!({"name": "p", "protocol": s.protocol.to_uppercase(), "port": s.port});
        if let Some(np) = s.node_port {
            port["nodePort"] = json!(np);
        }
        let mut svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {"type": svc_type, "clusterIP": s.cluster_ip.to_string(), "ports": [port],
                     "allocateLoadBalancerNodePorts": s.node_port.is_some()}});
        if let Some(lb) = s.load_balancer_ip {
            svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}});
        }
        docs.push(svc);
        for (j, (ip, port)) in s.endpoints.iter().enumerate() {
            docs.push(
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{}-{k}-{j}", s.name), "namespace": s.namespace,
                             "labels": {"kubernetes.io/service-name": s.name}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "protocol": s.protocol.to_uppercase(), "port": port}],
                "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true},
                               "nodeName": node_of(*ip)}]}),
            );
        }
    }
    docs.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_endpoints() -> ServicePort {
        ServicePort {
            namespace: "default".into(),
            name: "hello-world".into(),
            protocol: "udp",
            cluster_ip: Ipv4Addr::new(198, 18, 50, 1),
            port: 60000,
            load_balancer_ip: Some(Ipv4Addr::new(198, 18, 100, 1)),
            node_port: Some(30600),
            endpoints: (2..5)
                .map(|i| (Ipv4Addr::new(198, 19, 1, i), 50000))
                .collect(),
        }
    }

    #[test]
    fn iptables_layout_is_kube_proxys() {
        let rules = iptables_rules(&[three_endpoints()]);
        let svc = rules
            .lines()
            .find(|l| l.starts_with("-A KUBE-SERVICES -d 198.18.50.1/32"))
            .expect("cluster IP rule");
        assert!(svc.contains("--dport 60000 -j KUBE-SVC-"), "{svc}");
        // Probabilities 1/3, 1/2, then the rest: an even split.
        assert!(rules.contains("--probability 0.3333333333"));
        assert!(rules.contains("--probability 0.5000000000"));
        assert_eq!(rules.matches("--mode random").count(), 2);
        assert_eq!(rules.matches("-j DNAT --to-destination").count(), 3);
        assert!(rules.contains("-A KUBE-NODEPORTS -p udp"));
        let last_nat_rule = rules
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(last_nat_rule.contains("--dst-type LOCAL -j KUBE-NODEPORTS"));
        // Chains are stable and distinct.
        assert_eq!(chain_hash("a"), chain_hash("a"));
        assert_ne!(chain_hash("a"), chain_hash("b"));
        assert_eq!(chain_hash("a").len(), 16);
    }

    #[test]
    fn nft_layout_is_kube_proxys() {
        let rules = nft_rules(&[three_endpoints()], &[Ipv4Addr::new(198, 18, 0, 10)]);
        assert!(rules.contains("198.18.50.1 . udp . 60000 : goto service-"));
        assert!(rules.contains("198.18.100.1 . udp . 60000 : goto external-"));
        assert!(rules.contains("udp . 30600 : goto external-"));
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert_eq!(rules.matches("dnat to 198.19.1.").count(), 3);
        assert!(rules.contains("elements = { 198.18.0.10 }"));
    }
}
