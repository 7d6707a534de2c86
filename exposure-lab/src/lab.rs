//! The namespace lab: an external client and nodes with pods on one bridged LAN.
//!
//! ```text
//!  client 198.18.0.1 ─┐                 LAN 198.18.0.0/24 (bridge in its own namespace)
//!  node-1 198.18.0.10 ┼─ pods 198.19.1.2, 198.19.1.3, ...
//!  node-2 198.18.0.20 ┘─ pods 198.19.2.2, ...
//! ```
//! LoadBalancer VIPs (198.18.100.0/24) are routed by the client to node-1, as a BGP/L2 announcer
//! would. The client has no route to pod addresses. No namespace has a default route.
//!
//! The lab is dual-stack: the same layout in 2001:2::/48 (RFC 5180's benchmarking range). LAN
//! 2001:2::/64 (client ::1, control plane ::2, node-N ::N0), pods 2001:2:0:N::P+2, LoadBalancer
//! addresses 2001:2:0:100::/64.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;

use crate::netns::Netns;

pub const LB_NET: &str = "198.18.100.0/24";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The LAN namespace's own address (on the bridge): where a test API server listens.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

pub const LB_NET6: &str = "2001:2:0:100::/64";
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const CONTROL_PLANE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

/// node-1 is 2001:2::10, node-2 2001:2::20 (read as hex, like the IPv4 .10 and .20).
pub fn node_ip6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10 * (node as u16 + 1))
}

pub fn pod_ip6(node: usize, pod: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, node as u16 + 1, 0, 0, 0, pod as u16 + 2)
}

pub fn lb_ip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, n)
}

pub fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 * (node as u8 + 1))
}

pub fn pod_ip(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, node as u8 + 1, pod as u8 + 2)
}

pub fn lb_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100, n)
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub ns: Netns,
}

impl Pod {
    /// The pod's address of `to`'s family: the source its packets to `to` carry.
    pub fn addr_towards(&self, to: &std::net::SocketAddr) -> std::net::IpAddr {
        if to.is_ipv4() {
            self.ip.into()
        } else {
            self.ip6.into()
        }
    }
}

pub struct Node {
    /// The Kubernetes node name (EndpointSlice `nodeName`).
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The node's LAN interface inside its namespace.
    pub iface: &'static str,
    pub ns: Netns,
    pub pods: Vec<Pod>,
}

pub struct Lab {
    pub prefix: String,
    /// XDP links on the LAN-side peers of the nodes: XDP_PASS (see [`crate::xdp_pass`]), or the
    /// switch after [`Lab::fast_lan`].
    _peer_xdp: Vec<std::os::fd::OwnedFd>,
    pub client: Netns,
    pub nodes: Vec<Node>,
    // Dropped last: the LAN namespace holds the bridge all others hang off.
    pub lan: Netns,
}

/// veth pair with full checksums on the wire (as from a real NIC), so XDP sees what a NIC delivers.
fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    a.ip(&format!(
        "link add {a_name} type veth peer name {b_name} netns {}",
        b.name()
    ))?;
    a.exec("ethtool", &["-K", a_name, "tx", "off"])?;
    b.exec("ethtool", &["-K", b_name, "tx", "off"])?;
    Ok(())
}

/// Node `n`'s `eth0` on the LAN bridge (with MAC `mac`, else a random one), addressed and up;
/// returns the XDP_PASS program on its LAN port (frames the node's XDP program transmits with
/// XDP_TX need an XDP program on the peer).
fn plug_node(
    lan: &Netns,
    ns: &Netns,
    n: usize,
    mac: Option<&str>,
) -> anyhow::Result<std::os::fd::OwnedFd> {
    let port = format!("n{}", n + 1);
    veth(ns, "eth0", lan, &port)?;
    if let Some(mac) = mac {
        ns.ip(&format!("link set eth0 address {mac}"))?;
    }
    lan.ip(&format!("link set {port} master br0 up"))?;
    let peer_xdp = crate::xdp_pass::attach(lan, &port)?;
    ns.ip(&format!("addr add {}/24 dev eth0", node_ip(n)))?;
    ns.ip(&format!("addr add {}/64 dev eth0 nodad", node_ip6(n)))?;
    ns.ip("link set eth0 up")?;
    Ok(peer_xdp)
}

/// Node `n` reaches the other nodes' pods through them (host-gw style).
fn route_to_other_nodes_pods(ns: &Netns, n: usize, nodes: usize) -> anyhow::Result<()> {
    for m in (0..nodes).filter(|m| *m != n) {
        ns.ip(&format!(
            "route add 198.19.{}.0/24 via {}",
            m + 1,
            node_ip(m)
        ))?;
        ns.ip(&format!(
            "-6 route add 2001:2:0:{}::/64 via {}",
            m + 1,
            node_ip6(m)
        ))?;
    }
    Ok(())
}

