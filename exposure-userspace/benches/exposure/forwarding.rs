//! End to end packets/s through a node: Exposure, kube-proxy's iptables rules, kube-proxy's nftables
//! rules, and plain forwarding (no load balancing: the topology's limit), in the same lab with the
//! same generator and the same Services.
//!
//! The lab: the client, node-1 with one pod, node-2 with one pod. Two target Services (NodePort
//! 30600 to node-1's pod, 30601 to node-2's pod) among N-2 filler LoadBalancer Services. The
//! generator ([`exposure_lab::traffic`]) sends 64-byte UDP frames from the client to node-1; the
//! pods drop them in XDP, or at tc ingress when moved into the pod's namespace from tc (sinks that
//! cost next to nothing), and the pods' interface counters say how many arrived. The whole path
//! runs on the generator's CPU in softirq, so packets/s is the inverse of the path's cost per
//! packet: the node's cost is the difference to plain forwarding.

use std::{net::Ipv4Addr, path::Path};

use exposure_lab::{
    agent::{Agent, Source},
    apps,
    frame::FrameSpec,
    kube_proxy::{self, ServicePort},
    lab::{Lab, CLIENT_IP},
    netns::{mac_text, unique_prefix},
    traffic::{counters, median_run, Flows, Generator},
    xdp_pass,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Plain,
    /// Plain forwarding with a two-instruction XDP_PASS program on the nodes' NICs: the end-to-end
    /// reading of the per-packet floor (what any XDP program in that place costs the path).
    NoopXdp,
    Exposure,
    /// Exposure with `--redirect-to-pods`: local pods' traffic goes from tc ingress into the pod.
    ExposureTcRedirect,
    /// Exposure with `--xdp-redirect-to-pods`: local pods' traffic skips node-1's stack.
    ExposureRedirect,
    Iptables,
    Nftables,
    /// [`Variant::NoopXdp`] in generic XDP: the floor of the path with an XDP program on the
    /// kernel's skb (as on a NIC whose driver has no native XDP, or refuses it).
    NoopGenericXdp,
    /// Exposure with `--xdp-mode generic`.
    ExposureGenericXdp,
}

impl Variant {
    pub const ALL: [Variant; 7] = [
        Variant::Plain,
        Variant::NoopXdp,
        Variant::Exposure,
        Variant::ExposureTcRedirect,
        Variant::ExposureRedirect,
        Variant::Iptables,
        Variant::Nftables,
    ];

    /// Generic XDP's pair, measured at one size beside the main table.
    pub const GENERIC: [Variant; 2] = [Variant::NoopGenericXdp, Variant::ExposureGenericXdp];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain forwarding",
            Variant::NoopXdp => "plain forwarding, no-op XDP",
            Variant::Exposure => "Exposure",
            Variant::ExposureTcRedirect => "Exposure, redirect to pods",
            Variant::ExposureRedirect => "Exposure, XDP redirect to pods",
            Variant::Iptables => "kube-proxy iptables",
            Variant::Nftables => "kube-proxy nftables",
            Variant::NoopGenericXdp => "plain forwarding, generic no-op XDP",
            Variant::ExposureGenericXdp => "Exposure, generic XDP",
        }
    }
}

/// The nodes' own netfilter, besides the variant's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeNetfilter {
    /// No rules: what a variant hands the kernel skips connection tracking (kube-proxy's rules
    /// bring their own).
    Bare,
    /// One NAT rule that matches nothing (a source no lab address has), as a CNI's masquerade for
    /// pod egress would be: the kernel now tracks every connection through the node.
    Conntrack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Local,
    Remote,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Remote => "remote",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Run {
    pub variant: Variant,
    pub services: usize,
    pub target: Target,
    pub flows: Flows,
    pub sent: u64,
    pub delivered: u64,
    pub pps: f64,
    /// See [`Setup::programming`].
    pub programming: std::time::Duration,
}

/// Backend ports of each UDP target Service (all on its one pod).
const UDP_BACKEND_PORTS: u16 = 16;
/// Packets per new-flows run (after a warm-up of 100): every packet a new flow.
pub const NEW_FLOWS_PER_RUN: u32 = 10_000;
/// Measured runs per scenario; the median is reported. New flows stay well inside the SNAT
/// ports: 100 + 5 × 10,000 of the 16 × 4,536 a remote target has.
pub const RUNS: usize = 5;

/// The targets (NodePort 30600 → node-1's pod, 30601 → node-2's pod) and fillers up to `n`.
fn services(lab: &Lab, n: usize) -> Vec<ServicePort> {
    let local = (lab.nodes[0].pods[0].ip, 50000);
    let remote = (lab.nodes[1].pods[0].ip, 50000);
    let target = |name: &str, ip: [u8; 4], node_port: u16, endpoints| ServicePort {
        namespace: "bench".into(),
        name: name.into(),
        protocol: "udp",
        cluster_ip: Ipv4Addr::from(ip),
        port: 80,
        load_balancer_ip: None,
        node_port: Some(node_port),
        endpoints,
    };
    // The UDP targets: the pod on UDP_BACKEND_PORTS ports (its XDP sink takes any), so new-flow runs
    // can be long without running out of SNAT ports (4,536 per remote backend address and port).
    let ports = |(ip, port): (Ipv4Addr, u16)| {
        (0..UDP_BACKEND_PORTS)
            .map(|k| (ip, port + k))
            .collect::<Vec<_>>()
    };
    let mut out = vec![
        target("target-local", [198, 18, 50, 1], 30600, ports(local)),
        target("target-remote", [198, 18, 50, 2], 30601, ports(remote)),
    ];
    // The same targets on TCP, for the connection and throughput runs.
    for (name, ip, np, ep) in [
        ("target-local-tcp", [198, 18, 50, 3], 30600, local),
        ("target-remote-tcp", [198, 18, 50, 4], 30601, remote),
    ] {
        out.push(ServicePort {
            protocol: "tcp",
            ..target(name, ip, np, vec![ep])
        });
    }
    for i in 0..n.saturating_sub(4) {
        out.push(ServicePort {
            name: format!("filler-{i:05}"),
            cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i as u32),
            load_balancer_ip: exposure_lab::scale::vip(i).parse().ok(),
            node_port: None,
            endpoints: vec![if i % 2 == 0 { local } else { remote }],
            ..out[0].clone()
        });
    }
    out
}