impl Lab {
    /// Builds the lab with `pods[i]` pods on node i.
    pub fn new(prefix: &str, pods: &[usize]) -> anyhow::Result<Self> {
        let lan = Netns::create(&format!("{prefix}-lan"))?;
        lan.ip("link add br0 type bridge")?;
        lan.ip("link set br0 up")?;
        lan.ip(&format!("addr add {CONTROL_PLANE_IP}/24 dev br0"))?;
        // nodad: addresses usable at once (duplicate detection would hold them for a second).
        lan.ip(&format!("addr add {CONTROL_PLANE_IP6}/64 dev br0 nodad"))?;
        let client = Netns::create(&format!("{prefix}-client"))?;
        let mut lab = Lab {
            prefix: prefix.to_string(),
            _peer_xdp: Vec::new(),
            client,
            nodes: Vec::new(),
            lan,
        };

        veth(&lab.client, "eth0", &lab.lan, "c0")?;
        lab.lan.ip("link set c0 master br0 up")?;
        lab.client
            .ip(&format!("addr add {CLIENT_IP}/24 dev eth0"))?;
        lab.client.ip("link set eth0 up")?;
        lab.client
            .ip(&format!("route add {LB_NET} via {}", node_ip(0)))?;
        lab.client
            .ip(&format!("addr add {CLIENT_IP6}/64 dev eth0 nodad"))?;
        lab.client
            .ip(&format!("-6 route add {LB_NET6} via {}", node_ip6(0)))?;

        for (n, &pod_count) in pods.iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-node{}", n + 1))?;
            lab._peer_xdp.push(plug_node(&lab.lan, &ns, n, None)?);
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            for key in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
            ] {
                ns.sysctl(key, "0")?;
            }
            let mut node = Node {
                name: format!("node-{}", n + 1),
                ip: node_ip(n),
                ip6: node_ip6(n),
                iface: "eth0",
                ns,
                pods: Vec::new(),
            };
            for p in 0..pod_count {
                let pod_ns = Netns::create(&format!("{prefix}-n{}p{}", n + 1, p + 1))?;
                let ip = pod_ip(n, p);
                let gw = Ipv4Addr::new(198, 19, n as u8 + 1, 1);
                let vp = format!("vp{}", p + 1);
                veth(&node.ns, &vp, &pod_ns, "eth0")?;
                node.ns.ip(&format!("addr add {gw}/32 dev {vp}"))?;
                node.ns.ip(&format!("link set {vp} up"))?;
                node.ns.ip(&format!("route add {ip}/32 dev {vp}"))?;
                pod_ns.ip(&format!("addr add {ip}/32 dev eth0"))?;
                pod_ns.ip("link set eth0 up")?;
                pod_ns.ip(&format!("route add {gw} dev eth0 scope link"))?;
                pod_ns.ip(&format!("route add 198.18.0.0/15 via {gw} dev eth0"))?;
                let ip6 = pod_ip6(n, p);
                let gw6 = Ipv6Addr::new(0x2001, 2, 0, n as u16 + 1, 0, 0, 0, 1);
                node.ns.ip(&format!("addr add {gw6}/128 dev {vp} nodad"))?;
                node.ns.ip(&format!("-6 route add {ip6}/128 dev {vp}"))?;
                pod_ns.ip(&format!("addr add {ip6}/128 dev eth0 nodad"))?;
                pod_ns.ip(&format!("-6 route add {gw6} dev eth0"))?;
                pod_ns.ip(&format!("-6 route add 2001:2::/48 via {gw6} dev eth0"))?;
                node.pods.push(Pod {
                    name: format!("pod-{}-{}", n + 1, p + 1),
                    ip,
                    ip6,
                    ns: pod_ns,
                });
            }
            lab.nodes.push(node);
        }
        for (n, node) in lab.nodes.iter().enumerate() {
            route_to_other_nodes_pods(&node.ns, n, lab.nodes.len())?;
        }
        lab.warm_neighbours()?;
        Ok(lab)
    }

    /// Deletes node `n`'s `eth0` and makes it again, as a hot-plugged NIC or a rebuilt bond comes
    /// back: the same name, MAC and addresses on a new interface, with nothing attached to it.
    pub fn replug_node(&mut self, n: usize) -> anyhow::Result<()> {
        let ns = &self.nodes[n].ns;
        let mac = crate::netns::mac_text(ns.mac("eth0")?);
        ns.ip("link del eth0")?;
        self._peer_xdp
            .push(plug_node(&self.lan, ns, n, Some(&mac))?);
        route_to_other_nodes_pods(ns, n, self.nodes.len())?;
        self.warm_neighbours()
    }

    /// Moves the nodes' pod networks onto a VXLAN overlay, as flannel's default backend (and
    /// Calico's VXLAN mode) lays it out: each node's `flannel.1` (VNI 1, UDP 8472 over its
    /// `eth0`, MTU 1450, rp_filter loose as systemd sets it) holds its pod network's `.0` (and
    /// `::`), and the other nodes' pod networks are routed through it onlink via theirs, with the
    /// permanent neighbour and forwarding entries flanneld writes (no learning); pods get the
    /// tunnel's MTU. The LAN then carries pod traffic between nodes only inside VXLAN.
    pub fn vxlan_overlay(&self) -> anyhow::Result<()> {
        const DEV: &str = "flannel.1";
        let mut macs = Vec::new();
        for (n, node) in self.nodes.iter().enumerate() {
            let ns = &node.ns;
            for pod in &node.pods {
                pod.ns.ip("link set eth0 mtu 1450")?;
            }
            ns.ip(&format!(
                "link add {DEV} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
                node.ip
            ))?;
            ns.sysctl("net.ipv4.conf.flannel/1.rp_filter", "2")?;
            ns.ip(&format!("link set {DEV} mtu 1450 up"))?;
            ns.ip(&format!("addr add 198.19.{}.0/32 dev {DEV}", n + 1))?;
            ns.ip(&format!(
                "addr add 2001:2:0:{}::/128 dev {DEV} nodad",
                n + 1
            ))?;
            macs.push(crate::netns::mac_text(ns.mac(DEV)?));
        }
        for (n, node) in self.nodes.iter().enumerate() {
            let ns = &node.ns;
            for (m, other) in self.nodes.iter().enumerate().filter(|(m, _)| *m != n) {
                let net = m + 1;
                let mac = &macs[m];
                ns.ip(&format!(
                    "route replace 198.19.{net}.0/24 via 198.19.{net}.0 dev {DEV} onlink"
                ))?;
                ns.ip(&format!(
                    "neigh replace 198.19.{net}.0 lladdr {mac} dev {DEV} nud permanent"
                ))?;
                // Deleted first: an onlink IPv6 gateway the old route reaches through eth0 is
                // refused as a device mismatch.
                ns.ip(&format!("-6 route del 2001:2:0:{net}::/64"))?;
                ns.ip(&format!(
                    "-6 route add 2001:2:0:{net}::/64 via 2001:2:0:{net}:: dev {DEV} onlink"
                ))?;
                ns.ip(&format!(
                    "-6 neigh replace 2001:2:0:{net}:: lladdr {mac} dev {DEV} nud permanent"
                ))?;
                ns.exec(
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        mac,
                        "dev",
                        DEV,
                        "dst",
                        &other.ip.to_string(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Resolves ARP and IPv6 neighbours between all LAN hosts up front: the XDP fast path uses the
    /// kernel's neighbour table (bpf_fib_lookup) and does not resolve on its own.
    pub fn warm_neighbours(&self) -> anyhow::Result<()> {
        let mut hosts: Vec<(&Netns, std::net::IpAddr)> = vec![
            (&self.client, CLIENT_IP.into()),
            (&self.client, CLIENT_IP6.into()),
        ];
        hosts.extend(self.nodes.iter().map(|n| (&n.ns, n.ip.into())));
        hosts.extend(self.nodes.iter().map(|n| (&n.ns, n.ip6.into())));
        for (ns, _) in &hosts {
            for (_, ip) in &hosts {
                ns.exec("ping", &["-c", "1", "-W", "1", &ip.to_string()])
                    .with_context(|| format!("{} cannot reach {ip}", ns.name()))?;
            }
        }
        Ok(())
    }

    /// Makes the LAN switch unicast frames between the client and the nodes in XDP, as a hardware
    /// switch would (no skb on the LAN), and turns GRO on at the hosts' ends, so frames reach each
    /// interface as from a NIC: XDP sees them before any skb exists, and without an XDP program
    /// the kernel builds the skb. For the benchmarks: the LAN's own cost then no longer hides the
    /// nodes'. Broadcasts (ARP, neighbour discovery) still go through the bridge.
    pub fn fast_lan(&mut self) -> anyhow::Result<()> {
        let mut ports = vec![("c0".to_string(), &self.client)];
        ports.extend(
            self.nodes
                .iter()
                .enumerate()
                .map(|(n, node)| (format!("n{}", n + 1), &node.ns)),
        );
        let mut hosts = Vec::new();
        for (port, ns) in &ports {
            ns.exec("ethtool", &["-K", "eth0", "gro", "on"])?;
            let index = self.lan.run({
                let port = port.clone();
                move || nix::net::if_::if_nametoindex(port.as_str())
            })??;
            hosts.push((ns.mac("eth0")?, index));
        }
        // The switch replaces the nodes' ports' XDP_PASS programs (it serves XDP_TX just as well).
        self._peer_xdp.clear();
        for (i, (port, _)) in ports.iter().enumerate() {
            let others: Vec<([u8; 6], u32)> = hosts
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, h)| *h)
                .collect();
            self._peer_xdp
                .push(crate::xdp_pass::attach_switch(&self.lan, port, &others)?);
        }
        Ok(())
    }

    pub fn pods(&self) -> impl Iterator<Item = (&Node, &Pod)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }
}

impl Drop for Lab {
    /// Removes what agents pinned for this lab's nodes (agents are stopped before the lab is dropped).
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(crate::agent::pin_dir(&self.prefix, node));
        }
    }
}