/// Everything a variant needs running, kept alive for its runs.
struct Setup {
    /// How long node-1 took to get the Services into its datapath: `iptables-restore` / `nft -f`
    /// of the whole ruleset (what a full kube-proxy sync hands the kernel), or the agent's start
    /// until healthy (first full sync: process start, BPF load, manifests, translation, maps).
    programming: std::time::Duration,
    _agents: Vec<Agent>,
    /// The pods' XDP_DROP programs (removed for the TCP runs, which need the pods' stacks).
    sinks: Vec<std::os::fd::OwnedFd>,
    /// The nodes' no-op XDP programs ([`Variant::NoopXdp`]), kept for the TCP runs too.
    node_programs: Vec<std::os::fd::OwnedFd>,
    dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self._agents.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn set_up(
    lab: &Lab,
    variant: Variant,
    netfilter: NodeNetfilter,
    svcs: &[ServicePort],
    bin: &Path,
) -> Setup {
    let dir = std::env::temp_dir().join(format!("{}-fwd", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let mut setup = Setup {
        programming: std::time::Duration::ZERO,
        _agents: Vec::new(),
        sinks: Vec::new(),
        node_programs: Vec::new(),
        dir: dir.clone(),
    };
    // The pods drop in XDP. (XDP_TX from the client's veth needs an XDP program on its peer: the
    // LAN's switch, see `Lab::fast_lan`.)
    for node in &lab.nodes {
        let pod = &node.pods[0];
        setup
            .sinks
            .push(xdp_pass::attach_returning(&pod.ns, "eth0", xdp_pass::XDP_DROP).unwrap());
        // Packets redirected into the pod's namespace from tc never meet its XDP.
        setup.sinks.push(
            xdp_pass::attach_tc_ingress_returning(&pod.ns, "eth0", xdp_pass::TC_ACT_SHOT).unwrap(),
        );
        // The sink drops ARP replies too: the node learns the pod's MAC up front.
        node.ns
            .ip(&format!(
                "neigh replace {} lladdr {} dev vp1 nud permanent",
                pod.ip,
                mac_text(pod.ns.mac("eth0").unwrap())
            ))
            .unwrap();
    }
    if netfilter == NodeNetfilter::Conntrack {
        for node in &lab.nodes {
            node.ns
                .exec(
                    "iptables",
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "198.18.250.0/24",
                        "-j",
                        "MASQUERADE",
                    ],
                )
                .unwrap();
        }
    }
    let node_of = |ip: Ipv4Addr| {
        lab.pods()
            .find(|(_, p)| p.ip == ip)
            .map_or_else(String::new, |(n, _)| n.name.clone())
    };
    match variant {
        Variant::Plain | Variant::NoopXdp | Variant::NoopGenericXdp => {
            lab.client
                .ip(&format!("route add 198.19.0.0/16 via {}", lab.nodes[0].ip))
                .unwrap();
            for node in &lab.nodes {
                let prog = match variant {
                    Variant::NoopXdp => {
                        xdp_pass::attach_returning(&node.ns, "eth0", xdp_pass::XDP_PASS)
                    }
                    Variant::NoopGenericXdp => {
                        xdp_pass::attach_generic_returning(&node.ns, "eth0", xdp_pass::XDP_PASS)
                    }
                    _ => continue,
                };
                setup.node_programs.push(prog.unwrap());
            }
        }
        Variant::Exposure
        | Variant::ExposureTcRedirect
        | Variant::ExposureRedirect
        | Variant::ExposureGenericXdp => {
            let redirect = matches!(
                variant,
                Variant::ExposureTcRedirect | Variant::ExposureRedirect
            );
            let flags: &[&str] = if variant == Variant::ExposureGenericXdp {
                &["--xdp-mode", "generic"]
            } else if variant == Variant::ExposureTcRedirect {
                &["--redirect-to-pods", "vp"]
            } else if redirect {
                // The mode's requirement: the pod side runs NAPI also once the sinks are gone.
                for node in &lab.nodes {
                    node.pods[0]
                        .ns
                        .exec("ethtool", &["-K", "eth0", "gro", "on"])
                        .unwrap();
                }
                &["--xdp-redirect-to-pods", "vp"]
            } else {
                &[]
            };
            let manifests = dir.join("manifests");
            std::fs::create_dir_all(&manifests).unwrap();
            std::fs::write(
                manifests.join("services.yaml"),
                kube_proxy::manifests(svcs, node_of),
            )
            .unwrap();
            for node in &lab.nodes {
                let started = std::time::Instant::now();
                let source = Source::Manifests(&manifests);
                let mut agent =
                    Agent::spawn_with(bin, &lab.prefix, node, &source, &dir, flags).unwrap();
                agent.wait_healthy(node).unwrap();
                if setup.programming.is_zero() {
                    setup.programming = started.elapsed();
                }
                // Flows started before the agent lists the pods' interfaces stay with the stack.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while redirect
                    && !agent.log_text().contains("pod interfaces for redirect")
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                setup._agents.push(agent);
            }
        }
        Variant::Iptables => {
            let rules = kube_proxy::iptables_rules(svcs);
            for node in &lab.nodes {
                let started = std::time::Instant::now();
                node.ns
                    .exec_with_input("iptables-restore", &[], &rules)
                    .unwrap();
                if setup.programming.is_zero() {
                    setup.programming = started.elapsed();
                }
            }
        }
        Variant::Nftables => {
            for node in &lab.nodes {
                let rules = kube_proxy::nft_rules(svcs, &[node.ip]);
                let started = std::time::Instant::now();
                node.ns
                    .exec_with_input("nft", &["-f", "-"], &rules)
                    .unwrap();
                if setup.programming.is_zero() {
                    setup.programming = started.elapsed();
                }
            }
        }
    }
    setup
}

/// TCP through the same node: new connections per second (a client connecting and resetting)
/// and one connection's throughput.
#[derive(Clone, Debug)]
pub struct TcpRun {
    pub variant: Variant,
    pub services: usize,
    pub target: Target,
    pub connections_per_s: f64,
    pub bytes_per_s: f64,
    /// New connections per second from a process on node-1 itself to the same target: through
    /// Exposure's socket hooks, or kube-proxy's OUTPUT rules (plainly: to the pod).
    pub from_node_per_s: f64,
}

/// The node whose pod a target is, and where the client sends: the pod itself when forwarding
/// plainly, else the target's NodePort on node-1.
fn destination(lab: &Lab, variant: Variant, target: Target) -> (usize, (Ipv4Addr, u16)) {
    let node = match target {
        Target::Local => 0,
        Target::Remote => 1,
    };
    let to = match variant {
        Variant::Plain | Variant::NoopXdp | Variant::NoopGenericXdp => {
            (lab.nodes[node].pods[0].ip, 50000)
        }
        _ => (lab.nodes[0].ip, 30600 + node as u16),
    };
    (node, to)
}

/// Waits (up to 30 s) until the CPUs have been at least 90% idle for a quarter second: the
/// previous lab's teardown, or anything else the machine was doing, done before measuring.
pub fn wait_for_quiet() {
    // Busy and total jiffies of all CPUs (/proc/stat's first line).
    let times = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3)? + v.get(4)?;
        Some((total - idle, total))
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let Some((busy0, total0)) = times() else {
            return;
        };
        std::thread::sleep(std::time::Duration::from_millis(250));
        let Some((busy1, total1)) = times() else {
            return;
        };
        // Saturating: iowait, part of the total, may step back.
        if busy1.saturating_sub(busy0) * 10 <= total1.saturating_sub(total0) {
            return;
        }
    }
}

/// Runs every (target, flows) scenario of one variant at one Service count, in a fresh lab, then
/// the TCP runs.
pub fn measure(
    variant: Variant,
    netfilter: NodeNetfilter,
    n: usize,
    packets: u32,
    bin: &Path,
) -> (Vec<Run>, Vec<TcpRun>) {
    // The previous lab's namespaces are torn down by kernel workers after the fact; that work
    // competing for the CPU pushes softirqs to ksoftirqd and the generator overruns rings.
    wait_for_quiet();
    let prefix = unique_prefix("f");
    let mut lab = Lab::new(&prefix, &[1, 1]).expect("lab");
    lab.fast_lan().expect("XDP switching on the LAN");
    let svcs = services(&lab, n);
    let setup = set_up(&lab, variant, netfilter, &svcs, bin);
    let client_mac = lab.client.mac("eth0").unwrap();
    let node_mac = lab.nodes[0].ns.mac("eth0").unwrap();
    let ifindex = lab
        .client
        .run(|| nix::net::if_::if_nametoindex("eth0"))
        .unwrap()
        .unwrap();
    let mut runs = Vec::new();
    for target in [Target::Local, Target::Remote] {
        let (node, to) = destination(&lab, variant, target);
        for flows in [Flows::One, Flows::New] {
            let mut spec = FrameSpec::udp((CLIENT_IP, 40000), to);
            spec.src_mac = client_mac;
            spec.dst_mac = node_mac;
            spec.payload = vec![0; 18]; // 64-byte frames
            let gen = std::sync::Arc::new(Generator::new(flows, &spec.build()).unwrap());
            // A short warm-up (neighbours, first flows), then the measured run.
            // What reaches the pod, whichever way: through its veth or moved into its namespace.
            let pod = &lab.nodes[node].pods[0].ns;
            let send = |count: u32| {
                let g = gen.clone();
                let before = pod.run(|| counters("eth0")).unwrap().unwrap();
                let took = lab
                    .client
                    .run(move || g.send(ifindex, count))
                    .unwrap()
                    .unwrap();
                let after = pod.run(|| counters("eth0")).unwrap().unwrap();
                (after.rx_packets - before.rx_packets, took)
            };
            // New flows leave state behind (conntrack entries, NAT ports, Exposure's SNAT ports:
            // 4,536 per backend address and port, 16 backend ports here), so those runs stay well
            // inside every table: no run again after a loss.
            let (warm_up, count, again) = match flows {
                Flows::One => (1_000, packets, RUNS),
                Flows::New => (100, NEW_FLOWS_PER_RUN, 0),
            };
            send(warm_up);
            let (delivered, took) = median_run(RUNS, again, count, || send(count));
            let packets = count;
            runs.push(Run {
                variant,
                services: n,
                target,
                flows,
                sent: packets as u64,
                delivered,
                pps: delivered as f64 / took.as_secs_f64(),
                programming: setup.programming,
            });
        }
    }
    let mut setup = setup;
    setup.sinks.clear();
    let _servers: Vec<_> = lab
        .nodes
        .iter()
        .map(|nd| apps::discard(&nd.pods[0].ns, 50000).unwrap())
        .collect();
    let mut tcp = Vec::new();
    for target in [Target::Local, Target::Remote] {
        let to = std::net::SocketAddr::from(destination(&lab, variant, target).1);
        let second = std::time::Duration::from_secs(1);
        tcp.push(TcpRun {
            variant,
            services: n,
            target,
            connections_per_s: apps::tcp_connect_rate(&lab.client, to, 1, second).unwrap(),
            bytes_per_s: apps::tcp_throughput(&lab.client, to, second).unwrap(),
            from_node_per_s: apps::tcp_connect_rate(&lab.nodes[0].ns, to, 1, second).unwrap(),
        });
    }
    drop(setup);
    (runs, tcp)
}
